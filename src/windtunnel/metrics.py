"""Calibration against the exact posterior in bits: entropy MAE, KL, accuracy, floors (docs/theory.md §7).

Tensors in, tensors out. Every metric is computed over the task's hypothesis slice of the logits
(softmax over the slice only, which equals the full softmax renormalised on the slice), never over
the full vocabulary. The headline entropy MAE is per sample: |H(p_model) - H(p_bayes)| is taken at
every (sequence, site) before averaging.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from windtunnel._checks import check_generator, check_positive_int, describe_tensor

__all__ = [
    "Calibration",
    "CalibrationCurves",
    "Floors",
    "SiteMetrics",
    "calibration",
    "entropy_mae",
    "mae_curve_first",
    "select_sites",
    "site_metrics",
    "summarize",
    "trivial_floors",
]

PROB_CLIP = 1e-10
"""Both distributions are clipped at this value inside the KL's logarithm (docs/theory.md §7)."""

_LN2 = math.log(2.0)


def select_sites(
    logits: torch.Tensor, sites: torch.Tensor, *, class_offset: int, n_classes: int
) -> torch.Tensor:
    """The hypothesis slice of the logits at the prediction sites.

    Args:
        logits: model outputs, float [batch, seq_len, vocab].
        sites: positions to read, long [n_sites] (a task batch's ``sites``).
        class_offset: logit index of hypothesis 0 (the task's ``class_offset``).
        n_classes: size of the slice (the task's ``n_classes``).

    Returns:
        float [batch, n_sites, n_classes], the view
        ``logits[:, sites, class_offset : class_offset + n_classes]``.

    Raises:
        ValueError: when ``logits`` is not a 3-d float tensor, a site is out of range, or the slice
            does not fit in ``vocab``.
    """
    owner = "select_sites"
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.dim() != 3:
        raise ValueError(
            f"{owner}: logits must be a floating-point tensor of shape [batch, seq_len, vocab]; "
            f"got {describe_tensor(logits)}."
        )
    if (
        not isinstance(sites, torch.Tensor)
        or sites.dtype != torch.long
        or sites.dim() != 1
        or (sites.numel() and (sites.min() < 0 or sites.max() >= logits.shape[1]))
    ):
        raise ValueError(
            f"{owner}: sites must be a long [n_sites] tensor of positions in "
            f"0..{logits.shape[1] - 1}; got {_show(sites)}."
        )
    vocab = logits.shape[-1]
    if class_offset < 0 or n_classes < 1 or class_offset + n_classes > vocab:
        raise ValueError(
            f"{owner}: class_offset + n_classes must be <= vocab = {vocab} with class_offset >= 0 "
            f"and n_classes >= 1; got class_offset={class_offset}, n_classes={n_classes}."
        )
    return logits[:, sites, class_offset : class_offset + n_classes]


@dataclass(frozen=True)
class SiteMetrics:
    """Every metric at every (sequence, site), before any averaging.

    Concatenate these over evaluation chunks with :meth:`cat`, then reduce with :func:`summarize`.

    Attributes:
        model_entropy_bits: H(p_model), float64 [batch, n_sites].
        bayes_entropy_bits: H(p_bayes), float64 [batch, n_sites].
        kl_bits: KL(p_bayes || p_model) in bits, clipped as in :func:`site_metrics`,
            float64 [batch, n_sites].
        total_variation: (1/2) sum |p_model - p_bayes|, in [0, 1], float64 [batch, n_sites].
        cross_entropy_nats: -log p_model(label), float64 [batch, n_sites].
        soft_cross_entropy_nats: -sum p_bayes log p_model, float64 [batch, n_sites].
        correct: argmax p_model == label, bool [batch, n_sites].
    """

    model_entropy_bits: torch.Tensor
    bayes_entropy_bits: torch.Tensor
    kl_bits: torch.Tensor
    total_variation: torch.Tensor
    cross_entropy_nats: torch.Tensor
    soft_cross_entropy_nats: torch.Tensor
    correct: torch.Tensor

    @classmethod
    def cat(cls, parts: list[SiteMetrics]) -> SiteMetrics:
        """Join chunks along the batch axis (their site counts must agree)."""
        if not parts:
            raise ValueError("SiteMetrics.cat.parts must be a non-empty list; got [].")
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{n: torch.cat([getattr(p, n) for p in parts], dim=0) for n in names})


