// slidevl viewer: OpenSeadragon for the pixels, one canvas for every vector overlay,
// and side panels for the patch under the cursor, survival risk and the chat.
// All text from the job folder is inserted with textContent, never as HTML.
"use strict";

const HEAT_STOPS = [[0, [48, 18, 59]], [0.25, [65, 136, 254]], [0.5, [41, 239, 154]], [0.75, [249, 186, 56]], [1, [180, 4, 38]]];

const state = {
  info: null, slides: [], slide: null, viewer: null,
  loaded: null,        // id of the slide whose overlays and panels are all loaded
  layers: [],          // {key, label, on, opacity, kind, data, colour}
  evidence: null,      // evidence payload (prompts, layers)
  selection: null,     // level-0 [x0, y0, x1, y1] for region questions
  selecting: false, dragStart: null,
  picked: null,        // patch box highlighted after a click
  history: [],
};
window.slidevl = state;  // handy from the browser console

const $ = (id) => document.getElementById(id);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
};
const svgEl = (tag, attrs = {}) => {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
};

async function api(path, options) {
  const resp = await fetch(path, options);
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok) {
    const detail = Array.isArray(body.detail) ? body.detail.map((d) => d.msg).join("; ") : body.detail;
    throw new Error(detail || `${resp.status} ${resp.statusText}`);
  }
  return body;
}

function notice(text) {
  $("notice").textContent = text;
  $("notice").hidden = !text;
}

// ---------------------------------------------------------------- slides
async function loadSlides() {
  state.slides = await api("/api/slides");
  const list = $("slide-list");
  list.replaceChildren();
  for (const s of state.slides) {
    const thumb = el("img", { src: `${s.thumbnail}?size=128`, alt: "" });
    thumb.addEventListener("error", () => thumb.replaceWith(el("div", { class: "no-thumb", text: "✕", title: "cannot be viewed" })));
    const meta = el("div", { class: "meta" },
      el("div", { class: "sid", text: s.id, title: s.id }),
      el("span", { class: `status ${s.status}`, text: s.status, title: s.error || "" }),
      el("div", { class: "muted small", text: s.n_patches != null ? `${s.n_patches} patches` : "" }));
    const item = el("li", { "data-id": s.id, title: s.error || s.id }, thumb, meta);
    item.addEventListener("click", () => openSlide(s.id));
    list.append(item);
  }
}

async function openSlide(id) {
  let info;
  try {
    info = await api(`/api/slides/${encodeURIComponent(id)}`);
  } catch (err) {
    notice(`${id}: ${err.message}`);
    return;
  }
  notice(window.OpenSeadragon ? "" : state.info.openseadragon_hint);
  state.slide = info;
  state.loaded = null;
  state.selection = null; state.picked = null; state.history = [];
  history.replaceState(null, "", `#slide=${encodeURIComponent(id)}`);
  for (const li of document.querySelectorAll("#slide-list li")) li.classList.toggle("active", li.dataset.id === id);
  $("slide-title").textContent = `${id} · ${info.width.toLocaleString()} × ${info.height.toLocaleString()} px` +
    (info.mpp ? ` · ${info.mpp} µm/px` : " · mpp unknown");
  $("empty").hidden = true;
  $("chat-log").replaceChildren();
  $("patch-card").hidden = true;
  updateSelectionUi();
  if (!window.OpenSeadragon) return;
  if (!state.viewer) createViewer();
  state.viewer.open(info.dzi);
  await Promise.all([loadLayers(info), loadSurvival(info)]);
  if (state.slide === info) state.loaded = info.id;  // tests and scripts wait on this
}

