"""``smarttrim compare`` as a library call: SmartTrim against the training-free baselines at matched cost.

    from smarttrim_cli.profiling.compare_runner import CompareSettings, run_compare
    result = run_compare(CompareSettings(model_dir="smarttrim-out/finetuned", dataset="easyvqa", limit=500))
    result.report["comparison"]["margin"], result.report["comparison"]["best_baseline"]

Steps: (1) the dataset's first ``limit`` inputs are evaluated and the next ``calib_limit`` held apart
(profiling/compare.py split_inputs); (2) the reference (the model the user brought, reference.py) at full
capacity, SmartTrim (MODEL_DIR in hard mode) and each baseline, acting on the reference since they need no
training, calibrated on the held-apart inputs to SmartTrim's measured mean GMACs ratio (and to each of
``ratios``), all evaluated on the same inputs by the same code (compare_models); (3) paired differences,
the gate, the JSON report and the Pareto chart. Costs are the cost model's (fvcore's convention, equal to
fvcore's count of the hard forward: tested), per input as at batch 1.

Models whose output kind is ``text`` (decoder VLMs) take the same steps on batch-1 prompts
(compare_generation.py): prefill GMACs, the greedy answer's VQA score, the baselines that run on the family's
style, and a second view with each baseline calibrated to SmartTrim's mean kept image tokens.
"""
from __future__ import annotations

import datetime as _dt
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..atomic import write_json
from ..devices import resolve_device
from ..errors import SmartTrimError
from ..reference import resolve_reference
from . import compare as cmp
from . import compare_generation as cg
from . import compare_report as rp
from . import latency as lt
from .report import CONVENTION

RETRIEVAL_DATASETS = ("coco-captions", "flickr30k")


@dataclass
class CompareSettings:
    model_dir: str | Path | None = None
    dataset: str = "easyvqa"
    data_dir: str | Path | None = None
    split: str | None = None
    limit: int | None = 500                 # evaluated inputs (0 or None: all but the calibration inputs)
    calib_limit: int = 128                  # held apart for the baselines' calibration
    baselines: list | None = None           # None: the training-free ones for the model's family style
    ratios: list = field(default_factory=list)       # more target ratios for the baselines
    thresholds: list = field(default_factory=list)   # more SmartTrim thresholds (its curve)
    threshold: float | None = None          # None: the model's
    reference: str | Path | None = None     # None: the one config.json records (else itself); "self"; a directory
    tol: float = 0.02
    match_tol: float = 0.03
    batch_size: int | None = None           # None: 32 (classifiers); text models evaluate each prompt alone
    max_new_tokens: int | None = None       # text models: greedy answer length (None: 16)
    device: str = "cpu"
    threads: int | None = None
    skip_bad: bool = False
    out_dir: str | Path | None = None       # default: $SMARTTRIM_HOME/compare
    json_path: str | Path | None = None
    plot_path: str | Path | None = None
    min_margin: float | None = None
    max_drop: float | None = None
    command: str | None = None


@dataclass
class CompareResult:
    report: dict
    files: dict


def default_out_dir() -> Path:
    from ..model_dir import workspace

    return workspace() / "compare"


def parse_baselines(text: str | None) -> list[str]:
    """--baselines: comma-separated names of training-free baselines (baselines/ registry)."""
    from ..baselines import BASELINES

    if text is None:
        return list(cmp.DEFAULT_BASELINES)
    names = [x.strip() for x in str(text).split(",") if x.strip()]
    if not names:
        raise SmartTrimError("--baselines: no baseline named (e.g. --baselines evit,tome)")
    free = [n for n, i in BASELINES.items() if i.kind != "training"]
    for n in names:
        if n not in BASELINES:
            raise SmartTrimError(f"--baselines: unknown baseline {n!r} (known: {', '.join(free)})")
        if BASELINES[n].kind == "training":
            raise SmartTrimError(f"--baselines: {n} needs a training run, which compare does not do (training-free: "
                                 f"{', '.join(free)})")
    return list(dict.fromkeys(names))


def _check(s: CompareSettings):
    if s.threshold is not None and not 0.0 <= float(s.threshold) <= 1.0:
        raise SmartTrimError(f"--threshold must be in [0, 1], got {s.threshold}")
    if s.limit is not None and int(s.limit) < 0:
        raise SmartTrimError(f"--limit must be >= 0 (0: every input but the calibration ones), got {s.limit}")
    if s.limit is not None and int(s.limit) == 0:
        s.limit = None
    if int(s.calib_limit) < 1:
        raise SmartTrimError(f"--calib-limit must be >= 1, got {s.calib_limit}")
    if s.batch_size is not None and int(s.batch_size) < 1:
        raise SmartTrimError(f"--batch-size must be >= 1, got {s.batch_size}")
    for name in ("tol", "match_tol"):
        if not 0.0 < float(getattr(s, name)) < 1.0:
            raise SmartTrimError(f"--{name.replace('_', '-')} must be in (0, 1), got {getattr(s, name)}")
    for r in s.ratios:
        if not 0.0 < float(r) <= 1.0:
            raise SmartTrimError(f"--ratios: ratio {r:g} is outside (0, 1]")
    for t in s.thresholds:
        if not 0.0 <= float(t) <= 1.0:
            raise SmartTrimError(f"--thresholds: threshold {t:g} is outside [0, 1]")
    if s.baselines is not None:  # None: the ones that run on the model's family style (after loading)
        if not s.baselines:
            raise SmartTrimError("--baselines: no baseline named (e.g. --baselines evit,tome)")
        s.baselines = parse_baselines(",".join(s.baselines))


