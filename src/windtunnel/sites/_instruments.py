"""What the :mod:`windtunnel.probes` instruments need from a model beyond its attention sites.

Five features, each implemented (or refused, with the reason) by the model's adapter, so that no
instrument needs to know a model class:

* ``"readout"``: the readout's input, the residual after the final norm (gain and bias included)
  that the unembedding reads [batch, pos, d_model] (:func:`record_readout`);
* ``"final_residual"``: the residual stream before the final norm, the final norm's input
  [batch, pos, d_model] (:func:`record_final_residual`, for the value-manifold variants of
  docs/theory.md §8.3);
* ``"token_keys"``: per layer, the pre-attention norm of the token embeddings and the key
  projection W_K [head, d_model, d_head] (:func:`token_keys`, for key orthogonality);
* ``"value_projections"``: per layer, the value projection v = x W_V + b_V, its parameters and,
  recorded, its input x and output v with dL/dv (:func:`value_projections`,
  :func:`record_values`, for the value-update probe);
* ``"ablation"``: zeroing single heads' outputs, bypassing a layer or zeroing its attention or
  MLP output (:func:`ablated`, for the ablation table and the HMM lag map).

:func:`unsupported` says, without running anything, why a model lacks a feature (None when it has
it); the other functions raise that reason as a ValueError naming the model class.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from windtunnel.sites._protocol import TokenKeys, ValueProjection, describe_model
from windtunnel.sites._record import adapter_for

__all__ = [
    "FEATURES",
    "ReadoutRecording",
    "TokenKeys",
    "ValueProjection",
    "ValueRecording",
    "ablated",
    "ablation_layout",
    "record_final_residual",
    "record_readout",
    "record_values",
    "token_keys",
    "unsupported",
    "value_projections",
]

FEATURES = ("sites", "readout", "final_residual", "token_keys", "value_projections", "ablation")
"""What :func:`unsupported` can be asked about; ``"sites"`` is :func:`record_sites` itself."""

_NO_ADAPTER = (
    "no attention-site adapter supports it. Supported: windtunnel models built on "
    "windtunnel.attention.MultiHeadAttention (TinyGPT); Hugging Face transformers PreTrainedModel "
    "classes whose attention uses the AttentionInterface; TransformerLens HookedTransformer."
)


def unsupported(model: Any, feature: str) -> str | None:
    """Why ``model`` lacks ``feature`` (one of :data:`FEATURES`), or None when it has it.

    Runs nothing and imports neither transformers nor TransformerLens.

    Raises:
        ValueError: when ``feature`` is not one of :data:`FEATURES`.
    """
    if feature not in FEATURES:
        raise ValueError(f"unsupported: feature must be one of {FEATURES}; got {feature!r}.")
    found = adapter_for(model)
    if found is None:
        return _NO_ADAPTER
    adapter, target = found
    return None if feature == "sites" else adapter.unsupported(target, feature)


def _require(owner: str, model: Any, feature: str) -> tuple[Any, nn.Module]:
    reason = unsupported(model, feature)
    if reason is not None:
        name = describe_model(model) if isinstance(model, nn.Module) else type(model).__name__
        raise ValueError(f"{owner}: {name} does not support {feature!r}: {reason}")
    return adapter_for(model)  # (adapter, the module it reads: the model or the one it wraps)


class ReadoutRecording:
    """The readout's input (or, from :func:`record_final_residual`, the final norm's input) of the
    forward pass run inside the recording block."""

    def __init__(self, model_name: str, owner: str = "record_readout") -> None:
        self.model_name = model_name
        self.owner = owner
        self._input: torch.Tensor | None = None

    def _set(self, x: torch.Tensor) -> None:
        if self._input is not None:
            raise RuntimeError(f"{self.owner}: {self.model_name} read out twice in one block; run one forward pass per block.")
        self._input = x.detach()

    @property
    def input(self) -> torch.Tensor:
        """The recorded residual, [batch, pos, d_model], detached: after the final norm for
        :func:`record_readout`, before it for :func:`record_final_residual`.

        Raises:
            RuntimeError: when no forward pass ran in the block.
        """
        if self._input is None:
            raise RuntimeError(f"{self.owner}: no forward pass of {self.model_name} ran in the block.")
        return self._input


@contextlib.contextmanager
def record_readout(model: nn.Module) -> Iterator[ReadoutRecording]:
    """Record the input of ``model``'s readout (the unembedding) during one forward pass.

    TinyGPT: the output of ``ln_final``; TransformerLens: the input of ``unembed``; Hugging Face:
    the input of ``get_output_embeddings()``. Either way the residual after the final norm, gain
    and bias included, [batch, pos, d_model].

    Raises:
        ValueError: naming the model class when its adapter has no readout (see :func:`unsupported`).
    """
    adapter, target = _require("record_readout", model, "readout")
    recording = ReadoutRecording(type(model).__name__)
    handle = adapter.readout_hook(target, recording._set)
    try:
        yield recording
    finally:
        handle.remove()


@contextlib.contextmanager
def record_final_residual(model: nn.Module) -> Iterator[ReadoutRecording]:
    """Record the residual stream before the final norm (the final norm's input) during one forward pass.

    TinyGPT: the input of ``ln_final``; TransformerLens: the input of ``ln_final`` (of ``unembed``
    when the model has no final norm). Hugging Face models are refused: the final norm has a
    different name in every architecture. Shape [batch, pos, d_model].

    Raises:
        ValueError: naming the model class when its adapter has no such hook (see :func:`unsupported`).
    """
    adapter, target = _require("record_final_residual", model, "final_residual")
    recording = ReadoutRecording(type(model).__name__, owner="record_final_residual")
    handle = adapter.final_residual_hook(target, recording._set)
    try:
        yield recording
    finally:
        handle.remove()


@torch.no_grad()
def token_keys(model: nn.Module, tokens: torch.Tensor, *, dtype: torch.dtype = torch.float64) -> tuple[TokenKeys, ...]:
    """Per layer, the pre-attention norm of the tokens' embeddings and the key projection (§8.1).

    The embeddings W_E[tokens] are cast to ``dtype`` before the norm (a model whose norm computes
    in its own dtype, as TransformerLens's does, returns that precision cast to ``dtype``).

    Shapes: tokens long [n_tokens] -> per layer normed_embeddings [n_tokens, d_model],
    w_key [head, d_model, d_head].

    Raises:
        ValueError: naming the model class when its adapter has no key map (Hugging Face models).
    """
    adapter, target = _require("token_keys", model, "token_keys")
    return adapter.token_keys(target, tokens, dtype)


def value_projections(model: nn.Module) -> tuple[ValueProjection, ...]:
    """Every layer's value projection, in layer order.

    Raises:
        ValueError: naming the model class when its adapter has no value projection (Hugging Face).
    """
    adapter, target = _require("value_projections", model, "value_projections")
    return adapter.value_projections(target)


class ValueRecording:
    """What :func:`record_values` recorded, per layer in layer order.

    Attributes:
        projections: the layers' :class:`ValueProjection`.
        inputs: x, the value projection's input [batch, pos, d_model], detached.
        values: v [batch, pos, head, d_v], detached.
        grads: dL/dv [batch, pos, head, d_v] where a backward pass reached v, else None.
    """

    def __init__(self, projections: tuple[ValueProjection, ...]) -> None:
        self.projections = projections
        n = len(projections)
        self.inputs: list[torch.Tensor | None] = [None] * n
        self.values: list[torch.Tensor | None] = [None] * n
        self.grads: list[torch.Tensor | None] = [None] * n


@contextlib.contextmanager
def record_values(model: nn.Module, *, grads: bool = False) -> Iterator[ValueRecording]:
    """Record each layer's value projection input x and output v during one forward pass, and with
    ``grads`` (and grad mode on) dL/dv during the backward pass. Works in training mode too: the
    value projection is the same with or without attention dropout.

    Raises:
        ValueError: as :func:`value_projections`.
    """
    recording = ValueRecording(value_projections(model))
    handles = []

    def reader(layer: int, projection: ValueProjection) -> tuple[Callable, Callable]:
        def on_input(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            recording.inputs[layer] = projection.input_of(args, kwargs).detach()

        def on_grad(grad: torch.Tensor) -> None:
            held = recording.grads[layer]
            recording.grads[layer] = grad.detach() if held is None else held + grad.detach()

        def on_values(_module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
            recording.values[layer] = output.detach()
            if grads and output.requires_grad:
                output.register_hook(on_grad)

        return on_input, on_values

    for layer, projection in enumerate(recording.projections):
        on_input, on_values = reader(layer, projection)
        handles.append(projection.inputs.register_forward_pre_hook(on_input, with_kwargs=True))
        handles.append(projection.values.register_forward_hook(on_values))
    try:
        yield recording
    finally:
        for handle in handles:
            handle.remove()


def ablation_layout(model: nn.Module) -> tuple[int, int]:
    """(n_layers, n_heads) that :func:`ablated` indexes.

    Raises:
        ValueError: naming the model class when its adapter cannot ablate (a Hugging Face model
            whose decoder layers cannot be found; see :func:`unsupported`).
    """
    adapter, target = _require("ablation_layout", model, "ablation")
    return adapter.ablation_layout(target)


def ablated(
    model: nn.Module,
    *,
    heads: Iterable[tuple[int, int]] = (),
    bypass: Iterable[int] = (),
    zero_attn_out: Iterable[int] = (),
    zero_mlp_out: Iterable[int] = (),
) -> contextlib.AbstractContextManager[nn.Module]:
    """Run ``model`` with heads or layers ablated inside the block (docs/theory.md §8.5); restored after.

    ``heads``: (layer, head) pairs whose output z before W_O is exactly zero; ``bypass``: layers
    made the identity; ``zero_attn_out`` / ``zero_mlp_out``: layers whose attention / MLP output
    alone is zeroed. TinyGPT: its own ``ablated``; TransformerLens: forward hooks on
    ``attn.hook_z``, ``hook_attn_out``, ``hook_mlp_out`` and the block; Hugging Face: the head's
    output zeroed inside the ``"windtunnel"`` attention implementation, forward hooks on the
    attention module, the ``mlp`` child and the decoder layer.

    Raises:
        ValueError: naming the model class when its adapter cannot ablate, or when a layer or head
            index is out of range.
    """
    adapter, target = _require("ablated", model, "ablation")
    return adapter.ablated(
        target, heads=list(heads), bypass=list(bypass), zero_attn_out=list(zero_attn_out), zero_mlp_out=list(zero_mlp_out)
    )
