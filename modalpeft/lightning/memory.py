"""Peak memory growth of a block of work: process RSS on CPU, the caching allocator on CUDA.

Used by the benchmark harness (``benchmarks/harness.py``) and the demos that report memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import resource
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


class MemoryProbe:
    """Peak memory growth from :meth:`start` to :meth:`peak_growth`, in bytes.

    On CPU: the process's peak RSS (Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` at :meth:`start`)
    minus its RSS at :meth:`start`; where that reset is unavailable, ``ru_maxrss`` (which also counts earlier
    peaks). Before the reset, glibc's ``malloc_trim`` hands the heap's free pages back to the system: otherwise
    the memory an earlier measurement freed stays resident and is reused without raising RSS, so a second
    measurement in the same process reads too low. On CUDA: ``max_memory_allocated`` after
    ``reset_peak_memory_stats`` minus ``memory_allocated`` at :meth:`start`. ``kind`` names the one used;
    ``baseline`` is the memory at :meth:`start`.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.baseline = 0
        self.kind = ""

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            self.kind = "cuda_max_allocated_growth"
            return
        _release_free_heap()
        self.baseline = _proc_status("VmRSS") or 0
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self.kind = "rss_hwm_growth" if _proc_status("VmHWM") else "ru_maxrss_growth"
        except OSError:
            self.kind = "ru_maxrss_growth"

    def peak_growth(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.baseline
        if self.kind == "rss_hwm_growth":
            peak = _proc_status("VmHWM") or 0
        else:  # kilobytes on Linux, bytes on macOS
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        return max(peak - self.baseline, 0)


EXACT_HEAP_THRESHOLD = 1 << 20
"""glibc's mmap threshold inside :func:`exact_heap`: blocks of 1 MiB and more get pages of their own."""
STEADY_HEAP_THRESHOLD = 32 << 20
"""The threshold set when :func:`exact_heap` ends: glibc's dynamic threshold's ceiling on 64-bit, which a training
loop's freed activations raise it to (``DEFAULT_MMAP_THRESHOLD_MAX``)."""
_M_MMAP_THRESHOLD = -3


@contextlib.contextmanager
def exact_heap() -> Iterator[bool]:
    """Within the block, glibc serves every allocation of 1 MiB or more (tensors) from pages of its own and returns
    them to the system when freed, so the process's RSS follows the bytes alive at each moment and its peak is the
    most that was alive at once; with the default dynamic threshold, freed tensors stay in the heap and the peak
    also counts how they were laid out (two runs of the same step can differ by hundreds of MiB). Yields whether
    the setting took (glibc on Linux; elsewhere nothing changes). On leaving, the threshold is fixed at
    :data:`STEADY_HEAP_THRESHOLD`, where the default's dynamic threshold settles in a training loop, and the heap's
    free pages are released. glibc's threshold is process-wide and, once set, no longer dynamic: use it in a process
    of its own (the benchmark harness's isolated candidates)."""
    libc = _glibc()
    took = bool(libc is not None and hasattr(libc, "mallopt") and libc.mallopt(_M_MMAP_THRESHOLD, EXACT_HEAP_THRESHOLD))
    try:
        yield took
    finally:
        if took:
            libc.mallopt(_M_MMAP_THRESHOLD, STEADY_HEAP_THRESHOLD)
            _release_free_heap()


def _glibc() -> Any:
    """The C library on Linux (``None`` elsewhere); callers check for the glibc functions they use (musl lacks
    them)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _release_free_heap() -> None:
    """glibc's ``malloc_trim(0)``: return the free pages of every malloc arena to the system (a no-op elsewhere)."""
    libc = _glibc()
    if libc is not None and hasattr(libc, "malloc_trim"):  # not glibc (musl has no malloc_trim)
        libc.malloc_trim(0)


def _proc_status(key: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` in bytes, or ``None`` where there is no such file."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
