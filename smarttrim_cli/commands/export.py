"""smarttrim export [MODEL_DIR] --onnx [PATH]"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table
from typer.core import TyperCommand

from ..cli import app, console, user_errors

_DEFAULT = "\x00default"  # what --onnx receives when given without a path


class _OptionalValueCommand(TyperCommand):
    """Lets ``--onnx`` go without a value (``smarttrim export --onnx``): Typer's parser has no
    optional-value options, so a bare ``--onnx`` (last, or followed by another option) gets a sentinel."""

    def parse_args(self, ctx, args):
        args = list(args)
        for i, a in enumerate(args):
            if a == "--":
                break
            if a == "--onnx" and (i + 1 == len(args) or (args[i + 1].startswith("-") and len(args[i + 1]) > 1)):
                args.insert(i + 1, _DEFAULT)
                break
        return super().parse_args(ctx, args)


def _size(n: int) -> str:
    for unit, k in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= k:
            return f"{n / k:.2f} {unit}"
    return f"{n} B"


def _mark(ok: bool) -> str:
    return "[green]✓[/]" if ok else "[bold red]✗[/]"


@app.command(cls=_OptionalValueCommand)
@user_errors
def export(
    model_dir: Optional[Path] = typer.Argument(None, help="Model directory written by attach/finetune "
                                               "(default: the latest one, recorded in ./smarttrim-out/latest)."),
    onnx: Optional[str] = typer.Option(None, "--onnx", metavar="[PATH]",
                                       help="Export to ONNX; PATH defaults to $SMARTTRIM_HOME/model.onnx "
                                            "(./smarttrim-out/model.onnx)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Same as --onnx PATH."),
    opset: int = typer.Option(18, "--opset", help="ONNX opset (the dynamo exporter needs >= 18)."),
    atol: float = typer.Option(1e-4, "--atol", help="Absolute tolerance on logits, onnxruntime vs PyTorch hard mode."),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="int8: also write MODEL.int8.onnx "
                                           "(onnxruntime dynamic quantization of the trimmed graph)."),
    int8_tol: float = typer.Option(0.1, "--int8-tol", help="int8 vs float graph: max |Δlogits| as a share of "
                                   "the float logits' range."),
    validate: bool = typer.Option(True, "--validate/--no-validate", help="Run onnxruntime on real inputs and "
                                  "compare outputs and kept-token counts with PyTorch hard mode (exit 1 on failure)."),
    timing: bool = typer.Option(True, "--timing/--no-timing", help="Time the trimmed graph against an exported "
                                "full graph (and the int8 graph) in onnxruntime."),
    runs: int = typer.Option(10, "--runs", help="Timed runs per input and graph (median reported)."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA if onnxruntime-gpu and a GPU, else CPU), cpu, cuda."),
    threads: Optional[int] = typer.Option(None, "--threads", help="onnxruntime intra-op threads (default 2 on CPU)."),
    exporter: str = typer.Option("auto", "--exporter", envvar="SMARTTRIM_EXPORTER",
                                 help="auto (torch.export-based dynamo, legacy tracer as fallback), dynamo, legacy."),
    report: Optional[Path] = typer.Option(None, "--report", help="Also write everything shown as JSON here."),
):
    """Export the trimmed model to ONNX (one dynamic-shape graph, threshold as an input) and validate it."""
    from ..errors import SmartTrimError, ValidationFailed
    from ..export.run import default_onnx_path, run_export, write_report

    if onnx is None and output is None:
        raise SmartTrimError("choose an export format: --onnx [PATH] (the only one so far)")
    out = output
    if onnx is not None and onnx != _DEFAULT:
        p = Path(onnx)
        if model_dir is None and p.is_dir() and (p / "config.json").is_file():
            model_dir = p  # `smarttrim export --onnx MODEL_DIR`: the path is the model, not the output
        elif out is not None and Path(out) != p:
            raise SmartTrimError(f"--onnx {onnx} and -o {out} disagree: give the output path once")
        else:
            out = p
    out = Path(out) if out is not None else default_onnx_path()

    def status(msg):
        return console.status(msg)

    rep = run_export(model_dir, out, opset=opset, atol=atol, quantize=quantize, validate=validate, timing=timing,
                     device=device, threads=threads, runs=runs, exporter=exporter, int8_rel_tol=int8_tol,
                     status=status)
    _render(rep)
    serve = rep.export.metadata.get("smarttrim.serve")
    if serve:  # a family's own graph says how it is served
        console.print(f"serve it: {serve} (the LM in transformers)", highlight=False, soft_wrap=True)
    else:
        console.print(f"serve it without PyTorch: python -m smarttrim_cli.onnx_predict {rep.export.path} IMAGE \"QUESTION\"",
                      highlight=False, soft_wrap=True)
    if report is not None:
        write_report(rep, report)
        console.print(f"report: {report}")
    if not rep.ok:
        raise ValidationFailed(rep.failure_line())


def _render(rep):
    e = rep.export
    t = Table(title=f"smarttrim export: {rep.model_dir} → {e.path}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    how = "dynamo (torch.export)" if e.exporter == "dynamo" else "legacy (TorchScript tracer)"
    if e.fallback_reason:
        how += f", after the dynamo exporter failed: {e.fallback_reason}"
    t.add_row("exporter", f"{how}, opset {e.opset}, {e.seconds:.1f} s")
    where = f"{e.path} ({_size(e.size_bytes)}"
    where += f", weights in {e.path.name}.data)" if e.external_data else ")"
    t.add_row("file", where + "; onnx.checker passed")
    own = e.metadata.get("smarttrim.graph") not in ("trimmed", "full")
    if own:
        t.add_row("inputs", ", ".join(e.input_names) + f" (batch {e.metadata.get('smarttrim.batch', '?')})")
        t.add_row("outputs", ", ".join(e.output_names))
    else:
        t.add_row("inputs", "pixel_values (batch, 3, H, W), input_ids / attention_mask (batch, text), threshold ()"
                  + (", pixel_values2" if "pixel_values2" in e.input_names else ""))
        t.add_row("outputs", f"logits, kept_tokens (batch, {len(e.token_layers)}), kept_heads "
                  f"(batch, {len(e.head_layers)})")
    md = e.metadata
    t.add_row("metadata", f"smarttrim {md.get('smarttrim.version')}, {md.get('smarttrim.backbone')} / "
              f"{md.get('smarttrim.task')}, default threshold {md.get('smarttrim.default_threshold')}, "
              + ("labels inline" if "smarttrim.labels" in md else "labels: " + md.get("smarttrim.labels_source", "none"))
              + (", tokenizer inline" if "smarttrim.tokenizer_json" in md else ""))
    if rep.int8 is not None:
        q = rep.int8
        t.add_row("int8", f"{q.path} ({_size(q.size_bytes)}, {q.float_size_bytes / max(1, q.size_bytes):.1f}× smaller; "
                  f"{q.matmuls_int8 + q.gathered_int8} MatMuls in int8 of which {q.gathered_int8} on gathered "
                  f"head slices, {q.matmuls_float} left in float)")
    console.print(t)

    v = rep.validation
    if v is not None:
        console.print(f"Validating {e.path.name} in onnxruntime ({rep.device}, {rep.threads} threads) against "
                      f"PyTorch hard mode on {len(v.cases)} inputs:")
        ct = Table(show_edge=False, pad_edge=False)
        for col in ("input", "batch×text", "threshold", "image tokens kept", "max |Δ logits|" if not own else "max |Δ embeds|", "kept counts"):
            ct.add_column(col, justify="left" if col == "input" else "right")
        for c in v.cases:
            kept = f"{c.image_tokens_kept}/{c.image_tokens}" if c.image_tokens_kept is not None else "—"
            ct.add_row(c.name, f"{c.batch}×{c.text_len}", f"{c.threshold:g}", kept, f"{c.max_abs_diff:.1e}",
                       "equal" if c.tokens_equal and c.heads_equal else "[red]differ[/]")
        console.print(ct)
        for c in v.checks:
            console.print(f"  {_mark(c.ok)} {c.name}: {c.detail} (tolerance: {c.tolerance})", highlight=False)
    if rep.int8_validation is not None:
        console.print("Validating the int8 graph against the float graph:")
        for c in rep.int8_validation.checks:
            console.print(f"  {_mark(c.ok)} {c.name}: {c.detail} (tolerance: {c.tolerance})", highlight=False)
    if rep.timing:
        info = rep.timing_info
        thr = rep.timing[0].threshold
        tt = Table(title=f"onnxruntime latency, trimmed vs full graph ({info['provider']}, {info['threads']} threads, "
                         f"threshold {thr:g}, median of {info['runs']} runs, graphs interleaved)",
                   title_justify="left", show_edge=False)
        has_q = any(r.int8_ms is not None for r in rep.timing)
        cols = ["input", "text", "GMACs full → trimmed", "full ms", "trimmed ms", "speedup"]
        cols += ["int8 ms", "int8 speedup"] if has_q else []
        for col in cols:
            tt.add_column(col, justify="left" if col == "input" else "right")
        for r in rep.timing:
            row = [r.name, str(r.text_len), f"{r.macs_full / 1e9:.3g} → {r.macs_trimmed / 1e9:.3g} ({r.macs_reduction:.2f}×)",
                   f"{r.full_ms:.1f}", f"{r.trimmed_ms:.1f}", f"{r.speedup:.2f}×"]
            if has_q:
                row += [f"{r.int8_ms:.1f}", f"{r.full_ms / r.int8_ms:.2f}×"]
            tt.add_row(*row)
        console.print(tt)
