"""Value-manifold PCA (docs/theory.md §8.3) against numpy SVD, scipy and constructed manifolds."""

import math

import numpy as np
import pytest
import scipy.spatial.distance
import scipy.stats
import torch

from windtunnel import geometry as g

F64 = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=F64)


def orthonormal(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """[n, d] with orthonormal rows (n <= d)."""
    q, _ = torch.linalg.qr(randn(d, n, seed=seed))
    return q.T


def hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=F64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


# ----------------------------------------------------------------------------- value manifold


def entropy_manifold(n_levels=6, per_level=20, d=12, seed=0, noise=1e-3):
    """States on a smooth 1-D curve parametrised by entropy, plus small noise."""
    levels = torch.log2(torch.arange(1, n_levels + 1, dtype=F64) + 1)
    h = levels.repeat_interleave(per_level)
    basis = orthonormal(3, d, seed=seed)
    curve = torch.stack([h, 0.3 * torch.sin(h), 0.2 * h**2], 1)  # monotone first coordinate
    states = curve @ basis + noise * randn(h.numel(), d, seed=seed + 1)
    return states, h


def test_pca_explained_variance_matches_numpy_svd():
    x = randn(40, 7, seed=16) @ randn(7, 7, seed=17) + 3.0
    h = randn(40, seed=18)
    probe = g.ValueManifoldPCA().fit(x, h)
    xn = x.numpy()
    z = (xn - xn.mean(0)) / xn.std(0)
    _, s, vt = np.linalg.svd(z, full_matrices=False)
    np.testing.assert_allclose(
        probe.explained_variance_ratio_.numpy(), s**2 / (s**2).sum(), atol=1e-12
    )
    np.testing.assert_allclose(probe.explained_variance_.numpy(), s**2 / 39, atol=1e-10)
    np.testing.assert_allclose(np.abs(probe.components_.numpy() @ vt.T), np.eye(7), atol=1e-8)
    np.testing.assert_allclose(probe.mean_.numpy(), xn.mean(0), atol=1e-12)
    np.testing.assert_allclose(probe.scale_.numpy(), xn.std(0), atol=1e-12)
    torch.testing.assert_close(probe.transform(x)[:, 0], probe.pc1_scores_)
    pr = (s**2).sum() ** 2 / (s**4).sum()
    assert probe.summary_.participation_ratio == pytest.approx(pr, rel=1e-10)
    assert float(g.participation_ratio(x, standardize=True)) == pytest.approx(pr, rel=1e-10)
    assert probe.n_components_ == 7 and probe.n_features_in_ == 7 and probe.n_samples_ == 40
    assert g.ValueManifoldPCA(n_components=2).fit(x, h).components_.shape == (2, 7)


def test_pca_points_on_a_line():
    t = torch.linspace(-1, 1, 30, dtype=F64)
    direction = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=F64)
    states = t[:, None] * direction + torch.tensor([5.0, 0.0, 1.0, -1.0], dtype=F64)
    s = g.ValueManifoldPCA().fit(states, t).summary_
    assert s.pc1_share == pytest.approx(1.0, abs=1e-12)
    assert s.pc12_share == pytest.approx(1.0, abs=1e-12)
    assert s.participation_ratio == pytest.approx(1.0, abs=1e-10)
    assert s.n_components_for_variance == 1
    assert s.spearman == pytest.approx(1.0) and s.pearson == pytest.approx(1.0)
    assert float(g.participation_ratio(states)) == pytest.approx(1.0, abs=1e-10)


def test_pca_isotropic_design_and_components_for_variance():
    # centred, orthogonal, equal-norm columns (Hadamard): every eigenvalue equal
    k = 4
    x = hadamard(8)[:, 1 : k + 1]
    h = torch.arange(8, dtype=F64)
    s = g.ValueManifoldPCA().fit(x, h).summary_
    assert s.participation_ratio == pytest.approx(k)
    assert s.pc1_share == pytest.approx(1 / k) and s.pc12_share == pytest.approx(2 / k)
    assert s.n_components_for_variance == 4
    assert (
        g.ValueManifoldPCA(variance_threshold=0.5).fit(x, h).summary_.n_components_for_variance == 2
    )
    assert float(g.participation_ratio(x)) == pytest.approx(k)


def test_pca_zero_variance_feature_is_harmless():
    x = randn(25, 5, seed=19)
    h = randn(25, seed=20)
    with_const = torch.cat(
        [x, torch.full((25, 1), 0.1, dtype=F64)], 1
    )  # 0.1 is not exact in binary
    a = g.ValueManifoldPCA().fit(x, h)
    b = g.ValueManifoldPCA().fit(with_const, h)
    assert not any(
        torch.isnan(t).any() for t in (b.components_, b.explained_variance_ratio_, b.scale_)
    )
    torch.testing.assert_close(b.explained_variance_ratio_[:5], a.explained_variance_ratio_)
    assert float(b.explained_variance_ratio_[5]) == pytest.approx(0.0, abs=1e-14)
    assert b.summary_.spearman == pytest.approx(a.summary_.spearman)


