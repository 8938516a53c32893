"""The attention-site protocol: what one softmax attention layer exposes to the routing law.

An :class:`AttentionSite` holds, for one attention layer and one forward pass, the tensors of the
gradient calculus of arXiv 2512.22473 exactly as the model's softmax used them: queries (after
any rotary embedding), keys and values (per key-value head under grouped-query attention), the
boolean "may attend" mask, the score scale, the pattern, the head output z before the output
projection and, after ``backward()``, u = dL/dz. :func:`routing_law` feeds a site to
:func:`windtunnel.dynamics.attention_gradients`; :func:`check_law` and
:func:`model_gradient_errors` compare the closed forms with autograd. The adapters (TinyGPT,
Hugging Face, TransformerLens) fill sites through :class:`SiteRecording`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from windtunnel._checks import Problems, describe_tensor
from windtunnel.dynamics import AttentionGradients, LawCheck, attention_gradients, masked_softmax
from windtunnel.dynamics import check_law as _check_head_law

__all__ = [
    "AttentionSite",
    "SiteLaw",
    "SiteRecording",
    "TokenKeys",
    "ValueProjection",
    "check_law",
    "model_gradient_errors",
    "routing_law",
]

_GRAD_NAMES = ("q", "k", "v", "z", "scores")


@dataclass(frozen=True, eq=False)
class AttentionSite:
    """One attention layer of one forward pass, as its softmax saw it (arXiv 2512.22473).

    For query head h with key-value head c = kv_head_of[h]: s_ij = scale * q_i·k_j on the allowed
    keys (``mask``), a_ij = softmax_j(s_ij) (0 elsewhere; a row with no allowed key is all 0),
    z_i = sum_j a_ij v_j, and u_i = dL/dz_i, the gradient of the loss at the head output before
    the output projection. Under grouped-query attention several query heads share one key-value
    head; :meth:`expand_kv` gives k and v per query head.

    Shapes (TransformerLens layout; ``head`` counts query heads, ``kv_head`` key-value heads):
    q [batch, query_pos, head, d_head]; k [batch, key_pos, kv_head, d_head];
    v [batch, key_pos, kv_head, d_v]; mask bool [batch or 1, head or 1, query_pos, key_pos],
    True = may attend; pattern [batch, head, query_pos, key_pos]; z and u
    [batch, query_pos, head, d_v]. Gradients have the shape of their tensor.

    Attributes:
        name: the attention module's path in the model, e.g. ``"blocks.0.attn"`` or
            ``"model.layers.0.self_attn"``.
        layer: the model's index of this layer (its position among the recorded layers where the
            model has no index of its own).
        q, k, v: queries, keys and values exactly as the scores were built from them (after any
            bias, rotary embedding or normalisation), detached.
        mask: the allowed set the model used (causal, padding, sliding window).
        scale: the score scale (1/sqrt(d_head) unless the model says otherwise).
        pattern: the model's attention pattern; where the model does not materialise it (fused
            kernels) it is computed from q, k, mask and scale.
        z: the head outputs before the output projection, detached.
        kv_head_of: for each query head, the index of its key-value head.
        dropout: the attention-dropout probability in force during the pass (0 in eval mode).
        z_grad: u = dL/dz after a backward pass, else None (read it through :attr:`u`).
        q_grad, k_grad, v_grad: autograd's gradients at q, k, v (each summed over every use of the
            tensor in the model), or None before a backward pass.
        scores_grad: autograd's gradient at the model's own score tensor
            [batch, head, query_pos, key_pos], where the model has one (TinyGPT, TransformerLens);
            None for fused kernels.
        u_missing: why ``z_grad`` is None, used in the error of :attr:`u`.

    Raises:
        ValueError: listing every shape, dtype or index that does not fit the layout above.
    """

    name: str
    layer: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor
    scale: float
    pattern: torch.Tensor
    z: torch.Tensor
    kv_head_of: tuple[int, ...]
    dropout: float = 0.0
    z_grad: torch.Tensor | None = None
    q_grad: torch.Tensor | None = None
    k_grad: torch.Tensor | None = None
    v_grad: torch.Tensor | None = None
    scores_grad: torch.Tensor | None = None
    u_missing: str = "no backward pass has been run."

    def __post_init__(self) -> None:
        problems = Problems(f"AttentionSite({self.name!r})")
        tensors = {"q": self.q, "k": self.k, "v": self.v, "z": self.z, "pattern": self.pattern}
        bad = [n for n, t in tensors.items() if not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() == 4)]
        for n in bad:
            problems.add(n, "a floating-point 4-D tensor", describe_tensor(tensors[n]))
        if not bad:
            batch, t_q, heads, d_head = self.q.shape
            t_k, kv_heads = self.k.shape[1], self.k.shape[2]
            d_v = self.v.shape[-1]
            expected = {
                "k": (batch, t_k, kv_heads, d_head),
                "v": (batch, t_k, kv_heads, d_v),
                "z": (batch, t_q, heads, d_v),
                "pattern": (batch, heads, t_q, t_k),
                "z_grad": (batch, t_q, heads, d_v),
                "q_grad": tuple(self.q.shape),
                "k_grad": (batch, t_k, kv_heads, d_head),
                "v_grad": (batch, t_k, kv_heads, d_v),
                "scores_grad": (batch, heads, t_q, t_k),
            }
            for n, shape in expected.items():
                t = getattr(self, n)
                if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != shape):
                    problems.add(n, f"a tensor of shape {list(shape)}", describe_tensor(t))
            ok_mask = (
                isinstance(self.mask, torch.Tensor)
                and self.mask.dtype == torch.bool
                and self.mask.dim() == 4
                and self.mask.shape[0] in (1, batch)
                and self.mask.shape[1] in (1, heads)
                and tuple(self.mask.shape[2:]) == (t_q, t_k)
            )
            if not ok_mask:
                problems.add(
                    "mask",
                    f"bool [batch or 1, head or 1, query_pos, key_pos] = [{batch} or 1, {heads} or 1, {t_q}, {t_k}]",
                    describe_tensor(self.mask),
                )
            kv = self.kv_head_of
            if not (
                isinstance(kv, tuple)
                and len(kv) == heads
                and all(isinstance(c, int) and 0 <= c < kv_heads for c in kv)
            ):
                problems.add("kv_head_of", f"a tuple of {heads} ints in [0, {kv_heads})", kv)
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale):
            problems.add("scale", "a finite number", self.scale)
        problems.raise_if_any()

    @property
    def n_heads(self) -> int:
        """Number of query heads."""
        return self.q.shape[2]

    @property
    def n_kv_heads(self) -> int:
        """Number of key-value heads (``n_heads`` without grouped-query attention)."""
        return self.k.shape[2]

    @property
    def u(self) -> torch.Tensor:
        """u = dL/dz [batch, query_pos, head, d_v], the upstream gradient of arXiv 2512.22473.

        Raises:
            ValueError: when no gradient reached z: the forward ran under ``torch.no_grad()`` or
                inference mode, nothing upstream of z required grad, or no ``backward()`` has run.
        """
        if self.z_grad is None:
            raise ValueError(f"AttentionSite {self.name!r} (layer {self.layer}) has no u = dL/dz: {self.u_missing}")
        return self.z_grad

    def expand_kv(self, x: torch.Tensor) -> torch.Tensor:
        """Per-key-value-head tensor [batch, pos, kv_head, d] -> per query head [batch, pos, head, d].

        Query head h reads key-value head ``kv_head_of[h]``; without grouped-query attention this
        is the identity map.

        Raises:
            ValueError: when ``x`` is not [batch, pos, kv_head, d].
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[2] != self.n_kv_heads:
            raise ValueError(
                f"AttentionSite.expand_kv: x must be [batch, pos, kv_head={self.n_kv_heads}, d]; "
                f"got {describe_tensor(x)}."
            )
        if self.kv_head_of == tuple(range(self.n_kv_heads)):
            return x
        index = torch.tensor(self.kv_head_of, device=x.device)
        return x.index_select(2, index)

    def sum_to_kv(self, x: torch.Tensor) -> torch.Tensor:
        """Per query head [batch, pos, head, d] -> per key-value head, summing the query heads that
        share a key-value head (the adjoint of :meth:`expand_kv`)."""
        if self.kv_head_of == tuple(range(self.n_kv_heads)):
            return x
        out = x.new_zeros(x.shape[0], x.shape[1], self.n_kv_heads, x.shape[3])
        index = torch.tensor(self.kv_head_of, device=x.device)
        return out.index_add_(2, index, x)


