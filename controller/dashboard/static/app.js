// tokenpool dashboard: one page over the admin API. Live data: one event stream (/admin/events, server-sent
// events) carrying the pool's events and, once a second, snapshots of /admin/pool and /admin/requests; no
// polling. No framework, no build step; charts by the vendored uPlot. Every value goes into the page as text
// (textContent), never HTML.
"use strict";

const SPAN_S = 60; // seconds of timeline and charts shown
const MAX_EVENTS = 500;
const PALETTE = ["#2f6fdf", "#e0573a", "#1f9d55", "#9b59d0", "#d19a00", "#14a3b8", "#c2417d", "#6b8e23",
  "#8c5a3c", "#4b5fc9", "#d06b00", "#2e8b7a"];
// A model's `late` events (a request past its next token's deadline) within this many seconds of the first are one
// line of the Events view, "late ×N": on a slow CPU a model is late again at nearly every turn, and its events filled
// the list (and the page's MAX_EVENTS, pushing every other event out)
const LATE_WINDOW_S = 60;

const S = {
  view: "pool", pool: null, events: [], kinds: new Set(), colors: new Map(),
  requests: [], requestsTotal: 0, inflight: null, // the oldest in flight, how many are, what the stream said
  series: { t: [], tps: new Map(), queue: new Map() }, charts: {}, soon: null, eventsDue: null,
  lastSeq: 0, // the last event's seq: a new stream goes on from it (the ring's backlog once, not again)
  snapshots: 0, // pool snapshots drawn (the browser tests wait on it)
  es: null, // the event stream
  lastData: 0, opened: 0, // when (Date.now()) the stream last brought a snapshot, and when it last opened
  retrying: false, // the stream failed and reconnects (the page says "reconnecting…")
  retryMs: 1000, // the wait before reconnect()'s next try (retryLater): 1 s, doubled up to 8 s while streams fail
  calls: 0, // admin API calls in flight
  leaving: false, // signed out: the page goes to the login form once no call is in flight
  signingOut: false, // this tab signs out: no call starts (one answered after the session's drop is a 401)
  gone: false, // ... and went
  // what the snapshots do not carry: each model's aliases (GET /admin/models), each tenant's models, limits and
  // source (GET /admin/tenants); fetched again when the names change, after an action and at a tenant's change
  details: { models: new Map(), tenants: new Map(), names: null, loading: false, again: false },
};
const VIEWS = ["pool", "models", "tenants", "requests", "events"];

// --- small helpers ---
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "style") Object.assign(e.style, v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const k of kids.flat()) if (k !== null && k !== undefined) e.append(k instanceof Node ? k : String(k));
  return e;
}
const fmtS = (s) => (s === null || s === undefined) ? "—" : s < 1 ? `${(s * 1000).toFixed(0)} ms` : `${s.toFixed(2)} s`;
const fmtPct = (x) => (x === null || x === undefined) ? "—" : `${(100 * x).toFixed(1)}%`;
const fmtNum = (x, d = 1) => (x === null || x === undefined) ? "—" : x.toFixed(d);
function fmtBytes(b) {
  if (b === null || b === undefined) return "—";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (b >= 1024 && i < u.length - 1) { b /= 1024; i++; }
  return `${b.toFixed(b >= 100 || i === 0 ? 0 : 1)} ${u[i]}`;
}
function clock(t) {
  const d = new Date(t * 1000);
  return [d.getHours(), d.getMinutes(), d.getSeconds()].map((x) => String(x).padStart(2, "0")).join(":");
}
// The views are drawn again at every snapshot (once a second): `patch` brings what is on the page up to date
// rather than replacing it, so that the focus (a keyboard user's Tab to a button), a click in progress (a mouse
// button pressed on a button that the next snapshot replaced never became a click) and a text selection survive
// it. A node is kept where its tag and attributes are unchanged, and its children are patched the same way; one
// whose attributes changed is replaced, listeners and all. Siblings are matched by their key (the row's model,
// request, tenant, engine or event), a row's buttons by their action, else by position: a kept button belongs to
// the same row, so its listener acts on the same thing as the new one would. (Buttons by position: a tenant's Edit
// and New key, drawn once its details came, took Revoke's place and Revoke was replaced; the focus on it went to
// New key, where Enter gave the tenant a new key.)
const KEYS = ["data-model", "data-request", "data-tenant", "data-engine", "data-seq"];
function keyOf(n) {
  if (n.nodeType !== Node.ELEMENT_NODE) return null;
  for (const k of KEYS) if (n.hasAttribute(k)) return `${k}=${n.getAttribute(k)}`;
  return null;
}
function slotOf(n) { // (a button by its action among its siblings: one action a row)
  const k = keyOf(n);
  if (k !== null || n.nodeType !== Node.ELEMENT_NODE || !n.hasAttribute("data-action")) return k;
  return `data-action=${n.getAttribute("data-action")}`;
}
function sameNode(a, b) {
  if (a.nodeName !== b.nodeName || a.nodeType !== b.nodeType) return false;
  if (a.nodeType !== Node.ELEMENT_NODE) return true;
  if (a.attributes.length !== b.attributes.length) return false;
  for (const { name, value } of b.attributes) if (a.getAttribute(name) !== value) return false;
  return true;
}
function patch(parent, kids) {
  // the node with the focus and its ancestors up to `parent`'s child, each with its place among its siblings
  const f = document.activeElement, trail = [];
  if (f && f !== parent && parent.contains(f)) {
    for (let n = f; n !== parent; n = n.parentNode) trail.unshift([n, [...n.parentNode.childNodes].indexOf(n)]);
  }
  patchNodes(parent, kids);
  if (trail.length && !f.isConnected) refocus(parent, trail, f.dataset.action);
}
function patchNodes(parent, kids) {
  const old = [...parent.childNodes];
  const byKey = new Map(old.map((n) => [slotOf(n), n]));
  const used = new Set(); // (a key given twice keeps its node once)
  const out = kids.map((b) => (b instanceof Node ? b : document.createTextNode(String(b)))).map((b, i) => {
    const k = slotOf(b);
    const a = k !== null ? byKey.get(k) : old[i] && slotOf(old[i]) === null ? old[i] : undefined;
    if (!a || used.has(a) || !sameNode(a, b)) return b;
    used.add(a);
    if (a.nodeType === Node.ELEMENT_NODE) patchNodes(a, [...b.childNodes]);
    else if (a.nodeValue !== b.nodeValue) a.nodeValue = b.nodeValue;
    return a;
  });
  const keep = new Set(out);
  for (const n of old) if (!keep.has(n)) n.remove();
  let at = parent.firstChild; // what is already in place stays where it is (moving a node blurs it)
  for (const n of out) {
    if (n === at) at = at.nextSibling;
    else parent.insertBefore(n, at);
  }
}

