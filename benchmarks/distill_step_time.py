"""Seconds per training step of each self-distillation variant against a plain fine-tune step (issue 19's goal:
the self-distillation step within 2.2x the plain one).

    python benchmarks/distill_step_time.py [--steps 20] [--threads 1] [--repeats 1] [--base DIR] [--quick]
                                           [--out DIR] [--json benchmarks/results/distill_step_time.json]

The demo's normal-size easy-VQA model (64 px, patch 8, width 128, 4 ViT blocks, 2 text and 2 co-attention
layers), randomly initialised and attached as benchmarks/finetune_easyvqa.py builds it, or ``--base DIR`` (e.g.
the demo's trained base: trimmed-pass shapes are fixed in soft mode, so the weights barely move the time). Each
variant is a ``finetune`` run of ``--steps`` optimizer steps through the library with recipes/easyvqa.yaml
(batch 64), differing only in its settings:

    plain         --no-trim: the full-capacity model, task loss only
    none          distill_weight=0: the student pass alone (no teacher pass)
    self          the full pass of the current weights as teacher (weight 1), no gradient through it
    start         teacher=start: a frozen copy of the starting weights as teacher
    self_trained  teacher_task_weight=1: the full pass also trained on the task (a second backward)
    fade          distill_schedule=fade: the self teacher's weight falls to 0 with the curriculum (same passes)
    feature       feature_weight=1: pooled last-hidden-state distillation next to the logits

Recorded per variant: finetune's compute seconds per step (forward, backward and optimizer step, data loading
excluded, the first two steps left out as warm-up) and that over the plain step's; with ``--repeats R`` the
variants run R rounds in rotated order and the median is kept. Torch threads are stated (1 by default: on the
shared 2-core machine more threads spin against other processes). Not a test: numbers depend on the machine and
its load; run the variants compared in the same invocation.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch


from finetune_easyvqa import QUICK, SIZE, build_init

# explicit distill_weight: each variant means the same whatever the recipe's default
VARIANTS = {
    "plain": {"trim": False},
    "none": {"distill_weight": 0.0},
    "self": {"distill_weight": 1.0},
    "start": {"distill_weight": 1.0, "teacher": "start"},
    "self_trained": {"distill_weight": 1.0, "teacher_task_weight": 1.0},
    "fade": {"distill_weight": 1.0, "distill_schedule": "fade"},
    "feature": {"distill_weight": 1.0, "feature_weight": 1.0},
}
GOAL = 2.2  # the self-distillation step at most this many times the plain step


def time_variant(src: Path, out: Path, settings: dict, steps: int, batch: int, seed: int) -> dict:
    from smarttrim_cli.train.loop import finetune

    ov = {"dataset": "easyvqa", "limit": steps * batch, "val_limit": batch, "batch_size": batch, "max_steps": steps,
          "seed": seed, "workers": 1, "eval_before": False, "calibrate": False, "save_every": 0, **settings}
    t = time.time()
    s = finetune(src, out, recipe="easyvqa.yaml", overrides=ov, progress=False).summary
    return {"compute_seconds_per_step": s["compute_seconds_per_step"], "seconds_per_step": s["seconds_per_step"],
            "steps": s["steps"], "wall_s": time.time() - t}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per variant (the first 2 are warm-up)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1, help="rounds over the variants (rotated order; median kept)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    ap.add_argument("--base", default=None, help="model directory to start from (default: a fresh attached init)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny model: checks the script runs")
    ap.add_argument("--out", default="smarttrim-out/bench-distill-step-time")
    ap.add_argument("--json", default="benchmarks/results/distill_step_time.json")
    a = ap.parse_args()
    names = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or "plain" not in names:
        ap.error(f"--variants: unknown {unknown}" if unknown else "--variants must include plain (the reference)")
    torch.set_num_threads(a.threads)
    log = lambda m: print(m, flush=True)  # noqa: E731
    root = Path(a.out)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    size = QUICK if a.quick else SIZE
    if a.base:
        src = Path(a.base)
    else:
        log(f"init model ({'quick' if a.quick else 'demo normal'} size), attached")
        src = build_init(root, size, a.seed)

    runs: dict = {v: [] for v in names}
    for rep in range(a.repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for v in order:
            r = time_variant(src, root / v, VARIANTS[v], a.steps, a.batch_size, a.seed)
            runs[v].append(r)
            log(f"  round {rep + 1} {v:<13} {r['compute_seconds_per_step']:.3f} s/step "
                f"({r['seconds_per_step']:.3f} with data loading)")

    med = {v: statistics.median(r["compute_seconds_per_step"] for r in rs) for v, rs in runs.items()}
    plain = med["plain"]
    results = {v: {"compute_seconds_per_step": med[v], "vs_plain": med[v] / plain if plain else None,
                   "settings": VARIANTS[v], "runs": runs[v]} for v in names}
    out = {
        "benchmark": "distill_step_time", "quick": a.quick, "threads": torch.get_num_threads(),
        "steps_per_variant": a.steps, "batch_size": a.batch_size, "repeats": a.repeats,
        "model": "base " + a.base if a.base else size, "recipe": "easyvqa.yaml",
        "machine": platform.platform(), "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "results": results, "goal": f"self-distillation step at most {GOAL}x the plain step",
        "goal_met": None if "self" not in results else bool(results["self"]["vs_plain"] <= GOAL),
        "wall_s": time.time() - t0,
    }
    log(f"\n{torch.get_num_threads()} torch thread(s), {a.steps} steps of {a.batch_size} per variant, "
        f"median of {a.repeats}")
    log("| variant | s/step | vs plain |\n|---|---|---|")
    for v in names:
        log(f"| {v} | {med[v]:.3f} | {results[v]['vs_plain']:.2f}x |")
    if out["goal_met"] is not None:
        log(f"goal (self <= {GOAL}x plain): {'met' if out['goal_met'] else 'MISSED'}")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    log(f"written {a.json}")


if __name__ == "__main__":
    main()
