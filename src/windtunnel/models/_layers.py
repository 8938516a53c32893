"""Parts shared by the models: norms, the GELU feed-forward, embeddings, readout, dropout, init.

Every part with parameters takes a keyword ``generator`` (None leaves its parameters at their
fixed starting values: 0 for weights and biases, 1 for norm gains) and has
``reset_parameters(generator, ...)``. Parameter names follow TransformerLens (W_E, W_pos, W_in,
b_in, W_out, b_out, W_U, b_U, w, b); hook names too (``hook_normalized``, ``hook_pre``,
``hook_post``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from windtunnel._checks import (
    Problems,
    check_choice,
    check_number,
    check_positive_int,
    close_matches,
    describe_tensor,
    is_integer_tensor,
)
from windtunnel.attention import init_normal_
from windtunnel.hooks import HookPoint

__all__ = [
    "Embed",
    "FeedForward",
    "LayerNorm",
    "OutputsAndDict",
    "PosEmbed",
    "RMSNorm",
    "TokenModelConfig",
    "Unembed",
    "check_common_fields",
    "check_tokens",
    "config_from_dict",
    "config_to_dict",
    "dropout",
    "make_norm",
    "read_out",
]

NORMS = ("rmsnorm", "layernorm")


class RMSNorm(nn.Module):
    """RMS normalisation with a learned gain: y = w ⊙ x / sqrt(mean(x²) + eps).

    ``hook_normalized`` records x / sqrt(mean(x²) + eps) before the gain (TransformerLens
    convention). Shapes: x [..., d_model] -> [..., d_model].
    """

    def __init__(self, d_model: int, *, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.w = nn.Parameter(torch.ones(d_model))
        self.hook_normalized = HookPoint()  # [batch, pos, d_model]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.w.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = (x.pow(2).mean(-1, keepdim=True) + self.eps).rsqrt()
        return self.hook_normalized(x * scale) * self.w


class LayerNorm(nn.Module):
    """Layer normalisation: y = w ⊙ (x - mean(x)) / sqrt(var(x) + eps) + b (biased variance).

    ``hook_normalized`` records the normalised x before gain and bias (TransformerLens
    convention). Shapes: x [..., d_model] -> [..., d_model].
    """

    def __init__(self, d_model: int, *, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.w = nn.Parameter(torch.ones(d_model))
        self.b = nn.Parameter(torch.zeros(d_model))
        self.hook_normalized = HookPoint()  # [batch, pos, d_model]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.w.fill_(1.0)
        self.b.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - x.mean(-1, keepdim=True)
        scale = (centred.pow(2).mean(-1, keepdim=True) + self.eps).rsqrt()
        return self.hook_normalized(centred * scale) * self.w + self.b


def make_norm(kind: str, d_model: int, *, eps: float) -> RMSNorm | LayerNorm:
    """``"rmsnorm"`` or ``"layernorm"``."""
    return RMSNorm(d_model, eps=eps) if kind == "rmsnorm" else LayerNorm(d_model, eps=eps)


class FeedForward(nn.Module):
    """Position-wise GELU MLP: y = GELU(x W_in + b_in) W_out + b_out (exact, erf GELU).

    Hooks: ``hook_pre`` (before GELU) and ``hook_post`` (after), [batch, pos, d_mlp].
    Parameters: W_in [d_model, d_mlp], W_out [d_mlp, d_model]; with ``bias`` b_in [d_mlp],
    b_out [d_model].
    """

    def __init__(
        self, d_model: int, d_mlp: int, *, bias: bool, std: float, generator: torch.Generator | None
    ) -> None:
        super().__init__()
        self.std = std
        self.W_in = nn.Parameter(torch.zeros(d_model, d_mlp))
        self.W_out = nn.Parameter(torch.zeros(d_mlp, d_model))
        self.b_in = nn.Parameter(torch.zeros(d_mlp)) if bias else None
        self.b_out = nn.Parameter(torch.zeros(d_model)) if bias else None
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp]
        self.hook_post = HookPoint()  # [batch, pos, d_mlp]
        if generator is not None:
            self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """W_in then W_out ~ N(0, std²) from ``generator``; biases 0."""
        init_normal_(self.W_in, std=self.std, generator=generator)
        init_normal_(self.W_out, std=self.std, generator=generator)
        for b in (self.b_in, self.b_out):
            if b is not None:
                b.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = x @ self.W_in
        if self.b_in is not None:
            pre = pre + self.b_in
        post = self.hook_post(nn.functional.gelu(self.hook_pre(pre)))
        out = post @ self.W_out
        return out + self.b_out if self.b_out is not None else out


def embedding_lookup(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``table[ids]``: rows of ``table`` [n_rows, d] for integer ``ids`` [...] -> [..., d].

    Through ``nn.functional.embedding`` rather than indexing, for its backward. Indexing's
    backward (``index_put_`` with accumulation) adds on the CPU with atomic float additions split
    over the threads once the gradient holds 32768 elements or more and more than one thread
    runs, so each row's sum of gradients is rounded in another order than the serial one; the
    embedding backward adds every row's gradients in the order of ``ids`` whatever the threads
    (bit for bit the serial indexing result). The replica trainer needs it: its stacked lookup
    is R times larger than a run's (tests/test_replicas.py).
    """
    return nn.functional.embedding(ids, table)


