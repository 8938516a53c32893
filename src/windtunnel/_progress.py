"""Progress bars for the long analyses, drawn only where the caller switched them on.

The library's loops over checkpoints, lengths or ablations wrap their iterable in :func:`track`;
it returns the iterable unchanged unless the code runs inside ``with progress_bars():`` (the
command line does that unless ``--quiet``), where it draws a tqdm bar on stderr. Library users see
no output they did not ask for.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from typing import Any, TypeVar

__all__ = ["progress_bars", "track"]

T = TypeVar("T")

_ENABLED: ContextVar[bool] = ContextVar("windtunnel_progress_bars", default=False)


@contextlib.contextmanager
def progress_bars(enabled: bool = True) -> Iterator[None]:
    """Within this block, :func:`track` draws bars (``enabled``) or stays silent."""
    token = _ENABLED.set(bool(enabled))
    try:
        yield
    finally:
        _ENABLED.reset(token)


def track(iterable: Iterable[T], *, desc: str, total: int | None = None, unit: str = "it") -> Iterable[T]:
    """``iterable``, with a progress bar on stderr when bars are on (:func:`progress_bars`)."""
    if not _ENABLED.get():
        return iterable
    from tqdm import tqdm

    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    bar: Any = tqdm(iterable, desc=desc, total=total, unit=unit, file=sys.stderr, leave=False)
    return bar
