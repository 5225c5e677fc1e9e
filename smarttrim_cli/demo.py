"""``smarttrim demo``: the whole pipeline on data that needs no download.

Stages (each cached in the demo folder; ``fresh`` starts over):
  1. tokenizer  — a word-level (BERT format) vocabulary of the training questions
  2. init       — a small METER-architecture model with random weights, saved as METER's own Lightning
                  ``.ckpt`` and attached (so the demo goes through the same loader users' files do)
  3. base       — ``finetune --no-trim``: the "existing VLM" a user would bring
  4. trimmed    — ``finetune``: SmartTrim self-distillation with the curriculum towards target_ratio
  5. profile    — full vs trimmed on the evaluation split: score, GMACs, latency, plots
  6. export     — ONNX, validated in onnxruntime, timed against the full graph
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import SmartTrimError

# A small METER: CLIP-style ViT + BERT-style text tower + co-attention layers, sized for 2 CPU cores.
MODEL_SIZES = {
    "normal": dict(image_size=64, patch_size=8, vision_width=128, vision_layers=4, vision_heads=4,
                   text_hidden=128, text_layers=2, text_heads=4, text_intermediate=256, hidden=128,
                   cross_layers=2, cross_heads=4, cross_intermediate=256, max_text_len=24),
    "quick": dict(image_size=32, patch_size=8, vision_width=32, vision_layers=2, vision_heads=2,
                  text_hidden=32, text_layers=1, text_heads=2, text_intermediate=64, hidden=32,
                  cross_layers=1, cross_heads=2, cross_intermediate=64, max_text_len=24),
}
# training / evaluation budgets
BUDGETS = {
    "normal": dict(base={"epochs": 3, "limit": 20000, "val_limit": 1000, "lr": 5e-4, "batch_size": 64},
                   trim={"epochs": 2, "limit": 20000, "val_limit": 1000, "batch_size": 64},
                   profile={"limit": 400, "iters": 30, "warmup": 5, "batch_size": 16, "throughput_batches": 3},
                   export_runs=20),
    "quick": dict(base={"max_steps": 4, "limit": 64, "val_limit": 16, "lr": 5e-4, "batch_size": 16},
                  trim={"max_steps": 4, "limit": 64, "val_limit": 16, "batch_size": 16},
                  profile={"limit": 8, "iters": 3, "warmup": 1, "batch_size": 4, "throughput_batches": 1},
                  export_runs=2),
}
DATASETS = ("easyvqa", "vqa")


@dataclass
class DemoSettings:
    dataset: str = "easyvqa"
    data_dir: str | None = None
    out_dir: str | None = None
    quick: bool = False
    fresh: bool = False
    target_ratio: float = 0.33
    seed: int = 0
    threads: int | None = None

    @property
    def size(self) -> str:
        return "quick" if self.quick else "normal"


def default_out_dir(s: DemoSettings) -> Path:
    from .model_dir import workspace

    return workspace() / (f"demo-{s.dataset}" + ("-quick" if s.quick else ""))


def _splits(dataset: str) -> tuple[str, str]:
    return ("train", "test") if dataset == "easyvqa" else ("train", "val")


def training_questions(s: DemoSettings) -> tuple[list[str], list[str]]:
    """(training questions, answer vocabulary) of the demo's dataset."""
    if s.dataset == "easyvqa":
        from .data.easyvqa import EASYVQA_ANSWERS, easyvqa_data_dir

        rows = json.loads((easyvqa_data_dir() / "train" / "questions.json").read_text())
        return [r[0] for r in rows], list(EASYVQA_ANSWERS)
    from .data import default_data_dir
    from .data.vqav2 import _first_file, build_vqa_vocab, official_split, questions_file

    data_dir = Path(s.data_dir) if s.data_dir else default_data_dir("vqa")
    if not data_dir.is_dir():
        raise SmartTrimError(f"{data_dir}: data directory not found (pass --data-dir with a folder in the VQAv2 "
                             "format: v2_OpenEnded_mscoco_train2014_questions.json, v2_mscoco_train2014_annotations.json, "
                             "train2014/COCO_train2014_<id>.jpg, and the same for val2014)")
    qpath = _first_file(questions_file(data_dir, official_split("train")))
    if qpath is None:
        raise SmartTrimError(f"{data_dir}: no v2_OpenEnded_mscoco_train2014_questions.json")
    try:
        qs = [q["question"] for q in json.loads(qpath.read_text())["questions"]]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise SmartTrimError(f"{qpath}: not a VQAv2 questions file ({type(e).__name__}: {e})") from None
    labels = build_vqa_vocab(data_dir, ["train"], min_count=1)
    return qs, labels


