"""``smarttrim demo``: the whole pipeline on data that needs no download.

Stages (each cached in the demo folder; ``fresh`` starts over):
  0. data       — scenes only: the synthetic multi-object scenes set (data/scenes.py, VQAv2 layout), cached
  1. tokenizer  — a word-level (BERT format) vocabulary of the training questions
  2. init       — a small METER-architecture model with random weights, saved as METER's own Lightning
                  ``.ckpt`` and attached (so the demo goes through the same loader users' files do)
  3. base       — ``finetune --no-trim``: the "existing VLM" a user would bring
  4. trimmed    — ``finetune``: SmartTrim self-distillation with the curriculum towards target_ratio
     control    — ``finetune --no-trim`` from the base with the trimmed run's settings and steps: the
                  equal-steps control, what the extra training alone gives
  5. profile    — base (the reference: the model SmartTrim started from) vs trimmed on the evaluation split:
                  score, GMACs, latency, plots (scenes: kept tokens and GMACs against the number of objects,
                  overlays per object count); the control scored on the same inputs
  6. baselines  — the training-free baselines (baselines/) on the base model, each calibrated to the
                  trimmed model's mean GMACs ratio, evaluated on the profiled inputs with the same code
  7. export     — ONNX, validated in onnxruntime, timed against the full graph

Datasets: ``easyvqa`` (the easy-vqa pip package: 64 px images of one shape), ``vqa`` (any folder in the
VQAv2 layout) and ``scenes`` (generated: 128 px images with 1-6 small shapes on a textured background,
counting / attribute / left-right questions). The scenes model sees 128 px images with 16 px patches:
8 x 8 = 64 patches + [CLS] = 65 image tokens, the same sequence length (and so nearly the same cost) as
the easy-VQA model at 64 px with 8 px patches, while the objects stay big enough (13-21 px) to cover a
patch or more.

``--backbone`` (``BACKBONES``) picks the model the stages work on: ``meter`` (above) or ``llava`` (demo_llava.py: a
small Hugging Face LLaVA answering in words; its control and baselines are evaluated as `smarttrim compare` does
for text models). Only the model builder, sizes, budgets, recipe and task differ; the stages are these.

``prepare`` (stages 0-3) and ``train_trimmed`` are importable: benchmarks/pareto.py builds on them.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from .errors import SmartTrimError
# the demo's training-free baselines are those `smarttrim compare` runs by default, evaluated by its code
from .profiling.compare import DEFAULT_BASELINES as DEMO_BASELINES  # noqa: F401  (benchmarks import it from here)
from .profiling.compare import evaluate_baselines  # noqa: F401  (imported from here by older callers)

# A small METER: CLIP-style ViT + BERT-style text tower + co-attention layers, sized for 2 CPU cores.
MODEL_SIZES = {
    "normal": dict(image_size=64, patch_size=8, vision_width=128, vision_layers=4, vision_heads=4,
                   text_hidden=128, text_layers=2, text_heads=4, text_intermediate=256, hidden=128,
                   cross_layers=2, cross_heads=4, cross_intermediate=256, max_text_len=24),
    "quick": dict(image_size=32, patch_size=8, vision_width=32, vision_layers=2, vision_heads=2,
                  text_hidden=32, text_layers=1, text_heads=2, text_intermediate=64, hidden=32,
                  cross_layers=1, cross_heads=2, cross_intermediate=64, max_text_len=24),
}
MODEL_SIZES["long"] = MODEL_SIZES["normal"]  # --long: same model, longer training
# scenes: 128 px / patch 16 = 65 image tokens, like easy-VQA's 64 px / patch 8 (quick: 64 px, 17 tokens)
SCENES_MODEL_SIZES = {"normal": dict(MODEL_SIZES["normal"], image_size=128, patch_size=16),
                      # 4 vision layers, as the normal model: recipes/scenes.yaml places image trimmers at 0 and 2
                      "quick": dict(MODEL_SIZES["quick"], image_size=64, patch_size=16, vision_layers=4)}
SCENES_MODEL_SIZES["long"] = SCENES_MODEL_SIZES["normal"]
# generate_scenes arguments (seed comes from --seed)
SCENES_DATA = {"normal": dict(n_train=5000, n_val=500, image_size=128, min_objects=1, max_objects=6,
                              questions_per_image=3),
               "quick": dict(n_train=24, n_val=8, image_size=64, min_objects=1, max_objects=6,
                             questions_per_image=3)}
SCENES_DATA["long"] = SCENES_DATA["normal"]
# training / evaluation budgets
# normal: about 10 minutes on 2 idle cores (README); long (--long, benchmarks/pareto.py): about 3x the
# training, so that the comparisons are between converged models
BUDGETS = {
    "normal": dict(base={"epochs": 2, "limit": 15000, "val_limit": 1000, "lr": 5e-4, "batch_size": 64},
                   trim={"epochs": 1, "limit": 20000, "val_limit": 1000, "batch_size": 64},
                   profile={"limit": 400, "iters": 30, "warmup": 5, "batch_size": 16, "throughput_batches": 3},
                   baselines={"calib_inputs": 128, "batch_size": 32},
                   export_runs=20),
    "quick": dict(base={"max_steps": 4, "limit": 64, "val_limit": 16, "lr": 5e-4, "batch_size": 16},
                  trim={"max_steps": 4, "limit": 64, "val_limit": 16, "batch_size": 16},
                  profile={"limit": 8, "iters": 3, "warmup": 1, "batch_size": 4, "throughput_batches": 1},
                  baselines={"calib_inputs": 8, "batch_size": 8},
                  export_runs=2),
}
BUDGETS["long"] = dict(BUDGETS["normal"], base={"epochs": 3, "limit": 20000, "val_limit": 1000, "lr": 5e-4, "batch_size": 64},
                       trim={"epochs": 2, "limit": 20000, "val_limit": 1000, "batch_size": 64})
# scenes: 15,000 training questions, all 1,500 validation questions; a longer base training (the task
# needs counting, colour-shape binding and left/right relations, learnt from scratch: a 10-epoch run was at 39% after
# 4 epochs and 58% at the end, against 28% for the best text-only answer)
SCENES_BUDGETS = {
    "normal": dict(BUDGETS["normal"], base={"epochs": 4, "limit": 15000, "val_limit": 1500, "lr": 5e-4, "batch_size": 64},
                   trim={"epochs": 1, "limit": 15000, "val_limit": 1500, "batch_size": 64},
                   profile={"limit": 600, "iters": 30, "warmup": 5, "batch_size": 16, "throughput_batches": 3}),
    "quick": BUDGETS["quick"],
}
SCENES_BUDGETS["long"] = dict(SCENES_BUDGETS["normal"],
                              base={"epochs": 10, "limit": 15000, "val_limit": 1500, "lr": 5e-4, "batch_size": 64},
                              trim={"epochs": 2, "limit": 15000, "val_limit": 1500, "batch_size": 64})
DATASETS = ("easyvqa", "vqa", "scenes")
RECIPES = {"easyvqa": "easyvqa.yaml", "vqa": "easyvqa.yaml", "scenes": "scenes.yaml"}


@dataclass
class DemoSettings:
    dataset: str = "easyvqa"
    data_dir: str | None = None
    out_dir: str | None = None
    quick: bool = False
    long: bool = False
    fresh: bool = False
    target_ratio: float | None = None   # None: the backbone's (BACKBONES[backbone].target_ratio)
    seed: int = 0
    threads: int | None = None
    baselines: bool = True
    backbone: str = "meter"

    def __post_init__(self):
        if self.target_ratio is None:  # an unknown backbone is reported by validate(), not here
            self.target_ratio = BACKBONES[self.backbone].target_ratio if self.backbone in BACKBONES else 0.33

    @property
    def size(self) -> str:
        return "quick" if self.quick else "long" if self.long else "normal"


def default_out_dir(s: DemoSettings) -> Path:
    from .model_dir import workspace

    return workspace() / (f"demo-{BACKBONES[s.backbone].dir_prefix}{s.dataset}"
                          + ("" if s.size == "normal" else f"-{s.size}"))


def _splits(dataset: str) -> tuple[str, str]:
    return ("train", "test") if dataset == "easyvqa" else ("train", "val")


def model_size(s: DemoSettings) -> dict:
    return BACKBONES[s.backbone].model_size(s)


def budgets(s: DemoSettings) -> dict:
    return BACKBONES[s.backbone].budgets(s)


def _meter_size(s: DemoSettings) -> dict:
    return (SCENES_MODEL_SIZES if s.dataset == "scenes" else MODEL_SIZES)[s.size]


def _meter_budgets(s: DemoSettings) -> dict:
    return (SCENES_BUDGETS if s.dataset == "scenes" else BUDGETS)[s.size]


def training_questions(s: DemoSettings, data_dir: Path | None = None) -> tuple[list[str], list[str]]:
    """(training questions, answer vocabulary) of the demo's dataset (``data_dir``: the VQAv2-layout folder
    for vqa / scenes)."""
    if s.dataset == "easyvqa":
        from .data.easyvqa import EASYVQA_ANSWERS, easyvqa_data_dir

        rows = json.loads((easyvqa_data_dir() / "train" / "questions.json").read_text())
        return [r[0] for r in rows], list(EASYVQA_ANSWERS)
    from .data import default_data_dir
    from .data.vqav2 import _first_file, build_vqa_vocab, official_split, questions_file

    if data_dir is None:
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


class Stage:
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
            return json.loads(self.stamp.read_text()).get("key") == json.loads(json.dumps(self.key, default=str))
        except json.JSONDecodeError:
            return False

    def finish(self, result: dict | None = None):
        from .atomic import atomic_path

        with atomic_path(self.stamp) as tmp:
            tmp.write_text(json.dumps({"key": self.key, "result": result or {}}, indent=2, default=str))

    def result(self) -> dict:
        return json.loads(self.stamp.read_text()).get("result", {})


@dataclass
class Prepared:
    """What stages 0-3 leave behind: the folder, the data, the recipe and the base model."""

    settings: DemoSettings
    root: Path
    data_dir: Path | None      # VQAv2-layout folder (vqa, scenes); None for easy-VQA
    dataset: str               # reader name for finetune/profile: easyvqa or vqa
    recipe: str
    base_key: dict
    budget: dict
    common: dict               # finetune overrides shared by every run on this data
    base_stage: Stage
    timings: dict
    base_name: str = "base"    # the folder the fine-tunes start from (benchmarks may re-place the trimmers)
    task: str = "vqa"          # the model's task as train/config.py reads it ("generate": decoder VLMs)
    control_extra: dict = dataclasses.field(default_factory=dict)  # settings the no-trim control adds

    @property
    def base_dir(self) -> Path:
        return self.root / self.base_name

    @property
    def val_split(self) -> str:
        return _splits(self.settings.dataset)[1]


def _check(s: DemoSettings):
    if s.backbone not in BACKBONES:
        raise SmartTrimError(f"--backbone must be one of {', '.join(BACKBONES)}, got {s.backbone!r}")
    if s.dataset not in DATASETS:
        raise SmartTrimError(f"--dataset must be one of {', '.join(DATASETS)}, got {s.dataset!r}")
    if s.quick and s.long:
        raise SmartTrimError("--quick and --long exclude each other")
    if s.dataset == "easyvqa" and s.data_dir:
        raise SmartTrimError("--data-dir applies to --dataset vqa or scenes; easy-VQA comes with its pip package")
    if not 0.05 <= s.target_ratio <= 1.0:
        raise SmartTrimError(f"--target-ratio must be in [0.05, 1], got {s.target_ratio}")


def _generate(s: DemoSettings, root: Path, console, say) -> tuple[Path, dict]:
    """Stage 0 (scenes): generate or reuse the set. -> (folder, meta)."""
    from .data.scenes import generate_scenes

    args = dict(SCENES_DATA[s.size], seed=s.seed)
    data_dir = Path(s.data_dir) if s.data_dir else root / "scenes"
    total = args["n_train"] + args["n_val"]
    say(f"[0/7] synthetic scenes: {args['n_train']} + {args['n_val']} images of {args['min_objects']}-"
        f"{args['max_objects']} objects, {args['questions_per_image']} questions each (cached)")
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("scenes"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console,
                  transient=True, disable=console is None) as prog:
        tid = prog.add_task("images", total=total)
        meta = generate_scenes(data_dir, progress=lambda k: prog.advance(tid, k), **args)
    return data_dir, meta


def prepare(s: DemoSettings, console=None, say=print) -> Prepared:
    """Stages 0-3 (data, tokenizer + init, base model), cached; returns what later stages need."""
    import torch

    _check(s)
    bb = BACKBONES[s.backbone]
    if s.threads:
        torch.set_num_threads(s.threads)
    root = Path(s.out_dir) if s.out_dir else default_out_dir(s)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SmartTrimError(f"{root}: cannot create the demo folder ({e.strerror})") from None
    size, budget = model_size(s), budgets(s)
    base_key = {"dataset": s.dataset, "data_dir": s.data_dir, "size": size, "seed": s.seed, **bb.key}
    t0 = time.time()
    timings = {}

    data_dir = None
    if s.dataset == "scenes":
        data_dir, meta = _generate(s, root, console, say)
        base_key["scenes"] = meta["args"]
        base_key["scenes_version"] = meta["version"]
        timings["data"] = time.time() - t0
    elif s.dataset == "vqa":
        from .data import default_data_dir

        data_dir = Path(s.data_dir) if s.data_dir else default_data_dir("vqa")

    # 1-2: tokenizer and the randomly initialised METER checkpoint, attached
    t = time.time()
    st_init = Stage(root, "init", base_key, s.fresh)
    if not st_init.done():
        questions, labels = training_questions(s, data_dir)
        st_init.finish(bb.build_init(s, root, data_dir, size, questions, labels, say=say))
    timings["init"] = time.time() - t

    from .train.config import run_settings
    from .train.loop import finetune

    reader = "easyvqa" if s.dataset == "easyvqa" else "vqa"
    common = {"dataset": reader, "data_dir": str(data_dir) if data_dir is not None else None, "seed": s.seed,
              "train_split": _splits(s.dataset)[0], "val_split": _splits(s.dataset)[1]}
    recipe = bb.recipe(s.dataset)
    # 3: the base model, trained without trimmers
    t = time.time()
    base_over = {**common, **budget["base"], "trim": False}
    # the resolved settings are in the key, so that an edited recipe retrains instead of reusing a stale model
    st_base = Stage(root, "base", {**base_key, "train": run_settings(recipe, base_over)},
                     s.fresh or not st_init.stamp.is_file())
    if not st_base.done():
        say("[2/7] training the base model (finetune --no-trim): the 'existing VLM'")
        res = finetune(root / "init", root / "base", recipe=recipe, overrides=base_over, console=console)
        st_base.finish(res.summary)
    timings["base"] = time.time() - t
    return Prepared(s, root, data_dir, reader, recipe, base_key, budget, common, st_base, timings, task=bb.task,
                    control_extra=dict(bb.control_extra))


def _build_meter_init(s: DemoSettings, root: Path, data_dir, size: dict, questions, labels, say=print) -> dict:
    """Stage 1-2 of the METER demo: a BERT vocabulary and a random METER saved as its Lightning .ckpt, attached."""
    import torch

    from . import attach as at
    from .backbones.meter import MeterConfig, MeterModel, lightning_checkpoint
    from .checkpoint_io import save_lightning_checkpoint
    from .tokenizers_local import write_word_tokenizer

    say("[1/7] vocabulary and a randomly initialised METER-architecture model")
    tok_dir = write_word_tokenizer(root / "tokenizer", questions)
    n_vocab = len((tok_dir / "vocab.txt").read_text().splitlines())
    torch.manual_seed(s.seed)
    cfg = MeterConfig(task="vqa", num_labels=len(labels), text_family="bert", vocab_size=n_vocab,
                      max_position=max(64, size["max_text_len"]), text_type_vocab=2, pad_token_id=0,
                      text_eps=1e-12, extra={"tokenizer": "bert"}, **size)
    model = MeterModel(cfg)
    _init_like_meter(model)
    save_lightning_checkpoint(lightning_checkpoint(model), root / "init.ckpt")
    (root / "answers.json").write_text(json.dumps(labels))
    at.attach(root / "init.ckpt", root / "init", tokenizer=tok_dir, answers=root / "answers.json")
    return {"labels": len(labels), "vocab": n_vocab}


def recipe_trim(recipe) -> tuple[str | None, bool, str]:
    """The recipe's ``trim:`` settings a fine-tune's starting copy takes (``with_trimmers``): (token_layers as a
    layer spec such as "vision=0,2", None when it places none; fuse; fuse_mode, "single" when it says nothing)."""
    from .recipes import load_recipe

    t = load_recipe(recipe).get("trim") or {}
    spec = " ".join(f"{k}={','.join(str(int(i)) for i in (v or []))}"
                    for k, v in sorted((t.get("token_layers") or {}).items()))
    return spec or None, bool(t.get("fuse", False)), str(t.get("fuse_mode", "single"))


def with_trimmers(p: Prepared, token_layers: str | None = None, fuse: bool = False, say=print,
                  head_layers: str | None = None, fuse_mode: str = "single") -> Prepared:
    """``p`` whose fine-tunes start from a copy of the base model with the token trimmers at ``token_layers``
    (a spec such as "vision=0,2"; None: where they are), the head trimmers at ``head_layers`` ("xtext=" turns a
    stream's off) and token fusion on or off (``fuse_mode``: TrimConfig's): same backbone weights, fresh trimmers as attach makes them (the
    base was trained without trimming, so they are untrained in either case). Cached as
    ``<root>/base-<layers>[_h<head layers>|_noheads][_fuse|_fusenearest]``; the fine-tunes' cache keys carry
    them all."""
    import dataclasses

    import torch

    from . import load
    from .model_dir import save_model_dir
    from .reference import derived_config, inherited_provenance
    from .trim.config import TrimConfig, parse_layer_spec

    layers = parse_layer_spec(token_layers) if token_layers else {}
    heads = parse_layer_spec(head_layers, "--head-layers") if head_layers else {}
    base_heads = json.loads((p.base_dir / "config.json").read_text())["trim"].get("head_layers") or {}
    head_tag = ["noheads"] if heads and not any({**base_heads, **heads}.values()) else [
        f"h{k}{'.'.join(map(str, v)) or '-'}" for k, v in sorted(heads.items())]
    fuse_tag = ["fuse" + ("" if fuse_mode == "single" else fuse_mode)] if fuse else []
    tag = "_".join([f"{k}{'.'.join(map(str, v)) or '-'}" for k, v in sorted(layers.items())] + head_tag + fuse_tag)
    if not tag:
        return p
    name = f"base-{tag}"
    out = p.root / name
    cfg_file = out / "config.json"
    if not cfg_file.is_file() or cfg_file.stat().st_mtime < p.base_stage.stamp.stat().st_mtime:
        loaded = load(p.base_dir, mode="full")
        m = loaded.model
        torch.manual_seed(0)
        t = TrimConfig.from_dict(m.trim_config.to_dict())  # the base's placement; named streams replaced
        t.token_layers.update(layers)
        t.head_layers.update(heads)
        t.token_layers = {k: v for k, v in t.token_layers.items() if v}
        t.head_layers = {k: v for k, v in t.head_layers.items() if v}
        t.fuse = fuse
        t.fuse_mode = fuse_mode if fuse else "single"
        t.validate(m.stream_layers(), "with_trimmers")
        m.attach_trimmers(t)
        cfg = loaded.config
        # the same backbone weights with fresh trimmers: a full model, its own reference
        derived = derived_config(p.base_dir, cfg, "demo.with_trimmers", trains_trimming=False)
        save_model_dir(m, out, tokenizer=loaded.tokenizer, labels=loaded.labels,
                       provenance={**inherited_provenance(cfg), **derived["provenance"],
                                   "replaced_token_layers": token_layers, "replaced_head_layers": head_layers,
                                   "fuse": fuse, **({"fuse_mode": fuse_mode} if fuse else {})},
                       extra={"preprocess": loaded.preprocess})
        say(f"base with token trimmers at {token_layers or 'the same layers'}"
            f"{f', head trimmers at {head_layers}' if head_layers else ''}{' and fusion' if fuse else ''}: {out}")
    return dataclasses.replace(p, base_name=name, base_key={**p.base_key, "token_layers": layers,
                                                             **({"head_layers": heads} if heads else {}),
                                                             **({"fuse": True} if fuse else {}),
                                                             **({"fuse_mode": fuse_mode} if fuse and fuse_mode != "single"
                                                                else {})})


def trim_overrides(p: Prepared, target_ratio: float, extra: dict | None = None) -> dict:
    """finetune overrides of a SmartTrim run on the demo's data at ``target_ratio``."""
    return {**p.common, **p.budget["trim"], "trim": True, "target_ratio": target_ratio, **(extra or {})}


