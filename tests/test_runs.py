"""Run directories: atomic writes, torn JSONL lines, checkpoints."""

import json
import os
import stat

import pytest
import torch

from windtunnel import runs


def test_atomic_write_replaces_whole_files_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "results.json"
    runs.write_json_atomic(path, {"a": 1})
    runs.write_json_atomic(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "results.json"
    runs.write_json_atomic(path, {"ok": True})
    with pytest.raises(ValueError):
        runs.write_json_atomic(path, {"bad": float("nan")})  # NaN is not JSON
    assert json.loads(path.read_text()) == {"ok": True}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_jsonl_skips_only_a_torn_last_line_and_writes_nan_as_null(tmp_path):
    path = tmp_path / "m.jsonl"
    runs.append_jsonl(path, [{"step": 1, "x": float("nan")}, {"step": 2, "x": 1.5}])
    with open(path, "a") as handle:
        handle.write('{"step": 3, "x"')
    assert runs.read_jsonl(path) == [{"step": 1, "x": None}, {"step": 2, "x": 1.5}]
    path.write_text('{"step": 1}\n{broken\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"m\.jsonl: line 2 is not JSON"):
        runs.read_jsonl(path)


def test_checkpoints_are_listed_in_step_order_and_latest_is_the_last_saved(tmp_path):
    run = runs.RunDir(tmp_path)
    for step in (10, 2, 100):
        run.save_checkpoint(step, {"step": step, "w": torch.tensor([float(step)])})
    assert [s for s, _ in run.checkpoints()] == [2, 10, 100]
    assert run.load_checkpoint()["step"] == 100
    assert run.load_checkpoint(run.checkpoint_dir / "step_2.pt")["w"].item() == 2.0


def test_missing_config_and_checkpoint_are_clear_errors(tmp_path):
    run = runs.RunDir(tmp_path / "nothing")
    with pytest.raises(ValueError, match="is not a run directory"):
        run.read_config()
    with pytest.raises(ValueError, match="no checkpoint"):
        run.load_checkpoint()
