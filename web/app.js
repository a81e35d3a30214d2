// k3sense live page: one WebSocket to /ws, a snapshot first, then readings, availability,
// the gateway's broker link, the sensor's own health, and sensors the gateway forgot.
// No build step, no dependencies: what is here is what runs.
"use strict";

const HOUR_MS = 60 * 60 * 1000;
const CHART_SPAN_MS = HOUR_MS;             // the chart shows the last hour until asked for more
const DEFAULT_INTERVAL_MS = 10 * 1000;     // until two readings tell the real interval
const STALE_INTERVALS = 3;                 // no reading for three intervals: stale
const HISTORY_LIMIT = 3600;                // an hour at the fastest rate a DHT11 allows
const SKEW_SAMPLES = 10;                   // live readings used to estimate the publisher's clock offset
// The chart's ranges; `all` is everything the gateway keeps (its --history, 24 h at 10 s).
const RANGES = { "1h": HOUR_MS, "6h": 6 * HOUR_MS, "24h": 24 * HOUR_MS, "all": Infinity };
// What to check, by the reason a publisher gives for a sensor that stopped answering.
const HEALTH_HINTS = {
  no_response: "check wiring/pull-up",
  timeout: "check wiring/pull-up",
  short_frame: "check the pull-up and cable length",
  pulse_width: "check the pull-up and cable length",
  checksum: "noise on the line: shorter cable, stronger pull-up",
  implausible: "the sensor sends impossible values: replace it",
  driver: "the kernel driver fails every read: run k3sense check",
  unconfirmed: "reads disagree: noisy line or a failing sensor",
};

// sensor_id -> { card, status, health, latest, history: [], skews: [], range, loaded }
const sensors = new Map();
let backoffMs = 500;

function $(root, selector) { return root.querySelector(selector); }

function setConnection(state, text) {
  const el = document.getElementById("connection");
  el.dataset.state = state;
  document.getElementById("connection-text").textContent = text;
}

function sensorFor(id) {
  let s = sensors.get(id);
  if (s) return s;
  const card = document.getElementById("sensor-card").content.firstElementChild.cloneNode(true);
  card.dataset.sensor = id;
  $(card, ".sensor-id").textContent = id;
  s = { card, status: "unknown", health: null, latest: null, history: [], skews: [], range: "1h", loaded: CHART_SPAN_MS };
  for (const button of card.querySelectorAll(".ranges button")) {
    button.addEventListener("click", () => chooseRange(s, button.dataset.range));
  }
  sensors.set(id, s);
  const list = document.getElementById("sensors");
  const after = [...list.children].find((c) => c.dataset.sensor > id);
  list.insertBefore(card, after || null);
  document.getElementById("empty").hidden = true;
  return s;
}

// The gateway forgot the sensor (gone longer than its --forget-after): its card goes. A newer
// reading brings it back as a new card.
function forget(id) {
  const s = sensors.get(id);
  if (!s) return;
  s.card.remove();
  sensors.delete(id);
  document.getElementById("empty").hidden = sensors.size > 0;
}

function key(r) { return [Date.parse(r.read_at), r.seq]; }
function before(a, b) { const [ta, sa] = key(a), [tb, sb] = key(b); return ta < tb || (ta === tb && sa < sb); }

function addReading(s, r) {
  const h = s.history;
  let i = h.length;
  while (i > 0 && before(r, h[i - 1])) i--;
  if (i > 0 && h[i - 1].seq === r.seq && h[i - 1].read_at === r.read_at) return;
  h.splice(i, 0, r);
  // Keep what the widest range asked for so far needs (everything, once `all` was chosen).
  const cutoff = Date.now() - skewOf(s) - s.loaded;
  while (h.length > 1 && Date.parse(h[0].read_at) < cutoff) h.shift();
  if (!s.latest || !before(r, s.latest)) s.latest = r;
  // A reading taken after the sensor was said to stop answering means it answers again (the
  // publisher says `ok` first, but a page that missed that message must not stay stuck).
  if (s.health && s.health.status !== "ok" && Date.parse(r.read_at) > Date.parse(s.health.since)) {
    s.health = { ...s.health, status: "ok", reason: undefined };
  }
}

function intervalOf(s) {
  const h = s.history;
  if (h.length < 2) return DEFAULT_INTERVAL_MS;
  const gaps = [];
  for (let i = Math.max(1, h.length - 6); i < h.length; i++) {
    gaps.push(Date.parse(h[i].read_at) - Date.parse(h[i - 1].read_at));
  }
  gaps.sort((a, b) => a - b);
  return Math.max(1000, gaps[Math.floor(gaps.length / 2)]);
}

// The publisher's clock (read_at) and this browser's may disagree, a Pi without a real-time
// clock by minutes. The smallest (arrival - read_at) of the last live readings estimates the
// offset plus the delivery time; subtracting it keeps "updated N s ago" and `stale` honest.
function noteArrival(s, r) {
  s.skews.push(Date.now() - Date.parse(r.read_at));
  if (s.skews.length > SKEW_SAMPLES) s.skews.shift();
}