def train_trimmed(p: Prepared, target_ratio: float, name: str = "trimmed", console=None, say=print,
                  extra: dict | None = None) -> Stage:
    """Stage 4: SmartTrim fine-tune of the base model at ``target_ratio`` into ``<root>/<name>`` (cached;
    retrained when the base model is newer). ``extra``: more finetune overrides (part of the cache key)."""
    from .train.config import run_settings
    from .train.loop import finetune

    over = trim_overrides(p, target_ratio, extra)
    # the resolved settings hold the budget, the target and ``extra`` too
    st = Stage(p.root, name, {**p.base_key, "train": run_settings(p.recipe, over)}, p.settings.fresh)
    base = p.base_stage.stamp
    if not st.done() or not base.is_file() or st.stamp.stat().st_mtime < base.stat().st_mtime:
        say(f"[3/7] SmartTrim fine-tune ({p.recipe}): curriculum to {target_ratio:.2f} of the full GMACs")
        res = finetune(p.base_dir, p.root / name, recipe=p.recipe, overrides=over, console=console)
        st.finish(res.summary)
    return st


def control_overrides(p: Prepared, steps: int | None = None, extra: dict | None = None) -> dict:
    """The SmartTrim runs' complete settings with trim off: same data, steps, optimizer and schedule."""
    from .train.config import build_config

    ov = trim_overrides(p, 1.0, {**(extra or {}), **({"max_steps": steps} if steps else {})})
    cfg, _ = build_config(p.recipe, ov, task=p.task, dataset=ov["dataset"])
    d = cfg.to_dict()
    d.update({"trim": False, "calibrate": False, **p.control_extra})
    return {k: v for k, v in d.items() if v is not None}


