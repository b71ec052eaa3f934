// MedCLS stack viewer: a Streamlit component (API v1, no build step, no network).
// The series arrives once (medcls.engine.stack); scrolling, cine, window/level, zoom/pan and the
// measurements run here, with no message to the server per slice. The slice the reader stopped
// on (and the window) is reported back once the reader pauses, so the page's verdict control
// follows it.
(function () {
  "use strict";
  const root = document.getElementById("root");
  const LEVELS = 4096;
  const S = {
    args: null, data: null, dataId: null, key: null, n: 0, slices: [], i: 0,
    center: 0, width: 1, vx: 0.5, vy: 0.5, zoom: 1, tool: "pan", showHeat: true, alpha: 0.45,
    measures: {}, playing: false, fps: 8, timer: null, draft: null, lut: new Uint8Array(LEVELS),
    lastSent: null, idle: null, height: 0, decoded: 0, panels: 2, wheelAcc: 0, built: false,
  };
  const el = {};

  // ------------------------------------------------------------------ Streamlit protocol
  function post(type, extra) {
    window.parent.postMessage(Object.assign({ isStreamlitMessage: true, type: type }, extra), "*");
  }
  window.addEventListener("message", (ev) => {
    const m = ev.data;
    if (m && m.type === "streamlit:render") onRender(m.args || {}, m.theme);
  });
  post("streamlit:componentReady", { apiVersion: 1 });

  function setHeight() {
    const h = Math.ceil(document.documentElement.scrollHeight);
    if (h > S.height || h < S.height - 40) {  // grow at once; shrink only for a real change
      S.height = h;
      post("streamlit:setFrameHeight", { height: h });
    }
  }

  function report() {
    if (!S.args || !S.args.report) return;
    clearTimeout(S.idle);
    S.idle = setTimeout(() => {
      const v = { key: S.key, slice: S.i, center: round(S.center), width: round(S.width) };
      const same = S.lastSent && v.slice === S.lastSent.slice && v.center === S.lastSent.center &&
        v.width === S.lastSent.width;
      if (!same) {
        S.lastSent = v;
        post("streamlit:setComponentValue", { value: v, dataType: "json" });
      }
    }, 900);
  }

  // ------------------------------------------------------------------ render event
  function onRender(args, theme) {
    applyTheme(theme);
    const data = args.data;
    S.args = args;
    S.alpha = +args.alpha;
    S.panels = args.panels || 2;
    if (!data) return;
    const newData = args.data_id !== S.dataId;
    if (data.key !== S.key) {  // another series: its saved state, else its start
      S.key = data.key;
      S.n = data.slices.length;
      const saved = restore();
      S.i = saved ? Math.min(saved.i, S.n - 1) : Math.max(0, Math.min(data.start || 0, S.n - 1));
      S.center = saved ? saved.center : (data.window ? data.window[0] : 0);
      S.width = saved ? saved.width : (data.window ? data.window[1] : 1);
      S.vx = 0.5; S.vy = 0.5; S.zoom = 1; S.measures = {}; S.showHeat = args.show_heat !== false;
      S.lastSent = saved ? null : { slice: S.i, center: round(S.center), width: round(S.width) };
    }
    if (args.show_heat !== S.showHeatArg) {  // the page's overlay switch changed
      S.showHeatArg = args.show_heat;
      S.showHeat = args.show_heat !== false;
    }
    if (!S.built) build();
    S.data = data;
    if (newData) {
      S.dataId = args.data_id;
      decodeAll(data);
    }
    buildPresets();
    layout();
    draw();
  }

  function applyTheme(t) {
    if (!t) return;
    const r = document.documentElement.style;
    if (t.backgroundColor) r.setProperty("--bg", t.backgroundColor);
    if (t.secondaryBackgroundColor) r.setProperty("--bg2", t.secondaryBackgroundColor);
    if (t.textColor) r.setProperty("--fg", t.textColor);
    if (t.primaryColor) r.setProperty("--accent", t.primaryColor);
    if (t.font) document.body.style.fontFamily = t.font;
    document.body.classList.toggle("light", t.base === "light");
  }

  function storeKey() { return "medcls-stack:" + S.key; }
  function save() {
    try {
      sessionStorage.setItem(storeKey(), JSON.stringify({ i: S.i, center: S.center, width: S.width }));
    } catch (e) { /* storage may be off */ }
  }
  function restore() {
    try { return JSON.parse(sessionStorage.getItem(storeKey()) || "null"); } catch (e) { return null; }
  }

  // ------------------------------------------------------------------ decoding
  function bytesOf(uri) {
    const b64 = uri.slice(uri.indexOf(",") + 1);
    const bin = atob(b64);
    const out = new Uint8Array(bin.length);
    for (let k = 0; k < bin.length; k++) out[k] = bin.charCodeAt(k);
    return out;
  }
  async function pixels(uri) {
    const bmp = await createImageBitmap(new Blob([bytesOf(uri)], { type: "image/png" }),
      { colorSpaceConversion: "none", premultiplyAlpha: "none" });
    const c = document.createElement("canvas");
    c.width = bmp.width; c.height = bmp.height;
    const ctx = c.getContext("2d", { willReadFrequently: true });
    ctx.drawImage(bmp, 0, 0);
    return ctx.getImageData(0, 0, bmp.width, bmp.height).data;
  }
  function decodeAll(data) {
    const token = {};
    S.decodeToken = token;
    S.decoded = 0;
    S.slices = data.slices.map((s) => ({ meta: s, codes: null, rgba: null, heat: null, ready: false }));
    const order = [];
    for (let d = 0; d < S.n; d++) {  // the shown slice first, then outwards
      if (S.i + d < S.n) order.push(S.i + d);
      if (d > 0 && S.i - d >= 0) order.push(S.i - d);
    }
    (async () => {
      for (const k of order) {
        if (S.decodeToken !== token) return;
        const sl = S.slices[k], m = sl.meta, t0 = performance.now();
        try {
          if (m.image) {
            const px = await pixels(m.image);
            if (data.mode === "rgb") sl.rgba = px;
            else {
              const codes = new Uint16Array(m.w * m.h);
              for (let p = 0, q = 0; p < codes.length; p++, q += 4) codes[p] = (px[q] << 8) | px[q + 1];
              sl.codes = codes;
            }
            if (m.heat) {
              const hp = await pixels(m.heat);
              const heat = new Uint8Array(m.w * m.h);
              for (let p = 0, q = 0; p < heat.length; p++, q += 4) heat[p] = hp[q];
              sl.heat = heat;
            }
          }
        } catch (e) { sl.failed = true; }
        sl.ready = true;
        S.decoded++;
        S.decodeMs = (S.decodeMs || 0) + performance.now() - t0;
        if (k === S.i) draw();
        else if (S.decoded % 8 === 0 || S.decoded === S.n) drawTrack();
      }
    })();
  }

  // ------------------------------------------------------------------ building the DOM
  function button(text, title, on) {
    const b = document.createElement("button");
    b.type = "button"; b.textContent = text; b.title = title;
    b.addEventListener("click", (e) => { on(e); root.focus({ preventScroll: true }); });
    return b;
  }
  function sep() { const s = document.createElement("span"); s.className = "sep"; return s; }
  function labelled(text, input) {
    const l = document.createElement("label"); l.append(text, input); return l;
  }
  function numberInput(title, onSet) {
    const n = document.createElement("input");
    n.type = "number"; n.step = "any"; n.title = title;
    n.addEventListener("change", () => { if (n.value !== "" && isFinite(+n.value)) onSet(+n.value); });
    n.addEventListener("keydown", (e) => { e.stopPropagation(); if (e.key === "Enter") n.blur(); });
    return n;
  }

  function build() {
    S.built = true;
    const bar = document.createElement("div"); bar.className = "bar";
    el.tools = {};
    for (const [name, text, title] of [["pan", "Pan", "Left-drag pans (the wheel steps slices; Ctrl+wheel zooms)"],
      ["wl", "W/L", "Left-drag sets window/level (right-drag does too, with any tool)"],
      ["ruler", "Ruler", "Drag to measure a length in mm"],
      ["ellipse", "Ellipse", "Drag an elliptical region: its mean and SD"]]) {
      el.tools[name] = button(text, title, () => setTool(name));
      bar.append(el.tools[name]);
    }
    const clear = button("Clear", "Remove this slice's measurements", () => { delete S.measures[S.i]; draw(); });
    clear.classList.add("optional");
    bar.append(clear);
    bar.append(sep());
    el.preset = document.createElement("select");
    el.preset.title = "Window presets";
    el.preset.addEventListener("change", () => {
      const p = (S.data.presets || [])[+el.preset.value];
      if (p) setWindow(p[1], p[2]);
      el.preset.value = "";
    });
    bar.append(el.preset);
    el.level = numberInput("Level (window centre), in the scan's values", (v) => setWindow(v, S.width));
    el.wwidth = numberInput("Window width, in the scan's values", (v) => setWindow(S.center, v));
    el.levelLabel = labelled("L", el.level);
    el.widthLabel = labelled("W", el.wwidth);
    bar.append(el.levelLabel, el.widthLabel);
    el.heatBox = document.createElement("input"); el.heatBox.type = "checkbox";
    el.heatBox.addEventListener("change", () => { S.showHeat = el.heatBox.checked; draw(); });
    el.heatLabel = labelled("", el.heatBox);
    el.heatLabel.append("Heatmap");
    el.heatLabel.title = "Show the heatmap overlay (key h)";
    bar.append(el.heatLabel);
    el.cineSep = sep();
    el.play = button("▶ Cine", "Play / pause the slices (space)", () => setPlaying(!S.playing));
    el.fps = document.createElement("input"); el.fps.type = "number"; el.fps.className = "fps";
    el.fps.min = 1; el.fps.max = 30; el.fps.value = S.fps; el.fps.title = "Frames per second";
    el.fps.addEventListener("change", () => {
      S.fps = Math.max(1, Math.min(30, +el.fps.value || 8)); el.fps.value = S.fps;
      if (S.playing) { setPlaying(false); setPlaying(true); }
    });
    el.fps.addEventListener("keydown", (e) => e.stopPropagation());
    el.fpsLabel = labelled("", el.fps); el.fpsLabel.append("fps"); el.fpsLabel.classList.add("optional");
    bar.append(el.cineSep, el.play, el.fpsLabel);
    el.most = button("Most suspicious", "Go to the most suspicious slice (key m)", () => setSlice(S.data.most));
    bar.append(el.most);
    const reset = button("Reset", "Reset zoom, pan and window (double-click, key r)", resetAll);
    reset.classList.add("optional");
    bar.append(reset);
    root.append(bar);

    const stage = document.createElement("div"); stage.className = "stage";
    el.canvases = [];
    for (let p = 0; p < 2; p++) {
      const panel = document.createElement("div"); panel.className = "panel";
      const c = document.createElement("canvas"); c.className = "view"; c.dataset.panel = p;
      panel.append(c); stage.append(panel);
      el.canvases.push(c);
      pointerHandlers(c);
    }
    el.track = document.createElement("canvas"); el.track.className = "track";
    el.track.title = "Slices: the suspicious run in red, withheld slices grey, unreadable black; click or drag to go to a slice";
    trackHandlers(el.track);
    stage.append(el.track);
    root.append(stage);
    el.info = document.createElement("div"); el.info.className = "info";
    root.append(el.info);
    root.addEventListener("keydown", onKey);
    root.addEventListener("pointerenter", () => {
      let active = null;
      try { active = window.parent.document.activeElement; } catch (e) { active = null; }
      const typing = active && /INPUT|TEXTAREA|SELECT/.test(active.tagName) && active.tagName !== "IFRAME";
      if (!typing && document.activeElement === document.body) root.focus({ preventScroll: true });
    });
    window.addEventListener("resize", () => { layout(); draw(); });
    setTool("pan");
  }

  function buildPresets() {
    const d = S.data, values = d.mode !== "rgb";
    el.preset.innerHTML = "";
    const head = document.createElement("option"); head.value = ""; head.textContent = "Window preset…";
    el.preset.append(head);
    (d.presets || []).forEach((p, k) => {
      const o = document.createElement("option"); o.value = k; o.textContent = p[0]; el.preset.append(o);
    });
    el.preset.value = "";
    for (const x of [el.preset, el.levelLabel, el.widthLabel, el.tools.wl]) x.style.display = values ? "" : "none";
    const many = S.n > 1;
    for (const x of [el.cineSep, el.play, el.fpsLabel, el.track]) x.style.display = many ? "" : "none";
    el.most.style.display = many && d.most != null ? "" : "none";
    const anyHeat = d.slices.some((s) => s.heat);
    el.heatLabel.style.display = anyHeat ? "" : "none";
    el.heatBox.checked = S.showHeat;
    el.canvases[1].parentElement.style.display = S.panels === 2 ? "" : "none";
  }

  // ------------------------------------------------------------------ layout
  function layout() {
    const total = root.clientWidth || window.innerWidth;
    root.classList.toggle("compact", total < 560);
    const track = S.n > 1 ? 24 : 0;
    const pw = Math.max(120, Math.floor((total - track - 6 * (S.panels - 1)) / S.panels));
    let aspect = 0;
    for (const s of S.data.slices) if (s.w) aspect = Math.max(aspect, s.h / s.w);
    let maxH = S.args.height || 460;
    try {  // the images end inside the browser window where it can be arranged
      const top = window.frameElement.getBoundingClientRect().top;
      const room = window.parent.innerHeight - top - 40 - 16;
      if (top > 0 && room < maxH) maxH = Math.max(240, room);
    } catch (e) { /* not inside a same-origin page */ }
    if (S.fitKey === S.key && S.fitH) maxH = S.fitH;
    S.fitKey = S.key; S.fitH = maxH;
    const h = Math.max(160, Math.min(maxH, Math.round(pw * (aspect || 1))));
    for (const c of el.canvases) {
      c.width = pw; c.height = h; c.style.height = h + "px";
    }
    el.track.height = h; el.track.width = 18; el.track.style.height = h + "px";
  }

  // ------------------------------------------------------------------ drawing
  function makeLut() {
    const d = S.data, off = d.coding ? d.coding[0] : 0, step = d.coding ? d.coding[1] : 1;
    const lo = S.center - S.width / 2, w = Math.max(S.width, 1e-6);
    for (let k = 0; k < LEVELS; k++) {
      let g = (off + k * step - lo) / w;
      g = g < 0 ? 0 : g > 1 ? 1 : g;
      if (d.invert) g = 1 - g;
      S.lut[k] = Math.round(g * 255);
    }
  }
  function jet(t) {
    const c = (x) => Math.max(0, Math.min(1, x));
    return [c(1.5 - Math.abs(4 * t - 3)), c(1.5 - Math.abs(4 * t - 2)), c(1.5 - Math.abs(4 * t - 1))];
  }
  const JET = (() => { const a = []; for (let k = 0; k < 256; k++) a.push(jet(k / 255).map((v) => v * 255)); return a; })();

  function sliceBitmap(sl, withHeat) {
    const m = sl.meta, n = m.w * m.h;
    const img = new ImageData(m.w, m.h), out = img.data;
    const heat = withHeat ? sl.heat : null, a = S.alpha;
    for (let p = 0, q = 0; p < n; p++, q += 4) {
      let r, g, b;
      if (sl.codes) { r = g = b = S.lut[sl.codes[p]]; } else { r = sl.rgba[q]; g = sl.rgba[q + 1]; b = sl.rgba[q + 2]; }
      if (heat) {
        const hv = heat[p], w = a * hv / 255, col = JET[hv];
        r = r * (1 - w) + col[0] * w; g = g * (1 - w) + col[1] * w; b = b * (1 - w) + col[2] * w;
      }
      out[q] = r; out[q + 1] = g; out[q + 2] = b; out[q + 3] = 255;
    }
    if (!S.scratch || S.scratch.width !== m.w || S.scratch.height !== m.h) {
      S.scratch = document.createElement("canvas"); S.scratch.width = m.w; S.scratch.height = m.h;
    }
    S.scratch.getContext("2d").putImageData(img, 0, 0);
    return S.scratch;
  }

  function transform(c, m) {
    const fit = Math.min(c.width / m.w, c.height / m.h), s = fit * S.zoom;
    return { s: s, tx: c.width / 2 - S.vx * m.w * s, ty: c.height / 2 - S.vy * m.h * s };
  }

  function poly(ctx, pts, color, width, close) {
    if (!pts || pts.length < 2) return;
    ctx.strokeStyle = color; ctx.lineWidth = width; ctx.beginPath();
    ctx.moveTo(pts[0][0], pts[0][1]);
    for (let k = 1; k < pts.length; k++) ctx.lineTo(pts[k][0], pts[k][1]);
    if (close) ctx.closePath();
    ctx.stroke();
  }

  function draw() {
    if (!S.data || !el.canvases) return;
    makeLut();
    const sl = S.slices[S.i], m = sl ? sl.meta : null;
    const heatShown = S.showHeat && sl && sl.heat;
    for (let p = 0; p < S.panels; p++) {
      const c = el.canvases[p], ctx = c.getContext("2d");
      ctx.setTransform(1, 0, 0, 1, 0, 0);
      ctx.fillStyle = "#000"; ctx.fillRect(0, 0, c.width, c.height);
      const overlay = S.panels === 1 ? heatShown : (p === 1 && heatShown);
      if (!sl || !m.image || !sl.ready || sl.failed) {
        ctx.fillStyle = "#bbb"; ctx.font = "14px sans-serif";
        ctx.fillText(!m || !m.image || sl.failed ? "This slice could not be read" : "Loading…", 12, 24);
        continue;
      }
      const t = transform(c, m);
      ctx.setTransform(t.s, 0, 0, t.s, t.tx, t.ty);
      ctx.imageSmoothingEnabled = t.s < 4;
      ctx.drawImage(sliceBitmap(sl, overlay), 0, 0);
      const lw = 1.6 / t.s;
      if (p === 0 || S.panels === 1) poly(ctx, m.outline, "rgb(255,215,0)", lw, true);
      if (overlay && m.region) {
        poly(ctx, m.region, "#fff", lw, true);
        const b = m.box; ctx.strokeStyle = "rgb(0,255,0)"; ctx.lineWidth = lw;
        ctx.strokeRect(b[0], b[1], b[2] - b[0], b[3] - b[1]);
      }
      drawMeasures(ctx, t, m);
      ctx.setTransform(1, 0, 0, 1, 0, 0);
      corner(ctx, c, p, m, overlay);
    }
    drawTrack();
    drawInfo();
    el.level.value = round(S.center); el.wwidth.value = round(S.width);
    for (const [name, b] of Object.entries(el.tools)) b.classList.toggle("on", name === S.tool);
    el.play.textContent = S.playing ? "❚❚ Pause" : "▶ Cine";
    setHeight();
  }

  function corner(ctx, c, p, m, overlay) {
    ctx.font = "13px sans-serif"; ctx.fillStyle = "rgba(255,255,255,0.92)";
    ctx.shadowColor = "#000"; ctx.shadowBlur = 3;
    const titles = S.args.titles || ["Scan", "Heatmap"];
    let title = titles[p] || "";
    if (overlay) title = (titles[1] || "Heatmap") + (m.heat_class ? " · " + m.heat_class : "");
    else if (p === 1) title = m.heat ? "Heatmap off (h)" : "Heatmap hidden";
    ctx.textAlign = "right"; ctx.fillText(title, c.width - 8, 18);
    ctx.textAlign = "left";
    if (S.n > 1) ctx.fillText(`Slice ${S.i + 1}/${S.n}` + (m.position != null ? `  ${m.position.toFixed(1)} mm` : ""), 8, 18);
    if (S.data.mode !== "rgb") ctx.fillText(`W ${round(S.width)}  L ${round(S.center)}`, 8, c.height - 10);
    ctx.textAlign = "right"; ctx.fillText(`×${S.zoom.toFixed(1)}`, c.width - 8, c.height - 10);
    ctx.textAlign = "left"; ctx.shadowBlur = 0;
  }

  // ------------------------------------------------------------------ measurements
  function spacing(m) { return m.spacing || null; }
  function rulerText(a, b, m) {
    const sp = spacing(m), dx = b[0] - a[0], dy = b[1] - a[1];
    if (!sp) return `${Math.hypot(dx, dy).toFixed(1)} px (no pixel spacing)`;
    return `${Math.hypot(dx * sp[1], dy * sp[0]).toFixed(1)} mm`;
  }
  function ellipseStats(a, b, m) {
    const sl = S.slices[S.i], d = S.data;
    const cx = (a[0] + b[0]) / 2, cy = (a[1] + b[1]) / 2, rx = Math.abs(b[0] - a[0]) / 2, ry = Math.abs(b[1] - a[1]) / 2;
    if (rx < 0.5 || ry < 0.5) return null;
    let n = 0, sum = 0, sq = 0;
    const off = d.coding ? d.coding[0] : 0, step = d.coding ? d.coding[1] : 1;
    for (let y = Math.max(0, Math.floor(cy - ry)); y <= Math.min(m.h - 1, Math.ceil(cy + ry)); y++) {
      for (let x = Math.max(0, Math.floor(cx - rx)); x <= Math.min(m.w - 1, Math.ceil(cx + rx)); x++) {
        const ux = (x + 0.5 - cx) / rx, uy = (y + 0.5 - cy) / ry;
        if (ux * ux + uy * uy > 1) continue;
        const p = y * m.w + x;
        const v = sl.codes ? off + sl.codes[p] * step : (sl.rgba[4 * p] + sl.rgba[4 * p + 1] + sl.rgba[4 * p + 2]) / 3;
        n++; sum += v; sq += v * v;
      }
    }
    if (!n) return null;
    const mean = sum / n, sd = Math.sqrt(Math.max(0, sq / n - mean * mean));
    const sp = spacing(m);
    const area = sp ? Math.PI * rx * ry * sp[0] * sp[1] : null;
    return { n: n, mean: mean, sd: sd, area: area };
  }
  function statsText(st) {
    if (!st) return "";
    const unit = S.data.mode === "rgb" ? " (grey level)" : (S.data.unit ? " " + S.data.unit : "");
    return `mean ${fmt(st.mean)}, SD ${fmt(st.sd)}${unit} · ${st.n} px` + (st.area != null ? ` · ${st.area.toFixed(1)} mm²` : "");
  }
  function drawMeasures(ctx, t, m) {
    const list = (S.measures[S.i] || []).concat(S.draft ? [S.draft] : []);
    const lw = 1.5 / t.s;
    ctx.font = `${13 / t.s}px sans-serif`;
    for (const ms of list) {
      ctx.strokeStyle = "#ffe28a"; ctx.fillStyle = "#ffe28a"; ctx.lineWidth = lw;
      const [a, b] = [ms.a, ms.b];
      if (ms.type === "ruler") {
        ctx.beginPath(); ctx.moveTo(a[0], a[1]); ctx.lineTo(b[0], b[1]); ctx.stroke();
        for (const q of [a, b]) { ctx.beginPath(); ctx.arc(q[0], q[1], 2.5 / t.s, 0, 2 * Math.PI); ctx.fill(); }
        ctx.fillText(rulerText(a, b, m), b[0] + 6 / t.s, b[1] - 6 / t.s);
      } else {
        ctx.beginPath();
        ctx.ellipse((a[0] + b[0]) / 2, (a[1] + b[1]) / 2, Math.abs(b[0] - a[0]) / 2, Math.abs(b[1] - a[1]) / 2, 0, 0, 2 * Math.PI);
        ctx.stroke();
        const st = ellipseStats(a, b, m);
        if (st) ctx.fillText(`${fmt(st.mean)} ± ${fmt(st.sd)}`, Math.max(a[0], b[0]) + 4 / t.s, Math.min(a[1], b[1]));
      }
    }
  }

  // ------------------------------------------------------------------ scroll bar
  function drawTrack() {
    if (S.n <= 1 || !el.track) return;
    const c = el.track, ctx = c.getContext("2d"), H = c.height, W = c.width, n = S.n, mk = S.data.marks || {};
    const y = (k) => (k / n) * H;
    ctx.clearRect(0, 0, W, H);
    ctx.fillStyle = "rgba(128,128,128,0.25)"; ctx.fillRect(0, 0, W, H);
    for (const r of mk.others || []) { ctx.fillStyle = "rgba(214,39,40,0.45)"; ctx.fillRect(0, y(r[0]), W, y(r[1]) - y(r[0])); }
    if (mk.run) { ctx.fillStyle = "rgba(214,39,40,0.95)"; ctx.fillRect(0, y(mk.run[0]), W, y(mk.run[1]) - y(mk.run[0])); }
    const th = Math.max(2, H / n);
    for (const k of mk.withheld || []) { ctx.fillStyle = "#9a9a9a"; ctx.fillRect(W - 6, y(k), 6, Math.max(2, th - 1)); }
    for (const k of mk.unread || []) { ctx.fillStyle = "#111"; ctx.fillRect(0, y(k), W, Math.max(2, th - 1)); }
    ctx.strokeStyle = "#fff"; ctx.lineWidth = 2;
    ctx.strokeRect(1, y(S.i) + 1, W - 2, Math.max(3, th - 2));
    if (S.decoded < S.n) {  // loading: how far
      ctx.fillStyle = "rgba(255,255,255,0.5)"; ctx.fillRect(0, H - 3, W * S.decoded / S.n, 3);
    }
  }
  function trackHandlers(c) {
    let down = false;
    const go = (e) => {
      const r = c.getBoundingClientRect();
      setSlice(Math.floor(((e.clientY - r.top) / r.height) * S.n));
    };
    c.addEventListener("pointerdown", (e) => { down = true; c.setPointerCapture(e.pointerId); go(e); });
    c.addEventListener("pointermove", (e) => { if (down) go(e); });
    c.addEventListener("pointerup", () => { down = false; });
  }

  // ------------------------------------------------------------------ text under the images
  function esc(s) { const d = document.createElement("div"); d.textContent = s == null ? "" : String(s); return d.innerHTML; }
  function drawInfo() {
    const sl = S.slices[S.i];
    if (!sl) { el.info.innerHTML = ""; return; }
    const m = sl.meta;
    const where = (S.n > 1 ? `Slice ${S.i + 1} of ${S.n}` : "") +
      (m.position != null ? ` · ${m.position.toFixed(1)} ${S.data.position_unit || "mm"}` : "");
    let html = "";
    if (S.args.details !== false) {  // the page may say these itself (one scan)
      html += `<div class="line">${where ? `<span class="where">${esc(where)}</span>` : ""}` +
        `<span class="answer ${esc(m.kind)}">${esc(m.answer)}</span></div>`;
      if (m.probs && m.probs.length) html += `<div class="probs">${m.probs.map((p) => esc(p[0] + " " + p[2])).join(" · ")}</div>`;
      for (const note of m.notes || []) html += `<div class="note">${esc(note)}</div>`;
    }
    const ms = S.measures[S.i] || [];
    ms.forEach((x, k) => {
      html += `<div class="measure">${x.type === "ruler" ? "Ruler " + (k + 1) + ": " + esc(rulerText(x.a, x.b, m))
        : "Ellipse " + (k + 1) + ": " + esc(statsText(ellipseStats(x.a, x.b, m)))}</div>`;
    });
    if (S.n > 1) {
      html += `<div class="legend">Scroll: wheel or ↑/↓ · W/L: right-drag · zoom: Ctrl+wheel` +
        `<i style="background:rgba(214,39,40,.95)"></i>suspicious run<i style="background:#9a9a9a"></i>withheld` +
        `<i style="background:#111;border:1px solid #777"></i>unreadable</div>`;
    } else {
      html += `<div class="legend">W/L: right-drag or type the values · zoom: wheel · pan: drag · reset: double-click</div>`;
    }
    if (S.data.scale_note) html += `<div class="legend">${esc(S.data.scale_note)}</div>`;
    el.info.innerHTML = html;
  }

  // ------------------------------------------------------------------ actions
  function setSlice(k, fromLink) {
    k = Math.max(0, Math.min(S.n - 1, k | 0));
    if (k === S.i) return;
    S.i = k; S.draft = null;
    draw(); save(); report();
    if (!fromLink) tellLinked();
  }

  // side by side: viewers of one study in the same plane follow each other by position (mm)
  const channel = "BroadcastChannel" in window ? new BroadcastChannel("medcls-stack-link") : null;
  function tellLinked() {
    const m = S.slices[S.i] && S.slices[S.i].meta;
    if (!channel || !S.args.link || !m || m.position == null) return;
    channel.postMessage({ group: S.args.link, plane: S.data.plane, key: S.key, position: m.position });
  }
  if (channel) channel.onmessage = (ev) => {
    const msg = ev.data;
    if (!S.args || !S.args.link || msg.group !== S.args.link || msg.key === S.key) return;
    if (!S.data || msg.plane !== S.data.plane || !S.data.plane) return;
    let best = -1, dist = Infinity;
    S.data.slices.forEach((s, k) => {
      if (s.position != null && Math.abs(s.position - msg.position) < dist) { dist = Math.abs(s.position - msg.position); best = k; }
    });
    const gap = S.data.spacing_mm || 5;
    if (best >= 0 && dist <= 1.5 * gap) setSlice(best, true);
  };
  function setWindow(c, w) {
    if (!isFinite(c) || !isFinite(w)) return;
    S.center = c; S.width = Math.max(w, minWidth());
    draw(); save(); report();
  }
  function minWidth() { return S.data && S.data.coding ? S.data.coding[1] : 1; }
  function setTool(name) { S.tool = name; for (const c of el.canvases) c.className = "view tool-" + name; draw(); }
  function setPlaying(on) {
    S.playing = on;
    clearInterval(S.timer);
    if (on) S.timer = setInterval(() => {
      const k = S.i + 1 >= S.n ? 0 : S.i + 1;
      S.i = k; draw();
    }, 1000 / S.fps);
    else { save(); report(); }
    draw();
  }
  function resetView() { S.zoom = 1; S.vx = 0.5; S.vy = 0.5; draw(); }
  function resetAll() {
    const w = S.data.window;
    if (w) { S.center = w[0]; S.width = w[1]; }
    resetView(); save(); report();
  }

  function onKey(e) {
    if (/INPUT|SELECT/.test((e.target || {}).tagName || "")) return;
    const k = e.key;
    const step = { ArrowUp: -1, ArrowLeft: -1, k: -1, PageUp: -5, ArrowDown: 1, ArrowRight: 1, j: 1, PageDown: 5 }[k];
    if (step !== undefined && S.n > 1) { setSlice(S.i + step); e.preventDefault(); return; }
    if (k === "Home") { setSlice(0); e.preventDefault(); }
    else if (k === "End") { setSlice(S.n - 1); e.preventDefault(); }
    else if (k === " " && S.n > 1) { setPlaying(!S.playing); e.preventDefault(); }
    else if (k === "r") resetAll();
    else if (k === "m" && S.data.most != null) setSlice(S.data.most);
    else if (k === "h") { S.showHeat = !S.showHeat; el.heatBox.checked = S.showHeat; draw(); }
    else if (k === "Escape") { S.draft = null; setTool("pan"); }
  }

  function imagePoint(c, e) {
    const r = c.getBoundingClientRect(), m = S.slices[S.i].meta, t = transform(c, m);
    const x = (e.clientX - r.left) * (c.width / r.width), y = (e.clientY - r.top) * (c.height / r.height);
    return [(x - t.tx) / t.s, (y - t.ty) / t.s];
  }

  function pointerHandlers(c) {
    let drag = null;
    c.addEventListener("contextmenu", (e) => e.preventDefault());
    c.addEventListener("pointerdown", (e) => {
      root.focus({ preventScroll: true });
      const sl = S.slices[S.i];
      if (!sl || !sl.ready || !sl.meta.image) return;
      c.setPointerCapture(e.pointerId);
      const mode = e.button === 2 ? (S.data.mode === "rgb" ? null : "wl") : e.button === 1 ? "pan" : S.tool;
      if (!mode) return;
      drag = { mode: mode, x: e.clientX, y: e.clientY, c0: S.center, w0: S.width, vx: S.vx, vy: S.vy,
        a: imagePoint(c, e) };
      if (mode === "ruler" || mode === "ellipse") S.draft = { type: mode, a: drag.a, b: drag.a };
      e.preventDefault();
    });
    c.addEventListener("pointermove", (e) => {
      if (!drag) return;
      const dx = e.clientX - drag.x, dy = e.clientY - drag.y, m = S.slices[S.i].meta;
      if (drag.mode === "wl") {
        const range = S.data.range || [S.center - S.width, S.center + S.width];
        const sens = Math.max((range[1] - range[0]) / 400, minWidth() / 4);
        S.center = drag.c0 + dy * sens; S.width = Math.max(minWidth(), drag.w0 + dx * sens);
        draw();
      } else if (drag.mode === "pan") {
        const t = transform(c, m);
        S.vx = drag.vx - (dx * (c.width / c.getBoundingClientRect().width)) / (t.s * m.w);
        S.vy = drag.vy - (dy * (c.height / c.getBoundingClientRect().height)) / (t.s * m.h);
        draw();
      } else if (S.draft) {
        S.draft.b = imagePoint(c, e); draw();
      }
    });
    const end = () => {
      if (!drag) return;
      if (drag.mode === "wl") { save(); report(); }
      if (S.draft) {
        const d = S.draft, m = S.slices[S.i].meta;
        const big = Math.hypot(d.b[0] - d.a[0], d.b[1] - d.a[1]) > 2 / transform(c, m).s;
        if (big) (S.measures[S.i] = S.measures[S.i] || []).push(d);
        S.draft = null; draw();
      }
      drag = null;
    };
    c.addEventListener("pointerup", end);
    c.addEventListener("pointercancel", end);
    c.addEventListener("dblclick", resetView);
    c.addEventListener("wheel", (e) => {
      e.preventDefault();
      if (S.n > 1 && !e.ctrlKey && !e.metaKey) {
        S.wheelAcc += e.deltaY;
        if (Math.abs(S.wheelAcc) >= 40 || Math.abs(e.deltaY) >= 40) {
          setSlice(S.i + Math.sign(S.wheelAcc));
          S.wheelAcc = 0;
        }
        return;
      }
      const sl = S.slices[S.i];
      if (!sl || !sl.meta.image) return;
      const before = imagePoint(c, e), m = sl.meta;
      S.zoom = Math.max(0.5, Math.min(16, S.zoom * Math.exp(-e.deltaY / 400)));
      const after = imagePoint(c, e);  // keep the point under the pointer in place
      S.vx += (before[0] - after[0]) / m.w; S.vy += (before[1] - after[1]) / m.h;
      draw();
    }, { passive: false });
  }

  // ------------------------------------------------------------------ helpers
  function round(v) { return Math.abs(v) >= 100 ? Math.round(v) : Math.round(v * 100) / 100; }
  function fmt(v) { return Math.abs(v) >= 100 ? v.toFixed(0) : Math.abs(v) >= 10 ? v.toFixed(1) : v.toFixed(2); }

  // for tests and for people at the console: where things are, in this frame's coordinates
  window.medclsStack = {
    state: () => ({ slice: S.i, n: S.n, center: S.center, width: S.width, zoom: S.zoom, tool: S.tool,
      decoded: S.decoded, decodeMs: S.decodeMs, playing: S.playing, measures: S.measures[S.i] || [], key: S.key }),
    toClient: (x, y, panel) => {
      const c = el.canvases[panel || 0], m = S.slices[S.i].meta, t = transform(c, m), r = c.getBoundingClientRect();
      return [r.left + (x * t.s + t.tx) * (r.width / c.width), r.top + (y * t.s + t.ty) * (r.height / c.height)];
    },
    measureText: () => [...el.info.querySelectorAll(".measure")].map((d) => d.textContent),
  };
})();