def baselines_for(model, names) -> list[str]:
    """``names`` (None: every training-free baseline for the model's family style, registry order), each checked
    to run on that style (baselines' ``BaselineInfo.styles``)."""
    from ..backbones import family_of
    from ..baselines import BASELINES

    style = family_of(model).style
    ok = [n for n, i in BASELINES.items() if i.kind != "training" and style in i.styles]
    if names is None:
        return list(cmp.DEFAULT_BASELINES) if style == "ported" else ok
    bad = [n for n in names if style not in BASELINES[n].styles]
    if bad:
        raise SmartTrimError(f"--baselines: {', '.join(bad)} do(es) not run on this model ({style} family; these "
                             f"do: {', '.join(ok)})")
    return list(names)


@lt.keeps_torch_threads
def run_compare(s: CompareSettings, console=None) -> CompareResult:
    """Compare (see the module docstring); torch's thread count is restored afterwards."""
    return _run(s, console)


def _run(s: CompareSettings, console) -> CompareResult:
    from .. import load
    from ..data import canonical_name
    from .runner import ProfileSettings, progress_bar, open_profiled_split

    t0 = time.perf_counter()
    _check(s)
    if str(s.dataset).strip().lower() != "scenes" and canonical_name(s.dataset) in RETRIEVAL_DATASETS:
        raise SmartTrimError(f"--dataset {s.dataset}: retrieval is not supported by compare yet (profile measures "
                             "recall@k of the trimmed model)")
    device = resolve_device(s.device)
    threads = lt.set_threads(s.threads)
    loaded = load(s.model_dir, mode="hard", device=device)
    model = loaded.model
    if model.config.task == "retrieval":
        raise SmartTrimError(f"{loaded.source}: a retrieval model; retrieval is not supported by compare yet")
    if loaded.tokenizer is None:
        raise SmartTrimError(f"{loaded.source}: no tokenizer/ folder, so questions cannot be tokenized")
    text = cg.is_text(model)  # the output kind decides, never the family's name
    if text:
        cg.check_options(s)
    elif s.max_new_tokens is not None:
        raise SmartTrimError("--max-new-tokens: only for a text-generating model (this one has a classifier head)")
    s.baselines = baselines_for(model, s.baselines)
    # training-free baselines need no fine-tune: they act on the model the user brought
    ref = resolve_reference(loaded.source, loaded.config, s.reference)
    base = model if ref.is_self else load(ref.path, mode="hard", device=device).model
    total = None if s.limit is None else int(s.limit) + int(s.calib_limit)
    if text:
        name, split, ds, ev, cal = cg.split_inputs(s, loaded, total)
    else:
        name, split, ds = open_profiled_split(ProfileSettings(dataset=s.dataset, data_dir=s.data_dir, split=s.split,
                                                              limit=total, skip_bad=s.skip_bad), loaded)
        limit = s.limit if s.limit is not None else max(len(ds) - int(s.calib_limit), 0)
        ev, cal = cmp.split_inputs(loaded, ds, limit, s.calib_limit, s.batch_size or 32)
    ev.to(device)
    cal.to(device)
    thr = float(model.threshold if s.threshold is None else s.threshold)
    steps = 2 + len(set(s.thresholds) - {thr}) + len(s.baselines) * (1 + len(s.ratios) + int(text))
    with progress_bar(console) as prog, torch.no_grad():
        tid = prog.add_task(f"compare on {len(ev)} inputs", total=steps)
        res = cmp.compare_models(model, base, ev, cal.batches, threshold=thr, thresholds=s.thresholds,
                                 ratios=s.ratios, names=s.baselines, tol=s.tol,
                                 token_matched=text,  # text models: also the baselines at matched image tokens
                                 on_row=lambda row: prog.advance(tid))
    report = _assemble(s, loaded, ref, name, split, ds, ev, cal, res, device, threads)
    out_dir = Path(s.out_dir) if s.out_dir else default_out_dir()
    files = {"json": str(Path(s.json_path) if s.json_path else out_dir / "compare.json"),
             "pareto": str(Path(s.plot_path) if s.plot_path else out_dir / "pareto.png")}
    rows = [m for m in report["methods"] if m["role"] != "reference"]
    cmp.methods_chart(files["pareto"], rows, report["methods"][0],
                     title=f"{Path(report['settings']['model_dir']).name} on {name}/{split}: SmartTrim vs training-free "
                           f"baselines ({len(ev)} inputs)", ylabel=f"{report['metric']} (%)")
    report["files"] = files
    report["gate"] = rp.evaluate_gate(report, s.min_margin, s.max_drop)
    report["wall_seconds"] = time.perf_counter() - t0
    write_json(files["json"], report, allow_nan=False)  # strict JSON: other programs read the report
    return CompareResult(report, files)


