"""Value-manifold PCA (docs/theory.md §8.3): z-scored PCA of the states at the prediction sites, read against
the Bayes entropy; a scikit-learn-style fitted probe and its summary."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from windtunnel._checks import (
    check_choice,
    check_float_tensor,
    check_generator,
    check_number,
    check_positive_int,
    describe_tensor,
    must,
)
from windtunnel.geometry._common import _fit_probe, _pearson, _spectrum_stats, _zscore
from windtunnel.geometry.stats import partial_correlation, spearman_correlation

__all__ = [
    "ValueManifoldPCA",
    "ValueManifoldSummary",
    "level_separation",
    "summarize_value_manifold",
]


def _entropy_bins(entropy: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Bin id [n] per point: one bin per distinct entropy level when there are at most n_bins
    levels, else quantile bins (ties never split); empty bins are dropped."""
    levels = torch.unique(entropy)
    if levels.numel() <= n_bins:
        return torch.searchsorted(levels, entropy)
    probs = torch.linspace(0, 1, n_bins + 1, dtype=entropy.dtype, device=entropy.device)
    edges = torch.quantile(entropy, probs)[1:-1]
    raw = torch.bucketize(entropy, edges, right=True)
    return torch.unique(raw, return_inverse=True)[1]


@dataclass(frozen=True)
class ValueManifoldSummary:
    """The docs/theory.md §8.3 statistics of one set of states, as plain numbers for logging.

    Attributes:
        n_samples, n_features: size of the fitted state matrix.
        pc1_share: fraction of the total z-scored variance on PC1, in [0, 1].
        pc12_share: the same for PC1 + PC2 (= pc1_share when there is one component).
        participation_ratio: (Σλ)² / Σλ² over the full spectrum.
        n_components_for_variance: fewest leading components whose shares sum to at least
            ``variance_threshold``.
        variance_threshold: the threshold used (default 0.95).
        spearman: Spearman ρ of PC1 scores vs entropy, PC1 oriented so this is >= 0.
        pearson: Pearson r of the oriented PC1 scores vs entropy.
        probe_r2: held-out R² of a linear probe states -> entropy_bits (80/20 split), or None
            when no generator was given.
        ordering_score: Spearman ρ between the bin-mean entropy and the bin-mean PC1 over the
            entropy bins (see ``ValueManifoldPCA``); 1 = bin means strictly ordered by entropy.
        n_bins: number of non-empty entropy bins used by ``ordering_score``.
        partial_pearson_given_position: Pearson r of PC1 and entropy controlling for position
            (``partial_correlation``), or None when no positions were given.
    """

    n_samples: int
    n_features: int
    pc1_share: float
    pc12_share: float
    participation_ratio: float
    n_components_for_variance: int
    variance_threshold: float
    spearman: float
    pearson: float
    probe_r2: float | None
    ordering_score: float
    n_bins: int
    partial_pearson_given_position: float | None


