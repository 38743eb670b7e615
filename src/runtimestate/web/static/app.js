// The runtimestate dashboard: one page, plain JavaScript, no build step.
//
// Data comes from the service's JSON API with the session cookie (and, on every request that
// changes something, the session's CSRF token from the page's <meta> tag). Download progress
// arrives live over Server-Sent Events (/queue/inProgress); the snapshot (/state, /queue) is
// read again when a pull starts or ends and every few seconds. When the service goes away the
// stream is reopened with backoff and the header says so; nothing needs a reload.
//
// Each page is drawn in two parts: a frame (headings, forms, filters) drawn once per visit, and
// regions redrawn when data changes. Forms therefore keep what the operator typed, and the
// element that had the keyboard focus gets it back after a redraw.
"use strict";

const CSRF = document.querySelector('meta[name="csrf-token"]').content;
const REFRESH_MS = 4000;
const MAX_BACKOFF_MS = 5000;

const data = {
  state: null, // GET /state: one entry per managed backend
  queue: [], // GET /queue: queued and running downloads
  plan: null, // GET /state/plan, read on the plan page only
  providers: null, // provider configs and statuses, read on the providers page only
  summary: null, // GET /state/summary when the service has it
  cluster: null, // GET /cluster when the service has it
  fetchedAt: null, // when the snapshot was read (ms)
  progress: new Map(), // "url|model" -> live progress folded from SSE events
  history: new Map(), // backend id -> {errors, readAt}: GET /state/{id}/errors
};
// Routes another part of the service may add (named by the page shell when the app has them).
const FEATURES = new Set(document.querySelector('meta[name="features"]').content.split(" "));
const optional = {
  summary: FEATURES.has("summary"), cluster: FEATURES.has("cluster"),
  errors: FEATURES.has("errors"), health: FEATURES.has("health"),
};

// ---- small helpers -----------------------------------------------------------------------
function esc(value) {
  return String(value ?? "").replace(/[&<>"']/g, (c) => ({
    "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;",
  })[c]);
}

function bytes(n) {
  if (typeof n !== "number" || !isFinite(n)) return "?";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
  return (i === 0 ? String(n) : n.toFixed(n < 10 ? 1 : 0)) + " " + units[i];
}

function duration(seconds) {
  if (typeof seconds !== "number" || !isFinite(seconds) || seconds < 0) return "?";
  if (seconds < 60) return Math.round(seconds) + " s";
  if (seconds < 3600) return Math.floor(seconds / 60) + " min " + Math.round(seconds % 60) + " s";
  return Math.floor(seconds / 3600) + " h " + Math.round((seconds % 3600) / 60) + " min";
}

function age(iso) {
  if (!iso) return "?";
  const at = Date.parse(iso);
  if (isNaN(at)) return "?";
  return duration(Math.max(0, (Date.now() - at) / 1000)) + " ago";
}

const normalizedNames = new Map();
function normalized(name) {
  let found = normalizedNames.get(name);
  if (found === undefined) {
    const last = name.split("/").pop();
    found = last.includes(":") ? name : name + ":latest";
    if (normalizedNames.size > 100000) normalizedNames.clear();
    normalizedNames.set(name, found);
  }
  return found;
}

function urlKey(url) {
  return String(url || "").replace(/\/+$/, "");
}

