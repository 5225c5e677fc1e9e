"""``smarttrim profile`` as a library call: full vs trimmed on the same inputs, in one run.

    from smarttrim_cli.profiling.runner import ProfileSettings, run_profile
    result = run_profile(ProfileSettings(model_dir="smarttrim-out/model", dataset="easyvqa", limit=100))
    result.report["flops"]["speedup"], result.report["accuracy"]["drop"]

Steps: (1) per input at batch 1 with unpadded text: a full forward and a hard (trimmed) forward with
records, the analytic cost of both, fvcore's count of both (the full one cached per text length),
the scores, and one hard forward per extra sweep threshold; (2) batch-1 latency of both models on the
first ``iters`` inputs after a warm-up; (3) throughput at ``batch_size`` (full: text padded to the
batch's longest; trimmed: ``pad`` and ``bucket`` batching measured, the faster used); (4) peak memory;
(5) the JSON report, the PNG charts and the overlays. Nothing here asserts on speed: the gate compares
the numbers with the bounds the user gave.
"""
from __future__ import annotations

import datetime as _dt
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..atomic import write_json
from ..data import batch_to_device
from ..devices import resolve_device
from ..errors import SmartTrimError
from ..trim.cost import layer_macs
from . import accuracy as acc
from . import flops as fl
from . import latency as lt
from . import objects
from . import report as rp
from ..reference import resolve_reference

DATASET_TASKS = {"vqa": "vqa", "easyvqa": "vqa", "nlvr2": "nlvr2", "snli": "snli", "coco-captions": "retrieval",
                 "flickr30k": "retrieval"}
# Karpathy's test split is where retrieval recall is reported (BLIP, ALBEF, METER)
DEFAULT_SPLITS = {"easyvqa": "test", "coco-captions": "test", "flickr30k": "test"}
BATCH_MODES = ("auto", "pad", "bucket")
_STREAM = re.compile(r"^([a-z]+)_(\d+)$")  # a transformer layer's record: <stream>_<i>
_IMAGE_TOKENS = re.compile(r"^tok:(vision|ximage)_\d+$")  # image-stream token decisions of the first image


@dataclass
class ProfileSettings:
    model_dir: str | Path | None = None
    dataset: str = "easyvqa"
    data_dir: str | Path | None = None
    split: str | None = None
    limit: int | None = 500
    threshold: float | None = None          # None: the model's default
    reference: str | Path | None = None     # None: the one config.json records (else itself); "self"; a directory
    sweep: list = field(default_factory=list)
    device: str = "cpu"
    threads: int | None = None
    batch_size: int = 16
    warmup: int = 5
    iters: int = 30
    throughput_batches: int = 3
    fvcore_limit: int | None = None         # None: every input; 0: cost model only
    batch_mode: str = "auto"
    show: int = 0
    skip_bad: bool = False
    out_dir: str | Path | None = None       # default: $SMARTTRIM_HOME/profile
    json_path: str | Path | None = None
    plot_path: str | Path | None = None     # the FLOPs histogram
    layers_path: str | Path | None = None
    pareto_path: str | Path | None = None
    show_dir: str | Path | None = None
    min_speedup: float | None = None
    max_drop: float | None = None
    speedup_metric: str = "gmacs"
    max_new_tokens: int = 16                # text-generating models: greedy tokens per answer
    command: str | None = None


@dataclass
class ProfileResult:
    report: dict
    files: dict