@dataclass(frozen=True)
class CalibrationCurves:
    """Per-position curves: each metric at each site, averaged over sequences, all [n_sites].

    Attributes:
        entropy_mae_bits: mean_n |H(p_model) - H(p_bayes)|.
        entropy_gap_bits: mean_n H(p_model) - H(p_bayes) (signed; > 0 is under-confident).
        kl_bits: mean_n KL(p_bayes || p_model).
        accuracy: mean_n [argmax p_model == label].
        total_variation: mean_n TV(p_model, p_bayes).
        model_entropy_bits: mean_n H(p_model).
        bayes_entropy_bits: mean_n H(p_bayes).
        cross_entropy_nats: mean_n -log p_model(label).
        soft_cross_entropy_nats: mean_n -sum p_bayes log p_model.
    """

    entropy_mae_bits: torch.Tensor
    entropy_gap_bits: torch.Tensor
    kl_bits: torch.Tensor
    accuracy: torch.Tensor
    total_variation: torch.Tensor
    model_entropy_bits: torch.Tensor
    bayes_entropy_bits: torch.Tensor
    cross_entropy_nats: torch.Tensor
    soft_cross_entropy_nats: torch.Tensor


@dataclass(frozen=True)
class Calibration:
    """Calibration summary: means over sequences and sites (0-d float64 tensors) plus curves.

    Attributes:
        entropy_mae_bits: the headline, per-sample mean_{n,k} |H(p_model) - H(p_bayes)|.
        entropy_mae_se_bits: its standard error over sequences, std_n(m_n) / sqrt(N) with m_n the
            sequence's mean over sites (sample std; NaN for one sequence). The sites of one
            sequence are not independent, so the sequence is the unit. Two models evaluated on
            the same sequences (the same seed) are compared more tightly by the paired
            difference of their per-sequence errors than by this.
        mae_curve_first_bits: mean_k |mean_n H(p_model) - mean_n H(p_bayes)|, the averaging used
            by some reference code. WRONG as a calibration measure (opposite errors cancel; it is
            <= ``entropy_mae_bits``); kept only for comparison with published numbers.
        entropy_gap_bits: signed mean H(p_model) - H(p_bayes).
        kl_bits: mean KL(p_bayes || p_model).
        accuracy: mean [argmax p_model == label].
        total_variation: mean TV(p_model, p_bayes).
        model_entropy_bits: mean H(p_model).
        bayes_entropy_bits: mean H(p_bayes).
        cross_entropy_nats: mean -log p_model(label).
        soft_cross_entropy_nats: mean -sum p_bayes log p_model.
        n_sequences: number of sequences averaged.
        per_site: the same metrics as curves over sites.
    """

    entropy_mae_bits: torch.Tensor
    entropy_mae_se_bits: torch.Tensor
    mae_curve_first_bits: torch.Tensor
    entropy_gap_bits: torch.Tensor
    kl_bits: torch.Tensor
    accuracy: torch.Tensor
    total_variation: torch.Tensor
    model_entropy_bits: torch.Tensor
    bayes_entropy_bits: torch.Tensor
    cross_entropy_nats: torch.Tensor
    soft_cross_entropy_nats: torch.Tensor
    n_sequences: int
    per_site: CalibrationCurves

    def scalars(self) -> dict[str, float]:
        """The scalar fields as Python floats (for metrics.jsonl), ``per_site`` left out."""
        out: dict[str, float] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                out[f.name] = value.item()
            elif isinstance(value, int):
                out[f.name] = value
        return out


def site_metrics(
    site_logits: torch.Tensor, posterior: torch.Tensor, labels: torch.Tensor
) -> SiteMetrics:
    """Every calibration metric at every (sequence, site), in float64.

    With p = softmax(site_logits) over the slice and q = ``posterior``:
    H(p) = -sum p log2 p (0 log 0 = 0);
    KL(q || p) = sum_{c: q_c > 0} q_c log2(max(q_c, 1e-10) / max(p_c, 1e-10)) (both clipped at
    1e-10 inside the log, weighted by the unclipped q so that terms with q_c = 0 vanish);
    TV = (1/2) sum |p - q|; CE = -ln p_label; soft CE = -sum q ln p.

    Shapes: site_logits float [batch, n_sites, n_classes] (already restricted to the hypothesis
    slice, e.g. by :func:`select_sites`; -inf entries are allowed), posterior float
    [batch, n_sites, n_classes], labels long [batch, n_sites].

    Raises:
        ValueError: naming the argument whose dtype or shape does not fit.
    """
    _check_inputs("site_metrics", site_logits, posterior, labels)
    log_p = torch.log_softmax(site_logits.to(torch.float64), dim=-1)
    p = log_p.exp()
    q = posterior.to(torch.float64)
    log_q = torch.where(q > 0, torch.log(q.clamp_min(PROB_CLIP)), 0.0)
    p_log_p = torch.where(p > 0, p * log_p, 0.0)
    q_log_p = torch.where(q > 0, q * log_p, 0.0)
    model_entropy = -p_log_p.sum(-1) / _LN2
    bayes_entropy = -torch.where(q > 0, q * torch.log(q), 0.0).sum(-1) / _LN2
    log_p_clipped = torch.log(p.clamp_min(PROB_CLIP))
    kl = torch.where(q > 0, q * (log_q - log_p_clipped), 0.0).sum(-1) / _LN2
    return SiteMetrics(
        model_entropy_bits=model_entropy,
        bayes_entropy_bits=bayes_entropy,
        kl_bits=kl,
        total_variation=0.5 * (p - q).abs().sum(-1),
        cross_entropy_nats=-log_p.gather(-1, labels.unsqueeze(-1)).squeeze(-1),
        soft_cross_entropy_nats=-q_log_p.sum(-1),
        correct=site_logits.argmax(-1) == labels,
    )


