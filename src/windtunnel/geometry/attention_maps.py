"""Attention maps at the prediction sites (docs/theory.md §8.2, §8.6): entropy in bits, the focusing ratio,
query–key cosine maps with a feasible/eliminated split, and the Jensen–Shannon divergence between
two checkpoints' maps. Inputs are hook tensors in TransformerLens layout."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from windtunnel._checks import check_float_tensor, describe_tensor, must
from windtunnel.geometry._common import (
    _broadcast_bool,
    _causal,
    _check_sites,
    _entropy_bits,
    _masked_mean,
    _stack_layers,
    _unit_rows,
)

__all__ = [
    "AttentionEntropy",
    "QKAlignment",
    "attention_entropy",
    "attention_js_divergence_bits",
    "focusing_ratio",
    "qk_alignment",
]


@dataclass(frozen=True)
class AttentionEntropy:
    """Attention entropy at the prediction sites, per layer and head (docs/theory.md §8.2).

    H^(l,h)_{b,t} = -Σ_j α_{btj} log2 α_{btj}, computed per row and only then averaged, so the
    head average has no Jensen bias. The layer axis has size 1 for a single-layer input.

    Attributes:
        entropy_bits: per row, [layer, batch, head, n_sites].
        head_entropy_bits: mean over batch and sites, [layer, head].
        layer_entropy_bits: mean over batch, sites and heads, [layer].
        site_entropy_bits: mean over batch and heads, [layer, n_sites].
        normalized_entropy: H / log2|M(t)| per row, [layer, batch, head, n_sites], or None when
            not asked for. Rows with a single allowed key (log2 1 = 0) get 0.
        layer_normalized_entropy: its mean over batch, sites and heads, [layer], or None.
        focusing_ratio: (H^(0) - H^(last)) / H^(0) on ``layer_entropy_bits``, [].
    """

    entropy_bits: torch.Tensor
    head_entropy_bits: torch.Tensor
    layer_entropy_bits: torch.Tensor
    site_entropy_bits: torch.Tensor
    normalized_entropy: torch.Tensor | None
    layer_normalized_entropy: torch.Tensor | None
    focusing_ratio: torch.Tensor


def focusing_ratio(layer_entropy_bits: torch.Tensor) -> torch.Tensor:
    """(H^(0) - H^(last)) / H^(0) over the layer axis (docs/theory.md §8.2).

    1 means the last layer is one-hot where the first was spread; 0 means no focusing; negative
    means the last layer is broader. NaN when H^(0) = 0 (nothing to focus).

    Shapes: layer_entropy_bits [layer, ...] -> [...].

    Raises:
        ValueError: when layer_entropy_bits is not a floating tensor with a layer axis.
    """
    check_float_tensor(
        "focusing_ratio",
        "layer_entropy_bits",
        layer_entropy_bits,
        min_dim=1,
        shape_text="[layer, ...]",
    )
    first, last = layer_entropy_bits[0], layer_entropy_bits[-1]
    return (first - last) / first


def attention_entropy(
    patterns: torch.Tensor | Sequence[torch.Tensor],
    sites: torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    normalize: bool = False,
) -> AttentionEntropy:
    """Attention entropy in bits at the prediction sites and the focusing ratio (docs/theory.md §8.2).

    For each layer l, head h, sequence b and site t: H = -Σ_j α_tj log2 α_tj (0 log 0 = 0).
    Averages over heads are taken after the per-row entropies. With ``normalize``, each row is
    divided by log2|M(t)|, the log of its number of allowed keys (causal: t + 1, or the row sum
    of ``mask``), so a uniform row scores 1.

    Args:
        patterns: ``blocks.{l}.attn.hook_pattern`` tensors: one [batch, head, query_pos, key_pos],
            a stacked [layer, batch, head, query_pos, key_pos], or a sequence of per-layer tensors.
        sites: long [n_sites], the query positions to read; None reads every query position.
        mask: bool broadcastable to [batch, head, query_pos, key_pos], True = may attend; used
            only to count allowed keys for ``normalize``. None means causal (key_pos <= query_pos).
        normalize: also return entropies divided by log2|M(t)|.

    Returns:
        AttentionEntropy (layer axis of size 1 for a single-layer input).

    Raises:
        ValueError: when a shape, the sites or the mask does not fit.
    """
    owner = "attention_entropy"
    stacked, _ = _stack_layers(owner, "patterns", patterns)
    _, batch, heads, n_q, n_k = stacked.shape
    idx = _check_sites(owner, sites, n_q)
    if idx is None:
        idx = torch.arange(n_q, device=stacked.device)
    rows = stacked.index_select(
        -2, idx.to(stacked.device)
    )  # [layer, batch, head, n_sites, key_pos]
    ent = _entropy_bits(rows)  # [layer, batch, head, n_sites]
    normed = layer_normed = None
    if normalize:
        shape = (batch, heads, n_q, n_k)
        allowed = (
            _causal(n_q, n_k, stacked.device).expand(*shape)
            if mask is None
            else _broadcast_bool(owner, "mask", mask, shape, "[batch, head, query_pos, key_pos]")
        )
        n_allowed = allowed.sum(-1).index_select(-1, idx.to(stacked.device)).to(ent.dtype)
        log_allowed = torch.log2(n_allowed.clamp_min(1.0))  # [batch, head, n_sites]
        safe = torch.where(log_allowed > 0, log_allowed, torch.ones_like(log_allowed))
        normed = torch.where(log_allowed > 0, ent / safe, torch.zeros_like(ent))
        layer_normed = normed.mean((1, 2, 3))
    layer_ent = ent.mean((1, 2, 3))
    return AttentionEntropy(
        entropy_bits=ent,
        head_entropy_bits=ent.mean((1, 3)),
        layer_entropy_bits=layer_ent,
        site_entropy_bits=ent.mean((1, 2)),
        normalized_entropy=normed,
        layer_normalized_entropy=layer_normed,
        focusing_ratio=focusing_ratio(layer_ent),
    )


# ----------------------------------------------------------------------------- §8.2 QK alignment


@dataclass(frozen=True)
class QKAlignment:
    """Query–key cosine maps at the prediction sites (docs/theory.md §8.2; the definition is ours, §12 #22).

    ``...`` is any leading axis of q and k (e.g. layer). Statistics pool every allowed
    (sequence, head, site, key) entry; the std is the population std.

    Attributes:
        cosine: cos(q_t, k_j), [..., batch, head, n_sites, key_pos]; 0 where j is not allowed.
        allowed: bool, broadcast to the shape of ``cosine``: True where key j may be attended.
        head_mean_cosine: ``cosine`` averaged over the heads that allow key j,
            [..., batch, n_sites, key_pos].
        head_mean: mean cosine per head over allowed entries, [..., head].
        mean_cosine, std_cosine, min_cosine, max_cosine: over allowed entries, [...].
        feasible_cosine: mean cosine on allowed keys marked feasible, [...], or None.
        eliminated_cosine: mean cosine on allowed candidate keys not marked feasible, [...], or
            None. NaN where a group is empty.
        feasible_mass: Σ_j α_tj over feasible keys, averaged over (batch, head, site), [...], or
            None when no pattern was given.
        eliminated_mass: the same over eliminated keys, [...], or None.
    """

    cosine: torch.Tensor
    allowed: torch.Tensor
    head_mean_cosine: torch.Tensor
    head_mean: torch.Tensor
    mean_cosine: torch.Tensor
    std_cosine: torch.Tensor
    min_cosine: torch.Tensor
    max_cosine: torch.Tensor
    feasible_cosine: torch.Tensor | None
    eliminated_cosine: torch.Tensor | None
    feasible_mass: torch.Tensor | None
    eliminated_mass: torch.Tensor | None


def qk_alignment(
    q: torch.Tensor,
    k: torch.Tensor,
    sites: torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    feasible: torch.Tensor | None = None,
    candidates: torch.Tensor | None = None,
    pattern: torch.Tensor | None = None,
) -> QKAlignment:
    """cos(q_t, k_j) per site t, head and allowed key j <= t, with summary statistics (docs/theory.md §8.2).

    Optionally splits the keys into *feasible* (still-possible hypotheses at site t) and
    *eliminated* (candidate keys that are not feasible) and reports the mean cosine and the
    attention mass on each group. The task-specific glue builds the masks: ``feasible[b, t, j]``
    says whether key position j carries a hypothesis still feasible at site t, ``candidates``
    which key positions carry a hypothesis at all (default: every allowed key).

    Shapes (TransformerLens hook layout, any extra leading axis ``...`` such as layer):
        q, k: [..., batch, pos, head, d_head] (``hook_q``, ``hook_k``);
        sites: long [n_sites]; None = every query position;
        mask: bool broadcastable to [..., batch, head, query_pos, key_pos]; None = causal;
        feasible, candidates: bool broadcastable to [batch, n_sites, key_pos];
        pattern: [..., batch, head, query_pos, key_pos] (``hook_pattern``), for the masses.

    Raises:
        ValueError: when a shape, the sites or a mask does not fit, or ``candidates`` or
            ``pattern`` is given without ``feasible``.
    """
    owner = "qk_alignment"
    check_float_tensor(owner, "q", q, min_dim=4, shape_text="[..., batch, pos, head, d_head]")
    check_float_tensor(owner, "k", k, min_dim=4, shape_text="[..., batch, pos, head, d_head]")
    if k.dim() != q.dim() or k.shape[:-3] != q.shape[:-3] or k.shape[-2:] != q.shape[-2:]:
        raise ValueError(
            f"{owner}: q and k must agree on [..., batch, -, head, d_head]; got q "
            f"{describe_tensor(q)} and k {describe_tensor(k)}."
        )
    if (candidates is not None or pattern is not None) and feasible is None:
        raise ValueError(must(owner, "feasible", "given when candidates or pattern is given", None))
    n_q, n_k = q.shape[-3], k.shape[-3]
    idx = _check_sites(owner, sites, n_q)
    if idx is None:
        idx = torch.arange(n_q, device=q.device)
    idx = idx.to(q.device)
    qh = _unit_rows(q).movedim(-2, -3)  # [..., batch, head, query_pos, d_head]
    kh = _unit_rows(k).movedim(-2, -3)  # [..., batch, head, key_pos, d_head]
    cos = qh.index_select(-2, idx) @ kh.transpose(-1, -2)  # [..., batch, head, n_sites, key_pos]
    lead = q.shape[:-4]
    full = (*lead, q.shape[-4], q.shape[-2], n_q, n_k)
    allowed = (
        _causal(n_q, n_k, q.device).expand(*full)
        if mask is None
        else _broadcast_bool(owner, "mask", mask, full, "[..., batch, head, query_pos, key_pos]")
    )
    allowed = allowed.index_select(-2, idx)  # [..., batch, head, n_sites, key_pos]
    cos = torch.where(allowed, cos, torch.zeros_like(cos))
    pool = (-4, -3, -2, -1)
    mean = _masked_mean(cos, allowed, pool)
    var = _masked_mean((cos - mean[(...,) + (None,) * 4]) ** 2, allowed, pool)
    inf = torch.full_like(cos, math.inf)
    head_mean_map = (cos * allowed).sum(-3) / allowed.sum(-3).clamp_min(1)
    feas_cos = elim_cos = feas_mass = elim_mass = None
    if feasible is not None:
        n_sites = idx.numel()
        site_shape = (q.shape[-4], n_sites, n_k)
        text = "[batch, n_sites, key_pos]"
        feas = _broadcast_bool(owner, "feasible", feasible, site_shape, text).unsqueeze(-3)
        cand = (
            torch.ones_like(feas)
            if candidates is None
            else _broadcast_bool(owner, "candidates", candidates, site_shape, text).unsqueeze(-3)
        )
        in_feas = allowed & feas
        in_elim = allowed & cand & ~feas
        feas_cos = _masked_mean(cos, in_feas, pool)
        elim_cos = _masked_mean(cos, in_elim, pool)
        if pattern is not None:
            check_float_tensor(
                owner,
                "pattern",
                pattern,
                min_dim=4,
                shape_text="[..., batch, head, query_pos, key_pos]",
            )
            if pattern.shape != full:
                raise ValueError(
                    must(
                        owner,
                        "pattern",
                        f"a tensor {list(full)} [..., batch, head, query_pos, key_pos]",
                        describe_tensor(pattern),
                    )
                )
            rows = pattern.index_select(-2, idx)
            feas_mass = (rows * in_feas).sum(-1).mean((-3, -2, -1))
            elim_mass = (rows * in_elim).sum(-1).mean((-3, -2, -1))
    return QKAlignment(
        cosine=cos,
        allowed=allowed,
        head_mean_cosine=head_mean_map,
        head_mean=_masked_mean(cos, allowed, (-4, -2, -1)),
        mean_cosine=mean,
        std_cosine=var.sqrt(),
        min_cosine=torch.where(allowed, cos, inf).amin(pool),
        max_cosine=torch.where(allowed, cos, -inf).amax(pool),
        feasible_cosine=feas_cos,
        eliminated_cosine=elim_cos,
        feasible_mass=feas_mass,
        eliminated_mass=elim_mass,
    )


def attention_js_divergence_bits(
    patterns_a: torch.Tensor | Sequence[torch.Tensor],
    patterns_b: torch.Tensor | Sequence[torch.Tensor],
    sites: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-layer Jensen–Shannon divergence in bits between two checkpoints' attention maps (§8.6).

    For each row (batch, head, query t), with m = (p + q)/2,
    JS(p, q) = ½ Σ_j p_j log2(p_j/m_j) + ½ Σ_j q_j log2(q_j/m_j) ∈ [0, 1] bit,
    and the result is the mean over rows (all query positions, or ``sites``). Rows that are all
    zero in both maps (queries with every key masked) are left out of the mean.

    Shapes: patterns_a, patterns_b [batch, head, query_pos, key_pos] -> [], or
    [layer, batch, head, query_pos, key_pos] (or sequences of per-layer tensors) -> [layer].

    Raises:
        ValueError: when the shapes differ or do not fit, or the sites are out of range.
    """
    owner = "attention_js_divergence_bits"
    a, stacked = _stack_layers(owner, "patterns_a", patterns_a)
    b, _ = _stack_layers(owner, "patterns_b", patterns_b)
    if a.shape != b.shape:
        raise ValueError(
            f"{owner}: patterns_a and patterns_b must have one shape; got {describe_tensor(a)} and "
            f"{describe_tensor(b)}."
        )
    idx = _check_sites(owner, sites, a.shape[-2])
    if idx is not None:
        a, b = a.index_select(-2, idx.to(a.device)), b.index_select(-2, idx.to(a.device))
    b = b.to(a.dtype)
    m = (a + b) / 2
    tiny = torch.finfo(a.dtype).tiny

    def half_kl(p: torch.Tensor) -> torch.Tensor:
        ratio = p.clamp_min(tiny) / m.clamp_min(tiny)
        return torch.where(p > 0, p * torch.log2(ratio), torch.zeros_like(p)).sum(-1)

    js = (0.5 * (half_kl(a) + half_kl(b))).clamp_min(0)  # [layer, batch, head, rows]
    live = (a.sum(-1) > 0) | (b.sum(-1) > 0)
    out = _masked_mean(js, live, (1, 2, 3))
    return out if stacked else out[0]
