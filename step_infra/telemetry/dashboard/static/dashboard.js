// StepTelemetry dashboard: draws the JSON of /api/run (or the data inlined in a report).
// Plain JavaScript and <canvas>, no libraries, so the page works offline.
"use strict";

const PALETTE = ["#61afef", "#98c379", "#e5c07b", "#c678dd", "#56b6c2", "#e06c75",
                 "#d19a66", "#abb2bf", "#7f848e", "#be5046"];

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

function heatColor(r) {
  // ratio 1.0 (at the median) -> teal; 1.3 and above -> red; faster than median -> blue.
  if (r === null || Number.isNaN(r)) return "#222";
  const t = Math.max(0, Math.min(1, (r - 0.95) / 0.35));
  const red = Math.round(40 + 200 * t), green = Math.round(150 - 110 * t), blue = Math.round(170 - 140 * t);
  return `rgb(${red},${green},${blue})`;
}

function drawHeatmap(canvas, heat) {
  const { ctx, width, height } = setupCanvas(canvas);
  const rows = heat.rows || [], steps = heat.steps || [];
  if (!rows.length || !steps.length) { ctx.fillStyle = "#8a96a8"; ctx.fillText("no data yet", 10, 20); return; }
  const left = 110, bottom = 18;
  const cw = (width - left) / steps.length, ch = (height - bottom) / rows.length;
  for (let j = 0; j < steps.length; j++) {
    const col = heat.values.map(r => r[j]).filter(v => v !== null).sort((a, b) => a - b);
    const med = col.length ? col[Math.floor(col.length / 2)] : null;
    for (let i = 0; i < rows.length; i++) {
      const v = heat.values[i][j];
      ctx.fillStyle = (v === null || !med) ? "#1d2430" : heatColor(v / med);
      ctx.fillRect(left + j * cw, i * ch, Math.ceil(cw), Math.ceil(ch));
    }
  }
  ctx.fillStyle = "#d8dee9";
  for (let i = 0; i < rows.length; i++) ctx.fillText(rows[i], 4, i * ch + ch / 2 + 4);
  ctx.fillStyle = "#8a96a8";
  const every = Math.max(1, Math.ceil(steps.length / 12));
  for (let j = 0; j < steps.length; j += every) ctx.fillText(String(steps[j]), left + j * cw, height - 4);
}

function drawSections(canvas, sec) {
  const { ctx, width, height } = setupCanvas(canvas);
  const rows = sec.rows || [], names = sec.names || [];
  if (!rows.length) { ctx.fillStyle = "#8a96a8"; ctx.fillText("no sections yet", 10, 20); return; }
  const left = 110, legend = 16;
  const totals = sec.mean_s.map(r => r.reduce((a, b) => a + (b || 0), 0));
  const maxTotal = Math.max(...totals, 1e-9);
  const bh = (height - legend) / rows.length;
  for (let i = 0; i < rows.length; i++) {
    let x = left;
    for (let k = 0; k < names.length; k++) {
      const w = ((sec.mean_s[i][k] || 0) / maxTotal) * (width - left - 60);
      ctx.fillStyle = PALETTE[k % PALETTE.length];
      ctx.fillRect(x, i * bh + 2, w, Math.max(1, bh - 4));
      x += w;
    }
    ctx.fillStyle = "#d8dee9";
    ctx.fillText(rows[i], 4, i * bh + bh / 2 + 4);
    ctx.fillText(totals[i].toFixed(3), x + 4, i * bh + bh / 2 + 4);
  }
  let x = left;
  for (let k = 0; k < names.length; k++) {
    ctx.fillStyle = PALETTE[k % PALETTE.length];
    ctx.fillRect(x, height - 11, 10, 10);
    ctx.fillStyle = "#d8dee9";
    ctx.fillText(names[k], x + 13, height - 2);
    x += 20 + ctx.measureText(names[k]).width;
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

function renderRanks(ranks) {
  const body = document.querySelector("#ranks tbody");
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
    const late = r.late_ms === null || r.late_ms === undefined ? "" : r.late_ms.toFixed(1) + " ms";
    tr.innerHTML = `<td>${r.rank}</td><td>${r.node}</td><td>${pct}</td><td>${late}</td><td>${badges.join(" ")}</td>`;
    body.appendChild(tr);
  }
}

function summary(ev) {
  const skip = new Set(["t_unix_s", "event", "source", "evidence", "detector"]);
  return Object.entries(ev).filter(([k]) => !skip.has(k))
    .map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`).join(" ");
}

function renderEvents(events) {
  const list = document.getElementById("events");
  list.innerHTML = "";
  const important = new Set(["detection", "eviction", "restart", "join", "recovered", "hang", "job_start", "job_end", "resumed", "pipe_fault"]);
  const t0 = events.length ? events[0].t_unix_s : 0;
  for (const ev of events) {
    if (!important.has(ev.event)) continue;
    const li = document.createElement("li");
    li.className = "ev ev-" + ev.event;
    li.dataset.event = ev.event;
    const head = `+${(ev.t_unix_s - t0).toFixed(1)}s <b>${ev.event}</b> ${summary(ev)}`;
    if (ev.evidence) {
      li.innerHTML = `<details><summary>${head}</summary><pre></pre></details>`;
      li.querySelector("pre").textContent = JSON.stringify(ev.evidence, null, 1);
    } else {
      li.innerHTML = head;
    }
    list.appendChild(li);
  }
}

function render(data) {
  window.STEP_INFRA_LAST = data;
  const stragglers = data.ranks.filter(r => r.straggler).length;
  document.getElementById("status").textContent =
    `${data.ranks.length} ranks · ${stragglers} straggler(s) · ${data.rows} rows · attempt ${data.attempt ?? "-"} · ` +
    `dropped records ${data.dropped_records ?? 0} · ` + (window.STEP_INFRA_DATA ? "static report" : "live, updated " + new Date().toLocaleTimeString());
  document.getElementById("heatmap-title").textContent =
    `Per-rank ${data.heatmap.metric || "step"} time over steps (colour: ratio to the step's median across ranks)`;
  renderRanks(data.ranks);
  drawHeatmap(document.getElementById("heatmap"), data.heatmap);
  drawSections(document.getElementById("sections"), data.sections);
  const marks = data.events.filter(e => e.event === "eviction" && e.last_step !== undefined).map(e => e.last_step);
  const s = data.series || {};
  drawLine(document.getElementById("c-step"), s.step_time_s, marks);
  drawLine(document.getElementById("c-stall"), s.data_stall_fraction, marks);
  drawLine(document.getElementById("c-loss"), s.loss, marks);
  drawLine(document.getElementById("c-tps"), s.tokens_per_s, marks);
  drawLine(document.getElementById("c-mfu"), s.mfu, marks);
  renderEvents(data.events);
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

if (window.STEP_INFRA_DATA) render(window.STEP_INFRA_DATA); else poll();
