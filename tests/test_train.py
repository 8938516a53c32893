"""The trainer: schedule, seeds, resume equality, NaN guard, one-pass evaluation, configs."""

import dataclasses
import math

import pytest
import torch

from windtunnel import train as train_mod
from windtunnel._checks import ConfigError
from windtunnel.metrics import calibration
from windtunnel.presets import apply_overrides, get_preset, preset_names
from windtunnel.runs import RunDir
from windtunnel.probes import calibrate
from windtunnel.train import ExperimentConfig, TrainConfig, Trainer, learning_rate, seed_streams, telemetry_steps


def _tiny(steps=12, **train):
    return ExperimentConfig(
        task_name="bijection",
        task=dict(n_values=6, n_pairs=5),
        model_name="transformer",
        model=dict(n_layers=1, n_heads=2, d_model=16, d_mlp=32),
        train=TrainConfig(steps=steps, batch_size=8, lr=3e-3, warmup_steps=3, eval_every=6, eval_size=40,
                          eval_batch_size=20, log_every=2, checkpoint_every=4, device="cpu", **train),
        name="tiny",
    )


def test_learning_rate_warmup_then_cosine_to_floor():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert learning_rate(0, cfg) == 0.0 and learning_rate(5, cfg) == pytest.approx(0.5)
    assert learning_rate(10, cfg) == pytest.approx(1.0)
    assert learning_rate(55, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert learning_rate(100, cfg) == pytest.approx(0.1)
    const = TrainConfig(steps=100, lr=1.0, warmup_steps=0, schedule="constant")
    assert learning_rate(77, const) == 1.0


def test_telemetry_schedule_is_log_spaced_then_sparse():
    steps = telemetry_steps(20_000)
    assert steps[:11] == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert [600, 700, 800, 900, 1000, 1500, 2000] == [s for s in steps if 512 < s <= 2000]
    assert steps[-3:] == [10_000, 15_000, 20_000]
    assert telemetry_steps(50) == [0, 1, 2, 4, 8, 16, 32, 50]


def test_seed_streams_are_distinct_and_deterministic():
    a, b = seed_streams(0), seed_streams(1)
    assert a == seed_streams(0) and len(set(a.values())) == len(a) and a != b
    assert all(0 <= v < 2**63 for v in a.values())


def test_training_reduces_the_loss_and_is_reproducible(tmp_path):
    r1 = Trainer(_tiny(steps=30), tmp_path / "a").fit()
    r2 = Trainer(_tiny(steps=30), tmp_path / "b").fit()
    rows = RunDir(tmp_path / "a").metrics()
    train_losses = [r["loss_nats"] for r in rows if r["split"] == "train"]
    assert train_losses[-1] < train_losses[0]
    assert r1.final_loss_nats == r2.final_loss_nats
    assert float(r1.calibration.entropy_mae_bits) == float(r2.calibration.entropy_mae_bits)


def test_killed_and_resumed_run_equals_the_uninterrupted_run(tmp_path):
    full = Trainer(_tiny(), tmp_path / "full")
    result_full = full.fit()
    part = Trainer(_tiny(), tmp_path / "part")
    part.fit(stop_at=5)  # "killed" after step 5: the checkpoint at 5 is the last thing written
    # A torn line and rows after the checkpoint, as a crash would leave them.
    run = RunDir(tmp_path / "part")
    run.log_metrics({"step": 6, "split": "train", "loss_nats": 123.0})
    with open(run.metrics_path, "a") as handle:
        handle.write('{"step": 7, "spl')
    resumed = Trainer.resume(tmp_path / "part")
    assert resumed.step == 5
    result = resumed.fit()
    assert result.final_loss_nats == result_full.final_loss_nats
    assert float(result.calibration.entropy_mae_bits) == float(result_full.calibration.entropy_mae_bits)
    for (name, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    # The logs match too, once wall-clock times are set aside.
    strip = lambda rows: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]  # noqa: E731
    assert strip(RunDir(tmp_path / "full").metrics()) == strip(run.metrics())


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    trainer = Trainer(_tiny(steps=12), tmp_path / "run")
    real = train_mod.site_loss
    calls = {"n": 0}

    def poisoned(logits, batch, task):
        calls["n"] += 1
        loss = real(logits, batch, task)
        return loss * math.nan if calls["n"] == 7 else loss

    monkeypatch.setattr(train_mod, "site_loss", poisoned)
    with pytest.raises(FloatingPointError, match=r"^the loss is nan at step 6 \(.*last finite loss .* nats\); kept .*step_4\.pt \(step 4, finite\); resume .* --resume --set train\.lr=0\.0003$") as err:
        trainer.fit()
    assert "\n" not in str(err.value)
    state = RunDir(tmp_path / "run").load_checkpoint()
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_one_pass_evaluation_equals_per_prefix_evaluation():
    exp = _tiny()
    model = exp.build_model(torch.Generator().manual_seed(0)).eval()
    task = exp.build_task()
    batch = task.sample(16, generator=torch.Generator().manual_seed(1))
    one_pass = calibrate(model, task, [batch])
    with torch.no_grad():
        per_prefix = torch.stack([model(batch.tokens[:, : s + 1])[:, -1] for s in batch.sites.tolist()], dim=1)
    sl = per_prefix[..., task.class_offset : task.class_offset + task.n_classes]
    reference = calibration(sl, batch.posterior, batch.labels)
    for name in ("entropy_mae_bits", "kl_bits", "accuracy", "cross_entropy_nats"):
        assert torch.allclose(getattr(one_pass, name), getattr(reference, name), atol=1e-6), name


def test_soft_target_task_gets_an_untied_state_head():
    exp = get_preset("hmm", "transformer", "cpu")
    cfg = exp.model_config()
    assert cfg.n_out == 5 and cfg.tie_embeddings is False and cfg.n_positions == exp.build_task(n_steps=50).seq_len


def test_experiment_config_round_trips_through_a_dict():
    for name in preset_names():
        task, model, preset = name.split("/")
        exp = get_preset(task, model, preset)
        assert ExperimentConfig.from_dict(exp.to_dict()) == exp


def test_config_errors_are_collected_and_named():
    with pytest.raises(ConfigError, match=r"(?s)2 problems in TrainConfig.*steps must be an int >= 1; got 0.*lr must be a number in \(0.0, inf\); got -0.001"):
        TrainConfig(steps=0, lr=-1e-3)
    with pytest.raises(ValueError, match=r"schedule must be one of 'cosine', 'constant'; got 'cosin'. did you mean 'cosine'\?"):
        TrainConfig(steps=1, schedule="cosin")
    with pytest.raises(ValueError, match=r"task_name must be one of .*; got 'bijecton'. did you mean 'bijection'\?"):
        ExperimentConfig(task_name="bijecton", train=TrainConfig(steps=1))
    with pytest.raises(ConfigError, match=r"(?s)--model.n_layer is not a field of TinyGPTConfig; did you mean 'n_layers'\?.*--trian.lr must start with"):
        apply_overrides(_tiny(), ["model.n_layer=3", "trian.lr=0.1"])
    with pytest.raises(ValueError, match=r"no preset 'bijection/transformer/gpu'"):
        get_preset("bijection", "transformer", "gpu")


def test_overrides_apply():
    exp = apply_overrides(_tiny(), ["train.lr=0.01", "model.n_layers=2", "task.n_values=7", "--train.schedule=constant"])
    assert exp.train.lr == 0.01 and exp.model["n_layers"] == 2 and exp.task["n_values"] == 7
    assert exp.train.schedule == "constant"


def test_an_existing_run_is_continued_only_by_resume_and_replaced_only_by_overwrite(tmp_path):
    Trainer(_tiny(steps=4), tmp_path / "run").fit()
    before = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    for experiment in (_tiny(steps=4), _tiny(steps=99)):  # the same config is refused too
        with pytest.raises(ValueError, match=r"run already holds a run \(step 4 of 4\); continue it with --resume, or replace it with --overwrite"):
            Trainer(experiment, tmp_path / "run")
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == before
    assert RunDir(tmp_path / "run").load_checkpoint()["step"] == 4
    replaced = Trainer(_tiny(steps=6), tmp_path / "run", overwrite=True)
    assert replaced.step == 0 and not (tmp_path / "run" / "metrics.jsonl").exists()
    assert RunDir(tmp_path / "run").latest_checkpoint() is None
    replaced.fit()
    assert max(r["step"] for r in RunDir(tmp_path / "run").metrics()) == 6
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty and is not a run directory"):
        Trainer(_tiny(), tmp_path / "other", overwrite=True)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_site_loss_against_a_hand_computation():
    from windtunnel.tasks import Bijection, HMMFiltering

    gen = torch.Generator().manual_seed(0)
    bij = Bijection(n_values=4, n_pairs=3)
    batch = bij.sample(3, generator=gen)
    logits = torch.randn(3, bij.seq_len, bij.vocab_size, generator=gen, dtype=torch.float64)
    by_hand = sum(
        -torch.log_softmax(logits[n, s], -1)[bij.class_offset + batch.labels[n, i]]
        for n in range(3) for i, s in enumerate(batch.sites.tolist())
    ) / (3 * len(batch.sites))
    assert torch.allclose(train_mod.site_loss(logits, batch, bij), by_hand)
    hmm = HMMFiltering(n_steps=3)
    hb = hmm.sample(2, generator=gen)
    hl = torch.randn(2, hmm.seq_len, hmm.n_classes, generator=gen, dtype=torch.float64)
    soft = sum(
        -(hb.posterior[n, i] * torch.log_softmax(hl[n, s], -1)).sum()
        for n in range(2) for i, s in enumerate(hb.sites.tolist())
    ) / (2 * len(hb.sites))
    assert torch.allclose(train_mod.site_loss(hl, hb, hmm), soft)


def test_hmm_auxiliary_targets_are_the_predicted_beliefs_at_the_obs_tokens():
    from windtunnel.probes import auxiliary_loss_nats
    from windtunnel.tasks import Bijection, HMMFiltering

    gen = torch.Generator().manual_seed(0)
    hmm = HMMFiltering(n_states=3, n_symbols=4, n_steps=5)
    hb = hmm.sample(2, generator=gen)
    positions, targets = hmm.auxiliary_targets(hb)
    assert bool((hb.tokens[:, positions] == hmm.obs_id).all())  # the [OBS] token before each o_t
    assert bool((hb.tokens[:, positions + 1] >= hmm.symbol_offset).all())
    assert torch.equal(targets, hb.predicted_probs)
    torch.testing.assert_close(targets[:, 0], torch.full((2, 3), 1 / 3, dtype=torch.float64))  # no transition before o_1
    # predicted_t = filtered_{t-1} T, by hand
    trans = hb.transition_cents.double() / 100
    torch.testing.assert_close(targets[:, 1:], torch.einsum("bks,bsr->bkr", hb.posterior[:, :-1], trans))
    logits = torch.randn(2, hmm.seq_len, hmm.n_classes, generator=gen, dtype=torch.float64)
    by_hand = sum(
        -(targets[n, i] * torch.log_softmax(logits[n, p], -1)).sum()
        for n in range(2) for i, p in enumerate(positions.tolist())
    ) / (2 * len(positions))
    assert torch.allclose(auxiliary_loss_nats(logits, hb, hmm), by_hand)
    bij = Bijection(n_values=4, n_pairs=3)
    with pytest.raises(ValueError, match="no auxiliary targets"):
        auxiliary_loss_nats(logits, bij.sample(2, generator=gen), bij)


def test_aux_loss_weight_trains_on_both_losses_and_is_validated(tmp_path):
    with pytest.raises(ValueError, match="aux_loss_weight"):
        TrainConfig(steps=1, aux_loss_weight=-1.0)
    with pytest.raises(ValueError, match="needs a task with auxiliary targets"):
        _tiny(aux_loss_weight=1.0)  # the bijection has none

    def hmm(weight):
        return ExperimentConfig(
            task_name="hmm", task=dict(n_states=2, n_symbols=2, n_steps=4), model_name="transformer",
            model=dict(n_layers=1, n_heads=2, d_model=16, d_mlp=32, norm="layernorm", head_bias=True),
            train=TrainConfig(steps=6, batch_size=8, lr=3e-3, warmup_steps=2, eval_every=6, eval_size=20,
                              eval_batch_size=20, log_every=2, checkpoint_every=6, device="cpu", aux_loss_weight=weight),
        )

    plain, aux = Trainer(hmm(0.0), tmp_path / "plain"), Trainer(hmm(1.0), tmp_path / "aux")
    plain.fit(), aux.fit()
    plain_rows = [r for r in RunDir(tmp_path / "plain").metrics() if r["split"] == "train"]
    aux_rows = [r for r in RunDir(tmp_path / "aux").metrics() if r["split"] == "train"]
    assert "aux_loss_nats" not in plain_rows[0] and all(r["aux_loss_nats"] > 0 for r in aux_rows)
    # Same seed and batches: only the extra gradient can take the two runs apart.
    assert plain_rows[-1]["loss_nats"] != aux_rows[-1]["loss_nats"]
    assert any(not torch.equal(a, b) for a, b in zip(plain.model.state_dict().values(), aux.model.state_dict().values()))


def _hmm_experiment(steps=6, **train):
    return ExperimentConfig(
        task_name="hmm", task=dict(n_states=2, n_symbols=2, n_steps=4), model_name="transformer",
        model=dict(n_layers=1, n_heads=2, d_model=16, d_mlp=32, norm="layernorm", head_bias=True),
        train=TrainConfig(steps=steps, batch_size=8, lr=3e-3, warmup_steps=2, eval_every=6, eval_size=20,
                          eval_batch_size=20, log_every=2, checkpoint_every=4, device="cpu", **train),
        eval_lengths=(9,),
    )


def _spy_on_position_ids(monkeypatch):
    """A list that collects every position-id tensor the trainer draws for the shift."""
    seen = []
    make_ids = train_mod.Trainer._shifted_position_ids

    def spy(self, shape):
        seen.append(make_ids(self, shape))
        return seen[-1]

    monkeypatch.setattr(train_mod.Trainer, "_shifted_position_ids", spy)
    return seen


def test_position_shift_moves_the_steps_by_whole_steps_and_is_validated(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="position_shift.*a bool"):
        TrainConfig(steps=1, position_shift=1)
    with pytest.raises(ValueError, match="position_shift needs the transformer"):
        dataclasses.replace(_hmm_experiment(position_shift=True), model_name="lstm", model={})
    with pytest.raises(ValueError, match="position_shift needs a task made of steps"):
        _tiny(position_shift=True)
    with pytest.raises(ValueError, match=r"at least one step longer than the training sequences \(19 tokens\); it has 19 rows"):
        dataclasses.replace(_hmm_experiment(position_shift=True), eval_lengths=())
    seen = _spy_on_position_ids(monkeypatch)
    shifted = Trainer(_hmm_experiment(steps=30, position_shift=True), tmp_path / "shift")
    shifted.fit()
    ids = torch.cat(seen)
    # The header has 2*2 + 2*2 + 3 = 11 tokens; the table has 11 + 2*9 = 29 rows (K = 9), training
    # sequences 11 + 2*4 = 19 tokens, so the 4 steps start at step 1..6 of the table: offsets 0, 2, .., 10.
    assert shifted.model.config.n_positions == 29 and ids.shape == (30 * 8, 19)
    assert torch.equal(ids[:, :11], torch.arange(11).expand(240, 11)), "the header never moves"
    offsets = ids[:, 11:] - torch.arange(11, 19)
    assert torch.equal(offsets, offsets[:, :1].expand(-1, 8)), "the steps move together"
    assert set(offsets[:, 0].tolist()) == {0, 2, 4, 6, 8, 10}, "every whole-step offset is drawn in 240 draws"
    plain = Trainer(_hmm_experiment(steps=30), tmp_path / "plain")
    plain.fit()
    # Rows past the training length are trained only under the shift (embeddings get no weight
    # decay, so without it they stay at their initial values).
    init = Trainer(_hmm_experiment(steps=30), tmp_path / "init").model.pos_embed.W_pos[19:]
    assert torch.equal(plain.model.pos_embed.W_pos[19:], init)
    assert (shifted.model.pos_embed.W_pos[19:] - init).abs().amax(dim=1).min() > 1e-3


def test_position_shift_run_is_reproducible_and_resumes_exactly(tmp_path):
    full = Trainer(_hmm_experiment(steps=10, position_shift=True), tmp_path / "full")
    result_full = full.fit()
    again = Trainer(_hmm_experiment(steps=10, position_shift=True), tmp_path / "again").fit()
    assert result_full.final_loss_nats == again.final_loss_nats
    Trainer(_hmm_experiment(steps=10, position_shift=True), tmp_path / "part").fit(stop_at=4)
    result = Trainer.resume(tmp_path / "part").fit()
    assert result.final_loss_nats == result_full.final_loss_nats
    assert float(result.calibration.entropy_mae_bits) == float(result_full.calibration.entropy_mae_bits)


def test_a_run_written_before_a_config_field_existed_still_resumes(tmp_path):
    import json

    Trainer(_tiny(steps=12), tmp_path / "old").fit(stop_at=4)
    path = tmp_path / "old" / "config.json"
    config = json.loads(path.read_text())
    del config["train"]["aux_loss_weight"]  # as written before these fields were added
    del config["train"]["position_shift"]
    del config["train"]["position_shift_ends"]
    path.write_text(json.dumps(config))
    resumed = Trainer.resume(tmp_path / "old")
    assert resumed.step == 4 and resumed.experiment == _tiny(steps=12)
    resumed.close()
    config["train"]["weight_decay"] = 0.5  # config.json edited behind the checkpoint's back
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json and .*latest\.pt describe different runs \(train\.weight_decay: 0\.5 in config\.json, 0\.1 in the checkpoint\)"):
        Trainer.resume(tmp_path / "old")


def test_init_from_starts_from_the_source_weights_and_resumes_without_it(tmp_path):
    source = Trainer(_tiny(steps=4), tmp_path / "source")
    source.fit()
    tuned_experiment = dataclasses.replace(_tiny(steps=8, weight_decay=0.0), init_from=str(tmp_path / "source"))
    tuned = Trainer(tuned_experiment, tmp_path / "tuned")
    assert tuned.init_step == 4 and tuned.step == 0
    for (name, a), (_, b) in zip(source.model.state_dict().items(), tuned.model.state_dict().items()):
        assert torch.equal(a, b), name
    fresh = Trainer(_tiny(steps=8, weight_decay=0.0))
    assert any(not torch.equal(a, b) for a, b in zip(fresh.model.state_dict().values(), tuned.model.state_dict().values()))
    # A checkpoint file works too, and names the step it was saved at.
    by_file = Trainer(dataclasses.replace(tuned_experiment, init_from=str(tmp_path / "source" / "checkpoints" / "step_4.pt")))
    assert by_file.init_step == 4 and torch.equal(by_file.model.pos_embed.W_pos, source.model.pos_embed.W_pos)
    result_full = Trainer(tuned_experiment, tmp_path / "tuned_full").fit()
    tuned.fit(stop_at=4)
    (tmp_path / "source").rename(tmp_path / "moved")  # resume reads its own checkpoint, not the source
    resumed = Trainer.resume(tmp_path / "tuned")
    assert resumed.init_step is None and resumed.experiment.init_from == str(tmp_path / "source")
    result = resumed.fit()
    assert result.final_loss_nats == result_full.final_loss_nats
    assert float(result.calibration.entropy_mae_bits) == float(result_full.calibration.entropy_mae_bits)


def test_init_from_refuses_a_missing_foreign_or_differently_shaped_source(tmp_path):
    Trainer(_tiny(steps=4), tmp_path / "source").fit()
    with pytest.raises(ValueError, match="neither a run directory nor a checkpoint file"):
        Trainer(dataclasses.replace(_tiny(), init_from=str(tmp_path / "nowhere")))
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="could not be read as a checkpoint"):
        Trainer(dataclasses.replace(_tiny(), init_from=str(tmp_path / "empty.pt")))
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="foreign.pt: not a windtunnel checkpoint with a content hash"):
        Trainer(dataclasses.replace(_tiny(), init_from=str(tmp_path / "foreign.pt")))
    wider = dataclasses.replace(_tiny(), model=dict(n_layers=1, n_heads=2, d_model=32, d_mlp=32), init_from=str(tmp_path / "source"))
    with pytest.raises(ValueError, match="holds a model of another config .d_model: 16 there, 32 here"):
        Trainer(wider)
    with pytest.raises(ValueError, match="init_from"):
        dataclasses.replace(_tiny(), init_from=3)


