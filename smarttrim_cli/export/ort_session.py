"""onnxruntime sessions: execution-provider choice, the session options used for timing, latency.

No torch import here: ``onnx_predict`` serves exported files with this module alone.

Timing settings: ``intra_op_num_threads`` from ``--threads`` (2 on CPU by default)
and ``session.intra_op.allow_spinning = 0``, so that idle onnxruntime threads do not spin-wait and
starve whatever else runs in the process (the PyTorch reference, the other session being timed).
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SmartTrimError

DEVICES = ("auto", "cpu", "cuda")
DEFAULT_CPU_THREADS = 2


def _gpu_present() -> bool:
    """A CUDA device node or driver is visible (onnxruntime-gpu lists its provider even without one)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return Path("/dev/nvidia0").exists() or Path("/proc/driver/nvidia/version").exists()


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def select_providers(device: str = "auto") -> list[str]:
    """``auto``: CUDA when onnxruntime-gpu and a GPU are present, else CPU; ``cpu``; ``cuda`` (or fail)."""
    if device not in DEVICES:
        raise SmartTrimError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    have = available_providers()
    cuda_ok = "CUDAExecutionProvider" in have and _gpu_present()
    if device == "cuda":
        if "CUDAExecutionProvider" not in have:
            raise SmartTrimError("--device cuda: this onnxruntime has no CUDAExecutionProvider (install "
                                 "onnxruntime-gpu in place of onnxruntime; the two cannot be installed together)")
        if not _gpu_present():
            raise SmartTrimError("--device cuda: onnxruntime-gpu is installed but no NVIDIA GPU is visible")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "auto" and cuda_ok:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def session_options(threads: int | None = None, providers: list[str] | None = None):
    """The options every smarttrim session uses (validation and timing alike)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    on_cpu = not providers or providers[0] == "CPUExecutionProvider"
    n = threads if threads is not None else (DEFAULT_CPU_THREADS if on_cpu else 1)
    if n < 1:
        raise SmartTrimError(f"--threads must be >= 1, got {n}")
    so.intra_op_num_threads = int(n)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3  # errors only: no warnings about nodes placed on CPU
    return so


def make_session(path, device: str = "auto", threads: int | None = None):
    """An ``onnxruntime.InferenceSession`` on ``path`` with the providers ``device`` selects.
    On CUDA, TF32 matrix products are turned off so that outputs compare with PyTorch at 1e-4."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise SmartTrimError(f"{path}: no such ONNX file")
    providers = select_providers(device)
    options = [{"use_tf32": "0"} if p == "CUDAExecutionProvider" else {} for p in providers]
    try:
        return ort.InferenceSession(str(path), sess_options=session_options(threads, providers),
                                    providers=providers, provider_options=options)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SmartTrimError(f"{path}: onnxruntime cannot load it ({msg})") from None


def session_device(sess) -> str:
    p = sess.get_providers()[0]
    return {"CUDAExecutionProvider": "cuda", "CPUExecutionProvider": "cpu"}.get(p, p)


@dataclass
class Latency:
    """Per-input latencies (ms) of one session; ``median_ms`` is the median over inputs of each input's median."""

    per_input_ms: list[float]
    runs: int
    warmup: int
    samples: list[list[float]] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.per_input_ms) if self.per_input_ms else float("nan")

    @property
    def total_ms(self) -> float:
        return sum(self.per_input_ms)


def time_session(sess, feeds: list[dict], runs: int = 10, warmup: int = 2, output_names=None) -> Latency:
    """Median wall time of ``sess.run`` per feed dict, after ``warmup`` untimed runs of each."""
    if runs < 1:
        raise SmartTrimError(f"--runs must be >= 1, got {runs}")
    per, samples = [], []
    for feed in feeds:
        for _ in range(warmup):
            sess.run(output_names, feed)
        ts = []
        for _ in range(runs):
            t0 = time.perf_counter()
            sess.run(output_names, feed)
            ts.append((time.perf_counter() - t0) * 1000.0)
        samples.append(ts)
        per.append(statistics.median(ts))
    return Latency(per, runs, warmup, samples)


def feeds_for(sess, batch: dict) -> dict:
    """Keep only the session's inputs from a dict of numpy arrays, with the dtypes the graph declares."""
    import numpy as np

    want = {i.name: i.type for i in sess.get_inputs()}
    out = {}
    for name, typ in want.items():
        if name not in batch:
            raise SmartTrimError(f"the ONNX graph needs input {name!r}, which was not provided")
        v = np.asarray(batch[name])
        if typ == "tensor(float)":
            v = v.astype(np.float32, copy=False)
        elif typ == "tensor(int64)":
            v = v.astype(np.int64, copy=False)
        out[name] = v
    return out