# ----- helpers -------------------------------------------------------------------------------------------
def _stats(values) -> dict:
    a = np.asarray(list(values), dtype=np.float64)
    if a.size == 0:
        return {"n": 0, "mean": None, "p10": None, "p50": None, "p90": None, "min": None, "max": None}
    return {"n": int(a.size), "mean": float(a.mean()), "p10": float(np.percentile(a, 10)),
            "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "min": float(a.min()), "max": float(a.max())}


def _div(a, b):
    return None if a is None or b is None or b == 0 else float(a) / float(b)


def _mb(x):
    return None if x is None else x / 2**20


def _unpad(batch: dict) -> dict:
    """Batch of one: cut the text to its real tokens (right padding), so full cost is not inflated."""
    mask = batch["attention_mask"]
    n = int(mask[0].sum())
    if n < mask.shape[1] and bool(mask[0, :n].all()):
        batch = dict(batch)
        batch["input_ids"] = batch["input_ids"][:, :n]
        batch["attention_mask"] = mask[:, :n]
        if "token_type_ids" in batch and torch.is_tensor(batch["token_type_ids"]):
            batch["token_type_ids"] = batch["token_type_ids"][:, :n]
    return batch


def _model_batch(model, batch: dict) -> dict:
    return {k: batch[k] for k in model.input_names if k in batch}


def _item_id(item: dict):
    for k in ("question_id", "identifier", "sentid", "line", "image_id"):
        if k in item:
            v = item[k]
            return v if isinstance(v, (int, str)) else str(v)
    return None


def _image_key(item: dict, index: int):
    return item.get("image_id", item.get("identifier", index))


def progress_bar(console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, transient=True, disable=console is None)


def default_out_dir() -> Path:
    from ..model_dir import workspace

    return workspace() / "profile"


def parse_sweep(text: str | None, option: str = "--sweep", what: str = "threshold",
                positive: bool = False) -> list[float]:
    """Comma-separated numbers in [0, 1] ((0, 1] when ``positive``); ``option`` and ``what`` name them in the
    one-line errors."""
    if not text:
        return []
    try:
        vals = [float(x) for x in str(text).replace(" ", ",").split(",") if x.strip()]
    except ValueError:
        raise SmartTrimError(f"{option}: expected comma-separated {what}s like 0.3,0.5,0.7, got {text!r}") from None
    for v in vals:
        if not 0.0 <= v <= 1.0 or (positive and v == 0):
            raise SmartTrimError(f"{option}: {what} {v:g} is outside {'(0' if positive else '[0'}, 1]")
    return vals


def _check(s: ProfileSettings):
    if s.threshold is not None and not 0.0 <= float(s.threshold) <= 1.0:
        raise SmartTrimError(f"--threshold must be in [0, 1], got {s.threshold}")
    for name in ("batch_size", "iters", "throughput_batches"):
        if int(getattr(s, name)) < 1:
            raise SmartTrimError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(s, name)}")
    for name in ("warmup", "show"):
        if int(getattr(s, name)) < 0:
            raise SmartTrimError(f"--{name} must be >= 0, got {getattr(s, name)}")
    if s.limit is not None and int(s.limit) < 0:
        raise SmartTrimError(f"--limit must be >= 0 (0: every input), got {s.limit}")
    if s.limit is not None and int(s.limit) == 0:
        s.limit = None
    if s.fvcore_limit is not None and int(s.fvcore_limit) < 0:
        raise SmartTrimError(f"--fvcore-limit must be >= 0, got {s.fvcore_limit}")
    if s.batch_mode not in BATCH_MODES:
        raise SmartTrimError(f"--batch-mode must be one of {', '.join(BATCH_MODES)}, got {s.batch_mode!r}")
    if s.speedup_metric not in rp.SPEEDUP_METRICS:
        raise SmartTrimError(f"--speedup-metric must be one of {', '.join(rp.SPEEDUP_METRICS)}, "
                             f"got {s.speedup_metric!r}")
    if s.min_speedup is not None and s.min_speedup <= 0:
        raise SmartTrimError(f"--min-speedup must be > 0, got {s.min_speedup}")


