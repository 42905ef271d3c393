// Accord's web console: the transactions page and the transaction page.
// Every string from the server reaches the page through textContent or an attribute
// set with setAttribute: never innerHTML, so a gid or an error message that contains
// HTML shows as text. The page's Content-Security-Policy allows this file only.

const SVG = "http://www.w3.org/2000/svg";
const FILTER_NAMES = [
  "state", "protocol", "service", "shard", "stuck", "phase_two_pending",
  "started_after", "started_before", "ended_after", "ended_before", "gid_prefix", "key_prefix",
];
const TIME_NAMES = new Set(["started_after", "started_before", "ended_after", "ended_before"]);

// ------------------------------------------------------------------ helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v;
    else if (k === "class") node.className = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function svg(tag, attrs = {}) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  return node;
}

function stateClass(state) {
  return /^[A-Z_0-9]+$/.test(state) ? `st-${state}` : "st-unknown";
}

function badge(state) {
  return el("span", { class: `badge ${stateClass(state)}`, text: state });
}

function fmtTime(ms) {
  if (!ms) return "";
  const d = new Date(ms);
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
    `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

function fmtDuration(ms) {
  if (ms === 0) return "0 ms";
  if (!ms) return "";
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`;
  return `${(ms / 60000).toFixed(1)} min`;
}

async function getJSON(url, init) {
  const resp = await fetch(url, init);
  let body = null;
  try { body = await resp.json(); } catch { body = null; }
  if (!resp.ok) {
    const msg = body && body.error ? body.error : `${resp.status} ${resp.statusText}`;
    const err = new Error(msg);
    err.status = resp.status;
    throw err;
  }
  return body;
}

function showError(err) {
  const p = document.getElementById("error");
  if (!err) { p.hidden = true; p.textContent = ""; return; }
  p.textContent = String(err.message || err);
  p.hidden = false;
}

function setLive(on, text) {
  const s = document.getElementById("live-status");
  s.textContent = text;
  s.classList.toggle("on", on);
  s.classList.toggle("off", !on);
}

let configPromise = null;
function config() {
  configPromise ||= getJSON("/api/config");
  return configPromise;
}

// ------------------------------------------------------------------ transactions page

// The filter in the page's URL (so a filtered view can be bookmarked and reloaded).
function filterFromURL() {
  return new URLSearchParams(location.search);
}

function toLocalInput(ms) {
  const d = new Date(Number(ms));
  if (Number.isNaN(d.getTime())) return "";
  const off = d.getTimezoneOffset() * 60000;
  return new Date(d.getTime() - off).toISOString().slice(0, 19);
}

function formToParams(form) {
  const params = new URLSearchParams();
  for (const name of FILTER_NAMES) {
    const field = form.elements[name];
    if (!field) continue;
    if (field.type === "checkbox") {
      if (field.checked) params.set(name, "true");
    } else if (field.multiple) {
      for (const opt of field.selectedOptions) params.append(name, opt.value);
    } else if (TIME_NAMES.has(name)) {
      if (field.value) params.set(name, String(new Date(field.value).getTime()));
    } else if (field.value.trim()) {
      params.set(name, field.value.trim());
    }
  }
  const order = form.elements.order.value;
  if (order && order !== "started_desc") params.set("order", order);
  const size = form.elements.page_size.value.trim();
  if (size && size !== "50") params.set("page_size", size);
  return params;
}

function paramsToForm(params, form) {
  for (const name of FILTER_NAMES) {
    const field = form.elements[name];
    if (!field) continue;
    if (field.type === "checkbox") {
      field.checked = ["1", "true", "yes", "on"].includes((params.get(name) || "").toLowerCase());
    } else if (field.multiple) {
      const wanted = new Set(params.getAll(name).flatMap((v) => v.split(",")).map((v) => v.trim().toUpperCase()));
      for (const opt of field.options) opt.selected = wanted.has(opt.value);
    } else if (TIME_NAMES.has(name)) {
      field.value = params.get(name) ? toLocalInput(params.get(name)) : "";
    } else {
      field.value = params.getAll(name).join(", ");
    }
  }
  form.elements.order.value = params.get("order") || "started_desc";
  form.elements.page_size.value = params.get("page_size") || "50";
}

