"""Fixed-ratio EViT whose backbone is fine-tuned with SmartTrim's objective: the strongest baseline we know of.

Rule (inference and training): the ``evit`` baseline's (evit.py) — at each pruning position (the model's
token-trimmer positions) keep the ceil(r * n) live tokens that the [CLS] token attends to most (the
attention of the layer about to run, averaged over heads), with one keep ratio r for every input and
every position. Nothing is learned about *which* tokens to keep: EViT ranks by [CLS] attention, not by
a scorer, so the learned trimmers are not used at all.

Training (``finetune_evit``): the backbone is fine-tuned with the same self-distillation objective as
SmartTrim — task loss on the pruned pass + ``distill_weight`` x distill(pruned || full pass of the same
weights, no gradient) — for the same number of optimizer steps, on the same data in the same order
(same seed and sampler), with the same batch size, optimizer (AdamW, the recipe's learning rates and
multipliers), warm-up/decay schedule and gradient clipping, built from the same recipe and overrides as
the SmartTrim run (train/config.py). There is no budget term (the ratio is fixed by construction). The
keep ratio follows SmartTrim's curriculum shape: it falls from 1.0 to r over the same fraction of
training (EViT's own keep-rate warm-up does the same), then holds. During training the rule runs in
soft mode (dropped tokens masked out of attention, shapes fixed), which equals the hard-mode gather given
the same decisions (invariant 3). Model selection mirrors SmartTrim's: validation (hard mode, the rule
at r) after each epoch, the best score among epochs after the curriculum has ended is kept.

Not in the paper's recipe: inattentive-token fusion (it changes token states, which soft masks cannot
express; ``evit-fusion`` stays a training-free baseline), and r chosen by calibration to a mean GMACs
ratio on the starting model (``keep_ratio_for``).

    from smarttrim_cli.baselines.evit_finetuned import EViTFinetuned, finetune_evit, keep_ratio_for
    r = keep_ratio_for(base_model, batches, 0.33)
    res = finetune_evit("base", "evit-ft", r, recipe="easyvqa.yaml", overrides={...})
    bl = EViTFinetuned.from_dir("evit-ft")          # an EViT baseline at the trained ratio
    applied = bl.apply(res.model); logits, ctx = applied.run(batch, record=True)
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import SmartTrimError
from ..reference import derived_config, inherited_provenance
from .common import token_positions
from .evit import EViT, EViTPolicy

CONFIG_KEY = "evit_finetuned"


class EViTFinetuned(EViT):
    """The EViT rule at the keep ratio (and positions) a ``finetune_evit`` run trained with; apply it to
    the model that run wrote. ``calibrate`` (inherited) re-tunes the ratio to a GMACs target."""

    name = "evit-finetuned"
    kind = "token"

    def __init__(self, keep_ratio: float = 0.5, layers=None, guide: str = "cls", model_dir=None, merge: bool = False):
        # merge: trained with the model's token fusion (TrimConfig.fuse)
        super().__init__(keep_ratio, layers, guide, fuse=False, merge=merge)
        self.name = "evit-finetuned"
        self.model_dir = None if model_dir is None else str(model_dir)

    def params(self) -> dict:
        return {**super().params(), "model_dir": self.model_dir}

    @classmethod
    def from_dir(cls, model_dir) -> "EViTFinetuned":
        from ..model_dir import read_config

        cfg = read_config(model_dir).get(CONFIG_KEY)
        if not cfg:
            raise SmartTrimError(f"{model_dir}/config.json: no `{CONFIG_KEY}` section (not written by finetune_evit)")
        return cls(cfg["keep_ratio"], cfg.get("layers"), cfg.get("guide", "cls"), model_dir, bool(cfg.get("merge")))


def keep_ratio_for(model, batches, target_macs_ratio: float, tol: float = 0.01) -> float:
    """The EViT keep ratio whose mean GMACs ratio over ``batches`` is ``target_macs_ratio`` (bisection), with
    the token fusion ``finetune_evit`` will train with when the model fuses (the fused tokens cost too)."""
    bl = EViT(merge=bool(getattr(model.trim_config, "fuse", False)))
    bl.calibrate(model, list(batches), target_macs_ratio, tol=tol, strict=False)
    return bl.keep_ratio


@dataclass
class EViTFinetuneResult:
    output: Path | None
    summary: dict
    model: object = None
    history: list = field(default_factory=list)


def _keep_schedule(step: int, total: int, final: float, frac: float, shape: str, hold: float) -> float:
    from ..train import curriculum as cur

    return cur.target_ratio(step, total, final, frac, shape, hold=hold)


@torch.no_grad()
def _evaluate(model, loader, names, keep_ratio, guide, dev, merge=False) -> dict:
    from ..train.loop import _check_batch, _to
    from ..train.losses import score
    from ..trim.cost import macs_ratio

    was = model.training
    model.eval()
    scores, ratios = [], []
    for batch in loader:
        batch = _to(_check_batch(batch), dev)
        logits, ctx = model.run(batch, mode="hard", record=True, policy=EViTPolicy(names, keep_ratio, guide, merge=merge))
        scores += score(logits.float(), batch["target"]).tolist()
        ratios += macs_ratio(ctx.records).tolist()
    model.train(was)
    if not scores:
        return {"n": 0}
    r = torch.tensor(ratios, dtype=torch.float64)
    return {"n": len(scores), "score": float(sum(scores) / len(scores)), "ratio_mean": float(r.mean()),
            "ratio_std": float(r.std(unbiased=False))}


def finetune_evit(model_dir, output, keep_ratio: float, recipe=None, overrides: dict | None = None,
                  guide: str = "cls", layers=None, device: str | None = None, progress: bool = True,
                  console=None) -> EViTFinetuneResult:
    """Fine-tune the backbone of ``model_dir`` under the fixed-ratio EViT rule (see the module docstring).

    ``recipe``/``overrides``: exactly what the SmartTrim run it is compared with gets (``trim`` is forced
    on, so the recipe's SmartTrim settings apply: learning rates, epochs, curriculum fraction, distill
    weight ...). Writes a model directory (backbone weights; the trimmers are kept but unused) whose
    config.json has an ``evit_finetuned`` section (keep_ratio, layers, guide), plus
    finetune_summary.json, finetune_log.jsonl and training.png."""
    from ..model_dir import load, read_config, save_model_dir
    from ..train import checkpointing as ck
    from ..train import curriculum as cur
    from ..train import distributed as D
    from ..train.config import build_config
    from ..train.loop import (Collate, IndexedDataset, _check_batch, _to, open_train_val, param_groups,
                              plot_history, teacher_model)
    from ..train.losses import distill_loss, feature_loss, task_loss

    if not 0.0 <= float(keep_ratio) <= 1.0:
        raise SmartTrimError(f"evit-finetuned: keep ratio must be in [0, 1], got {keep_ratio}")
    t_start = time.time()
    info = D.init(device)
    if info.distributed:
        raise SmartTrimError("evit-finetuned: run it in one process (no torchrun)")
    dev = info.device
    src = Path(model_dir)
    read_config(src)
    model = load(src, mode="soft")
    cfg, rec = build_config(recipe, {**(overrides or {}), "trim": True}, task=model.config.task,
                            family=model.family, dataset=(overrides or {}).get("dataset"))
    torch.manual_seed(cfg.seed)
    ds_name, train_ds, val_ds, labels = open_train_val(model, cfg, rec, False)
    multilabel = ds_name in ("vqa", "easyvqa")
    pre = dict(model.smarttrim_config.get("preprocess") or {})
    max_len = int(pre.get("max_text_len") or model.config.max_text_len)
    names = token_positions(model, layers)
    merge = bool(getattr(model.trim_config, "fuse", False))  # a model with token fusion: the rule fuses too

    for p in model.trimmer_parameters():
        p.requires_grad_(False)
    model.to(dev).train()
    micro = cfg.batch_size // cfg.grad_accum
    if cfg.batch_size % cfg.grad_accum:
        raise SmartTrimError(f"--batch-size {cfg.batch_size} is not divisible by --grad-accum {cfg.grad_accum}")
    sampler = D.ResumableSampler(len(train_ds), 0, 1, shuffle=True, seed=cfg.seed, pad=True)
    spe = len(sampler.order()) // micro // cfg.grad_accum
    if spe < 1:
        raise SmartTrimError(f"{ds_name}: {len(train_ds)} training inputs make less than one batch of {cfg.batch_size}")
    total = int(cfg.max_steps) if cfg.max_steps else cfg.epochs * spe
    curriculum_end = math.ceil((cfg.curriculum_hold + cfg.curriculum) * total)
    loader_kw = dict(num_workers=cfg.workers, collate_fn=Collate(model.tokenizer, max_len),
                     pin_memory=dev.type == "cuda", persistent_workers=cfg.workers > 0)
    val_sampler = D.ResumableSampler(len(val_ds), 0, 1, shuffle=False, pad=False)
    val_loader = torch.utils.data.DataLoader(IndexedDataset(val_ds), batch_size=cfg.eval_batch_size or micro,
                                             sampler=val_sampler, **loader_kw)
    train_loader = torch.utils.data.DataLoader(IndexedDataset(train_ds), batch_size=micro, sampler=sampler,
                                               drop_last=True, **loader_kw)
    groups = param_groups(model, cfg)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: cur.lr_factor(s, total, cfg.warmup, cfg.end_lr_factor, cfg.decay_power))
    params = [p for g in groups for p in g["params"]]
    feats: list = []
    tmodel = teacher_model(model, cfg)  # as SmartTrim's objective has it
    if cfg.feature_weight > 0:
        for mod in ((tmodel, model) if tmodel is not model else (model,)):
            mod.head().register_forward_pre_hook(lambda mod, args: feats.append(args[0]))

    state_dir = ck.state_dir_for(Path(output))
    state_dir.mkdir(parents=True, exist_ok=True)
    history, best, best_sd = [], None, None
    bar = _bar(progress, total, console)

    def validate(epoch, step):
        nonlocal best, best_sd
        res = _evaluate(model, val_loader, names, keep_ratio, guide, dev, merge)
        history.append({"event": "val", "step": step, "epoch": epoch, **res})
        if res.get("n") and step >= curriculum_end and (best is None or res["score"] > best["score"]):
            best = {"step": step, "epoch": epoch, **res}
            best_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        _note(bar, f"epoch {epoch + 1}: validation score {res.get('score', float('nan')):.4f} at keep ratio "
                   f"{keep_ratio:.3f} (GMACs ratio {res.get('ratio_mean', float('nan')):.3f})")

    step, step_times = 0, []
    try:
        if cfg.eval_before:
            res = _evaluate(model, val_loader, names, keep_ratio, guide, dev, merge)
            history.append({"event": "val_start", "step": 0, "epoch": -1, **res})
        while step < total:
            epoch, pos = step // spe, step % spe
            sampler.set_epoch(epoch, start=pos * cfg.grad_accum * micro)
            it = iter(train_loader)
            while pos < spe and step < total:
                t0 = time.time()
                r = _keep_schedule(step, total, keep_ratio, cfg.curriculum, cfg.curriculum_shape, cfg.curriculum_hold)
                acc = {}
                for _ in range(cfg.grad_accum):
                    batch = _to(_check_batch(next(it)), dev)
                    inputs = {k: batch[k] for k in model.input_names if k in batch}
                    feats.clear()
                    with torch.no_grad():
                        teacher = tmodel(**inputs, ctx=tmodel.make_context(mode="full"))
                    logits = model(**inputs, ctx=model.make_context(mode="soft", policy=EViTPolicy(names, r, guide, merge=merge)))
                    lt = task_loss(logits, batch["target"])
                    ld = distill_loss(logits, teacher, multilabel, cfg.distill_temperature)
                    loss = lt + cfg.distill_weight * ld
                    if cfg.feature_weight > 0 and len(feats) >= 2:
                        loss = loss + cfg.feature_weight * feature_loss(feats[-1], feats[0])
                    (loss / cfg.grad_accum).backward()
                    for k, v in (("loss", loss), ("task", lt), ("distill", ld)):
                        acc[k] = acc.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
                gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
                opt.step()
                opt.zero_grad(set_to_none=True)
                sched.step()
                step += 1
                pos += 1
                step_times.append(time.time() - t0)
                if step % cfg.log_every == 0 or step == total:
                    history.append({"event": "step", "step": step, "epoch": epoch, **acc, "keep_ratio": r,
                                    "lr": sched.get_last_lr()[0], "grad_norm": float(gnorm),
                                    "elapsed_s": time.time() - t_start})
                _update(bar, step, f"loss {acc['loss']:.3f} (task {acc['task']:.3f} dist {acc['distill']:.3f}) "
                                   f"keep {r:.2f}")
            del it
            if pos == spe or step == total:
                validate(epoch, step)
    finally:
        if bar is not None:
            bar.stop()

    if best_sd is not None:
        model.load_state_dict(best_sd)
        selected = f"epoch {best['epoch'] + 1} (step {best['step']})"
    else:
        selected = "last"
    final = next((r for r in reversed(history) if r.get("event") == "val"), {})
    steady = step_times[min(len(step_times) - 1, 2):] if step_times else []
    summary = {"mode": "evit-finetuned", "dataset": ds_name, "source": str(src), "keep_ratio": float(keep_ratio),
               "guide": guide, "layers": names, "train_inputs": len(train_ds), "val_inputs": len(val_ds),
               "steps": total, "steps_per_epoch": spe, "selected": selected, "best": best, "final": final,
               "seconds_per_step": (sum(steady) / len(steady)) if steady else None,
               "wall_s": time.time() - t_start, "config": cfg.to_dict()}
    model.eval()
    derived = derived_config(src, model.smarttrim_config, "finetune (evit-finetuned)", True, labels)
    prov = {**inherited_provenance(model.smarttrim_config), "finetuned_from": str(src.resolve()),
            "finetune_mode": "evit-finetuned", "finetune_dataset": ds_name, **derived["provenance"]}
    out = save_model_dir(model.cpu(), output, tokenizer=model.tokenizer, labels=labels, provenance=prov,
                         extra={"preprocess": pre, "reference": derived["reference"], CONFIG_KEY: {"keep_ratio": float(keep_ratio), "layers": names,
                                                                "guide": guide, "merge": merge, "steps": total,
                                                                "selected": selected}})
    ck.write_json(Path(out) / "finetune_summary.json", summary)
    ck.write_jsonl(Path(out) / "finetune_log.jsonl", history)
    try:
        plot_history(history, Path(out) / "training.png", f"EViT (fixed keep ratio {keep_ratio:.3f}) + self-distillation, {ds_name}")
    except Exception as e:  # a plotting failure must not lose a finished run
        summary["plot_error"] = f"{type(e).__name__}: {e}"
    D.shutdown(info)
    return EViTFinetuneResult(out, summary, model, history)


def _bar(enabled, total, console):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    p = Progress(TextColumn("[bold]evit-finetuned"), BarColumn(bar_width=24), MofNCompleteColumn(),
                 TextColumn("{task.fields[info]}"), TextColumn("ETA"), TimeRemainingColumn(), console=console)
    p.start()
    p.add_task("steps", total=total, info="starting")
    return p


def _update(bar, step, info):
    if bar is not None:
        bar.update(bar.task_ids[0], completed=step, info=info)


def _note(bar, text):
    if bar is not None:
        bar.console.print(text, highlight=False)