class ApiFailure extends Error {
  constructor(status, message, field) {
    super(message);
    this.status = status;
    this.field = field;
  }
}

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (method !== "GET") headers["X-CSRF-Token"] = CSRF;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const answer = await fetch(path, {
    method, headers, credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (answer.status === 401) {
    window.location.assign("/ui");
    throw new ApiFailure(401, "the session has ended; log in again", null);
  }
  if (!answer.ok) {
    let message = answer.status + " " + answer.statusText;
    let field = null;
    try {
      const payload = await answer.json();
      if (payload && payload.error) {
        message = payload.error.message || message;
        field = payload.error.field || null;
      }
    } catch (_) { /* not JSON: keep the status line */ }
    throw new ApiFailure(answer.status, message, field);
  }
  if (answer.status === 204) return null;
  return answer.json();
}

async function optionalGet(name, path) {
  if (!optional[name]) return null;
  try {
    return await api("GET", path);
  } catch (error) {
    // 404: the service has no such route; 503: it has, but runs without that part.
    if (error instanceof ApiFailure && [404, 405, 503].includes(error.status)) {
      optional[name] = false;
      return null;
    }
    throw error;
  }
}

// ---- the model: what each (backend, model) pair is doing -----------------------------------
function entries() {
  return Array.isArray(data.state) ? data.state : [];
}

function presentNames(entry) {
  return (entry.pulledModels || []).map((m) => m.model || m.name).filter(Boolean);
}

function downloadsOf(entry) {
  return Array.isArray(entry.downloads) ? entry.downloads : [];
}

// Per-snapshot indexes: a fleet of 1,000 backends draws 1,000 x models cells, each of which
// asks "declared here? present here? queued here?"; sets and maps answer in constant time.
const indexes = { entries: new WeakMap(), queue: new Map(), queueOf: null };

function indexOf(entry) {
  let found = indexes.entries.get(entry);
  if (!found) {
    found = {
      declared: new Set((entry.models || []).map(normalized)),
      present: new Set(presentNames(entry).map(normalized)),
    };
    indexes.entries.set(entry, found);
  }
  return found;
}

// A queue item's status: newer services list every pull task with its own status (queued,
// running, failed, cancelled); older ones list only what waits or runs, with "running".
function queueStatus(item) {
  return item.status || (item.running ? "running" : "queued");
}

function queueItem(url, model) {
  if (indexes.queueOf !== data.queue) {
    indexes.queue = new Map(data.queue.map((item) => [urlKey(item.url) + "|" + item.model, item]));
    indexes.queueOf = data.queue;
  }
  return indexes.queue.get(urlKey(url) + "|" + model) || null;
}

function liveProgress(url, model) {
  return data.progress.get(urlKey(url) + "|" + model) || null;
}

// One word per pair, with what the operator needs to act on it.
function cellStatus(entry, model) {
  const index = indexOf(entry);
  const declared = index.declared.has(normalized(model));
  const present = index.present.has(normalized(model));
  const url = entry.backend && entry.backend.baseUrl;
  if (present) return { word: declared ? "present" : "undeclared" };
  if (!declared) return { word: "none" };
  if (entry.error) return { word: "unreachable", reason: entry.error };
  const tasks = downloadsOf(entry);
  const task = tasks.length ? tasks.find((d) => normalized(d.model || "") === normalized(model)) : null;
  const live = liveProgress(url, model);
  if (live && live.state === "running") return { word: "pulling", percent: live.percent() };
  if (task) {
    if (task.status === "running") {
      const pct = task.total ? Math.floor((100 * (task.completed || 0)) / task.total) : null;
      return { word: "pulling", percent: pct };
    }
    if (task.status === "failed") {
      return {
        word: "failed", attempts: task.attempts, reason: task.lastError,
        next: task.nextAttemptAt,
      };
    }
    if (task.status === "queued" || task.status === "cancelled") return { word: task.status };
  }
  const queued = queueItem(url, model);
  if (queued) {
    const word = queueStatus(queued);
    if (word === "running") {
      const pct = queued.total ? Math.floor((100 * (queued.completed || 0)) / queued.total) : null;
      return { word: "pulling", percent: pct };
    }
    if (word === "failed") {
      return { word, attempts: queued.attempts, reason: queued.lastError, next: queued.nextAttemptAt };
    }
    return { word };
  }
  if (live && live.state === "failed") return { word: "failed", reason: live.status };
  return { word: "missing" };
}

function health(entry) {
  if (entry.error) return "error";
  const states = (entry.models || []).map((m) => cellStatus(entry, m).word);
  if (states.includes("failed")) return "failing";
  if (states.some((w) => w === "pulling" || w === "queued" || w === "missing")) return "pulling";
  return "ok";
}

// ---- live progress over SSE -------------------------------------------------------------
class Progress {
  constructor(url, model) {
    this.url = url;
    this.model = model;
    this.layers = new Map();
    this.state = "running";
    this.status = "";
    this.samples = [];
    this.startedAt = Date.now();
  }
  get total() { let t = 0; for (const l of this.layers.values()) t += l.total; return t; }
  get completed() { let c = 0; for (const l of this.layers.values()) c += l.completed; return c; }
  percent() { const t = this.total; return t ? Math.floor((100 * this.completed) / t) : null; }
  speed() {
    if (this.samples.length < 2) return null;
    const first = this.samples[0];
    const last = this.samples[this.samples.length - 1];
    const seconds = (last.at - first.at) / 1000;
    return seconds > 0 ? Math.max(0, (last.done - first.done) / seconds) : null;
  }
  eta() {
    const speed = this.speed();
    if (!speed) return null;
    return (this.total - this.completed) / speed;
  }
  fold(event) {
    this.status = String(event.status || "");
    const lowered = this.status.toLowerCase();
    if (lowered === "success") {
      this.state = "done";
      return;
    }
    if (/^(error|fail|cancel)/.test(lowered)) {
      this.state = "failed";
      return;
    }
    this.state = "running";
    if (typeof event.total === "number" && event.total > 0) {
      const digest = event.digest || this.status;
      this.layers.set(digest, { total: event.total, completed: event.completed || 0 });
      const now = Date.now();
      this.samples.push({ at: now, done: this.completed });
      while (this.samples.length > 2 && now - this.samples[0].at > 10000) this.samples.shift();
    }
  }
}

const live = { source: null, attempt: 0, timer: null, connected: false };

function setLive(stateWord, text) {
  const el = document.getElementById("live");
  el.dataset.state = stateWord;
  el.textContent = text;
}

function openStream() {
  if (live.source) live.source.close();
  const source = new EventSource("/queue/inProgress");
  live.source = source;
  source.onopen = () => {
    const wasDown = live.attempt > 0;
    live.attempt = 0;
    live.connected = true;
    setLive("live", "live");
    if (wasDown) refresh();
  };
  source.onmessage = (message) => {
    let event;
    try { event = JSON.parse(message.data); } catch (_) { return; }
    if (!event || typeof event !== "object") return;
    const key = urlKey(event.baseUrl) + "|" + event.model;
    let entry = data.progress.get(key);
    if (!entry || entry.state !== "running") {
      entry = new Progress(event.baseUrl, event.model);
      data.progress.set(key, entry);
    }
    entry.fold(event);
    if (entry.state !== "running") scheduleRefresh(300);
    redraw();
  };
  source.onerror = () => {
    source.close();
    live.source = null;
    live.connected = false;
    reconnectLater();
  };
}

function reconnectLater() {
  if (live.timer) return;
  live.attempt += 1;
  const delay = Math.min(MAX_BACKOFF_MS, 500 * 2 ** Math.min(live.attempt, 5));
  setLive("reconnecting", "reconnecting in " + Math.ceil(delay / 1000) + " s (attempt " +
    live.attempt + ")");
  live.timer = setTimeout(() => {
    live.timer = null;
    openStream();
  }, delay);
}

// ---- the snapshot as a stream (when the service has /state/events) ---------------------------
// The service sends the whole snapshot on connect, then one event per changed backend and a
// summary with each heartbeat; while this stream is open the page does not poll /state.
const stateStream = { source: null, attempt: 0, connected: false };

function replaceEntry(state) {
  if (!state || !state.id || !Array.isArray(data.state)) return;
  const next = data.state.filter((entry) => entry.id !== state.id);
  next.push(state);
  next.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  data.state = next;
}

function onStateEvent(kind, handle) {
  stateStream.source.addEventListener(kind, (message) => {
    let value;
    try { value = JSON.parse(message.data); } catch (_) { return; }
    handle(value);
    data.fetchedAt = Date.now();
    redraw();
  });
}

function openStateStream() {
  if (!FEATURES.has("events") || stateStream.source) return;
  stateStream.source = new EventSource("/state/events");
  onStateEvent("snapshot", (value) => {
    data.state = Array.isArray(value) ? value : value.backends || [];
  });
  onStateEvent("backend", (value) => replaceEntry(value.state || value));
  onStateEvent("removed", (value) => {
    if (Array.isArray(data.state)) data.state = data.state.filter((e) => e.id !== value.id);
  });
  onStateEvent("summary", (value) => { data.summary = value; });
  stateStream.source.onopen = () => {
    stateStream.connected = true;
    stateStream.attempt = 0;
  };
  stateStream.source.onerror = () => {
    stateStream.source.close();
    stateStream.source = null;
    stateStream.connected = false;
    stateStream.attempt += 1;
    setTimeout(openStateStream, Math.min(MAX_BACKOFF_MS, 500 * 2 ** Math.min(stateStream.attempt, 5)));
  };
}

// ---- reading the snapshot ------------------------------------------------------------------
let refreshTimer = null;
let refreshing = false;

function scheduleRefresh(ms) {
  if (refreshTimer) clearTimeout(refreshTimer);
  refreshTimer = setTimeout(refresh, ms);
}

async function refresh() {
  if (refreshing) return scheduleRefresh(500);
  refreshing = true;
  try {
    const streamed = stateStream.connected && data.state !== null;
    const [state, queue, summary, cluster] = await Promise.all([
      streamed ? data.state : api("GET", "/state"), api("GET", "/queue"),
      streamed ? data.summary : optionalGet("summary", "/state/summary"),
      optionalGet("cluster", "/cluster"),
    ]);
    data.state = state;
    data.queue = Array.isArray(queue) ? queue : [];
    data.summary = summary;
    data.cluster = cluster;
    data.fetchedAt = Date.now();
    const page = currentPage().name;
    if (page === "plan") data.plan = await api("GET", "/state/plan");
    if (page === "providers") data.providers = await readProviders();
    forgetFinished();
    if (!live.source && !live.timer) openStream();
    openStateStream();
    redraw();
  } catch (error) {
    if (error instanceof TypeError) {
      // The service is unreachable: the stream's reconnect loop reports it.
      if (!live.timer) reconnectLater();
    } else {
      showPageError(error.message);
    }
  } finally {
    refreshing = false;
    scheduleRefresh(REFRESH_MS);
  }
}

async function readProviders() {
  const [configs, statuses, health] = await Promise.all([
    api("GET", "/providers/configs"),
    Promise.all(["openai", "gemini"].map((p) => api("GET", "/providers/" + p + "/status"))),
    optionalGet("health", "/providers/health"),
  ]);
  return { configs, statuses, health };
}

// A backend's history of errors, as the service keeps it (the same on every replica): read when
// its page is drawn and again after REFRESH_MS, never more often.
function historyOf(id) {
  const known = data.history.get(id);
  if (!optional.errors) return known || { errors: null };
  if (!known || (!known.loading && Date.now() - known.readAt > REFRESH_MS)) {
    const next = { errors: known ? known.errors : null, readAt: Date.now(), loading: true };
    data.history.set(id, next);
    optionalGet("errors", "/state/" + encodeURIComponent(id) + "/errors")
      .then((answer) => { next.errors = answer ? answer.errors : null; })
      .catch((error) => { next.failed = error.message; })
      .finally(() => { next.loading = false; next.readAt = Date.now(); redraw(); });
    return next;
  }
  return known;
}

function seconds(value) {
  if (typeof value !== "number" || !isFinite(value)) return "-";
  return value < 1 ? Math.round(value * 1000) + " ms" : value.toFixed(value < 10 ? 2 : 1) + " s";
}

function clockTime(iso) {
  return iso ? new Date(iso).toLocaleTimeString() : "-";
}

// A finished pull leaves the live map once the snapshot shows the model present.
function forgetFinished() {
  for (const [key, entry] of data.progress) {
    if (entry.state === "done") {
      const backend = entries().find((e) => urlKey(e.backend && e.backend.baseUrl) === urlKey(entry.url));
      if (!backend || presentNames(backend).map(normalized).includes(normalized(entry.model))) {
        data.progress.delete(key);
      }
    }
  }
}

// ---- pages ---------------------------------------------------------------------------------
const pages = {};
let drawn = null;

function currentPage() {
  const parts = (window.location.hash || "#/overview").slice(2).split("/");
  const name = pages[parts[0]] ? parts[0] : "overview";
  return { name, arg: parts.slice(1).map(decodeURIComponent).join("/") };
}

function region(name, html) {
  const el = document.querySelector('[data-region="' + name + '"]');
  if (el) el.innerHTML = html;
}

function showPageError(message) {
  const el = document.getElementById("page-error");
  if (el) {
    el.textContent = message;
    el.hidden = false;
  }
}

// Progress events can arrive dozens of times a second; the page is redrawn at most four times a
// second, so a button stays under the pointer long enough to be clicked.
const REDRAW_MS = 250;
let redrawQueued = false;
let lastRedraw = 0;
function redraw() {
  if (redrawQueued) return;
  redrawQueued = true;
  const wait = Math.max(0, lastRedraw + REDRAW_MS - Date.now());
  setTimeout(() => requestAnimationFrame(draw), wait);
}

function draw() {
  {
    redrawQueued = false;
    lastRedraw = Date.now();
    const page = currentPage();
    const main = document.getElementById("main");
    const key = page.name + "/" + page.arg;
    if (drawn !== key) {
      drawn = key;
      // A new element per frame: a page's listeners go with it, so visiting a page again never
      // adds a second listener (one click, one request).
      main.innerHTML = '<div id="page"><p id="page-error" class="error" role="alert" hidden></p>' +
        pages[page.name].frame(page.arg) + "</div>";
      for (const link of document.querySelectorAll("nav a")) {
        if (link.dataset.page === page.name) link.setAttribute("aria-current", "page");
        else link.removeAttribute("aria-current");
      }
      if (pages[page.name].bind) pages[page.name].bind(page.arg);
    }
    if (data.state === null) return;
    const focused = document.activeElement && document.activeElement.dataset
      ? document.activeElement.dataset.key : null;
    pages[page.name].update(page.arg);
    if (focused) {
      const again = main.querySelector('[data-key="' + CSS.escape(focused) + '"]');
      if (again) again.focus();
    }
  }
}

function counts() {
  let running = 0;
  let queued = 0;
  let failed = 0;
  const tally = (word) => {
    if (word === "running") running += 1;
    else if (word === "queued") queued += 1;
    else if (word === "failed") failed += 1;
  };
  if (data.queue.some((item) => item.status)) {
    for (const item of data.queue) tally(item.status);
  } else if (entries().some((e) => Array.isArray(e.downloads))) {
    for (const entry of entries()) for (const task of downloadsOf(entry)) tally(task.status);
  } else {
    for (const item of data.queue) tally(queueStatus(item));
    for (const p of data.progress.values()) if (p.state === "failed") failed += 1;
  }
  return { running, queued, failed };
}

pages.overview = {
  frame: () => '<h1>Overview</h1><div data-region="cards" class="cards"></div>' +
    '<h2>Replicas</h2><div data-region="replicas"></div>',
  update() {
    const all = entries();
    const byHealth = { ok: 0, pulling: 0, failing: 0, error: 0 };
    for (const entry of all) byHealth[health(entry)] += 1;
    const declared = new Set();
    for (const entry of all) for (const m of entry.models || []) declared.add(normalized(m));
    const c = counts();
    const s = data.summary || {};
    const cycle = s.lastCycle || s.cycle || null;
    // The cluster's view first: read at every refresh (the summary arrives with the stream's
    // heartbeat only), and the leader's registry entry says how long its last cycle took.
    const snapshotAge = data.cluster && data.cluster.snapshot ? data.cluster.snapshot.age : null;
    const leaderEntry = data.cluster && Array.isArray(data.cluster.replicas)
      ? data.cluster.replicas.find((r) => r.instance === data.cluster.leader) : null;
    const took = leaderEntry && typeof leaderEntry.cycleSeconds === "number"
      ? leaderEntry.cycleSeconds : cycle ? cycle.durationSeconds : null;
    const cycleText = typeof snapshotAge === "number"
      ? "confirmed by the leader " + esc(duration(snapshotAge)) + " ago" +
        (typeof took === "number" ? ", took " + esc(seconds(took)) : "")
      : cycle
      ? esc(age(cycle.at)) + (typeof took === "number" ? ", took " + esc(seconds(took)) : "")
      : "snapshot read " + esc(duration((Date.now() - data.fetchedAt) / 1000)) + " ago";
    region("cards",
      '<section class="card"><h2>Backends</h2><p class="big" id="ov-backends">' + all.length +
      "</p><dl>" +
      Object.entries(byHealth).map(([word, n]) =>
        '<dt><span class="pill ' + word + '">' + word + '</span></dt><dd id="ov-health-' + word +
        '">' + n + "</dd>").join("") + "</dl></section>" +
      '<section class="card"><h2>Models declared</h2><p class="big" id="ov-models">' +
      declared.size + "</p></section>" +
      '<section class="card"><h2>Pulls</h2><dl>' +
      '<dt>running</dt><dd id="ov-running">' + c.running + "</dd>" +
      '<dt>queued</dt><dd id="ov-queued">' + c.queued + "</dd>" +
      '<dt>failed</dt><dd id="ov-failed">' + c.failed + "</dd></dl></section>" +
      '<section class="card"><h2>Last cycle</h2><p id="ov-cycle">' + cycleText + "</p></section>");
    const cluster = data.cluster;
    if (!cluster) {
      region("replicas", "<p>One replica (this service).</p>");
      return;
    }
    const replicas = Array.isArray(cluster.replicas) ? cluster.replicas : [];
    const leader = cluster.leader && (cluster.leader.id || cluster.leader.instance || cluster.leader);
    region("replicas", "<table><thead><tr><th scope=\"col\">replica</th><th scope=\"col\">role</th>" +
      '<th scope="col">alive</th><th scope="col">last seen</th></tr></thead><tbody>' +
      replicas.map((r) => {
        const id = r.id || r.instance || r.name;
        return "<tr><td>" + esc(id) + "</td><td>" + (id === leader ? "leader" : "replica") +
          "</td><td>" + (r.alive === false ? "no" : "yes") + "</td><td>" +
          esc(typeof r.heartbeatAge === "number" ? duration(r.heartbeatAge) + " ago"
            : age(r.lastSeen || r.heartbeatAt)) + "</td></tr>";
      }).join("") + "</tbody></table>");
  },
};

// A page draws at most this many rows (filter or "show more" for the rest): a table of 1,000
// backends costs the browser far more to lay out than the data costs to compute.
const ROW_STEP = 200;
const shown = { backends: ROW_STEP, matrix: ROW_STEP };

function moreRows(page, total) {
  if (total <= shown[page]) return "";
  return '<p class="hint">' + shown[page] + " of " + total + ' shown; filter to narrow. ' +
    '<button type="button" data-more="' + page + '" data-key="more-' + page + '">Show ' +
    Math.min(ROW_STEP, total - shown[page]) + " more</button></p>";
}

document.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-more]");
  if (!button) return;
  shown[button.dataset.more] += ROW_STEP;
  redraw();
});

