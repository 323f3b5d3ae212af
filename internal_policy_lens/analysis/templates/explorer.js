// Token explorer and logit-lens grid of report.html: reads the JSON in #report-data (written by
// analysis/explorer.py). Each token is a <span class="tok" data-sample data-position>; clicking it
// fills #position-detail with the layer x site entropy grid and the top-k table of that position.
// #logit-lens shows, for the sample, each layer's top-1 token at every position.
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("report-data").textContent);
  const $ = (id) => document.getElementById(id);
  const note = $("explorer-note"), text = $("token-text"), detail = $("position-detail");
  const sampleSelect = $("sample-select"), siteSelect = $("site-select");
  const layerSelect = $("layer-select"), legend = $("legend"), context = $("sample-context");
  const lensSelect = $("lens-site-select"), lensGrid = $("logit-lens"), lensNote = $("lens-note");
  if (!data.samples || data.samples.length === 0) {
    $("explorer-controls").hidden = true;
    note.textContent = "No samples to show.";
    detail.textContent = "";
    return;
  }
  // Viridis (colour-blind safe, monotone in lightness), 9 stops from low to high entropy.
  const VIRIDIS = ["#440154", "#472d7b", "#3b528b", "#2c728e", "#21918c", "#28ae80",
                   "#5ec962", "#addc30", "#fde725"];
  const keyIndex = new Map(data.keys.map((k, i) => [k[0] + "/" + k[1], i]));
  const layers = [...new Set(data.keys.map((k) => k[1]))].sort((a, b) => a - b);
  const lastLayer = layers[layers.length - 1];
  let current = null; // index of the selected position, always one of the shown sample

  function hexToRgb(h) { return [1, 3, 5].map((i) => parseInt(h.slice(i, i + 2), 16)); }
  function colour(t) {
    const x = Math.min(Math.max(t, 0), 1) * (VIRIDIS.length - 1);
    const i = Math.min(Math.floor(x), VIRIDIS.length - 2);
    const a = hexToRgb(VIRIDIS[i]), b = hexToRgb(VIRIDIS[i + 1]);
    const c = a.map((v, j) => Math.round(v + (b[j] - v) * (x - i)));
    return "rgb(" + c.join(",") + ")";
  }
  function paint(e, t) { e.style.background = colour(t); e.style.color = t < 0.55 ? "#fff" : "#000"; }
  function tokenText(id) {
    const s = data.vocab[String(id)];
    return s === undefined ? "#" + id : s;
  }
  function visible(s) {
    return s.replace(/\n/g, "\u21b5\n").replace(/\t/g, "\u2192") || "\u2205";
  }
  // A grid cell of spaces alone would look empty: show them as open boxes.
  function cell(s) { return /^ +$/.test(s) ? s.replace(/ /g, "\u2423") : visible(s); }
  // Probabilities of peaked policies span many decades: 3 decimals, else 2 significant digits.
  function prob(p) { return p >= 0.001 ? p.toFixed(3) : p.toExponential(1); }
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
  function sample() { return data.samples[Number(sampleSelect.value)]; }
  // The token after position i: the next input token, or the response's last token (the tail).
  function nextToken(s, i) {
    if (s.positions[i + 1] === s.positions[i] + 1) return { id: s.token_ids[i + 1] };
    if (i === s.positions.length - 1 && s.context && s.context.tail) return { text: s.context.tail };
    return null;
  }
  function isNext(next, id) {
    return next !== null && (next.id !== undefined ? next.id === id : tokenText(id) === next.text);
  }
  function nextText(next) { return next.id !== undefined ? tokenText(next.id) : next.text; }

  data.samples.forEach((s, i) => option(sampleSelect, i, String(s.id)));
  data.sites.forEach((s) => option(siteSelect, s, s));
  data.sites.forEach((s) => option(lensSelect, s, s));
  lensSelect.value = data.default_site;
  function fillLayers(want) {
    const site = siteSelect.value;
    layerSelect.innerHTML = "";
    layers.filter((l) => keyIndex.has(site + "/" + l)).forEach((l) => option(layerSelect, l, l));
    const have = [...layerSelect.options].map((o) => Number(o.value));
    layerSelect.value = have.includes(want) ? want : have[have.length - 1];
  }
  function useKey(k) { siteSelect.value = data.keys[k][0]; fillLayers(data.keys[k][1]); }
  useKey(data.samples[0].default_key);

  const cap = data.cap;
  note.textContent = "Showing " + cap.samples_shown + " of " + cap.samples_total + " samples (" +
    cap.positions_shown + " of " + cap.positions_total + " positions); the page embeds at most " +
    cap.max_samples + " samples and " + cap.max_values.toLocaleString("en") + " numbers " +
    "(ipl report --max-samples / --max-values). Each token is the input at its position; the " +
    "policies there predict the next token. The tokens are first coloured at the site and " +
    "layer whose entropy varies most over the sample's positions." + (data.topk ? "" :
    " This run has no top-k predictions: rerun `ipl entropy` with --topk 5 (the default) " +
    "to add them to the explorer.");

  function keyRange(k) {
    let hi = 0;
    for (const s of data.samples) for (const row of s.entropy) if (row[k] > hi) hi = row[k];
    return hi > 0 ? hi : 1;
  }
  function showContext(s) {
    context.innerHTML = "";
    context.setAttribute("data-sample", String(s.id));
    context.removeAttribute("data-correct");
    const c = s.context;
    if (!c) { context.append(el("p", { class: "note" }, "No record text (responses.jsonl) for this sample.")); return; }
    const facts = el("dl");
    const add = (term, value, cls) => {
      if (value === null || value === undefined) return;
      facts.append(el("dt", {}, term), el("dd", cls ? { class: cls } : {}, value));
    };
    add("Question", c.prompt, "text");
    add("Response", c.response, "text");
    add("Reference answer", c.answer);
    if (c.correct !== null && c.correct !== undefined) {
      context.setAttribute("data-correct", String(c.correct));
      add("Boxed answer", c.correct ? "correct" : "wrong (or no \\boxed{})", c.correct ? "right" : "wrong");
    }
    context.append(facts);
  }
  function render() {
    const s = sample();
    const k = keyIndex.get(siteSelect.value + "/" + layerSelect.value);
    const hi = keyRange(k);
    legend.innerHTML = "";
    const bar = el("span", { class: "bar" });
    bar.style.background = "linear-gradient(to right," + VIRIDIS.join(",") + ")";
    legend.append(el("span", {}, "entropy of " + siteSelect.value + " layer " +
      layerSelect.value + ": 0"), bar, el("span", {}, hi.toFixed(2) + " nats"));
    text.innerHTML = "";
    s.positions.forEach((p, i) => {
      const h = s.entropy[i][k];
      const span = el("span", { class: "tok", tabindex: "0", role: "option",
        "data-sample": String(s.id), "data-position": String(p), "data-index": String(i),
        title: "position " + p + ": H = " + h.toFixed(3) + " nats" }, visible(tokenText(s.token_ids[i])));
      paint(span, h / hi);
      text.appendChild(span);
    });
    if (s.context && s.context.tail) {
      text.appendChild(el("span", { class: "tail", title: "the last token: the last position " +
        "predicts it, no analysed position takes it as input" }, visible(s.context.tail)));
    }
    if (current !== null) show(current);
  }

  function topkTitle(s, i, k) {
    const lines = [];
    for (let r = 0; r < data.topk; r++) {
      const id = s.topk_ids[i][k][r];
      if (id >= 0) lines.push("#" + (r + 1) + " " + JSON.stringify(tokenText(id)) + " " + prob(s.topk_probs[i][k][r]));
    }
    return lines.join("\n");
  }
  function lensRows() {
    const site = lensSelect.value;
    const rows = layers.filter((l) => keyIndex.has(site + "/" + l)).map((l) => [site, l]);
    if (site !== "final" && keyIndex.has("final/" + lastLayer)) rows.push(["final", lastLayer]);
    return rows;
  }
  function renderLens() {
    const s = sample();
    lensGrid.innerHTML = "";
    if (!data.topk) {
      lensNote.textContent = "No top-k in this run: rerun `ipl entropy --topk 5` (the default).";
      return;
    }
    const rows = lensRows();
    let hi = 1e-9;
    rows.forEach(([site, l]) => s.entropy.forEach((e) => { hi = Math.max(hi, e[keyIndex.get(site + "/" + l)]); }));
    lensNote.textContent = data.lens + " lens: each cell is the most probable next token of the " +
      "policy read at " + lensSelect.value + " of that layer (final: the model's output); " +
      "colour: its entropy, 0 to " + hi.toFixed(2) + " nats; hover for the top-" + data.topk +
      "; outlined: the actual next token. Click a cell for that position's details.";
    const head = el("tr"), inputs = el("tr");
    head.appendChild(el("th", {}, "position"));
    inputs.appendChild(el("th", {}, "input token"));
    s.positions.forEach((p, i) => {
      head.appendChild(el("th", {}, String(p)));
      inputs.appendChild(el("th", { class: "tokstr" }, cell(tokenText(s.token_ids[i]))));
    });
    lensGrid.append(head, inputs);
    rows.forEach(([site, l]) => {
      const k = keyIndex.get(site + "/" + l);
      const tr = el("tr");
      tr.appendChild(el("th", {}, site === "final" ? "final" : String(l)));
      s.positions.forEach((p, i) => {
        const id = s.topk_ids[i][k][0];
        const hit = isNext(nextToken(s, i), id);
        const td = el("td", { class: "tokstr" + (hit ? " hit" : ""), "data-layer": String(l),
          "data-site": site, "data-position": String(p), "data-token-id": String(id),
          title: site + " layer " + l + ", position " + p + ": H = " + s.entropy[i][k].toFixed(3) +
            " nats\n" + topkTitle(s, i, k) }, cell(tokenText(id)));
        paint(td, s.entropy[i][k] / hi);
        td.addEventListener("click", () => show(i));
        tr.appendChild(td);
      });
      lensGrid.appendChild(tr);
    });
    const actual = el("tr");
    actual.appendChild(el("th", {}, "actual next"));
    s.positions.forEach((p, i) => {
      const next = nextToken(s, i);
      actual.appendChild(el("th", { class: "tokstr" }, next === null ? "" : cell(nextText(next))));
    });
    lensGrid.appendChild(actual);
  }

  function show(i) {
    const s = sample();
    current = i;
    text.querySelectorAll(".tok.selected").forEach((e) => {
      e.classList.remove("selected"); e.removeAttribute("aria-selected");
    });
    const span = text.querySelector('.tok[data-index="' + i + '"]');
    if (span) { span.classList.add("selected"); span.setAttribute("aria-selected", "true"); }
    const p = s.positions[i], next = nextToken(s, i);
    detail.innerHTML = "";
    const head = el("div");
    head.append(el("h3", {}, "Sample " + s.id + ", position " + p + ": " +
      JSON.stringify(tokenText(s.token_ids[i])) + " \u2192 next token " +
      (next === null ? "(not in the table)" : JSON.stringify(nextText(next)))));
    head.appendChild(grid(s, i));
    detail.appendChild(head);
    if (data.topk) detail.appendChild(topkTable(s, i, next));
    else detail.appendChild(el("p", { class: "note" }, "No top-k in this run: rerun " +
      "`ipl entropy --topk 5` (the default) and `ipl report RUN` to see each layer's predictions."));
  }

  function grid(s, i) {
    const table = el("table", { class: "grid", id: "layer-grid" });
    const row0 = el("tr");
    row0.appendChild(el("th", {}, "layer \\ site"));
    data.sites.forEach((site) => row0.appendChild(el("th", {}, site)));
    table.appendChild(row0);
    const all = s.entropy[i];
    const hi = Math.max(...all, 1e-9);
    layers.forEach((l) => {
      const tr = el("tr");
      tr.appendChild(el("th", {}, String(l)));
      data.sites.forEach((site) => {
        const k = keyIndex.get(site + "/" + l);
        if (k === undefined) { tr.appendChild(el("td")); return; }
        const td = el("td", { "data-layer": String(l), "data-site": site, "data-entropy": String(all[k]),
          title: site + " layer " + l + ": click to colour the text by it" }, all[k].toFixed(2));
        paint(td, all[k] / hi);
        td.addEventListener("click", () => { useKey(k); render(); });
        tr.appendChild(td);
      });
      table.appendChild(tr);
    });
    table.prepend(el("caption", {}, "Entropy (nats) at this position; colour relative to its maximum " + hi.toFixed(2)));
    return table;
  }

  function topkTable(s, i, next) {
    const site = lensSelect.value;
    const table = el("table", { class: "topk", id: "topk-table" });
    table.appendChild(el("caption", {}, "Top-" + data.topk + " predictions of " + site +
      " per layer (probability in the " + data.lens + " lens's policy); \u2605 = the actual next token"));
    const row0 = el("tr");
    row0.append(el("th", {}, "site"), el("th", {}, "layer"));
    for (let r = 1; r <= data.topk; r++) row0.appendChild(el("th", {}, "#" + r));
    table.appendChild(row0);
    lensRows().forEach(([site, l]) => {
      const k = keyIndex.get(site + "/" + l);
      const tr = el("tr");
      tr.append(el("td", {}, site), el("td", {}, String(l)));
      for (let r = 0; r < data.topk; r++) {
        const id = s.topk_ids[i][k][r], p = s.topk_probs[i][k][r];
        if (id < 0) { tr.appendChild(el("td")); continue; }
        const actual = isNext(next, id);
        const td = el("td", { class: actual ? "actual" : "", "data-layer": String(l),
          "data-site": site, "data-rank": String(r + 1), "data-token-id": String(id),
          "data-prob": String(p) });
        td.append(el("span", { class: "tokstr" }, (actual ? "\u2605 " : "") +
          JSON.stringify(tokenText(id))), document.createTextNode(" " + prob(p)));
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
    const toks = text.querySelectorAll(".tok"), i = Number(span.dataset.index);
    const to = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: toks.length - 1, Enter: i, " ": i }[e.key];
    if (to === undefined || to < 0 || to >= toks.length) return;
    e.preventDefault();
    toks[to].focus();
    show(to);
  });
  function showSample() {
    current = null;
    useKey(sample().default_key);
    showContext(sample());
    render();
    renderLens();
  }
  // A new sample: its first token is selected and focused, so the detail panel shows this
  // sample and the arrow keys go on moving through its tokens.
  sampleSelect.addEventListener("change", () => {
    showSample();
    show(0);
    text.querySelector('.tok[data-index="0"]').focus({ preventScroll: true });
  });
  siteSelect.addEventListener("change", () => { fillLayers(NaN); render(); });
  layerSelect.addEventListener("change", render);
  lensSelect.addEventListener("change", () => { renderLens(); if (current !== null) show(current); });
  showSample();
})();
