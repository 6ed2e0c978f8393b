"""Latent statistics: the streaming kernels against brute force, n-gram explanations on a case
with a known answer, the logit lens on a tiny model, and the stage on a tiny trained SAE."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae_core.latents.explain import (
    CountMinSketch,
    ExplanationCounts,
    HeldOutScore,
    chunk_ngrams,
    pack_ngrams,
    unpack_ngram,
)
from sae_core.latents.logit_lens import Unembedding, logit_lens
from sae_core.latents.streaming import (
    ContextChunk,
    DoublingHistogram,
    Reservoir,
    TopContexts,
    state_bytes,
)
from tests.helpers.tiny_models import build_tiny_llama

N, T, BEFORE, AFTER = 6, 12, 3, 2


def random_chunks(count: int, contexts: int = 5, seed: int = 0) -> list[ContextChunk]:
    """Chunks of sparse random activations (distinct values: no ties) and token ids."""
    g = torch.Generator().manual_seed(seed)
    chunks = []
    for i in range(count):
        acts = torch.rand(contexts, T, N, generator=g)
        acts *= torch.rand(contexts, T, N, generator=g) < 0.2  # ~20% of tokens fire
        tokens = torch.randint(0, 50, (contexts, T), generator=g)
        ids = torch.arange(i * contexts, (i + 1) * contexts)
        chunks.append(ContextChunk(ids, tokens, acts))
    return chunks


def test_top_contexts_equal_brute_force():
    chunks = random_chunks(7)
    top = TopContexts(N, 4, BEFORE, AFTER)
    for chunk in chunks:
        top.update(chunk, *chunk.peaks())
    acts = torch.cat([c.acts for c in chunks])  # [C, T, N]
    tokens = torch.cat([c.tokens for c in chunks])
    peak, where = acts.max(dim=1)  # [C, N]
    for j in range(N):
        order = peak[:, j].argsort(descending=True)[:4]
        order = order[peak[order, j] > 0]
        got = top.slots.context[j][top.slots.context[j] >= 0]
        assert got.tolist() == order.tolist()
        for s, c in enumerate(order.tolist()):
            p = int(where[c, j])
            assert top.slots.value[j, s] == acts[c, p, j]
            for w, pos in enumerate(range(p - BEFORE, p + AFTER + 1)):
                inside = 0 <= pos < T
                assert top.slots.tokens[j, s, w] == (tokens[c, pos] if inside else -1)
                assert top.slots.acts[j, s, w] == (acts[c, pos, j] if inside else 0)


def test_state_does_not_grow_with_the_stream():
    def run(count: int) -> int:
        top = TopContexts(N, 4, BEFORE, AFTER)
        sample = Reservoir(N, 3, BEFORE, AFTER, torch.Generator().manual_seed(0))
        hist = DoublingHistogram(N, 16)
        for chunk in random_chunks(count):
            top.update(chunk, *chunk.peaks())
            sample.update(chunk, *chunk.peaks())
            fired = chunk.acts.reshape(-1, N).nonzero(as_tuple=True)
            hist.update(fired[1], chunk.acts.reshape(-1, N)[fired])
        return state_bytes(
            *top.slots.tensors(), *sample.slots.tensors(), sample.seen, hist.counts, hist.hi
        )

    assert run(2) == run(20)


def test_histogram_counts_equal_numpy():
    g = torch.Generator().manual_seed(1)
    hist = DoublingHistogram(3, 8)
    seen: list[list[float]] = [[], [], []]
    for scale in (0.01, 0.3, 5.0, 0.2, 70.0):  # the range grows several times
        latent = torch.randint(0, 3, (200,), generator=g)
        value = torch.rand(200, generator=g, dtype=torch.float64) * scale + 1e-6
        hist.update(latent, value)
        for j, v in zip(latent.tolist(), value.tolist(), strict=True):
            seen[j].append(v)
    for j in range(3):
        counts, _ = np.histogram(seen[j], bins=np.array(hist.edges(j)))
        assert hist.counts[j].tolist() == counts.tolist()
        assert max(seen[j]) < float(hist.hi[j]) <= 2 * max(seen[j])


def test_reservoir_equals_sequential_algorithm_r():
    """The vectorised reservoir equals Algorithm R run one firing context at a time, per
    latent in stream order, on the same random draws."""
    chunks = random_chunks(5, contexts=8)
    sample = Reservoir(N, 3, BEFORE, AFTER, torch.Generator().manual_seed(4))
    for chunk in chunks:
        sample.update(chunk, *chunk.peaks())
    draws = torch.Generator().manual_seed(4)
    slots = [[-1] * 3 for _ in range(N)]
    seen = [0] * N
    for chunk in chunks:
        peak = chunk.peaks()[0]
        pairs = (peak.T > 0).nonzero().tolist()  # (latent, context), as the kernel orders them
        u = torch.rand(len(pairs), generator=draws, dtype=torch.float64).tolist()
        for (j, c), r in zip(pairs, u, strict=True):
            t = seen[j]
            slot = t if t < 3 else int(r * (t + 1))
            if slot < 3:
                slots[j][slot] = int(chunk.context_ids[c])
            seen[j] += 1
    assert sample.slots.context.tolist() == slots
    assert sample.seen.tolist() == seen


def test_reservoir_samples_firing_contexts_uniformly():
    chunks = random_chunks(2, contexts=10)
    hits = torch.zeros(20)
    trials = 200
    for seed in range(trials):
        sample = Reservoir(N, 3, BEFORE, AFTER, torch.Generator().manual_seed(seed))
        for chunk in chunks:
            sample.update(chunk, *chunk.peaks())
        hits[sample.slots.context[0]] += 1
    firing = torch.cat([c.peaks()[0] for c in chunks])[:, 0] > 0
    assert hits[~firing].sum() == 0
    expected = trials * 3 / int(firing.sum())  # each firing context equally likely
    assert (hits[firing] - expected).abs().max() < 5 * expected**0.5


def test_ngrams_pack_and_unpack():
    tokens = torch.tensor([[5, 6, 7, -1, 8]])
    two = pack_ngrams(tokens, 2)[0]
    assert two[0] == -1  # runs off the start
    assert unpack_ngram(int(two[2])) == [6, 7]
    assert two[3] == -1 and two[4] == -1  # a missing token breaks the n-gram
    assert unpack_ngram(int(pack_ngrams(tokens, 1)[0, 4])) == [8]
    assert unpack_ngram(int(pack_ngrams(tokens, 3)[0, 2])) == [5, 6, 7]
    assert pack_ngrams(torch.tensor([[6]]), 1) != pack_ngrams(torch.tensor([[0, 6]]), 2)[:, 1:]


def test_count_min_sketch_never_undercounts():
    sketch = CountMinSketch(1024)
    keys = np.random.default_rng(0).integers(0, 50, 5000).astype(np.uint64)
    sketch.add(keys)
    exact = np.bincount(keys.astype(np.int64), minlength=50)
    got = sketch.query(np.arange(50, dtype=np.uint64))
    assert (got >= exact).all() and (got - exact).max() <= 5


def _planted_case(contexts: int, seed: int):
    """Contexts of 20 tokens with planted n-grams and two latents with known explanations:
    latent 0 fires on B after A (never on a lone B): "A B", precision and recall 1; latent 1
    fires on one of the two "E D C" of each context: "C" (the shortest of the equally good
    candidates), precision 1/2, recall 1."""
    A, B, C, D, E = 1, 2, 3, 4, 5
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(6, 30, (contexts, 20), generator=g)
    tokens[:, 1:3] = tokens[:, 6:8] = torch.tensor([A, B])
    tokens[:, 4] = B
    tokens[:, 10:13] = tokens[:, 15:18] = torch.tensor([E, D, C])
    acts = torch.zeros(contexts, 20, 2)
    strength = 1 + torch.rand(contexts, 20, generator=g)
    acts[:, [2, 7], 0] = strength[:, [2, 7]]
    fire_at = torch.where(torch.arange(contexts) % 2 == 0, 12, 17)
    acts[torch.arange(contexts), fire_at, 1] = strength[torch.arange(contexts), fire_at]
    return tokens, acts


def _codes(acts: torch.Tensor):
    """Dense [C, T, n] -> rows (c, p) and codes idx, vals [R, n] (every latent listed)."""
    C, T_, n = acts.shape
    row_c = torch.arange(C).repeat_interleave(T_)
    row_p = torch.arange(T_).repeat(C)
    idx = torch.arange(n).expand(C * T_, n)
    return row_c, row_p, idx, acts.reshape(C * T_, n)


def test_explanations_find_the_planted_ngram_and_score_it():
    tokens, acts = _planted_case(8, seed=0)
    counts = ExplanationCounts(2, max_n=3, width=2**16)
    top = TopContexts(2, 4, BEFORE, AFTER)
    chunk = ContextChunk(torch.arange(8), tokens, acts)
    top.update(chunk, *chunk.peaks())
    counts.update(chunk_ngrams(tokens, 3), *_codes(acts))
    chosen = counts.choose(top.slots.tokens, BEFORE, top.slots.context >= 0)
    assert unpack_ngram(int(chosen.code[0])) == [1, 2]  # "A B": the lone B rules out "B"
    assert unpack_ngram(int(chosen.code[1])) == [3]
    assert chosen.precision[0] == 1 and chosen.recall[0] == 1

    held_tokens, held_acts = _planted_case(6, seed=1)
    score = HeldOutScore(chosen)
    score.update(chunk_ngrams(held_tokens, 3), *_codes(held_acts))
    precision, recall, scored = score.result()
    assert scored.all()
    assert precision.tolist() == pytest.approx([1.0, 0.5])
    assert recall.tolist() == pytest.approx([1.0, 1.0])
    assert score.matches.tolist() == [12, 12] and score.fires.tolist() == [12, 6]


def test_logit_lens_of_a_tiny_model():
    model = build_tiny_llama()
    unembed = Unembedding.from_model(model)
    assert unembed.gain is not None and not unembed.centre
    W, g = unembed.weight, unembed.gain
    directions = torch.nn.functional.normalize(
        torch.randn(5, 64, generator=torch.Generator().manual_seed(0)), dim=1
    )
    directions[0] = W[7] / g  # promotes token 7 above all: W (g * u) = W W[7]
    lens = logit_lens(directions, unembed, top=4, chunk=2)
    expected = (directions * g) @ W.T
    assert lens.promoted.tolist() == expected.topk(4, dim=1).indices.tolist()
    assert lens.suppressed.tolist() == expected.topk(4, dim=1, largest=False).indices.tolist()
    assert torch.allclose(lens.promoted_logits, expected.topk(4, dim=1).values)
    assert int(lens.promoted[0, 0]) == 7


# The pass and the stage, on a tiny trained SAE ---------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama_dir, tiny_corpus_dir):
    from tests.helpers.tiny_sae import tiny_sae

    return tiny_sae(
        tmp_path_factory.getbasetemp() / "latents-store", tiny_llama_dir, tiny_corpus_dir
    )


@pytest.fixture(scope="module")
def unembed(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return Unembedding.from_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir))


def _brute_force(sae_ref):
    """Every eval token's codes and context: (context ids [R], acts [R, n] dense)."""
    from sae_core.sae import load_sae
    from sae_core.storage.lineage import sae_lineage
    from sae_core.storage.loader import load_split_tensor, read_split

    sae, acts = load_sae(sae_ref), sae_lineage(sae_ref).activations
    codes = sae.encode(load_split_tensor(acts, "eval"))
    dense = torch.zeros(len(codes.idx), sae.n_latents).scatter_(1, codes.idx, codes.vals)
    sequence = torch.cat(
        [torch.from_numpy(b.column("sequence").to_numpy()) for b in read_split(acts, "eval")]
    )
    return sequence, dense


