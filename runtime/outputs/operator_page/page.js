"use strict";
const COUNTERS = [["frames", "inspected"], ["ng", "NG"], ["yield", "yield"], ["fps", "frames/s"], ["dropped", "dropped"], ["reconnects", "reconnects"]];
const PERIODS = [["since_start", "since start"], ["last_hour", "last hour"]];
const FRAME_EVERY_MS = 950;  // the live picture once a second (the verdict and counters twice): each costs the box an encode
const $ = (id) => document.getElementById(id);
const tiles = new Map();
let failures = 0;

function fmt(counter, value) {
  if (value === null || value === undefined) return "\u2014";
  if (counter === "yield") return value.toFixed(1) + " %";
  if (counter === "fps") return value.toFixed(1);
  return value.toLocaleString("en-US");
}
function num(value, digits) { return (value === null || value === undefined) ? "\u2014" : value.toFixed(digits); }
function short(label) {
  if (label.includes("://") || label.includes("!")) return label;
  const parts = label.replace(/\/+$/, "").split("/");
  return parts[parts.length - 1] || label;
}
function clock(iso) { return iso ? new Date(iso).toLocaleTimeString("en-GB") : ""; }

function buildCounters(table) {
  const head = table.createTHead().insertRow();
  head.appendChild(document.createElement("th"));
  for (const [, title] of PERIODS) { const th = document.createElement("th"); th.textContent = title; head.appendChild(th); }
  const body = table.createTBody();
  for (const [counter, title] of COUNTERS) {
    const row = body.insertRow();
    const th = document.createElement("th"); th.textContent = title; row.appendChild(th);
    for (const [period] of PERIODS) { const td = row.insertCell(); td.dataset.counter = counter; td.dataset.period = period; }
  }
}
function fillCounters(table, figures) {
  for (const td of table.querySelectorAll("td")) {
    const value = (figures[td.dataset.period] || {})[td.dataset.counter];
    const text = fmt(td.dataset.counter, value);
    if (td.textContent !== text) td.textContent = text;
    td.dataset.value = value === null || value === undefined ? "" : String(value);
    td.classList.toggle("bad", (td.dataset.counter === "ng" || td.dataset.counter === "dropped" || td.dataset.counter === "reconnects") && value > 0);
  }
}

function tileFor(source) {
  let tile = tiles.get(source.index);
  if (tile) return tile;
  const node = $("tile-template").content.firstElementChild.cloneNode(true);
  node.dataset.source = source.label;
  node.querySelector(".src").textContent = short(source.label);
  node.querySelector(".src").title = source.label;
  const table = node.querySelector(".counters");
  table.dataset.source = source.label;
  buildCounters(table);
  const img = node.querySelector(".live");
  img.addEventListener("load", () => { delete img.dataset.loading; document.body.dataset.frameWidth = img.naturalWidth; });
  img.addEventListener("error", () => { delete img.dataset.loading; img.dataset.version = ""; });
  $("tiles").appendChild(node);
  tile = {node, img, table};
  tiles.set(source.index, tile);
  return tile;
}

function renderTile(stats, source) {
  const tile = tileFor(source), node = tile.node, last = source.last;
  const box = node.querySelector(".verdict"), word = node.querySelector(".word"), sub = node.querySelector(".sub");
  const threshold = stats.threshold;
  let kind = "grey", text = "\u2026", detail = "waiting for frames";
  if (last) {
    const age = stats.now - last.time;
    if (last.verdict === "OK" || last.verdict === "NG") { kind = last.verdict.toLowerCase(); text = last.verdict; }
    else { text = "\u2014"; }
    detail = (stats.calibrated ? "" : "not calibrated \u00b7 ") + (age > 5 ? "last frame " + Math.round(age) + " s ago" : "frame " + last.name);
    box.classList.toggle("stale", age > 5);
  }
  box.className = box.className.replace(/\b(ok|ng|grey)\b/g, "").trim() + " " + kind;
  word.textContent = text; sub.textContent = detail;
  const trendMax = Math.max(0, ...source.trend.map((p) => p[2]));
  const score = last ? last.score : null;
  const scale = threshold ? 2 * threshold : Math.max(trendMax, score || 0, 1e-9) * 1.25;
  const fill = node.querySelector(".fill"), mark = node.querySelector(".mark");
  fill.style.width = (score === null ? 0 : Math.min(100, 100 * score / scale)) + "%";
  fill.className = "fill" + (!threshold ? " grey" : (score > threshold ? " over" : ""));
  mark.hidden = !threshold;
  if (threshold) mark.style.left = (100 * threshold / scale) + "%";
  const scoreText = node.querySelector(".score");
  scoreText.replaceChildren("score ", Object.assign(document.createElement("b"), {textContent: num(score, 2)}),
    threshold ? " \u00b7 threshold " + num(threshold, 2) : " \u00b7 no threshold");
  fillCounters(tile.table, source);
  drawTrend(node, source.trend, threshold);
  const now = Date.now();
  if (source.frame && tile.img.dataset.version !== String(source.frame) && !tile.img.dataset.loading &&
      !(now - (tile.fetched || 0) < FRAME_EVERY_MS)) {
    tile.fetched = now;
    tile.img.dataset.loading = "1";
    tile.img.dataset.version = String(source.frame);
    tile.img.src = "/frame/" + source.index + ".jpg?v=" + source.frame;
  }
}

