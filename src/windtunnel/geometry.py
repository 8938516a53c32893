"""Geometry diagnostics of trained attention (SPEC §8): key frame, focusing, QK maps, value manifold.

Tensors in, tensors or frozen dataclasses out; nothing here knows about models or tasks. The glue
that runs a model with hooks hands in: hypothesis embeddings after the pre-attention norm and the
key weights (§8.1), the ``pattern`` / ``q`` / ``k`` hook tensors in TransformerLens layout (§8.2),
the states and Bayes entropies at the prediction sites (§8.3), and two checkpoints' patterns or key
weights (§8.6). Entropies are in bits. Statistics (ranks, Spearman, Pearson, PCA) are written in
torch, so device and dtype follow the inputs; use float64 where the numbers are reported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from windtunnel._checks import (
    check_choice,
    check_float_tensor,
    check_number,
    check_positive_int,
    describe_tensor,
    must,
)

__all__ = [
    "FrameOverlap",
    "KeyOrthogonality",
    "AttentionEntropy",
    "QKAlignment",
    "ValueManifoldPCA",
    "ValueManifoldSummary",
    "attention_entropy",
    "attention_js_divergence_bits",
    "average_ranks",
    "focusing_ratio",
    "frame_subspace_overlap",
    "key_orthogonality",
    "mean_abs_cosine",
    "participation_ratio",
    "partial_correlation",
    "pearson_correlation",
    "qk_alignment",
    "random_abs_cosine",
    "settling_step",
    "spearman_correlation",
    "summarize_value_manifold",
]


# ----------------------------------------------------------------------------- small helpers


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit l2 norm; an exactly-zero row stays zero (its cosines are 0)."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x / torch.where(norm > 0, norm, torch.ones_like(norm))


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
            must(owner, "sites", "a non-empty long tensor [n_sites] of query positions",
                 describe_tensor(sites))
        )
    if int(sites.min()) < 0 or int(sites.max()) >= n_pos:
        raise ValueError(must(owner, "sites", f"positions in [0, {n_pos - 1}]", sites.tolist()))
    return sites.long()


def _causal(n_q: int, n_k: int, device: torch.device) -> torch.Tensor:
    """bool [query_pos, key_pos]: True where key j <= query i (self-attention positions)."""
    return torch.ones(n_q, n_k, dtype=torch.bool, device=device).tril()


def _broadcast_bool(owner: str, name: str, mask: Any, shape: Sequence[int], text: str) -> torch.Tensor:
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


# ----------------------------------------------------------------------------- §8.1 key orthogonality


def random_abs_cosine(d: int) -> float:
    """Expected |cos| between two independent uniformly random directions in R^d (SPEC §8.1).

    E|cos| = Γ(d/2) / (√π Γ((d+1)/2)), evaluated with lgamma so large d does not overflow; for
    large d it approaches sqrt(2/(π d)). Values: 0.141 (d=32), 0.100 (64), 0.082 (96), 0.058 (192).
    d = 1 gives 1 (two random signs).

    Raises:
        ValueError: when d is not an int >= 1.
    """
    problem = check_positive_int("random_abs_cosine", "d", d)
    if problem:
        raise ValueError(problem)
    return math.exp(math.lgamma(d / 2) - math.lgamma((d + 1) / 2)) / math.sqrt(math.pi)


def mean_abs_cosine(vectors: torch.Tensor, *, signed: bool = False) -> torch.Tensor:
    """Mean off-diagonal cosine of a set of directions: (1/(n(n-1))) Σ_{x≠y} |cos(v_x, v_y)|.

    Scale-invariant per vector. An exactly-zero vector has cosine 0 with everything. For the
    Paper III variant (SPEC §9) pass the d_head columns of a head's key weight,
    ``w_key[h].T`` [d_head, d_model].

    Args:
        vectors: [..., n, d]; leading dimensions are independent sets.
        signed: average cos instead of |cos|.

    Returns:
        [...]: the mean over the n(n-1) ordered off-diagonal pairs.

    Raises:
        ValueError: when vectors is not a floating tensor [..., n, d] with n >= 2.
    """
    owner = "mean_abs_cosine"
    check_float_tensor(owner, "vectors", vectors, min_dim=2, shape_text="[..., n, d]")
    n = vectors.shape[-2]
    if n < 2:
        raise ValueError(must(owner, "vectors", "a set of at least 2 vectors [..., n >= 2, d]",
                              describe_tensor(vectors)))
    return _mean_offdiag(_cosine_matrix(vectors), signed=signed)


def _cosine_matrix(vectors: torch.Tensor) -> torch.Tensor:
    unit = _unit_rows(vectors)
    return unit @ unit.transpose(-1, -2)


def _mean_offdiag(cos: torch.Tensor, *, signed: bool) -> torch.Tensor:
    n = cos.shape[-1]
    off = ~torch.eye(n, dtype=torch.bool, device=cos.device)
    vals = cos if signed else cos.abs()
    return (vals * off).sum((-1, -2)) / (n * (n - 1))


@dataclass(frozen=True)
class KeyOrthogonality:
    """Key orthogonality of one layer's heads on the hypothesis tokens (SPEC §8.1).

    Attributes:
        cosine: cos(k_x, k_y) per head, [head, n_hyp, n_hyp] (diagonal 1 for nonzero keys).
        abs_cosine_per_head: (1/(V(V-1))) Σ_{x≠y} |cos(k_x, k_y)|, [head].
        signed_cosine_per_head: the same mean of the signed cosine, [head].
        mean_abs_cosine: the layer mean of ``abs_cosine_per_head`` over heads, [].
        min_head: index of the head with the smallest ``abs_cosine_per_head`` (the candidate
            "frame head").
        min_abs_cosine: its value, [].
        random_baseline: ``random_abs_cosine(d_head)``, the random-direction baseline.
    """

    cosine: torch.Tensor
    abs_cosine_per_head: torch.Tensor
    signed_cosine_per_head: torch.Tensor
    mean_abs_cosine: torch.Tensor
    min_head: int
    min_abs_cosine: torch.Tensor
    random_baseline: float

    @property
    def n_heads(self) -> int:
        return self.cosine.shape[0]

    @property
    def n_hypotheses(self) -> int:
        return self.cosine.shape[-1]


def key_orthogonality(normed_embeddings: torch.Tensor, w_key: torch.Tensor) -> KeyOrthogonality:
    """Mean absolute off-diagonal cosine of the hypothesis keys, per head (SPEC §8.1).

    With n(e_x) the hypothesis-token embedding passed through the block's pre-attention norm (no
    position embedding), each head's key is k_x^(h) = n(e_x) @ w_key[h] (the row-vector
    convention of TransformerLens ``W_K`` [head, d_model, d_head]; for an ``nn.Linear`` key
    projection with weight [n_heads * d_head, d_model], use
    ``weight.view(n_heads, d_head, d_model).transpose(1, 2)``). Keys are l2-normalised and

        ortho_h = (1/(V(V-1))) Σ_{x≠y} |cos(k_x^(h), k_y^(h))|.

    The key bias, if any, is left out: it shifts every key alike and is not part of the frame.

    Shapes: normed_embeddings [n_hyp, d_model], w_key [head, d_model, d_head].

    Raises:
        ValueError: when a shape does not fit, or n_hyp < 2.
    """
    owner = "key_orthogonality"
    check_float_tensor(owner, "normed_embeddings", normed_embeddings, min_dim=2,
                       shape_text="[n_hyp, d_model]")
    check_float_tensor(owner, "w_key", w_key, min_dim=3, shape_text="[head, d_model, d_head]")
    if normed_embeddings.dim() != 2:
        raise ValueError(must(owner, "normed_embeddings", "a tensor [n_hyp, d_model]",
                              describe_tensor(normed_embeddings)))
    n_hyp, d_model = normed_embeddings.shape
    if w_key.dim() != 3 or w_key.shape[1] != d_model:
        raise ValueError(must(owner, "w_key", f"a tensor [head, d_model={d_model}, d_head]",
                              describe_tensor(w_key)))
    if n_hyp < 2:
        raise ValueError(must(owner, "normed_embeddings", "at least 2 hypotheses [n_hyp >= 2, d_model]",
                              describe_tensor(normed_embeddings)))
    keys = torch.einsum("nd,hde->hne", normed_embeddings, w_key)  # [head, n_hyp, d_head]
    cos = _cosine_matrix(keys)
    abs_per_head = _mean_offdiag(cos, signed=False)
    min_head = int(torch.argmin(abs_per_head))
    return KeyOrthogonality(
        cosine=cos,
        abs_cosine_per_head=abs_per_head,
        signed_cosine_per_head=_mean_offdiag(cos, signed=True),
        mean_abs_cosine=abs_per_head.mean(),
        min_head=min_head,
        min_abs_cosine=abs_per_head[min_head],
        random_baseline=random_abs_cosine(w_key.shape[-1]),
    )


# ----------------------------------------------------------------------------- §8.2 entropy, focusing


def _stack_layers(owner: str, name: str, patterns: Any) -> tuple[torch.Tensor, bool]:
    """[layer, batch, head, query_pos, key_pos] and whether a layer axis was given."""
    if isinstance(patterns, (list, tuple)):
        if not patterns:
            raise ValueError(must(owner, name, "a non-empty sequence of per-layer patterns", []))
        for i, p in enumerate(patterns):
            check_float_tensor(owner, f"{name}[{i}]", p, min_dim=4,
                               shape_text="[batch, head, query_pos, key_pos]")
        if any(p.shape != patterns[0].shape or p.dim() != 4 for p in patterns):
            raise ValueError(must(owner, name, "per-layer tensors of one shape [batch, head, "
                                  "query_pos, key_pos]", [describe_tensor(p) for p in patterns]))
        return torch.stack(list(patterns)), True
    check_float_tensor(owner, name, patterns, min_dim=4,
                       shape_text="[batch, head, query_pos, key_pos] or [layer, ...]")
    if patterns.dim() == 4:
        return patterns.unsqueeze(0), False
    if patterns.dim() == 5:
        return patterns, True
    raise ValueError(must(owner, name, "a tensor [batch, head, query_pos, key_pos] or "
                          "[layer, batch, head, query_pos, key_pos]", describe_tensor(patterns)))


@dataclass(frozen=True)
class AttentionEntropy:
    """Attention entropy at the prediction sites, per layer and head (SPEC §8.2).

    H^(l,h)_{b,t} = -Σ_j α_{btj} log2 α_{btj}, computed per row and only then averaged, so the
    head average has no Jensen bias. ``layer`` is absent (size 1) for a single-layer input.

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
    """(H^(0) - H^(last)) / H^(0) over the layer axis (SPEC §8.2).

    1 means the last layer is one-hot where the first was spread; 0 means no focusing; negative
    means the last layer is broader. NaN when H^(0) = 0 (nothing to focus).

    Shapes: layer_entropy_bits [layer, ...] -> [...].

    Raises:
        ValueError: when layer_entropy_bits is not a floating tensor with a layer axis.
    """
    check_float_tensor("focusing_ratio", "layer_entropy_bits", layer_entropy_bits, min_dim=1,
                       shape_text="[layer, ...]")
    first, last = layer_entropy_bits[0], layer_entropy_bits[-1]
    return (first - last) / first


