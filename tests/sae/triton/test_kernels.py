"""Each Triton kernel equals its dense reference (float32 and bfloat16 inputs), is deterministic,
and refuses a wrong argument with one line naming it."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install '.[triton]')")

from sae_core.sae.expander import expander_mask, scatter_rows  # noqa: E402
from sae_core.sae.triton.compact import compact_decode, compact_dots  # noqa: E402
from sae_core.sae.triton.gather import gather_dots, gather_sum  # noqa: E402
from sae_core.sae.triton.latent_sums import by_latent, latent_sums  # noqa: E402

# K = 19: a full slot block of 16 and a partial one; d = 37: a partial column block; n = 23
# with rows 0 and n - 1 always chosen, so an index off by one reads a wrong or missing row.
SHAPES = [(7, 5, 23, 37), (5, 19, 23, 37)]


def _selection(B: int, K: int, n: int, seed: int) -> torch.Tensor:
    """idx [B, K]: distinct latents per token, the first and last latent in every row."""
    g = torch.Generator().manual_seed(seed)
    middle = [1 + torch.randperm(n - 2, generator=g)[: K - 2] for _ in range(B)]
    ends = torch.tensor([0, n - 1])
    return torch.stack([torch.cat([ends[:1], m, ends[1:]]) for m in middle])


def _codes(idx: torch.Tensor, vals: torch.Tensor, n: int) -> torch.Tensor:
    """The dense [B, n] code matrix of a selection (repeats add)."""
    return torch.zeros(idx.shape[0], n, dtype=vals.dtype).scatter_add(1, idx, vals)


@pytest.mark.parametrize("B, K, n, d", SHAPES)
@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32])
def test_gather_sum_and_dots_equal_dense(device, B, K, n, d, idx_dtype):
    g = torch.Generator().manual_seed(1)
    idx = _selection(B, K, n, 0)
    vals, W = torch.randn(B, K, generator=g), torch.randn(n, d, generator=g)
    bias, grad = torch.randn(d, generator=g), torch.randn(B, d, generator=g)
    z = _codes(idx, vals, n)
    on = idx.to(device, idx_dtype)
    out = gather_sum(on, vals.to(device), W.to(device), bias.to(device))
    torch.testing.assert_close(out.cpu(), z @ W + bias, rtol=1e-5, atol=1e-5)
    no_bias = gather_sum(on, vals.to(device), W.to(device))
    torch.testing.assert_close(no_bias.cpu(), z @ W, rtol=1e-5, atol=1e-5)
    dots = gather_dots(on, grad.to(device), W.to(device))
    torch.testing.assert_close(dots.cpu(), (grad @ W.t()).gather(1, idx), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("B, K, n, d", SHAPES)
def test_latent_sums_equal_the_dense_products(device, B, K, n, d):
    g = torch.Generator().manual_seed(2)
    idx = _selection(B, K, n, 3)
    coef, src = torch.randn(B, K, generator=g), torch.randn(B, d, generator=g)
    z = _codes(idx, coef, n + 3)  # three latents past the last chosen: no token chose them
    sums = latent_sums(
        by_latent(idx.to(device), n + 3), coef.to(device), src.to(device), with_sums=True
    )
    torch.testing.assert_close(sums.rows.cpu(), z.t() @ src, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sums.coef_sums.cpu(), z.sum(dim=0), rtol=1e-5, atol=1e-5)
    assert not sums.rows[n:].any() and not sums.coef_sums[n:].any()
    z = z[:, :n]
    cols = expander_mask(n, d, 3, seed=4).to(device)
    at_cols = latent_sums(by_latent(idx.to(device), n), coef.to(device), src.to(device), cols)
    expected = (z.t() @ src).gather(1, cols.cpu().long())
    torch.testing.assert_close(at_cols.rows.cpu(), expected, rtol=1e-5, atol=1e-5)
    assert at_cols.coef_sums is None


@pytest.mark.parametrize("B, K, n, d", SHAPES)
@pytest.mark.parametrize("degree", [2, 3])
def test_compact_decoder_equals_the_dense_masked_decoder(device, B, K, n, d, degree):
    g = torch.Generator().manual_seed(5)
    idx = _selection(B, K, n, 6)
    rows = expander_mask(n, d, degree, seed=7)
    values = torch.randn(n, degree, generator=g)
    vals, bias, grad = (torch.randn(B, K, generator=g), torch.randn(d, generator=g),
                        torch.randn(B, d, generator=g))  # fmt: skip
    D, z = scatter_rows(rows, values, d), _codes(idx, vals, n)
    args = (idx.to(device), vals.to(device), rows.to(device), values.to(device))
    out = compact_decode(*args, d, bias.to(device))
    torch.testing.assert_close(out.cpu(), z @ D + bias, rtol=1e-5, atol=1e-5)
    dots = compact_dots(idx.to(device), grad.to(device), rows.to(device), values.to(device))
    torch.testing.assert_close(dots.cpu(), (grad @ D.t()).gather(1, idx), rtol=1e-5, atol=1e-5)


def test_bfloat16_inputs_within_the_stated_tolerance(device):
    """bf16 weights, activations and gradients, float32 accumulation: within 2% of the largest
    magnitude of the float32 dense reference (each input rounding is <= 2^-9 relative)."""
    B, K, n, d = 6, 19, 40, 37
    g = torch.Generator().manual_seed(8)
    idx = _selection(B, K, n, 9).to(device)
    vals, W = torch.randn(B, K, generator=g), torch.randn(n, d, generator=g)
    grad = torch.randn(B, d, generator=g)
    z = _codes(idx.cpu(), vals, n)

    def bf(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, torch.bfloat16)

    def close(got: torch.Tensor, ref: torch.Tensor) -> None:
        assert got.dtype == torch.float32  # accumulated and returned in float32
        err = (got.cpu() - ref).abs().max() / ref.abs().max()
        assert err <= 0.02, float(err)

    close(gather_sum(idx, bf(vals), bf(W)), z @ W)
    close(gather_dots(idx, bf(grad), bf(W)), (grad @ W.t()).gather(1, idx.cpu()))
    close(latent_sums(by_latent(idx, n), bf(vals), bf(grad)).rows, z.t() @ grad)
    rows, values = expander_mask(n, d, 3, seed=11), torch.randn(n, 3, generator=g)
    D = scatter_rows(rows, values, d)
    close(compact_decode(idx, bf(vals), rows.to(device), bf(values), d), z @ D)
    close(
        compact_dots(idx, bf(grad), rows.to(device), bf(values)),
        (grad @ D.t()).gather(1, idx.cpu()),
    )


def test_outputs_are_deterministic(device):
    """Two runs give the same bits (the weight gradients sum each latent in a fixed order)."""
    g = torch.Generator().manual_seed(10)
    idx = torch.randint(0, 4, (64, 8), generator=g).to(device)  # every latent chosen often
    coef, src = torch.randn(64, 8, generator=g).to(device), torch.randn(64, 33, generator=g)
    runs = [latent_sums(by_latent(idx, 4), coef, src.to(device), with_sums=True) for _ in range(2)]
    assert torch.equal(runs[0].rows, runs[1].rows)
    assert torch.equal(runs[0].coef_sums, runs[1].coef_sums)


def test_a_wrong_argument_is_one_line_naming_it(device):
    idx, vals = torch.zeros(4, 3, dtype=torch.int64, device=device), torch.ones(4, 3, device=device)
    W = torch.ones(30, 8, dtype=torch.float64, device=device)
    with pytest.raises(
        ValueError,
        match=r"^gather_sum: W must be a float32, bfloat16 or float16 tensor of shape \[n, d\]",
    ):
        gather_sum(idx, vals, W)
    with pytest.raises(
        ValueError,
        match=r"^gather_dots: g must be .* shape \[B, d\] = \[4, 8\] .*; got float32 tensor of shape \[4, 9\]",
    ):
        gather_dots(idx, torch.ones(4, 9, device=device), W.float())
    with pytest.raises(ValueError, match=r"^gather_sum: idx must be a int64 or int32 tensor"):
        gather_sum(vals, vals, W.float())