@dataclass(frozen=True)
class SiteLaw:
    """The routing law of every head of one site (arXiv 2512.22473).

    Attributes:
        heads: :class:`windtunnel.dynamics.AttentionGradients` per query head, in the layout of
            ``dynamics`` ([batch, head, query_pos, ...]; k and v expanded to query heads, so its
            ``d_keys``/``d_values`` are per query head).
        d_queries: dL/dq [batch, query_pos, head, d_head], the layout of ``site.q``.
        d_keys: dL/dk [batch, key_pos, kv_head, d_head], summed over the query heads that share
            each key-value head (the layout of ``site.k``).
        d_values: dL/dv = A^T U [batch, key_pos, kv_head, d_v], summed likewise.
    """

    heads: AttentionGradients
    d_queries: torch.Tensor
    d_keys: torch.Tensor
    d_values: torch.Tensor

    @property
    def d_scores(self) -> torch.Tensor:
        """dL/ds_ij = a_ij (b_ij - E_{a_i}[b]) [batch, head, query_pos, key_pos]."""
        return self.heads.d_scores

    @property
    def advantage(self) -> torch.Tensor:
        """Descent advantage E_{a_i}[b] - b_ij [batch, head, query_pos, key_pos], 0 off the mask."""
        return self.heads.advantage


