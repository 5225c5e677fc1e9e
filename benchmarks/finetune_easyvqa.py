"""SmartTrim fine-tuning on easy-VQA: a small METER-style base model, then SmartTrim at 2x and 3x fewer FLOPs.

    python benchmarks/finetune_easyvqa.py [--out DIR] [--limit 12000] [--val-limit 2000] [--threads 1]
                                          [--ratios 0.5 0.33] [--quick] [--json benchmarks/results/finetune_easyvqa.json]

Stages (each a `smarttrim finetune` run through the library, recipe recipes/easyvqa.yaml):
  1. init      a METER-architecture model (the demo's "normal" size: 64 px images, patch 8, width 128, 4 ViT
               blocks, 2 text layers, 2 co-attention layers) with random weights, saved as a METER Lightning
               .ckpt with a word-level tokenizer, and attached (default trimmer placement)
  2. base      finetune --no-trim (the recipe's `no_trim:` settings): the model a user would bring
  3. control   finetune --no-trim from the base for as many steps as a SmartTrim run: the equal-steps
               control (extra training alone can move the score) and the plain-step timing
  4. trimmed   finetune (SmartTrim) from the base at each target ratio

Recorded (printed and written to --json): accuracy (easy-VQA test questions, VQA score = accuracy here) of
the base, the control and each trimmed model (at its calibrated threshold, and at 0.5), the mean FLOPs
ratio and its spread (std, p10, p90) in hard mode, and seconds per optimizer step of the self-distillation
step relative to a plain fine-tune step (same batch, same data, same process settings). Goal: at 3x fewer
FLOPs, at most 1 point below the base model. Not a test: numbers depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

SIZE = dict(image_size=64, patch_size=8, vision_width=128, vision_layers=4, vision_heads=4, text_hidden=128,
            text_layers=2, text_heads=4, text_intermediate=256, hidden=128, cross_layers=2, cross_heads=4,
            cross_intermediate=256, max_text_len=24)
QUICK = dict(image_size=32, patch_size=8, vision_width=32, vision_layers=2, vision_heads=2, text_hidden=32,
             text_layers=1, text_heads=2, text_intermediate=64, hidden=32, cross_layers=1, cross_heads=2,
             cross_intermediate=64, max_text_len=24)


def build_init(root: Path, size: dict, seed: int) -> Path:
    import torch.nn as nn

    from smarttrim_cli.attach import attach
    from smarttrim_cli.backbones.meter import MeterConfig, MeterModel, lightning_checkpoint
    from smarttrim_cli.checkpoint_io import save_lightning_checkpoint
    from smarttrim_cli.data.easyvqa import EASYVQA_ANSWERS, easyvqa_data_dir
    from smarttrim_cli.tokenizers_local import write_word_tokenizer

    rows = json.loads((easyvqa_data_dir() / "train" / "questions.json").read_text())
    tok = write_word_tokenizer(root / "tokenizer", [r[0] for r in rows])
    n_vocab = len((tok / "vocab.txt").read_text().splitlines())
    torch.manual_seed(seed)
    cfg = MeterConfig(task="vqa", num_labels=len(EASYVQA_ANSWERS), text_family="bert", vocab_size=n_vocab,
                      max_position=64, text_type_vocab=2, pad_token_id=0, text_eps=1e-12,
                      extra={"tokenizer": "bert"}, **size)
    model = MeterModel(cfg)
    for m in model.modules():  # METER/BERT initialisation
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    save_lightning_checkpoint(lightning_checkpoint(model), root / "init.ckpt")
    (root / "answers.json").write_text(json.dumps(list(EASYVQA_ANSWERS)))
    attach(root / "init.ckpt", root / "init", tokenizer=tok, answers=root / "answers.json")
    return root / "init"


def run_stage(name, src, out, overrides, log):
    from smarttrim_cli.train.loop import finetune

    t = time.time()
    res = finetune(src, out, recipe="easyvqa.yaml", overrides=overrides, progress=False)
    s = res.summary
    log(f"  {name}: {s['steps']} steps in {time.time() - t:.0f} s ({s['seconds_per_step']:.3f} s/step, "
        f"{s['compute_seconds_per_step']:.3f} s/step without data loading)")
    return s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="smarttrim-out/bench-finetune-easyvqa")
    ap.add_argument("--limit", type=int, default=12000, help="training questions (of 38,575)")
    ap.add_argument("--val-limit", type=int, default=2000, help="test questions evaluated (of 9,673)")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.33])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: on a shared 2-core machine more threads "
                    "spin against other processes and run several times slower)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny model, few steps: checks the script runs")
    ap.add_argument("--json", default="benchmarks/results/finetune_easyvqa.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    root = Path(a.out)
    root.mkdir(parents=True, exist_ok=True)
    log = lambda m: print(m, flush=True)  # noqa: E731
    t0 = time.time()

    common = {"limit": a.limit, "val_limit": a.val_limit, "seed": a.seed, "workers": 1, "eval_before": False}
    trim_extra = {}
    if a.quick:
        common.update(limit=128, val_limit=64)
        trim_extra = {"max_steps": 8}
    log(f"[1/4] init model ({'quick' if a.quick else 'demo normal'} size)")
    init = build_init(root, QUICK if a.quick else SIZE, a.seed)
    log("[2/4] base model: finetune --no-trim")
    base = run_stage("base", init, root / "base", {**common, "trim": False, **({"max_steps": 16} if a.quick else {})}, log)
    base_score = base["best"]["score"]
    log(f"  base accuracy {base_score:.4f}")

    results = {}
    steps_trim = None
    for r in a.ratios:
        log(f"[3/4] SmartTrim at target ratio {r}")
        s = run_stage(f"trim {r}", root / "base", root / f"trimmed-{r}", {**common, "target_ratio": r, **trim_extra}, log)
        steps_trim = s["steps"]
        cal, best = s["calibrated"] or {}, s["best"] or s["final"]
        results[str(r)] = {
            "target_ratio": r, "selected": s["selected"], "seconds_per_step": s["seconds_per_step"],
            "compute_seconds_per_step": s["compute_seconds_per_step"], "steps": s["steps"],
            "calibrated": {k: cal.get(k) for k in ("threshold", "score", "ratio_mean", "ratio_std", "ratio_p10",
                                                   "ratio_p90", "gmacs_mean")},
            "at_threshold_0.5": {k: best.get(k) for k in ("score", "ratio_mean", "ratio_std", "ratio_p10",
                                                          "ratio_p90", "gmacs_mean")},
            "drop_vs_base_points": 100 * (base_score - cal.get("score", float("nan"))),
        }
        log(f"  accuracy {cal.get('score', float('nan')):.4f} at FLOPs ratio {cal.get('ratio_mean', float('nan')):.3f}"
            f" ± {cal.get('ratio_std', float('nan')):.3f} (threshold {cal.get('threshold', float('nan')):.3f}); "
            f"{results[str(r)]['drop_vs_base_points']:+.2f} points vs base")

    log("[4/4] equal-steps control: finetune --no-trim from the base, same steps as a SmartTrim run")
    from smarttrim_cli.train.config import build_config
    trim_cfg, _ = build_config("easyvqa.yaml", {"dataset": "easyvqa"})
    control = run_stage("control", root / "base", root / "control",
                        {**common, "trim": False, "max_steps": steps_trim, "lr": trim_cfg.lr,
                         "warmup": trim_cfg.warmup}, log)
    plain_sps = control["compute_seconds_per_step"]
    for v in results.values():  # forward + backward + optimizer step, data loading excluded
        v["step_time_vs_plain"] = v["compute_seconds_per_step"] / plain_sps if plain_sps else None

    out = {
        "benchmark": "finetune_easyvqa", "quick": a.quick, "threads": a.threads, "machine": platform.platform(),
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "model": QUICK if a.quick else SIZE, "train_questions": base["train_inputs"], "test_questions": base["val_inputs"],
        "base": {"score": base_score, "steps": base["steps"], "seconds_per_step": base["seconds_per_step"]},
        "control_equal_steps": {"score": control["best"]["score"], "steps": control["steps"],
                                "seconds_per_step": control["seconds_per_step"], "compute_seconds_per_step": plain_sps},
        "trimmed": results, "wall_s": time.time() - t0,
        "goal": "at 3x fewer FLOPs (ratio 0.33), at most 1 point below the base model",
    }
    r33 = results.get("0.33")
    if r33:
        out["goal_met"] = bool(r33["drop_vs_base_points"] <= 1.0 and r33["calibrated"]["ratio_mean"] <= 0.34)
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    log(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