class Embed(nn.Module):
    """Token embedding table W_E [vocab, d_model]; tokens [batch, pos] -> [batch, pos, d_model]."""

    def __init__(
        self, vocab_size: int, d_model: int, *, std: float, generator: torch.Generator | None
    ) -> None:
        super().__init__()
        self.std = std
        self.W_E = nn.Parameter(torch.zeros(vocab_size, d_model))
        if generator is not None:
            self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        init_normal_(self.W_E, std=self.std, generator=generator)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # a lookup whose backward adds each row's gradients in token order on the CPU, whatever
        # the threads (:func:`embedding_lookup`)
        return embedding_lookup(self.W_E, tokens)


class PosEmbed(nn.Module):
    """Learned absolute positions W_pos [n_positions, d_model]; returns [batch, pos, d_model]."""

    def __init__(
        self, n_positions: int, d_model: int, *, std: float, generator: torch.Generator | None
    ) -> None:
        super().__init__()
        self.std = std
        self.W_pos = nn.Parameter(torch.zeros(n_positions, d_model))
        if generator is not None:
            self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        init_normal_(self.W_pos, std=self.std, generator=generator)

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Rows 0..pos-1, or the rows ``position_ids`` (int64 [batch, pos]) name."""
        batch, pos = tokens.shape
        if position_ids is None:
            return self.W_pos[:pos].expand(batch, pos, -1)  # a view, no copy
        return embedding_lookup(self.W_pos, position_ids)


class Unembed(nn.Module):
    """Untied readout: logits = x W_U (+ b_U); W_U [d_model, n_out], b_U [n_out]."""

    def __init__(
        self, d_model: int, n_out: int, *, bias: bool, std: float, generator: torch.Generator | None
    ) -> None:
        super().__init__()
        self.std = std
        self.W_U = nn.Parameter(torch.zeros(d_model, n_out))
        self.b_U = nn.Parameter(torch.zeros(n_out)) if bias else None
        if generator is not None:
            self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        init_normal_(self.W_U, std=self.std, generator=generator)
        if self.b_U is not None:
            self.b_U.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = x @ self.W_U
        return logits + self.b_U if self.b_U is not None else logits


def dropout(
    x: torch.Tensor, p: float, *, training: bool, generator: torch.Generator | None, owner: str
) -> torch.Tensor:
    """Inverted dropout whose mask comes from ``generator``, never from the global RNG.

    Identity when ``p == 0`` or not ``training``. Otherwise keeps each entry with probability
    1 - p and scales kept entries by 1 / (1 - p).

    Raises:
        ValueError: when dropout is active and ``generator`` is None or on another device type.
    """
    if not training or p == 0.0:
        return x
    if generator is None:
        raise ValueError(
            f"{owner}.forward: generator must be a torch.Generator in training mode when "
            f"dropout > 0 (dropout={p}); got None. Pass forward(..., generator=g), or call .eval()."
        )
    if generator.device.type != x.device.type:
        raise ValueError(
            f"{owner}.forward: generator must be on the device of the activations "
            f"({x.device.type}); got a generator on {generator.device.type}."
        )
    keep = torch.empty_like(x).bernoulli_(1.0 - p, generator=generator)
    return x * keep / (1.0 - p)


def check_tokens(owner: str, tokens: Any, n_positions: int | None) -> None:
    """Raise ``ValueError`` unless ``tokens`` is an integer tensor [batch, seq_len] that fits."""
    if not (is_integer_tensor(tokens) and tokens.dim() == 2 and tokens.shape[1] >= 1):
        raise ValueError(
            f"{owner}.forward: tokens must be an integer tensor of shape [batch, seq_len] with "
            f"seq_len >= 1; got {describe_tensor(tokens)}."
        )
    if n_positions is not None and tokens.shape[1] > n_positions:
        raise ValueError(
            f"{owner}.forward: tokens must have seq_len <= n_positions = {n_positions}; "
            f"got seq_len={tokens.shape[1]}."
        )


def _is_vmap_batched(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is batched by ``torch.vmap`` (its values cannot be read). torch has no
    public test for it; a torch without the private one is taken to have no batched tensors
    here, so the ids are then checked by value as everywhere else (which fails loudly under vmap)."""
    test = getattr(getattr(torch._C, "_functorch", None), "is_batchedtensor", None)
    return bool(test(tensor)) if test is not None else False