def control_name(steps: int | None = None) -> str:
    return "control" + (f"-{steps}" if steps else "")


def control_stage(p: Prepared, over: dict, steps: int | None = None) -> Stage:
    """The equal-steps control's cache entry in ``p.root`` (keyed on the settings a no-trim run reads, so that a
    trimming-only setting does not retrain it)."""
    from .train.config import run_settings

    return Stage(p.root, control_name(steps), {**p.base_key, "control": run_settings(p.recipe, over)},
                  p.settings.fresh)


def train_control(p: Prepared, steps: int | None = None, extra: dict | None = None, console=None, say=print,
                  progress: bool = True) -> Stage:
    """``finetune --no-trim`` from the base with the SmartTrim runs' settings and steps (cached; retrained when the
    base model is newer): the equal-steps control, so that a gain of extra training is not credited to trimming."""
    from .train.loop import finetune

    over = control_overrides(p, steps, extra)
    st = control_stage(p, over, steps)
    if not st.done() or st.stamp.stat().st_mtime < p.base_stage.stamp.stat().st_mtime:
        say(f"equal-steps control: finetune --no-trim from the base ({over.get('max_steps') or over['epochs']} "
            f"{'steps' if over.get('max_steps') else 'epochs'}, lr {over['lr']:g})")
        res = finetune(p.base_dir, p.root / control_name(steps), recipe=p.recipe, overrides=over, console=console,
                       progress=progress)
        st.finish(res.summary)
    return st


