"""glibc's malloc, told to give large freed blocks back to the system.

glibc serves an allocation above its mmap threshold with its own mapping, which goes back to the system when
freed; below it, from the heap, which keeps freed memory. The threshold starts at 128 KiB but rises to the size
of each large block freed (up to 32 MiB), so in a process that loads model weights (buffers freed and
re-allocated while onnxruntime builds a session) later multi-megabyte buffers land in the heap and stay there.
Measured here with ViT-B/32 fp32 (351 MB of weights): a loaded session 576 MB over the imports with the
dynamic threshold, 351 MB with a fixed 1 MiB one. A fixed threshold (set through mallopt, which also turns the
dynamic one off) keeps that memory returned. Not glibc (musl, macOS): nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # from glibc's malloc.h


def fix_mmap_threshold(kib: int) -> bool:
    """Set glibc's mmap threshold to `kib` KiB; False where that is not possible (or kib is 0: left alone)."""
    if kib <= 0 or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = bool(mallopt(M_MMAP_THRESHOLD, kib * 1024))
    if not ok:
        log.warning("could not set malloc's mmap threshold to %d KiB", kib)
    return ok
