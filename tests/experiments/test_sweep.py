"""``windtunnel sweep`` and ``compare`` on the local backend, and ``runs.load``: the grid checked
before anything starts, failing trials recorded while the others finish, trials that are ordinary
run directories, reruns that skip finished trials, and a driver killed with SIGKILL mid-way whose
rerun completes the sweep with every step trained once (issue 16)."""

import contextlib
import csv
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from windtunnel import runs
from windtunnel.cli import main
from windtunnel.comparison import seed_statistics
from windtunnel.experiments.sweep import GEOMETRY_FIELDS, plan_sweep, run_replica_group, run_trial, trial_status, write_summary
from windtunnel.probes import GEOMETRY_VARIANTS
from windtunnel.runs import RunDir, SweepDir
from windtunnel.replicas import ReplicaTrainer
from windtunnel.train import ExperimentConfig, Trainer, load_experiment

TINY = ["--set", "model.n_layers=1", "--set", "model.d_model=16", "--set", "model.n_heads=2", "--set", "model.d_mlp=32",
        "--set", "train.eval_size=20", "--set", "train.warmup_steps=2", "--set", "task.n_values=5", "--set", "task.n_pairs=4",
        "--set", "train.batch_size=8", "--set", "train.checkpoint_every=5", "--set", "train.eval_every=10",
        "--set", "train.log_every=1"]
NAMES = ["train.lr=1e-3_seed=0", "train.lr=1e-3_seed=1", "train.lr=3e-3_seed=0", "train.lr=3e-3_seed=1"]


def run_cli(args):
    return CliRunner().invoke(main, [str(a) for a in args])


def sweep_args(out, *extra):
    return ["sweep", "bijection", "--out", out, "--steps", 20, "--workers", 2, "--threads", 1, *TINY, *extra]


def one_line_error(result, code):
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("windtunnel sweep: error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--seeds", "0-1", "--grid", "train.lrr=1e-3,3e-3"], "--grid train.lrr is not a field of TrainConfig; did you mean 'lr'?"),
        (["--seeds", "0-1", "--grid", "train.lr=1e-3,-1"], "--grid train.lr=-1: TrainConfig.lr must be a number in (0.0, inf); got -1."),
        (["--seeds", "0-1", "--grid", "train.lr=1e-3,3e-3", "--grid", "train.position_shift=false,true"],
         "--grid train.position_shift=true: ExperimentConfig: train.position_shift needs a task made of steps (the HMM)"),
        (["--seeds", "0-1", "--grid", "model.n_heads=2,3"], "--grid model.n_heads is also given with --set model.n_heads"),
        (["--seeds", "0-1", "--grid", "train.seed=1,2"], "give the seeds with --seeds"),
        (["--seeds", "0-1", "--grid", "model.n_layers=1,2"], "--grid model.n_layers is also given with --set model.n_layers"),
        (["--seeds", "0-1", "--grid", "train.lr=1e-3,1e-3"], "--grid train.lr repeats a value"),
        (["--seeds", "0-1", "--grid", "train.lr"], "must look like section.field=v1,v2"),
        (["--seeds", "1-0"], "the range 1-0 runs backwards"),
        (["--seeds", "zero"], "must be seeds >= 0 and ranges like 0-4"),
        (["--seeds", "0", "--address", "auto"], "--address names a Ray cluster"),
        (["--seeds", "0-1", "--set", "model.dropout=0.1", "--replicas", "2"], "--replicas 2: ReplicaTrainer: model.dropout must be 0"),
        (["--seeds", "0-1", "--backend", "ray", "--replicas", "2"], "--replicas 2 trains replica groups on the local backend only"),
    ],
)
def test_a_bad_grid_is_one_error_before_anything_is_written(tmp_path, extra, expected):
    out = tmp_path / "sweep"
    line = one_line_error(run_cli(sweep_args(out, *extra)), 2)
    assert expected in line
    assert not out.exists()


