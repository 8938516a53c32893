"""One entry point, :func:`record_sites`, that finds the adapter for a model and records its sites.

Adapters are tried in order: windtunnel's own attention modules (TinyGPT), TransformerLens
``HookedTransformer``, Hugging Face ``PreTrainedModel``. A module that is none of these but holds
exactly one HookedTransformer or PreTrainedModel (a wrapper such as
:class:`windtunnel.models.HFCausalLM`, which maps tokens to logits around a Hugging Face model) is
recorded through the model it holds while the wrapper is called. Recording is opt-in: outside a
``record_sites`` block no hook is registered and the model runs exactly as it was built.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn

from windtunnel.sites import hf, tinygpt, tl
from windtunnel.sites._protocol import SiteRecording, describe_model

__all__ = ["adapter_for", "record_sites"]


def adapter_for(model: Any) -> tuple[Any, nn.Module] | None:
    """(adapter module, the module it reads) for ``model``, or None when no adapter supports it.

    The module read is ``model`` itself, or for a wrapper the one HookedTransformer or
    PreTrainedModel it holds (outermost; the sub-models a PreTrainedModel holds do not count).
    """
    if not isinstance(model, nn.Module):
        return None
    for adapter in (tinygpt, tl, hf):
        if adapter.matches(model):
            return adapter, model
    held: list[tuple[str, Any, nn.Module]] = []
    for path, module in model.named_modules():
        if any(path.startswith(outer + ".") for outer, _, _ in held):
            continue
        for adapter in (tl, hf):
            if adapter.matches(module):
                held.append((path, adapter, module))
                break
    if len(held) == 1:
        return held[0][1], held[0][2]
    return None


@contextlib.contextmanager
def record_sites(model: nn.Module, *, causal_only: bool = True, grads: bool = True) -> Iterator[SiteRecording]:
    """Record every attention layer of one forward pass (and its backward) as an AttentionSite.

    Example (any supported model; ``loss_fn`` is yours)::

        model.eval()
        with record_sites(model) as recording:
            loss_fn(model(tokens)).backward()
        for site in recording.sites:
            law = routing_law(site)  # dL/ds, dL/dq, dL/dk, dL/dv of every head
            errors = model_gradient_errors(site, law)  # against autograd at q, k, v

    Run one forward pass per block; ``backward()`` may run inside the block or after it. u =
    dL/dz exists only when the forward ran with grad mode on and a backward pass reached it.
    Attention dropout must be off (``model.eval()``) for the law to apply. Gradient
    checkpointing re-runs layers during backward and so is refused (a layer runs twice).

    Args:
        model: a windtunnel model built on :class:`windtunnel.attention.MultiHeadAttention`
            (TinyGPT), a TransformerLens ``HookedTransformer``, a Hugging Face
            ``PreTrainedModel`` whose attention goes through the ``AttentionInterface`` (eager or
            sdpa), or a module holding exactly one of the last two (a wrapper).
        causal_only: refuse a layer whose queries may attend to later keys (an encoder); pass
            False to record bidirectional attention.
        grads: register gradient hooks for u and the q/k/v gradients (when grad mode is on).

    Raises:
        TypeError: naming the model's class when no adapter supports it.
        ValueError: naming the class when a supported family cannot be recorded (a fused
            attention kernel, no AttentionInterface support, a non-causal layer with
            ``causal_only``, attention that is not plain softmax over q·k).
        RuntimeError: when one layer runs twice in a block.
        ModuleNotFoundError: for a Hugging Face model without transformers installed
            (``pip install 'windtunnel[hf]'``).
    """
    name = describe_model(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"record_sites: model must be a torch.nn.Module; got {name}.")
    recording = SiteRecording(type(model).__name__)
    found = adapter_for(model)
    if found is None:
        raise TypeError(
            f"record_sites: no attention-site adapter supports {name}. Supported: windtunnel models "
            "built on windtunnel.attention.MultiHeadAttention (TinyGPT); Hugging Face transformers "
            "PreTrainedModel classes whose attention uses the AttentionInterface (pip install "
            "'windtunnel[hf]'); TransformerLens HookedTransformer (pip install 'windtunnel[tl]'). "
            "For another model, build windtunnel.sites.AttentionSite from its q, k, v, mask and u."
        )
    adapter, target = found
    with adapter.attach(target, recording, causal_only=causal_only, grads=grads):
        yield recording
