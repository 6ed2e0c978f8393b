"use strict";
// The latent index: the summary, then a table of latents, PAGE rows at a time. Browsing by id
// fetches only the index chunk(s) holding the page; a search, a filter or another order scans
// the chunks one by one (they are small: ~100 bytes a latent) and shows progress as it goes.

const PAGE = 50;
const chunks = new Map(); // chunk number -> Promise of its rows
let summary;
let generation = 0; // bumped by every new query; stale scans stop

const $ = (id) => document.getElementById(id);

function chunk(i) {
  if (!chunks.has(i)) chunks.set(i, fetchJSON(`data/index/chunk-${pad5(i)}.json`));
  return chunks.get(i);
}

function readQuery() {
  const params = new URLSearchParams(location.search);
  $("q").value = params.get("q") || "";
  $("sort").value = params.get("sort") || "id";
  $("dmin").value = params.get("dmin") || "";
  $("dmax").value = params.get("dmax") || "";
  return Math.max(0, parseInt(params.get("page") || "0", 10) || 0);
}

function writeQuery(page) {
  const params = new URLSearchParams();
  for (const key of ["q", "sort", "dmin", "dmax"]) {
    const value = $(key).value.trim();
    if (value && !(key === "sort" && value === "id")) params.set(key, value);
  }
  if (page) params.set("page", page);
  history.replaceState(null, "", params.toString() ? `?${params}` : location.pathname);
}

function matcher() {
  const q = $("q").value.trim().toLowerCase();
  const lo = parseFloat($("dmin").value);
  const hi = parseFloat($("dmax").value);
  const byId = /^\d+$/.test(q) ? Number(q) : null;
  return (row) => {
    if (!Number.isNaN(lo) && row.density < lo) return false;
    if (!Number.isNaN(hi) && row.density > hi) return false;
    if (!q) return true;
    if (byId !== null) return row.id === byId;
    const texts = [row.expl.join(""), row.expl.join(" "), row.top];
    return texts.some((t) => t.toLowerCase().includes(q));
  };
}

const ORDERS = {
  "density-desc": (a, b) => b.density - a.density,
  "density-asc": (a, b) => a.density - b.density,
  "f1-desc": (a, b) => (b.f1 ?? -1) - (a.f1 ?? -1),
  "max-desc": (a, b) => b.max - a.max,
};

async function rowsFor(page, mine) {
  const plain = !$("q").value.trim() && $("sort").value === "id" && !$("dmin").value && !$("dmax").value;
  const size = summary.layout.index_chunk;
  if (plain) { // the page's rows only: one or two chunks
    const first = page * PAGE;
    const last = Math.min(summary.n_latents, first + PAGE) - 1;
    const rows = [];
    for (let i = Math.floor(first / size); i <= Math.floor(last / size); i++) rows.push(...(await chunk(i)));
    return { rows: rows.filter((r) => r.id >= first && r.id <= last), total: summary.n_latents, search: false };
  }
  const keep = matcher();
  const found = [];
  const count = summary.layout.index_chunks;
  for (let i = 0; i < count; i++) {
    if (mine !== generation) return null;
    $("status").textContent = `Searching… ${i}/${count} index chunks`;
    found.push(...(await chunk(i)).filter(keep));
  }
  if (ORDERS[$("sort").value]) found.sort(ORDERS[$("sort").value]);
  return { rows: found.slice(page * PAGE, (page + 1) * PAGE), total: found.length, search: true };
}

function rowElement(row) {
  const link = el("a", { href: `latent.html?id=${row.id}`, class: "latent-link", text: `#${row.id}` });
  return el("tr", { "data-id": row.id },
    el("td", {}, link),
    el("td", { class: "num", text: fmt(row.density) }),
    el("td", { class: "num", text: fmt(row.max) }),
    el("td", {}, row.expl.length ? chips(row.expl) : el("span", { class: "muted", text: "none" })),
    el("td", { class: "num", text: fmt(row.p, 2) }),
    el("td", { class: "num", text: fmt(row.r, 2) }),
    el("td", { class: "num", text: fmt(row.f1, 2) }),
    el("td", {}, row.top ? chips([row.top]) : ""));
}

async function render(page) {
  const mine = ++generation;
  writeQuery(page);
  const result = await rowsFor(page, mine);
  if (result === null) return; // a newer query took over
  const pages = Math.max(1, Math.ceil(result.total / PAGE));
  $("latents").tBodies[0].replaceChildren(...result.rows.map(rowElement));
  $("status").textContent = result.search
    ? `${result.total} matching latent${result.total === 1 ? "" : "s"}`
    : `${summary.n_latents} latents`;
  $("page").textContent = `page ${page + 1} of ${pages}`;
  $("prev").disabled = page === 0;
  $("next").disabled = page + 1 >= pages;
  $("prev").onclick = () => render(page - 1);
  $("next").onclick = () => render(page + 1);
}

function overview() {
  const e = summary.explainability;
  $("title").textContent = `Latents of ${summary.sae_kind} SAE (n = ${summary.n_latents}, k = ${summary.k})`;
  $("about").textContent = `${summary.model} ${summary.hook} · ${summary.sae}`;
  const f1 = barChart(e.f1.histogram, { left: "0", middle: "F1 0.5", right: "1", tip: (i) => `F1 ${i / 10}–${(i + 1) / 10}` }, 200, 50);
  $("overview").append(
    card("eval tokens", `${summary.eval_tokens} (${summary.heldout_tokens} held out)`),
    card("dead latents", String(summary.dead_latents)),
    ...(summary.matryoshka_prefixes ? [card("matryoshka prefixes", summary.matryoshka_prefixes.join(" ⊂ "), "prefixes")] : []),
    card("explained & scored", `${e.scored_latents} latents`),
    card("mean precision", fmt(e.precision.mean), "mean-precision"),
    card("mean recall", fmt(e.recall.mean), "mean-recall"),
    card("mean F1", fmt(e.f1.mean), "mean-f1"),
    el("div", { class: "card wide" }, el("div", { class: "label", text: "F1 over latents" }), f1));
}

async function main() {
  summary = await fetchJSON("data/summary.json");
  overview();
  const page = readQuery();
  let timer;
  const later = () => { clearTimeout(timer); timer = setTimeout(() => render(0), 200); };
  $("search").addEventListener("input", later);
  $("search").addEventListener("change", later);
  $("search").addEventListener("submit", (event) => { event.preventDefault(); render(0); });
  await render(page);
}

main().catch(showError);
