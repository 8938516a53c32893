"""The wind-tunnel task protocol and the sampled batch it returns (docs/theory.md §5).

A task samples sequences whose exact Bayes posterior is known at every prediction site. Sites
sit at the same positions in every sequence of a task, so a batch stores them once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

__all__ = ["Batch", "Task", "move_tensor"]


@dataclass(frozen=True)
class Batch:
    """A batch of wind-tunnel sequences with the exact posterior at each prediction site.

    Attributes:
        tokens: input token ids, long [batch, seq_len].
        sites: positions whose next-token prediction is scored, long [n_sites], increasing.
        labels: the true answer at each site as an index into the task's hypothesis slice,
            long [batch, n_sites].
        posterior: the exact Bayes distribution over the hypothesis slice at each site,
            float64 [batch, n_sites, n_classes]; rows sum to 1.
        entropy_bits: Shannon entropy of ``posterior`` in bits, float64 [batch, n_sites].
    """

    tokens: torch.Tensor
    sites: torch.Tensor
    labels: torch.Tensor
    posterior: torch.Tensor
    entropy_bits: torch.Tensor

    @property
    def site_mask(self) -> torch.Tensor:
        """bool [batch, seq_len]: True at prediction sites."""
        mask = torch.zeros(self.tokens.shape, dtype=torch.bool, device=self.tokens.device)
        mask[:, self.sites] = True
        return mask

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> "Batch":
        """The same batch on ``device``; with ``non_blocking`` a CPU -> CUDA move pins each tensor
        and copies without waiting for the device (:func:`move_tensor`)."""
        return Batch(
            tokens=move_tensor(self.tokens, device, non_blocking),
            sites=move_tensor(self.sites, device, non_blocking),
            labels=move_tensor(self.labels, device, non_blocking),
            posterior=move_tensor(self.posterior, device, non_blocking),
            entropy_bits=move_tensor(self.entropy_bits, device, non_blocking),
        )


def move_tensor(tensor: torch.Tensor, device: torch.device | str, non_blocking: bool) -> torch.Tensor:
    """``tensor.to(device)``; with ``non_blocking``, a CPU tensor bound for CUDA is first copied to
    page-locked memory so that the copy to the device is queued without a host synchronisation
    (the trainer's per-step batch). Anything else moves as ``.to`` moves it."""
    if non_blocking and tensor.device.type == "cpu" and torch.device(device).type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


@runtime_checkable
class Task(Protocol):
    """What every token wind tunnel provides.

    Attributes:
        vocab_size: number of token ids.
        seq_len: tokens per sequence.
        n_classes: size of the hypothesis slice scored at each site.
        class_offset: token id of hypothesis 0; the slice is
            ``class_offset .. class_offset + n_classes - 1`` of the model's logits.
        soft_targets: True when training uses the posterior as a soft label (HMM), False for the
            hard label.
    """

    vocab_size: int
    seq_len: int
    n_classes: int
    class_offset: int
    soft_targets: bool

    def sample(self, batch_size: int, *, generator: torch.Generator) -> Batch:
        """Draw ``batch_size`` fresh sequences with their exact posteriors."""
        ...