def test_a_folder_that_is_not_a_sweep_is_left_alone(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    line = one_line_error(run_cli(sweep_args(tmp_path, "--seeds", "0")), 2)
    assert "is not empty and is not a sweep directory" in line
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_a_failing_trial_is_recorded_while_the_others_finish(tmp_path):
    out = tmp_path / "sweep"
    result = run_cli(sweep_args(out, "--seeds", "0", "--grid", "train.lr=1e-3,1e30"))
    line = one_line_error(result, 1)
    assert "1 of 2 trials failed" in line and "summary.csv" in line
    rows = {r["trial"]: r for r in read_csv(out / "summary.csv")}
    assert list(rows) == ["train.lr=1e-3_seed=0", "train.lr=1e30_seed=0"]
    good, bad = rows["train.lr=1e-3_seed=0"], rows["train.lr=1e30_seed=0"]
    assert good["status"] == "finished" and good["step"] == "20" and float(good["entropy_mae_bits"]) > 0 and not good["error"]
    assert bad["status"] == "failed" and bad["error"].startswith("FloatingPointError: the loss is nan at step")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {"finished": 1, "failed": 1, "partial": 0, "pending": 0}
    assert [g["n_finished"] for g in summary["groups"]] == [1, 0]
    # a rerun leaves the failed trial failed (and says so) unless --retry-failed
    again = run_cli(sweep_args(out, "--seeds", "0", "--grid", "train.lr=1e-3,1e30"))
    assert again.exit_code == 1 and "1 finished, 1 failed (rerun with --retry-failed to resume them), 0 to run" in again.output
    retry = run_cli(sweep_args(out, "--seeds", "0", "--grid", "train.lr=1e-3,1e30", "--retry-failed"))
    assert retry.exit_code == 1 and "1 to run" in retry.output and "[1/1] train.lr=1e30_seed=0: FAILED" in retry.output


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    """2 seeds x 2 learning rates, tiny bijection trials, on the local backend (2 workers x 1 thread)."""
    out = tmp_path_factory.mktemp("sweeps") / "lr"
    result = run_cli(sweep_args(out, "--seeds", "0-1", "--grid", "train.lr=1e-3,3e-3"))
    assert result.exit_code == 0, result.output
    return out, result.output


def test_local_sweep_trials_are_ordinary_finished_run_directories(local_sweep):
    out, output = local_sweep
    assert "local backend: 2 worker processes x 1 torch thread" in output
    sweep = SweepDir(out)
    spec = sweep.read_spec()
    assert [t["name"] for t in spec["trials"]] == NAMES
    assert sorted(p.name for p in sweep.runs_dir.iterdir()) == NAMES
    for trial in spec["trials"]:
        run = sweep.run(trial["name"])
        experiment = load_experiment(run)
        assert experiment.train.seed == trial["seed"] and experiment.train.lr == trial["grid"]["train.lr"]
        assert run.load_checkpoint()["step"] == 20 and run.export_path.exists()
    rows = read_csv(out / "summary.csv")
    assert [r["trial"] for r in rows] == NAMES and {r["status"] for r in rows} == {"finished"}
    summary = json.loads((out / "summary.json").read_text())
    assert [g["grid"] for g in summary["groups"]] == [{"train.lr": 0.001}, {"train.lr": 0.003}]
    for group, lr in zip(summary["groups"], ("0.001", "0.003")):
        values = [float(r["kl_bits"]) for r in rows if r["train.lr"] == lr]
        assert group["n_finished"] == 2 and group["seeds"] == [0, 1]
        assert group["metrics"]["kl_bits"] == seed_statistics(values, ddof=1)
        stats = group["metrics"]["entropy_mae_bits"]
        assert stats["n"] == 2 and stats["ci_low"] < stats["mean"] < stats["ci_high"]


def test_a_trial_is_the_run_that_train_makes(local_sweep, tmp_path):
    """The same options through `windtunnel train` give the same metrics, row for row."""
    out, _ = local_sweep
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the sweep's workers
    try:
        result = run_cli(["train", "bijection", "--out", tmp_path / "run", "--steps", 20, "--seed", 1, *TINY, "--set", "train.lr=3e-3"])
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    strip = lambda rows: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]  # noqa: E731
    assert strip(RunDir(tmp_path / "run").metrics()) == strip(SweepDir(out).run("train.lr=3e-3_seed=1").metrics())
    # eval writes eval.json into the run, whose geometry columns would enter the shared sweep's
    # summary on a rerun: evaluate a copy
    trial = shutil.copytree(SweepDir(out).run("train.lr=3e-3_seed=1").path, tmp_path / "trial_copy")
    assert run_cli(["eval", trial, "--n", 20]).exit_code == 0


