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


# Tensors of 1, 2, ..., 8 MiB (36 MiB) are made, each followed by a 512 KiB survivor, then freed, then one of 16 MiB
# is made. Alive at once: at most 36 MiB + the survivors' 4. In the heap (blocks under the mmap threshold, where
# glibc's dynamic threshold puts them in a training loop) the freed blocks are holes between survivors that the new
# block does not fit, so RSS also holds them while it grows by 16 MiB (56 MiB); under exact_heap each block goes back
# to the system when freed and the peak is what was alive (40 MiB). Printed: whether the setting took, the two peaks.
_EXACT = textwrap.dedent(
    """
    import torch
    from modalpeft.lightning.memory import MemoryProbe, exact_heap
    def churn():
        blocks, survivors = [], []
        for mib in range(1, 9):
            blocks.append(torch.ones(mib << 18))  # mib MiB of float32
            survivors.append(torch.ones(1 << 17))  # 512 KiB above it
        del blocks
        late = torch.ones(16 << 18)
        return survivors
    probe = MemoryProbe(torch.device("cpu"))
    with exact_heap() as took:
        probe.start()
        kept = churn()
        exact = probe.peak_growth()
    probe.start()  # the threshold is now 32 MiB: these blocks live in the heap
    kept += churn()
    heap = probe.peak_growth()
    print(took, exact, heap)
    """
)


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or _proc_status("VmHWM") is None or not _glibc(),
    reason="reads /proc/self/status and drives glibc's allocator",
)
def test_exact_heap_peak_is_what_is_alive_at_once():
    """Inside exact_heap the RSS peak is the memory alive at once; in glibc's heap, freed blocks that a later one
    does not fit stay resident and add to the peak."""
    out = subprocess.run([sys.executable, "-c", _EXACT], capture_output=True, text=True, check=True).stdout
    took, exact, heap = out.split()
    assert took == "True"
    assert 39 * 2**20 < int(exact) < 47 * 2**20, f"{int(exact) / 2**20:.1f} MiB"  # 40 MiB alive, a little runtime
    assert int(heap) > int(exact) + 10 * 2**20, f"{int(heap) / 2**20:.1f} against {int(exact) / 2**20:.1f} MiB"
