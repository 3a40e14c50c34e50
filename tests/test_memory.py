"""The fixed mmap threshold gives large freed buffers back to the system, where glibc's default keeps them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from idios.memory import fix_mmap_threshold

# Frees a 16 MiB block (raising glibc's dynamic threshold past 2 MiB), then allocates 2 MiB buffers with
# small live malloc blocks between them, frees the buffers and reports how much of that stayed resident.
PROBE = """
import sys
from idios.memory import fix_mmap_threshold
if sys.argv[1] == "fixed":
    assert fix_mmap_threshold(1024)
def rss_kb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS:")).split()[1])
big = bytearray(16 << 20); del big
base = rss_kb()
bufs, pins = [], []
for i in range(100):
    b = bytearray(2 << 20); b[::4096] = b"x" * len(b[::4096]); bufs.append(b); pins.append(bytes(2048))
del bufs
print(rss_kb() - base)
"""


def kept_kb(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, timeout=60)
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_fixed_threshold_returns_freed_buffers() -> None:
    default, fixed = kept_kb("default"), kept_kb("fixed")
    assert default > 150_000, f"glibc's dynamic threshold kept only {default} KiB; the probe proves nothing"
    assert fixed < 20_000, f"{fixed} KiB of 200 MiB of freed buffers stayed resident"


def test_zero_leaves_malloc_alone() -> None:
    assert fix_mmap_threshold(0) is False
