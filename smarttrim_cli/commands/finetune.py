"""smarttrim finetune [MODEL_DIR] [-o DIR] [--recipe R] [--data-dir D] [--target-ratio r] [--no-trim] [--resume]"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from ..cli import app, console, user_errors


@app.command()
@user_errors
def finetune(
    model_dir: Optional[Path] = typer.Argument(None, help="Model directory from `smarttrim attach` (default: the "
                                               "last one written, see ./smarttrim-out/latest)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Model directory to write (default: "
                                          "./smarttrim-out/finetuned; training state in <output>.state/)."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="YAML recipe whose `train:` section gives the "
                                          "settings (default: the bundled one for the dataset / task)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="vqa, nlvr2, snli, easyvqa, or coco-captions / "
                                          "flickr30k for a retrieval model; vqa, scenes, easyvqa or prompts for a "
                                          "text model such as LLaVA (label-free: --set targets=self) (default: "
                                          "recipe, else the model's task; retrieval: coco-captions; text: vqa)."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Dataset folder in its official layout "
                                            "(default: $SMARTTRIM_DATA/<dataset>; easy-VQA: the installed package)."),
    train_split: Optional[str] = typer.Option(None, "--train-split", help="Default: train."),
    val_split: Optional[str] = typer.Option(None, "--val-split", help="Default: val (VQAv2, captions), dev (NLVR2, "
                                            "SNLI-VE), test (easy-VQA)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use at most this many training inputs (and validation "
                                        "inputs, unless --val-limit)."),
    val_limit: Optional[int] = typer.Option(None, "--val-limit", help="Use at most this many validation inputs."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip malformed rows and missing or unreadable images "
                                  "(counted in the summary) instead of stopping with an error."),
    epochs: Optional[int] = typer.Option(None, "--epochs"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many optimizer steps "
                                            "(instead of --epochs)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="GLOBAL batch per optimizer step, over all "
                                             "processes and accumulation steps (METER's batch_size)."),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum", help="Gradient accumulation steps."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate of the uni-modal encoders; the cross-modal "
                                       "encoder, head and trimmers use recipe multipliers."),
    target_ratio: Optional[float] = typer.Option(None, "--target-ratio", help="Target FLOPs ratio trimmed/full "
                                                 "(0.5 = 2x fewer, 0.33 = 3x fewer)."),
    no_trim: bool = typer.Option(False, "--no-trim", help="Plain fine-tune: full model, task loss only "
                                 "(trimmers kept unchanged)."),
    freeze_backbone: bool = typer.Option(False, "--freeze-backbone", help="Train only the trimmers."),
    new_head: bool = typer.Option(False, "--new-head", help="Replace the task head with a fresh one sized to the "
                                  "dataset's labels (e.g. a VQAv2 model fine-tuned on easy-VQA)."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:N or auto (default: auto; under "
                                         "torchrun each process takes its LOCAL_RANK GPU)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Data-loading worker processes per GPU/process."),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="Checkpoint every N steps."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in <output>.state/ "
                                "(starts fresh if there is none)."),
    sets: Optional[List[str]] = typer.Option(None, "--set", help="Any training setting, KEY=VALUE (e.g. "
                                             "cost_weight=30, tau_end=0.3, distill_weight=0.5); repeatable."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
):
    """Train the trimmers (and the backbone, at a lower rate) with SmartTrim's self-distillation and a
    FLOPs curriculum; write a trimmed-model directory for `profile` and `export`."""
    from ..train.config import parse_sets
    from ..train.loop import finetune as run

    overrides = parse_sets(sets)
    cli = {"dataset": dataset, "data_dir": str(data_dir) if data_dir else None, "train_split": train_split,
           "val_split": val_split, "limit": limit, "val_limit": val_limit if val_limit is not None else limit,
           "skip_bad": True if skip_bad else None, "epochs": epochs, "max_steps": max_steps,
           "batch_size": batch_size, "grad_accum": grad_accum, "lr": lr, "target_ratio": target_ratio,
           "trim": False if no_trim else None, "train_backbone": False if freeze_backbone else None,
           "seed": seed, "workers": workers, "save_every": save_every}
    overrides.update({k: v for k, v in cli.items() if v is not None})
    res = run(model_dir, output, recipe, overrides, resume=resume, new_head=new_head, device=device,
              progress=progress, console=console)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    s = res.summary
    t = Table(title=f"smarttrim finetune ({s['mode']}, {s['dataset']})", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("inputs", f"train {s['train_inputs']:,} · validation {s['val_inputs']:,}")
    skipped = {k: sum(v.values()) for k, v in s["skipped"].items()}
    if any(skipped.values()):
        detail = "; ".join(f"{k}: " + ", ".join(f"{n} {why}" for why, n in v.items()) for k, v in s["skipped"].items() if v)
        t.add_row("skipped", detail)
    t.add_row("steps", f"{s['steps']:,} ({s['steps_per_epoch']:,}/epoch, {s['world_size']} process(es))"
              + (f", resumed at step {s['resumed_from_step']}" if s["resumed_from_step"] else ""))
    if s["base"].get("n"):
        t.add_row("starting model", f"score {s['base']['score']:.4f} (full capacity)")
    def line(r):
        out = f"score {r['score']:.4f}"
        if s["mode"] == "smarttrim":
            out += (f" · FLOPs ratio {r['ratio_mean']:.3f} ± {r['ratio_std']:.3f} (p10 {r['ratio_p10']:.2f}, "
                    f"p90 {r['ratio_p90']:.2f}) · {r['gmacs_mean']:.4g} GMACs")
        return out

    sel = s["best"] or s["final"]
    if sel.get("n"):
        t.add_row("selected weights", f"{line(sel)} — {s['selected']}")
    cal = s.get("calibrated")
    if cal and cal.get("n"):
        t.add_row("written model", f"{line(cal)} at keep threshold {cal['threshold']:.4f} (calibrated to the "
                  f"target {s['target_ratio']} on {cal['calibration_inputs']:,} validation inputs)")
    t.add_row("written to", f"{res.output} (training.png, finetune_log.jsonl, finetune_summary.json)")
    t.add_row("training state", str(res.state_dir))
    console.print(t)
    if s.get("unreachable_target"):
        u = s["unreachable_target"]
        console.print(f"[yellow]warning:[/] the target ratio {u['target']} is below {u['lowest_ratio']:.3f}, the lowest "
                      "this trimmer placement reaches: place a token trimmer earlier (attach --token-layers)")
    if s["mode"] == "smarttrim" and s["best"] is None:
        console.print("[yellow]warning:[/] no epoch reached the target FLOPs ratio at the trained threshold; the "
                      "last weights were written" + (" with a calibrated threshold" if cal else "")
                      + " (train longer, or raise cost_weight / lr_mult_trimmer)")
