"""Wall-clock latency, throughput and peak memory of model forwards, on CPU or CUDA.

Timing: ``time.perf_counter`` around each call; on CUDA the device is synchronised before the clock
starts and before it stops, so queued kernels are not missed. Warm-up calls are run and discarded.
Peak memory: bytes of tensors allocated during one forward beyond what was live before it (the
activations; weights excluded). CUDA: ``torch.cuda.max_memory_allocated``; CPU: the running sum of
allocations and frees that ``torch.profiler`` records (``profile_memory=True``), i.e. the same
quantity measured by the allocator hooks rather than by a caching allocator.
"""
from __future__ import annotations

import contextlib
import sys

import os
import platform
import time
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import SmartTrimError


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op thread count (if given) and return the count in effect."""
    if threads is not None:
        if int(threads) < 1:
            raise SmartTrimError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


def keeps_torch_threads(fn):
    """Run ``fn`` and put torch's intra-op thread count back afterwards (--threads sets it for one run only)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        before = torch.get_num_threads()
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(before)
    return wrapper


def time_calls(calls: Sequence[Callable[[], object]], warmup: int, iters: int, device) -> list[float]:
    """Run ``warmup`` then ``iters`` calls (cycling through ``calls``); seconds per timed call."""
    if not calls:
        return []
    for i in range(warmup):
        calls[i % len(calls)]()
    sync(device)
    out = []
    for i in range(iters):
        fn = calls[i % len(calls)]
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def summarize_ms(seconds: Sequence[float]) -> dict:
    """{n, mean, p50, p90, p99, min, max} in milliseconds (numpy's linear percentiles)."""
    if not seconds:
        return {"n": 0, "mean": None, "p50": None, "p90": None, "p99": None, "min": None, "max": None}
    a = np.asarray(seconds, dtype=np.float64) * 1e3
    return {"n": int(a.size), "mean": float(a.mean()), "p50": float(np.percentile(a, 50)),
            "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)),
            "min": float(a.min()), "max": float(a.max())}


@contextlib.contextmanager
def _quiet_native_output():
    """The CPU profiler's native code prints start/stop lines straight to fd 1/2; keep them off the
    user's terminal (Python-level output is flushed first so nothing of ours is lost)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = []
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        for fd in (1, 2):
            saved.append((fd, os.dup(fd)))
            os.dup2(devnull, fd)
        os.close(devnull)
    except OSError:  # no real file descriptors (e.g. captured in-process): nothing to silence
        pass
    try:
        yield
    finally:
        for fd, old in saved:
            os.dup2(old, fd)
            os.close(old)


def peak_memory_bytes(fn: Callable[[], object], device) -> int:
    """Peak bytes allocated by one call beyond those live before it (see module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile

    with _quiet_native_output(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    deltas = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()
                    if e.self_cpu_memory_usage)
    cur = peak = 0
    for _, d in deltas:
        cur += d
        peak = max(peak, cur)
    return int(peak)


def param_bytes(model) -> int:
    return int(sum(p.numel() * p.element_size() for p in model.parameters()))


def machine_info(device) -> dict:
    """What a reader of a timing needs to know about where it was taken."""
    device = torch.device(device)
    cpu = platform.processor() or platform.machine()
    try:  # the model name is more useful than "x86_64"
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"hostname": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(), "device": str(device), "gpu": None,
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info["gpu"] = {"name": p.name, "memory_gb": round(p.total_memory / 2**30, 2),
                       "cuda": torch.version.cuda}
    return info


def versions() -> dict:
    from importlib import metadata

    from .. import __version__

    out = {"smarttrim": __version__, "torch": torch.__version__}
    for pkg in ("transformers", "fvcore", "numpy", "matplotlib", "onnxruntime"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out
