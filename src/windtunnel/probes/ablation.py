"""Ablation table: the causal effect of every head and every layer on calibration (docs/theory.md §8.5)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

import windtunnel.sites as sites
from windtunnel._progress import track
from windtunnel.probes._common import _require
from windtunnel.probes.calibration import calibrate
from windtunnel.tasks import Batch

__all__ = ["AblationTable", "ablation_table"]


@dataclass(frozen=True)
class AblationTable:
    """Effect of ablating each head and each layer (docs/theory.md §8.5).

    Attributes:
        intact: scalars of the intact model (``Calibration.scalars()``).
        rows: one dict per ablation: kind ("head", "bypass", "zero_attn_out", "zero_mlp_out"),
            layer, head (None for layers), entropy_mae_bits, kl_bits, accuracy, delta_mae_bits,
            delta_kl_bits, delta_accuracy and mae_ratio (ablated / intact MAE).
    """

    intact: dict[str, float]
    rows: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {"intact": self.intact, "rows": self.rows}


def ablation_table(model: nn.Module, task: Any, batches: Sequence[Batch]) -> AblationTable:
    """ΔMAE, ΔKL and Δaccuracy of every single-head and single-layer ablation (docs/theory.md §8.5).

    Heads: the head's output before W_O zeroed (TinyGPT: its post-softmax pattern times 0).
    Layers: the block bypassed, or only its attention output, or only its FFN output, zeroed.
    The ablations come from the model's adapter (:func:`windtunnel.sites.ablated`): TinyGPT's
    ``model.ablated``; for a TransformerLens ``HookedTransformer``, hooks on ``attn.hook_z``,
    ``hook_attn_out``, ``hook_mlp_out`` and the block; for a Hugging Face model, the head's output
    zeroed inside the ``"windtunnel"`` attention implementation and hooks on its layers.

    Raises:
        ValueError: naming the model class when its adapter cannot ablate (a model without
            attention sites or whose layers cannot be found; see
            :func:`windtunnel.sites.unsupported`).
    """
    _require("ablation_table", model, "ablation")
    n_layers, n_heads = sites.ablation_layout(model)
    intact = calibrate(model, task, batches).scalars()
    cases: list[tuple[str, int, int | None, dict[str, Any]]] = [
        ("head", l, h, {"heads": [(l, h)]}) for l in range(n_layers) for h in range(n_heads)
    ]
    for kind in ("bypass", "zero_attn_out", "zero_mlp_out"):
        cases += [(kind, l, None, {kind: [l]}) for l in range(n_layers)]
    rows = []
    for kind, layer, head, kwargs in track(cases, desc="ablate: heads and layers", unit="ablation"):
        with sites.ablated(model, **kwargs):
            cal = calibrate(model, task, batches).scalars()
        mae, base = cal["entropy_mae_bits"], intact["entropy_mae_bits"]
        rows.append(
            {
                "kind": kind,
                "layer": layer,
                "head": head,
                "entropy_mae_bits": mae,
                "kl_bits": cal["kl_bits"],
                "accuracy": cal["accuracy"],
                "delta_mae_bits": mae - base,
                "delta_kl_bits": cal["kl_bits"] - intact["kl_bits"],
                "delta_accuracy": cal["accuracy"] - intact["accuracy"],
                "mae_ratio": mae / base if base > 0 else None,
            }
        )
    return AblationTable(intact=intact, rows=rows)