@dataclass(frozen=True)
class TokenKeys:
    """Layer l's key map applied to token embeddings, without positions (docs/theory.md §8.1).

    Attributes:
        normed_embeddings: n_l(W_E[x]), the layer's pre-attention norm (with its gain) of each
            token's embedding, [n_tokens, d_model].
        w_key: the layer's key projection in TransformerLens layout [head, d_model, d_head]
            (per key-value head under grouped-query attention); key biases are left out.
        embeddings: W_E[x] itself, before the norm, [n_tokens, d_model] (the same for every
            layer), or None where the adapter does not give it.
    """

    normed_embeddings: torch.Tensor
    w_key: torch.Tensor
    embeddings: torch.Tensor | None = None


@dataclass(frozen=True)
class ValueProjection:
    """Layer l's value projection v = x W_V + b_V, per (key-value) head.

    Attributes:
        name: the attention module's path, e.g. ``"blocks.0.attn"``.
        weight: the parameter W_V [head, d_model, d_v] (the model's own, not a copy).
        bias: the parameter b_V [head, d_v], or None.
        values: the module whose forward output is v [batch, pos, head, d_v] (a hook point).
        inputs: the module whose forward call receives x [batch, pos, d_model].
        input_of: picks x out of that call's (args, kwargs).
    """

    name: str
    weight: nn.Parameter
    bias: nn.Parameter | None
    values: nn.Module
    inputs: nn.Module
    input_of: Callable[[tuple, dict], torch.Tensor]


def _head_tensors(site: AttentionSite, dtype: torch.dtype | None, owner: str) -> tuple[torch.Tensor, ...]:
    if not isinstance(site, AttentionSite):
        raise TypeError(f"{owner}: site must be an AttentionSite; got {type(site).__name__}.")
    if site.dropout > 0:
        raise ValueError(
            f"{owner}: site {site.name!r} ran with attention dropout p={site.dropout}, so its pattern "
            "is not softmax(scale·q·k); record in eval mode (model.eval()) for the routing law."
        )
    u = site.u

    def head_major(x: torch.Tensor) -> torch.Tensor:  # [batch, pos, head, d] -> [batch, head, pos, d]
        x = x.transpose(1, 2)
        return x if dtype is None else x.to(dtype)

    return (
        head_major(site.q),
        head_major(site.expand_kv(site.k)),
        head_major(site.expand_kv(site.v)),
        head_major(u),
    )


