"""The value manifold at the prediction sites: its summary (docs/theory.md §8.3) and its 2-D projection for plots.

Reads :class:`~windtunnel.probes.SiteStates` (the final-norm residual the readout reads), so any
model :func:`~windtunnel.probes.collect_states` supports is supported.
"""

from __future__ import annotations

from typing import Any

import torch

from windtunnel.geometry import ValueManifoldPCA, ValueManifoldSummary
from windtunnel.probes.states import SiteStates

__all__ = ["manifold_projection", "manifold_summary"]


def manifold_summary(states: SiteStates, *, generator: torch.Generator | None = None) -> ValueManifoldSummary:
    """The §8.3 statistics of the site states against H_Bayes (:class:`~windtunnel.geometry.ValueManifoldPCA`):
    PC shares, participation ratio, rank correlations, ordering score and, with ``generator``
    (its 80/20 split), the linear entropy probe's R²; positions are controlled for."""
    x, h, pos = states.flat()
    return ValueManifoldPCA().fit(x, h, positions=pos, generator=generator).summary_


def manifold_projection(states: SiteStates, *, max_points: int = 2000) -> dict[str, Any]:
    """The first two principal components of the z-scored site states, for plots (docs/theory.md §8.3).

    Returns a JSON-ready dict {pc1, pc2, entropy_bits, position, pc1_share, pc2_share} over the
    first ``max_points`` (sequence, site) rows in batch order (deterministic, no sampling).
    """
    x, h, pos = states.flat()
    pca = ValueManifoldPCA(n_components=2).fit(x, h)
    scores = pca.transform(x)[:max_points]
    ratio = pca.explained_variance_ratio_
    return {
        "pc1": [round(v, 5) for v in scores[:, 0].tolist()],
        "pc2": [round(v, 5) for v in (scores[:, 1] if scores.shape[1] > 1 else torch.zeros(len(scores))).tolist()],
        "entropy_bits": [round(v, 5) for v in h[:max_points].tolist()],
        "position": pos[:max_points].tolist(),
        "pc1_share": float(ratio[0]),
        "pc2_share": float(ratio[1]) if ratio.numel() > 1 else 0.0,
    }
