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


class _Payload:
    """Unpickling this creates ``marker``: what a planted checkpoint would do with real code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "planted.pt"
    torch.save({"step": 1, "model": {"w": torch.ones(2)}, "payload": _Payload(marker)}, path)
    with pytest.raises(runs.CheckpointError, match=r"planted\.pt: refused: .*could run code"):
        runs.load_checkpoint_file(path)
    assert not marker.exists()


def test_damaged_empty_truncated_and_foreign_checkpoints_are_refused_by_name(tmp_path):
    run = runs.RunDir(tmp_path)
    good = run.save_checkpoint(3, {"step": 3, "w": torch.arange(64, dtype=torch.float32)}, keep_every=False)
    data = good.read_bytes()
    assert runs.load_checkpoint_file(good)["w"].sum().item() == sum(range(64))
    # One flipped byte inside the tensor data: torch still reads the file; the hash refuses it.
    start = data.index(torch.arange(64, dtype=torch.float32).numpy().tobytes())
    flipped = bytearray(data)
    flipped[start + 17] ^= 0x40
    cases = {
        "flipped.pt": (bytes(flipped), "damaged: the content hash does not match"),
        "empty.pt": (b"", r"empty file \(0 bytes\)"),
        "truncated.pt": (data[: len(data) // 2], "not a readable checkpoint"),
        "text.pt": (b"hello", "not a readable checkpoint"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(runs.CheckpointError, match=rf"{name}: {message}"):
            runs.load_checkpoint_file(tmp_path / name)
    torch.save({"step": 3, "w": torch.ones(2)}, tmp_path / "foreign.pt")  # plain data, but no hash
    with pytest.raises(runs.CheckpointError, match=r"foreign\.pt: not a windtunnel checkpoint with a content hash"):
        runs.load_checkpoint_file(tmp_path / "foreign.pt")


def test_the_digest_sees_every_value_and_survives_a_round_trip(tmp_path):
    state = {"a": torch.ones(3), "b": [1, 2.5, "x", None, True], "c": {"d": (torch.zeros(2, dtype=torch.uint8),)}}
    digest = runs.checkpoint_digest(state)
    assert runs.checkpoint_digest(torch.load(runs.RunDir(tmp_path).save_checkpoint(0, state, keep_every=False), weights_only=True)["state"]) == digest
    for changed in ({**state, "a": torch.ones(3, dtype=torch.float64)}, {**state, "a": torch.ones(1, 3)},
                    {**state, "b": [1, 2.5, "y", None, True]}, {**state, "b": [1, 2.5000001, "x", None, True]},
                    {**state, "b": [1, 2.5, "x", None, 1]}):
        assert runs.checkpoint_digest(changed) != digest
    with pytest.raises(TypeError, match="holds a set"):
        runs.checkpoint_digest({"s": {1}})


def test_a_non_finite_state_is_never_written(tmp_path):
    run = runs.RunDir(tmp_path)
    run.save_checkpoint(1, {"model": {"w": torch.ones(2)}})
    with pytest.raises(FloatingPointError, match=r"model\.w is not finite"):
        run.save_checkpoint(2, {"model": {"w": torch.tensor([1.0, float("inf")])}})
    assert [s for s, _ in run.checkpoints()] == [1] and run.load_checkpoint()["model"]["w"].tolist() == [1.0, 1.0]


def test_the_lock_admits_one_writer_and_is_released(tmp_path):
    first, second = runs.RunDir(tmp_path / "run"), runs.RunDir(tmp_path / "run")
    first.lock()
    first.lock()  # idempotent for its holder
    with pytest.raises(runs.RunLockedError, match=rf"run is being written by another process \(pid {os.getpid()}\)"):
        second.lock()
    first.unlock()
    second.lock()
    assert second.locked and not first.locked
    second.unlock()


def test_orphan_temporaries_are_cleaned_and_retention_keeps_the_protected_steps(tmp_path):
    run = runs.RunDir(tmp_path)
    for step in (1, 2, 3, 4, 5, 6):
        run.save_checkpoint(step, {"step": step})
    orphans = [tmp_path / "checkpoints" / ".step_7.pt.abc.tmp", tmp_path / ".config.json.x.tmp", tmp_path / "snapshots" / ".step_1.pt.y.tmp"]
    for path in orphans:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"partial")
    (tmp_path / "keep.tmp").write_text("not ours")
    assert sorted(run.clean_temporaries()) == sorted(orphans)
    assert not any(p.exists() for p in orphans) and (tmp_path / "keep.tmp").exists()
    run.prune_checkpoints(2, protected={2})
    assert [s for s, _ in run.checkpoints()] == [2, 5, 6] and run.load_checkpoint()["step"] == 6


def test_a_corrupt_config_json_is_named(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        runs.RunDir(tmp_path).read_config()
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config\.json: must be a JSON object; got list"):
        runs.RunDir(tmp_path).read_config()
