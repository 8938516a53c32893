"""The command line against hostile and careless input: planted and damaged checkpoints, runs that
must not be lost, concurrent writers, divergence, and a fuzz over options and --set values.

Every refusal is one line on stderr (``windtunnel CMD: error: ...``), no traceback, exit status 2
for bad input and 1 for a stopped run, and leaves nothing behind."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from windtunnel.cli import main
from windtunnel.runs import RunDir

TINY = ["--set", "model.n_layers=1", "--set", "model.d_model=16", "--set", "model.n_heads=2", "--set", "model.d_mlp=32",
        "--set", "train.eval_size=10", "--set", "train.warmup_steps=1", "--set", "task.n_values=5", "--set", "task.n_pairs=4",
        "--set", "train.batch_size=4", "--set", "train.checkpoint_every=2"]
TINY_HMM = ["--set", "model.n_layers=1", "--set", "model.d_model=16", "--set", "model.n_heads=2", "--set", "model.d_mlp=32",
            "--set", "train.eval_size=10", "--set", "train.warmup_steps=1", "--set", "task.n_steps=3", "--set", "eval_lengths=",
            "--set", "train.batch_size=4", "--set", "train.checkpoint_every=2"]


def run_cli(args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def one_line_error(result, code):
    """The result failed with ``code`` and printed exactly one line, with no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    # stderr also carries the progress bar (tqdm) of a run that started; the message is the rest
    lines = [line for line in result.stderr.splitlines() if line.strip() and "step/s" not in line and "%|" not in line]
    assert len(lines) == 1 and lines[0].startswith("windtunnel ") and ": error: " in lines[0], result.output
    assert "Traceback" not in result.output, result.output
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny bijection run and a finished tiny HMM run with telemetry snapshots."""
    root = tmp_path_factory.mktemp("runs")
    bij = run_cli(["train", "bijection", "--out", root / "bij", "--steps", 4, *TINY])
    assert bij.exit_code == 0, bij.output
    hmm = run_cli(["train", "hmm", "--out", root / "hmm", "--steps", 4, "--telemetry", *TINY_HMM])
    assert hmm.exit_code == 0, hmm.output
    return root


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


READERS = [
    ("train --resume", lambda run: ["train", "hmm", "--out", run, "--resume"]),
    ("train --init-from", lambda run: ["train", "hmm", "--out", run.parent / "tuned", "--init-from", run, "--steps", 2, *TINY_HMM]),
    ("eval", lambda run: ["eval", run, "--n", 4]),
    ("ablate", lambda run: ["ablate", run, "--n", 4]),
    ("memory", lambda run: ["memory", run, "--n", 4]),
    ("dissociation", lambda run: ["dissociation", run, "--n", 4]),
]


@pytest.mark.parametrize("name,command", READERS, ids=[r[0] for r in READERS])
def test_every_command_that_reads_checkpoints_refuses_a_planted_one(trained, tmp_path, name, command):
    run = _copy(trained / "hmm", tmp_path / "run")
    marker = tmp_path / "marker"
    planted = {"step": 4, "model": {}, "payload": _Payload(marker)}
    for path in [run / "checkpoints" / "latest.pt", *run.glob("checkpoints/step_*.pt"), *run.glob("snapshots/step_*.pt")]:
        torch.save(planted, path)
    line = one_line_error(run_cli(command(run)), 2)
    assert "refused: the file holds objects other than tensors and plain data, and unpickling it could run code" in line
    assert "checkpoints" in line or "snapshots" in line
    assert not marker.exists()
    assert not (tmp_path / "tuned").exists()


def _damage(path, how):
    data = path.read_bytes()
    if how == "flipped":  # one bit of the largest weight tensor's stored bytes: torch still reads the file
        weights = max(RunDir(path.parent.parent).load_checkpoint(path)["model"].values(), key=lambda t: t.numel())
        at = data.index(weights.contiguous().numpy().tobytes()) + weights.numel() * weights.element_size() // 2
        damaged = bytearray(data)
        damaged[at] ^= 0x10
        path.write_bytes(bytes(damaged))
    elif how == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(data[: len(data) // 3])


@pytest.mark.parametrize("how,message", [("flipped", "damaged: the content hash does not match"),
                                         ("empty", r"empty file \(0 bytes\)"),
                                         ("truncated", "not a readable checkpoint")])
def test_a_damaged_checkpoint_is_refused_with_its_name(trained, tmp_path, how, message):
    import re

    run = _copy(trained / "bij", tmp_path / "run")
    _damage(run / "checkpoints" / "latest.pt", how)
    for command in (["eval", run, "--n", 4], ["train", "bijection", "--out", run, "--resume"]):
        line = one_line_error(run_cli(command), 2)
        assert re.search(rf"{re.escape(str(run / 'checkpoints' / 'latest.pt'))}: {message}", line), line


def test_an_invalid_config_json_is_refused_with_its_name(trained, tmp_path):
    run = _copy(trained / "bij", tmp_path / "run")
    for text, message in (("{oops", "not valid JSON"), ('{"task_name": "bijection", "train": {"steps": "many"}}', "not a valid windtunnel config")):
        (run / "config.json").write_text(text)
        # The report reads config.json as data (it never builds the model), so only unreadable JSON stops it.
        readers = (["eval", run, "--n", 4], ["train", "bijection", "--out", run, "--resume"], *([["report", run]] if text == "{oops" else []))
        for command in readers:
            line = one_line_error(run_cli(command), 2)
            assert f"{run / 'config.json'}: {message}" in line, line
        assert not (run / "report.html").exists()


def test_a_finished_run_is_never_silently_restarted(trained, tmp_path):
    run = _copy(trained / "bij", tmp_path / "run")
    metrics = (run / "metrics.jsonl").read_bytes()
    line = one_line_error(run_cli(["train", "bijection", "--out", run, "--steps", 4, *TINY]), 2)
    assert "already holds a run (step 4 of 4); continue it with --resume, or replace it with --overwrite" in line
    line = one_line_error(run_cli(["train", "bijection", "--out", run, "--resume", "--set", "train.batch_size=8"]), 2)
    assert "refused: --set train.batch_size" in line
    line = one_line_error(run_cli(["train", "bijection", "--out", run, "--resume", "--set", "train.nonsense=1"]), 2)
    assert "--train.nonsense is not a field of TrainConfig" in line
    for option, value, text in (("--seed", 3, "--seed 3"), ("--model", "lstm", "--model lstm"), ("--preset", "paper", "--preset paper")):
        line = one_line_error(run_cli(["train", "bijection", "--out", run, "--resume", option, value]), 2)
        assert f"refused: {text}" in line
    line = one_line_error(run_cli(["train", "hmm", "--out", run, "--resume"]), 2)
    assert "refused: TASK hmm (the run is bijection)" in line
    assert (run / "metrics.jsonl").read_bytes() == metrics
    extended = run_cli(["train", "bijection", "--out", run, "--resume", "--steps", 6, "--seed", 0])  # an equal seed passes
    assert extended.exit_code == 0, extended.output
    state = RunDir(run).load_checkpoint()
    assert state["step"] == 6 and json.loads((run / "config.json").read_text())["train"]["steps"] == 6
    steps = [r["step"] for r in RunDir(run).metrics() if r["split"] == "train"]
    assert len(steps) == len(set(steps))
    replaced = run_cli(["train", "bijection", "--out", run, "--steps", 2, "--overwrite", *TINY])
    assert replaced.exit_code == 0 and RunDir(run).load_checkpoint()["step"] == 2
    assert not (run / "resumes.jsonl").exists()


def test_a_second_writer_is_refused_while_the_first_trains(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    first = subprocess.Popen([sys.executable, "-m", "windtunnel", "train", "bijection", "--out", str(out), "--steps", "400", *TINY],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 120
        while not (out / "checkpoints" / "latest.pt").exists():
            assert first.poll() is None and time.time() < deadline, first.communicate()[0]
            time.sleep(0.05)
        second = subprocess.run([sys.executable, "-m", "windtunnel", "train", "bijection", "--out", str(out), "--resume"],
                                capture_output=True, text=True, env=env)
        assert first.poll() is None, "the first writer finished too early for this test"
        assert second.returncode == 1, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"is being written by another process (pid {first.pid})" in lines[0]
    finally:
        output = first.communicate(timeout=300)[0]
    assert first.returncode == 0, output
    steps = [r["step"] for r in RunDir(out).metrics() if r["split"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 400


def test_a_diverging_run_stops_in_one_line_and_resumes_with_a_sane_lr(tmp_path):
    out = tmp_path / "run"
    result = run_cli(["train", "bijection", "--out", out, "--steps", 30, *TINY, "--set", "train.lr=1e6"])
    line = one_line_error(result, 1)
    assert "(step 0, finite)" in line or "finite)" in line
    assert line.endswith(f"windtunnel train bijection --out {out} --resume --set train.lr=100000")
    kept = RunDir(out).load_checkpoint()
    assert all(torch.isfinite(v).all() for v in kept["model"].values())
    resumed = run_cli(["train", "bijection", "--out", out, "--resume", "--set", "train.lr=3e-3"])
    assert resumed.exit_code == 0, resumed.output
    assert RunDir(out).load_checkpoint()["step"] == 30


def test_paths_that_cannot_be_written_are_refused_before_anything_is_written(tmp_path):
    (tmp_path / "a_file").write_text("x")
    line = one_line_error(run_cli(["train", "bijection", "--out", tmp_path / "a_file" / "sub", *TINY]), 2)
    assert "lies under" in line and "which is a file" in line
    line = one_line_error(run_cli(["train", "bijection", "--out", tmp_path / "a_file", *TINY]), 2)
    assert "a_file' is a file" in line
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        line = one_line_error(run_cli(["train", "bijection", "--out", locked / "run", *TINY]), 2)
        assert "permission denied" in line
    assert sorted(p.name for p in tmp_path.iterdir()) in (["a_file"], ["a_file", "locked"])


def test_reproduce_refuses_a_run_of_another_seed(tmp_path):
    from windtunnel.experiments.wind_tunnels import _train_or_resume

    out = tmp_path / "mlp"
    made = run_cli(["train", "bijection", "--model", "mlp", "--out", out, "--steps", 2, "--set", "train.eval_size=10"])
    assert made.exit_code == 0, made.output
    config = json.loads((out / "config.json").read_text())
    with pytest.raises(ValueError, match=r"holds a run of another config \(.*train\.seed: 0 there, 3 here"):
        _train_or_resume("bijection/mlp/cpu", out, seed=3, progress=False)
    assert json.loads((out / "config.json").read_text()) == config


# --- fuzz --------------------------------------------------------------------------------------

_KEYS = ["train.lr", "train.steps", "train.batch_size", "train.device", "train.eval_size", "train.grad_clip", "train.betas",
         "train.schedule", "train.warmup_steps", "train.keep_checkpoints", "train.divergence_factor", "model.n_layers",
         "model.n_heads", "model.d_model", "task.n_values", "task.n_pairs", "eval_lengths", "train_lengths", "name",
         "train.nope", "model", "bogus", "task.n_steps"]
_VALUES = st.one_of(
    st.integers(-3, 9).map(str), st.sampled_from(["0.5", "1e-3", "1e300", "-1", "nan", "inf", "null", "true", "[]", "[1, 2]",
                                                   "[50]", "[0]", "{}", "[", "abc", "cuda", "cpu", "\"x\"", "[0.9, 0.99]",
                                                   "100000000", "3.5"]))


def _pairs(args, keep):
    """The ``--set`` pairs of ``args`` whose value passes ``keep``."""
    out = []
    for flag, value in zip(args[::2], args[1::2]):
        if keep(value):
            out += [flag, value]
    return out


@settings(max_examples=int(os.environ.get("WINDTUNNEL_FUZZ_EXAMPLES", "80")), deadline=None)
@given(
    task_model=st.sampled_from([("bijection", "transformer")] * 3 + [("hmm", "transformer")] * 2
                               + [("bijection", "mlp"), ("bijection", "lstm"), ("hmm", "lstm"), ("recall", "transformer"), ("recall", "lstm")]),
    sets=st.lists(st.tuples(st.sampled_from(_KEYS), _VALUES), max_size=3),
    steps=st.sampled_from(["2", "1", "3", "1", "2", "1", "0", "x"]),
    extra=st.lists(st.sampled_from(["--resume", "--overwrite", "--telemetry", "--seed=1", "--seed=-1", "--preset=paper",
                                    "--init-from=nowhere", "--bogus"]), max_size=2, unique=True).filter(lambda e: len(e) < 2 or "--bogus" not in e),
    out_kind=st.sampled_from(["fresh"] * 6 + ["under_file", "file"]),
)
def test_fuzz_every_outcome_is_success_or_one_line_and_a_refusal_leaves_nothing(tmp_path_factory, task_model, sets, steps, extra, out_kind):
    task, model = task_model
    root = tmp_path_factory.mktemp("fuzz")
    (root / "a_file").write_text("x")
    out = {"fresh": root / "run", "under_file": root / "a_file" / "run", "file": root / "a_file"}[out_kind]
    small = {"bijection": TINY, "hmm": TINY_HMM, "recall": ["--set", "train.eval_size=4", "--set", "train.batch_size=2", "--set", "task.n_pairs=2"]}[task]
    if model != "transformer":
        small = _pairs(small, lambda v: not v.startswith(("model.n_heads", "model.n_layers", "model.d_mlp")))
    if "--preset=paper" in extra:  # the paper's models are too big for a fuzz example; keep ours small
        small = [*small, *(["--set", "model.n_layers=1", "--set", "model.d_model=16"] if model != "mlp" else [])]
    args = ["train", task, "--model", model, "--out", out, "--steps", steps, *small, *extra]
    for key, value in sets:
        args += ["--set", f"{key}={value}"]
    result = run_cli(args)
    if result.exit_code == 0:
        return
    one_line_error(result, result.exit_code)
    if result.exit_code == 2:  # refused: nothing written
        assert sorted(p.name for p in root.iterdir()) == ["a_file"], result.output


def test_upgrade_gives_a_trusted_old_run_its_hashes_and_refuses_code(trained, tmp_path):
    run = _copy(trained / "bij", tmp_path / "run")
    files = [run / "checkpoints" / "latest.pt", *run.glob("checkpoints/step_*.pt")]
    for path in files:  # as windtunnel 0.1 wrote them: the bare state
        torch.save(RunDir(run).load_checkpoint(path), path)
    line = one_line_error(run_cli(["eval", run, "--n", 4]), 2)
    assert "not a windtunnel checkpoint with a content hash" in line and "before 0.2" in line
    result = run_cli(["upgrade", run])
    assert result.exit_code == 0 and f"upgraded {len(files)} of {len(files)}" in result.output, result.output
    assert run_cli(["eval", run, "--n", 4]).exit_code == 0
    assert f"upgraded 0 of {len(files)}" in run_cli(["upgrade", run]).output
    marker = tmp_path / "marker"
    torch.save({"step": 4, "payload": _Payload(marker)}, run / "checkpoints" / "latest.pt")
    line = one_line_error(run_cli(["upgrade", run]), 2)
    assert "latest.pt: refused" in line and not marker.exists()
