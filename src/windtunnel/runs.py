"""Run directories: config.json, metrics.jsonl, telemetry.jsonl and checkpoints, written atomically.

Layout of a run directory::

    RUN_DIR/config.json            the full experiment config (task, model, train), as written once
    RUN_DIR/metrics.jsonl          one JSON object per logged step (train loss, eval metrics)
    RUN_DIR/telemetry.jsonl        tidy rows {step, layer, head, metric, value} (geometry, routing law)
    RUN_DIR/checkpoints/step_N.pt  model, optimizer, schedule and RNG state at step N
    RUN_DIR/checkpoints/latest.pt  the most recent checkpoint (a copy, never a partial file)

Every whole-file write goes to a temporary file in the same directory and is renamed into
place, so a crash never leaves a half-written file. Appends to the JSONL logs write one line at a
time; a reader skips a torn last line.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "RunDir",
    "append_jsonl",
    "read_jsonl",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_text_atomic",
]


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp creates 0600; results are meant to be shared
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically (NaN/inf are rejected)."""
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def append_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> None:
    """Append rows to a JSON-lines file, one line each (NaN is written as null)."""
    lines = [json.dumps(_finite(row)) + "\n" for row in rows]
    if not lines:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("".join(lines))
        handle.flush()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file; a torn (incomplete) last line is skipped."""
    rows = []
    path = Path(path)
    if not path.exists():
        return rows
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise
    return rows


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


class RunDir:
    """A run directory (see the module docstring for its layout)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def telemetry_path(self) -> Path:
        return self.path / "telemetry.jsonl"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    def exists(self) -> bool:
        """True when the directory holds a config.json."""
        return self.config_path.exists()

    def write_config(self, config: dict[str, Any]) -> None:
        write_json_atomic(self.config_path, config)

    def read_config(self) -> dict[str, Any]:
        if not self.config_path.exists():
            raise ValueError(f"RunDir: {self.path} is not a run directory (no config.json).")
        return json.loads(self.config_path.read_text(encoding="utf-8"))

    def log_metrics(self, row: dict[str, Any]) -> None:
        append_jsonl(self.metrics_path, [row])

    def log_telemetry(self, rows: Iterable[dict[str, Any]]) -> None:
        append_jsonl(self.telemetry_path, rows)

    def metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.metrics_path)

    def telemetry(self) -> list[dict[str, Any]]:
        return read_jsonl(self.telemetry_path)

    def save_checkpoint(self, step: int, state: dict[str, Any], *, keep_every: bool = True) -> Path:
        """Save ``state`` as step_N.pt (when ``keep_every``) and as latest.pt, each atomically."""
        import io

        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getvalue()
        if keep_every:
            write_bytes_atomic(self.checkpoint_dir / f"step_{step}.pt", data)
        return write_bytes_atomic(self.checkpoint_dir / "latest.pt", data)

    def checkpoints(self) -> Iterator[tuple[int, Path]]:
        """(step, path) of every step_N.pt, in increasing step order."""
        found = []
        for p in self.checkpoint_dir.glob("step_*.pt"):
            try:
                found.append((int(p.stem.split("_", 1)[1]), p))
            except ValueError:
                continue
        yield from sorted(found)

    def latest_checkpoint(self) -> Path | None:
        path = self.checkpoint_dir / "latest.pt"
        return path if path.exists() else None

    def load_checkpoint(self, path: str | os.PathLike | None = None) -> dict[str, Any]:
        """Load a checkpoint (latest.pt by default) onto the CPU."""
        path = Path(path) if path is not None else self.latest_checkpoint()
        if path is None or not Path(path).exists():
            raise ValueError(f"RunDir: no checkpoint in {self.checkpoint_dir}.")
        return torch.load(path, map_location="cpu", weights_only=False)
