// StepTelemetry dashboard: draws the JSON of /api/run (or the data inlined in a report).
// Plain JavaScript and <canvas>, no libraries, so the page works offline. Everything is
// aggregated by the server: a 4,096-rank run arrives as a node heatmap of one byte a cell,
// the top-N slowest ranks, and a drill-down fetched per node (/api/node?name=).
"use strict";

const SECTION_COLOURS = { compute: ["#61afef"], section: ["#e5c07b", "#d19a66", "#c678dd", "#56b6c2", "#98c379"], collective: ["#e06c75", "#be5046"] };
const EVENT_LABEL = { detection: "detected", would_evict: "would evict", eviction_deferred: "deferred", eviction: "evicted", straggler_recovered: "recovered" };

function setupCanvas(canvas) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 600;
  const height = Number(canvas.getAttribute("height")) || 150;
  canvas.width = width * ratio;
  canvas.height = height * ratio;
  canvas.style.height = height + "px";
  const ctx = canvas.getContext("2d");
  ctx.scale(ratio, ratio);
  ctx.clearRect(0, 0, width, height);
  ctx.font = "11px system-ui, sans-serif";
  return { ctx, width, height };
}

function heatRGB(code) {
  // code 255: no value. ratio = 0.5 + code / 200: 1.0 (the step's median) -> teal,
  // 1.3 and above -> red, faster than the median -> blue.
  if (code === 255) return [29, 36, 48];
  const r = 0.5 + code / 200;
  const t = Math.max(0, Math.min(1, (r - 0.95) / 0.35));
  return [Math.round(40 + 200 * t), Math.round(150 - 110 * t), Math.round(170 - 140 * t)];
}