def open_profiled_split(s: ProfileSettings, loaded):
    """The dataset reader for this model (``loaded``: a model_dir.LoadedModel); one-line errors for a missing
    directory or a task mismatch."""
    from ..data import canonical_name, open_dataset

    name = canonical_name(s.dataset)
    model = loaded.model
    task = model.config.task
    if task != "retrieval" and DATASET_TASKS[name] != task:
        want = ", ".join(k for k, v in DATASET_TASKS.items() if v == task) or "none"
        raise SmartTrimError(f"--dataset {name} is a {DATASET_TASKS[name]} dataset but the model in "
                             f"{loaded.source} has a {task} head (use: {want})")
    labels = loaded.labels
    label2id = None
    if name in ("vqa", "easyvqa"):
        if task == "vqa":
            if not labels:
                raise SmartTrimError(f"{loaded.source}/config.json: no `labels` (the answer vocabulary), so "
                                     "VQA answers cannot be scored")
            label2id = {a: i for i, a in enumerate(labels)}
            if name == "easyvqa":
                from ..data import EASYVQA_ANSWERS

                missing = [a for a in EASYVQA_ANSWERS if a not in label2id]
                if missing:
                    raise SmartTrimError(f"{loaded.source}/config.json: the model's {len(labels)} labels lack the "
                                         f"easy-VQA answers {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
                                         f": it was not trained on easy-VQA")
    elif name == "snli" and labels and task == "snli":
        label2id = {a: i for i, a in enumerate(labels)}
    split = s.split or DEFAULT_SPLITS.get(name, "val")
    ds = open_dataset(name, s.data_dir, split, image_size=model.config.image_size, label2id=label2id,
                      limit=s.limit, skip_bad=s.skip_bad, preprocess=loaded.image_preprocessor())
    if len(ds) == 0:
        raise SmartTrimError(f"{name} {split}: no inputs to profile"
                             + (f" ({ds.skipped_summary()})" if ds.skipped_summary() else ""))
    return name, split, ds


# ----- the run ---------------------------------------------------------------------------------------------
@lt.keeps_torch_threads
def run_profile(s: ProfileSettings, console=None) -> ProfileResult:
    """Profile the full and the trimmed model (see the module docstring); torch's thread count is
    restored afterwards."""
    return _run(s, console)


