"""Export a trimmed model to ONNX: one graph, dynamic batch and text length, data-dependent trimming.

The trimmed graph (``TrimmedGraph``) runs the model in hard mode: token scores -> keep mask ->
TopK/Gather (trim/gather.py ``kept_order``) so that every input runs with its own token count, and
kept-head indices from NonZero gather the kept heads' q/k/v rows and output-projection columns
(nn/attention.py), so pruned work is skipped in onnxruntime too. The keep threshold is a graph input
(a 0-d float), so one file serves every speed setting. Outputs: ``logits``, ``kept_tokens`` (B, number
of token trimmers: tokens entering each trimmed layer) and ``kept_heads`` (B, number of head trimmers).
A family may ask for another graph instead (``Family.export_graph``): a decoder VLM's image side
(export/image_graph.py), its inputs, example and dynamic sizes its own.

Exporters: the torch.export-based one (``dynamo=True``), which keeps NonZero/TopK/Gather with dynamic sizes
given ``k.item()`` and size hints (``torch._check``) in ``kept_order``, and the legacy TorchScript tracer
(``dynamo=False``) as a fallback, where k must stay a tensor: an ``int(k)`` would be frozen as a constant
and shorter inputs would then fail in onnxruntime (and ``torch._check`` raises under that tracer).
Both trace at batch 2: with a batch of one the core skips batch masks and head gates (shape-based
branches a tracer freezes), and a batch-2 graph is also exact at batch 1.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .. import __version__
from ..backbones import family_of
from ..errors import SmartTrimError
from .image_graph import family_graph

EXPORTERS = ("auto", "dynamo", "legacy")
MIN_DYNAMO_OPSET = 18
DEFAULT_OPSET = 18
TWO_GB = 2 ** 31 - 1
TRIMMER_PREFIX = "smarttrim_trimmer/"  # node-name prefix of trimmer nodes (kept in float by --quantize)
LABELS_INLINE_MAX = 4 << 20            # label vocabularies up to 4 MB of JSON go into the file itself
META = "smarttrim."


def input_names_for(model, threshold: bool = False) -> list[str]:
    """Graph inputs in forward-signature order (NLVR2's second image comes last)."""
    names = ["pixel_values", "input_ids", "attention_mask"] + (["threshold"] if threshold else [])
    return names + (["pixel_values2"] if model.config.task == "nlvr2" else [])


class TrimmedGraph(nn.Module):
    """What the ONNX file computes: hard mode with a tensor threshold; kept counts as outputs."""

    output_names = ("logits", "kept_tokens", "kept_heads")

    def __init__(self, model):
        super().__init__()
        self.m = model
        self.input_names = input_names_for(model, threshold=True)
        self.token_layers, self.head_layers = decision_names(model)

    def forward(self, pixel_values, input_ids, attention_mask, threshold, pixel_values2=None):
        ctx = self.m.make_context(mode="hard", threshold=threshold, record=True)
        logits = self.m(pixel_values, input_ids, attention_mask, pixel_values2, ctx=ctx)
        B = logits.shape[0]
        tok = [ctx.decisions["tok:" + k].to(torch.float32).sum(1) for k in self.token_layers]
        head = [ctx.decisions["head:" + k].to(torch.float32).sum(1) for k in self.head_layers]
        empty = torch.zeros(B, 0, dtype=torch.int64, device=logits.device)
        kept_tokens = torch.stack(tok, 1).to(torch.int64) if tok else empty
        kept_heads = torch.stack(head, 1).to(torch.int64) if head else empty
        return logits, kept_tokens, kept_heads


class FullGraph(nn.Module):
    """The untrimmed model (mode="full"): the latency baseline."""

    output_names = ("logits",)

    def __init__(self, model):
        super().__init__()
        self.m = model
        self.input_names = input_names_for(model)

    def forward(self, pixel_values, input_ids, attention_mask, pixel_values2=None):
        return self.m(pixel_values, input_ids, attention_mask, pixel_values2, ctx=self.m.make_context(mode="full"))


def example_batch(model, batch: int = 2, text_len: int = 8, seed: int = 0) -> dict:
    """Inputs to trace with: random pixels, random token ids with [CLS]/[SEP]-like ends, one padded row."""
    c = model.config
    g = torch.Generator().manual_seed(seed)
    T = max(3, min(text_len, c.max_text_len))
    ids = torch.randint(4, max(5, c.vocab_size - 1), (batch, T), generator=g)
    ids[:, 0] = 0
    mask = torch.ones(batch, T, dtype=torch.long)
    if batch > 1:  # a shorter row, so that padding flows through the traced graph
        mask[1, T - 1:] = 0
        ids[1, T - 1:] = c.pad_token_id
    b = {"pixel_values": torch.randn(batch, 3, c.image_size, c.image_size, generator=g),
         "input_ids": ids, "attention_mask": mask}
    if c.task == "nlvr2":
        b["pixel_values2"] = torch.randn(batch, 3, c.image_size, c.image_size, generator=g)
    return b


def decision_names(model) -> tuple[list[str], list[str]]:
    """Names of the token and head decisions a hard forward takes, in forward order."""
    b = example_batch(model, batch=1, text_len=4)
    with torch.no_grad():
        _, ctx = model.run(b, mode="hard", threshold=0.5, record=True)
    tok = [k[4:] for k in ctx.decisions if k.startswith("tok:")]
    head = [k[5:] for k in ctx.decisions if k.startswith("head:")]
    return tok, head


def graph_args(graph: nn.Module, batch: dict, threshold: float | None = None) -> tuple:
    """Positional arguments of ``graph`` (input_names order) from a batch dict and a threshold."""
    thr = torch.tensor(float(threshold if threshold is not None else 0.5), dtype=torch.float32)
    return tuple(thr if n == "threshold" else batch[n] for n in graph.input_names)


def _error_line(e: Exception) -> str:
    """The informative line of an exporter error (torch.onnx puts it under '## Exception summary')."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if ln.startswith("## Exception summary") and i + 1 < len(lines):
            return lines[i + 1]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


@dataclass
class ExportResult:
    path: Path
    exporter: str                  # the one that produced the file: dynamo or legacy
    opset: int
    seconds: float
    size_bytes: int
    external_data: bool
    input_names: list
    output_names: list
    token_layers: list = field(default_factory=list)
    head_layers: list = field(default_factory=list)
    fallback_reason: str | None = None  # why auto fell back to the legacy exporter
    metadata: dict = field(default_factory=dict)


# ----- the two exporters -------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet():
    """The exporters print progress, deprecation and tracer warnings: keep them off the user's terminal
    (they are kept and shown if the export fails)."""
    buf = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript",
                                                "torch.fx.experimental.symbolic_shapes", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            warnings.simplefilter("ignore")
            yield buf
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _export_dynamo(graph, args, opset: int):
    from torch.export import Dim

    if opset < MIN_DYNAMO_OPSET:
        raise SmartTrimError(f"the dynamo exporter needs opset >= {MIN_DYNAMO_OPSET} (asked for {opset})")
    if hasattr(graph, "dynamic_shapes"):  # a family's own graph (Family.export_graph)
        shapes = graph.dynamic_shapes
        prog = torch.onnx.export(graph, args, None, dynamo=True, dynamic_shapes=shapes, opset_version=opset,
                                 input_names=list(graph.input_names), output_names=list(graph.output_names),
                                 optimize=True, external_data=False)
        return prog.model_proto
    batch, text = Dim("batch", min=1), Dim("text", min=1)
    spec = {"pixel_values": {0: batch}, "pixel_values2": {0: batch}, "input_ids": {0: batch, 1: text},
            "attention_mask": {0: batch, 1: text}, "threshold": None}
    shapes = tuple(spec[n] for n in graph.input_names)
    prog = torch.onnx.export(graph, args, None, dynamo=True, dynamic_shapes=shapes, opset_version=opset,
                             input_names=list(graph.input_names), output_names=list(graph.output_names),
                             optimize=True, external_data=False)
    return prog.model_proto


def _export_legacy(graph, args, opset: int, tmpdir: Path):
    axes = {"pixel_values": {0: "batch"}, "pixel_values2": {0: "batch"}, "input_ids": {0: "batch", 1: "text"},
            "attention_mask": {0: "batch", 1: "text"}}
    dyn = {n: axes[n] for n in graph.input_names if n in axes}
    for n in graph.output_names:
        dyn[n] = {0: "batch"}
    if hasattr(graph, "dynamic_axes"):
        dyn = dict(graph.dynamic_axes)
    f = tmpdir / "legacy.onnx"
    torch.onnx.export(graph, args, str(f), dynamo=False, opset_version=opset, input_names=list(graph.input_names),
                      output_names=list(graph.output_names), dynamic_axes=dyn, do_constant_folding=True)
    import onnx

    return onnx.load(str(f), load_external_data=True)


# ----- post-processing -----------------------------------------------------------------------------------
def _mark_trimmer_nodes(proto, model, exporter: str) -> int:
    """Prefix the trimmers' node names with TRIMMER_PREFIX (both exporters name nodes after modules)."""
    keys = list(model.token_trimmers) + list(model.head_trimmers)
    n = 0
    for node in proto.graph.node:
        if exporter == "dynamo":
            scope = next((p.value for p in node.metadata_props if p.key == "namespace"), "")
            hit = "token_trimmers." in scope or "head_trimmers." in scope
        else:  # legacy scopes: /m/<trimmer key>/<submodule>/Op
            hit = any(f"/m/{k}/" in node.name for k in keys)
        if hit:
            node.name = TRIMMER_PREFIX + node.name
            n += 1
    return n


def _strip_debug_metadata(proto):
    """The dynamo exporter stores stack traces (local paths) and FX dumps on every node: drop them."""
    for node in proto.graph.node:
        del node.metadata_props[:]
    for v in list(proto.graph.value_info):
        del v.metadata_props[:]


def _weights_bytes(proto) -> int:
    import onnx

    total = 0
    for t in proto.graph.initializer:
        n = 1
        for d in t.dims:
            n *= d
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize if t.data_type else 4
        total += n * itemsize
    return total


def metadata_for(loaded, graph, exporter: str, extra: dict | None = None) -> dict:
    """Key/value strings stored in the ONNX file (``metadata_props``); ``loaded``: a model_dir.LoadedModel."""
    model, cfg = loaded.model, dict(loaded.config)
    labels = loaded.labels
    if labels is None:
        labels = cfg.get("labels")
    source = loaded.source
    md = {
        "version": __version__,
        "backbone": model.family,
        "task": model.config.task,
        "output_kind": family_of(model).tasks.get(model.config.task, ""),  # how to read the logits
        "graph": "trimmed" if isinstance(graph, TrimmedGraph) else "full",
        "default_threshold": repr(float(model.trim_config.threshold if model.trim_config else model.threshold)),
        "exporter": exporter,
        "inputs": json.dumps(list(graph.input_names)),
        "outputs": json.dumps(list(graph.output_names)),
        "num_labels": str(getattr(model.config, "num_labels", "")),
        "preprocess": json.dumps(cfg.get("preprocess") or family_of(model).default_preprocess(model.config)),
        "model_dir": str(Path(source).resolve()) if source else "",
    }
    if isinstance(graph, TrimmedGraph):
        md["kept_tokens_layers"] = json.dumps(graph.token_layers)
        md["kept_heads_layers"] = json.dumps(graph.head_layers)
    if labels is not None:
        text = json.dumps(list(labels))
        if len(text) <= LABELS_INLINE_MAX:
            md["labels"] = text
        elif source:
            md["labels_source"] = str(Path(source).resolve() / "config.json") + "#labels"
    elif source:
        md["labels_source"] = str(Path(source).resolve() / "config.json") + "#labels"
    slim = {k: v for k, v in cfg.items() if k not in ("labels",)}
    if slim:
        md["config"] = json.dumps(slim)
    if source:
        tok_dir = Path(source) / "tokenizer"
        tj = tok_dir / "tokenizer.json"
        if tj.is_file():  # the tokenizer travels inside the file: serving needs no model directory
            md["tokenizer_json"] = tj.read_text()
            tc = tok_dir / "tokenizer_config.json"
            if tc.is_file():
                md["tokenizer_config"] = tc.read_text()
        if tok_dir.is_dir():
            md["tokenizer_dir"] = str(tok_dir.resolve())
    md.update(extra or {})
    return {META + k: str(v) for k, v in md.items()}


def save_onnx(proto, out: Path) -> tuple[int, bool]:
    """Check and write ``proto`` atomically (temp file, checker, rename); external data over 2 GB.
    Returns (bytes written, external data used)."""
    import onnx

    out = Path(out)
    external = _weights_bytes(proto) > TWO_GB - (64 << 20)
    data_name = out.name + ".data"
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
    except OSError as e:
        raise SmartTrimError(f"{out}: cannot write here ({e.strerror or e})") from None
    try:
        tmp = tmpdir / out.name
        try:
            if external:
                onnx.save_model(proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                                location=data_name, size_threshold=1024)
            else:
                onnx.save_model(proto, str(tmp))
        except OSError as e:
            raise SmartTrimError(f"{out}: cannot write ({e.strerror or e})") from None
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except Exception as e:  # onnx.checker.ValidationError, shape-inference errors
            raise SmartTrimError(f"{out}: onnx.checker rejected the exported graph "
                                 f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})") from None
        size = tmp.stat().st_size
        if external:
            size += (tmpdir / data_name).stat().st_size
            os.replace(tmpdir / data_name, parent / data_name)
        os.replace(tmp, out)
        stale = parent / data_name
        if not external and stale.exists():  # an earlier, larger export's weights
            stale.unlink()
        return size, external
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def export_onnx(loaded, out, *, mode: str = "hard", exporter: str = "auto", opset: int = DEFAULT_OPSET,
                metadata: dict | None = None) -> ExportResult:
    """Export ``loaded`` (a model_dir.LoadedModel: the model, its preprocessing, labels and tokenizer go into the
    file's metadata; ``LoadedModel.in_memory`` for a model built in code) to ``out``; ``mode`` hard (trimmed
    graph) or full."""
    import onnx

    if exporter not in EXPORTERS:
        raise SmartTrimError(f"--exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    if mode not in ("hard", "full"):
        raise ValueError(f"mode must be hard or full, got {mode!r}")
    if not 7 <= int(opset) <= 23:
        raise SmartTrimError(f"--opset {opset} is out of the range this exporter supports (7..23)")
    model = loaded.model.eval()
    own = family_graph(model) if mode == "hard" else None
    graph = (own or (TrimmedGraph(model) if mode == "hard" else FullGraph(model))).eval()
    args = own.example_args() if own is not None else \
        graph_args(graph, example_batch(model), getattr(model.trim_config, "threshold", 0.5))
    if own is not None:
        metadata = {**own.metadata(), **(metadata or {})}
    t0 = time.perf_counter()
    order = ["dynamo", "legacy"] if exporter == "auto" else [exporter]
    proto, used, reason, logs = None, None, None, {}
    if exporter == "auto" and opset < MIN_DYNAMO_OPSET:
        order, reason = ["legacy"], f"opset {opset} < {MIN_DYNAMO_OPSET}, which the dynamo exporter needs"
    for name in order:
        with tempfile.TemporaryDirectory(prefix="smarttrim-export-") as td, _quiet() as buf:
            try:
                with torch.no_grad():
                    proto = _export_dynamo(graph, args, opset) if name == "dynamo" else \
                        _export_legacy(graph, args, opset, Path(td))
                used = name
            except Exception as e:  # exporters raise many types; report the first line of the last one
                logs[name] = _error_line(e)
                proto = None
        if proto is not None:
            break
        if name == "dynamo" and len(order) > 1:
            reason = logs[name]
    if proto is None:
        detail = "; ".join(f"{k}: {v}" for k, v in logs.items())
        raise SmartTrimError(f"{out}: ONNX export failed ({detail})")
    _mark_trimmer_nodes(proto, model, used)
    _strip_debug_metadata(proto)
    md = metadata_for(loaded, graph, used, metadata)
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, md)
    proto.producer_name = "smarttrim"
    proto.producer_version = __version__
    proto.doc_string = (f"smarttrim {mode} graph of a {model.family} {model.config.task} model; inputs "
                        f"{', '.join(graph.input_names)}; outputs {', '.join(graph.output_names)}")
    size, external = save_onnx(proto, Path(out))
    return ExportResult(Path(out), used, int(opset), time.perf_counter() - t0, size, external,
                        list(graph.input_names), list(graph.output_names),
                        list(getattr(graph, "token_layers", [])), list(getattr(graph, "head_layers", [])),
                        reason, md)


def read_metadata(path) -> dict:
    """The ``smarttrim.*`` metadata of an exported file, without the ``smarttrim.`` prefix (no weights loaded)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise SmartTrimError(f"{path}: not a readable ONNX file ({type(e).__name__})") from None
    return {p.key[len(META):]: p.value for p in proto.metadata_props if p.key.startswith(META)}
