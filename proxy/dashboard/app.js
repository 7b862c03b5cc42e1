// The sidecar dashboard: reads the admin JSON endpoints every 2 s. No
// framework, no build step; every value is written with textContent, never
// as HTML (route names and errors come from config and upstreams).
"use strict";

const REFRESH_MS = 2000;
const TOKEN_KEY = "sidecar-admin-token";
let previous = null;   // the last /admin/stats answer, for rates over the interval
let needToken = false;

function token() { return sessionStorage.getItem(TOKEN_KEY); }

class Unauthorized extends Error {}

async function api(path, options = {}) {
  const headers = {};
  const t = token();
  if (t) headers["Authorization"] = "Bearer " + t;
  const resp = await fetch(path, { ...options, headers, cache: "no-store" });
  if (resp.status === 401) throw new Unauthorized(path);
  if (resp.status === 404) return null;          // the plugin behind it is not loaded
  if (!resp.ok) throw new Error(path + ": HTTP " + resp.status);
  return resp.json();
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function row(cells, cls) {
  const tr = el("tr", null, cls);
  for (const c of cells) {
    if (c instanceof Node) { const td = el("td"); td.appendChild(c); tr.appendChild(td); }
    else if (c && typeof c === "object") tr.appendChild(el("td", c.text, c.cls));
    else tr.appendChild(el("td", c));
  }
  return tr;
}

function fill(id, rows, empty) {
  const body = document.querySelector("#" + id + " tbody");
  body.replaceChildren(...rows);
  if (!rows.length) {
    const cols = document.querySelectorAll("#" + id + " th").length;
    const td = el("td", empty || "none", "muted");
    td.colSpan = cols;
    body.appendChild(el("tr")).appendChild(td);
  }
}

function pct(x) { return x === null || x === undefined || isNaN(x) ? "–" : (100 * x).toFixed(1) + "%"; }
function num(x, digits = 1) { return x === null || x === undefined ? "–" : Number(x).toFixed(digits); }

// Prometheus's histogram_quantile over cumulative [le, count] pairs.
function quantile(q, buckets) {
  if (!buckets || !buckets.length) return null;
  const total = buckets[buckets.length - 1][1];
  if (total <= 0) return null;
  const rank = q * total;
  let prevLe = 0, prevCount = 0;
  for (const [leRaw, count] of buckets) {
    const le = leRaw === "+Inf" ? Infinity : leRaw;
    if (count >= rank) {
      if (le === Infinity) return prevLe;
      if (count === prevCount) return le;
      return prevLe + (le - prevLe) * (rank - prevCount) / (count - prevCount);
    }
    prevLe = le; prevCount = count;
  }
  return prevLe;
}

function deltaBuckets(now, before) {
  if (!before) return now;
  const old = new Map(before.map(([le, n]) => [String(le), n]));
  return now.map(([le, n]) => [le, n - (old.get(String(le)) || 0)]);
}

function renderRoutes(routes, stats) {
  const dt = previous ? stats.at - previous.at : 0;
  const rows = [];
  for (const r of routes.routes) {
    const s = stats.routes[r.name] || { requests: 0, errors: 0 };
    const p = previous && previous.routes[r.name];
    let rate = null, errRate = null, p99 = s.p99_ms;
    if (p && dt > 0) {
      const dn = s.requests - p.requests;
      rate = dn / dt;
      errRate = dn > 0 ? (s.errors - p.errors) / dn : null;
      if (dn > 0 && s.buckets) {
        const q = quantile(0.99, deltaBuckets(s.buckets, p.buckets));
        p99 = q === null ? p99 : q * 1000;
      }
    } else if (s.requests > 0) {
      errRate = s.errors / s.requests;
    }
    const cls = r.enabled === false ? "disabled" : "";
    const tr = row([r.name, r.route, r.enabled === false ? "disabled" : (r.upstream || "–"),
                    { text: num(rate), cls: "num" }, { text: pct(errRate), cls: "num" },
                    { text: p99 === null || p99 === undefined ? "–" : num(p99) + " ms", cls: "num" },
                    { text: s.requests, cls: "num requests" }], cls);
    tr.dataset.route = r.name;
    rows.push(tr);
  }
  fill("routes", rows, "no routes loaded");
}

function renderBreakers(breakers) {
  const rows = [];
  for (const [name, b] of Object.entries(breakers || {})) {
    const button = el("button", "reset", "reset");
    button.addEventListener("click", () => act("/admin/breakers/" + encodeURIComponent(name) + "/reset"));
    const tr = row([name, { text: b.state, cls: "state" }, { text: b.failures, cls: "num" },
                    { text: b.state === "open" ? num(b.retry_in) + " s" : "–", cls: "num" }, button],
                   b.state);
    tr.dataset.route = name;
    rows.push(tr);
  }
  fill("breakers", rows, breakers === null ? "circuit_breaker plugin not loaded" : "no route has a breaker");
}

function renderRateLimits(rl, stats) {
  const rows = [];
  for (const r of (rl && rl.routes) || []) {
    const d = stats.rate_limits[r.route] || {};
    const allowed = (d.allowed || 0) + (d.queued || 0);
    const rejected = (d.rejected || 0) + (d.shadow_rejected || 0);
    const limits = r.limits.map(l => l.requests + "/" + l.per + "s").join(", ") || "overrides only";
    rows.push(row([r.route, r.key, limits, { text: allowed, cls: "num" }, { text: rejected, cls: "num" },
                   { text: pct(allowed + rejected ? rejected / (allowed + rejected) : null), cls: "num" }]));
  }
  fill("rate-limits", rows, "no route has a rate limit");
}

function renderCache(cache) {
  const rows = [];
  for (const [name, c] of Object.entries((cache && cache.routes) || {})) {
    const total = c.hits + c.misses;
    rows.push(row([name, { text: c.hits, cls: "num" }, { text: c.misses, cls: "num" },
                   { text: pct(total ? c.hits / total : null), cls: "num" },
                   { text: c.entries === undefined ? "–" : c.entries, cls: "num" }]));
  }
  fill("cache", rows, "no route has a cache");
}

function renderWebhooks(pending, dead) {
  if (pending === null) {
    document.getElementById("webhook-counts").textContent = "webhook plugin not loaded";
    fill("webhooks", []);
    return;
  }
  const failed = pending.events.filter(e => e.attempts > 0);
  document.getElementById("webhook-counts").textContent =
    `pending ${pending.events.length} · failed (retrying) ${failed.length} · dead-lettered ${dead.events.length}`;
  const rows = [];
  for (const e of [...dead.events, ...failed]) {
    let action = "";
    if (e.status === "dead") {
      action = el("button", "retry", "retry");
      action.addEventListener("click", () =>
        act("/admin/webhooks/events/" + encodeURIComponent(e.id) + "/retry"));
    }
    const tr = row([e.id, e.source, e.status, { text: e.attempts, cls: "num" }, e.last_error || "", action],
                   e.status);
    tr.dataset.event = e.id;
    rows.push(tr);
  }
  fill("webhooks", rows, "no failed or dead-lettered events");
}

function renderSecrets(secrets) {
  const rows = [];
  for (const s of (secrets && secrets.secrets) || []) {
    if (s.source === "literal") continue;
    rows.push(row([s.reference, s.source, { text: s.available ? "yes" : "no", cls: s.available ? "ok" : "error" },
                   { text: s.age_seconds === null || s.age_seconds === undefined ? "–" : num(s.age_seconds, 0) + " s",
                     cls: "num" }, s.error || ""]));
  }
  fill("secrets", rows, "no secret references");
}

function renderReload(config) {
  const box = document.getElementById("reload");
  const parts = [el("p", `version ${config.version} · ${config.policies.length} policies · loaded ` +
                          new Date(config.loaded_at * 1000).toLocaleString())];
  const last = config.last_reload;
  if (!last) parts.push(el("p", "no reload since start", "muted"));
  else {
    parts.push(el("p", (last.ok ? "last reload ok" : "last reload rejected") + " at " +
                       new Date(last.at * 1000).toLocaleString(), last.ok ? "ok" : "error"));
    if (last.problems.length) {
      const ul = el("ul");
      for (const p of last.problems) ul.appendChild(el("li", p));
      parts.push(ul);
    }
  }
  box.replaceChildren(...parts);
}

async function act(path) {
  try { await api(path, { method: "POST" }); }
  catch (e) { if (e instanceof Unauthorized) askToken("the token was refused"); }
  refresh();
}

function askToken(message) {
  needToken = true;
  sessionStorage.removeItem(TOKEN_KEY);
  document.getElementById("token-form").hidden = false;
  document.getElementById("token-error").textContent = message || "";
}

document.getElementById("token-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const value = document.getElementById("token-input").value.trim();
  if (!value) return;
  sessionStorage.setItem(TOKEN_KEY, value);
  needToken = false;
  document.getElementById("token-form").hidden = true;
  refresh();
});

