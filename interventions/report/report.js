// Lesion report: draws the page's sections (the JSON document in #lesion-data) with plotly.js.
// Heatmaps show every cell's details on hover (also in the panel below each), pin a row's and a column's
// line plot on click, and move the image-token overlay to the hovered layer. `document.body.dataset.ready`
// is set once every plot is drawn.
(function () {
  "use strict";
  const doc = JSON.parse(document.getElementById("lesion-data").textContent);
  const root = document.getElementById("report");
  const drawing = [];
  const CONFIG = { displaylogo: false, responsive: true };

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v; else if (k === "text") node.textContent = v; else node.setAttribute(k, v);
    }
    for (const c of children) if (c) node.appendChild(c);
    return node;
  }

  function fmt(v) {
    if (v === null || v === undefined) return "n/a";
    if (typeof v === "number") return Number.isInteger(v) ? String(v) : String(+v.toPrecision(6));
    if (typeof v === "boolean") return String(v);
    if (typeof v === "object") return JSON.stringify(v);
    return String(v);
  }

  function transpose(z) {            // [row][column] -> [column][row]; rows are layers, columns tokens
    const cols = Math.max(0, ...z.map((r) => r.length));
    return Array.from({ length: cols }, (_, c) => z.map((r) => (c < r.length ? r[c] : null)));
  }

  function cellText(s, zT, c, l, z) {
    const pos = s.positions ? s.positions[c] : c;
    const lines = [`token ${JSON.stringify(s.y[c])} (position ${fmt(pos)})`];
    let where = `${s.axis} ${s.x[l]}`;
    if (s.windows) where += ` (restores layers ${s.windows[l][0]}-${s.windows[l][1]})`;
    lines.push(where, `site ${s.site}`, `value ${fmt(z === undefined ? zT[c][l] : z)} (${s.metric})`);
    if (s.clean !== null && s.clean !== undefined) {
      lines.push(`clean p ${fmt(s.clean)}` + (s.corrupted !== null && s.corrupted !== undefined ?
        `, corrupted p ${fmt(s.corrupted)}` : "") + (s.answer ? ` of ${JSON.stringify(s.answer)}` : ""));
    }
    if (s.topk && s.topk[l]) lines.push(`top-k: ${s.topk[l][c]}`);
    for (const [name, grid] of Object.entries(s.extra || {})) if (grid) lines.push(`${name} ${fmt(grid[l][c])}`);
    return lines;
  }

  function heatmap(div, s, z, title, diverging) {
    const zT = transpose(z);
    const text = zT.map((row, c) => row.map((v, l) => cellText(s, zT, c, l, v).join("<br>")));
    const height = Math.min(900, 140 + 22 * s.y.length);
    const trace = {
      type: "heatmap", z: zT, text, hovertemplate: "%{text}<extra></extra>", hoverongaps: false,
      colorscale: diverging ? "RdBu" : "Viridis", zmid: diverging ? 0 : undefined,
      x: s.x.map((_, i) => i), y: s.y.map((_, i) => i),
    };
    const layout = {      // at most 1,200 px wide; at most 40 labels across and 60 down (every cell keeps its hover)
      title: { text: title, font: { size: 13 } }, height, width: Math.min(1200, Math.max(360, 280 + 26 * s.x.length)),
      margin: { l: 150, r: 20, t: 36, b: 44 },
      xaxis: { title: s.axis, ...thinned(s.x.map((_, i) => i), s.x, 40) },
      yaxis: { autorange: "reversed", ...thinned(s.y.map((_, i) => i), s.y.map((t) => t.slice(0, 24)), 60) },
    };
    drawing.push(Plotly.newPlot(div, [trace], layout, CONFIG));
    return zT;
  }

  function thinned(xs, labels, most) {   // at most `most` tick labels, evenly spaced
    const step = Math.max(1, Math.ceil(xs.length / most));
    const keep = xs.filter((_, i) => i % step === 0);
    return { tickvals: keep, ticktext: keep.map((i) => labels[i]) };
  }

  function lineChart(div, title, xname, xs, ticktext) {
    drawing.push(Plotly.newPlot(div, [], {
      title: { text: title, font: { size: 12 } }, height: 260, width: 420, margin: { l: 50, r: 10, t: 34, b: 50 },
      xaxis: { title: xname, ...thinned(xs, ticktext, 12) }, yaxis: { title: "value" }, showlegend: true,
      legend: { font: { size: 10 } },
    }, CONFIG));
  }

  function pinCharts(box, s) {          // the two pinned line plots, made on first use
    if (!box.firstChild) {
      box.appendChild(el("div", { class: "pin-row plot" }));
      box.appendChild(el("div", { class: "pin-col plot" }));
      lineChart(box.children[0], `pinned rows: across ${s.axis}s`, s.axis, s.x.map((_, i) => i), s.x);
      lineChart(box.children[1], "pinned columns: across tokens", "token", s.y.map((_, i) => i),
        s.y.map((t) => t.slice(0, 10)));
    }
    return box.children;
  }

  function pinRow(box, s, zT, c) {      // one token across layers
    Plotly.addTraces(pinCharts(box, s)[0], { x: s.x.map((_, i) => i), y: zT[c], mode: "lines+markers",
      name: `${s.y[c]}`.slice(0, 18), hovertemplate: "%{y}<extra>%{fullData.name}</extra>" });
  }

  function pinColumn(box, s, zT, l) {   // one layer across tokens
    Plotly.addTraces(pinCharts(box, s)[1], { x: s.y.map((_, i) => i), y: zT.map((row) => row[l]),
      mode: "lines+markers", name: `${s.axis} ${s.x[l]}`, hovertemplate: "%{y}<extra>%{fullData.name}</extra>" });
  }

  function clickableTicks(plot, pinned, s, zT) {   // a token's label pins its row, a layer's its column
    const bind = (selector, act) => plot.querySelectorAll(selector).forEach((tick) => {
      const index = tick.__data__ ? Math.round(tick.__data__.x) : null;     // the tick's value: a row or column index
      if (index === null) return;
      tick.style.pointerEvents = "all";
      tick.style.cursor = "pointer";
      tick.onclick = () => act(index);
    });
    bind(".yaxislayer-above .ytick text", (c) => pinRow(pinned, s, zT, c));
    bind(".xaxislayer-above .xtick text", (l) => pinColumn(pinned, s, zT, l));
  }

  function overlay(div, s, zT, layer) {
    const im = s.image, side = im.side;
    const grid = Array.from({ length: side }, (_, r) => im.cells.slice(r * side, r * side + side).map((c) => zT[c][layer]));
    const names = Array.from({ length: side }, (_, r) => im.cells.slice(r * side, r * side + side)
      .map((c) => `${s.y[c]}: ${fmt(zT[c][layer])}`));
    const data = [{ type: "heatmap", z: grid, text: names, hovertemplate: "%{text}<extra></extra>", opacity: 0.55,
      colorscale: "Viridis", showscale: false }];
    const layout = { title: { text: `image tokens at ${s.axis} ${s.x[layer]}`, font: { size: 12 } }, width: 300,
      height: 320, margin: { l: 10, r: 10, t: 34, b: 10 },
      xaxis: { visible: false, range: [-0.5, side - 0.5] }, yaxis: { visible: false, range: [side - 0.5, -0.5] },
      images: [{ source: im.src, xref: "x", yref: "y", x: -0.5, y: -0.5, sizex: side, sizey: side,
        sizing: "stretch", layer: "below" }] };
    return Plotly.react(div, data, layout, CONFIG);
  }

  function bestLayer(s, zT) {
    let best = 0, top = -Infinity;
    s.x.forEach((_, l) => {
      const vals = s.image.cells.map((c) => zT[c][l]).filter((v) => v !== null);
      const mean = vals.reduce((a, b) => a + b, 0) / Math.max(1, vals.length);
      if (mean > top) { top = mean; best = l; }
    });
    return best;
  }

  function gridSection(s) {
    const box = el("section", { id: s.id, class: "grid", "data-grid": s.grid, "data-prompt": String(s.prompt) });
    const plot = el("div", { class: "plot heatmap" });
    const row = el("div", { class: "row" }, plot);
    box.appendChild(el("h2", { text: s.title }));
    box.appendChild(row);
    const details = el("div", { class: "details",
      text: "hover a cell for its details; click it to pin its row and column (a token's or a layer's label: that one)" });
    const pinned = el("div", { class: "pinned" });
    const clear = el("button", { class: "clear", text: "clear pins" });
    clear.addEventListener("click", () => { pinned.replaceChildren(); });
    box.append(details, el("div", { class: "row" }, clear), pinned);
    const zT = heatmap(plot, s, s.z, `${s.site} (${s.metric})`, false);
    let image = null;
    if (s.image) {
      image = el("div", { class: "plot overlay" });
      row.appendChild(image);
      drawing.push(overlay(image, s, zT, bestLayer(s, zT)));
    }
    plot.on("plotly_hover", (ev) => {
      const p = ev.points[0];
      details.textContent = cellText(s, zT, p.y, p.x).join("\n");
      if (image) overlay(image, s, zT, p.x);
    });
    plot.on("plotly_click", (ev) => {
      const p = ev.points[0];
      pinRow(pinned, s, zT, p.y);
      pinColumn(pinned, s, zT, p.x);
    });
    plot.on("plotly_afterplot", () => clickableTicks(plot, pinned, s, zT));
    clickableTicks(plot, pinned, s, zT);
    return box;
  }

  function compareSection(s) {
    const box = el("section", { id: s.id, class: "compare", "data-grid": s.grid });
    box.appendChild(el("h2", { text: `${s.title}: ${s.names[0]} against ${s.names[1]}` }));
    const row = el("div", { class: "row" });
    box.appendChild(row);
    [[s.z, s.names[0], false], [s.z_b, s.names[1], false], [s.diff, `${s.names[0]} - ${s.names[1]}`, true]]
      .forEach(([z, title, diverging]) => {
        const div = el("div", { class: "plot" });
        row.appendChild(div);
        heatmap(div, s, z, title, diverging);
      });
    return box;
  }

  function curvesSection(s) {
    const box = el("section", { id: s.id, class: "curves" }, el("h2", { text: s.title }));
    const row = el("div", { class: "row" });
    box.appendChild(row);
    for (const series of s.series) {
      const div = el("div", { class: "plot curve", "data-metric": series.name });
      row.appendChild(div);
      drawing.push(Plotly.newPlot(div, [{ x: s.x, y: series.y, mode: "lines+markers", name: series.name,
        hovertemplate: `${s.xname} %{x}<br>${series.name} %{y:.6g}<extra></extra>` }], {
        title: { text: series.name, font: { size: 12 } }, width: 380, height: 260,
        margin: { l: 50, r: 10, t: 34, b: 40 }, xaxis: { title: s.xname },
      }, CONFIG));
    }
    return box;
  }

  function tableSection(s) {
    const head = el("tr", {}, ...s.columns.map((c) => el("th", { text: c })));
    const body = el("tbody");
    s.rows.forEach((r, i) => body.appendChild(el("tr", {}, ...r.map((v, j) => {
      const attrs = { text: fmt(v), class: typeof v === "number" ? "num" : "" };
      if (s.sources[i][j]) attrs["data-source"] = s.sources[i][j];
      return el("td", attrs);
    }))));
    const tableEl = el("table", { class: s.wrap ? "wrap" : "" }, el("thead", {}, head), body);
    return el("section", { class: "table" }, el("h2", { text: s.title }), tableEl);
  }

  function gallerySection(s) {
    // one card per prompt and seed: its image before and after the edit, each with its judged label
    const box = el("section", { id: s.id, class: "gallery-section" }, el("h2", { text: s.title }));
    const select = el("select", { class: "filter" }, el("option", { value: "", text: "every prompt set" }),
      ...s.sets.map((name) => el("option", { value: name, text: name })));
    const gallery = el("div", { class: "gallery" });
    box.append(el("label", { text: "show: " }, select), gallery);
    const cards = new Map();
    s.items.forEach((item, i) => {
      const key = `${item.set}|${item.prompt}|${item.seed}`;
      if (!cards.has(key)) {
        const card = el("figure", { "data-set": item.set },
          el("figcaption", { text: `${item.prompt} · seed ${item.seed} · ${item.set}` }), el("div", { class: "pair" }));
        cards.set(key, card);
        gallery.appendChild(card);
      }
      cards.get(key).querySelector(".pair").appendChild(el("div", { class: "shot", "data-index": String(i), "data-phase": item.phase },
        el("img", { src: item.src, alt: `${item.prompt} (${item.phase})` }), el("div", { class: "phase", text: item.phase }),
        el("div", { class: "label", text: item.label || "(nothing judged)" })));
    });
    select.addEventListener("change", () => {
      for (const card of gallery.children) card.style.display = !select.value || card.dataset.set === select.value ? "" : "none";
    });
    return box;
  }

  const DRAW = {
    grid: gridSection, compare: compareSection, curves: curvesSection, table: tableSection, gallery: gallerySection,
    note: (s) => el("p", { class: "note", text: s.text }),
    png: (s) => el("section", { class: "png" }, el("h2", { text: s.title }), el("img", { class: "png", src: s.src, alt: s.title })),
    json: (s) => el("details", { class: "json" }, el("summary", { text: s.title }), el("pre", { text: s.text })),
  };

  root.appendChild(el("h1", { text: doc.title }));
  root.appendChild(el("div", { class: "summary" }, ...doc.summary.map(([k, v]) =>
    el("span", {}, document.createTextNode(`${k} `), el("b", { text: fmt(v) })))));
  for (const s of doc.sections) root.appendChild(DRAW[s.type](s));
  Promise.all(drawing).then(() => { document.body.dataset.ready = "1"; },
    (err) => { document.body.dataset.ready = "error"; root.prepend(el("p", { class: "note", text: String(err) })); });
})();