// The focus where the node that had it left the page (a row gone with its own Revoke, Remove or Cancel, or with a
// snapshot; Evict gone once evicted; Unpin where Pin was): it fell to the page's body, and the keyboard's place with
// it. It goes to that node redrawn (a row by its key, a button by its action), or to its counterpart where the button
// turned into it (COUNTERPART), else the same button in the next row (the one before, past the last), else the
// nearest control beside it, else the heading of the table (of the card) it was in. A button is never taken for
// being at the focused one's place: whichever button came next sits there (in a row drawn without spaces between
// its buttons, an Evict gone gave the focus to that row's Remove, a Pin turned Unpin too).
const FOCUSABLE = "button:not([disabled]), a[href], input:not([disabled]), select:not([disabled]), textarea, [tabindex]";
// The actions whose button becomes the other's once done, in the same row (card): the same control, for the keyboard
const COUNTERPART = { pin: "unpin", unpin: "pin", drain: "resume", resume: "drain" };
function refocus(parent, trail, action) {
  const live = [parent]; // down the trail as far as its nodes, or ones with their key (action) or place, are there
  for (const [old, i] of trail) {
    const box = live[live.length - 1], kids = [...box.childNodes], k = keyOf(old), slot = slotOf(old);
    const other = COUNTERPART[old.dataset?.action];
    const now = old.parentNode === box ? old : k !== null ? kids.find((n) => keyOf(n) === k)
      : slot !== null ? kids.find((n) => slotOf(n) === slot) // (its action's button, redrawn)
        || (other && kids.find((n) => slotOf(n) === `data-action=${other}`)) // (Unpin for Pin, Resume for Drain)
      : kids[i] && kids[i].nodeName === old.nodeName && slotOf(kids[i]) === null ? kids[i] : undefined; // (a cell)
    if (!now) break;
    live.push(now);
  }
  if (live.length > trail.length) { // (redrawn, or its counterpart: Unpin for Pin, Resume for Drain)
    const t = live[live.length - 1];
    if (t.matches(FOCUSABLE)) { t.focus(); return; }
  }
  const levels = Math.min(live.length, trail.length);
  const find = (j, sel) => { // from where the node was at level j of the trail: after it, then before it
    const i = trail[j][1], sibs = [...live[j].childNodes];
    for (const n of [...sibs.slice(i), ...sibs.slice(0, i).reverse()]) {
      if (n.nodeType !== Node.ELEMENT_NODE) continue;
      const t = n.matches(sel) ? n : n.querySelector(sel);
      if (t) return t;
    }
    return null;
  };
  // the same button in its row, else in the next row (the one before, past the last), from where the trail broke
  // up; only then a control beside it (Evict gone from a row still there went to the row's Remove, past the next
  // row's Evict)
  for (let j = levels - 1; action && j >= 0; j--) {
    const t = find(j, `[data-action="${CSS.escape(action)}"]`);
    if (t) { t.focus(); return; }
  }
  for (let j = levels - 1; j >= 0; j--) {
    if (keyOf(trail[j][0]) !== null) break; // a row gone, and no row has that button: the heading
    const t = find(j, FOCUSABLE);
    if (t) { t.focus(); return; }
  }
  const h = parent.closest(".card")?.querySelector("h3");
  if (h) { h.tabIndex = -1; h.focus(); }
}

// The palette's twelve, then hues a golden angle (137.5°) apart, at three lightnesses none of the palette's has: as
// far apart as the palette's own colours up to 30 models, and never one colour twice (the 13th model had the 1st's)
function modelColor(i) {
  if (i < PALETTE.length) return PALETTE[i];
  const j = i - PALETTE.length;
  return `hsl(${((100 + j * 137.508) % 360).toFixed(1)}, 65%, ${[28, 48, 66][j % 3]}%)`;
}
function color(model) {
  if (!S.colors.has(model)) S.colors.set(model, modelColor(S.colors.size));
  return S.colors.get(model);
}
function toast(msg, error = false) {
  const t = document.getElementById("toast");
  t.setAttribute("role", error ? "alert" : "status"); // (an error is read out at once)
  t.textContent = msg;
  t.className = error ? "error" : "";
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.hidden = true; }, error ? 9000 : 6000);
}

async function api(method, path, body) {
  const opts = { method, credentials: "same-origin", headers: {} };
  if (body !== undefined) { opts.headers["Content-Type"] = "application/json"; opts.body = JSON.stringify(body); }
  let r, data = null;
  if (S.signingOut) throw new Error("signed out");
  S.calls++;
  try {
    try {
      r = await fetch(path, opts);
    } catch (e) { // (the browser's own words, "Failed to fetch", told an operator nothing)
      const err = new Error("the server did not answer (is it running, or restarting?)");
      err.unreachable = true;
      throw err;
    }
    try { data = await r.json(); } catch (e) { data = null; }
  } finally {
    S.calls--;
    if (S.leaving) signedOut();
  }
  if (r.status === 401) { signedOut(); throw new Error("signed out"); }
  if (!r.ok) throw new Error((data && data.error && data.error.message) || `HTTP ${r.status}`);
  return data;
}

// The session ended (signed out in another tab, expired, the server restarted): back to the login form, once,
// when no call is in flight and the event stream has ended (each call that got a 401 navigated again, and a
// navigation aborts the requests in flight: failed requests in the browser's log). The server ends a signed-out
// session's streams before it answers the sign-out (an expired one's within a beat); 8 s is the limit all the same
// (a stream still open then is aborted by the navigation: a failed request in the browser's log; 3 s was passed on
// a loaded CI host, when the stream ended at the beat after the sign-out's answer).
function signedOut(now = false) {
  if (!S.leaving) setTimeout(() => signedOut(true), 8000);
  S.leaving = true;
  if (S.gone || (!now && (S.calls > 0 || (S.es && S.es.readyState === EventSource.OPEN)))) return;
  S.gone = true;
  if (S.es) S.es.close();
  location.reload(); // (the login form, at this view's URL: signed in again, the page comes back to this view)
}

// An action: confirmed first, its result (or error) shown, then the views refreshed. True when it was done.
async function act(question, method, path, body, done) {
  if (!window.confirm(question)) return false;
  let ok = false;
  try {
    const res = await api(method, path, body);
    const said = done(res); // (text, or {text, warn}: a warning stays up as long as an error, read out at once)
    if (typeof said === "string") toast(said); else toast(said.text, said.warn);
    ok = true;
  } catch (e) {
    toast(`Failed: ${e.message}`, true);
  }
  refreshSoon(0);
  return ok;
}

async function loadDetails() {
  const d = S.details;
  if (d.loading) { d.again = true; return; }
  d.loading = true;
  try {
    const [ms, ts] = await Promise.all([api("GET", "/admin/models"), api("GET", "/admin/tenants")]);
    d.models = new Map(ms.map((m) => [m.name, m]));
    d.tenants = new Map(ts.map((t) => [t.name, t]));
  } catch (e) {
    // (the views go on without them; a session that ended is api()'s to handle)
  } finally {
    d.loading = false;
  }
  if (d.again) { d.again = false; loadDetails(); } else if (S.pool) applyPool(S.pool, false);
}

function detailsFor(p) {
  const names = [...p.models.map((m) => m.name), "", ...p.tenants.map((t) => t.name)].join("\n");
  if (names !== S.details.names) { S.details.names = names; loadDetails(); }
}

function fmtLimits(t) {
  if (!t) return "—";
  const r = t.rate || {}, out = [];
  if (r.requests_per_s) out.push(`${r.requests_per_s} req/s${r.burst ? ` (burst ${r.burst})` : ""}`);
  if (r.tokens_per_min) out.push(`${r.tokens_per_min} tok/min`);
  if (t.max_concurrent) out.push(`${t.max_concurrent} at once`);
  return out.join(" · ") || "none";
}