function skewOf(s) { return s.skews.length ? Math.min(...s.skews) : 0; }

// Milliseconds since the reading was taken, on this browser's clock.
function ageOf(s, r) { return Math.max(0, Date.now() - Date.parse(r.read_at) - skewOf(s)); }

function displayedStatus(s) {
  if (s.status === "offline") return "offline";
  if (s.health && s.health.status === "not_answering") return "not_answering";
  if (!s.latest) return "waiting";
  return ageOf(s, s.latest) > STALE_INTERVALS * intervalOf(s) ? "stale" : "live";
}

function ago(ms) {
  const s = Math.max(0, Math.round(ms / 1000));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s ago`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min ago`;
}

function clock(iso) {
  return new Date(iso).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", hourCycle: "h23" });
}

// "sensor not answering since 14:02 — check wiring/pull-up", and the counted reasons, so a
// user can tell wiring (no_response every time) from noise (a few checksum errors).
function healthText(h) {
  const hint = HEALTH_HINTS[h.reason] || "see the publisher's log";
  return `sensor not answering since ${clock(h.since)} — ${hint}`;
}

function errorsText(h) {
  const entries = Object.entries(h.errors || {}).sort((a, b) => b[1] - a[1]);
  const counted = entries.map(([k, n]) => `${k.replace("_", " ")} ${n}`).join(", ");
  return `${h.reason ? `reason: ${h.reason.replace("_", " ")}` : ""}${counted ? ` · failed reads: ${counted}` : ""}`;
}

function render(s) {
  const c = s.card;
  const status = displayedStatus(s);
  c.dataset.status = status;
  $(c, ".badge-text").textContent = status.replace("_", " ");
  const health = $(c, ".health");
  if (status === "not_answering") {
    health.hidden = false;
    $(health, ".health-text").textContent = healthText(s.health);
    $(health, ".health-errors").textContent = errorsText(s.health);
    health.title = `since ${s.health.since}`;
  } else {
    health.hidden = true;
  }
  if (s.latest) {
    const r = s.latest;
    $(c, ".temperature .number").textContent = r.temperature_c.toFixed(1);
    $(c, ".humidity .number").textContent = r.humidity_pct.toFixed(1);
    $(c, ".age").textContent = `updated ${ago(ageOf(s, r))}`;
    $(c, ".age").title = r.read_at;
    $(c, ".model").textContent = r.model;
    $(c, ".seq").textContent = `#${r.seq}`;
  }
  drawChart(s);
}

function spanLabel(ms) {
  if (ms < HOUR_MS) return `${Math.max(1, Math.round(ms / 60000))} min`;
  const h = ms / HOUR_MS;
  return Number.isInteger(h) ? `${h} h` : `${h.toFixed(1)} h`;
}

function drawChart(s) {
  const now = Date.now() - skewOf(s);     // on the publisher's clock, like read_at
  let span = RANGES[s.range] || CHART_SPAN_MS;
  if (span === Infinity) {
    span = s.history.length ? Math.max(60000, now - Date.parse(s.history[0].read_at)) : CHART_SPAN_MS;
  }
  const points = s.history.filter((r) => now - Date.parse(r.read_at) <= span);
  const xOf = (at) => 300 * (1 - (now - at) / span);
  const line = (field, el, rangeEl, unit) => {
    if (points.length === 0) { el.setAttribute("points", ""); rangeEl.textContent = ""; return; }
    let lo = Math.min(...points.map((r) => r[field])), hi = Math.max(...points.map((r) => r[field]));
    rangeEl.textContent = lo === hi ? `${lo.toFixed(1)} ${unit}` : `${lo.toFixed(1)}–${hi.toFixed(1)} ${unit}`;
    if (hi - lo < 1) { const mid = (hi + lo) / 2; lo = mid - 0.5; hi = mid + 0.5; }
    const xy = points.map((r) => {
      const x = xOf(Date.parse(r.read_at));
      const y = 95 - 90 * (r[field] - lo) / (hi - lo);
      return `${x.toFixed(1)},${y.toFixed(1)}`;
    });
    el.setAttribute("points", xy.join(" "));
  };
  const c = s.card;
  line("temperature_c", $(c, ".line-temperature"), $(c, ".range-temperature"), "°C");
  line("humidity_pct", $(c, ".line-humidity"), $(c, ".range-humidity"), "%");
  // Gaps: no reading for more than three intervals is shaded, so a stretch the line merely
  // bridges is not mistaken for a flat one.
  const gaps = $(c, ".gaps");
  gaps.replaceChildren();
  const limit = STALE_INTERVALS * intervalOf(s);
  const edges = points.map((r) => Date.parse(r.read_at));
  if (points.length && s.latest && ageOf(s, s.latest) > limit) edges.push(now);
  for (let i = 1; i < edges.length; i++) {
    if (edges[i] - edges[i - 1] <= limit) continue;
    const rect = document.createElementNS("http://www.w3.org/2000/svg", "rect");
    const x0 = Math.max(0, xOf(edges[i - 1])), x1 = xOf(edges[i]);
    rect.setAttribute("x", x0.toFixed(1));
    rect.setAttribute("y", "0");
    rect.setAttribute("width", Math.max(0.5, x1 - x0).toFixed(1));
    rect.setAttribute("height", "100");
    gaps.appendChild(rect);
  }
  $(c, ".axis-start").textContent = `${spanLabel(span)} ago`;
  $(c, ".axis-mid").textContent = spanLabel(span / 2);
  $(c, ".chart svg").setAttribute("aria-label", `Temperature and humidity over the last ${spanLabel(span)}`);
  for (const button of c.querySelectorAll(".ranges button")) {
    button.setAttribute("aria-pressed", String(button.dataset.range === s.range));
  }
}

