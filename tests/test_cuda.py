"""The trainer on a CUDA device: training, evaluation and resume (marked gpu: never part of CI).

Run with ``pytest -m gpu`` on a machine with CUDA. The data is drawn on the CPU from the same
generator on either device, so a dropout-free CUDA run must track the CPU run to float32 rounding.
"""

import dataclasses

import pytest
import torch

from windtunnel.experiments.evaluation import evaluate_run
from windtunnel.probes import calibrate
from windtunnel.runs import RunDir
from windtunnel.train import ExperimentConfig, TrainConfig, Trainer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _hmm(device, steps=12, dropout=0.0, **train):
    """A tiny HMM run with everything the trainer can move to the device: position shift, aux loss."""
    return ExperimentConfig(
        task_name="hmm", task=dict(n_states=3, n_symbols=3, n_steps=5), model_name="transformer",
        model=dict(n_layers=2, n_heads=2, d_model=32, d_mlp=64, norm="layernorm", head_bias=True, dropout=dropout),
        train=TrainConfig(steps=steps, batch_size=16, lr=3e-3, warmup_steps=2, eval_every=6, eval_size=64,
                          eval_batch_size=32, log_every=2, checkpoint_every=4, device=device,
                          position_shift=True, aux_loss_weight=1.0, **train),
        eval_lengths=(8,),
    )


def _last_eval(run_dir, split):
    return [r for r in RunDir(run_dir).metrics() if r["split"] == split][-1]["entropy_mae_bits"]


def test_a_cuda_run_tracks_the_cpu_run_without_dropout(tmp_path):
    on_gpu = Trainer(_hmm("cuda"), tmp_path / "gpu")
    assert on_gpu.device.type == "cuda" and all(p.is_cuda for p in on_gpu.model.parameters())
    gpu = on_gpu.fit()
    on_cpu = Trainer(_hmm("cpu"), tmp_path / "cpu")
    cpu = on_cpu.fit()
    # Weights are not compared: Adam turns rounding-level gradients into full-size steps of
    # either sign. The loss and the calibration are what must agree.
    assert gpu.final_loss_nats == pytest.approx(cpu.final_loss_nats, rel=1e-3)
    for split in ("eval", "eval_len8"):
        assert _last_eval(tmp_path / "gpu", split) == pytest.approx(_last_eval(tmp_path / "cpu", split), rel=1e-2), split


def test_cuda_evaluation_equals_cpu_evaluation_of_the_same_weights(tmp_path):
    trainer = Trainer(_hmm("cuda", dropout=0.1), tmp_path / "run")
    trainer.fit()
    task = trainer.experiment.build_task(n_steps=8)
    batches = [task.sample(100, generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    on_gpu = calibrate(trainer.model, task, batches)
    on_cpu_model = trainer.experiment.build_model(None)
    on_cpu_model.load_state_dict({k: v.cpu() for k, v in trainer.model.state_dict().items()})
    on_cpu = calibrate(on_cpu_model, task, batches)
    for field in ("entropy_mae_bits", "kl_bits", "accuracy"):
        assert float(getattr(on_gpu, field)) == pytest.approx(float(getattr(on_cpu, field)), rel=1e-4, abs=1e-7), field
    # `windtunnel eval` reads a CUDA-written run on the CPU.
    report = evaluate_run(tmp_path / "run", lengths=(5, 8), n_sequences=50)
    assert set(report.summary) == {"n_steps=5", "n_steps=8"}


def test_a_killed_cuda_run_with_dropout_resumes_to_the_uninterrupted_run(tmp_path):
    full = Trainer(_hmm("cuda", dropout=0.1), tmp_path / "full")
    result_full = full.fit()
    Trainer(_hmm("cuda", dropout=0.1), tmp_path / "part").fit(stop_at=5)
    assert RunDir(tmp_path / "part").load_checkpoint()["device_type"] == "cuda"
    resumed = Trainer.resume(tmp_path / "part")
    assert resumed.step == 5
    result = resumed.fit()
    # Same kernels on the same data and dropout masks: equal up to the order of CUDA atomics.
    assert result.final_loss_nats == pytest.approx(result_full.final_loss_nats, rel=1e-5)
    for split in ("eval", "eval_len8"):
        assert _last_eval(tmp_path / "part", split) == pytest.approx(_last_eval(tmp_path / "full", split), rel=1e-4), split
    # Another seed (other initialisation, data and masks) moves the loss well past that.
    reseeded = dataclasses.replace(_hmm("cuda", dropout=0.1).train, seed=1)
    other = Trainer(dataclasses.replace(_hmm("cuda", dropout=0.1), train=reseeded)).fit()
    assert other.final_loss_nats != pytest.approx(result_full.final_loss_nats, rel=1e-3)


TORCH_COMPILE_IMPORT = "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"


@pytest.mark.filterwarnings(TORCH_COMPILE_IMPORT)
def test_the_compiled_fast_path_tracks_the_eager_cuda_run(tmp_path):
    """train.compile (CUDA graphs of the forward and loss, fused AdamW) against eager on the same
    data: float32 rounding apart, the same run (issue 19). Position shift and aux loss on."""
    eager = Trainer(_hmm("cuda", steps=24), tmp_path / "eager").fit()
    fast_trainer = Trainer(_hmm("cuda", steps=24, compile=True), tmp_path / "fast")
    assert fast_trainer.optimizer.defaults["fused"] is True
    fast = fast_trainer.fit()
    assert fast.final_loss_nats == pytest.approx(eager.final_loss_nats, rel=1e-3)
    for split in ("eval", "eval_len8"):
        assert _last_eval(tmp_path / "fast", split) == pytest.approx(_last_eval(tmp_path / "eager", split), rel=1e-2), split
    rows = lambda run: [r["loss_nats"] for r in RunDir(tmp_path / run).metrics() if r["split"] == "train"]  # noqa: E731
    assert rows("fast") == pytest.approx(rows("eager"), rel=1e-3)
    # the fast run resumes (fused AdamW state, compiled step rebuilt) to the same end
    Trainer(_hmm("cuda", steps=24, compile=True), tmp_path / "part").fit(stop_at=12)
    resumed = Trainer.resume(tmp_path / "part").fit()
    assert resumed.final_loss_nats == pytest.approx(fast.final_loss_nats, rel=1e-4)


def test_the_weight_check_sees_nan_and_inf_on_cuda():
    params = [torch.nn.Parameter(torch.randn(300, 7, device="cuda")) for _ in range(3)]
    assert float(Trainer._weights_peak(params)) == float(max(p.detach().abs().max() for p in params))
    for bad in (float("nan"), float("inf")):
        with torch.no_grad():
            params[1][17, 3] = bad
        assert not torch.isfinite(Trainer._weights_peak(params)), bad


def test_a_nan_on_cuda_is_read_back_and_reported_at_its_step(tmp_path, monkeypatch):
    from windtunnel import train as train_mod

    real = train_mod.site_loss
    calls = {"n": 0}

    def poisoned(logits, batch, task):
        calls["n"] += 1
        return real(logits, batch, task) * (float("nan") if calls["n"] == 4 else 1.0)

    monkeypatch.setattr(train_mod, "site_loss", poisoned)
    with pytest.raises(FloatingPointError, match=r"^the loss is nan at step 3 .*\(step 0, finite\)"):
        Trainer(_hmm("cuda", steps=12), tmp_path / "run").fit()  # log_every 2
    assert calls["n"] == 4
