"""Ranks, Spearman, Pearson, partial correlation and participation ratio against scipy/numpy."""

import math

import numpy as np
import pytest
import scipy.spatial.distance
import scipy.stats
import torch
from hypothesis import given
from hypothesis import strategies as st

from windtunnel import geometry as g

F64 = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=F64)


# ----------------------------------------------------------------------------- rank statistics


@given(
    xs=st.lists(st.integers(-3, 3), min_size=3, max_size=30),
    seed=st.integers(0, 10_000),
)
def test_ranks_spearman_pearson_match_scipy_with_ties(xs, seed):
    x = torch.tensor(xs, dtype=F64)
    y = torch.randint(-2, 3, (len(xs),), generator=gen(seed)).to(F64)
    np.testing.assert_allclose(g.average_ranks(x).numpy(), scipy.stats.rankdata(xs), rtol=0, atol=0)
    if np.ptp(xs) == 0 or float(y.max() - y.min()) == 0:
        assert math.isnan(float(g.spearman_correlation(x, y)))
        assert math.isnan(float(g.pearson_correlation(x, y)))
        return
    rho = scipy.stats.spearmanr(x.numpy(), y.numpy()).statistic
    r = scipy.stats.pearsonr(x.numpy(), y.numpy()).statistic
    assert float(g.spearman_correlation(x, y)) == pytest.approx(rho, abs=1e-12)
    assert float(g.pearson_correlation(x, y)) == pytest.approx(r, abs=1e-12)


def test_average_ranks_integer_and_empty():
    torch.testing.assert_close(
        g.average_ranks(torch.tensor([10, 10, 5])), torch.tensor([2.5, 2.5, 1.0], dtype=F64)
    )
    assert g.average_ranks(torch.tensor([], dtype=F64)).numel() == 0


def test_spearman_monotone_transform():
    x = randn(50, seed=12)
    assert float(g.spearman_correlation(x, torch.exp(3 * x))) == pytest.approx(1.0)
    assert float(g.spearman_correlation(x, -(x**3))) == pytest.approx(-1.0)


@pytest.mark.parametrize(
    "fn",
    [g.pearson_correlation, g.spearman_correlation],
)
@pytest.mark.parametrize(
    "x,y,field",
    [
        (torch.zeros(3, 1, dtype=F64), torch.zeros(3, dtype=F64), "x must be a real 1-D"),
        (torch.zeros(3, dtype=F64), torch.zeros(3, dtype=torch.bool), "y must be a real 1-D"),
        (torch.zeros(3, dtype=F64), torch.zeros(4, dtype=F64), "one length"),
        (torch.zeros(1, dtype=F64), torch.zeros(1, dtype=F64), "one length"),
        (torch.tensor([0.0, math.nan], dtype=F64), torch.zeros(2, dtype=F64), "x must be finite"),
    ],
)
def test_correlations_reject(fn, x, y, field):
    with pytest.raises(ValueError, match=f"{fn.__name__}.*{field}"):
        fn(x, y)


def test_average_ranks_rejects():
    with pytest.raises(ValueError, match="average_ranks.x must be a real 1-D"):
        g.average_ranks(torch.zeros(2, 2))


def test_partial_correlation_against_numpy():
    n = 60
    pos = torch.randint(0, 5, (n,), generator=gen(13))
    x = randn(n, seed=14) + pos
    y = 0.5 * x + randn(n, seed=15) - 2 * pos
    # linear: residuals of least squares on [1, pos]
    design = np.stack([np.ones(n), pos.numpy()], 1)
    rx = x.numpy() - design @ np.linalg.lstsq(design, x.numpy(), rcond=None)[0]
    ry = y.numpy() - design @ np.linalg.lstsq(design, y.numpy(), rcond=None)[0]
    got = float(g.partial_correlation(x, y, pos, kind="linear"))
    assert got == pytest.approx(np.corrcoef(rx, ry)[0, 1], abs=1e-12)
    # group: subtract per-position means (plain loop)
    gx, gy = x.numpy().copy(), y.numpy().copy()
    for p in range(5):
        sel = pos.numpy() == p
        gx[sel] -= gx[sel].mean()
        gy[sel] -= gy[sel].mean()
    assert float(g.partial_correlation(x, y, pos)) == pytest.approx(
        np.corrcoef(gx, gy)[0, 1], abs=1e-12
    )
    # y a function of position: nothing left to correlate
    assert math.isnan(float(g.partial_correlation(x, pos.to(F64) ** 2, pos)))


