"""How time and memory are measured, written once (the benchmark harness and the demo).

* :class:`Timer`: wall time of a call in ms. CUDA: CUDA events around the call, after
  flushing L2 (a memset of twice its size). CPU: ``time.perf_counter`` (CPU ops are
  synchronous). Warm-up calls are untimed; outputs are freed outside the timed region.
* :func:`peak_extra_mib`: memory one call needs beyond what is already allocated. CUDA:
  ``torch.cuda.max_memory_allocated`` minus the allocation before the call (outputs and
  gradients included). CPU: growth of the process's peak resident set (VmHWM, reset
  through ``/proc/self/clear_refs``) over the resident set before the call — memory the
  allocator newly touched; NaN where the reset is not allowed (not Linux). tike_cuda's
  idle CPU gradient buffers (``tike_cuda.cpu_grad_cache_info``) are returned to the OS
  first, so that a gradient the call takes from that cache counts as memory it needs.
"""
from __future__ import annotations

import gc
import math
import time
from typing import Callable, List

import torch

__all__ = ["Timer", "percentile", "peak_extra_mib", "proc_status_kib", "reset_peak_rss"]


class Timer:
    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.flush = None
        if self.device.type == "cuda":
            l2 = getattr(torch.cuda.get_device_properties(self.device), "L2_cache_size", 64 << 20)
            self.flush = torch.empty(2 * max(l2, 1 << 20), dtype=torch.uint8, device=self.device)
            self.start = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)

    def times_ms(self, fn: Callable, warmup: int, repeats: int) -> List[float]:
        for _ in range(warmup):
            out = fn()
            del out
        self.sync()
        ts = []
        for _ in range(repeats):
            if self.flush is not None:
                self.flush.zero_()
                self.start.record()
                out = fn()
                self.end.record()
                self.end.synchronize()
                ts.append(self.start.elapsed_time(self.end))
            else:
                t0 = time.perf_counter()
                out = fn()
                ts.append((time.perf_counter() - t0) * 1e3)
            del out  # freed outside the timed region
        return ts

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def percentile(xs: List[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def proc_status_kib(field: str, path: str = "/proc/self/status") -> int:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM) or of another such file
    (/proc/meminfo: MemAvailable); OSError where there is none."""
    with open(path) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(field)


def reset_peak_rss() -> bool:
    """VmHWM := VmRSS (Linux); False where not allowed. ru_maxrss cannot be reset, and
    a child process inherits its parent's across exec."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_extra_mib(fn: Callable, device: torch.device) -> float:
    """MiB one call of ``fn`` needs beyond what is allocated before it (module docstring)."""
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        del out
        return (peak - base) / 2**20
    import tike_cuda

    tike_cuda.empty_cpu_grad_cache()
    if not reset_peak_rss():
        return float("nan")
    base = proc_status_kib("VmRSS")
    out = fn()
    peak = proc_status_kib("VmHWM")
    del out
    return max(peak - base, 0) / 1024
