"""The value manifold at the prediction sites: its summary (docs/theory.md §8.3) and its 2-D projection for plots.

Reads :class:`~windtunnel.probes.SiteStates` (the final-norm residual the readout reads), so any
model :func:`~windtunnel.probes.collect_states` supports is supported.

The published variants (registered in :data:`windtunnel.probes.GEOMETRY_VARIANTS`) read a
:class:`~windtunnel.probes.GeometryStates` and differ in three choices: where (the prediction
sites, or the value positions just after them), which states (after the final norm, before it,
or the last layer's value vectors concatenated over heads) and the scaling (z-scored features, or
only centred). Each returns ``{"value": PC1 share, "pc12_share", "spearman", "spearman_position",
"partial_pearson_given_position", "partial_undefined", "n_samples", "n_features"}`` (see :func:`_pca`)
or raises :class:`~windtunnel.probes._common.VariantUnavailable`.

The position control (docs/theory.md §8.3 Control, §8.9): in the bijection without replacement the
Bayes entropy at key site i is log2(V − i), a function of the position alone, so a PC1 ordered by
entropy is just as ordered by position. ``spearman_position`` says how much; the within-position
correlation ``partial_pearson_given_position`` is the part of the entropy ordering position does
not explain, and it is None (with ``partial_undefined`` saying why) where the data cannot separate
the two.
"""

from __future__ import annotations

from typing import Any

import torch

from windtunnel.geometry import ValueManifoldPCA, ValueManifoldSummary, control_explains, spearman_correlation
from windtunnel.probes._common import VariantUnavailable
from windtunnel.probes.frame import hypothesis_tokens
from windtunnel.probes.states import GeometryStates, SiteStates, value_positions

__all__ = [
    "MANIFOLD_VARIANT_FUNCTIONS",
    "manifold_projection",
    "manifold_summary",
]


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


