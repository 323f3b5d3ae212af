// Token explorer of report.html: reads the JSON in #report-data (written by analysis/report.py).
// Each token is a <span class="tok" data-sample data-position>; clicking it fills
// #position-detail with the layer x site entropy grid and the top-k table of that position.
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("report-data").textContent);
  const note = document.getElementById("explorer-note");
  const text = document.getElementById("token-text");
  const detail = document.getElementById("position-detail");
  const sampleSelect = document.getElementById("sample-select");
  const siteSelect = document.getElementById("site-select");
  const layerSelect = document.getElementById("layer-select");
  const legend = document.getElementById("legend");
  if (!data.samples || data.samples.length === 0) {
    document.getElementById("explorer-controls").hidden = true;
    note.textContent = data.note || "No samples to show.";
    detail.textContent = "";
    return;
  }
  // Viridis (colour-blind safe, monotone in lightness), 9 stops from low to high entropy.
  const VIRIDIS = ["#440154", "#472d7b", "#3b528b", "#2c728e", "#21918c", "#28ae80",
                   "#5ec962", "#addc30", "#fde725"];
  const keyIndex = new Map(data.keys.map((k, i) => [k[0] + "/" + k[1], i]));
  const layers = [...new Set(data.keys.map((k) => k[1]))].sort((a, b) => a - b);
  let current = null; // {sample, index}

  function hexToRgb(h) { return [1, 3, 5].map((i) => parseInt(h.slice(i, i + 2), 16)); }
  function colour(t) {
    const x = Math.min(Math.max(t, 0), 1) * (VIRIDIS.length - 1);
    const i = Math.min(Math.floor(x), VIRIDIS.length - 2);
    const a = hexToRgb(VIRIDIS[i]), b = hexToRgb(VIRIDIS[i + 1]);
    const c = a.map((v, j) => Math.round(v + (b[j] - v) * (x - i)));
    return "rgb(" + c.join(",") + ")";
  }
  function ink(t) { return t < 0.55 ? "#fff" : "#000"; } // readable text on the colour
  function tokenText(id) {
    const s = data.vocab[String(id)];
    return s === undefined ? "#" + id : s;
  }
  function visible(s) {
    return s.replace(/\n/g, "\u21b5\n").replace(/\t/g, "\u2192") || "\u2205";
  }
  function option(select, value, label) {
    const o = document.createElement("option");
    o.value = value; o.textContent = label; select.appendChild(o);
  }
  function el(tag, attrs, content) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (content !== undefined) e.textContent = content;
    return e;
  }

  data.samples.forEach((s, i) => option(sampleSelect, i, String(s.id)));
  data.sites.forEach((s) => option(siteSelect, s, s));
  siteSelect.value = data.default_site;
  function fillLayers() {
    const site = siteSelect.value;
    const before = layerSelect.value === "" ? NaN : Number(layerSelect.value);
    layerSelect.innerHTML = "";
    layers.filter((l) => keyIndex.has(site + "/" + l)).forEach((l) => option(layerSelect, l, l));
    const have = [...layerSelect.options].map((o) => Number(o.value));
    layerSelect.value = have.includes(before) ? before : have[have.length - 1];
  }
  fillLayers();

  const cap = data.cap;
  note.textContent = "Showing " + cap.samples_shown + " of " + cap.samples_total + " samples (" +
    cap.positions_shown + " of " + cap.positions_total + " positions); the page embeds at most " +
    cap.max_samples + " samples and " + cap.max_values.toLocaleString("en") + " numbers " +
    "(ipl report --max-samples / --max-values). Each token is the input at its position; the " +
    "policies there predict the next token." + (data.topk ? "" :
    " This run has no top-k predictions: rerun `ipl entropy` with --topk 5 (the default) " +
    "to add them to the explorer.");

  function keyRange(k) {
    let hi = 0;
    for (const s of data.samples) for (const row of s.entropy) if (row[k] > hi) hi = row[k];
    return hi > 0 ? hi : 1;
  }
  function render() {
    const sample = data.samples[Number(sampleSelect.value)];
    const k = keyIndex.get(siteSelect.value + "/" + layerSelect.value);
    const hi = keyRange(k);
    legend.innerHTML = "";
    const bar = el("span", { class: "bar" });
    bar.style.background = "linear-gradient(to right," + VIRIDIS.join(",") + ")";
    legend.append(el("span", {}, "entropy of " + siteSelect.value + " layer " +
      layerSelect.value + ": 0"), bar, el("span", {}, hi.toFixed(2) + " nats"));
    text.innerHTML = "";
    sample.positions.forEach((p, i) => {
      const h = sample.entropy[i][k], t = h / hi;
      const span = el("span", { class: "tok", tabindex: "0", role: "option",
        "data-sample": String(sample.id), "data-position": String(p), "data-index": String(i),
        title: "position " + p + ": H = " + h.toFixed(3) + " nats" }, visible(tokenText(sample.token_ids[i])));
      span.style.background = colour(t);
      span.style.color = ink(t);
      text.appendChild(span);
    });
    if (current && current.sample === sample) show(current.index);
    else detail.querySelectorAll("table").forEach((t) => t.remove());
  }

  function show(i) {
    const sample = data.samples[Number(sampleSelect.value)];
    current = { sample: sample, index: i };
    text.querySelectorAll(".tok.selected").forEach((e) => e.classList.remove("selected"));
    const span = text.querySelector('.tok[data-index="' + i + '"]');
    if (span) { span.classList.add("selected"); span.setAttribute("aria-selected", "true"); }
    const p = sample.positions[i];
    const next = sample.positions[i + 1] === p + 1 ? sample.token_ids[i + 1] : null;
    detail.innerHTML = "";
    const head = el("div");
    head.append(el("h3", {}, "Sample " + sample.id + ", position " + p + ": " +
      JSON.stringify(tokenText(sample.token_ids[i])) + " \u2192 next token " +
      (next === null ? "(not in the table)" : JSON.stringify(tokenText(next)))));
    head.appendChild(grid(sample, i));
    detail.appendChild(head);
    if (data.topk) detail.appendChild(topkTable(sample, i, next));
    else detail.appendChild(el("p", { class: "note" }, "No top-k in this run: rerun " +
      "`ipl entropy --topk 5` (the default) and `ipl report RUN` to see each layer's predictions."));
  }

  function grid(sample, i) {
    const table = el("table", { class: "grid", id: "layer-grid" });
    const row0 = el("tr");
    row0.appendChild(el("th", {}, "layer \\ site"));
    data.sites.forEach((s) => row0.appendChild(el("th", {}, s)));
    table.appendChild(row0);
    const all = sample.entropy[i];
    const hi = Math.max(...all, 1e-9);
    layers.forEach((l) => {
      const tr = el("tr");
      tr.appendChild(el("th", {}, String(l)));
      data.sites.forEach((s) => {
        const k = keyIndex.get(s + "/" + l);
        if (k === undefined) { tr.appendChild(el("td")); return; }
        const td = el("td", { "data-layer": String(l), "data-site": s, "data-entropy": String(all[k]),
          title: s + " layer " + l + ": click to colour the text by it" }, all[k].toFixed(2));
        td.style.background = colour(all[k] / hi);
        td.style.color = ink(all[k] / hi);
        td.addEventListener("click", () => {
          siteSelect.value = s; fillLayers(); layerSelect.value = l; render();
        });
        tr.appendChild(td);
      });
      table.appendChild(tr);
    });
    const cap = el("caption", {}, "Entropy (nats) at this position; colour relative to its maximum " + hi.toFixed(2));
    table.prepend(cap);
    return table;
  }

  function topkTable(sample, i, next) {
    const site = siteSelect.value;
    const rows = layers.filter((l) => keyIndex.has(site + "/" + l)).map((l) => [site, l]);
    if (site !== "final" && keyIndex.has("final/" + layers[layers.length - 1]))
      rows.push(["final", layers[layers.length - 1]]);
    const table = el("table", { class: "topk", id: "topk-table" });
    table.appendChild(el("caption", {}, "Top-" + data.topk + " predictions of " + site +
      " per layer (probability in the lens's policy); \u2605 = the actual next token"));
    const row0 = el("tr");
    row0.append(el("th", {}, "site"), el("th", {}, "layer"));
    for (let r = 1; r <= data.topk; r++) row0.appendChild(el("th", {}, "#" + r));
    table.appendChild(row0);
    rows.forEach(([s, l]) => {
      const k = keyIndex.get(s + "/" + l);
      const tr = el("tr");
      tr.append(el("td", {}, s), el("td", {}, String(l)));
      for (let r = 0; r < data.topk; r++) {
        const id = sample.topk_ids[i][k][r], prob = sample.topk_probs[i][k][r];
        if (id < 0) { tr.appendChild(el("td")); continue; }
        const actual = next !== null && id === next;
        const td = el("td", { class: actual ? "actual" : "", "data-layer": String(l),
          "data-site": s, "data-rank": String(r + 1), "data-token-id": String(id),
          "data-prob": String(prob) });
        td.append(el("span", { class: "tokstr" }, (actual ? "\u2605 " : "") +
          JSON.stringify(tokenText(id))), document.createTextNode(" " + prob.toFixed(3)));
        tr.appendChild(td);
      }
      table.appendChild(tr);
    });
    return table;
  }

  text.addEventListener("click", (e) => {
    const span = e.target.closest(".tok");
    if (span) { span.focus(); show(Number(span.dataset.index)); }
  });
  text.addEventListener("keydown", (e) => {
    const span = e.target.closest(".tok");
    if (!span) return;
    const n = text.children.length, i = Number(span.dataset.index);
    const to = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: n - 1, Enter: i, " ": i }[e.key];
    if (to === undefined || to < 0 || to >= n) return;
    e.preventDefault();
    text.children[to].focus();
    show(to);
  });
  sampleSelect.addEventListener("change", () => { current = null; render(); });
  siteSelect.addEventListener("change", () => { fillLayers(); render(); });
  layerSelect.addEventListener("change", render);
  render();
})();
