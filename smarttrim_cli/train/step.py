"""One training forward: the module DDP wraps. The objective gives the batch; the full-capacity teacher runs
under no_grad; the student runs under the decision rule (soft mode); the loss is

    task(student) + distill_weight * distill(student || teacher) + the rule's penalties + feature_weight * feature

A rule that does not distil (--no-trim) runs the student at full capacity and takes the task loss alone.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .config import TrainConfig


def teacher_model(model, cfg: TrainConfig):
    """The distillation teacher's weights: ``model`` itself (teacher "self": its full-capacity pass) or a
    frozen copy of it as it is now, in eval mode (teacher "start"; build it before training moves the weights)."""
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
        t = teacher_model(model, cfg) if rule.distills and cfg.distill_weight + cfg.feature_weight > 0 else model
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
        if not rule.distills:
            logits = m(**inputs, ctx=rule.student_context(m, index))
            lt = self.objective.task_loss(logits, target)
            _, parts = rule.penalties(None, logits)
            return lt, {"task": lt.detach(), **parts}
        self._feats.clear()
        with torch.no_grad():
            tm = self._teacher[0] if self._teacher else m
            teacher = tm(**inputs, ctx=tm.make_context(mode="full"))
        ctx = rule.student_context(m, index)
        logits = m(**inputs, ctx=ctx)
        lt = self.objective.task_loss(logits, target)
        ld = self.objective.distill_loss(logits, teacher)
        loss = lt + cfg.distill_weight * ld
        terms, rparts = rule.penalties(ctx, logits)
        for t in terms:  # one at a time, in the rule's order (the sum's rounding is part of the result)
            loss = loss + t
        parts = {"task": lt.detach(), "distill": ld.detach(), **rparts}
        if cfg.feature_weight > 0 and len(self._feats) >= 2:
            from .losses import feature_loss

            lf = feature_loss(self._feats[-1], self._feats[0])
            loss = loss + cfg.feature_weight * lf
            parts["feature"] = lf.detach()
        return loss, parts
