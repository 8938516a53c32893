"""Attention sites of Hugging Face ``transformers`` models through the public ``AttentionInterface``.

Recording registers an attention implementation named ``"windtunnel"`` (and a mask function of
the same name) and switches the model to it for the duration of the block. The implementation
calls the one the model was using (``"eager"``, the model's own ``eager_attention_forward``, or
``"sdpa"``) with the same arguments, so the model computes exactly what it computed before, and
records what that function received: queries and keys after any rotary embedding, keys and values
per key-value head, the mask (additive or boolean, or None with ``is_causal``, turned into a
boolean "may attend" mask), the scaling, and the output before the output projection, whose
gradient is u (arXiv 2512.22473). No per-architecture code: any model class whose attention
goes through ``ALL_ATTENTION_FUNCTIONS.get_interface`` works (GPT-2, Llama/Mistral/Qwen, GPT-NeoX
and the rest); fused flash/flex kernels and classes outside the interface get a clear error.

transformers is imported lazily; without it this module raises ``ModuleNotFoundError`` naming
``pip install 'windtunnel[hf]'``. A TransformerLens ``TransformerBridge`` cannot be recorded through
the model it wraps: booting the bridge replaces that model's attention modules with its own
components, which compute attention without the interface (recording then raises).

Of the instrument features (:mod:`windtunnel.sites._instruments`), two are generic: the readout
(the input of ``get_output_embeddings()``) and ablations (a head's output zeroed inside the same
``"windtunnel"`` implementation; a layer's attention module, its ``mlp`` child or the whole
decoder layer short-circuited by forward hooks, the decoder layers being found through the
attention modules' ``layer_idx``). Key maps and value projections would need per-architecture
code (GPT-2's fused ``c_attn`` Conv1D, Llama's ``k_proj``/``v_proj``, GPT-NeoX's interleaved
``query_key_value``, each family's norm), which this adapter keeps out by design, so they are
refused with that reason.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from windtunnel.sites._protocol import (
    SiteRecording,
    _RawSite,
    ablation_heads_by_layer,
    causal_violation,
    check_plain_softmax,
    non_causal_error,
)

__all__ = ["IMPLEMENTATION", "ablated", "ablation_layout", "attach", "matches", "readout_hook", "register", "unsupported"]

IMPLEMENTATION = "windtunnel"
"""The name under which the recording attention implementation is registered."""

_WRAPPABLE = ("eager", "sdpa")

# While a model is recorded: id(module) -> (recorder, module path) for each of its modules, and
# id(config) -> the attention implementation that config used before the switch.
_MODULES: dict[int, tuple[_Recorder, str]] = {}
_ORIGINAL: dict[int, str] = {}


def _transformers() -> Any:
    try:
        import transformers
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "windtunnel.sites.hf needs Hugging Face transformers, which is not installed; "
            "install it with: pip install 'windtunnel[hf]'"
        ) from error
    return transformers


def matches(model: Any) -> bool:
    """True for a ``transformers.PreTrainedModel`` (checked without importing transformers)."""
    transformers = sys.modules.get("transformers")
    if transformers is None:
        return False
    return isinstance(model, transformers.PreTrainedModel)


_NO_WEIGHTS = (
    "the Hugging Face adapter sees attention only through transformers' AttentionInterface (q, k, "
    "v after their projections) and keeps per-architecture code out, so it knows no model's {what}; "
    "{instrument} is available for TinyGPT and TransformerLens HookedTransformer models."
)
_REFUSED = {
    "token_keys": _NO_WEIGHTS.format(what="key projection W_K or pre-attention norm", instrument="key orthogonality"),
    "value_projections": _NO_WEIGHTS.format(what="value projection W_V or its input", instrument="the value-update probe"),
    "final_residual": _NO_WEIGHTS.format(what="final norm (its name differs per architecture)", instrument="the residual before the final norm"),
}


def _layers(model: nn.Module) -> tuple[list[tuple[nn.Module, nn.Module]], str | None]:
    """[(decoder layer, its attention module)] in layer order, or ([], why not).

    Found without per-architecture names: the attention modules are the modules carrying an int
    ``layer_idx`` (transformers gives every attention module its layer index), one for each of
    0 .. num_hidden_layers - 1, and each one's decoder layer is the element of a ``ModuleList``
    that holds it.
    """
    n_layers = getattr(model.config, "num_hidden_layers", None)
    if not isinstance(n_layers, int) or n_layers < 1:
        return [], "its config has no num_hidden_layers."
    by_layer: dict[int, list[tuple[str, nn.Module]]] = {}
    for path, module in model.named_modules():
        index = getattr(module, "layer_idx", None)
        if isinstance(index, int) and not isinstance(index, bool) and hasattr(module, "config"):
            by_layer.setdefault(index, []).append((path, module))
    if sorted(by_layer) != list(range(n_layers)) or any(len(found) != 1 for found in by_layer.values()):
        return [], (
            f"its attention modules are found by their layer_idx (one per layer 0..{n_layers - 1}); "
            f"found layer indices {sorted(by_layer)} with {sum(map(len, by_layer.values()))} modules."
        )
    lists = {path: module for path, module in model.named_modules() if isinstance(module, nn.ModuleList)}
    layers = []
    for index in range(n_layers):
        path, attention = by_layer[index][0]
        parts = path.split(".")
        owner = next(
            (
                lists[".".join(parts[:cut - 1])][int(parts[cut - 1])]
                for cut in range(len(parts) - 1, 1, -1)
                if ".".join(parts[:cut - 1]) in lists and parts[cut - 1].isdigit()
            ),
            None,
        )
        if owner is None:
            return [], f"its attention module {path!r} is not inside a ModuleList of decoder layers."
        layers.append((owner, attention))
    return layers, None


def _n_heads(model: nn.Module) -> int | None:
    n = getattr(model.config, "num_attention_heads", None)
    return n if isinstance(n, int) and n > 0 else None


def unsupported(model: nn.Module, feature: str) -> str | None:
    """Why ``model`` lacks ``feature``, or None (see :func:`windtunnel.sites.unsupported`)."""
    if feature == "readout":
        if isinstance(model.get_output_embeddings(), nn.Module):
            return None
        return "it has no output embedding (get_output_embeddings() is None), as a base model without a language-model head."
    if feature == "ablation":
        layers, why = _layers(model)
        if why is not None:
            return "ablations find the decoder layers without per-architecture code, and " + why
        if _n_heads(model) is None:
            return "its config has no num_attention_heads."
        missing = [i for i, (layer, _) in enumerate(layers) if not isinstance(getattr(layer, "mlp", None), nn.Module)]
        if missing:
            return f"zeroing the MLP output needs a child module named 'mlp' in each decoder layer; layers {missing} have none."
        return None
    return _REFUSED.get(feature)


def ablation_layout(model: nn.Module) -> tuple[int, int]:
    """(n_layers, n_heads) from the model's config: num_hidden_layers, num_attention_heads."""
    return int(model.config.num_hidden_layers), int(model.config.num_attention_heads)


