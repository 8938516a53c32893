"""Evaluate a trained run: per-position calibration curves at one or several lengths, JSON + figure."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from windtunnel._progress import track
from windtunnel.geometry import linear_probe_r2
from windtunnel.hooks import eval_mode, record
from windtunnel.models import TinyGPT
from windtunnel.probes import geometry_variants, hmm_lag_response
from windtunnel.sites import unsupported
from windtunnel.reports import draw_lag_response
from windtunnel.runs import RunDir, write_bytes_atomic, write_json_atomic
from windtunnel.tasks import HMMBatch, HMMFiltering, entropy_bits, windowed_posterior
from windtunnel.train import ExperimentConfig, evaluate, load_experiment, step_position_ids

__all__ = [
    "CIRCUIT_QUANTITIES",
    "MEMORY_WINDOWS",
    "evaluate_run",
    "geometry_of_run",
    "hmm_attention_mass",
    "hmm_circuit_probe",
    "load_model",
    "memory_ladder",
    "memory_over_training",
]


def load_model(run_dir: str | Path, checkpoint: str | Path | None = None) -> tuple[ExperimentConfig, torch.nn.Module, int]:
    """(experiment, model in eval mode, step) from a run directory's checkpoint (latest by default)."""
    run = RunDir(run_dir)
    experiment = load_experiment(run)
    state = run.load_checkpoint(checkpoint)
    model = experiment.build_model(None)
    try:
        model.load_state_dict(state["model"], strict=True)
    except (KeyError, RuntimeError, TypeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"load_model: {checkpoint or run.latest_checkpoint()} does not hold the weights of {run.config_path}'s model ({first}).") from None
    model.eval()
    return experiment, model, int(state["step"])


