"""The sparse-aware kernels equal the dense reference: values and every parameter's gradient."""

from __future__ import annotations

import pytest
import torch

from sae_core.config import SAEConfig
from sae_core.sae import TopKSAE, kernels, unit_adam


@pytest.fixture(params=["native", "stock"])
def kernel_path(request, monkeypatch):
    """Run a test on the native CPU kernels and on the stock torch ops."""
    if request.param == "native" and kernels.native.load() is None:
        pytest.skip("native kernels unavailable (no compiler)")
    monkeypatch.setattr(kernels, "USE_NATIVE", request.param == "native")
    return request.param


def test_topk_matches_torch(kernel_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 700, generator=g)
    x[3] = torch.arange(700.0)  # ascending: the sampled threshold alone would miss the top
    x[4] = -torch.arange(700.0)
    for k in (1, 7, 90, 700):
        vals, idx = kernels.topk(x, k)
        ref_vals, ref_idx = x.topk(k, dim=1)
        assert torch.equal(vals, ref_vals) and torch.equal(idx, ref_idx)


@pytest.mark.parametrize("d", [37, 576])  # a partial last vector, and the benchmark's width
def test_normalize_tokens_centres_and_scales_each_token(kernel_path, d):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(70, d, generator=g) * 7 + 3
    x[5] = 0.0  # no spread: scale is eps, the token stays 0
    x_norm, shift, scale = kernels.normalize_tokens(x, 1e-8)
    ref_shift = x.double().mean(dim=1, keepdim=True)
    ref_scale = (x.double() - ref_shift).norm(dim=1, keepdim=True).clamp_min(1e-8)
    torch.testing.assert_close(shift, ref_shift.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(scale, ref_scale.float(), rtol=1e-6, atol=0.0)
    torch.testing.assert_close(
        x_norm, ((x.double() - ref_shift) / ref_scale).float(), rtol=1e-5, atol=1e-7
    )
    assert scale[5].item() == pytest.approx(1e-8) and not x_norm[5].any()


@pytest.mark.parametrize("d", [37, 576])
def test_normalize_tokens_subtracts_an_offset_in_its_pass(kernel_path, d):
    g = torch.Generator().manual_seed(3)
    x, offset = torch.randn(70, d, generator=g) * 7 + 3, torch.randn(d, generator=g)
    x_norm, shift, scale = kernels.normalize_tokens(x, 1e-8)
    shifted, shift_o, scale_o = kernels.normalize_tokens(x, 1e-8, offset)
    assert torch.equal(shifted, x_norm - offset)  # the same rounding as a separate subtraction
    assert torch.equal(shift_o, shift) and torch.equal(scale_o, scale)


def test_normalize_tokens_keeps_a_graph_when_the_input_needs_one(kernel_path):
    x = torch.randn(8, 20, generator=torch.Generator().manual_seed(2)).requires_grad_()
    x_norm, _, _ = kernels.normalize_tokens(x, 1e-8)
    (x_norm[:, 0]).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_topk_adds_the_bias_as_it_reads(kernel_path):
    g = torch.Generator().manual_seed(5)
    x, bias = torch.randn(32, 300, generator=g), torch.randn(300, generator=g)
    vals, idx = kernels.topk(x, 9, bias)
    ref_vals, ref_idx = (x + bias).topk(9, dim=1)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(vals, ref_vals)


def test_topk_reads_the_rows_of_a_padded_buffer_in_place(kernel_path):
    """The encoder writes its output with padded rows (`padded_rows`); the top-k reads them."""
    g = torch.Generator().manual_seed(8)
    pre = kernels.padded_rows(40, 300, torch.float32, "cpu")
    pre.copy_(torch.randn(40, 300, generator=g))
    bias = torch.randn(300, generator=g)
    pad = pre.stride(0) - 300
    assert pad >= kernels.PRE_ROW_PAD and pre.stride(0) % 8 == 0
    pre.as_strided((40, pad), (pre.stride(0), 1), 300).fill_(1e9)  # the pads
    vals, idx = kernels.topk(pre, 9, bias)
    ref_vals, ref_idx = (pre.contiguous() + bias).topk(9, dim=1)
    assert torch.equal(idx, ref_idx) and torch.equal(vals, ref_vals)


def test_topk_over_a_few_finite_entries(kernel_path):
    """AuxK's selection: a bias of -inf everywhere but the dead latents, some of them in runs."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(8, 2000, generator=g)
    for dead in (torch.rand(2000, generator=g) < 0.01, torch.arange(2000) % 97 == 3):
        bias = torch.zeros(2000).masked_fill(~dead, float("-inf"))
        k = int(dead.sum()) // 2
        vals, idx = kernels.topk(x, k, bias)
        ref_vals, ref_idx = (x + bias).topk(k, dim=1)
        assert torch.equal(vals, ref_vals) and torch.equal(
            idx.sort(1).values, ref_idx.sort(1).values
        )


def test_topk_when_rows_change_scale(kernel_path):
    """The native top-k starts each row from the previous row's threshold: runs of alike rows
    take it, rows that jump in scale or shift (too many or too few entries pass) fall back.
    Every row must still be exact."""
    g = torch.Generator().manual_seed(11)
    scale = torch.tensor([1.0, 1.0, 1.0, 100.0, 0.01, 1.0, -1.0, 1.0]).repeat(8)[:, None]
    shift = torch.tensor([0.0, 0.0, 5.0, 0.0, 0.0, -5.0, 0.0, 0.0]).repeat(8)[:, None]
    x = torch.randn(64, 3000, generator=g) * scale + shift
    bias = torch.randn(3000, generator=g) * 0.1
    for k in (4, 32, 43, 44, 64):  # 43: the largest k that guesses (k + k // 2 <= 64)
        vals, idx = kernels.topk(x, k, bias)
        ref_vals, ref_idx = (x + bias).topk(k, dim=1)
        assert torch.equal(idx, ref_idx), k
        torch.testing.assert_close(vals, ref_vals)


def test_native_topk_ties_take_the_lower_index():
    ext = kernels.native.load()
    if ext is None:
        pytest.skip("native kernels unavailable (no compiler)")
    x = torch.zeros(2, 50)
    x[0, ::2] = -0.0  # equal to +0.0
    x[1, 40:] = 1.0
    _, idx = ext.topk_rows(x, 12, torch.empty(0))
    assert idx[0].tolist() == list(range(12))
    assert idx[1].tolist() == list(range(40, 50)) + [0, 1]


def test_fused_losses_of_two_live_graphs_stay_apart():
    """Each fused-loss graph keeps its own per-token rows for the backward: a second forward
    while the first graph is alive leaves the first one's gradients as they were."""
    if kernels.native.load() is None:
        pytest.skip("native kernels unavailable (no compiler)")
    torch.manual_seed(3)
    sae = TopKSAE(16, SAEConfig(n_latents=64, k=4))
    xs = [torch.randn(40, 16), torch.randn(40, 16) + 1.0]
    expected = []
    for x in xs:
        sae.zero_grad()
        sae(x).loss.backward()
        expected.append(sae.W_dec.grad.clone())
    outs = [sae(x) for x in xs]  # both graphs alive at once
    for out, want in zip(outs[::-1], expected[::-1], strict=True):
        sae.zero_grad()
        out.loss.backward()
        assert torch.equal(sae.W_dec.grad, want)


def test_encoder_preacts_without_bias():
    g = torch.Generator().manual_seed(6)
    x, b_pre = torch.randn(8, 5, generator=g), torch.randn(5, generator=g)
    W, b = torch.randn(11, 5, generator=g), torch.randn(11, generator=g)
    full = kernels.encoder_preacts(x, b_pre, W, b)
    torch.testing.assert_close(kernels.encoder_preacts(x, b_pre, W, None) + b, full)


def test_fire_counts_count_entries_above_the_threshold(kernel_path):
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 20, (50, 7), generator=g)
    vals = torch.rand(50, 7, generator=g)
    vals[0, :3] = 0.5  # exactly at the threshold: not firing
    idx[1], vals[1] = 19, 0.9  # one latent several times in a token
    counts = kernels.fire_counts(idx[:, :5], vals[:, :5], 21, 0.5)  # non-contiguous views
    want = torch.tensor([float(((idx[:, :5] == j) & (vals[:, :5] > 0.5)).sum()) for j in range(21)])
    assert counts.dtype == torch.float32 and torch.equal(counts, want) and want[19] >= 5