def test_replicas_refuse_a_model_that_vmap_cannot_batch_naming_it(tmp_path):
    out = tmp_path / "sweep"
    line = one_line_error(run_cli(["sweep", "bijection", "--out", out, "--model", "lstm", "--seeds", "0-1", "--steps", 5,
                                   "--set", "model.d_model=16", "--replicas", 2]), 2)
    assert "--replicas 2: ReplicaTrainer: model 'lstm' does not train as a replica group (torch.vmap); use one of transformer, mlp" in line
    assert not out.exists()


# the replica tests' trials: a vocabulary of 16 (n_values 8), where a replica group's trajectories
# are its separate runs' bit for bit (at n_values 5, TINY's, the tied readout's gradient rounds
# otherwise: tests/test_replicas.py)
REPLICA_TINY = [a if a not in ("task.n_values=5", "task.n_pairs=4") else {"task.n_values=5": "task.n_values=8", "task.n_pairs=4": "task.n_pairs=7"}[a]
                for a in TINY]
REPLICA_LOSS_TERMS = 8 * 7  # batch x sites: the mean the cross entropy takes


def _assert_same_summary(ours, theirs, names):
    """The summaries of two runs of the same sweep agree: every column bitwise but the wall
    times and the training loss, which replica groups log to the summation-order bound of
    tests/test_replicas.py (their weights and evaluations are bitwise)."""
    from test_replicas import reorder_bound

    rows, expected = read_csv(ours / "summary.csv"), read_csv(theirs / "summary.csv")
    assert [r["trial"] for r in rows] == [r["trial"] for r in expected] == names
    for row, want in zip(rows, expected):
        assert row["status"] == "finished"
        assert abs(float(row["train_loss_nats"]) - float(want["train_loss_nats"])) <= reorder_bound(REPLICA_LOSS_TERMS, float(want["train_loss_nats"]))
        strip = lambda r: {k: v for k, v in r.items() if k not in ("wall_s", "train_loss_nats")}  # noqa: E731
        assert strip(row) == strip(want)


@pytest.mark.slow
def test_a_sweep_with_replicas_is_the_sweep_without(tmp_path):
    """--replicas 2 trains each learning rate's two seeds as one group; the summary is the one
    of the same sweep without it. A rerun skips the finished trials; a trial removed is trained
    again, alone (its group's other seed is finished), as the separate trial was."""
    args = ["sweep", "bijection", "--steps", 10, "--workers", 2, "--threads", 1, *REPLICA_TINY, "--seeds", "0-1",
            "--grid", "train.lr=1e-3,3e-3"]
    theirs, ours = tmp_path / "separate", tmp_path / "replicas"
    result = run_cli([*args, "--out", theirs])
    assert result.exit_code == 0, result.output
    result = run_cli([*args, "--out", ours, "--replicas", 2])
    assert result.exit_code == 0, result.output
    assert "4 trials in 2 replica groups of up to 2" in result.output
    _assert_same_summary(ours, theirs, NAMES)
    again = run_cli([*args, "--out", ours, "--replicas", 2])
    assert again.exit_code == 0 and "4 finished, 0 failed, 0 to run" in again.output
    shutil.rmtree(SweepDir(ours).run(NAMES[1]).path)
    again = run_cli([*args, "--out", ours, "--replicas", 2])
    assert again.exit_code == 0 and "3 finished, 0 failed, 1 to run" in again.output
    assert "1 trial in 1 replica group of up to 2" in again.output
    _assert_same_summary(ours, theirs, NAMES)