const backendSort = { key: "name", dir: 1 };
pages.backends = {
  frame: () => "<h1>Backends</h1>" +
    '<p><label for="backend-filter">Filter</label> <input id="backend-filter" type="search" ' +
    'placeholder="name, type, URL or status"></p><div class="scroll" data-region="table"></div>',
  bind() {
    document.getElementById("backend-filter").addEventListener("input", () => redraw());
    document.getElementById("page").addEventListener("click", (event) => {
      const button = event.target.closest("button[data-sort]");
      if (!button) return;
      const key = button.dataset.sort;
      backendSort.dir = backendSort.key === key ? -backendSort.dir : 1;
      backendSort.key = key;
      redraw();
    });
  },
  update() {
    const filter = (document.getElementById("backend-filter").value || "").toLowerCase();
    const rows = entries().map((entry) => {
      const present = presentNames(entry);
      const declared = entry.models || [];
      const presentSet = new Set(present.map(normalized));
      return {
        entry, name: entry.name, type: entry.backend ? entry.backend.type : "",
        url: entry.backend ? entry.backend.baseUrl : "", health: health(entry),
        error: entry.error || "",
        declared: declared.length,
        present: declared.filter((m) => presentSet.has(normalized(m))).length,
        drift: (entry.undeclaredModels || []).join(", "),
        // Sorted as a number; a backend that reports none sorts last.
        latency: typeof entry.latencySeconds === "number" ? entry.latencySeconds : Infinity,
      };
    }).filter((row) => !filter ||
      [row.name, row.type, row.url, row.health, row.error].join(" ").toLowerCase().includes(filter));
    const k = backendSort.key;
    rows.sort((a, b) => (a[k] > b[k] ? 1 : a[k] < b[k] ? -1 : 0) * backendSort.dir);
    const head = [["name", "name"], ["type", "type"], ["url", "URL"], ["health", "health"],
      ["error", "error"], ["present", "models present / declared"], ["drift", "drift"],
      ["latency", "latency"]].map(([key, label]) => {
      const sorted = backendSort.key === key
        ? (backendSort.dir > 0 ? "ascending" : "descending") : "none";
      return '<th scope="col" aria-sort="' + sorted + '"><button type="button" data-sort="' + key +
        '" data-key="sort-' + key + '">' + esc(label) + "</button></th>";
    }).join("");
    region("table", '<table id="backends"><thead><tr>' + head + "</tr></thead><tbody>" +
      rows.slice(0, shown.backends).map((row) => '<tr data-backend="' + esc(row.name) + '"><th scope="row"><a href="#/backend/' +
        encodeURIComponent(row.entry.id) + '" data-key="b-' + esc(row.entry.id) + '">' +
        esc(row.name) + "</a></th><td>" + esc(row.type) + "</td><td class=\"url\">" + esc(row.url) +
        '</td><td><span class="pill ' + row.health + '">' + row.health + "</span></td><td class=\"err\">" +
        esc(row.error) + "</td><td>" + row.present + " / " + row.declared + "</td><td>" +
        esc(row.drift) + '</td><td class="latency" title="observed ' +
        esc(row.entry.observedAt ? age(row.entry.observedAt) : "?") + '">' +
        esc(seconds(row.latency)) + "</td></tr>").join("") + "</tbody></table>" +
      (rows.length ? moreRows("backends", rows.length) : "<p>No backend matches.</p>"));
  },
};

