"""Run directories: the one owner of every file in a run, written atomically, read with distrust.

Layout of a run directory::

    RUN_DIR/config.json              the full experiment config (task, model, train)
    RUN_DIR/metrics.jsonl            one JSON object per logged step (train loss, eval metrics)
    RUN_DIR/telemetry.jsonl          tidy rows {step, layer, head, metric, value} (geometry, routing law)
    RUN_DIR/resumes.jsonl            one row per resumed segment: the step, and what --resume changed
    RUN_DIR/checkpoints/step_N.pt    model, optimizer, schedule and RNG state at step N
    RUN_DIR/checkpoints/latest.pt    the most recent checkpoint (a copy, never a partial file)
    RUN_DIR/snapshots/step_N.pt      model weights on the log-spaced telemetry schedule
    RUN_DIR/manifold/step_N.json     2-D projections of the value manifold (telemetry)
    RUN_DIR/model.safetensors        the final model's weights alone, for sharing
    RUN_DIR/tensorboard/             with ``train --tensorboard``: metrics.jsonl and telemetry.jsonl
                                     as TensorBoard event files (:class:`TensorBoardMirror`)
    RUN_DIR/eval*.json, *.png, ablation.json, memory.json, dissociation.json, report.html
                                     outputs of the analysis commands
    RUN_DIR/.lock                    held (flock) by the one process that trains the run

A sweep directory (``windtunnel sweep``, :class:`SweepDir`) holds ordinary run directories, one
per trial, under ``runs/``::

    SWEEP_DIR/sweep.json             the sweep's spec: task, model, preset, grid, seeds, every trial
    SWEEP_DIR/runs/NAME/             one run directory per trial, named by its grid values and seed
    SWEEP_DIR/sweep.jsonl            events: each trained segment (from step, to step) and each failure
    SWEEP_DIR/summary.csv            one row per trial: grid values, seed, status, final metrics, wall time
    SWEEP_DIR/summary.json           per grid point: mean, std, 95 % interval over seeds, n
    SWEEP_DIR/ray/                   Ray Tune's own records (the ray backend)
    SWEEP_DIR/.lock                  held (flock) by the one process that drives the sweep

:func:`load` reads a run or a sweep directory into a tidy pandas DataFrame.

Every whole-file write goes to a temporary file in the same directory and is renamed into
place, so a crash never leaves a half-written file; the trainer removes the temporary files a
killed writer left behind. Appends to the JSONL logs write one line at a time; a reader skips a
torn last line, and a rewrite of a log is one atomic replace.

Files from elsewhere are untrusted. A checkpoint is loaded with ``torch.load(weights_only=True)``,
which refuses any pickle that would construct an object other than tensors, numbers, strings and
containers (so loading never runs code), and it carries the SHA-256 of its content, checked on
load, so a corrupted or truncated file is refused with its name instead of being half-read. The
hash detects damage, not a forger: anyone can write a new file with a matching hash.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tempfile
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

try:  # flock is POSIX; without it (Windows) a run directory is not locked.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "RunDir",
    "RunLockedError",
    "SweepDir",
    "TensorBoardMirror",
    "append_jsonl",
    "checkpoint_digest",
    "finite_number",
    "json_ready",
    "load",
    "load_checkpoint_file",
    "read_json",
    "read_jsonl",
    "require_tensorboard",
    "upgrade_checkpoint_file",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_jsonl_atomic",
    "write_text_atomic",
]

CHECKPOINT_FORMAT = "windtunnel-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file that cannot be trusted: unreadable, not ours, damaged or unsafe."""


class RunLockedError(ValueError):
    """Another process is writing the run directory."""


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


def _jsonl_text(rows: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(json_ready(row)) + "\n" for row in rows)


