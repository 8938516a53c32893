"""reproduce bijection|hmm|recall on tiny presets: files, floors, resume-instead-of-retrain."""

import json

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