def evaluate_run(
    run_dir: str | Path,
    *,
    lengths: Sequence[int] = (),
    n_sequences: int = 2000,
    seed: int = 12345,
    batch_size: int = 500,
    step_shift: int = 0,
) -> dict[str, Any]:
    """Evaluate the latest checkpoint on fresh seeded sequences; write eval.json and eval_curves.png
    (and, for an HMM, lag_response.png; for an HMM TinyGPT, history_attention.png).

    ``lengths`` applies to tasks with a length parameter (HMM ``n_steps``); an empty list
    evaluates the training length only. Every metric is per sample (docs/theory.md §7). For the HMM each
    summary also holds the memory ladder (:func:`memory_ladder`): the entropy MAE of exact
    filters that remember only the last w observations, and the rungs the model falls between.

    For an HMM TinyGPT, eval.json also holds ``history_attention`` per length
    (:func:`hmm_history_attention` per layer and head on up to 200 of the sequences), and, when
    trained at K >= 2, ``circuit``
    (:func:`hmm_circuit_probe`, on 8 to 1,000 further sequences of the training length): what each layer's residual stream encodes
    at the read positions, and where each head attends. For every HMM run, ``lag_response``
    (:func:`hmm_lag_response`, on up to 200 further sequences of the training length): how the
    belief moves when one earlier observation changes, by lag, against the exact filter.

    For every model with attention sites and a readout, eval.json holds ``geometry_variants``
    (:func:`geometry_of_run`): key orthogonality, the value manifold's PC1 share and attention
    focusing under every published definition (:data:`windtunnel.probes.GEOMETRY_VARIANTS`), with
    the paper's number beside the definition it belongs to, on the first evaluation batch of the
    training length (up to ``batch_size`` sequences); for other models the reason they have none.

    ``step_shift`` > 0 (an HMM TinyGPT only) evaluates the same sequences with their steps moved
    that many whole steps along the position table (:func:`windtunnel.train.step_position_ids`,
    the layout ``TrainConfig.position_shift`` trains on): step t reads the rows of step
    t + step_shift. Comparing curves then tells an error that follows the step from one that
    follows a row of the table. It writes eval_shift{step_shift}.json and
    eval_curves_shift{step_shift}.png beside eval.json, which it leaves alone, and skips the
    attention and circuit probes (they describe the unshifted layout).

    Raises:
        ValueError: when lengths are given for a task without ``n_steps`` or exceed the model's
            position table, or ``step_shift`` is negative, given for another task or model, or
            moves the last step past the table.
    """
    experiment, model, step = load_model(run_dir)
    base = experiment.build_task()
    if lengths and not hasattr(base, "n_steps"):
        raise ValueError(f"evaluate_run: --lengths needs a task with n_steps (the HMM); {experiment.task_name} has none.")
    tasks = {f"n_steps={n}": experiment.build_task(n_steps=n) for n in lengths} if lengths else {"train length": base}
    n_positions = getattr(experiment.model_config(), "n_positions", None)
    if isinstance(step_shift, bool) or not isinstance(step_shift, int) or step_shift < 0:
        raise ValueError(f"evaluate_run: step_shift must be an int >= 0; got {step_shift!r}.")
    if step_shift and not (isinstance(base, HMMFiltering) and isinstance(model, TinyGPT)):
        raise ValueError(f"evaluate_run: step_shift needs an HMM TinyGPT run; this one is {experiment.task_name}/{experiment.model_name}.")
    for name, task in tasks.items():
        needed = task.seq_len + (task.step_layout[1] * step_shift if step_shift else 0)
        if n_positions is not None and needed > n_positions:
            moved = f" with the steps moved by {step_shift}" if step_shift else ""
            raise ValueError(f"evaluate_run: {name} needs {needed} positions{moved}; the model has {n_positions}.")
    generator = torch.Generator().manual_seed(seed)
    summary, curves, history = {}, {}, {}
    geometry: dict[str, Any] | None = None
    for name, task in track(tasks.items(), desc="eval: lengths", unit="length"):
        batches = [task.sample(min(batch_size, n_sequences - i), generator=generator) for i in range(0, n_sequences, batch_size)]
        if geometry is None and not step_shift and task.seq_len == base.seq_len:
            geometry = geometry_of_run(model, task, batches[0])
        ids = step_position_ids(task.seq_len, task.step_layout, step_shift) if step_shift else None
        cal = evaluate(model, task, batches, position_ids=ids)
        summary[name] = cal.scalars()
        if all(isinstance(b, HMMBatch) for b in batches):
            summary[name].update(memory_ladder(batches, model_mae_bits=summary[name]["entropy_mae_bits"]))
        curves[name] = {k: v.tolist() for k, v in vars(cal.per_site).items()}
        if isinstance(task, HMMFiltering) and isinstance(model, TinyGPT) and task.n_steps >= 2 and not step_shift:
            history[name] = _history_attention_by_layer(model, task, batches[0])
    out = {"step": step, "n_sequences": n_sequences, "seed": seed, "summary": summary, "per_position": curves}
    if step_shift:
        out["step_shift"] = step_shift
    if geometry is not None:
        out["geometry_variants"] = geometry
    if history:
        out["history_attention"] = history
    if isinstance(base, HMMFiltering) and isinstance(model, TinyGPT) and base.n_steps >= 2 and not step_shift:
        # the probe needs >= 8 sequences for its held-out split, however few --n asks for
        probe_batch = base.sample(max(8, min(n_sequences, 1000)), generator=generator)
        out["circuit"] = hmm_circuit_probe(model, base, probe_batch, generator=torch.Generator().manual_seed(seed))
    if isinstance(base, HMMFiltering) and base.n_symbols >= 2 and not step_shift:
        lag_batch = base.sample(min(n_sequences, 200), generator=generator)
        out["lag_response"] = hmm_lag_response(model, base, lag_batch, generator=torch.Generator().manual_seed(seed))
    run = RunDir(run_dir)
    suffix = f"_shift{step_shift}" if step_shift else ""
    json_path = write_json_atomic(run.eval_path(suffix), out)
    title = f"{experiment.name or experiment.task_name} at step {step}" + (f", steps moved {step_shift} along the position table" if step_shift else "")
    paths = {"json": str(json_path), "figure": str(_plot(curves, run.eval_figure_path(suffix), title=title))}
    if history:
        paths["history_figure"] = str(_plot_history(history, run.history_figure_path, title=title))
    if "lag_response" in out:
        paths["lag_figure"] = str(_plot_lag_response(out["lag_response"], run.lag_figure_path, title=title))
    return {**out, "paths": paths}