function summaryCells(t) {
  const link = el("a", { href: `/transaction?gid=${encodeURIComponent(t.gid)}`, text: t.gid });
  return [
    el("td", { class: "gid" }, link),
    el("td", {}, badge(t.state)),
    el("td", { text: t.protocol === "TWO_PHASE_COMMIT" ? "2PC" : t.protocol.toLowerCase() }),
    el("td", { text: t.shard }),
    el("td", { text: t.services.join(", ") }),
    el("td", { text: fmtTime(t.created_ms) }),
    el("td", { class: "num", text: t.ended_ms ? fmtDuration(t.duration_ms) : "running" }),
    el("td", { class: "num", text: String(t.attempts) }),
    el("td", { class: "reason", text: t.reason, title: t.reason }),
  ];
}

function txnRow(t) {
  const tr = el("tr", { "data-gid": t.gid, "data-state": t.state, "data-lsn": String(t.last_lsn) });
  tr.append(...summaryCells(t));
  return tr;
}

function updateRow(tr, t) {
  if (Number(tr.dataset.lsn) > t.last_lsn) return; // an older change than shown
  tr.replaceChildren(...summaryCells(t));
  tr.dataset.state = t.state;
  tr.dataset.lsn = String(t.last_lsn);
  tr.classList.remove("flash");
  void tr.offsetWidth; // restart the highlight
  tr.classList.add("flash");
}

function renderCounts(counts, onPick) {
  const box = document.getElementById("counts");
  const order = ["ACTIVE", "PREPARING", "COMMITTING", "ABORTING", "COMMITTED", "ABORTED",
    "RUNNING", "COMPENSATING", "COMPLETED", "COMPENSATED", "STUCK"];
  const names = [...order.filter((s) => s in counts), ...Object.keys(counts).filter((s) => !order.includes(s))];
  const items = names.map((s) => {
    const b = el("button", { type: "button", class: `count ${stateClass(s)}`, "data-state": s, title: `show ${s} only` },
      el("span", { class: "n", text: String(counts[s]) }), el("span", { class: "s", text: s }));
    b.addEventListener("click", () => onPick(s));
    return b;
  });
  const total = Object.values(counts).reduce((a, b) => a + b, 0);
  box.replaceChildren(el("span", { class: "total", text: `${total} transactions` }), ...items);
}

// Two lines over the minutes: transactions ended per minute, and the p95 latency.
function renderSparkline(minutes) {
  const box = document.getElementById("sparkline");
  const rows = minutes.filter((m) => m.service === "").sort((a, b) => a.minute_ms - b.minute_ms);
  const W = Number(box.getAttribute("width"));
  const H = Number(box.getAttribute("height"));
  const nodes = [];
  const caption = document.getElementById("spark-caption");
  if (rows.length === 0) {
    box.replaceChildren();
    caption.textContent = "no transaction in the last hour";
    return;
  }
  // One bar per minute for the transactions that ended, a line for the p95 latency.
  const slot = (W - 4) / Math.max(rows.length, 1);
  const maxEnded = Math.max(1, ...rows.map((m) => m.ended));
  rows.forEach((m, i) => {
    const h = (m.ended / maxEnded) * (H - 6);
    nodes.push(svg("rect", {
      x: (2 + i * slot + slot * 0.15).toFixed(1), y: (H - 2 - h).toFixed(1),
      width: Math.max(1, slot * 0.7).toFixed(1), height: h.toFixed(1), class: "spark-tput",
    }));
  });
  const maxLat = Math.max(1, ...rows.map((m) => m.p95_ms));
  const pts = rows.map((m, i) => `${(2 + (i + 0.5) * slot).toFixed(1)},${(H - 2 - (m.p95_ms / maxLat) * (H - 6)).toFixed(1)}`);
  if (pts.length === 1) pts.unshift(`2,${pts[0].split(",")[1]}`), pts.push(`${W - 2},${pts[1].split(",")[1]}`);
  nodes.push(svg("polyline", { points: pts.join(" "), class: "spark-lat" }));
  const last = rows[rows.length - 1];
  const title = svg("title");
  title.textContent = `${rows.length} minutes; last minute: ${last.ended} ended (${last.committed} committed, ` +
    `${last.aborted} aborted), p50 ${fmtDuration(last.p50_ms)}, p95 ${fmtDuration(last.p95_ms)}`;
  nodes.push(title);
  box.replaceChildren(...nodes);
  caption.replaceChildren(
    el("span", { class: "key-tput", text: `ended/min (last ${last.ended})` }),
    " · ",
    el("span", { class: "key-lat", text: `p95 latency (last ${fmtDuration(last.p95_ms)})` }),
  );
}

function renderLag(shards) {
  const box = document.getElementById("lag");
  box.replaceChildren(...shards.map((s) =>
    el("span", { class: `shard ${s.connected ? "ok" : "down"}`,
      title: `coordinator ${s.coordinator || "none"}; applied ${s.applied_lsn} of ${s.durable_lsn}`,
      text: `${s.shard}: ${s.connected ? `lag ${s.lag_events}` : "not connected"}` })));
}