class ValueManifoldPCA:
    """PCA of z-scored states read against the Bayes entropy (docs/theory.md §8.3); scikit-learn style.

    ``fit(states, entropy_bits)`` z-scores each feature (population std; a constant feature
    becomes 0), takes the SVD Z = U S Vᵀ, and reports eigenvalues λ_i = S_i² / (n - 1) with
    shares λ_i / Σλ. PC1 is oriented so that Spearman(PC1, entropy) >= 0; every other component
    so that its largest-magnitude loading is positive. It then computes:

    * the ordering score: points are grouped by entropy (one bin per distinct level when there
      are at most ``n_bins`` levels, as for the bijection's log2(V - i); otherwise ``n_bins``
      quantile bins that never split tied values). With m_b the mean entropy and p_b the mean
      PC1 score of bin b, the score is Spearman(m, p) over the non-empty bins: 1 when the PC1
      bin means rise strictly with entropy, -1 when they fall, NaN with fewer than 2 bins;
    * a linear probe Z -> entropy_bits fitted by least squares (minimum norm, or ridge with
      ``probe_ridge``; intercept unpenalised) on a random 80 % and scored by R² =
      1 - SS_res/SS_tot on the other 20 % (SS_tot about the held-out mean; 1 if both are 0,
      else 0 when SS_tot = 0, as in scikit-learn);
    * with ``positions``, the partial correlation of PC1 and entropy given position.

    Args:
        n_components: components kept in ``components_`` (None = all min(n, d)); the summary
            statistics always use the full spectrum.
        variance_threshold: share for ``n_components_for_variance``, in (0, 1].
        n_bins: maximum number of entropy bins for the ordering score, >= 2.
        test_fraction: held-out share of the probe split, in (0, 1).
        probe_ridge: ridge penalty of the probe (0 = minimum-norm least squares), >= 0.
        position_control: ``"group"`` or ``"linear"``, see ``partial_correlation``.
        standardize: z-score each feature (the default, docs/theory.md §8.3); False only centres
            the states (scale_ = 1), the plain PCA of the authors' figure scripts, where features
            with a large spread dominate the spectrum. The probe and every statistic then read
            the centred states.

    Attributes (after ``fit``):
        n_samples_, n_features_in_, n_components_: sizes.
        mean_, scale_: [d] z-scoring parameters; Z = (states - mean_) / scale_.
        components_: [n_components_, d] unit principal axes (rows), oriented as above.
        singular_values_: [min(n, d)] singular values of Z (full spectrum).
        explained_variance_: [min(n, d)] λ_i = S_i² / (n - 1).
        explained_variance_ratio_: [min(n, d)] λ_i / Σλ.
        pc1_scores_: [n] PC1 score of each fitted state.
        bin_entropy_bits_, bin_pc1_mean_, bin_pc1_std_, bin_counts_: [n_bins] per-bin mean entropy,
            PC1 mean, PC1 population std and count, ordered by entropy.
        probe_coef_: [d] probe weights on Z, probe_intercept_: 0-d, or None without a generator.
        summary_: ValueManifoldSummary.
    """

    def __init__(
        self,
        *,
        n_components: int | None = None,
        variance_threshold: float = 0.95,
        n_bins: int = 10,
        test_fraction: float = 0.2,
        probe_ridge: float = 0.0,
        position_control: str = "group",
        standardize: bool = True,
    ) -> None:
        owner = "ValueManifoldPCA"
        problems = [
            None
            if n_components is None
            else check_positive_int(owner, "n_components", n_components),
            check_number(
                owner, "variance_threshold", variance_threshold, low=0.0, high=1.0, low_open=True
            ),
            check_positive_int(owner, "n_bins", n_bins, minimum=2),
            check_number(
                owner,
                "test_fraction",
                test_fraction,
                low=0.0,
                high=1.0,
                low_open=True,
                high_open=True,
            ),
            check_number(owner, "probe_ridge", probe_ridge, low=0.0),
            check_choice(owner, "position_control", position_control, ("group", "linear")),
            None if isinstance(standardize, bool) else f"{owner}: standardize must be a bool; got {standardize!r}.",
        ]
        problems = [p for p in problems if p]
        if problems:
            raise ValueError("\n".join(problems))
        self.n_components = n_components
        self.variance_threshold = variance_threshold
        self.n_bins = n_bins
        self.test_fraction = test_fraction
        self.probe_ridge = probe_ridge
        self.position_control = position_control
        self.standardize = standardize

    def fit(
        self,
        states: torch.Tensor,
        entropy_bits: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> "ValueManifoldPCA":
        """Fit the PCA, orient PC1 by entropy and compute the summary; returns self.

        Shapes: states [n, d] (one row per (sequence, site)), entropy_bits [n] (the Bayes
        entropy of each row's posterior), positions [n] (the site position of each row,
        optional). ``generator`` draws the probe split; without one the probe is skipped.

        Raises:
            ValueError: when a shape does not fit, a value is not finite, n < 3, every feature
                is constant, or the probe split leaves fewer than 2 points on a side.
            TypeError: when ``generator`` is neither a torch.Generator nor None.
        """
        owner = "ValueManifoldPCA.fit"
        check_generator(owner, generator)
        check_float_tensor(owner, "states", states, min_dim=2, shape_text="[n, d]")
        if states.dim() != 2 or states.shape[0] < 3:
            raise ValueError(must(owner, "states", "a tensor [n >= 3, d]", describe_tensor(states)))
        n, d = states.shape
        check_float_tensor(owner, "entropy_bits", entropy_bits, min_dim=1, shape_text=f"[n={n}]")
        if entropy_bits.shape != (n,):
            raise ValueError(
                must(owner, "entropy_bits", f"a tensor [n={n}]", describe_tensor(entropy_bits))
            )
        for name, v in (("states", states), ("entropy_bits", entropy_bits)):
            if not bool(torch.isfinite(v).all()):
                raise ValueError(must(owner, name, "finite", "a tensor with NaN or inf"))
        if positions is not None and (
            not isinstance(positions, torch.Tensor)
            or positions.shape != (n,)
            or positions.dtype == torch.bool
        ):
            raise ValueError(
                must(owner, "positions", f"a tensor [n={n}]", describe_tensor(positions))
            )
        n_test = int(round(self.test_fraction * n))
        if generator is not None and (n_test < 2 or n - n_test < 2):
            raise ValueError(
                must(
                    owner,
                    "states",
                    f"enough rows for a probe split with at least 2 "
                    f"held-out and 2 training rows (test_fraction={self.test_fraction})",
                    describe_tensor(states),
                )
            )
        entropy = entropy_bits.to(states.dtype)

        z, mean, scale = _zscore(states)
        if not self.standardize:  # centre only; a constant feature is still exactly 0
            z, scale = states - mean, torch.ones_like(scale)
        if bool((z == 0).all()):
            raise ValueError(
                must(
                    owner, "states", "non-constant in at least one feature", describe_tensor(states)
                )
            )
        _, s, vh = torch.linalg.svd(z, full_matrices=False)  # vh [min(n, d), d]
        # Orientation: largest-magnitude loading positive, then PC1 by entropy.
        pivot = vh.abs().argmax(1, keepdim=True)
        vh = vh * torch.sign(vh.gather(1, pivot))
        pc1 = z @ vh[0]
        if float(spearman_correlation(pc1, entropy)) < 0:
            vh[0] = -vh[0]
            pc1 = -pc1
        eig = s**2 / (n - 1)
        ratio = eig / eig.sum()
        cum = torch.cumsum(ratio, 0)
        tol = 64 * torch.finfo(ratio.dtype).eps
        n_for_var = int((cum < self.variance_threshold - tol).sum()) + 1

        bins = _entropy_bins(entropy, self.n_bins)
        onehot = torch.nn.functional.one_hot(bins).to(states.dtype)  # [n, n_bins]
        counts = onehot.sum(0)
        bin_entropy = (onehot.T @ entropy) / counts
        bin_pc1 = (onehot.T @ pc1) / counts
        bin_std = ((onehot.T @ pc1**2) / counts - bin_pc1**2).clamp_min(0).sqrt()
        n_bins_used = int(counts.numel())
        ordering = (
            spearman_correlation(bin_entropy, bin_pc1)
            if n_bins_used >= 2
            else torch.tensor(math.nan)
        )

        coef = intercept = r2 = None
        if generator is not None:
            perm = torch.randperm(n, generator=generator, device=generator.device).to(states.device)
            test, train = perm[:n_test], perm[n_test:]
            coef, intercept = _fit_probe(z[train], entropy[train], self.probe_ridge)
            r2 = _r2(entropy[test], z[test] @ coef + intercept)

        partial = None
        if positions is not None:
            partial = float(
                partial_correlation(
                    pc1, entropy, positions.to(states.device), kind=self.position_control
                )
            )

        k = min(self.n_components or vh.shape[0], vh.shape[0])
        self.n_samples_ = n
        self.n_features_in_ = d
        self.n_components_ = k
        self.mean_ = mean
        self.scale_ = scale
        self.components_ = vh[:k].clone()
        self.singular_values_ = s
        self.explained_variance_ = eig
        self.explained_variance_ratio_ = ratio
        self.pc1_scores_ = pc1
        self.bin_entropy_bits_ = bin_entropy
        self.bin_pc1_mean_ = bin_pc1
        self.bin_pc1_std_ = bin_std
        self.bin_counts_ = counts.long()
        self.probe_coef_ = coef
        self.probe_intercept_ = intercept
        self.summary_ = ValueManifoldSummary(
            n_samples=n,
            n_features=d,
            pc1_share=float(ratio[0]),
            pc12_share=float(ratio[:2].sum()),
            participation_ratio=float(_spectrum_stats(eig)),
            n_components_for_variance=n_for_var,
            variance_threshold=self.variance_threshold,
            spearman=float(spearman_correlation(pc1, entropy)),
            pearson=float(_pearson(pc1, entropy)),
            probe_r2=r2,
            ordering_score=float(ordering),
            n_bins=n_bins_used,
            partial_pearson_given_position=partial,
        )
        return self

    def transform(self, states: torch.Tensor) -> torch.Tensor:
        """Principal-component scores ((states - mean_) / scale_) @ components_ᵀ.

        Shapes: states [n, d] -> [n, n_components_].

        Raises:
            ValueError: when the probe is not fitted or states does not have d features.
        """
        owner = "ValueManifoldPCA.transform"
        if not hasattr(self, "components_"):
            raise ValueError(
                f"{owner}: the probe is not fitted; call fit(states, entropy_bits) first."
            )
        check_float_tensor(owner, "states", states, min_dim=2, shape_text="[n, d]")
        if states.dim() != 2 or states.shape[1] != self.n_features_in_:
            raise ValueError(
                must(
                    owner,
                    "states",
                    f"a tensor [n, d={self.n_features_in_}]",
                    describe_tensor(states),
                )
            )
        return ((states - self.mean_) / self.scale_) @ self.components_.T


def _r2(y: torch.Tensor, pred: torch.Tensor) -> float:
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    if ss_tot == 0:
        return 1.0 if ss_res == 0 else 0.0
    return 1.0 - ss_res / ss_tot


def summarize_value_manifold(
    states: torch.Tensor,
    entropy_bits: torch.Tensor,
    *,
    positions: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    variance_threshold: float = 0.95,
    n_bins: int = 10,
    test_fraction: float = 0.2,
    probe_ridge: float = 0.0,
    position_control: str = "group",
) -> ValueManifoldSummary:
    """``ValueManifoldPCA(...).fit(states, entropy_bits, ...).summary_`` in one call (docs/theory.md §8.3).

    Shapes: states [n, d], entropy_bits [n], positions [n].

    Raises:
        ValueError: as ``ValueManifoldPCA`` and its ``fit``.
        TypeError: when ``generator`` is neither a torch.Generator nor None.
    """
    check_generator("summarize_value_manifold", generator)
    probe = ValueManifoldPCA(
        variance_threshold=variance_threshold,
        n_bins=n_bins,
        test_fraction=test_fraction,
        probe_ridge=probe_ridge,
        position_control=position_control,
    )
    return probe.fit(states, entropy_bits, positions=positions, generator=generator).summary_


def level_separation(
    scores: torch.Tensor,
    entropy_bits: torch.Tensor,
    levels: Sequence[float] | torch.Tensor,
    *,
    atol: float = 1e-6,
) -> torch.Tensor:
    """How well consecutive entropy levels separate along a score axis (docs/theory.md §8.6 (b)).

    Points whose entropy is within ``atol`` of level L_k form group k, with mean μ_k and
    population std σ_k of ``scores`` (e.g. ``ValueManifoldPCA.pc1_scores_``). For each pair of
    consecutive levels the result is the signed separation index

        d'_k = (μ_{k+1} - μ_k) / sqrt((σ_k² + σ_{k+1}²) / 2),

    positive when the group means rise with entropy; ±inf when both groups are points
    (σ = 0) with different means, NaN when they coincide. For the bijection's lowest levels pass
    ``levels=(1.0, math.log2(3), 2.0)``; while they are still merged (mid-training, §8.3) d' is
    small.

    Shapes: scores [n], entropy_bits [n], levels [n_levels] increasing -> [n_levels - 1].

    Raises:
        ValueError: when the shapes differ, levels has fewer than 2 values or does not increase,
            or a level matches no point.
    """
    owner = "level_separation"
    check_float_tensor(owner, "scores", scores, min_dim=1, shape_text="[n]")
    check_float_tensor(owner, "entropy_bits", entropy_bits, min_dim=1, shape_text="[n]")
    if scores.dim() != 1 or entropy_bits.shape != scores.shape:
        raise ValueError(
            f"{owner}: scores and entropy_bits must be 1-D tensors of one length n; got "
            f"{describe_tensor(scores)} and {describe_tensor(entropy_bits)}."
        )
    problem = check_number(owner, "atol", atol, low=0.0)
    if problem:
        raise ValueError(problem)
    lv = torch.as_tensor(levels, dtype=torch.float64).flatten()
    if lv.numel() < 2 or not bool((lv[1:] > lv[:-1]).all()):
        raise ValueError(must(owner, "levels", "at least 2 increasing values", lv.tolist()))
    h = entropy_bits.to(torch.float64)
    means, variances = [], []
    for level in lv.tolist():
        sel = (h - level).abs() <= atol
        if not bool(sel.any()):
            raise ValueError(
                must(owner, "levels", f"matched by some entropy_bits (atol={atol})", level)
            )
        group = scores[sel.to(scores.device)]
        means.append(group.mean())
        variances.append(group.var(correction=0))
    mu, var = torch.stack(means), torch.stack(variances)
    return (mu[1:] - mu[:-1]) / ((var[1:] + var[:-1]) / 2).sqrt()