def routing_law(site: AttentionSite, *, dtype: torch.dtype | None = None) -> SiteLaw:
    """Closed-form gradients of every head of ``site`` from :func:`dynamics.attention_gradients`.

    With b_ij = u_i·v_j: dL/ds_ij = a_ij (b_ij - E_{a_i}[b]), dL/dv_j = sum_i a_ij u_i,
    dL/dq_i = scale sum_j dL/ds_ij k_j, dL/dk_j = scale sum_i dL/ds_ij q_i (the first two are
    arXiv 2512.22473's boxed equations; the query and key gradients follow by the chain rule). Keys and values of a grouped-query layer are expanded to query heads; the
    gradient of a key-value head is the sum over the query heads that read it.

    Args:
        site: a recorded site whose backward pass has run.
        dtype: compute in this dtype (e.g. ``torch.float64``); None keeps the site's dtype.

    Raises:
        ValueError: when the site has no u (see :attr:`AttentionSite.u`) or ran with attention
            dropout.
    """
    q, k, v, u = _head_tensors(site, dtype, "routing_law")
    heads = attention_gradients(q, k, v, u, mask=site.mask, scale=site.scale)
    return SiteLaw(
        heads=heads,
        d_queries=heads.d_queries.transpose(1, 2),
        d_keys=site.sum_to_kv(heads.d_keys.transpose(1, 2)),
        d_values=site.sum_to_kv(heads.d_values.transpose(1, 2)),
    )


def check_law(site: AttentionSite, *, dtype: torch.dtype | None = torch.float64) -> LawCheck:
    """Score-level check: the closed forms of :func:`routing_law` against an autograd rebuild.

    :func:`windtunnel.dynamics.check_law` rebuilds each head from the site's q, k, v, mask and
    scale and differentiates sum_i u_i·z_i, comparing the pattern, the output, dL/ds, dL/dq, dL/dk
    and dL/dv (errors relative to the magnitude of each formula's summands). Runs in float64 by
    default; pass ``dtype=None`` for the site's own dtype.

    Raises:
        ValueError: as :func:`routing_law`.
    """
    q, k, v, u = _head_tensors(site, dtype, "check_law")
    return _check_head_law(q, k, v, u, mask=site.mask, scale=site.scale)


def _rel_error(closed: torch.Tensor, reference: torch.Tensor) -> float:
    closed, reference = closed.double(), reference.double()
    scale = float(reference.abs().max()) if reference.numel() else 0.0
    err = float((closed - reference).abs().max()) if reference.numel() else 0.0
    return err / scale if scale > 0 else err


def model_gradient_errors(site: AttentionSite, law: SiteLaw | None = None) -> dict[str, float]:
    """Relative errors of the closed forms against the gradients the model's own backward left.

    For each of ``d_queries``, ``d_keys``, ``d_values`` (and ``d_scores`` where the model has a
    score tensor): max |closed - autograd| / max |autograd| over the whole layer (the plain
    error where autograd's gradient is 0). The law is computed in float64 unless given.

    Raises:
        ValueError: when the site holds no q/k/v gradient (record with a backward pass), or as
            :func:`routing_law`.
    """
    if law is None:
        law = routing_law(site, dtype=torch.float64)
    pairs = {"d_queries": site.q_grad, "d_keys": site.k_grad, "d_values": site.v_grad}
    missing = [name for name, grad in pairs.items() if grad is None]
    if missing:
        raise ValueError(
            f"model_gradient_errors: site {site.name!r} holds no autograd gradient for {missing}; "
            "run loss.backward() inside the record_sites block."
        )
    errors = {name: _rel_error(getattr(law, name), grad) for name, grad in pairs.items()}
    if site.scores_grad is not None:
        errors["d_scores"] = _rel_error(law.d_scores, site.scores_grad)
    return errors


# ----------------------------------------------------------------------------- recording


@dataclass(eq=False)
class _RawSite:
    """Mutable record an adapter fills during a forward pass; gradients arrive during backward."""

    name: str
    layer: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor
    scale: float
    pattern: torch.Tensor
    z: torch.Tensor
    kv_head_of: tuple[int, ...]
    dropout: float = 0.0
    grads: dict[str, torch.Tensor] = field(default_factory=dict)
    u_missing: str = "no backward pass has reached this layer yet; call loss.backward() first."