def evaluate_control(p: Prepared, limit: int, console=None) -> dict:
    """The control's score on the profiled inputs (the first ``limit`` of the validation split), with the
    evaluation code of the baselines."""
    from . import load
    from .profiling.compare import EvalSet
    from .profiling.compare_generation import is_text

    loaded = load(p.root / control_name(), mode="full")
    ctl = loaded.model
    if is_text(ctl):  # prompts one by one, generated answers: compare's text evaluation
        ev, _ = eval_data(p, loaded, limit, 1, 1)
    else:
        ev = EvalSet.build(loaded, val_dataset(p, loaded), limit=limit, batch_size=p.budget["baselines"]["batch_size"])
    ev.set_full_gmacs(ctl)
    return ev.evaluate("equal-steps control", lambda b: ctl.run(b, mode="full", record=True), family="control",
                       gen=lambda b, **kw: ctl.generate(b, mode="full", **kw))


def run_demo(s: DemoSettings, console=None, say=print) -> dict:
    """Run (or resume) the demo; returns the summary dict that is also written to summary.json."""
    t0 = time.time()
    p0 = p = prepare(s, console, say)
    layers, fuse, fuse_mode = recipe_trim(p.recipe)
    if layers or fuse:  # the recipe places or fuses: SmartTrim starts from a copy of the base with its trimmers
        p = with_trimmers(p, layers, fuse, say=say, fuse_mode=fuse_mode)
    root, budget, timings = p.root, p.budget, p.timings

    # 4: SmartTrim fine-tune
    t = time.time()
    train_trimmed(p, s.target_ratio, console=console, say=say)
    timings["trimmed"] = time.time() - t
    t = time.time()
    ctl_stage = train_control(p0, console=console, say=say)  # the control does not trim: from the original base
    timings["control"] = time.time() - t

    # 5: profile full vs trimmed (always re-run: cheap, and it measures this machine now)
    t = time.time()
    say("[4/7] profiling the base model (SmartTrim's starting point) vs trimmed (fvcore GMACs, latency, accuracy)")
    from .profiling.runner import ProfileSettings, run_profile

    pr = budget["profile"]
    bb = BACKBONES[s.backbone]
    prof = run_profile(ProfileSettings(model_dir=root / "trimmed", dataset=p.dataset, data_dir=p.common["data_dir"],
                                       split=p.val_split, limit=pr["limit"], iters=pr["iters"],
                                       warmup=pr["warmup"], batch_size=pr["batch_size"],
                                       throughput_batches=pr["throughput_batches"],
                                       show=(4 if s.dataset == "scenes" else 2) if bb.overlays else 0,
                                       threads=s.threads,
                                       out_dir=root / "profile", command="smarttrim demo"), console=console)
    control = evaluate_control(p0, pr["limit"])
    timings["profile"] = time.time() - t

    # 6: training-free baselines at the trimmed model's cost
    t = time.time()
    base_rows = None
    if s.baselines:
        say("[5/7] baselines on the base model, calibrated to the trimmed model's mean GMACs, same inputs")
        base_rows = run_baselines(p, prof.report["flops"]["ratio"], pr["limit"], console=console)
    timings["baselines"] = time.time() - t

    # 7: ONNX export, validated and timed
    t = time.time()
    say("[6/7] exporting to ONNX, validating in onnxruntime, timing full vs trimmed graphs")
    from .export.run import run_export, write_report

    exp = run_export(root / "trimmed", root / "model.onnx", runs=budget["export_runs"], threads=s.threads or 2)
    write_report(exp, root / "export.json")
    timings["export"] = time.time() - t

    say("[7/7] summary")
    summary = _summary(s, root, p.base_stage.result(), prof.report, exp, timings, time.time() - t0, base_rows,
                       {"score": control["accuracy"], "dir": str(root / control_name()),
                        "steps": (ctl_stage.result() or {}).get("steps")})
    from .atomic import atomic_path

    with atomic_path(root / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2, default=str))
    return summary


