"""reproduce bijection|hmm|recall on tiny presets: files, floors, resume-instead-of-retrain."""

import json

import pytest
from click.testing import CliRunner

from windtunnel import presets
from windtunnel.cli import main
from windtunnel.runs import RunDir
from windtunnel.train import ExperimentConfig, TrainConfig


def _tiny(task, model, task_kwargs, model_kwargs, **extra):
    def build():
        return ExperimentConfig(
            task_name=task, task=task_kwargs, model_name=model, model=model_kwargs,
            train=TrainConfig(steps=6, batch_size=8, warmup_steps=2, eval_every=3, eval_size=20,
                              eval_batch_size=10, log_every=2, checkpoint_every=3, device="cpu"),
            name=f"{task}/{model}/cpu", **extra,
        )
    return build


def test_reproduce_bijection_writes_the_comparison_and_does_not_retrain(tmp_path, monkeypatch):
    small = dict(n_values=5, n_pairs=4)
    for key in [k for k in presets.PRESETS if k.startswith("bijection/") and k.endswith("/cpu")]:
        model = key.split("/")[1]
        kwargs = {"transformer": dict(n_layers=1, n_heads=2, d_model=16, d_mlp=32),
                  "mlp": dict(n_layers=1, d_model=16, d_mlp=32), "lstm": dict(n_layers=1, d_model=16)}[model]
        monkeypatch.setitem(presets.PRESETS, key, _tiny("bijection", model, small, kwargs))
    out = tmp_path / "rep"
    result = CliRunner().invoke(main, ["reproduce", "bijection", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "comparison.json").read_text())
    assert {row["model"] for row in data["models"]} == {"transformer", "mlp", "lstm"}
    assert 0 < data["floors"]["uniform_entropy_mae_bits"] < 3
    assert data["chance_accuracy"] == {}  # uncertain posteriors: the entropy MAE is the headline
    assert (out / "comparison.png").stat().st_size > 1000
    assert "| transformer |" in (out / "comparison.md").read_text()
    before = RunDir(out / "transformer").metrics()
    CliRunner().invoke(main, ["reproduce", "bijection", "--out", str(out), "--models", "transformer"])
    assert RunDir(out / "transformer").metrics() == before  # finished runs are not retrained