class SiteRecording:
    """The sites of one forward pass (and its backward), filled by :func:`record_sites`.

    ``recording.sites`` is a tuple of :class:`AttentionSite` in the order the layers ran, built
    when read, so read it after ``backward()`` to get u. ``len``, indexing and iteration go
    through it.
    """

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self._raw: list[_RawSite] = []
        self._names: set[str] = set()

    # --- used by adapters

    def _add(
        self,
        raw: _RawSite,
        tensors: dict[str, torch.Tensor | None],
        *,
        layouts: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
        grads: bool = True,
    ) -> None:
        """Store one layer's record; register gradient hooks on the live ``tensors`` (q, k, v, z,
        scores: the model's own, undetached) when grad mode is on. ``layouts[key]`` maps a
        gradient to the site's layout (e.g. a transpose)."""
        if raw.name in self._names:
            raise RuntimeError(
                f"record_sites: {self.model_name} layer {raw.name!r} ran twice in one record_sites "
                "block; run one forward pass (and one backward) per block."
            )
        self._names.add(raw.name)
        self._raw.append(raw)
        if not grads:
            raw.u_missing = "it was recorded with record_sites(..., grads=False)."
            return
        if not torch.is_grad_enabled():
            raw.u_missing = (
                "the forward pass ran with grad mode disabled (torch.no_grad() or inference mode); "
                "run it with gradients enabled and call loss.backward()."
            )
            return
        if not tensors["z"].requires_grad:
            raw.u_missing = (
                "the head output does not require grad (no parameter or input upstream of it "
                "requires grad), so no gradient can reach it."
            )
            return
        for key, tensor in tensors.items():
            if tensor is not None and tensor.requires_grad:
                tensor.register_hook(_grad_catcher(raw, key, (layouts or {}).get(key)))

    # --- public

    @property
    def sites(self) -> tuple[AttentionSite, ...]:
        """Every recorded layer as an :class:`AttentionSite`, in the order the layers ran."""
        return tuple(_build(raw) for raw in self._raw)

    def __len__(self) -> int:
        return len(self._raw)

    def __getitem__(self, index: int) -> AttentionSite:
        return _build(self._raw[index])

    def __iter__(self):
        return iter(self.sites)

    def __repr__(self) -> str:
        return f"SiteRecording({self.model_name}, {[raw.name for raw in self._raw]})"


def _grad_catcher(raw: _RawSite, key: str, layout: Callable[[torch.Tensor], torch.Tensor] | None):
    def hook(grad: torch.Tensor) -> None:
        grad = grad if layout is None else layout(grad)
        if key in raw.grads:  # a second backward through the same graph accumulates, like .grad
            raw.grads[key] = raw.grads[key] + grad.detach()
        else:
            raw.grads[key] = grad.detach()

    return hook


def _build(raw: _RawSite) -> AttentionSite:
    return AttentionSite(
        name=raw.name,
        layer=raw.layer,
        q=raw.q,
        k=raw.k,
        v=raw.v,
        mask=raw.mask,
        scale=raw.scale,
        pattern=raw.pattern,
        z=raw.z,
        kv_head_of=raw.kv_head_of,
        dropout=raw.dropout,
        z_grad=raw.grads.get("z"),
        q_grad=raw.grads.get("q"),
        k_grad=raw.grads.get("k"),
        v_grad=raw.grads.get("v"),
        scores_grad=raw.grads.get("scores"),
        u_missing=raw.u_missing,
    )


# ----------------------------------------------------------------------------- adapter helpers


def causal_violation(mask: torch.Tensor) -> bool:
    """True when some query may attend to a later key (keys aligned to the end of the queries,
    as with a key-value cache): mask [..., query_pos, key_pos]."""
    t_q, t_k = mask.shape[-2:]
    later = torch.ones(t_q, t_k, dtype=torch.bool, device=mask.device).triu(diagonal=t_k - t_q + 1)
    return bool((mask & later).any())