def test_resume_on_another_device_kind_is_refused_with_dropout_and_allowed_without(tmp_path):
    # A checkpoint says which device kind wrote it. CPU and CUDA generator states cannot be
    # exchanged, so a dropout model must resume where it was trained; without dropout the dropout
    # generator is never drawn from and the run resumes exactly on either kind.
    def written_on_cuda(run_dir):
        run = RunDir(run_dir)
        state = run.load_checkpoint()
        assert state["device_type"] == "cpu"
        state["device_type"] = "cuda"
        state["dropout_generator"] = torch.zeros(16, dtype=torch.uint8)  # a CUDA state's size
        run.save_checkpoint(state["step"], state)

    dropped = dataclasses.replace(_tiny(), model=dict(n_layers=1, n_heads=2, d_model=16, d_mlp=32, dropout=0.1))
    Trainer(dropped, tmp_path / "dropout").fit(stop_at=4)
    written_on_cuda(tmp_path / "dropout")
    with pytest.raises(ValueError, match="written on cuda and this run is on cpu; a model with dropout .* --init-from"):
        Trainer.resume(tmp_path / "dropout")
    result_full = Trainer(_tiny(), tmp_path / "full").fit()
    Trainer(_tiny(), tmp_path / "plain").fit(stop_at=4)
    written_on_cuda(tmp_path / "plain")
    result = Trainer.resume(tmp_path / "plain").fit()
    assert result.final_loss_nats == result_full.final_loss_nats