let refreshing = false;   // one refresh at a time: a slow endpoint must not pile requests up

async function refresh() {
  if (needToken || refreshing) return;
  refreshing = true;
  const status = document.getElementById("status");
  try {
    const [health, routes, stats, breakers, rl, cache, pending, dead, secrets, config] = await Promise.all([
      fetch("/health/detailed", { cache: "no-store" }).then(r => r.json()),
      api("/admin/routes"), api("/admin/stats"), api("/admin/breakers"), api("/admin/rate_limits"),
      api("/admin/cache"), api("/admin/webhooks/events?status=pending&limit=1000"),
      api("/admin/webhooks/events?status=dead&limit=1000"), api("/admin/secrets"), api("/admin/config"),
    ]);
    status.textContent = health.status;
    status.className = "pill " + health.status;
    renderRoutes(routes, stats);
    renderBreakers(breakers);
    renderRateLimits(rl, stats);
    renderCache(cache);
    renderWebhooks(pending, dead);
    renderSecrets(secrets);
    renderReload(config);
    previous = stats;
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    if (e instanceof Unauthorized) { askToken(token() ? "the token was refused" : ""); return; }
    status.textContent = "unreachable";
    status.className = "pill error";
  } finally {
    refreshing = false;
  }
}

refresh();
setInterval(refresh, REFRESH_MS);