pages.backend = {
  frame: (id) => '<p><a href="#/backends">Backends</a></p><div data-region="detail"></div>' +
    '<h2>Remove</h2><form id="remove-backend" data-action="remove-backend" novalidate>' +
    '<input type="hidden" name="id" value="' + esc(id) + '">' +
    '<p class="error" role="alert" data-error hidden></p>' +
    '<button type="submit" class="danger">Remove this backend</button></form>',
  bind: bindForms,
  update(id) {
    const entry = entries().find((e) => e.id === id);
    if (!entry) {
      region("detail", "<h1>Backend not found</h1><p>No managed backend has the id " + esc(id) + ".</p>");
      return;
    }
    const models = new Set([...(entry.models || []), ...presentNames(entry)].map(normalized));
    const history = historyOf(entry.id);
    let errors;
    if (history.failed) errors = '<p class="error">' + esc(history.failed) + "</p>";
    else if (history.errors === null) errors = "<p>Reading the history...</p>";
    else if (!history.errors.length) errors = '<p id="history-none">No error recorded.</p>';
    else {
      errors = '<ol id="history">' + history.errors.map((item) => '<li data-error="' +
        esc(item.error) + '"><time datetime="' + esc(item.at || "") + '">' + esc(clockTime(item.at)) +
        "</time> " + (item.error ? esc(item.error) : '<span class="pill ok">recovered</span>') +
        "</li>").join("") + "</ol>";
    }
    region("detail", "<h1>" + esc(entry.name) + "</h1><dl class=\"facts\">" +
      "<dt>type</dt><dd>" + esc(entry.backend.type) + "</dd><dt>URL</dt><dd>" +
      esc(entry.backend.baseUrl) + "</dd><dt>health</dt><dd><span class=\"pill " + health(entry) +
      '">' + health(entry) + "</span></dd><dt>error</dt><dd class=\"err\">" +
      esc(entry.error || "none") + "</dd><dt>in this state since</dt><dd>" +
      esc(entry.observedAt ? age(entry.observedAt) : "?") + "; that observation took " +
      esc(seconds(entry.latencySeconds)) +
      "</dd></dl><h2>Models</h2><ul>" +
      [...models].sort().map((m) => "<li>" + esc(m) + ": " + cellText(cellStatus(entry, m)) +
        "</li>").join("") + "</ul><h2>History of errors</h2>" + errors);
  },
};