@pytest.fixture
def replica_trials(tmp_path):
    """Two seeds of one grid point (REPLICA_TINY, 10 steps, lr 3e-3), as plan_sweep makes them,
    each also trained alone by run_trial (in this process, on one thread, as a sweep worker)."""
    spec = plan_sweep("bijection", None, None, (0, 1), [("train.lr", ["3e-3"])],
                      [a for a in REPLICA_TINY[1::2]], steps=10)
    trials = spec["trials"]
    with _worker_state_restored():
        for trial in trials:
            assert run_trial(trial, tmp_path / "alone" / trial["name"], threads=1)["status"] == "finished"
        yield trials, [tmp_path / "alone" / t["name"] for t in trials], [tmp_path / "group" / t["name"] for t in trials]


@contextlib.contextmanager
def _worker_state_restored():
    """Restore the torch thread count and CUDA_VISIBLE_DEVICES, which run_trial and
    run_replica_group set for their worker process, when they ran in this one."""
    threads, visible = torch.get_num_threads(), os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if visible is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible


def _assert_same_trial(ours, theirs):
    ours, theirs = RunDir(ours), RunDir(theirs)
    mine, want = ours.load_checkpoint(), theirs.load_checkpoint()
    assert mine["step"] == want["step"] == 10
    assert all(torch.equal(mine["model"][k], v) for k, v in want["model"].items())
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("elapsed_s", "loss_nats")} for r in rows]  # noqa: E731
    assert strip(ours.metrics()) == strip(theirs.metrics())


def test_a_replica_group_trains_its_trials_as_run_trial_does(replica_trials):
    trials, alone, group = replica_trials
    results = run_replica_group(trials, group, threads=1)
    assert [(r["name"], r["status"], r["from_step"], r["to_step"]) for r in results] == [(t["name"], "finished", 0, 10) for t in trials]
    for ours, theirs in zip(group, alone):
        _assert_same_trial(ours, theirs)
    again = run_replica_group(trials, group, threads=1)
    assert [(r["status"], r["skipped"]) for r in again] == [("finished", True)] * 2


def test_a_replica_group_resumes_from_its_common_checkpoint(replica_trials):
    """Two trials stopped together at step 5 (the group's checkpoint) continue as one group to
    step 10: the same run directories as the trials trained alone."""
    trials, alone, group = replica_trials
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the sweep's workers
    try:
        ReplicaTrainer([ExperimentConfig.from_dict(t["experiment"]) for t in trials], group).fit(stop_at=5)
    finally:
        torch.set_num_threads(threads)
    results = run_replica_group(trials, group, threads=1)
    assert [(r["status"], r["from_step"], r["to_step"]) for r in results] == [("finished", 5, 10)] * 2
    for ours, theirs in zip(group, alone):
        _assert_same_trial(ours, theirs)


def test_a_failing_replica_group_falls_back_to_its_trials_alone(tmp_path):
    """A non-finite loss stops the group; each trial is then run alone: the failing one fails
    with a separate run's error."""
    spec = plan_sweep("bijection", None, None, (0, 1), [("train.lr", ["1e30"])], [a for a in REPLICA_TINY[1::2]], steps=10)
    with _worker_state_restored():
        results = run_replica_group(spec["trials"], [tmp_path / t["name"] for t in spec["trials"]], threads=1)
    assert [r["status"] for r in results] == ["failed", "failed"]
    assert all(r["error"].startswith("FloatingPointError: the loss is nan at step") for r in results)


def test_a_rerun_skips_the_finished_trials(local_sweep):
    out, _ = local_sweep
    before = (out / "summary.csv").read_text()
    events = SweepDir(out).events()
    result = run_cli(sweep_args(out, "--seeds", "0-1", "--grid", "train.lr=1e-3,3e-3"))
    assert result.exit_code == 0, result.output
    assert "4 trials; 4 finished, 0 failed, 0 to run" in result.output
    assert SweepDir(out).events() == events
    assert (out / "summary.csv").read_text() == before


