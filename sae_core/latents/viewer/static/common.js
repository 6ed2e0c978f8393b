"use strict";
// Helpers shared by the index and latent pages: fetching, building elements, formatting, charts.

const pad5 = (i) => String(i).padStart(5, "0");

async function fetchJSON(path) {
  const response = await fetch(path);
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

function fmt(x, digits = 3) {
  if (x === null || x === undefined) return "–";
  if (x === 0) return "0";
  return Math.abs(x) < 1e-3 ? x.toExponential(2) : String(Number(x.toPrecision(digits)));
}

// Whitespace made visible: a token's leading space matters, a newline would break the line.
const showToken = (t) => t.replace(/\n/g, "↵").replace(/\t/g, "⇥");

function chips(tokens) {
  return el("span", { class: "chips" }, ...tokens.map((t) => el("span", { class: "chip", text: showToken(t) })));
}

// A Matryoshka SAE's nesting (summary.matryoshka_prefixes, increasing sizes ending with n):
// the smallest prefix holding latent `id` as "level L of P (first S latents)", else null.
function matryoshkaLevel(summary, id) {
  const sizes = summary.matryoshka_prefixes;
  if (!sizes) return null;
  const level = sizes.findIndex((size) => id < size);
  return `${level + 1} of ${sizes.length} (first ${sizes[level]} latents)`;
}

function card(label, value, id) {
  return el("div", { class: "card", id }, el("div", { class: "label", text: label }), el("div", { class: "value", text: value }));
}

// A bar chart as inline SVG: counts [B], labels under the first, middle and last bar.
function barChart(counts, labels, width = 420, height = 140) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height + 20}`);
  svg.setAttribute("class", "chart");
  const top = Math.max(1, ...counts);
  const w = width / counts.length;
  counts.forEach((c, i) => {
    const h = (c / top) * height;
    const bar = document.createElementNS(ns, "rect");
    bar.setAttribute("x", i * w + 1);
    bar.setAttribute("y", height - h);
    bar.setAttribute("width", Math.max(1, w - 2));
    bar.setAttribute("height", h);
    const tip = document.createElementNS(ns, "title");
    tip.textContent = `${labels.tip ? labels.tip(i) : i}: ${c}`;
    bar.append(tip);
    svg.append(bar);
  });
  [[0, labels.left, "start"], [width / 2, labels.middle, "middle"], [width, labels.right, "end"]].forEach(([x, text, anchor]) => {
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", x);
    t.setAttribute("y", height + 15);
    t.setAttribute("text-anchor", anchor);
    t.textContent = text;
    svg.append(t);
  });
  return svg;
}

function showError(err) {
  document.body.prepend(el("p", { class: "error", text: `Could not load the data: ${err.message}` }));
}