function cellText(cell) {
  switch (cell.word) {
    case "pulling": return "pulling" + (cell.percent === null || cell.percent === undefined ? "" : " " + cell.percent + " %");
    case "failed": return "failed" + (cell.attempts ? " after " + cell.attempts + " attempts" : "") +
      (cell.reason ? ": " + cell.reason : "") + (cell.next ? "; next try " + new Date(cell.next).toLocaleTimeString() : "");
    case "none": return "not declared here";
    case "unreachable": return "backend unreachable: " + cell.reason;
    default: return cell.word;
  }
}

pages.matrix = {
  frame: () => "<h1>Models on backends</h1><p>One row per managed backend, one column per " +
    "model. A cell says why a model is or is not on that backend.</p>" +
    '<p><label for="matrix-filter">Filter backends</label> <input id="matrix-filter" type="search"></p>' +
    '<div class="scroll" data-region="matrix"></div>',
  bind() {
    document.getElementById("matrix-filter").addEventListener("input", () => redraw());
  },
  update() {
    const filter = (document.getElementById("matrix-filter").value || "").toLowerCase();
    const models = new Set();
    for (const entry of entries()) {
      for (const m of entry.models || []) models.add(normalized(m));
      for (const m of presentNames(entry)) models.add(normalized(m));
    }
    const columns = [...models].sort();
    const rows = entries().filter((e) => !filter || e.name.toLowerCase().includes(filter));
    region("matrix", '<table id="matrix" class="matrix"><thead><tr><th scope="col">backend</th>' +
      columns.map((m) => '<th scope="col">' + esc(m) + "</th>").join("") + "</tr></thead><tbody>" +
      rows.slice(0, shown.matrix).map((entry) => '<tr><th scope="row"><a href="#/backend/' + encodeURIComponent(entry.id) +
        '">' + esc(entry.name) + "</a>" + (entry.error ? ' <span class="pill error" title="' +
        esc(entry.error) + '">error</span>' : "") + "</th>" +
        columns.map((m) => {
          const cell = cellStatus(entry, m);
          return '<td class="cell ' + cell.word + '" data-backend="' + esc(entry.name) +
            '" data-model="' + esc(m) + '" data-status="' + cell.word + '" title="' +
            esc(cellText(cell)) + '">' + esc(cellText(cell)) + "</td>";
        }).join("") + "</tr>").join("") + "</tbody></table>" + moreRows("matrix", rows.length));
  },
};