def summarize(sites: SiteMetrics) -> Calibration:
    """Average :class:`SiteMetrics` over sequences (curves) and over sequences and sites."""
    gap = sites.model_entropy_bits - sites.bayes_entropy_bits
    per_site = CalibrationCurves(
        entropy_mae_bits=gap.abs().mean(0),
        entropy_gap_bits=gap.mean(0),
        kl_bits=sites.kl_bits.mean(0),
        accuracy=sites.correct.to(torch.float64).mean(0),
        total_variation=sites.total_variation.mean(0),
        model_entropy_bits=sites.model_entropy_bits.mean(0),
        bayes_entropy_bits=sites.bayes_entropy_bits.mean(0),
        cross_entropy_nats=sites.cross_entropy_nats.mean(0),
        soft_cross_entropy_nats=sites.soft_cross_entropy_nats.mean(0),
    )
    means = {f.name: getattr(per_site, f.name).mean() for f in dataclasses.fields(per_site)}
    per_sequence = gap.abs().mean(1)
    n = per_sequence.shape[0]
    se = per_sequence.std(correction=1) / math.sqrt(n) if n > 1 else torch.tensor(math.nan, dtype=torch.float64)
    return Calibration(
        **means,
        entropy_mae_se_bits=se,
        mae_curve_first_bits=mae_curve_first(sites.model_entropy_bits, sites.bayes_entropy_bits),
        n_sequences=sites.model_entropy_bits.shape[0],
        per_site=per_site,
    )


def calibration(
    site_logits: torch.Tensor, posterior: torch.Tensor, labels: torch.Tensor
) -> Calibration:
    """``summarize(site_metrics(site_logits, posterior, labels))``; see those for the math.

    Shapes: site_logits float [batch, n_sites, n_classes] (the hypothesis slice only),
    posterior float [batch, n_sites, n_classes], labels long [batch, n_sites].
    """
    return summarize(site_metrics(site_logits, posterior, labels))


def entropy_mae(model_entropy_bits: torch.Tensor, bayes_entropy_bits: torch.Tensor) -> torch.Tensor:
    """Per-sample entropy MAE in bits, mean_{n,k} |H_model(n, k) - H_bayes(n, k)| (the headline).

    Shapes: both float [batch, n_sites]; returns a 0-d tensor.
    """
    _check_pair("entropy_mae", model_entropy_bits, bayes_entropy_bits)
    return (model_entropy_bits - bayes_entropy_bits).abs().mean()


def mae_curve_first(
    model_entropy_bits: torch.Tensor, bayes_entropy_bits: torch.Tensor
) -> torch.Tensor:
    """Curve-first "MAE", mean_k |mean_n H_model(n, k) - mean_n H_bayes(n, k)|, in bits.

    This is WRONG as a calibration metric and is offered only to compare with reference code
    that computes it (docs/theory.md §7, §11.3): averaging over sequences before the absolute value lets
    over- and under-confident sequences cancel, so it is always <= :func:`entropy_mae` and can be
    0 for a badly miscalibrated model.

    Shapes: both float [batch, n_sites]; returns a 0-d tensor.
    """
    _check_pair("mae_curve_first", model_entropy_bits, bayes_entropy_bits)
    return (model_entropy_bits.mean(0) - bayes_entropy_bits.mean(0)).abs().mean()


@dataclass(frozen=True)
class Floors:
    """Trivial reference points of a task (docs/theory.md §7), Monte Carlo over sampled sequences.

    A trained model must beat the uniform numbers; a failed model lands on them.

    Attributes:
        uniform_entropy_mae_bits: entropy MAE of the uniform prediction over the slice
            (1.107 bits for ``Bijection()``; ≈0.415 for ``HMMFiltering()``).
        uniform_kl_bits: mean KL(p_bayes || uniform) = log2(n_classes) - mean H_bayes.
        uniform_cross_entropy_nats: mean CE of the uniform prediction, ln(n_classes).
        bayes_cross_entropy_nats: mean H_bayes in nats, the lowest expected CE any predictor can
            reach, hard or soft labels (2.228 nats bijection; ≈1.32 nats HMM).
        bayes_entropy_bits: mean H_bayes in bits.
        n_sequences: sequences sampled.
    """

    uniform_entropy_mae_bits: float
    uniform_kl_bits: float
    uniform_cross_entropy_nats: float
    bayes_cross_entropy_nats: float
    bayes_entropy_bits: float
    n_sequences: int