// Shows another range; fetches what it needs from the gateway the first time.
function chooseRange(s, range) {
  if (!(range in RANGES)) return;
  s.range = range;
  const span = RANGES[range];
  if (span > s.loaded) {
    s.loaded = span;
    loadRange(s, span);
  }
  render(s);
}

async function loadRange(s, span) {
  const id = encodeURIComponent(s.card.dataset.sensor);
  const since = span === Infinity ? "" : `&since=${encodeURIComponent(new Date(Date.now() - skewOf(s) - span).toISOString())}`;
  try {
    const res = await fetch(`/api/sensors/${id}/history?limit=1000000${since}`);
    if (!res.ok) return;
    for (const r of await res.json()) addReading(s, r);
    render(s);
  } catch (e) {
    // The range shows what is held; choosing it again retries.
    s.loaded = CHART_SPAN_MS;
  }
}

// Fetches what the chart lacks: the last hour, or after a reconnect only what came after
// `newest`, the newest reading held before it, so a gateway restart does not make every page
// download an hour again.
async function loadHistory(s, newest) {
  const since = newest
    ? newest.read_at
    : new Date((s.latest ? Date.parse(s.latest.read_at) : Date.now()) - CHART_SPAN_MS).toISOString();
  const id = encodeURIComponent(s.card.dataset.sensor);
  try {
    const res = await fetch(`/api/sensors/${id}/history?limit=${HISTORY_LIMIT}&since=${encodeURIComponent(since)}`);
    if (!res.ok) return;
    for (const r of await res.json()) addReading(s, r);
    render(s);
  } catch (e) {
    // The live stream still works; the chart fills as readings arrive.
  }
}

// The gateway's link to the MQTT broker: while it is down the gateway keeps serving what it
// holds, and the page says so with a banner instead of going blank. The snapshot carries the
// link (a gateway older than that sends none: no banner), `broker` messages each change.
function showBroker(link) {
  const banner = document.getElementById("broker-banner");
  const down = !!link && link.status === "unreachable";
  banner.hidden = !down;
  banner.dataset.status = link ? link.status : "unknown";
  const at = link && Date.parse(link.since);
  $(banner, ".banner-since").textContent =
    down && !Number.isNaN(at) ? `(since ${new Date(at).toLocaleTimeString()})` : "";
}

function onMessage(event) {
  let m;
  try { m = JSON.parse(event.data); } catch (e) { return; }
  if (m.type === "snapshot") {
    showBroker(m.broker);
    // Sensors forgotten while this page was away are not in the snapshot.
    const known = new Set(m.sensors.map((entry) => entry.sensor_id));
    for (const id of [...sensors.keys()]) if (!known.has(id)) forget(id);
    for (const entry of m.sensors) {
      const s = sensorFor(entry.sensor_id);
      const held = s.history.length ? s.history[s.history.length - 1] : null;
      s.status = entry.status;
      if (entry.sensor_health) s.health = entry.sensor_health;
      if (entry.latest) addReading(s, entry.latest);
      render(s);
      loadHistory(s, held);
    }
  } else if (m.type === "reading") {
    const { type, ...r } = m;
    const s = sensorFor(r.sensor_id);
    noteArrival(s, r);
    addReading(s, r);
    render(s);
  } else if (m.type === "availability") {
    const s = sensorFor(m.sensor_id);
    s.status = m.status;
    render(s);
  } else if (m.type === "broker") {
    showBroker(m);
  } else if (m.type === "forgotten") {
    forget(m.sensor_id);
  } else if (m.type === "sensor") {
    const { type, ...h } = m;
    const s = sensorFor(h.sensor_id);
    s.health = h;
    render(s);
  }
}

function connect() {
  const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;
  const ws = new WebSocket(url);
  ws.onopen = () => { backoffMs = 500; setConnection("connected", "connected"); };
  ws.onmessage = onMessage;
  ws.onclose = (event) => {
    // Full jitter, so a restarted gateway is not hit by every browser at once.
    const delay = Math.round(backoffMs / 2 + Math.random() * backoffMs / 2);
    backoffMs = Math.min(backoffMs * 2, 15000);
    const why = event.code === 1001 ? "server restarting" : "disconnected";
    setConnection("disconnected", `${why} — reconnecting in ${Math.ceil(delay / 1000)} s`);
    setTimeout(connect, delay);
  };
}

setInterval(() => { for (const s of sensors.values()) render(s); }, 1000);
connect();
