"""reproduce bijection|hmm|recall on tiny presets: files, floors, resume-instead-of-retrain."""

import json

import pytest
from click.testing import CliRunner

from windtunnel import presets
from windtunnel.cli import main
from windtunnel.runs import RunDir
from tiny_runs import tiny as _tiny


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
    data = json.loads((out / "model_comparison.json").read_text())
    assert {row["model"] for row in data["models"]} == {"transformer", "mlp", "lstm"}
    assert 0 < data["floors"]["uniform_entropy_mae_bits"] < 3
    assert data["chance_accuracy"] == {}  # uncertain posteriors: the entropy MAE is the headline
    assert (out / "model_comparison.png").stat().st_size > 1000
    assert "| transformer |" in (out / "model_comparison.md").read_text()
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
    row = json.loads((out / "model_comparison.json").read_text())["models"][0]
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


def test_reproduce_recall_reports_accuracy_against_both_chances(tmp_path, monkeypatch):
    task = dict(n_pairs=3, n_queries=2, n_keys=5, n_values=8, n_gap_filler=1, n_query_filler=0)
    monkeypatch.setitem(
        presets.PRESETS, "recall/transformer/cpu",
        _tiny("recall", "transformer", task, dict(n_layers=1, n_heads=2, d_model=16, d_mlp=32)),
    )
    out = tmp_path / "recall"
    result = CliRunner().invoke(main, ["reproduce", "recall", "--out", str(out), "--models", "transformer"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "model_comparison.json").read_text())
    assert data["floors"]["bayes_entropy_bits"] == 0.0
    assert data["chance_accuracy"] == {"uniform over all values": 1 / 8, "uniform over the stored values": 1 / 3}
    assert "uniform over the stored values 33.33%" in (out / "model_comparison.md").read_text()
    assert (out / "model_comparison.png").stat().st_size > 1000


def test_read_model_comparison_reads_the_new_name_and_the_old_one(tmp_path):
    from windtunnel.experiments.wind_tunnels import read_model_comparison

    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    new.mkdir()
    (old / "comparison.json").write_text(json.dumps({"task": "hmm", "models": [{"model": "lstm"}]}))
    assert read_model_comparison(old) == {"task": "hmm", "models": [{"model": "lstm"}]}
    (new / "comparison.json").write_text(json.dumps({"task": "stale"}))
    (new / "model_comparison.json").write_text(json.dumps({"task": "bijection"}))
    assert read_model_comparison(new) == {"task": "bijection"}  # the new name wins
    with pytest.raises(ValueError, match=r"holds no model_comparison.json \(nor the older comparison.json\)"):
        read_model_comparison(tmp_path)