// ---------------------------------------------------------------- viewer
function createViewer() {
  const viewer = OpenSeadragon({
    element: $("viewer"),
    prefixUrl: "/vendor/openseadragon/images/",
    showNavigator: true, navigatorPosition: "TOP_RIGHT",
    showRotationControl: false, showFullPageControl: false,
    maxZoomPixelRatio: 4, visibilityRatio: 0.3,
    // The 2D canvas drawer: WebGL falls back to slow software rendering on machines without a GPU.
    drawer: "canvas",
    gestureSettingsMouse: { clickToZoom: false },
  });
  state.viewer = viewer;
  for (const evt of ["update-viewport", "animation", "resize", "open"]) viewer.addHandler(evt, () => { redraw(); updateScalebar(); });
  viewer.addHandler("canvas-click", onCanvasClick);
  viewer.addHandler("canvas-press", (e) => {
    if (!state.selecting) return;
    state.dragStart = toImage(e.position);
  });
  viewer.addHandler("canvas-drag", (e) => {
    if (!state.selecting || !state.dragStart) return;
    e.preventDefaultAction = true;  // draw instead of panning
    state.selection = boxFrom(state.dragStart, toImage(e.position));
    redraw();
  });
  viewer.addHandler("canvas-release", (e) => {
    if (!state.selecting || !state.dragStart) return;
    state.selection = boxFrom(state.dragStart, toImage(e.position));
    state.dragStart = null;
    if (state.selection[2] - state.selection[0] < 2 || state.selection[3] - state.selection[1] < 2) state.selection = null;
    setSelecting(false);
    updateSelectionUi();
    redraw();
  });
  window.addEventListener("resize", redraw);
}

function item() { return state.viewer && state.viewer.world.getItemCount() ? state.viewer.world.getItemAt(0) : null; }

function toImage(point) {
  const p = item().viewerElementToImageCoordinates(point);
  return [p.x, p.y];
}

function boxFrom(a, b) {
  const clamp = (v, hi) => Math.round(Math.min(Math.max(v, 0), hi));
  const [w, h] = [state.slide.width, state.slide.height];
  return [clamp(Math.min(a[0], b[0]), w), clamp(Math.min(a[1], b[1]), h), clamp(Math.max(a[0], b[0]), w), clamp(Math.max(a[1], b[1]), h)];
}

// Level-0 → canvas pixel transform (uniform scale + offset) for the current frame.
function transform() {
  const ti = item();
  if (!ti) return null;
  const o = ti.imageToViewerElementCoordinates(new OpenSeadragon.Point(0, 0));
  const u = ti.imageToViewerElementCoordinates(new OpenSeadragon.Point(1000, 0));
  return { ox: o.x, oy: o.y, s: (u.x - o.x) / 1000 };
}

function updateScalebar() {
  const t = transform();
  const mpp = state.slide && state.slide.mpp;
  $("scalebar").hidden = !(t && mpp);
  if (!t || !mpp) return;
  const umPerPx = mpp / t.s;
  const target = 120 * umPerPx;
  const pow = Math.pow(10, Math.floor(Math.log10(target)));
  const nice = [5, 2, 1].map((m) => m * pow).find((v) => v <= target) || pow;
  $("scalebar-bar").style.width = `${nice / umPerPx}px`;
  $("scalebar-label").textContent = nice >= 1000 ? `${nice / 1000} mm` : `${nice} µm`;
}

// ---------------------------------------------------------------- overlays
async function loadLayers(info) {
  const id = encodeURIComponent(info.id);
  const layers = [];
  const jobs = [];
  if (info.overlays.tissue) jobs.push(api(`/api/slides/${id}/overlays/tissue`).then((d) =>
    layers.push({ key: "tissue", label: "Tissue", kind: "tissue", data: d, on: true, opacity: 0.9, colour: "#00c853" })));
  if (info.overlays.grid) for (const [kind, colour] of [["patch", "#ffffff"], ["region", "#ffd600"], ["pack", "#00e5ff"]]) {
    jobs.push(api(`/api/slides/${id}/overlays/grid?kind=${kind}`).then((d) =>
      layers.push({ key: `grid-${kind}`, label: `${kind[0].toUpperCase()}${kind.slice(1)} grid`, kind: "grid", data: d, on: false, opacity: 0.6, colour })));
  }
  if (info.overlays.rois) jobs.push(api(`/api/slides/${id}/overlays/rois`).then((d) =>
    layers.push({ key: "rois", label: "ROIs", kind: "rois", data: d, on: true, opacity: 1, colour: "#ff9100" })));
  state.evidence = null;
  state.promptColours = {};
  if (info.overlays.evidence) jobs.push(api(`/api/slides/${id}/overlays/evidence`).then((d) => {
    state.evidence = d;
    for (const [scale, prompts] of Object.entries(d.prompts)) state.promptColours[scale] = promptColours(prompts);
    for (const layer of d.layers) {
      layers.push({ key: `ev-${layer.name}`, label: layer.name.replace(/_/g, " "), kind: layer.kind, data: layer, on: false, opacity: 0.55 });
    }
  }));
  const results = await Promise.allSettled(jobs);
  if (state.slide !== info) return;  // another slide was opened meanwhile
  const failed = results.filter((r) => r.status === "rejected").map((r) => r.reason.message);
  if (failed.length) notice(`Some overlays could not be loaded: ${failed.join("; ")}`);
  const order = ["tissue", "grid-patch", "grid-pack", "grid-region", "rois"];
  layers.sort((a, b) => (order.indexOf(a.key) + 1 || 99) - (order.indexOf(b.key) + 1 || 99));
  state.layers = layers;
  renderLayerControls();
  redraw();
}

