import ctypes
import subprocess
import sys
import textwrap

import pytest

from modalpeft.lightning.memory import _proc_status


def _glibc() -> bool:
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "malloc_trim")
    except OSError:
        return False


# Blocks under 64 MiB come from the malloc heap (mallopt M_MMAP_THRESHOLD); every other 4 MiB block is freed, leaving
# resident holes; the probe then measures 32 new blocks, which fit those holes exactly.
_SCENARIO = textwrap.dedent(
    """
    import ctypes, torch
    from modalpeft.lightning.memory import MemoryProbe
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    libc.mallopt(-3, 64 << 20)
    size = 4 << 20
    def block():
        p = libc.malloc(size)
        ctypes.memset(p, 1, size)
        return p
    blocks = [block() for _ in range(64)]
    for p in blocks[::2]:
        libc.free(p)
    probe = MemoryProbe(torch.device("cpu"))
    probe.start()
    again = [block() for _ in range(32)]
    print(probe.kind, probe.peak_growth())
    """
)


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or _proc_status("VmHWM") is None or not _glibc(),
    reason="reads /proc/self/status and drives glibc's allocator",
)
def test_cpu_probe_counts_memory_that_reuses_freed_heap_pages():
    """A second measurement in one process must not read low because what an earlier one freed is still resident:
    128 MiB written into freed heap holes shows as 128 MiB of growth (0 without the probe's malloc_trim)."""
    out = subprocess.run([sys.executable, "-c", _SCENARIO], capture_output=True, text=True, check=True).stdout
    kind, growth = out.split()
    assert kind == "rss_hwm_growth"
    assert 120 * 2**20 < int(growth) < 140 * 2**20, f"{int(growth) / 2**20:.1f} MiB"