async function transactionsPage() {
  const form = document.getElementById("filters");
  const tbody = document.querySelector("#txn-table tbody");
  const nextBtn = document.getElementById("next-page");
  const firstBtn = document.getElementById("first-page");
  const pageInfo = document.getElementById("page-info");
  const newRows = document.getElementById("new-rows");
  let filter = filterFromURL();
  let pageToken = "";
  let pageNo = 1;
  let nextToken = "";
  let pendingNew = 0;
  let source = null;
  let statsTimer = null;

  paramsToForm(filter, form);

  const firstPageNewestFirst = () => pageNo === 1 && (filter.get("order") || "started_desc") === "started_desc";

  async function loadPage() {
    const params = new URLSearchParams(filter);
    if (pageToken) params.set("page_token", pageToken);
    try {
      const data = await getJSON(`/api/transactions?${params}`);
      showError(null);
      tbody.replaceChildren(...data.transactions.map(txnRow));
      nextToken = data.next_page_token;
      nextBtn.disabled = !nextToken;
      firstBtn.disabled = pageNo === 1;
      pageInfo.textContent = `page ${pageNo}, ${data.transactions.length} shown`;
      document.getElementById("empty").hidden = data.transactions.length > 0;
      pendingNew = 0;
      newRows.hidden = true;
      document.body.dataset.loaded = String(Date.now());
    } catch (err) {
      tbody.replaceChildren();
      nextBtn.disabled = true;
      showError(err);
    }
  }

  async function loadStats() {
    try {
      const service = filter.getAll("service").join(",").split(",")[0] || "";
      const data = await getJSON(`/api/stats${service ? `?service=${encodeURIComponent(service)}` : ""}`);
      renderCounts(data.counts, (s) => {
        filter = new URLSearchParams({ state: s });
        paramsToForm(filter, form);
        apply();
      });
      renderSparkline(data.minutes);
      renderLag(data.shards);
    } catch (err) {
      showError(err);
    }
  }

  function scheduleStats() {
    if (statsTimer) return;
    statsTimer = setTimeout(() => { statsTimer = null; loadStats(); }, 1000);
  }

  function onChange(msg) {
    const { txn, matches } = JSON.parse(msg.data);
    const row = tbody.querySelector(`tr[data-gid="${CSS.escape(txn.gid)}"]`);
    if (row) {
      if (matches) updateRow(row, txn);
      else row.remove();
    } else if (matches) {
      if (firstPageNewestFirst()) {
        const tr = txnRow(txn);
        tr.classList.add("flash");
        tbody.prepend(tr);
        document.getElementById("empty").hidden = true;
      } else {
        pendingNew += 1;
        newRows.firstChild.textContent = `${pendingNew} new or changed transaction(s) match. `;
        newRows.hidden = false;
      }
    }
    document.body.dataset.lastEvent = txn.gid;
    scheduleStats();
  }

  function subscribe() {
    if (source) source.close();
    const only = new URLSearchParams([...filter].filter(([k]) => FILTER_NAMES.includes(k)));
    source = new EventSource(`/api/events?${only}`);
    source.addEventListener("open", () => setLive(true, "live"));
    source.addEventListener("error", () => setLive(false, "reconnecting"));
    source.addEventListener("change", onChange);
  }

  function apply() {
    history.replaceState(null, "", filter.toString() ? `/?${filter}` : "/");
    pageToken = "";
    pageNo = 1;
    loadPage();
    loadStats();
    subscribe();
  }

  newRows.prepend(document.createTextNode(""));
  document.getElementById("show-new").addEventListener("click", () => {
    pageToken = ""; pageNo = 1; loadPage();
  });
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    filter = formToParams(form);
    apply();
  });
  document.getElementById("reset").addEventListener("click", () => {
    filter = new URLSearchParams();
    paramsToForm(filter, form);
    apply();
  });
  nextBtn.addEventListener("click", () => {
    if (!nextToken) return;
    pageToken = nextToken;
    pageNo += 1;
    loadPage();
  });
  firstBtn.addEventListener("click", () => { pageToken = ""; pageNo = 1; loadPage(); });
  apply();
}

// ------------------------------------------------------------------ transaction page

function dlRow(dl, name, value) {
  dl.append(el("dt", { text: name }), value instanceof Node ? el("dd", {}, value) : el("dd", { text: String(value) }));
}