def test_position_shift_ends_put_that_fraction_at_the_first_and_last_offsets(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="position_shift_ends must be 0 unless position_shift is on"):
        TrainConfig(steps=1, position_shift_ends=0.5)
    with pytest.raises(ValueError, match="position_shift_ends"):
        TrainConfig(steps=1, position_shift=True, position_shift_ends=1.5)
    seen = _spy_on_position_ids(monkeypatch)
    offsets = {}
    for ends in (0.0, 0.5, 1.0):
        seen.clear()
        Trainer(_hmm_experiment(steps=100, position_shift=True, position_shift_ends=ends)).fit()
        # Offsets 0, 2, .., 10 (6 whole steps; see the test above), 800 draws.
        offsets[ends] = torch.cat(seen)[:, 11] - 11
    counts = {e: torch.bincount(o, minlength=11)[::2].tolist() for e, o in offsets.items()}
    assert set(offsets[1.0].tolist()) == {0, 10} and abs(counts[1.0][0] - 400) < 60  # binomial sd 14
    # Half at the ends, half uniform: each end gets 1/4 + 1/12 = 1/3, each middle offset 1/12.
    assert all(abs(c - 800 / 3) < 60 for c in (counts[0.5][0], counts[0.5][5]))
    assert all(abs(c - 800 / 12) < 35 for c in counts[0.5][1:5])  # sd 8
    assert all(abs(c - 800 / 6) < 45 for c in counts[0.0])  # sd 11


