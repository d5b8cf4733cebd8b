// cloudlink fleet dashboard. Plain JavaScript, no framework and no build
// step: the gateway serves this file as is.
//
// Data flow: the listing comes from GET /v1/devices (filtered, searched,
// sorted and paged by the server); rows on screen are refreshed one by one
// when the event stream (/v1/events) announces a change for them. The page
// never holds the API token: sign-in trades it for an HttpOnly session
// cookie, and state-changing calls carry the session's CSRF token, kept in
// memory only.
"use strict";

const $ = (id) => document.getElementById(id);
const PAGE = 100;
const ACTIONS = {
  reboot: { label: "Reboot", needsApp: false, text: "The device restarts now. Its services are down until it is back." },
  shutdown: { label: "Shut down", needsApp: false, text: "The device powers off. Someone must power it on by hand to bring it back." },
  restart: { label: "Restart services", needsApp: true, text: "The application's containers restart now." },
  purge: { label: "Purge data", needsApp: true, text: "The application's data volumes are erased. This cannot be undone." },
};

const state = {
  csrf: null,
  scopes: [], // the signed-in token's scopes: actions need "actions" or "admin"
  sort: "uuid",
  desc: false,
  status: "",
  q: "",
  cursors: [null], // cursor of each page seen so far; page i starts after cursors[i]
  page: 0,
  next: null,
  rows: new Map(), // uuid -> device JSON of the rows on screen
  open: null, // uuid in the drawer
  proxy: null,
  seq: 0,
  events: null,
  pending: new Set(),
  pendingTimer: null,
  summaryTimer: null,
  firstRows: false,
};

// ---------- API ----------

async function api(method, path, body) {
  const headers = {};
  const opts = { method, headers, credentials: "same-origin", cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  if (method !== "GET" && state.csrf) headers["X-CSRF-Token"] = state.csrf;
  const r = await fetch(path, opts);
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = { message: text }; }
  // Only the gateway's own 401 ends the session; a device's answer never does.
  if (r.status === 401 && path !== "/v1/session" && r.headers.get("X-Cloudlink-Source") !== "device") {
    signedOut("Your session ended; sign in again.");
  }
  return { status: r.status, data };
}

function errorText(res) {
  const d = res.data || {};
  return d.message ? `${d.message} (${res.status})` : `HTTP ${res.status}`;
}

// ---------- formatting ----------

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") e.className = v;
    else if (k.startsWith("data-")) e.setAttribute(k, v);
    else if (k === "title") e.title = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}

function bytes(n) {
  if (!n) return "0 B";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return `${n < 10 && i ? n.toFixed(1) : Math.round(n)} ${u[i]}`;
}