def test_pass_equals_brute_force_whatever_the_chunk_size(trained, unembed):
    from sae_core.config import LatentsConfig
    from sae_core.latents.stats import latent_statistics
    from sae_core.sae import load_sae
    from sae_core.storage.lineage import sae_lineage

    _, sae_ref = trained
    sae, acts = load_sae(sae_ref), sae_lineage(sae_ref).activations
    runs = [
        latent_statistics(
            sae, acts, unembed, LatentsConfig(batch_tokens=size, top_contexts=4), progress=False
        )
        for size in (40, 10_000)  # a chunk of about one context, and the whole split at once
    ]
    sequence, dense = _brute_force(sae_ref)
    contexts = sequence.unique()
    peaks = torch.stack([dense[sequence == c].max(dim=0).values for c in contexts])  # [C, n]
    for stats in runs:
        assert stats.tokens == len(sequence) and stats.explain_tokens == len(sequence) // 2
        assert stats.fires.tolist() == (dense > 0).sum(dim=0).tolist()
        for j in range(0, sae.n_latents, 17):
            best = peaks[:, j].topk(4)
            filled = stats.top.context[j] >= 0
            assert stats.top.value[j][filled].tolist() == best.values[best.values > 0].tolist()
    a, b = runs
    for name in ("context", "tokens", "acts"):
        assert torch.equal(getattr(a.top, name), getattr(b.top, name))
    assert torch.equal(a.histogram.counts, b.histogram.counts)
    assert torch.equal(a.explanations.code, b.explanations.code)
    assert torch.equal(a.precision, b.precision) and torch.equal(a.recall, b.recall)