def test_train_lengths_draw_each_batch_at_one_of_the_lengths_and_resume_exactly(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="train_lengths needs a task with n_steps"):
        dataclasses.replace(_tiny(), train_lengths=(7,))
    with pytest.raises(ValueError, match=r"train_lengths must be a list of ints >= 1, e.g. \[30, 50\]; got \(0,\)"):
        dataclasses.replace(_hmm_experiment(), train_lengths=(0,))
    with pytest.raises(ValueError, match=r"train_lengths \[12\] need 35 positions; model.n_positions is 29"):
        dataclasses.replace(_hmm_experiment(), train_lengths=(12,), model={**_hmm_experiment().model, "n_positions": 29})
    mixed = dataclasses.replace(_hmm_experiment(steps=40, position_shift=True), train_lengths=(9,), eval_lengths=())
    assert mixed.model_config().n_positions == 29  # the table grows to fit the 9-step sequences (19 without)
    assert apply_overrides(_hmm_experiment(), ["train_lengths=[9]"]).train_lengths == (9,)
    seen = []
    real = train_mod.site_loss

    def spy(logits, batch, task):
        seen.append((batch.tokens.shape[1], task.n_steps))
        return real(logits, batch, task)

    monkeypatch.setattr(train_mod, "site_loss", spy)
    full = Trainer(mixed, tmp_path / "full")
    result_full = full.fit()
    # 4 steps -> 19 tokens, 9 steps -> 29; the loss is taken with the batch's own task.
    assert set(seen) == {(19, 4), (29, 9)} and 10 <= sum(n == 9 for _, n in seen) <= 30  # 40 fair draws
    Trainer(mixed, tmp_path / "part").fit(stop_at=17)
    result = Trainer.resume(tmp_path / "part").fit()
    assert result.final_loss_nats == result_full.final_loss_nats
    assert float(result.calibration.entropy_mae_bits) == float(result_full.calibration.entropy_mae_bits)


