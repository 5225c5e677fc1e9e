"""``smarttrim finetune``: the training loop, top to bottom.

    model dir (attach) -> datasets (data/) -> Objective (both passes, one loss) -> DDP -> AdamW
    -> per step: curriculum target, Gumbel temperature, loss, clip, step, dual update, log, checkpoint
    -> per epoch: validation (score, FLOPs ratio and its spread), best-at-target selection
    -> model dir (best weights) + training.png + finetune_log.jsonl + finetune_summary.json

One process or many (torchrun: RANK/WORLD_SIZE/LOCAL_RANK in the environment; NCCL on GPU, gloo on
CPU). ``batch_size`` is the global batch per optimizer step: the same command gives the same run on 1
or N processes (inputs of step k are positions kB..kB+B-1 of the epoch's permutation whatever the
world size, the Gumbel noise of an input does not depend on its rank, and the budget penalty sees the
global batch's mean ratio).
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..data import batch_to_device as _to
from ..errors import SmartTrimError
from ..reference import derived_config, inherited_provenance
from ..trim.cost import macs_ratio, total_macs
from . import checkpointing as ck
from . import curriculum as cur
from . import distributed as D
from .config import TrainConfig, build_config
from .losses import (Budget, budget_loss, distill_loss, feature_loss, floor_loss, global_stats, is_multilabel, score,
                     task_loss)

TASK_DATASETS = {"vqa": ("vqa", "easyvqa"), "nlvr2": ("nlvr2",), "snli": ("snli",),
                 "retrieval": ("coco-captions", "flickr30k")}
TASK_DEFAULT_DATASET = {"retrieval": "coco-captions"}  # other tasks: the dataset named like the task
DEFAULT_SPLITS = {"vqa": ("train", "val"), "nlvr2": ("train", "dev"), "snli": ("train", "dev"),
                  "easyvqa": ("train", "test"), "coco-captions": ("train", "val"), "flickr30k": ("train", "val")}
# Settings that may change between an interrupted run and its resumption.
RESUME_FREE = {"workers", "save_every", "log_every", "eval_batch_size", "data_dir", "eval_before"}


# ----- data -----------------------------------------------------------------------------------------
class IndexedDataset(torch.utils.data.Dataset):
    """Adds the dataset index to each item (it seeds the input's Gumbel noise) and turns a reader's
    SmartTrimError into a marker, so that a worker's error reaches the user as one line."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        try:
            item = self.ds[i]
        except SmartTrimError as e:
            return {"__error__": str(e)}
        item["__index__"] = i
        return item


class Collate:
    KEEP = ("pixel_values", "pixel_values2", "input_ids", "attention_mask", "target")

    def __init__(self, tokenizer, max_text_len: int, extra: tuple = ()):
        # extra: more item keys to keep (retrieval: image_id, so that negatives come from other images)
        self.tokenizer, self.max_text_len, self.keep = tokenizer, max_text_len, self.KEEP + tuple(extra)

    def __call__(self, items):
        from ..data import collate

        for it in items:
            if "__error__" in it:
                return {"__error__": it["__error__"]}
        idx = torch.tensor([it.pop("__index__") for it in items], dtype=torch.long)
        out = collate(items, self.tokenizer, self.max_text_len)
        out = {k: out[k] for k in self.keep if k in out}
        out["index"] = idx
        return out


def _check_batch(batch):
    if "__error__" in batch:
        raise SmartTrimError(batch["__error__"])
    return batch


# ----- image-text matching (retrieval) -------------------------------------------------------------------
ITC_TEMP = 0.07           # BLIP's initial ITC temperature (transformers' BLIP checkpoints do not store the learnt one)
NEGATIVE_ID = 1 << 30     # Gumbel-noise id of input i's negative pair: i + NEGATIVE_ID (its own noise, not i's)


def itm_negatives(image_id: torch.Tensor, sim: torch.Tensor | None = None, generator=None) -> torch.Tensor:
    """For each row, the row whose caption is its negative, from another image of the batch (-1: none,
    every row shows that image). With ``sim`` (B images x B captions, ITC cosine): BLIP's hard negatives,
    sampled with weights softmax(sim / ITC_TEMP) + 1e-4 over the other images' captions (sampled, not the
    arg-max, as BLIP does: the closest caption of another image may describe this one too). Without: the
    next row, cyclically, that shows another image (deterministic, for validation)."""
    image_id = image_id.reshape(-1).cpu()
    B = image_id.numel()
    other = image_id[:, None] != image_id[None, :]
    has = other.any(1)
    if sim is None:
        dist = (torch.arange(B)[None, :] - torch.arange(B)[:, None]) % B
        neg = dist.masked_fill(~other, B).argmin(1)
    else:
        w = (torch.softmax(sim.detach().float().cpu() / ITC_TEMP, 1) + 1e-4) * other
        w[~has] = 1.0  # a row without a candidate draws anything; dropped below
        neg = torch.multinomial(w, 1, generator=generator).squeeze(1)
    return torch.where(has, neg, torch.full_like(neg, -1))


def itm_batch(batch: dict, neg: torch.Tensor) -> dict:
    """Positives (every row, target 1 "match") followed by one negative pair per row with a negative
    (the row's image with caption ``neg[row]``, target 0): the image-text matching batch. ``index`` (the
    Gumbel-noise ids), when present, gets NEGATIVE_ID added for the negatives."""
    rows = (neg >= 0).nonzero().squeeze(1).to(batch["input_ids"].device)
    cap = neg.to(rows.device)[rows]
    out = {"pixel_values": torch.cat([batch["pixel_values"], batch["pixel_values"][rows]]),
           "input_ids": torch.cat([batch["input_ids"], batch["input_ids"][cap]]),
           "attention_mask": torch.cat([batch["attention_mask"], batch["attention_mask"][cap]])}
    pos = torch.ones_like(batch["target"]).long()
    out["target"] = torch.cat([pos, torch.zeros(len(rows), dtype=torch.long, device=pos.device)])
    if "index" in batch:
        out["index"] = torch.cat([batch["index"], batch["index"][rows] + NEGATIVE_ID])
    return out


# ----- the objective --------------------------------------------------------------------------------
def teacher_model(model, cfg: TrainConfig):
    """The distillation teacher's weights: ``model`` itself (teacher "self": its full-capacity pass) or a
    frozen copy of it as it is now, in eval mode (teacher "start"; build it before training moves the weights)."""
    return copy.deepcopy(model).eval().requires_grad_(False) if cfg.teacher == "start" else model


class Objective(nn.Module):
    """forward(batch tensors) -> (loss, parts). Runs the full-capacity teacher under no_grad and the
    trimmed student in soft mode (every trimmer is used in every soft forward, so DDP needs no
    ``find_unused_parameters``). DDP wraps this module; ``set_step`` passes the step's schedule values."""

    def __init__(self, model, cfg: TrainConfig, multilabel: bool):
        super().__init__()
        self.model, self.cfg, self.multilabel = model, cfg, multilabel
        self.step, self.tau, self.r_target, self.nu, self.all_reduce, self.noise = 0, 1.0, 1.0, 0.0, None, 1.0
        self._feats: list = []
        # teacher "start": a frozen copy of the weights training starts from (made before a resume loads the
        # checkpoint's), in eval mode; kept out of the module tree so that neither DDP nor the optimizer sees it
        t = teacher_model(model, cfg) if cfg.trim and cfg.distill_weight + cfg.feature_weight > 0 else model
        self._teacher = () if t is model else (t,)
        if cfg.trim and cfg.feature_weight > 0:
            for mod in (*self._teacher, model):  # teacher first: _feats[0] is the teacher's, [-1] the student's
                mod.head().register_forward_pre_hook(lambda mod, args: self._feats.append(args[0]))

    def _negatives(self, inputs, image_id, index):
        """BLIP's hard negatives from the full model's ITC similarities where it has them (``itc``), else
        uniform over the other images' captions. The draw is seeded by (seed, step, the batch's smallest
        input id), so a resumed run draws the same negatives. They come from this process's micro-batch
        (BLIP gathers them over GPUs), so with several processes or --grad-accum a retrieval run is not
        the same as a single-process one, unlike the other tasks."""
        if hasattr(self.model, "itc"):
            with torch.no_grad():
                img, txt = self.model.itc(inputs, mode="full")
            sim = img.float() @ txt.float().T
        else:
            sim = torch.zeros(len(image_id), len(image_id))  # softmax of zeros: uniform
        g = torch.Generator().manual_seed((self.cfg.seed * 1_000_003 + self.step) * 1_000_003 + int(index.min()))
        return itm_negatives(image_id, sim, g)

    def set_step(self, step, tau, r_target, nu, all_reduce, noise=1.0):
        self.step, self.tau, self.r_target, self.nu, self.all_reduce = step, tau, r_target, nu, all_reduce
        self.noise = noise

    def forward(self, pixel_values, input_ids, attention_mask, target, index, pixel_values2=None, image_id=None):
        m, cfg = self.model, self.cfg
        inputs = dict(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
        if image_id is not None:
            # retrieval: the ITM loss on the positives plus one hard negative caption each; then the trimmed
            # and full ITM logits of all pairs are student and teacher, like any classification head
            pairs = itm_batch(dict(inputs, target=target, index=index), self._negatives(inputs, image_id, index))
            target, index = pairs.pop("target"), pairs.pop("index")
            inputs = pairs
        if pixel_values2 is not None:
            inputs["pixel_values2"] = pixel_values2
        if not cfg.trim:
            logits = m(**inputs, ctx=m.make_context(mode="full"))
            lt = task_loss(logits, target)
            one = torch.ones((), device=lt.device)
            return lt, {"task": lt.detach(), "ratio": one, "ratio_std": 0 * one}
        self._feats.clear()
        with torch.no_grad():
            tm = self._teacher[0] if self._teacher else m
            teacher = tm(**inputs, ctx=tm.make_context(mode="full"))
        ctx = m.make_context(mode="soft", record=True, tau=self.tau)
        ctx.noise = D.InstanceNoise(cfg.seed, self.step, index, self.noise)
        logits = m(**inputs, ctx=ctx)
        ratio = macs_ratio(ctx.records)
        stats = global_stats(ratio, self.all_reduce)
        lt = task_loss(logits, target)
        ld = distill_loss(logits, teacher, self.multilabel, cfg.distill_temperature)
        lb, bparts = budget_loss(ratio, self.r_target, stats, cfg.cost_weight, self.nu, cfg.spread_weight)
        loss = lt + cfg.distill_weight * ld + lb
        parts = {"task": lt.detach(), "distill": ld.detach(), **bparts, "ratio": stats.mean,
                 "ratio_std": stats.var.sqrt()}
        if cfg.floor_weight > 0 and ctx.keep_fraction:
            lfl = floor_loss(ctx.keep_fraction, self.r_target, self.all_reduce)
            loss = loss + cfg.floor_weight * lfl
            parts["floor"] = lfl.detach()
        if cfg.feature_weight > 0:
            lf = feature_loss(self._feats[-1], self._feats[0])
            loss = loss + cfg.feature_weight * lf
            parts["feature"] = lf.detach()
        return loss, parts


# ----- model preparation ----------------------------------------------------------------------------
def replace_head(model, num_labels: int):
    """A fresh task head with ``num_labels`` outputs (METER's initialisation: N(0, 0.02), LayerNorm 1/0)."""
    from ..backbones import meter

    if model.family != "meter" or model.config.task not in ("vqa", "snli", "nlvr2"):
        raise SmartTrimError(f"--new-head: not supported for {model.family}/{model.config.task}")
    c = model.config
    h2 = 2 * c.hidden
    head = meter._classifier(2 * h2 if c.task == "nlvr2" else h2, h2, num_labels)
    for mod in head.modules():
        if isinstance(mod, nn.Linear):
            nn.init.normal_(mod.weight, std=0.02)
            nn.init.zeros_(mod.bias)
    setattr(model, meter.HEAD_PREFIX[c.task], head)
    c.num_labels = num_labels


def param_groups(model, cfg: TrainConfig):
    """METER's groups: uni-modal encoders at lr, cross-modal encoder x lr_mult_cross_modal, task head x
    lr_mult_head, plus the trimmers x lr_mult_trimmer; no weight decay on biases and norms (1-D)."""
    head_ids = {id(p) for p in model.head().parameters()}
    groups: dict = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith(("token_trimmers.", "head_trimmers.")):
            kind, mult = "trimmer", cfg.lr_mult_trimmer
        elif id(p) in head_ids:
            kind, mult = "head", cfg.lr_mult_head
        elif "cross_modal" in name:
            kind, mult = "cross_modal", cfg.lr_mult_cross_modal
        else:
            kind, mult = "backbone", 1.0
        decay = p.dim() >= 2
        key = (kind, decay)
        if key not in groups:
            groups[key] = {"params": [], "lr": cfg.lr * mult, "weight_decay": cfg.weight_decay if decay else 0.0,
                           "name": f"{kind}{'' if decay else '/no_decay'}"}
        groups[key]["params"].append(p)
    return list(groups.values())


# ----- evaluation -----------------------------------------------------------------------------------
@torch.no_grad()
def _eval_batch(batch, device):
    """A validation batch as evaluation runs it: on ``device``; retrieval: the positives and one fixed negative
    each (ITM)."""
    batch = _to(_check_batch(batch), device)
    if "image_id" in batch:
        batch = itm_batch(batch, itm_negatives(batch["image_id"]))
    return batch


def evaluate(model, loader, info: D.DistInfo, trimmed: bool, amp_ctx, threshold=None) -> dict:
    """Task score and per-input FLOPs ratio (hard mode: what inference runs, at ``threshold`` or the
    model's) over this rank's shard, gathered over ranks."""
    was = model.training
    model.eval()
    scores, ratios, macs = [], [], []
    for batch in loader:
        batch = _eval_batch(batch, info.device)
        with amp_ctx():
            logits, ctx = model.run(batch, mode="hard" if trimmed else "full", record=True, threshold=threshold)
        scores += score(logits.float(), batch["target"]).tolist()
        ratios += (macs_ratio(ctx.records) if trimmed else torch.ones(logits.shape[0])).tolist()
        macs += total_macs(ctx.records).tolist()
    model.train(was)
    parts = D.gather_objects(info, (scores, ratios, macs))
    s = torch.tensor([x for p in parts for x in p[0]], dtype=torch.float64)
    r = torch.tensor([x for p in parts for x in p[1]], dtype=torch.float64)
    g = torch.tensor([x for p in parts for x in p[2]], dtype=torch.float64)
    if not len(s):
        return {"n": 0}
    q = torch.quantile(r, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
    return {"n": len(s), "score": float(s.mean()), "ratio_mean": float(r.mean()),
            "ratio_std": float(r.std(unbiased=False)), "ratio_p10": q[0], "ratio_median": q[1], "ratio_p90": q[2],
            "ratio_min": float(r.min()), "ratio_max": float(r.max()), "gmacs_mean": float(g.mean()) / 1e9}


def lowest_ratio(model, batch) -> float:
    """The lowest mean GMACs ratio the model's trimmer placement reaches on ``batch``: every trimmer at a threshold
    just under 1 drops every token and head it may ([CLS] and one head per block stay), so no threshold and no
    training goes below it. What runs before the first token trimmer sets it (a METER-style model whose first
    image trimmer sits after ViT block 1 spends about a quarter of its GMACs there)."""
    was = model.training
    model.eval()
    with torch.no_grad():
        _, ctx = model.run(batch, mode="hard", record=True, threshold=1 - 1e-6)
    model.train(was)
    return float(macs_ratio(ctx.records).mean())


def calibrate_threshold(model, loader, info: D.DistInfo, target: float, amp_ctx, tolerance: float = 0.0,
                        iters: int = 10):
    """The keep threshold inference runs at: the trained one (``model.threshold``, where the Gumbel
    decisions were trained) when its mean ratio on ``loader``'s inputs is within ``tolerance`` of the
    target; otherwise the lowest higher threshold (fewer tokens) whose mean ratio is <= target, by
    bisection in logit space. It never lowers the threshold: moving it off the trained point in either
    direction shifts the decisions the backbone learnt to work with (measured on easy-VQA: lowering it to
    spend a 0.30 run's budget up to 0.33 cost 0.8 points; raising it from 0.23 to 0.22 cost 7.6).
    -> (threshold, its evaluation on the loader)."""
    t0 = float(model.threshold)
    res0 = evaluate(model, loader, info, True, amp_ctx, t0)
    if res0["ratio_mean"] <= target + tolerance:
        return t0, res0
    thr = lambda z: float(torch.sigmoid(torch.tensor(z)))  # noqa: E731
    lo, hi = math.log(t0 / (1 - t0)), 8.0   # threshold = sigmoid(z)
    res_hi = evaluate(model, loader, info, True, amp_ctx, thr(hi))
    best = (thr(hi), res_hi)
    if res_hi["ratio_mean"] > target:
        return best  # even the highest threshold keeps too much: the closest we can get
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        res = evaluate(model, loader, info, True, amp_ctx, thr(mid))
        if res["ratio_mean"] <= target:
            hi, best = mid, (thr(mid), res)
        else:
            lo = mid
    return best


# ----- progress and plots ---------------------------------------------------------------------------
class _Progress:
    def __init__(self, enabled: bool, total: int, start: int, console=None):
        self.p = None
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.p = Progress(TextColumn("[bold]finetune"), BarColumn(bar_width=24), MofNCompleteColumn(),
                          TextColumn("{task.fields[info]}"), TextColumn("ETA"), TimeRemainingColumn(),
                          console=console, transient=False)
        self.p.start()
        self.task = self.p.add_task("steps", total=total, completed=start, info="starting")

    def update(self, step, info):
        if self.p:
            self.p.update(self.task, completed=step, info=info)

    def note(self, text):
        if self.p:
            self.p.console.print(text, highlight=False)

    def close(self):
        if self.p:
            self.p.stop()


def _info_line(row: dict, trim: bool) -> str:
    s = f"loss {row['loss']:.3f}"
    if trim:
        s += (f" (task {row['task']:.3f} dist {row['distill']:.3f} cost {row['cost']:.4f})"
              f" · FLOPs ratio {row['ratio']:.2f}→{row['target']:.2f}")
    return s + f" · {row['inputs_per_s']:.1f} inputs/s"


def plot_history(history: list[dict], path: Path, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in history if r.get("event") == "step"]
    vals = [r for r in history if r.get("event") == "val"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    x = [r["step"] for r in steps]
    for key, lab in (("loss", "total"), ("task", "task"), ("distill", "distill"), ("cost", "cost penalty")):
        if steps and key in steps[0]:
            axes[0].plot(x, [r[key] for r in steps], label=lab)
    axes[0].set_xlabel("step"), axes[0].set_title("loss"), axes[0].legend()
    if steps and "target" in steps[0]:
        axes[1].plot(x, [r["ratio"] for r in steps], label="train batch mean (soft)")
        lo = [r["ratio"] - r["ratio_std"] for r in steps]
        hi = [r["ratio"] + r["ratio_std"] for r in steps]
        axes[1].fill_between(x, lo, hi, alpha=0.2, label="± spread")
        axes[1].plot(x, [r["target"] for r in steps], "k--", label="curriculum target")
    if vals:
        axes[1].errorbar([v["step"] for v in vals], [v["ratio_mean"] for v in vals],
                         yerr=[v["ratio_std"] for v in vals], fmt="o", label="validation (hard)")
        axes[2].plot([v["step"] for v in vals], [v["score"] for v in vals], "o-")
    cal = [r for r in history if r.get("event") == "val_calibrated" and r.get("n")]
    if cal:
        axes[1].plot([cal[-1]["step"]], [cal[-1]["ratio_mean"]], "r*", markersize=12,
                     label=f"written model (threshold {cal[-1]['threshold']:.2f})")
        axes[2].plot([cal[-1]["step"]], [cal[-1]["score"]], "r*", markersize=12, label="written model")
        axes[2].legend(fontsize=8)
    axes[1].set_ylim(0, 1.05), axes[1].set_xlabel("step"), axes[1].set_title("FLOPs ratio (trimmed / full)")
    axes[1].legend(fontsize=8)
    axes[2].set_xlabel("step"), axes[2].set_title("validation score")
    fig.suptitle(title)
    fig.tight_layout()
    from ..atomic import atomic_path
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


# ----- the run --------------------------------------------------------------------------------------
@dataclass
class FinetuneResult:
    output: Path | None
    state_dir: Path
    summary: dict
    model: object = None
    history: list = field(default_factory=list)


def _amp(cfg: TrainConfig, device: torch.device):
    """-> (autocast context factory, GradScaler)."""
    mode = cfg.amp
    if device.type != "cuda" or mode == "off":
        return contextlib.nullcontext, torch.amp.GradScaler("cuda", enabled=False)
    if mode == "auto":
        mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    return (lambda: torch.autocast("cuda", dtype=dtype)), torch.amp.GradScaler("cuda", enabled=mode == "fp16")


def open_train_val(model, cfg: TrainConfig, recipe: dict | None, new_head: bool):
    """-> (dataset name, train set, val set, labels)."""
    from ..data import NLVR2_LABELS, canonical_name, open_dataset

    task = model.config.task
    name = cfg.dataset or ((recipe or {}).get("data") or {}).get("dataset") or TASK_DEFAULT_DATASET.get(task, task)
    name = canonical_name(name)
    if name not in TASK_DATASETS.get(task, ()):
        need = (": image-caption pairs, a Karpathy-split dataset_coco.json / dataset_flickr30k.json and its images "
                "in --data-dir" if task == "retrieval" else "")
        raise SmartTrimError(f"dataset {name!r} does not fit a {task} model (a {task} model trains on "
                             f"{', '.join(TASK_DATASETS.get(task, ())) or 'nothing supported'}{need})")
    if task == "retrieval" and model.config.num_labels != 2:
        raise SmartTrimError(f"{model.family} retrieval model: finetune trains an image-text matching head with 2 "
                             f"outputs (no_match, match), this model scores a pair with {model.config.num_labels}")
    tr_split, va_split = DEFAULT_SPLITS[name]
    tr_split, va_split = cfg.train_split or tr_split, cfg.val_split or va_split
    labels = model.labels
    if name == "nlvr2":
        label2id = None
    elif new_head:
        label2id = None
    elif name == "snli":
        label2id = {l: i for i, l in enumerate(labels)} if labels else None
    else:
        label2id = {l: i for i, l in enumerate(labels)} if labels else None
    from ..model_dir import image_preprocessor

    size = model.config.image_size
    pre = image_preprocessor(model)
    try:
        train = open_dataset(name, cfg.data_dir, tr_split, size, label2id=label2id, limit=cfg.limit,
                             skip_bad=cfg.skip_bad, preprocess=pre)
    except SmartTrimError as e:
        if label2id is None or "label2id" not in str(e):
            raise
        raise SmartTrimError(f"{e} (the model's {len(labels)} labels do not fit this dataset; pass --new-head "
                             "to train a fresh head for its labels)") from None
    vl = cfg.val_limit if cfg.val_limit is not None else cfg.limit
    val = open_dataset(name, cfg.data_dir, va_split, size, label2id=getattr(train, "label2id", None),
                       limit=vl, skip_bad=cfg.skip_bad, preprocess=pre)
    labels = list(NLVR2_LABELS) if name == "nlvr2" else list(train.id2label)  # retrieval: no_match, match
    if len(labels) != model.config.num_labels:
        if new_head:
            replace_head(model, len(labels))
        else:
            src = "the model's labels" if model.labels else f"the vocabulary built from {cfg.data_dir or 'the data'}"
            raise SmartTrimError(f"{name}: {src} has {len(labels)} answers but the model's classifier has "
                                 f"{model.config.num_labels} outputs; pass --new-head to train a fresh head "
                                 "for this label set")
    if not len(train):
        raise SmartTrimError(f"{name} {tr_split}: no training inputs"
                             + (f" ({train.skipped_summary()})" if train.skipped_summary() else ""))
    return name, train, val, labels


def finetune(model_dir=None, output=None, recipe=None, overrides: dict | None = None, resume: bool = False,
             new_head: bool = False, device: str | None = None, progress: bool = True, console=None,
             on_step=None) -> FinetuneResult:
    """Fine-tune a model directory (SmartTrim self-distillation, or plain with ``trim=False``).

    ``overrides``: TrainConfig keys from the command line (None values are ignored). ``on_step(step)``
    is called after every optimizer step (tests use it to interrupt a run). Returns the result on every
    rank; only rank 0 writes files.
    """
    from ..model_dir import default_model_dir, load, read_config, save_model_dir, workspace

    info = D.init(device)
    try:
        src = Path(model_dir) if model_dir is not None else default_model_dir()
        read_config(src)  # one-line error for a wrong directory before anything heavy
        model = load(src, mode="soft")
        cfg, rec = build_config(recipe, overrides, task=model.config.task, family=model.family,
                                dataset=(overrides or {}).get("dataset"))
        out = Path(output) if output else workspace() / "finetuned"
        if out.resolve() == src.resolve():
            # the written model is measured against the one it started from: that one must survive
            raise SmartTrimError(f"{out}: the output is the model directory being fine-tuned; write the fine-tuned "
                                 "model elsewhere (-o DIR), so that profile can score it against its starting point")
        return _run(model, src, cfg, rec, info, out, resume, new_head, progress, console, on_step, save_model_dir)
    finally:
        D.shutdown(info)


def _run(model, src: Path, cfg: TrainConfig, rec, info: D.DistInfo, output: Path, resume, new_head, show,
         console, on_step, save_model_dir) -> FinetuneResult:
    t_start = time.time()
    dev = info.device
    if model.tokenizer is None:
        raise SmartTrimError(f"{src}: the model directory has no tokenizer/ folder")
    if cfg.trim and not model.trimmer_parameters():
        raise SmartTrimError(f"{src}: the model has no trimmers (attach inserts them); use --no-trim for a plain fine-tune")
    # same initial state on every rank (DDP also broadcasts rank 0's weights)
    torch.manual_seed(cfg.seed)
    ds_name, train_ds, val_ds, labels = open_train_val(model, cfg, rec, new_head)
    multilabel = ds_name in ("vqa", "easyvqa")
    pre = dict(model.smarttrim_config.get("preprocess") or {})
    max_len = int(pre.get("max_text_len") or model.config.max_text_len)

    # what learns
    for p in model.trimmer_parameters():
        p.requires_grad_(cfg.trim)
    if not cfg.train_backbone:
        if not cfg.trim:
            raise SmartTrimError("--freeze-backbone with --no-trim leaves nothing to train")
        for p in model.backbone_parameters():
            p.requires_grad_(False)
    model.to(dev).train()

    # batch geometry
    per_rank = cfg.batch_size // info.world
    if cfg.batch_size % (info.world * cfg.grad_accum):
        raise SmartTrimError(f"--batch-size {cfg.batch_size} is not divisible by {info.world} process(es) x "
                             f"--grad-accum {cfg.grad_accum}")
    micro = per_rank // cfg.grad_accum
    sampler = D.ResumableSampler(len(train_ds), info.rank, info.world, shuffle=True, seed=cfg.seed, pad=True)
    spe = len(sampler.order()) // micro // cfg.grad_accum
    if spe < 1:
        raise SmartTrimError(f"{ds_name}: {len(train_ds)} training inputs make less than one batch of "
                             f"{cfg.batch_size}; lower --batch-size")
    total = int(cfg.max_steps) if cfg.max_steps else cfg.epochs * spe
    curriculum_end = math.ceil((cfg.curriculum_hold + cfg.curriculum) * total)

    retrieval = model.config.task == "retrieval"
    if retrieval:
        # the ITM loss never reaches the ITC projections (they only pick the hard negatives): frozen, so that
        # DDP without find_unused_parameters sees every trainable parameter used
        for name in ("vision_proj", "text_proj"):
            if hasattr(model, name):
                getattr(model, name).requires_grad_(False)
    loader_kw = dict(num_workers=cfg.workers, collate_fn=Collate(model.tokenizer, max_len,
                                                                 ("image_id",) if retrieval else ()),
                     pin_memory=dev.type == "cuda", persistent_workers=cfg.workers > 0)
    val_sampler = D.ResumableSampler(len(val_ds), info.rank, info.world, shuffle=False, pad=False)
    val_loader = torch.utils.data.DataLoader(IndexedDataset(val_ds), batch_size=cfg.eval_batch_size or micro,
                                             sampler=val_sampler, **loader_kw)

    # optimisation
    objective = Objective(model, cfg, multilabel)
    groups = param_groups(model, cfg)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: cur.lr_factor(s, total, cfg.warmup, cfg.end_lr_factor, cfg.decay_power))
    amp_ctx, scaler = _amp(cfg, dev)
    budget = Budget(cfg.dual_lr if cfg.trim else 0.0, cfg.nu_max)
    params = [p for g in groups for p in g["params"]]
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP
        # every trimmer is used in every soft forward (and frozen ones are left out), so DDP needs no
        # find_unused_parameters; the model has no buffers to synchronise
        step_module = DDP(objective, device_ids=[dev.index] if dev.type == "cuda" else None,
                          find_unused_parameters=False)
    else:
        step_module = objective
    all_reduce = D.all_reduce_sum(info)

    # state: fresh or resumed
    state_dir = ck.state_dir_for(output)
    last = state_dir / "last.pt"
    step, history, best = 0, [], None
    resumed_from = None
    if resume and last.is_file():
        st = ck.load_state(last)
        old = st["config"]
        diff = [k for k, v in cfg.to_dict().items() if k not in RESUME_FREE and old.get(k) != v]
        if diff:
            k = diff[0]
            raise SmartTrimError(f"{last}: --resume with different settings than the interrupted run "
                                 f"({k}: {old.get(k)!r} -> {cfg.to_dict()[k]!r}{' ...' if len(diff) > 1 else ''}); "
                                 "use the same settings, or start over without --resume")
        if st["model"].keys() != model.state_dict().keys():
            raise SmartTrimError(f"{last}: the checkpoint's weights do not match the model in {src}")
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        if st.get("scaler"):
            scaler.load_state_dict(st["scaler"])
        budget.load_state_dict(st["budget"])
        step, history, best = int(st["step"]), list(st["history"]), st.get("best")
        if st.get("world") == info.world and st.get("rng"):
            ck.set_rng_state(st["rng"][info.rank])
        resumed_from = step
    elif info.main:
        for f in ("last.pt", "best.safetensors", "best.json", "log.jsonl"):
            (state_dir / f).unlink(missing_ok=True)
    D.barrier(info)
    log_path = state_dir / "log.jsonl"
    if info.main:
        state_dir.mkdir(parents=True, exist_ok=True)
        ck.write_jsonl(log_path, history)

    bar = _Progress(show and info.main, total, step, console)

    def record(row):
        history.append(row)
        if info.main:
            ck.append_jsonl(log_path, row)

    def save_checkpoint():
        rngs = D.gather_objects(info, ck.rng_state())
        if info.main:
            ck.save_state(last, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                 "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                                 "budget": budget.state_dict(), "step": step, "history": history, "best": best,
                                 # the sampler's position: epoch `step // steps_per_epoch`, permutation seeded by
                                 # (seed, epoch), resumed `start` inputs into each rank's share
                                 "sampler": {"epoch": step // spe, "start": (step % spe) * cfg.grad_accum * micro,
                                             "seed": cfg.seed, "steps_per_epoch": spe},
                                 "config": cfg.to_dict(), "world": info.world, "rng": rngs})
        D.barrier(info)

    def validate(epoch):
        nonlocal best
        res = evaluate(model, val_loader, info, cfg.trim, amp_ctx)
        row = {"event": "val", "step": step, "epoch": epoch, **res}
        record(row)
        at_target = (not cfg.trim) or (step >= curriculum_end and res.get("ratio_mean", 1) <= cfg.target_ratio + cfg.tolerance)
        row_best = best is None or (res.get("score", -1) > best["score"])
        if res.get("n") and at_target and row_best:
            best = {"step": step, "epoch": epoch, **res}
            if info.main:
                ck.save_best(state_dir, model, best)
        D.barrier(info)
        bar.note(f"epoch {epoch + 1}: validation score {res.get('score', float('nan')):.4f}"
                 + (f", FLOPs ratio {res['ratio_mean']:.3f} ± {res['ratio_std']:.3f} (target {cfg.target_ratio})"
                    if cfg.trim and res.get("n") else "") + (" [best]" if best and best["step"] == step else ""))
        return res

    try:
        first = next(iter(val_loader), None) if step == 0 and cfg.trim else None
        if first is not None:
            floor_r = lowest_ratio(model, _eval_batch(first, dev))
            if cfg.target_ratio < floor_r:
                record({"event": "unreachable_target", "step": 0, "target": cfg.target_ratio, "lowest_ratio": floor_r})
                bar.note(f"[yellow]warning:[/] target ratio {cfg.target_ratio} is below {floor_r:.3f}, the lowest GMACs "
                         "ratio this trimmer placement reaches with every droppable token and head dropped: training "
                         "will stop short of it; place a token trimmer earlier (attach --token-layers, e.g. "
                         '"vision=0,2")')
        if step == 0 and cfg.eval_before:
            res = evaluate(model, val_loader, info, False, amp_ctx)
            record({"event": "val_full", "step": 0, "epoch": -1, **res})
            bar.note(f"starting model (full capacity): validation score {res.get('score', float('nan')):.4f}")
        # an epoch whose last step was checkpointed before its validation ran
        if step and (step % spe == 0 or step == total) and \
                not any(r.get("event") == "val" and r["step"] == step for r in history):
            validate((step - 1) // spe)

        step_times, compute_times, t_log, n_log, last_info = [], [], time.time(), 0, "training"
        train_loader = torch.utils.data.DataLoader(IndexedDataset(train_ds), batch_size=micro, sampler=sampler,
                                                   drop_last=True, **loader_kw)
        acc_keys = ("loss", "task", "distill", "feature", "cost", "spread", "floor", "ratio", "ratio_std")
        while step < total:
            epoch = step // spe
            pos = step - epoch * spe
            sampler.set_epoch(epoch, start=pos * cfg.grad_accum * micro)
            it = iter(train_loader)  # the sampler is read here, in this process: the epoch and offset hold
            while pos < spe and step < total:
                t0 = time.time()
                tau = cur.temperature(step, total, cfg.tau_start, cfg.tau_end, cfg.tau_frac)
                rt = cur.target_ratio(step, total, cfg.target_ratio, cfg.curriculum, cfg.curriculum_shape,
                                      hold=cfg.curriculum_hold) if cfg.trim else 1.0
                noise = cur.noise_scale(step, total, cfg.noise_start, cfg.noise_end, cfg.noise_frac)
                objective.set_step(step, tau, rt, budget.nu, all_reduce, noise)
                acc, waited = {}, 0.0
                for a in range(cfg.grad_accum):
                    t_wait = time.time()
                    batch = _to(_check_batch(next(it)), dev)
                    waited += time.time() - t_wait
                    sync = step_module.no_sync() if (info.distributed and a < cfg.grad_accum - 1) else contextlib.nullcontext()
                    with sync:
                        with amp_ctx():
                            loss, parts = step_module(**batch)
                        scaler.scale(loss / cfg.grad_accum).backward()
                    parts["loss"] = loss.detach()
                    for k, v in parts.items():
                        acc[k] = acc.get(k, 0.0) + v.float() / cfg.grad_accum
                scaler.unscale_(opt)
                gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                sched.step()
                # rank-averaged parts (ratio/ratio_std are already global)
                keys = [k for k in acc_keys if k in acc]
                vec = torch.stack([acc[k] for k in keys])
                if all_reduce is not None:
                    all_reduce(vec)
                    vec = vec / info.world
                vals = dict(zip(keys, vec.tolist()))
                budget.update(vals.get("ratio", 1.0), rt)
                step += 1
                pos += 1
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                dt = time.time() - t0
                step_times.append(dt)
                compute_times.append(dt - waited)
                n_log += 1
                if step % cfg.log_every == 0 or step == total or pos == spe:
                    now = time.time()
                    row = {"event": "step", "step": step, "epoch": epoch, **{k: round(v, 6) for k, v in vals.items()},
                           **({"target": rt, "tau": tau, "noise": noise, "nu": budget.nu} if cfg.trim else {}),
                           "lr": sched.get_last_lr()[0],
                           "grad_norm": float(gnorm), "inputs_per_s": n_log * cfg.batch_size / max(now - t_log, 1e-9),
                           "elapsed_s": now - t_start}
                    record(row)
                    last_info = _info_line(row, cfg.trim)
                    t_log, n_log = now, 0
                bar.update(step, last_info)
                if cfg.save_every and step % cfg.save_every == 0:
                    save_checkpoint()
                if on_step is not None:
                    on_step(step)
            del it
            if pos == spe or step == total:
                validate(epoch)
                save_checkpoint()
    finally:
        bar.close()

    # the result: best weights at the target (or the last ones)
    wall = time.time() - t_start
    final = next((r for r in reversed(history) if r.get("event") == "val"), {})
    base = next((r for r in history if r.get("event") == "val_full"), {})
    if best is not None:
        sd = ck.load_best(state_dir)  # every rank (shared file system, as for the checkpoints)
        if sd is not None:
            model.load_state_dict({k: v.to(dev) for k, v in sd.items()})
        selected = f"epoch {best['epoch'] + 1} (step {best['step']})"
    else:
        selected = "last (no validation reached the target ratio within the tolerance)"
    calibrated = None
    if cfg.trim and cfg.calibrate:
        # the threshold is a runtime knob: raise the default one only where inference misses the target
        n_cal = min(len(val_ds), cfg.calibrate_limit or len(val_ds))
        cal_sampler = D.ResumableSampler(n_cal, info.rank, info.world, shuffle=False, pad=False)
        cal_loader = torch.utils.data.DataLoader(IndexedDataset(val_ds), batch_size=cfg.eval_batch_size or micro,
                                                 sampler=cal_sampler, **loader_kw)
        thr, _ = calibrate_threshold(model, cal_loader, info, cfg.target_ratio, amp_ctx,
                                    cfg.calibrate_tolerance * cfg.target_ratio)
        res = evaluate(model, val_loader, info, True, amp_ctx, thr)
        calibrated = {"threshold": thr, "calibration_inputs": n_cal, **res}
        record({"event": "val_calibrated", "step": step, "epoch": -1, **calibrated})
        model.threshold = thr
        model.trim_config.threshold = thr
        bar.note(f"calibrated keep threshold {thr:.4f}: validation score {res.get('score', float('nan')):.4f}, "
                 f"FLOPs ratio {res.get('ratio_mean', float('nan')):.3f} ± {res.get('ratio_std', float('nan')):.3f}")
    skipped = {"train": dict(train_ds.skipped), "val": dict(val_ds.skipped)}
    steady = step_times[min(len(step_times) - 1, 2):] if step_times else []
    steady_c = compute_times[min(len(compute_times) - 1, 2):] if compute_times else []
    summary = {
        "mode": "smarttrim" if cfg.trim else "plain", "dataset": ds_name, "source": str(src),
        "train_inputs": len(train_ds), "val_inputs": len(val_ds), "skipped": skipped,
        "world_size": info.world, "steps": total, "steps_per_epoch": spe, "resumed_from_step": resumed_from,
        "target_ratio": cfg.target_ratio if cfg.trim else 1.0, "selected": selected,
        "unreachable_target": next((r for r in history if r.get("event") == "unreachable_target"), None),
        "best": best, "final": final, "base": base, "calibrated": calibrated,
        "seconds_per_step": (sum(steady) / len(steady)) if steady else None,
        "compute_seconds_per_step": (sum(steady_c) / len(steady_c)) if steady_c else None,
        "wall_s": wall, "config": cfg.to_dict(),
    }
    out = None
    if info.main:
        pre_out = dict(model.smarttrim_config.get("preprocess") or {})
        derived = derived_config(src, model.smarttrim_config, f"finetune ({summary['mode']})", cfg.trim, labels)
        prov = {**inherited_provenance(model.smarttrim_config), "finetuned_from": str(Path(src).resolve()),
                "finetune_mode": summary["mode"], "finetune_dataset": ds_name, **derived["provenance"]}
        was_training = model.training
        model.eval()
        out = save_model_dir(model.cpu(), output, tokenizer=model.tokenizer, labels=labels, provenance=prov,
                             extra={"preprocess": pre_out, "reference": derived["reference"],
                                    "finetune": {k: summary[k] for k in (
                                 "mode", "dataset", "target_ratio", "selected", "best", "final", "base", "calibrated", "steps",
                                 "world_size")}})
        model.to(dev).train(was_training)
        ck.write_json(Path(out) / "finetune_summary.json", summary)
        ck.write_jsonl(Path(out) / "finetune_log.jsonl", history)
        try:
            plot_history(history, Path(out) / "training.png",
                         f"smarttrim finetune ({summary['mode']}, {ds_name})")
        except Exception as e:  # a plotting failure must not lose a finished training run
            summary["plot_error"] = f"{type(e).__name__}: {e}"
    D.barrier(info)
    model.eval()
    return FinetuneResult(out, state_dir, summary, model, history)
