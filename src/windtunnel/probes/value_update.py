"""The optimiser's realised change of every head's value vectors against their pull (docs/theory.md §8.4)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import windtunnel.sites as sites
from windtunnel._checks import must
from windtunnel.hooks import eval_mode
from windtunnel.probes._common import Row, _require, _row

__all__ = ["ValueUpdateProbe", "ValueUpdateStats"]


@dataclass(frozen=True)
class ValueUpdateStats:
    """The optimiser's realised change of every head's value vectors against their pull (§8.4).

    On one training step: the pull is -dL/dv_j = -(AᵀU)_j, the responsibility-weighted sum of the
    upstream gradients (docs/theory.md §2.3), taken from the step's own backward; the realised change is
    ΔV = V(θ_after) - V(θ_before) on the same tokens and positions (both in eval mode). Paper II's
    value law is Δv_j = -η (AᵀU)_j for a step taken on the value vectors themselves; a parametric
    model realises it through ΔW_V (and the layers below), filtered by the optimiser's
    preconditioning. All statistics are [layer, head]; value vectors j run over (sequence, position)
    and count only where the pull is nonzero.

    Attributes:
        lr: the learning rate η of the step.
        pull_cosine: mean over value vectors of cos(Δv_j, -dL/dv_j); 1 when every value moved
            along its pull.
        pull_cosine_all: the cosine between ΔV and -AᵀU as whole [value, d_head] matrices (the
            Frobenius inner product over the norms); under plain SGD its ``own_`` version is
            never negative, as x ΔW_V · (-AᵀU) = lr ‖XᵀAᵀU‖² (and likewise for b_V).
        norm_ratio: ‖ΔV‖_F / (η ‖AᵀU‖_F); 1 for a plain gradient step on the value vectors.
        own_pull_cosine, own_pull_cosine_all, own_norm_ratio: the same for the part of ΔV due
            to the head's own W_V and b_V at fixed input, x_j ΔW_V + Δb_V (x the value
            projection's input, TinyGPT's ln1 output, before the step).
        gradient_pull_cosine, gradient_pull_cosine_all: the same cosines for the change a plain
            gradient step on W_V and b_V would have made, -x_j dL/dW_V - dL/db_V (the step's
            gradient, after clipping, which does not change its direction). Beside the ``own_``
            cosines they separate what the weight tying does to the value law (this) from what
            the optimiser does (momentum, per-coordinate scaling, weight decay).
    """

    lr: float
    pull_cosine: torch.Tensor
    pull_cosine_all: torch.Tensor
    norm_ratio: torch.Tensor
    own_pull_cosine: torch.Tensor
    own_pull_cosine_all: torch.Tensor
    own_norm_ratio: torch.Tensor
    gradient_pull_cosine: torch.Tensor
    gradient_pull_cosine_all: torch.Tensor

    _PER_HEAD = (
        "pull_cosine",
        "pull_cosine_all",
        "norm_ratio",
        "own_pull_cosine",
        "own_pull_cosine_all",
        "own_norm_ratio",
        "gradient_pull_cosine",
        "gradient_pull_cosine_all",
    )

    def rows(self, step: int) -> list[Row]:
        """Tidy telemetry rows, metrics ``value_update_<field>``."""
        return [
            _row(step, f"value_update_{name}", v, layer, h)
            for name in self._PER_HEAD
            for layer, per_head in enumerate(getattr(self, name).tolist())
            for h, v in enumerate(per_head)
        ]


def _value_pull_agreement(delta: torch.Tensor, pull: torch.Tensor, lr: float) -> tuple[torch.Tensor, ...]:
    """Cosines and norm ratio of ``delta`` against ``-pull``, both [batch, pos, head, d_head];
    returns three [head] tensors (mean cosine over values, whole-matrix cosine, norm ratio)."""
    delta, pull = delta.double(), pull.double()
    pull_norm = pull.norm(dim=-1)  # [batch, pos, head]
    live = pull_norm > 0
    cos = torch.nn.functional.cosine_similarity(delta, -pull, dim=-1, eps=1e-300)
    n_live = live.sum((0, 1)).clamp_min(1)
    mean_cos = (cos * live).sum((0, 1)) / n_live
    delta_fro, pull_fro = delta.pow(2).sum((0, 1, 3)).sqrt(), pull.pow(2).sum((0, 1, 3)).sqrt()
    whole = -(delta * pull).sum((0, 1, 3)) / (delta_fro * pull_fro).clamp_min(1e-300)
    ratio = delta_fro / (lr * pull_fro).clamp_min(1e-300)
    return mean_cos, whole, ratio


def _value_forward(model: nn.Module, tokens: torch.Tensor, position_ids: torch.Tensor | None) -> sites.ValueRecording:
    """Every layer's value vectors v [batch, pos, head, d_head] and the value projection's input x
    [batch, pos, d_model] (TinyGPT: the output of ln1), from one forward pass in eval mode."""
    with torch.no_grad(), eval_mode(model), sites.record_values(model) as recording:
        model(tokens, **({} if position_ids is None else {"position_ids": position_ids}))
    return recording


def _read_through_sites(model: nn.Module) -> bool:
    """True for a model the Hugging Face adapter reads (no value projections by design)."""
    from windtunnel.sites import hf
    from windtunnel.sites._record import adapter_for

    found = adapter_for(model)
    return found is not None and found[0] is hf


def _site_values(model: nn.Module, tokens: torch.Tensor, position_ids: torch.Tensor | None) -> list[torch.Tensor]:
    """Every layer's values as its attention received them, [batch, pos, kv_head, d_head], from
    one forward pass in eval mode recorded through :func:`windtunnel.sites.record_sites`."""
    with torch.no_grad(), eval_mode(model), sites.record_sites(model, grads=False) as recording:
        model(tokens, **({} if position_ids is None else {"position_ids": position_ids}))
    return [site.v for site in recording.sites]


class ValueUpdateProbe:
    """Measures :class:`ValueUpdateStats` on chosen training steps; used by the Trainer.

    Wrap the step's forward and backward in :meth:`watch`, take the optimiser step, then call
    :meth:`finish`::

        with probe.watch(model, tokens, position_ids):
            loss_fn(model(tokens, position_ids=position_ids)).backward()
        optimizer.step()
        stats = probe.finish(model, lr)

    The extra forward passes run in eval mode and draw no randomness, so watching a step does not
    change the training run. The value projections come from the model's adapter
    (:func:`windtunnel.sites.value_projections`): TinyGPT and TransformerLens ``HookedTransformer``
    (per key-value head under grouped-query attention); Hugging Face models through their
    attention sites, without the parts that need W_V.
    """

    def __init__(self) -> None:
        self._pending: tuple[Any, ...] | None = None

    @contextlib.contextmanager
    def watch(self, model: nn.Module, tokens: torch.Tensor, position_ids: torch.Tensor | None = None) -> Iterator[None]:
        """Record the values before the step and their gradient during the step's backward.

        A model whose adapter has attention sites but no value projection (a Hugging Face model)
        is read through its sites: v and dL/dv as the attention received them, per key-value
        head. Its realised change and pull are measured as for the others; the ``own_`` and
        ``gradient_`` statistics, which need W_V, are NaN.

        Raises:
            ValueError: naming the model class when it has neither value projections nor attention
                sites, or has value projections it cannot read (a TinyGPT inside
                ``model.ablated(heads=...)``; see :func:`windtunnel.sites.unsupported`).
        """
        if sites.unsupported(model, "value_projections") is not None and _read_through_sites(model):
            before_v = _site_values(model, tokens, position_ids)
            with sites.record_sites(model, grads=True) as step:
                yield
            self._pending = (model, tokens, position_ids, before_v, None, step)
            return
        _require("ValueUpdateProbe.watch", model, "value_projections")
        before = _value_forward(model, tokens, position_ids)
        weights = [
            (p.weight.detach().clone(), None if p.bias is None else p.bias.detach().clone()) for p in before.projections
        ]
        with sites.record_values(model, grads=True) as step:
            yield
        self._pending = (model, tokens, position_ids, before, weights, step)

    def finish(self, model: nn.Module, lr: float) -> ValueUpdateStats:
        """Compare the realised change of the values with their pull, after the optimiser step.

        Raises:
            ValueError: when ``lr`` is not positive (the norm ratio divides by it).
            RuntimeError: without a watched step, or when the step's backward did not reach the
                values (no gradient at v was recorded).
        """
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ValueError(must("ValueUpdateProbe.finish", "lr", "a positive finite learning rate", lr))
        if self._pending is None:
            raise RuntimeError("ValueUpdateProbe.finish: no watched step; wrap the forward and backward in watch() first.")
        watched, tokens, position_ids, before, weights, step = self._pending
        self._pending = None
        if model is not watched:
            raise RuntimeError("ValueUpdateProbe.finish: called with another model than the watched one.")
        stats: dict[str, list[torch.Tensor]] = {name: [] for name in ValueUpdateStats._PER_HEAD}
        if weights is None:  # read through the attention sites: no W_V, so no own_/gradient_ parts
            after_v = _site_values(watched, tokens, position_ids)
            for site, v_before, v_after in zip(step.sites, before, after_v):
                if site.v_grad is None:
                    raise RuntimeError(f"ValueUpdateProbe.finish: the watched backward left no gradient at the values of {site.name}.")
                cos, whole, ratio = _value_pull_agreement(v_after.double() - v_before.double(), site.v_grad, lr)
                nan = torch.full_like(cos, math.nan)
                for name, value in (("pull_cosine", cos), ("pull_cosine_all", whole), ("norm_ratio", ratio)):
                    stats[name].append(value)
                for name in ValueUpdateStats._PER_HEAD[3:]:
                    stats[name].append(nan)
            return ValueUpdateStats(lr=float(lr), **{name: torch.stack(v).float() for name, v in stats.items()})
        after = _value_forward(watched, tokens, position_ids)
        for l, (projection, (w_before, b_before)) in enumerate(zip(before.projections, weights)):
            pull = step.grads[l]  # [batch, pos, head, d_head] = (AᵀU)_j per head
            if pull is None:
                raise RuntimeError(f"ValueUpdateProbe.finish: the watched backward left no gradient at the values of {projection.name}.")
            w_v, b_v = projection.weight, projection.bias
            if w_v.grad is None:
                raise RuntimeError(
                    f"ValueUpdateProbe.finish: the value weight of {projection.name} has no gradient; "
                    "call finish before the next zero_grad."
                )
            x = before.inputs[l].double()  # [batch, pos, d_model]

            def change(d_weight: torch.Tensor, d_bias: torch.Tensor | None) -> torch.Tensor:
                """x ΔW_V + Δb_V, [batch, pos, head, d_head]."""
                out = torch.einsum("bpd,hde->bphe", x, d_weight.double())
                return out if d_bias is None else out + d_bias.double()

            has_bias = b_before is not None
            own = change(w_v.detach() - w_before, b_v.detach() - b_before if has_bias else None)
            gradient = change(-lr * w_v.grad, -lr * b_v.grad if has_bias and b_v.grad is not None else None)
            realised = after.values[l].double() - before.values[l].double()
            for prefix, delta in (("", realised), ("own_", own), ("gradient_", gradient)):
                cos, whole, ratio = _value_pull_agreement(delta, pull, lr)
                stats[f"{prefix}pull_cosine"].append(cos)
                stats[f"{prefix}pull_cosine_all"].append(whole)
                if f"{prefix}norm_ratio" in stats:
                    stats[f"{prefix}norm_ratio"].append(ratio)
        return ValueUpdateStats(lr=float(lr), **{name: torch.stack(v).float() for name, v in stats.items()})
