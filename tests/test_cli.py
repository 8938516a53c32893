"""The command line: exit codes and messages of each command."""

from click.testing import CliRunner

from windtunnel import dynamics
from windtunnel.cli import main


def test_help_lists_the_commands():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    assert "verify-law" in result.output and "reproduce" in result.output


def test_verify_law_passes_and_prints_a_table():
    result = CliRunner().invoke(main, ["verify-law", "--trials", "12", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert "float64: 12 random heads" in result.output and "float32: 12 random heads" in result.output
    assert "d_w_query" in result.output and "All closed forms agree" in result.output


def test_verify_law_exits_nonzero_when_a_formula_is_wrong(monkeypatch):
    real = dynamics.attention_gradients

    def wrong(*args, **kwargs):
        out = real(*args, **kwargs)
        return dynamics.AttentionGradients(**{**out.__dict__, "d_keys": 2 * out.d_keys})

    monkeypatch.setattr(dynamics, "attention_gradients", wrong)
    result = CliRunner().invoke(main, ["verify-law", "--trials", "6", "--dtype", "float64"])
    assert result.exit_code == 1
    assert "FAILED" in result.output


def test_verify_law_rejects_bad_options():
    result = CliRunner().invoke(main, ["verify-law", "--dtype", "float16"])
    assert result.exit_code == 2 and "must be distinct names from float64, float32 separated by commas; got 'float16'" in result.output
    result = CliRunner().invoke(main, ["verify-law", "--trials", "0"])
    assert result.exit_code == 2 and "--trials" in result.output


def test_em_vs_sgd_writes_results_figures_and_report(tmp_path):
    import json

    out = tmp_path / "run"
    args = ["reproduce", "em-vs-sgd", "--seeds", "42", "--steps", "2", "--telemetry-every", "1",
            "--arms", "sgd,em", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "report.md", "results.json", "telemetry.png"]
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["n_steps"] == 2 and results["config"]["seeds"] == [42]
    assert list(results["aggregate"]) == ["sgd", "em"]
    assert "final CE" in result.output and "H_min 1.8292" in result.output


def test_em_vs_sgd_rejects_bad_options():
    runner = CliRunner()
    result = runner.invoke(main, ["reproduce", "em-vs-sgd", "--arms", "sgd,newton"])
    assert result.exit_code == 2
    assert "Invalid value for '--arms'" in result.output and "sgd, two_timescale, em, alternating, adam" in result.output
    result = runner.invoke(main, ["reproduce", "em-vs-sgd", "--model", "wide"])
    assert result.exit_code == 2 and "'wide' is not one of 'single', 'deep'" in result.output
    result = runner.invoke(main, ["reproduce", "em-vs-sgd", "--seeds", "4-2"])
    assert result.exit_code == 2 and "--seeds" in result.output and "runs backwards" in result.output
    result = runner.invoke(main, ["reproduce", "em-vs-sgd", "--model", "deep", "--arms", "sgd"])
    assert result.exit_code == 2 and "--arms applies to --model single only" in result.output


def test_train_fine_tunes_from_a_run_with_init_from(tmp_path):
    tiny = ["--steps", "2", "--set", "model.n_layers=1", "--set", "model.d_model=16", "--set", "model.n_heads=2",
            "--set", "model.d_mlp=32", "--set", "train.eval_size=10", "--set", "train.warmup_steps=1",
            "--set", "task.n_values=5", "--set", "task.n_pairs=4"]
    first = CliRunner().invoke(main, ["train", "bijection", "--out", str(tmp_path / "a"), *tiny])
    assert first.exit_code == 0, first.output
    second = CliRunner().invoke(main, ["train", "bijection", "--out", str(tmp_path / "b"), "--init-from", str(tmp_path / "a"), *tiny])
    assert second.exit_code == 0, second.output
    assert f"model weights from {tmp_path / 'a'} (step 2)" in second.output
    wrong = CliRunner().invoke(main, ["train", "bijection", "--out", str(tmp_path / "c"), "--init-from", str(tmp_path / "a"),
                                      *tiny, "--set", "model.d_model=32"])
    assert wrong.exit_code == 2 and "holds a model of another config" in wrong.output
