"""Progress bars for long CPU work: on by default when stderr is a terminal.

Every public method that loops over data or chunks takes ``show_progress``: ``True`` /
``False`` force the bar on / off; ``None`` (the default) means :func:`progress_default`,
on when ``sys.stderr`` is a terminal, off in logs, pipes and test runs.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["progress", "progress_default", "resolve_progress"]

T = TypeVar("T")


def progress_default() -> bool:
    """Whether progress bars are shown when the caller did not say: stderr is a TTY."""
    stream = sys.stderr
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def resolve_progress(show_progress: bool | None) -> bool:
    """``show_progress`` as a bool: ``None`` -> :func:`progress_default`.

    Raises:
        TypeError: ``show_progress`` is not ``None`` or a bool.
    """
    if show_progress is None:
        return progress_default()
    if not isinstance(show_progress, bool):
        raise TypeError(
            f"show_progress must be True, False or None (auto: on when stderr is a "
            f"terminal), got {type(show_progress).__name__}"
        )
    return show_progress


def progress(
    iterable: Iterable[T],
    *,
    total: int | None = None,
    desc: str = "",
    enabled: bool | None = None,
    unit: str = "it",
) -> Iterator[T]:
    """``iterable`` wrapped in a tqdm bar when ``enabled`` (``None``: auto), else as is.

    ``total`` defaults to ``len(iterable)`` when it has one, so the bar shows the time
    left.
    """
    if not resolve_progress(enabled):
        return iter(iterable)
    from tqdm.auto import tqdm

    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    return iter(tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr))
