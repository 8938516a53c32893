"""TinyGPT: the decoder-only transformer of the bijection and HMM wind tunnels (docs/theory.md §6.1).

Pre-norm residual blocks built on :class:`windtunnel.attention.MultiHeadAttention`, so every head's
queries, keys, values, pattern and output (and the gradient at that output) can be recorded.
Blocks can be bypassed, or have only their attention or only their FFN output zeroed, and heads
can be ablated, for the ablations of docs/theory.md §8.5.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from windtunnel._checks import Problems, check_generator, check_positive_int
from windtunnel.attention import MultiHeadAttention
from windtunnel.hooks import HookPoint, name_hook_points
from windtunnel.models._layers import (
    Embed,
    FeedForward,
    PosEmbed,
    TokenModelConfig,
    check_position_ids,
    check_tokens,
    dropout,
    make_norm,
    make_readout,
    read_out,
)

__all__ = ["TinyGPT", "TinyGPTConfig", "TransformerBlock"]


@dataclass(frozen=True, kw_only=True)
class TinyGPTConfig(TokenModelConfig):
    """Shape and options of a :class:`TinyGPT`. Defaults are the bijection model (docs/theory.md §6.1).

    Attributes:
        vocab_size: number of token ids.
        n_positions: size of the learned position table (the longest sequence).
        n_layers: number of residual blocks.
        n_heads: attention heads per block; must divide ``d_model`` (d_head = d_model / n_heads).
        d_model: residual-stream width.
        d_mlp: hidden width of the GELU feed-forward.
        norm: ``"rmsnorm"`` (gain only) or ``"layernorm"`` (gain and bias), before each sublayer
            and before the readout.
        norm_eps: epsilon inside the norm's square root.
        attn_bias: biases on Q, K, V and O (the bijection model has none).
        mlp_bias: biases on the feed-forward layers.
        dropout: drop probability on the embedding sum and on each attention and FFN output
            before it joins the residual stream; needs ``forward(..., generator=g)`` in training.
        tie_embeddings: read out with the transpose of the token embedding.
        n_out: number of logits with an untied head; None for ``vocab_size``. With tied embeddings
            it must be None or ``vocab_size``.
        head_bias: bias on the readout (the HMM model's ``Linear(256 -> 5)`` has one).
        init_std: standard deviation of every weight matrix and embedding at initialisation.
    """

    n_positions: int
    n_layers: int = 6
    n_heads: int = 6
    d_mlp: int = 768
    norm: str = "rmsnorm"
    attn_bias: bool = False
    mlp_bias: bool = True

    def _check_more(self, problems: Problems) -> None:
        sizes_ok = all(
            check_positive_int("TinyGPTConfig", field, getattr(self, field)) is None
            for field in ("n_heads", "d_model")
        )
        if sizes_ok and self.d_model % self.n_heads != 0:
            problems.add_text(
                f"TinyGPTConfig.n_heads must divide d_model; "
                f"got n_heads={self.n_heads}, d_model={self.d_model}."
            )

    @property
    def d_head(self) -> int:
        """Width of each head, d_model / n_heads."""
        return self.d_model // self.n_heads


class TransformerBlock(nn.Module):
    """One pre-norm block: x + Attn(LN1(x)), then + FFN(LN2(·)).

    Hooks: ``hook_resid_pre``, ``hook_attn_out``, ``hook_resid_mid``, ``hook_mlp_out``,
    ``hook_resid_post`` [batch, pos, d_model]; ``ln1``/``ln2.hook_normalized``; ``attn.hook_*``;
    ``mlp.hook_pre``/``hook_post``.

    Attributes:
        bypass: when True the block is the identity (resid_post = resid_pre); only
            ``hook_resid_pre`` and ``hook_resid_post`` fire.
        zero_attn_out: when True the attention sublayer is skipped and its output is zero.
        zero_mlp_out: when True the FFN sublayer is skipped and its output is zero.
    """

    def __init__(self, config: TinyGPTConfig, *, generator: torch.Generator | None) -> None:
        super().__init__()
        check_generator("TransformerBlock", generator)
        self.dropout_p = config.dropout
        self.ln1 = make_norm(config.norm, config.d_model, eps=config.norm_eps)
        self.attn = MultiHeadAttention(
            d_model=config.d_model,
            n_heads=config.n_heads,
            bias=config.attn_bias,
            causal=True,
            generator=None,
        )
        self.ln2 = make_norm(config.norm, config.d_model, eps=config.norm_eps)
        self.mlp = FeedForward(
            config.d_model, config.d_mlp, bias=config.mlp_bias, std=config.init_std, generator=None
        )
        self.init_std = config.init_std
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model]
        self.hook_attn_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_mid = HookPoint()  # [batch, pos, d_model]
        self.hook_mlp_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_post = HookPoint()  # [batch, pos, d_model]
        self.bypass = False
        self.zero_attn_out = False
        self.zero_mlp_out = False
        if generator is not None:
            self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """Norm gains 1 and biases 0; attention weights, then FFN weights, from ``generator``.

        Raises:
            TypeError: when ``generator`` is not a torch.Generator.
        """
        check_generator("TransformerBlock.reset_parameters", generator, optional=False)
        self.ln1.reset_parameters()
        self.attn.reset_parameters(generator, std=self.init_std)
        self.ln2.reset_parameters()
        self.mlp.reset_parameters(generator)

    def forward(
        self,
        resid: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """[batch, pos, d_model] -> [batch, pos, d_model]; ``mask`` goes to the attention.

        Raises:
            TypeError: when ``generator`` is neither a torch.Generator nor None.
        """
        check_generator("TransformerBlock.forward", generator)
        resid = self.hook_resid_pre(resid)
        if self.bypass:
            return self.hook_resid_post(resid)
        owner = "TinyGPT"
        if self.zero_attn_out:
            attn_out = torch.zeros_like(resid)
        else:
            attn_out = self.attn(self.ln1(resid), mask=mask)
            attn_out = dropout(
                attn_out, self.dropout_p, training=self.training, generator=generator, owner=owner
            )
        attn_out = self.hook_attn_out(attn_out)
        resid = self.hook_resid_mid(resid + attn_out)
        if self.zero_mlp_out:
            mlp_out = torch.zeros_like(resid)
        else:
            mlp_out = self.mlp(self.ln2(resid))
            mlp_out = dropout(
                mlp_out, self.dropout_p, training=self.training, generator=generator, owner=owner
            )
        mlp_out = self.hook_mlp_out(mlp_out)
        return self.hook_resid_post(resid + mlp_out)


class TinyGPT(nn.Module):
    """Decoder-only causal transformer with learned absolute positions (docs/theory.md §6.1).

    logits = readout(LN_final(blocks(W_E[tokens] + W_pos[:seq_len]))), with the readout
    ``x @ W_E^T`` (tied) or ``x @ W_U + b_U`` (untied, ``n_out`` logits).

    Hooks: ``hook_embed``, ``hook_pos_embed``, ``blocks.{l}.hook_resid_pre|mid|post``,
    ``blocks.{l}.attn.hook_q|k|v|z|attn_scores|pattern``, ``blocks.{l}.hook_attn_out``,
    ``blocks.{l}.hook_mlp_out``, ``blocks.{l}.ln1|ln2.hook_normalized``,
    ``blocks.{l}.mlp.hook_pre|post``, ``ln_final.hook_normalized``. Layouts are those of
    TransformerLens ([batch, pos, d_model]; q, k, v, z [batch, pos, head, d_head]; scores and
    pattern [batch, head, query_pos, key_pos]). ``hook_pos_embed`` is [batch, pos, d_model].

    Args:
        config: the shape and options.
        generator: initialises every weight N(0, init_std²), biases 0 and norm gains 1, drawing in
            module order (embeddings, positions, blocks, readout); None leaves weights 0 for a
            state dict to be loaded.
    """

    def __init__(self, config: TinyGPTConfig, *, generator: torch.Generator | None) -> None:
        super().__init__()
        if not isinstance(config, TinyGPTConfig):
            raise ValueError(
                f"TinyGPT.config must be a TinyGPTConfig; got {type(config).__name__}."
            )
        check_generator("TinyGPT", generator)
        self.config = config
        std = config.init_std
        self.embed = Embed(config.vocab_size, config.d_model, std=std, generator=None)
        self.pos_embed = PosEmbed(config.n_positions, config.d_model, std=std, generator=None)
        self.hook_embed = HookPoint()  # [batch, pos, d_model]
        self.hook_pos_embed = HookPoint()  # [batch, pos, d_model]
        self.blocks = nn.ModuleList(
            TransformerBlock(config, generator=None) for _ in range(config.n_layers)
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
        """Re-initialise every parameter from ``generator`` (same order as the constructor).

        Raises:
            TypeError: when ``generator`` is not a torch.Generator.
        """
        check_generator("TinyGPT.reset_parameters", generator, optional=False)
        self.embed.reset_parameters(generator)
        self.pos_embed.reset_parameters(generator)
        for block in self.blocks:
            block.reset_parameters(generator)
        self.ln_final.reset_parameters()
        if self.unembed is not None:
            self.unembed.reset_parameters(generator)
        if self.b_U is not None:
            self.b_U.zero_()

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits for every position.

        Args:
            tokens: integer token ids [batch, seq_len], seq_len <= n_positions.
            mask: optional extra attention mask, bool, broadcastable to
                [batch, head, query_pos, key_pos], True = may attend (e.g. key padding
                ``keep[:, None, None, :]``); always intersected with the causal mask.
            generator: dropout randomness; required in training mode when ``config.dropout > 0``,
                on the tokens' device.
            position_ids: the row of the position table each token reads, an integer tensor
                [batch, seq_len] or [seq_len] (shared by the batch); None (the default) is
                0 .. seq_len - 1. ``TrainConfig.position_shift`` trains with shifted ids so that
                rows past the training length are trained.

        Returns:
            logits [batch, seq_len, n_outputs].

        Raises:
            ValueError: when ``tokens`` is not an integer [batch, seq_len] tensor that fits
                the position table, ``position_ids`` has the wrong shape or names a row outside
                the table, or dropout needs a generator that is missing.
            TypeError: when ``generator`` is neither a torch.Generator nor None.
        """
        check_tokens("TinyGPT", tokens, self.config.n_positions)
        check_generator("TinyGPT.forward", generator)
        position_ids = check_position_ids("TinyGPT", position_ids, tokens, self.config.n_positions)
        embed = self.hook_embed(self.embed(tokens))
        pos_embed = self.hook_pos_embed(self.pos_embed(tokens, position_ids))
        resid = dropout(
            embed + pos_embed,
            self.config.dropout,
            training=self.training,
            generator=generator,
            owner="TinyGPT",
        )
        for block in self.blocks:
            resid = block(resid, mask=mask, generator=generator)
        return read_out(self.ln_final(resid), embed=self.embed, unembed=self.unembed, b_U=self.b_U)

    @contextlib.contextmanager
    def ablated(
        self,
        *,
        heads: Iterable[tuple[int, int]] = (),
        bypass: Iterable[int] = (),
        zero_attn_out: Iterable[int] = (),
        zero_mlp_out: Iterable[int] = (),
    ) -> Iterator[TinyGPT]:
        """Run the model with heads or layers ablated (docs/theory.md §8.5); restores the previous state.

        Example::

            with model.ablated(heads=[(0, 2)]):
                ablated_logits = model(tokens)

        Args:
            heads: (layer, head) pairs whose post-softmax pattern is multiplied by 0, so the head's
                output z is exactly zero.
            bypass: layers made the identity.
            zero_attn_out: layers whose attention output alone is zeroed.
            zero_mlp_out: layers whose FFN output alone is zeroed.

        Raises:
            ValueError: when a layer or head index is out of range.
        """
        heads, bypass = list(heads), list(bypass)
        zero_attn_out, zero_mlp_out = list(zero_attn_out), list(zero_mlp_out)
        n_layers, n_heads = self.config.n_layers, self.config.n_heads
        problems = Problems("TinyGPT.ablated")
        for field, layers in (
            ("bypass", bypass),
            ("zero_attn_out", zero_attn_out),
            ("zero_mlp_out", zero_mlp_out),
        ):
            bad = [layer for layer in layers if not _is_index(layer, n_layers)]
            if bad:
                problems.add(field, f"layer indices in [0, {n_layers})", bad)
        bad_heads = [
            pair
            for pair in heads
            if not (
                isinstance(pair, tuple)
                and len(pair) == 2
                and _is_index(pair[0], n_layers)
                and _is_index(pair[1], n_heads)
            )
        ]
        if bad_heads:
            problems.add(
                "heads", f"(layer, head) pairs in [0, {n_layers}) x [0, {n_heads})", bad_heads
            )
        problems.raise_if_any()

        saved = [
            (block.bypass, block.zero_attn_out, block.zero_mlp_out, block.attn.head_multiplier)
            for block in self.blocks
        ]
        try:
            for layer in bypass:
                self.blocks[layer].bypass = True
            for layer in zero_attn_out:
                self.blocks[layer].zero_attn_out = True
            for layer in zero_mlp_out:
                self.blocks[layer].zero_mlp_out = True
            for layer in sorted({layer for layer, _ in heads}):
                attn = self.blocks[layer].attn
                param = attn.W_Q
                current = attn.head_multiplier
                multiplier = (
                    torch.ones(n_heads, dtype=param.dtype, device=param.device)
                    if current is None
                    else current.clone()
                )
                for pair_layer, head in heads:
                    if pair_layer == layer:
                        multiplier[..., head] = 0.0
                attn.set_head_multiplier(multiplier)
            yield self
        finally:
            for block, (b, za, zm, hm) in zip(self.blocks, saved):
                block.bypass, block.zero_attn_out, block.zero_mlp_out = b, za, zm
                block.attn.set_head_multiplier(hm)


def _is_index(value: Any, size: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < size