function renderLayerControls() {
  const box = $("layers");
  box.replaceChildren();
  if (!state.layers.length) box.append(el("span", { class: "muted", text: "No overlays for this slide." }));
  for (const layer of state.layers) {
    const check = el("input", { type: "checkbox", id: `toggle-${layer.key}`, "data-layer": layer.key });
    check.checked = layer.on;
    check.addEventListener("change", () => { layer.on = check.checked; redraw(); });
    const slider = el("input", { type: "range", min: "0", max: "1", step: "0.05", value: String(layer.opacity), title: "opacity", "aria-label": `${layer.label} opacity` });
    slider.addEventListener("input", () => { layer.opacity = Number(slider.value); redraw(); });
    const swatch = el("span", { class: "swatch" });
    swatch.style.background = layer.colour || (layer.kind === "heatmap"
      ? "linear-gradient(90deg,#30123b,#4188fe,#29ef9a,#f9ba38,#b40426)"
      : "linear-gradient(90deg,hsl(0,80%,50%),hsl(110,80%,45%),hsl(220,80%,50%))");
    box.append(el("label", { class: "layer", for: `toggle-${layer.key}` }, check, swatch, layer.label, slider));
  }
  // OPL tokens are coloured by matched prompt; each scale has its own prompt list, grouped by risk level.
  for (const [scale, prompts] of Object.entries(state.evidence ? state.evidence.prompts : {})) {
    if (!state.layers.some((l) => l.kind === "tokens" && l.data.level === scale)) continue;
    const legend = el("div", { class: "legend", title: `${scale} tokens are coloured by the prompt OPL matched them to` },
      el("b", { text: `${scale} prompts:` }));
    const colours = state.promptColours[scale];
    for (const level of [...new Set(prompts.map((p) => p.level))]) {
      const group = el("span", { class: "legend-level" });
      prompts.forEach((p, i) => {
        if (p.level !== level) return;
        const sw = el("span", { class: "swatch", title: p.text });
        sw.style.background = colours[i];
        group.append(sw);
      });
      const first = prompts.find((p) => p.level === level);
      group.append(` ${first.label || `level ${level}`}`);
      legend.append(group);
    }
    box.append(legend);
  }
}

// One colour per prompt: the hue follows the risk level (red for level 0, the shortest-survival
// bin, to blue for the last), the shade tells the prompts of one level apart.
function promptColours(prompts) {
  const levels = [...new Set(prompts.map((p) => p.level ?? 0))].sort((a, b) => a - b);
  const size = {}, seen = {};
  for (const p of prompts) size[p.level ?? 0] = (size[p.level ?? 0] || 0) + 1;
  return prompts.map((p) => {
    const level = p.level ?? 0;
    const k = (seen[level] = (seen[level] ?? -1) + 1);
    const hue = levels.length > 1 ? (levels.indexOf(level) / (levels.length - 1)) * 220 : 0;
    const light = size[level] > 1 ? 32 + (k / (size[level] - 1)) * 33 : 48;
    return `hsl(${Math.round(hue)}, 80%, ${Math.round(light)}%)`;
  });
}