class _SamplesBatches(Protocol):
    """The part of the task protocol :func:`trivial_floors` uses (metrics does not import tasks)."""

    def sample(self, batch_size: int, *, generator: torch.Generator) -> Any: ...


def trivial_floors(
    task: _SamplesBatches,
    *,
    generator: torch.Generator,
    n_sequences: int = 2000,
    batch_size: int = 500,
) -> Floors:
    """Floors of docs/theory.md §7 for any task: the uniform predictor and the Bayes CE, by Monte Carlo.

    Samples ``n_sequences`` sequences from ``task.sample`` (in chunks of ``batch_size``) and scores
    a predictor with equal logits over the hypothesis slice against each batch's ``posterior`` and
    ``labels``.

    Args:
        task: any object with ``sample(batch_size, *, generator)`` returning a batch with
            ``posterior`` [batch, n_sites, n_classes] and ``labels`` [batch, n_sites].
        generator: the only source of randomness.
        n_sequences: sequences to sample.
        batch_size: sequences per chunk.

    Raises:
        ValueError: when ``n_sequences`` or ``batch_size`` is not a positive int.
        TypeError: when ``generator`` is not a torch.Generator.
    """
    for field, value in (("n_sequences", n_sequences), ("batch_size", batch_size)):
        text = check_positive_int("trivial_floors", field, value)
        if text:
            raise ValueError(text)
    check_generator("trivial_floors", generator, optional=False)
    parts = []
    remaining = n_sequences
    while remaining > 0:
        size = min(batch_size, remaining)
        batch = task.sample(size, generator=generator)
        uniform = torch.zeros_like(batch.posterior, dtype=torch.float64)
        parts.append(site_metrics(uniform, batch.posterior, batch.labels))
        remaining -= size
    summary = summarize(SiteMetrics.cat(parts))
    return Floors(
        uniform_entropy_mae_bits=summary.entropy_mae_bits.item(),
        uniform_kl_bits=summary.kl_bits.item(),
        uniform_cross_entropy_nats=summary.cross_entropy_nats.item(),
        bayes_cross_entropy_nats=summary.bayes_entropy_bits.item() * _LN2,
        bayes_entropy_bits=summary.bayes_entropy_bits.item(),
        n_sequences=n_sequences,
    )


def _check_inputs(owner: str, site_logits: Any, posterior: Any, labels: Any) -> None:
    if (
        not isinstance(site_logits, torch.Tensor)
        or not site_logits.is_floating_point()
        or site_logits.dim() != 3
    ):
        raise ValueError(
            f"{owner}: site_logits must be a floating-point tensor of shape "
            f"[batch, n_sites, n_classes]; got {describe_tensor(site_logits)}."
        )
    if (
        not isinstance(posterior, torch.Tensor)
        or not posterior.is_floating_point()
        or posterior.shape != site_logits.shape
    ):
        raise ValueError(
            f"{owner}: posterior must be a floating-point tensor of the shape of site_logits "
            f"[batch, n_sites, n_classes] = {list(site_logits.shape)}; "
            f"got {describe_tensor(posterior)}."
        )
    if (
        not isinstance(labels, torch.Tensor)
        or labels.dtype != torch.long
        or labels.shape != site_logits.shape[:-1]
    ):
        raise ValueError(
            f"{owner}: labels must be a long tensor of shape [batch, n_sites] = "
            f"{list(site_logits.shape[:-1])}; got {describe_tensor(labels)}."
        )


def _check_pair(owner: str, model: Any, bayes: Any) -> None:
    for name, x in (("model_entropy_bits", model), ("bayes_entropy_bits", bayes)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 2:
            raise ValueError(
                f"{owner}: {name} must be a floating-point tensor of shape [batch, n_sites]; "
                f"got {describe_tensor(x)}."
            )
    if model.shape != bayes.shape:
        raise ValueError(
            f"{owner}: model_entropy_bits and bayes_entropy_bits must have the same shape "
            f"[batch, n_sites]; got {list(model.shape)} and {list(bayes.shape)}."
        )


def _show(x: Any) -> str:
    if isinstance(x, torch.Tensor) and x.numel() <= 8:
        return f"{describe_tensor(x)} {x.tolist()}"
    return describe_tensor(x)
