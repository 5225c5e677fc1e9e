"""Mean and spread over seeds of SmartTrim training variants already trained by ``benchmarks/pareto.py``
(issue 19's teacher screening): one row per variant, against the base model and the equal-steps control.

    python benchmarks/seed_table.py --dataset easyvqa --budget normal --ratio 0.33 --seeds 0,1,2 \\
        --variant "self=" --variant "none=distill_weight=0" --variant "start=teacher=start" ... \\
        [--out benchmarks/results/teacher_easyvqa]

Each ``--variant LABEL=SET[;SET...]`` names the ``--set KEY=VALUE`` settings the runs were trained with
(``pareto.py --ratios R --set SET ... [--set seed=N] --train-only``; seed 0 adds no ``seed`` setting, as
pareto names it). The runs are found by pareto's own naming (``pareto.run_name``) in the demo folder; a
run that is missing is reported, never trained here. The numbers are each run's own end-of-training evaluation
(finetune: the first ``val_limit`` validation inputs in hard mode at its calibrated threshold; the base and the
control evaluated by the same code on the same inputs), so every variant is scored identically. The resolved
objective settings of each run are read back from its stamp and printed, so the table says what was trained.

Writes <out>.json (every run), <out>.md (the table) and <out>.png (each seed's score and GMACs ratio per
variant). Not a test.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from pareto import run_name

ROOT = Path(__file__).resolve().parent.parent
OBJECTIVE_KEYS = ("distill_weight", "teacher", "teacher_task_weight", "distill_schedule", "distill_weight_end",
                  "distill_temperature", "feature_weight")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="easyvqa", choices=("easyvqa", "scenes"))
    ap.add_argument("--budget", default="normal", choices=("normal", "long"))
    ap.add_argument("--ratio", type=float, default=0.33)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--place", default="", help="pareto's placement tag of the runs' base copy, as in their folder "
                    "names (the scenes recipe: --place=-vision0.2_fusenearest, with '=' since it starts with '-')")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL=SET[;SET...]")
    ap.add_argument("--folder", default=None, help="the demo folder (default: $SMARTTRIM_HOME/demo-<dataset>[-long])")
    ap.add_argument("--out", default=None)
    return ap.parse_args(argv)


def _stamp(folder: Path, name: str) -> dict | None:
    f = folder / f".{name}.done.json"
    return json.loads(f.read_text())["result"] if f.is_file() else None


def _spread(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "min": min(xs), "max": max(xs)}


def collect(args) -> dict:
    from smarttrim_cli.model_dir import workspace
    from smarttrim_cli.train.config import parse_sets

    folder = Path(args.folder) if args.folder else workspace() / (
        f"demo-{args.dataset}" + ("-long" if args.budget == "long" else ""))
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    base, control = _stamp(folder, "base"), _stamp(folder, "control")
    if base is None:
        raise SystemExit(f"{folder}: no trained base model (run benchmarks/pareto.py first)")
    full = base["final"]["score"] * 100
    ctl = control["final"]["score"] * 100 if control else None
    rows = []
    for spec in args.variant:
        label, _, sets = spec.partition("=")
        extra = parse_sets([x for x in sets.split(";") if x.strip()])
        runs, missing = [], []
        for seed in seeds:
            ex = dict(extra, **({"seed": seed} if seed else {}))
            name = run_name(args.ratio, args.place, None, ex)
            r = _stamp(folder, name)
            if r is None:
                missing.append(name)
                continue
            cal = r.get("calibrated") or r["final"]
            runs.append({"seed": seed, "run": name, "score": cal["score"] * 100, "ratio": cal["ratio_mean"],
                         "threshold": cal.get("threshold"), "steps": r["steps"],
                         "objective": {k: r["config"].get(k) for k in OBJECTIVE_KEYS},
                         "compute_seconds_per_step": r.get("compute_seconds_per_step")})
        row = {"variant": label, "sets": sets, "runs": runs, "missing": missing}
        if runs:
            row["score"] = _spread([x["score"] for x in runs])
            row["ratio"] = _spread([x["ratio"] for x in runs])
            row["vs_full"] = row["score"]["mean"] - full
            row["vs_control"] = None if ctl is None else row["score"]["mean"] - ctl
        rows.append(row)
    return {"benchmark": "seed_table", "dataset": args.dataset, "budget": args.budget, "target_ratio": args.ratio,
            "seeds": seeds, "folder": str(folder), "val_inputs": base["final"]["n"], "full": full, "control": ctl,
            "command": "python " + " ".join(["benchmarks/seed_table.py"] + sys.argv[1:]), "variants": rows}


def markdown(out: dict) -> str:
    ctl = out["control"]
    lines = [f"{out['dataset']} at target {out['target_ratio']:g}: "
             f"{out['val_inputs']} validation inputs; full (base) {out['full']:.2f}"
             + (f", equal-steps control {ctl:.2f}" if ctl is not None else ""), "",
             "| variant (`--set`) | " + " | ".join(f"seed {s}" for s in out["seeds"])
             + " | mean ± sd | vs full | vs control | GMAC cut (mean) |",
             "|---" * (len(out["seeds"]) + 5) + "|"]
    for r in out["variants"]:
        by = {x["seed"]: x for x in r["runs"]}
        cells = [f"{by[s]['score']:.2f} at {by[s]['ratio']:.3f}" if s in by else "–" for s in out["seeds"]]
        if r["runs"]:
            tail = [f"{r['score']['mean']:.2f} ± {r['score']['sd']:.2f}", f"{r['vs_full']:+.2f}",
                    "–" if r["vs_control"] is None else f"{r['vs_control']:+.2f}", f"{1 / r['ratio']['mean']:.2f}×"]
        else:
            tail = ["–"] * 4
        lines.append(f"| {r['variant']} (`{r['sets'] or 'no --set'}`) | " + " | ".join(cells + tail) + " |")
    return "\n".join(lines) + "\n"


def chart(path: Path, out: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in out["variants"] if r["runs"]]
    fig, ax = plt.subplots(figsize=(1.3 * len(rows) + 3, 4))
    for i, r in enumerate(rows):
        ys = [x["score"] for x in r["runs"]]
        ax.scatter([i] * len(ys), ys, color="tab:blue", alpha=0.6)
        ax.hlines(r["score"]["mean"], i - 0.25, i + 0.25, color="tab:blue")
    ax.axhline(out["full"], color="black", ls="--", lw=1, label=f"full (base) {out['full']:.1f}")
    if out["control"] is not None:
        ax.axhline(out["control"], color="gray", ls=":", lw=1, label=f"equal-steps control {out['control']:.1f}")
    ax.set_xticks(range(len(rows)), [r["variant"] for r in rows])
    ax.set_ylabel("score (%)")
    ax.set_title(f"{out['dataset']}: teacher variants at target {out['target_ratio']:g}, seeds "
                 f"{','.join(map(str, out['seeds']))} (bar: mean)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    from smarttrim_cli.atomic import write_json

    args = parse_args(argv)
    out = collect(args)
    md = markdown(out)
    print(md)
    for r in out["variants"]:
        for x in r["runs"]:
            print(f"  {r['variant']} seed {x['seed']}: {x['run']} {x['objective']}")
        if r["missing"]:
            print(f"  {r['variant']}: not trained yet: {', '.join(r['missing'])}")
    if args.out:
        stem = Path(args.out)
        stem.parent.mkdir(parents=True, exist_ok=True)
        write_json(stem.with_suffix(".json"), out)
        stem.with_suffix(".md").write_text(md)
        chart(stem.with_suffix(".png"), out)
        print(f"wrote {stem}.json, .md, .png")


if __name__ == "__main__":
    main()
