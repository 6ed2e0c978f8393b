"""The encoder GEMM's tensor-core layout: 16-bit operands padded to rows of a multiple of 8
elements with zeros, the pre-activations unchanged; float32 left alone."""

from __future__ import annotations

import pytest
import torch

from sae_core.config import SAEConfig
from sae_core.sae import TopKSAE, kernels
from sae_core.sae.gemm_layout import TENSOR_CORE_ELEMENTS, aligned, aligned_operand
from sae_core.sae.normalize import InputNorm

D, N, B = 29, 45, 37  # nothing a multiple of 8


def test_16_bit_operands_are_zero_padded_to_aligned_rows():
    t, offset = torch.randn(5, D), torch.randn(D)
    out = aligned_operand(t, torch.bfloat16, offset)
    assert out.shape == (5, 32) and out.stride(0) % TENSOR_CORE_ELEMENTS == 0
    assert torch.equal(out[:, D:], torch.zeros(5, 32 - D, dtype=torch.bfloat16))
    assert torch.allclose(out[:, :D].float(), t - offset, rtol=1e-2, atol=1e-2)
    assert aligned_operand(t, torch.float32).shape == (5, D)  # float32: as it was
    assert [aligned(c) for c in (1, 8, 9, 576, 577)] == [8, 8, 16, 576, 584]


def test_encoder_output_rows_are_aligned_for_any_n():
    for cols in (N, 4608, 16383):
        assert kernels.padded_rows(3, cols, torch.bfloat16, "cpu").stride(0) % 8 == 0


@pytest.mark.parametrize("centred", [True, False])
def test_bf16_preacts_at_an_unaligned_width_see_aligned_operands_and_equal_the_plain_gemm(
    monkeypatch, centred
):
    torch.manual_seed(0)
    x_raw = torch.randn(B, D) * 3 + 1
    sae = TopKSAE(D, SAEConfig(n_latents=N, k=4), InputNorm.fit("per_token", x_raw))
    with torch.no_grad():
        sae.b_pre.normal_(0, 0.3)
        sae.b_enc.normal_(0, 0.1)
    x = x_raw - sae.b_pre.detach() if centred else x_raw
    seen = []
    gemm = kernels.encoder_preacts

    def spy(x, b_pre, W, b_enc, out=None):
        seen.append((x, b_pre, W, out))
        return gemm(x, b_pre, W, b_enc, out=out)

    monkeypatch.setattr(kernels, "encoder_preacts", spy)
    pre = sae.preacts(x, dtype=torch.bfloat16, centred=centred)
    ((xs, b_pre, W, out),) = seen
    assert b_pre is None and xs.shape == (B, 32) and W.shape == (N, 32)
    assert all(t.stride(0) % TENSOR_CORE_ELEMENTS == 0 for t in (xs, W, out))
    # The same bf16 operands without the padding: the zero columns change nothing.
    xb = (x_raw - sae.b_pre.detach()).bfloat16()
    plain = xb @ sae.W_enc.detach().bfloat16().t() + sae.b_enc.detach().bfloat16()
    assert torch.allclose(pre.float(), plain.float(), rtol=2e-2, atol=2e-2)
    # And the float32 reference, to bf16's rounding.
    ref = (x_raw - sae.b_pre.detach()) @ sae.W_enc.detach().t() + sae.b_enc.detach()
    assert (pre.float() - ref).abs().max() <= 2e-2 * ref.abs().max()


def test_float32_preacts_are_not_padded(monkeypatch):
    sae = TopKSAE(D, SAEConfig(n_latents=N, k=4))
    seen = []
    gemm = kernels.encoder_preacts
    monkeypatch.setattr(
        kernels,
        "encoder_preacts",
        lambda x, b, W, c, out=None: seen.append(W) or gemm(x, b, W, c, out=out),
    )
    sae.preacts(torch.randn(B, D))
    assert seen[0].shape == (N, D)
