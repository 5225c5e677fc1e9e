"""``smarttrim export --onnx``, the library side: export, validate, quantize, time; returns a report.

The command (commands/export.py) only parses options and renders; everything here is importable and
what the tests and benchmarks/onnx_meter.py call.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import SmartTrimError, ValidationFailed
from .image_graph import family_graph
from .onnx_export import DEFAULT_OPSET, ExportResult, export_onnx
from .ort_session import Latency, make_session, session_device, time_session  # noqa: F401
from .validate import Case, ValidationReport, make_cases, validate_against_torch, validate_quantized

QUANT_MODES = ("int8",)


@dataclass
class TimingRow:
    name: str
    text_len: int
    threshold: float
    macs_full: float
    macs_trimmed: float
    full_ms: float
    trimmed_ms: float
    int8_ms: float | None = None

    @property
    def speedup(self) -> float:
        return self.full_ms / self.trimmed_ms if self.trimmed_ms > 0 else float("nan")

    @property
    def macs_reduction(self) -> float:
        return self.macs_full / self.macs_trimmed if self.macs_trimmed > 0 else float("nan")


@dataclass
class ExportReport:
    model_dir: str
    export: ExportResult
    validation: ValidationReport | None = None
    int8: object | None = None                 # quantize.QuantResult
    int8_validation: ValidationReport | None = None
    timing: list = field(default_factory=list)
    timing_info: dict = field(default_factory=dict)
    device: str = "cpu"
    threads: int | None = None

    @property
    def ok(self) -> bool:
        return (self.validation is None or self.validation.ok) and \
            (self.int8_validation is None or self.int8_validation.ok)

    def to_dict(self) -> dict:
        e = self.export
        d = {"model_dir": self.model_dir, "ok": self.ok, "device": self.device, "threads": self.threads,
             "export": {"path": str(e.path), "exporter": e.exporter, "fallback_reason": e.fallback_reason,
                        "opset": e.opset, "seconds": round(e.seconds, 2), "size_bytes": e.size_bytes,
                        "external_data": e.external_data, "inputs": e.input_names, "outputs": e.output_names,
                        "kept_tokens_layers": e.token_layers, "kept_heads_layers": e.head_layers},
             "validation": self.validation.to_dict() if self.validation else None,
             "int8": None, "int8_validation": self.int8_validation.to_dict() if self.int8_validation else None,
             "timing": [dict(r.__dict__, speedup=r.speedup, macs_reduction=r.macs_reduction) for r in self.timing],
             "timing_info": self.timing_info}
        if self.int8 is not None:
            q = self.int8
            d["int8"] = {"path": str(q.path), "size_bytes": q.size_bytes, "float_size_bytes": q.float_size_bytes,
                         "matmuls_int8": q.matmuls_int8, "gathered_int8": q.gathered_int8,
                         "matmuls_float": q.matmuls_float, "external_data": q.external_data}
        return d

    def failure_line(self) -> str:
        bad = [c for r in (self.validation, self.int8_validation) if r for c in r.checks if not c.ok]
        what = "; ".join(f"{c.name}: {c.detail} ({c.tolerance})" for c in bad)
        return f"{self.export.path}: written, but validation failed: {what}"


def default_onnx_path() -> Path:
    from ..model_dir import workspace

    return workspace() / "model.onnx"


def case_macs(model, case: Case) -> tuple[float, float]:
    """(full, trimmed) MACs of the first instance of a case, by the cost model (fvcore convention)."""
    from ..trim.cost import total_macs

    with torch.no_grad():
        _, ctx = model.run(case.batch, mode="hard", threshold=case.threshold, record=True)
    return float(total_macs(ctx.records, full=True)[0]), float(total_macs(ctx.records)[0])


def time_interleaved(sessions: dict, feeds: list[dict], runs: int, warmup: int = 2) -> dict:
    """Median latency per session and input; the sessions take turns run by run, so that a change in
    machine load hits all of them alike (the machine may be shared)."""
    import statistics
    import time

    from .ort_session import feeds_for

    out = {k: [] for k in sessions}
    for feed in feeds:
        per = {k: feeds_for(s, feed) for k, s in sessions.items()}
        for k, s in sessions.items():
            for _ in range(warmup):
                s.run(None, per[k])
        samples = {k: [] for k in sessions}
        for _ in range(runs):
            for k, s in sessions.items():
                t0 = time.perf_counter()
                s.run(None, per[k])
                samples[k].append((time.perf_counter() - t0) * 1000.0)
        for k in sessions:
            out[k].append(statistics.median(samples[k]))
    return out


def run_export(model_dir=None, out=None, *, opset: int = DEFAULT_OPSET, atol: float = 1e-4,
               quantize: str | None = None, validate: bool = True, timing: bool = True, device: str = "auto",
               threads: int | None = None, runs: int = 10, exporter: str = "auto", int8_rel_tol: float = 0.1,
               int8_min_agreement: float = 0.75, thresholds=None, status=None) -> ExportReport:
    """Export the model in ``model_dir`` (default: the latest attach/finetune) to ``out``; validate,
    quantize and time as asked. Never raises for a failed check: ``report.ok`` says (the command
    turns it into exit code 1)."""
    from .. import load
    from .quantize import int8_path_for, quantize_int8

    status = status or (lambda msg: contextlib.nullcontext())
    if quantize is not None and quantize not in QUANT_MODES:
        raise SmartTrimError(f"--quantize must be one of {', '.join(QUANT_MODES)}, got {quantize!r}")
    if atol <= 0:
        raise SmartTrimError(f"--atol must be > 0, got {atol}")
    if runs < 1:
        raise SmartTrimError(f"--runs must be >= 1, got {runs}")
    out = Path(out) if out else default_onnx_path()
    if out.exists() and out.is_dir():
        raise SmartTrimError(f"{out}: is a directory; give the ONNX file to write, e.g. {out / 'model.onnx'}")
    with status("loading the model"):
        loaded = load(model_dir, mode="hard")
    model = loaded.model
    model_dir = str(loaded.source)
    own = family_graph(model)  # a family's own graph (image side of a decoder VLM)
    if own is not None and quantize is not None:
        own.refuse("quantize")
    with status(f"exporting the trimmed graph to {out} ({exporter} exporter, opset {opset})"):
        res = export_onnx(loaded, out, mode="hard", exporter=exporter, opset=opset)
    report = ExportReport(model_dir, res)
    need_sessions = validate or timing or quantize
    if not need_sessions:
        return report
    sess = make_session(out, device, threads)
    report.device = session_device(sess)
    report.threads = sess.get_session_options().intra_op_num_threads
    if own is not None:  # its outputs feed an LM outside the graph: no full-graph latency baseline to compare
        if validate:
            with status("validating in onnxruntime against PyTorch hard mode"):
                report.validation = own.validate(sess, loaded, thresholds, atol)
        report.timing_info = {"skipped": "no latency table for the image graph (the LM runs in transformers)"}
        return report
    cases = make_cases(loaded, thresholds)
    if validate:
        with status(f"validating in onnxruntime against PyTorch hard mode on {len(cases)} inputs"):
            report.validation = validate_against_torch(sess, model, cases, atol)
    q_sess = None
    if quantize == "int8":
        qpath = int8_path_for(out)
        with status(f"quantizing to int8: {qpath}"):
            report.int8 = quantize_int8(out, qpath)
        q_sess = make_session(qpath, device, threads)
        if validate:
            with status("validating the int8 graph against the float graph"):
                report.int8_validation = validate_quantized(q_sess, sess, model.config.task, cases,
                                                            int8_rel_tol, int8_min_agreement)
    if timing:
        thr = float(model.trim_config.threshold if model.trim_config else 0.5)
        timed = [c for c in cases if c.size[0] == 1 and c.threshold == thr] or [c for c in cases if c.size[0] == 1]
        td = Path(tempfile.mkdtemp(prefix=f".{out.name}.full-", dir=out.parent))
        try:
            with status(f"exporting the full (untrimmed) graph for the latency baseline ({res.exporter})"):
                full = export_onnx(loaded, td / "full.onnx", mode="full", exporter=res.exporter, opset=opset)
            f_sess = make_session(full.path, device, threads)
            sessions = {"full": f_sess, "trimmed": sess}
            if q_sess is not None:
                sessions["int8"] = q_sess
            with status(f"timing onnxruntime: {len(sessions)} graphs x {len(timed)} inputs x {runs} runs"):
                lat = time_interleaved(sessions, [c.feeds() for c in timed], runs)
        finally:
            shutil.rmtree(td, ignore_errors=True)
        for i, c in enumerate(timed):
            mf, mt = case_macs(model, c)
            report.timing.append(TimingRow(c.name, c.size[1], c.threshold, mf, mt, lat["full"][i], lat["trimmed"][i],
                                           lat["int8"][i] if "int8" in lat else None))
        report.timing_info = {"runs": runs, "warmup": 2, "statistic": "median per input, sessions interleaved",
                              "provider": sess.get_providers()[0], "threads": report.threads,
                              "full_graph_exporter": res.exporter}
    return report


def write_report(report: ExportReport, path):
    from ..atomic import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(report.to_dict(), indent=2, default=_json_default))


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


__all__ = ["run_export", "ExportReport", "TimingRow", "write_report", "default_onnx_path", "ValidationFailed"]