function downloadRows() {
  const rows = new Map();
  const name = new Map(entries().map((e) => [urlKey(e.backend && e.backend.baseUrl), e]));
  const add = (url, model, fill) => {
    const key = urlKey(url) + "|" + model;
    const row = rows.get(key) || { url, model, entry: name.get(urlKey(url)) || null };
    Object.assign(row, fill);
    rows.set(key, row);
  };
  for (const item of data.queue) {
    add(item.url, item.model, {
      status: queueStatus(item), attempts: item.attempts, reason: item.lastError || undefined,
      next: item.nextAttemptAt, total: item.total, completed: item.completed,
    });
  }
  for (const entry of entries()) {
    for (const task of downloadsOf(entry)) {
      add(entry.backend.baseUrl, task.model, {
        status: task.status, attempts: task.attempts, reason: task.lastError,
        next: task.nextAttemptAt, total: task.total, completed: task.completed,
      });
    }
  }
  for (const p of data.progress.values()) {
    if (p.state === "done") continue;
    // A failure seen on the stream is older than what the queue says of the same pull now (it
    // may have been retried since); it stands only for a pull the queue does not list.
    if (p.state === "failed" && rows.has(urlKey(p.url) + "|" + p.model)) continue;
    add(p.url, p.model, { live: p, status: p.state === "failed" ? "failed" : "running",
      reason: p.state === "failed" ? p.status : undefined });
  }
  return [...rows.values()].sort((a, b) => (a.url + a.model < b.url + b.model ? -1 : 1));
}

pages.downloads = {
  frame: () => "<h1>Downloads</h1><div data-region=\"list\"></div>",
  bind() {
    document.getElementById("page").addEventListener("click", async (event) => {
      const button = event.target.closest("button[data-act]");
      if (!button) return;
      const out = button.closest("li").querySelector("[data-error]");
      out.hidden = true;
      button.disabled = true;
      try {
        if (button.dataset.act === "cancel") {
          await api("DELETE", "/queue/cancel?url=" + encodeURIComponent(button.dataset.url));
        } else {
          await api("POST", "/queue/retry", { url: button.dataset.url, model: button.dataset.model });
        }
        scheduleRefresh(200);
      } catch (error) {
        out.textContent = error.message;
        out.hidden = false;
      } finally {
        button.disabled = false;
      }
    });
  },
  update() {
    const rows = downloadRows();
    if (!rows.length) {
      const c = counts();
      region("list", '<p id="downloads-idle">No pull running; ' + c.queued + " queued, " + c.failed +
        " failed.</p>");
      return;
    }
    region("list", '<ul class="downloads">' + rows.map((row) => {
      const who = row.entry ? row.entry.name : row.url;
      const liveRow = row.live;
      const total = liveRow ? liveRow.total : row.total;
      const done = liveRow ? liveRow.completed : row.completed;
      let detail = "";
      if (row.status === "running") {
        detail = total ? bytes(done) + " of " + bytes(total) : "starting";
        if (liveRow && liveRow.speed()) detail += " · " + bytes(liveRow.speed()) + "/s";
        if (liveRow && liveRow.eta() !== null) detail += " · " + duration(liveRow.eta()) + " left";
      } else if (row.status === "failed") {
        detail = "failed" + (row.attempts ? " after " + row.attempts + " attempts" : "") +
          (row.reason ? ": " + row.reason : "") +
          (row.next ? "; next try " + new Date(row.next).toLocaleTimeString() : "");
      } else {
        detail = row.status;
      }
      const id = "dl-" + who + "-" + row.model;
      // A running pull of unknown size keeps the indeterminate bar; anything else is still.
      const value = row.status === "running" ? (total ? done || 0 : null) : 0;
      const bar = '<progress id="' + esc(id) + '" max="' + (total || 1) + '"' +
        (value === null ? "" : ' value="' + value + '"') +
        ' aria-label="' + esc(row.model + " on " + who) + '"></progress>';
      const actions = (row.status === "running" || row.status === "queued"
        ? '<button type="button" data-act="cancel" data-key="cancel-' + esc(id) + '" data-url="' +
          esc(row.url) + '" data-model="' + esc(row.model) + '">Cancel</button>' : "") +
        (FEATURES.has("retry") && (row.status === "failed" || row.status === "cancelled")
          ? '<button type="button" data-act="retry" data-key="retry-' + esc(id) + '" data-url="' +
            esc(row.url) + '" data-model="' + esc(row.model) + '">Retry</button>' : "");
      return '<li class="download ' + esc(row.status) + '" data-backend="' + esc(who) +
        '" data-model="' + esc(row.model) + '"><p><strong>' + esc(row.model) + "</strong> on " +
        esc(who) + "</p>" + bar + '<p class="detail">' + esc(detail) + "</p>" + actions +
        '<p class="error" role="alert" data-error hidden></p></li>';
    }).join("") + "</ul>");
  },
};

