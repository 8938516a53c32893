"""The trainer's step loop: equal bit for bit to a plain training loop, checks read back in
batches that stop a run where a check after every step would, and the compiled fast path."""

import dataclasses
import math

import pytest
import torch
from torch import nn

from windtunnel import train as train_mod
from windtunnel.probes import auxiliary_loss_nats, site_loss_nats
from windtunnel.runs import RunDir
from windtunnel.tasks import Bijection
from windtunnel.train import CHECK_EVERY, ExperimentConfig, TrainConfig, Trainer, learning_rate, seed_streams, step_position_ids


def _bijection(steps=24, **train):
    return ExperimentConfig(
        task_name="bijection", task=dict(n_values=8, n_pairs=7), model=dict(n_layers=2, n_heads=2, d_model=32, d_mlp=64),
        train=TrainConfig(steps=steps, batch_size=16, lr=3e-3, warmup_steps=5, eval_every=10, eval_size=40,
                          eval_batch_size=20, log_every=3, checkpoint_every=7, device="cpu", **train),
    )


def _hmm(steps=20):
    """The HMM with everything the step draws or adds: dropout, position shift (ends), aux loss."""
    return ExperimentConfig(
        task_name="hmm", task=dict(n_states=3, n_symbols=3, n_steps=5),
        model=dict(n_layers=2, n_heads=2, d_model=32, d_mlp=64, norm="layernorm", head_bias=True, dropout=0.1),
        train=TrainConfig(steps=steps, batch_size=16, lr=3e-3, warmup_steps=2, eval_every=6, eval_size=40,
                          eval_batch_size=20, log_every=2, checkpoint_every=4, device="cpu", position_shift=True,
                          position_shift_ends=0.3, aux_loss_weight=1.0),
        eval_lengths=(8,),
    )


def _plain_loop(experiment):
    """The textbook eager loop, written out here: the seeds, AdamW groups, schedule, draws, losses
    and clipping the trainer documents, and nothing else. Returns (model, [loss after each step])."""
    cfg = experiment.train
    seeds = seed_streams(cfg.seed)
    model = experiment.build_model(torch.Generator().manual_seed(seeds["init"]))
    task = experiment.build_task()
    data = torch.Generator().manual_seed(seeds["data"])
    drop = torch.Generator().manual_seed(seeds["dropout"])
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=learning_rate(0, cfg), betas=cfg.betas)
    losses = []
    model.train()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, cfg)
        batch = task.sample(cfg.batch_size, generator=data)
        extra = {}
        if cfg.position_shift:
            n_shifts = (model.config.n_positions - task.seq_len) // task.step_layout[1] + 1
            shift = torch.randint(0, n_shifts, (cfg.batch_size, 1), generator=data)
            u = torch.rand(cfg.batch_size, 1, generator=data)
            ends = cfg.position_shift_ends
            shift = torch.where(u < ends / 2, 0, torch.where(u < ends, n_shifts - 1, shift))
            extra["position_ids"] = step_position_ids(task.seq_len, task.step_layout, shift)
        logits = model(batch.tokens, generator=drop, **extra)
        loss = site_loss_nats(logits, batch, task)
        total = loss + cfg.aux_loss_weight * auxiliary_loss_nats(logits, batch, task) if cfg.aux_loss_weight > 0 else loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
    return model, losses