def _states_at(states: GeometryStates, task: Any, where: str, which: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(states [n, d] float64, entropy_bits [n] float64, position [n] long) for one (where, which)
    choice; position is the sequence position each state is read at (a site, or a value position)."""
    if where == "sites":
        positions, entropy = states.sites, states.entropy_bits
    else:
        positions, index = value_positions(states.tokens, states.sites, hypothesis_tokens(task))
        if positions.numel() == 0:
            raise VariantUnavailable("the task has no value positions (no hypothesis token stands after its sites).")
        entropy = states.entropy_bits[:, index]  # the value's entropy label is that of the site it answers
    if which == "final_norm":
        x = states.readout
    elif which == "pre_final_norm":
        if states.final_residual is None:
            raise VariantUnavailable(states.final_residual_missing or "no residual before the final norm was recorded.")
        x = states.final_residual
    else:
        x = states.last_values.flatten(-2)  # [batch, pos, kv_head * d_v]
    x = x[:, positions]
    position = positions.to(x.device).expand(x.shape[0], -1).reshape(-1)
    return x.reshape(-1, x.shape[-1]).double(), entropy.reshape(-1).double(), position


def _undefined_partial(entropy: torch.Tensor, pc1: torch.Tensor, position: torch.Tensor) -> str:
    """Why the within-position correlation of PC1 and entropy is undefined (it came out NaN), by
    the rule of ``partial_correlation`` (:func:`~windtunnel.geometry.control_explains`)."""
    position = position.to(entropy.device)
    if control_explains(entropy, position):
        return ("entropy is a function of position here (one entropy value per position, up to rounding), so "
                "position and entropy cannot be separated on this data")
    return "PC1 is a function of position here (one PC1 score per position, up to rounding)"


def _pca(states: GeometryStates, task: Any, where: str, which: str, standardize: bool) -> dict[str, Any]:
    """The variant's PCA (:class:`~windtunnel.geometry.ValueManifoldPCA`, position control ``"group"``) as a dict:

    * ``value``: PC1 share of the variance, in [0, 1]; ``pc12_share``: PC1 + PC2;
    * ``spearman``: Spearman ρ of PC1 and the Bayes entropy (bits), PC1 oriented so it is >= 0;
    * ``spearman_position``: Spearman ρ of that same PC1 and the position each state is read at
      (signed: in the bijection without replacement the entropy falls with position, so a PC1
      ordered by entropy gives ≈ −1 here); None when there is one position only;
    * ``partial_pearson_given_position``: Pearson r of PC1 and entropy after subtracting each
      position's mean from both (``partial_correlation(kind="group")``): the entropy ordering
      within positions. None where it is undefined, ``partial_undefined`` then saying why (else
      None): when the entropy is a function of the position (the bijection without replacement)
      the within-position residual of the entropy is 0, and PC1 ordering by entropy and by
      position are one and the same thing on that data;
    * ``n_samples``, ``n_features``: size of the state matrix.
    """
    x, h, position = _states_at(states, task, where, which)
    if x.shape[0] < 3:
        raise VariantUnavailable(f"fewer than 3 states ({x.shape[0]}).")
    pca = ValueManifoldPCA(standardize=standardize, position_control="group").fit(x, h, positions=position)
    m = pca.summary_
    partial = m.partial_pearson_given_position
    undefined = None
    if partial is None or partial != partial:  # NaN: the control explains entropy or PC1 entirely
        partial, undefined = None, _undefined_partial(h, pca.pc1_scores_, position)
    rho_position = float(spearman_correlation(pca.pc1_scores_, position.to(pca.pc1_scores_.device).double()))
    return {"value": m.pc1_share, "pc12_share": m.pc12_share, "spearman": m.spearman,
            "spearman_position": rho_position if rho_position == rho_position else None,
            "partial_pearson_given_position": partial, "partial_undefined": undefined,
            "n_samples": m.n_samples, "n_features": m.n_features}


def manifold_sites_final_norm_zscored(model: Any, task: Any, states: GeometryStates) -> dict[str, Any]:
    """Ours (docs/theory.md §8.3): the final-norm residual at the prediction sites, z-scored; the
    definition of :func:`manifold_summary` and of the ``manifold_pc1_share`` telemetry. The
    authors' REPRODUCE.md asks for PC1 > 80 % with a strong entropy correlation."""
    return _pca(states, task, "sites", "final_norm", True)


def manifold_sites_final_norm_raw(model: Any, task: Any, states: GeometryStates) -> dict[str, Any]:
    """The same states only centred: the value-manifold PCA of the authors' Paper I analysis script
    (the final-norm state at the last position of each prefix, a key site; docs/theory.md §11.7)."""
    return _pca(states, task, "sites", "final_norm", False)


def manifold_sites_pre_final_norm_zscored(model: Any, task: Any, states: GeometryStates) -> dict[str, Any]:
    """The residual stream before the final norm at the prediction sites, z-scored (docs/theory.md §8.3,
    per-layer residuals as the alternative states); no paper figure or number uses it."""
    return _pca(states, task, "sites", "pre_final_norm", True)


def manifold_sites_pre_final_norm_raw(model: Any, task: Any, states: GeometryStates) -> dict[str, Any]:
    """The residual before the final norm at the prediction sites, centred only (docs/theory.md §8.3,
    alternative states); no paper figure or number uses it."""
    return _pca(states, task, "sites", "pre_final_norm", False)


def manifold_value_positions_final_norm_zscored(model: Any, task: Any, states: GeometryStates) -> dict[str, Any]:
    """The final-norm residual at the value positions (docs/theory.md §8.3 explains why they are not
    our default), z-scored; each labelled with the entropy of the site whose value it reveals. No
    paper figure or number uses it."""
    return _pca(states, task, "value_positions", "final_norm", True)


def manifold_value_positions_final_norm_raw(model: Any, task: Any, states: GeometryStates) -> dict[str, Any]:
    """The final-norm residual at the value positions, centred only (docs/theory.md §8.3); no paper
    figure or number uses it."""
    return _pca(states, task, "value_positions", "final_norm", False)


def manifold_value_positions_pre_final_norm_zscored(model: Any, task: Any, states: GeometryStates) -> dict[str, Any]:
    """The last block's output (before the final norm) at the value positions, z-scored: the states of
    arXiv 2512.22471's final-layer manifold figure with our scaling (docs/theory.md §8.3)."""
    return _pca(states, task, "value_positions", "pre_final_norm", True)


def manifold_value_positions_pre_final_norm_raw(model: Any, task: Any, states: GeometryStates) -> dict[str, Any]:
    """The authors' figure script for arXiv 2512.22471's final-layer value-manifold figure: the last
    block's output before the final norm at the value positions, each labelled with the entropy
    of the site it answers, plain centred PCA. The PC1 84–90 % (PC1+PC2 88–95 %) that arXiv
    2512.23752v1 recalls of that figure (§2, Table 1) is read against this variant (docs/theory.md §8.3, §10)."""
    return _pca(states, task, "value_positions", "pre_final_norm", False)


def manifold_head_values_zscored(model: Any, task: Any, states: GeometryStates) -> dict[str, Any]:
    """arXiv 2512.23752's recipe (Paper III, docs/theory.md §9; its v1 Table 1): the last layer's value
    vectors concatenated over (key-value) heads, z-scored, here at the prediction sites (the
    paper reads the final token of each prompt). Its v1 Table 1 numbers (PC1+PC2 51–99.7 %) are
    for pretrained language models, not a wind tunnel."""
    return _pca(states, task, "sites", "head_values", True)


def manifold_head_values_raw(model: Any, task: Any, states: GeometryStates) -> dict[str, Any]:
    """The last layer's value vectors concatenated over heads at the prediction sites, centred only:
    arXiv 2512.23752's states (docs/theory.md §9) without its z-scoring."""
    return _pca(states, task, "sites", "head_values", False)


MANIFOLD_VARIANT_FUNCTIONS = {
    "sites_final_norm_zscored": manifold_sites_final_norm_zscored,
    "sites_final_norm_raw": manifold_sites_final_norm_raw,
    "sites_pre_final_norm_zscored": manifold_sites_pre_final_norm_zscored,
    "sites_pre_final_norm_raw": manifold_sites_pre_final_norm_raw,
    "value_positions_final_norm_zscored": manifold_value_positions_final_norm_zscored,
    "value_positions_final_norm_raw": manifold_value_positions_final_norm_raw,
    "value_positions_pre_final_norm_zscored": manifold_value_positions_pre_final_norm_zscored,
    "value_positions_pre_final_norm_raw": manifold_value_positions_pre_final_norm_raw,
    "head_values_zscored": manifold_head_values_zscored,
    "head_values_raw": manifold_head_values_raw,
}
"""Name -> function of every value-manifold variant, in display order."""
