"""The site loss, the auxiliary loss and calibration in bits of a model on fixed batches (docs/theory.md §7)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from windtunnel.hooks import eval_mode
from windtunnel.metrics import Calibration, select_sites, site_metrics, summarize
from windtunnel.probes._common import _logits
from windtunnel.tasks import Batch

__all__ = ["auxiliary_loss_nats", "calibrate", "site_loss_nats"]


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

    ``model`` maps tokens [batch, seq_len] to logits [batch, seq_len, n_outputs], or to an output
    with ``.logits`` (a Hugging Face ``ModelOutput``). ``position_ids``, long [seq_len], is passed
    to the model for every batch (TinyGPT's keyword), e.g. :func:`windtunnel.train.step_position_ids`
    to read the steps at other rows of the table; None (the default) calls the model without it.

    Raises:
        ValueError: when the model's output has no logits.
    """
    device = next(model.parameters()).device
    extra = {} if position_ids is None else {"position_ids": position_ids.to(device)}
    parts = []
    with eval_mode(model):
        for batch in batches:
            logits = _logits("calibrate", model(batch.tokens.to(device), **extra))
            sl = select_sites(logits, batch.sites.to(device), class_offset=task.class_offset, n_classes=task.n_classes)
            parts.append(site_metrics(sl.cpu(), batch.posterior, batch.labels))
    return summarize(type(parts[0]).cat(parts))
