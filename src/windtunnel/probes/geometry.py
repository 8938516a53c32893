"""The geometry snapshot of docs/theory.md §8.1–§8.3: key orthogonality, attention entropy and focusing, and the
value manifold of one model on one batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from torch import nn

from windtunnel.geometry import KeyOrthogonality, ValueManifoldSummary, random_abs_cosine
from windtunnel.probes._common import Row, _require, _row, _supported
from windtunnel.probes.focusing import AttentionFocusing, attention_focusing
from windtunnel.probes.frame import hypothesis_tokens, layer_key_orthogonality
from windtunnel.probes.manifold import manifold_summary
from windtunnel.probes.states import SiteStates, collect_states
from windtunnel.tasks import Batch

__all__ = ["GeometrySnapshot", "geometry_snapshot"]


@dataclass(frozen=True)
class GeometrySnapshot:
    """The §8.1–§8.3 diagnostics of one model on one batch.

    Attributes:
        key_orthogonality: per layer (``KeyOrthogonality``), or None for tasks without hypothesis
            tokens (see :func:`hypothesis_tokens`) and for models without a key map (Hugging Face).
        baseline_key_orthogonality: the same for ``baseline_model`` (the step-0 model), or None.
        random_baseline: E|cos| of random directions in R^{d_head} (``random_abs_cosine``).
        head_entropy_bits: attention entropy at the sites, [layer, head].
        layer_entropy_bits: [layer] (heads averaged after the per-row entropies).
        focusing_ratio: (H^(0) - H^(last)) / H^(0).
        manifold: the §8.3 summary of the final-norm residuals at the sites.
    """

    key_orthogonality: tuple[KeyOrthogonality, ...] | None
    baseline_key_orthogonality: tuple[KeyOrthogonality, ...] | None
    random_baseline: float
    head_entropy_bits: torch.Tensor
    layer_entropy_bits: torch.Tensor
    focusing_ratio: float
    manifold: ValueManifoldSummary

    def rows(self, step: int) -> list[Row]:
        """Tidy telemetry rows {step, layer, head, metric, value}."""
        out = [_row(step, "key_ortho_random_baseline", self.random_baseline)]
        for name, ko in (("key_ortho", self.key_orthogonality), ("key_ortho_init", self.baseline_key_orthogonality)):
            for layer, layer_ko in enumerate(ko or ()):
                out += [_row(step, f"{name}_abs_cos", v, layer, h) for h, v in enumerate(layer_ko.abs_cosine_per_head.tolist())]
                out.append(_row(step, f"{name}_abs_cos", layer_ko.mean_abs_cosine, layer))
                out.append(_row(step, f"{name}_min_abs_cos", layer_ko.min_abs_cosine, layer))
        out += AttentionFocusing(self.head_entropy_bits, self.layer_entropy_bits, self.focusing_ratio).rows(step)
        m = self.manifold
        for name in ("pc1_share", "pc12_share", "participation_ratio", "spearman", "pearson", "ordering_score", "probe_r2", "partial_pearson_given_position"):
            value = getattr(m, name)
            if value is not None:
                out.append(_row(step, f"manifold_{name}", value))
        return out


def geometry_snapshot(
    model: nn.Module,
    task: Any,
    batch: Batch,
    *,
    baseline_model: nn.Module | None = None,
    generator: torch.Generator | None = None,
    states: SiteStates | None = None,
) -> GeometrySnapshot:
    """Key orthogonality, attention entropy and value-manifold statistics (docs/theory.md §8.1–§8.3).

    Composes :func:`layer_key_orthogonality`, :func:`attention_focusing` and
    :func:`manifold_summary` on one recorded pass (:func:`collect_states`). Key orthogonality is
    None where the task has no hypothesis tokens or the model's adapter has no key map (Hugging
    Face models; :func:`layer_key_orthogonality` itself raises there); the rest is computed for
    every model with attention sites and a readout.

    Args:
        model: the model to probe (run in eval mode; its mode is restored).
        task: the task ``batch`` came from.
        batch: a fixed, seeded probe batch.
        baseline_model: the same architecture at initialisation (step 0), for the §8.1 baseline.
        generator: draws the 80/20 split of the linear entropy probe; None skips the probe.
        states: the :func:`collect_states` result of ``model`` on ``batch``, if already computed.

    Raises:
        ValueError: naming the model class when it has no attention sites or no readout (see
            :func:`windtunnel.sites.unsupported`).
    """
    _require("geometry_snapshot", model, "sites", "readout")
    if states is None:
        states = collect_states(model, task, batch)
    hyp = hypothesis_tokens(task)
    ko = base = None
    if hyp is not None and _supported(model, "token_keys"):
        ko = layer_key_orthogonality(model, hyp)
        if baseline_model is not None:
            base = layer_key_orthogonality(baseline_model, hyp)
    focusing = attention_focusing(model, task, batch, states=states)
    return GeometrySnapshot(
        key_orthogonality=ko,
        baseline_key_orthogonality=base,
        random_baseline=random_abs_cosine(states.q.shape[-1]),  # d_head
        head_entropy_bits=focusing.head_entropy_bits,
        layer_entropy_bits=focusing.layer_entropy_bits,
        focusing_ratio=focusing.focusing_ratio,
        manifold=manifold_summary(states, generator=generator),
    )
