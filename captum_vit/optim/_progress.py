"""A progress bar that is on by default when stderr is a terminal."""

from __future__ import annotations

import sys
from collections.abc import Iterable

from tqdm.auto import tqdm

__all__ = ["progress", "default_progress"]


def default_progress(show: bool | None) -> bool:
    """``show`` if given, else whether stderr is a terminal."""
    if show is not None:
        return bool(show)
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def progress(iterable: Iterable, *, show: bool | None, desc: str, total: int | None = None):
    """``tqdm`` over ``iterable``, shown per :func:`default_progress`."""
    return tqdm(iterable, total=total, desc=desc, disable=not default_progress(show))