class _Ablator:
    """Zeroes chosen heads' outputs (before the output projection) as the attention function returns them."""

    def __init__(self, heads_by_layer: dict[int, list[int]], layer_of: dict[int, int]) -> None:
        self.heads_by_layer = heads_by_layer
        self.layer_of = layer_of  # id(attention module) -> layer index
        self.calls = 0
        self.default = "sdpa"

    def check(self, module: nn.Module, path: str, args: tuple, kwargs: dict[str, Any]) -> None:
        return None

    def process(
        self, module: nn.Module, path: str, original: str, query: torch.Tensor, key: torch.Tensor,
        value: torch.Tensor, attention_mask: Any, output: torch.Tensor, weights: Any, kwargs: dict[str, Any],
    ) -> torch.Tensor:
        self.calls += 1
        heads = self.heads_by_layer.get(self.layer_of.get(id(module), -1))
        if not heads:
            return output
        # output [batch, query_pos, head, d_head]: the heads' z, exactly 0 for the ablated ones
        return output.index_fill(2, torch.tensor(heads, device=output.device), 0.0)


def _first_output(output: Any, value: torch.Tensor) -> Any:
    """``output`` with its hidden states (the tensor itself, or a tuple's first item) replaced."""
    if isinstance(output, tuple):
        return (value, *output[1:])
    return value


