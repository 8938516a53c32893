"""``windtunnel sweep --backend ray`` on a real local Ray instance (2 CPUs, started once for the
module): the same trials as the local backend, bit-identical final metrics per trial on CPU, and
the evaluation metrics reported to Ray Tune as each trial trains (issue 16). Needs the ``ray``
extra (``pip install 'windtunnel[ray]'``), which the README's test command installs."""

import csv
import json

import pytest
from click.testing import CliRunner

from windtunnel.cli import main
from windtunnel.runs import SweepDir

ray = pytest.importorskip("ray", reason="the ray backend needs pip install 'windtunnel[ray]'")

TINY = ["--set", "model.n_layers=1", "--set", "model.d_model=16", "--set", "model.n_heads=2", "--set", "model.d_mlp=32",
        "--set", "train.eval_size=20", "--set", "train.warmup_steps=2", "--set", "task.n_values=5", "--set", "task.n_pairs=4",
        "--set", "train.batch_size=8", "--set", "train.checkpoint_every=5", "--set", "train.eval_every=10"]
GRID = ["--seeds", "0-1", "--grid", "train.lr=1e-3,3e-3", "--steps", "20", "--threads", "1"]


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def run_cli(args):
    return CliRunner().invoke(main, [str(a) for a in args])


def final_rows(out):
    with open(out / "summary.csv", newline="") as handle:
        return {r["trial"]: {k: v for k, v in r.items() if k != "wall_s"} for r in csv.DictReader(handle)}


def test_ray_and_local_backends_give_bit_identical_trials(ray_cluster, tmp_path):
    local, remote = tmp_path / "local", tmp_path / "ray"
    result = run_cli(["sweep", "bijection", "--out", local, "--workers", 2, *GRID, *TINY])
    assert result.exit_code == 0, result.output
    result = run_cli(["sweep", "bijection", "--out", remote, "--backend", "ray", *GRID, *TINY])
    assert result.exit_code == 0, result.output
    assert "ray backend (Ray Tune" in result.output and "the cluster has 2 CPUs" in result.output
    rows = final_rows(remote)
    assert len(rows) == 4 and {r["status"] for r in rows.values()} == {"finished"}
    assert rows == final_rows(local)  # every final metric, digit for digit
    for name in rows:  # and every logged evaluation
        evals = [[r for r in SweepDir(d).run(name).metrics() if r["split"] != "train"] for d in (local, remote)]
        strip = lambda rs: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rs]  # noqa: E731
        assert len(evals[0]) == 2 and strip(evals[0]) == strip(evals[1])
    # each trial reported its evaluations to Ray Tune as it trained (Tune's result.json per trial)
    reported = {}
    for path in (remote / "ray").glob("tune-*/*/result.json"):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        steps = [r["step"] for r in lines if "eval/kl_bits" in r]
        result = json.loads(lines[-1]["windtunnel_result"])
        reported[result["name"]] = steps
    assert reported == {name: [10, 20] for name in rows}
    # a rerun on Ray finds every trial finished and trains nothing
    again = run_cli(["sweep", "bijection", "--out", remote, "--backend", "ray", *GRID, *TINY])
    assert again.exit_code == 0 and "4 finished, 0 failed, 0 to run" in again.output