pages.plan = {
  frame: () => "<h1>Plan</h1><p>What the next cycle would pull and delete.</p>" +
    '<div class="scroll" data-region="plan"></div>',
  update() {
    if (!Array.isArray(data.plan)) {
      region("plan", "<p>Reading the plan...</p>");
      if (data.plan === null) {
        data.plan = "loading";
        api("GET", "/state/plan").then((plan) => { data.plan = plan; redraw(); })
          .catch((error) => { data.plan = null; showPageError(error.message); });
      }
      return;
    }
    const rows = data.plan.map((item) => {
      const actions = item.actions || [];
      const pulls = actions.filter((a) => a.kind === "pull").map((a) => a.model);
      const deletes = actions.filter((a) => a.kind === "delete").map((a) => a.model);
      return "<tr><th scope=\"row\">" + esc(item.backendName) + "</th><td>" + esc(pulls.join(", ") || "-") +
        "</td><td>" + esc(deletes.join(", ") || "-") + "</td><td class=\"err\">" +
        esc((item.state && item.state.error) || "") + "</td></tr>";
    });
    region("plan", '<table id="plan"><thead><tr><th scope="col">backend</th><th scope="col">pull</th>' +
      '<th scope="col">delete</th><th scope="col">error</th></tr></thead><tbody>' + rows.join("") +
      "</tbody></table>");
  },
};

pages.providers = {
  frame: () => "<h1>Providers</h1><div class=\"scroll\" data-region=\"providers\"></div>" +
    "<h2>Backends</h2><p>Observed health, and what this replica's gateway has seen of each " +
    "backend's traffic: a backend that keeps failing cools down until the time shown.</p>" +
    "<div class=\"scroll\" data-region=\"health\"></div>",
  update() {
    if (!data.providers) {
      region("providers", "<p>Reading providers...</p>");
      if (!data.providersLoading) {
        data.providersLoading = true;
        readProviders().then((p) => { data.providers = p; redraw(); })
          .catch((error) => showPageError(error.message))
          .finally(() => { data.providersLoading = false; });
      }
      return;
    }
    const keys = new Map((data.providers.configs || []).map((c) => [c.Type, c.APIKey]));
    region("providers", '<table id="providers"><thead><tr><th scope="col">provider</th>' +
      '<th scope="col">key</th><th scope="col">backends</th><th scope="col">healthy</th>' +
      '<th scope="col">models</th><th scope="col">error</th></tr>' +
      "</thead><tbody>" + data.providers.statuses.map((s) => "<tr><th scope=\"row\">" + esc(s.type) +
        "</th><td><code>" + esc(keys.get(s.type) || (s.configured ? "set" : "not set")) + "</code></td><td>" +
        s.backends + "</td><td>" + s.healthy + "</td><td>" + s.models + "</td><td class=\"err\">" +
        esc(s.error || "") + "</td></tr>").join("") + "</tbody></table>");
    const rows = data.providers.health;
    if (!Array.isArray(rows)) {
      region("health", "<p>This service does not report backend health.</p>");
      return;
    }
    region("health", rows.length ? '<table id="backend-health"><thead><tr><th scope="col">backend</th>' +
      '<th scope="col">type</th><th scope="col">health</th><th scope="col">in flight</th>' +
      '<th scope="col">latency</th><th scope="col">cooldown until</th><th scope="col">error</th>' +
      "</tr></thead><tbody>" + rows.map((b) => {
        const r = b.routing || {};
        const cooling = r.coolingUntil ? '<span class="pill failing">' + esc(clockTime(r.coolingUntil)) +
          "</span>" : "-";
        return '<tr data-backend="' + esc(b.name) + '"><th scope="row">' + esc(b.name) + "</th><td>" +
          esc(b.type) + '</td><td><span class="pill ' + esc(b.status) + '">' + esc(b.status) +
          "</span></td><td>" + esc(r.inFlight ?? "-") + "</td><td>" + esc(seconds(r.latencySeconds)) +
          '</td><td class="cooldown">' + cooling + '</td><td class="err">' +
          esc(b.error || r.lastError || "") + "</td></tr>";
      }).join("") + "</tbody></table>" : "<p>No backend is observed yet.</p>");
  },
};

