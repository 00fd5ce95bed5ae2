"use strict";
(function () {
  const HISTORY = 300;
  const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#d62728"];
  const LEVELS = { gpu: "l1 gpu", host_ram: "l2 ram", ssd: "l3 ssd" };
  const TIERS = { gpu: "gpu", host_ram: "ram", ssd: "ssd" };
  const series = { t: [], memory: {}, reserved: {}, hits: {}, swapOut: [], swapIn: [], tokens: [] };
  let previous = null;
  let updates = 0;

  function bytes(v) {
    if (v === null || v === undefined || isNaN(v)) return "-";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return (i === 0 ? v.toFixed(0) : v.toFixed(v >= 100 ? 0 : 1)) + " " + units[i];
  }
  function pct(v) { return v === null || v === undefined ? "-" : (v * 100).toFixed(1) + "%"; }
  function num(v, d) { return v === null || v === undefined ? "-" : Number(v).toFixed(d); }
  function push(arr, v) { arr.push(v); if (arr.length > HISTORY) arr.shift(); }
  function keyed(map, key) { if (!map[key]) map[key] = new Array(series.t.length - 1).fill(null); return map[key]; }

  function ingest(p) {
    const s = p.snapshot;
    push(series.t, s.uptime_seconds);
    for (const tier of s.tiers) {
      push(keyed(series.memory, tier.tier), tier.allocated_bytes);
      push(keyed(series.reserved, tier.tier), tier.reserved_bytes);
    }
    const dt = previous ? s.uptime_seconds - previous.uptime_seconds : 0;
    for (const level of s.cache) {
      let rate = null;
      if (previous) {
        const before = previous.cache.find(function (c) { return c.tier === level.tier; });
        const h = level.hits - (before ? before.hits : 0);
        const n = h + level.misses - (before ? before.misses : 0);
        if (n > 0) rate = h / n;
      }
      push(keyed(series.hits, level.tier), rate);
    }
    const rate = function (now, before) { return previous && dt > 0 ? (now - before) / dt : null; };
    push(series.swapOut, rate(s.swap_out.bytes, previous ? previous.swap_out.bytes : 0));
    push(series.swapIn, rate(s.swap_in.bytes, previous ? previous.swap_in.bytes : 0));
    push(series.tokens, rate(s.tokens.count, previous ? previous.tokens.count : 0));
    previous = s;
  }

  function niceMax(v) {
    if (!(v > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  function draw(canvas, lines, opts) {
    const ratio = window.devicePixelRatio || 1;
    const w = canvas.clientWidth, h = canvas.clientHeight;
    if (canvas.width !== Math.round(w * ratio) || canvas.height !== Math.round(h * ratio)) {
      canvas.width = Math.round(w * ratio);
      canvas.height = Math.round(h * ratio);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, w, h);
    const fg = getComputedStyle(document.body).color;
    const left = 64, right = 8, top = 18, bottom = 20;
    const pw = w - left - right, ph = h - top - bottom;
    let max = opts.max || 0;
    if (!opts.max) for (const l of lines) for (const v of l.values) if (v !== null && v > max) max = v;
    max = opts.max || niceMax(max);
    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = fg;
    ctx.strokeStyle = "rgba(128,128,128,0.3)";
    ctx.lineWidth = 1;
    for (let i = 0; i <= 4; i++) {
      const y = top + ph - (ph * i) / 4;
      ctx.beginPath(); ctx.moveTo(left, y); ctx.lineTo(left + pw, y); ctx.stroke();
      ctx.textAlign = "right"; ctx.textBaseline = "middle";
      ctx.fillText(opts.format((max * i) / 4), left - 6, y);
    }
    const n = series.t.length;
    if (n > 1) {
      ctx.textAlign = "left"; ctx.textBaseline = "top";
      ctx.fillText("-" + (series.t[n - 1] - series.t[0]).toFixed(0) + " s", left, top + ph + 4);
      ctx.textAlign = "right";
      ctx.fillText("now", left + pw, top + ph + 4);
    }
    let legendX = left;
    lines.forEach(function (l, idx) {
      ctx.strokeStyle = l.color || COLORS[idx % COLORS.length];
      ctx.setLineDash(l.dashed ? [5, 4] : []);
      ctx.lineWidth = 1.8;
      ctx.beginPath();
      let pen = false;
      const count = l.values.length;
      // At least a minute of points across, so that a short run is not a sliver.
      const span = Math.max(60, count, 2);
      for (let i = 0; i < count; i++) {
        const v = l.values[i];
        if (v === null || v === undefined) { pen = false; continue; }
        const x = left + (pw * (i + span - count)) / (span - 1);
        const y = top + ph - (ph * Math.min(v, max)) / max;
        if (pen) ctx.lineTo(x, y); else { ctx.moveTo(x, y); pen = true; }
      }
      ctx.stroke();
      ctx.setLineDash([]);
      if (!l.dashed) {
        ctx.fillStyle = ctx.strokeStyle;
        ctx.fillRect(legendX, 4, 10, 3);
        ctx.fillStyle = fg;
        ctx.textAlign = "left"; ctx.textBaseline = "middle";
        ctx.fillText(l.label, legendX + 14, 6);
        legendX += ctx.measureText(l.label).width + 30;
      }
    });
    canvas.dataset.points = String(n);
  }

  function render() {
    const memLines = [];
    Object.keys(series.memory).forEach(function (tier, i) {
      const color = COLORS[i % COLORS.length];
      memLines.push({ label: TIERS[tier] || tier, values: series.memory[tier], color: color });
      memLines.push({ label: "", values: series.reserved[tier], color: color, dashed: true });
    });
    draw(document.getElementById("chart-memory"), memLines, { format: bytes });
    const hitLines = Object.keys(series.hits).map(function (tier, i) {
      return { label: LEVELS[tier] || tier, values: series.hits[tier], color: COLORS[i % COLORS.length] };
    });
    draw(document.getElementById("chart-hits"), hitLines, { max: 1, format: pct });
    draw(document.getElementById("chart-swap"), [
      { label: "out (write)", values: series.swapOut },
      { label: "in (read)", values: series.swapIn },
    ], { format: function (v) { return bytes(v) + "/s"; } });
    draw(document.getElementById("chart-tokens"), [{ label: "tokens/s", values: series.tokens }],
      { format: function (v) { return num(v, v < 10 ? 1 : 0); } });
  }

  function cards(p) {
    const r = p.report;
    const s = p.snapshot;
    const items = [
      ["tokens/s (generation)", num(r.tokens_per_second, 2)],
      ["tokens", String(r.tokens)],
      ["cache hit rate", pct(r.cache_hit_rate)],
      ["compression savings", pct(r.compression_savings)],
      ["swap ops out / in", r.swap_out_operations + " / " + r.swap_in_operations],
      ["swap latency mean", (r.swap_latency_mean_seconds * 1e3).toFixed(2) + " ms"],
      ["gc runs / min", num(r.gc_runs_per_minute, 2)],
      ["migrations", String(r.migrations)],
    ];
    for (const t of s.tiers) {
      if (t.peak_reserved_bytes > 0 || t.allocations > 0) {
        items.push(["memory " + (TIERS[t.tier] || t.tier) + " now / peak", bytes(t.allocated_bytes) + " / " + bytes(t.peak_allocated_bytes)]);
      }
    }
    for (const ph of (s.phases || [])) {
      const overhead = ph.overhead === null || ph.overhead === undefined ? "" : " (" + pct(ph.overhead) + ")";
      items.push(["phase " + ph.phase + " " + ph.name, ph.state + overhead]);
    }
    const root = document.getElementById("cards");
    root.replaceChildren.apply(root, items.map(function (it) {
      const card = document.createElement("div");
      card.className = "card";
      const label = document.createElement("div");
      label.className = "label"; label.textContent = it[0];
      const value = document.createElement("div");
      value.className = "value"; value.textContent = it[1];
      card.append(label, value);
      return card;
    }));
    document.getElementById("uptime").textContent = "up " + s.uptime_seconds.toFixed(0) + " s";
  }

  function alerts(list) {
    const root = document.getElementById("alerts");
    if (!list.length) {
      const ok = document.createElement("div");
      ok.className = "ok"; ok.textContent = "no alerts";
      root.replaceChildren(ok);
      return;
    }
    root.replaceChildren.apply(root, list.map(function (a) {
      const div = document.createElement("div");
      div.className = "alert";
      div.dataset.alert = a.id;
      div.textContent = a.message + " (since " + new Date(a.since_unix_ms).toLocaleTimeString() + ")";
      return div;
    }));
  }

  const status = document.getElementById("status");
  const source = new EventSource("/events");
  source.addEventListener("snapshot", function (e) {
    const p = JSON.parse(e.data);
    ingest(p);
    cards(p);
    alerts(p.alerts);
    render();
    updates++;
    document.body.dataset.updates = String(updates);
    status.textContent = "live";
    status.className = "status live";
  });
  source.onerror = function () {
    status.textContent = "disconnected, retrying";
    status.className = "status down";
  };
  window.addEventListener("resize", render);
})();
