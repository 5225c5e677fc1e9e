"""Accuracy against mean GMACs: SmartTrim at several target ratios and every baseline, side by side in ONE run.

    python benchmarks/pareto.py --dataset easyvqa|scenes [--quick] [--ratios 0.5,0.33,0.2] [--steps N]
                                [--limit N] [--threads N] [--out benchmarks/results] [--no-evit-ft] [--fresh]
                                [--set KEY=VALUE] [--fuse] [--token-layers SPEC] [--head-layers SPEC]
                                [--train-only] ...

What runs (every model starts from the same base model, every method is evaluated by the same code on
the same validation inputs: profiling/compare.py):
  base       the base model of ``smarttrim demo --long`` (its stages, cached in $SMARTTRIM_HOME/demo-<dataset>-long,
             or -quick with --quick; reused when the demo ran there, else trained here): "full" = this model;
             ``--budget normal``: the plain ``smarttrim demo``'s base, budgets and folder (demo-<dataset>)
  control    finetune --no-trim continued from the base with exactly the SmartTrim runs' settings and
             steps (same data, order, optimizer, schedule): the equal-steps control, so that the gain of
             extra training is not credited to trimming
  smarttrim  finetune (SmartTrim self-distillation) at each target ratio; the keep threshold is chosen on
             the baselines' calibration inputs by finetune's rule (the trained 0.5 unless the mean ratio
             exceeds the target by over 3% of it, then raised: train/evaluation.py calibrate_threshold)
  evit-ft    fixed-ratio EViT ([CLS]-attention top-k at the trimmer positions) whose backbone is fine-tuned
             by the same training loop with the same self-distillation objective, settings and steps
             (train/loop.py under baselines/evit_finetuned.py's EViTRule),
             keep ratio calibrated to each target on the base model; with --fuse it fuses dropped tokens
             exactly as SmartTrim does
  training-free baselines on the base model, each calibrated to each target ratio on separate
             validation batches: random, evit, evit-fusion, tome, static-heads, downsample

Written to --out (default benchmarks/results/): pareto_<dataset>[_quick].json (every number, settings,
machine, load, timings), .png (accuracy vs mean GMACs), .md (the table and the goal verdicts) and, for
scenes, pareto_<dataset>_objects.png (kept image tokens against the number of objects, per method, at
the ratio nearest 3x). Trained models are cached in the demo folder (smarttrim-r<ratio>, evit-ft-r<ratio>,
control[-<steps>]), so a second run only evaluates.

Goals (issue 6 / 9): at a 3x GMAC reduction SmartTrim within 1 point (scenes: 1.5) of the full model and
at least 2 points (scenes: 5) above the best baseline; on scenes, kept tokens that grow with the number of
objects. Not a test: the script prints plainly where a goal is missed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

from smarttrim_cli.demo import (DEMO_BASELINES, DemoSettings, Stage, control_name,
                                control_overrides, control_stage, eval_data, prepare, recipe_trim, train_control,
                                train_trimmed, trim_overrides, with_trimmers)
from smarttrim_cli.train.config import TRIM_ONLY, run_settings

GOALS = {"easyvqa": {"max_drop": 1.0, "min_margin": 2.0}, "scenes": {"max_drop": 1.5, "min_margin": 5.0},
         "vqa": {"max_drop": 1.0, "min_margin": 2.0}}
CLS_RULES = ("evit", "evit-fusion", "evit-mass")  # training-free [CLS]-attention rules
# --set keys in TRIM_ONLY (train/config.py) go to the SmartTrim runs only (the rest, schedule and optimizer, also to
# the control and evit-ft), of which the fine-tuned EViT shares these with SmartTrim (the same objective: issue 9)
OBJECTIVE = {"distill_weight", "distill_temperature", "teacher", "feature_weight", "teacher_task_weight",
             "distill_schedule", "distill_weight_end"}


def cls_mass_baseline():
    """Analysis only: an ADAPTIVE training-free [CLS]-attention rule, to see which way such rules move with the
    number of objects (fixed-ratio top-k keeps the same count on every input). At each pruning position keep
    the fewest live tokens whose share of the [CLS] attention (over the live non-[CLS] tokens) reaches ``m``
    ("top-p" of the attention; concentrated attention keeps few tokens, spread attention many); ``m`` is
    calibrated to the GMACs target like a keep ratio. Hard mode only."""
    import torch

    from smarttrim_cli.baselines.common import RatioBaseline, record_tokens, token_positions
    from smarttrim_cli.baselines.evit import EViTPolicy

    class MassPolicy(EViTPolicy):
        def token_step(self, model, name, st, c, ctx, key):
            if name not in self.names or self.keep_ratio >= 1.0:
                return
            att = self.score(model, name, st, st.valid, c, ctx, key).float()
            live = (st.valid > 0).clone()
            live[:, 0] = False
            a = att.masked_fill(~live, 0.0)
            a = a / a.sum(1, keepdim=True).clamp_min(1e-12)
            order = torch.sort(a, dim=1, descending=True, stable=True).indices
            before = a.gather(1, order).cumsum(1) - a.gather(1, order)  # mass of the tokens ranked above
            keep_sorted = (before < self.keep_ratio) & live.gather(1, order)
            keep = torch.zeros_like(live).scatter(1, order, keep_sorted)
            keep[:, 0] = st.valid[:, 0] > 0
            st._gather(keep)
            record_tokens(st, ctx, key)

    class EViTMass(RatioBaseline):
        name = "evit-mass"

        def policy(self, model):
            return MassPolicy(token_positions(model, self.layers), self.keep_ratio)

    return EViTMass()


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="easyvqa", choices=("easyvqa", "scenes"))
    ap.add_argument("--quick", action="store_true", help="tiny model, a few steps: checks the harness")
    ap.add_argument("--budget", choices=("long", "normal"), default="long",
                    help="long: the `demo --long` base and budgets (section 6/7 of BENCHMARKS.md); normal: the plain "
                    "`smarttrim demo` base and budgets, sharing the demo's cache (what a first-time user sees)")
    ap.add_argument("--ratios", default="0.5,0.33,0.2", help="target mean GMACs ratios (trimmed / full)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps of every fine-tune (control, "
                    "SmartTrim, evit-ft); default: the demo's SmartTrim budget")
    ap.add_argument("--limit", type=int, default=None, help="validation inputs evaluated (default: the demo's "
                    "val_limit)")
    ap.add_argument("--calib-inputs", type=int, default=128, help="validation inputs the baselines calibrate on")
    ap.add_argument("--batch-size", type=int, default=64, help="evaluation batch size")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--no-evit-ft", action="store_true", help="skip the fine-tuned EViT baseline")
    ap.add_argument("--evit-ft-ratios", default=None, help="ratios at which to train the fine-tuned EViT baseline "
                    "(default: every --ratios value)")
    ap.add_argument("--baselines", default=",".join(DEMO_BASELINES), help="training-free baselines (plus "
                    "evit-mass: an adaptive [CLS]-attention rule for the objects analysis, not a baseline)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra SmartTrim training setting (schedule settings also apply to the control and evit-ft, "
                    "objective settings such as distill_weight or teacher to evit-ft); cache-keyed")
    ap.add_argument("--evit-set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra training setting of the fine-tuned EViT runs only (e.g. distill_weight=0, to give "
                    "the baseline the objective that suits it best); cache-keyed")
    ap.add_argument("--train-only", action="store_true", help="train (and cache) the runs, evaluate nothing: "
                    "lets several processes train different ratios; a last run without it evaluates")
    ap.add_argument("--no-smarttrim", action="store_true", help="with --train-only: leave the SmartTrim runs to "
                    "another process (e.g. this one trains only evit-ft)")
    ap.add_argument("--no-control", action="store_true", help="do not train the control: with --train-only leave it to "
                    "another process; otherwise evaluate the control already on disk even if its settings (e.g. "
                    "--set seed=...) differ from this run's")
    ap.add_argument("--token-layers", default=None, metavar="SPEC",
                    help='token-trimmer placement for SmartTrim and evit-ft instead of the base model\'s, e.g. '
                    '"vision=0,2" (streams not named keep theirs): a copy of the base with the trimmers re-placed '
                    "(default: the recipe's `trim: token_layers`, if any)")
    ap.add_argument("--head-layers", default=None, metavar="SPEC",
                    help='head-trimmer placement for SmartTrim instead of the base model\'s, e.g. "xtext= ximage=" '
                    '(an empty list turns a stream\'s head trimmers off; the fine-tuned EViT trims no heads)')
    ap.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=None,
                    help="SmartTrim (and evit-ft) merge the tokens each trimmer drops into one (TrimConfig.fuse, "
                    "trim/fusion.py), from a copy of the base with fusion on (default: the recipe's `trim: fuse`)")
    ap.add_argument("--fuse-mode", choices=("single", "nearest"), default=None,
                    help="with fusion: merge the dropped tokens into one (single) or each into the closest kept token "
                    "or that one (nearest) (default: the recipe's `trim: fuse_mode`, else single)")
    ap.add_argument("--fresh", action="store_true")
    return ap.parse_args(argv)


def smarttrim_threshold(m, cal, target: float) -> float:
    """SmartTrim's keep threshold, chosen like every baseline's setting: on the calibration inputs (not the
    evaluated ones), by finetune's end-of-run rule (train/evaluation.py calibrate_threshold: the trained threshold
    0.5 unless the mean ratio exceeds the target by over 3% of it, then raised)."""
    import contextlib

    from smarttrim_cli.train.config import TrainConfig
    from smarttrim_cli.train.distributed import DistInfo
    from smarttrim_cli.train.evaluation import calibrate_threshold

    m.threshold = m.trim_config.threshold = 0.5
    thr, _ = calibrate_threshold(m, cal, DistInfo(), target, contextlib.nullcontext,
                                 TrainConfig().calibrate_tolerance * target)
    return thr


def run_name(ratio: float, place: str, steps: int | None, extra: dict, demo_target: float = 0.33) -> str:
    """The cached SmartTrim run's folder in the demo folder: the demo's own ``trimmed`` when nothing differs from
    it, else ``smarttrim-r<ratio><placement>[-<steps>][-<key><value>...]`` (``--set`` order)."""
    if abs(ratio - demo_target) < 1e-9 and not extra and not steps and not place:
        return "trimmed"
    return f"smarttrim-r{ratio:g}{place}" + (f"-{steps}" if steps else "") + (
        "-" + "-".join(f"{k}{v}" for k, v in extra.items()) if extra else "")


def _say(msg):
    print(f"== {msg}", flush=True)


def command_line() -> str:
    """How this benchmark was invoked, the script relative to the repository (what a report records)."""
    return "python " + " ".join([os.path.relpath(sys.argv[0], ROOT) if sys.argv[0].endswith(".py") else sys.argv[0]]
                                + sys.argv[1:])


def run(args) -> dict:
    from smarttrim_cli import load
    from smarttrim_cli.baselines.evit_finetuned import EViTFinetuned, EViTRule, keep_ratio_for
    from smarttrim_cli.profiling import compare, objects
    from smarttrim_cli.profiling.latency import machine_info
    from smarttrim_cli.train.loop import finetune
    from smarttrim_cli.train.config import parse_sets

    t0 = time.time()
    ratios = [float(x) for x in args.ratios.split(",") if x.strip()]
    extra = parse_sets(args.set)
    evit_extra = parse_sets(args.evit_set)
    s = DemoSettings(dataset=args.dataset, quick=args.quick,
                     long=not args.quick and args.budget == "long", threads=args.threads, seed=args.seed,
                     fresh=args.fresh)
    p0 = p = prepare(s, console=None, say=_say)
    r_layers, r_fuse, r_mode = recipe_trim(p.recipe)
    fuse = r_fuse if args.fuse is None else args.fuse
    fuse_mode = r_mode if args.fuse_mode is None else args.fuse_mode
    if args.token_layers is None:
        args.token_layers = r_layers
    if args.token_layers or fuse:  # the control does not trim: it keeps p0, the original base
        p = with_trimmers(p, args.token_layers, fuse, say=_say, fuse_mode=fuse_mode)
    pe = p  # evit-ft trims no heads: head placement does not change (or retrain) it
    if args.head_layers:
        p = with_trimmers(p0, args.token_layers, fuse, say=_say, head_layers=args.head_layers, fuse_mode=fuse_mode)
    place = "" if p is p0 else "-" + p.base_name.removeprefix("base-")
    place_e = "" if pe is p0 else "-" + pe.base_name.removeprefix("base-")
    steps = args.steps
    timings = {"prepare_s": time.time() - t0}
    runs = {}

    # (a) equal-steps control
    t = time.time()
    ctl_extra = {k: v for k, v in extra.items() if k not in TRIM_ONLY}
    ctl_name = control_name(steps)
    st = control_stage(p0, control_overrides(p0, steps, ctl_extra), steps)
    if args.no_control and not args.train_only and not st.stamp.is_file():
        raise SystemExit(f"--no-control: no trained control in {p0.root / ctl_name} to evaluate (run once without it)")
    if not args.no_control:  # --no-control: another process trains it, or evaluate the one on disk as it is
        st = train_control(p0, steps, ctl_extra, say=_say, progress=False)
    runs["control"] = {"dir": str(p0.root / ctl_name), "summary": _brief(st.result()) if st.stamp.is_file() else {},
                       **({"settings": "as cached (--no-control)"} if args.no_control else {})}
    timings["control_s"] = time.time() - t

    # (b) SmartTrim at each ratio
    st_dirs = {}
    if args.no_smarttrim and not args.train_only:
        raise SystemExit("--no-smarttrim only goes with --train-only (the evaluation needs the SmartTrim runs)")
    for r in ([] if args.no_smarttrim else ratios):
        t = time.time()
        ex = dict(extra)
        if steps:
            ex["max_steps"] = steps
        name = run_name(r, place, steps, extra, s.target_ratio)
        stg = train_trimmed(p, r, name=name, say=lambda m: _say(f"{m} [{name}]"), extra=ex or None)
        st_dirs[r] = p.root / name
        runs[f"smarttrim@{r:g}"] = {"dir": str(p.root / name), "summary": _brief(stg.result())}
        timings[f"smarttrim@{r:g}_s"] = time.time() - t

    # evaluation data and the base model
    base_loaded = load(pe.base_dir, mode="hard")
    base = base_loaded.model  # the full model; evit-ft calibrates its keep ratio on it
    limit = args.limit or p.budget["trim"]["val_limit"]
    ev, cal = eval_data(p, base_loaded, limit, args.calib_inputs, args.batch_size)
    ev.set_full_gmacs(base)
    _say(f"evaluating on {len(ev)} validation inputs ({p.val_split}); baselines calibrate on {sum(len(b['target']) for b in cal)}")

    # (d) EViT with a fine-tuned backbone, one run per ratio
    evit_dirs = {}
    if not args.no_evit_ft:
        ft_ratios = ([float(x) for x in args.evit_ft_ratios.split(",") if x.strip()] if args.evit_ft_ratios
                     else ratios)
        for r in ft_ratios:
            t = time.time()
            keep = keep_ratio_for(base, cal, r)
            # schedule and objective settings: trimming settings (cost_weight, floor_weight, ...) do not apply to a fixed ratio
            ov = trim_overrides(pe, r, {**{k: v for k, v in extra.items() if k not in TRIM_ONLY or k in OBJECTIVE},
                                       **({"max_steps": steps} if steps else {}), **evit_extra})
            named = {**{k: v for k, v in extra.items() if k in OBJECTIVE}, **evit_extra}
            name = f"evit-ft-r{r:g}{place_e}" + (f"-{steps}" if steps else "") + (
                "-" + "-".join(f"{k}{v}" for k, v in named.items()) if named else "")
            stg = Stage(pe.root, name, {**pe.base_key, "evit_ft": run_settings(pe.recipe, ov), "keep_ratio": round(keep, 6)},
                         args.fresh)
            if not stg.done() or stg.stamp.stat().st_mtime < pe.base_stage.stamp.stat().st_mtime:
                _say(f"evit-ft at {r:g}: keep ratio {keep:.3f} per pruning position, backbone fine-tuned with "
                     "SmartTrim's objective")
                res = finetune(pe.base_dir, pe.root / name, recipe=pe.recipe, overrides=ov, progress=False,
                               rule=EViTRule(keep))
                stg.finish(res.summary)
            evit_dirs[r] = pe.root / name
            runs[f"evit-ft@{r:g}"] = {"dir": str(pe.root / name), "summary": _brief(stg.result())}
            timings[f"evit-ft@{r:g}_s"] = time.time() - t

    if args.train_only:
        _say(f"trained (or found cached): {', '.join(runs)}; evaluation skipped (--train-only)")
        return {"runs": runs, "timings": timings}

    # evaluate everything with the same code
    t = time.time()
    _say("evaluating: full, control, SmartTrim, evit-ft, training-free baselines")
    full = ev.evaluate("full (base)", lambda b: base.run(b, mode="full", record=True), family="full")
    ctl = load(p0.root / ctl_name, mode="hard").model
    control = ev.evaluate("full + equal-steps fine-tune (control)", lambda b: ctl.run(b, mode="full", record=True),
                          family="control")
    rows = []
    for r in ratios:
        m = load(st_dirs[r], mode="hard").model
        saved, thr = float(m.threshold), smarttrim_threshold(m, cal, r)
        m.threshold = m.trim_config.threshold = thr
        rows.append(ev.evaluate(f"SmartTrim @{r:g}", lambda b, m=m: m.run(b, mode="hard", record=True),
                                family="SmartTrim", target_ratio=r, threshold=thr, saved_threshold=saved))
        _print_row(rows[-1], full, control)
    for r in sorted(evit_dirs, reverse=True):
        if r in evit_dirs:
            m = load(evit_dirs[r], mode="hard").model
            bl = EViTFinetuned.from_dir(evit_dirs[r])
            trained_keep = bl.keep_ratio
            bl.calibrate(m, cal, r, tol=0.01, strict=False)
            a = bl.apply(m)
            rows.append(ev.evaluate(f"EViT fine-tuned @{r:g}", lambda b, a=a: a.run(b, record=True),
                                    family="EViT + self-distillation (fine-tuned)", target_ratio=r,
                                    keep_ratio=bl.keep_ratio, trained_keep_ratio=trained_keep,
                                    calibration=bl.calibration))
            _print_row(rows[-1], full, control)
    # the training-free baselines: the evaluation `smarttrim compare` and the demo run (profiling/compare.py)
    rows += compare.evaluate_baselines(base, ev, cal, ratios, [n for n in args.baselines.split(",") if n], tol=0.02,
                                       label="{name} @{ratio:g}", factories={"evit-mass": cls_mass_baseline},
                                       on_row=lambda row: _print_row(row, full, control))
    timings["evaluate_s"] = time.time() - t

    verdict = goals(args.dataset, ratios, rows, full, control)
    out = {
        "benchmark": "pareto", "dataset": args.dataset, "quick": args.quick,
        "command": command_line(),
        "ratios": ratios, "steps": steps or p.budget["trim"], "eval_inputs": len(ev), "eval_split": p.val_split,
        "calibration_inputs": sum(len(b["target"]) for b in cal), "demo_folder": str(p.root),
        "model_size": p.base_key["size"], "base_model_val": _brief(p.base_stage.result()),
        "machine": {**machine_info(torch.device("cpu")), "platform": platform.platform(),
                    "load_average_end": os.getloadavg()},
        "torch_threads": torch.get_num_threads(), "timings": timings, "wall_s": time.time() - t0,
        "runs": runs, "full": full, "control": control, "methods": rows, "goals": verdict,
    }
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    stem = f"pareto_{args.dataset}" + ("_quick" if args.quick else "")

    title = (f"{args.dataset}: accuracy vs mean GMACs ({len(ev)} {p.val_split} inputs; every fine-tune "
             f"{_steps_text(out['steps'])} from the same base)")
    out["files"] = {"json": str(outdir / f"{stem}.json"), "png": str(outdir / f"{stem}.png"),
                    "md": str(outdir / f"{stem}.md")}
    compare.methods_chart(outdir / f"{stem}.png", rows, full, title=title, control=control)
    if any(o is not None for o in ev.objects):
        near = min(ratios, key=lambda r: abs(r - 1 / 3))
        series = {"full": full["by_objects"], **{r_["name"]: r_["by_objects"] for r_ in rows
                                                if r_.get("target_ratio") == near}}
        objects.lines_chart(outdir / f"{stem}_objects.png", series, full_value=ev.n_image_tokens,
                            title=f"{args.dataset}: kept image tokens against objects at {1 / near:.1f}x fewer GMACs")
        out["files"]["objects_png"] = str(outdir / f"{stem}_objects.png")
    save_report(outdir, stem, out, markdown(out))
    return out


def save_report(outdir: Path, stem: str, out: dict, md: str) -> None:
    """<stem>.md and <stem>.json (each written whole or not at all), and the table on stdout."""
    from smarttrim_cli.atomic import atomic_path

    with atomic_path(outdir / f"{stem}.md") as tmp:
        tmp.write_text(md)
    with atomic_path(outdir / f"{stem}.json") as tmp:
        tmp.write_text(json.dumps(out, indent=2, default=str))
    print(md)


def _steps_text(steps):
    if isinstance(steps, int):
        return f"{steps} steps"
    if steps.get("max_steps"):
        return f"{steps['max_steps']} steps"
    return f"{steps.get('epochs')} epochs of {steps.get('limit')} questions"


def _brief(summary: dict) -> dict:
    if not summary:
        return {}
    keep = ("mode", "steps", "steps_per_epoch", "selected", "seconds_per_step", "wall_s", "keep_ratio", "target_ratio")
    out = {k: summary.get(k) for k in keep if k in summary}
    for k in ("best", "final", "calibrated"):
        v = summary.get(k)
        if isinstance(v, dict):
            out[k] = {x: v.get(x) for x in ("score", "ratio_mean", "ratio_std", "threshold", "step") if x in v}
    return out


def _print_row(r, full, control):
    print(f"   {r['name']:<34} {r['accuracy']:6.2f}% (Δfull {r['accuracy'] - full['accuracy']:+.2f}, Δcontrol "
          f"{r['accuracy'] - control['accuracy']:+.2f})  {r['gmacs_mean']:.4f} GMACs  ratio {r['gmacs_ratio']:.3f}"
          + (f"  tokens~objects rho {r['spearman_tokens_objects']:+.2f}" if r.get("spearman_tokens_objects")
             is not None else ""), flush=True)


def goals(dataset, ratios, rows, full, control) -> dict:
    """The issue's goals at the ratio nearest 3x, and (scenes) the direction of kept tokens vs objects."""
    g = GOALS[dataset]
    near = min(ratios, key=lambda r: abs(r - 1 / 3))
    at = [r for r in rows if r.get("target_ratio") == near]
    st = next((r for r in at if r["family"] == "SmartTrim"), None)
    others = [r for r in at if r["family"] != "SmartTrim"]
    best = max(others, key=lambda r: r["accuracy"]) if others else None
    out = {"ratio": near, "reduction_target": 1 / near}
    if st is None:
        return out
    drop = full["accuracy"] - st["accuracy"]
    drop_ctl = control["accuracy"] - st["accuracy"]
    out.update({"smarttrim_accuracy": st["accuracy"], "smarttrim_gmacs_ratio": st["gmacs_ratio"],
                "smarttrim_reduction": st["gmacs_reduction"], "target_reached": st["gmacs_ratio"] <= near + 0.02,
                "drop_vs_full": drop, "drop_vs_control": drop_ctl,
                "max_drop": g["max_drop"], "within_drop_of_full": drop <= g["max_drop"],
                "within_drop_of_control": drop_ctl <= g["max_drop"]})
    if best is not None:
        margin = st["accuracy"] - best["accuracy"]
        out.update({"best_baseline": best["name"], "best_baseline_accuracy": best["accuracy"],
                    "best_baseline_gmacs_ratio": best["gmacs_ratio"], "margin_over_best_baseline": margin,
                    "min_margin": g["min_margin"], "margin_met": margin >= g["min_margin"]})
    if st.get("spearman_tokens_objects") is not None:
        out["smarttrim_tokens_vs_objects_spearman"] = st["spearman_tokens_objects"]
        out["smarttrim_tokens_grow_with_objects"] = st["spearman_tokens_objects"] > 0.1
        out["cls_rules_tokens_vs_objects_spearman"] = {r["name"]: r.get("spearman_tokens_objects") for r in at
                                                       if r["family"] in CLS_RULES}
    return out


