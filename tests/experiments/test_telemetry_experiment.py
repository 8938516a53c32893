"""windtunnel.experiments.telemetry: attach_probes and ablate_run (with the HMM lag map)."""

import json

import pytest
from click.testing import CliRunner

from tiny_runs import tiny as _tiny
from tiny_runs import tiny_bijection
from windtunnel.experiments.telemetry import ablate_run
from windtunnel.train import Trainer
from windtunnel.cli import main


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


def test_ablate_run(probed_run):
    out = ablate_run(probed_run, n_sequences=40, batch_size=20)
    assert len(out["rows"]) == 2 * 2 + 3 * 2
    assert json.loads((probed_run / "ablation.json").read_text())["rows"] == out["rows"]


def test_ablate_run_refuses_a_model_without_attention_sites(tmp_path):
    Trainer(tiny_bijection("mlp"), tmp_path).fit(stop_at=15)
    with pytest.raises(ValueError, match=r"needs a run whose model can be ablated .* 'mlp' model: no attention-site adapter"):
        ablate_run(tmp_path)