# ----- baselines ---------------------------------------------------------------------------------------
def eval_data(p: Prepared, loaded, limit: int, calib_inputs: int, batch_size: int):
    """(evaluation set of the first ``limit`` validation inputs — the profiled ones —, calibration batches:
    the next ``calib_inputs`` inputs, or the first ones when the split is too small: benchmarks/pareto.py's rule).
    ``loaded``: the model_dir.LoadedModel whose labels, tokenizer and image size the inputs are for."""
    from .profiling import compare_generation as cg
    from .profiling.compare import split_inputs

    if cg.is_text(loaded.model):  # decoder VLMs: each prompt alone, scored on its generated answer (compare's sets)
        from types import SimpleNamespace

        ns = SimpleNamespace(dataset=p.dataset, data_dir=p.common["data_dir"], split=p.val_split, skip_bad=False,
                             limit=limit, calib_limit=calib_inputs,
                             max_new_tokens=p.budget["trim"].get("max_new_tokens"))
        ev, cal = cg.split_inputs(ns, loaded, limit + calib_inputs)[3:]
        return ev, cal.batches
    ev, cal = split_inputs(loaded, val_dataset(p, loaded), limit, calib_inputs, batch_size, overlap_ok=True)
    return ev, cal.batches


def val_dataset(p: Prepared, loaded):
    """The demo's evaluation split, read for ``loaded`` (its labels and image size)."""
    from .data import open_dataset

    return open_dataset(p.dataset, p.common["data_dir"], p.val_split, loaded.model.config.image_size,
                        label2id={a: i for i, a in enumerate(loaded.labels)})


