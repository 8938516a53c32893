"""The HMM memory analyses: how far back a model's belief listens (lag response, lag map), where it
sits on the ladder of finite-memory exact filters, where its read positions attend, and which
ingredients of the filter a TinyGPT's residual stream encodes (docs/theory.md §8)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

import windtunnel.sites as sites
from windtunnel.geometry import linear_probe_r2
from windtunnel.hooks import eval_mode, record
from windtunnel.probes._common import _logits, _replayer, _require
from windtunnel.tasks import HMMBatch, HMMFiltering, entropy_bits, hmm_posterior, windowed_posterior

__all__ = [
    "CIRCUIT_QUANTITIES",
    "MEMORY_WINDOWS",
    "hmm_attention_mass",
    "hmm_circuit_probe",
    "hmm_history_attention",
    "hmm_history_attention_by_layer",
    "hmm_lag_map",
    "hmm_lag_response",
    "memory_ladder",
]


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
    :func:`memory_ladder`, which compares errors.

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


MEMORY_WINDOWS = (1, 2, 3, 4, 6, 8)


def memory_ladder(
    batches: Sequence[HMMBatch], *, model_mae_bits: float, windows: Sequence[int] = MEMORY_WINDOWS
) -> dict[str, Any]:
    """Where a model's HMM calibration sits on the ladder of finite-memory exact filters.

    For each w in ``windows``, the per-sample entropy MAE (bits) of
    :func:`~windtunnel.tasks.windowed_posterior` against the exact posterior of the same
    sequences; then the rungs around the model: the longest memory the model beats (MAE above
    ``model_mae_bits``) and the shortest memory that beats or ties it. On K = 20 HMMs the ladder
    is about 0.16, 0.047, 0.014, 0.005, 0.0006, 0.0001 bits for w = 1, 2, 3, 4, 6, 8.
    Beside the ladder, the memoryless filter (uᵀT) ⊙ E[:, o_t] (``windowed_posterior(...,
    window=1, transported=True)``): it knows T and the current observation but nothing older,
    about 0.09 bits at K = 20.

    Returns:
        ``{"windowed_filter_mae_bits": {w: mae}, "memoryless_filter_mae_bits": mae,
        "beats_memory_steps": w or None, "beaten_by_memory_steps": w or None}`` (None: the model
        beats no rung / every rung).
    """
    errors = {w: [] for w in windows}
    memoryless = []
    for batch in batches:
        args = (batch.transition_cents, batch.emission_cents, batch.observations)
        for w in windows:
            errors[w].append((entropy_bits(windowed_posterior(*args, window=w)) - batch.entropy_bits).abs().flatten())
        memoryless.append((entropy_bits(windowed_posterior(*args, window=1, transported=True)) - batch.entropy_bits).abs().flatten())
    ladder = {w: torch.cat(e).mean().item() for w, e in errors.items()}
    beats = [w for w in windows if ladder[w] > model_mae_bits]
    beaten_by = [w for w in windows if ladder[w] <= model_mae_bits]
    return {
        "windowed_filter_mae_bits": ladder,
        "memoryless_filter_mae_bits": torch.cat(memoryless).mean().item(),
        "beats_memory_steps": max(beats) if beats else None,
        "beaten_by_memory_steps": min(beaten_by) if beaten_by else None,
    }


CIRCUIT_QUANTITIES = ("emission_column", "transition", "memoryless_prediction", "previous_belief", "predicted_belief", "belief")


def hmm_attention_mass(pattern: torch.Tensor, task: HMMFiltering) -> dict[str, torch.Tensor]:
    """Mean attention mass from the read positions of steps 2..K to each part of an HMM sequence.

    Blocks: ``transition`` (the S² entries of T), ``emission`` (the S·O entries of E),
    ``earlier_reads`` (the read positions of steps 1..t-1, i.e. the earlier observations),
    ``self`` (the read position itself) and ``obs_markers`` (the [OBS] tokens of steps 1..t,
    where the auxiliary loss supervises the predicted belief). What is left goes to the
    [TRANS], [EMIT] and [SEP] markers.

    Shapes: pattern [batch, head, seq, seq] (rows = queries, a layer's ``hook_pattern``) -> each
    block [head], averaged over sequences and over steps 2..K.

    Raises:
        ValueError: when the pattern does not fit the task's sequence length.
    """
    rows, earlier, own = _read_rows(pattern, task, "hmm_attention_mass")
    s2, so = task.n_states**2, task.n_states * task.n_symbols
    markers = (earlier + own).roll(-1, dims=1)  # each [OBS] sits just before its read position
    return {
        "transition": rows[..., 1 : 1 + s2].sum(-1).mean((0, 2)),
        "emission": rows[..., 2 + s2 : 2 + s2 + so].sum(-1).mean((0, 2)),
        "earlier_reads": (rows * earlier).sum(-1).mean((0, 2)),
        "self": (rows * own).sum(-1).mean((0, 2)),
        "obs_markers": (rows * markers).sum(-1).mean((0, 2)),
    }


def _read_rows(pattern: torch.Tensor, task: HMMFiltering, owner: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The attention rows of the read positions of steps 2..K, [batch, head, K-1, seq], and two
    [K-1, seq] masks: the earlier read positions (steps 1..t-1) and the read position itself."""
    seq_len = task.seq_len
    if pattern.dim() != 4 or pattern.shape[-2:] != (seq_len, seq_len):
        raise ValueError(f"{owner}: pattern must be [batch, head, {seq_len}, {seq_len}]; got {tuple(pattern.shape)}.")
    sites = task.sites.to(pattern.device)
    n = sites.numel() - 1
    step = torch.arange(n + 1, device=pattern.device)
    earlier = torch.zeros(n, seq_len, dtype=pattern.dtype, device=pattern.device)
    earlier[:, sites] = (step[None, :] <= step[:n, None]).to(pattern.dtype)  # read j is earlier than step t = i+2 iff j <= i
    own = torch.zeros_like(earlier)
    own[torch.arange(n), sites[1:]] = 1.0
    return pattern[:, :, sites[1:]], earlier, own


@torch.no_grad()
def hmm_history_attention_by_layer(model: nn.Module, task: HMMFiltering, batch: HMMBatch, max_sequences: int = 200) -> dict[str, Any]:
    """:func:`hmm_history_attention` of every layer of a TinyGPT (its ``blocks.{i}.attn.hook_pattern``)
    on up to ``max_sequences`` sequences of ``batch``, as eval.json stores it under
    ``history_attention``: ``{"steps": [2..K], "layers": [{curve: [[per step] per head]} per layer]}``."""
    names = [f"blocks.{i}.attn.hook_pattern" for i in range(len(model.blocks))]
    with eval_mode(model), record(model, names=names) as cache:
        model(batch.tokens[:max_sequences])
    layers = [{k: v.tolist() for k, v in hmm_history_attention(cache[n], task).items()} for n in names]
    return {"steps": list(range(2, task.n_steps + 1)), "layers": layers}


def hmm_history_attention(pattern: torch.Tensor, task: HMMFiltering) -> dict[str, torch.Tensor]:
    """How each head's attention to the earlier observations changes with the step t.

    For the read positions of steps t = 2..K, averaged over sequences: ``earlier_reads``, the
    mass on the read positions of steps 1..t-1; ``previous_read``, the mass on step t-1 alone;
    ``earlier_entropy_bits``, the entropy of the attention among the earlier reads (renormalised
    to sum to 1; 0 = one read, log2(t-1) = spread evenly). A head that follows the previous
    observation keeps ``previous_read`` near ``earlier_reads`` and the entropy near 0 at every t;
    a head whose targeting fades past the training length shows it here.

    Shapes: pattern [batch, head, seq, seq] -> each curve [head, K-1] (index i is step i + 2).

    Raises:
        ValueError: when the pattern does not fit the task's sequence length.
    """
    rows, earlier, _ = _read_rows(pattern, task, "hmm_history_attention")
    on_earlier = rows * earlier  # [batch, head, K-1, seq]
    mass = on_earlier.sum(-1)
    sites = task.sites.to(pattern.device)
    previous = torch.gather(rows, -1, sites[:-1].view(1, 1, -1, 1).expand(*rows.shape[:3], 1)).squeeze(-1)
    w = on_earlier / mass.clamp_min(torch.finfo(pattern.dtype).tiny)[..., None]
    entropy = -(w * torch.log2(w.clamp_min(torch.finfo(pattern.dtype).tiny))).sum(-1)
    return {"earlier_reads": mass.mean(0), "previous_read": previous.mean(0), "earlier_entropy_bits": entropy.mean(0)}


@torch.no_grad()
def hmm_circuit_probe(model: nn.Module, task: HMMFiltering, batch: HMMBatch, *, generator: torch.Generator) -> dict[str, Any]:
    """Which ingredients of the filter a TinyGPT computes, layer by layer, at the read positions.

    The exact update is α_t ∝ (α_{t-1}ᵀ T) ⊙ E[:, o_t]. At the read positions of steps 2..K, a
    ridge probe (:func:`~windtunnel.geometry.linear_probe_r2`, split by sequence) reads from the
    token + position embedding and from every block's output:

    * ``emission_column``: E[:, o_t], the current observation's likelihoods;
    * ``transition``: the S² entries of T;
    * ``memoryless_prediction``: uᵀT with u uniform, the prediction of a model that forgets the
      past (the column means of T); ``predicted_belief`` is correlated with it, so compare the two;
    * ``previous_belief``: α_{t-1}, the belief at the previous observation;
    * ``predicted_belief``: α_{t-1}ᵀ T = p(s_t | o_1:t-1), the transported belief;
    * ``belief``: α_t, the answer.

    Each value is the held-out R² averaged over the quantity's entries (1 = linearly present,
    about 0 = absent). Alongside, :func:`hmm_attention_mass` per layer and head. A model whose
    ``previous_belief`` stays near 0 in every layer does not carry the past forward, so it can at
    best be a one-step filter; this is what our small CPU runs showed (RESULTS.md).

    Shapes: batch with B >= 8 sequences of ``task``'s length, K >= 2 steps.

    Returns:
        ``{"layers": [name, ...], "r2": {quantity: [per layer]}, "attention": {block:
        [[per head] per layer]}, "n_sequences": B}``.

    Raises:
        ValueError: when the batch has fewer than 8 sequences or 2 steps, or is not the task's length.
    """
    if batch.observations.shape[0] < 8 or batch.observations.shape[1] < 2 or batch.tokens.shape[1] != task.seq_len:
        raise ValueError(
            f"hmm_circuit_probe: needs a batch of >= 8 sequences with >= 2 steps of the task's length {task.seq_len}; "
            f"got tokens {tuple(batch.tokens.shape)}."
        )
    n_layers = len(model.blocks)
    resid_names = ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.hook_resid_post" for i in range(n_layers)]
    pattern_names = [f"blocks.{i}.attn.hook_pattern" for i in range(n_layers)]
    with eval_mode(model), record(model, names=resid_names + pattern_names) as cache:
        model(batch.tokens)
    n_seq, n_steps = batch.observations.shape
    n_s = task.n_states
    trans = batch.transition_cents.to(torch.float64) / task.units  # [B, S, S]
    emit = batch.emission_cents.to(torch.float64) / task.units  # [B, S, O]
    obs = batch.observations[:, 1:]  # [B, K-1]
    targets = {
        "emission_column": torch.gather(emit.transpose(1, 2), 1, obs[..., None].expand(-1, -1, n_s)),
        "transition": trans.reshape(n_seq, 1, n_s * n_s).expand(-1, n_steps - 1, -1),
        "memoryless_prediction": trans.mean(1, keepdim=True).expand(-1, n_steps - 1, -1),
        "previous_belief": batch.posterior[:, :-1],
        "predicted_belief": batch.predicted_probs[:, 1:],
        "belief": batch.posterior[:, 1:],
    }
    groups = torch.arange(n_seq).repeat_interleave(n_steps - 1)
    sites = task.sites[1:]
    r2: dict[str, list[float]] = {q: [] for q in CIRCUIT_QUANTITIES}
    for name in resid_names:
        states = cache[name][:, sites].reshape(n_seq * (n_steps - 1), -1)
        for q in CIRCUIT_QUANTITIES:
            y = targets[q].reshape(n_seq * (n_steps - 1), -1)
            seed = int(torch.randint(0, 2**62, (), generator=generator))
            r2[q].append(linear_probe_r2(states, y, groups=groups, generator=torch.Generator().manual_seed(seed)).mean().item())
    attention: dict[str, list[list[float]]] = {}
    for name in pattern_names:
        for block, mass in hmm_attention_mass(cache[name], task).items():
            attention.setdefault(block, []).append(mass.tolist())
    return {"layers": ["embed"] + [f"block {i}" for i in range(n_layers)], "r2": r2, "attention": attention, "n_sequences": n_seq}