def _run(s: ProfileSettings, console) -> ProfileResult:
    from .. import load
    from ..data import collate

    t_start = time.perf_counter()
    _check(s)
    device = resolve_device(s.device)
    threads = lt.set_threads(s.threads)
    loaded = load(s.model_dir, mode="hard", device=device)
    model, tokenizer = loaded.model, loaded.tokenizer
    if tokenizer is None:
        raise SmartTrimError(f"{loaded.source}: no tokenizer/ folder, so questions cannot be tokenized")
    # the scores are measured against the model the user brought, not the fine-tuned weights at full capacity
    ref = resolve_reference(loaded.source, loaded.config, s.reference)
    ref_model = None if ref.is_self else load(ref.path, mode="full", device=device).model
    from ..backbones import family_of

    if family_of(model).tasks.get(model.config.task) == "text":  # decoder VLMs: greedy generation, prefill cost
        from .generation import run_generation

        return run_generation(s, loaded, ref, ref_model, device, threads, console, t_start)
    cfg = model.config
    task = cfg.task
    pre = loaded.preprocess
    max_len = loaded.max_text_len
    threshold = float(model.threshold if s.threshold is None else s.threshold)
    name, split, ds = open_profiled_split(s, loaded)
    n = len(ds)
    fv_n = n if s.fvcore_limit is None else min(n, int(s.fvcore_limit))
    sweep = sorted({round(float(x), 6) for x in s.sweep} - {round(threshold, 6)})
    out_dir = Path(s.out_dir) if s.out_dir else default_out_dir()
    B = min(int(s.batch_size), n)
    n_lat = min(n, int(s.iters))
    n_tp = min(n, B * int(s.throughput_batches))
    keep_items = max(n_lat, n_tp, int(s.show))

    def one(item):
        return batch_to_device(_unpad(collate([item], tokenizer, max_len)), device)

    # (1) per input ---------------------------------------------------------------------------------------
    streams = set(model.stream_layers())
    rows, layer_acc, cached, shows = [], {}, {}, []
    fv_full_cache: dict[int, int] = {}
    sweep_macs = {t: [] for t in sweep}
    sweep_scores = {t: [] for t in sweep}
    retr_items = []
    with progress_bar(console) as prog, torch.no_grad():
        task_id = prog.add_task("per-input FLOPs and scores", total=n)
        for i in range(n):
            item = ds[i]
            b = one(item)
            mb = _model_batch(model, b)
            T = int(b["input_ids"].shape[1])
            lf, cf = model.run(mb, mode="full", record=True)
            lr = lf if ref_model is None else ref_model.run(mb, mode="full")[0]
            lh, ch = model.run(mb, mode="hard", threshold=threshold, record=True)
            g_full = fl.cost_model_macs(cf.records)[0] / 1e9
            g_trim = fl.cost_model_macs(ch.records)[0] / 1e9
            fv_full = fv_trim = None
            if i < fv_n:
                if T not in fv_full_cache:
                    fv_full_cache[T] = fl.fvcore_macs(model, mb, mode="full")
                fv_full = fv_full_cache[T] / 1e9
                fv_trim = fl.fvcore_macs(model, mb, mode="hard", threshold=threshold) / 1e9
            row = {"index": i, "id": _item_id(item), "text_tokens": T, "gmacs_full": g_full, "gmacs_trimmed": g_trim,
                   "fvcore_gmacs_full": fv_full, "fvcore_gmacs_trimmed": fv_trim, "image_tokens_final": None,
                   "score_full": None, "score_trimmed": None, "pred_full": None, "pred_trimmed": None,
                   "pred_full_label": None, "pred_trimmed_label": None, "score_same_weights_full": None,
                   "pred_same_weights_full": None,
                   "image_tokens_full": None, "image_keep_ratio": None, "exact_full": None, "exact_trimmed": None}
            img_keys = [k for k in ch.decisions if _IMAGE_TOKENS.match(k)]
            row["image_tokens_final"] = (int(ch.decisions[img_keys[-1]].sum()) if img_keys
                                         else int(cfg.n_patches + 1))
            for rec in ch.records:
                m = _STREAM.match(rec.name)
                if m and m.group(1) in streams and rec.kind not in ("token_trimmer", "head_trimmer"):
                    lay = layer_acc.setdefault(rec.name, {"n": [], "n_full": [], "h": [], "h2": [], "H": rec.dims.get("H"),
                                                          "macs": [], "macs_full": []})
                    lay["n"].append(float(rec.n[0]))
                    lay["n_full"].append(float(rec.n_full[0]))
                    lay["h"].append(None if rec.h is None else float(rec.h[0]))
                    lay["h2"].append(None if rec.h2 is None else float(rec.h2[0]))
                    lay["macs"].append(float(layer_macs(rec)[0]) / 1e9)
                    lay["macs_full"].append(float(layer_macs(rec, True)[0]) / 1e9)
            if task == "retrieval":
                retr_items.append((i, _image_key(item, i)))
            else:
                row["score_full"] = float(acc.instance_scores(task, lr, b["target"])[0])
                row["score_trimmed"] = float(acc.instance_scores(task, lh, b["target"])[0])
                row["score_same_weights_full"] = float(acc.instance_scores(task, lf, b["target"])[0])
                row["pred_full"], row["pred_trimmed"] = acc.predictions(lr)[0], acc.predictions(lh)[0]
                row["pred_same_weights_full"] = acc.predictions(lf)[0]
                if loaded.labels:
                    row["pred_full_label"] = loaded.labels[row["pred_full"]]
                    row["pred_trimmed_label"] = loaded.labels[row["pred_trimmed"]]
            for t in sweep:
                ls, cs = model.run(mb, mode="hard", threshold=t, record=True)
                sweep_macs[t].append(fl.cost_model_macs(cs.records)[0] / 1e9)
                if task != "retrieval":
                    sweep_scores[t].append(float(acc.instance_scores(task, ls, b["target"])[0]))
            if i < int(s.show):
                shows.append((i, item, {k: v.cpu() for k, v in ch.decisions.items()}, b["input_ids"][0].cpu(), row))
            if i < keep_items:
                cached[i] = item
            rows.append(row)
            prog.advance(task_id)

        # retrieval: rank every distinct image for every text, both models
        recall = None
        if task == "retrieval":
            recall, sweep_recall = _retrieval_scores(model, ref_model, ds, retr_items, threshold, sweep, collate,
                                                     tokenizer, max_len, device, B, prog)
            for t in sweep:
                sweep_scores[t] = sweep_recall[t]

    # (2) latency at batch 1 ------------------------------------------------------------------------------
    lat_batches = [_model_batch(model, one(cached[i])) for i in range(n_lat)]
    with torch.no_grad(), progress_bar(console) as prog:
        tid = prog.add_task("latency, batch 1", total=2)
        lat_full = lt.time_calls([lambda b=b: model.run(b, mode="full") for b in lat_batches], s.warmup, s.iters,
                                 device)
        prog.advance(tid)
        lat_trim = lt.time_calls([lambda b=b: model.run(b, mode="hard", threshold=threshold) for b in lat_batches],
                                 s.warmup, s.iters, device)
        prog.advance(tid)

    # (3) throughput at batch B ---------------------------------------------------------------------------
    order = [i % n for i in range(B * int(s.throughput_batches))]
    by_cost = sorted(order, key=lambda i: (rows[i]["gmacs_trimmed"], i))

    def batches(idx):
        return [_model_batch(model, batch_to_device(collate([cached[i] for i in idx[k:k + B]], tokenizer, max_len), device))
                for k in range(0, len(idx), B)]

    tp_full_b, tp_pad_b, tp_bucket_b = batches(order), None, None
    modes = ["pad", "bucket"] if s.batch_mode == "auto" else [s.batch_mode]
    tp_modes = {}
    with torch.no_grad(), progress_bar(console) as prog:
        tid = prog.add_task(f"throughput, batch {B}", total=1 + len(modes))
        full_tp = _throughput(lambda b: model.run(b, mode="full"), tp_full_b, device)
        prog.advance(tid)
        for mode in modes:
            bs = tp_full_b if mode == "pad" else batches(by_cost)
            if mode == "pad":
                tp_pad_b = bs
            else:
                tp_bucket_b = bs
            tp_modes[mode] = _throughput(lambda b: model.run(b, mode="hard", threshold=threshold), bs, device)
            prog.advance(tid)
    chosen = max(tp_modes, key=lambda k: tp_modes[k]["inputs_per_s"])

    # (4) peak memory ----------------------------------------------------------------------------------------
    with torch.no_grad():
        first = lat_batches[0]
        mem = {"full": {"batch_1": _mb(lt.peak_memory_bytes(lambda: model.run(first, mode="full")[0], device)),
                        "batch_n": _mb(lt.peak_memory_bytes(lambda: model.run(tp_full_b[0], mode="full")[0], device))},
               "trimmed": {"batch_1": _mb(lt.peak_memory_bytes(
                   lambda: model.run(first, mode="hard", threshold=threshold)[0], device)),
                   "batch_n": _mb(lt.peak_memory_bytes(lambda: model.run(
                       (tp_pad_b if chosen == "pad" else tp_bucket_b)[0], mode="hard", threshold=threshold)[0], device))}}

    # (5) assemble ------------------------------------------------------------------------------------------
    scenes = objects.SceneIndex.for_dataset(ds)  # synthetic scenes: objects per image (else None)
    objects.annotate(rows, scenes)
    report = _assemble(s, loaded, ref, name, split, ds, threshold, sweep, device, threads, B, fv_n, rows, layer_acc,
                       sweep_macs, sweep_scores, recall, lat_full, lat_trim, full_tp, tp_modes, chosen, mem)
    report["objects"] = objects.summary(rows, scenes, cfg.n_patches + 1) if scenes is not None else None
    files = _write_outputs(s, report, out_dir, tokenizer, shows, pre)
    with torch.no_grad():
        files.update(objects.write_outputs(report, out_dir, model, ds, one, threshold, pre, int(s.show) > 0))
    report["files"] = files
    report["gate"] = rp.evaluate_gate(report, s.min_speedup, s.max_drop, s.speedup_metric)
    report["machine"]["load_average"] = lt.machine_info(device)["load_average"]
    report["wall_seconds"] = time.perf_counter() - t_start
    write_json(files["json"], report, allow_nan=False)  # strict JSON: other programs read the report
    return ProfileResult(report, files)


