"""smarttrim profile [MODEL_DIR] --dataset NAME [...]"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from ..cli import app, console, user_errors


@app.command()
@user_errors
def profile(
    model_dir: Optional[Path] = typer.Argument(None, help="Model directory (default: the one the last attach/"
                                               "finetune wrote, recorded in $SMARTTRIM_HOME/latest)."),
    dataset: str = typer.Option(..., "--dataset", help="vqa, nlvr2, snli, easyvqa (needs no data), or "
                                  "coco-captions / flickr30k (Karpathy-split captions; retrieval models: recall@k)."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Dataset folder (default: "
                                            "$SMARTTRIM_DATA/<dataset>, else ~/.cache/smarttrim/data/<dataset>; "
                                            "easy-VQA: the installed package's data)."),
    split: Optional[str] = typer.Option(None, "--split", help="Split to read (default: val; easyvqa, coco-captions, "
                                        "flickr30k: test)."),
    limit: Optional[int] = typer.Option(500, "--limit", help="Profile the first N inputs (0: all)."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Runtime keep threshold of the trimmed "
                                              "model, 0-1 (default: the model's, usually 0.5)."),
    sweep: Optional[str] = typer.Option(None, "--sweep", help="More thresholds, e.g. 0.3,0.5,0.7: adds the "
                                        "accuracy/FLOPs curve and a Pareto chart."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or auto (cuda when available)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch intra-op threads (default: torch's)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Batch size of the throughput measurement."),
    warmup: int = typer.Option(5, "--warmup", help="Warm-up calls before timing latency."),
    iters: int = typer.Option(30, "--iters", help="Timed batch-1 calls per model."),
    throughput_batches: int = typer.Option(3, "--throughput-batches", help="Timed batches per model and mode."),
    batch_mode: str = typer.Option("auto", "--batch-mode", help="Batching of the trimmed model for throughput: "
                                   "pad, bucket, or auto (measure both, use the faster)."),
    fvcore_limit: Optional[int] = typer.Option(None, "--fvcore-limit", help="Count FLOPs with fvcore on the "
                                               "first N inputs only (default: all; 0: cost model only)."),
    show: int = typer.Option(0, "--show", help="Write kept-patch overlays for the first N inputs."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip malformed rows and unreadable images."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Folder for every output not given explicitly "
                                           "(default: $SMARTTRIM_HOME/profile)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Report JSON (default: OUT/report.json)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="FLOPs histogram PNG (default: OUT/flops_hist.png)."),
    layers_plot: Optional[Path] = typer.Option(None, "--layers-plot", help="Per-layer kept tokens/heads PNG "
                                               "(default: OUT/layers.png)."),
    pareto_plot: Optional[Path] = typer.Option(None, "--pareto-plot", help="Pareto chart PNG of the sweep "
                                               "(default: OUT/pareto.png)."),
    show_dir: Optional[Path] = typer.Option(None, "--show-dir", help="Folder of the overlays (default: OUT/show)."),
    min_speedup: Optional[float] = typer.Option(None, "--min-speedup", help="Gate: fail (exit 1) if the speedup "
                                                "is below this."),
    max_drop: Optional[float] = typer.Option(None, "--max-drop", help="Gate: fail (exit 1) if the reference's "
                                             "score - trimmed score exceeds this many points."),
    reference: Optional[str] = typer.Option(None, "--reference", help="The model the trimmed one is scored against "
                                            "(`full`, `drop`, the gate). Default: the one MODEL_DIR records it was "
                                            "fine-tuned from (hash checked), else MODEL_DIR itself. A directory "
                                            "(e.g. the original, moved) or `self` (the profiled weights at full "
                                            "capacity)."),
    speedup_metric: str = typer.Option("gmacs", "--speedup-metric", help="Speedup the gate reads: gmacs "
                                       "(deterministic), latency (batch-1 p50) or throughput."),
    max_new_tokens: int = typer.Option(16, "--max-new-tokens", help="Text-generating models (LLaVA): greedy "
                                       "tokens per answer; timings decode exactly this many."),
):
    """Measure the full and the trimmed model on the same inputs: score, GMACs, latency, throughput, memory."""
    from ..profiling.report import raise_if_failed, render
    from ..profiling.runner import ProfileSettings, parse_sweep, run_profile

    s = ProfileSettings(model_dir=model_dir, dataset=dataset, data_dir=data_dir, split=split, limit=limit,
                        threshold=threshold, reference=reference, sweep=parse_sweep(sweep), device=device, threads=threads,
                        batch_size=batch_size, warmup=warmup, iters=iters, throughput_batches=throughput_batches,
                        fvcore_limit=fvcore_limit, batch_mode=batch_mode, show=show, skip_bad=skip_bad,
                        out_dir=out_dir, json_path=json_path, plot_path=plot, layers_path=layers_plot,
                        pareto_path=pareto_plot, show_dir=show_dir, min_speedup=min_speedup, max_drop=max_drop,
                        speedup_metric=speedup_metric, max_new_tokens=max_new_tokens, command="smarttrim " + " ".join(sys.argv[1:]))
    res = run_profile(s, console=console)
    render(res.report, console)
    raise_if_failed(res.report)