@pytest.mark.parametrize("make", [_bijection, _hmm], ids=["bijection", "hmm-shift-aux-dropout"])
def test_the_trainer_equals_a_plain_training_loop_bit_for_bit_on_cpu(tmp_path, make):
    experiment = make()
    trainer = Trainer(experiment, tmp_path / "run")
    result = trainer.fit()
    model, losses = _plain_loop(experiment)
    for (name, ours), theirs in zip(trainer.model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(ours, theirs), name
    logged = {r["step"]: r["loss_nats"] for r in RunDir(tmp_path / "run").metrics() if r["split"] == "train"}
    cfg = experiment.train
    assert sorted(logged) == list(range(cfg.log_every, cfg.steps + 1, cfg.log_every))
    assert all(logged[s] == losses[s - 1] for s in logged)
    assert result.final_loss_nats == losses[-1] and trainer.last_loss == losses[-1]


def test_a_checkpoint_holds_the_last_loss_read_back_before_it(tmp_path):
    experiment = _bijection(steps=14)
    Trainer(experiment, tmp_path / "run").fit(stop_at=7)  # checkpoint_every 7, log_every 3: 7 is no log step
    _, losses = _plain_loop(experiment)
    assert RunDir(tmp_path / "run").load_checkpoint()["last_loss"] == losses[6]


def _poison_call(monkeypatch, bad_call):
    """Make the site loss of the ``bad_call``-th training forward (1-based) NaN; count the calls."""
    real = train_mod.site_loss
    calls = {"n": 0}

    def poisoned(logits, batch, task):
        calls["n"] += 1
        loss = real(logits, batch, task)
        return loss * math.nan if calls["n"] == bad_call else loss

    monkeypatch.setattr(train_mod, "site_loss", poisoned)
    return calls


def test_checks_read_back_late_stop_the_run_at_the_step_and_with_the_message_of_an_immediate_check(tmp_path, monkeypatch):
    # log, evaluation and checkpoints far apart: the NaN of step 9 is read back at step 12
    experiment = dataclasses.replace(_bijection(), train=dataclasses.replace(_bijection().train, log_every=12, eval_every=12, checkpoint_every=12))
    trainer = Trainer(experiment, tmp_path / "run")
    _, losses = _plain_loop(experiment)
    calls = _poison_call(monkeypatch, bad_call=10)
    with pytest.raises(FloatingPointError, match=r"^the loss is nan at step 9 \(loss nan nats, gradient norm nan; last finite loss (\S+) nats\); kept \S+ \(step 0, finite\);") as err:
        trainer.fit()
    assert f"last finite loss {losses[8]:.4g} nats" in str(err.value)
    assert calls["n"] == 12 and trainer.step == 9 and trainer.last_loss == losses[8]
    assert [r["step"] for r in RunDir(tmp_path / "run").metrics()] == []  # nothing was logged past the NaN


def test_checks_are_read_back_at_least_every_check_every_steps(tmp_path, monkeypatch):
    steps = 3 * CHECK_EVERY
    tiny = ExperimentConfig(task_name="bijection", task=dict(n_values=4, n_pairs=3), model=dict(n_layers=1, n_heads=1, d_model=8, d_mlp=8),
                            train=TrainConfig(steps=steps, batch_size=2, warmup_steps=0, log_every=steps, eval_every=steps,
                                              checkpoint_every=steps, eval_size=4, device="cpu"))
    calls = _poison_call(monkeypatch, bad_call=CHECK_EVERY + 5)
    trainer = Trainer(tiny)
    with pytest.raises(FloatingPointError, match=rf"^the loss is nan at step {CHECK_EVERY + 4} "):
        trainer.fit()
    assert calls["n"] == 2 * CHECK_EVERY


def test_weights_peak_is_max_abs_and_propagates_nan_and_inf():
    params = [nn.Parameter(torch.tensor([1.0, -7.0])), nn.Parameter(torch.tensor([[3.0]]))]
    assert float(Trainer._weights_peak(params)) == 7.0
    for bad in (math.nan, math.inf, -math.inf):
        with torch.no_grad():
            params[1][0, 0] = bad
        assert not math.isfinite(float(Trainer._weights_peak(params))), bad


def test_compile_is_validated():
    with pytest.raises(ValueError, match=r"compile.*a bool"):
        TrainConfig(steps=1, compile="yes")
    with pytest.raises(ValueError, match=r"^ExperimentConfig: train.compile needs model.dropout = 0 .*got dropout=0.1\.$"):
        dataclasses.replace(_hmm(), train=dataclasses.replace(_hmm().train, compile=True))
    assert ExperimentConfig.from_dict(_bijection(compile=True).to_dict()).train.compile is True


def test_batch_to_without_a_gpu_is_the_plain_move():
    batch = Bijection(n_values=4, n_pairs=3).sample(2, generator=torch.Generator().manual_seed(0))
    moved = batch.to("cpu", non_blocking=True)
    assert all(torch.equal(getattr(moved, f), getattr(batch, f)) for f in ("tokens", "sites", "labels", "posterior", "entropy_bits"))


TORCH_COMPILE_IMPORT = "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"
"""torch's inductor warns about torch itself on import; nothing of ours."""


@pytest.mark.slow
@pytest.mark.filterwarnings(TORCH_COMPILE_IMPORT)
def test_the_compiled_step_trains_like_the_eager_one_on_cpu(tmp_path):
    """torch.compile (needs a C compiler; a minute or more of compilation) fuses the forward and
    the loss, so the results agree to float32 rounding, amplified a little by Adam, not bitwise."""
    eager = Trainer(_bijection(steps=12), tmp_path / "eager")
    eager.fit()
    fast = Trainer(_bijection(steps=12, compile=True), tmp_path / "fast")
    fast.fit()
    rows = lambda run: {r["step"]: r["loss_nats"] for r in RunDir(tmp_path / run).metrics() if r["split"] == "train"}  # noqa: E731
    a, b = rows("eager"), rows("fast")
    assert a.keys() == b.keys() and all(b[s] == pytest.approx(a[s], rel=1e-4) for s in a)
    for (name, x), y in zip(eager.model.state_dict().items(), fast.model.state_dict().values()):
        assert torch.allclose(x, y, rtol=1e-3, atol=1e-5), name