function heat(v) {
  for (let i = 1; i < HEAT_STOPS.length; i++) {
    const [t1, c1] = HEAT_STOPS[i];
    if (v <= t1) {
      const [t0, c0] = HEAT_STOPS[i - 1];
      const f = (v - t0) / (t1 - t0);
      return `rgb(${c0.map((c, k) => Math.round(c + f * (c1[k] - c))).join(",")})`;
    }
  }
  return "rgb(180,4,38)";
}

function redraw() {
  const canvas = $("overlay");
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
    canvas.width = Math.round(w * dpr); canvas.height = Math.round(h * dpr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  const t = transform();
  let shapes = 0;
  if (!t) { canvas.dataset.shapes = "0"; return; }
  // The visible level-0 window: shapes outside it are skipped, so big slides stay cheap.
  const view = [-t.ox / t.s, -t.oy / t.s, (w - t.ox) / t.s, (h - t.oy) / t.s];
  const visible = (x, y, size) => x + size >= view[0] && x <= view[2] && y + size >= view[1] && y <= view[3];
  const X = (x) => t.ox + x * t.s, Y = (y) => t.oy + y * t.s;
  for (const layer of state.layers) {
    if (!layer.on) continue;
    ctx.globalAlpha = layer.opacity;
    const d = layer.data;
    if (layer.kind === "tissue") {
      ctx.strokeStyle = layer.colour; ctx.lineWidth = 2;
      for (const poly of d.polygons) {
        ctx.beginPath();
        for (const ring of poly) {
          ring.forEach(([x, y], i) => (i ? ctx.lineTo(X(x), Y(y)) : ctx.moveTo(X(x), Y(y))));
          ctx.closePath();
        }
        ctx.stroke(); shapes++;
      }
    } else if (layer.kind === "grid" && d.size) {
      ctx.strokeStyle = layer.colour; ctx.lineWidth = layer.key === "grid-patch" ? 0.75 : 1.5;
      const px = d.size * t.s;
      ctx.beginPath();
      for (const [x, y] of d.coords) if (visible(x, y, d.size)) { ctx.rect(X(x), Y(y), px, px); shapes++; }
      ctx.stroke();
    } else if (layer.kind === "tokens" || layer.kind === "heatmap") {
      const px = d.size * t.s;
      const [lo, hi] = d.score_range;
      d.coords.forEach(([x, y], i) => {
        if (d.kept && !d.kept[i]) return;
        if (!visible(x, y, d.size)) return;
        ctx.fillStyle = layer.kind === "tokens" && d.prompt
          ? (state.promptColours[d.level] || [])[d.prompt[i]] || "#888"
          : heat(hi > lo ? (d.score[i] - lo) / (hi - lo) : 0.5);
        ctx.fillRect(X(x), Y(y), px, px); shapes++;
      });
    } else if (layer.kind === "rois") {
      ctx.strokeStyle = layer.colour; ctx.lineWidth = 2.5; ctx.font = "12px system-ui"; ctx.fillStyle = layer.colour;
      for (const roi of d.rois) {
        const [x0, y0, x1, y1] = roi.bbox;
        ctx.beginPath();
        if (roi.polygon) roi.polygon.forEach(([x, y], i) => (i ? ctx.lineTo(X(x), Y(y)) : ctx.moveTo(X(x), Y(y))));
        else ctx.rect(X(x0), Y(y0), (x1 - x0) * t.s, (y1 - y0) * t.s);
        ctx.closePath(); ctx.stroke();
        const text = `${roi.id}${roi.label ? ": " + roi.label : ""}`;
        const tw = ctx.measureText(text).width;
        ctx.fillStyle = "rgba(20,20,20,0.75)";
        ctx.fillRect(X(x0), Y(y0) - 17, tw + 8, 16);
        ctx.fillStyle = layer.colour;
        ctx.fillText(text, X(x0) + 4, Y(y0) - 5);
        shapes++;
      }
    }
  }
  ctx.globalAlpha = 1;
  if (state.picked) {
    const [x, y, size] = state.picked;
    ctx.strokeStyle = "#ffeb3b"; ctx.lineWidth = 3;
    ctx.strokeRect(X(x), Y(y), size * t.s, size * t.s);
  }
  if (state.selection) {
    const [x0, y0, x1, y1] = state.selection;
    ctx.setLineDash([6, 4]); ctx.strokeStyle = "#ffffff"; ctx.lineWidth = 2;
    ctx.strokeRect(X(x0), Y(y0), (x1 - x0) * t.s, (y1 - y0) * t.s);
    ctx.setLineDash([]);
  }
  canvas.dataset.shapes = String(shapes);
}

// ---------------------------------------------------------------- patch click
async function onCanvasClick(e) {
  if (!e.quick || state.selecting || !item()) return;
  const [x, y] = toImage(e.position);
  if (x < 0 || y < 0 || x >= state.slide.width || y >= state.slide.height) return;
  const box = $("patch-info");
  try {
    const d = await api(`/api/slides/${encodeURIComponent(state.slide.id)}/patch?x=${x.toFixed(1)}&y=${y.toFixed(1)}`);
    const rows = [["Point (level 0)", `${Math.round(x)}, ${Math.round(y)}`]];
    if (d.patch) {
      rows.push(["Patch", `#${d.patch.index} at ${d.patch.x}, ${d.patch.y}`], ["Tissue fraction", d.patch.tissue_fraction.toFixed(2)]);
      state.picked = [d.patch.x, d.patch.y, d.patch.size];
    } else {
      rows.push(["Patch", "none (background or not tiled)"]);
      state.picked = null;
    }
    for (const ev of d.evidence) {
      const parts = [];
      if (ev.kept !== undefined) parts.push(ev.kept ? "kept by OPL" : "dropped by OPL");
      if (ev.alignment !== undefined) parts.push(`alignment ${Number(ev.alignment).toFixed(3)}`);
      if (ev.attention !== undefined) parts.push(`attention ${Number(ev.attention).toPrecision(3)}`);
      rows.push([`${ev.level} token`, parts.join(" · ")]);
      if (ev.prompt_text) rows.push([`${ev.level} prompt`, ev.prompt_text]);
    }
    $("patch-card").hidden = false;
    box.replaceChildren(el("table", {}, ...rows.map(([k, v]) => el("tr", {}, el("td", { text: k }), el("td", { text: v })))));
    redraw();
  } catch (err) {
    $("patch-card").hidden = false;
    box.textContent = err.message;
  }
}

// ---------------------------------------------------------------- region selection
function setSelecting(on) {
  state.selecting = on;
  $("select-region").classList.toggle("active", on);
  $("select-region").textContent = on ? "Drag a rectangle…" : "▭ Select region";
}

function updateSelectionUi() {
  const has = !!state.selection;
  $("clear-region").hidden = !has;
  $("chat-scope").disabled = !has;
  $("chat-scope").checked = has;
  $("chat-scope-label").title = has ? `level-0 [${state.selection.join(", ")}]` : "draw a region first";
}

// ---------------------------------------------------------------- survival
async function loadSurvival(info) {
  const card = $("survival-card");
  card.hidden = true;
  if (!info.survival) return;
  let d;
  try {
    d = await api(`/api/slides/${encodeURIComponent(info.id)}/survival`);
  } catch (err) {
    if (state.slide !== info) return;
    card.hidden = false;
    $("survival-info").textContent = err.message;
    $("km-plot").replaceChildren(); $("risk-strip").replaceChildren(); $("survival-summary").textContent = "";
    return;
  }
  if (state.slide !== info) return;
  card.hidden = false;
  const p = d.patient;
  const head = el("div", {},
    el("span", { class: `risk-big risk-${p.group}`, text: p.risk.toFixed(3) }),
    el("span", { text: ` ${p.group}-risk group · ${Math.round(p.percentile)}th percentile of ${d.cohort.n} patients` }));
  const follow = el("div", { class: "small muted",
    text: `Patient ${p.patient_id}: ${p.e ? "event" : "censored"} at ${p.t.toFixed(1)} months` + (p.fold != null ? ` · out-of-fold (fold ${p.fold})` : "") });
  $("survival-info").replaceChildren(head, follow);
  drawKm(d);
  drawRiskStrip(d);
  const s = d.summary;
  const parts = [`${s.model || "model"}${s.variant ? " " + s.variant : ""}`];
  if (s.c_index_mean != null) parts.push(`C-index ${s.c_index_mean.toFixed(3)} ± ${(s.c_index_std || 0).toFixed(3)}` + (s.folds ? ` over ${s.folds} folds` : ""));
  if (s.logrank_p != null) parts.push(`log-rank p ${s.logrank_p.toExponential(1)}`);
  if (p.curve) parts.push(`dashed: this patient's predicted survival (${p.curve.checkpoint} model)`);
  else if (p.curve_note) parts.push(`no patient curve: ${p.curve_note}`);
  $("survival-summary").textContent = parts.join(" · ");
}

function drawKm(d) {
  const svg = $("km-plot");
  svg.replaceChildren();
  const W = 320, H = 150, L = 30, R = 8, T = 8, B = 24;
  const curves = Object.entries(d.cohort.km);
  const tmax = Math.max(1, ...curves.flatMap(([, c]) => c.t), d.patient.t, ...(d.patient.curve ? d.patient.curve.t : []));
  const X = (t) => L + (t / tmax) * (W - L - R), Y = (s) => T + (1 - s) * (H - T - B);
  svg.append(svgEl("line", { x1: L, y1: Y(0), x2: W - R, y2: Y(0), stroke: "#999" }), svgEl("line", { x1: L, y1: T, x2: L, y2: Y(0), stroke: "#999" }));
  for (const s of [0, 0.5, 1]) {
    const lab = svgEl("text", { x: L - 4, y: Y(s) + 3, "text-anchor": "end" }); lab.textContent = s; svg.append(lab);
  }
  for (const tt of [0, tmax / 2, tmax]) {
    const lab = svgEl("text", { x: X(tt), y: H - 10, "text-anchor": "middle" }); lab.textContent = Math.round(tt); svg.append(lab);
  }
  const xl = svgEl("text", { x: W - R, y: H - 1, "text-anchor": "end" }); xl.textContent = "months"; svg.append(xl);
  const colours = { high: "#c62828", low: "#3056d3" };
  for (const [name, c] of curves) {
    let path = `M${X(0)},${Y(1)}`;
    c.t.forEach((t, i) => { path += ` H${X(t)} V${Y(c.s[i])}`; });
    path += ` H${X(tmax)}`;
    svg.append(svgEl("path", { d: path, fill: "none", stroke: colours[name], "stroke-width": name === d.patient.group ? 2.2 : 1.2, opacity: name === d.patient.group ? 1 : 0.6 }));
    for (const ct of c.censor_t) {
      let i = 0; while (i + 1 < c.t.length && c.t[i + 1] <= ct) i++;
      svg.append(svgEl("line", { x1: X(ct), x2: X(ct), y1: Y(c.s[i]) - 3, y2: Y(c.s[i]) + 3, stroke: colours[name] }));
    }
    const lab = svgEl("text", { x: W - R - 2, y: name === "high" ? T + 10 : T + 22, "text-anchor": "end", style: `fill: ${colours[name]}` });
    lab.textContent = `${name} risk`; svg.append(lab);
  }
  if (d.patient.curve) {
    let path = `M${X(d.patient.curve.t[0])},${Y(d.patient.curve.s[0])}`;
    for (let i = 1; i < d.patient.curve.t.length; i++) path += ` L${X(d.patient.curve.t[i])},${Y(d.patient.curve.s[i])}`;
    svg.append(svgEl("path", { d: path, fill: "none", stroke: "#111", "stroke-dasharray": "4 3", "stroke-width": 1.5 }));
  }
  if (d.patient.km_s !== undefined) {
    const mark = svgEl("circle", { cx: X(d.patient.t), cy: Y(d.patient.km_s), r: 5, fill: d.patient.e ? "#111" : "#fff", stroke: "#111", "stroke-width": 2 });
    const title = svgEl("title"); title.textContent = `this patient: ${d.patient.e ? "event" : "censored"} at ${d.patient.t.toFixed(1)} months`;
    mark.append(title); svg.append(mark);
  }
  if (d.cohort.logrank_p != null) {
    const p = svgEl("text", { x: L + 6, y: Y(0) - 6 }); p.textContent = `log-rank p = ${d.cohort.logrank_p.toExponential(1)}`; svg.append(p);
  }
}

function drawRiskStrip(d) {
  const svg = $("risk-strip");
  svg.replaceChildren();
  const risks = d.cohort.risks;
  const lo = Math.min(...risks), hi = Math.max(...risks);
  const X = (r) => 10 + ((r - lo) / ((hi - lo) || 1)) * 300;
  for (const r of risks) svg.append(svgEl("line", { x1: X(r), x2: X(r), y1: 8, y2: 22, stroke: r > d.cohort.threshold ? "#e8a0a0" : "#a8b8ec" }));
  svg.append(svgEl("line", { x1: X(d.cohort.threshold), x2: X(d.cohort.threshold), y1: 4, y2: 26, stroke: "#666", "stroke-dasharray": "2 2" }));
  svg.append(svgEl("path", { d: `M${X(d.patient.risk)},6 l-5,-6 h10 z`, fill: "#111" }));
  svg.append(svgEl("line", { x1: X(d.patient.risk), x2: X(d.patient.risk), y1: 6, y2: 24, stroke: "#111", "stroke-width": 2 }));
  const cap = svgEl("text", { x: 10, y: 34 }); cap.textContent = "cohort out-of-fold risks (dashed: group split)"; svg.append(cap);
}

// ---------------------------------------------------------------- chat
function addMessage(role, text, scope) {
  const msg = el("div", { class: `msg ${role}` });
  if (scope) msg.append(el("span", { class: "scope", text: scope }));
  msg.append(document.createTextNode(text));
  $("chat-log").append(msg);
  $("chat-log").scrollTop = $("chat-log").scrollHeight;
  return msg;
}

async function ask(event) {
  event.preventDefault();
  const input = $("chat-input");
  const question = input.value.trim();
  if (!question || !state.slide) return;
  const bbox = $("chat-scope").checked && state.selection ? state.selection : null;
  addMessage("user", question, bbox ? `region [${bbox.join(", ")}]` : "whole slide");
  input.value = "";
  $("chat-send").disabled = true;
  try {
    const reply = await api(`/api/slides/${encodeURIComponent(state.slide.id)}/chat`, {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ question, bbox, history: state.history.slice(-20) }),
    });
    addMessage("assistant", reply.answer, reply.answerer);
    state.history.push({ role: "user", content: question }, { role: "assistant", content: reply.answer });
  } catch (err) {
    addMessage("assistant error", err.message);
  } finally {
    $("chat-send").disabled = false;
  }
}