function decodeCodes(b64) {
  const bin = atob(b64 || "");
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

function heatHeight(rows) {
  return Math.max(120, Math.min(640, Math.round(rows * (rows > 64 ? 1.2 : 16))));
}

function drawHeatmap(canvas, heat, onPick) {
  const rows = heat.rows || [], steps = heat.steps || [];
  canvas.setAttribute("height", heatHeight(rows.length));
  const { ctx, width, height } = setupCanvas(canvas);
  if (!rows.length || !steps.length) { ctx.fillStyle = "#8a96a8"; ctx.fillText("no data yet", 10, 20); return; }
  const codes = decodeCodes(heat.values);
  const left = 110, bottom = 18;
  const img = new ImageData(steps.length, rows.length);
  for (let k = 0; k < codes.length; k++) {
    const [r, g, b] = heatRGB(codes[k]);
    img.data[4 * k] = r; img.data[4 * k + 1] = g; img.data[4 * k + 2] = b; img.data[4 * k + 3] = 255;
  }
  const off = document.createElement("canvas");
  off.width = steps.length; off.height = rows.length;
  off.getContext("2d").putImageData(img, 0, 0);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(off, left, 0, width - left, height - bottom);
  const ch = (height - bottom) / rows.length, cw = (width - left) / steps.length;
  ctx.fillStyle = "#d8dee9";
  const every = Math.max(1, Math.ceil(12 / ch));
  const flagged = new Set(heat.flagged || []);
  // One label per band of `every` rows, at the band's middle (never clipped at the top).
  const marked = rows.map((r, i) => (flagged.has(r) ? i : -1)).filter(i => i >= 0);
  for (let i = Math.floor(every / 2); i < rows.length; i += every) {
    if (marked.some(j => Math.abs(i - j) * ch < 12)) continue;  // a flagged label goes there
    ctx.fillText(rows[i], 4, i * ch + ch / 2 + 4);
  }
  // Flagged rows (a straggler or an evicted node): a red marker and label, whatever the
  // label spacing, so a 1-pixel row of 512 cannot be missed.
  ctx.font = "bold 11px system-ui, sans-serif";
  for (let i = 0; i < rows.length; i++) {
    if (!flagged.has(rows[i])) continue;
    const y = i * ch + ch / 2;
    ctx.fillStyle = "#ff5f56";
    ctx.beginPath(); ctx.moveTo(left - 9, y - 5); ctx.lineTo(left - 1, y); ctx.lineTo(left - 9, y + 5); ctx.fill();
    ctx.fillText(rows[i], 4, Math.max(10, y + 4));
  }
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = "#8a96a8";
  const everyX = Math.max(1, Math.ceil(steps.length / 12));
  for (let j = 0; j < steps.length; j += everyX) ctx.fillText(String(steps[j]), left + j * cw, height - 4);
  const cell = ev => {
    const i = Math.floor(ev.offsetY / ch), j = Math.floor((ev.offsetX - left) / cw);
    return (i >= 0 && i < rows.length && j >= 0 && j < steps.length) ? [i, j] : null;
  };
  canvas.onmousemove = ev => {
    const c = cell(ev);
    if (!c) { canvas.title = ""; return; }
    const code = codes[c[0] * steps.length + c[1]];
    const last = c[1] + 1 < steps.length ? steps[c[1] + 1] - 1 : heat.last_step;
    const what = heat.level === "node" ? "slowest rank of " + rows[c[0]] : rows[c[0]];
    canvas.title = `${what}, steps ${steps[c[1]]}-${last}: ` +
      (code === 255 ? "no value" : `${(0.5 + code / 200).toFixed(3)}x the step's median ${heat.metric}`) +
      (onPick ? " (click: its ranks)" : "");
  };
  canvas.onclick = ev => { const c = cell(ev); if (c && onPick) onPick(rows[c[0]]); };
  canvas.style.cursor = onPick ? "pointer" : "default";
}

function drawSections(canvas, sec) {
  const rows = sec.rows || [], cols = sec.columns || [];
  canvas.setAttribute("height", Math.max(90, 22 * rows.length + 40));
  const { ctx, width, height } = setupCanvas(canvas);
  if (!rows.length || !cols.length) { ctx.fillStyle = "#8a96a8"; ctx.fillText("no sections yet", 10, 20); return; }
  const used = { compute: 0, section: 0, collective: 0 };
  const colour = cols.map(c => { const p = SECTION_COLOURS[c.kind]; return p[used[c.kind]++ % p.length]; });
  const left = 110, legend = 30;
  const totals = sec.mean_s.map(r => r.reduce((a, b) => a + (b || 0), 0));
  const maxTotal = Math.max(...totals, 1e-9);
  const bh = (height - legend) / rows.length;
  for (let i = 0; i < rows.length; i++) {
    let x = left;
    for (let k = 0; k < cols.length; k++) {
      const w = ((sec.mean_s[i][k] || 0) / maxTotal) * (width - left - 70);
      ctx.fillStyle = colour[k];
      ctx.fillRect(x, i * bh + 2, w, Math.max(1, bh - 4));
      x += w;
    }
    ctx.fillStyle = "#d8dee9";
    ctx.fillText(rows[i], 4, i * bh + bh / 2 + 4);
    ctx.fillText(totals[i].toFixed(3) + " s", x + 4, i * bh + bh / 2 + 4);
  }
  let x = left, y = height - 18;
  for (let k = 0; k < cols.length; k++) {
    const w = 20 + ctx.measureText(cols[k].label).width;
    if (x + w > width) { x = left; y += 14; }
    ctx.fillStyle = colour[k];
    ctx.fillRect(x, y - 9, 10, 10);
    ctx.fillStyle = "#d8dee9";
    ctx.fillText(cols[k].label, x + 13, y);
    x += w;
  }
}

function drawLine(canvas, series, marks) {
  const { ctx, width, height } = setupCanvas(canvas);
  const xs = (series && series.step) || [], ys = (series && series.value) || [];
  const pts = xs.map((x, i) => [x, ys[i]]).filter(p => p[1] !== null);
  if (!pts.length) { ctx.fillStyle = "#8a96a8"; ctx.fillText("not recorded", 10, 20); return; }
  const left = 44, bottom = 14;
  const x0 = Math.min(...pts.map(p => p[0])), x1 = Math.max(...pts.map(p => p[0]), x0 + 1);
  let y0 = Math.min(...pts.map(p => p[1])), y1 = Math.max(...pts.map(p => p[1]));
  if (y1 === y0) { y1 += Math.abs(y1) * 0.1 + 1e-9; y0 -= Math.abs(y0) * 0.1 + 1e-9; }
  const px = x => left + (x - x0) / (x1 - x0) * (width - left - 6);
  const py = y => 4 + (1 - (y - y0) / (y1 - y0)) * (height - bottom - 8);
  ctx.strokeStyle = "#e06c75";
  for (const m of marks || []) { ctx.beginPath(); ctx.moveTo(px(m), 0); ctx.lineTo(px(m), height - bottom); ctx.stroke(); }
  ctx.strokeStyle = "#61afef"; ctx.lineWidth = 1.5; ctx.beginPath();
  pts.forEach((p, i) => (i ? ctx.lineTo(px(p[0]), py(p[1])) : ctx.moveTo(px(p[0]), py(p[1]))));
  ctx.stroke();
  ctx.fillStyle = "#8a96a8";
  ctx.fillText(y1.toPrecision(3), 2, 12); ctx.fillText(y0.toPrecision(3), 2, height - bottom);
  ctx.fillText(String(x0), left, height - 2); ctx.fillText(String(x1), width - 30, height - 2);
}

function fmtMs(v) { return v === null || v === undefined ? "" : v.toFixed(1) + " ms"; }

function renderRanks(body, ranks) {
  body.innerHTML = "";
  for (const r of ranks) {
    const tr = document.createElement("tr");
    tr.dataset.member = r.member;
    tr.dataset.straggler = r.straggler ? "1" : "0";
    tr.className = "rank-row";
    const pct = r.slowdown === null ? "" : (r.slowdown >= 0 ? "+" : "") + (100 * r.slowdown).toFixed(1) + "%";
    const badges = [];
    if (r.straggler) badges.push('<span class="badge straggler">STRAGGLER</span>');
    if (r.evicted) badges.push('<span class="badge evicted">EVICTED</span>');
    if (!r.evicted && r.active) badges.push('<span class="badge ok">active</span>');
    if (!r.active && !r.evicted) badges.push('<span class="badge spare">left</span>');
    tr.innerHTML = `<td>${r.rank}</td><td><a href="#" class="node-link">${r.node}</a></td><td>${pct}</td>` +
      `<td>${fmtMs(r.late_ms)}</td><td>${fmtMs(r.wait_ms)}</td><td>${badges.join(" ")}</td>`;
    tr.querySelector(".node-link").onclick = ev => { ev.preventDefault(); drill(r.node); };
    body.appendChild(tr);
  }
}

function renderEvictPanel(rows) {
  const body = document.querySelector("#evict tbody");
  body.innerHTML = "";
  if (!rows.length) { body.innerHTML = '<tr><td colspan="5" class="muted">no detection yet</td></tr>'; return; }
  for (const e of rows) {
    const tr = document.createElement("tr");
    tr.dataset.event = e.event;
    const who = e.level === "node" || !e.target ? `node ${e.node ?? "?"}` : `${e.level ?? "rank"} ${e.target} on ${e.node ?? "?"}`;
    const money = e.saving_s === null || e.saving_s === undefined ? "" :
      `saves ${e.saving_s.toFixed(1)} s ${e.saving_s > (e.cost_s ?? 0) ? ">" : "<"} costs ${(e.cost_s ?? 0).toFixed(1)} s`;
    const why = e.reason || (e.score !== null && e.score !== undefined ? `z ${e.score}, ${(100 * (e.effect || 0)).toFixed(1)}% slower` : "");
    tr.innerHTML = `<td>${e.step ?? ""}</td><td><span class="badge ev-${e.event}">${EVENT_LABEL[e.event] || e.event}</span></td>` +
      `<td>${who}</td><td>${money}</td><td class="why"></td>`;
    tr.querySelector(".why").textContent = why;
    body.appendChild(tr);
  }
}

function summary(ev) {
  const skip = new Set(["t_unix_s", "event", "source", "evidence", "detector", "i", "evidence_bytes"]);
  return Object.entries(ev).filter(([k]) => !skip.has(k))
    .map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`).join(" ");
}

function renderEvents(events) {
  const list = document.getElementById("events");
  list.innerHTML = "";
  const t0 = events.length ? events[0].t_unix_s : 0;
  for (const ev of events) {
    const li = document.createElement("li");
    li.className = "ev ev-" + ev.event;
    li.dataset.event = ev.event;
    const head = `+${(ev.t_unix_s - t0).toFixed(1)}s <b>${ev.event}</b> ${summary(ev)}`;
    if (ev.evidence || ev.evidence_bytes) {
      li.innerHTML = `<details><summary>${head}</summary><pre></pre></details>`;
      const pre = li.querySelector("pre");
      if (ev.evidence) pre.textContent = JSON.stringify(ev.evidence, null, 1);
      else li.querySelector("details").addEventListener("toggle", async () => {
        if (pre.textContent) return;
        pre.textContent = `loading ${ev.evidence_bytes} bytes of evidence...`;
        const resp = await fetch(`api/event?i=${ev.i}`, { cache: "no-store" });
        pre.textContent = resp.ok ? JSON.stringify((await resp.json()).evidence, null, 1) : "error " + resp.status;
      });
    } else {
      li.innerHTML = head;
    }
    list.appendChild(li);
  }
}

async function drill(node) {
  const panel = document.getElementById("drill");
  let doc = null;
  if (window.STEP_INFRA_DATA) doc = (window.STEP_INFRA_NODES || {})[node] || null;
  else {
    const resp = await fetch(`api/node?name=${encodeURIComponent(node)}`, { cache: "no-store" });
    if (resp.ok) doc = await resp.json();
  }
  panel.hidden = false;
  panel.dataset.node = node;
  document.getElementById("drill-title").textContent = doc ? `Node ${node}: its ${doc.ranks.length} ranks` :
    `Node ${node}: drill-down needs the live dashboard (step-infra dashboard RUN_DIR)`;
  if (!doc) return;
  drawHeatmap(document.getElementById("drill-heatmap"), doc.heatmap, null);
  renderRanks(document.querySelector("#drill-ranks tbody"), doc.ranks);
  drawSections(document.getElementById("drill-sections"), doc.sections);
  window.STEP_INFRA_DRILL = doc;
  panel.scrollIntoView({ block: "nearest" });
}

function render(data) {
  window.STEP_INFRA_LAST = data;
  const n = data.ranks_total ?? data.ranks.length;
  document.getElementById("status").textContent =
    `${n} ranks on ${data.nodes_total ?? "?"} nodes · ${data.stragglers_total ?? 0} straggler(s) · ${data.rows} rows · attempt ${data.attempt ?? "-"} · ` +
    `dropped records ${data.dropped_records ?? 0} · ` + (window.STEP_INFRA_DATA ? "static report" :
      `live, as of ${new Date(1000 * data.as_of_unix_s).toLocaleTimeString()} (aggregated in ${data.build_s} s)`);
  const heat = data.heatmap;
  const bin = heat.bin_steps > 1 ? `, mean of ${heat.bin_steps}-step bins` : "";
  document.getElementById("heatmap-title").textContent = heat.level === "node"
    ? `Per-node ${heat.metric || "step"} time over steps: each node's slowest rank / the step's median over all ${n} ranks${bin} (click a node for its ranks)`
    : `Per-rank ${heat.metric || "step"} time over steps: ratio to the step's median over all ranks${bin}`;
  document.getElementById("ranks-title").textContent = n > data.ranks.length
    ? `Slowest ${data.ranks.length} of ${n} ranks` : `Ranks (slowest first)`;
  renderRanks(document.querySelector("#ranks tbody"), data.ranks);
  drawHeatmap(document.getElementById("heatmap"), heat, heat.level === "node" ? drill : null);
  drawSections(document.getElementById("sections"), data.sections);
  const marks = data.events.filter(e => e.event === "eviction" && e.last_step !== undefined).map(e => e.last_step);
  const s = data.series || {};
  drawLine(document.getElementById("c-step"), s.step_time_s, marks);
  drawLine(document.getElementById("c-stall"), s.data_stall_fraction, marks);
  drawLine(document.getElementById("c-loss"), s.loss, marks);
  drawLine(document.getElementById("c-tps"), s.tokens_per_s, marks);
  drawLine(document.getElementById("c-mfu"), s.mfu, marks);
  renderEvictPanel(data.evict_panel || []);
  renderEvents(data.events);
  const open = document.getElementById("drill");
  if (!open.hidden && open.dataset.node && !window.STEP_INFRA_DATA) drill(open.dataset.node);
  if (window.STEP_INFRA_LOAD_MS === undefined) window.STEP_INFRA_LOAD_MS = performance.now();
  document.body.dataset.ready = "1";
}

async function poll() {
  try {
    const resp = await fetch("api/run", { cache: "no-store" });
    if (resp.ok) render(await resp.json());
    else document.getElementById("status").textContent = "server error " + resp.status;
  } catch (err) {
    document.getElementById("status").textContent = "disconnected: " + err;
  }
  setTimeout(poll, 2000);
}

window.stepInfraDrill = drill;
if (window.STEP_INFRA_DATA) render(window.STEP_INFRA_DATA); else poll();