@contextlib.contextmanager
def ablated(
    model: nn.Module, *, heads: list, bypass: list, zero_attn_out: list, zero_mlp_out: list
) -> Iterator[nn.Module]:
    """Ablations on a Hugging Face model, with no per-architecture code: a head's output before
    the output projection set to exactly 0 through the ``"windtunnel"`` attention implementation;
    a layer's attention module or ``mlp`` child returning zeros; a decoder layer returning its
    input hidden states (bypass). Restored on exit.

    Raises:
        ValueError: when a layer or head index is out of range, or as :func:`attach` when the
            model's attention cannot be wrapped.
    """
    n_layers, n_heads = ablation_layout(model)
    by_layer = ablation_heads_by_layer(
        f"{type(model).__name__}.ablated", n_layers, n_heads, heads=heads, bypass=bypass,
        zero_attn_out=zero_attn_out, zero_mlp_out=zero_mlp_out,
    )
    layers, _ = _layers(model)

    def zero(_m: nn.Module, _args: tuple, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        return _first_output(output, torch.zeros_like(hidden))

    def identity(_m: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        return _first_output(output, args[0] if args else kwargs["hidden_states"])

    handles = [layers[l][1].register_forward_hook(zero) for l in zero_attn_out]
    handles += [layers[l][0].mlp.register_forward_hook(zero) for l in zero_mlp_out]
    handles += [layers[l][0].register_forward_hook(identity, with_kwargs=True) for l in bypass]
    try:
        if by_layer:
            ablator = _Ablator(by_layer, {id(attention): l for l, (_, attention) in enumerate(layers)})
            with _switched(model, ablator, f"{type(model).__name__}.ablated", count_layers=lambda: ablator.calls):
                yield model
        else:
            yield model
    finally:
        for handle in handles:
            handle.remove()


def readout_hook(model: nn.Module, sink: Any) -> Any:
    """Pass the input of ``get_output_embeddings()`` (the final-norm hidden states) to ``sink``."""
    return model.get_output_embeddings().register_forward_pre_hook(lambda _m, args: sink(args[0]))


def register() -> None:
    """Register the ``"windtunnel"`` attention and mask functions with transformers (idempotent).

    Raises:
        ModuleNotFoundError: when transformers is not installed.
    """
    _transformers()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, _attention)
    AttentionMaskInterface.register(IMPLEMENTATION, _mask)


def _configs(model: nn.Module) -> list[Any]:
    """Every config object the model's modules read, with nested sub-configs, once each."""
    found: dict[int, Any] = {}
    pending = [model.config] + [m.config for m in model.modules() if hasattr(m, "config")]
    while pending:
        config = pending.pop()
        if id(config) in found or not hasattr(config, "_attn_implementation"):
            continue
        found[id(config)] = config
        for key in getattr(config, "sub_configs", {}) or {}:
            sub = getattr(config, key, None)
            if sub is not None:
                pending.append(sub)
    return list(found.values())


def _set_implementation(config: Any, value: str | None) -> None:
    if hasattr(config, "_attn_implementation_internal"):
        config._attn_implementation_internal = value
    else:
        config._attn_implementation = value


@contextlib.contextmanager
def attach(model: nn.Module, recording: SiteRecording, *, causal_only: bool, grads: bool) -> Iterator[None]:
    """Switch ``model`` to the ``"windtunnel"`` implementation and fill ``recording``; restore after.

    Raises:
        ValueError: naming the model class when it runs a fused kernel (flash, flex, paged) rather
            than ``"eager"`` or ``"sdpa"``, or when its attention does not go through the
            AttentionInterface.
        RuntimeError: when the model is already being recorded or ablated.
    """
    recorder = _Recorder(recording, causal_only=causal_only, grads=grads)
    with _switched(model, recorder, "record_sites", count_layers=lambda: len(recording)):
        yield


@contextlib.contextmanager
def _switched(model: nn.Module, handler: Any, owner: str, *, count_layers: Any) -> Iterator[None]:
    """Run ``model``'s attention through the ``"windtunnel"`` implementation, which calls the
    implementation the model used and passes its inputs and output to ``handler.process`` (whose
    return value is the output the model gets); restore the model's implementation after.

    ``count_layers()`` says how many attention calls the handler saw: a forward pass with none
    means the model's attention bypasses the interface, which is an error, not a silent no-op.
    """
    register()
    name = type(model).__name__
    current = model.config._attn_implementation
    if current not in _WRAPPABLE:
        raise ValueError(
            f"{owner}: {name} runs attn_implementation={current!r}; windtunnel wraps "
            f"{' or '.join(map(repr, _WRAPPABLE))} attention only (fused kernels never form the "
            "pattern). Call model.set_attn_implementation('sdpa') first."
        )
    if not model._can_set_attn_implementation():
        raise ValueError(
            f"{owner}: {name} does not route its attention through transformers' "
            "AttentionInterface (ALL_ATTENTION_FUNCTIONS), so its attention cannot be wrapped; "
            "use a model class that uses the interface, or build the sites yourself "
            "(windtunnel.sites.AttentionSite)."
        )
    if any(id(m) in _MODULES for m in model.modules()):
        raise RuntimeError(
            f"{owner}: {name} is already being recorded or ablated; nest no record_sites or "
            "ablated blocks on a Hugging Face model."
        )
    configs = _configs(model)
    before = {id(c): (c, c._attn_implementation) for c in configs}
    for path, module in model.named_modules():
        _MODULES[id(module)] = (handler, path)
    forward_calls = [0]
    counter = model.register_forward_pre_hook(lambda *_: forward_calls.__setitem__(0, forward_calls[0] + 1))
    try:
        model.set_attn_implementation(IMPLEMENTATION)
        if model.config._attn_implementation != IMPLEMENTATION:
            raise ValueError(
                f"{owner}: {name} refused attn_implementation={IMPLEMENTATION!r}; its attention "
                "does not go through transformers' AttentionInterface."
            )
        for config, original in before.values():
            if config._attn_implementation == IMPLEMENTATION:
                if original not in _WRAPPABLE:
                    raise ValueError(
                        f"{owner}: a sub-model of {name} runs attn_implementation={original!r}; "
                        "call model.set_attn_implementation('sdpa') first."
                    )
                _ORIGINAL[id(config)] = original
        handler.default = current
        yield
        if forward_calls[0] and not count_layers():
            raise ValueError(
                f"{owner}: {name} ran a forward pass but none of its attention layers called "
                "transformers' AttentionInterface (were they replaced, e.g. by a TransformerLens "
                "TransformerBridge?); nothing was recorded or ablated."
            )
    finally:
        counter.remove()
        for config, original in before.values():
            if config._attn_implementation != original:
                _set_implementation(config, original)
            _ORIGINAL.pop(id(config), None)
        for module in model.modules():
            _MODULES.pop(id(module), None)


def _outside(what: str) -> RuntimeError:
    return RuntimeError(
        f"the {IMPLEMENTATION!r} attention {what} ran outside windtunnel.sites.record_sites; it "
        "exists only for recording. Reset the model with model.set_attn_implementation('sdpa')."
    )


def _mask(*args: Any, **kwargs: Any) -> Any:
    """The mask function of the implementation the model used before recording, unchanged."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    config = kwargs.get("config")
    original = _ORIGINAL.get(id(config))
    if original is None:
        raise _outside("mask function")
    return ALL_MASK_ATTENTION_FUNCTIONS[original](*args, **kwargs)


def _original_function(module: nn.Module, original: str) -> Any:
    source = sys.modules.get(type(module).__module__)
    if original == "eager":
        eager = getattr(source, "eager_attention_forward", None)
        if eager is None:
            raise ValueError(
                f"record_sites: {type(module).__name__} has no module-level eager_attention_forward "
                "to wrap; call model.set_attn_implementation('sdpa') before recording."
            )
        return eager
    from transformers import AttentionInterface

    interface = getattr(source, "ALL_ATTENTION_FUNCTIONS", None)
    if not isinstance(interface, AttentionInterface):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as interface
    return interface[original]


def _attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *args: Any,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the model's own implementation; the handler (recorder or ablator) sees what it
    received and returned, and gives the output the model gets."""
    entry = _MODULES.get(id(module))
    if entry is None:
        raise _outside("implementation")
    handler, path = entry
    original = _ORIGINAL.get(id(getattr(module, "config", None)), handler.default)
    handler.check(module, path, args, kwargs)
    output, weights = _original_function(module, original)(module, query, key, value, attention_mask, *args, **kwargs)
    output = handler.process(module, path, original, query, key, value, attention_mask, output, weights, kwargs)
    return output, weights


def _bool_mask(
    attention_mask: torch.Tensor | None,
    *,
    original: str,
    module: nn.Module,
    kwargs: dict[str, Any],
    t_q: int,
    t_k: int,
    device: torch.device,
    where: str,
) -> torch.Tensor:
    """The allowed set [batch or 1, head or 1, query_pos, key_pos] the implementation applied."""
    if attention_mask is None:
        is_causal = kwargs.get("is_causal")
        if is_causal is None:
            is_causal = getattr(module, "is_causal", True)
        allowed = torch.ones(t_q, t_k, dtype=torch.bool, device=device)
        if original == "sdpa" and is_causal and t_q > 1:
            allowed = allowed.tril()  # what torch's is_causal=True applies (top-left aligned)
        return allowed[None, None]
    mask = attention_mask
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    mask = mask[..., :t_k]  # some models pass a mask longer than the keys and slice it themselves
    if mask.dim() != 4 or mask.shape[-2] not in (1, t_q) or mask.shape[-1] != t_k:
        raise ValueError(
            f"record_sites: the attention mask of {where} has shape {list(attention_mask.shape)}; "
            f"expected [batch, 1 or head, {t_q} or 1, {t_k}]."
        )
    if mask.dtype == torch.bool:
        allowed = mask
    else:
        # an additive mask: 0 where allowed, the dtype's minimum (or -inf) where masked
        allowed = mask > torch.finfo(mask.dtype).min / 2
        if bool((mask.masked_fill(~allowed, 0) != 0).any()):
            raise ValueError(
                f"record_sites: the additive attention mask of {where} carries a score bias (values "
                "other than 0 and -inf), which is outside the routing law of arXiv 2512.22473."
            )
    return allowed.expand(allowed.shape[0], allowed.shape[1], t_q, t_k)


class _Recorder:
    """Turns each call of the attention function into one recorded site."""

    def __init__(self, recording: SiteRecording, *, causal_only: bool, grads: bool) -> None:
        self.recording = recording
        self.causal_only = causal_only
        self.grads = grads
        self.default = "sdpa"

    def check(self, module: nn.Module, path: str, args: tuple, kwargs: dict[str, Any]) -> None:
        """Refuse what the routing law does not cover, before the attention runs."""
        for feature in ("softcap", "position_bias", "s_aux"):
            if kwargs.get(feature) is not None:
                raise ValueError(
                    f"record_sites: {type(module).__name__} at {path!r} passes {feature}=...; soft-capped, "
                    "biased or sink attention is outside the routing law of arXiv 2512.22473."
                )
        if args and "scaling" not in kwargs:
            raise ValueError(
                f"record_sites: {type(module).__name__} at {path!r} passes extra positional arguments to "
                "its attention function; windtunnel reads scaling and dropout by keyword only."
            )

    def process(self, *args: Any) -> torch.Tensor:
        """Record the call as a site; the output is returned unchanged."""
        self.record(*args)
        return args[7]

    def record(
        self,
        module: nn.Module,
        path: str,
        original: str,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        output: torch.Tensor,
        weights: torch.Tensor | None,
        kwargs: dict[str, Any],
    ) -> None:
        where = f"{self.recording.model_name} layer {path!r}"
        if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
            raise ValueError(
                f"record_sites: {where} passed query/key/value of shapes {list(query.shape)}, "
                f"{list(key.shape)}, {list(value.shape)}; expected [batch, head, pos, d_head]."
            )
        batch, n_heads, t_q, d_head = query.shape
        n_kv, t_k, d_v = key.shape[1], key.shape[2], value.shape[-1]
        if n_heads % n_kv or tuple(output.shape) != (batch, t_q, n_heads, d_v):
            raise ValueError(
                f"record_sites: {where} returned an output of shape {list(output.shape)} for "
                f"{n_heads} query and {n_kv} key-value heads; expected [batch, query_pos, head, d_head] "
                f"= {[batch, t_q, n_heads, d_v]}."
            )
        scaling = kwargs.get("scaling")
        scale = float(scaling) if scaling is not None else d_head**-0.5
        dropout = float(kwargs.get("dropout") or 0.0)
        if original == "eager" and not module.training:
            dropout = 0.0  # eager applies dropout only in training mode
        mask = _bool_mask(
            attention_mask,
            original=original,
            module=module,
            kwargs=kwargs,
            t_q=t_q,
            t_k=t_k,
            device=query.device,
            where=where,
        )
        if self.causal_only and causal_violation(mask):
            raise non_causal_error(self.recording.model_name, path)
        n_rep = n_heads // n_kv
        kv_head_of = tuple(h // n_rep for h in range(n_heads))  # HF's repeat_kv: head h reads h // n_rep
        q, k, v = query.detach(), key.detach(), value.detach()
        has_weights = isinstance(weights, torch.Tensor) and tuple(weights.shape) == (batch, n_heads, t_q, t_k)
        # with attention dropout the output and eager's weights are the dropped-out ones: nothing
        # to compare, and the pattern kept is the model's (eager) or the pre-dropout one (sdpa)
        computed = check_plain_softmax(
            self.recording.model_name,
            path,
            q=q,
            k=k.repeat_interleave(n_rep, dim=1),
            v=v.repeat_interleave(n_rep, dim=1),
            mask=mask,
            scale=scale,
            z=output.detach().transpose(1, 2) if dropout == 0.0 else None,
            pattern=weights.detach() if has_weights and dropout == 0.0 else None,
        )
        pattern = weights.detach() if has_weights else computed
        layer = getattr(module, "layer_idx", None)
        raw = _RawSite(
            name=path,
            layer=layer if isinstance(layer, int) else len(self.recording),
            q=q.transpose(1, 2),
            k=k.transpose(1, 2),
            v=v.transpose(1, 2),
            mask=mask,
            scale=scale,
            pattern=pattern,
            z=output.detach(),
            kv_head_of=kv_head_of,
            dropout=dropout,
        )
        head_major = lambda grad: grad.transpose(1, 2)  # noqa: E731  [batch, head, pos, d] -> site layout
        self.recording._add(
            raw,
            {"q": query, "k": key, "v": value, "z": output},
            layouts={"q": head_major, "k": head_major, "v": head_major},
            grads=self.grads,
        )
