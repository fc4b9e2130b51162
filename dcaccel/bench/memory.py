"""Peak memory of a block of work: CUDA's allocator statistics, or the process's peak RSS on CPU."""

from __future__ import annotations

import gc
import importlib.util
import threading

import torch


def _proc_status_kb(name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc), so that RSS before a window is what is really in use."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak RSS of this process (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status_kb("VmHWM") is not None
    except OSError:
        return False


class PeakMemory:
    """Peak memory during a `with` block: peak_mb above the level when it began, peak_total_mb in all (MiB;
    None if not measurable).

    CUDA: torch.cuda.max_memory_allocated. CPU on Linux: the process's peak RSS (VmHWM) after resetting it
    through /proc/self/clear_refs. Elsewhere: RSS sampled every 5 ms by psutil in a thread. On CPU the heap is
    trimmed first (glibc malloc_trim), so memory freed by earlier configurations does not hide this one's.
    """

    def __init__(self, device):
        self.device = torch.device(device)
        self.peak_mb: float | None = None
        self.peak_total_mb: float | None = None
        if self.device.type == "cuda":
            self.kind = "cuda"
        elif _reset_peak_rss():
            self.kind = "vmhwm"
        elif importlib.util.find_spec("psutil") is not None:
            self.kind = "psutil"
        else:
            self.kind = None

    @property
    def method(self) -> str:
        return {
            "cuda": "torch.cuda.max_memory_allocated during the calls (warm-up included), minus memory "
                    "allocated before them",
            "vmhwm": "peak RSS of the process during the calls (warm-up included; Linux VmHWM reset via "
                     "/proc/self/clear_refs), minus RSS before them (heap trimmed first)",
            "psutil": "peak RSS during the calls (warm-up included; psutil, sampled every 5 ms), minus RSS before "
                      "them (heap trimmed first)",
            None: "not measured: no CUDA, no /proc/self/clear_refs and no psutil",
        }[self.kind]

    def __enter__(self):
        self.peak_mb = self.peak_total_mb = None
        if self.kind in ("vmhwm", "psutil"):
            _trim_heap()
        if self.kind == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        elif self.kind == "vmhwm":
            _reset_peak_rss()
            self._base = _proc_status_kb("VmRSS") * 1024
        elif self.kind == "psutil":
            import psutil

            proc = psutil.Process()
            self._base = self._peak = proc.memory_info().rss
            self._stop = threading.Event()

            def sample():
                while not self._stop.wait(0.005):
                    self._peak = max(self._peak, proc.memory_info().rss)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.kind == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        elif self.kind == "vmhwm":
            peak = _proc_status_kb("VmHWM") * 1024
        elif self.kind == "psutil":
            self._stop.set()
            self._thread.join()
            peak = self._peak
        else:
            return False
        self.peak_mb = max(peak - self._base, 0) / 2 ** 20
        self.peak_total_mb = peak / 2 ** 20
        return False