// A tenant's key rotated in place: PATCH /admin/tenants/NAME with the new key's hash as its only key. Its other keys
// stop working at once (their requests in flight end), the new one works from the same moment; its models, limits,
// usage and its requests on no dropped key stay. (It was DELETE then POST: a moment with no tenant at all, its
// usage reset, and a POST that failed left it revoked.) The key is made and hashed here, as `tokenpool keys new`
// makes one (the server keeps only a hash), and shown once. Only for a tenant made here: one of the configuration
// file is changed there.
async function rotate(name) {
  if (!window.confirm(`Give tenant ${name} a new key? Its keys stop working at once and their requests in flight ` +
    "end; its models and limits stay.")) return;
  try {
    const key = newKey();
    await api("PATCH", `/admin/tenants/${encodeURIComponent(name)}`, { key_hashes: [hashKey(key)] });
    showKey({ name, api_key: key });
    toast(`Tenant ${name} has a new key`);
  } catch (e) {
    toast(`Failed: ${e.message}`, true);
  }
  refreshSoon(0);
}

// controller.keys: a key is "tp-" and 256 random bits (URL-safe base64); its hash "sha256$SALT$DIGEST", DIGEST the
// SHA-256 of the 16 random bytes of SALT (hex) followed by the key's UTF-8.
function newKey() {
  const b = crypto.getRandomValues(new Uint8Array(32));
  return "tp-" + btoa(String.fromCharCode(...b)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}
const hex = (b) => [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
function hashKey(key) {
  const salt = crypto.getRandomValues(new Uint8Array(16)), k = new TextEncoder().encode(key);
  const msg = new Uint8Array(salt.length + k.length);
  msg.set(salt);
  msg.set(k, salt.length);
  return `sha256$${hex(salt)}$${hex(sha256(msg))}`;
}
// SHA-256 (FIPS 180-4) here, not crypto.subtle: a browser offers that only in a secure context (HTTPS or
// localhost), and a dashboard is often opened over plain HTTP on the server's address.
const SHA_K = new Uint32Array([
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5, 0xd807aa98,
  0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786,
  0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8,
  0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13,
  0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819,
  0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a,
  0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
  0xc67178f2]);
function sha256(msg) {
  const n = Math.ceil((msg.length + 9) / 64) * 64; // the message, 0x80, zeros, its length in bits (64-bit big-endian)
  const m = new Uint8Array(n);
  m.set(msg);
  m[msg.length] = 0x80;
  const dv = new DataView(m.buffer);
  dv.setUint32(n - 8, Math.floor(msg.length / 0x20000000));
  dv.setUint32(n - 4, (msg.length * 8) >>> 0);
  const h = new Uint32Array([0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
    0x5be0cd19]);
  const w = new Uint32Array(64);
  const rotr = (x, r) => (x >>> r) | (x << (32 - r));
  for (let off = 0; off < n; off += 64) {
    for (let i = 0; i < 16; i++) w[i] = dv.getUint32(off + 4 * i);
    for (let i = 16; i < 64; i++) {
      const a = w[i - 15], b = w[i - 2];
      w[i] = w[i - 16] + (rotr(a, 7) ^ rotr(a, 18) ^ (a >>> 3)) + w[i - 7] + (rotr(b, 17) ^ rotr(b, 19) ^ (b >>> 10));
    }
    let [a, b, c, d, e, f, g, k] = h;
    for (let i = 0; i < 64; i++) {
      const t1 = (k + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + SHA_K[i] + w[i]) >>> 0;
      const t2 = ((rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c))) >>> 0;
      k = g; g = f; f = e; e = (d + t1) >>> 0; d = c; c = b; b = a; a = (t1 + t2) >>> 0;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += k;
  }
  const out = new Uint8Array(32);
  const ov = new DataView(out.buffer);
  h.forEach((x, i) => ov.setUint32(4 * i, x));
  return out;
}

function showKey(t) {
  const box = document.getElementById("new-key");
  box.replaceChildren(el("b", { text: `Key for ${t.name}` }),
    el("code", { id: "new-key-value", text: t.api_key }),
    el("button", { type: "button", id: "new-key-copy", onclick: copyKey }, "Copy"), " ",
    el("span", { id: "new-key-copied", role: "status" }),
    el("span", { class: "muted", text: "Copy it now: it is shown once (only its hash is kept)." }),
    // what POST /admin/tenants warns of (models no model answers to, authentication off): kept beside the key, not
    // only in a toast that goes
    ...(t.warning ? [el("p", { class: "note", id: "new-key-warning", text: `Warning: ${t.warning}` })] : []));
  box.hidden = false;
  box.dataset.tenant = t.name;
  box.dataset.shown = String(Date.now());
  delete box.dataset.seen;
}

// The new key to the clipboard: navigator.clipboard, which a browser offers only in a secure context (HTTPS, or
// localhost); over plain HTTP on the server's address, the key is selected (Ctrl+C copies it) and copied the old
// way where the browser still does that. Either way the box says what happened.
async function copyKey() {
  const code = document.getElementById("new-key-value"), said = document.getElementById("new-key-copied");
  let copied = false;
  if (navigator.clipboard && window.isSecureContext) {
    try {
      await navigator.clipboard.writeText(code.textContent);
      copied = true;
    } catch (e) { /* (refused: selected below instead) */ }
  }
  if (!copied) {
    const range = document.createRange();
    range.selectNodeContents(code);
    const sel = window.getSelection();
    sel.removeAllRanges();
    sel.addRange(range);
    try { copied = document.execCommand("copy"); } catch (e) { copied = false; }
  }
  said.textContent = copied ? "Copied to the clipboard" : "Selected: press Ctrl+C (⌘C) to copy it";
  said.className = copied ? "copied" : "muted";
}

// The tenant form makes a tenant; after a row's Edit, it changes that tenant's models and limits in place (PATCH
// /admin/tenants/NAME: its keys, usage and requests in flight carry on; a rate's burst is kept) until saved or
// cancelled. Only for a tenant made here: one of the configuration file is changed there.
async function editTenant(name) {
  let t;
  try {
    t = await api("GET", `/admin/tenants/${encodeURIComponent(name)}`);
  } catch (e) {
    toast(`Failed: ${e.message}`, true);
    return;
  }
  const f = document.getElementById("add-tenant"), r = t.rate || {};
  f.dataset.editing = name;
  f.dataset.burst = r.burst ?? "";
  f.elements.name.value = name;
  f.elements.name.readOnly = true;
  f.elements.models.value = t.models.join(", ");
  f.elements.rps.value = r.requests_per_s ?? "";
  f.elements.tpm.value = r.tokens_per_min ?? "";
  f.elements.conc.value = t.max_concurrent ?? "";
  document.getElementById("tenant-form-title").textContent = `Change tenant ${name}`;
  f.querySelector("button[type=submit]").textContent = "Save";
  document.getElementById("tenant-form-cancel").hidden = false;
  f.elements.models.focus();
}

function endEdit() {
  const f = document.getElementById("add-tenant");
  if (f.dataset.editing === undefined) return;
  delete f.dataset.editing;
  delete f.dataset.burst;
  f.reset();
  f.elements.name.readOnly = false;
  document.getElementById("tenant-form-title").textContent = "Create a tenant key";
  f.querySelector("button[type=submit]").textContent = "Create";
  document.getElementById("tenant-form-cancel").hidden = true;
}

// --- views ---
// The view is the URL's fragment (#models): a reload stays on it, Back and Forward go through the views seen.
function viewOf(hash) {
  const v = hash.replace(/^#/, "");
  return VIEWS.includes(v) ? v : "pool";
}

function show(view) {
  S.view = view;
  for (const b of document.querySelectorAll("#tabs button")) {
    b.classList.toggle("active", b.dataset.view === view);
    if (b.dataset.view === view) b.setAttribute("aria-current", "page"); else b.removeAttribute("aria-current");
  }
  for (const s of document.querySelectorAll("main > section")) s.hidden = s.id !== `view-${view}`;
  if (S.pool) applyPool(S.pool, false);
  if (view === "pool") resizeCharts();
  if (view === "requests") renderRequests();
  renderEvents();
}

function renderSummary(p) {
  const alive = p.engines.filter((e) => e.alive).length;
  const inflight = p.engines.reduce((a, e) => a + e.inflight, 0);
  const tps = p.models.reduce((a, m) => a + m.tokens_per_s, 0);
  const pooled = p.engines.filter((e) => e.switches !== null);
  const switches = pooled.length ? pooled.reduce((a, e) => a + e.switches, 0) : "—";
  const att = p.models.filter((m) => m.attainment !== null);
  const tiles = [
    // (the engines' requests, each choice one: it was "In flight" beside the Requests tab's count of requests, which
    // a request of n choices, or one queued at the controller while its worker restarts, made disagree; then "On
    // engines", which beside "Models" read as the models loaded on them)
    ["Engines", `${alive} / ${p.engines.length}`], ["Models", p.models.length], ["Requests on engines", inflight,
      "requests on the engines now: a request of n choices counts n, and one still queued at the controller (its " +
      "engine restarting, or none free) none; the Requests tab counts every request in flight"],
    ["Tokens/s", tps.toFixed(1)], ["Switches", switches],
    ["Worst SLO attainment", att.length ? fmtPct(Math.min(...att.map((m) => m.attainment))) : "—"],
  ];
  patch(document.getElementById("summary"), tiles.map(([k, v, title]) =>
    el("div", { class: "tile", title }, el("div", { class: "v", text: String(v) }), el("div", { class: "k", text: k }))));
}

function drawTimeline(canvas, runs, now) {
  if (!canvas) return;
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  if (!w || !h) return;
  canvas.width = Math.round(w * dpr);
  canvas.height = Math.round(h * dpr);
  const g = canvas.getContext("2d");
  g.scale(dpr, dpr);
  g.clearRect(0, 0, w, h);
  const t0 = now - SPAN_S;
  let prev = null;
  for (const [start, model, , dur] of runs) {
    if (start + dur < t0) continue;
    const x = Math.max(0, ((start - t0) / SPAN_S) * w);
    const x1 = Math.min(w, ((start + dur - t0) / SPAN_S) * w);
    g.fillStyle = color(model);
    g.fillRect(x, 4, Math.max(1, x1 - x), h - 8);
    // a switch: a thin gap before the run, where runs are wide enough for it to be seen (else colours alone)
    if (prev !== null && prev !== model && x1 - x >= 3) g.clearRect(x, 0, 1, h);
    prev = model;
  }
}

// The memory an engine's arena is, as its device has it: a CPU engine's is host RAM, a GPU's VRAM.
function memOf(device) {
  return /^cpu/.test(device || "") ? "RAM" : /^cuda/.test(device || "") ? "VRAM" : "memory";
}

// Whether engine `id` is the only one taking requests now (at the click: a kept button's listener is the first
// render's). Draining it (an operator taking a one-GPU server's engine out for a moment) left every new request a 503
// with nothing said before.
function onlyEngine(id) {
  return !(S.pool ? S.pool.engines : []).some((o) => o.id !== id && o.alive && !o.draining);
}

function renderEngines(p) {
  const box = document.getElementById("engines");
  const cards = p.engines.map((e) => {
    const state = !e.alive ? "dead" : e.draining ? "draining" : "alive";
    const canvas = el("canvas", { class: "timeline", "data-engine": e.id });
    const models = new Set(e.timeline.map((r) => r[1]));
    const v = e.vram;
    const mem = memOf(e.device);
    const part = (x) => (v && v.budget_bytes ? `${(100 * x) / v.budget_bytes}%` : "0%");
    const vram = v ? [
      el("div", { class: "vram" }, el("div", { class: "weights", style: { width: part(v.weights_bytes) } }),
        el("div", { class: "kv", style: { width: part(v.kv_bytes) } })),
      el("div", { class: "vram-legend" },
        el("span", { class: "swatch", style: { background: "var(--weights)" } }), `weights ${fmtBytes(v.weights_bytes)}  `,
        el("span", { class: "swatch", style: { background: "var(--kv)" } }),
        `KV ${fmtBytes(v.kv_bytes)}${v.kv_pages_total ? ` (${v.kv_pages_used}/${v.kv_pages_total} pages)` : ""}  `,
        el("span", { class: "swatch", style: { background: "var(--free)" } }), `free ${fmtBytes(v.free_bytes)}`,
        ` of ${fmtBytes(v.budget_bytes)}`),
    ] : [el("div", { class: "muted", text: e.alive ? `no ${mem} report` : "none: its worker is dead" })];
    // (the model it runs now: outlined among its chips only while it runs one, as "running now" says; an idle
    // engine's outlined the model of its last turn beside "running now: idle")
    const running = e.alive && e.inflight ? e.active : null;
    const chips = (names, cls) => names.length ? names.map((n) => el("span", { class: `chip ${n === running ? "active" : ""}`, title: n },
      el("span", { class: "swatch", style: { background: color(n) } }), n)) : [el("span", { class: "muted", text: cls })];
    // (a dead engine takes no action: the pool replaces its worker, or prunes it)
    const button = !e.alive ? null : e.draining
      ? el("button", { "data-action": "resume", onclick: () => act(`Resume engine ${e.id}?`, "POST",
        `/admin/engines/${encodeURIComponent(e.id)}/resume`, undefined, () => `Engine ${e.id} resumed`) }, "Resume")
      : el("button", { class: "danger", "data-action": "drain", onclick: () => act(`Drain engine ${e.id}? It takes no new ` +
        "requests; those in flight finish." + (onlyEngine(e.id) ? " It is the only engine taking requests: until it " +
        "is resumed, every new request gets a 503." : ""), "POST", `/admin/engines/${encodeURIComponent(e.id)}/drain`,
      undefined, () => `Engine ${e.id} draining`) }, "Drain");
    const card = el("div", { class: "card engine", "data-engine": e.id },
      el("div", { class: "head" },
        el("h3", { text: `${e.id}` }), el("span", { class: `badge ${state}`, "data-state": state, text: state }),
        el("span", { class: "facts", text: `${e.device} on ${e.host}` }),
        el("span", { class: "facts" }, "running now: ",
          el("b", { text: !e.alive ? "—" : running || (e.pooled || e.inflight === 0 ? "idle" : "—") })),
        el("span", { class: "facts", text: `switches ${e.switches ?? "—"} · mean stall ${fmtS(e.switch_stall_s)}` }),
        el("span", { class: "facts", text: `in flight ${e.inflight} · step ${fmtS(e.step_s)}` }),
        el("span", { class: "actions" }, button)),
      el("div", { class: "timeline-wrap" }, canvas,
        el("div", { class: "axis" }, el("span", { text: `−${SPAN_S} s` }), el("span", { text: "which model ran, each moment" }),
          el("span", { text: "now" })),
        el("div", { class: "legend" }, [...models].map((n) => el("span", { title: n },
          el("span", { class: "swatch", style: { background: color(n) } }), n)))),
      el("div", { class: "row2" },
        el("div", {}, el("div", { class: "muted", text: mem }), ...vram,
          el("div", { class: "vram-legend", text: `host cache ${fmtBytes(e.host_cache_bytes)}` })),
        el("div", {},
          el("div", { class: "muted", text: "resident" }), el("div", { class: "chips" }, chips(e.resident, "none")),
          el("div", { class: "muted", text: "prefetching" }), el("div", { class: "chips" }, chips(e.prefetching, "none")),
          el("div", { class: "muted", text: "registered" }), el("div", { class: "chips" }, chips(e.registered, "none")))));
    return card;
  });
  patch(box, cards);
  // (drawn on the canvases now on the page: a kept card keeps its canvas)
  for (const e of p.engines) drawTimeline(box.querySelector(`.engine[data-engine="${CSS.escape(e.id)}"] canvas.timeline`), e.timeline, p.t);
}

// --- charts (uPlot): tokens/s and queue depth per model, the last SPAN_S seconds of polls ---
function pushSeries(p) {
  const s = S.series;
  // a model removed from the pool leaves the charts (and their legends) at once
  const names = new Set(p.models.map((m) => m.name));
  for (const key of ["tps", "queue"]) for (const n of [...s[key].keys()]) if (!names.has(n)) s[key].delete(n);
  s.t.push(p.t);
  for (const m of p.models) {
    for (const [key, val] of [["tps", m.tokens_per_s], ["queue", m.waiting]]) {
      if (!s[key].has(m.name)) s[key].set(m.name, new Array(s.t.length - 1).fill(null));
      s[key].get(m.name).push(val);
    }
  }
  for (const key of ["tps", "queue"]) for (const arr of s[key].values()) while (arr.length < s.t.length) arr.push(null);
  while (s.t.length && s.t[0] < p.t - SPAN_S) {
    s.t.shift();
    for (const key of ["tps", "queue"]) for (const arr of s[key].values()) arr.shift();
  }
}

function chartSize(div) { return { width: Math.max(200, div.clientWidth), height: 170 }; }
// The time axis's labels are centred on their ticks: the last one, at the plot's right edge, needs half its width
// to the right of the plot. uPlot leaves 25 px there, a few short of half a label "00:00:00" (its last digit was cut
// off whenever a tick fell at the edge): half the label's measured width, and a little more.
const AXIS_FONT = '12px system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, "Noto Sans", sans-serif';
function rightPad() {
  if (rightPad.px === undefined) {
    const g = document.createElement("canvas").getContext("2d");
    g.font = AXIS_FONT;
    rightPad.px = Math.max(25, Math.ceil(g.measureText("00:00:00").width / 2) + 4);
  }
  return rightPad.px;
}

function renderChart(id, key) {
  const div = document.getElementById(id);
  const names = [...S.series[key].keys()];
  const data = [S.series.t, ...names.map((n) => S.series[key].get(n))];
  let c = S.charts[id];
  if (c && c.names.join("\n") !== names.join("\n")) { c.plot.destroy(); c = null; }
  if (!c) {
    if (!div.clientWidth) return;
    const opts = {
      ...chartSize(div), legend: { show: true }, cursor: { show: true },
      scales: { x: { time: true }, y: { range: (u, lo, hi) => [0, Math.max(1, hi * 1.1)] } },
      // the legend's time as the axis's, to the second (uPlot's own, "2026-12-06 2:12pm", said no seconds)
      series: [{ value: (u, v) => (v == null ? "--" : clock(v)) },
        ...names.map((n) => ({ label: n, stroke: color(n), width: 2, spanGaps: true }))],
      // ticks a whole number of seconds apart: labels are to the second (half-second ticks repeated each label)
      axes: [{ space: 70, incrs: [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600], font: AXIS_FONT,
               values: (u, vals) => vals.map(clock) }, { size: 50, font: AXIS_FONT }],
      padding: [null, rightPad(), null, null],
      hooks: { setLegend: [latestInLegend] },
    };
    c = S.charts[id] = { plot: new uPlot(opts, data, div), names };
    for (const label of div.querySelectorAll(".u-legend .u-label")) label.title = label.textContent; // (cut short)
  } else {
    c.plot.setData(data);
  }
  latestInLegend(c.plot);
}

// The legend shows the values at the cursor, and uPlot's "--" without one: a phone, which never hovers, never saw a
// value, nor did a mouse anywhere but over the chart. Without a cursor it shows the latest snapshot's: called by
// uPlot as its legend changes (the cursor gone from the plot) and here after new data; `false`: no hook again.
function latestInLegend(u) {
  const n = u.data && u.data[0] ? u.data[0].length : 0;
  if (u.cursor.idx == null && n) u.setLegend({ idx: n - 1 }, false);
}

function resizeCharts() {
  for (const [id, c] of Object.entries(S.charts)) c.plot.setSize(chartSize(document.getElementById(id)));
}

function renderModels(p) {
  // (the memory Evict frees, as its engines have it: it said GPU memory of a model on a CPU engine)
  const devices = new Map(p.engines.map((e) => [e.id, memOf(e.device)]));
  const mem = (m) => { const kinds = new Set(m.engines.map((id) => devices.get(id) || "memory"));
    return kinds.size === 1 ? [...kinds][0] : "memory"; };
  document.getElementById("window-note").textContent = p.latency_window
    ? `(latency and SLO over the last ${p.window_s} s)` : "(SLO over recent requests; latency window not fed)";
  const rows = p.models.map((m) => el("tr", { "data-model": m.name },
    el("td", {}, el("span", { class: "swatch", style: { background: color(m.name) } }),
      el("span", { class: "mname", title: m.name, text: m.name }),
      (S.details.models.get(m.name)?.aliases || []).length ? el("span", { class: "aliases muted",
        title: "aliases: requests may name the model by them", text: S.details.models.get(m.name).aliases.join(", ") })
        : null,
      m.pinned ? el("span", { class: "badge pinned", text: "pinned" }) : null,
      (m.loras || []).length ? el("span", { class: "badge lora", text: `${m.loras.length} LoRA`,
        title: `LoRA adapters served over ${m.name} (requests name them as their model): ${m.loras.join(", ")}` })
        : null),
    el("td", {}, el("span", { class: `badge ${m.state}`, text: m.state, title: m.load_error })),
    el("td", { text: m.engines.join(", ") || "—" }),
    el("td", { class: "num", text: m.waiting }), el("td", { class: "num", text: fmtS(m.oldest_wait_s) }),
    el("td", { class: "num", text: m.running }),
    el("td", { class: "num", text: `${m.kv_pages_used} (${m.kv_swapped})` }),
    el("td", { class: "num", text: `${fmtS(m.ttft_p50)} / ${fmtS(m.ttft_p99)}` }),
    el("td", { class: "num", text: `${fmtS(m.tpot_p50)} / ${fmtS(m.tpot_p99)}` }),
    // (its targets: the column gave a percentage of an SLO the page named nowhere)
    el("td", { class: "num", text: fmtPct(m.attainment), title: m.slo ? `share of its requests within TTFT ` +
      `${fmtS(m.slo.ttft_s)} and TPOT ${fmtS(m.slo.tpot_s)} (a tenant's slo_class may set others)` : undefined }),
    el("td", { class: "num", text: fmtNum(m.tokens_per_s) }),
    el("td", { class: "num", text: fmtPct(m.cache_hit_frac) }),
    el("td", { class: "num", text: m.loads ? `${fmtS(m.load_stall_s)} (${m.loads})` : "—" }),
    el("td", { class: "actions" },
      m.pinned
        ? el("button", { "data-action": "unpin", onclick: () => act(`Unpin ${m.name}?`, "POST",
          `/admin/models/${encodeURIComponent(m.name)}/unpin`, undefined, () => `${m.name} unpinned`) }, "Unpin")
        : el("button", { "data-action": "pin", onclick: () => act(`Pin ${m.name} resident?`, "POST",
          `/admin/models/${encodeURIComponent(m.name)}/pin`, undefined, () => `${m.name} pinned`) }, "Pin"),
      " ",
      m.state === "resident" && !m.pinned
        ? el("button", { "data-action": "evict", title: `free its ${mem(m)} once its requests finish; the next ` +
          "request brings it back", onclick: () => act(`Evict ${m.name} from ${mem(m)}?`, "POST",
          `/admin/models/${encodeURIComponent(m.name)}/evict`, undefined, () => `${m.name} evicted once idle`) },
        "Evict")
        : null,
      " ",
      el("button", { class: "danger", "data-action": "remove", onclick: () => act(`Remove model ${m.name}? Its ` +
        "requests in flight end with an error.", "DELETE", `/admin/models/${encodeURIComponent(m.name)}`, undefined,
      () => `${m.name} removed`) }, "Remove"))));
  patch(document.querySelector("#models-table tbody"), rows);
  document.getElementById("models-empty").hidden = rows.length > 0;
}

function renderTenants(p) {
  // without authentication the pool lists the tenant every caller is, last (controller.dashboard.views): told by the
  // pool's `auth`, not by the name (a tenant of the configuration named "anonymous", with authentication on, lost its
  // limits and its Revoke, and the page said authentication was off)
  const anon = (t) => p.auth === false && t.name === "anonymous";
  const rows = p.tenants.map((t) => { const d = S.details.tenants.get(t.name); return el("tr", { "data-tenant": t.name },
    el("td", { text: t.name }),
    el("td", {}, anon(t) && !d // (authentication off: everyone is it, and may use every model)
      ? el("span", { class: "mname", title: "every model (authentication is off)", text: "*" })
      : el("span", { class: "mname", title: d ? d.models.join(", ") || "no model: its requests are 404s" : "",
        text: d ? d.models.join(", ") || "none" : "—" })),
    el("td", { class: "num", text: fmtNum(t.requests_per_s, 2) }),
    el("td", { class: "num", text: fmtNum(t.tokens_per_min, 0) }),
    el("td", { class: "num", text: `${t.concurrency}${t.max_concurrent ? ` / ${t.max_concurrent}` : ""}` }),
    el("td", { class: "num", text: t.rejected_total }), el("td", { class: "num", text: fmtNum(t.rejected_per_min, 1) }),
    el("td", { class: "num", text: fmtPct(t.attainment) }),
    el("td", { text: anon(t) ? "—" : fmtLimits(d) }),
    el("td", { class: "actions" },
      d && d.source === "admin" ? el("button", { "data-action": "edit", onclick: () => editTenant(t.name),
        title: "change its models and limits in place (in the form below); its keys keep working" }, "Edit") : null,
      " ",
      d && d.source === "admin" ? el("button", { "data-action": "rotate", onclick: () => rotate(t.name),
        title: "a new key for it, the same models and limits; its keys stop working" }, "New key") : null, " ",
      anon(t) ? null : el("button", {
        class: "danger", "data-action": "revoke", onclick: () => act(`Revoke tenant ${t.name}? Its keys stop working ` +
          "at once.", "DELETE", `/admin/tenants/${encodeURIComponent(t.name)}`, undefined, () => `Tenant ${t.name} revoked`),
      }, "Revoke"))); });
  patch(document.querySelector("#tenants-table tbody"), rows);
  // a new key shown once: gone with its tenant (revoked here or elsewhere), not left on show as if it worked. A
  // snapshot taken before the tenant was made can arrive after its key is shown: the tenant is gone only once a
  // snapshot listed it, or (revoked at once elsewhere) once snapshots have left it out for 3 s
  const box = document.getElementById("new-key");
  if (!box.hidden) {
    if (p.tenants.some((t) => t.name === box.dataset.tenant)) box.dataset.seen = "1";
    else if (box.dataset.seen || Date.now() - Number(box.dataset.shown || 0) > 3000) {
      box.hidden = true; box.replaceChildren();
    }
  }
  const editing = document.getElementById("add-tenant").dataset.editing; // (a tenant revoked while edited)
  if (editing !== undefined && !p.tenants.some((t) => t.name === editing)) endEdit();
  document.getElementById("auth-off").hidden = p.auth !== false;
}

const REQUEST_STATES = { // (controller.dashboard.views.requests_view)
  queued: "waiting at the controller: for an engine, or for its model to load there",
  prefill: "on its engine, no token yet: waiting there (for its turn, or its weights' load into its memory) or prefilling its prompt",
  running: "generating tokens",
};

function renderRequests() {
  const rows = S.requests.map((r) => el("tr", { "data-request": r.id },
    el("td", {}, el("code", { text: r.id })), el("td", {}, el("span", { class: "mname",
      title: r.base_model ? `LoRA adapter ${r.model}, served over ${r.base_model}` : r.model,
      text: r.base_model ? `${r.model} (${r.base_model})` : r.model })),
    el("td", { text: r.tenant ?? "—" }),
    el("td", { text: r.engines.join(", ") || "—" }),
    el("td", {}, el("span", { class: `badge ${r.state}`, title: REQUEST_STATES[r.state], text: r.state })),
    el("td", { class: "num", text: fmtS(r.age_s) }), el("td", { class: "num", text: r.tokens }),
    el("td", { class: "num", text: fmtNum(r.tokens_per_s) }),
    el("td", { class: "actions" }, el("button", { class: "danger", "data-action": "cancel", onclick: () =>
      act(`Cancel request ${r.id}? Its stream ends with an error.`, "POST",
        `/admin/requests/${encodeURIComponent(r.id)}/cancel`, undefined, (res) => `Request ${res.id} cancelled`) },
    "Cancel"))));
  patch(document.querySelector("#requests-table tbody"), rows);
  document.getElementById("requests-empty").hidden = rows.length > 0;
  document.getElementById("requests-note").textContent = S.requestsTotal > rows.length
    ? `(the oldest ${rows.length} of ${S.requestsTotal})` : "";
}

function clockMs(t) { return `${clock(t)}.${String(Math.floor((t % 1) * 1000)).padStart(3, "0")}`; }

function eventText(ev) {
  const times = ev._n ? `${ev._n} times since ${clock(ev._since)}; the last: ` : ""; // (coalesced: `addEvent`)
  return times + Object.entries(ev).filter(([k, v]) => !["seq", "t", "kind"].includes(k) && !k.startsWith("_")
    && v !== null && v !== undefined)
    .map(([k, v]) => `${k}=${k === "at" && typeof v === "number" ? clockMs(v) : typeof v === "object" ? JSON.stringify(v) : v}`)
    .join("  ");
}

function renderEvents() {
  if (S.view !== "events") return;
  const sel = document.getElementById("event-filter");
  for (const k of S.kinds) {
    if (![...sel.options].some((o) => o.value === k)) sel.append(el("option", { value: k, text: k }));
  }
  const want = sel.value;
  const items = [];
  for (let i = S.events.length - 1; i >= 0 && items.length < 200; i--) {
    const ev = S.events[i];
    if (want === "!switch" ? ev.kind === "switch" : want && ev.kind !== want) continue;
    items.push(el("li", { "data-kind": ev.kind, "data-seq": ev.seq },
      el("span", { class: "t", text: clock(ev.t) }),
      el("span", { class: `kind kind-${ev.kind}`, text: ev._n ? `${ev.kind} ×${ev._n}` : ev.kind }),
      el("span", { text: eventText(ev) })));
  }
  patch(document.getElementById("events-list"), items);
}

// --- data flow: events and once-a-second snapshots (pool, requests) arrive on one event stream ---
function applyPool(p, chart) {
  S.pool = p;
  if (chart) S.snapshots++;
  // colours by the models' order in the pool (registration), not by which view drew a model first: a model has
  // the same colour in every dashboard and after a reload
  for (const m of p.models) color(m.name);
  detailsFor(p);
  if (chart) pushSeries(p);
  renderSummary(p);
  if (S.view === "pool") { renderEngines(p); renderChart("chart-tps", "tps"); renderChart("chart-queue", "queue"); }
  if (S.view === "models") renderModels(p);
  if (S.view === "tenants") renderTenants(p);
}

// `total`: how many are in flight, where the snapshot lists only the oldest (controller.dashboard.views.snapshot)
function applyRequests(list, total = list.length) {
  S.requests = list;
  S.requestsTotal = Math.max(total, list.length);
  // the tab counts the requests in flight (one with n choices is one; "In flight" counts the engines' requests)
  document.getElementById("n-requests").textContent = String(S.requestsTotal);
  if (S.view === "requests") renderRequests();
}

// After an action: fetch the views at once rather than wait for the next snapshot.
async function refresh() {
  try {
    const [p, reqs] = await Promise.all([api("GET", "/admin/pool"), api("GET", "/admin/requests")]);
    loadDetails();
    applyPool(p, false);
    applyRequests(reqs);
  } catch (e) {
    // (a server that does not answer: the header says so, and an action's own toast says it failed; this one
    // replaced that toast at once)
    if (e.message !== "signed out" && !e.unreachable) toast(`Refresh failed: ${e.message}`, true);
  }
}

function refreshSoon(ms = 150) {
  if (S.soon !== null) return;
  S.soon = setTimeout(() => { S.soon = null; refresh(); }, ms);
}

// An event into the page's list; a model's `late` within LATE_WINDOW_S of its first (on the same engine) replaces
// the one before, counted ("late ×N", since its first), and moves to the top
function addEvent(ev) {
  if (ev.kind === "late") {
    const i = S.events.findLastIndex((e) => e.kind === "late" && e.model === ev.model && e.engine === ev.engine);
    const before = i >= 0 ? S.events[i] : null;
    if (before && ev.t - (before._since ?? before.t) <= LATE_WINDOW_S) {
      S.events.splice(i, 1);
      ev = { ...ev, _n: (before._n || 1) + 1, _since: before._since ?? before.t };
    }
  }
  S.events.push(ev);
  if (S.events.length > MAX_EVENTS) S.events.splice(0, S.events.length - MAX_EVENTS);
  S.kinds.add(ev.kind);
}

function connect() {
  const conn = document.getElementById("conn");
  // since=0 at first: the ring's backlog; the browser's own reconnect sends Last-Event-ID; a new stream after one
  // that failed (CLOSED) goes on from the last event seen (since=0 there showed every event twice). A restarted
  // server, whose seqs are all below it, sends what it has.
  const es = S.es = new EventSource(`/admin/events?since=${S.lastSeq}&snapshots=true`);
  let opened = 0; // (this stream's open: S.opened may be a later stream's by its error)
  es.onopen = () => {
    S.retrying = false;
    S.opened = opened = Date.now();
    conn.textContent = "live"; conn.className = "conn live"; conn.title = "";
  };
  es.onerror = () => {
    // (the stream ended: the page goes to the login form, with no reconnect meanwhile: the browser's own, 1 s on,
    // pending as a call in flight ended, was aborted by the navigation: a failed request in the browser's log)
    if (S.leaving) { if (es.readyState !== EventSource.OPEN) es.close(); signedOut(); return; }
    S.retrying = true;
    conn.textContent = "reconnecting…";
    conn.className = "conn down";
    // closed, not left to the browser's own reconnect: reconnect() asks first whether the session is still live
    es.close();
    if (opened && Date.now() - opened >= RETRY_STABLE_MS) S.retryMs = 1000; // (it worked a while: retryLater)
    if (S.es === es) retryLater();
  };
  es.onmessage = (msg) => {
    S.retryMs = 1000; // (a stream that brings data works: retryLater)
    const ev = JSON.parse(msg.data);
    if (typeof ev.seq === "number") S.lastSeq = ev.seq;
    addEvent(ev);
    if (ev.kind === "tenant_updated" || ev.kind === "update") loadDetails();
    if (S.eventsDue === null) { // the server sends events in batches (one write a tick): draw once a batch
      S.eventsDue = requestAnimationFrame(() => { S.eventsDue = null; renderEvents(); });
    }
  };
  es.addEventListener("pool", (msg) => {
    S.lastData = Date.now();
    S.retryMs = 1000; // (the first comes with the stream's open: retryLater)
    if (conn.textContent.startsWith("no data")) { conn.textContent = "live"; conn.className = "conn live"; conn.title = ""; }
    document.getElementById("conn-since").hidden = true; // (figures of now again: watchStream)
    document.querySelector("main").classList.remove("stale");
    applyPool(JSON.parse(msg.data), true);
  });
  // the server ends the stream: a session signed out (in another tab, or expired) goes to the login form at once,
  // not through a reconnect answered 401; a server stopping is reconnected to (the page says so meanwhile)
  es.addEventListener("end", (msg) => { if (JSON.parse(msg.data).reason === "signed out") signedOut(); });
  es.addEventListener("inflight", (msg) => { S.inflight = Number(msg.data); }); // (just before `requests`)
  es.addEventListener("requests", (msg) => {
    const list = JSON.parse(msg.data);
    applyRequests(list, S.inflight ?? list.length);
    S.inflight = null;
  });
}

// The stream failed (the server stopped or restarted, the network): opened again once the server says the session
// is still live, or back to the login form once it says it is not. A restart forgets every session: the browser's own
// reconnect was answered 401, then a refresh's two calls were, three failed resources in the browser's log before the
// form came back. GET /dashboard/session answers 200 either way. While the server does not answer, each try is a
// failed request all the same (net::ERR_CONNECTION_REFUSED: no request to a server that is down goes unlogged): tried
// 1, 2, 4 then every 8 s (retryLater), not once a second as the browser's own reconnects were (the stream's
// `retry: 1000`), which filled the console of a tab left open on a stopped server with a line a second, and asked a
// server coming back up (or a proxy in front of it) as often. A server back up is seen at the next try, 8 s at most.
async function reconnect() {
  if (S.leaving || S.signingOut) return;
  let live = null; // (null: no answer)
  S.calls++;
  try {
    const r = await fetch("/dashboard/session", { credentials: "same-origin", cache: "no-store" });
    if (r.ok) live = (await r.json()).signed_in === true;
  } catch (e) {
    // (the server does not answer yet: tried again below)
  } finally {
    S.calls--;
  }
  if (S.leaving) { signedOut(); return; } // (signed out meanwhile: the form once this call has ended)
  if (S.signingOut) return;
  if (live === null) retryLater();
  else if (live) connect();
  else signedOut();
}

// The next try of reconnect(), S.retryMs on, and the one after it twice as far, up to RETRY_MAX_MS; back to 1 s once
// a stream has worked: it brought data (a snapshot comes with its open, then one a second), or it stayed open
// RETRY_STABLE_MS. Not at the session's answer alone, nor at the stream's open: a server or a proxy that answers the
// stream 200 and ends it at once (a proxy that will not pass a long response, a server stopping as it accepts) opened
// it each time, and the page asked for it again once a second for good; it backs off as a server that is down does.
const RETRY_MAX_MS = 8000;
const RETRY_STABLE_MS = 5000;
function retryLater() {
  const wait = S.retryMs;
  S.retryMs = Math.min(wait * 2, RETRY_MAX_MS);
  setTimeout(reconnect, wait);
}

function init() {
  for (const b of document.querySelectorAll("#tabs button")) {
    b.addEventListener("click", () => {
      if (b.dataset.view !== viewOf(location.hash)) history.pushState(null, "", `#${b.dataset.view}`);
      show(b.dataset.view);
    });
  }
  window.addEventListener("popstate", () => show(viewOf(location.hash)));
  if (viewOf(location.hash) !== "pool") show(viewOf(location.hash));
  document.getElementById("event-filter").addEventListener("change", renderEvents);
  // the add-model form: a path is asked for (the browser says so before anything is sent) unless the engine is pace,
  // whose seconds per token are asked for only then (an llm model without a path was sent, and refused)
  const addModel = document.getElementById("add-model");
  const kindChanged = () => {
    const pace = addModel.elements.kind.value === "pace";
    addModel.elements.path.required = !pace;
    addModel.elements.pace.disabled = !pace;
  };
  addModel.elements.kind.addEventListener("change", kindChanged);
  addModel.addEventListener("reset", () => setTimeout(kindChanged)); // (after the reset, not before it)
  kindChanged();
  addModel.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const f = new FormData(ev.target);
    const kind = f.get("kind");
    const spec = { name: f.get("name"), path: f.get("path") || null, engine: { kind },
      aliases: String(f.get("aliases") || "").split(",").map((a) => a.trim()).filter(Boolean),
      slo: { ttft_s: Number(f.get("ttft")), tpot_s: Number(f.get("tpot")) } };
    if (kind === "pace") spec.engine.pace_s_per_token = Number(f.get("pace"));
    // emptied once added, as the tenant form is (left filled, the next Enter added the same model again: a 409)
    if (await act(`Add model ${spec.name}?`, "POST", "/admin/models", spec, (m) => `Model ${m.name} added`)) {
      ev.target.reset();
    }
  });
  document.getElementById("add-tenant").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const form = ev.target, f = new FormData(form), editing = form.dataset.editing;
    // an empty field: every model for a tenant made here, but no model for one edited (the form shows a tenant of
    // `models: []` so: saving its other limits gave it every model)
    const models = String(f.get("models") || (editing !== undefined ? "" : "*")).split(",").map((s) => s.trim())
      .filter(Boolean);
    const num = (k) => (f.get(k) ? Number(f.get(k)) : null);
    if (editing !== undefined) { // a field emptied: no such limit from now on
      const rate = { requests_per_s: num("rps"), tokens_per_min: num("tpm"),
        burst: num("rps") !== null && form.dataset.burst ? Number(form.dataset.burst) : null };
      if (await act(`Change tenant ${editing}'s models and limits? Its keys keep working.`, "PATCH",
        `/admin/tenants/${encodeURIComponent(editing)}`, { models, rate, max_concurrent: num("conc") },
        (t) => t.warning ? { text: `Tenant ${t.name} changed. Warning: ${t.warning}`, warn: true }
          : `Tenant ${t.name} changed`)) endEdit();
      return;
    }
    const body = { name: f.get("name"), models, rate: {} };
    if (f.get("rps")) body.rate.requests_per_s = num("rps");
    if (f.get("tpm")) body.rate.tokens_per_min = num("tpm");
    if (f.get("conc")) body.max_concurrent = num("conc");
    if (!window.confirm(`Create tenant ${body.name}?`)) return;
    try {
      const t = await api("POST", "/admin/tenants", body);
      showKey(t);
      toast(`Tenant ${t.name} created${t.warning ? " (with a warning: see beside its key)" : ""}`);
      form.reset();
    } catch (e) {
      toast(`Failed: ${e.message}`, true);
    }
    refreshSoon(0);
  });
  document.getElementById("tenant-form-cancel").addEventListener("click", endEdit);
  // signing out: the session is dropped, then the page goes to the login form once the server has ended the event
  // stream (within a beat), as a tab signed out elsewhere does; a navigation at once aborted the open stream (a
  // failed request in the browser's log). Without this script the form posts as it is.
  document.querySelector("header form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    // no call starts from now on, and those in flight end first: one answered after the session's drop is a 401
    // in the browser's log (a snapshot naming a changed pool, landing meanwhile, fetched the details: two of them)
    S.signingOut = true;
    for (const t0 = Date.now(); S.calls > 0 && Date.now() - t0 < 2000;) await new Promise((ok) => setTimeout(ok, 20));
    // counted as a call: the stream's end (a beat after the session's drop, maybe before this is answered) waits
    // for it, not navigating away from it (an aborted request)
    S.calls++;
    try {
      // (its redirect followed and read to the end: one not followed, or not read, is an aborted request)
      await (await fetch(ev.target.action, { method: "POST", credentials: "same-origin" })).text();
    } catch (e) { /* (the server is gone: the login form says so) */ }
    S.calls--;
    signedOut();
  });
  window.addEventListener("resize", () => { resizeCharts(); if (S.pool && S.view === "pool") renderEngines(S.pool); });
  // a card whose table is wider than it (and scrolls under its sticky actions) is marked, as its table's figures or
  // the window change its width; its actions' border was drawn under 1100 px only, where a table at 1280 scrolled too
  const scrolls = new ResizeObserver((seen) => {
    for (const { target } of seen) {
      const card = target.closest(".card");
      card.classList.toggle("scrolls", card.scrollWidth > card.clientWidth);
    }
  });
  for (const t of document.querySelectorAll(".card > table")) { scrolls.observe(t); scrolls.observe(t.closest(".card")); }
  connect();
  setInterval(watchStream, 1000);
}

