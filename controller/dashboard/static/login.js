// The view asked for (/dashboard#tenants, or the page whose session ended) is kept through the sign-in: the form
// posts to /dashboard/login#tenants, and the redirect to /dashboard that answers it inherits the fragment.
"use strict";
if (location.hash) document.querySelector("form.login-box").action = "/dashboard/login" + location.hash;