def memory_over_training(
    run_dir: str | Path, *, n_sequences: int = 200, seed: int = 12345, max_lag: int = 5
) -> dict[str, Any]:
    """The lag response (:func:`~windtunnel.probes.hmm_lag_response`) of an HMM run at every saved
    model (:func:`~windtunnel.experiments.dissociation.load_checkpoints`: step 0 rebuilt from the
    seed unless the run started ``--init-from`` another, the telemetry snapshots and every
    checkpoint). All on the
    same ``n_sequences`` sequences and the same observation changes, beside the entropy MAE on
    those sequences. Shows the lags of the history being learned, one after another. Writes
    memory.json and memory.png in the run directory.

    Returns:
        ``{"steps": [...], "lags": [0..], "bayes_move_tv": [per lag], "model_move_tv": [[per lag]
        per step], "response_error_tv": [[per lag] per step], "entropy_mae_bits": [per step],
        "n_sequences", "seed", "paths"}``.

    Raises:
        ValueError: when the run is not an HMM run, or its task has one symbol.
    """
    from windtunnel.experiments.dissociation import load_checkpoints

    experiment, states = load_checkpoints(run_dir)
    task = experiment.build_task()
    if not isinstance(task, HMMFiltering):
        raise ValueError(f"memory_over_training: needs an HMM run; {run_dir} holds a {experiment.task_name!r} run.")
    if isinstance(n_sequences, bool) or not isinstance(n_sequences, int) or n_sequences < 1:
        raise ValueError(f"memory_over_training: n_sequences must be an int >= 1; got {n_sequences!r}.")
    batch = task.sample(n_sequences, generator=torch.Generator().manual_seed(seed))
    model = experiment.build_model(None)
    out: dict[str, Any] = {"steps": [], "lags": [], "bayes_move_tv": [], "model_move_tv": [], "response_error_tv": [], "entropy_mae_bits": []}
    for step, state in track(states.items(), desc="memory: saved models", unit="model"):
        model.load_state_dict(state, strict=True)
        lag = hmm_lag_response(model, task, batch, generator=torch.Generator().manual_seed(seed), max_lag=max_lag)
        out["steps"].append(step)
        out["lags"], out["bayes_move_tv"] = lag["lags"], lag["bayes_move_tv"]
        out["model_move_tv"].append(lag["model_move_tv"])
        out["response_error_tv"].append(lag["response_error_tv"])
        out["entropy_mae_bits"].append(float(evaluate(model, task, [batch]).entropy_mae_bits))
    out.update(n_sequences=n_sequences, seed=seed)
    run = RunDir(run_dir)
    title = experiment.name or experiment.task_name
    paths = {"json": str(write_json_atomic(run.memory_path, out)), "figure": str(_plot_memory(out, run.memory_figure_path, title=title))}
    return {**out, "paths": paths}


def geometry_of_run(model: torch.nn.Module, task: Any, batch: Any) -> dict[str, Any]:
    """Every geometry variant (:func:`windtunnel.probes.geometry_variants`, docs/theory.md §8.1–§8.3)
    of ``model`` on ``batch``, as eval.json stores it: ``{"n_sequences", "quantities": {quantity:
    {variant: {...}}}}``, or ``{"unavailable": reason}`` for a model without attention sites or a
    readout (the LSTM and the MLP)."""
    reason = unsupported(model, "sites") or unsupported(model, "readout")
    if reason is not None:
        return {"unavailable": reason}
    return {"n_sequences": int(batch.tokens.shape[0]), "quantities": geometry_variants(model, task, batch)}


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
def _history_attention_by_layer(model: TinyGPT, task: HMMFiltering, batch: HMMBatch, max_sequences: int = 200) -> dict[str, Any]:
    """:func:`hmm_history_attention` of every layer on up to ``max_sequences`` sequences of ``batch``:
    ``{"steps": [2..K], "layers": [{curve: [[per step] per head]} per layer]}``."""
    names = [f"blocks.{i}.attn.hook_pattern" for i in range(len(model.blocks))]
    with eval_mode(model), record(model, names=names) as cache:
        model(batch.tokens[:max_sequences])
    layers = [{k: v.tolist() for k, v in hmm_history_attention(cache[n], task).items()} for n in names]
    return {"steps": list(range(2, task.n_steps + 1)), "layers": layers}


def history_head(layer: dict[str, list[list[float]]]) -> int:
    """The head of one layer of ``history_attention`` (eval.json) with the most attention on the
    earlier observations, summed over the steps: the one `windtunnel eval` prints and plots."""
    return max(range(len(layer["earlier_reads"])), key=lambda h: sum(layer["earlier_reads"][h]))


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
def hmm_circuit_probe(model: TinyGPT, task: HMMFiltering, batch: HMMBatch, *, generator: torch.Generator) -> dict[str, Any]:
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