class _Stage:
    """A cached stage: done when its stamp exists and records the same settings."""

    def __init__(self, root: Path, name: str, key: dict, fresh: bool):
        self.path = root / name
        self.stamp = root / f".{name}.done.json"
        self.key = key
        self.fresh = fresh

    def done(self) -> bool:
        if self.fresh or not self.stamp.is_file() or not self.path.exists():
            return False
        try:
            return json.loads(self.stamp.read_text()).get("key") == self.key
        except json.JSONDecodeError:
            return False

    def finish(self, result: dict | None = None):
        from .atomic import atomic_path

        with atomic_path(self.stamp) as tmp:
            tmp.write_text(json.dumps({"key": self.key, "result": result or {}}, indent=2, default=str))

    def result(self) -> dict:
        return json.loads(self.stamp.read_text()).get("result", {})


def run_demo(s: DemoSettings, console=None, say=print) -> dict:
    """Run (or resume) the demo; returns the summary dict that is also written to summary.json."""
    import torch

    from . import attach as at
    from .backbones.meter import MeterConfig, MeterModel, save_lightning_checkpoint
    from .tokenizers_local import write_word_tokenizer

    if s.dataset not in DATASETS:
        raise SmartTrimError(f"--dataset must be one of {', '.join(DATASETS)}, got {s.dataset!r}")
    if s.dataset == "easyvqa" and s.data_dir:
        raise SmartTrimError("--data-dir applies to --dataset vqa; easy-VQA comes with its pip package")
    if not 0.05 <= s.target_ratio <= 1.0:
        raise SmartTrimError(f"--target-ratio must be in [0.05, 1], got {s.target_ratio}")
    if s.threads:
        torch.set_num_threads(s.threads)
    root = Path(s.out_dir) if s.out_dir else default_out_dir(s)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SmartTrimError(f"{root}: cannot create the demo folder ({e.strerror})") from None
    size, budget = MODEL_SIZES[s.size], BUDGETS[s.size]
    base_key = {"dataset": s.dataset, "data_dir": s.data_dir, "size": size, "seed": s.seed}
    t0 = time.time()
    timings = {}

    # 1-2: tokenizer and the randomly initialised METER checkpoint, attached
    st_init = _Stage(root, "init", base_key, s.fresh)
    if not st_init.done():
        say("[1/6] vocabulary and a randomly initialised METER-architecture model")
        questions, labels = training_questions(s)
        tok_dir = write_word_tokenizer(root / "tokenizer", questions)
        n_vocab = len((tok_dir / "vocab.txt").read_text().splitlines())
        torch.manual_seed(s.seed)
        cfg = MeterConfig(task="vqa", num_labels=len(labels), text_family="bert", vocab_size=n_vocab,
                          max_position=max(64, size["max_text_len"]), text_type_vocab=2, pad_token_id=0,
                          text_eps=1e-12, extra={"tokenizer": "bert"}, **size)
        model = MeterModel(cfg)
        _init_like_meter(model)
        save_lightning_checkpoint(model, root / "init.ckpt")
        (root / "answers.json").write_text(json.dumps(labels))
        at.attach(root / "init.ckpt", root / "init", tokenizer=tok_dir, answers=root / "answers.json")
        st_init.finish({"labels": len(labels), "vocab": n_vocab})
    timings["init"] = time.time() - t0

    from .train.loop import finetune

    common = {"dataset": s.dataset, "data_dir": s.data_dir, "seed": s.seed,
              "train_split": _splits(s.dataset)[0], "val_split": _splits(s.dataset)[1]}
    recipe = "easyvqa.yaml"
    # 3: the base model, trained without trimmers
    t = time.time()
    st_base = _Stage(root, "base", {**base_key, **budget["base"]}, s.fresh or not st_init.stamp.is_file())
    if not st_base.done():
        say("[2/6] training the base model (finetune --no-trim): the 'existing VLM'")
        res = finetune(root / "init", root / "base", recipe=recipe,
                       overrides={**common, **budget["base"], "trim": False}, console=console)
        st_base.finish(res.summary)
    timings["base"] = time.time() - t

    # 4: SmartTrim fine-tune
    t = time.time()
    st_trim = _Stage(root, "trimmed", {**base_key, **budget["trim"], "target": s.target_ratio}, s.fresh)
    if not st_trim.done() or not st_base.stamp.is_file() or st_trim.stamp.stat().st_mtime < st_base.stamp.stat().st_mtime:
        say(f"[3/6] SmartTrim fine-tune: self-distillation, curriculum to {s.target_ratio:.2f} of the full GMACs")
        res = finetune(root / "base", root / "trimmed", recipe=recipe,
                       overrides={**common, **budget["trim"], "trim": True, "target_ratio": s.target_ratio},
                       console=console)
        st_trim.finish(res.summary)
    timings["trimmed"] = time.time() - t

    # 5: profile full vs trimmed (always re-run: cheap, and it measures this machine now)
    t = time.time()
    say("[4/6] profiling full vs trimmed (fvcore GMACs, latency, accuracy)")
    from .profiling.runner import ProfileSettings, run_profile

    p = budget["profile"]
    prof = run_profile(ProfileSettings(model_dir=root / "trimmed", dataset=s.dataset, data_dir=s.data_dir,
                                       split=_splits(s.dataset)[1], limit=p["limit"], iters=p["iters"],
                                       warmup=p["warmup"], batch_size=p["batch_size"],
                                       throughput_batches=p["throughput_batches"], show=2, threads=s.threads,
                                       out_dir=root / "profile", command="smarttrim demo"), console=console)
    timings["profile"] = time.time() - t

    # 6: ONNX export, validated and timed
    t = time.time()
    say("[5/6] exporting to ONNX, validating in onnxruntime, timing full vs trimmed graphs")
    from .export.run import run_export, write_report

    exp = run_export(root / "trimmed", root / "model.onnx", runs=budget["export_runs"], threads=s.threads or 2)
    write_report(exp, root / "export.json")
    timings["export"] = time.time() - t

    say("[6/6] summary")
    summary = _summary(s, root, st_base.result(), prof.report, exp, timings, time.time() - t0)
    from .atomic import atomic_path

    with atomic_path(root / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _init_like_meter(model):
    """METER/BERT initialisation (normal 0.02, LayerNorm 1/0) for the from-scratch base model."""
    import torch.nn as nn

    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _summary(s, root, base, prof, exp, timings, wall) -> dict:
    import statistics

    acc, fl, lat = prof["accuracy"], prof["flops"], prof["latency"]
    rows = exp.timing
    ort_full = statistics.median(r.full_ms for r in rows) if rows else None
    ort_trim = statistics.median(r.trimmed_ms for r in rows) if rows else None
    return {
        "settings": asdict(s), "folder": str(root), "wall_seconds": wall, "stage_seconds": timings,
        "base_model_val": base, "metric": acc.get("metric"),
        "full": {"score": acc["full"], "gmacs": fl["full"]["mean"], "cpu_latency_ms_p50": lat["full"]["p50"],
                 "ort_latency_ms": ort_full},
        "trimmed": {"score": acc["trimmed"], "gmacs": fl["trimmed"]["mean"],
                    "cpu_latency_ms_p50": lat["trimmed"]["p50"], "ort_latency_ms": ort_trim,
                    "threshold": prof["settings"]["threshold"]},
        "ratios": {"score_drop_points": acc["drop"], "gmacs_speedup": fl["speedup"],
                   "cpu_latency_speedup": lat.get("speedup"),
                   "ort_latency_speedup": (ort_full / ort_trim) if ort_full and ort_trim else None},
        "onnx_validation_ok": exp.ok,
        "files": {"profile_report": str(root / "profile" / "report.json"), "export_report": str(root / "export.json"),
                  "onnx": str(exp.export.path), "plots": sorted(str(p) for p in (root / "profile").glob("*.png")),
                  "training_curves": sorted(str(p) for p in root.glob("*/*.png")),
                  "overlays": sorted(str(p) for p in (root / "profile").rglob("show/*.png"))},
        "machine": prof.get("machine"),
    }
