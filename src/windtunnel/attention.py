"""Instrumented multi-head causal self-attention with an eager softmax path (docs/theory.md §2.1, §6.1).

Every quantity of the gradient calculus is exposed at a hook point: queries, keys, values, the
scaled scores S, the pattern A and the per-head output G (``hook_z``), whose recorded gradient
``hook_z_grad`` is the upstream gradient u taken before the output projection W_O (docs/theory.md §2.2,
"multi-head"). A per-head multiplier on the pattern supports head ablation (docs/theory.md §8.5).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from windtunnel._checks import Problems, check_mask, check_positive_int, describe_tensor
from windtunnel.dynamics import masked_softmax
from windtunnel.hooks import HookPoint

__all__ = ["MultiHeadAttention", "init_normal_"]


class MultiHeadAttention(nn.Module):
    """Multi-head causal self-attention, computed eagerly so that every head can be read.

    For head h with W_Q[h], W_K[h] of shape [d_model, d_head]:
    q_i = x_i W_Q[h] (+ b_Q[h]), k_j, v_j likewise, s_ij = scale * q_i·k_j on the allowed set M(i)
    (causal j <= i, intersected with ``mask``), a_ij = softmax over M(i), 0 elsewhere;
    z_i = m_h * sum_j a_ij v_j with the head multiplier m_h (default 1); and
    out_i = sum_h z_i^(h) W_O[h] (+ b_O). The default scale is 1/sqrt(d_head).
    The output equals ``torch.nn.functional.scaled_dot_product_attention`` followed by the output
    projection, up to rounding.

    Hooks (TransformerLens names and layouts):
        hook_q, hook_k, hook_v: [batch, pos, head, d_head].
        hook_attn_scores: scaled scores [batch, head, query_pos, key_pos], -inf off M(i).
        hook_pattern: the pattern actually used, [batch, head, query_pos, key_pos]; rows sum to 1
            over M(i) (to m_h under a head multiplier, 0 for rows with empty M(i)).
        hook_z: per-head output before W_O, [batch, pos, head, d_head]. Its gradient
            ``hook_z_grad`` is u^(h)_i = dL/dg^(h)_i of docs/theory.md §2.2.

    Parameters (TransformerLens layout): W_Q, W_K, W_V [head, d_model, d_head];
    W_O [head, d_head, d_model]; with ``bias=True`` also b_Q, b_K, b_V [head, d_head] and
    b_O [d_model].

    Args:
        d_model: width of the residual stream.
        n_heads: number of heads.
        d_head: width of each head; None for d_model // n_heads (then n_heads must divide d_model).
        bias: add biases to the four projections.
        causal: restrict each query to keys at its own or earlier positions.
        scale: score scale; None for 1/sqrt(d_head).
        generator: initialises the weights N(0, 0.02) (biases 0); None leaves every parameter 0,
            for a parent that calls :meth:`reset_parameters` itself or a state dict to be loaded.

    Raises:
        ValueError: naming the argument when a size or the scale is invalid.
    """

    head_multiplier: torch.Tensor | None

    def __init__(
        self,
        *,
        d_model: int,
        n_heads: int,
        d_head: int | None = None,
        bias: bool = False,
        causal: bool = True,
        scale: float | None = None,
        generator: torch.Generator | None,
    ) -> None:
        super().__init__()
        problems = Problems("MultiHeadAttention")
        for field, value in (("d_model", d_model), ("n_heads", n_heads)):
            if (text := check_positive_int("MultiHeadAttention", field, value)) is not None:
                problems.add_text(text)
        if d_head is not None:
            if (text := check_positive_int("MultiHeadAttention", "d_head", d_head)) is not None:
                problems.add_text(text)
        elif not problems.items and d_model % n_heads != 0:
            problems.add_text(
                f"MultiHeadAttention.n_heads must divide d_model when d_head is None; "
                f"got n_heads={n_heads}, d_model={d_model}."
            )
        if scale is not None and (
            isinstance(scale, bool)
            or not isinstance(scale, (int, float))
            or not math.isfinite(scale)
            or scale <= 0
        ):
            problems.add("scale", "None or a finite number > 0", scale)
        problems.raise_if_any()

        self.d_model = d_model
        self.n_heads = n_heads
        self.d_head = d_head if d_head is not None else d_model // n_heads
        self.causal = causal
        self.scale = float(scale) if scale is not None else 1.0 / math.sqrt(self.d_head)

        h, d, e = n_heads, d_model, self.d_head
        self.W_Q = nn.Parameter(torch.zeros(h, d, e))
        self.W_K = nn.Parameter(torch.zeros(h, d, e))
        self.W_V = nn.Parameter(torch.zeros(h, d, e))
        self.W_O = nn.Parameter(torch.zeros(h, e, d))
        if bias:
            self.b_Q = nn.Parameter(torch.zeros(h, e))
            self.b_K = nn.Parameter(torch.zeros(h, e))
            self.b_V = nn.Parameter(torch.zeros(h, e))
            self.b_O = nn.Parameter(torch.zeros(d))
        else:
            self.register_parameter("b_Q", None)
            self.register_parameter("b_K", None)
            self.register_parameter("b_V", None)
            self.register_parameter("b_O", None)
        # Post-softmax multiplier per head (ablation); None costs nothing. Not saved in checkpoints.
        self.register_buffer("head_multiplier", None, persistent=False)

        self.hook_q = HookPoint()  # [batch, pos, head, d_head]
        self.hook_k = HookPoint()  # [batch, pos, head, d_head]
        self.hook_v = HookPoint()  # [batch, pos, head, d_head]
        self.hook_attn_scores = HookPoint()  # [batch, head, query_pos, key_pos]
        self.hook_pattern = HookPoint()  # [batch, head, query_pos, key_pos]
        self.hook_z = HookPoint()  # [batch, pos, head, d_head]

        if generator is not None:
            self.reset_parameters(generator)

    @property
    def bias(self) -> bool:
        """Whether the projections carry biases."""
        return self.b_Q is not None

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator, *, std: float = 0.02) -> None:
        """W_Q, W_K, W_V, W_O ~ N(0, std²), drawn in that order from ``generator``; biases 0."""
        for weight in (self.W_Q, self.W_K, self.W_V, self.W_O):
            init_normal_(weight, std=std, generator=generator)
        for b in (self.b_Q, self.b_K, self.b_V, self.b_O):
            if b is not None:
                b.zero_()

    def set_head_multiplier(self, multiplier: torch.Tensor | None) -> None:
        """Multiply each head's post-softmax pattern by a factor; None restores the plain module.

        A factor 0 ablates the head: its pattern, hence its output z, is exactly zero
        (docs/theory.md §8.5). The recorded ``hook_pattern`` and ``hook_z`` show the multiplied values.

        Args:
            multiplier: float [head] (same for every sequence) or [batch, head] (one row per
                sequence, e.g. a different head ablated in each), or None.

        Raises:
            ValueError: unless ``multiplier`` is None or a float tensor [head] or [batch, head].
        """
        if multiplier is not None and (
            not isinstance(multiplier, torch.Tensor)
            or not multiplier.is_floating_point()
            or multiplier.dim() not in (1, 2)
            or multiplier.shape[-1] != self.n_heads
        ):
            raise ValueError(
                "MultiHeadAttention.set_head_multiplier: multiplier must be None or a floating "
                f"tensor of shape [head] or [batch, head] with head = {self.n_heads}; "
                f"got {describe_tensor(multiplier)}."
            )
        self.head_multiplier = multiplier

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attend over the sequence.

        Args:
            x: residual input, float [batch, pos, d_model].
            mask: optional bool, broadcastable to [batch, head, query_pos, key_pos], True = may
                attend; intersected with the causal mask. A key-padding mask ``keep``
                [batch, key_pos] is passed as ``keep[:, None, None, :]``.

        Returns:
            float [batch, pos, d_model].

        Raises:
            ValueError: when ``x`` or ``mask`` has the wrong type or shape.
        """
        owner = "MultiHeadAttention"
        if (
            not isinstance(x, torch.Tensor)
            or not x.is_floating_point()
            or x.dim() != 3
            or (x.shape[-1] != self.d_model)
        ):
            raise ValueError(
                f"{owner}: x must be a floating-point tensor of shape [batch, pos, d_model] with "
                f"d_model = {self.d_model}; got {describe_tensor(x)}."
            )
        batch, pos, _ = x.shape
        allowed = None
        if self.causal:
            allowed = torch.ones(pos, pos, dtype=torch.bool, device=x.device).tril()
        if mask is not None:
            mask = check_mask(
                owner, mask, (batch, self.n_heads, pos, pos), "[batch, head, query_pos, key_pos]"
            )
            allowed = mask if allowed is None else allowed & mask
        if allowed is None:
            allowed = torch.ones(pos, pos, dtype=torch.bool, device=x.device)

        q = torch.einsum("bpd,hde->bphe", x, self.W_Q)  # [batch, pos, head, d_head]
        k = torch.einsum("bpd,hde->bphe", x, self.W_K)
        v = torch.einsum("bpd,hde->bphe", x, self.W_V)
        if self.b_Q is not None:
            q, k, v = q + self.b_Q, k + self.b_K, v + self.b_V
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)

        scores = torch.einsum("bqhe,bkhe->bhqk", q, k) * self.scale  # [batch, head, q, k]
        scores = self.hook_attn_scores(scores.masked_fill(~allowed, -math.inf))
        pattern = masked_softmax(scores, allowed)
        if self.head_multiplier is not None:
            multiplier = self.head_multiplier
            if multiplier.dim() == 2 and multiplier.shape[0] != batch:
                raise ValueError(
                    f"{owner}: head_multiplier [batch, head] must match the batch size {batch}; "
                    f"got {describe_tensor(multiplier)}."
                )
            pattern = pattern * multiplier.to(pattern.dtype)[..., :, None, None]
        pattern = self.hook_pattern(pattern)

        z = self.hook_z(torch.einsum("bhqk,bkhe->bqhe", pattern, v))  # [batch, pos, head, d_head]
        out = torch.einsum("bphe,hed->bpd", z, self.W_O)  # [batch, pos, d_model]
        if self.b_O is not None:
            out = out + self.b_O
        return out

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_heads={self.n_heads}, d_head={self.d_head}, "
            f"bias={self.bias}, causal={self.causal}, scale={self.scale:.6g}"
        )


@torch.no_grad()
def init_normal_(tensor: torch.Tensor, *, std: float, generator: torch.Generator) -> None:
    """Fill ``tensor`` with N(0, std²) draws from ``generator``, whatever the tensor's device.

    The draw happens on the generator's device in float32 and is then copied, so one seed gives
    the same weights on every device and dtype, and the global RNG is never used.
    """
    draw = torch.randn(tensor.shape, generator=generator, device=generator.device)
    tensor.copy_(draw * std)