def _throughput(fn, batches, device) -> dict:
    """One warm-up batch, then every batch once; inputs per second over the timed batches."""
    lt.time_calls([lambda: fn(batches[0])], 1, 0, device)
    secs = lt.time_calls([lambda b=b: fn(b) for b in batches], 0, len(batches), device)
    inputs = sum(int(b["input_ids"].shape[0]) for b in batches)
    total = float(sum(secs))
    return {"inputs_per_s": inputs / total if total > 0 else None, "seconds": total, "inputs": inputs}


def _retrieval_scores(model, ref_model, ds, items, threshold, sweep, collate, tokenizer, max_len, device, B, prog):
    """Recall@k over the distinct images of the profiled inputs, reference ("full"), the profiled weights at
    full capacity ("same_weights_full") and trimmed: text-to-image (the headline) and image-to-text from the
    same score matrix (every text against every image, ITM "match" logit as BLIP ranks). ``ref_model`` None:
    the profiled model is its own reference."""
    keys, img_index, pos = [], {}, []
    for i, key in items:
        if key not in img_index:
            img_index[key] = len(keys)
            keys.append(i)
        pos.append(img_index[key])
    thresholds = {"same_weights_full": None, "trimmed": threshold, **{f"t{t}": t for t in sweep}}
    if ref_model is not None:
        thresholds["full"] = "reference"
    scores = {k: torch.zeros(len(items), len(keys)) for k in thresholds}
    tid = prog.add_task("retrieval: every text against every image", total=len(items))
    images = [ds[i] for i in keys]
    for r, (i, _) in enumerate(items):
        text_item = ds[i]
        for c0 in range(0, len(images), B):
            chunk = [dict(img, text=text_item["text"]) for img in images[c0:c0 + B]]
            b = _model_batch(model, batch_to_device(collate(chunk, tokenizer, max_len), device))
            for k, t in thresholds.items():
                logits, _ = (ref_model.run(b, mode="full") if t == "reference" else model.run(b, mode="full")
                             if t is None else model.run(b, mode="hard", threshold=t))
                scores[k][r, c0:c0 + len(chunk)] = logits.reshape(len(chunk), -1)[:, -1].float().cpu()
        prog.advance(tid)
    if ref_model is None:
        scores["full"] = scores["same_weights_full"]
    names = ("full", "trimmed", "same_weights_full")
    rec = {**{k: acc.recall_at_k(scores[k], pos) for k in names}, "texts": len(items), "images": len(keys),
           "image_to_text": {k: acc.image_to_text_recall(scores[k], pos) for k in names}}
    sweep_rec = {t: acc.recall_at_k(scores[f"t{t}"], pos)["recall@1"] for t in sweep}
    return rec, sweep_rec