def test_reproduce_hmm_evaluates_every_length(tmp_path, monkeypatch):
    monkeypatch.setitem(
        presets.PRESETS, "hmm/transformer/cpu",
        _tiny("hmm", "transformer", dict(n_steps=4), dict(n_layers=1, n_heads=2, d_model=16, d_mlp=32, norm="layernorm"), eval_lengths=(6,)),
    )
    out = tmp_path / "hmm"
    result = CliRunner().invoke(main, ["reproduce", "hmm", "--out", str(out), "--models", "transformer"])
    assert result.exit_code == 0, result.output
    row = json.loads((out / "comparison.json").read_text())["models"][0]
    assert set(row["eval"]) == {"n_steps=4", "n_steps=6"}
    for summary in row["eval"].values():
        assert set(summary["windowed_filter_mae_bits"]) == {"1", "2", "3", "4", "6", "8"}  # JSON keys
        # the memoryless filter knows T, so it sits between the 1- and 2-step memories
        assert summary["windowed_filter_mae_bits"]["2"] < summary["memoryless_filter_mae_bits"] < summary["windowed_filter_mae_bits"]["1"]
        ladder = {int(w): mae for w, mae in summary["windowed_filter_mae_bits"].items()}
        beats, beaten_by = summary["beats_memory_steps"], summary["beaten_by_memory_steps"]
        assert beats is not None or beaten_by is not None
        assert beats is None or ladder[beats] > summary["entropy_mae_bits"]
        assert beaten_by is None or ladder[beaten_by] <= summary["entropy_mae_bits"]
    printed = CliRunner().invoke(main, ["eval", str(out / "transformer"), "--n", "40"])
    assert printed.exit_code == 0, printed.output
    assert "exact filters with a w-step memory: w=1:" in printed.output
    assert "train length: entropy MAE " in printed.output and " bits (standard error 0.0" in printed.output
    assert "the memoryless filter (uᵀT) ⊙ E[:, o_t]:" in printed.output
    assert "the model is " in printed.output
    assert "held-out R² of linear probes at the read positions" in printed.output
    circuit = json.loads((out / "transformer" / "eval.json").read_text())["circuit"]
    assert circuit["layers"] == ["embed", "block 0"]
    assert set(circuit["r2"]) == {"emission_column", "transition", "memoryless_prediction", "previous_belief", "predicted_belief", "belief"}
    assert set(circuit["attention"]) == {"transition", "emission", "earlier_reads", "self", "obs_markers"}
    lag = json.loads((out / "transformer" / "eval.json").read_text())["lag_response"]
    assert lag["lags"] == [0, 1, 2, 3] and lag["n_sequences"] == 40  # K = 4: lags 0..3
    assert "the belief's move when the observation d steps back changes" in printed.output
    assert (out / "transformer" / "lag_response.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"and {out / 'transformer' / 'lag_response.png'}" in printed.output
    history = json.loads((out / "transformer" / "eval.json").read_text())["history_attention"]
    assert list(history) == ["train length"] and history["train length"]["steps"] == [2, 3, 4]
    (layer,) = history["train length"]["layers"]  # one block, two heads, steps 2..4
    assert {k: (len(v), len(v[0])) for k, v in layer.items()} == {k: (2, 3) for k in ("earlier_reads", "previous_read", "earlier_entropy_bits")}
    assert "attention to the earlier observations by step t (train length)" in printed.output
    assert f"and {out / 'transformer' / 'history_attention.png'}" in printed.output
    assert (out / "transformer" / "history_attention.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    few = CliRunner().invoke(main, ["eval", str(out / "transformer"), "--n", "3"])  # fewer than the probe's 8
    assert few.exit_code == 0, few.output
    assert json.loads((out / "transformer" / "eval.json").read_text())["circuit"]["n_sequences"] == 8


def _layout_masses(task, tokens, pattern):
    """Brute force for hmm_attention_mass: classify every key position by the tokens themselves."""
    import torch

    blocks = ("transition", "emission", "earlier_reads", "self", "obs_markers", "other_markers")
    out = {k: torch.zeros(pattern.shape[1], dtype=torch.float64) for k in blocks}
    count = 0
    for b in range(tokens.shape[0]):
        row = tokens[b].tolist()
        t0, e0, sep = row.index(task.trans_id), row.index(task.emit_id), row.index(task.sep_id)
        reads = [i for i, tok in enumerate(row) if tok >= task.symbol_offset]
        for j, q in enumerate(reads[1:], start=1):
            count += 1
            for h in range(pattern.shape[1]):
                for k in range(q + 1):
                    w = float(pattern[b, h, q, k])
                    if t0 < k < e0:
                        out["transition"][h] += w
                    elif e0 < k < sep:
                        out["emission"][h] += w
                    elif k in reads[:j]:
                        out["earlier_reads"][h] += w
                    elif k == q:
                        out["self"][h] += w
                    elif row[k] == task.obs_id:
                        out["obs_markers"][h] += w
                    elif row[k] in (task.trans_id, task.emit_id, task.sep_id):
                        out["other_markers"][h] += w
    return {k: v / count for k, v in out.items()}


def _random_causal_pattern(task):
    """Three sequences of ``task`` and a random causal attention pattern [3, 2 heads, seq, seq] (float64)."""
    import torch

    batch = task.sample(3, generator=torch.Generator().manual_seed(0))
    n = task.seq_len
    scores = torch.randn(3, 2, n, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return batch, torch.softmax(scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), -torch.inf), -1)


def test_hmm_attention_mass_matches_a_brute_force_over_the_token_layout():
    import torch

    from windtunnel.experiments.evaluation import hmm_attention_mass
    from windtunnel.tasks import HMMFiltering

    task = HMMFiltering(n_states=2, n_symbols=3, n_steps=4)
    batch, pattern = _random_causal_pattern(task)
    got = hmm_attention_mass(pattern, task)
    want = _layout_masses(task, batch.tokens, pattern)
    other = want.pop("other_markers")
    assert set(got) == set(want)
    for block in want:
        torch.testing.assert_close(got[block], want[block], rtol=0, atol=1e-12)
    # Every key position is in exactly one block: with the three markers the masses sum to 1.
    torch.testing.assert_close(sum(got.values()) + other, torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="pattern must be"):
        hmm_attention_mass(pattern[:, :, :-1], task)


def test_hmm_history_attention_matches_a_loop_over_steps_and_reads():
    import math

    import torch

    from windtunnel.experiments.evaluation import hmm_history_attention
    from windtunnel.tasks import HMMFiltering

    task = HMMFiltering(n_states=2, n_symbols=2, n_steps=5)
    batch, pattern = _random_causal_pattern(task)
    got = hmm_history_attention(pattern, task)
    assert {k: tuple(v.shape) for k, v in got.items()} == {k: (2, 4) for k in ("earlier_reads", "previous_read", "earlier_entropy_bits")}
    for b_h in range(2):
        for t in range(2, 6):
            masses, prevs, ents = [], [], []
            for b in range(3):
                row = batch.tokens[b].tolist()
                reads = [i for i, tok in enumerate(row) if tok >= task.symbol_offset]
                q = reads[t - 1]
                w = [float(pattern[b, b_h, q, k]) for k in reads[: t - 1]]
                masses.append(sum(w))
                prevs.append(w[-1])
                ents.append(-sum(x / sum(w) * math.log2(x / sum(w)) for x in w))
            for key, vals in (("earlier_reads", masses), ("previous_read", prevs), ("earlier_entropy_bits", ents)):
                assert float(got[key][b_h, t - 2]) == pytest.approx(sum(vals) / 3, abs=1e-12), (key, b_h, t)
    # One earlier read at t = 2: its entropy is 0 and the previous read is all of it.
    torch.testing.assert_close(got["previous_read"][:, 0], got["earlier_reads"][:, 0], rtol=0, atol=1e-15)
    assert got["earlier_entropy_bits"][:, 0].abs().max() < 1e-12
    with pytest.raises(ValueError, match="hmm_history_attention: pattern must be"):
        hmm_history_attention(pattern[:, :, 1:], task)


def test_hmm_circuit_probe_on_an_untrained_model():
    import torch

    from windtunnel.experiments.evaluation import CIRCUIT_QUANTITIES, hmm_attention_mass, hmm_circuit_probe
    from windtunnel.hooks import record
    from windtunnel.models import TinyGPT, TinyGPTConfig
    from windtunnel.tasks import HMMFiltering

    task = HMMFiltering(n_steps=6)
    config = TinyGPTConfig(vocab_size=task.vocab_size, n_positions=task.seq_len, n_layers=2, n_heads=2, d_model=16,
                           d_mlp=32, tie_embeddings=False, n_out=task.n_classes, head_bias=True)
    model = TinyGPT(config, generator=torch.Generator().manual_seed(0)).train()
    batch = task.sample(300, generator=torch.Generator().manual_seed(1))
    out = hmm_circuit_probe(model, task, batch, generator=torch.Generator().manual_seed(2))
    assert model.training  # the mode is restored
    assert out["layers"] == ["embed", "block 0", "block 1"] and out["n_sequences"] == 300
    assert tuple(out["r2"]) == CIRCUIT_QUANTITIES
    # The token and position of a read site say nothing about this sequence's HMM or beliefs:
    # every held-out R² at the embedding is about 0.
    for quantity, per_layer in out["r2"].items():
        assert len(per_layer) == 3
        assert abs(per_layer[0]) < 0.05, (quantity, per_layer)
    with pytest.raises(ValueError, match=">= 8 sequences"):
        hmm_circuit_probe(model, task, task.sample(4, generator=torch.Generator().manual_seed(3)), generator=torch.Generator())
    with torch.no_grad(), record(model.eval(), names="blocks.1.attn.hook_pattern") as cache:
        model(batch.tokens)
    for block, mass in hmm_attention_mass(cache["blocks.1.attn.hook_pattern"], task).items():
        assert out["attention"][block][1] == pytest.approx(mass.tolist(), abs=1e-6)


def test_reproduce_recall_reports_accuracy_against_both_chances(tmp_path, monkeypatch):
    task = dict(n_pairs=3, n_queries=2, n_keys=5, n_values=8, n_gap_filler=1, n_query_filler=0)
    monkeypatch.setitem(
        presets.PRESETS, "recall/transformer/cpu",
        _tiny("recall", "transformer", task, dict(n_layers=1, n_heads=2, d_model=16, d_mlp=32)),
    )
    out = tmp_path / "recall"
    result = CliRunner().invoke(main, ["reproduce", "recall", "--out", str(out), "--models", "transformer"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "comparison.json").read_text())
    assert data["floors"]["bayes_entropy_bits"] == 0.0
    assert data["chance_accuracy"] == {"uniform over all values": 1 / 8, "uniform over the stored values": 1 / 3}
    assert "uniform over the stored values 33.33%" in (out / "comparison.md").read_text()
    assert (out / "comparison.png").stat().st_size > 1000


def test_memory_ladder_places_a_finite_memory_filter_on_its_own_rung():
    import torch

    from windtunnel.experiments.evaluation import memory_ladder
    from windtunnel.tasks import HMMFiltering, entropy_bits, windowed_posterior

    batches = [HMMFiltering(n_steps=12).sample(50, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    # The "model" is the exact 3-step-memory filter itself: its MAE is the ladder's w = 3 rung.
    errors = [
        (entropy_bits(windowed_posterior(b.transition_cents, b.emission_cents, b.observations, window=3))
         - entropy_bits(b.posterior)).abs().flatten()
        for b in batches
    ]
    model_mae = torch.cat(errors).mean().item()
    out = memory_ladder(batches, model_mae_bits=model_mae, windows=(1, 2, 3, 4, 12))
    ladder = out["windowed_filter_mae_bits"]
    assert ladder[3] == model_mae
    assert (out["beats_memory_steps"], out["beaten_by_memory_steps"]) == (2, 3)
    assert ladder[1] > ladder[2] > ladder[3] > ladder[4] > 0
    assert ladder[12] < 1e-12  # a window as long as the sequence is the exact filter
    perfect = memory_ladder(batches, model_mae_bits=0.0, windows=(1, 2))  # beats every rung
    assert (perfect["beats_memory_steps"], perfect["beaten_by_memory_steps"]) == (2, None)
    useless = memory_ladder(batches, model_mae_bits=10.0, windows=(1, 2))  # beaten by every rung
    assert (useless["beats_memory_steps"], useless["beaten_by_memory_steps"]) == (None, 1)


def test_eval_shift_steps_equals_moving_the_position_rows(tmp_path):
    """``windtunnel eval --shift-steps S`` of a model equals plain evaluation of a copy whose step
    rows are moved S steps down the table (brute force), and leaves eval.json alone."""
    import torch

    from windtunnel.experiments.evaluation import evaluate_run, load_model
    from windtunnel.train import Trainer, evaluate

    experiment = _tiny("hmm", "transformer", dict(n_states=2, n_symbols=2, n_steps=4),
                       dict(n_layers=1, n_heads=2, d_model=16, d_mlp=32, norm="layernorm"), eval_lengths=(7,))()
    run = tmp_path / "run"
    Trainer(experiment, run).fit()
    # header 2*2 + 2*2 + 3 = 11 tokens, 2 tokens a step: K = 4 is 19 tokens, the table 11 + 2*7 = 25 rows
    result = CliRunner().invoke(main, ["eval", str(run), "--n", "30", "--shift-steps", "2"])
    assert result.exit_code == 0, result.output
    assert "step t reads the rows of step t + 2" in result.output
    assert not (run / "eval.json").exists() and (run / "eval_curves_shift2.png").exists()
    shifted = json.loads((run / "eval_shift2.json").read_text())
    assert shifted["step_shift"] == 2 and "circuit" not in shifted and "history_attention" not in shifted

    _, model, _ = load_model(run)
    moved = load_model(run)[1]
    with torch.no_grad():
        moved.pos_embed.W_pos[11:21] = model.pos_embed.W_pos[15:25]
    task = experiment.build_task()
    generator = torch.Generator().manual_seed(12345)  # evaluate_run's default seed, one batch of 30
    want = evaluate(moved, task, [task.sample(30, generator=generator)])
    got = shifted["summary"]["train length"]
    assert abs(got["entropy_mae_bits"] - float(want.entropy_mae_bits)) < 1e-12
    assert abs(got["kl_bits"] - float(want.kl_bits)) < 1e-12
    plain = evaluate_run(run, n_sequences=30)["summary"]["train length"]
    assert plain["entropy_mae_bits"] != got["entropy_mae_bits"], "the shift changed which rows were read"

    with pytest.raises(ValueError, match="needs 27 positions with the steps moved by 4; the model has 25"):
        evaluate_run(run, n_sequences=30, step_shift=4)
    with pytest.raises(ValueError, match="n_steps=7 needs 27 positions with the steps moved by 1"):
        evaluate_run(run, lengths=(4, 7), n_sequences=30, step_shift=1)
    with pytest.raises(ValueError, match="step_shift must be an int >= 0"):
        evaluate_run(run, n_sequences=30, step_shift=-1)
    lstm = tmp_path / "lstm"
    Trainer(_tiny("hmm", "lstm", dict(n_states=2, n_symbols=2, n_steps=4), dict(n_layers=1, d_model=16))(), lstm).fit()
    with pytest.raises(ValueError, match="step_shift needs an HMM TinyGPT run; this one is hmm/lstm"):
        evaluate_run(lstm, n_sequences=30, step_shift=1)


class _FilterAsModel:
    """A stand-in model whose logits at the read positions are the log beliefs of the exact filter
    (or of a filter with a ``window``-step memory), decoded from the tokens alone."""

    def __new__(cls, task, window=None):
        import torch
        from torch import nn

        from windtunnel.tasks import hmm_posterior, windowed_posterior

        class FilterModel(nn.Module):
            def __init__(self):
                super().__init__()
                self.anchor = nn.Parameter(torch.zeros(()))  # gives the model a device

            def forward(self, tokens):
                s, o, floor = task.n_states, task.n_symbols, task.floor_units
                trans = (tokens[:, 1 : 1 + s * s] + floor).reshape(-1, s, s)
                emit = (tokens[:, 2 + s * s : 2 + s * s + s * o] + floor).reshape(-1, s, o)
                obs = tokens[:, task.sites] - task.symbol_offset
                if window is None:
                    probs = hmm_posterior(trans, emit, obs).filtered_probs
                else:
                    probs = windowed_posterior(trans, emit, obs, window=window)
                logits = torch.full((*tokens.shape, task.vocab_size), -50.0, dtype=torch.float64)
                logits[:, task.sites, task.class_offset : task.class_offset + task.n_classes] = probs.log()
                return logits

        return FilterModel()


def test_hmm_lag_response_of_exact_and_finite_memory_filters():
    import torch

    from windtunnel.probes import hmm_lag_response
    from windtunnel.tasks import HMMFiltering

    task = HMMFiltering(n_states=3, n_symbols=4, n_steps=7)
    batch = task.sample(50, generator=torch.Generator().manual_seed(0))
    exact = hmm_lag_response(_FilterAsModel(task), task, batch, generator=torch.Generator().manual_seed(1), max_lag=9)
    assert exact["lags"] == list(range(7)) and exact["n_sequences"] == 50  # lags stop at K - 1
    assert exact["model_move_tv"] == pytest.approx(exact["bayes_move_tv"], abs=1e-9)
    assert max(exact["response_error_tv"]) < 1e-9
    moves = exact["bayes_move_tv"]
    assert all(a > b > 0 for a, b in zip(moves, moves[1:])), "the exact filter forgets, lag by lag"
    short = hmm_lag_response(_FilterAsModel(task, window=3), task, batch, generator=torch.Generator().manual_seed(1))
    assert short["bayes_move_tv"] == exact["bayes_move_tv"], "the same changes for the same generator"
    assert short["model_move_tv"][:3] == pytest.approx(exact["bayes_move_tv"][:3], rel=0.5)
    assert short["model_move_tv"][3:] == [0.0] * 4, "a 3-step memory does not hear o_{t-3}"
    assert short["response_error_tv"][3:] == pytest.approx(exact["bayes_move_tv"][3:], rel=1e-12)
    with pytest.raises(ValueError, match="max_lag must be an int >= 0"):
        hmm_lag_response(_FilterAsModel(task), task, batch, generator=torch.Generator(), max_lag=-1)


def test_hmm_lag_response_matches_a_loop_over_sequences_and_steps():
    """Two symbols: the changed observation is the other one, so a plain loop can redo it."""
    import torch

    from windtunnel.probes import hmm_lag_response
    from windtunnel.tasks import HMMFiltering, hmm_posterior, windowed_posterior

    task = HMMFiltering(n_states=2, n_symbols=2, n_steps=5)
    batch = task.sample(4, generator=torch.Generator().manual_seed(2))
    got = hmm_lag_response(_FilterAsModel(task, window=2), task, batch, generator=torch.Generator(), max_lag=3)
    sums = {k: [0.0] * 4 for k in ("bayes", "model", "error")}
    counts = [0] * 4
    for n in range(4):
        args = (batch.transition_cents[n : n + 1], batch.emission_cents[n : n + 1])
        obs = batch.observations[n : n + 1]
        for j in range(5):
            flipped = obs.clone()
            flipped[0, j] = 1 - flipped[0, j]
            a0, a1 = hmm_posterior(*args, obs).filtered_probs[0], hmm_posterior(*args, flipped).filtered_probs[0]
            p0, p1 = windowed_posterior(*args, obs, window=2)[0], windowed_posterior(*args, flipped, window=2)[0]
            for t in range(j, min(5, j + 4)):
                d = t - j
                sums["bayes"][d] += 0.5 * float((a1[t] - a0[t]).abs().sum())
                sums["model"][d] += 0.5 * float((p1[t] - p0[t]).abs().sum())
                sums["error"][d] += 0.5 * float(((p1[t] - p0[t]) - (a1[t] - a0[t])).abs().sum())
                counts[d] += 1
    for key, name in (("bayes", "bayes_move_tv"), ("model", "model_move_tv"), ("error", "response_error_tv")):
        assert got[name] == pytest.approx([s / c for s, c in zip(sums[key], counts)], rel=1e-9, abs=1e-15)


def test_hmm_lag_map_replays_the_same_changes_for_every_head(tmp_path):
    import torch

    from windtunnel.probes import hmm_lag_map, hmm_lag_response
    from windtunnel.train import Trainer

    experiment = _tiny("hmm", "transformer", dict(n_states=2, n_symbols=3, n_steps=5),
                       dict(n_layers=2, n_heads=2, d_model=16, d_mlp=32, norm="layernorm"))()
    run = tmp_path / "run"
    trainer = Trainer(experiment, run)
    trainer.fit()
    model, task = trainer.model.eval(), trainer.task
    batch = task.sample(30, generator=torch.Generator().manual_seed(3))
    got = hmm_lag_map(model, task, batch, generator=torch.Generator().manual_seed(4), max_lag=3)
    intact = hmm_lag_response(model, task, batch, generator=torch.Generator().manual_seed(4), max_lag=3)
    assert got["lags"] == [0, 1, 2, 3] and got["bayes_move_tv"] == intact["bayes_move_tv"]
    assert got["intact"] == {k: intact[k] for k in ("model_move_tv", "response_error_tv")}
    assert [(r["layer"], r["head"]) for r in got["heads"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for row in got["heads"]:
        with model.ablated(heads=[(row["layer"], row["head"])]):
            want = hmm_lag_response(model, task, batch, generator=torch.Generator().manual_seed(4), max_lag=3)
        assert row["model_move_tv"] == want["model_move_tv"] and row["response_error_tv"] == want["response_error_tv"]
    assert any(row["model_move_tv"] != got["intact"]["model_move_tv"] for row in got["heads"]), "ablations change the moves"

    printed = CliRunner().invoke(main, ["ablate", str(run), "--n", "20"])
    assert printed.exit_code == 0, printed.output
    assert "which heads carry which lags" in printed.output and "  L1H1" in printed.output
    saved = json.loads((run / "ablation.json").read_text())["lag_map"]
    assert saved["n_sequences"] == 20 and saved["lags"] == [0, 1, 2, 3, 4] and len(saved["heads"]) == 4

    lstm = tmp_path / "lstm"
    Trainer(_tiny("hmm", "lstm", dict(n_states=2, n_symbols=3, n_steps=5), dict(n_layers=1, d_model=16))(), lstm).fit()
    from windtunnel.experiments.evaluation import load_model

    with pytest.raises(ValueError, match="hmm_lag_map.*TinyGPT"):
        hmm_lag_map(load_model(lstm)[1], task, batch, generator=torch.Generator())


def test_memory_over_training_at_every_saved_model(tmp_path):
    import torch

    from windtunnel.experiments.evaluation import load_model, memory_over_training
    from windtunnel.probes import hmm_lag_response
    from windtunnel.train import Trainer, evaluate

    experiment = _tiny("hmm", "transformer", dict(n_states=2, n_symbols=3, n_steps=5),
                       dict(n_layers=1, n_heads=2, d_model=16, d_mlp=32, norm="layernorm"))()
    run = tmp_path / "run"
    init_model = Trainer(experiment, tmp_path / "init").model  # step 0: the model the seed builds
    Trainer(experiment, run).fit()
    printed = CliRunner().invoke(main, ["memory", str(run), "--n", "25", "--max-lag", "3"])
    assert printed.exit_code == 0, printed.output
    assert "d = 3" in printed.output and f"wrote {run / 'memory.json'} and {run / 'memory.png'}" in printed.output
    out = json.loads((run / "memory.json").read_text())
    assert out["steps"] == [0, 3, 6] and out["lags"] == [0, 1, 2, 3] and out["n_sequences"] == 25
    assert (run / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    task = experiment.build_task()
    batch = task.sample(25, generator=torch.Generator().manual_seed(12345))
    models = {0: init_model.eval(), **{s: load_model(run, run / "checkpoints" / f"step_{s}.pt")[1] for s in (3, 6)}}
    for i, step in enumerate(out["steps"]):
        want = hmm_lag_response(models[step], task, batch, generator=torch.Generator().manual_seed(12345), max_lag=3)
        assert out["model_move_tv"][i] == pytest.approx(want["model_move_tv"], rel=1e-12)
        assert out["response_error_tv"][i] == pytest.approx(want["response_error_tv"], rel=1e-12)
        assert out["entropy_mae_bits"][i] == pytest.approx(float(evaluate(models[step], task, [batch]).entropy_mae_bits), rel=1e-12)
    assert out["model_move_tv"][0] != out["model_move_tv"][2], "training moved the responses"

    bijection = tmp_path / "bijection"
    Trainer(_tiny("bijection", "transformer", dict(n_values=5, n_pairs=4), dict(n_layers=1, n_heads=2, d_model=16, d_mlp=32))(), bijection).fit()
    with pytest.raises(ValueError, match="memory_over_training: needs an HMM run"):
        memory_over_training(bijection)
    assert "needs an HMM run" in CliRunner().invoke(main, ["memory", str(bijection)]).output
