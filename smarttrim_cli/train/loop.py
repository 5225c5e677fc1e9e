"""``smarttrim finetune``: one training loop for every method, top to bottom.

    setup     model dir -> datasets (batches.py) -> what learns -> AdamW + schedule -> TrainStep (step.py) -> DDP
    resume    a fresh state, or every part of ``<output>.state/last.pt`` (weights, optimizer, RNGs, log ...)
    step      the rule's schedule, loss (objective + rule), clip, optimizer step, log row, checkpoint
    validate  each epoch: score and FLOPs ratio of what inference runs, best-at-target selection
    finish    best weights, the rule's calibration, model dir + finetune_summary.json + finetune_log.jsonl

Two parts plug in: the *decision rule* (rules.py: SmartTrim's learned trimmers, a fixed keep ratio such as
EViT's, or none for --no-trim) and the *objective* (objectives.py: soft-target classification, retrieval ITM;
generation.py: next-token answers of a decoder VLM, whose ``target`` is the labels tensor; with targets=self the
full model's own answers, self_targets.py).
Progress bar, log and plot are callbacks (callbacks.py).

One process or many (torchrun: RANK/WORLD_SIZE/LOCAL_RANK in the environment; NCCL on GPU, gloo on
CPU). ``batch_size`` is the global batch per optimizer step: the same command gives the same run on 1
or N processes (inputs of step k are positions kB..kB+B-1 of the epoch's permutation whatever the
world size, the Gumbel noise of an input does not depend on its rank, and the budget penalty sees the
global batch's mean ratio).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data import batch_to_device
from ..errors import SmartTrimError
from . import checkpointing as ck
from . import curriculum as cur
from . import distributed as D
from .batches import Collate, IndexedDataset, check_batch, open_train_val
from .callbacks import JsonlLog, OnStep, ProgressBar, TrainingPlot
from .config import LATER_DEFAULTS, TrainConfig, build_config
from .evaluation import evaluate
from .objectives import objective_for, output_kind
from .rules import LearnedTrimmers, NoTrim
from .step import TrainStep, distill_weight_at

# Settings that may change between an interrupted run and its resumption.
RESUME_FREE = {"workers", "save_every", "log_every", "eval_batch_size", "data_dir", "eval_before"}
LOGGED_PARTS = ("loss", "task", "distill", "teacher_task", "feature", "cost", "spread", "floor", "ratio", "ratio_std")


@dataclass
class FinetuneResult:
    output: Path | None
    state_dir: Path
    summary: dict
    model: object = None
    history: list = field(default_factory=list)


def finetune(model_dir=None, output=None, recipe=None, overrides: dict | None = None, resume: bool = False,
             new_head: bool = False, device: str | None = None, progress: bool = True, console=None,
             on_step=None, rule=None, callbacks=()) -> FinetuneResult:
    """Fine-tune a model directory: SmartTrim self-distillation, plain with ``trim=False``, or under another
    decision ``rule`` (e.g. ``baselines.evit_finetuned.EViTRule(keep_ratio)``: the fixed-ratio EViT; such a rule
    trains with the recipe's trimming settings, ``trim`` on).

    ``overrides``: TrainConfig keys from the command line (None values are ignored). ``on_step(step)``
    is called after every optimizer step (tests use it to interrupt a run); ``callbacks``: more
    ``callbacks.Callback`` objects, after the built-in ones. Returns the result on every rank; only rank 0
    writes files.
    """
    from ..model_dir import default_model_dir, load, read_config, workspace

    if rule is not None:
        overrides = {**(overrides or {}), "trim": rule.trims}
    info = D.init(device)
    try:
        src = Path(model_dir) if model_dir is not None else default_model_dir()
        read_config(src)  # one-line error for a wrong directory before anything heavy
        loaded = load(src, mode="soft")
        cfg, rec = build_config(recipe, overrides, task=loaded.model.config.task, family=loaded.model.family,
                                dataset=(overrides or {}).get("dataset"))
        if rule is None:
            rule = LearnedTrimmers() if cfg.trim else NoTrim()
        out = Path(output) if output else workspace() / "finetuned"
        if out.resolve() == src.resolve():
            # the written model is measured against the one it started from: that one must survive
            raise SmartTrimError(f"{out}: the output is the model directory being fine-tuned; write the fine-tuned "
                                 "model elsewhere (-o DIR), so that profile can score it against its starting point")
        return run(loaded, src, cfg, rec, info, out, rule, resume=resume, new_head=new_head, progress=progress, console=console, on_step=on_step,
                   callbacks=callbacks)
    finally:
        D.shutdown(info)


@dataclass
class Run:
    """Everything one run holds: set up once (``setup``), then moved by the loop (step, history, best)."""
    model: object                  # loaded.model (moved to the device, training)
    loaded: object                 # the model_dir.LoadedModel fine-tuned: tokenizer, labels, preprocess, config
    src: Path
    cfg: TrainConfig
    info: D.DistInfo
    output: Path
    rule: object
    objective: object
    ds_name: str
    train_ds: object
    val_ds: object
    labels: list
    micro: int
    spe: int                       # optimizer steps per epoch
    total: int
    sampler: object
    loader_kw: dict                # training batches
    val_kw: dict                   # validation batches (text tasks: prompts only; others: the same)
    val_loader: object
    step_module: object            # the TrainStep, or DDP around it
    opt: object
    sched: object
    scaler: object
    amp_ctx: object
    params: list
    all_reduce: object
    state_dir: Path
    t_start: float
    step: int = 0
    history: list = field(default_factory=list)
    best: dict | None = None
    resumed_from: int | None = None
    callbacks: list = field(default_factory=list)
    step_times: list = field(default_factory=list)
    compute_times: list = field(default_factory=list)
    processor: object = None       # text tasks: the chat processor, written with the model

    def record(self, row: dict):
        self.history.append(row)
        for cb in self.callbacks:
            cb.row(row)

    def note(self, text: str):
        for cb in self.callbacks:
            cb.note(text)

    def eval_batch(self, batch):
        return self.objective.eval_batch(batch_to_device(check_batch(batch), self.info.device))


def run(loaded, src: Path, cfg: TrainConfig, rec, info: D.DistInfo, output: Path, rule, resume=False,
        new_head=False, progress=True, console=None, on_step=None, callbacks=()) -> FinetuneResult:
    r = setup(loaded, src, cfg, rec, info, output, rule, new_head, progress=progress, console=console)
    start(r, resume)
    if info.main:
        r.callbacks.append(JsonlLog(r.state_dir / "log.jsonl", r.history))
        if progress:
            r.callbacks.append(ProgressBar(r.total, r.step, console=console))
    if on_step is not None:
        r.callbacks.append(OnStep(on_step))
    r.callbacks += list(callbacks)
    try:
        before_training(r)
        train_loader = torch.utils.data.DataLoader(IndexedDataset(r.train_ds), batch_size=r.micro, sampler=r.sampler,
                                                   drop_last=True, **r.loader_kw)
        t_log, n_log, line = time.time(), 0, "training"
        while r.step < r.total:
            epoch = r.step // r.spe
            pos = r.step - epoch * r.spe
            r.sampler.set_epoch(epoch, start=pos * cfg.grad_accum * r.micro)
            it = iter(train_loader)  # the sampler is read here, in this process: the epoch and offset hold
            while pos < r.spe and r.step < r.total:
                vals, sched_vals, gnorm = train_step(r, it)
                pos += 1
                n_log += 1
                if r.step % cfg.log_every == 0 or r.step == r.total or pos == r.spe:
                    now = time.time()
                    row = {"event": "step", "step": r.step, "epoch": epoch, **{k: round(v, 6) for k, v in vals.items()},
                           **sched_vals, "lr": r.sched.get_last_lr()[0], "grad_norm": float(gnorm),
                           "inputs_per_s": n_log * cfg.batch_size / max(now - t_log, 1e-9),
                           "elapsed_s": now - r.t_start}
                    r.record(row)
                    line = r.rule.info_line(row) + f" · {row['inputs_per_s']:.1f} inputs/s"
                    t_log, n_log = now, 0
                if cfg.save_every and r.step % cfg.save_every == 0:
                    save_checkpoint(r)
                for cb in r.callbacks:
                    cb.step(r.step, line)
            del it
            if pos == r.spe or r.step == r.total:
                validate(r, epoch)
                save_checkpoint(r)
    finally:
        for cb in r.callbacks:
            cb.close()
    return finish(r)


# ----- setup ----------------------------------------------------------------------------------------
def setup(loaded, src: Path, cfg: TrainConfig, rec, info: D.DistInfo, output: Path, rule, new_head, progress=False,
          console=None) -> Run:
    t_start = time.time()
    dev = info.device
    model = loaded.model
    if loaded.tokenizer is None:
        raise SmartTrimError(f"{src}: the model directory has no tokenizer/ folder")
    if rule.trims and not model.trimmer_parameters():
        raise SmartTrimError(f"{src}: the model has no trimmers (attach inserts them); use --no-trim for a plain fine-tune")
    # same initial state on every rank (DDP also broadcasts rank 0's weights)
    torch.manual_seed(cfg.seed)
    ds_name, train_ds, val_ds, labels = open_train_val(loaded, cfg, rec, new_head)
    max_len = loaded.max_text_len

    # what learns: the rule's trimmers, the backbone unless frozen
    for p in model.trimmer_parameters():
        p.requires_grad_(rule.trains_trimmers)
    if not cfg.train_backbone:
        if not rule.trains_trimmers and not cfg.lora_rank:
            raise SmartTrimError(f"--freeze-backbone with {'--no-trim' if not rule.trims else rule.name} "
                                 "leaves nothing to train")
        for p in model.backbone_parameters():
            p.requires_grad_(False)
    if cfg.lora_rank:
        add_lora(model, cfg, src)
    # parameters no loss reaches (LLaVA's tower layers after vision_feature_layer): frozen, else a trained backbone
    # under DDP (find_unused_parameters=False) fails at its second step ("Expected to have finished reduction");
    # in one process they get no gradient and AdamW skips them, so freezing changes nothing there
    for p in model.unused_parameters():
        p.requires_grad_(False)
    model.to(dev).train()

    # batch geometry
    per_rank = cfg.batch_size // info.world
    if cfg.batch_size % (info.world * cfg.grad_accum):
        raise SmartTrimError(f"--batch-size {cfg.batch_size} is not divisible by {info.world} process(es) x "
                             f"--grad-accum {cfg.grad_accum}")
    micro = per_rank // cfg.grad_accum

    retrieval = model.config.task == "retrieval"
    amp_ctx, scaler = amp(cfg, dev)
    processor = None
    if output_kind(model) == "text":  # decoder VLM: chat-processor batches, answers as labels (targets=self: own)
        from ..data import VQA_SHORT_ANSWER, load_chat_processor
        from .generation import TextCollate

        processor = load_chat_processor(Path(src) / "tokenizer")
        instruction = None if ds_name == "prompts" else VQA_SHORT_ANSWER
        collate, val_collate = TextCollate(processor, "train", instruction), TextCollate(processor, "generate",
                                                                                        instruction)
        objective = objective_for(model, ds_name, cfg, processor)
        if cfg.targets == "self":
            train_ds, val_ds = self_targets(model, objective, train_ds, val_ds, val_collate, cfg, info, output, src,
                                            instruction, amp_ctx, progress, console)
    else:
        collate = val_collate = Collate(loaded.tokenizer, max_len, ("image_id",) if retrieval else ())
        objective = objective_for(model, ds_name, cfg)
    sampler = D.ResumableSampler(len(train_ds), info.rank, info.world, shuffle=True, seed=cfg.seed, pad=True)
    spe = len(sampler.order()) // micro // cfg.grad_accum
    if spe < 1:
        raise SmartTrimError(f"{ds_name}: {len(train_ds)} training inputs make less than one batch of "
                             f"{cfg.batch_size}; lower --batch-size")
    total = int(cfg.max_steps) if cfg.max_steps else cfg.epochs * spe

    if retrieval:
        # the ITM loss never reaches the ITC projections (they only pick the hard negatives): frozen, so that
        # DDP without find_unused_parameters sees every trainable parameter used
        for name in ("vision_proj", "text_proj"):
            if hasattr(model, name):
                getattr(model, name).requires_grad_(False)
    loader_kw = dict(num_workers=cfg.workers, collate_fn=collate, pin_memory=dev.type == "cuda",
                     persistent_workers=cfg.workers > 0)
    val_kw = {**loader_kw, "collate_fn": val_collate}
    val_sampler = D.ResumableSampler(len(val_ds), info.rank, info.world, shuffle=False, pad=False)
    val_loader = torch.utils.data.DataLoader(IndexedDataset(val_ds), batch_size=cfg.eval_batch_size or micro,
                                             sampler=val_sampler, **val_kw)

    # optimisation
    all_reduce = D.all_reduce_sum(info)
    rule.bind(model, cfg, total, all_reduce)
    step = TrainStep(model, cfg, rule, objective)
    groups = param_groups(model, cfg)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: cur.lr_factor(s, total, cfg.warmup, cfg.end_lr_factor, cfg.decay_power))
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP
        # every trimmer the rule trains is used in every soft forward (and frozen ones are left out), so DDP
        # needs no find_unused_parameters; the model has no buffers to synchronise
        step_module = DDP(step, device_ids=[dev.index] if dev.type == "cuda" else None, find_unused_parameters=False)
    else:
        step_module = step
    return Run(model=model, loaded=loaded, src=Path(src), cfg=cfg, info=info, output=Path(output), rule=rule, objective=objective,
               ds_name=ds_name, train_ds=train_ds, val_ds=val_ds, labels=labels, micro=micro, spe=spe, total=total,
               sampler=sampler, loader_kw=loader_kw, val_kw=val_kw, val_loader=val_loader, step_module=step_module,
               opt=opt, sched=sched, scaler=scaler, amp_ctx=amp_ctx, params=[p for g in groups for p in g["params"]],
               all_reduce=all_reduce, state_dir=ck.state_dir_for(output), t_start=t_start, processor=processor)


def add_lora(model, cfg: TrainConfig, src):
    """lora_rank > 0: adapters on the family's language model (the rest stays frozen: config checks). Added
    before the teacher "start" copy is made, whose adapters stay at B = 0 (its weights are the start's), and
    before a resume loads the checkpoint, whose state dict holds the adapters."""
    from ..nn.lora import apply_lora

    lm = model.lora_module()
    if lm is None:
        raise SmartTrimError(f"{src}: lora_rank={cfg.lora_rank}: the {model.family} family supports no LoRA (it "
                             "declares no language model); use lora_rank=0")
    apply_lora(lm, cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, seed=cfg.seed,
               where=f"the {model.family} language model")


def param_groups(model, cfg: TrainConfig):
    """METER's groups: uni-modal encoders at lr, cross-modal encoder x lr_mult_cross_modal, task head x
    lr_mult_head, plus the trimmers x lr_mult_trimmer; no weight decay on biases and norms (1-D)."""
    head = getattr(model, "head", None)  # a decoder VLM has none: its LM head is part of the backbone
    head_ids = {id(p) for p in head().parameters()} if head else set()
    groups: dict = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith(("token_trimmers.", "head_trimmers.")):
            kind, mult = "trimmer", cfg.lr_mult_trimmer
        elif ".lora_A" in name or ".lora_B" in name:
            kind, mult = "lora", cfg.lr_mult_lora
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


def amp(cfg: TrainConfig, device: torch.device):
    """-> (autocast context factory, GradScaler)."""
    mode = cfg.amp
    if device.type != "cuda" or mode == "off":
        return contextlib.nullcontext, torch.amp.GradScaler("cuda", enabled=False)
    if mode == "auto":
        mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    return (lambda: torch.autocast("cuda", dtype=dtype)), torch.amp.GradScaler("cuda", enabled=mode == "fp16")


# ----- resume ---------------------------------------------------------------------------------------
def start(r: Run, resume: bool):
    """A fresh state (earlier files of the state directory removed), or every part of ``last.pt``."""
    cfg, info, last = r.cfg, r.info, r.state_dir / "last.pt"
    if resume and last.is_file():
        st = ck.load_state(last)
        old = {**LATER_DEFAULTS, **st["config"]}  # a checkpoint from before a setting existed ran at its default
        diff = [k for k, v in cfg.to_dict().items() if k not in RESUME_FREE and old.get(k) != v]
        # the rule's own settings (a fixed keep ratio ...); a checkpoint from before rules: SmartTrim or plain
        old_rule = st.get("rule_params") or {"rule": "smarttrim" if old.get("trim") else "plain"}
        diff += [k for k, v in r.rule.params().items() if old_rule.get(k) != v]
        if diff:
            k = diff[0]
            now, was = {**cfg.to_dict(), **r.rule.params()}, {**old, **old_rule}
            raise SmartTrimError(f"{last}: --resume with different settings than the interrupted run "
                                 f"({k}: {was.get(k)!r} -> {now[k]!r}{' ...' if len(diff) > 1 else ''}); "
                                 "use the same settings, or start over without --resume")
        if st["model"].keys() != r.model.state_dict().keys():
            raise SmartTrimError(f"{last}: the checkpoint's weights do not match the model in {r.src}")
        r.model.load_state_dict(st["model"])
        r.opt.load_state_dict(st["optimizer"])
        r.sched.load_state_dict(st["scheduler"])
        if st.get("scaler"):
            r.scaler.load_state_dict(st["scaler"])
        r.rule.load_state_dict(st.get("rule", st.get("budget")))
        r.step, r.history, r.best = int(st["step"]), list(st["history"]), st.get("best")
        if st.get("world") == info.world and st.get("rng"):
            ck.set_rng_state(st["rng"][info.rank])
        r.resumed_from = r.step
    elif info.main:
        for f in ("last.pt", "best.safetensors", "best.json", "log.jsonl"):
            (r.state_dir / f).unlink(missing_ok=True)
    D.barrier(info)
    if info.main:
        r.state_dir.mkdir(parents=True, exist_ok=True)


def save_checkpoint(r: Run):
    rngs = D.gather_objects(r.info, ck.rng_state())
    if r.info.main:
        cfg = r.cfg
        ck.save_state(r.state_dir / "last.pt", {
            "model": r.model.state_dict(), "optimizer": r.opt.state_dict(), "scheduler": r.sched.state_dict(),
            "scaler": r.scaler.state_dict(), "rule": r.rule.state_dict(), "rule_params": r.rule.params(),
            "step": r.step, "history": r.history, "best": r.best,
            # the sampler's position: epoch `step // steps_per_epoch`, permutation seeded by (seed, epoch),
            # resumed `start` inputs into each rank's share
            "sampler": {"epoch": r.step // r.spe, "start": (r.step % r.spe) * cfg.grad_accum * r.micro,
                        "seed": cfg.seed, "steps_per_epoch": r.spe},
            "config": cfg.to_dict(), "world": r.info.world, "rng": rngs})
    D.barrier(r.info)


def before_training(r: Run):
    """Before the first step: a target the rule cannot reach, the starting model's score; after a resume: the
    validation of an epoch whose last step was checkpointed before it ran."""
    cfg = r.cfg
    floor_r = r.rule.lowest_ratio(r.model, r.val_loader, r.eval_batch) if r.step == 0 else None
    if floor_r is not None and cfg.target_ratio < floor_r:
        r.record({"event": "unreachable_target", "step": 0, "target": cfg.target_ratio, "lowest_ratio": floor_r})
        r.note(f"[yellow]warning:[/] target ratio {cfg.target_ratio} is below {floor_r:.3f}, the lowest GMACs "
               "ratio this trimmer placement reaches with every droppable token and head dropped: training "
               "will stop short of it; place a token trimmer earlier (attach --token-layers, e.g. "
               '"vision=0,2")')
    if r.step == 0 and cfg.eval_before:
        res = evaluate(r.model, r.val_loader, r.info, r.amp_ctx, r.objective, mode="full")
        r.record({"event": "val_full", "step": 0, "epoch": -1, **res})
        r.note(f"starting model (full capacity): validation score {res.get('score', float('nan')):.4f}")
    if r.step and (r.step % r.spe == 0 or r.step == r.total) and \
            not any(row.get("event") == "val" and row["step"] == r.step for row in r.history):
        validate(r, (r.step - 1) // r.spe)


# ----- step -----------------------------------------------------------------------------------------
def train_step(r: Run, it):
    """One optimizer step over ``grad_accum`` micro-batches of ``it``. -> (rank-averaged parts, the rule's
    schedule values, gradient norm)."""
    cfg, info, dev = r.cfg, r.info, r.info.device
    t0 = time.time()
    sched_vals = r.rule.begin_step(r.step)
    if r.rule.distills and cfg.distill_schedule != "constant":
        sched_vals["alpha"] = distill_weight_at(cfg, r.step, r.total)  # the step's distillation weight, logged
    acc, waited = {}, 0.0
    for a in range(cfg.grad_accum):
        t_wait = time.time()
        batch = batch_to_device(check_batch(next(it)), dev)
        waited += time.time() - t_wait
        sync = r.step_module.no_sync() if (info.distributed and a < cfg.grad_accum - 1) else contextlib.nullcontext()
        with sync:
            with r.amp_ctx():
                loss, parts = r.step_module(**batch)
            r.scaler.scale(loss / cfg.grad_accum).backward()
        parts["loss"] = loss.detach()
        for k, v in parts.items():
            acc[k] = acc.get(k, 0.0) + v.float() / cfg.grad_accum
    r.scaler.unscale_(r.opt)
    gnorm = torch.nn.utils.clip_grad_norm_(r.params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    r.scaler.step(r.opt)
    r.scaler.update()
    r.opt.zero_grad(set_to_none=True)
    r.sched.step()
    # rank-averaged parts (ratio/ratio_std are already global)
    keys = [k for k in LOGGED_PARTS if k in acc]
    vec = torch.stack([acc[k] for k in keys])
    if r.all_reduce is not None:
        r.all_reduce(vec)
        vec = vec / info.world
    vals = dict(zip(keys, vec.tolist()))
    r.rule.end_step(vals)
    r.step += 1
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    dt = time.time() - t0
    r.step_times.append(dt)
    r.compute_times.append(dt - waited)
    return vals, sched_vals, gnorm


# ----- validate -------------------------------------------------------------------------------------
def validate(r: Run, epoch: int):
    """Hard-mode validation under the rule; the best score among epochs the rule accepts is kept (state dir)."""
    res = evaluate(r.model, r.val_loader, r.info, r.amp_ctx, r.objective, **r.rule.run_kwargs())
    r.record({"event": "val", "step": r.step, "epoch": epoch, **res})
    if res.get("n") and r.rule.at_target(res, r.step) and (r.best is None or res.get("score", -1) > r.best["score"]):
        r.best = {"step": r.step, "epoch": epoch, **res}
        if r.info.main:
            ck.save_best(r.state_dir, r.model, r.best)
    D.barrier(r.info)
    r.note(f"epoch {epoch + 1}: validation score {res.get('score', float('nan')):.4f}"
           + (r.rule.val_note(res) if res.get("n") else "")
           + (" [best]" if r.best and r.best["step"] == r.step else ""))
    return res


# ----- finish ---------------------------------------------------------------------------------------
def finish(r: Run) -> FinetuneResult:
    """The best weights at the target (or the last ones), the rule's calibration, the written model directory."""
    cfg, info, model, history = r.cfg, r.info, r.model, r.history
    dev = info.device
    wall = time.time() - r.t_start
    final = next((row for row in reversed(history) if row.get("event") == "val"), {})
    base = next((row for row in history if row.get("event") == "val_full"), {})
    if r.best is not None:
        sd = ck.load_best(r.state_dir)  # every rank (shared file system, as for the checkpoints)
        if sd is not None:
            model.load_state_dict({k: v.to(dev) for k, v in sd.items()})
        selected = f"epoch {r.best['epoch'] + 1} (step {r.best['step']})"
    else:
        selected = "last (no validation reached the target ratio within the tolerance)"
    calibrated = None
    if r.rule.calibrates:
        n_cal = min(len(r.val_ds), cfg.calibrate_limit or len(r.val_ds))
        cal_sampler = D.ResumableSampler(n_cal, info.rank, info.world, shuffle=False, pad=False)
        cal_loader = torch.utils.data.DataLoader(IndexedDataset(r.val_ds), batch_size=cfg.eval_batch_size or r.micro,
                                                 sampler=cal_sampler, **r.val_kw)
        thr = r.rule.calibrate(model, cal_loader, info, r.amp_ctx, r.objective)
        res = evaluate(model, r.val_loader, info, r.amp_ctx, r.objective, **r.rule.run_kwargs(thr))
        calibrated = {"threshold": thr, "calibration_inputs": n_cal, **res}
        r.record({"event": "val_calibrated", "step": r.step, "epoch": -1, **calibrated})
        r.note(f"calibrated keep threshold {thr:.4f}: validation score {res.get('score', float('nan')):.4f}, "
               f"FLOPs ratio {res.get('ratio_mean', float('nan')):.3f} ± {res.get('ratio_std', float('nan')):.3f}")
    skipped = {"train": dict(r.train_ds.skipped), "val": dict(r.val_ds.skipped)}
    steady = r.step_times[min(len(r.step_times) - 1, 2):] if r.step_times else []
    steady_c = r.compute_times[min(len(r.compute_times) - 1, 2):] if r.compute_times else []
    summary = {
        "mode": r.rule.name, "dataset": r.ds_name, "source": str(r.src),
        "train_inputs": len(r.train_ds), "val_inputs": len(r.val_ds), "skipped": skipped,
        "world_size": info.world, "steps": r.total, "steps_per_epoch": r.spe, "resumed_from_step": r.resumed_from,
        "target_ratio": r.rule.target_ratio(), "selected": selected,
        **{k: v for k, v in r.rule.params().items() if k != "rule"},
        "unreachable_target": next((row for row in history if row.get("event") == "unreachable_target"), None),
        "best": r.best, "final": final, "base": base, "calibrated": calibrated,
        "seconds_per_step": (sum(steady) / len(steady)) if steady else None,
        "compute_seconds_per_step": (sum(steady_c) / len(steady_c)) if steady_c else None,
        "wall_s": wall, "config": cfg.to_dict(),
    }
    out = None
    if info.main:
        out = write_model(r, summary)
        for cb in (*r.callbacks, TrainingPlot(r.rule.title(r.ds_name))):
            cb.written(out, history, summary)
    D.barrier(info)
    model.eval()
    return FinetuneResult(out, r.state_dir, summary, model, history)


def derived_entries(r: Run, mode: str) -> dict:
    """The written model's ``provenance`` (the source's, this fine-tune's, its lineage) and ``reference`` (the model
    a trimming rule's result is measured against: reference.py), the same for every rule."""
    from ..reference import derived_config, inherited_provenance

    src_cfg = r.loaded.config
    derived = derived_config(r.src, src_cfg, f"finetune ({mode})", r.rule.trims, r.labels)
    prov = {**inherited_provenance(src_cfg), "finetuned_from": str(Path(r.src).resolve()), "finetune_mode": mode,
            "finetune_dataset": r.ds_name, **derived["provenance"]}
    return {"provenance": prov, "reference": derived["reference"]}


def write_model(r: Run, summary: dict) -> Path:
    """Rank 0: the model directory (selected weights, labels, provenance, the run's summary), its summary and log."""
    from ..model_dir import save_model_dir
    from ..nn.lora import merged

    model = r.model
    pre_out = dict(r.loaded.preprocess)
    finetune_section = {k: summary[k] for k in ("mode", "dataset", "target_ratio", "selected", "best", "final", "base",
                                                "calibrated", "steps", "world_size")}
    derived = derived_entries(r, summary["mode"])
    was_training = model.training
    model.eval()
    with merged(model.cpu()):  # LoRA folded into the weights: the directory holds the family's own layout
        out = save_model_dir(model, r.output, tokenizer=r.processor or r.loaded.tokenizer, labels=r.labels,
                             provenance=derived["provenance"],
                             extra={"preprocess": pre_out, "reference": derived["reference"],
                                    "finetune": finetune_section, **r.rule.model_sections(summary)})
    model.to(r.info.device).train(was_training)
    ck.write_json(Path(out) / "finetune_summary.json", summary)
    ck.write_jsonl(Path(out) / "finetune_log.jsonl", r.history)
    targets = r.state_dir / "self_targets.json"  # targets=self: the answers it was trained on, kept with it
    if r.cfg.targets == "self" and targets.is_file():
        (Path(out) / targets.name).write_bytes(targets.read_bytes())
    return out


def self_targets(model, objective, train_ds, val_ds, collate, cfg, info, output, src, instruction, amp_ctx,
                 progress=False, console=None):
    """targets=self: the train and val sets with the full model's own greedy answers (state dir cache; rank 0
    generates, the others read)."""
    from rich.progress import Progress

    from . import self_targets as st

    state = ck.state_dir_for(output)
    bs = cfg.eval_batch_size or max(1, cfg.batch_size // info.world // cfg.grad_accum)
    out = []
    for name, ds in (("train", train_ds), ("val", val_ds)):
        split = (cfg.train_split if name == "train" else cfg.val_split) or name
        key = st.cache_key(src, ds, split, cfg, instruction)

        def make(ds=ds, name=name):
            with Progress(console=console, transient=True, disable=not progress) as bar:
                task = bar.add_task(f"full model answering the {name} inputs", total=len(ds))
                return st.generate_targets(model, objective, ds, collate, bs, info.device, amp_ctx,
                                           lambda n: bar.advance(task, n))

        if info.main:
            texts, _ = st.load_or_generate(state, key, name, make)
        D.barrier(info)
        if not info.main:
            texts, _ = st.load_or_generate(state, key, name, make)
        out.append(st.SelfTargets(ds, texts))
    return out