def run_baselines(p: Prepared, target_ratio: float, limit: int, console=None) -> list[dict]:
    """Stage 6: full, SmartTrim (the trimmed model) and the training-free baselines on the profiled inputs
    (profiling/compare.py compare_models, as `smarttrim compare`); writes baselines.json, baselines.png and
    (scenes) baselines_objects.png. -> the rows."""
    from . import load
    from .atomic import atomic_path
    from .profiling import compare, objects
    from .profiling.compare_runner import baselines_for

    root = p.root
    b = p.budget["baselines"]
    base = load(root / "base", mode="hard")
    trimmed = load(root / "trimmed", mode="hard").model
    ev, cal = eval_data(p, base, limit, b["calib_inputs"], b["batch_size"])
    # the family's training-free baselines (METER: compare's defaults; LLaVA: those acting on its image tokens)
    res = compare.compare_models(trimmed, base.model, ev, cal, target=target_ratio, full_name="full (base)",
                                 names=baselines_for(base.model, None),
                                 smarttrim_info={"target_ratio": p.settings.target_ratio}, console=console)
    full, rows = res["full"], [res["smarttrim"]] + res["baselines"]
    for r in [full] + rows:  # summary rows; the per-input scores are `smarttrim compare`'s
        r.pop("per_input", None)
        r.pop("paired", None)
    out = {"dataset": p.settings.dataset, "n_inputs": len(ev), "target_ratio": target_ratio,
           "note": "baselines act on the base model (training-free), calibrated to the trimmed model's measured "
                   "mean GMACs ratio on separate validation inputs; SmartTrim is the fine-tuned trimmed model",
           "full": full, "methods": rows, "table": compare.markdown_table([full] + rows, full)}
    with atomic_path(root / "baselines.json") as tmp:
        tmp.write_text(json.dumps(out, indent=2, default=str))
    compare.methods_chart(root / "baselines.png", rows, full,
                          title=f"{p.settings.dataset}: SmartTrim vs training-free baselines at "
                                f"{target_ratio:.2f} of the full GMACs")
    if any(o is not None for o in ev.objects):
        objects.lines_chart(root / "baselines_objects.png", {r["name"]: r["by_objects"] for r in rows},
                            full_value=ev.n_image_tokens,
                            title="Kept image tokens against objects: SmartTrim vs training-free baselines")
    return [full] + rows


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


