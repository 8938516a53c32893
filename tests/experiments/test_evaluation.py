"""windtunnel.experiments.evaluation: evaluate_run (its eval.json and RunEvaluation), step shifts and
memory over training, on tiny runs trained in the test."""

import json

import pytest
from click.testing import CliRunner

from tiny_runs import tiny as _tiny
from windtunnel.cli import main


def test_eval_shift_steps_equals_moving_the_position_rows(tmp_path):
    """``windtunnel eval --shift-steps S`` of a model equals plain evaluation of a copy whose step
    rows are moved S steps down the table (brute force), and leaves eval.json alone."""
    import torch

    from windtunnel.experiments.evaluation import evaluate_run, load_model
    from windtunnel.probes import calibrate
    from windtunnel.train import Trainer

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
    want = calibrate(moved, task, [task.sample(30, generator=generator)])
    got = shifted["summary"]["train length"]
    assert abs(got["entropy_mae_bits"] - float(want.entropy_mae_bits)) < 1e-12
    assert abs(got["kl_bits"] - float(want.kl_bits)) < 1e-12
    plain = evaluate_run(run, n_sequences=30).summary["train length"]
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


def test_memory_over_training_at_every_saved_model(tmp_path):
    import torch

    from windtunnel.experiments.evaluation import load_model, memory_over_training
    from windtunnel.probes import hmm_lag_response
    from windtunnel.probes import calibrate
    from windtunnel.train import Trainer

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
        assert out["entropy_mae_bits"][i] == pytest.approx(float(calibrate(models[step], task, [batch]).entropy_mae_bits), rel=1e-12)
    assert out["model_move_tv"][0] != out["model_move_tv"][2], "training moved the responses"

    bijection = tmp_path / "bijection"
    Trainer(_tiny("bijection", "transformer", dict(n_values=5, n_pairs=4), dict(n_layers=1, n_heads=2, d_model=16, d_mlp=32))(), bijection).fit()
    with pytest.raises(ValueError, match="memory_over_training: needs an HMM run"):
        memory_over_training(bijection)
    assert "needs an HMM run" in CliRunner().invoke(main, ["memory", str(bijection)]).output


def test_evaluate_run_returns_what_eval_json_holds_and_read_gives_it_back(tmp_path):
    import dataclasses

    from windtunnel.experiments.evaluation import RunEvaluation, evaluate_run
    from windtunnel.train import Trainer

    run = tmp_path / "run"
    experiment = _tiny("hmm", "transformer", dict(n_states=2, n_symbols=2, n_steps=4),
                       dict(n_layers=1, n_heads=2, d_model=16, d_mlp=32, n_positions=40))()
    Trainer(experiment, run).fit()
    with pytest.raises(ValueError, match=r"RunEvaluation.read: .*eval.json does not exist; run windtunnel eval"):
        RunEvaluation.read(run)
    got = evaluate_run(run, lengths=(4, 6), n_sequences=20)
    saved = json.loads((run / "eval.json").read_text())
    assert json.loads(json.dumps(got.to_dict())) == saved  # JSON makes the ladder's int keys strings
    assert list(saved) == ["step", "n_sequences", "seed", "summary", "per_position", "geometry_variants",
                           "history_attention", "circuit", "lag_response"]
    assert got.step == 6 and got.step_shift == 0 and set(got.summary) == {"n_steps=4", "n_steps=6"}
    assert got.json_path == run / "eval.json"
    assert [p.name for p in got.figure_paths] == ["eval_curves.png", "history_attention.png", "lag_response.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in got.figure_paths)
    read = RunEvaluation.read(run)
    assert read.to_dict() == saved and read.json_path == got.json_path and read.figure_paths == ()
    assert dataclasses.replace(read, summary=got.summary) == dataclasses.replace(got, figure_paths=())
    with pytest.raises(ValueError, match=r"is not an eval.json \(missing summary, per_position\)"):
        RunEvaluation.from_dict({"step": 1, "n_sequences": 2, "seed": 3})
