"""The decision rule: what decides, in a training step and in validation, which tokens and heads the
trimmed (student) pass keeps. The loop (loop.py) is the same for every rule; a rule says

    what learns          ``trains_trimmers`` (the backbone learns unless --freeze-backbone)
    the step's schedule  ``begin_step`` (the curriculum's value; logged), ``end_step`` (after the update)
    the student pass     ``student_context`` (soft mode: masks and head gates, shapes fixed) and the terms it
                         adds to the loss (``penalties``)
    validation           ``run_kwargs`` (how hard-mode inference runs it), ``at_target`` (may this epoch be
                         selected), ``lowest_ratio`` (a target no training can reach), ``calibrate`` (the end-of-
                         run keep threshold)
    what it writes       ``name`` (the run's mode), ``params`` (checked on --resume, in the summary),
                         ``model_sections`` (config.json)

    LearnedTrimmers   SmartTrim: the learned token and head trimmers (Gumbel samples), FLOPs budget, curriculum
    FixedRatio        one keep ratio for every input (e.g. EViT's top-k by [CLS] attention:
                      baselines/evit_finetuned.py); the ratio follows the curriculum down to it; nothing learns
                      which tokens to keep
    NoTrim            --no-trim: the full-capacity model, task loss only
"""
from __future__ import annotations

import math

import torch

from ..errors import SmartTrimError
from ..trim.cost import macs_ratio
from . import curriculum as cur
from . import distributed as D
from .losses import Budget, budget_loss, floor_loss, global_stats


class DecisionRule:
    """The interface the loop calls (module docstring); the defaults are those of a rule that learns nothing and
    has no threshold to calibrate."""

    name = "rule"
    trims = True              # reads the trimming settings (curriculum, distillation); False: --no-trim
    trains_trimmers = False
    distills = True           # runs the full-capacity teacher pass

    def bind(self, model, cfg, total: int, all_reduce=None):
        """Called once the model is loaded and the number of steps known."""
        self.cfg, self.total, self.all_reduce = cfg, total, all_reduce
        self.curriculum_end = math.ceil((cfg.curriculum_hold + cfg.curriculum) * total)
        self.step = 0

    def begin_step(self, step: int) -> dict:
        """The step's schedule; -> what the step's log row records of it."""
        self.step = step
        return {}

    def student_context(self, model, index):
        raise NotImplementedError

    def penalties(self, ctx, logits) -> tuple[list, dict]:
        """-> (loss terms added to task + distill in this order, logged parts)."""
        return [], {}

    def end_step(self, parts: dict):
        """After the optimizer step, with the rank-averaged parts."""

    def run_kwargs(self, threshold=None) -> dict:
        """How validation runs the model (``model.run`` keywords)."""
        return {"mode": "hard", "threshold": threshold}

    def at_target(self, res: dict, step: int) -> bool:
        return step >= self.curriculum_end

    def lowest_ratio(self, model, loader, prepare):
        """The lowest mean GMACs ratio this rule can reach on the first validation batch, or None."""
        return None

    calibrates = False

    def calibrate(self, model, loader, info, amp_ctx, objective) -> float:
        """End of run, on the selected weights: the keep threshold inference runs at (when ``calibrates``)."""
        raise NotImplementedError

    def params(self) -> dict:
        return {"rule": self.name}

    def target_ratio(self) -> float | None:
        """The FLOPs ratio the run aims at (None: set by the rule's own parameters)."""
        return None

    def model_sections(self, summary: dict) -> dict:
        """Extra sections of the written config.json."""
        return {}

    def title(self, dataset: str) -> str:
        return f"smarttrim finetune ({self.name}, {dataset})"

    def val_note(self, res: dict) -> str:
        return ""

    def info_line(self, row: dict) -> str:
        return f"loss {row['loss']:.3f}"

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, d: dict):
        pass


