"""Rank and correlation statistics in torch (ties get average ranks, as scipy's defaults), the
partial correlation used as the position control of docs/theory.md §8.3, and the participation ratio."""

from __future__ import annotations

import math
from typing import Any

import torch

from windtunnel._checks import (
    check_choice,
    check_float_tensor,
    check_generator,
    describe_tensor,
    must,
)
from windtunnel.geometry._common import _fit_probe, _pearson, _spectrum_stats, _zscore

__all__ = [
    "average_ranks",
    "control_explains",
    "linear_probe_r2",
    "participation_ratio",
    "partial_correlation",
    "pearson_correlation",
    "spearman_correlation",
]


def _check_paired(owner: str, x: Any, y: Any, *, names: tuple[str, str] = ("x", "y")) -> None:
    for name, v in zip(names, (x, y)):
        if (
            not isinstance(v, torch.Tensor)
            or v.dim() != 1
            or v.is_complex()
            or v.dtype == torch.bool
        ):
            raise ValueError(must(owner, name, "a real 1-D tensor [n]", describe_tensor(v)))
    if x.shape != y.shape or x.numel() < 2:
        raise ValueError(
            f"{owner}: {names[0]} and {names[1]} must be 1-D tensors of one length n >= 2; got "
            f"{describe_tensor(x)} and {describe_tensor(y)}."
        )
    for name, v in zip(names, (x, y)):
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ValueError(must(owner, name, "finite", "a tensor with NaN or inf"))


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x if x.is_floating_point() else x.to(torch.float64)


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n of a 1-D tensor, ties given their average rank (scipy's ``rankdata`` default).

    Shapes: x [n] -> [n], floating (x's dtype, or float64 for integer input).

    Raises:
        ValueError: when x is not a real 1-D tensor.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 1 or x.dtype == torch.bool or x.is_complex():
        raise ValueError(must("average_ranks", "x", "a real 1-D tensor [n]", describe_tensor(x)))
    n = x.numel()
    out_dtype = x.dtype if x.is_floating_point() else torch.float64
    if n == 0:
        return torch.empty(0, dtype=out_dtype, device=x.device)
    sorted_x, order = torch.sort(x, stable=True)
    new_group = torch.ones(n, dtype=torch.bool, device=x.device)
    new_group[1:] = sorted_x[1:] != sorted_x[:-1]
    group = torch.cumsum(new_group.long(), 0) - 1  # [n] group id in sorted order
    counts = torch.bincount(group)
    starts = torch.cumsum(counts, 0) - counts  # 0-based first index of each tie group
    group_rank = starts.to(out_dtype) + (counts.to(out_dtype) + 1) / 2
    ranks = torch.empty(n, dtype=out_dtype, device=x.device)
    ranks[order] = group_rank[group]
    return ranks


def pearson_correlation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pearson's r = Σ(x-x̄)(y-ȳ) / sqrt(Σ(x-x̄)² Σ(y-ȳ)²), a 0-d tensor; NaN if x or y is constant.

    Raises:
        ValueError: unless x and y are finite real 1-D tensors of one length n >= 2.
    """
    _check_paired("pearson_correlation", x, y)
    x, y = _as_float(x), _as_float(y)
    return _pearson(x, y.to(x.dtype))


def spearman_correlation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Spearman's ρ: Pearson's r of the average ranks (ties share their mean rank), 0-d tensor.

    NaN when x or y is constant.

    Raises:
        ValueError: unless x and y are finite real 1-D tensors of one length n >= 2.
    """
    _check_paired("spearman_correlation", x, y)
    rx, ry = average_ranks(x), average_ranks(y)
    return _pearson(rx, ry.to(rx.dtype))


def _group_ids(labels: torch.Tensor) -> torch.Tensor:
    """one-hot [n, n_groups] of the distinct values of labels (float64 on labels' device)."""
    _, inverse = torch.unique(labels, return_inverse=True)
    return torch.nn.functional.one_hot(inverse).to(torch.float64)


def _residualize(v: torch.Tensor, control: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "group":
        onehot = _group_ids(control).to(v.dtype)  # [n, n_groups]
        means = (onehot.T @ v) / onehot.sum(0)
        return v - onehot @ means
    design = torch.stack([torch.ones_like(v), control.to(v.dtype)], dim=1)  # [n, 2]
    coef = torch.linalg.pinv(design) @ v
    return v - design @ coef


def _explained(v: torch.Tensor, residual: torch.Tensor) -> bool:
    """True when the residual's norm is within 16·sqrt(n)·eps of v's norm: rounding level."""
    floor = 16 * math.sqrt(v.numel()) * torch.finfo(v.dtype).eps
    return float(torch.linalg.vector_norm(residual)) <= floor * float(torch.linalg.vector_norm(v))


def control_explains(v: torch.Tensor, control: torch.Tensor, *, kind: str = "group") -> bool:
    """Whether ``control`` explains ``v`` entirely, by the rule ``partial_correlation`` uses: the
    residual of v after the per-group means (``kind="group"``) or the line on [1, control]
    (``kind="linear"``) is within 16·sqrt(n)·eps of v's norm. ``partial_correlation(x, y, control)``
    is NaN exactly when this holds for x or for y (e.g. the entropy log2(V - i) of the bijection
    without replacement, a function of the site position up to rounding).

    Shapes: v, control [n] -> bool.

    Raises:
        ValueError: when the shapes differ, n < 2, or kind is unknown.
    """
    owner = "control_explains"
    _check_paired(owner, v, control, names=("v", "control"))
    problem = check_choice(owner, "kind", kind, ("group", "linear"))
    if problem:
        raise ValueError(problem)
    v = _as_float(v)
    return _explained(v, _residualize(v, control, kind))


def partial_correlation(
    x: torch.Tensor, y: torch.Tensor, control: torch.Tensor, *, kind: str = "group"
) -> torch.Tensor:
    """Pearson correlation of x and y after removing what ``control`` explains (docs/theory.md §8.3 Control).

    ``kind="group"`` treats control as categorical (e.g. the position of a site) and subtracts the
    per-group means from x and y: the within-position correlation. ``kind="linear"`` regresses
    x and y on [1, control] and correlates the residuals. When y is a function of a categorical
    control (bijection format B without replacement, docs/theory.md §8.3) the group residual of y is 0 and
    the result is NaN: position and entropy cannot be separated on such data. A residual whose
    norm is within 16·sqrt(n)·eps of the input's norm counts as 0.

    Shapes: x, y, control [n] -> 0-d tensor.

    Raises:
        ValueError: when the shapes differ, n < 3, or kind is unknown.
    """
    owner = "partial_correlation"
    _check_paired(owner, x, y)
    _check_paired(owner, x, control, names=("x", "control"))
    problem = check_choice(owner, "kind", kind, ("group", "linear"))
    if problem:
        raise ValueError(problem)
    if x.numel() < 3:
        raise ValueError(must(owner, "x", "at least 3 points [n >= 3]", describe_tensor(x)))
    x = _as_float(x)
    y = _as_float(y).to(x.dtype)
    rx, ry = _residualize(x, control, kind), _residualize(y, control, kind)
    # A residual at rounding level means the control explains everything: report NaN, not a
    # correlation of rounding noise.
    if _explained(x, rx) or _explained(y, ry):
        return torch.tensor(math.nan, dtype=x.dtype, device=x.device)
    return _pearson(rx, ry)


def participation_ratio(points: torch.Tensor, *, standardize: bool = False) -> torch.Tensor:
    """Effective dimensionality (Σλ)² / Σλ² of a point cloud, λ = covariance eigenvalues.

    Ranges from 1 (all variance on one axis) to d (isotropic). With ``standardize``, each
    feature is z-scored first (constant features dropped), as in the §8.3 PCA. NaN when every
    point is the same.

    Shapes: points [n, d] -> 0-d tensor.

    Raises:
        ValueError: when points is not a floating tensor [n, d] with n >= 2.
    """
    owner = "participation_ratio"
    check_float_tensor(owner, "points", points, min_dim=2, shape_text="[n, d]")
    if points.dim() != 2 or points.shape[0] < 2:
        raise ValueError(must(owner, "points", "a tensor [n >= 2, d]", describe_tensor(points)))
    z = _zscore(points)[0] if standardize else points - points.mean(0)
    s = torch.linalg.svdvals(z)
    return _spectrum_stats(s**2)


def linear_probe_r2(
    states: torch.Tensor,
    targets: torch.Tensor,
    *,
    groups: torch.Tensor | None = None,
    generator: torch.Generator,
    test_fraction: float = 0.25,
    ridge: float = 1e-3,
) -> torch.Tensor:
    """Held-out R² of a ridge-regularised linear probe states -> each target column.

    The probe is fitted on a random ``1 - test_fraction`` of the rows and scored on the rest:
    R²_k = 1 - Σ(y_k - ŷ_k)² / Σ(y_k - ȳ_k)² over the test rows (ȳ_k from the training rows), so a
    probe that only learns the mean scores about 0 and one that fits noise scores below 0.
    States are z-scored with the training rows' statistics; the penalty is
    ``ridge * n_train`` on the z-scored coefficients (the intercept is not penalised).

    ``groups`` keeps rows that share a latent out of both splits at once: rows with one group id
    (e.g. the sites of one sequence, which share its HMM) all land in the same split. Without it a
    per-sequence constant could be memorised from the training rows of the same sequence.

    Shapes: states [n, d], targets [n, k] (or [n]), groups [n] -> R² [k] (or 0-d), float64.

    Raises:
        ValueError: when the shapes do not agree, either split would have fewer than 2 rows, or
            an argument is out of range.
        TypeError: when ``generator`` is not a torch.Generator.
    """
    owner = "linear_probe_r2"
    check_generator(owner, generator, optional=False)
    check_float_tensor(owner, "states", states, min_dim=2, shape_text="[n, d]")
    if states.dim() != 2:
        raise ValueError(must(owner, "states", "a 2-D tensor [n, d]", describe_tensor(states)))
    squeeze = isinstance(targets, torch.Tensor) and targets.dim() == 1
    if squeeze:
        targets = targets[:, None]
    check_float_tensor(owner, "targets", targets, min_dim=2, shape_text="[n, k]")
    if targets.dim() != 2 or targets.shape[0] != states.shape[0]:
        raise ValueError(must(owner, "targets", f"a tensor [n={states.shape[0]}, k] (or [n])", describe_tensor(targets)))
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(must(owner, "test_fraction", "in (0, 1)", repr(test_fraction)))
    if not ridge >= 0.0:
        raise ValueError(must(owner, "ridge", ">= 0", repr(ridge)))
    n = states.shape[0]
    if groups is None:
        groups = torch.arange(n, device=states.device)
    elif not isinstance(groups, torch.Tensor) or groups.shape != (n,):
        raise ValueError(must(owner, "groups", f"a tensor [n={n}] of group ids", describe_tensor(groups)))
    ids, inverse = torch.unique(groups, return_inverse=True)
    order = torch.randperm(ids.numel(), generator=generator).to(groups.device)
    n_test_groups = round(test_fraction * ids.numel())
    is_test = torch.zeros(ids.numel(), dtype=torch.bool, device=groups.device)
    is_test[order[:n_test_groups]] = True
    test = is_test[inverse]
    if int(test.sum()) < 2 or int((~test).sum()) < 2:
        raise ValueError(f"{owner}: {ids.numel()} groups give a split with fewer than 2 rows on one side; pass more rows or groups.")
    x, y = states.to(torch.float64), targets.to(torch.float64)
    x_train, y_train = x[~test], y[~test]
    mean, scale = x_train.mean(0), x_train.std(0).clamp_min(1e-12)
    z_train, z_test = (x_train - mean) / scale, (x[test] - mean) / scale
    coef, intercept = _fit_probe(z_train, y_train, ridge * z_train.shape[0])
    residual = y[test] - (z_test @ coef + intercept)
    total = (y[test] - y_train.mean(0)).pow(2).sum(0)
    r2 = 1.0 - residual.pow(2).sum(0) / total.clamp_min(torch.finfo(torch.float64).tiny)
    return r2[0] if squeeze else r2