def test_pca_entropy_ordered_manifold():
    states, h = entropy_manifold()
    probe = g.ValueManifoldPCA().fit(states, h, generator=gen(21))
    s = probe.summary_
    assert s.ordering_score == 1.0
    assert s.n_bins == 6
    # within-level noise breaks rank ties, so the pooled Spearman is just below 1
    assert s.spearman > 0.98 and s.pearson > 0.99
    assert s.pc1_share > 0.9
    assert s.probe_r2 > 0.99
    assert probe.bin_counts_.tolist() == [20] * 6
    torch.testing.assert_close(probe.bin_entropy_bits_, torch.unique(h))
    # reversed orientation: PC1 is flipped so that Spearman >= 0
    flipped = g.ValueManifoldPCA().fit(-states, h).summary_
    assert flipped.spearman == pytest.approx(s.spearman) and flipped.ordering_score == 1.0
    # without noise every level is one point: ρ = 1 exactly (ties in both variables)
    exact = g.ValueManifoldPCA().fit(*entropy_manifold(noise=0.0)).summary_
    assert exact.spearman == pytest.approx(1.0, abs=1e-12) and exact.ordering_score == 1.0


def test_pca_ordering_score_quantile_bins_and_non_monotone_curve():
    h = torch.linspace(0, 4, 200, dtype=F64)  # 200 distinct levels -> quantile bins
    bump = torch.stack([torch.cos(math.pi * h / 4), 0.01 * randn(200, seed=22)], 1)
    probe = g.ValueManifoldPCA(n_bins=8).fit(bump, h)
    assert probe.summary_.n_bins == 8 and probe.bin_counts_.tolist() == [25] * 8
    assert probe.summary_.ordering_score == pytest.approx(1.0)
    # a U-shaped curve along PC1: bin means go down then up, the ordering score drops
    u_shape = torch.stack([(h - 2) ** 2, 0.01 * randn(200, seed=23)], 1)
    probe = g.ValueManifoldPCA(n_bins=8).fit(u_shape, h)
    ref = scipy.stats.spearmanr(
        probe.bin_entropy_bits_.numpy(), probe.bin_pc1_mean_.numpy()
    ).statistic
    assert probe.summary_.ordering_score == pytest.approx(ref)
    assert abs(probe.summary_.ordering_score) < 0.5


def test_pca_probe_split_uses_generator_only():
    states, h = entropy_manifold(seed=3)
    noisy = states + 0.3 * randn(*states.shape, seed=24)
    a = g.ValueManifoldPCA().fit(noisy, h, generator=gen(5))
    b = g.ValueManifoldPCA().fit(noisy, h, generator=gen(5))
    assert a.summary_.probe_r2 == b.summary_.probe_r2
    # check the R² against a numpy fit on the same split
    perm = torch.randperm(h.numel(), generator=gen(5))
    test, train = perm[:24], perm[24:]
    z = ((noisy - a.mean_) / a.scale_).numpy()
    design = np.concatenate([z, np.ones((h.numel(), 1))], 1)
    coef = np.linalg.lstsq(design[train.numpy()], h.numpy()[train.numpy()], rcond=None)[0]
    pred = design[test.numpy()] @ coef
    yt = h.numpy()[test.numpy()]
    r2 = 1 - ((yt - pred) ** 2).sum() / ((yt - yt.mean()) ** 2).sum()
    assert a.summary_.probe_r2 == pytest.approx(r2, abs=1e-8)
    assert g.ValueManifoldPCA().fit(noisy, h).summary_.probe_r2 is None
    ridge = g.ValueManifoldPCA(probe_ridge=1e3).fit(noisy, h, generator=gen(5)).summary_.probe_r2
    assert ridge < a.summary_.probe_r2


def test_pca_partial_correlation_given_position():
    states, h = entropy_manifold()
    positions = (h * 10).round().long()  # entropy is a function of position here
    s = g.ValueManifoldPCA().fit(states, h, positions=positions).summary_
    assert math.isnan(s.partial_pearson_given_position)
    # entropy varies within a position: compare with the standalone function
    h2 = h + 0.1 * randn(h.numel(), seed=25)
    probe = g.ValueManifoldPCA(position_control="linear").fit(states, h2, positions=positions)
    expected = g.partial_correlation(probe.pc1_scores_, h2, positions, kind="linear")
    assert probe.summary_.partial_pearson_given_position == pytest.approx(float(expected))
    assert (
        g.summarize_value_manifold(states, h2, positions=positions, position_control="linear")
        == probe.summary_
    )


