import math

import pytest

from sae_core.studies.convergence import (
    binned_curve,
    fit_convergence_exponent,
    improvement_per_doubling,
    tokens_to_convergence,
)

BATCH = 4096


def history(loss, tokens: int) -> list[dict]:
    return [{"tokens": t, "nmse": loss(t)} for t in range(BATCH, tokens + 1, BATCH)]


def test_power_law_falls_at_its_constant_rate_per_doubling():
    rows = history(lambda t: 5.0 * t**-0.2, 2**22)
    rates = improvement_per_doubling(binned_curve(rows))
    assert rates == pytest.approx([1 - 2**-0.2] * len(rates), rel=5e-3)


def test_still_falling_fast_at_the_end_is_not_converged():
    rows = history(lambda t: 5.0 * t**-0.2, 2**22)  # 12.9% per doubling throughout
    assert tokens_to_convergence(rows, tolerance=0.10) is None
    assert tokens_to_convergence(rows, tolerance=0.15) == pytest.approx(2**17, rel=0.3)


def test_convergence_point_is_where_the_rate_drops_for_good():
    # L = 1 + T0/T: from T/2 to T it falls by a / (1 + 2a), a = T0/T, which is below 5% from
    # T = 18 T0 on (bins of a quarter doubling: within 20%).
    t0 = 2**18
    rows = history(lambda t: 1 + t0 / t, 2**24)
    found = tokens_to_convergence(rows, tolerance=0.05, bins_per_doubling=4)
    assert found == pytest.approx(18 * t0, rel=0.2)
    # A late stretch that falls fast again moves the point past it.
    spiked = [
        r | {"nmse": r["nmse"] * 0.85} if 2**23 <= r["tokens"] < 2**23 + 2**20 else r for r in rows
    ]
    assert tokens_to_convergence(spiked, tolerance=0.05, bins_per_doubling=4) > 2**23


def test_exponent_of_curves_that_stretch_as_n_to_the_0_6():
    ns, ks, found = [], [], []
    for n in (64, 512, 4096):
        for k in (16, 64):
            scale = 2**12 * n**0.6 * (k / 16) ** 0.3
            rows = history(lambda t, s=scale: 0.1 + 0.2 * (1 + s / t), int(2**8 * scale))
            ns.append(n)
            ks.append(k)
            found.append(tokens_to_convergence(rows, tolerance=0.03, bins_per_doubling=4))
    fit = fit_convergence_exponent(ns, ks, found)
    assert fit.points == 6
    assert fit.exponent == pytest.approx(0.6, abs=0.05)
    assert all(a == pytest.approx(0.6, abs=0.08) for a in fit.per_k.values())


def test_exponent_fit_is_exact_on_a_power_law_and_skips_unconverged_points():
    ns = [1152, 2304, 4608, 9216, 1152, 2304, 9216]
    ks = [16, 16, 16, 16, 32, 32, 32]
    tokens = [3 * n**0.6 * k**0.1 for n, k in zip(ns, ks, strict=True)]
    tokens[3] = None
    fit = fit_convergence_exponent(ns, ks, tokens)
    assert fit.exponent == pytest.approx(0.6)
    assert fit.stderr == pytest.approx(0, abs=1e-9)
    assert set(fit.per_k) == {16, 32}
    assert fit.points == 6


def test_no_exponent_without_two_widths_at_some_k():
    assert fit_convergence_exponent([1152, 2304], [16, 32], [1e6, 2e6]) is None
    assert fit_convergence_exponent([1152, 2304], [16, 16], [1e6, None]) is None


def test_binned_curve_skips_warm_up_and_averages_in_log_bins():
    rows = history(lambda t: math.log(t), 2**18)
    curve = binned_curve(rows, bins_per_doubling=1)
    assert [math.floor(math.log2(c.tokens)) for c in curve] == [16, 17, 18]
    assert all(c.tokens >= 2**16 for c in curve)
