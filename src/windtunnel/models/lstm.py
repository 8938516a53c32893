"""The LSTM baseline (docs/theory.md §6.1): embeddings, stacked LSTM layers, a final norm, a readout.

The stack is built from one single-layer ``nn.LSTM`` per layer so that each layer's output is a
hook point and the dropout between layers draws from an explicit generator (``nn.LSTM``'s own
inter-layer dropout would use the global RNG). The parameters are those of
``nn.LSTM(d_model, d_model, num_layers=n_layers)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from windtunnel._checks import check_generator
from windtunnel.hooks import HookPoint, name_hook_points
from windtunnel.models._layers import (
    Embed,
    PosEmbed,
    TokenModelConfig,
    check_tokens,
    dropout,
    make_norm,
    make_readout,
    read_out,
)

__all__ = ["LSTMConfig", "LSTMLayer", "LSTMModel"]


@dataclass(frozen=True, kw_only=True)
class LSTMConfig(TokenModelConfig):
    """Shape and options of an :class:`LSTMModel`. Defaults are the bijection baseline.

    Attributes:
        vocab_size: number of token ids.
        n_positions: size of a learned position table added to the token embedding; None for
            no position embedding (the HMM baseline).
        n_layers: number of stacked LSTM layers.
        d_model: embedding width and LSTM hidden size.
        dropout: drop probability on each LSTM layer's output except the last (as in
            ``nn.LSTM``); needs ``forward(..., generator=g)`` in training. docs/theory.md §6.1 uses 0.1.
        norm: ``"layernorm"`` or ``"rmsnorm"``, applied to the last layer's output.
        norm_eps: epsilon inside the norm's square root.
        tie_embeddings: read out with the transpose of the token embedding.
        n_out: number of logits with an untied head; None for ``vocab_size``.
        head_bias: bias on the readout (the HMM baseline's ``Linear -> 5`` has one).
        init_std: standard deviation of the embeddings and of an untied readout. LSTM weights use
            PyTorch's default U(-1/sqrt(d_model), 1/sqrt(d_model)).
    """

    n_positions: int | None = None
    n_layers: int = 6
    norm: str = "layernorm"

    _optional: ClassVar[tuple[str, ...]] = ("n_positions",)


class LSTMLayer(nn.Module):
    """One LSTM layer, d_model -> d_model, batch first; ``hook_out`` [batch, pos, d_model]."""

    def __init__(self, d_model: int, *, generator: torch.Generator | None) -> None:
        super().__init__()
        check_generator("LSTMLayer", generator)
        # Built on the meta device so that nn.LSTM's own initialisation draws nothing from the
        # global RNG, then given real (zero) storage and initialised from ``generator``.
        self.lstm = nn.LSTM(d_model, d_model, batch_first=True, device="meta").to_empty(
            device="cpu"
        )
        with torch.no_grad():
            for param in self.lstm.parameters():
                param.zero_()
        self.hook_out = HookPoint()  # [batch, pos, d_model]
        if generator is not None:
            self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """PyTorch's LSTM default, U(-k, k) with k = 1/sqrt(d_model), for every weight and bias.

        Raises:
            TypeError: when ``generator`` is not a torch.Generator.
        """
        check_generator("LSTMLayer.reset_parameters", generator, optional=False)
        bound = 1.0 / math.sqrt(self.lstm.hidden_size)
        for param in self.lstm.parameters():
            draw = torch.rand(param.shape, generator=generator, device=generator.device)
            param.copy_(draw * (2 * bound) - bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.hook_out(out)


class LSTMModel(nn.Module):
    """Token (+ position) embedding, ``n_layers`` LSTM layers, a final norm and a readout.

    logits = readout(LN_final(LSTM_L(... LSTM_1(W_E[tokens] (+ W_pos[:seq_len]))))), with
    dropout between LSTM layers in training. Causal by construction.

    Hooks: ``hook_embed``, ``hook_pos_embed`` (with a position table), ``blocks.{l}.hook_out``,
    ``ln_final.hook_normalized``; all [batch, pos, d_model].

    Args:
        config: the shape and options.
        generator: initialises the embeddings N(0, init_std²), the LSTM weights U(-k, k), norm
            gains 1 and biases 0, in module order; None leaves weights 0 for a state dict.
    """

    def __init__(self, config: LSTMConfig, *, generator: torch.Generator | None) -> None:
        super().__init__()
        if not isinstance(config, LSTMConfig):
            raise ValueError(
                f"LSTMModel.config must be an LSTMConfig; got {type(config).__name__}."
            )
        check_generator("LSTMModel", generator)
        self.config = config
        std = config.init_std
        self.embed = Embed(config.vocab_size, config.d_model, std=std, generator=None)
        self.hook_embed = HookPoint()  # [batch, pos, d_model]
        if config.n_positions is not None:
            self.pos_embed = PosEmbed(config.n_positions, config.d_model, std=std, generator=None)
            self.hook_pos_embed = HookPoint()  # [batch, pos, d_model]
        else:
            self.pos_embed = None
            self.hook_pos_embed = None
        self.blocks = nn.ModuleList(
            LSTMLayer(config.d_model, generator=None) for _ in range(config.n_layers)
        )
        self.ln_final = make_norm(config.norm, config.d_model, eps=config.norm_eps)
        self.unembed, self.b_U = make_readout(
            config.d_model, config.n_outputs, tie_embeddings=config.tie_embeddings,
            head_bias=config.head_bias, std=std,
        )
        name_hook_points(self)
        if generator is not None:
            self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """Re-initialise every parameter from ``generator``, in the constructor's order.

        Raises:
            TypeError: when ``generator`` is not a torch.Generator.
        """
        check_generator("LSTMModel.reset_parameters", generator, optional=False)
        self.embed.reset_parameters(generator)
        if self.pos_embed is not None:
            self.pos_embed.reset_parameters(generator)
        for block in self.blocks:
            block.reset_parameters(generator)
        self.ln_final.reset_parameters()
        if self.unembed is not None:
            self.unembed.reset_parameters(generator)
        if self.b_U is not None:
            self.b_U.zero_()

    def forward(
        self, tokens: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Logits for every position.

        Args:
            tokens: integer token ids [batch, seq_len] (seq_len <= n_positions with a position
                table).
            generator: dropout randomness; required in training mode when ``config.dropout > 0``.

        Returns:
            logits [batch, seq_len, n_outputs].

        Raises:
            ValueError: when ``tokens`` does not fit, or dropout needs a missing generator.
            TypeError: when ``generator`` is neither a torch.Generator nor None.
        """
        check_tokens("LSTMModel", tokens, self.config.n_positions)
        check_generator("LSTMModel.forward", generator)
        x = self.hook_embed(self.embed(tokens))
        if self.pos_embed is not None:
            x = x + self.hook_pos_embed(self.pos_embed(tokens))
        last = len(self.blocks) - 1
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index < last:
                x = dropout(
                    x,
                    self.config.dropout,
                    training=self.training,
                    generator=generator,
                    owner="LSTMModel",
                )
        return read_out(self.ln_final(x), embed=self.embed, unembed=self.unembed, b_U=self.b_U)