@pytest.mark.parametrize("kind", ["topk", "expander"])
def test_stage_writes_the_viewer_dataset_once(
    kind, tmp_path_factory, tiny_llama_dir, tiny_corpus_dir
):
    import json

    from sae_core.latents.pages import INDEX_CHUNK, PAGE_SIZE
    from sae_core.stages import latents as latents_stage
    from tests.helpers.tiny_sae import tiny_sae

    extra = {"kind": "expander", "degree": 8} if kind == "expander" else {}
    store = tmp_path_factory.getbasetemp() / "latents-store"
    cfg, sae = tiny_sae(store, tiny_llama_dir, tiny_corpus_dir, **extra)
    ref, metrics = latents_stage.compute_latent_stats(sae, cfg.latents, progress=False)
    manifest = ref.open_store().manifest(ref.path)
    assert manifest["kind"] == "latent_stats" and manifest["sae_kind"] == kind
    assert 0 <= metrics["explain/precision_mean"] <= 1 and metrics["explain/scored_latents"] > 0
    s = ref.open_store()
    summary = s.read_json(f"{ref.path}/summary.json")
    assert summary["n_latents"] == 256 and summary["eval_tokens"] == 16 * 31
    assert summary["layout"] == {
        "page_size": PAGE_SIZE,
        "index_chunk": INDEX_CHUNK,
        "index_chunks": 1,
    }
    pages = [s.read_json(f"{ref.path}/latents/page-{i:05d}.json") for i in range(256 // PAGE_SIZE)]
    records = [r for page in pages for r in page]
    assert [r["id"] for r in records] == list(range(256))
    index = s.read_json(f"{ref.path}/index/chunk-00000.json")
    assert [row["id"] for row in index] == list(range(256))
    fired = next(r for r in records if r["top"])
    values = [w["value"] for w in fired["top"]]
    assert values == sorted(values, reverse=True) and values[0] == fired["max"]
    window = fired["top"][0]
    assert len(window["tokens"]) == len(window["acts"]) and window["acts"][
        window["peak"]
    ] == pytest.approx(window["value"], rel=1e-3, abs=1e-3)  # both are rounded for the page
    assert sum(fired["histogram"]["counts"]) == fired["fires"]
    assert len(fired["logits"]["promoted"]) == cfg.latents.logit_tokens
    json.dumps(summary, allow_nan=False)  # the browser's JSON.parse takes no NaN
    again, _ = latents_stage.compute_latent_stats(sae, cfg.latents, progress=False)
    assert again == ref and s.manifest(ref.path) == manifest  # cached: not rewritten
