"""The hypothesis frame (docs/theory.md §8.1, §8.6): key orthogonality, its random baseline, the frame
subspace overlap between checkpoints, and the settling step of any logged metric."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from windtunnel._checks import (
    check_choice,
    check_float_tensor,
    check_number,
    check_positive_int,
    describe_tensor,
    must,
)
from windtunnel.geometry._common import _unit_rows

__all__ = [
    "FrameOverlap",
    "KeyOrthogonality",
    "frame_subspace_overlap",
    "key_orthogonality",
    "mean_abs_cosine",
    "pooled_mean_cosine",
    "random_abs_cosine",
    "settling_step",
]


def random_abs_cosine(d: int) -> float:
    """Expected |cos| between two independent uniformly random directions in R^d (docs/theory.md §8.1).

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
    Paper III variant (docs/theory.md §9) pass the d_head columns of a head's key weight,
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
        raise ValueError(
            must(
                owner,
                "vectors",
                "a set of at least 2 vectors [..., n >= 2, d]",
                describe_tensor(vectors),
            )
        )
    return _mean_offdiag(_cosine_matrix(vectors), signed=signed)


def pooled_mean_cosine(vectors: torch.Tensor, mask: torch.Tensor | None = None, *, signed: bool = False) -> torch.Tensor:
    """Mean |cos| (or cos) over the ordered pairs of distinct members of the same set, pooled over sets.

    With S the sets and M_s the members of set s that ``mask`` keeps,

        (Σ_s Σ_{x≠y ∈ M_s} |cos(v_x, v_y)|) / Σ_s |M_s| (|M_s| - 1),

    so pairs never cross sets and every pair weighs the same. This is key orthogonality "in
    context" (docs/theory.md §8.1, §9): the sets are sequences, the members the keys of the
    positions holding a hypothesis token, as the model formed them (position and earlier layers
    included). With one set and no mask it equals :func:`mean_abs_cosine`. An exactly-zero vector
    has cosine 0 with everything. NaN when no set has two members.

    Shapes: vectors [..., n_sets, n, d], mask bool [n_sets, n] (None: all) -> [...].

    Raises:
        ValueError: when vectors is not a floating tensor [..., n_sets, n, d] or the mask does not fit.
    """
    owner = "pooled_mean_cosine"
    check_float_tensor(owner, "vectors", vectors, min_dim=3, shape_text="[..., n_sets, n, d]")
    n_sets, n = vectors.shape[-3], vectors.shape[-2]
    if mask is None:
        mask = torch.ones(n_sets, n, dtype=torch.bool, device=vectors.device)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != (n_sets, n):
        raise ValueError(must(owner, "mask", f"a bool tensor [n_sets={n_sets}, n={n}]", describe_tensor(mask)))
    mask = mask.to(vectors.device)
    cos = _cosine_matrix(vectors)  # [..., n_sets, n, n]
    pairs = (mask[:, :, None] & mask[:, None, :]) & ~torch.eye(n, dtype=torch.bool, device=vectors.device)
    vals = cos if signed else cos.abs()
    count = pairs.sum()
    return (vals * pairs).sum((-1, -2, -3)) / count.to(vals.dtype)


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
    """Key orthogonality of one layer's heads on the hypothesis tokens (docs/theory.md §8.1).

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
    """Mean absolute off-diagonal cosine of the hypothesis keys, per head (docs/theory.md §8.1).

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
    check_float_tensor(
        owner, "normed_embeddings", normed_embeddings, min_dim=2, shape_text="[n_hyp, d_model]"
    )
    check_float_tensor(owner, "w_key", w_key, min_dim=3, shape_text="[head, d_model, d_head]")
    if normed_embeddings.dim() != 2:
        raise ValueError(
            must(
                owner,
                "normed_embeddings",
                "a tensor [n_hyp, d_model]",
                describe_tensor(normed_embeddings),
            )
        )
    n_hyp, d_model = normed_embeddings.shape
    if w_key.dim() != 3 or w_key.shape[1] != d_model:
        raise ValueError(
            must(
                owner,
                "w_key",
                f"a tensor [head, d_model={d_model}, d_head]",
                describe_tensor(w_key),
            )
        )
    if n_hyp < 2:
        raise ValueError(
            must(
                owner,
                "normed_embeddings",
                "at least 2 hypotheses [n_hyp >= 2, d_model]",
                describe_tensor(normed_embeddings),
            )
        )
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


@dataclass(frozen=True)
class FrameOverlap:
    """Frame-subspace overlap between two key weights (docs/theory.md §8.6; the definition is ours, §12 #23).

    Attributes:
        overlap: ‖U_aᵀ U_b‖²_F / r ∈ [0, 1], [...] (1 = same subspace).
        null: r / d, the expected overlap of two independent uniformly random r-dim subspaces
            of R^d.
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
    """‖U_tᵀ U_f‖²_F / r for the top-r singular subspaces of two key weights (docs/theory.md §8.6).

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
    check_float_tensor(
        owner, "w_key_reference", w_key_reference, min_dim=2, shape_text="[..., d_model, d_k]"
    )
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
        rel_tol: relative band, >= 0 (docs/theory.md §8.6: 0.1).
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