def _summary(s, root, base, prof, exp, timings, wall, base_rows=None, control=None) -> dict:
    import statistics

    acc, fl, lat = prof["accuracy"], prof["flops"], prof["latency"]
    rows = exp.timing
    ort_full = statistics.median(r.full_ms for r in rows) if rows else None
    ort_trim = statistics.median(r.trimmed_ms for r in rows) if rows else None
    ob = prof.get("objects")
    tp = prof.get("throughput") or {}
    return {
        "settings": asdict(s), "folder": str(root), "wall_seconds": wall, "stage_seconds": timings,
        "base_model_val": base, "metric": acc.get("metric"),
        # full: the reference, the model SmartTrim started from (profile's accuracy.full)
        "reference": acc.get("reference"), "control": control, "same_weights_full": acc.get("same_weights_full"),
        "full": {"score": acc["full"], "gmacs": fl["full"]["mean"], "cpu_latency_ms_p50": lat["full"]["p50"],
                 "ort_latency_ms": ort_full, "cpu_inputs_per_s": (tp.get("full") or {}).get("inputs_per_s")},
        "trimmed": {"score": acc["trimmed"], "gmacs": fl["trimmed"]["mean"],
                    "cpu_latency_ms_p50": lat["trimmed"]["p50"], "ort_latency_ms": ort_trim,
                    "cpu_inputs_per_s": (tp.get("trimmed") or {}).get("inputs_per_s"),
                    "threshold": prof["settings"]["threshold"]},
        "throughput_batch_size": tp.get("batch_size"),
        "ratios": {"score_drop_points": acc["drop"], "gmacs_speedup": fl["speedup"],
                   "cpu_latency_speedup": lat.get("speedup"), "cpu_throughput_speedup": tp.get("speedup"),
                   "ort_latency_speedup": (ort_full / ort_trim) if ort_full and ort_trim else None},
        "objects": None if not ob else {k: ob[k] for k in ("spearman_tokens", "spearman_gmacs", "tokens_per_object",
                                                           "direction", "by_objects")},
        "baselines": None if base_rows is None else [
            {k: r.get(k) for k in ("name", "accuracy", "accuracy_se", "gmacs_mean", "gmacs_ratio", "image_tokens_mean",
                                   "spearman_tokens_objects")} for r in base_rows],
        "onnx_validation_ok": exp.ok,
        # decoder VLMs: kept image tokens and the prefill cost (profile's generation report)
        **({"generation": {k: prof["generation"][k] for k in ("image_tokens", "prefill_gmacs", "exact_match")}}
           if prof.get("generation") else {}),
        "files": {"profile_report": str(root / "profile" / "report.json"), "export_report": str(root / "export.json"),
                  "baselines": str(root / "baselines.json") if base_rows is not None else None,
                  "onnx": str(exp.export.path), "plots": sorted(str(p) for p in (root / "profile").glob("*.png")),
                  "baseline_plots": sorted(str(p) for p in root.glob("baselines*.png")),
                  "training_curves": sorted(str(p) for p in root.glob("*/*.png")),
                  "overlays": sorted(str(p) for p in (root / "profile").rglob("show/*.png"))},
        "machine": prof.get("machine"),
    }