// ---------------------------------------------------------------- start
async function main() {
  state.info = await api("/api/info");
  $("job-name").textContent = `job: ${state.info.job}`;
  const a = state.info.answerer;
  $("answerer-badge").textContent = `answerer: ${a.name}`;
  $("answerer-badge").title = a.description;
  $("chat-answerer").textContent = `Answered by ${a.name}` + (a.name === "job-facts" ? " (no VQA checkpoint given: answers are measurements from the job's outputs)" : "");
  $("chat-answerer").title = a.description;
  if (!window.OpenSeadragon) notice(state.info.openseadragon_hint);
  $("select-region").addEventListener("click", () => setSelecting(!state.selecting));
  $("patch-close").addEventListener("click", () => { $("patch-card").hidden = true; state.picked = null; redraw(); });
  $("clear-region").addEventListener("click", () => { state.selection = null; updateSelectionUi(); redraw(); });
  $("chat-form").addEventListener("submit", ask);
  await loadSlides();
  const wanted = new URLSearchParams(location.hash.slice(1)).get("slide");
  const first = state.slides.find((s) => s.id === wanted) || state.slides.find((s) => s.status !== "failed") || state.slides[0];
  if (first) await openSlide(first.id);
}

main().catch((err) => notice(`The viewer could not start: ${err.message}`));