def check_position_ids(owner: str, position_ids: Any, tokens: torch.Tensor, n_positions: int) -> torch.Tensor | None:
    """``position_ids`` checked against checked ``tokens`` and made int64 [batch, seq_len];
    None stays None. Raises ``ValueError`` unless it is an integer tensor [batch, seq_len] or
    [seq_len] with every row in [0, n_positions) (the rows are not checked inside a graph being
    compiled by torch.compile, ``TrainConfig.compile``, nor for ids batched by torch.vmap, whose
    values cannot be read: :class:`~windtunnel.replicas.ReplicaTrainer` checks its stacked ids
    with this function before its vmapped call). Page-locked CPU ids are copied to the tokens'
    device without a wait."""
    if position_ids is None:
        return None
    batch, seq_len = tokens.shape
    if not (is_integer_tensor(position_ids) and position_ids.shape in ((batch, seq_len), (seq_len,))):
        raise ValueError(
            f"{owner}.forward: position_ids must be an integer tensor of shape [batch, seq_len] = "
            f"[{batch}, {seq_len}] or [seq_len]; got {describe_tensor(position_ids)}."
        )
    if torch.compiler.is_compiling():
        # the trainer's compiled step (ids in range by construction): reading the values back
        # would split the compiled graph and wait for the device every step
        return position_ids.to(device=tokens.device, dtype=torch.long).expand(batch, seq_len)
    if _is_vmap_batched(position_ids):
        # under torch.vmap (the replica trainer, which checked the stacked ids on the host)
        return position_ids.to(device=tokens.device, dtype=torch.long).expand(batch, seq_len)
    low, high = int(position_ids.min()), int(position_ids.max())
    if low < 0 or high >= n_positions:
        raise ValueError(
            f"{owner}.forward: position_ids must lie in [0, n_positions) = [0, {n_positions}); "
            f"got values in [{low}, {high}]."
        )
    # page-locked ids (the trainer's shifted positions on CUDA) are copied without a host wait
    moved = position_ids.to(device=tokens.device, dtype=torch.long, non_blocking=position_ids.is_pinned())
    return moved.expand(batch, seq_len)


def check_common_fields(
    problems: Problems,
    config: Any,
    *,
    owner: str,
    fields: tuple[str, ...],
    optional: tuple[str, ...] = (),
) -> None:
    """Checks shared by the model configs for ``fields``; those in ``optional`` may be None."""
    for field in ("vocab_size", "n_layers", "d_model", "d_mlp", "n_heads", "n_positions"):
        if field in fields:
            value = getattr(config, field)
            if field in optional and value is None:
                continue
            if (text := check_positive_int(owner, field, value)) is not None:
                problems.add_text(text)
    if "norm" in fields and (text := check_choice(owner, "norm", config.norm, NORMS)) is not None:
        problems.add_text(text)
    for field, low_open in (("norm_eps", True), ("init_std", True)):
        if field in fields:
            if (
                text := check_number(
                    owner, field, getattr(config, field), low=0.0, low_open=low_open, high=1.0
                )
            ) is not None:
                problems.add_text(text)
    if "dropout" in fields:
        text = check_number(owner, "dropout", config.dropout, low=0.0, high=1.0, high_open=True)
        if text is not None:
            problems.add_text(text)
    for field in fields:
        if field.endswith("_bias") or field.startswith("tie_") or field == "final_norm":
            value = getattr(config, field)
            if not isinstance(value, bool):
                problems.add(field, "a bool", value)
    if "n_out" in fields and config.n_out is not None:
        if (text := check_positive_int(owner, "n_out", config.n_out)) is not None:
            problems.add_text(text)
        elif config.tie_embeddings is True and config.n_out != config.vocab_size:
            problems.add_text(
                f"{owner}.n_out must be None or equal vocab_size when tie_embeddings=True; "
                f"got n_out={config.n_out!r}, vocab_size={config.vocab_size!r}."
            )


