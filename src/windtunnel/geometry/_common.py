"""Shared private helpers of the geometry diagnostics: unit rows, entropy, sites and masks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from windtunnel._checks import check_float_tensor, describe_tensor, must


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit l2 norm; an exactly-zero row stays zero (its cosines are 0)."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x / torch.where(norm > 0, norm, torch.ones_like(norm))


def _fit_probe(z: torch.Tensor, y: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares y ≈ z @ coef + intercept; the intercept is not penalised.

    Shapes: z [n, d], y [n] or [n, k] -> coef [d] or [d, k], intercept [] or [k].
    """
    z_mean, y_mean = z.mean(0), y.mean(0)
    zc, yc = z - z_mean, y - y_mean
    if ridge > 0:
        gram = zc.T @ zc + ridge * torch.eye(z.shape[1], dtype=z.dtype, device=z.device)
        coef = torch.linalg.solve(gram, zc.T @ yc)
    else:
        coef = torch.linalg.pinv(zc) @ yc  # minimum-norm solution when d > n
    return coef, y_mean - z_mean @ coef


def _entropy_bits(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in bits over the last axis, 0 log 0 = 0."""
    tiny = torch.finfo(probs.dtype).tiny
    logs = torch.where(probs > 0, torch.log2(probs.clamp_min(tiny)), torch.zeros_like(probs))
    return -(probs * logs).sum(-1)


def _check_sites(owner: str, sites: Any, n_pos: int) -> torch.Tensor | None:
    if sites is None:
        return None
    if (
        not isinstance(sites, torch.Tensor)
        or sites.dtype not in (torch.int64, torch.int32)
        or sites.dim() != 1
        or sites.numel() == 0
    ):
        raise ValueError(
            must(
                owner,
                "sites",
                "a non-empty long tensor [n_sites] of query positions",
                describe_tensor(sites),
            )
        )
    if int(sites.min()) < 0 or int(sites.max()) >= n_pos:
        raise ValueError(must(owner, "sites", f"positions in [0, {n_pos - 1}]", sites.tolist()))
    return sites.long()


def _causal(n_q: int, n_k: int, device: torch.device) -> torch.Tensor:
    """bool [query_pos, key_pos]: True where key j <= query i (self-attention positions)."""
    return torch.ones(n_q, n_k, dtype=torch.bool, device=device).tril()


def _broadcast_bool(
    owner: str, name: str, mask: Any, shape: Sequence[int], text: str
) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() > len(shape):
        raise ValueError(
            f"{owner}: {name} must be bool and broadcastable to {text} = {list(shape)}; "
            f"got {describe_tensor(mask)}."
        )
    try:
        return mask.expand(*shape)
    except RuntimeError:
        raise ValueError(
            f"{owner}: {name} must be bool and broadcastable to {text} = {list(shape)}; "
            f"got {describe_tensor(mask)}."
        ) from None


def _masked_mean(x: torch.Tensor, mask: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Mean of x over ``dims`` where mask is True; NaN where the mask is empty."""
    m = mask.to(x.dtype)
    return (x * m).sum(dims) / m.sum(dims)


def _stack_layers(owner: str, name: str, patterns: Any) -> tuple[torch.Tensor, bool]:
    """[layer, batch, head, query_pos, key_pos] and whether a layer axis was given."""
    if isinstance(patterns, (list, tuple)):
        if not patterns:
            raise ValueError(must(owner, name, "a non-empty sequence of per-layer patterns", []))
        for i, p in enumerate(patterns):
            check_float_tensor(
                owner, f"{name}[{i}]", p, min_dim=4, shape_text="[batch, head, query_pos, key_pos]"
            )
        if any(p.shape != patterns[0].shape or p.dim() != 4 for p in patterns):
            raise ValueError(
                must(
                    owner,
                    name,
                    "per-layer tensors of one shape [batch, head, query_pos, key_pos]",
                    [describe_tensor(p) for p in patterns],
                )
            )
        return torch.stack(list(patterns)), True
    check_float_tensor(
        owner,
        name,
        patterns,
        min_dim=4,
        shape_text="[batch, head, query_pos, key_pos] or [layer, ...]",
    )
    if patterns.dim() == 4:
        return patterns.unsqueeze(0), False
    if patterns.dim() == 5:
        return patterns, True
    raise ValueError(
        must(
            owner,
            name,
            "a tensor [batch, head, query_pos, key_pos] or "
            "[layer, batch, head, query_pos, key_pos]",
            describe_tensor(patterns),
        )
    )


def _pearson(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    xc, yc = x - x.mean(), y - y.mean()
    denom = torch.linalg.vector_norm(xc) * torch.linalg.vector_norm(yc)
    return (xc @ yc) / denom  # NaN when either side is constant


def _spectrum_stats(eigenvalues: torch.Tensor) -> torch.Tensor:
    """(Σλ)² / Σλ² of a non-negative spectrum [k] -> 0-d tensor (NaN for an all-zero spectrum)."""
    return eigenvalues.sum() ** 2 / (eigenvalues**2).sum()


def _zscore(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z-scored x, mean [d], scale [d]. A constant feature (max == min) is centred on its value
    exactly and gets scale 1, so it becomes exactly 0 rather than NaN."""
    constant = x.amax(0) == x.amin(0)
    mean = torch.where(constant, x[0], x.mean(0))
    std = x.std(0, correction=0)
    scale = torch.where(constant, torch.ones_like(std), std)
    return (x - mean) / scale, mean, scale
