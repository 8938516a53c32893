"""The geometry snapshot of docs/theory.md §8.1–§8.3: key orthogonality, attention entropy and focusing, and the
value manifold of one model on one batch; and every published definition of the three, named
(:data:`GEOMETRY_VARIANTS`, :func:`geometry_variants`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from torch import nn

from windtunnel.geometry import KeyOrthogonality, ValueManifoldSummary, random_abs_cosine
from windtunnel.paper_numbers import paper_number
from windtunnel.probes._common import Row, VariantUnavailable, _require, _row, _supported
from windtunnel.probes.focusing import (
    AttentionFocusing,
    attention_focusing,
    focusing_all_positions,
    focusing_final_position,
    focusing_sites,
)
from windtunnel.probes.frame import (
    hypothesis_tokens,
    key_ortho_hypothesis_abs,
    key_ortho_in_context_abs,
    key_ortho_vocabulary_signed,
    key_ortho_weight_columns_abs,
    layer_key_orthogonality,
)
from windtunnel.probes.manifold import MANIFOLD_VARIANT_FUNCTIONS, manifold_summary
from windtunnel.probes.states import GeometryStates, SiteStates, collect_geometry_states, collect_states
from windtunnel.runs import json_ready
from windtunnel.tasks import Batch

__all__ = ["GEOMETRY_VARIANTS", "GeometrySnapshot", "GeometryVariant", "geometry_snapshot", "geometry_variants"]


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


@dataclass(frozen=True)
class GeometryVariant:
    """One published definition of a geometry quantity (docs/theory.md §8.1–§8.3, §9).

    Attributes:
        function: (model, task, GeometryStates) -> {"value": float, ...}; raises
            VariantUnavailable with the reason where the model or task lacks what it reads.
        description: what it measures, in one line.
        source: whose definition it is (ours, the authors' code, a paper), with the docs section.
        paper: the paper's number that belongs to this definition, with its source, or None.
        ours: the package's default definition (the telemetry's and the snapshot's).
    """

    function: Callable[[Any, Any, GeometryStates], dict[str, Any]]
    description: str
    source: str
    paper: str | None = None
    ours: bool = False


def _cited(*keys: str) -> str:
    """The paper numbers ``keys`` of windtunnel.paper_numbers, each with its source, joined by '; '."""
    return "; ".join(paper_number(key).cited for key in keys)


_MANIFOLD_TEXT = {
    "sites_final_norm_zscored": ("final-norm residual at the prediction sites, z-scored", "ours, docs/theory.md §8.3",
                                 _cited("bijection.transformer.value_manifold_target"), True),
    "sites_final_norm_raw": ("final-norm residual at the prediction sites, centred only", "the authors' Paper I analysis script, docs/theory.md §11.7", None, False),
    "sites_pre_final_norm_zscored": ("residual before the final norm at the sites, z-scored", "docs/theory.md §8.3 (alternative states)", None, False),
    "sites_pre_final_norm_raw": ("residual before the final norm at the sites, centred only", "docs/theory.md §8.3 (alternative states)", None, False),
    "value_positions_final_norm_zscored": ("final-norm residual at the value positions, z-scored", "docs/theory.md §8.3 (value positions)", None, False),
    "value_positions_final_norm_raw": ("final-norm residual at the value positions, centred only", "docs/theory.md §8.3 (value positions)", None, False),
    "value_positions_pre_final_norm_zscored": ("last block's output (before the final norm) at the value positions, z-scored", "docs/theory.md §8.3 (value positions)", None, False),
    "value_positions_pre_final_norm_raw": ("last block's output (before the final norm) at the value positions, centred only",
                                           "the authors' figure script of arXiv 2512.22471's final-layer manifold figure",
                                           _cited("bijection.transformer.value_manifold"), False),
    "head_values_zscored": ("last layer's value vectors over heads at the sites, z-scored", "arXiv 2512.23752 (Paper III) recipe, docs/theory.md §9",
                            "LLMs only: " + _cited("llm.llm.value_manifold"), False),
    "head_values_raw": ("last layer's value vectors over heads at the sites, centred only", "docs/theory.md §9 (unscaled)", None, False),
}

GEOMETRY_VARIANTS: dict[str, dict[str, GeometryVariant]] = {
    "key_orthogonality": {
        "hypothesis_abs": GeometryVariant(
            key_ortho_hypothesis_abs, "mean |cos| of the hypothesis tokens' keys after the block's norm, layer 0",
            "ours, docs/theory.md §8.1", _cited("bijection.transformer.key_orthogonality", "bijection.transformer.key_orthogonality_target"), ours=True),
        "vocabulary_signed": GeometryVariant(
            key_ortho_vocabulary_signed, "signed mean cos of the keys of every vocabulary id, raw embeddings, layer 0",
            "the authors' Paper I analysis script, docs/theory.md §11.7"),
        "in_context_abs": GeometryVariant(
            key_ortho_in_context_abs, "mean |cos| of the keys formed in context at the hypothesis-token positions, layer 0",
            "docs/theory.md §8.1, §9 (the in-context reading of windtunnel inspect)"),
        "weight_columns_abs": GeometryVariant(
            key_ortho_weight_columns_abs, "mean |cos| of the columns of each head's W_K, layer 0",
            "arXiv 2512.23752 (Paper III), docs/theory.md §9",
            _cited("bijection.transformer.weight_columns") + "; LLMs " + _cited("llm.llm.key_orthogonality")),
    },
    "value_manifold_pc1_share": {
        name: GeometryVariant(MANIFOLD_VARIANT_FUNCTIONS[name], *_MANIFOLD_TEXT[name][:3], ours=_MANIFOLD_TEXT[name][3])
        for name in MANIFOLD_VARIANT_FUNCTIONS
    },
    "focusing_ratio": {
        "sites": GeometryVariant(
            focusing_sites, "attention-entropy reduction, first to last layer, at the prediction sites",
            "ours, docs/theory.md §8.2", _cited("bijection.transformer.focusing"), ours=True),
        "final_position": GeometryVariant(
            focusing_final_position, "the same at the final position only", "arXiv 2512.23752 (Paper III), docs/theory.md §9",
            "LLMs only: " + _cited("llm.llm.focusing")),
        "all_positions": GeometryVariant(
            focusing_all_positions, "the same over every query row with two or more keys", "docs/theory.md §9 (windtunnel inspect)"),
    },
}
"""Every published definition of key orthogonality, the value manifold's PC1 share and attention
focusing: quantity -> variant name -> :class:`GeometryVariant`, ours first. Each function's
docstring says which paper figure, table or script it follows."""


def geometry_variants(model: nn.Module, task: Any, batch: Batch, *, states: GeometryStates | None = None) -> dict[str, Any]:
    """Every variant of :data:`GEOMETRY_VARIANTS` on one recorded pass of ``model`` over ``batch``.

    Returns a JSON-ready dict ``{quantity: {variant: {"value": float or None, "unavailable":
    reason or None, "description", "source", "paper", "ours", and the variant's details}}}``; a
    variant the model or task cannot support (no key map on Hugging Face models, no hypothesis
    tokens in the HMM, no residual before the final norm, ...) has ``value`` None and the reason,
    and never raises. Non-finite details become None.

    Raises:
        ValueError: naming the model class when it has no attention sites or no readout (see
            :func:`windtunnel.sites.unsupported`).
    """
    if states is None:
        states = collect_geometry_states(model, task, batch)
    out: dict[str, Any] = {}
    for quantity, variants in GEOMETRY_VARIANTS.items():
        out[quantity] = {}
        for name, variant in variants.items():
            entry = {"value": None, "unavailable": None, "description": variant.description, "source": variant.source,
                     "paper": variant.paper, "ours": variant.ours}
            try:
                entry.update({k: json_ready(v) for k, v in variant.function(model, task, states).items()})
            except VariantUnavailable as reason:
                entry["unavailable"] = str(reason)
            out[quantity][name] = entry
    return out