// An open stream brings a snapshot about once a second. One that brings nothing (the server hung, a proxy or the
// network holding the connection open with nothing behind it) left the page saying "live" over figures that no
// longer moved: the header says since when nothing came, and past STALE_RECONNECT_S the stream is opened again (a
// half-open connection never ends by itself; the server's keep-alive comments are not seen by the page).
const STALE_S = 5;
const STALE_RECONNECT_S = 15;
// A stream that failed (the server stopped, or gone from the network) said "reconnecting…" and nothing more, over
// figures that stayed as they were, for as long as it took: a tab left open showed a dead server's last tokens/s and
// requests in flight hours on, and nothing said how old they were. Either way (silent or reconnecting) the figures
// are dimmed and the header says since when nothing came, until the next snapshot.
function watchStream() {
  if (S.leaving || !S.opened) return;
  const since = Math.max(S.lastData, S.opened), idle = (Date.now() - since) / 1000;
  if (idle < STALE_S) return;
  const text = `no data since ${clock((S.lastData || S.opened) / 1000)}`;
  document.querySelector("main").classList.add("stale");
  if (S.retrying) { // (the header says "reconnecting…"; its retries open the stream again)
    const at = document.getElementById("conn-since");
    if (at.textContent !== text) at.textContent = text;
    at.hidden = false;
    return;
  }
  const conn = document.getElementById("conn");
  if (conn.textContent !== text) {
    conn.textContent = text;
    conn.className = "conn down";
    conn.title = "the server has sent nothing since then: the figures shown are from then";
  }
  if (idle >= STALE_RECONNECT_S && (Date.now() - (watchStream.reopened || 0)) / 1000 >= STALE_RECONNECT_S) {
    watchStream.reopened = Date.now();
    S.es.close();
    connect();
  }
}

init();