def _plot(curves: dict[str, dict[str, list[float]]], path: Path, *, title: str) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.6), layout="constrained")
    ax_h, ax_mae, ax_kl = fig.subplots(1, 3)
    for name, c in curves.items():
        sites = range(1, len(c["bayes_entropy_bits"]) + 1)
        line = ax_h.plot(sites, c["model_entropy_bits"], label=f"model ({name})")[0]
        ax_h.plot(sites, c["bayes_entropy_bits"], "--", color=line.get_color(), alpha=0.7, label=f"Bayes ({name})")
        ax_mae.semilogy(sites, [max(v, 1e-6) for v in c["entropy_mae_bits"]], label=name)
        ax_kl.semilogy(sites, [max(v, 1e-6) for v in c["kl_bits"]], label=name)
    ax_h.set(xlabel="prediction site", ylabel="entropy (bits)", title="entropy: model vs Bayes")
    ax_mae.set(xlabel="prediction site", ylabel="|H_model − H_Bayes| (bits)", title="per-sample entropy MAE")
    ax_kl.set(xlabel="prediction site", ylabel="KL(Bayes ‖ model) (bits)", title="KL")
    for ax in (ax_h, ax_mae, ax_kl):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return _save_png(fig, path)


def _plot_history(history: dict[str, Any], path: Path, *, title: str) -> Path:
    """For the longest evaluated length, the head of each layer with the most attention on earlier
    observations: its mass on step t-1, on all earlier steps, and its entropy among them, by t."""
    from matplotlib.figure import Figure

    name, longest = list(history.items())[-1]
    steps = longest["steps"]
    fig = Figure(figsize=(11, 3.6), layout="constrained")
    ax_prev, ax_all, ax_ent = fig.subplots(1, 3)
    for i, layer in enumerate(longest["layers"]):
        head = history_head(layer)
        label = f"block {i}, head {head}"
        ax_prev.plot(steps, layer["previous_read"][head], label=label)
        ax_all.plot(steps, layer["earlier_reads"][head], label=label)
        ax_ent.plot(steps, layer["earlier_entropy_bits"][head], label=label)
    ax_prev.set(xlabel="step t", ylabel="attention mass", title="on step t−1", ylim=(-0.02, 1.02))
    ax_all.set(xlabel="step t", ylabel="attention mass", title="on steps 1..t−1", ylim=(-0.02, 1.02))
    ax_ent.set(xlabel="step t", ylabel="bits", title="entropy among steps 1..t−1")
    for ax in (ax_prev, ax_all, ax_ent):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{title} ({name}; per layer, the head with the most attention on earlier observations)")
    return _save_png(fig, path)


def _plot_lag_response(lag: dict[str, Any], path: Path, *, title: str) -> Path:
    """The belief's move by lag, exact filter against model (log scale), and the error of the
    model's move beside it."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 3.8), layout="constrained")
    ax = fig.subplots()
    draw_lag_response(ax, lag)
    ax.set(xlabel="lag d = t − j (observation o_j changed)", xticks=lag["lags"])
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.suptitle(f"{title}\nhow the belief at step t moves when o_j changes ({lag['n_sequences']} sequences)", fontsize=10)
    return _save_png(fig, path)


def _plot_memory(memory: dict[str, Any], path: Path, *, title: str) -> Path:
    """Per lag d >= 1, the model's move over the exact move at every saved step; beside it the
    entropy MAE on the same sequences."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.8), layout="constrained")
    ax_lag, ax_mae = fig.subplots(1, 2)
    steps = memory["steps"]
    for i, d in enumerate(memory["lags"]):
        if d == 0 or memory["bayes_move_tv"][i] <= 0:
            continue
        ax_lag.plot(steps, [row[i] / memory["bayes_move_tv"][i] for row in memory["model_move_tv"]], marker=".", label=f"d = {d}")
    ax_lag.axhline(1.0, color="black", lw=0.8)
    ax_lag.set(xlabel="step", ylabel="model move / exact move", title="how much the belief hears o_{t−d}")
    ax_mae.semilogy(steps, memory["entropy_mae_bits"], marker=".", color="black")
    ax_mae.set(xlabel="step", ylabel="bits", title="entropy MAE on the same sequences")
    for ax in (ax_lag, ax_mae):
        ax.grid(alpha=0.3)
    ax_lag.legend(fontsize=7)
    fig.suptitle(f"{title}: memory over training ({memory['n_sequences']} sequences, every saved model)")
    return _save_png(fig, path)


def _save_png(fig: Any, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    return write_bytes_atomic(path, buffer.getvalue())