def test_control_explains_is_the_rule_that_makes_the_partial_nan():
    """log2(V - i) per site, with the last-bit differences between sequences that float64 arithmetic
    leaves (as the bijection's entropy labels have): explained by position, and the partial is NaN."""
    pos = torch.arange(19).repeat(30)
    h = torch.log2(20.0 - pos.to(F64))
    h[::7] = torch.nextafter(h[::7], torch.full_like(h[::7], math.inf))  # one ulp up in some sequences
    assert len(torch.unique(torch.stack([pos.to(F64), h]), dim=1)[0]) > 19  # not exactly one value per position
    assert g.control_explains(h, pos)
    x = randn(pos.numel(), seed=3)
    assert math.isnan(float(g.partial_correlation(x, h, pos)))
    assert not g.control_explains(x, pos) and not math.isnan(float(g.partial_correlation(x, x + h, pos)))
    assert g.control_explains(3.0 * pos.to(F64) + 1.0, pos, kind="linear")
    assert not g.control_explains(pos.to(F64) ** 2, pos, kind="linear") and g.control_explains(pos.to(F64) ** 2, pos)
    with pytest.raises(ValueError, match="control_explains.kind must be one of"):
        g.control_explains(x, pos, kind="rank")


def test_partial_correlation_rejects():
    x = torch.arange(4, dtype=F64)
    with pytest.raises(ValueError, match="partial_correlation.kind must be one of"):
        g.partial_correlation(x, x, x, kind="rank")
    with pytest.raises(ValueError, match="partial_correlation: x and control"):
        g.partial_correlation(x, x, x[:3])
    with pytest.raises(ValueError, match=r"partial_correlation.x must be at least 3 points"):
        g.partial_correlation(x[:2], x[:2], x[:2])


def test_participation_ratio_rejects():
    with pytest.raises(ValueError, match="participation_ratio.points must be a tensor"):
        g.participation_ratio(torch.zeros(1, 3, dtype=F64))
    with pytest.raises(ValueError, match="participation_ratio: points"):
        g.participation_ratio(torch.zeros(3, dtype=F64))


def test_linear_probe_r2_reads_a_linear_map_and_not_noise():
    x = torch.randn(2000, 8, generator=gen(1), dtype=F64)
    w = torch.randn(8, 3, generator=gen(2), dtype=F64)
    noise = torch.randn(2000, 1, generator=gen(3), dtype=F64)
    y = torch.cat([x @ w, x[:, :1] ** 2, noise], dim=1)  # exact, nonlinear (not in the span), independent
    r2 = g.linear_probe_r2(x, y, generator=gen(4), ridge=0.0)
    assert r2.shape == (5,)
    assert torch.all(r2[:3] > 1 - 1e-10)
    assert abs(float(r2[3])) < 0.05 and abs(float(r2[4])) < 0.05
    # against an explicit least-squares fit on the same split (sklearn-style R² with the train mean)
    assert float(g.linear_probe_r2(x, y[:, 0], generator=gen(4), ridge=0.0)) == pytest.approx(float(r2[0]), abs=1e-12)


def test_linear_probe_r2_groups_stop_a_per_group_constant_from_leaking():
    # 100 groups of 10 rows; each group has a random constant target and a random feature vector
    # shared by its rows (a per-sequence latent). Split by row, the probe memorises the groups;
    # split by group it cannot, because a fresh group's feature says nothing about its target.
    n_groups, per = 100, 10
    groups = torch.arange(n_groups).repeat_interleave(per)
    features = torch.randn(n_groups, 256, generator=gen(5), dtype=F64)[groups]
    target = torch.randn(n_groups, generator=gen(6), dtype=F64)[groups]
    leaky = g.linear_probe_r2(features, target, generator=gen(7), ridge=1e-6)
    honest = g.linear_probe_r2(features, target, groups=groups, generator=gen(7), ridge=1e-6)
    assert float(leaky) > 0.5
    assert float(honest) < 0.1


def test_linear_probe_r2_rejects_bad_input():
    x = torch.randn(10, 2, generator=gen(0), dtype=F64)
    with pytest.raises(ValueError, match="targets"):
        g.linear_probe_r2(x, torch.zeros(9, 1, dtype=F64), generator=gen(0))
    with pytest.raises(ValueError, match="test_fraction"):
        g.linear_probe_r2(x, x, generator=gen(0), test_fraction=1.0)
    with pytest.raises(ValueError, match="groups"):
        g.linear_probe_r2(x, x, groups=torch.zeros(3), generator=gen(0))
    with pytest.raises(ValueError, match="fewer than 2 rows"):
        g.linear_probe_r2(x, x, groups=torch.zeros(10), generator=gen(0))