def attention_entropy(
    patterns: torch.Tensor | Sequence[torch.Tensor],
    sites: torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    normalize: bool = False,
) -> AttentionEntropy:
    """Attention entropy in bits at the prediction sites and the focusing ratio (SPEC §8.2).

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
    rows = stacked.index_select(-2, idx.to(stacked.device))  # [layer, batch, head, n_sites, key_pos]
    ent = _entropy_bits(rows)  # [layer, batch, head, n_sites]
    normed = layer_normed = None
    if normalize:
        shape = (batch, heads, n_q, n_k)
        allowed = (_causal(n_q, n_k, stacked.device).expand(*shape) if mask is None
                   else _broadcast_bool(owner, "mask", mask, shape, "[batch, head, query_pos, key_pos]"))
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
    """Query–key cosine maps at the prediction sites (SPEC §8.2; the definition is ours, §12 #22).

    ``...`` is any leading axis of q and k (e.g. layer). Statistics pool every allowed
    (sequence, head, site, key) entry; the std is the population std.

    Attributes:
        cosine: cos(q_t, k_j), [..., batch, head, n_sites, key_pos]; 0 where j is not allowed.
        allowed: bool, broadcast to the shape of ``cosine``: True where key j may be attended.
        head_mean_cosine: ``cosine`` averaged over heads, [..., batch, n_sites, key_pos].
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
    """cos(q_t, k_j) per site t, head and allowed key j <= t, with summary statistics (SPEC §8.2).

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
    allowed = (_causal(n_q, n_k, q.device).expand(*full) if mask is None
               else _broadcast_bool(owner, "mask", mask, full, "[..., batch, head, query_pos, key_pos]"))
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
        cand = (torch.ones_like(feas) if candidates is None
                else _broadcast_bool(owner, "candidates", candidates, site_shape, text).unsqueeze(-3))
        in_feas = allowed & feas
        in_elim = allowed & cand & ~feas
        feas_cos = _masked_mean(cos, in_feas, pool)
        elim_cos = _masked_mean(cos, in_elim, pool)
        if pattern is not None:
            check_float_tensor(owner, "pattern", pattern, min_dim=4,
                               shape_text="[..., batch, head, query_pos, key_pos]")
            if pattern.shape != full:
                raise ValueError(must(owner, "pattern", f"a tensor {list(full)} "
                                      "[..., batch, head, query_pos, key_pos]", describe_tensor(pattern)))
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


# ----------------------------------------------------------------------------- rank statistics


def _check_paired(owner: str, x: Any, y: Any, *, names: tuple[str, str] = ("x", "y")) -> None:
    for name, v in zip(names, (x, y)):
        if not isinstance(v, torch.Tensor) or v.dim() != 1 or v.is_complex() or v.dtype == torch.bool:
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


def _pearson(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    xc, yc = x - x.mean(), y - y.mean()
    denom = torch.linalg.vector_norm(xc) * torch.linalg.vector_norm(yc)
    return (xc @ yc) / denom  # NaN when either side is constant


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


def partial_correlation(
    x: torch.Tensor, y: torch.Tensor, control: torch.Tensor, *, kind: str = "group"
) -> torch.Tensor:
    """Pearson correlation of x and y after removing what ``control`` explains (SPEC §8.3 Control).

    ``kind="group"`` treats control as categorical (e.g. the position of a site) and subtracts the
    per-group means from x and y: the within-position correlation. ``kind="linear"`` regresses
    x and y on [1, control] and correlates the residuals. When y is a function of a categorical
    control (bijection format B without replacement, SPEC §8.3) the group residual of y is 0 and
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
    floor = 16 * math.sqrt(x.numel()) * torch.finfo(x.dtype).eps
    for r, v in ((rx, x), (ry, y)):
        if float(torch.linalg.vector_norm(r)) <= floor * float(torch.linalg.vector_norm(v)):
            return torch.tensor(math.nan, dtype=x.dtype, device=x.device)
    return _pearson(rx, ry)


# ----------------------------------------------------------------------------- §8.3 value manifold


def _spectrum_stats(eigenvalues: torch.Tensor) -> torch.Tensor:
    """(Σλ)² / Σλ² of a non-negative spectrum [k] -> 0-d tensor (NaN for an all-zero spectrum)."""
    return eigenvalues.sum() ** 2 / (eigenvalues**2).sum()


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


def _zscore(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z-scored x, mean [d], scale [d]. A constant feature (max == min) is centred on its value
    exactly and gets scale 1, so it becomes exactly 0 rather than NaN."""
    constant = x.amax(0) == x.amin(0)
    mean = torch.where(constant, x[0], x.mean(0))
    std = x.std(0, correction=0)
    scale = torch.where(constant, torch.ones_like(std), std)
    return (x - mean) / scale, mean, scale


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
    """The SPEC §8.3 statistics of one set of states, as plain numbers for logging.

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
    """PCA of z-scored states read against the Bayes entropy (SPEC §8.3); scikit-learn style.

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
    ) -> None:
        owner = "ValueManifoldPCA"
        problems = [
            None if n_components is None else check_positive_int(owner, "n_components", n_components),
            check_number(owner, "variance_threshold", variance_threshold, low=0.0, high=1.0,
                         low_open=True),
            check_positive_int(owner, "n_bins", n_bins, minimum=2),
            check_number(owner, "test_fraction", test_fraction, low=0.0, high=1.0, low_open=True,
                         high_open=True),
            check_number(owner, "probe_ridge", probe_ridge, low=0.0),
            check_choice(owner, "position_control", position_control, ("group", "linear")),
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
        """
        owner = "ValueManifoldPCA.fit"
        check_float_tensor(owner, "states", states, min_dim=2, shape_text="[n, d]")
        if states.dim() != 2 or states.shape[0] < 3:
            raise ValueError(must(owner, "states", "a tensor [n >= 3, d]", describe_tensor(states)))
        n, d = states.shape
        check_float_tensor(owner, "entropy_bits", entropy_bits, min_dim=1, shape_text=f"[n={n}]")
        if entropy_bits.shape != (n,):
            raise ValueError(must(owner, "entropy_bits", f"a tensor [n={n}]",
                                  describe_tensor(entropy_bits)))
        for name, v in (("states", states), ("entropy_bits", entropy_bits)):
            if not bool(torch.isfinite(v).all()):
                raise ValueError(must(owner, name, "finite", "a tensor with NaN or inf"))
        if positions is not None and (
            not isinstance(positions, torch.Tensor) or positions.shape != (n,)
            or positions.dtype == torch.bool
        ):
            raise ValueError(must(owner, "positions", f"a tensor [n={n}]", describe_tensor(positions)))
        n_test = int(round(self.test_fraction * n))
        if generator is not None and (n_test < 2 or n - n_test < 2):
            raise ValueError(must(owner, "states", f"enough rows for a probe split with at least 2 "
                                  f"held-out and 2 training rows (test_fraction={self.test_fraction})",
                                  describe_tensor(states)))
        entropy = entropy_bits.to(states.dtype)

        z, mean, scale = _zscore(states)
        if bool((z == 0).all()):
            raise ValueError(must(owner, "states", "non-constant in at least one feature",
                                  describe_tensor(states)))
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
        ordering = (spearman_correlation(bin_entropy, bin_pc1) if n_bins_used >= 2
                    else torch.tensor(math.nan))

        coef = intercept = r2 = None
        if generator is not None:
            perm = torch.randperm(n, generator=generator, device=generator.device).to(states.device)
            test, train = perm[:n_test], perm[n_test:]
            coef, intercept = _fit_probe(z[train], entropy[train], self.probe_ridge)
            r2 = _r2(entropy[test], z[test] @ coef + intercept)

        partial = None
        if positions is not None:
            partial = float(partial_correlation(pc1, entropy, positions.to(states.device),
                                                kind=self.position_control))

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
            raise ValueError(f"{owner}: the probe is not fitted; call fit(states, entropy_bits) first.")
        check_float_tensor(owner, "states", states, min_dim=2, shape_text="[n, d]")
        if states.dim() != 2 or states.shape[1] != self.n_features_in_:
            raise ValueError(must(owner, "states", f"a tensor [n, d={self.n_features_in_}]",
                                  describe_tensor(states)))
        return ((states - self.mean_) / self.scale_) @ self.components_.T


def _fit_probe(z: torch.Tensor, y: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares y ≈ z @ coef + intercept; the intercept is not penalised."""
    z_mean, y_mean = z.mean(0), y.mean()
    zc, yc = z - z_mean, y - y_mean
    if ridge > 0:
        gram = zc.T @ zc + ridge * torch.eye(z.shape[1], dtype=z.dtype, device=z.device)
        coef = torch.linalg.solve(gram, zc.T @ yc)
    else:
        coef = torch.linalg.pinv(zc) @ yc  # minimum-norm solution when d > n
    return coef, y_mean - z_mean @ coef


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
    """``ValueManifoldPCA(...).fit(states, entropy_bits, ...).summary_`` in one call (SPEC §8.3).

    Shapes: states [n, d], entropy_bits [n], positions [n].

    Raises:
        ValueError: as ``ValueManifoldPCA`` and its ``fit``.
    """
    probe = ValueManifoldPCA(
        variance_threshold=variance_threshold,
        n_bins=n_bins,
        test_fraction=test_fraction,
        probe_ridge=probe_ridge,
        position_control=position_control,
    )
    return probe.fit(states, entropy_bits, positions=positions, generator=generator).summary_


# ----------------------------------------------------------------------------- §8.6 frame vs precision


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


@dataclass(frozen=True)
class FrameOverlap:
    """Frame-subspace overlap between two key weights (SPEC §8.6; the definition is ours, §12 #23).

    Attributes:
        overlap: ‖U_aᵀ U_b‖²_F / r ∈ [0, 1], [...] (1 = same subspace).
        null: r / d, the expected overlap of two independent uniformly random r-dim subspaces of R^d.
        ratio_to_null: overlap / null, [...]; d / r for identical subspaces.
        r: subspace dimension.
        d: ambient dimension (d_model for side="input", d_k for side="output").
    """

    overlap: torch.Tensor
    null: float
    ratio_to_null: torch.Tensor
    r: int
    d: int


def frame_subspace_overlap(
    w_key: torch.Tensor, w_key_reference: torch.Tensor, *, r: int = 8, side: str = "input"
) -> FrameOverlap:
    """‖U_tᵀ U_f‖²_F / r for the top-r singular subspaces of two key weights (SPEC §8.6).

    Weights follow the row-vector convention k = x @ w_key, w_key [..., d_model, d_k] (all
    heads of a layer: ``W_K.permute(1, 0, 2).reshape(d_model, n_heads * d_head)`` from
    TransformerLens [head, d_model, d_head], or ``linear.weight.T``). ``side="input"`` (default)
    takes U = the top-r singular directions in R^{d_model}, the residual directions the keys
    read: the right singular vectors of an ``nn.Linear`` weight [d_k, d_model] (the left ones of
    w_key). ``side="output"`` takes them in key space R^{d_k}. Singular vectors are
    sign-ambiguous, but the overlap is not. Leading axes (e.g. per-head weights) are independent.

    Shapes: w_key, w_key_reference [..., d_model, d_k] -> overlap [...].

    Raises:
        ValueError: when the shapes differ or r is not an int in [1, min(d_model, d_k)].
    """
    owner = "frame_subspace_overlap"
    check_float_tensor(owner, "w_key", w_key, min_dim=2, shape_text="[..., d_model, d_k]")
    check_float_tensor(owner, "w_key_reference", w_key_reference, min_dim=2,
                       shape_text="[..., d_model, d_k]")
    if w_key.shape != w_key_reference.shape:
        raise ValueError(
            f"{owner}: w_key and w_key_reference must have one shape [..., d_model, d_k]; got "
            f"{describe_tensor(w_key)} and {describe_tensor(w_key_reference)}."
        )
    problem = check_choice(owner, "side", side, ("input", "output"))
    if problem:
        raise ValueError(problem)
    d_model, d_k = w_key.shape[-2:]
    max_r = min(d_model, d_k)
    problem = check_positive_int(owner, "r", r)
    if problem or r > max_r:
        raise ValueError(must(owner, "r", f"an int in [1, min(d_model, d_k)] = [1, {max_r}]", r))

    def basis(w: torch.Tensor) -> torch.Tensor:
        u, _, vh = torch.linalg.svd(w, full_matrices=False)
        return u[..., :r] if side == "input" else vh[..., :r, :].transpose(-1, -2)

    ua, ub = basis(w_key), basis(w_key_reference.to(w_key.dtype))  # [..., d, r]
    overlap = (ua.transpose(-1, -2) @ ub).pow(2).sum((-1, -2)) / r
    d = d_model if side == "input" else d_k
    null = r / d
    return FrameOverlap(overlap=overlap, null=null, ratio_to_null=overlap / null, r=r, d=d)


def settling_step(
    steps: Sequence[int] | torch.Tensor,
    values: Sequence[float] | torch.Tensor,
    *,
    rel_tol: float = 0.1,
    abs_tol: float = 0.0,
) -> int:
    """First logged step from which a metric stays within tolerance of its final value (§8.6).

    With f = values[-1], value i is *settled* when |values[i] - f| <= max(rel_tol·|f|, abs_tol).
    The result is steps[i*] for the smallest i* such that every value from i* on is settled;
    the final value is always settled, so i* exists. When f = 0 the relative band is empty:
    pass ``abs_tol`` for a band of width abs_tol, else only exact zeros count. NaN values are
    never settled. A metric that only touches the band and leaves again has not settled.

    Args:
        steps: strictly increasing optimizer steps, length n >= 1.
        values: the metric at those steps, length n; the last must be finite.
        rel_tol: relative band, >= 0 (SPEC: 0.1).
        abs_tol: absolute floor of the band, >= 0.

    Returns:
        The settling step, an element of ``steps``.

    Raises:
        ValueError: when the lengths differ or are 0, steps do not increase, the final value is
            not finite, or a tolerance is negative.
    """
    owner = "settling_step"
    for name, tol in (("rel_tol", rel_tol), ("abs_tol", abs_tol)):
        problem = check_number(owner, name, tol, low=0.0)
        if problem:
            raise ValueError(problem)
    step_list = steps.tolist() if isinstance(steps, torch.Tensor) else list(steps)
    vals = torch.as_tensor(
        values.tolist() if isinstance(values, torch.Tensor) else list(values), dtype=torch.float64
    )
    if vals.dim() != 1 or len(step_list) != vals.numel() or not step_list:
        raise ValueError(
            f"{owner}: steps and values must be 1-D of one length n >= 1; got {len(step_list)} "
            f"steps and values of shape {list(vals.shape)}."
        )
    if any(b <= a for a, b in zip(step_list, step_list[1:])):
        raise ValueError(must(owner, "steps", "strictly increasing", step_list))
    final = float(vals[-1])
    if not math.isfinite(final):
        raise ValueError(must(owner, "values", "finite at the last step", final))
    band = max(rel_tol * abs(final), abs_tol)
    settled = (vals - final).abs() <= band  # NaN compares False
    unsettled = torch.nonzero(~settled).flatten()
    first = 0 if unsettled.numel() == 0 else int(unsettled[-1]) + 1
    return step_list[first]