def markdown(out: dict) -> str:
    from smarttrim_cli.profiling.compare import markdown_table

    full, control, rows = out["full"], out["control"], out["methods"]
    lines = [f"### Pareto: {out['dataset']}{' (quick)' if out['quick'] else ''}", "",
             f"Command: `{out['command']}`  ", f"Evaluated on {out['eval_inputs']} {out['eval_split']} inputs; "
             f"baselines calibrated on {out['calibration_inputs']} other validation inputs; every fine-tune "
             f"{_steps_text(out['steps'])} from the same base model; machine: {out['machine'].get('cpu_count')} CPUs, "
             f"{out['torch_threads']} torch thread(s), load average at the end {out['machine']['load_average_end'][0]:.1f}; "
             f"wall {out['wall_s'] / 60:.0f} min.", "",
             "Accuracy ± standard error over the inputs; Δ full / Δ control: points against the untrimmed base model "
             "and against the base fine-tuned for the same steps without trimming; GMACs from the cost model "
             "(fvcore convention), p10–p90 = spread over the inputs; ρ = Spearman correlation of kept image tokens "
             "with the number of objects (scenes).", "",
             markdown_table([full, control] + sorted(rows, key=lambda r: (-(r.get("target_ratio") or 1), r["name"])),
                            full, control), ""]
    g = out["goals"]
    if "drop_vs_full" in g:
        lines += [f"**At {g['reduction_target']:.1f}× ({g['ratio']:g} of the GMACs; SmartTrim measured "
                  f"{g['smarttrim_reduction']:.2f}×{'' if g['target_reached'] else ', TARGET NOT REACHED'})**: "
                  f"SmartTrim {g['smarttrim_accuracy']:.2f}%, "
                  f"{-g['drop_vs_full']:+.2f} pts vs full (goal ≥ −{g['max_drop']:g}: "
                  f"{'met' if g['within_drop_of_full'] else 'MISSED by %.2f pts' % (g['drop_vs_full'] - g['max_drop'])}), "
                  f"{-g['drop_vs_control']:+.2f} pts vs the equal-steps control."]
        if "margin_over_best_baseline" in g:
            lines.append(f"Best baseline at that cost: {g['best_baseline']} {g['best_baseline_accuracy']:.2f}% → "
                         f"margin {g['margin_over_best_baseline']:+.2f} pts (goal ≥ +{g['min_margin']:g}: "
                         f"{'met' if g['margin_met'] else 'MISSED by %.2f pts' % (g['min_margin'] - g['margin_over_best_baseline'])}).")
        if "smarttrim_tokens_vs_objects_spearman" in g:
            cls = ", ".join(f"{k} {v:+.2f}" for k, v in g["cls_rules_tokens_vs_objects_spearman"].items()
                            if v is not None)
            lines.append(f"Kept image tokens vs objects (Spearman): SmartTrim {g['smarttrim_tokens_vs_objects_spearman']:+.2f} "
                         f"({'grows with objects' if g['smarttrim_tokens_grow_with_objects'] else 'does NOT grow with objects'})"
                         f"; training-free [CLS]-attention rules: {cls or 'n/a'}.")
    if any(r.get("by_objects") for r in rows):
        near = g.get("ratio")
        sel = [full] + [r for r in rows if r.get("target_ratio") == near]
        ks = sorted({b["objects"] for r in sel for b in r.get("by_objects", [])})
        lines += ["", f"Kept image tokens (mean) by number of objects at {g.get('reduction_target', 0):.1f}×:", "",
                  "| method | " + " | ".join(str(k) for k in ks) + " | ρ |", "|---|" + "---|" * (len(ks) + 1)]
        for r in sel:
            d = {b["objects"]: b for b in r.get("by_objects", [])}
            cells = [f"{d[k]['image_tokens_final_mean']:.1f}" if k in d else "–" for k in ks]
            rho = r.get("spearman_tokens_objects")
            lines.append(f"| {r['name']} | " + " | ".join(cells) + f" | {'–' if rho is None else f'{rho:+.2f}'} |")
        lines += ["", f"Accuracy (%) by number of objects at {g.get('reduction_target', 0):.1f}×:", "",
                  "| method | " + " | ".join(str(k) for k in ks) + " |", "|---|" + "---|" * len(ks)]
        for r in [full, control] + [r for r in rows if r.get("target_ratio") == near]:
            d = {b["objects"]: b for b in r.get("by_objects", [])}
            lines.append(f"| {r['name']} | " + " | ".join(
                f"{100 * d[k]['score_mean']:.1f}" if k in d and d[k]['score_mean'] is not None else "–" for k in ks) + " |")
    if any(r.get("by_kind") for r in rows):
        near = g.get("ratio")
        sel = [full, control] + [r for r in rows if r.get("target_ratio") == near]
        kinds = sorted({k for r in sel for k in r.get("by_kind", {})})
        lines += ["", f"Accuracy (%) by question kind at {g.get('reduction_target', 0):.1f}× (questions per kind in "
                  "the header; kept image tokens in brackets):", "",
                  "| method | " + " | ".join(f"{k} ({full.get('by_kind', {}).get(k, {}).get('n', '?')})" for k in kinds)
                  + " |", "|---|" + "---|" * len(kinds)]
        for r in sel:
            d = r.get("by_kind", {})
            lines.append(f"| {r['name']} | " + " | ".join(
                f"{d[k]['accuracy']:.1f} ({d[k]['image_tokens_final_mean']:.1f})" if k in d else "–" for k in kinds) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run(parse_args())