pages.actions = {
  frame: () => "<h1>Actions</h1>" +
    '<section class="card"><h2>Sync now</h2><form data-action="sync" novalidate>' +
    '<p class="error" role="alert" data-error hidden></p><p class="ok" role="status" data-ok hidden></p>' +
    '<button type="submit">Run a cycle now</button></form></section>' +
    '<section class="card"><h2>Declare a model</h2><form id="declare-model" data-action="declare-model" novalidate>' +
    '<label for="m-model">Model</label><input id="m-model" name="model" placeholder="llama3.2:1b">' +
    '<label for="m-context">Context length</label><input id="m-context" name="contextLength" inputmode="numeric" value="8192">' +
    '<fieldset><legend>Capabilities</legend>' +
    ["canChat", "canPrompt", "canStream", "canEmbed"].map((c) => '<label><input type="checkbox" name="' + c +
      '"> ' + c.slice(3).toLowerCase() + "</label>").join(" ") + "</fieldset>" +
    '<p class="error" role="alert" data-error hidden></p><p class="ok" role="status" data-ok hidden></p>' +
    '<button type="submit">Declare</button></form></section>' +
    '<section class="card"><h2>Remove a model</h2><form id="remove-model" data-action="remove-model" novalidate>' +
    '<label for="r-model">Model</label><input id="r-model" name="model">' +
    '<p class="error" role="alert" data-error hidden></p><p class="ok" role="status" data-ok hidden></p>' +
    '<button type="submit" class="danger">Remove</button></form></section>' +
    '<section class="card"><h2>Add a backend</h2><form id="add-backend" data-action="add-backend" novalidate>' +
    '<label for="b-name">Name</label><input id="b-name" name="name">' +
    '<label for="b-url">Base URL</label><input id="b-url" name="baseUrl" placeholder="http://host:11434">' +
    '<label for="b-type">Type</label><select id="b-type" name="type"><option>ollama</option>' +
    "<option>vllm</option><option>openai</option><option>gemini</option></select>" +
    '<p class="error" role="alert" data-error hidden></p><p class="ok" role="status" data-ok hidden></p>' +
    '<button type="submit">Add</button></form></section>' +
    '<section class="card"><h2>Remove a backend</h2><form data-action="remove-backend" novalidate>' +
    '<label for="rb-id">Backend</label><select id="rb-id" name="id" data-region="backend-options"></select>' +
    '<p class="error" role="alert" data-error hidden></p><p class="ok" role="status" data-ok hidden></p>' +
    '<button type="submit" class="danger">Remove</button></form></section>',
  bind: bindForms,
  update() {
    const select = document.getElementById("rb-id");
    const chosen = select.value;
    select.innerHTML = entries().map((e) => '<option value="' + esc(e.id) + '">' + esc(e.name) +
      "</option>").join("");
    if (chosen) select.value = chosen;
  },
};

const actions = {
  sync: () => api("POST", "/state/sync").then(() => "cycle done"),
  "declare-model": (form) => api("POST", "/models", {
    model: form.model.value,
    contextLength: form.contextLength.value === "" ? null : Number(form.contextLength.value),
    canChat: form.canChat.checked, canPrompt: form.canPrompt.checked,
    canStream: form.canStream.checked, canEmbed: form.canEmbed.checked,
  }).then((m) => "declared " + m.model),
  "remove-model": (form) => api("DELETE", "/models/" + encodeURIComponent(form.model.value))
    .then(() => "removed " + form.model.value),
  "add-backend": (form) => api("POST", "/backends", {
    name: form.name.value, baseUrl: form.baseUrl.value, type: form.type.value,
  }).then((b) => "added " + b.name),
  "remove-backend": (form) => api("DELETE", "/backends/" + encodeURIComponent(form.id.value))
    .then(() => { if (currentPage().name === "backend") window.location.hash = "#/backends"; return "removed"; }),
};

function bindForms() {
  for (const form of document.querySelectorAll("form[data-action]")) {
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const error = form.querySelector("[data-error]");
      const ok = form.querySelector("[data-ok]");
      for (const input of form.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
      error.hidden = true;
      if (ok) ok.hidden = true;
      const button = form.querySelector("button[type=submit]");
      button.disabled = true;
      try {
        const message = await actions[form.dataset.action](form);
        if (ok) {
          ok.textContent = message;
          ok.hidden = false;
        }
        scheduleRefresh(100);
      } catch (failure) {
        error.textContent = failure.message;
        error.hidden = false;
        const field = failure.field && form.querySelector('[name="' + CSS.escape(failure.field) + '"]');
        if (field) {
          field.setAttribute("aria-invalid", "true");
          field.setAttribute("aria-describedby", "");
          field.focus();
        }
      } finally {
        button.disabled = false;
      }
    });
  }
}

// ---- theme ---------------------------------------------------------------------------------
function applyTheme(theme) {
  const button = document.getElementById("theme");
  if (theme) document.documentElement.dataset.theme = theme;
  const dark = theme ? theme === "dark" : window.matchMedia("(prefers-color-scheme: dark)").matches;
  button.setAttribute("aria-pressed", dark ? "true" : "false");
}

document.getElementById("theme").addEventListener("click", () => {
  const dark = document.getElementById("theme").getAttribute("aria-pressed") === "true";
  const theme = dark ? "light" : "dark";
  try { localStorage.setItem("runtimestate-theme", theme); } catch (_) { /* private mode */ }
  applyTheme(theme);
});

window.addEventListener("hashchange", () => {
  data.plan = null;
  data.providers = null;
  redraw();
  const heading = document.querySelector("main h1");
  document.getElementById("main").focus();
  if (heading) heading.scrollIntoView();
  refresh();
});

let savedTheme = null;
try { savedTheme = localStorage.getItem("runtimestate-theme"); } catch (_) { /* private mode */ }
applyTheme(savedTheme);
redraw();
refresh();
openStream();
