"use strict";
// One latent: its figures, histogram, logit lens and contexts, from data/latent/NNNNN.json.

const $ = (id) => document.getElementById(id);

// A context as tokens shaded by the latent's activation (relative to its maximum); the peak
// is outlined and every token shows its activation on hover.
function contextElement(window, top, extra) {
  const tokens = window.tokens.map((t, i) => {
    const a = window.acts[i];
    const alpha = top > 0 ? Math.min(1, Math.max(0, a / top)) : 0;
    const tok = el("span", { class: i === window.peak ? "tok peak" : "tok", title: `${fmt(a)}`, text: showToken(t) });
    if (a > 0) tok.style.background = `rgba(255, 128, 0, ${0.12 + 0.88 * alpha})`;
    return tok;
  });
  return el("div", { class: "context" },
    el("span", { class: "ctx-value", text: fmt(window.value) }),
    el("span", { class: "ctx-text" }, ...tokens),
    el("span", { class: "muted ctx-where", text: `${extra}context ${window.context}, pos ${window.position}` }));
}

function logitList(target, pairs) {
  target.replaceChildren(...pairs.map(([t, v]) => el("li", {}, chips([t]), el("span", { class: "muted", text: ` ${fmt(v)}` }))));
}

async function main() {
  const id = parseInt(new URLSearchParams(location.search).get("id") || "0", 10);
  const [summary, latent] = await Promise.all([fetchJSON("data/summary.json"), fetchJSON(`data/latent/${pad5(id)}.json`)]);
  document.title = `Latent ${id}`;
  $("title").textContent = `Latent ${id}`;
  $("about").textContent = `${summary.sae_kind} SAE, ${summary.model} ${summary.hook}`;
  if (id > 0) Object.assign($("prev-latent"), { href: `latent.html?id=${id - 1}`, textContent: `‹ latent ${id - 1}` });
  if (id + 1 < summary.n_latents) Object.assign($("next-latent"), { href: `latent.html?id=${id + 1}`, textContent: `latent ${id + 1} ›` });

  const e = latent.explanation;
  $("facts").append(
    card("density", fmt(latent.density), "density"),
    card("firing tokens", String(latent.fires), "fires"),
    card("max activation", fmt(latent.max), "max"),
    ...(summary.matryoshka_prefixes ? [card("matryoshka level", matryoshkaLevel(summary, id), "level")] : []),
    el("div", { class: "card wide", id: "explanation" },
      el("div", { class: "label", text: "explanation (n-gram ending at the firing token)" }),
      el("div", { class: "value" }, e ? chips(e.tokens) : el("span", { class: "muted", text: "none" }))),
    card("held-out precision", e ? fmt(e.precision, 2) : "–", "precision"),
    card("held-out recall", e ? fmt(e.recall, 2) : "–", "recall"),
    card("held-out F1", e ? fmt(e.f1, 2) : "–", "f1"));

  const edges = latent.histogram.edges;
  const last = edges[edges.length - 1];
  $("histogram").append(latent.fires
    ? barChart(latent.histogram.counts, { left: "0", middle: fmt(last / 2), right: fmt(last), tip: (i) => `${fmt(edges[i])}–${fmt(edges[i + 1])}` })
    : el("p", { class: "muted", text: "This latent never fires on the eval split." }));
  logitList($("promoted"), latent.logits.promoted);
  logitList($("suppressed"), latent.logits.suppressed);
  $("top").replaceChildren(...latent.top.map((w) => contextElement(w, latent.max, "")));
  $("random").replaceChildren(...latent.random.map((w) => contextElement(w, latent.max, `quantile ${fmt(w.quantile, 2)} · `)));
  if (!latent.top.length) $("top").append(el("p", { class: "muted", text: "No firing context." }));
}

main().catch(showError);
