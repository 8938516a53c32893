"""The single softmax attention head of the Paper II sticky-chain experiment (docs/theory.md §4.2).

One head reads the inputs directly: q = x W_Q, k = x W_K, v = x W_V, a causal softmax over
q k^T / sqrt(d_k), z = alpha v and logits = z W_O. No bias, residual, normalisation or position
information. Several independent copies ("replicas": seeds x optimiser arms) live in one module
along a leading dimension, so they train in one batched computation.

Besides the autograd ``forward`` the module has a closed-form gradient pass,
:meth:`SingleHeadAttention.exact_gradients`, that applies the routing law of docs/theory.md §2 block by
block over query rows. It never materialises a full [query_pos, key_pos] matrix, skips the
masked upper triangle, and returns the per-value quantities (dL/dV, responsibilities) that the
EM-style arm needs.
"""

from __future__ import annotations

import functools
import math
import threading
import warnings
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import nn

from windtunnel._checks import Problems, check_generator, check_number, check_positive_int
from windtunnel.telemetry import RoutingTelemetry, causal_routing_telemetry, routing_law_residual

__all__ = [
    "PARAMETER_NAMES",
    "SingleHeadAttention",
    "SingleHeadConfig",
    "SingleHeadForward",
    "SingleHeadGradients",
    "single_head_gradients",
    "single_head_law_residual",
    "single_head_output",
    "single_head_routing_telemetry",
    "single_head_telemetry",
]

#: Parameter names in the reference draw order (RNG step 5 of docs/theory.md §4.1).
PARAMETER_NAMES = ("W_Q", "W_K", "W_V", "W_O")


@dataclass(frozen=True, kw_only=True)
class SingleHeadConfig:
    """Shapes and initialisation of the single head (reference values).

    Attributes:
        d_x: input dimension (20, the sticky chain's ``d_embed``).
        d_k: query/key dimension (10); scores are scaled by 1/sqrt(d_k).
        d_v: value dimension (15).
        n_classes: output classes (8, the chain's ``n_symbols``).
        init_std: every weight is i.i.d. N(0, init_std^2) (0.1).

    Raises:
        ValueError: naming every bad field at once.
    """

    d_x: int = 20
    d_k: int = 10
    d_v: int = 15
    n_classes: int = 8
    init_std: float = 0.1

    def __post_init__(self) -> None:
        owner = "SingleHeadConfig"
        problems = Problems(owner)
        for name in ("d_x", "d_k", "d_v"):
            text = check_positive_int(owner, name, getattr(self, name))
            if text:
                problems.add_text(text)
        for text in (
            check_positive_int(owner, "n_classes", self.n_classes, minimum=2),
            check_number(owner, "init_std", self.init_std, low=0.0, low_open=True),
        ):
            if text:
                problems.add_text(text)
        problems.raise_if_any()

    def parameter_shapes(self) -> dict[str, tuple[int, int]]:
        """Per-replica shape of each weight, in the reference draw order."""
        return {
            "W_Q": (self.d_x, self.d_k),
            "W_K": (self.d_x, self.d_k),
            "W_V": (self.d_x, self.d_v),
            "W_O": (self.d_v, self.n_classes),
        }