function renderGantt(lanes) {
  const box = document.getElementById("gantt");
  const segs = lanes.flatMap((l) => l.segments);
  const LABEL = 190;
  const W = 960;
  const LANE = 28;
  const TOP = 22;
  const H = TOP + lanes.length * LANE + 8;
  box.setAttribute("width", W);
  box.setAttribute("height", H);
  box.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const nodes = [];
  if (segs.length === 0) {
    box.replaceChildren();
    return;
  }
  const t0 = Math.min(...segs.map((s) => s.start_ms));
  const t1 = Math.max(...segs.map((s) => s.end_ms));
  const span = Math.max(1, t1 - t0);
  const x = (t) => LABEL + ((t - t0) / span) * (W - LABEL - 10);
  for (const frac of [0, 0.25, 0.5, 0.75, 1]) {
    const gx = LABEL + frac * (W - LABEL - 10);
    nodes.push(svg("line", { x1: gx, x2: gx, y1: TOP - 4, y2: H - 4, class: "grid" }));
    const label = svg("text", { x: gx, y: 12, class: "axis", "text-anchor": frac === 1 ? "end" : frac === 0 ? "start" : "middle" });
    label.textContent = `+${fmtDuration(frac * span)}`;
    nodes.push(label);
  }
  lanes.forEach((lane, i) => {
    const y = TOP + i * LANE;
    const g = svg("g", { class: "lane", "data-lane": lane.name });
    const name = svg("text", { x: 4, y: y + 17, class: "lane-name" });
    name.textContent = lane.service ? `${lane.name} (${lane.service})` : lane.name;
    g.append(name);
    for (const s of lane.segments) {
      const x0 = x(s.start_ms);
      const w = Math.max(3, x(s.end_ms) - x0);
      const rect = svg("rect", {
        x: x0.toFixed(1), y: y + 4, width: w.toFixed(1), height: LANE - 10, rx: 3,
        class: `seg phase-${/^[a-z_]+$/.test(s.phase) ? s.phase : "other"} ${stateClass(s.state)}`,
        "data-phase": s.phase, "data-state": s.state,
      });
      const tip = svg("title");
      const parts = [`${lane.name}: ${s.phase.replace("_", " ")} → ${s.state}`,
        `${fmtDuration(s.end_ms - s.start_ms)} from +${fmtDuration(s.start_ms - t0)}`];
      if (s.attempts) parts.push(`${s.attempts} attempt(s)`);
      if (s.error) parts.push(`error: ${s.error}`);
      tip.textContent = parts.join("\n");
      rect.append(tip);
      g.append(rect);
      const text = s.phase === "state" ? s.state : `${s.phase.replace("_", " ")}: ${s.state}`;
      const fits = Math.floor((w - 8) / 6); // about 6 px a character at 10 px
      if (fits >= 4) {
        const label = svg("text", { x: x0 + 4, y: y + 16, class: "seg-label" });
        label.textContent = text.length > fits ? `${text.slice(0, fits - 1)}…` : text;
        g.append(label);
      }
    }
    nodes.push(g);
  });
  box.replaceChildren(...nodes);
}