def test_scatter_outer_matches_index_add():
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 50, (40, 6), generator=g)
    coef, src = torch.randn(40, 6, generator=g), torch.randn(40, 9, generator=g)
    expected = torch.zeros(50, 9).index_add_(
        0, idx.reshape(-1), (coef[..., None] * src[:, None]).reshape(-1, 9)
    )
    assert torch.allclose(kernels.scatter_outer(idx, coef, src, 50), expected, atol=1e-5)


def test_sparse_decode_matches_dense(kernel_path):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(30, 8, generator=g)
    idx = torch.stack([torch.randperm(30, generator=g)[:5] for _ in range(12)])
    vals = torch.rand(12, 5, generator=g)
    assert torch.allclose(
        kernels.sparse_decode(idx, vals, W),
        kernels.sparse_decode(idx, vals, W, dense=True),
        atol=1e-5,
    )


@pytest.fixture(params=["panels", "rows"])
def decode_path(request, monkeypatch):
    """Run a test on each of the native decoder's layouts (the stock path has one)."""
    monkeypatch.setattr(kernels, "DECODE_PATH", request.param)
    return request.param


# d = 24: a partial last panel; d = 40 with k = 20: more than one panel pair and more than 16
# slots of a term (the 16-way dot network's remainder).
@pytest.mark.parametrize("shape", [(24, 160, 6, 12), (40, 96, 20, 17)])
@pytest.mark.parametrize("variant", ["topk", "multi_topk", "batch_topk"])
def test_sparse_step_gradients_equal_dense_reference(variant, shape, kernel_path, decode_path):
    if kernel_path == "stock" and decode_path == "rows":
        pytest.skip("the stock path has one layout")
    d, n, k, k_aux = shape
    torch.manual_seed(0)
    flags = {"multi_topk": variant == "multi_topk", "batch_topk": variant == "batch_topk"}
    sae = TopKSAE(d, SAEConfig(n_latents=n, k=k, k_aux=k_aux, **flags))
    with torch.no_grad():
        sae.b_pre.normal_()
        sae.b_enc.normal_(0, 0.2)
        sae.W_enc.add_(0.1 * torch.randn_like(sae.W_enc))  # untie, so a swapped weight would show
    x = torch.randn(48, d) + 0.5
    dead = torch.rand(n) < 0.4
    runs = {}
    for dense in (False, True):
        sae.zero_grad()
        out = sae(x, dead, dense=dense)
        out.loss.backward()
        runs[dense] = (out, {n: p.grad.clone() for n, p in sae.named_parameters()})
    (sparse_out, sparse_grads), (dense_out, dense_grads) = runs[False], runs[True]
    assert sparse_out.aux_loss > 0 and sparse_out.aux_idx.shape[1] == min(k_aux, int(dead.sum()))
    if variant == "batch_topk":  # rows of different lengths: some padding slots were exercised
        assert (sparse_out.latent_vals == 0).any() and sparse_out.latent_idx.shape[1] > k
    assert torch.allclose(sparse_out.loss, dense_out.loss, rtol=1e-5)
    assert torch.allclose(sparse_out.recon, dense_out.recon, atol=1e-5)
    for name, g in dense_grads.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(sparse_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("variant", ["topk", "multi_topk"])
def test_centred_inputs_give_the_same_step(variant, kernel_path, decode_path):
    """Training hands the encoder and the loss x - b_pre from the normaliser (centred=True):
    the pre-activations, loss, reconstruction and every gradient (b_pre's and the input's
    included) are those of x itself."""
    if kernel_path == "stock" and decode_path == "rows":
        pytest.skip("the stock path has one layout")
    torch.manual_seed(7)
    sae = TopKSAE(40, SAEConfig(n_latents=96, k=6, k_aux=9, multi_topk=variant == "multi_topk"))
    with torch.no_grad():
        sae.b_pre.normal_()
        sae.W_enc.add_(0.1 * torch.randn_like(sae.W_enc))
    x = torch.randn(48, 40) + 0.5
    dead = torch.rand(96) < 0.4
    runs = []
    for centred in (False, True):
        sae.zero_grad()
        inp = (x - sae.b_pre.detach() if centred else x.clone()).requires_grad_()
        pre = sae.preacts(inp.detach(), centred=centred).clone()
        out = sae.losses(inp, sae.select(pre, dead), centred=centred)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in sae.named_parameters()} | {"x": inp.grad}
        runs.append((pre, out, grads))
    (pre, out, grads), (pre_c, out_c, grads_c) = runs
    assert out.aux_loss > 0
    torch.testing.assert_close(pre_c, pre, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_c.loss, out.loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(out_c.recon, out.recon, rtol=1e-5, atol=1e-6)
    for name, g in grads.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(grads_c[name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("offset", [0.0, 300.0])  # 300: data far from b_pre (= 0 here)
def test_loss_normaliser_for_data_near_and_far_from_b_pre(offset, kernel_path, decode_path):
    """The fused loss takes the data's spread about b_pre and removes the mean's part, instead of
    a pass for the batch mean first; data far from b_pre would cancel digits, and are centred
    exactly instead."""
    if kernel_path == "stock" and decode_path == "rows":
        pytest.skip("the stock path has one layout")
    torch.manual_seed(12)
    sae = TopKSAE(40, SAEConfig(n_latents=96, k=6))
    x = torch.randn(256, 40) * torch.rand(256, 1) + offset
    out, ref = sae(x), sae(x, dense=True)
    torch.testing.assert_close(out.nmse, ref.nmse, rtol=1e-5, atol=0)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=0)


@pytest.mark.parametrize("multi_topk", [False, True])
def test_input_gradient_matches_dense(kernel_path, multi_topk):
    torch.manual_seed(1)
    sae = TopKSAE(16, SAEConfig(n_latents=64, k=4, multi_topk=multi_topk))
    grads = []
    for dense in (False, True):
        x = torch.randn(10, 16, generator=torch.Generator().manual_seed(2)).requires_grad_()
        sae(x, dense=dense).loss.backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_row_projection_and_normalisation(kernel_path):
    g = torch.Generator().manual_seed(3)
    W = torch.randn(40, 24, generator=g)
    W /= W.norm(dim=1, keepdim=True)
    G = torch.randn(40, 24, generator=g)
    expected = G - (G * W).sum(dim=1, keepdim=True) * W
    kernels.project_rows_(W, G)
    torch.testing.assert_close(G, expected)
    assert (G * W).sum(dim=1).abs().max() < 1e-5
    V = torch.randn(40, 24, generator=g) * 3
    kernels.normalize_rows_(V)
    torch.testing.assert_close(V.norm(dim=1), torch.ones(40))


def test_decode_bias_gradient_matches_dense(kernel_path):
    g = torch.Generator().manual_seed(4)
    W = torch.randn(30, 8, generator=g).requires_grad_()
    bias = torch.randn(8, generator=g).requires_grad_()
    idx = torch.stack([torch.randperm(30, generator=g)[:5] for _ in range(12)])
    vals = torch.rand(12, 5, generator=g).requires_grad_()
    target = torch.randn(12, 8, generator=g)
    grads = []
    for dense in (False, True):
        loss = (kernels.sparse_decode(idx, vals, W, bias, dense=dense) - target).pow(2).sum()
        grads.append(torch.autograd.grad(loss, (vals, W, bias)))
    for sparse_g, dense_g in zip(*grads, strict=True):
        torch.testing.assert_close(sparse_g, dense_g, rtol=1e-4, atol=1e-5)


def test_losses_without_the_reconstruction(kernel_path):
    """Training asks for no reconstruction: it is left out, and the loss is the same."""
    torch.manual_seed(6)
    sae = TopKSAE(20, SAEConfig(n_latents=80, k=5))
    x = torch.randn(30, 20)
    sel = sae.select(sae.preacts(x), None)
    full, lean = sae.losses(x, sel), sae.losses(x, sel, with_recon=False)
    assert full.recon.shape == (30, 20) and lean.recon is None
    torch.testing.assert_close(lean.loss, full.loss, rtol=0, atol=0)


def _native_or_skip():
    if kernels.native.load() is None:
        pytest.skip("native kernels unavailable (no compiler)")


@pytest.mark.parametrize("d", [24, 64])  # 24: a partial 16-column panel and a scalar tail
def test_adam_unit_rows_equals_project_adam_normalise(d):
    """The one-pass decoder step equals its three steps: project, torch's Adam, renormalise."""
    _native_or_skip()
    g = torch.Generator().manual_seed(8)
    W0 = torch.randn(50, d, generator=g)
    W0 /= W0.norm(dim=1, keepdim=True)
    ref = torch.nn.Parameter(W0.clone())
    opt = torch.optim.Adam([ref], lr=3e-3, betas=(0.9, 0.999), eps=6.25e-10, fused=True)
    W, m, v = W0.clone(), torch.zeros(50, d), torch.zeros(50, d)
    for step in range(1, 4):
        G = torch.randn(50, d, generator=g) * 10.0**-step  # moments of mixed scales
        G_given = G.clone()
        unit_adam.adam_unit_rows_(W, G, m, v, step, 3e-3, (0.9, 0.999), 6.25e-10)
        assert torch.equal(G, G_given)  # read only
        ref.grad = G.clone()
        kernels.project_rows_(ref.data, ref.grad)
        opt.step()
        kernels.normalize_rows_(ref.data)
        torch.testing.assert_close(W, ref.data, rtol=0, atol=2e-6)
        torch.testing.assert_close(m, opt.state[ref]["exp_avg"], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(v, opt.state[ref]["exp_avg_sq"], rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(W.norm(dim=1), torch.ones(50))
    assert (W - W0).abs().max() > 1e-3  # it moved


def test_adam_unit_rows_leaves_the_decoder_its_panels(monkeypatch):
    """The step packs W for the next decode while it holds the rows; the decoder uses them only
    while W is unchanged since, and its losses are the same either way."""
    _native_or_skip()
    monkeypatch.setattr(kernels, "DECODE_PATH", "panels")
    torch.manual_seed(9)
    sae = TopKSAE(40, SAEConfig(n_latents=96, k=6))
    W = sae.W_dec
    with torch.no_grad():
        G, m, v = torch.randn(96, 40), torch.zeros(96, 40), torch.zeros(96, 40)
        unit_adam.adam_unit_rows_(W, G, m, v, 1, 1e-2, (0.9, 0.999), 1e-8)
    panels = unit_adam.packed(W)
    assert panels.shape == (3, 96, 16)
    padded = torch.nn.functional.pad(W.detach(), (0, 8))  # 40 columns -> 3 panels of 16
    assert torch.equal(panels, padded.reshape(96, 3, 16).permute(1, 0, 2))
    x = torch.randn(30, 40)
    sel = sae.select(sae.preacts(x), None)
    with_panels = sae.losses(x, sel).loss
    unit_adam._PANELS.clear()
    torch.testing.assert_close(sae.losses(x, sel).loss, with_panels, rtol=0, atol=0)
    with torch.no_grad():
        unit_adam.adam_unit_rows_(W, *[torch.zeros(96, 40)] * 3, 1, 1e-2, (0.9, 0.999), 1e-8)
        assert unit_adam.packed(W).numel() > 0
        W.mul_(2.0)  # an in-place change after the step: its panels are stale
    assert unit_adam.packed(W).numel() == 0
    with torch.no_grad():
        unit_adam.adam_unit_rows_(W, *[torch.zeros(96, 40)] * 3, 1, 1e-2, (0.9, 0.999), 1e-8)
    sae.double().float()  # new data under the same parameter
    assert unit_adam.packed(W).numel() == 0