@dataclass(frozen=True)
class Backbone:
    """What the demo's model depends on: everything else (stages, caching, finetune/profile/export) is shared."""

    model_size: Callable
    budgets: Callable
    recipe: Callable           # dataset -> recipe file
    build_init: Callable       # (settings, root, data_dir, size, questions, labels, say) -> the init stage's result
    task: str = "vqa"
    target_ratio: float = 0.33
    key: dict = dataclasses.field(default_factory=dict)            # added to the stage keys
    control_extra: dict = dataclasses.field(default_factory=dict)
    dir_prefix: str = ""
    overlays: bool = True      # profile --show (classification heads only)


def _llava() -> Backbone:
    from . import demo_llava as dl

    return Backbone(dl.model_size, dl.budgets, lambda d: "llava.yaml", dl.build_init,
                    task="generate", target_ratio=dl.TARGET_RATIO, key={"backbone": "llava"},
                    # the recipe's `no_trim:` (train the backbone) does not reach a config resolved with trim on
                    control_extra={"train_backbone": True}, dir_prefix="llava-",
                    overlays=False)


# --backbone: the one place the demo's model family is chosen; meter's key is empty, so its caches are unchanged
BACKBONES = {"meter": Backbone(_meter_size, _meter_budgets, RECIPES.__getitem__, _build_meter_init),
             "llava": _llava()}