async function transactionPage() {
  const gid = new URLSearchParams(location.search).get("gid") || "";
  if (!gid) { showError(new Error("no gid given (/transaction?gid=...)")); return; }
  const cfg = await config();
  const retryBtn = document.getElementById("retry-btn");
  const cancelBtn = document.getElementById("cancel-btn");
  const result = document.getElementById("action-result");
  let current = null;

  async function load() {
    let v;
    try {
      v = await getJSON(`/api/transaction?gid=${encodeURIComponent(gid)}`);
    } catch (err) {
      showError(err);
      return;
    }
    showError(null);
    current = v;
    const s = v.summary;
    document.getElementById("txn").hidden = false;
    document.getElementById("txn-gid").textContent = s.gid;
    document.title = `Accord — ${s.gid}`;
    const dl = document.getElementById("summary");
    dl.replaceChildren();
    dlRow(dl, "state", badge(s.state));
    dlRow(dl, "protocol", s.protocol === "TWO_PHASE_COMMIT" ? (v.one_phase ? "2PC (one phase)" : "2PC") : "saga");
    dlRow(dl, "shard", s.shard);
    if (s.idempotency_key) dlRow(dl, "idempotency key", s.idempotency_key);
    dlRow(dl, "services", s.services.join(", "));
    dlRow(dl, "started", fmtTime(s.created_ms));
    if (s.ended_ms) dlRow(dl, "ended", fmtTime(s.ended_ms));
    dlRow(dl, "duration", s.ended_ms ? fmtDuration(s.duration_ms) : "running");
    if (v.deadline_ms) dlRow(dl, "deadline", fmtTime(v.deadline_ms));
    dlRow(dl, "attempts", s.attempts);
    if (s.reason) dlRow(dl, "reason", el("span", { class: "reason-text", text: s.reason }));
    dlRow(dl, "last LSN", s.last_lsn);

    const link = document.getElementById("trace-link");
    const traceId = document.getElementById("trace-id");
    if (v.trace_link && /^https?:\/\//.test(v.trace_link)) {
      link.href = v.trace_link;
      link.textContent = s.trace_id;
      link.hidden = false;
      traceId.textContent = "";
    } else {
      link.hidden = true;
      link.removeAttribute("href");
      traceId.textContent = s.trace_id || "(not traced)";
    }

    for (const [btn, name] of [[retryBtn, "retry"], [cancelBtn, "cancel"]]) {
      const applicable = v.actions[name];
      btn.disabled = !(cfg.actions && applicable);
      btn.title = !cfg.actions ? cfg.actions_off_reason
        : applicable ? (name === "retry" ? "compensate this STUCK saga again (RetryTransaction)" : "cancel this saga (CancelSaga)")
          : `not applicable: the saga is ${s.state}`;
    }

    renderGantt(v.lanes);

    const errors = [];
    if (s.reason) errors.push(["transaction", s.reason]);
    for (const b of v.branches) if (b.last_error) errors.push([b.name, b.last_error]);
    const seen = new Set(errors.map(([w, e]) => `${w}\u0000${e}`));
    for (const e of v.timeline) {
      const who = e.branch || "transaction";
      if (e.error && !seen.has(`${who}\u0000${e.error}`)) {
        seen.add(`${who}\u0000${e.error}`);
        errors.push([who, e.error]);
      }
    }
    document.getElementById("errors").replaceChildren(...(errors.length
      ? errors.map(([who, msg]) => el("li", {}, el("strong", { text: who }), ": ", el("span", { class: "error-text", text: msg })))
      : [el("li", { class: "none", text: "none" })]));

    document.getElementById("branches-title").textContent = s.protocol === "SAGA" ? "Steps" : "Branches";
    document.querySelector("#branches tbody").replaceChildren(...v.branches.map((b) => el("tr", { "data-branch": b.name },
      el("td", { text: b.name + (b.pivot ? " (pivot)" : "") }),
      el("td", { text: b.service, title: b.address }),
      el("td", { text: b.operation }),
      el("td", { text: b.compensation }),
      el("td", {}, badge(b.state)),
      el("td", { class: "num", text: String(b.attempts) }),
      el("td", { class: "num", text: String(b.compensation_attempts) }),
      el("td", {}, el("code", { class: "payload", text: b.payload })),
      el("td", { class: "error-text", text: b.last_error }))));

    document.querySelector("#timeline tbody").replaceChildren(...v.timeline.map((e) => el("tr", {},
      el("td", { class: "num", text: String(e.lsn) }),
      el("td", { text: fmtTime(e.unix_ms) }),
      el("td", { text: e.kind }),
      el("td", {}, badge(e.state)),
      el("td", { text: e.branch }),
      el("td", { text: e.branch_state }),
      el("td", { class: "num", text: e.branch ? `${e.attempts}/${e.compensation_attempts}` : "" }),
      el("td", { class: "error-text", text: e.error }))));
    document.body.dataset.loaded = String(Date.now());
  }

  async function act(name) {
    if (!current) return;
    result.textContent = `${name}…`;
    try {
      const r = await getJSON(`/api/actions/${name}`, {
        method: "POST",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": cfg.csrf_token },
        body: JSON.stringify({ gid }),
      });
      result.textContent = r.pending ? `${name}: ${r.message}`
        : `${name}: the coordinator says ${r.state}${r.reason ? ` (${r.reason})` : ""}`;
    } catch (err) {
      result.textContent = `${name} failed: ${err.message}`;
    }
    await load();
  }
  retryBtn.addEventListener("click", () => act("retry"));
  cancelBtn.addEventListener("click", () => act("cancel"));

  await load();
  // Live: reload the view whenever this transaction changes.
  const source = new EventSource(`/api/events?gid_prefix=${encodeURIComponent(gid)}`);
  let timer = null;
  source.addEventListener("open", () => setLive(true, "live"));
  source.addEventListener("error", () => setLive(false, "reconnecting"));
  source.addEventListener("change", (msg) => {
    const { txn } = JSON.parse(msg.data);
    if (txn.gid !== gid || timer) return;
    timer = setTimeout(() => { timer = null; load(); }, 300);
  });
}

const page = document.body.dataset.page;
if (page === "transactions") transactionsPage();
else if (page === "transaction") transactionPage();
