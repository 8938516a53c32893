"""Model-facing glue for the geometry diagnostics and routing-law telemetry (SPEC §8).

Runs a :class:`~windtunnel.models.TinyGPT` with :func:`windtunnel.hooks.record` on a fixed batch and
hands the recorded tensors to :mod:`windtunnel.geometry`, :mod:`windtunnel.dynamics` and
:mod:`windtunnel.metrics`. :func:`make_probes` wraps everything as Trainer probes that emit tidy
telemetry rows ``{step, layer, head, metric, value}``; :func:`ablation_table` measures the
causal effect of every head and layer (§8.5). :func:`hmm_lag_response` measures how far back an
HMM model's belief listens, and :func:`hmm_lag_map` which heads carry each lag.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from windtunnel.dynamics import attention_gradients, check_law
from windtunnel._checks import must
from windtunnel.geometry import (
    KeyOrthogonality,
    ValueManifoldPCA,
    ValueManifoldSummary,
    attention_entropy,
    key_orthogonality,
    random_abs_cosine,
)
from windtunnel.hooks import eval_mode, record
from windtunnel.metrics import Calibration, select_sites, site_metrics, summarize
from windtunnel.models import TinyGPT
from windtunnel.runs import RunDir, write_json_atomic
from windtunnel.tasks import Batch, HMMBatch, HMMFiltering, hmm_posterior

__all__ = [
    "AblationTable",
    "GeometrySnapshot",
    "RoutingLawStats",
    "SiteStates",
    "ValueUpdateProbe",
    "ValueUpdateStats",
    "ablation_table",
    "auxiliary_loss_nats",
    "calibrate",
    "collect_states",
    "geometry_snapshot",
    "hmm_lag_map",
    "hmm_lag_response",
    "hypothesis_tokens",
    "make_probes",
    "manifold_projection",
    "routing_law_stats",
    "site_loss_nats",
]

Row = dict[str, Any]
LossFn = Callable[[torch.Tensor, Batch, Any], torch.Tensor]


def _replayer(generator: torch.Generator | None) -> Callable[[], torch.Generator | None]:
    """A function that returns, at every call, a fresh generator in ``generator``'s present state
    (None for None): the same draws every time, and ``generator`` itself is left untouched."""
    if generator is None:
        return lambda: None
    state, device = generator.get_state(), generator.device

    def replay() -> torch.Generator:
        g = torch.Generator(device=device)
        g.set_state(state)
        return g

    return replay


def _check_model(owner: str, model: Any) -> TinyGPT:
    if not isinstance(model, TinyGPT):
        raise ValueError(must(owner, "model", "a TinyGPT (attention probes need its hooks)", type(model).__name__))
    return model


def _check_unablated(owner: str, model: Any) -> TinyGPT:
    """A TinyGPT without head ablations: gradient probes read hook_v/hook_z as the unablated head's."""
    model = _check_model(owner, model)
    if any(block.attn.head_multiplier is not None for block in model.blocks):
        raise ValueError(must(owner, "model", "free of head ablations", "an ablated model"))
    return model


def _row(step: int, metric: str, value: Any, layer: int | None = None, head: int | None = None) -> Row:
    value = float(value)
    return {"step": step, "layer": layer, "head": head, "metric": metric, "value": value if math.isfinite(value) else None}


def hypothesis_tokens(task: Any) -> torch.Tensor | None:
    """Token ids that name the hypotheses (SPEC §8.1), or None when no input token does.

    For hard-label tasks the hypothesis slice indexes the input vocabulary, so the hypothesis
    tokens are ``class_offset .. class_offset + n_classes - 1``: the value tokens V..2V-1 in
    bijection format B, all V tokens in format A, the value tokens in associative recall. For
    soft-target tasks (the HMM) the slice is a separate state readout and no input token stands
    for a hidden state (the symbol tokens are observations), so key orthogonality is skipped.
    """
    if task.soft_targets:
        return None
    return torch.arange(task.class_offset, task.class_offset + task.n_classes)


def site_loss_nats(logits: torch.Tensor, batch: Batch, task: Any) -> torch.Tensor:
    """The training loss in nats at the prediction sites, as the Trainer computes it.

    Hard labels: mean CE over the full output with target ``class_offset + label``. Soft targets:
    mean soft CE -Σ_s p_bayes(s) log p_model(s) over the hypothesis slice. (The same formula as
    ``windtunnel.train.site_loss``; it lives here too because probes sit below the trainer.)

    Shapes: logits [batch, seq_len, n_outputs] -> [].
    """
    at_sites = logits[:, batch.sites]  # [batch, n_sites, n_outputs]
    if task.soft_targets:
        log_p = torch.log_softmax(at_sites[..., task.class_offset : task.class_offset + task.n_classes], dim=-1)
        return -(batch.posterior.to(log_p.dtype) * log_p).sum(-1).mean()
    targets = batch.labels + task.class_offset
    return nn.functional.cross_entropy(at_sites.reshape(-1, at_sites.shape[-1]), targets.reshape(-1))


