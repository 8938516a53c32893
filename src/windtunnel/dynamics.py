"""The exact gradient calculus of one softmax attention head (docs/theory.md §2), and its first-order step.

Notation (docs/theory.md §2.1). Rows are positions; any leading dimensions (batch, head) broadcast.
s_ij = scale * q_i·k_j on allowed keys, a_ij = softmax_j(s_ij) (exactly 0 off the mask),
g_i = sum_j a_ij v_j, u_i = dL/dg_i (from ANY downstream network and loss), b_ij = u_i·v_j.

* Score gradient, the advantage law:   dL/ds_ij = a_ij (b_ij - E_{a_i}[b]),  E_{a_i}[b] = u_i·g_i.
* Value gradient, responsibility-weighted pull:   dL/dv_j = sum_i a_ij u_i   (dV = A^T U).
* Query / key gradients:   dQ = scale * dS K,   dK = scale * dS^T Q.
* Weights of a linear head (q = x W_Q ...):   grad W_Q = X^T dQ, grad W_K = X_kv^T dK, grad W_V = X_kv^T dV.

Sign convention (docs/theory.md §2.7): ``advantage`` is the DESCENT advantage adv_ij = E_{a_i}[b] - b_ij =
u_i·(g_i - v_j); a plain gradient step raises s_ij exactly where adv_ij > 0, and
``d_scores = -alpha * advantage``. Paper II writes the gradient a(b - E[b]); some write-ups call
u_i·(v_j - g_i) the advantage, which is our ``-advantage``.

Everything here is exact (chain rule) except the ``predict_*`` functions, which are first order in
the step size eta with u held fixed (docs/theory.md §2.6, §2.8); ``measure_change`` gives the same quantities
after a real step so the prediction error can be reported.

Every public function that takes q, k, v, u, x or weights refuses NaN and inf in them
(``ValueError`` naming the argument), so a diverged input never comes back as a NaN "law".
Only :func:`masked_softmax` takes non-finite scores: masked entries may be -inf.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from windtunnel._checks import (
    check_finite,
    check_float_tensor,
    check_generator,
    check_mask,
    describe_tensor,
)

__all__ = [
    "AttentionGradients",
    "HeadChange",
    "LinearHeadGradients",
    "ReadoutGradients",
    "LAW_QUANTITIES",
    "LawCheck",
    "LawReport",
    "attention_gradients",
    "check_law",
    "verify_law",
    "cross_entropy_readout",
    "linear_head_gradients",
    "masked_softmax",
    "measure_change",
    "predict_free_step",
    "predict_linear_step",
    "propagate_first_order",
    "summand_magnitudes",
]


# ----------------------------------------------------------------------------- result types


@dataclass(frozen=True)
class AttentionGradients:
    """Exact first-order quantities of one softmax attention head (docs/theory.md §2.2–§2.4).

    Shapes use B = the broadcast of the leading dimensions of q, k, v, u; d_values, d_queries and
    d_keys are summed back to the shapes of v, q and k (as autograd would).

    Attributes:
        alpha: attention pattern a_ij, [*B, query_pos, key_pos]; rows sum to 1 over allowed keys,
            exactly 0 on masked keys; an all-masked row is all 0.
        output: head output g_i = sum_j a_ij v_j, [*B, query_pos, d_v].
        compatibility: b_ij = u_i·v_j, [*B, query_pos, key_pos] (dense, also off-mask).
        expected_compatibility: E_{a_i}[b] = sum_j a_ij b_ij = u_i·g_i, [*B, query_pos].
        advantage: descent advantage E_{a_i}[b] - b_ij = u_i·(g_i - v_j) on allowed keys, 0 on
            masked keys, [*B, query_pos, key_pos].
        responsibility: R_j = sum_i a_ij, [*B, key_pos].
        d_scores: dL/ds_ij = a_ij (b_ij - E_{a_i}[b]) = -alpha * advantage; rows sum to 0.
        d_values: dL/dv_j = sum_i a_ij u_i, shape of v.
        d_queries: dL/dq_i = scale * sum_j dS_ij k_j, shape of q.
        d_keys: dL/dk_j = scale * sum_i dS_ij q_i, shape of k.
        mask: bool [*B, query_pos, key_pos], True where the query may attend.
        scale: the score scale used.
    """

    alpha: torch.Tensor
    output: torch.Tensor
    compatibility: torch.Tensor
    expected_compatibility: torch.Tensor
    advantage: torch.Tensor
    responsibility: torch.Tensor
    d_scores: torch.Tensor
    d_values: torch.Tensor
    d_queries: torch.Tensor
    d_keys: torch.Tensor
    mask: torch.Tensor
    scale: float


@dataclass(frozen=True)
class LinearHeadGradients:
    """Weight gradients of a linear head q = x W_Q, k = x_kv W_K, v = x_kv W_V (docs/theory.md §2.5).

    Attributes:
        attention: the head-level quantities, :class:`AttentionGradients`.
        queries, keys, values: the projections, [..., query_pos, d_k], [..., key_pos, d_k],
            [..., key_pos, d_v].
        d_w_query: X^T dQ summed over leading dimensions, [d_x, d_k].
        d_w_key: X_kv^T dK, [d_kv, d_k].
        d_w_value: X_kv^T A^T U, [d_kv, d_v].
    """

    attention: AttentionGradients
    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    d_w_query: torch.Tensor
    d_w_key: torch.Tensor
    d_w_value: torch.Tensor


@dataclass(frozen=True)
class ReadoutGradients:
    """Mean cross-entropy of a linear readout z = g W_O and its gradients (docs/theory.md §2.5).

    The loss is the mean over the N labelled positions of all leading dimensions, so every
    gradient carries 1/N; ``upstream * n_labelled`` is the length-free u~ = N u.

    Attributes:
        logits: z = g W_O, [..., pos, n_classes].
        probs: softmax(z), [..., pos, n_classes].
        loss_nats: mean cross-entropy in nats, scalar tensor.
        d_logits: E = dL/dz, rows (p_i - t_i)/N at labelled positions, 0 elsewhere.
        upstream: U = dL/dg = E W_O^T, [..., pos, d_v].
        d_w_out: G^T E summed over leading dimensions, [d_v, n_classes].
        n_labelled: N.
    """

    logits: torch.Tensor
    probs: torch.Tensor
    loss_nats: torch.Tensor
    d_logits: torch.Tensor
    upstream: torch.Tensor
    d_w_out: torch.Tensor
    n_labelled: int


@dataclass(frozen=True)
class HeadChange:
    """Change of a head's quantities over one step, predicted (first order) or measured.

    u is held fixed (it is an input, docs/theory.md §2.6). Shapes as in :class:`AttentionGradients`.

    Attributes:
        delta_queries, delta_keys, delta_values: changes of q, k, v.
        delta_scores: change of the scale * q·k scores, [*B, query_pos, key_pos], 0 off-mask.
        delta_alpha: change of the attention pattern.
        delta_compatibility: change of b_ij = u_i·v_j.
        delta_advantage: change of the descent advantage (from both the pattern and the values).
        delta_output: change of g.
        delta_loss_linear: sum_i u_i·Δg_i, the first-order loss change with u fixed, scalar.
    """

    delta_queries: torch.Tensor
    delta_keys: torch.Tensor
    delta_values: torch.Tensor
    delta_scores: torch.Tensor
    delta_alpha: torch.Tensor
    delta_compatibility: torch.Tensor
    delta_advantage: torch.Tensor
    delta_output: torch.Tensor
    delta_loss_linear: torch.Tensor


# ----------------------------------------------------------------------------- helpers

_HEAD_SHAPES = (
    "q [..., query_pos, d_k], k [..., key_pos, d_k], v [..., key_pos, d_v], u [..., query_pos, d_v]"
)


def _check_head(owner: str, q: Any, k: Any, v: Any, u: Any) -> None:
    check_float_tensor(owner, "q", q, min_dim=2, shape_text="[..., query_pos, d_k]")
    check_float_tensor(owner, "k", k, min_dim=2, shape_text="[..., key_pos, d_k]")
    check_float_tensor(owner, "v", v, min_dim=2, shape_text="[..., key_pos, d_v]")
    check_float_tensor(owner, "u", u, min_dim=2, shape_text="[..., query_pos, d_v]")
    dtypes = {t.dtype for t in (q, k, v, u)}
    devices = {t.device for t in (q, k, v, u)}
    if len(dtypes) > 1 or len(devices) > 1:
        raise ValueError(
            f"{owner}: q, k, v, u must share one dtype and device; got q {describe_tensor(q)}, "
            f"k {describe_tensor(k)}, v {describe_tensor(v)}, u {describe_tensor(u)}."
        )
    problems = []
    if k.shape[-1] != q.shape[-1]:
        problems.append(f"k must be [..., key_pos, d_k={q.shape[-1]}] like q; got {list(k.shape)}")
    if v.shape[-2] != k.shape[-2]:
        problems.append(f"v must be [..., key_pos={k.shape[-2]}, d_v] like k; got {list(v.shape)}")
    if u.shape[-2] != q.shape[-2] or u.shape[-1] != v.shape[-1]:
        problems.append(
            f"u must be [..., query_pos={q.shape[-2]}, d_v={v.shape[-1]}]; got {list(u.shape)}"
        )
    try:
        torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2], u.shape[:-2])
    except RuntimeError:
        problems.append(
            "leading dimensions must broadcast; got "
            f"q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}, u {list(u.shape)}"
        )
    if problems:
        raise ValueError(f"{owner}: expected {_HEAD_SHAPES}; " + "; ".join(problems) + ".")


def _check_all_finite(owner: str, tensors: dict[str, Any]) -> None:
    """``check_finite`` on each named tensor, in order (non-tensors are left to the type checks)."""
    for name, x in tensors.items():
        check_finite(owner, name, x)


def _resolve_scale(owner: str, scale: Any, d_k: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(d_k)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{owner}: scale must be a finite real number or None; got {scale!r}.")
    return float(scale)


def _sum_to_shape(x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a broadcast result back to ``shape`` (what autograd does for broadcast inputs)."""
    extra = x.dim() - len(shape)
    if extra > 0:
        x = x.sum(dim=tuple(range(extra)))
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    if dims:
        x = x.sum(dim=dims, keepdim=True)
    return x


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last dimension restricted to ``mask`` (True = allowed).

    Masked entries are exactly 0, and a row with no allowed entry is all 0 (not NaN), with zero
    gradient: such a row's scores are replaced by zeros (whatever they were, -inf included),
    softmaxed and multiplied by 0, so no -inf-only row (and no NaN) enters the computation.

    Shapes: scores [..., query_pos, key_pos] (masked entries may already be -inf); mask bool
    broadcastable to it, or None.

    Unlike the other functions here it checks nothing: it runs inside every attention forward
    pass, and its scores legitimately hold -inf at masked entries.
    """
    if mask is None:
        return torch.softmax(scores, dim=-1)
    any_key = mask.any(dim=-1, keepdim=True)
    safe = scores.masked_fill(~mask, -math.inf).masked_fill(~any_key, 0.0)
    return torch.softmax(safe, dim=-1) * any_key


# ----------------------------------------------------------------------------- exact gradients


def attention_gradients(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> AttentionGradients:
    """Exact first-order gradients of one softmax attention head (docs/theory.md §2.2–§2.4).

    With s_ij = scale * q_i·k_j, a_ij = softmax_j(s_ij) over allowed keys, g_i = sum_j a_ij v_j
    and u_i = dL/dg_i, define b_ij = u_i·v_j. Then

        dL/ds_ij = a_ij (b_ij - E_{a_i}[b]),   E_{a_i}[b] = sum_j a_ij b_ij = u_i·g_i,
        dL/dv_j  = sum_i a_ij u_i,
        dL/dq_i  = scale * sum_j dL/ds_ij k_j  = scale * Cov_{a_i}(b_i., k.),
        dL/dk_j  = scale * sum_i dL/ds_ij q_i.

    Each row of dL/ds sums to zero. The formulas hold for any downstream network and loss,
    which enter only through u. ``advantage`` is the descent advantage E_{a_i}[b] - b_ij (see
    the module docstring for the sign convention); ``d_scores = -alpha * advantage``.

    Shapes: q [..., query_pos, d_k], k [..., key_pos, d_k], v [..., key_pos, d_v],
    u [..., query_pos, d_v]; leading dimensions (batch, head) broadcast. mask bool, broadcastable
    to [..., query_pos, key_pos], True = may attend; None = all keys. Rows with every key masked
    get a_ij = 0 and zero gradients. scale defaults to 1/sqrt(d_k).

    Raises:
        ValueError: naming the argument when a shape, dtype, device, mask or scale does not fit,
            or when q, k, v or u holds NaN or inf.
    """
    owner = "attention_gradients"
    _check_head(owner, q, k, v, u)
    _check_all_finite(owner, {"q": q, "k": k, "v": v, "u": u})
    tau = _resolve_scale(owner, scale, q.shape[-1])
    lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2], u.shape[:-2])
    score_shape = (*lead, q.shape[-2], k.shape[-2])
    if mask is None:
        full_mask = torch.ones(score_shape, dtype=torch.bool, device=q.device).expand(score_shape)
    else:
        full_mask = check_mask(owner, mask, score_shape, "[..., query_pos, key_pos]")
        full_mask = full_mask.to(q.device)

    scores = tau * (q @ k.transpose(-1, -2))
    alpha = masked_softmax(scores.expand(score_shape), full_mask)  # [*B, Tq, Tk]
    output = alpha @ v  # [*B, Tq, d_v]
    compatibility = (u @ v.transpose(-1, -2)).expand(score_shape)  # b_ij = u_i·v_j
    expected = (u * output).sum(-1)  # E_{a_i}[b] = u_i·g_i, [*B, Tq], O(T d) instead of O(T^2)
    centred = expected.unsqueeze(-1) - compatibility
    advantage = centred.masked_fill(~full_mask, 0.0)
    d_scores = -alpha * centred  # alpha is exactly 0 off the mask
    d_values = _sum_to_shape(alpha.transpose(-1, -2) @ u, v.shape)
    d_queries = _sum_to_shape(tau * (d_scores @ k), q.shape)
    d_keys = _sum_to_shape(tau * (d_scores.transpose(-1, -2) @ q), k.shape)
    return AttentionGradients(
        alpha=alpha,
        output=output,
        compatibility=compatibility,
        expected_compatibility=expected,
        advantage=advantage,
        responsibility=alpha.sum(-2),
        d_scores=d_scores,
        d_values=d_values,
        d_queries=d_queries,
        d_keys=d_keys,
        mask=full_mask,
        scale=tau,
    )


def _check_weight(owner: str, name: str, w: Any, rows: int, x_name: str, dtype: torch.dtype) -> None:
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dim() != 2:
        raise ValueError(
            f"{owner}: {name} must be a floating-point tensor [{x_name}_dim, d]; "
            f"got {describe_tensor(w)}."
        )
    if w.shape[0] != rows or w.dtype != dtype:
        raise ValueError(
            f"{owner}: {name} must be [{rows}, d] (rows = last dim of {x_name}) with dtype "
            f"{str(dtype).replace('torch.', '')}; got {describe_tensor(w)}."
        )


def _flatten_lead(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def linear_head_gradients(
    x: torch.Tensor,
    w_query: torch.Tensor,
    w_key: torch.Tensor,
    w_value: torch.Tensor,
    u: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    x_kv: torch.Tensor | None = None,
) -> LinearHeadGradients:
    """Exact weight gradients of a linear softmax head (docs/theory.md §2.5).

    q = x W_Q, k = x_kv W_K, v = x_kv W_V (x_kv = x for self-attention). With dS, dQ, dK, dV
    from :func:`attention_gradients`:

        grad W_Q = X^T dQ = scale X^T dS K,  grad W_K = scale X_kv^T dS^T Q,  grad W_V = X_kv^T A^T U,

    each summed over the leading (batch) dimensions.

    Shapes: x [..., query_pos, d_x], x_kv [..., key_pos, d_kv], w_query [d_x, d_k],
    w_key [d_kv, d_k], w_value [d_kv, d_v], u [..., query_pos, d_v]; mask as in
    :func:`attention_gradients`.

    Raises:
        ValueError: naming the argument when a shape or dtype does not fit, or when x, x_kv,
            w_query, w_key, w_value or u holds NaN or inf.
    """
    owner = "linear_head_gradients"
    check_float_tensor(owner, "x", x, min_dim=2, shape_text="[..., query_pos, d_x]")
    source = x if x_kv is None else x_kv
    if x_kv is not None:
        check_float_tensor(owner, "x_kv", x_kv, min_dim=2, shape_text="[..., key_pos, d_kv]")
    _check_weight(owner, "w_query", w_query, x.shape[-1], "x", x.dtype)
    kv_name = "x" if x_kv is None else "x_kv"
    _check_weight(owner, "w_key", w_key, source.shape[-1], kv_name, x.dtype)
    _check_weight(owner, "w_value", w_value, source.shape[-1], kv_name, x.dtype)
    _check_all_finite(
        owner, {"x": x, "x_kv": x_kv, "w_query": w_query, "w_key": w_key, "w_value": w_value, "u": u}
    )
    queries, keys, values = x @ w_query, source @ w_key, source @ w_value
    grads = attention_gradients(queries, keys, values, u, mask=mask, scale=scale)
    # Broadcast inputs to the projections' shapes before contracting over positions and batch.
    xq = x.expand(*grads.d_queries.shape[:-1], x.shape[-1])
    xk = source.expand(*grads.d_keys.shape[:-1], source.shape[-1])
    return LinearHeadGradients(
        attention=grads,
        queries=queries,
        keys=keys,
        values=values,
        d_w_query=_flatten_lead(xq).T @ _flatten_lead(grads.d_queries),
        d_w_key=_flatten_lead(xk).T @ _flatten_lead(grads.d_keys),
        d_w_value=_flatten_lead(xk).T @ _flatten_lead(grads.d_values),
    )


def cross_entropy_readout(
    g: torch.Tensor,
    w_out: torch.Tensor,
    targets: torch.Tensor,
    *,
    site_mask: torch.Tensor | None = None,
) -> ReadoutGradients:
    """Mean cross-entropy of a linear readout and its exact gradients (docs/theory.md §2.5).

    z_i = g_i W_O, p_i = softmax(z_i), L = (1/N) sum_{labelled i} -sum_c t_ic log p_ic, so
    dL/dz_i = (p_i - t_i)/N at labelled positions (0 elsewhere), dL/dg_i = W_O (p_i - t_i)/N and
    grad W_O = G^T E. The target t_i is one-hot (integer labels) or a soft distribution.

    Shapes: g [..., pos, d_v], w_out [d_v, n_classes], targets long [..., pos] (class indices) or
    float [..., pos, n_classes] (rows summing to 1); site_mask bool [..., pos], True = labelled;
    None labels every position.

    Raises:
        ValueError: naming the argument when a shape or dtype does not fit, no position is
            labelled, or g, w_out or float targets hold NaN or inf.
    """
    owner = "cross_entropy_readout"
    check_float_tensor(owner, "g", g, min_dim=2, shape_text="[..., pos, d_v]")
    _check_weight(owner, "w_out", w_out, g.shape[-1], "g", g.dtype)
    n_classes = w_out.shape[-1]
    pos_shape = g.shape[:-1]
    if not isinstance(targets, torch.Tensor):
        raise ValueError(f"{owner}: targets must be a tensor; got {describe_tensor(targets)}.")
    if targets.dtype == torch.long and targets.shape == pos_shape:
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= n_classes):
            raise ValueError(
                f"{owner}: targets must be class indices in [0, {n_classes}); got values in "
                f"[{int(targets.min())}, {int(targets.max())}]."
            )
        target_probs = torch.nn.functional.one_hot(targets, n_classes).to(g.dtype)
    elif targets.is_floating_point() and targets.shape == (*pos_shape, n_classes):
        target_probs = targets.to(g.dtype)
    else:
        raise ValueError(
            f"{owner}: targets must be long {list(pos_shape)} or float "
            f"{[*pos_shape, n_classes]}; got {describe_tensor(targets)}."
        )
    _check_all_finite(owner, {"g": g, "w_out": w_out, "targets": targets})
    if site_mask is None:
        labelled = torch.ones(pos_shape, dtype=torch.bool, device=g.device)
    elif (
        not isinstance(site_mask, torch.Tensor)
        or site_mask.dtype != torch.bool
        or site_mask.shape != pos_shape
    ):
        raise ValueError(
            f"{owner}: site_mask must be bool {list(pos_shape)}; got {describe_tensor(site_mask)}."
        )
    else:
        labelled = site_mask
    n_labelled = int(labelled.sum())
    if n_labelled == 0:
        raise ValueError(f"{owner}: site_mask must label at least one position; got none.")
    logits = g @ w_out
    log_probs = torch.log_softmax(logits, dim=-1)
    probs = log_probs.exp()
    weight = labelled.to(g.dtype).unsqueeze(-1)
    loss = -(weight * target_probs * log_probs).sum() / n_labelled
    d_logits = weight * (probs - target_probs) / n_labelled
    return ReadoutGradients(
        logits=logits,
        probs=probs,
        loss_nats=loss,
        d_logits=d_logits,
        upstream=d_logits @ w_out.T,
        d_w_out=_flatten_lead(g).T @ _flatten_lead(d_logits),
        n_labelled=n_labelled,
    )


# ----------------------------------------------------------------------------- first order


def propagate_first_order(
    grads: AttentionGradients,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    delta_queries: torch.Tensor,
    delta_keys: torch.Tensor,
    delta_values: torch.Tensor,
) -> HeadChange:
    """First-order change of a head's quantities for given small changes of q, k and v.

    With u fixed: Δs = scale (Δq k^T + q Δk^T); Δa_ij = a_ij (Δs_ij - sum_k a_ik Δs_ik);
    Δb = u Δv^T; Δg = Δa v + a Δv; Δadv_ij = Δ(E_{a_i}[b]) - Δb_ij with
    Δ(E_{a_i}[b]) = sum_k (Δa_ik b_ik + a_ik Δb_ik) = u_i·Δg_i; ΔL ≈ sum_i u_i·Δg_i.
    Second-order terms (Δq Δk^T, Δa Δv, the curvature of the softmax) are dropped.

    Shapes: as in :func:`attention_gradients`; the deltas have the shapes of q, k and v.

    Raises:
        ValueError: naming the argument when q, k, v, u or a delta holds NaN or inf.
    """
    _check_all_finite(
        "propagate_first_order",
        {"q": q, "k": k, "v": v, "u": u, "delta_queries": delta_queries,
         "delta_keys": delta_keys, "delta_values": delta_values},
    )
    tau, alpha, mask = grads.scale, grads.alpha, grads.mask
    zeros = torch.zeros_like(alpha)
    delta_scores = tau * (delta_queries @ k.transpose(-1, -2) + q @ delta_keys.transpose(-1, -2))
    delta_scores = torch.where(mask, delta_scores.expand_as(alpha), zeros)
    mean_delta = (alpha * delta_scores).sum(-1, keepdim=True)
    delta_alpha = alpha * (delta_scores - mean_delta)
    delta_compat = (u @ delta_values.transpose(-1, -2)).expand_as(alpha)
    delta_output = delta_alpha @ v + alpha @ delta_values
    delta_expected = (u * delta_output).sum(-1, keepdim=True)
    delta_advantage = torch.where(mask, delta_expected - delta_compat, zeros)
    return HeadChange(
        delta_queries=delta_queries,
        delta_keys=delta_keys,
        delta_values=delta_values,
        delta_scores=delta_scores,
        delta_alpha=delta_alpha,
        delta_compatibility=delta_compat,
        delta_advantage=delta_advantage,
        delta_output=delta_output,
        delta_loss_linear=(u * delta_output).sum(),
    )


_UPDATABLE = ("queries", "keys", "values")


def _check_update(owner: str, lr: Any, update: Any) -> tuple[str, ...]:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr):
        raise ValueError(f"{owner}: lr must be a finite real number; got {lr!r}.")
    chosen = (update,) if isinstance(update, str) else tuple(update)
    bad = [name for name in chosen if name not in _UPDATABLE]
    if bad or not chosen:
        raise ValueError(
            f"{owner}: update must be a non-empty subset of {_UPDATABLE}; got {update!r}."
        )
    return chosen


def predict_free_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    *,
    lr: float,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    update: tuple[str, ...] | str = _UPDATABLE,
) -> HeadChange:
    """First-order effect of one plain gradient step when q, k, v are free vectors (docs/theory.md §2.6).

    The step is Δq = -lr dQ, Δk = -lr dK, Δv = -lr dV (only the blocks named in ``update``).
    In closed form: Δv_j = -lr sum_i a_ij u_i (the responsibility-weighted pull);
    Δb = -lr U U^T A, i.e. Δb_ij = -lr a_ij |u_i|^2 - lr sum_{i'≠i} a_i'j u_i·u_i';
    Δs = -lr scale^2 (dS K K^T + Q Q^T dS); and the loss falls by lr (|dQ|^2 + |dK|^2 + |dV|^2)
    to first order (``delta_loss_linear``). Errors against a real step are O(lr^2).

    Shapes: as in :func:`attention_gradients`.

    Raises:
        ValueError: for bad tensors (see :func:`attention_gradients`; NaN or inf in q, k, v or u
            is named), lr or update.
    """
    chosen = _check_update("predict_free_step", lr, update)
    _check_all_finite("predict_free_step", {"q": q, "k": k, "v": v, "u": u})
    grads = attention_gradients(q, k, v, u, mask=mask, scale=scale)
    dq = -lr * grads.d_queries if "queries" in chosen else torch.zeros_like(q)
    dk = -lr * grads.d_keys if "keys" in chosen else torch.zeros_like(k)
    dv = -lr * grads.d_values if "values" in chosen else torch.zeros_like(v)
    return propagate_first_order(grads, q, k, v, u, dq, dk, dv)


def predict_linear_step(
    x: torch.Tensor,
    w_query: torch.Tensor,
    w_key: torch.Tensor,
    w_value: torch.Tensor,
    u: torch.Tensor,
    *,
    lr: float,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    x_kv: torch.Tensor | None = None,
    update: tuple[str, ...] | str = _UPDATABLE,
) -> HeadChange:
    """First-order effect of one plain gradient step on W_Q, W_K, W_V of a linear head.

    ΔW = -lr grad W, so the realised projections move by ΔQ = X ΔW_Q, ΔK = X_kv ΔW_K and
    ΔV = X_kv ΔW_V = -lr X_kv X_kv^T A^T U (summed over the batch): the responsibility-weighted
    pull mixed by the input Gram matrix (docs/theory.md §2.3), so the boxed Δv_j is exact only for free
    values. Every downstream quantity then follows :func:`propagate_first_order`.

    Shapes: as in :func:`linear_head_gradients`.

    Raises:
        ValueError: for bad tensors (see :func:`linear_head_gradients`; NaN or inf in x, x_kv,
            a weight or u is named), lr or update.
    """
    chosen = _check_update("predict_linear_step", lr, update)
    _check_all_finite(
        "predict_linear_step",
        {"x": x, "x_kv": x_kv, "w_query": w_query, "w_key": w_key, "w_value": w_value, "u": u},
    )
    head = linear_head_gradients(
        x, w_query, w_key, w_value, u, mask=mask, scale=scale, x_kv=x_kv
    )
    source = x if x_kv is None else x_kv
    q, k, v = head.queries, head.keys, head.values
    dq = x @ (-lr * head.d_w_query) if "queries" in chosen else torch.zeros_like(q)
    dk = source @ (-lr * head.d_w_key) if "keys" in chosen else torch.zeros_like(k)
    dv = source @ (-lr * head.d_w_value) if "values" in chosen else torch.zeros_like(v)
    return propagate_first_order(head.attention, q, k, v, u, dq, dk, dv)


def measure_change(
    before: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    after: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    u: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> HeadChange:
    """The quantities of :class:`HeadChange` measured across a real step, with u held fixed.

    ``before`` and ``after`` are (q, k, v) of the same head before and after an optimizer step;
    every field is the exact difference (after minus before), so ``measured - predicted`` is the
    error of the first-order prediction (O(lr^2) for a plain gradient step).

    Shapes: q, k, v, u as in :func:`attention_gradients`.

    Raises:
        ValueError: for bad tensors (see :func:`attention_gradients`); NaN or inf in
            ``before[i]``, ``after[i]`` or u is named.
    """
    q0, k0, v0 = before
    q1, k1, v1 = after
    _check_all_finite(
        "measure_change",
        {"before[0]": q0, "before[1]": k0, "before[2]": v0,
         "after[0]": q1, "after[1]": k1, "after[2]": v1, "u": u},
    )
    g0 = attention_gradients(q0, k0, v0, u, mask=mask, scale=scale)
    g1 = attention_gradients(q1, k1, v1, u, mask=mask, scale=scale)
    tau = g0.scale
    zeros = torch.zeros_like(g0.alpha)
    s0 = (tau * (q0 @ k0.transpose(-1, -2))).expand_as(g0.alpha)
    s1 = (tau * (q1 @ k1.transpose(-1, -2))).expand_as(g0.alpha)
    delta_output = g1.output - g0.output
    return HeadChange(
        delta_queries=q1 - q0,
        delta_keys=k1 - k0,
        delta_values=v1 - v0,
        delta_scores=torch.where(g0.mask, s1 - s0, zeros),
        delta_alpha=g1.alpha - g0.alpha,
        delta_compatibility=g1.compatibility - g0.compatibility,
        delta_advantage=g1.advantage - g0.advantage,
        delta_output=delta_output,
        delta_loss_linear=(u * delta_output).sum(),
    )


# ----------------------------------------------------------------------------- autograd check

LAW_QUANTITIES = ("alpha", "output", "d_scores", "d_values", "d_queries", "d_keys")


@dataclass(frozen=True)
class LawCheck:
    """Closed form against autograd for one head.

    Attributes:
        max_abs_error: per quantity in ``LAW_QUANTITIES``, max |closed form - autograd|.
        max_rel_error: the same divided by the magnitude of the summands that make up the
            quantity (see :func:`summand_magnitudes`), so that a gradient that is tiny because
            of cancellation is not compared with its own rounding noise.
    """

    max_abs_error: dict[str, float]
    max_rel_error: dict[str, float]

    @property
    def worst_rel_error(self) -> float:
        """The largest relative error over all quantities."""
        return max(self.max_rel_error.values())


def check_law(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> LawCheck:
    """Compare :func:`attention_gradients` with autograd on the same head.

    The reference builds the head with ``torch.softmax`` (rows with no allowed key are
    multiplied by 0 after a softmax over all keys, so no NaN enters the graph) and
    differentiates the surrogate loss sum_i u_i·g_i, whose gradient with respect to every
    upstream quantity equals that of any loss with dL/dg = u (chain rule).

    Shapes: as in :func:`attention_gradients`. Runs under ``torch.enable_grad()``.

    Raises:
        ValueError: as :func:`attention_gradients`, naming ``check_law`` when q, k, v or u holds
            NaN or inf.
    """
    _check_all_finite("check_law", {"q": q, "k": k, "v": v, "u": u})
    closed = attention_gradients(q, k, v, u, mask=mask, scale=scale)
    with torch.enable_grad():
        qr, kr, vr = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        scores = (closed.scale * (qr @ kr.transpose(-1, -2))).expand_as(closed.alpha)
        any_key = closed.mask.any(-1, keepdim=True)
        safe_mask = closed.mask | ~any_key
        neg_inf = torch.tensor(-math.inf, dtype=scores.dtype, device=scores.device)
        alpha = torch.softmax(torch.where(safe_mask, scores, neg_inf), dim=-1) * any_key
        output = alpha @ vr
        loss = (u.detach() * output).sum()
        d_s, d_q, d_k, d_v = torch.autograd.grad(loss, (scores, qr, kr, vr))
    reference = {
        "alpha": alpha.detach(),
        "output": output.detach(),
        "d_scores": d_s,
        "d_values": d_v,
        "d_queries": d_q,
        "d_keys": d_k,
    }
    sizes = summand_magnitudes(closed, q, k, v, u)
    abs_err, rel_err = {}, {}
    for name in LAW_QUANTITIES:
        ref = reference[name]
        err = float((getattr(closed, name) - ref).abs().max()) if ref.numel() else 0.0
        abs_err[name] = err
        rel_err[name] = _relative(err, sizes[name])
    return LawCheck(max_abs_error=abs_err, max_rel_error=rel_err)


def _relative(err: float, size: float) -> float:
    return err / size if size > 0 else err


def summand_magnitudes(
    grads: AttentionGradients, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, u: torch.Tensor
) -> dict[str, float]:
    """The scale against which rounding errors of each closed form are measured.

    Floating-point sums err by about n·eps·sum|terms|, not by eps·|sum|: a gradient that
    nearly cancels (a saturated pattern, say) is small while its summands are not. For each
    quantity this returns the max entry of the same formula evaluated on absolute values,
    e.g. for dS the max of a_ij (|b_ij| + |E_{a_i}[b]|), for dQ the max of
    scale · (a ⊙ (|B| + |E[b]|)) |K|.

    Raises:
        ValueError: naming the argument when q, k, v or u holds NaN or inf.
    """
    _check_all_finite("summand_magnitudes", {"q": q, "k": k, "v": v, "u": u})
    alpha, tau = grads.alpha, abs(grads.scale)
    ds_mag = alpha * (grads.compatibility.abs() + grads.expected_compatibility.abs().unsqueeze(-1))
    mags = {
        "alpha": alpha,
        "output": alpha @ v.abs(),
        "d_scores": ds_mag,
        "d_values": alpha.transpose(-1, -2) @ u.abs(),
        "d_queries": tau * (ds_mag @ k.abs()),
        "d_keys": tau * (ds_mag.transpose(-1, -2) @ q.abs()),
    }
    return {name: float(m.max()) if m.numel() else 0.0 for name, m in mags.items()}


# ----------------------------------------------------------------------------- random verification

DEFAULT_REL_TOL = {torch.float64: 1e-10, torch.float32: 1e-4}
MASK_KINDS = ("none", "causal", "padding", "empty_rows")
WEIGHT_QUANTITIES = ("d_w_query", "d_w_key", "d_w_value", "d_w_out", "upstream")


@dataclass(frozen=True)
class LawReport:
    """Worst errors of the closed forms against autograd over many random heads.

    Attributes:
        n_trials: number of random heads checked.
        dtype: the floating dtype used.
        rel_tol: the tolerance on the relative error (error / magnitude of the summands, see
            :func:`summand_magnitudes`).
        max_abs_error: per quantity, the max absolute error over all trials.
        max_rel_error: per quantity, the max relative error over all trials.
    """

    n_trials: int
    dtype: torch.dtype
    rel_tol: float
    max_abs_error: dict[str, float]
    max_rel_error: dict[str, float]

    @property
    def passed(self) -> bool:
        """True when every relative error is within ``rel_tol``."""
        return all(err <= self.rel_tol for err in self.max_rel_error.values())


def _random_mask(kind: str, t_q: int, t_k: int, batch: int, generator: torch.Generator):
    if kind == "none":
        return None
    if kind == "causal":
        return torch.ones(t_q, t_k, dtype=torch.bool).tril(diagonal=t_k - t_q)
    if kind == "padding":
        n_valid = torch.randint(0, t_k + 1, (batch, 1, 1, 1), generator=generator)
        return torch.arange(t_k) < n_valid  # [batch, 1, 1, key_pos]; n_valid = 0 masks every key
    mask = torch.rand(batch, 1, t_q, t_k, generator=generator) < 0.6
    mask[..., 0, :] = False  # a fully masked query row in every sequence
    return mask


def _readout_autograd(x, w_q, w_k, w_v, w_o, targets, mask, scale):
    """Autograd gradients of mean CE for a linear single head, written without this module."""
    with torch.enable_grad():
        ws = [w.detach().clone().requires_grad_(True) for w in (w_q, w_k, w_v, w_o)]
        q, k, v = x @ ws[0], x @ ws[1], x @ ws[2]
        scores = scale * (q @ k.transpose(-1, -2))
        if mask is not None:
            full = mask.expand_as(scores)
            any_key = full.any(-1, keepdim=True)
            scores = scores.masked_fill(~(full | ~any_key), -math.inf)
            alpha = torch.softmax(scores, -1) * any_key
        else:
            alpha = torch.softmax(scores, -1)
        g = alpha @ v
        loss = torch.nn.functional.cross_entropy(
            (g @ ws[3]).reshape(-1, w_o.shape[1]), targets.reshape(-1)
        )
        return g.detach(), torch.autograd.grad(loss, [*ws, g])


def verify_law(
    n_trials: int, *, dtype: torch.dtype = torch.float64, generator: torch.Generator
) -> LawReport:
    """Check every closed form against autograd on ``n_trials`` random heads.

    Each trial draws a random shape (batch 1–3, heads 1–3, positions 1–12, d_k and d_v 1–8),
    cycles through the mask kinds of ``MASK_KINDS`` (none, causal, key padding with
    some sequences fully padded, random masks with a fully masked query row) and a random scale,
    then compares the head quantities (:func:`check_law`) and, for a single-head linear readout
    with mean CE, the weight gradients and the upstream gradient U (:func:`linear_head_gradients`,
    :func:`cross_entropy_readout`) with autograd.

    Raises:
        ValueError: when n_trials < 1 or dtype is not float32/float64.
        TypeError: when ``generator`` is not a torch.Generator.
    """
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise ValueError(f"verify_law: n_trials must be an int >= 1; got {n_trials!r}.")
    if dtype not in DEFAULT_REL_TOL:
        raise ValueError(f"verify_law: dtype must be torch.float32 or torch.float64; got {dtype!r}.")
    check_generator("verify_law", generator, optional=False)
    names = (*LAW_QUANTITIES, *WEIGHT_QUANTITIES)
    abs_err = dict.fromkeys(names, 0.0)
    rel_err = dict.fromkeys(names, 0.0)

    def randint(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (1,), generator=generator))

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)

    def record(name: str, got: torch.Tensor, ref: torch.Tensor, magnitude: torch.Tensor) -> None:
        err = float((got - ref).abs().max())
        abs_err[name] = max(abs_err[name], err)
        rel_err[name] = max(rel_err[name], _relative(err, float(magnitude.max())))

    for trial in range(n_trials):
        kind = MASK_KINDS[trial % len(MASK_KINDS)]
        batch, n_heads, t_q, d_k, d_v = (randint(1, 3), randint(1, 3), randint(1, 12), randint(1, 8), randint(1, 8))
        t_k = t_q if kind != "padding" else randint(1, 12)
        scale = float(torch.empty(1).uniform_(0.1, 2.0, generator=generator))
        mask = _random_mask(kind, t_q, t_k, batch, generator)
        q, k = randn(batch, n_heads, t_q, d_k), randn(batch, n_heads, t_k, d_k)
        v, u = randn(batch, n_heads, t_k, d_v), randn(batch, n_heads, t_q, d_v)
        check = check_law(q, k, v, u, mask=mask, scale=scale)
        for name in LAW_QUANTITIES:
            abs_err[name] = max(abs_err[name], check.max_abs_error[name])
            rel_err[name] = max(rel_err[name], check.max_rel_error[name])
        # Weight level: one linear head (self-attention), mean CE over every position.
        d_x, n_cls = randint(1, 8), randint(2, 6)
        x = randn(batch, t_q, d_x)
        w_q, w_k, w_v, w_o = randn(d_x, d_k), randn(d_x, d_k), randn(d_x, d_v), randn(d_v, n_cls)
        head_mask = None if mask is None else (mask[:, 0] if mask.dim() == 4 else mask)
        if kind == "padding":
            head_mask = torch.ones(t_q, t_q, dtype=torch.bool).tril()
        targets = torch.randint(0, n_cls, (batch, t_q), generator=generator)
        g, refs = _readout_autograd(x, w_q, w_k, w_v, w_o, targets, head_mask, scale)
        readout = cross_entropy_readout(g, w_o, targets)
        head = linear_head_gradients(x, w_q, w_k, w_v, readout.upstream, mask=head_mask, scale=scale)
        got = (head.d_w_query, head.d_w_key, head.d_w_value, readout.d_w_out, readout.upstream)
        # Magnitudes of the summands (the same formulas on absolute values), as in check_law.
        att = head.attention
        ds_mag = att.alpha * (att.compatibility.abs() + att.expected_compatibility.abs().unsqueeze(-1))
        x_abs, e_abs = _flatten_lead(x.abs()), readout.d_logits.abs()
        mags = (
            x_abs.T @ _flatten_lead(att.scale * ds_mag @ head.keys.abs()),
            x_abs.T @ _flatten_lead(att.scale * ds_mag.transpose(-1, -2) @ head.queries.abs()),
            x_abs.T @ _flatten_lead(att.alpha.transpose(-1, -2) @ readout.upstream.abs()),
            _flatten_lead(att.alpha @ head.values.abs()).T @ _flatten_lead(e_abs),
            e_abs @ w_o.abs().T,
        )
        for name, value, ref, magnitude in zip(WEIGHT_QUANTITIES, got, refs, mags):
            record(name, value, ref, magnitude)
    return LawReport(
        n_trials=n_trials,
        dtype=dtype,
        rel_tol=DEFAULT_REL_TOL[dtype],
        max_abs_error=abs_err,
        max_rel_error=rel_err,
    )
