"""The 2-D projection of the value manifold at the prediction sites, for plots (SPEC §8.3)."""

from __future__ import annotations

from typing import Any

import torch

from windtunnel.geometry import ValueManifoldPCA
from windtunnel.probes.states import SiteStates

__all__ = ["manifold_projection"]


def manifold_projection(states: SiteStates, *, max_points: int = 2000) -> dict[str, Any]:
    """The first two principal components of the z-scored site states, for plots (SPEC §8.3).

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