@dataclass(frozen=True)
class SingleHeadForward:
    """Everything the head computes on one input, with autograd history.

    Attributes:
        q: queries x W_Q, [replica, batch, pos, d_k].
        k: keys x W_K, [replica, batch, pos, d_k].
        v: values x W_V, [replica, batch, pos, d_v].
        pattern: attention alpha, [replica, batch, query_pos, key_pos]; rows sum to 1 over the
            causal keys j <= i.
        z: head output alpha v (before W_O), [replica, batch, pos, d_v].
        logits: z W_O, [replica, batch, pos, n_classes].
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    pattern: torch.Tensor
    z: torch.Tensor
    logits: torch.Tensor


@dataclass(frozen=True)
class SingleHeadGradients:
    """Exact gradients of the mean cross-entropy of each replica.

    Attributes:
        loss_nats: mean CE over the batch's positions, per replica, [replica].
        grads: dL/dW for each name in :data:`PARAMETER_NAMES`, each [replica, *shape].
        d_values: dL/dv_j = sum_i alpha_ij u_i, the responsibility-weighted pull on each value,
            [replica, batch, key_pos, d_v], with u_i = dL/dz_i of the mean loss (None when not
            requested).
        responsibility: R_j = sum_i alpha_ij, [replica, batch, key_pos] (None unless requested).
        n_labelled: positions per replica that enter the mean (batch * pos).
        routing_sums: sums over the causal pairs behind the routing telemetry, each
            [replica, batch] (None unless requested): ``abs_advantage`` sum |adv_ij|,
            ``weighted_abs_advantage`` sum alpha_ij |adv_ij|, ``positive_advantage_mass``
            sum alpha_ij 1[adv_ij > 0], ``attention_entropy_nats`` sum -alpha_ij ln alpha_ij and
            ``d_scores_sq`` sum (dL/ds_ij)^2; see :func:`single_head_routing_telemetry`.
    """

    loss_nats: torch.Tensor
    grads: dict[str, torch.Tensor]
    d_values: torch.Tensor | None
    responsibility: torch.Tensor | None
    n_labelled: int
    routing_sums: dict[str, torch.Tensor] | None = None


#: log2(e): the gradient pass works with base-2 scores (exp2 is about twice as fast as exp).
LOG2_E = 1.0 / math.log(2.0)
#: Elements of slack after the exp2 workspace: a multiple of any CPU vector loop's stride.
_VECTOR_PAD = 64
_ROUTING_SUMS = (
    "abs_advantage",
    "weighted_abs_advantage",
    "positive_advantage_mass",
    "attention_entropy_nats",
    "d_scores_sq",
)


def _check_inputs(
    owner: str, weights: dict[str, torch.Tensor], x: torch.Tensor, targets: torch.Tensor | None
):
    n_replicas = weights["W_Q"].shape[0]
    d_x = weights["W_Q"].shape[1]
    if (
        not isinstance(x, torch.Tensor)
        or x.dim() != 4
        or x.shape[0] not in (1, n_replicas)
        or x.shape[-1] != d_x
    ):
        raise ValueError(
            f"{owner}: x must be [replica, batch, pos, d_x] with replica in (1, {n_replicas}) and "
            f"d_x = {d_x}; got {list(getattr(x, 'shape', []))}."
        )
    if targets is not None and (
        targets.dim() != 3
        or targets.shape[0] not in (1, n_replicas)
        or targets.shape[1:] != x.shape[1:3]
    ):
        raise ValueError(
            f"{owner}: targets must be long [replica, batch, pos] = [{n_replicas} or 1, "
            f"{x.shape[1]}, {x.shape[2]}]; got {list(targets.shape)}."
        )


def single_head_gradients(
    weights: dict[str, torch.Tensor],
    x: torch.Tensor,
    targets: torch.Tensor,
    *,
    block_size: int = 64,
    with_responsibility: bool = False,
    with_routing: bool = False,
    with_values: bool = True,
    n_workers: int = 1,
) -> SingleHeadGradients:
    """Closed-form gradients of the mean CE of a batch of single heads, no autograd.

    For each query row i (s_ij = q_i·k_j / sqrt(d_k), causal j <= i):

        alpha_ij = softmax_j(s_ij),  z_i = sum_j alpha_ij v_j,  p_i = softmax(z_i W_O),
        dL/dlogits_i = (p_i - e_{y_i}) / N,  u_i = dL/dz_i = dL/dlogits_i W_O^T,
        dL/ds_ij = alpha_ij (u_i·v_j - u_i·z_i)        (the advantage law, docs/theory.md §2.2),
        dL/dv_j = sum_i alpha_ij u_i,  dL/dq_i = sum_j dL/ds_ij k_j / sqrt(d_k),
        dL/dk_j = sum_i dL/ds_ij q_i / sqrt(d_k),  dL/dW_O = sum_i z_i^T dL/dlogits_i,

    and dL/dW_Q = x^T dL/dq etc. Everything about query row i is known once its row of alpha is,
    so one pass over blocks of ``block_size`` query rows (keys 0..end of block only) gives all
    gradients with [block, key_pos] temporaries. The values are used only through
    L = V W_O (logits_i = sum_j alpha_ij L_j, u_i·v_j = g_i·L_j with g = dL/dlogits,
    dL/dv_j = (sum_i alpha_ij g_i) W_O^T), so the [query, key] products are n_classes wide
    rather than d_v; the pattern is formed as exp2 of base-2 scores and normalised only in the
    [block, n_classes] results. Equal to autograd to rounding
    (tests/models/test_single_head.py).

    ``with_routing`` also accumulates, from the same blocks, the sums behind the routing
    telemetry (``routing_sums``; see :func:`single_head_routing_telemetry`). ``with_values=False``
    skips ``d_values`` (the weight gradients do not need it).

    ``n_workers > 1`` splits the replicas into that many contiguous groups and computes them on
    concurrent Python threads (torch ops release the GIL). Pair it with
    ``torch.set_num_threads(1)``: intra-op threads inside each worker would oversubscribe the
    cores, and one synchronisation per step (instead of one per op) degrades gracefully when
    other processes share the machine.

    Shapes: weights maps each of :data:`PARAMETER_NAMES` to [replica, *shape]; x
    [replica or 1, batch, pos, d_x]; targets long [replica or 1, batch, pos].

    Raises:
        ValueError: when shapes do not fit or ``block_size`` or ``n_workers`` is not a positive int.
    """
    owner = "single_head_gradients"
    _check_inputs(owner, weights, x, targets)
    for name, value in (("block_size", block_size), ("n_workers", n_workers)):
        text = check_positive_int(owner, name, value)
        if text:
            raise ValueError(text)
    n_rep = weights["W_Q"].shape[0]
    if n_workers == 1 or n_rep == 1:
        return _gradients(
            weights, x, targets, block_size, with_responsibility, with_routing, with_values
        )

    def part(r: slice) -> SingleHeadGradients:
        sub = {n: w[r] for n, w in weights.items()}
        sub_x = x if x.shape[0] == 1 else x[r]
        sub_y = targets if targets.shape[0] == 1 else targets[r]
        return _gradients(
            sub, sub_x, sub_y, block_size, with_responsibility, with_routing, with_values
        )

    parts = list(_pool(min(n_workers, n_rep)).map(part, _replica_groups(n_rep, n_workers)))
    return SingleHeadGradients(
        loss_nats=torch.cat([p.loss_nats for p in parts]),
        grads={n: torch.cat([p.grads[n] for p in parts]) for n in PARAMETER_NAMES},
        d_values=None if not with_values else torch.cat([p.d_values for p in parts]),
        responsibility=None
        if not with_responsibility
        else torch.cat([p.responsibility for p in parts]),
        n_labelled=parts[0].n_labelled,
        routing_sums=None
        if not with_routing
        else {f: torch.cat([p.routing_sums[f] for p in parts]) for f in _ROUTING_SUMS},
    )


@functools.cache
def _pool(n_workers: int) -> ThreadPoolExecutor:
    # One long-lived pool per size: starting threads every optimiser step cost ~2% of a run.
    return ThreadPoolExecutor(n_workers, thread_name_prefix="single-head")


def _add_routing_sums(
    sums: Dict[str, torch.Tensor],
    e: torch.Tensor,
    b: torch.Tensor,
    row_sum: torch.Tensor,
    inv_sum: torch.Tensor,
    i0: int,
    future: torch.Tensor,
) -> None:
    """Add one block's routing sums; alpha = e * inv_sum and adv = -(b * row_sum).

    Shapes: e, b [rb, block, keys] (b = (u_i·v_j - u_i·z_i) / row_sum_i); row_sum, inv_sum
    [rb, block, 1]; future [block, block], True above the diagonal of the block's own keys.
    """
    abs_b = b.abs()
    abs_b[:, :, i0:].masked_fill_(future, 0.0)  # only causal pairs count
    sums["abs_advantage"].add_((abs_b.sum(-1) * row_sum.squeeze(-1)).sum(-1))
    sums["weighted_abs_advantage"].add_((e * abs_b).sum(dim=[-1, -2]))
    sums["positive_advantage_mass"].add_(
        ((e * (b < 0)).sum(-1) * inv_sum.squeeze(-1)).sum(-1)
    )
    # -sum_j alpha ln alpha = ln row_sum - sum_j e ln e / row_sum
    sums["attention_entropy_nats"].add_(
        (row_sum.squeeze(-1).log() - torch.special.xlogy(e, e).sum(-1) * inv_sum.squeeze(-1)).sum(-1)
    )
    sums["d_scores_sq"].add_((e * b).pow(2).sum(dim=[-1, -2]))


class _Plan:
    """Buffers and per-block views of the gradient pass for one problem shape, kept across calls.

    Every optimiser step runs the pass on the same shapes, so the buffers, and the views of them
    that each block of query rows works on, are made once; a step then issues only the arithmetic
    (about 20 tensor operations per block instead of about 60, which at a few microseconds of
    dispatch each was a fifth of the pass).

    Shapes: rb = replicas * batch; proj_t [rb, 2 d_k + n_classes + 1, pos] holds q2_t and k_t
    [rb, d_k, pos] (base-2 scaled queries, keys) and l_t [rb, n_classes + 1, pos] (values in
    logit space; last row ones); q2 [rb, pos, d_k]; one_hot [rb, pos, n_classes] (the labels
    divided by the number of positions); logits [rb, pos, n_classes]; acc_t
    [rb, 2 d_k + n_classes, pos] holds d_q_t, d_k_t [rb, d_k, pos] and pull_t
    [rb, n_classes, pos].
    """

    def __init__(
        self, rb: int, n_pos: int, d_k: int, n_classes: int, block_size: int, dtype, device
    ) -> None:
        def new(*shape: int) -> torch.Tensor:
            return torch.empty(*shape, dtype=dtype, device=device)

        # the projections q2, k and L, transposed, from one product with the inputs (the last row
        # stays ones: b - E_alpha[b] and the row sums then come from one product each)
        self.proj_t = new(rb, 2 * d_k + n_classes + 1, n_pos)
        self.proj_t[:, -1].fill_(1.0)
        self.q2_t, self.k_t = self.proj_t[:, :d_k], self.proj_t[:, d_k : 2 * d_k]
        self.l_t = self.proj_t[:, 2 * d_k :]
        self.q2 = new(rb, n_pos, d_k)
        self.one_hot, self.logits = new(rb, n_pos, n_classes), new(rb, n_pos, n_classes)
        # dL/dq, dL/dk and alpha^T g, transposed, contracted with the inputs in one product
        self.acc_t = new(rb, 2 * d_k + n_classes, n_pos)
        self.d_q_t, self.d_k_t = self.acc_t[:, :d_k], self.acc_t[:, d_k : 2 * d_k]
        self.pull_t = self.acc_t[:, 2 * d_k :]
        bs = min(block_size, n_pos)
        # Two reused workspaces hold the [rb, block, keys] exponentials and b - E_alpha[b], then
        # dL/ds: fresh tensors of a new size every block would cost a page fault per 4 KiB.
        workspace = new(2, rb * bs * n_pos + _VECTOR_PAD)
        scratch = new(rb * max(d_k, n_classes) * n_pos)
        small = new(4, rb * bs * (n_classes + 1))  # per-block [rb, m, *] results
        future = torch.ones(bs, bs, dtype=torch.bool, device=device).triu(1)
        self.starts: list[int] = []  # first query row of each block
        self.blocks: list[list[torch.Tensor]] = []  # the views of each block, see _block_loop
        for i0 in range(0, n_pos, bs):
            i1 = min(n_pos, i0 + bs)
            m = i1 - i0
            e = workspace[0, : rb * m * i1].view(rb, m, i1)
            both = small[0, : rb * (n_classes + 1) * m].view(rb, n_classes + 1, m)
            inv_sum = small[1, : rb * m].view(rb, m, 1)
            g_scaled = small[2, : rb * m * n_classes].view(rb, m, n_classes)
            neg_mean = small[3, : rb * m].view(rb, m)  # -E_alpha[b] / row_sum, [rb, m]
            d_s = workspace[1, : rb * m * i1].view(rb, m, i1)
            self.starts.append(i0)
            self.blocks.append(
                [
                    self.q2[:, i0:i1],
                    self.k_t[:, :, :i1],
                    e,
                    e[:, :, i0:i1],
                    future[:m, :m],
                    workspace[0, : -(-(rb * m * i1) // _VECTOR_PAD) * _VECTOR_PAD],
                    self.l_t[:, :, :i1],
                    e.transpose(1, 2),
                    both,
                    both[:, n_classes:].transpose(1, 2),  # row sums [rb, m, 1]
                    both[:, :n_classes].transpose(1, 2),  # e L, [rb, m, n_classes]
                    inv_sum,
                    self.logits[:, i0:i1],
                    self.one_hot[:, i0:i1],
                    g_scaled,
                    g_scaled.transpose(1, 2),
                    neg_mean,
                    neg_mean.unsqueeze(-1),
                    self.l_t[:, :n_classes, :i1],
                    d_s,
                    d_s.transpose(1, 2),
                    scratch[: rb * n_classes * i1].view(rb, n_classes, i1),
                    self.pull_t[:, :, :i1],
                    scratch[: rb * d_k * m].view(rb, d_k, m),
                    self.d_q_t[:, :, i0:i1],
                    self.q2_t[:, :, i0:i1],
                    scratch[: rb * d_k * i1].view(rb, d_k, i1),
                    self.d_k_t[:, :, :i1],
                ]
            )


#: Gradient-pass plans of the calling thread, most recently used last (a few shapes at most).
_PLANS = threading.local()
_N_PLANS = 4


def _plan(rb: int, n_pos: int, d_k: int, n_classes: int, block_size: int, dtype, device) -> _Plan:
    key = (rb, n_pos, d_k, n_classes, block_size, dtype, torch.device(device))
    plans = getattr(_PLANS, "plans", None)
    if plans is None:
        plans = _PLANS.plans = OrderedDict()
    if key in plans:
        plans.move_to_end(key)
    else:
        plans[key] = _Plan(rb, n_pos, d_k, n_classes, block_size, dtype, device)
        while len(plans) > _N_PLANS:
            plans.popitem(last=False)
    return plans[key]


def _block_loop(
    blocks: List[List[torch.Tensor]],
    starts: List[int],
    n_lab: float,
    routing: Optional[Dict[str, torch.Tensor]],
    resp: Optional[torch.Tensor],
) -> None:
    """The blocks of query rows of :func:`_gradients`, on the views of a :class:`_Plan`.

    Written for TorchScript (:func:`_loop`): run as a script, the loop dispatches its tensor
    operations without the Python interpreter and without holding the GIL, so that worker
    threads on other replica groups do not wait on each other.
    """
    for n in range(len(blocks)):
        i0 = starts[n]
        v = blocks[n]
        q2_blk, k_t_blk, e, e_diag, future, e_flat, l_t_blk = v[0], v[1], v[2], v[3], v[4], v[5], v[6]
        e_t, both, row_sum, e_l, inv_sum, logits, one_hot = v[7], v[8], v[9], v[10], v[11], v[12], v[13]
        g_scaled, g_scaled_t, neg_mean, neg_mean_col, l_t_c, d_s = v[14], v[15], v[16], v[17], v[18], v[19]
        d_s_t, pull_out, pull_acc, d_q_out, d_q_blk, q2_t_blk = v[20], v[21], v[22], v[23], v[24], v[25]
        d_k_out, d_k_acc = v[26], v[27]
        torch.bmm(q2_blk, k_t_blk, out=e)
        e_diag.masked_fill_(future, float("-inf"))
        e.sub_(e.amax(-1, keepdim=True))
        # softmax numerators, max 1 per row; exp2 over a length that is a multiple of the vector
        # width, so that every element takes the vectorised path (the scalar tail rounds
        # differently, and where the tail falls would depend on the number of replicas)
        e_flat.exp2_()
        # [rb, n_classes + 1, m]: the unnormalised logits (e L)^T and the row sums (e 1)^T
        torch.bmm(l_t_blk, e_t, out=both)
        torch.reciprocal(row_sum, out=inv_sum)  # row sums >= 1
        torch.mul(e_l, inv_sum, out=logits)  # the head's logits alpha L
        g = torch.softmax(logits, -1).div_(n_lab).sub_(one_hot)  # dL/dlogits, [rb, m, n_classes]
        # dL/ds = alpha (b - E_alpha[b]) with b_ij = g_i·L_j and E_alpha[b]_i = g_i·logits_i
        torch.mul(g, inv_sum, out=g_scaled)
        torch.linalg.vecdot(g_scaled, logits, out=neg_mean)
        torch.baddbmm(neg_mean_col, g_scaled, l_t_c, beta=-1.0, out=d_s)
        if i0 == 0:
            d_s[:, 0].zero_()  # query 0 sees key 0 only: b - E_alpha[b] is exactly 0 there
        if routing is not None:
            _add_routing_sums(routing, e, d_s, row_sum, inv_sum, i0, future)
        d_s.mul_(e)
        # (batched matmuls write contiguous blocks, then accumulate into the strided views)
        pull_acc.add_(torch.bmm(g_scaled_t, e, out=pull_out))
        if resp is not None:
            resp[:, : e.shape[-1]].add_(torch.bmm(inv_sum.transpose(1, 2), e).squeeze(1))
        d_q_blk.copy_(torch.bmm(k_t_blk, d_s_t, out=d_q_out))
        d_k_acc.add_(torch.bmm(q2_t_blk, d_s, out=d_k_out))


@functools.cache
def _loop():
    """:func:`_block_loop` compiled by TorchScript once per process (the plain function where
    TorchScript is unavailable; both run the same operations, with the same results)."""
    try:
        with warnings.catch_warnings():
            # recent torch versions mark TorchScript deprecated; the loop falls back without it
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.jit")
            return torch.jit.script(_block_loop)
    except Exception:  # pragma: no cover - TorchScript missing or unable to compile
        return _block_loop


def _gradients(
    weights: dict[str, torch.Tensor],
    x: torch.Tensor,
    targets: torch.Tensor,
    block_size: int,
    with_responsibility: bool,
    with_routing: bool,
    with_values: bool,
) -> SingleHeadGradients:
    w_q, w_k, w_v, w_o = (weights[name] for name in PARAMETER_NAMES)
    n_rep, d_x, d_k = w_q.shape
    d_v, n_classes = w_o.shape[1:]
    batch, n_pos = x.shape[1], x.shape[2]
    rb = n_rep * batch
    n_lab = batch * n_pos
    dtype, device = x.dtype, x.device
    plan = _plan(rb, n_pos, d_k, n_classes, block_size, dtype, device)
    xe = x.expand(n_rep, -1, -1, -1)
    x_rows = xe.reshape(rb, n_pos, d_x)  # [replica * batch, pos, d_x]
    # Scores in base 2: s2 = log2(e) q·k / sqrt(d_k), so that the pattern is exp2(s2 - max)
    # normalised (exp2 is about twice as fast as exp on CPU), and normalised only in the small
    # [block, n_classes] products: alpha = e / row_sum is never formed.
    scale2 = LOG2_E / math.sqrt(d_k)
    # Values enter only through the logits: with L = V W_O (the values in logit space) the
    # head's logits are alpha L, b_ij = u_i·v_j = g_i·L_j with g = dL/dlogits, and
    # dL/dv_j = (alpha^T g)_j W_O^T, so every [query, key] product is n_classes wide, not d_v.
    # [rb, 2 d_k + n_classes, d_x]: W_Q scale2, W_K and W_V W_O side by side, transposed
    w_all_t = torch.cat([w_q * scale2, w_k, w_v @ w_o], -1).transpose(1, 2)
    if batch > 1:
        w_all_t = w_all_t.repeat_interleave(batch, 0)
    # transposed projections keep every bmm's long dimension contiguous (2-4x faster on CPU)
    plan.proj_t[:, :-1].copy_(torch.bmm(w_all_t, x_rows.transpose(1, 2)))
    plan.q2.copy_(plan.q2_t.transpose(1, 2))
    y = targets.expand(n_rep, -1, -1).reshape(rb, n_pos, 1)
    # e_{y_i} / N: dL/dlogits of the mean loss is softmax(logits) / N minus this
    plan.one_hot.zero_().scatter_(-1, y, 1.0 / n_lab)
    plan.acc_t[:, d_k:].zero_()  # d_k_t and pull_t accumulate; d_q_t is written block by block
    resp = torch.zeros(rb, n_pos, dtype=dtype, device=device) if with_responsibility else None
    routing = (
        {f: torch.zeros(rb, dtype=dtype, device=device) for f in _ROUTING_SUMS}
        if with_routing
        else None
    )
    _loop()(plan.blocks, plan.starts, float(n_lab), routing, resp)
    log_p = torch.log_softmax(plan.logits, dim=-1)  # [rb, pos, n_classes]
    loss = -log_p.gather(-1, y).view(n_rep, batch * n_pos).sum(1)
    # [replica, 2 d_k + n_classes, d_x]: (X^T dL/dq)^T, (X^T dL/dk)^T and (X^T alpha^T g)^T
    x_acc = torch.bmm(plan.acc_t, x_rows)
    if batch > 1:
        x_acc = x_acc.view(n_rep, batch, *x_acc.shape[1:]).sum(1)
    x_pull = x_acc[:, 2 * d_k :].transpose(1, 2)  # X^T alpha^T g, [replica, d_x, n_classes]
    w_o_t = w_o.transpose(1, 2)
    grads = {
        "W_Q": x_acc[:, :d_k].transpose(1, 2) * (1.0 / math.sqrt(d_k)),
        "W_K": x_acc[:, d_k : 2 * d_k].transpose(1, 2) * (1.0 / LOG2_E),
        "W_V": x_pull @ w_o_t,
        # dL/dW_O = sum_i z_i^T g_i = V^T (alpha^T g) = W_V^T X^T (alpha^T g)
        "W_O": w_v.transpose(1, 2) @ x_pull,
    }
    d_values = None
    if with_values:
        # dL/dv_j = (sum_i alpha_ij g_i) W_O^T, [replica, batch, pos, d_v]
        pull = plan.pull_t.transpose(1, 2).reshape(n_rep, n_lab, n_classes)
        d_values = (pull @ w_o_t).view(n_rep, batch, n_pos, d_v)
    return SingleHeadGradients(
        loss_nats=loss / n_lab,
        grads=grads,
        d_values=d_values,
        responsibility=None if resp is None else resp.view(n_rep, batch, n_pos),
        n_labelled=n_lab,
        routing_sums=None if routing is None else {f: t.view(n_rep, batch) for f, t in routing.items()},
    )


@torch.no_grad()
def single_head_output(
    weights: dict[str, torch.Tensor], x: torch.Tensor, *, block_size: int = 256
) -> torch.Tensor:
    """The head output z = alpha v without autograd, block by block over query rows.

    Memory stays at [replica, batch, block_size, pos]; logits are ``z @ W_O``.

    Shapes: weights as in :func:`single_head_gradients`; x [replica or 1, batch, pos, d_x] ->
    z [replica, batch, pos, d_v].

    Raises:
        ValueError: when ``x`` does not fit.
    """
    _check_inputs("single_head_output", weights, x, None)
    w = {name: p.unsqueeze(1) for name, p in weights.items()}
    q, k, v = x @ w["W_Q"], x @ w["W_K"], x @ w["W_V"]
    q = q / math.sqrt(q.shape[-1])
    n_pos = x.shape[2]
    z = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
    for i0 in range(0, n_pos, block_size):
        i1 = min(n_pos, i0 + block_size)
        s = q[..., i0:i1, :] @ k[..., :i1, :].transpose(-1, -2)
        allowed = (
            torch.arange(i1, device=x.device) <= torch.arange(i0, i1, device=x.device)[:, None]
        )
        z[..., i0:i1, :] = (
            torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1) @ v[..., :i1, :]
        )
    return z


def _replica_groups(n_replicas: int, n_workers: int) -> list[slice]:
    n_groups = min(n_workers, n_replicas)
    bounds = [round(i * n_replicas / n_groups) for i in range(n_groups + 1)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


@torch.no_grad()
def single_head_telemetry(
    weights: dict[str, torch.Tensor],
    x: torch.Tensor,
    targets: torch.Tensor,
    delta_w_value: torch.Tensor,
    *,
    n_workers: int = 1,
) -> RoutingTelemetry:
    """Routing telemetry (docs/theory.md §8.4) of every replica at ``weights``, for one optimiser step.

    Rebuilds q, k, v and u = dL/dz of the mean CE from the weights, and compares each value's
    realised change Delta v_j = x_j Delta W_V with its pull -dL/dv_j; see
    :func:`windtunnel.telemetry.causal_routing_telemetry`. Replica groups run on ``n_workers``
    threads.

    Shapes: weights {name: [replica, *shape]}; x [replica, batch, pos, d_x]; targets long
    [replica, batch, pos]; delta_w_value [replica, d_x, d_v]. Fields of the result are
    [replica, batch].
    """

    def part(r: slice) -> RoutingTelemetry:
        w = {n: t[r].unsqueeze(1) for n, t in weights.items()}
        q, k, v = (x[r] @ w[n] for n in ("W_Q", "W_K", "W_V"))
        z = single_head_output({n: t[r] for n, t in weights.items()}, x[r])
        one_hot = torch.nn.functional.one_hot(targets[r], w["W_O"].shape[-1]).to(z)
        d_logits = (torch.softmax(z @ w["W_O"], -1) - one_hot) / (x.shape[1] * x.shape[2])
        u = d_logits @ w["W_O"].transpose(-1, -2)  # dL/dz of the mean loss
        return causal_routing_telemetry(q, k, v, u, x[r] @ delta_w_value[r].unsqueeze(1))

    parts = list(
        _pool(min(n_workers, x.shape[0])).map(part, _replica_groups(x.shape[0], n_workers))
    )
    return RoutingTelemetry(
        **{
            f: torch.cat([getattr(p, f) for p in parts])
            for f in RoutingTelemetry.__dataclass_fields__
        }
    )


@torch.no_grad()
def single_head_routing_telemetry(
    grads: SingleHeadGradients, x: torch.Tensor, delta_w_value: torch.Tensor
) -> RoutingTelemetry:
    """The routing telemetry of :func:`single_head_telemetry`, from a gradient pass that took it.

    ``grads`` must come from :func:`single_head_gradients` with ``with_routing=True`` and
    ``with_responsibility=True`` at the weights before the step; the pairwise sums then cost no
    second pass over the [query, key] pairs. Equal to :func:`single_head_telemetry` to rounding
    (tests/models/test_single_head.py).

    Shapes: x [replica or 1, batch, pos, d_x]; delta_w_value [replica, d_x, d_v]. Fields of the
    result are [replica, batch].

    Raises:
        ValueError: when ``grads`` lacks the routing sums or the responsibilities.
    """
    if grads.routing_sums is None or grads.responsibility is None:
        raise ValueError(
            "single_head_routing_telemetry.grads must come from single_head_gradients with "
            "with_routing=True and with_responsibility=True; got a pass without them."
        )
    sums, n_pos = grads.routing_sums, x.shape[2]
    delta_values = x @ delta_w_value.unsqueeze(1)  # [replica, batch, pos, d_v]
    cos = torch.nn.functional.cosine_similarity(delta_values, -grads.d_values, dim=-1, eps=1e-30)
    resp = grads.responsibility
    return RoutingTelemetry(
        mean_abs_advantage=sums["abs_advantage"] / (n_pos * (n_pos + 1) / 2),
        weighted_abs_advantage=sums["weighted_abs_advantage"] / n_pos,
        positive_advantage_mass=sums["positive_advantage_mass"] / n_pos,
        attention_entropy_nats=sums["attention_entropy_nats"] / n_pos,
        d_scores_norm=sums["d_scores_sq"].sqrt(),
        value_specialization=cos.mean(-1),
        responsibility_weighted_specialization=(cos * resp).sum(-1) / resp.sum(-1),
    )


def single_head_law_residual(
    weights: dict[str, torch.Tensor],
    x: torch.Tensor,
    targets: torch.Tensor,
    *,
    replica: int,
    n_pos: int,
) -> float:
    """The advantage law against autograd for one replica on its first ``n_pos`` positions.

    See :func:`windtunnel.telemetry.routing_law_residual` (float64, relative max error).
    """
    xs = x[replica, :, :n_pos]
    q, k, v = (xs @ weights[n][replica] for n in ("W_Q", "W_K", "W_V"))
    return routing_law_residual(q, k, v, weights["W_O"][replica], targets[replica, :, :n_pos])


class SingleHeadAttention(nn.Module):
    """A batch of independent single attention heads with a linear readout (docs/theory.md §4.2).

    logits = softmax_causal(x W_Q (x W_K)^T / sqrt(d_k)) (x W_V) W_O, one set of weights per
    replica. Weights are used as x @ W, so W_Q is [d_x, d_k] per replica.

    Args:
        config: shapes and init scale.
        n_replicas: independent copies along the leading dimension of every weight.
        dtype: parameter dtype (float32 for reference runs, float64 for exactness checks).
        device: parameter device.
    """

    def __init__(
        self,
        config: SingleHeadConfig | None = None,
        *,
        n_replicas: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        text = check_positive_int("SingleHeadAttention", "n_replicas", n_replicas)
        if text:
            raise ValueError(text)
        self.config = config or SingleHeadConfig()
        self.n_replicas = n_replicas
        for name, shape in self.config.parameter_shapes().items():
            setattr(
                self,
                name,
                nn.Parameter(torch.zeros(n_replicas, *shape, dtype=dtype, device=device)),
            )

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        """The parameters by name, in the reference draw order."""
        return {name: getattr(self, name) for name in PARAMETER_NAMES}

    @torch.no_grad()
    def reset_parameters(
        self, generator: torch.Generator, *, replicas: slice | None = None
    ) -> None:
        """Draw every weight i.i.d. N(0, init_std^2), replica by replica, in reference order.

        For each replica in turn: W_Q, W_K, W_V, W_O, each as ``randn(shape) * init_std`` from
        ``generator``. A CPU generator seeded s therefore gives one replica exactly the reference
        initialisation of seed s (RNG step 5 of docs/theory.md §4.1).

        Args:
            generator: the source of randomness.
            replicas: which replicas to draw (all by default).

        Raises:
            TypeError: when ``generator`` is not a torch.Generator.
        """
        check_generator("SingleHeadAttention.reset_parameters", generator, optional=False)
        indices = range(self.n_replicas)[replicas or slice(None)]
        for r in indices:
            for name, shape in self.config.parameter_shapes().items():
                draw = torch.randn(shape, generator=generator, device=generator.device)
                getattr(self, name)[r] = (draw * self.config.init_std).to(getattr(self, name))

    def forward(self, x: torch.Tensor) -> SingleHeadForward:
        """Run every replica on ``x`` with autograd; see :class:`SingleHeadForward`.

        Shapes: x [replica or 1, batch, pos, d_x].

        Raises:
            ValueError: when ``x`` does not fit.
        """
        _check_inputs("SingleHeadAttention.forward", self.weights, x, None)
        w = {name: p.unsqueeze(1) for name, p in self.weights.items()}  # broadcast over batch
        q, k, v = x @ w["W_Q"], x @ w["W_K"], x @ w["W_V"]
        n_pos = x.shape[2]
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.config.d_k)
        causal = torch.ones(n_pos, n_pos, dtype=torch.bool, device=x.device).tril()
        pattern = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        z = pattern @ v
        return SingleHeadForward(q=q, k=k, v=v, pattern=pattern, z=z, logits=z @ w["W_O"])

    def head_output(self, x: torch.Tensor, *, block_size: int = 256) -> torch.Tensor:
        """The head output z = alpha v without autograd; see :func:`single_head_output`."""
        return single_head_output(
            {n: p.detach() for n, p in self.weights.items()}, x, block_size=block_size
        )

    @torch.no_grad()
    def predict_logits(self, x: torch.Tensor, *, block_size: int = 256) -> torch.Tensor:
        """Logits z W_O without autograd, [replica, batch, pos, n_classes]; see :meth:`head_output`."""
        return self.head_output(x, block_size=block_size) @ self.W_O.detach().unsqueeze(1)

    def exact_gradients(
        self,
        x: torch.Tensor,
        targets: torch.Tensor,
        *,
        block_size: int = 64,
        with_responsibility: bool = False,
        with_routing: bool = False,
        with_values: bool = True,
        n_workers: int = 1,
    ) -> SingleHeadGradients:
        """Closed-form gradients of each replica's mean CE; see :func:`single_head_gradients`."""
        with torch.no_grad():
            return single_head_gradients(
                {n: p.detach() for n, p in self.weights.items()},
                x,
                targets,
                block_size=block_size,
                with_responsibility=with_responsibility,
                with_routing=with_routing,
                with_values=with_values,
                n_workers=n_workers,
            )
