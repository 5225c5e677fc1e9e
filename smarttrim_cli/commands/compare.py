"""smarttrim compare [MODEL_DIR] --dataset NAME [--baselines ...] [--ratios ...] [...]"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from ..cli import app, console, user_errors


@app.command()
@user_errors
def compare(
    model_dir: Optional[Path] = typer.Argument(None, help="The trimmed model (default: the one the last attach/"
                                               "finetune wrote, recorded in $SMARTTRIM_HOME/latest)."),
    dataset: str = typer.Option(..., "--dataset", help="vqa, nlvr2, snli or easyvqa (needs no data); "
                         "text-generating models (LLaVA): prompts, vqa, scenes or easyvqa."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Dataset folder (default: "
                                            "$SMARTTRIM_DATA/<dataset>, else ~/.cache/smarttrim/data/<dataset>; "
                                            "easy-VQA: the installed package's data)."),
    split: Optional[str] = typer.Option(None, "--split", help="Split to read (default: val; easyvqa: test)."),
    limit: Optional[int] = typer.Option(500, "--limit", help="Evaluate the first N inputs (0: all but the "
                                        "calibration inputs)."),
    calib_limit: int = typer.Option(128, "--calib-limit", help="Calibrate the baselines on the next M inputs, "
                                    "held apart from the evaluated ones."),
    baselines: Optional[str] = typer.Option(None, "--baselines", help="Comma-separated training-free baselines "
                                            "(default: those that run on the model's family: random,evit,"
                                            "evit-fusion,tome,static-heads,downsample; LLaVA: random,pool,"
                                            "visionzip,divprune,dart,fastv)."),
    ratios: Optional[str] = typer.Option(None, "--ratios", help="More target mean GMACs ratios for the baselines, "
                                         "e.g. 0.5,0.25 (default: only SmartTrim's measured ratio: matched cost)."),
    thresholds: Optional[str] = typer.Option(None, "--thresholds", help="More SmartTrim keep thresholds, e.g. "
                                             "0.3,0.7: its accuracy/GMACs curve in the chart."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="SmartTrim's keep threshold, 0-1 "
                                              "(default: the model's)."),
    reference: Optional[str] = typer.Option(None, "--reference", help="The model the baselines act on and `full` "
                                            "describes. Default: the one MODEL_DIR records it was fine-tuned from "
                                            "(hash checked), else MODEL_DIR itself. A directory or `self`."),
    tol: float = typer.Option(0.02, "--tol", help="Calibration tolerance of each baseline (absolute GMACs ratio)."),
    match_tol: float = typer.Option(0.03, "--match-tol", help="A baseline counts as at SmartTrim's cost when its "
                                    "measured ratio is within this of it on the evaluated inputs."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Evaluation batch size (default 32; "
                                             "classifier heads only)."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Text-generating models (LLaVA): "
                                                 "greedy answer length in tokens (default 16)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or auto (cuda when available)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch intra-op threads (default: torch's)."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip malformed rows and unreadable images."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Folder for every output not given explicitly "
                                           "(default: $SMARTTRIM_HOME/compare)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Report JSON (default: OUT/compare.json)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Pareto chart PNG (default: OUT/pareto.png)."),
    min_margin: Optional[float] = typer.Option(None, "--min-margin", help="Gate: fail (exit 1) if SmartTrim's "
                                               "score minus the best baseline's at matched GMACs is below this "
                                               "many points."),
    max_drop: Optional[float] = typer.Option(None, "--max-drop", help="Gate: fail (exit 1) if the reference's "
                                             "score - SmartTrim's exceeds this many points."),
):
    """SmartTrim against the training-free baselines at matched mean GMACs, paired on the same inputs (text-generating
    models: prefill GMACs and the greedy answer's VQA score, and a second view at matched mean image tokens)."""
    from ..profiling.compare_report import raise_if_failed, render
    from ..profiling.compare_runner import CompareSettings, parse_baselines, run_compare
    from ..profiling.runner import parse_sweep

    s = CompareSettings(model_dir=model_dir, dataset=dataset, data_dir=data_dir, split=split, limit=limit,
                        calib_limit=calib_limit, baselines=None if baselines is None else parse_baselines(baselines),
                        ratios=parse_sweep(ratios, "--ratios", "ratio", positive=True),
                        thresholds=parse_sweep(thresholds, "--thresholds"), threshold=threshold,
                        reference=reference, tol=tol, match_tol=match_tol, batch_size=batch_size,
                        max_new_tokens=max_new_tokens, device=device,
                        threads=threads, skip_bad=skip_bad, out_dir=out_dir, json_path=json_path, plot_path=plot,
                        min_margin=min_margin, max_drop=max_drop, command="smarttrim " + " ".join(sys.argv[1:]))
    res = run_compare(s, console=console)
    render(res.report, console)
    raise_if_failed(res.report)