def test_summary_with_single_feature():
    x = torch.arange(5, dtype=F64)[:, None]
    s = g.summarize_value_manifold(x, -torch.arange(5, dtype=F64))
    assert s.pc1_share == 1.0 and s.pc12_share == 1.0 and s.spearman == pytest.approx(1.0)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(n_components=0), "n_components"),
        (dict(variance_threshold=0.0), "variance_threshold"),
        (dict(variance_threshold=1.5), "variance_threshold"),
        (dict(n_bins=1), "n_bins"),
        (dict(test_fraction=1.0), "test_fraction"),
        (dict(probe_ridge=-1.0), "probe_ridge"),
        (dict(position_control="pos"), "position_control"),
    ],
)
def test_pca_constructor_rejects(kwargs, field):
    with pytest.raises(ValueError, match=f"ValueManifoldPCA.{field} must be"):
        g.ValueManifoldPCA(**kwargs)


def test_pca_constructor_reports_all_problems():
    with pytest.raises(ValueError, match="(?s)n_bins.*test_fraction"):
        g.ValueManifoldPCA(n_bins=0, test_fraction=2.0)


@pytest.mark.parametrize(
    "states,h,kwargs,field",
    [
        (torch.zeros(2, 3, dtype=F64), torch.zeros(2, dtype=F64), {}, "states must be a tensor"),
        (torch.zeros(5, dtype=F64), torch.zeros(5, dtype=F64), {}, "states"),
        (randn(5, 3), torch.zeros(4, dtype=F64), {}, "entropy_bits must be a tensor"),
        (randn(5, 3), torch.zeros(5, dtype=torch.long), {}, "entropy_bits"),
        (
            randn(5, 3),
            torch.tensor([0.0, 1, 2, 3, math.nan], dtype=F64),
            {},
            "entropy_bits must be finite",
        ),
        (
            randn(5, 3).masked_fill(torch.eye(5, 3, dtype=torch.bool), math.inf),
            torch.zeros(5, dtype=F64),
            {},
            "states must be finite",
        ),
        (torch.ones(5, 3, dtype=F64), torch.zeros(5, dtype=F64), {}, "states must be non-constant"),
        (randn(5, 3), torch.zeros(5, dtype=F64), dict(positions=torch.zeros(4)), "positions"),
        (
            randn(6, 3),
            torch.zeros(6, dtype=F64),
            dict(generator=gen()),
            "states must be enough rows",
        ),
    ],
)
def test_pca_fit_rejects(states, h, kwargs, field):
    with pytest.raises(ValueError, match=f"ValueManifoldPCA.fit.*{field}"):
        g.ValueManifoldPCA().fit(states, h, **kwargs)


def test_pca_transform_rejects():
    with pytest.raises(ValueError, match="not fitted"):
        g.ValueManifoldPCA().transform(randn(3, 2))
    probe = g.ValueManifoldPCA().fit(randn(6, 3), randn(6, seed=1))
    with pytest.raises(
        ValueError, match=r"ValueManifoldPCA.transform.states must be a tensor \[n, d=3\]"
    ):
        probe.transform(randn(3, 2))


def test_level_separation_hand_values():
    # level 1: scores {0, 2} (μ=1, σ=1); level log2 3: {4, 6} (μ=5, σ=1); level 2: {5, 7}
    h = torch.tensor([1.0, 1.0, math.log2(3), math.log2(3), 2.0, 2.0], dtype=F64)
    scores = torch.tensor([0.0, 2.0, 4.0, 6.0, 5.0, 7.0], dtype=F64)
    got = g.level_separation(scores, h, (1.0, math.log2(3), 2.0))
    assert got.tolist() == pytest.approx([4.0, 1.0])
    # a single point per level: perfectly separated (inf), merged (nan)
    pts = g.level_separation(
        torch.tensor([0.0, 1.0, 1.0], dtype=F64),
        torch.tensor([0.0, 1.0, 2.0], dtype=F64),
        [0.0, 1.0, 2.0],
    )
    assert math.isinf(float(pts[0])) and math.isnan(float(pts[1]))


@pytest.mark.parametrize(
    "scores,h,levels,kwargs,field",
    [
        (
            torch.zeros(3, dtype=F64),
            torch.zeros(2, dtype=F64),
            [0, 1],
            {},
            "scores and entropy_bits",
        ),
        (torch.zeros(3, 1, dtype=F64), torch.zeros(3, 1, dtype=F64), [0, 1], {}, "scores and"),
        (torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=F64), [0, 1], {}, "scores"),
        (
            torch.zeros(3, dtype=F64),
            torch.zeros(3, dtype=F64),
            [0],
            {},
            "levels must be at least 2",
        ),
        (
            torch.zeros(3, dtype=F64),
            torch.zeros(3, dtype=F64),
            [1, 0],
            {},
            "levels must be at least 2",
        ),
        (
            torch.zeros(3, dtype=F64),
            torch.zeros(3, dtype=F64),
            [0, 1],
            {},
            "levels must be matched",
        ),
        (torch.zeros(3, dtype=F64), torch.zeros(3, dtype=F64), [0, 1], dict(atol=-1.0), "atol"),
    ],
)
def test_level_separation_rejects(scores, h, levels, kwargs, field):
    with pytest.raises(ValueError, match=f"level_separation.*{field}"):
        g.level_separation(scores, h, levels, **kwargs)