def test_a_sweep_saved_before_a_defaulted_config_field_existed_is_continued(local_sweep, tmp_path):
    """A sweep.json whose trials lack a field the config has since gained (with its default, as
    train.compile) is the same sweep: the rerun skips its finished trials instead of refusing it."""
    out = tmp_path / "lr"
    shutil.copytree(local_sweep[0], out)
    spec = json.loads((out / "sweep.json").read_text())
    for trial in spec["trials"]:
        assert trial["experiment"]["train"].pop("compile") is False
    (out / "sweep.json").write_text(json.dumps(spec))
    result = run_cli(sweep_args(out, "--seeds", "0-1", "--grid", "train.lr=1e-3,3e-3"))
    assert result.exit_code == 0, result.output
    assert "4 trials; 4 finished, 0 failed, 0 to run" in result.output
    # a real difference in a trial's config is still another sweep
    spec["trials"][0]["experiment"]["train"]["weight_decay"] = 0.5
    (out / "sweep.json").write_text(json.dumps(spec))
    line = one_line_error(run_cli(sweep_args(out, "--seeds", "0-1", "--grid", "train.lr=1e-3,3e-3")), 2)
    assert "holds another sweep (it differs in trials)" in line


def test_another_sweep_in_the_same_directory_is_refused(local_sweep):
    out, _ = local_sweep
    line = one_line_error(run_cli(sweep_args(out, "--seeds", "0-2", "--grid", "train.lr=1e-3,3e-3")), 2)
    assert "holds another sweep (it differs in seeds, trials)" in line


def test_runs_load_gives_a_tidy_frame(local_sweep):
    out, _ = local_sweep
    frame = runs.load(out)
    assert list(frame.columns) == ["run", "seed", "train.lr", "step", "split", "metric", "value"]
    assert list(frame["run"].unique()) == NAMES
    one = frame[(frame["run"] == "train.lr=3e-3_seed=1") & (frame["split"] == "eval") & (frame["metric"] == "kl_bits")]
    logged = [r for r in SweepDir(out).run("train.lr=3e-3_seed=1").metrics() if r["split"] == "eval"]
    assert one["step"].tolist() == [10, 20] and one["value"].tolist() == [r["kl_bits"] for r in logged]
    assert set(one["seed"]) == {1} and set(one["train.lr"]) == {0.003}
    train = frame[(frame["split"] == "train") & (frame["metric"] == "loss_nats")]
    assert train.groupby("run")["step"].apply(list).tolist() == [list(range(1, 21))] * 4
    single = runs.load(SweepDir(out).run(NAMES[0]).path)
    assert list(single.columns) == ["run", "seed", "step", "split", "metric", "value"] and set(single["run"]) == {NAMES[0]}
    with pytest.raises(ValueError, match="neither a run directory"):
        runs.load(out / "runs")


def test_compare_prints_and_draws(local_sweep, tmp_path):
    out, _ = local_sweep
    figure = tmp_path / "kl.png"
    result = run_cli(["compare", out, out, "--metric", "kl_bits", "--out", figure])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    stats = summary["groups"][0]["metrics"]["kl_bits"]
    assert f"| {out} | train.lr=0.001 | 2 | {stats['mean']:.5g} | {stats['std']:.5g} |" in result.output
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    line = one_line_error_compare(run_cli(["compare", out, "--metric", "kl_bit"]))
    assert "no sweep has the metric 'kl_bit'; did you mean 'kl_bits'?" in line