def test_watching_the_value_updates_leaves_the_run_unchanged_and_logs_every_probed_step(tmp_path):
    from windtunnel.probes import ValueUpdateProbe

    experiment = _hmm_experiment(steps=10, position_shift=True)
    plain = Trainer(experiment, tmp_path / "plain")
    plain.fit()
    watched = Trainer(experiment, tmp_path / "watched", update_probe=ValueUpdateProbe())
    watched.fit()
    for (name, a), b in zip(plain.model.state_dict().items(), watched.model.state_dict().values()):
        assert torch.equal(a, b), name
    rows = RunDir(tmp_path / "watched").telemetry()
    # the update of step s is logged under s, for every probed step before the end but step 0,
    # where the warmup's lr is 0
    watched_steps = [s for s in telemetry_steps(10) if 0 < s < 10]
    assert learning_rate(0, experiment.train) == 0.0 and sorted({r["step"] for r in rows}) == watched_steps
    cos = [r["value"] for r in rows if r["metric"] == "value_update_pull_cosine"]
    assert len(cos) == 2 * len(watched_steps) and all(-1.0 <= c <= 1.0 for c in cos)
    ratios = [r["value"] for r in rows if r["metric"] == "value_update_own_norm_ratio"]
    assert all(r > 0.0 for r in ratios)