def _layers(layer_acc: dict) -> list[dict]:
    out = []
    for name, a in layer_acc.items():
        stream = _STREAM.match(name).group(1)
        tok, tok_full = float(np.mean(a["n"])), float(np.mean(a["n_full"]))
        h = [x for x in a["h"] if x is not None]
        h2 = [x for x in a["h2"] if x is not None]
        H = a["H"] or 1
        out.append({"name": name, "stream": stream, "tokens_mean": tok, "tokens_full": tok_full,
                    "tokens_kept_frac": tok / tok_full if tok_full else 1.0,
                    "heads_kept_frac": float(np.mean(h)) / H if h else None,
                    "cross_heads_kept_frac": float(np.mean(h2)) / H if h2 else None,
                    "gmacs_mean": float(np.mean(a["macs"])), "gmacs_full": float(np.mean(a["macs_full"]))})
    return out


def _assemble(s, loaded, ref, name, split, ds, threshold, sweep, device, threads, B, fv_n, rows, layer_acc, sweep_macs,
              sweep_scores, recall, lat_full, lat_trim, full_tp, tp_modes, chosen, mem) -> dict:
    model = loaded.model
    cfg, task = model.config, model.config.task
    n = len(rows)
    metric = acc.metric_name(task)
    use_fv = fv_n == n
    src = "fvcore" if use_fv else "cost_model"
    g_full = [r["fvcore_gmacs_full" if use_fv else "gmacs_full"] for r in rows]
    g_trim = [r["fvcore_gmacs_trimmed" if use_fv else "gmacs_trimmed"] for r in rows]
    rel = []
    for r in rows[:fv_n]:
        for a, b in (("fvcore_gmacs_full", "gmacs_full"), ("fvcore_gmacs_trimmed", "gmacs_trimmed")):
            rel.append(abs(r[a] - r[b]) / r[a] if r[a] else 0.0)
    fstats, tstats = _stats(g_full), _stats(g_trim)
    ratio = _div(tstats["mean"], fstats["mean"])
    if task == "retrieval":
        sc_full, sc_trim = recall["full"]["recall@1"], recall["trimmed"]["recall@1"]
        sc_same = recall["same_weights_full"]["recall@1"]
        agreement = None
    else:
        sc_full = acc.percent([r["score_full"] for r in rows])
        sc_trim = acc.percent([r["score_trimmed"] for r in rows])
        sc_same = acc.percent([r["score_same_weights_full"] for r in rows])
        agreement = acc.percent([float(r["pred_full"] == r["pred_trimmed"]) for r in rows])
    drop = None if sc_full is None or sc_trim is None else sc_full - sc_trim
    lf, ltr = lt.summarize_ms(lat_full), lt.summarize_ms(lat_trim)
    lat_speed = _div(lf["p50"], ltr["p50"])
    tp_trim = dict(tp_modes[chosen], mode=chosen)
    tp_speed = _div(tp_trim["inputs_per_s"], full_tp["inputs_per_s"])

    # the sweep curve (the main threshold included)
    sweep_rows = []
    full_mean_cm = float(np.mean([r["gmacs_full"] for r in rows]))
    curve = {threshold: ([r["gmacs_trimmed"] for r in rows], sc_trim)}
    for t in sweep:
        sc = (sweep_scores[t] if task == "retrieval" else acc.percent(sweep_scores[t]))
        curve[t] = (sweep_macs[t], sc)
    for t in sorted(curve):
        macs, sc = curve[t]
        st = _stats(macs)
        r = _div(st["mean"], full_mean_cm)
        sweep_rows.append({"threshold": t, "score": sc, "drop": None if sc is None or sc_full is None else sc_full - sc,
                           "gmacs_mean": st["mean"], "gmacs_p10": st["p10"], "gmacs_p50": st["p50"],
                           "gmacs_p90": st["p90"], "ratio": r, "speedup": _div(1.0, r)})

    tc = model.trim_config
    n_params = sum(p.numel() for p in model.backbone_parameters())
    n_trim = sum(p.numel() for p in model.trimmer_parameters())
    return {
        "schema": rp.SCHEMA, "schema_version": rp.SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": s.command or " ".join(sys.argv),
        "wall_seconds": None,
        "convention": rp.CONVENTION,
        "machine": lt.machine_info(device),
        "versions": lt.versions(),
        "settings": {"model_dir": str(loaded.source), "dataset": name, "data_dir": str(getattr(ds, "data_dir", s.data_dir)),
                     "split": split, "limit": s.limit, "n_inputs": n, "skipped": dict(getattr(ds, "skipped", {}) or {}),
                     "threshold": threshold, "reference": None if s.reference is None else str(s.reference),
                     "sweep": sweep, "device": str(device), "threads": threads,
                     "batch_size": B, "warmup": int(s.warmup), "iters": int(s.iters),
                     "throughput_batches": int(s.throughput_batches), "fvcore_inputs": fv_n,
                     "batch_mode": s.batch_mode, "max_new_tokens": None},
        "model": {"backbone": model.family, "task": task, "image_size": cfg.image_size, "patch_size": cfg.patch_size,
                  "image_tokens": cfg.n_patches + 1, "max_text_len": cfg.max_text_len, "params": n_params,
                  "params_trimmers": n_trim, "weights_mb": _mb(lt.param_bytes(model)),
                  "token_layers": {k: v for k, v in (tc.token_layers if tc else {}).items() if v},
                  "head_layers": {k: v for k, v in (tc.head_layers if tc else {}).items() if v},
                  "default_threshold": float(model.threshold)},
        "accuracy": {"metric": metric, "full": sc_full, "trimmed": sc_trim, "drop": drop, "agreement": agreement,
                     "reference": ref.to_dict(), "same_weights_full": sc_same,
                     "same_weights_drop": None if sc_same is None or sc_trim is None else sc_same - sc_trim,
                     "recall": recall},
        "flops": {"unit": "GMACs", "source": src, "full": fstats, "trimmed": tstats, "ratio": ratio,
                  "speedup": _div(1.0, ratio),
                  "fvcore_check": {"n_inputs": fv_n, "max_rel_diff": max(rel) if rel else None,
                                   "mean_rel_diff": float(np.mean(rel)) if rel else None}},
        "latency": {"batch_size": 1, "warmup": int(s.warmup), "iters": int(s.iters), "distinct_inputs": min(n, int(s.iters)),
                    "full": lf, "trimmed": ltr, "speedup": lat_speed},
        "throughput": {"batch_size": B, "batches": int(s.throughput_batches), "full": full_tp, "trimmed": tp_trim,
                       "modes": tp_modes, "speedup": tp_speed},
        "memory": {"unit": "MB", "method": ("torch.cuda.max_memory_allocated minus memory allocated before the forward"
                                            if device.type == "cuda" else
                                            "torch.profiler (profile_memory) running sum of tensor allocations"),
                   "weights_mb": _mb(lt.param_bytes(model)), "full": mem["full"], "trimmed": mem["trimmed"]},
        "ratios": {"gmacs": ratio, "latency_p50": _div(ltr["p50"], lf["p50"]), "throughput": tp_speed,
                   "memory_batch_1": _div(mem["trimmed"]["batch_1"], mem["full"]["batch_1"]),
                   "memory_batch_n": _div(mem["trimmed"]["batch_n"], mem["full"]["batch_n"])},
        "speedup": {"gmacs": _div(1.0, ratio), "latency": lat_speed, "throughput": tp_speed},
        "layers": _layers(layer_acc),
        "sweep": sweep_rows,
        "per_input": rows,
        "objects": None,
        "gate": None,
        "files": None,
        "generation": None,
    }