class LearnedTrimmers(DecisionRule):
    """SmartTrim: the trimmers sample keep decisions (hard Gumbel, straight-through, noise seeded per input); the
    cost model's FLOPs ratio of the batch meets the curriculum's target through the budget penalty with its
    adaptive multiplier (and optionally the per-position floor)."""

    name = "smarttrim"
    trains_trimmers = True

    def bind(self, model, cfg, total, all_reduce=None):
        super().bind(model, cfg, total, all_reduce)
        self.budget = Budget(cfg.dual_lr, cfg.nu_max)
        self.tau, self.target, self.noise = 1.0, 1.0, 1.0

    def begin_step(self, step):
        c, total = self.cfg, self.total
        self.step = step
        self.tau = cur.temperature(step, total, c.tau_start, c.tau_end, c.tau_frac)
        self.target = cur.target_ratio(step, total, c.target_ratio, c.curriculum, c.curriculum_shape,
                                       hold=c.curriculum_hold)
        self.noise = cur.noise_scale(step, total, c.noise_start, c.noise_end, c.noise_frac)
        return {"target": self.target, "tau": self.tau, "noise": self.noise, "nu": self.budget.nu}

    def student_context(self, model, index):
        ctx = model.make_context(mode="soft", record=True, tau=self.tau)
        ctx.noise = D.InstanceNoise(self.cfg.seed, self.step, index, self.noise)
        return ctx

    def penalties(self, ctx, logits):
        c = self.cfg
        ratio = macs_ratio(ctx.records)
        stats = global_stats(ratio, self.all_reduce)
        lb, parts = budget_loss(ratio, self.target, stats, c.cost_weight, self.budget.nu, c.spread_weight)
        terms = [lb]
        parts = {**parts, "ratio": stats.mean, "ratio_std": stats.var.sqrt()}
        if c.floor_weight > 0 and ctx.keep_fraction:
            lfl = floor_loss(ctx.keep_fraction, self.target, self.all_reduce)
            terms.append(c.floor_weight * lfl)
            parts["floor"] = lfl.detach()
        return terms, parts

    def target_ratio(self):
        return self.cfg.target_ratio

    def end_step(self, parts):
        self.budget.update(parts.get("ratio", 1.0), self.target)

    def at_target(self, res, step):
        return step >= self.curriculum_end and res.get("ratio_mean", 1) <= self.cfg.target_ratio + self.cfg.tolerance

    def lowest_ratio(self, model, loader, prepare):
        first = next(iter(loader), None)
        return None if first is None else lowest_ratio(model, prepare(first))

    @property
    def calibrates(self):
        return self.cfg.calibrate

    def calibrate(self, model, loader, info, amp_ctx, objective):
        # the threshold is a runtime knob: raise the default one only where inference misses the target
        from .evaluation import calibrate_threshold

        c = self.cfg
        thr, _ = calibrate_threshold(model, loader, info, c.target_ratio, amp_ctx,
                                     c.calibrate_tolerance * c.target_ratio, objective=objective)
        model.threshold = thr
        model.trim_config.threshold = thr
        return thr

    def val_note(self, res):
        return f", FLOPs ratio {res['ratio_mean']:.3f} ± {res['ratio_std']:.3f} (target {self.cfg.target_ratio})"

    def info_line(self, row):
        return (f"loss {row['loss']:.3f} (task {row['task']:.3f}{_dist(row)} cost {row['cost']:.4f})"
                f" · FLOPs ratio {row['ratio']:.2f}→{row['target']:.2f}")

    def state_dict(self):
        return self.budget.state_dict()

    def load_state_dict(self, d):
        self.budget.load_state_dict(d)


class FixedRatio(DecisionRule):
    """One keep ratio for every input and every pruning position, applied by ``policy(ratio)`` (a token policy
    of ``model.run``/``make_context``). Training runs it in soft mode (dropped tokens masked out of attention),
    which equals the hard-mode gather validation runs given the same decisions; its ratio falls from 1.0 to
    ``keep_ratio`` with SmartTrim's curriculum, then holds. There is no budget term: the ratio is fixed by
    construction. Subclasses give ``policy`` and, through ``bind``, what it needs of the model."""

    name = "fixed-ratio"

    def __init__(self, keep_ratio: float):
        if not 0.0 <= float(keep_ratio) <= 1.0:
            raise SmartTrimError(f"{self.name}: keep ratio must be in [0, 1], got {keep_ratio}")
        self.keep_ratio = float(keep_ratio)
        self.ratio = 1.0

    def policy(self, ratio: float):
        raise NotImplementedError

    def begin_step(self, step):
        c = self.cfg
        self.step = step
        self.ratio = cur.target_ratio(step, self.total, self.keep_ratio, c.curriculum, c.curriculum_shape,
                                      hold=c.curriculum_hold)
        return {"keep_ratio": self.ratio}

    def student_context(self, model, index):
        return model.make_context(mode="soft", policy=self.policy(self.ratio))

    def run_kwargs(self, threshold=None):
        return {"mode": "hard", "policy": self.policy(self.keep_ratio)}

    def params(self):
        return {"rule": self.name, "keep_ratio": self.keep_ratio}

    def val_note(self, res):
        return f" at keep ratio {self.keep_ratio:.3f} (GMACs ratio {res['ratio_mean']:.3f})"

    def info_line(self, row):
        return f"loss {row['loss']:.3f} (task {row['task']:.3f}{_dist(row)}) keep {row['keep_ratio']:.2f}"


class NoTrim(DecisionRule):
    """--no-trim: a plain fine-tune at full capacity, task loss only (no teacher)."""

    name = "plain"
    trims = False
    distills = False

    def student_context(self, model, index):
        return model.make_context(mode="full")

    def penalties(self, ctx, logits):
        one = torch.ones((), device=logits.device)
        return [], {"ratio": one, "ratio_std": 0 * one}

    def run_kwargs(self, threshold=None):
        return {"mode": "full"}

    def target_ratio(self):
        return 1.0

    def at_target(self, res, step):
        return True


def _dist(row: dict) -> str:
    """The progress line's distillation part; none when the step ran no teacher (alpha 0)."""
    return f" dist {row['distill']:.3f}" if "distill" in row else ""


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
