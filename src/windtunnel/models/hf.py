"""Hugging Face causal language models (GPT-2, Llama, GPT-NeoX, ...) as wind-tunnel models.

:class:`HFCausalLMConfig` sizes a ``transformers`` architecture with the fields of
:class:`~windtunnel.models.TinyGPTConfig` (n_layers, n_heads, d_model, d_mlp, the tunnel's vocabulary
and positions); :class:`HFCausalLM` builds it from a config alone (``AutoConfig.for_model`` and
``AutoModelForCausalLM.from_config``: nothing is downloaded), draws every parameter from the caller's
``torch.Generator`` and maps tokens [batch, seq_len] to logits [batch, seq_len, n_outputs] as TinyGPT
does. transformers is imported only when a model is built; without it the constructor raises
``ModuleNotFoundError`` naming ``pip install 'windtunnel[hf]'``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from windtunnel._checks import Problems, check_choice, check_generator, check_number, check_positive_int
from windtunnel.models._layers import (
    OutputsAndDict,
    check_common_fields,
    check_position_ids,
    check_tokens,
)

__all__ = ["ARCHITECTURES", "HFCausalLM", "HFCausalLMConfig", "load_local_causal_lm"]

ATTN_IMPLEMENTATIONS = ("eager", "sdpa")


@dataclass(frozen=True)
class _Architecture:
    """How our sizes map onto one ``model_type``'s config keyword arguments.

    ``names`` maps our field to the config's argument (``n_kv_heads`` only for architectures with
    grouped-query attention); ``fixed`` holds the other arguments every model of the type gets (no
    sliding window); ``rotary_fraction`` is the share of each head that RoPE rotates (None:
    learned absolute positions). Every dropout is set to 0 whatever its name.
    """

    names: dict[str, str]
    fixed: dict[str, Any] = field(default_factory=dict)
    rotary_fraction: float | None = 1.0


_LLAMA_NAMES = dict(
    d_model="hidden_size",
    n_layers="num_hidden_layers",
    n_heads="num_attention_heads",
    n_kv_heads="num_key_value_heads",
    d_mlp="intermediate_size",
    n_positions="max_position_embeddings",
)
_NO_GQA = {k: v for k, v in _LLAMA_NAMES.items() if k != "n_kv_heads"}

ARCHITECTURES: dict[str, _Architecture] = {
    "gpt2": _Architecture(
        names=dict(d_model="n_embd", n_layers="n_layer", n_heads="n_head", d_mlp="n_inner", n_positions="n_positions"),
        rotary_fraction=None,
    ),
    "llama": _Architecture(names=_LLAMA_NAMES),
    "gpt_neox": _Architecture(names=_NO_GQA, rotary_fraction=0.25),
    "mistral": _Architecture(names=_LLAMA_NAMES, fixed=dict(sliding_window=None)),
    "qwen2": _Architecture(names=_LLAMA_NAMES, fixed=dict(use_sliding_window=False)),
    "qwen3": _Architecture(names=_LLAMA_NAMES, fixed=dict(use_sliding_window=False)),
    "olmo": _Architecture(names=_LLAMA_NAMES),
    "olmo2": _Architecture(names=_LLAMA_NAMES),
    "phi": _Architecture(names=_LLAMA_NAMES, rotary_fraction=0.5),
    "phi3": _Architecture(names=_LLAMA_NAMES, fixed=dict(sliding_window=None)),
    "stablelm": _Architecture(names=_LLAMA_NAMES, rotary_fraction=0.25),
    "starcoder2": _Architecture(names=_LLAMA_NAMES, fixed=dict(sliding_window=None)),
}
"""The supported ``model_type`` values and how their configs are sized. An architecture is listed
once a tiny model of it builds from our fields alone, reads its sizes back from its config, has
only parameters our initialisation covers (not Gemma: its RMSNorm gains start at 0, as 1 + w)
and passes the checks of tests/models/test_hf.py."""


@dataclass(frozen=True, kw_only=True)
class HFCausalLMConfig(OutputsAndDict):
    """Shape and options of an :class:`HFCausalLM`; the sizes are named as in TinyGPTConfig.

    Attributes:
        architecture: the transformers ``model_type``, a key of ``ARCHITECTURES``: "gpt2",
            "llama", "gpt_neox", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "phi", "phi3",
            "stablelm" or "starcoder2".
        vocab_size: number of token ids (the input embedding's rows).
        n_positions: the longest sequence: GPT-2's learned position table, and
            ``max_position_embeddings`` of the RoPE architectures.
        n_layers: decoder layers.
        n_heads: query heads per layer; must divide ``d_model`` (d_head = d_model / n_heads).
        n_kv_heads: key-value heads (grouped-query attention) for the architectures that have them;
            None means ``n_heads``. Must divide ``n_heads``.
        d_model: residual-stream width (``hidden_size``).
        d_mlp: hidden width of the feed-forward (``intermediate_size``; GPT-2's ``n_inner``).
        n_out: number of logits; None for ``vocab_size``. Anything else replaces the LM head by a
            Linear(d_model -> n_out) and needs ``tie_embeddings=False``.
        tie_embeddings: read out with the input embedding (``tie_word_embeddings``).
        head_bias: a bias on the untied readout (needs ``tie_embeddings=False``).
        attn_implementation: "sdpa" (default) or "eager"; both form the softmax pattern, so
            :mod:`windtunnel.sites` can record either.
        rope_theta: RoPE base of the rotary architectures; None keeps the architecture's default
            (10,000 for every supported one). Refused for GPT-2 (learned positions).
        init_std: standard deviation of every weight matrix and embedding at initialisation.

    Every dropout of the architecture is 0: the wind tunnels train without it, so the model's
    forward draws nothing at random.
    """

    architecture: str = "llama"
    vocab_size: int
    n_positions: int
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None
    d_model: int = 64
    d_mlp: int = 256
    n_out: int | None = None
    tie_embeddings: bool = True
    head_bias: bool = False
    attn_implementation: str = "sdpa"
    rope_theta: float | None = None
    init_std: float = 0.02

    def __post_init__(self) -> None:
        owner = "HFCausalLMConfig"
        problems = Problems(owner)
        arch = ARCHITECTURES.get(self.architecture) if isinstance(self.architecture, str) else None
        if arch is None:
            problems.add_text(
                check_choice(owner, "architecture", self.architecture, tuple(ARCHITECTURES))
                + " Other transformers model types are not supported yet."
            )
        check_common_fields(
            problems,
            self,
            owner=owner,
            fields=("vocab_size", "n_positions", "n_layers", "n_heads", "d_model", "d_mlp", "n_out",
                    "tie_embeddings", "head_bias", "init_std"),
        )
        if self.head_bias is True and self.tie_embeddings is True:
            problems.add_text(f"{owner}.head_bias needs tie_embeddings=False; got head_bias=True, tie_embeddings=True.")
        if (text := check_choice(owner, "attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)) is not None:
            problems.add_text(text)
        heads_ok = all(check_positive_int(owner, f, getattr(self, f)) is None for f in ("n_heads", "d_model"))
        if heads_ok and self.d_model % self.n_heads != 0:
            problems.add_text(f"{owner}.n_heads must divide d_model; got n_heads={self.n_heads}, d_model={self.d_model}.")
        if self.n_kv_heads is not None:
            if (text := check_positive_int(owner, "n_kv_heads", self.n_kv_heads)) is not None:
                problems.add_text(text.replace("an int", "None or an int"))
            elif heads_ok and self.n_heads % self.n_kv_heads != 0:
                problems.add_text(
                    f"{owner}.n_kv_heads must divide n_heads; got n_kv_heads={self.n_kv_heads}, n_heads={self.n_heads}."
                )
            elif arch is not None and "n_kv_heads" not in arch.names and self.n_kv_heads != self.n_heads:
                problems.add_text(
                    f"{owner}.n_kv_heads must be None or n_heads for {self.architecture}, which has no grouped-query "
                    f"attention; got n_kv_heads={self.n_kv_heads}, n_heads={self.n_heads}."
                )
        if self.rope_theta is not None:
            text = check_number(owner, "rope_theta", self.rope_theta, low=0.0, low_open=True, high=math.inf, high_open=True)
            if text is not None:
                problems.add_text(text.replace("a number", "None or a number"))
            elif arch is not None and arch.rotary_fraction is None:
                problems.add_text(
                    f"{owner}.rope_theta must be None for {self.architecture}, which learns absolute positions; "
                    f"got rope_theta={self.rope_theta!r}."
                )
        if arch is not None and arch.rotary_fraction is not None and heads_ok and self.d_model % self.n_heads == 0:
            d_head = self.d_model // self.n_heads
            rotated = d_head * arch.rotary_fraction
            if rotated != int(rotated) or int(rotated) % 2 or rotated < 2:
                multiple = int(2 / arch.rotary_fraction)
                problems.add_text(
                    f"{owner}: {self.architecture} rotates {arch.rotary_fraction:g} of each head in pairs, so "
                    f"d_head = d_model / n_heads must be a multiple of {multiple}; got d_model={self.d_model}, "
                    f"n_heads={self.n_heads} (d_head={d_head})."
                )
        problems.raise_if_any()

    @property
    def d_head(self) -> int:
        """Width of each head, d_model / n_heads."""
        return self.d_model // self.n_heads

    def transformers_config(self) -> Any:
        """The ``transformers`` config of this architecture and size (built locally, no download).

        Raises:
            ModuleNotFoundError: when transformers is not installed.
            ValueError: when the config class does not read our sizes back (it does not map cleanly).
        """
        transformers = _transformers()
        arch = ARCHITECTURES[self.architecture]
        ours = dict(d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads, d_mlp=self.d_mlp,
                    n_positions=self.n_positions, n_kv_heads=self.n_kv_heads or self.n_heads)
        sizes = {name: ours[key] for key, name in arch.names.items()}
        if "n_kv_heads" in arch.names:
            sizes["head_dim"] = self.d_head  # Qwen3 and others default to 128 otherwise
        config = transformers.AutoConfig.for_model(
            self.architecture,
            vocab_size=self.vocab_size,
            tie_word_embeddings=self.tie_embeddings,
            bos_token_id=None,  # the tunnels have no special tokens; HF's defaults lie outside our vocabulary
            eos_token_id=None,
            pad_token_id=None,
            use_cache=False,
            **sizes,
            **arch.fixed,
        )
        for name, value in config.to_dict().items():  # attention, residual, embedding, ... dropout
            if ("dropout" in name or "pdrop" in name) and isinstance(value, float):
                setattr(config, name, 0.0)
        if self.rope_theta is not None:
            config.rope_parameters = {**config.rope_parameters, "rope_theta": float(self.rope_theta)}
        asked = {**sizes, "vocab_size": self.vocab_size}
        held = {name: getattr(config, name, None) for name in asked}
        if held != asked:
            differ = [name for name in asked if held[name] != asked[name]]
            raise ValueError(
                f"HFCausalLMConfig: {type(config).__name__} does not map cleanly: asked for "
                f"{ {k: asked[k] for k in differ} }, it holds { {k: held[k] for k in differ} }."
            )
        return config


def _transformers() -> Any:
    try:
        import transformers
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "windtunnel.models.hf needs Hugging Face transformers, which is not installed; "
            "install it with: pip install 'windtunnel[hf]'"
        ) from error
    return transformers


def _is_norm(module: nn.Module) -> bool:
    """A normalisation layer, recognised as transformers' own ``_init_weights`` does: by class name."""
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "LayerNorm" in type(module).__name__ or "RMSNorm" in type(module).__name__


class HFCausalLM(nn.Module):
    """A transformers causal LM built from :class:`HFCausalLMConfig`, with TinyGPT's interface.

    ``forward(tokens) -> logits [batch, seq_len, n_outputs]``; the transformers model is ``.hf``
    (a ``PreTrainedModel``, e.g. for :func:`windtunnel.sites.record_sites`), and its state dict is
    the wrapper's under the prefix ``hf.``. The LM head is the architecture's own when
    ``n_out`` is None; otherwise a Linear(d_model -> n_out) (with ``head_bias``, a bias) replaces it.

    Initialisation (:meth:`reset_parameters`) draws from the given generator only, never from the
    global RNG, in ``named_parameters()`` order (a tied LM head is drawn once, as the embedding):
    every parameter with two or more dimensions (projection matrices, embeddings, the position
    table of GPT-2, the LM head) ~ N(0, init_std²); norm gains 1 and norm biases 0, and every
    other bias 0 (transformers' ``PreTrainedModel._init_weights`` conventions). GPT-2's extra
    1/sqrt(2 n_layers) scaling of the residual projections is not applied, so every architecture
    starts from the rule TinyGPT uses.

    Args:
        config: the architecture and sizes.
        generator: initialises every parameter (see above); None leaves them 0 (norm gains 1) for
            a state dict to be loaded.

    Raises:
        ModuleNotFoundError: when transformers is not installed (naming ``pip install 'windtunnel[hf]'``).
        ValueError: when ``config`` is not an HFCausalLMConfig, or the built model has a parameter
            that none of the rules above covers, or sizes other than those asked for.
    """

    def __init__(self, config: HFCausalLMConfig, *, generator: torch.Generator | None) -> None:
        super().__init__()
        if not isinstance(config, HFCausalLMConfig):
            raise ValueError(f"HFCausalLM.config must be an HFCausalLMConfig; got {type(config).__name__}.")
        check_generator("HFCausalLM", generator)
        transformers = _transformers()
        from transformers.initialization import no_init_weights

        self.config = config
        hf_config = config.transformers_config()
        # transformers initialises from the global RNG: skip its initialisation (ours follows), and
        # fork the RNG so that nothing the constructors might still draw leaves a trace.
        with torch.random.fork_rng(devices=[]), no_init_weights():
            model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation=config.attn_implementation)
        if config.tie_embeddings:
            model.tie_weights()  # skipped with the initialisation
        else:
            embed = model.get_input_embeddings().weight
            head = nn.utils.skip_init(
                nn.Linear, config.d_model, config.n_outputs, bias=config.head_bias, device=embed.device, dtype=embed.dtype
            )  # constructed without drawing; reset_parameters fills it
            model.set_output_embeddings(head)
        self.hf = model
        self._check_built()
        self._zero_parameters()
        if generator is not None:
            self.reset_parameters(generator)

    def _check_built(self) -> None:
        """Refuse a model whose parameters our init rules do not cover or whose sizes are not ours."""
        cfg, name = self.config, type(self.hf).__name__
        uncovered = [
            f"{prefix}.{pname}" if prefix else pname
            for prefix, module in self.hf.named_modules()
            for pname, p in module.named_parameters(recurse=False)
            if p.dim() < 2 and not (_is_norm(module) or pname == "bias")
        ]
        if uncovered:
            raise ValueError(
                f"HFCausalLM: {name} ({cfg.architecture}) has parameters windtunnel has no initialisation rule for: "
                f"{', '.join(uncovered[:5])}; this architecture is not supported."
            )
        embed = tuple(self.hf.get_input_embeddings().weight.shape)
        head = self.hf.get_output_embeddings().weight.shape
        if embed != (cfg.vocab_size, cfg.d_model) or tuple(head) != (cfg.n_outputs, cfg.d_model):
            raise ValueError(
                f"HFCausalLM: {name} was built with embedding {list(embed)} and head {list(head)}; expected "
                f"[{cfg.vocab_size}, {cfg.d_model}] and [{cfg.n_outputs}, {cfg.d_model}]."
            )

    @torch.no_grad()
    def _zero_parameters(self) -> None:
        """Weights and biases 0, norm gains 1: a defined state for a model to be loaded (the
        constructors left the memory uninitialised)."""
        for module in self.hf.modules():
            for pname, p in module.named_parameters(recurse=False):
                p.fill_(1.0 if _is_norm(module) and pname == "weight" else 0.0)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """Re-initialise every parameter from ``generator`` (rules in the class docstring).

        Raises:
            TypeError: when ``generator`` is not a torch.Generator.
        """
        check_generator("HFCausalLM.reset_parameters", generator, optional=False)
        owners = {id(p): module for module in self.hf.modules() for p in module.parameters(recurse=False)}
        for pname, p in self.hf.named_parameters():  # a tied parameter appears once
            if p.dim() >= 2:
                # drawn on the CPU generator then moved, so a model on any device gets the same weights
                p.copy_(torch.empty(p.shape, dtype=p.dtype).normal_(0.0, self.config.init_std, generator=generator))
            elif _is_norm(owners[id(p)]) and pname.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits for every position.

        Args:
            tokens: integer token ids [batch, seq_len], seq_len <= n_positions.
            generator: accepted for TinyGPT's interface; unused (the model has no dropout).
            position_ids: the position each token is at (GPT-2's table row, the RoPE angle),
                an integer tensor [batch, seq_len] or [seq_len], each in [0, n_positions); None
                (the default) is 0 .. seq_len - 1. The attention stays causal over the whole
                sequence whatever the ids (transformers would otherwise read a jump in the ids as
                the start of another packed sequence and mask across it).

        Returns:
            logits [batch, seq_len, n_outputs].

        Raises:
            ValueError: when ``tokens`` is not an integer [batch, seq_len] tensor that fits the
                positions, or ``position_ids`` has the wrong shape or a value outside them.
            TypeError: when ``generator`` is neither a torch.Generator nor None.
        """
        check_tokens("HFCausalLM", tokens, self.config.n_positions)
        check_generator("HFCausalLM.forward", generator)
        position_ids = check_position_ids("HFCausalLM", position_ids, tokens, self.config.n_positions)
        extra: dict[str, torch.Tensor] = {}
        if position_ids is not None:
            extra = {"position_ids": position_ids, "attention_mask": torch.ones_like(tokens)}
        return self.hf(input_ids=tokens, use_cache=False, **extra).logits

    def extra_repr(self) -> str:
        cfg = self.config
        return (f"architecture={cfg.architecture!r}, n_layers={cfg.n_layers}, n_heads={cfg.n_heads}, "
                f"n_kv_heads={cfg.n_kv_heads or cfg.n_heads}, d_model={cfg.d_model}, d_mlp={cfg.d_mlp}")



_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
"""Files that hold a tokenizer's vocabulary; one of them must be in a directory given to inspect."""


def load_local_causal_lm(model_dir: str | Path) -> tuple[nn.Module, Any]:
    """A Hugging Face causal LM and its tokenizer from a local directory, never running its code.

    ``from_pretrained`` on the path with ``local_files_only=True`` (no hub access),
    ``trust_remote_code=False`` (no code from the directory runs) and ``use_safetensors=True``
    (weights from ``model.safetensors`` only: a pickled ``pytorch_model.bin`` is refused), in
    float32 with the ``"sdpa"`` attention, in eval mode.

    Returns:
        (model, tokenizer): a ``PreTrainedModel`` with an LM head and the directory's tokenizer.

    Raises:
        ValueError: naming the directory when it is not a directory, has no config.json, holds no
            safetensors weights, its model type has no causal-LM class in transformers, or it has
            no tokenizer; naming the file when a weights file cannot be read.
        ModuleNotFoundError: without transformers (``pip install 'windtunnel[hf]'``).
    """
    transformers = _transformers()
    path = Path(model_dir)
    owner = "load_local_causal_lm"
    if not path.is_dir():
        raise ValueError(f"{owner}: {path} is not a directory (a local Hugging Face model directory is needed; nothing is downloaded).")
    if not (path / "config.json").is_file():
        raise ValueError(f"{owner}: {path} has no config.json; is it a Hugging Face model directory (save_pretrained)?")
    weights = sorted(p.name for p in path.glob("*.safetensors"))
    if not weights:
        pickled = sorted(p.name for p in path.glob("*.bin"))
        extra = f" It holds {', '.join(pickled)}: pickled weights, which windtunnel never loads (unpickling can run code); convert them to safetensors where you trust the file." if pickled else ""
        raise ValueError(f"{owner}: {path} holds no *.safetensors weights.{extra}")
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except ValueError as error:
        raise ValueError(f"{owner}: {path / 'config.json'}: {error}") from None
    from safetensors import SafetensorError

    try:
        with torch.random.fork_rng(devices=[]):  # weights missing from the file are drawn from the global RNG; leave the caller's alone
            model, info = transformers.AutoModelForCausalLM.from_pretrained(
                path, config=config, local_files_only=True, trust_remote_code=False, use_safetensors=True,
                dtype=torch.float32, attn_implementation="sdpa", output_loading_info=True,
            )
    except ValueError as error:
        if "Unrecognized configuration class" in str(error):
            raise ValueError(f"{owner}: {path}: model type {config.model_type!r} has no causal-LM class in transformers.") from None
        raise ValueError(f"{owner}: {path} ({', '.join(weights)}): the weights could not be loaded: {error}") from None
    except (OSError, RuntimeError, SafetensorError) as error:
        raise ValueError(f"{owner}: {path} ({', '.join(weights)}): the weights could not be read: {error}") from None
    partial = {key: sorted(map(str, info.get(key) or ())) for key in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(partial.values()):
        listed = "; ".join(f"{key.replace('_', ' ')}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
                           for key, names in partial.items() if names)
        raise ValueError(
            f"{owner}: {path} ({', '.join(weights)}) does not hold exactly the model's weights ({listed}); "
            "refused rather than run with some weights left at random."
        )
    found = [name for name in _TOKENIZER_FILES if (path / name).is_file()]
    if not found:
        raise ValueError(f"{owner}: {path} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); save it there with tokenizer.save_pretrained.")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(f"{owner}: {path} has no usable tokenizer (tokenizer.json / tokenizer_config.json): {error}") from None
    if tokenizer is None or isinstance(tokenizer, bool):
        raise ValueError(f"{owner}: {path} has no tokenizer (tokenizer.json / tokenizer_config.json).")
    return model.eval(), tokenizer