def test_a_diverging_run_stops_at_its_first_non_finite_value_and_resumes_with_a_sane_lr(tmp_path):
    diverging = dataclasses.replace(_tiny(steps=40), train=dataclasses.replace(_tiny().train, steps=40, lr=1e6))
    trainer = Trainer(diverging, tmp_path / "run")
    with pytest.raises(FloatingPointError) as err:
        trainer.fit()
    message = str(err.value)
    assert "\n" not in message
    assert trainer.step < 40 and f"at step {trainer.step} " in message
    assert message.endswith(f"--resume --set train.lr={1e5:g}")
    run = RunDir(tmp_path / "run")
    kept = run.load_checkpoint()
    assert kept["step"] <= trainer.step and f"(step {kept['step']}, finite)" in message
    assert all(torch.isfinite(v).all() for v in kept["model"].values())
    for _, path in run.checkpoints():  # nothing non-finite was ever written
        assert all(torch.isfinite(v).all() for v in run.load_checkpoint(path)["model"].values())
    resumed = Trainer.resume(tmp_path / "run", changes={"train.lr": 3e-3})
    result = resumed.fit()
    assert result.step == 40 and math.isfinite(result.final_loss_nats)
    assert run.read_config()["train"]["lr"] == 3e-3
    assert [r["changes"] for r in RunDir(tmp_path / "run").metrics() if "changes" in r] == []
    import json

    assert json.loads((tmp_path / "run" / "resumes.jsonl").read_text()) == {"step": kept["step"], "changes": {"train.lr": [1e6, 3e-3]}}


