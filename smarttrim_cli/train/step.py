"""One training forward: the module DDP wraps. The objective gives the batch; the full-capacity teacher runs
under no_grad (unless it is trained too, below); the student runs under the decision rule (soft mode); the loss is

    task(student) + alpha * distill(student || teacher) + teacher_task_weight * task(teacher)
        + the rule's penalties + feature_weight * feature

alpha is ``distill_weight``, or its ``distill_schedule`` value at the step (curriculum.distill_weight). With
``teacher_task_weight`` > 0 the teacher pass (teacher self) keeps its graph, so the full-capacity pass is trained
on the task too; its logits and features enter the distillation terms detached. A step that needs no teacher
(alpha, feature_weight and teacher_task_weight all 0) skips its pass. A rule that does not distil (--no-trim) runs
the student at full capacity and takes the task loss alone.
"""
from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn as nn

from . import curriculum as cur
from .config import TrainConfig


def uses_teacher(cfg: TrainConfig) -> bool:
    """Does any step of a distilling rule's run need the full-capacity pass?"""
    return (cfg.distill_weight > 0 or (cfg.distill_schedule == "fade" and cfg.distill_weight_end > 0)
            or cfg.feature_weight > 0 or cfg.teacher_task_weight > 0)


def distill_weight_at(cfg: TrainConfig, step: int, total: int) -> float:
    """alpha at optimizer step ``step`` of ``total``."""
    return cur.distill_weight(step, total, cfg.distill_weight, cfg.distill_weight_end, cfg.distill_schedule,
                              cfg.curriculum, cfg.curriculum_shape, cfg.curriculum_hold)


def teacher_model(model, cfg: TrainConfig):
    """The distillation teacher's weights: ``model`` itself (teacher "self": its full-capacity pass) or a
    frozen copy of it as it is now, in eval mode (teacher "start"; build it before training moves the weights).
    With LoRA (lora_rank > 0) teacher "self" runs the same adapted weights as the student; the "start" copy holds
    the adapters at B = 0, frozen, so it stays the starting model."""
    return copy.deepcopy(model).eval().requires_grad_(False) if cfg.teacher == "start" else model


class TrainStep(nn.Module):
    """forward(batch tensors) -> (loss, parts). Every trainable parameter is used in every forward (the rule
    freezes what it does not train), so DDP needs no ``find_unused_parameters``."""

    def __init__(self, model, cfg: TrainConfig, rule, objective):
        super().__init__()
        self.model, self.cfg, self.rule, self.objective = model, cfg, rule, objective
        self._feats: list = []
        # teacher "start": a frozen copy of the weights training starts from (made before a resume loads the
        # checkpoint's), in eval mode; kept out of the module tree so that neither DDP nor the optimizer sees it
        t = teacher_model(model, cfg) if rule.distills and uses_teacher(cfg) else model
        self._teacher = () if t is model else (t,)
        if rule.distills and cfg.feature_weight > 0:
            for mod in (*self._teacher, model):  # teacher first: _feats[0] is the teacher's, [-1] the student's
                mod.head().register_forward_pre_hook(lambda mod, args: self._feats.append(args[0]))

    def forward(self, pixel_values, input_ids, attention_mask, target, index, pixel_values2=None, image_id=None):
        m, cfg, rule = self.model, self.cfg, self.rule
        inputs = dict(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
        if image_id is not None:
            inputs["image_id"] = image_id
        inputs, target, index = self.objective.train_batch(m, inputs, target, index, rule.step)
        if pixel_values2 is not None:
            inputs["pixel_values2"] = pixel_values2
        share = self._rank_share(target)
        if not rule.distills:
            logits = m(**inputs, ctx=rule.student_context(m, index))
            lt = self.objective.task_loss(logits, target) * share
            _, parts = rule.penalties(None, logits)
            return lt, {"task": lt.detach(), **parts}
        self._feats.clear()
        alpha = distill_weight_at(cfg, rule.step, rule.total)
        teacher = None
        if alpha > 0 or cfg.feature_weight > 0 or cfg.teacher_task_weight > 0:
            tm = self._teacher[0] if self._teacher else m
            # trained with the task (teacher self only, config checks): keep the full pass's graph
            with contextlib.nullcontext() if cfg.teacher_task_weight > 0 else torch.no_grad():
                teacher = tm(**inputs, ctx=tm.make_context(mode="full"))
        ctx = rule.student_context(m, index)
        logits = m(**inputs, ctx=ctx)
        lt = self.objective.task_loss(logits, target) * share
        parts = {"task": lt.detach()}
        loss = lt
        if teacher is not None:
            ld = self.objective.distill_loss(logits, teacher, target) * share  # detaches the teacher's logits
            loss = loss + alpha * ld
            parts["distill"] = ld.detach()
            if cfg.teacher_task_weight > 0:
                ltt = self.objective.task_loss(teacher, target) * share
                loss = loss + cfg.teacher_task_weight * ltt
                parts["teacher_task"] = ltt.detach()
        terms, rparts = rule.penalties(ctx, logits)
        for t in terms:  # one at a time, in the rule's order (the sum's rounding is part of the result)
            loss = loss + t
        parts.update(rparts)
        if cfg.feature_weight > 0 and len(self._feats) >= 2:
            from .losses import feature_loss

            lf = feature_loss(self._feats[-1], self._feats[0])
            loss = loss + cfg.feature_weight * lf
            parts["feature"] = lf.detach()
        return loss, parts

    def _rank_share(self, target):
        """1, or under DDP with an objective that averages over a batch-dependent count (a text objective: the
        answer tokens) this rank's count x world / the global count. DDP averages the ranks' gradients, so the
        ranks' per-token means would weigh a rank's few tokens like another's many, and 2 processes would not give
        1 process's run with the same global batch (a mean over all its answer tokens); weighted, they do."""
        n = self.objective.loss_count(target)
        all_reduce = getattr(self.rule, "all_reduce", None)
        if n is None or all_reduce is None:
            return 1.0
        t = torch.stack([n.float(), torch.ones((), device=n.device)])  # -> (global count, world size)
        all_reduce(t)
        return n.float() * t[1] / t[0].clamp_min(1.0)  # a tensor: no device sync