def auxiliary_loss_nats(logits: torch.Tensor, batch: Batch, task: Any) -> torch.Tensor:
    """Mean soft CE in nats against the task's auxiliary targets (``task.auxiliary_targets``),
    over the hypothesis slice; for the HMM, the predicted belief at the ``[OBS]`` tokens.

    Shapes: logits [batch, seq_len, n_outputs] -> [].

    Raises:
        ValueError: when the task has no auxiliary targets.
    """
    if not hasattr(task, "auxiliary_targets"):
        raise ValueError(f"auxiliary_loss_nats: {type(task).__name__} has no auxiliary targets (only the HMM task has).")
    positions, targets = task.auxiliary_targets(batch)
    at = logits[:, positions, task.class_offset : task.class_offset + task.n_classes]
    log_p = torch.log_softmax(at, dim=-1)
    return -(targets.to(log_p.dtype) * log_p).sum(-1).mean()


@torch.no_grad()
def calibrate(model: nn.Module, task: Any, batches: Sequence[Batch], *, position_ids: torch.Tensor | None = None) -> Calibration:
    """Calibration (entropy MAE, KL, accuracy in bits) of ``model`` in eval mode on fixed batches.

    ``position_ids``, long [seq_len], is passed to the model (a TinyGPT) for every batch, e.g.
    :func:`windtunnel.train.step_position_ids` to read the steps at other rows of the table;
    None (the default) calls the model without it."""
    device = next(model.parameters()).device
    extra = {} if position_ids is None else {"position_ids": position_ids.to(device)}
    parts = []
    with eval_mode(model):
        for batch in batches:
            logits = model(batch.tokens.to(device), **extra)
            sl = select_sites(logits, batch.sites.to(device), class_offset=task.class_offset, n_classes=task.n_classes)
            parts.append(site_metrics(sl.cpu(), batch.posterior, batch.labels))
    return summarize(type(parts[0]).cat(parts))


# ----------------------------------------------------------------------------- states


