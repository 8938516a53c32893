"""How far back an HMM model's belief listens, and which heads carry each lag."""

from __future__ import annotations

from typing import Any

import torch

from torch import nn

import windtunnel.sites as sites
from windtunnel.hooks import eval_mode
from windtunnel.probes._common import _logits, _replayer, _require
from windtunnel.tasks import HMMBatch, HMMFiltering, hmm_posterior

__all__ = ["hmm_lag_map", "hmm_lag_response"]


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
    [B, seq_len, vocab] (any windtunnel model; an output with ``.logits``, as Hugging Face
    models return, is read through it). K + 1 forward passes of B sequences.

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
    positions = task.sites
    lo, hi = task.class_offset, task.class_offset + task.n_classes

    def beliefs(observations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = task.encode(batch.transition_cents, batch.emission_cents, observations)
        logits = _logits("hmm_lag_response", model(tokens.to(device)))[:, positions.to(device), lo:hi]
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
    model: nn.Module, task: HMMFiltering, batch: HMMBatch, *, generator: torch.Generator, max_lag: int = 5
) -> dict[str, Any]:
    """Which heads carry which lags: :func:`hmm_lag_response` of the intact model and with each
    head ablated in turn (:func:`windtunnel.sites.ablated`: TinyGPT's ``model.ablated``, hooks
    for TransformerLens), all on the same changed observations (``generator``'s state is replayed
    for every case).

    A head whose ablation takes the move at lag d down towards 0 carries o_{t-d}; one whose
    ablation leaves ``response_error_tv`` at lag d unchanged contributes nothing useful there.

    Returns:
        ``{"lags", "bayes_move_tv", "n_sequences"`` (as :func:`hmm_lag_response`), ``"intact":
        {"model_move_tv", "response_error_tv"}, "heads": [{"layer", "head", "model_move_tv",
        "response_error_tv"}, ...]}`` with the heads in (layer, head) order.

    Raises:
        ValueError: naming the model class when its adapter cannot ablate heads (see
            :func:`windtunnel.sites.unsupported`), or as :func:`hmm_lag_response`.
    """
    _require("hmm_lag_map", model, "ablation")
    n_layers, n_heads = sites.ablation_layout(model)
    replay = _replayer(generator)

    def response() -> dict[str, Any]:
        return hmm_lag_response(model, task, batch, generator=replay(), max_lag=max_lag)

    intact = response()
    heads = []
    for layer in range(n_layers):
        for head in range(n_heads):
            with sites.ablated(model, heads=[(layer, head)]):
                r = response()
            heads.append({"layer": layer, "head": head, "model_move_tv": r["model_move_tv"], "response_error_tv": r["response_error_tv"]})
    return {
        "lags": intact["lags"],
        "bayes_move_tv": intact["bayes_move_tv"],
        "n_sequences": intact["n_sequences"],
        "intact": {"model_move_tv": intact["model_move_tv"], "response_error_tv": intact["response_error_tv"]},
        "heads": heads,
    }
