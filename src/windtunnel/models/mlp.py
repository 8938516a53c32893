"""The position-wise MLP control (docs/theory.md §6.1): TinyGPT's embeddings and readout with no attention.

Each position is processed alone, so the model cannot see context. On the bijection its
cross-entropy optimum is uniform over the values, the 1.107-bit floor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from windtunnel._checks import check_generator
from windtunnel.hooks import HookPoint, name_hook_points
from windtunnel.models._layers import (
    Embed,
    FeedForward,
    PosEmbed,
    TokenModelConfig,
    check_tokens,
    dropout,
    make_norm,
    make_readout,
    read_out,
)

__all__ = ["MLPBlock", "PositionwiseMLP", "PositionwiseMLPConfig"]


@dataclass(frozen=True, kw_only=True)
class PositionwiseMLPConfig(TokenModelConfig):
    """Shape and options of a :class:`PositionwiseMLP`. Defaults are the bijection control.

    Attributes:
        vocab_size: number of token ids.
        n_positions: size of the learned position table (the longest sequence).
        n_layers: number of residual blocks (9 in docs/theory.md §6.1).
        d_model: residual-stream width.
        d_mlp: hidden width of each block.
        norm: ``"layernorm"`` (docs/theory.md §6.1: pre-LN) or ``"rmsnorm"``.
        norm_eps: epsilon inside the norm's square root.
        mlp_bias: biases on the two linear layers of each block.
        final_norm: apply a norm before the readout (default True, as in TinyGPT).
        dropout: drop probability on the embedding sum and each block output; needs
            ``forward(..., generator=g)`` in training.
        tie_embeddings: read out with the transpose of the token embedding.
        n_out: number of logits with an untied head; None for ``vocab_size``.
        head_bias: bias on the readout.
        init_std: standard deviation of every weight matrix and embedding at initialisation.
    """

    n_positions: int
    n_layers: int = 9
    d_mlp: int = 768
    norm: str = "layernorm"
    mlp_bias: bool = True
    final_norm: bool = True


class MLPBlock(nn.Module):
    """One pre-norm residual block: x + FFN(LN(x)), FFN = Linear -> GELU -> Linear.

    Hooks: ``hook_resid_pre``, ``hook_mlp_out``, ``hook_resid_post`` [batch, pos, d_model];
    ``ln.hook_normalized``; ``mlp.hook_pre``/``hook_post`` [batch, pos, d_mlp].

    Attributes:
        bypass: when True the block is the identity.
    """

    def __init__(self, config: PositionwiseMLPConfig, *, generator: torch.Generator | None) -> None:
        super().__init__()
        check_generator("MLPBlock", generator)
        self.dropout_p = config.dropout
        self.ln = make_norm(config.norm, config.d_model, eps=config.norm_eps)
        self.mlp = FeedForward(
            config.d_model, config.d_mlp, bias=config.mlp_bias, std=config.init_std, generator=None
        )
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model]
        self.hook_mlp_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_post = HookPoint()  # [batch, pos, d_model]
        self.bypass = False
        if generator is not None:
            self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """Norm gain 1 and bias 0, then the FFN weights from ``generator``.

        Raises:
            TypeError: when ``generator`` is not a torch.Generator.
        """
        check_generator("MLPBlock.reset_parameters", generator, optional=False)
        self.ln.reset_parameters()
        self.mlp.reset_parameters(generator)

    def forward(
        self, resid: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """[batch, pos, d_model] -> [batch, pos, d_model].

        Raises:
            TypeError: when ``generator`` is neither a torch.Generator nor None.
        """
        check_generator("MLPBlock.forward", generator)
        resid = self.hook_resid_pre(resid)
        if self.bypass:
            return self.hook_resid_post(resid)
        out = self.mlp(self.ln(resid))
        out = self.hook_mlp_out(
            dropout(
                out,
                self.dropout_p,
                training=self.training,
                generator=generator,
                owner="PositionwiseMLP",
            )
        )
        return self.hook_resid_post(resid + out)


class PositionwiseMLP(nn.Module):
    """Embeddings, residual MLP blocks, a final norm and a readout; positions never mix.

    logits_t = readout(LN_final(blocks(W_E[x_t] + W_pos[t]))): the logits at position t depend
    on the token at t and on t only.

    Hooks: ``hook_embed``, ``hook_pos_embed``, ``blocks.{l}.hook_resid_pre|post``,
    ``blocks.{l}.hook_mlp_out``, ``blocks.{l}.ln.hook_normalized``,
    ``blocks.{l}.mlp.hook_pre|post``, ``ln_final.hook_normalized`` (with ``final_norm``).

    Args:
        config: the shape and options.
        generator: initialises every weight N(0, init_std²), biases 0, norm gains 1, in module
            order; None leaves weights 0 for a state dict to be loaded.
    """

    def __init__(self, config: PositionwiseMLPConfig, *, generator: torch.Generator | None) -> None:
        super().__init__()
        if not isinstance(config, PositionwiseMLPConfig):
            raise ValueError(
                "PositionwiseMLP.config must be a PositionwiseMLPConfig; "
                f"got {type(config).__name__}."
            )
        check_generator("PositionwiseMLP", generator)
        self.config = config
        std = config.init_std
        self.embed = Embed(config.vocab_size, config.d_model, std=std, generator=None)
        self.pos_embed = PosEmbed(config.n_positions, config.d_model, std=std, generator=None)
        self.hook_embed = HookPoint()  # [batch, pos, d_model]
        self.hook_pos_embed = HookPoint()  # [batch, pos, d_model]
        self.blocks = nn.ModuleList(
            MLPBlock(config, generator=None) for _ in range(config.n_layers)
        )
        self.ln_final = (
            make_norm(config.norm, config.d_model, eps=config.norm_eps)
            if config.final_norm
            else None
        )
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
        check_generator("PositionwiseMLP.reset_parameters", generator, optional=False)
        self.embed.reset_parameters(generator)
        self.pos_embed.reset_parameters(generator)
        for block in self.blocks:
            block.reset_parameters(generator)
        if self.ln_final is not None:
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
            tokens: integer token ids [batch, seq_len], seq_len <= n_positions.
            generator: dropout randomness; required in training mode when ``config.dropout > 0``.

        Returns:
            logits [batch, seq_len, n_outputs].

        Raises:
            ValueError: when ``tokens`` does not fit, or dropout needs a missing generator.
            TypeError: when ``generator`` is neither a torch.Generator nor None.
        """
        check_tokens("PositionwiseMLP", tokens, self.config.n_positions)
        check_generator("PositionwiseMLP.forward", generator)
        embed = self.hook_embed(self.embed(tokens))
        pos_embed = self.hook_pos_embed(self.pos_embed(tokens))
        resid = dropout(
            embed + pos_embed,
            self.config.dropout,
            training=self.training,
            generator=generator,
            owner="PositionwiseMLP",
        )
        for block in self.blocks:
            resid = block(resid, generator=generator)
        if self.ln_final is not None:
            resid = self.ln_final(resid)
        return read_out(resid, embed=self.embed, unembed=self.unembed, b_U=self.b_U)
