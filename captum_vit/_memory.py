"""Keep freed memory in the process for reuse (the command line's setting).

glibc's ``malloc`` hands a large freed block back to the operating system when the free
space at the top of its heap exceeds a threshold that it sizes from earlier blocks (twice
the largest block it has mapped and freed, at most 64 MiB). A ViT's activations sit right
at that size: a ViT-Ti/16 batch of 32 at 224 px frees two 18.5 MiB MLP tensors per
block, so depending on what the process allocated before, every block's tensors can be
given back and faulted in again (measured: about 450,000 page faults per 128 images and a
forward 25% slower). Raising the thresholds keeps the memory mapped for the next block.

This is a process-wide setting, so only the programs set it (``captum-vit``,
``python -m captum_vit``, the benchmarks that time them); the library never does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 1 << 30  # 1 GiB: larger than any single activation of a batch we run


def keep_freed_memory() -> bool:
    """Raise glibc's trim and mmap thresholds to 1 GiB for this process, so that freed
    activations are reused instead of being returned to the OS and faulted in again.

    Returns:
        True when the setting took effect; False off glibc (macOS, Windows, musl),
        where nothing is changed.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _THRESHOLD)
    )