def append_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> None:
    """Append rows to a JSON-lines file, one line each (NaN is written as null)."""
    text = _jsonl_text(rows)
    if not text:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> Path:
    """Replace a JSON-lines file by ``rows`` in one atomic rename: an error leaves the old file."""
    return write_text_atomic(path, _jsonl_text(rows))


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file; a torn (incomplete) last line is skipped.

    Raises:
        ValueError: naming the file and the line when any other line is not a JSON object.
    """
    rows = []
    path = Path(path)
    if not path.exists():
        return rows
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a UTF-8 JSON-lines file ({err.reason}).") from None
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not JSON ({err.msg}).") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {i + 1} is not a JSON object.")
        rows.append(row)
    return rows


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file's content.

    Raises:
        ValueError: naming the file when it cannot be read or is not valid JSON.
    """
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file.") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot be read ({err}).") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}).") from None


def json_ready(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, ±inf) replaced by None, through dicts, lists and
    tuples (tuples become lists): what strict JSON can hold."""
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return None
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    return obj


def checkpoint_digest(state: Any) -> str:
    """SHA-256 (hex) of a checkpoint's content: every tensor's dtype, shape and bytes, and every
    number, string and container, in order. Lists and tuples hash alike (a round trip through
    ``torch.save`` may turn one into the other).

    Raises:
        TypeError: for any other object; a checkpoint holds plain data only.
    """
    digest = hashlib.sha256()
    _digest_update(digest, state)
    return digest.hexdigest()


def _digest_update(digest: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        digest.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        digest.update(f"D{len(obj)};".encode())
        for key, value in obj.items():
            _digest_update(digest, key)
            _digest_update(digest, value)
    elif isinstance(obj, (list, tuple)):
        digest.update(f"L{len(obj)};".encode())
        for value in obj:
            _digest_update(digest, value)
    elif obj is None:
        digest.update(b"N;")
    elif isinstance(obj, bool):
        digest.update(b"B1;" if obj else b"B0;")
    elif isinstance(obj, int):
        digest.update(f"I{obj};".encode())
    elif isinstance(obj, float):
        digest.update(f"F{obj.hex()};".encode())
    elif isinstance(obj, str):
        data = obj.encode("utf-8")
        digest.update(f"S{len(data)};".encode() + data)
    else:
        raise TypeError(f"checkpoint state holds a {type(obj).__name__}; only tensors, numbers, strings, None and containers.")


def _non_finite(obj: Any, where: str = "") -> str | None:
    """The path of the first floating tensor with a NaN or inf in ``obj``, else None."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() and not bool(torch.isfinite(obj).all()):
            return where or "the state"
    elif isinstance(obj, dict):
        for key, value in obj.items():
            found = _non_finite(value, f"{where}.{key}" if where else str(key))
            if found:
                return found
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            found = _non_finite(value, f"{where}[{i}]")
            if found:
                return found
    return None