function drawTrend(node, points, threshold) {
  const values = points.flatMap((p) => [p[1], p[2]]);
  if (threshold) values.push(threshold);
  const thr = node.querySelector(".thr");
  node.querySelector(".axis-thr").textContent = threshold ? "- - threshold " + threshold.toFixed(2) : "";
  if (!values.length) { for (const cls of [".band", ".maxline", ".okdots", ".ngdots"]) node.querySelector(cls).setAttribute("d", ""); thr.setAttribute("visibility", "hidden"); return; }
  let lo = Math.min(...values), hi = Math.max(...values);
  const pad = (hi - lo) * 0.1 || Math.abs(hi) * 0.1 || 1;
  lo -= pad; hi += pad;
  const x = (t) => (300 + t).toFixed(1), y = (v) => (100 - 100 * (v - lo) / (hi - lo)).toFixed(1);
  let line = "", band = "", okDots = "", ngDots = "", previous = null, run = [];
  const flush = () => {
    if (!run.length) return;
    band += "M" + run.map((p) => x(p[0]) + "," + y(p[2])).join("L") + "L" + run.slice().reverse().map((p) => x(p[0]) + "," + y(p[1])).join("L") + "Z";
    run = [];
  };
  for (const p of points) {
    const gap = previous === null || p[0] - previous > 2;
    if (gap) flush();
    line += (gap ? "M" : "L") + x(p[0]) + "," + y(p[2]);
    run.push(p);
    const dot = "M" + x(p[0]) + "," + y(p[2]) + "h0.01";
    if (p[3] > 0) ngDots += dot; else okDots += dot;
    previous = p[0];
  }
  flush();
  node.querySelector(".band").setAttribute("d", band);
  node.querySelector(".maxline").setAttribute("d", line);
  node.querySelector(".okdots").setAttribute("d", okDots);
  node.querySelector(".ngdots").setAttribute("d", ngDots);
  thr.setAttribute("visibility", threshold ? "visible" : "hidden");
  if (threshold) { thr.setAttribute("y1", y(threshold)); thr.setAttribute("y2", y(threshold)); }
}

function renderAlarms(stats) {
  const box = $("alarms"), have = new Map([...box.children].map((el) => [el.dataset.id, el]));
  for (const alarm of stats.alarms) {
    let el = have.get(alarm.id);
    if (!el) {
      el = document.createElement("div"); el.className = "banner alarm"; el.dataset.id = alarm.id;
      const title = document.createElement("b"); title.textContent = "\u26a0 " + alarm.kind.replace("-", " ") + (alarm.source ? " \u00b7 " + short(alarm.source) : "") + " \u00b7 since " + clock(alarm.raised_at);
      const message = document.createElement("span");
      alarm.message.split("`").forEach((part, i) => message.appendChild(i % 2 ? Object.assign(document.createElement("code"), {textContent: part}) : document.createTextNode(part)));
      el.append(title, message);
    }
    box.appendChild(el); have.delete(alarm.id);
  }
  for (const el of have.values()) el.remove();
  const cleared = stats.alarms_cleared.map((a) => a.id + " (" + clock(a.raised_at) + "\u2013" + clock(a.cleared_at) + ")");
  $("cleared").textContent = cleared.length ? "cleared: " + cleared.join(", ") : "";
  document.body.dataset.alarms = stats.alarms.map((a) => a.id).join(" ");
}

function renderNg(stats) {
  const strip = $("ng-strip"), have = new Map([...strip.querySelectorAll(".thumb")].map((el) => [el.dataset.id, el]));
  strip.querySelector(".empty")?.remove();
  for (const frame of stats.ng_frames) {
    let el = have.get(frame.id);
    if (!el) {
      el = document.createElement("figure"); el.className = "thumb"; el.dataset.id = frame.id; el.dataset.name = frame.name;
      const img = document.createElement("img"); img.src = "/ng/" + frame.id + ".jpg"; img.alt = "NG frame " + frame.name;
      const caption = document.createElement("figcaption");
      caption.textContent = clock(frame.iso) + " \u00b7 " + num(frame.score, 1) + (tiles.size > 1 ? " \u00b7 " + short(frame.source) : "");
      el.append(img, caption);
      el.addEventListener("click", () => openViewer(frame));
    }
    if (frame.label && el.dataset.label !== frame.label) {
      el.dataset.label = frame.label; el.classList.remove("good", "defect"); el.classList.add(frame.label);
      el.querySelector(".mark")?.remove();
      el.querySelector("figcaption").prepend(Object.assign(document.createElement("span"), {className: "mark", textContent: (frame.label === "good" ? "good part" : "defect") + " \u00b7 "}));
    }
    strip.appendChild(el); have.delete(frame.id);
  }
  for (const el of have.values()) el.remove();
  if (!stats.ng_frames.length && !strip.children.length) strip.appendChild(Object.assign(document.createElement("p"), {className: "empty", textContent: "none yet"}));
}