def _write_outputs(s, report, out_dir: Path, tokenizer, shows, pre) -> dict:
    from . import overlays, plots

    files = {"json": str(Path(s.json_path) if s.json_path else out_dir / "report.json")}
    rows = report["per_input"]
    src = report["flops"]["source"]
    key_t, key_f = ("fvcore_gmacs_trimmed", "fvcore_gmacs_full") if src == "fvcore" else ("gmacs_trimmed", "gmacs_full")
    mdl = Path(report["settings"]["model_dir"]).name
    st = report["settings"]
    files["flops_hist"] = str(plots.flops_histogram(
        Path(s.plot_path) if s.plot_path else out_dir / "flops_hist.png",
        [r[key_t] for r in rows], [r[key_f] for r in rows],
        title=f"{mdl} on {st['dataset']}/{st['split']}: per-input cost at threshold {st['threshold']:g}",
        convention="fvcore MACs" if src == "fvcore" else "cost model, fvcore convention"))
    files["layers"] = str(plots.layers_chart(Path(s.layers_path) if s.layers_path else out_dir / "layers.png",
                                             report["layers"]))
    files["pareto"] = None
    if len(report["sweep"]) > 1:
        full_pt = {"gmacs_mean": float(np.mean([r["gmacs_full"] for r in rows])), "score": report["accuracy"]["full"]}
        files["pareto"] = str(plots.threshold_sweep_chart(Path(s.pareto_path) if s.pareto_path else out_dir / "pareto.png",
                                                         report["sweep"], full_pt, report["accuracy"]["metric"]))
    files["show"] = []
    if shows:
        show_dir = Path(s.show_dir) if s.show_dir else out_dir / "show"
        from ..preprocess import CLIP_MEAN, CLIP_STD  # directories from before `preprocess` was recorded

        mean = pre.get("mean") or list(CLIP_MEAN)
        std = pre.get("std") or list(CLIP_STD)
        for i, item, decisions, ids, row in shows:
            toks = overlays.question_tokens(tokenizer, ids)
            keep = overlays.text_keep(decisions, len(toks))
            cap = f"input {i}"
            if row.get("pred_full") is not None:
                pf = row["pred_full_label"] if row["pred_full_label"] is not None else row["pred_full"]
                pt = row["pred_trimmed_label"] if row["pred_trimmed_label"] is not None else row["pred_trimmed"]
                cap += f" · answer full: {pf} · trimmed: {pt}"
            cap += (f" · GMACs {row['gmacs_trimmed']:.3g} of {row['gmacs_full']:.3g} "
                    f"({100 * row['gmacs_trimmed'] / row['gmacs_full']:.0f}%)")
            files["show"].append(str(overlays.write_overlay(
                show_dir / f"input_{i:05d}.png", overlays.denormalize(item["image"], mean, std), item["text"], toks,
                keep, overlays.image_panels(decisions), caption=cap)))
    return files


def settings_dict(s: ProfileSettings) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()}