class RunDir:
    """A run directory (see the module docstring for its layout): every path in it, the lock of
    the process that trains it, and checkpoints that are verified when read."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._lock_fd: int | None = None
        self.tensorboard: TensorBoardMirror | None = None

    # --- paths ------------------------------------------------------------------------------

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
    def resumes_path(self) -> Path:
        return self.path / "resumes.jsonl"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def snapshot_dir(self) -> Path:
        return self.path / "snapshots"

    @property
    def manifold_dir(self) -> Path:
        return self.path / "manifold"

    @property
    def lock_path(self) -> Path:
        return self.path / ".lock"

    @property
    def tensorboard_dir(self) -> Path:
        """TensorBoard's event files of the run (:class:`TensorBoardMirror`)."""
        return self.path / "tensorboard"

    @property
    def export_path(self) -> Path:
        """The final model's weights in safetensors format (:meth:`export_model`)."""
        return self.path / "model.safetensors"

    def checkpoint_path(self, step: int) -> Path:
        return self.checkpoint_dir / f"step_{step}.pt"

    def snapshot_path(self, step: int) -> Path:
        return self.snapshot_dir / f"step_{step}.pt"

    def manifold_path(self, step: int) -> Path:
        return self.manifold_dir / f"step_{step}.json"

    def eval_path(self, suffix: str = "") -> Path:
        """eval.json (``windtunnel eval``); ``suffix`` names a variant, e.g. "_shift2"."""
        return self.path / f"eval{suffix}.json"

    def eval_figure_path(self, suffix: str = "") -> Path:
        return self.path / f"eval_curves{suffix}.png"

    @property
    def history_figure_path(self) -> Path:
        return self.path / "history_attention.png"

    @property
    def lag_figure_path(self) -> Path:
        return self.path / "lag_response.png"

    @property
    def memory_path(self) -> Path:
        return self.path / "memory.json"

    @property
    def memory_figure_path(self) -> Path:
        return self.path / "memory.png"

    @property
    def ablation_path(self) -> Path:
        return self.path / "ablation.json"

    @property
    def dissociation_path(self) -> Path:
        return self.path / "dissociation.json"

    @property
    def dissociation_figure_path(self) -> Path:
        return self.path / "dissociation.png"

    @property
    def report_path(self) -> Path:
        return self.path / "report.html"

    # --- config and logs --------------------------------------------------------------------

    def exists(self) -> bool:
        """True when the directory holds a config.json."""
        return self.config_path.exists()

    def write_config(self, config: dict[str, Any]) -> None:
        write_json_atomic(self.config_path, config)

    def read_config(self) -> dict[str, Any]:
        """config.json as a dict.

        Raises:
            ValueError: naming the file when the directory has none or it is not a JSON object.
        """
        if not self.config_path.exists():
            raise ValueError(f"RunDir: {self.path} is not a run directory (no config.json).")
        config = read_json(self.config_path)
        if not isinstance(config, dict):
            raise ValueError(f"{self.config_path}: must be a JSON object; got {type(config).__name__}.")
        return config

    def log_metrics(self, row: dict[str, Any]) -> None:
        append_jsonl(self.metrics_path, [row])
        if self.tensorboard is not None:
            self.tensorboard.add_metrics([row])

    def log_telemetry(self, rows: Iterable[dict[str, Any]]) -> None:
        rows = list(rows)
        append_jsonl(self.telemetry_path, rows)
        if self.tensorboard is not None:
            self.tensorboard.add_telemetry(rows)

    def open_tensorboard(self) -> TensorBoardMirror:
        """Start mirroring the logs to TensorBoard (:class:`TensorBoardMirror`): tensorboard/ is
        rebuilt from metrics.jsonl and telemetry.jsonl as they are now, then every row logged
        until :meth:`close_tensorboard` is added. Call it while holding the lock.

        Raises:
            ImportError: naming the extra when the tensorboard package is not installed.
        """
        self.close_tensorboard()
        self.tensorboard = TensorBoardMirror(self.tensorboard_dir)
        self.tensorboard.add_metrics(self.metrics())
        self.tensorboard.add_telemetry(self.telemetry())
        self.tensorboard.flush()
        return self.tensorboard

    def close_tensorboard(self) -> None:
        """Flush and close the TensorBoard mirror (a no-op when none is open)."""
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None

    def metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.metrics_path)

    def telemetry(self) -> list[dict[str, Any]]:
        return read_jsonl(self.telemetry_path)

    def truncate_logs(self, step: int) -> None:
        """Drop the rows of metrics.jsonl and telemetry.jsonl logged after ``step`` (a run killed
        between checkpoints), each file in one atomic replace: an error leaves it as it was."""
        for path, rows in ((self.metrics_path, self.metrics()), (self.telemetry_path, self.telemetry())):
            if path.exists():
                write_jsonl_atomic(path, [r for r in rows if (r.get("step") or 0) <= step])

    # --- the writer's lock ------------------------------------------------------------------

    def lock(self) -> None:
        """Take the run's lock for this process (idempotent), creating the directory.

        The lock is an ``flock`` on RUN_DIR/.lock: the kernel drops it when the process dies,
        so a killed run never leaves a stale lock.

        Raises:
            RunLockedError: when another process (or another open trainer) holds it.
        """
        if self._lock_fd is not None or fcntl is None:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise RunLockedError(
                f"{self.path} is being written by another process (pid {holder}); wait for it to "
                "finish, or write to another --out."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        """Release the lock taken by :meth:`lock` (a no-op when not held)."""
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    @property
    def locked(self) -> bool:
        """True while this object holds the lock."""
        return self._lock_fd is not None

    def __del__(self) -> None:
        self.unlock()

    def clean_temporaries(self) -> list[Path]:
        """Remove the temporary files that killed writes of the trainer left (``.NAME.*.tmp`` in
        the run directory, checkpoints/, snapshots/ and manifold/); returns them. Call it only
        while holding the lock, so that no write of the trainer is in flight."""
        removed = []
        for folder in (self.path, self.checkpoint_dir, self.snapshot_dir, self.manifold_dir):
            for path in folder.glob(".*.tmp") if folder.is_dir() else ():
                path.unlink(missing_ok=True)
                removed.append(path)
        return removed

    def remove_run(self) -> None:
        """Delete everything of the run in the directory (``--overwrite``), keeping the lock.

        Raises:
            ValueError: when the directory is not a run directory (no config.json): a folder
                that windtunnel did not make is never emptied.
        """
        import shutil

        if not self.exists():
            raise ValueError(f"RunDir: {self.path} is not a run directory (no config.json); nothing is removed.")
        for entry in self.path.iterdir():
            if entry == self.lock_path:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    # --- checkpoints ------------------------------------------------------------------------

    def save_checkpoint(self, step: int, state: dict[str, Any], *, keep_every: bool = True) -> Path:
        """Save ``state`` as step_N.pt (when ``keep_every``) and as latest.pt, each atomically,
        with the hash of its content.

        Raises:
            FloatingPointError: when a floating tensor of ``state`` holds a NaN or inf; nothing
                is written, so the last checkpoint on disk stays the last finite one.
        """
        data = self._checkpoint_bytes(state)
        if keep_every:
            write_bytes_atomic(self.checkpoint_path(step), data)
        return write_bytes_atomic(self.checkpoint_dir / "latest.pt", data)

    def save_snapshot(self, step: int, state: dict[str, Any]) -> Path:
        """Save ``state`` (``{"step", "model"}``) as snapshots/step_N.pt, as a verified checkpoint."""
        return write_bytes_atomic(self.snapshot_path(step), self._checkpoint_bytes(state))

    @staticmethod
    def _checkpoint_bytes(state: dict[str, Any]) -> bytes:
        bad = _non_finite(state)
        if bad is not None:
            raise FloatingPointError(f"RunDir: refusing to save a checkpoint whose {bad} is not finite.")
        buffer = io.BytesIO()
        wrapped = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "sha256": checkpoint_digest(state), "state": state}
        torch.save(wrapped, buffer)
        return buffer.getvalue()

    def checkpoints(self) -> Iterator[tuple[int, Path]]:
        """(step, path) of every step_N.pt, in increasing step order."""
        yield from _numbered(self.checkpoint_dir)

    def snapshots(self) -> Iterator[tuple[int, Path]]:
        """(step, path) of every snapshots/step_N.pt, in increasing step order."""
        yield from _numbered(self.snapshot_dir)

    def latest_checkpoint(self) -> Path | None:
        path = self.checkpoint_dir / "latest.pt"
        return path if path.exists() else None

    def load_checkpoint(self, path: str | os.PathLike | None = None) -> dict[str, Any]:
        """Load and verify a checkpoint (latest.pt by default) onto the CPU; see :func:`load_checkpoint_file`.

        Raises:
            ValueError: when the run has no checkpoint; CheckpointError (a ValueError) naming
                the file when it is not a trustworthy windtunnel checkpoint.
        """
        path = Path(path) if path is not None else self.latest_checkpoint()
        if path is None or not Path(path).exists():
            raise ValueError(f"RunDir: no checkpoint in {self.checkpoint_dir}.")
        return load_checkpoint_file(path)

    def prune_checkpoints(self, keep_last: int, protected: Collection[int]) -> list[Path]:
        """Delete step_N.pt files except the ``keep_last`` newest and the steps in ``protected``
        (latest.pt is never touched); returns the deleted paths."""
        found = list(self.checkpoints())
        newest = {step for step, _ in found[-keep_last:]} if keep_last > 0 else set()
        removed = []
        for step, path in found:
            if step not in newest and step not in protected:
                path.unlink(missing_ok=True)
                removed.append(path)
        return removed

    def export_model(self, model_state: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
        """Write ``model_state`` to model.safetensors (weights only, no code; tensors that share
        memory, like tied embeddings, are stored once each under every name), atomically."""
        from safetensors.torch import save

        tensors = {name: t.detach().to("cpu").clone().contiguous() for name, t in model_state.items()}
        return write_bytes_atomic(self.export_path, save(tensors, metadata={k: str(v) for k, v in metadata.items()}))


def require_tensorboard() -> Any:
    """torch's ``SummaryWriter`` class; one check for every ``--tensorboard`` entry point, so a
    missing package is refused before anything is written.

    Raises:
        ImportError: naming the extra when the tensorboard package is not installed.
    """
    try:
        import tensorboard  # noqa: F401 - the package the extra installs, checked itself:
        # torch.utils.tensorboard may already be imported
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImportError(
            "--tensorboard needs the tensorboard package; install it with pip install 'windtunnel[tensorboard]'."
        ) from None
    return SummaryWriter


def finite_number(value: Any) -> float | None:
    """``value`` as a float when it is a finite int or float (not a bool), else None: what a
    JSON log or eval.json may hold where a number is expected."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


class TensorBoardMirror:
    """metrics.jsonl and telemetry.jsonl as TensorBoard scalars, in one folder of event files.

    A metrics row ``{"step", "split", name: value, ...}`` gives the scalar ``SPLIT/NAME`` (e.g.
    ``train/loss_nats``, ``eval/entropy_mae_bits``, ``eval_len50/kl_bits``); a telemetry row
    ``{"step", "layer", "head", "metric", "value"}`` gives ``telemetry/METRIC`` with ``/layerL``
    and ``/headH`` appended where they are not None. Null values (non-finite in the logs), strings
    and bools are left out (a live non-finite value too, as the logs hold it as null). The values are TensorBoard's float32.

    The folder is derived data: it is deleted and rebuilt from the two logs when opened (so a
    resumed run, whose logs were cut back to its checkpoint, holds every step once), and event
    files are appended as the logs are; a run killed mid-write leaves at worst a torn last record,
    which TensorBoard's reader skips and the next opening replaces.

    Raises:
        ImportError: naming the extra when the tensorboard package is not installed.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        SummaryWriter = require_tensorboard()  # noqa: N806 - the class torch names so
        import shutil

        self.folder = Path(folder)
        if self.folder.is_dir() and not self.folder.is_symlink():
            shutil.rmtree(self.folder)
        elif self.folder.exists() or self.folder.is_symlink():
            self.folder.unlink()
        self._writer = SummaryWriter(log_dir=str(self.folder))

    def add_metrics(self, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            split = row.get("split")
            for name, value in row.items():
                if name not in ("step", "split"):
                    self._add(f"{split}/{name}", value, row.get("step"))

    def add_telemetry(self, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            tag = f"telemetry/{row.get('metric')}"
            tag += f"/layer{row['layer']}" if row.get("layer") is not None else ""
            tag += f"/head{row['head']}" if row.get("head") is not None else ""
            self._add(tag, row.get("value"), row.get("step"))

    def _add(self, tag: str, value: Any, step: Any) -> None:
        number = finite_number(value)
        if number is not None and isinstance(step, int):
            self._writer.add_scalar(tag, number, global_step=step)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class SweepDir:
    """A sweep directory (see the module docstring for its layout): its paths, its trials' run
    directories and the lock of the one process that drives it."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._lock = RunDir(self.path)  # the same flock on SWEEP_DIR/.lock

    @property
    def spec_path(self) -> Path:
        return self.path / "sweep.json"

    @property
    def runs_dir(self) -> Path:
        return self.path / "runs"

    @property
    def events_path(self) -> Path:
        return self.path / "sweep.jsonl"

    @property
    def summary_csv_path(self) -> Path:
        return self.path / "summary.csv"

    @property
    def summary_json_path(self) -> Path:
        return self.path / "summary.json"

    @property
    def figure_path(self) -> Path:
        """The figure of ``windtunnel compare`` with this sweep first."""
        return self.path / "compare.png"

    @property
    def ray_dir(self) -> Path:
        return self.path / "ray"

    def run(self, name: str) -> RunDir:
        """The run directory of trial ``name``."""
        return RunDir(self.runs_dir / name)

    def exists(self) -> bool:
        """True when the directory holds a sweep.json."""
        return self.spec_path.exists()

    def read_spec(self) -> dict[str, Any]:
        """sweep.json as a dict.

        Raises:
            ValueError: naming the file when the directory has none or it is not a sweep spec.
        """
        if not self.spec_path.exists():
            raise ValueError(f"SweepDir: {self.path} is not a sweep directory (no sweep.json).")
        spec = read_json(self.spec_path)
        if not (isinstance(spec, dict) and isinstance(spec.get("trials"), list)):
            raise ValueError(f"{self.spec_path}: not a windtunnel sweep spec (no list of trials).")
        return spec

    def write_spec(self, spec: dict[str, Any]) -> None:
        write_json_atomic(self.spec_path, spec)

    def log_event(self, row: dict[str, Any]) -> None:
        append_jsonl(self.events_path, [row])

    def events(self) -> list[dict[str, Any]]:
        return read_jsonl(self.events_path)

    def lock(self) -> None:
        """Take the sweep's lock (see :meth:`RunDir.lock`).

        Raises:
            RunLockedError: when another process drives this sweep.
        """
        self._lock.lock()

    def unlock(self) -> None:
        self._lock.unlock()


def load(path: str | os.PathLike) -> Any:
    """The metrics of a run directory or of a sweep directory as one tidy pandas DataFrame.

    One row per logged value: columns ``run`` (the run directory's name; a sweep's trial name),
    ``seed`` (train.seed), one column per grid key of a sweep (e.g. ``train.lr``, holding the
    trial's value), then ``step``, ``split`` ("train", "eval", or "eval_lenN" for an extra
    evaluation length), ``metric`` (e.g. ``entropy_mae_bits``, ``loss_nats``) and ``value``
    (float; NaN where the log holds null). Rows come from each run's metrics.jsonl, in order;
    a sweep's trials in the order of its spec (trials with no metrics yet add no rows).

    Raises:
        ValueError: when ``path`` is neither a run directory (config.json) nor a sweep
            directory (sweep.json), or a file in it cannot be read.
        ImportError: without pandas.
    """
    import pandas as pd

    path = Path(path)
    sweep = SweepDir(path)
    if sweep.exists():
        spec = sweep.read_spec()
        grid_keys = [str(k) for k in spec.get("grid_keys", [])]
        runs = [(sweep.run(t["name"]), {k: t.get("grid", {}).get(k) for k in grid_keys}) for t in spec["trials"]]
    elif RunDir(path).exists():
        grid_keys, runs = [], [(RunDir(path), {})]
    else:
        raise ValueError(f"load: {path} is neither a run directory (config.json) nor a sweep directory (sweep.json).")
    records = []
    for run, grid in runs:
        if not run.exists():
            continue
        seed = run.read_config().get("train", {}).get("seed")
        for row in run.metrics():
            step, split = row.get("step"), row.get("split")
            for metric, value in row.items():
                if metric in ("step", "split") or isinstance(value, (str, bool, list, dict)):
                    continue
                records.append((run.path.name, seed, *grid.values(), step, split, metric, math.nan if value is None else float(value)))
    columns = ["run", "seed", *grid_keys, "step", "split", "metric", "value"]
    frame = pd.DataFrame.from_records(records, columns=columns)
    return frame.astype({"value": "float64"})


def upgrade_checkpoint_file(path: str | os.PathLike) -> bool:
    """Rewrite a checkpoint written by windtunnel before 0.2 (no content hash) in the verified
    format; returns False when the file is already verified.

    The old file is read with ``weights_only=True`` too, so this never runs code from it; a file
    that is not plain data is refused as :func:`load_checkpoint_file` would. The new hash
    certifies the content as it is now: damage done before the upgrade cannot be detected.

    Raises:
        CheckpointError: naming the file when it cannot be read as plain data.
    """
    path = Path(path)
    try:
        load_checkpoint_file(path)
        return False
    except CheckpointError as err:
        if "not a windtunnel checkpoint with a content hash" not in str(err):
            raise
    try:
        state = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
    except Exception as err:  # refused or unreadable: load_checkpoint_file's wording
        raise CheckpointError(f"{path}: cannot be upgraded: {str(err).splitlines()[0] if str(err) else type(err).__name__}.") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: cannot be upgraded: it does not hold a dict.")
    write_bytes_atomic(path, RunDir._checkpoint_bytes(state))
    return True


def _numbered(folder: Path) -> Iterator[tuple[int, Path]]:
    found = []
    for p in folder.glob("step_*.pt"):
        try:
            found.append((int(p.stem.split("_", 1)[1]), p))
        except ValueError:
            continue
    yield from sorted(found)


def load_checkpoint_file(path: str | os.PathLike) -> dict[str, Any]:
    """The state saved in a windtunnel checkpoint file, verified, on the CPU.

    The file is read whole, unpickled with ``weights_only=True`` (plain data only: a pickle that
    would construct any other object, and so could run code, is refused), and its content hash
    is compared with the one it carries.

    Raises:
        CheckpointError: naming the file when it is empty, truncated, not a torch file, unsafe,
            not a windtunnel checkpoint, of another format version, or damaged (hash mismatch).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"{path}: cannot be read ({err.strerror or err}).") from None
    if not data:
        raise CheckpointError(f"{path}: empty file (0 bytes); not a checkpoint.")
    try:
        wrapped = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for damaged, foreign or unsafe files
        text = str(err).splitlines()[0] if str(err) else type(err).__name__
        if "weights_only" in str(err) or "Unsupported global" in str(err) or "Weights only load failed" in str(err):
            raise CheckpointError(
                f"{path}: refused: the file holds objects other than tensors and plain data, and "
                "unpickling it could run code."
            ) from None
        raise CheckpointError(f"{path}: not a readable checkpoint ({len(data)} bytes; {text}).") from None
    if not (isinstance(wrapped, dict) and wrapped.get("format") == CHECKPOINT_FORMAT and {"version", "sha256", "state"} <= wrapped.keys()):
        raise CheckpointError(
            f"{path}: not a windtunnel checkpoint with a content hash (written by another program, or "
            "by windtunnel before 0.2)."
        )
    if wrapped["version"] != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {wrapped['version']!r}; this windtunnel reads {CHECKPOINT_VERSION}.")
    try:
        actual = checkpoint_digest(wrapped["state"])
    except TypeError as err:
        raise CheckpointError(f"{path}: {err}") from None
    if actual != wrapped["sha256"]:
        raise CheckpointError(f"{path}: damaged: the content hash does not match the one saved with it.")
    if not isinstance(wrapped["state"], dict):
        raise CheckpointError(f"{path}: the saved state is not a dict.")
    return wrapped["state"]
