// The view asked for (/dashboard#tenants, or the page whose session ended) is kept through the sign-in: the form
// posts to /dashboard/login#tenants, and the redirect to /dashboard that answers it inherits the fragment.
"use strict";
if (location.hash) document.querySelector("form.login-box").action = "/dashboard/login" + location.hash;
// A token refused: the form again, answering the POST at /dashboard/login. Its URL becomes /dashboard's, whose
// reload is a GET of the form (a reload asked to send the token again, or showed the browser's "Confirm Form
// Resubmission" page).
if (location.pathname === "/dashboard/login") history.replaceState(null, "", "/dashboard" + location.hash);