def test_a_disk_full_error_during_resume_leaves_the_logs_as_they_were(tmp_path, monkeypatch):
    import errno

    from windtunnel import runs as runs_mod

    Trainer(_tiny(), tmp_path / "run").fit(stop_at=4)
    run = RunDir(tmp_path / "run")
    run.log_metrics({"step": 6, "split": "train", "loss_nats": 1.0})  # logged after the checkpoint
    before = run.metrics_path.read_bytes()

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(runs_mod, "write_bytes_atomic", full)
    with pytest.raises(OSError, match="No space left"):
        Trainer.resume(tmp_path / "run")
    assert run.metrics_path.read_bytes() == before
    monkeypatch.undo()
    resumed = Trainer.resume(tmp_path / "run")  # the lock was released; the rows after step 4 go
    assert resumed.step == 4 and max(r["step"] for r in run.metrics()) == 4


def test_resume_extends_the_run_and_refuses_other_changes(tmp_path):
    Trainer(_tiny(steps=8), tmp_path / "run").fit()
    with pytest.raises(ValueError, match=r"train\.batch_size would make .* another run; --resume may change only train\.steps, train\.lr, train\.keep_checkpoints"):
        Trainer.resume(tmp_path / "run", changes={"train.batch_size": 4})
    with pytest.raises(ValueError, match="train.steps=6 is below the checkpoint's step 8"):
        Trainer.resume(tmp_path / "run", changes={"train.steps": 6})
    extended = Trainer.resume(tmp_path / "run", changes={"train.steps": 12})
    assert extended.step == 8 and extended.config.steps == 12
    assert extended.fit().step == 12
    run = RunDir(tmp_path / "run")
    steps = [r["step"] for r in run.metrics() if r["split"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 12  # no duplicate rows
    assert run.read_config()["train"]["steps"] == 12 and run.load_checkpoint()["step"] == 12


def test_elapsed_time_adds_up_over_resumed_segments_and_the_final_model_is_exported(tmp_path):
    from safetensors.torch import load_file

    Trainer(_tiny(), tmp_path / "run").fit(stop_at=4)
    first = RunDir(tmp_path / "run").load_checkpoint()["elapsed_s"]
    resumed = Trainer.resume(tmp_path / "run")
    resumed.fit()
    rows = [r for r in RunDir(tmp_path / "run").metrics() if r["split"] == "train"]
    assert first > 0 and all(r["elapsed_s"] > first for r in rows if r["step"] > 4)
    assert [r["elapsed_s"] for r in rows] == sorted(r["elapsed_s"] for r in rows)
    exported = load_file(tmp_path / "run" / "model.safetensors")
    assert exported.keys() == resumed.model.state_dict().keys()
    assert all(torch.equal(exported[k], v) for k, v in resumed.model.state_dict().items())


def test_keep_checkpoints_keeps_the_newest_and_the_log_spaced_schedule(tmp_path):
    experiment = dataclasses.replace(_tiny(steps=40), train=dataclasses.replace(_tiny().train, steps=40, checkpoint_every=2, keep_checkpoints=2))
    Trainer(experiment, tmp_path / "run").fit()
    kept = [s for s, _ in RunDir(tmp_path / "run").checkpoints()]
    assert kept == sorted({s for s in telemetry_steps(40) if s % 2 == 0 and s > 0} | {38, 40})
    with pytest.raises(ValueError, match="keep_checkpoints must be None or an int >= 0"):
        TrainConfig(steps=4, keep_checkpoints=-1)


def test_a_second_trainer_on_a_run_being_written_is_refused(tmp_path):
    from windtunnel.runs import RunLockedError

    writer = Trainer(_tiny(), tmp_path / "run")
    with pytest.raises(RunLockedError, match="is being written by another process"):
        Trainer.resume(tmp_path / "run")
    writer.fit()
    assert Trainer.resume(tmp_path / "run").step == 12  # released when fit returned


def test_missing_cuda_and_runs_too_big_for_the_machine_are_refused_before_anything_is_written(tmp_path):
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="TrainConfig.device is 'cuda' but this machine has no usable CUDA device"):
            Trainer(dataclasses.replace(_tiny(), train=dataclasses.replace(_tiny().train, device="cuda")), tmp_path / "a")
    huge = apply_overrides(_tiny(), ["task.n_values=100000000", "task.n_pairs=4"])
    assert train_mod.estimate_memory_bytes(huge) > 4 * 100_000_000 * 2 * 16  # the embedding alone, four times
    with pytest.raises(ValueError, match=r"this run needs at least .* GiB .* vocabulary 200000000"):
        Trainer(huge, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def _tensorboard_scalars(folder):
    """{tag: [(step, value)]} read back with TensorBoard's own reader (every event kept)."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={SCALARS: 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _scalars_of_logs(run):
    """The same {tag: [(step, value)]} built from metrics.jsonl and telemetry.jsonl by hand."""
    want = {}
    for row in run.metrics():
        for name, value in row.items():
            if name not in ("step", "split") and value is not None:
                want.setdefault(f"{row['split']}/{name}", []).append((row["step"], value))
    for row in run.telemetry():
        tag = f"telemetry/{row['metric']}" + (f"/layer{row['layer']}" if row["layer"] is not None else "")
        tag += f"/head{row['head']}" if row["head"] is not None else ""
        if row["value"] is not None:
            want.setdefault(tag, []).append((row["step"], row["value"]))
    return want


def _assert_same_scalars(got, want):
    assert set(got) == set(want)
    for tag, rows in want.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in rows], tag  # the same steps, each once, in order
        # TensorBoard stores float32: equal to the log's float64 rounded to float32
        assert [v for _, v in got[tag]] == [float(torch.tensor(v, dtype=torch.float32)) for _, v in rows], tag


def test_tensorboard_mirrors_the_metrics_and_telemetry_and_changes_nothing_else(tmp_path):
    pytest.importorskip("tensorboard")
    from click.testing import CliRunner

    from windtunnel.cli import main

    common = ["train", "bijection", "--steps", "12", "--set", "task.n_values=6", "--set", "task.n_pairs=5",
              "--set", "model.n_layers=1", "--set", "model.n_heads=2", "--set", "model.d_model=16",
              "--set", "model.d_mlp=32", "--set", "train.batch_size=8", "--set", "train.eval_size=40",
              "--set", "train.eval_batch_size=20", "--set", "train.eval_every=6", "--set", "train.log_every=2",
              "--set", "train.device=cpu", "--telemetry"]
    for name, extra in (("with", ["--tensorboard"]), ("without", [])):
        result = CliRunner().invoke(main, [*common, "--out", str(tmp_path / name), *extra])
        assert result.exit_code == 0, result.output
    run = RunDir(tmp_path / "with")
    got = _tensorboard_scalars(run.tensorboard_dir)
    assert {"train/loss_nats", "eval/entropy_mae_bits"} <= set(got) and any(t.startswith("telemetry/") for t in got)
    _assert_same_scalars(got, _scalars_of_logs(run))
    assert not (tmp_path / "without" / "tensorboard").exists()
    # Bit-identical training with and without the mirror: weights and every logged number.
    a, b = (RunDir(tmp_path / n).load_checkpoint()["model"] for n in ("with", "without"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]  # noqa: E731
    assert strip(run.metrics()) == strip(RunDir(tmp_path / "without").metrics())
    assert run.telemetry() == RunDir(tmp_path / "without").telemetry()


def test_tensorboard_of_a_resumed_run_holds_every_step_once(tmp_path):
    pytest.importorskip("tensorboard")
    full = Trainer(_tiny(), tmp_path / "full", tensorboard=True)
    full.fit()
    part = Trainer(_tiny(), tmp_path / "part", tensorboard=True)
    part.fit(stop_at=5)
    run = RunDir(tmp_path / "part")
    run.open_tensorboard()  # rows after the checkpoint, as a run killed at step 6 leaves them
    run.log_metrics({"step": 6, "split": "train", "loss_nats": 123.0})
    run.close_tensorboard()
    assert (6, 123.0) in _tensorboard_scalars(run.tensorboard_dir)["train/loss_nats"]
    Trainer.resume(tmp_path / "part", tensorboard=True).fit()
    got = _tensorboard_scalars(run.tensorboard_dir)
    _assert_same_scalars(got, _scalars_of_logs(run))
    want = _tensorboard_scalars(RunDir(tmp_path / "full").tensorboard_dir)
    drop_time = lambda scalars: {t: v for t, v in scalars.items() if not t.endswith("elapsed_s")}  # noqa: E731
    assert drop_time(got) == drop_time(want)  # the same scalars as the uninterrupted run


def test_tensorboard_without_the_package_names_the_extra(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard now raises ImportError
    with pytest.raises(ImportError, match=r"--tensorboard needs the tensorboard package; install it with pip install 'windtunnel\[tensorboard\]'"):
        Trainer(_tiny(), tmp_path / "run", tensorboard=True)
    assert not (tmp_path / "run").exists()  # refused before anything is written