let viewed = null;
async function post(path, body) {
  const response = await fetch(path, {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  return [response.status, await response.json().catch(() => ({error: "HTTP " + response.status}))];
}
async function mark(label) {
  const state = $("mark-state");
  state.className = ""; state.textContent = "saving\u2026";
  const [status, answer] = await post("/label", {id: viewed.id, label: label});
  state.className = status === 200 ? "" : "failed";
  state.textContent = status === 200 ? "saved as " + (label === "good" ? "a good part" : "a defect") : answer.error;
  if (status === 200) setTimeout(() => $("viewer").close(), 400);
}
$("mark-good").addEventListener("click", () => mark("good"));
$("mark-defect").addEventListener("click", () => mark("defect"));
$("teach-button").addEventListener("click", async () => {
  $("teach-button").disabled = true;
  const [, answer] = await post("/teach", {});
  $("teach-state").textContent = answer.message || answer.error || "";
});

function renderTeach(stats) {
  const teach = $("teach"), labels = stats.labels, state = stats.teaching;
  teach.hidden = !labels;
  if (!labels) return;
  $("teach-counts").textContent = "marked: " + labels.good + " good part" + (labels.good === 1 ? "" : "s") + ", " + labels.defect + " defect" + (labels.defect === 1 ? "" : "s");
  $("teach-button").disabled = !labels.good || state.state === "running";
  const text = $("teach-state");
  text.className = state.state; text.textContent = state.message;
}

function openViewer(frame) {
  viewed = frame;
  $("viewer-labels").hidden = !document.body.dataset.labels;
  $("mark-state").textContent = "";
  $("viewer-img").src = "/ng/" + frame.id + ".jpg";
  $("viewer-title").textContent = frame.source + " \u00b7 frame " + frame.name + " \u00b7 " + clock(frame.iso) + " \u00b7 score " + num(frame.score, 3) + " (threshold " + num(frame.threshold, 3) + ")";
  const info = $("viewer-info");
  info.replaceChildren();
  const list = document.createElement("ol");
  for (const r of frame.regions) {
    const item = document.createElement("li");
    item.textContent = "box x " + r.x + ", y " + r.y + ", " + r.width + "\u00d7" + r.height + " \u00b7 area " + r.area + " px \u00b7 peak " + num(r.peak, 2);
    list.appendChild(item);
  }
  info.append(frame.regions.length ? "regions above the pixel threshold (model input coordinates):" : "no region above the pixel threshold", list);
  $("viewer").showModal();
}

function render(stats) {
  const about = stats.about || {};
  $("bundle").textContent = (about.bundle || "?") + (about.model ? " (" + about.model + ", " + (about.input_size || []).join("\u00d7") + ")" : "");
  $("backend").textContent = stats.backend;
  $("version").textContent = stats.version ?? "\u2014";
  document.body.dataset.labels = stats.labels ? "1" : "";
  document.body.dataset.version = stats.version ?? "";
  renderTeach(stats);
  $("run").textContent = stats.run;
  $("uncal").hidden = stats.calibrated;
  $("uncal-cmd").textContent = "inspect-calibrate " + about.bundle_path + " --images DIR";
  renderAlarms(stats);
  for (const source of stats.sources) renderTile(stats, source);
  $("totals").hidden = stats.sources.length < 2;
  const totals = $("totals").querySelector("table");
  if (!totals.rows.length) buildCounters(totals);
  fillCounters(totals, stats);
  renderNg(stats);
  $("ng-note").textContent = stats.ng_frames.length ? "(click one for the whole overlay)" : "";
  const latency = stats.frame_ms ? "frame time p50 " + stats.frame_ms.p50 + " ms, p95 " + stats.frame_ms.p95 + " ms \u00b7 " : "";
  const plc = (stats.plc || []).map((server) => " \u00b7 " + server.protocol + " " + server.address + ": " + (server.running ? server.clients + " client" + (server.clients === 1 ? "" : "s") : "STOPPED")).join("");
  $("footer").textContent = latency + "mode " + about.mode + " \u00b7 threshold from " + (about.calibrated_on || "\u2014") + plc + " \u00b7 updated " + new Date(stats.now * 1000).toLocaleTimeString("en-GB");
  document.body.dataset.frames = stats.frames;
  document.body.dataset.updated = stats.now;
}

async function poll() {
  try {
    const response = await fetch("/stats.json", {cache: "no-store"});
    if (!response.ok) throw new Error("HTTP " + response.status);
    render(await response.json());
    failures = 0;
    $("conn").textContent = "live"; $("conn").className = "conn-live";
  } catch (error) {
    failures += 1;
    if (failures > 1) { $("conn").textContent = "connection lost \u2014 retrying"; $("conn").className = "conn-lost"; }
  }
  setTimeout(poll, 500);
}
poll();