def non_causal_error(model_name: str, name: str) -> ValueError:
    return ValueError(
        f"record_sites: {model_name} layer {name!r} lets queries attend to later keys (no causal "
        "mask); the next-token sites of the wind tunnels need causal attention. Pass "
        "causal_only=False to record bidirectional attention (the routing law holds for any mask)."
    )


def law_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance for "the model computed softmax(scale·q·k)·v": rounding, not a bias.

    Never below float32's rounding, since many kernels take the softmax in float32 whatever the
    model's dtype (Llama's eager attention does); a bias, cap or sink changes the pattern by far more.
    """
    eps = max(torch.finfo(dtype).eps, torch.finfo(torch.float32).eps)
    return min(1e3 * eps, 0.05)


def check_plain_softmax(
    model_name: str,
    name: str,
    *,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    z: torch.Tensor | None,
    scores: torch.Tensor | None = None,
    pattern: torch.Tensor | None = None,
) -> torch.Tensor:
    """Check that the layer computed plain softmax attention; return the pattern it implies.

    Recomputes a = masked_softmax(scale·q·k, mask) (k, v already per query head,
    [batch, head, pos, d]) and compares the model's scores (on allowed keys), pattern and output z
    [batch, head, query_pos, d_v] with it, so an additive bias (ALiBi, relative positions),
    soft-capping, attention sinks or a query transform after the recorded q is one clear error.
    """
    with torch.no_grad():
        raw = scale * (q @ k.transpose(-1, -2))
        computed = masked_softmax(raw, mask)
        tol = law_tolerance(q.dtype)
        allowed = mask.expand_as(raw)
        # a row with no allowed key (a padding query) is implementation-defined: eager kernels
        # spread it uniformly, fused ones return 0; the law sets it to 0 and it is not compared
        live = allowed.any(-1, keepdim=True)  # [batch, head, query_pos, 1]
        problems = []
        if scores is not None and bool(allowed.any()):
            size = float(raw.abs().max())
            gap = float((scores - raw).abs()[allowed].max())
            if gap > tol * max(size, 1.0):
                problems.append(f"its scores differ from scale·q·k by {gap:.3g}")
        if pattern is not None and bool(live.any()):
            if float(torch.where(live, pattern - computed, 0.0).abs().max()) > tol:
                problems.append("its pattern is not softmax(scale·q·k) over the mask")
        if z is not None and z.numel():
            out = computed @ v
            size = float((computed @ v.abs()).max())
            if float(torch.where(live, z - out, 0.0).abs().max()) > tol * max(size, 1e-30):
                problems.append("its output is not pattern·v")
    if problems:
        raise ValueError(
            f"record_sites: {model_name} layer {name!r} is not plain softmax attention over the "
            f"recorded q, k, v ({'; '.join(problems)}): an additive score bias (ALiBi, relative "
            "positions), soft-capping, attention sinks or a transform of q/k after the recorded "
            "tensors is outside the routing law of arXiv 2512.22473."
        )
    return computed


def describe_model(model: Any) -> str:
    cls = type(model)
    return f"{cls.__name__} ({cls.__module__})"


def _is_index(value: Any, size: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < size


def ablation_heads_by_layer(
    owner: str, n_layers: int, n_heads: int, *, heads: list, bypass: list, zero_attn_out: list, zero_mlp_out: list
) -> dict[int, list[int]]:
    """Check the indices of an ablation (worded as TinyGPT.ablated words it) and group ``heads`` by
    layer: {layer: [head, ...]}.

    Raises:
        ValueError: listing every layer or head index out of range.
    """
    problems = Problems(owner)
    for name, layers in (("bypass", bypass), ("zero_attn_out", zero_attn_out), ("zero_mlp_out", zero_mlp_out)):
        bad = [layer for layer in layers if not _is_index(layer, n_layers)]
        if bad:
            problems.add(name, f"layer indices in [0, {n_layers})", bad)
    bad_heads = [
        p
        for p in heads
        if not (isinstance(p, (tuple, list)) and len(p) == 2 and _is_index(p[0], n_layers) and _is_index(p[1], n_heads))
    ]
    if bad_heads:
        problems.add("heads", f"(layer, head) pairs in [0, {n_layers}) x [0, {n_heads})", bad_heads)
    problems.raise_if_any()
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    return by_layer
