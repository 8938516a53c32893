"""Frame–precision dissociation on a tiny run trained in the test (tests/experiments/conftest.py)."""

import dataclasses
import json

import pytest
import torch

from tiny_runs import tiny_bijection as tiny_experiment
from windtunnel.experiments.dissociation import load_checkpoints, run_dissociation
from windtunnel.experiments.evaluation import load_model
from windtunnel.probes import calibrate
from windtunnel.train import Trainer, telemetry_steps


def test_dissociation_outputs(probed_run):
    out = run_dissociation(probed_run, n_sequences=32)
    expected_steps = sorted(set(telemetry_steps(30)) | {15, 30})
    assert out["steps"] == expected_steps
    m = out["metrics"]
    assert m["js_to_final_bits_layer0"][-1] == 0.0 and m["js_to_final_bits_layer1"][-1] == 0.0
    assert m["js_to_final_bits_layer0"][0] > 0.0
    assert m["frame_overlap_ratio"][-1] == pytest.approx(16 / 8)  # identical subspaces: d / r
    assert all(s in out["steps"] for s in out["settling_step"].values() if s is not None)
    first = out["frame_settles_first"]
    assert first == (out["frame_settled_by"] < out["precision_settled_by"])
    # MAE at the final step, recomputed from the final checkpoint on the same batch
    experiment, model, step = load_model(probed_run)
    task = experiment.build_task()
    batch = task.sample(32, generator=torch.Generator().manual_seed(out["seed"]))
    assert step == 30
    assert m["entropy_mae_bits"][-1] == pytest.approx(float(calibrate(model, task, [batch]).entropy_mae_bits))
    saved = json.loads((probed_run / "dissociation.json").read_text())
    assert saved["settling_step"] == out["settling_step"]
    assert (probed_run / "dissociation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for s in expected_steps:
        proj = json.loads((probed_run / "manifold" / f"step_{s}.json").read_text())
        assert len(proj["pc1"]) == len(proj["pc2"]) == len(proj["entropy_bits"]) == 32 * 5


def test_an_init_from_run_has_no_step_zero_from_the_seed(tmp_path):
    Trainer(tiny_experiment(), tmp_path / "source").fit()
    experiment = dataclasses.replace(tiny_experiment(), init_from=str(tmp_path / "source"))
    Trainer(experiment, tmp_path / "tuned").fit()
    _, states = load_checkpoints(tmp_path / "tuned")
    assert list(states) == [15, 30]


def test_step_zero_is_rebuilt_from_the_seed(tmp_path):
    experiment = tiny_experiment()
    trainer = Trainer(experiment, tmp_path)
    init = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()  # no probes: only checkpoints/step_15 and step_30 exist
    _, states = load_checkpoints(tmp_path)
    assert list(states) == [0, 15, 30]
    assert all(torch.equal(states[0][k], v) for k, v in init.items())


def test_errors(tmp_path):
    Trainer(tiny_experiment("mlp"), tmp_path).fit(stop_at=15)
    with pytest.raises(ValueError, match=r"needs a run whose model has attention sites and a readout .* 'mlp' model: no attention-site adapter"):
        run_dissociation(tmp_path)
