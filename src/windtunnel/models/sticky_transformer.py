"""The deep variant of the sticky-chain experiment (docs/theory.md §4.5): a small pre-LN transformer.

``Linear(d_x -> d_model)``, ``n_layers`` pre-LayerNorm blocks (causal multi-head attention with
biased Q/K/V/O projections, then a GELU MLP), a final LayerNorm and ``Linear(d_model ->
n_classes)``. No positional encoding, as in the reference.

Dropout defaults to 0. The reference uses 0.1, but ``torch.nn.Dropout`` draws from the global
RNG; here dropout masks come from an explicit ``generator`` passed to :meth:`forward`, so a
non-zero rate is available without touching global state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from windtunnel._checks import Problems, check_generator, check_number, check_positive_int

__all__ = ["StickyTransformer", "StickyTransformerConfig"]


@dataclass(frozen=True, kw_only=True)
class StickyTransformerConfig:
    """Shapes of the deep sticky-chain model (reference values).

    Attributes:
        d_x: input dimension (20).
        d_model: residual width (64).
        n_layers: blocks (4).
        n_heads: attention heads per block (4); d_head = d_model / n_heads.
        d_mlp: hidden width of the MLP (256 = 4 d_model).
        n_classes: output classes (8).
        dropout: rate on attention weights and MLP outputs (0.0; the reference's 0.1 needs a
            dropout generator at train time).

    Raises:
        ValueError: naming every bad field at once.
    """

    d_x: int = 20
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    d_mlp: int = 256
    n_classes: int = 8
    dropout: float = 0.0

    def __post_init__(self) -> None:
        owner = "StickyTransformerConfig"
        problems = Problems(owner)
        for name in ("d_x", "d_model", "n_layers", "n_heads", "d_mlp"):
            text = check_positive_int(owner, name, getattr(self, name))
            if text:
                problems.add_text(text)
        for text in (
            check_positive_int(owner, "n_classes", self.n_classes, minimum=2),
            check_number(owner, "dropout", self.dropout, low=0.0, high=1.0, high_open=True),
        ):
            if text:
                problems.add_text(text)
        if isinstance(self.d_model, int) and isinstance(self.n_heads, int) and self.n_heads > 0:
            if self.d_model % self.n_heads:
                problems.add_text(
                    f"{owner}.n_heads must divide d_model; got n_heads={self.n_heads}, d_model={self.d_model}."
                )
        problems.raise_if_any()


def _linear(d_in: int, d_out: int) -> nn.Linear:
    # nn.Linear's constructor would initialise from the global RNG; skip it, reset_parameters draws.
    return nn.utils.skip_init(nn.Linear, d_in, d_out)


def _dropout(x: torch.Tensor, rate: float, generator: torch.Generator | None) -> torch.Tensor:
    if rate == 0.0 or generator is None:
        return x
    keep = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) >= rate
    return x * keep / (1.0 - rate)


class _Block(nn.Module):
    def __init__(self, config: StickyTransformerConfig) -> None:
        super().__init__()
        d = config.d_model
        self.config = config
        self.ln_1 = nn.LayerNorm(d)
        self.qkv = _linear(d, 3 * d)
        self.out = _linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp_in = _linear(d, config.d_mlp)
        self.mlp_out = _linear(config.d_mlp, d)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        batch, n_pos, d = x.shape
        n_heads, rate = self.config.n_heads, self.config.dropout
        # [batch, pos, 3 d] -> 3 x [batch, head, pos, d_head]
        q, k, v = (
            self.qkv(self.ln_1(x))
            .view(batch, n_pos, 3, n_heads, d // n_heads)
            .permute(2, 0, 3, 1, 4)
        )
        if rate > 0.0 and generator is not None:
            scores = q @ k.transpose(-1, -2) / math.sqrt(d // n_heads)
            causal = torch.ones(n_pos, n_pos, dtype=torch.bool, device=x.device).tril()
            pattern = _dropout(
                torch.softmax(scores.masked_fill(~causal, float("-inf")), -1), rate, generator
            )
            heads = pattern @ v
        else:
            heads = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(heads.transpose(1, 2).reshape(batch, n_pos, d))
        return x + _dropout(
            self.mlp_out(_dropout(F.gelu(self.mlp_in(self.ln_2(x))), rate, generator)),
            rate,
            generator,
        )


class StickyTransformer(nn.Module):
    """Pre-LN causal transformer on continuous inputs, logits per position (docs/theory.md §4.5).

    Args:
        config: shapes and dropout rate.
        generator: draws the initial weights (see :meth:`reset_parameters`).

    Raises:
        TypeError: when ``generator`` is not a torch.Generator.
    """

    def __init__(
        self, config: StickyTransformerConfig | None = None, *, generator: torch.Generator
    ) -> None:
        super().__init__()
        check_generator("StickyTransformer", generator, optional=False)
        self.config = config or StickyTransformerConfig()
        self.embed = _linear(self.config.d_x, self.config.d_model)
        self.blocks = nn.ModuleList(_Block(self.config) for _ in range(self.config.n_layers))
        self.ln_final = nn.LayerNorm(self.config.d_model)
        self.unembed = _linear(self.config.d_model, self.config.n_classes)
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """PyTorch's default Linear init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias,
        drawn from ``generator`` in module order; LayerNorms start at weight 1, bias 0.

        Raises:
            TypeError: when ``generator`` is not a torch.Generator.
        """
        check_generator("StickyTransformer.reset_parameters", generator, optional=False)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                bound = 1.0 / math.sqrt(module.in_features)
                nn.init.uniform_(module.weight, -bound, bound, generator=generator)
                nn.init.uniform_(module.bias, -bound, bound, generator=generator)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Logits [batch, pos, n_classes] from inputs [batch, pos, d_x].

        Dropout is applied only when the config rate is positive and ``generator`` is given.

        Raises:
            ValueError: when ``x`` is not [batch, pos, d_x].
            TypeError: when ``generator`` is neither a torch.Generator nor None.
        """
        check_generator("StickyTransformer.forward", generator)
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.config.d_x:
            raise ValueError(
                f"StickyTransformer.forward: x must be [batch, pos, d_x={self.config.d_x}]; "
                f"got {list(getattr(x, 'shape', []))}."
            )
        h = self.embed(x)
        for block in self.blocks:
            h = block(h, generator)
        return self.unembed(self.ln_final(h))