def test_the_summary_carries_each_trials_geometry_from_its_eval_json(local_sweep, tmp_path):
    """After `windtunnel eval`, the summary has one column per geometry variant: the values of
    eval.json row by row, their statistics over seeds, and no value from an eval.json of an
    earlier step or from a trial without one."""
    out = tmp_path / "lr"
    shutil.copytree(local_sweep[0], out)
    sweep = SweepDir(out)
    first, second, stale, bare = (sweep.run(name) for name in NAMES)
    assert run_cli(["eval", first.path, "--n", 20]).exit_code == 0
    measured = json.loads(first.eval_path().read_text())
    quantities = measured["geometry_variants"]["quantities"]
    columns = [f"geometry.{q}.{v}" for q, variants in GEOMETRY_VARIANTS.items() for v in variants]
    assert [f"geometry.{q}.{v}" for q, variants in quantities.items() for v in variants] == columns
    # each value-manifold variant's position-control numbers follow its value column
    fields = {c: [f for f in GEOMETRY_FIELDS if f in quantities[c.split(".")[1]][c.split(".")[2]]] for c in columns}
    assert all(fields[c] == list(GEOMETRY_FIELDS) for c in columns if ".value_manifold_pc1_share." in c)
    assert not any(fields[c] for c in columns if ".value_manifold_pc1_share." not in c)
    all_columns = [name for c in columns for name in (c, *(f"{c}.{f}" for f in fields[c]))]
    # the other seed of the same grid point: a constructed eval.json with known values, one unavailable
    known = json.loads(json.dumps(measured))
    for i, (q, v) in enumerate((q, v) for q, variants in known["geometry_variants"]["quantities"].items() for v in variants):
        known["geometry_variants"]["quantities"][q][v]["value"] = 0.125 * (i + 1)
    known["geometry_variants"]["quantities"]["focusing_ratio"]["final_position"].update(value=None, unavailable="constructed")
    second.eval_path().write_text(json.dumps(known))
    old = json.loads(json.dumps(measured))
    old["step"] = 10  # an evaluation of the step-10 checkpoint: not the trial's final model
    stale.eval_path().write_text(json.dumps(old))

    summary = write_summary(sweep)
    rows = read_csv(out / "summary.csv")
    assert [r["trial"] for r in rows] == NAMES
    assert [c for c in rows[0] if c.startswith("geometry.")] == all_columns and list(rows[0])[-1] == "error"
    for column in all_columns:
        if column in columns:
            continue
        q, v, f = column.split(".")[1:]
        ours = quantities[q][v][f]  # a bijection's entropy is a function of position: partial undefined
        assert (float(rows[0][column]) if rows[0][column] else None) == ours
        assert (ours is None) == (f == "partial_pearson_given_position")
        assert rows[2][column] == "" and rows[3][column] == ""
    for i, column in enumerate(columns):
        q, v = column.split(".")[1:]
        ours = quantities[q][v]["value"]
        assert float(rows[0][column]) == ours
        expected_second = None if column == "geometry.focusing_ratio.final_position" else 0.125 * (i + 1)
        assert (float(rows[1][column]) if rows[1][column] else None) == expected_second
        assert rows[2][column] == "" and rows[3][column] == ""
        stats = summary["groups"][0]["metrics"][column]
        assert stats == seed_statistics([ours] if expected_second is None else [ours, expected_second], ddof=1)
        assert column not in summary["groups"][1]["metrics"]
    assert set(columns) <= set(summary["metrics"])
    # windtunnel compare reads the new columns like any metric
    result = run_cli(["compare", out, "--metric", "geometry.key_orthogonality.hypothesis_abs"])
    assert result.exit_code == 0, result.output
    stats = summary["groups"][0]["metrics"]["geometry.key_orthogonality.hypothesis_abs"]
    assert f"| {out} | train.lr=0.001 | 2 | {stats['mean']:.5g} |" in result.output


def one_line_error_compare(result):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("windtunnel compare: error: ")
    return lines[0]


def _wait_unlocked(path, timeout_s=30.0):
    """Wait until no process holds the run's lock (the killed driver's workers are gone)."""
    deadline = time.monotonic() + timeout_s
    fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                assert time.monotonic() < deadline, f"{path} is still locked {timeout_s} s after the driver died"
                time.sleep(0.1)
    finally:
        os.close(fd)


