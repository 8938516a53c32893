"""Geometry diagnostics of trained attention (docs/theory.md §8): frame, attention maps, value manifold.

Tensors in, tensors or frozen dataclasses out; nothing here knows about models or tasks. The glue
that runs a model with hooks hands in: hypothesis embeddings after the pre-attention norm and the
key weights (§8.1, ``frame``), the ``pattern`` / ``q`` / ``k`` hook tensors in TransformerLens
layout (§8.2, ``attention_maps``), the states and Bayes entropies at the prediction sites (§8.3,
``manifold``), and two checkpoints' patterns or key weights (§8.6). Entropies are in bits. The
statistics (ranks, Spearman, Pearson, PCA; ``stats``) are written in torch, so device and dtype
follow the inputs; use float64 where the numbers are reported.
"""

from windtunnel.geometry.attention_maps import (
    AttentionEntropy,
    QKAlignment,
    attention_entropy,
    attention_js_divergence_bits,
    focusing_ratio,
    qk_alignment,
)
from windtunnel.geometry.frame import (
    FrameOverlap,
    KeyOrthogonality,
    frame_subspace_overlap,
    key_orthogonality,
    mean_abs_cosine,
    pooled_mean_cosine,
    random_abs_cosine,
    settling_step,
)
from windtunnel.geometry.manifold import (
    ValueManifoldPCA,
    ValueManifoldSummary,
    level_separation,
    summarize_value_manifold,
)
from windtunnel.geometry.stats import (
    average_ranks,
    control_explains,
    linear_probe_r2,
    partial_correlation,
    participation_ratio,
    pearson_correlation,
    spearman_correlation,
)

__all__ = [
    "AttentionEntropy",
    "FrameOverlap",
    "KeyOrthogonality",
    "QKAlignment",
    "ValueManifoldPCA",
    "ValueManifoldSummary",
    "attention_entropy",
    "attention_js_divergence_bits",
    "average_ranks",
    "control_explains",
    "focusing_ratio",
    "frame_subspace_overlap",
    "key_orthogonality",
    "level_separation",
    "linear_probe_r2",
    "mean_abs_cosine",
    "participation_ratio",
    "pooled_mean_cosine",
    "partial_correlation",
    "pearson_correlation",
    "qk_alignment",
    "random_abs_cosine",
    "settling_step",
    "spearman_correlation",
    "summarize_value_manifold",
]