ConfigT = TypeVar("ConfigT")


class OutputsAndDict:
    """What every model config dataclass with ``vocab_size`` and ``n_out`` fields shares (a mixin of
    :class:`TokenModelConfig` and :class:`~windtunnel.models.HFCausalLMConfig`): the number of
    logits and the ``config.json`` round trip."""

    @property
    def n_outputs(self) -> int:
        """Number of logits: ``n_out``, or ``vocab_size`` when ``n_out`` is None."""
        return self.n_out if self.n_out is not None else self.vocab_size

    def to_dict(self) -> dict[str, Any]:
        """Every field by name, for ``config.json``."""
        return config_to_dict(self)

    @classmethod
    def from_dict(cls: type[ConfigT], data: dict[str, Any]) -> ConfigT:
        """Inverse of :meth:`to_dict`; an unknown key raises ``ValueError`` naming close fields."""
        return config_from_dict(cls, data)


@dataclass(frozen=True, kw_only=True)
class TokenModelConfig(OutputsAndDict):
    """The fields, checks and ``config.json`` round trip shared by the token models' configs
    (:class:`~windtunnel.models.TinyGPTConfig`, :class:`~windtunnel.models.PositionwiseMLPConfig`,
    :class:`~windtunnel.models.LSTMConfig`). Each subclass adds its own fields (the number of
    layers, the norm, the position table, ... whose defaults differ between the models), names in
    ``_optional`` those that may be None, and adds checks of its own in ``_check_more``; every
    field is checked by :func:`check_common_fields` at construction, all problems in one error.

    Attributes:
        vocab_size: number of token ids.
        d_model: residual-stream (or embedding and hidden) width.
        norm_eps: epsilon inside the norm's square root.
        dropout: drop probability (where each model applies it is in its config); needs
            ``forward(..., generator=g)`` in training.
        tie_embeddings: read out with the transpose of the token embedding.
        n_out: number of logits with an untied head; None for ``vocab_size``. With tied embeddings
            it must be None or ``vocab_size``.
        head_bias: bias on the readout.
        init_std: standard deviation of the weight matrices and embeddings at initialisation.
    """

    vocab_size: int
    d_model: int = 192
    norm_eps: float = 1e-5
    dropout: float = 0.0
    tie_embeddings: bool = True
    n_out: int | None = None
    head_bias: bool = False
    init_std: float = 0.02

    _optional: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        owner = type(self).__name__
        problems = Problems(owner)
        names = tuple(f.name for f in dataclasses.fields(self))
        check_common_fields(problems, self, owner=owner, fields=names, optional=self._optional)
        self._check_more(problems)
        problems.raise_if_any()

    def _check_more(self, problems: Problems) -> None:
        """Checks of the subclass's own (added to ``problems``); none here."""


def config_to_dict(config: Any) -> dict[str, Any]:
    """Field name -> value, JSON-ready (all fields are ints, floats, strings, bools or None)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def config_from_dict(cls: type[ConfigT], data: dict[str, Any]) -> ConfigT:
    """Build ``cls`` from a dict; unknown keys raise ``ValueError`` with the closest field."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [key for key in data if key not in names]
    if unknown:
        problems = Problems(cls.__name__)
        for key in unknown:
            problems.add_text(
                f"{key!r} is not a field of {cls.__name__};"
                + (close_matches(key, names) or " fields: " + ", ".join(names))
            )
        problems.raise_if_any()
    return cls(**data)


def make_readout(
    d_model: int, n_outputs: int, *, tie_embeddings: bool, head_bias: bool, std: float
) -> tuple[Unembed | None, nn.Parameter | None]:
    """(unembed, b_U) for :func:`read_out`: an untied :class:`Unembed`, or for a tied head an
    optional bias ``b_U`` [n_outputs] (zeros); the other slot is None."""
    if not tie_embeddings:
        return Unembed(d_model, n_outputs, bias=head_bias, std=std, generator=None), None
    return None, (nn.Parameter(torch.zeros(n_outputs)) if head_bias else None)


def read_out(
    x: torch.Tensor, *, embed: Embed, unembed: Unembed | None, b_U: torch.Tensor | None
) -> torch.Tensor:
    """Logits from the final-norm residual: ``x @ W_E^T (+ b_U)`` when tied, else ``unembed(x)``."""
    if unembed is not None:
        return unembed(x)
    logits = x @ embed.W_E.T
    return logits + b_U if b_U is not None else logits