def _row(r: dict, role: str, match_tol: float) -> dict:
    """A method row with every documented key (null where it does not apply)."""
    out = {k: r.get(k) for k in ("name", "family", "n", "accuracy", "accuracy_se", "gmacs_mean", "gmacs_std",
                                 "gmacs_p10", "gmacs_p50", "gmacs_p90", "gmacs_ratio", "gmacs_reduction",
                                 "image_tokens_mean", "image_tokens_full", "threshold", "target_ratio", "target_tokens",
                                 "calibration", "params", "paired", "per_input")}
    out["role"] = role
    out["matched"] = (None if role != "baseline" else
                      abs(r["gmacs_ratio"] - r["target_ratio"]) <= match_tol)
    for k in ("by_objects", "by_kind", "spearman_tokens_objects"):
        if k in r:
            out[k] = r[k]
    return out


def _assemble(s, loaded, ref, name, split, ds, ev, cal, res, device, threads) -> dict:
    from .accuracy import metric_name

    text = isinstance(ev, cg.TextEvalSet)
    mt = float(s.match_tol)
    methods = ([_row(res["full"], "reference", mt), _row(res["smarttrim"], "smarttrim", mt)]
               + [_row(r, "smarttrim-sweep", mt) for r in res["sweep"]]
               + [_row(r, "baseline", mt) for r in res["baselines"]]
               + [_row(r, "baseline-tokens", mt) for r in res["token_matched"]])
    st = methods[1]
    target = res["target_ratio"]
    at = [m for m in methods if m["role"] == "baseline" and abs(m["target_ratio"] - target) < 1e-9]
    # a baseline that could not get down to SmartTrim's cost is left out; one that stays cheaper (a coarse grid)
    # counts: scoring higher at a lower cost beats SmartTrim all the same
    within = [m for m in at if m["gmacs_ratio"] <= target + mt]
    best = max(within, key=lambda m: m["accuracy"]) if within else None
    full = methods[0]
    comparison = {"best_baseline": best and best["name"], "best_baseline_accuracy": best and best["accuracy"],
                  "best_baseline_gmacs_ratio": best and best["gmacs_ratio"],
                  "margin": best and best["paired"]["margin"], "margin_se": best and best["paired"]["margin_se"],
                  "drop": full["accuracy"] - st["accuracy"],
                  "left_out": [m["name"] for m in at if m not in within]}
    ev_ids, cal_ids = [_id(i) for i in ev.ids], [_id(i) for i in cal.ids]
    return {
        "schema": rp.SCHEMA, "schema_version": rp.SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": s.command or " ".join(sys.argv), "wall_seconds": None,
        "convention": CONVENTION, "machine": lt.machine_info(device), "versions": lt.versions(),
        "settings": {"model_dir": str(loaded.source), "dataset": name,
                     "data_dir": str(getattr(ds, "data_dir", s.data_dir)), "split": split, "limit": s.limit,
                     "calib_limit": int(s.calib_limit), "n_inputs": len(ev), "calib_inputs": len(cal),
                     "skipped": dict(getattr(ds, "skipped", {}) or {}), "threshold": st["threshold"],
                     "thresholds": [float(t) for t in s.thresholds], "ratios": [float(r) for r in s.ratios],
                     "baselines": list(s.baselines), "reference": None if s.reference is None else str(s.reference),
                     "tol": float(s.tol), "match_tol": mt,
                     "batch_size": 1 if isinstance(ev, cg.TextEvalSet) else int(s.batch_size or 32),
                     "max_new_tokens": ev.max_new_tokens if isinstance(ev, cg.TextEvalSet) else None,
                     "device": str(device),
                     "threads": threads},
        "inputs": {"evaluated": ev.indices, "calibration": cal.indices, "evaluated_ids": ev_ids,
                   "calibration_ids": cal_ids, "disjoint": not (set(ev.indices) & set(cal.indices))},
        "reference": ref.to_dict(), "target_ratio": target, "target_tokens": res.get("target_tokens"),
        "metric": "vqa_score_generated" if text else metric_name(loaded.model.config.task),
        "methods": methods, "comparison": comparison, "gate": None,
        "table": cmp.markdown_table(methods, full), "files": None,
    }


def _id(x):
    return x if x is None or isinstance(x, (int, str)) else str(x)
