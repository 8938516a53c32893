"""Attention entropy at the prediction sites and the focusing ratio across layers (docs/theory.md §8.2).

The published variants (registered in :data:`windtunnel.probes.GEOMETRY_VARIANTS`) differ only in
which query rows they read: the prediction sites (ours), the final position, or every position;
each returns ``{"value": focusing ratio, "layer_entropy_bits": [...]}``.

Model-agnostic: the patterns are the sites' (:func:`windtunnel.sites.record_sites`), so every model
with an attention-site adapter is supported (TinyGPT, Hugging Face causal LMs, TransformerLens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from windtunnel.geometry import attention_entropy
from windtunnel.probes._common import Row, VariantUnavailable, _row
from windtunnel.probes.states import GeometryStates, SiteStates, record_patterns
from windtunnel.tasks import Batch

__all__ = [
    "AttentionFocusing",
    "attention_focusing",
    "focusing_all_positions",
    "focusing_final_position",
    "focusing_sites",
]


@dataclass(frozen=True)
class AttentionFocusing:
    """Attention entropy in bits at the prediction sites (docs/theory.md §8.2).

    With a_tj the pattern of query (site) t over keys j: H = -Σ_j a_tj log2 a_tj per layer, head,
    sequence and site (0 log 0 = 0), then averaged.

    Attributes:
        head_entropy_bits: [layer, head], averaged over sequences and sites.
        layer_entropy_bits: [layer], the heads averaged after the per-row entropies.
        focusing_ratio: (H^(0) - H^(last)) / H^(0), how much sharper the last layer attends than
            the first.
    """

    head_entropy_bits: torch.Tensor
    layer_entropy_bits: torch.Tensor
    focusing_ratio: float

    def rows(self, step: int) -> list[Row]:
        """Tidy telemetry rows: ``attn_entropy_bits`` per head and per layer, ``focusing_ratio``."""
        out = []
        for layer, per_head in enumerate(self.head_entropy_bits.tolist()):
            out += [_row(step, "attn_entropy_bits", v, layer, h) for h, v in enumerate(per_head)]
            out.append(_row(step, "attn_entropy_bits", self.layer_entropy_bits[layer], layer))
        out.append(_row(step, "focusing_ratio", self.focusing_ratio))
        return out


def attention_focusing(model: nn.Module, task: Any, batch: Batch, *, states: SiteStates | None = None) -> AttentionFocusing:
    """Attention entropy per head and layer at ``batch``'s sites, and the focusing ratio (§8.2).

    Runs ``model`` once in eval mode (:func:`~windtunnel.probes.states.record_patterns`) unless
    ``states`` (:func:`~windtunnel.probes.collect_states` of the same model and batch) is given;
    the entropies are computed in float64. ``task`` is unused and kept for the signature every
    instrument shares.

    Raises:
        ValueError: naming the model class when it has no attention sites (see
            :func:`windtunnel.sites.unsupported`), or as :func:`windtunnel.sites.record_sites`.
    """
    if states is not None:
        patterns, positions = states.patterns, states.positions
    else:
        patterns, positions = record_patterns(model, batch, instrument="attention_focusing"), batch.sites
    ent = attention_entropy(patterns.double(), positions.to(patterns.device))
    return AttentionFocusing(
        head_entropy_bits=ent.head_entropy_bits,
        layer_entropy_bits=ent.layer_entropy_bits,
        focusing_ratio=float(ent.focusing_ratio),
    )


def _focusing(states: GeometryStates, rows: torch.Tensor) -> dict[str, Any]:
    ent = attention_entropy(states.patterns.double(), rows.to(states.patterns.device))
    ratio = float(ent.focusing_ratio)
    if ratio != ratio:  # NaN: the first layer's rows carry no entropy
        raise VariantUnavailable("the first layer's attention entropy on these rows is 0, so there is nothing to focus.")
    return {"value": ratio, "layer_entropy_bits": ent.layer_entropy_bits.tolist()}


def focusing_sites(model: Any, task: Any, states: GeometryStates) -> dict[str, Any]:
    """Ours (docs/theory.md §8.2): (H^(0) - H^(last)) / H^(0) of the attention entropy at the
    prediction sites, heads averaged after the per-row entropies; the definition of
    :func:`attention_focusing` and of the ``focusing_ratio`` telemetry. arXiv 2512.23752v1 recalls
    85–90 % for the wind tunnels (§4.4, Table 2; docs/theory.md §10)."""
    return _focusing(states, states.sites)


def focusing_final_position(model: Any, task: Any, states: GeometryStates) -> dict[str, Any]:
    """arXiv 2512.23752's reading point (Paper III, docs/theory.md §9): the attention row of the final
    input position only. Its v1 Table 2 numbers (82 %, 86 %, 31 %) are for pretrained language models."""
    return _focusing(states, torch.tensor([states.patterns.shape[-2] - 1]))


def focusing_all_positions(model: Any, task: Any, states: GeometryStates) -> dict[str, Any]:
    """Every query row with at least two keys to choose from (positions 1..T-1), as ``windtunnel
    inspect`` reads a text (docs/theory.md §9); row 0 has one key and entropy 0 by construction."""
    return _focusing(states, torch.arange(1, states.patterns.shape[-2]))
