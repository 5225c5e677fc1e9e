"""smarttrim demo [--quick | --long] [--fresh] [--dataset easyvqa|scenes|vqa] [--data-dir DIR] [--backbone B]"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..cli import app, console, user_errors


@app.command()
@user_errors
def demo(
    dataset: str = typer.Option("easyvqa", "--dataset", help="easyvqa (bundled with its pip package), scenes "
                                "(synthetic multi-object scenes, generated and cached) or vqa (any folder in the "
                                "VQAv2 format, answer vocabulary from its train split)."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="The VQAv2-format folder for --dataset vqa; "
                                            "for scenes, where to generate (or reuse) the set."),
    out_dir: Optional[Path] = typer.Option(None, "-o", "--output", help="Demo folder (default: "
                                           "./smarttrim-out/demo-<dataset>[-quick|-long])."),
    quick: bool = typer.Option(False, "--quick", help="A tiny model and a few steps: checks the pipeline in about "
                               "a minute; the numbers mean nothing."),
    long: bool = typer.Option(False, "--long", help="About 3x the training of the default (the budgets of "
                              "benchmarks/pareto.py), in demo-<dataset>-long."),
    fresh: bool = typer.Option(False, "--fresh", help="Retrain everything instead of reusing an earlier run."),
    target_ratio: Optional[float] = typer.Option(None, "--target-ratio", help="GMACs of the trimmed model / full "
                                                 "model that the curriculum aims at (default: 0.33 for meter, 0.6 "
                                                 "for llava, whose tower and text tokens are not trimmed)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch and onnxruntime."),
    seed: int = typer.Option(0, "--seed"),
    baselines: bool = typer.Option(True, "--baselines/--no-baselines", help="Compare with the training-free "
                                   "baselines at the trimmed model's cost."),
    backbone: str = typer.Option("meter", "--backbone", help="meter (a small METER, answers classified) or llava "
                                 "(a small LLaVA-1.5-architecture Hugging Face model, answers generated in words)."),
):
    """The whole pipeline on data that needs no download: train a small METER (or, --backbone llava, a small
    LLaVA answering in words) as the 'existing VLM', attach trimmers, fine-tune them (self-distillation where the
    recipe asks for it: scenes', not easy-VQA's), profile, export to ONNX, one table."""
    from ..demo import DemoSettings, run_demo

    s = DemoSettings(dataset=dataset, data_dir=str(data_dir) if data_dir else None,
                     out_dir=str(out_dir) if out_dir else None, quick=quick, long=long, fresh=fresh,
                     target_ratio=target_ratio, seed=seed, threads=threads, baselines=baselines,
                     backbone=backbone)
    res = run_demo(s, console=console, say=lambda m: console.rule(f"[bold]{m}"))
    f, t, r = res["full"], res["trimmed"], res["ratios"]
    fmt = lambda v, p="{:.2f}": "–" if v is None else p.format(v)  # noqa: E731
    ctl = res.get("control") or {}
    tab = Table(title=f"smarttrim demo ({s.dataset}{'' if s.size == 'normal' else ', ' + s.size}): the model SmartTrim "
                      f"started from vs trimmed, threshold {t['threshold']:.4g}", title_justify="left")
    tab.add_column("")
    tab.add_column("original", justify="right")
    tab.add_column("control", justify="right")
    tab.add_column("trimmed", justify="right")
    tab.add_column("trimmed vs original", justify="right")
    vs_ctl = None if ctl.get("score") is None or t["score"] is None else t["score"] - ctl["score"]
    tab.add_row(f"{res['metric']} (%)", fmt(f["score"]), fmt(ctl.get("score")), fmt(t["score"]),
                f"{fmt(0.0 - r['score_drop_points'] + 0.0, '{:+.2f}')} pt")  # + 0.0: no '-0.00'
    tab.add_row("GMACs / input (fvcore)", fmt(f["gmacs"], "{:.4f}"), "same", fmt(t["gmacs"], "{:.4f}"),
                f"{fmt(r['gmacs_speedup'])}× less")
    tab.add_row("CPU latency b=1 p50 (ms)", fmt(f["cpu_latency_ms_p50"]), "same", fmt(t["cpu_latency_ms_p50"]),
                f"{fmt(r['cpu_latency_speedup'])}× faster")
    if f.get("cpu_inputs_per_s"):
        tab.add_row(f"CPU throughput b={res.get('throughput_batch_size')} (/s)",
                    fmt(f["cpu_inputs_per_s"], "{:.0f}"), "same", fmt(t["cpu_inputs_per_s"], "{:.0f}"),
                    f"{fmt(r.get('cpu_throughput_speedup'))}× faster")
    tab.add_row("onnxruntime latency b=1 (ms)", fmt(f["ort_latency_ms"]), "same", fmt(t["ort_latency_ms"]),
                f"{fmt(r['ort_latency_speedup'])}× faster")
    tab.caption = (f"original: the model SmartTrim was fine-tuned from. control: the original fine-tuned "
                   f"{ctl.get('steps') or 'as many'} steps more without trimming, what the extra training alone "
                   f"gives (trimmed vs control: {fmt(vs_ctl, '{:+.2f}')} pt). The trimmed model's own weights at "
                   f"full capacity score {fmt(res.get('same_weights_full'))}.")
    tab.caption_justify = "left"
    console.print(tab)
    if (r.get("cpu_latency_speedup") or 0) < 1 and f["gmacs"] < 1:
        # measured: at 0.09 GMACs the trimmers' per-call cost is a few ms, as large as the work they save
        console.print(f"[yellow]note:[/] this model does {f['gmacs']:.2f} GMACs per input, so at batch 1 the trimmers' "
                      "fixed per-call cost (small matmuls, top-k, gathers) outweighs the work they save; batched "
                      "throughput shows the saving, and at METER size batch-1 latency follows the GMACs "
                      "(BENCHMARKS.md sections 2-3).", highlight=False)
    if res.get("baselines"):
        bt = Table(title="same inputs, same cost model: SmartTrim vs training-free baselines on the base model, "
                         "calibrated to the trimmed model's mean GMACs", title_justify="left")
        for c in ("method", f"{res['metric']} (%)", "GMACs / input", "ratio to full", "image tokens kept"):
            bt.add_column(c, justify="left" if c == "method" else "right")
        objs = any(b.get("spearman_tokens_objects") is not None for b in res["baselines"])
        if objs:
            bt.add_column("tokens vs objects (Spearman)", justify="right")
        for b in res["baselines"]:
            cells = [b["name"], fmt(b["accuracy"]), fmt(b["gmacs_mean"], "{:.4f}"), fmt(b["gmacs_ratio"], "{:.3f}"),
                     fmt(b["image_tokens_mean"], "{:.1f}")]
            if objs:
                cells.append(fmt(b.get("spearman_tokens_objects"), "{:+.2f}"))
            bt.add_row(*cells)
        console.print(bt)
    g = res.get("generation")
    if g:
        console.print(f"kept image tokens: {fmt(g['image_tokens']['kept']['mean'], '{:.1f}')} of "
                      f"{g['image_tokens']['full']} on average (the tower and the text tokens are not trimmed); "
                      f"exact match of the generated answers: {fmt(g['exact_match']['full'])}% original, "
                      f"{fmt(g['exact_match']['trimmed'])}% trimmed (the VQA score above counts one annotator's "
                      "answer as 0.3 where a dataset has only one, as easy-VQA does)", highlight=False)
    if res.get("objects"):
        ob = res["objects"]
        console.print("kept image tokens by objects in the image: " + ", ".join(
            f"{r['objects']}: {fmt(r['image_tokens_final_mean'], '{:.1f}')}" for r in ob["by_objects"])
            + f" (Spearman {fmt(ob['spearman_tokens'], '{:+.2f}')}: {ob['direction']})", highlight=False)
    console.print(f"ONNX validation: {'[green]passed' if res['onnx_validation_ok'] else '[red]FAILED'}[/]; "
                  f"{res['wall_seconds'] / 60:.1f} min in all; everything is in {res['folder']}/ "
                  "(summary.json, profile/report.json and plots, baselines.json, model.onnx, export.json)")
    if not res["onnx_validation_ok"]:
        raise typer.Exit(1)
