"""Report and figures of the em-vs-sgd run, rebuilt from results.json alone."""

import json

import pytest

from windtunnel.experiments.em_vs_sgd import EmVsSgdConfig, run_em_vs_sgd
from windtunnel.reports.em_vs_sgd import render_em_vs_sgd, report_markdown, write_em_vs_sgd_outputs
from windtunnel.tasks import StickyMarkov


@pytest.fixture(scope="module")
def results():
    config = EmVsSgdConfig(
        seeds=(42, 2024),
        n_steps=4,
        arms=("sgd", "two_timescale", "em"),
        telemetry_every=2,
        law_check_len=8,
        task=StickyMarkov(seq_len=40),
    )
    return run_em_vs_sgd(config)


def test_outputs_are_written_and_rebuilt(tmp_path, results):
    paths = write_em_vs_sgd_outputs(results, tmp_path / "run")
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names == [
        "curves.png",
        "report.md",
        "results.json",
        "telemetry.png",
    ]  # no temp files left
    for key in ("curves", "telemetry"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (
        json.loads(paths["results"].read_text())["aggregate"].keys() == results["aggregate"].keys()
    )
    paths["report"].unlink()
    render_em_vs_sgd(tmp_path / "run")
    assert (tmp_path / "run" / "report.md").read_text() == report_markdown(results)


def test_report_puts_our_numbers_beside_the_papers(results):
    text = report_markdown(results)
    assert (
        "| `two_timescale` | " in text and "1.9319 ± 0.0258" in text and "2.0310 ± 0.0214" in text
    )
    assert f"{results['aggregate']['em']['final_loss_mean']:.4f}" in text
    assert "## What the `em` arm means" in text and "ridge least squares" in text
    assert "compare trends, not digits" in text  # not the reference setting
    assert "1.8292" in text
    uniform = results["per_seed"][0]["uniform_attention_entropy_nats"]
    assert f"against {uniform:.3f} for uniform causal attention" in text


def test_deep_run_without_telemetry_renders_without_warnings(tmp_path):
    config = EmVsSgdConfig(seeds=(3,), n_steps=2, model="deep", task=StickyMarkov(seq_len=24))
    deep = run_em_vs_sgd(config)
    paths = write_em_vs_sgd_outputs(deep, tmp_path)  # warnings are errors in this suite
    text = paths["report"].read_text()
    assert text.startswith("# Sticky Markov chain: deep transformer") and "AdamW lr 0.0003" in text
    assert "What the `em` arm means" not in text and "no reference numbers" in text