function ago(iso) {
  if (!iso) return "—";
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

function linkState(d) {
  if (d.cloudlink_enabled === false) return "off";
  return d.cloudlink && d.cloudlink.connected ? "up" : "down";
}

function statusBadge(d) {
  const st = d.status || "configuring";
  const b = el("span", { class: "badge", "data-status": st, "data-detail": d.status_detail || "" }, st);
  if (d.status_detail) b.append(el("span", { class: "detail" }, ` · ${d.status_detail}`));
  return b;
}

function heartbeatInd(d) {
  const hb = (d.heartbeat && d.heartbeat.state) || "unknown";
  return el("span", { class: "ind hb", "data-heartbeat": hb, title: `heartbeat ${hb}` }, hb);
}

function linkInd(d) {
  const l = linkState(d);
  const label = l === "off" ? "turned off" : l;
  return el("span", { class: "ind link", "data-link": l, title: `cloudlink ${label}` }, label);
}

// ---------- listing ----------

function listUrl() {
  const p = new URLSearchParams({ limit: String(PAGE) });
  if (state.sort !== "uuid" || state.desc) p.set("sort", (state.desc ? "-" : "") + state.sort);
  if (state.status) p.set("status", state.status);
  if (state.q) p.set("q", state.q);
  const after = state.cursors[state.page];
  if (after) p.set("after", after);
  return `/v1/devices?${p}`;
}

async function loadPage() {
  const seq = ++state.seq;
  $("list-error").textContent = "";
  const res = await api("GET", listUrl());
  if (seq !== state.seq) return; // a newer request superseded this one
  if (res.status !== 200) {
    $("list-error").textContent = `Could not load devices: ${errorText(res)}`;
    return;
  }
  state.next = res.data.next;
  state.cursors.length = state.page + 1;
  if (state.next) state.cursors.push(state.next);
  renderRows(res.data.devices);
  $("prev").disabled = state.page === 0;
  $("next").disabled = !state.next;
  const first = state.page * PAGE + 1;
  $("list-info").textContent = res.data.devices.length
    ? `${first}–${first + res.data.devices.length - 1}${state.next ? "" : " (last page)"}`
    : "";
}

function row(d) {
  const hbAt = d.heartbeat && d.heartbeat.last_at;
  const cl = d.cloudlink || {};
  return el("tr", { "data-uuid": d.uuid, "data-status": d.status, "data-link": linkState(d) },
    el("td", { class: "device" },
      d.name ? el("div", { class: "dev-name" }, d.name) : null,
      el("code", { class: "dev-uuid" }, d.uuid)),
    el("td", { class: "status" }, statusBadge(d)),
    el("td", { class: "heartbeat" }, heartbeatInd(d)),
    el("td", { class: "cloudlink" }, linkInd(d)),
    el("td", { class: "endpoint" }, cl.connected ? el("code", {}, cl.endpoint) : "—"),
    el("td", { class: "since", title: cl.connected ? cl.since : "" }, cl.connected ? ago(cl.since) : "—"),
    el("td", { class: "last-heartbeat hide-narrow", title: hbAt || "" }, ago(hbAt)),
    el("td", { class: "num rx" }, bytes(cl.rx_bytes)),
    el("td", { class: "num tx" }, bytes(cl.tx_bytes)));
}

function renderRows(devices) {
  const body = $("rows");
  state.rows.clear();
  const frag = document.createDocumentFragment();
  for (const d of devices) {
    state.rows.set(d.uuid, d);
    frag.append(row(d));
  }
  body.replaceChildren(frag);
  $("empty").hidden = devices.length > 0;
  if (!state.firstRows && devices.length) {
    state.firstRows = true;
    // Time from navigation start to the first rows on screen (read by the
    // browser test).
    window.cloudlinkFirstRowsMs = performance.now();
  }
  markSort();
}

function updateRow(d) {
  const old = document.querySelector(`tr[data-uuid="${CSS.escape(d.uuid)}"]`);
  if (!old) return;
  state.rows.set(d.uuid, d);
  const fresh = row(d);
  fresh.classList.add("flash");
  old.replaceWith(fresh);
  if (state.open === d.uuid) renderDrawer(d);
}

function markSort() {
  for (const th of document.querySelectorAll("th[data-sort]")) {
    th.classList.remove("sorted-asc", "sorted-desc");
    if (th.dataset.sort === state.sort && !(state.sort === "heartbeat" && th.classList.contains("hide-narrow")))
      th.classList.add(state.desc ? "sorted-desc" : "sorted-asc");
  }
}

function restart() {
  state.page = 0;
  state.cursors = [null];
  loadPage();
}

// ---------- live updates ----------

function openEvents() {
  if (state.events) state.events.close();
  const es = new EventSource("/v1/events");
  state.events = es;
  es.onopen = () => { $("live").dataset.live = "on"; };
  es.onerror = () => { $("live").dataset.live = "off"; };
  es.onmessage = (m) => {
    let e;
    try { e = JSON.parse(m.data); } catch (_) { return; }
    if (e.type === "resync") { loadPage(); refreshSummarySoon(); return; }
    if (e.device && (state.rows.has(e.device) || state.open === e.device)) {
      // Show a link change at once; the full row follows from the API.
      const d = state.rows.get(e.device);
      if (d && (e.type === "link.up" || e.type === "link.down")) {
        d.cloudlink = Object.assign({}, d.cloudlink, { connected: e.type === "link.up" });
        updateRow(d);
      }
      state.pending.add(e.device);
      if (!state.pendingTimer) state.pendingTimer = setTimeout(flushPending, 150);
    }
    refreshSummarySoon();
  };
}

async function flushPending() {
  state.pendingTimer = null;
  const uuids = [...state.pending];
  state.pending.clear();
  await Promise.all(uuids.map(async (u) => {
    const res = await api("GET", `/v1/devices/${encodeURIComponent(u)}`);
    if (res.status === 200) updateRow(res.data);
    else if (res.status === 404) {
      const tr = document.querySelector(`tr[data-uuid="${CSS.escape(u)}"]`);
      if (tr) tr.remove();
      state.rows.delete(u);
    }
  }));
}

// ---------- summary ----------

async function refreshSummary() {
  const res = await api("GET", "/v1/summary");
  if (res.status !== 200) return;
  const s = res.data;
  state.proxy = s.proxy;
  $("gateway-id").textContent = s.gateway_id;
  $("sum-devices").textContent = s.devices.toLocaleString();
  for (const k of ["operational", "reduced-functionality", "disconnected", "configuring"])
    $(`sum-${k}`).textContent = (s.by_status[k] || 0).toLocaleString();
  $("sum-sessions").textContent = s.sessions.toLocaleString();
  $("sum-hs").textContent = s.handshakes_per_s.toLocaleString();
}

function refreshSummarySoon() {
  if (state.summaryTimer) return;
  state.summaryTimer = setTimeout(() => { state.summaryTimer = null; refreshSummary(); }, 300);
}

// ---------- device drawer ----------

function sshLine(uuid) {
  let host = "127.0.0.1", port = "3128";
  if (state.proxy) {
    const i = state.proxy.lastIndexOf(":");
    host = state.proxy.slice(0, i).replace(/^\[|\]$/g, "");
    port = state.proxy.slice(i + 1);
    if (host === "0.0.0.0" || host === "::") host = location.hostname;
  }
  return `ssh -o ProxyCommand="socat - PROXY:${host}:%h:%p,proxyport=${port},proxyauth=user:$CLOUDLINK_TOKEN" -p 22222 root@${uuid}`;
}

function renderDrawer(d) {
  $("d-name").textContent = d.name || "Unnamed device";
  $("d-uuid").textContent = d.uuid;
  const cl = d.cloudlink || {};
  const hb = d.heartbeat || {};
  const facts = [
    ["Status", statusBadge(d)],
    ["Heartbeat", `${hb.state || "unknown"}${hb.last_at ? `, last ${ago(hb.last_at)}` : ""}${hb.poll_interval_s ? `, every ${hb.poll_interval_s} s` : ""}`],
    ["Cloudlink", linkInd(d)],
    ["Endpoint", cl.connected ? cl.endpoint : "—"],
    ["Connected since", cl.connected ? `${cl.since} (${ago(cl.since)})` : "—"],
    ["Tunnel address", d.address],
    ["Traffic", `${bytes(cl.rx_bytes)} in, ${bytes(cl.tx_bytes)} out`],
    ["App id", d.app_id === null || d.app_id === undefined ? "—" : String(d.app_id)],
  ];
  $("d-facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
  const up = linkState(d) === "up";
  // A session signed in with a token without the actions scope sees the
  // buttons, greyed out, and why.
  const may = canAct();
  $("d-actions-note").textContent = !may
    ? "Signed in with a token without the actions scope: actions are not available."
    : up
    ? "Delivered to the device's supervisor now, over cloudlink."
    : "Cloudlink is down: immediate actions and SSH are unavailable until the device reconnects.";
  // Rebuild the buttons only when their set or state changes: a row refresh
  // must not swap a button out from under the pointer.
  state.openDevice = d;
  const names = Object.entries(ACTIONS)
    .filter(([, a]) => !a.needsApp || (d.app_id !== null && d.app_id !== undefined))
    .map(([n]) => n);
  const key = `${names.join()}|${up}|${may}`;
  if ($("d-actions").dataset.key !== key) {
    const buttons = names.map((name) => {
      const a = ACTIONS[name];
      const b = el("button", { class: name === "purge" || name === "shutdown" ? "danger" : "", "data-action": name,
        title: !may ? "This session's token has no actions scope"
          : up ? a.text : "Cloudlink is down: the device cannot be reached now" }, a.label);
      b.disabled = !up || !may;
      b.addEventListener("click", () => confirmAction(state.openDevice, name));
      return b;
    });
    $("d-actions").replaceChildren(...buttons);
    $("d-actions").dataset.key = key;
  }
  $("d-ssh").textContent = sshLine(d.uuid);
}

async function openDrawer(uuid) {
  state.open = uuid;
  $("d-action-result").textContent = "";
  $("d-action-result").className = "result";
  const d = state.rows.get(uuid);
  if (d) renderDrawer(d);
  $("drawer").hidden = false;
  const res = await api("GET", `/v1/devices/${encodeURIComponent(uuid)}`);
  if (res.status === 200 && state.open === uuid) renderDrawer(res.data);
}

function confirmAction(d, name) {
  const a = ACTIONS[name];
  $("confirm-title").textContent = `${a.label}: ${d.name || d.uuid}?`;
  $("confirm-text").textContent = a.text;
  $("confirm-ok").textContent = a.label;
  const dlg = $("confirm");
  dlg.returnValue = "";
  dlg.onclose = () => { if (dlg.returnValue === "ok") runAction(d.uuid, name); };
  dlg.showModal();
}

async function runAction(uuid, name) {
  const out = $("d-action-result");
  out.className = "result";
  out.textContent = `${ACTIONS[name].label}: sending…`;
  const res = await api("POST", `/v1/devices/${encodeURIComponent(uuid)}/actions/${name}`);
  if (res.status >= 200 && res.status < 300) {
    out.className = "result ok";
    out.textContent = `${ACTIONS[name].label}: accepted by the device (${res.status}).`;
  } else {
    out.className = "result bad";
    out.textContent = `${ACTIONS[name].label} failed: ${errorText(res)}`;
  }
  out.dataset.status = String(res.status);
}

// ---------- sign-in ----------

function signedOut(message) {
  state.csrf = null;
  if (state.events) { state.events.close(); state.events = null; }
  $("fleet-view").hidden = true;
  $("drawer").hidden = true;
  $("sign-out").hidden = true;
  $("sign-in-view").hidden = false;
  $("sign-in-error").textContent = message || "";
  $("token").focus();
}

async function start() {
  $("sign-in-view").hidden = true;
  $("fleet-view").hidden = false;
  $("sign-out").hidden = false;
  openEvents();
  refreshSummary();
  await loadPage();
}

/** Whether this session's token may run actions. */
function canAct() {
  const s = state.scopes || [];
  return s.includes("actions") || s.includes("admin");
}

async function boot() {
  $("sign-in-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const token = $("token").value.trim();
    const res = await api("POST", "/v1/session", { token });
    $("token").value = "";
    if (res.status === 200) {
      state.csrf = res.data.csrf_token;
      state.scopes = res.data.scopes || [];
      start();
    } else {
      $("sign-in-error").textContent = errorText(res);
    }
  });
  $("sign-out").addEventListener("click", async () => {
    await api("DELETE", "/v1/session");
    signedOut("Signed out.");
  });
  let searchTimer = null;
  $("search").addEventListener("input", () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => { state.q = $("search").value.trim(); restart(); }, 250);
  });
  $("status-filter").addEventListener("change", () => { setFilter($("status-filter").value); });
  for (const b of document.querySelectorAll(".stat[data-filter]"))
    b.addEventListener("click", () => setFilter(b.dataset.filter));
  for (const th of document.querySelectorAll("th[data-sort]"))
    th.addEventListener("click", () => {
      const s = th.dataset.sort;
      if (state.sort === s) state.desc = !state.desc;
      else { state.sort = s; state.desc = ["rx_bytes", "tx_bytes", "heartbeat", "connected_since"].includes(s); }
      restart();
    });
  $("prev").addEventListener("click", () => { if (state.page > 0) { state.page--; loadPage(); } });
  $("next").addEventListener("click", () => { if (state.next) { state.page++; loadPage(); } });
  $("rows").addEventListener("click", (ev) => {
    const tr = ev.target.closest("tr[data-uuid]");
    if (tr) openDrawer(tr.dataset.uuid);
  });
  $("d-close").addEventListener("click", () => { state.open = null; $("drawer").hidden = true; });
  $("d-copy").addEventListener("click", async () => {
    const text = $("d-ssh").textContent;
    try { await navigator.clipboard.writeText(text); $("d-copy").textContent = "Copied"; }
    catch (_) { getSelection().selectAllChildren($("d-ssh")); $("d-copy").textContent = "Press Ctrl+C"; }
    setTimeout(() => { $("d-copy").textContent = "Copy"; }, 1500);
  });
  setInterval(() => { if (!$("fleet-view").hidden) refreshSummary(); }, 2000);

  const res = await api("GET", "/v1/session");
  if (res.status === 200 && res.data.csrf_token) {
    state.csrf = res.data.csrf_token;
    state.scopes = res.data.scopes || [];
    start();
  } else {
    signedOut("");
  }
}

function setFilter(status) {
  state.status = status;
  $("status-filter").value = status;
  for (const b of document.querySelectorAll(".stat[data-filter]"))
    b.classList.toggle("active", b.dataset.filter === status && status !== "");
  restart();
}

boot();