def test_sigkill_of_the_driver_then_a_rerun_completes_the_sweep(tmp_path):
    out = tmp_path / "sweep"
    steps = 120
    args = [sys.executable, "-m", "windtunnel", *map(str, sweep_args(out, "--seeds", "0-1", "--grid", "train.lr=1e-3,3e-3")), "--steps", str(steps),
            "--set", "train.eval_every=100", "--set", "train.checkpoint_every=10"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2] / "src"), os.environ.get("PYTHONPATH")]))}
    driver = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    sweep = SweepDir(out)

    def mid_way():
        """A trial has finished and an unfinished one has its second checkpoint (so latest.pt, written
        after each step_N.pt, is past step 0) but is not past half its steps: it cannot finish in
        the moments before the kill lands, however loaded the machine (a trial seen at step 110 of
        120 could, and then no trial would resume past step 0)."""
        finished = {e["trial"] for e in sweep.events() if e.get("event") == "finished"}
        partial = [n for n in NAMES if n not in finished
                   and 20 <= max((s for s, _ in sweep.run(n).checkpoints()), default=0) <= steps // 2]
        return bool(finished) and bool(partial)

    deadline = time.monotonic() + 300
    try:
        while not mid_way():
            assert driver.poll() is None, driver.stdout.read().decode()
            assert time.monotonic() < deadline, "the sweep did not get mid-way in 300 s"
            time.sleep(0.05)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
    finally:
        if driver.poll() is None:
            driver.kill()
        driver.stdout.close()
    # finished on disk (the driver may have died between a trial's end and logging it)
    finished_before = {t["name"] for t in sweep.read_spec()["trials"] if trial_status(sweep, t)["status"] == "finished"}
    assert 0 < len(finished_before) < 4
    for name in NAMES:
        if sweep.run(name).path.exists():
            _wait_unlocked(sweep.run(name).path)

    rerun = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"4 trials; {len(finished_before)} finished, 0 failed, {4 - len(finished_before)} to run" in rerun.stdout
    events = sweep.events()
    resumed = []
    for name in NAMES:
        submitted = [e for e in events if e["trial"] == name and e["event"] == "submitted"]
        finished = [e for e in events if e["trial"] == name and e["event"] == "finished"]
        assert len(finished) == 1 and finished[0]["to_step"] == steps  # no trial finished twice
        if name in finished_before:  # never submitted again
            assert [e["from_step"] for e in submitted] == [0] and finished[0]["from_step"] == 0
        else:  # submitted again from its checkpoint, and it continued from there
            assert len(submitted) == 2 and submitted[0]["from_step"] == 0
            assert finished[0]["from_step"] == submitted[1]["from_step"]
            if submitted[1]["from_step"] > 0:
                resumed.append(name)
        # every step logged exactly once, in order
        logged = [r["step"] for r in sweep.run(name).metrics() if r["split"] == "train"]
        assert logged == list(range(1, steps + 1)), name
    assert resumed, "no trial resumed from a checkpoint past step 0"
    rows = read_csv(out / "summary.csv")
    assert [r["trial"] for r in rows] == NAMES and {r["status"] for r in rows} == {"finished"}
    # a resumed trial ends exactly where an uninterrupted run of it ends
    name = resumed[0]
    experiment = load_experiment(sweep.run(name))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = Trainer(experiment).fit().calibration.scalars()
    finally:
        torch.set_num_threads(threads)
    final = [r for r in sweep.run(name).metrics() if r["split"] == "eval" and r["step"] == steps]
    assert len(final) == 1 and {k: final[0][k] for k in reference} == reference


def test_the_ray_backend_without_ray_is_one_error_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed: `import ray` raises ImportError
    out = tmp_path / "sweep"
    line = one_line_error(run_cli(sweep_args(out, "--seeds", "0", "--backend", "ray")), 1)
    assert line == "windtunnel sweep: error: the ray backend needs Ray Tune: pip install 'windtunnel[ray]'"
    assert not out.exists()


def test_sweep_passes_tensorboard_to_its_trials(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    result = run_cli(["sweep", "bijection", "--out", tmp_path / "s", "--steps", 10, "--workers", 1, "--threads", 1,
                      "--seeds", "0", *TINY, "--tensorboard"])
    assert result.exit_code == 0, result.output
    run = RunDir(tmp_path / "s" / "runs" / "seed=0")
    events = EventAccumulator(str(run.tensorboard_dir), size_guidance={SCALARS: 0})
    events.Reload()
    losses = [(r["step"], r["loss_nats"]) for r in run.metrics() if r["split"] == "train"]
    assert [(e.step, e.value) for e in events.Scalars("train/loss_nats")] == [
        (s, float(torch.tensor(v, dtype=torch.float32))) for s, v in losses]


def test_sweep_tensorboard_without_the_package_is_one_error_naming_the_extra(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tensorboard", None)
    result = run_cli([*sweep_args(tmp_path / "s", "--seeds", "0"), "--tensorboard"])
    one_line_error(result, 1)
    assert "pip install 'windtunnel[tensorboard]'" in result.stderr
    assert not (tmp_path / "s").exists()