@dataclass(frozen=True)
class SiteStates:
    """What one recorded forward pass of a TinyGPT gives the geometry diagnostics.

    Attributes:
        residual: the final-norm residual at the prediction sites *including the norm's gain (and
            LayerNorm bias)*, i.e. exactly what the readout reads, [batch, n_sites, d_model].
            (``ln_final.hook_normalized`` is taken before the gain; the gain is a per-feature
            scale, so the z-scored PCA statistics of §8.3 are the same either way.)
        entropy_bits: H_Bayes at each site, [batch, n_sites].
        positions: the site positions, long [n_sites].
        patterns: ``blocks.{l}.attn.hook_pattern`` per layer, [layer, batch, head, pos, pos].
        q, k: ``hook_q`` / ``hook_k`` per layer, [layer, batch, pos, head, d_head].
        logits: [batch, seq_len, n_outputs].
    """

    residual: torch.Tensor
    entropy_bits: torch.Tensor
    positions: torch.Tensor
    patterns: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    logits: torch.Tensor

    def flat(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(states [n, d_model], entropy_bits [n], positions [n]) with n = batch * n_sites, float64."""
        b, s, d = self.residual.shape
        return (
            self.residual.reshape(b * s, d).double(),
            self.entropy_bits.reshape(b * s).double(),
            self.positions.expand(b, s).reshape(b * s),
        )


@torch.no_grad()
def collect_states(model: TinyGPT, task: Any, batch: Batch) -> SiteStates:
    """Run ``model`` (in eval mode) on ``batch`` and record what the diagnostics need (SPEC §8.3).

    Raises:
        ValueError: when ``model`` is not a TinyGPT.
    """
    model = _check_model("collect_states", model)
    device = next(model.parameters()).device
    wanted = lambda name: name == "ln_final.hook_normalized" or name.endswith(("attn.hook_pattern", "attn.hook_q", "attn.hook_k"))  # noqa: E731
    with eval_mode(model), record(model, names=wanted) as cache:
        logits = model(batch.tokens.to(device))
    sites = batch.sites.to(device)
    norm = model.ln_final
    residual = cache["ln_final.hook_normalized"][:, sites] * norm.w
    if getattr(norm, "b", None) is not None:
        residual = residual + norm.b
    n = model.config.n_layers
    return SiteStates(
        residual=residual.detach(),
        entropy_bits=batch.entropy_bits.to(device),
        positions=sites,
        patterns=torch.stack([cache[f"blocks.{l}.attn.hook_pattern"] for l in range(n)]),
        q=torch.stack([cache[f"blocks.{l}.attn.hook_q"] for l in range(n)]),
        k=torch.stack([cache[f"blocks.{l}.attn.hook_k"] for l in range(n)]),
        logits=logits,
    )


# ----------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class GeometrySnapshot:
    """The §8.1–§8.3 diagnostics of one model on one batch.

    Attributes:
        key_orthogonality: per layer (``KeyOrthogonality``), or None for tasks without hypothesis
            tokens (see :func:`hypothesis_tokens`).
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
        for layer, per_head in enumerate(self.head_entropy_bits.tolist()):
            out += [_row(step, "attn_entropy_bits", v, layer, h) for h, v in enumerate(per_head)]
            out.append(_row(step, "attn_entropy_bits", self.layer_entropy_bits[layer], layer))
        out.append(_row(step, "focusing_ratio", self.focusing_ratio))
        m = self.manifold
        for name in ("pc1_share", "pc12_share", "participation_ratio", "spearman", "pearson", "ordering_score", "probe_r2", "partial_pearson_given_position"):
            value = getattr(m, name)
            if value is not None:
                out.append(_row(step, f"manifold_{name}", value))
        return out


def layer_key_orthogonality(model: TinyGPT, tokens: torch.Tensor) -> tuple[KeyOrthogonality, ...]:
    """Key orthogonality of every layer on the given hypothesis tokens (SPEC §8.1).

    Layer l uses n_l(e_x) = ``blocks[l].ln1(W_E[x])`` (the block's pre-attention norm with its
    gain, no position embedding) and that layer's ``W_K``. For l = 0 this is exactly the key a
    hypothesis token would get at the input; for deeper layers it is the same probe of the key
    map (the residual there is no longer the bare embedding), a convention kept for comparability.
    """
    model = _check_model("layer_key_orthogonality", model)
    with torch.no_grad():
        emb = model.embed.W_E[tokens.to(model.embed.W_E.device)].double()  # [n_hyp, d_model]
        return tuple(
            key_orthogonality(block.ln1(emb), block.attn.W_K.detach().double()) for block in model.blocks
        )


def geometry_snapshot(
    model: TinyGPT,
    task: Any,
    batch: Batch,
    *,
    baseline_model: TinyGPT | None = None,
    generator: torch.Generator | None = None,
    states: SiteStates | None = None,
) -> GeometrySnapshot:
    """Key orthogonality, attention entropy and value-manifold statistics (SPEC §8.1–§8.3).

    Args:
        model: the TinyGPT to probe (run in eval mode; its mode is restored).
        task: the task ``batch`` came from.
        batch: a fixed, seeded probe batch.
        baseline_model: the same architecture at initialisation (step 0), for the §8.1 baseline.
        generator: draws the 80/20 split of the linear entropy probe; None skips the probe.
        states: the :func:`collect_states` result of ``model`` on ``batch``, if already computed.

    Raises:
        ValueError: when a model is not a TinyGPT.
    """
    model = _check_model("geometry_snapshot", model)
    states = states if states is not None else collect_states(model, task, batch)
    hyp = hypothesis_tokens(task)
    ko = base = None
    if hyp is not None:
        ko = layer_key_orthogonality(model, hyp)
        if baseline_model is not None:
            base = layer_key_orthogonality(_check_model("geometry_snapshot", baseline_model), hyp)
    ent = attention_entropy(states.patterns.double(), states.positions)
    x, h, pos = states.flat()
    manifold = ValueManifoldPCA().fit(x, h, positions=pos, generator=generator).summary_
    return GeometrySnapshot(
        key_orthogonality=ko,
        baseline_key_orthogonality=base,
        random_baseline=random_abs_cosine(model.config.d_head),
        head_entropy_bits=ent.head_entropy_bits,
        layer_entropy_bits=ent.layer_entropy_bits,
        focusing_ratio=float(ent.focusing_ratio),
        manifold=manifold,
    )


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


# ----------------------------------------------------------------------------- routing law


@dataclass(frozen=True)
class RoutingLawStats:
    """Routing-law telemetry of every head on one forward/backward of the training loss (§8.4).

    All statistics are [layer, head]. "Live" query rows are those whose upstream gradient u_i is
    nonzero (rows that feed the loss); u comes from the mean loss over the labelled sites.

    Attributes:
        loss_nats: the training loss of the pass.
        advantage_abs_mean: mean |adv_ij| over allowed entries of live rows.
        positive_advantage_mass: Σ_j α_ij 1[adv_ij > 0], averaged over live rows (adv within
            rounding of 0 counts as 0).
        d_scores_fro: ‖dS‖_F = ‖dL/ds‖_F over the batch.
        advantage_attention_cov: covariance of (α_ij, adv_ij) pooled over allowed entries of live
            rows (ours: > 0 when the attended keys are those the step would reinforce).
        responsibility_max: max_j R_j (R_j = Σ_i α_ij over live rows), averaged over sequences.
        responsibility_cv: std_j R_j / mean_j R_j, averaged over sequences.
        value_pull_norm: ‖dV‖_F = ‖AᵀU‖_F over the batch.
        law_rel_error: per layer [layer], worst relative error of ``dynamics.check_law`` (closed
            forms vs an autograd rebuild of the head, float64, on the first 8 sequences).
        model_grad_rel_error: per layer [layer], max relative error of the closed-form dQ, dK, dV
            against the gradients the model's own backward left at ``hook_q/k/v`` (float32 model).
    """

    loss_nats: float
    advantage_abs_mean: torch.Tensor
    positive_advantage_mass: torch.Tensor
    d_scores_fro: torch.Tensor
    advantage_attention_cov: torch.Tensor
    responsibility_max: torch.Tensor
    responsibility_cv: torch.Tensor
    value_pull_norm: torch.Tensor
    law_rel_error: torch.Tensor
    model_grad_rel_error: torch.Tensor

    _PER_HEAD = (
        "advantage_abs_mean",
        "positive_advantage_mass",
        "d_scores_fro",
        "advantage_attention_cov",
        "responsibility_max",
        "responsibility_cv",
        "value_pull_norm",
    )

    def rows(self, step: int) -> list[Row]:
        """Tidy telemetry rows {step, layer, head, metric, value}."""
        out = [_row(step, "law_loss_nats", self.loss_nats)]
        for name in self._PER_HEAD:
            for layer, per_head in enumerate(getattr(self, name).tolist()):
                out += [_row(step, name, v, layer, h) for h, v in enumerate(per_head)]
        for layer in range(self.law_rel_error.shape[0]):
            out.append(_row(step, "law_check_rel_error", self.law_rel_error[layer], layer))
            out.append(_row(step, "law_model_grad_rel_error", self.model_grad_rel_error[layer], layer))
        return out


def _rel_error(closed: torch.Tensor, reference: torch.Tensor) -> float:
    scale = float(reference.abs().max())
    err = float((closed - reference).abs().max())
    return err / scale if scale > 0 else err


def routing_law_stats(model: TinyGPT, task: Any, batch: Batch, *, loss_fn: LossFn = site_loss_nats) -> RoutingLawStats:
    """Advantage, responsibility and exactness statistics per head (SPEC §8.4).

    One forward pass in eval mode records q, k, v (after any bias; exactly the tensors the scores
    are built from) and the pattern; one backward of ``loss_fn`` records u = ``hook_z_grad`` and
    the model's own gradients at q, k, v. Each layer's heads go through
    :func:`windtunnel.dynamics.attention_gradients` with the causal mask and the attention's own
    scale. Parameter gradients are restored afterwards, so a probe does not disturb training.

    Raises:
        ValueError: when ``model`` is not a TinyGPT, or a head carries an ablation multiplier.
    """
    model = _check_unablated("routing_law_stats", model)
    saved_grads = [p.grad for p in model.parameters()]
    device = next(model.parameters()).device
    wanted = lambda name: name.endswith(("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z"))  # noqa: E731
    try:
        with eval_mode(model), torch.enable_grad(), record(model, names=wanted, grads=True) as cache:
            logits = model(batch.tokens.to(device))
            loss = loss_fn(logits, batch.to(device), task)
            loss.backward()
    finally:
        for p, g in zip(model.parameters(), saved_grads):
            p.grad = g
    stats: dict[str, list[torch.Tensor]] = {name: [] for name in RoutingLawStats._PER_HEAD}
    law_err, model_err = [], []
    for l, block in enumerate(model.blocks):
        # hooks are [batch, pos, head, d_head]; dynamics wants [batch, head, pos, d_head]
        q, k, v, u = (cache[f"blocks.{l}.attn.hook_{n}"].transpose(1, 2).double() for n in ("q", "k", "v", "z_grad"))
        pos = q.shape[-2]
        mask = torch.ones(pos, pos, dtype=torch.bool, device=q.device).tril()
        g = attention_gradients(q, k, v, u, mask=mask, scale=block.attn.scale)
        live = (u.abs().sum(-1) > 0)[..., None] & g.mask  # [batch, head, q, k]
        n_live = live.sum((0, 2, 3)).clamp_min(1)
        rows_live = live.any(-1)  # [batch, head, q]
        n_rows = rows_live.sum((0, 2)).clamp_min(1)
        adv, alpha = g.advantage, g.alpha
        stats["advantage_abs_mean"].append((adv.abs() * live).sum((0, 2, 3)) / n_live)
        # adv is a difference of dot products: exact zeros (a one-key row) come out as +-1e-20, so
        # its sign counts only above the rounding floor of its two terms
        floor = 1e3 * torch.finfo(adv.dtype).eps * (g.compatibility.abs() + g.expected_compatibility.abs()[..., None])
        stats["positive_advantage_mass"].append((alpha * (adv > floor) * live).sum(-1).sum((0, 2)) / n_rows)
        stats["d_scores_fro"].append(g.d_scores.pow(2).sum((0, 2, 3)).sqrt())
        mean_a = (alpha * live).sum((0, 2, 3)) / n_live
        mean_adv = (adv * live).sum((0, 2, 3)) / n_live
        cov = ((alpha - mean_a[:, None, None]) * (adv - mean_adv[:, None, None]) * live).sum((0, 2, 3)) / n_live
        stats["advantage_attention_cov"].append(cov)
        resp = (alpha * rows_live[..., None]).sum(-2)  # [batch, head, key_pos]
        stats["responsibility_max"].append(resp.amax(-1).mean(0))
        mean_r = resp.mean(-1)
        cv = torch.where(mean_r > 0, resp.std(-1, correction=0) / mean_r.clamp_min(1e-300), torch.zeros_like(mean_r))
        stats["responsibility_cv"].append(cv.mean(0))
        stats["value_pull_norm"].append(g.d_values.pow(2).sum((0, 2, 3)).sqrt())
        # the autograd rebuild costs as much as the stats; 8 sequences are enough for an exactness check
        few = slice(0, 8)
        law_err.append(check_law(q[few], k[few], v[few], u[few], mask=mask, scale=block.attn.scale).worst_rel_error)
        model_err.append(
            max(
                _rel_error(g.d_queries, cache[f"blocks.{l}.attn.hook_q_grad"].transpose(1, 2).double()),
                _rel_error(g.d_keys, cache[f"blocks.{l}.attn.hook_k_grad"].transpose(1, 2).double()),
                _rel_error(g.d_values, cache[f"blocks.{l}.attn.hook_v_grad"].transpose(1, 2).double()),
            )
        )
    return RoutingLawStats(
        loss_nats=float(loss.detach()),
        **{name: torch.stack(values).float() for name, values in stats.items()},
        law_rel_error=torch.tensor(law_err),
        model_grad_rel_error=torch.tensor(model_err),
    )


# ----------------------------------------------------------------------------- value updates


@dataclass(frozen=True)
class ValueUpdateStats:
    """The optimiser's realised change of every head's value vectors against their pull (§8.4).

    On one training step: the pull is -dL/dv_j = -(AᵀU)_j, the responsibility-weighted sum of the
    upstream gradients (SPEC §2.3), taken from the step's own backward; the realised change is
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
            to the head's own W_V and b_V at fixed input, x_j ΔW_V + Δb_V (x the attention's
            input, the output of ln1, before the step).
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


def _value_inputs(model: TinyGPT, tokens: torch.Tensor, position_ids: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Every layer's value vectors ``blocks.{l}.attn.hook_v`` [batch, pos, head, d_head] and the
    attention's input ``blocks.{l}.attn.input`` (the output of ln1) [batch, pos, d_model], eval mode."""
    inputs: dict[str, torch.Tensor] = {}
    handles = [
        block.attn.register_forward_pre_hook(lambda _m, args, l=l: inputs.__setitem__(f"blocks.{l}.attn.input", args[0].detach()))
        for l, block in enumerate(model.blocks)
    ]
    try:
        with torch.no_grad(), eval_mode(model), record(model, names=lambda name: name.endswith("attn.hook_v")) as cache:
            model(tokens, **({} if position_ids is None else {"position_ids": position_ids}))
    finally:
        for handle in handles:
            handle.remove()
    return {**cache, **inputs}


class ValueUpdateProbe:
    """Measures :class:`ValueUpdateStats` on chosen training steps; used by the Trainer.

    Wrap the step's forward and backward in :meth:`watch`, take the optimiser step, then call
    :meth:`finish`::

        with probe.watch(model, tokens, position_ids):
            loss_fn(model(tokens, position_ids=position_ids)).backward()
        optimizer.step()
        stats = probe.finish(model, lr)

    The extra forward passes run in eval mode and draw no randomness, so watching a step does not
    change the training run.
    """

    def __init__(self) -> None:
        self._pending: tuple[Any, ...] | None = None

    @contextlib.contextmanager
    def watch(self, model: nn.Module, tokens: torch.Tensor, position_ids: torch.Tensor | None = None) -> Iterator[None]:
        """Record the values before the step and their gradient during the step's backward.

        Raises:
            ValueError: when ``model`` is not a TinyGPT, or a head carries an ablation multiplier.
        """
        model = _check_unablated("ValueUpdateProbe.watch", model)
        before = _value_inputs(model, tokens, position_ids)
        weights = [(b.attn.W_V.detach().clone(), None if b.attn.b_V is None else b.attn.b_V.detach().clone()) for b in model.blocks]
        with record(model, names=lambda name: name.endswith("attn.hook_v"), grads=True) as cache:
            yield
        self._pending = (model, tokens, position_ids, before, weights, cache)

    def finish(self, model: nn.Module, lr: float) -> ValueUpdateStats:
        """Compare the realised change of the values with their pull, after the optimiser step.

        Raises:
            ValueError: when ``lr`` is not positive (the norm ratio divides by it).
            RuntimeError: without a watched step, or when the step's backward did not reach the
                values (no ``hook_v`` gradient was recorded).
        """
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ValueError(must("ValueUpdateProbe.finish", "lr", "a positive finite learning rate", lr))
        if self._pending is None:
            raise RuntimeError("ValueUpdateProbe.finish: no watched step; wrap the forward and backward in watch() first.")
        watched, tokens, position_ids, before, weights, cache = self._pending
        self._pending = None
        if model is not watched:
            raise RuntimeError("ValueUpdateProbe.finish: called with another model than the watched one.")
        after = _value_inputs(watched, tokens, position_ids)
        stats: dict[str, list[torch.Tensor]] = {name: [] for name in ValueUpdateStats._PER_HEAD}
        for l, (block, (w_before, b_before)) in enumerate(zip(watched.blocks, weights)):
            name = f"blocks.{l}.attn.hook_v"
            if name + "_grad" not in cache:
                raise RuntimeError(f"ValueUpdateProbe.finish: the watched backward left no gradient at {name}.")
            pull = cache[name + "_grad"]  # [batch, pos, head, d_head] = (AᵀU)_j per head
            attn = block.attn
            if attn.W_V.grad is None:
                raise RuntimeError(f"ValueUpdateProbe.finish: blocks.{l}.attn.W_V has no gradient; call finish before the next zero_grad.")
            x = before[f"blocks.{l}.attn.input"].double()  # [batch, pos, d_model]

            def change(d_weight: torch.Tensor, d_bias: torch.Tensor | None) -> torch.Tensor:
                """x ΔW_V + Δb_V, [batch, pos, head, d_head]."""
                out = torch.einsum("bpd,hde->bphe", x, d_weight.double())
                return out if d_bias is None else out + d_bias.double()

            has_bias = b_before is not None
            own = change(attn.W_V.detach() - w_before, attn.b_V.detach() - b_before if has_bias else None)
            gradient = change(-lr * attn.W_V.grad, -lr * attn.b_V.grad if has_bias and attn.b_V.grad is not None else None)
            for prefix, delta in (("", after[name].double() - before[name].double()), ("own_", own), ("gradient_", gradient)):
                cos, whole, ratio = _value_pull_agreement(delta, pull, lr)
                stats[f"{prefix}pull_cosine"].append(cos)
                stats[f"{prefix}pull_cosine_all"].append(whole)
                if f"{prefix}norm_ratio" in stats:
                    stats[f"{prefix}norm_ratio"].append(ratio)
        return ValueUpdateStats(lr=float(lr), **{name: torch.stack(v).float() for name, v in stats.items()})


# ----------------------------------------------------------------------------- probes


def make_probes(
    task: Any,
    *,
    eval_batch: Batch,
    baseline_model: TinyGPT | None = None,
    generator: torch.Generator | None = None,
    run_dir: str | Path | None = None,
    save_snapshots: bool = True,
) -> list[Callable[[nn.Module, int], list[Row]]]:
    """Trainer probes: geometry (§8.1–8.3), routing law (§8.4) and calibration on a fixed batch;
    for the HMM also the memory probe, :func:`hmm_lag_response` at every probed step (rows
    ``model_move_tv_lag{d}``, ``bayes_move_tv_lag{d}``, ``response_error_tv_lag{d}``), which shows
    the lags of the observation history being learned one after another.

    Each probe is ``probe(model, step) -> rows`` of {step, layer, head, metric, value} (layer and
    head None where not applicable). The geometry and routing-law probes need a TinyGPT and emit
    nothing for other models. ``generator`` seeds the entropy probe's 80/20 split: its state is
    captured once, so every step uses the same split. With ``run_dir``, the geometry probe also
    writes the 2-D projection of the value manifold to ``RUN_DIR/manifold/step_N.json`` and, with
    ``save_snapshots``, the model weights to ``RUN_DIR/snapshots/step_N.pt`` (the log-spaced
    checkpoints the frame–precision dissociation of §8.6 reads).
    """
    split = _replayer(generator)
    out_dir = RunDir(run_dir) if run_dir is not None else None

    def geometry_probe(model: nn.Module, step: int) -> list[Row]:
        if not isinstance(model, TinyGPT):
            return []
        states = collect_states(model, task, eval_batch)
        snap = geometry_snapshot(model, task, eval_batch, baseline_model=baseline_model, generator=split(), states=states)
        if out_dir is not None:
            write_json_atomic(out_dir.manifold_path(step), {"step": step, **manifold_projection(states)})
            if save_snapshots:
                out_dir.save_snapshot(step, {"step": step, "model": model.state_dict()})
        return snap.rows(step)

    def routing_probe(model: nn.Module, step: int) -> list[Row]:
        if not isinstance(model, TinyGPT):
            return []
        return routing_law_stats(model, task, eval_batch).rows(step)

    def calibration_probe(model: nn.Module, step: int) -> list[Row]:
        cal = calibrate(model, task, [eval_batch])
        return [
            _row(step, "probe_entropy_mae_bits", cal.entropy_mae_bits),
            _row(step, "probe_kl_bits", cal.kl_bits),
            _row(step, "probe_accuracy", cal.accuracy),
        ]

    def memory_probe(model: nn.Module, step: int) -> list[Row]:
        replay = split()  # the same observation changes at every step, so the curves compare
        lag = hmm_lag_response(model, task, eval_batch, generator=replay if replay is not None else torch.Generator().manual_seed(0))
        return [
            _row(step, f"{name}_lag{d}", value)
            for name in ("model_move_tv", "bayes_move_tv", "response_error_tv")
            for d, value in zip(lag["lags"], lag[name])
        ]

    probes = [geometry_probe, routing_probe, calibration_probe]
    if isinstance(task, HMMFiltering) and task.n_symbols >= 2:
        probes.append(memory_probe)
    return probes


@torch.no_grad()
def hmm_lag_response(
    model: torch.nn.Module, task: HMMFiltering, batch: HMMBatch, *, generator: torch.Generator, max_lag: int = 8
) -> dict[str, Any]:
    """How far back a model's HMM belief listens: its response to one changed observation, lag by
    lag, against the exact filter's.

    For each step j, every sequence gets o_j replaced by one of the other symbols, drawn uniformly
    (from ``generator``), and the beliefs at the read steps t >= j are computed again. With TV the
    total variation distance, p_t the model's belief (softmax over the state slice) and α_t the
    exact filtered belief, at lag d = t - j:

    * ``bayes_move_tv``: TV(α_t, α'_t), how much the exact belief moves;
    * ``model_move_tv``: TV(p_t, p'_t), how much the model's belief moves;
    * ``response_error_tv``: ½‖(p'_t - p_t) - (α'_t - α_t)‖₁, how far the model's move is from the
      exact one: 0 for the exact filter, ``bayes_move_tv`` for a model that ignores o_j.

    Each is averaged over the sequences and over every step pair at that lag (K - d of them).
    A filter that remembers w observations (:func:`~windtunnel.tasks.windowed_posterior`) has
    ``model_move_tv`` = 0 from lag w on, so the lag where the model's move falls short of the
    exact one is its working memory. Complements
    :func:`windtunnel.experiments.evaluation.memory_ladder`, which compares errors.

    Shapes: ``batch`` holds B sequences of ``task``; ``model`` maps tokens [B, seq_len] to logits
    [B, seq_len, vocab] (any windtunnel model). K + 1 forward passes of B sequences.

    Returns:
        ``{"lags": [0..min(max_lag, K-1)], "bayes_move_tv": [...], "model_move_tv": [...],
        "response_error_tv": [...], "n_sequences": B}``.

    Raises:
        ValueError: when ``task`` has one symbol (nothing to change to) or ``max_lag`` < 0.
    """
    if task.n_symbols < 2:
        raise ValueError("hmm_lag_response: the task needs at least 2 symbols to change an observation to another.")
    if isinstance(max_lag, bool) or not isinstance(max_lag, int) or max_lag < 0:
        raise ValueError(f"hmm_lag_response: max_lag must be an int >= 0; got {max_lag!r}.")
    device = next(model.parameters()).device
    sites = task.sites
    lo, hi = task.class_offset, task.class_offset + task.n_classes

    def beliefs(observations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = task.encode(batch.transition_cents, batch.emission_cents, observations)
        logits = model(tokens.to(device))[:, sites.to(device), lo:hi]
        exact = hmm_posterior(batch.transition_cents, batch.emission_cents, observations).filtered_probs
        return torch.softmax(logits.double(), -1).cpu(), exact.cpu()

    n_steps = batch.observations.shape[1]
    lags = list(range(min(max_lag, n_steps - 1) + 1))
    sums = {name: torch.zeros(len(lags), dtype=torch.float64) for name in ("bayes_move_tv", "model_move_tv", "response_error_tv")}
    with eval_mode(model):
        model_0, exact_0 = beliefs(batch.observations)
        for j in range(n_steps):
            changed = batch.observations.clone()
            offset = torch.randint(1, task.n_symbols, (changed.shape[0],), generator=generator).to(changed.device)
            changed[:, j] = (changed[:, j] + offset) % task.n_symbols
            model_1, exact_1 = beliefs(changed)
            last = min(n_steps, j + len(lags))  # steps t = j .. j + max_lag
            d_model = model_1[:, j:last] - model_0[:, j:last]
            d_exact = exact_1[:, j:last] - exact_0[:, j:last]
            k = last - j
            sums["bayes_move_tv"][:k] += 0.5 * d_exact.abs().sum(-1).mean(0)
            sums["model_move_tv"][:k] += 0.5 * d_model.abs().sum(-1).mean(0)
            sums["response_error_tv"][:k] += 0.5 * (d_model - d_exact).abs().sum(-1).mean(0)
    pairs = torch.tensor([n_steps - d for d in lags], dtype=torch.float64)
    return {"lags": lags, **{name: (total / pairs).tolist() for name, total in sums.items()}, "n_sequences": int(batch.observations.shape[0])}


def hmm_lag_map(
    model: TinyGPT, task: HMMFiltering, batch: HMMBatch, *, generator: torch.Generator, max_lag: int = 5
) -> dict[str, Any]:
    """Which heads carry which lags: :func:`hmm_lag_response` of the intact model and with each
    head ablated in turn (``model.ablated(heads=[(l, h)])``), all on the same changed
    observations (``generator``'s state is replayed for every case).

    A head whose ablation takes the move at lag d down towards 0 carries o_{t-d}; one whose
    ablation leaves ``response_error_tv`` at lag d unchanged contributes nothing useful there.

    Returns:
        ``{"lags", "bayes_move_tv", "n_sequences"`` (as :func:`hmm_lag_response`), ``"intact":
        {"model_move_tv", "response_error_tv"}, "heads": [{"layer", "head", "model_move_tv",
        "response_error_tv"}, ...]}`` with the heads in (layer, head) order.

    Raises:
        ValueError: when ``model`` is not a TinyGPT, or as :func:`hmm_lag_response`.
    """
    model = _check_model("hmm_lag_map", model)
    replay = _replayer(generator)

    def response() -> dict[str, Any]:
        return hmm_lag_response(model, task, batch, generator=replay(), max_lag=max_lag)

    intact = response()
    heads = []
    for layer in range(model.config.n_layers):
        for head in range(model.config.n_heads):
            with model.ablated(heads=[(layer, head)]):
                r = response()
            heads.append({"layer": layer, "head": head, "model_move_tv": r["model_move_tv"], "response_error_tv": r["response_error_tv"]})
    return {
        "lags": intact["lags"],
        "bayes_move_tv": intact["bayes_move_tv"],
        "n_sequences": intact["n_sequences"],
        "intact": {"model_move_tv": intact["model_move_tv"], "response_error_tv": intact["response_error_tv"]},
        "heads": heads,
    }


# ----------------------------------------------------------------------------- ablations


@dataclass(frozen=True)
class AblationTable:
    """Effect of ablating each head and each layer (SPEC §8.5).

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


def ablation_table(model: TinyGPT, task: Any, batches: Sequence[Batch]) -> AblationTable:
    """ΔMAE, ΔKL and Δaccuracy of every single-head and single-layer ablation (SPEC §8.5).

    Heads: the post-softmax pattern times 0 (``model.ablated(heads=[(l, h)])``). Layers: the
    block bypassed, or only its attention output, or only its FFN output, zeroed.

    Raises:
        ValueError: when ``model`` is not a TinyGPT.
    """
    model = _check_model("ablation_table", model)
    intact = calibrate(model, task, batches).scalars()
    cases: list[tuple[str, int, int | None, dict[str, Any]]] = [
        ("head", l, h, {"heads": [(l, h)]}) for l in range(model.config.n_layers) for h in range(model.config.n_heads)
    ]
    for kind in ("bypass", "zero_attn_out", "zero_mlp_out"):
        cases += [(kind, l, None, {kind: [l]}) for l in range(model.config.n_layers)]
    rows = []
    for kind, layer, head, kwargs in cases:
        with model.ablated(**kwargs):
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
