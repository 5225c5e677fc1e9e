"""Schedules over optimizer steps: the target ratio curriculum, the Gumbel temperature, the learning rate.

All are pure functions of (step, total steps), so a resumed run sees exactly the values an
uninterrupted one would.
"""
from __future__ import annotations

import math


def _progress(step: int, span: float) -> float:
    return 1.0 if span <= 0 else min(1.0, max(0.0, step / span))


def target_ratio(step: int, total: int, final: float, frac: float = 0.5, shape: str = "linear",
                 start: float = 1.0, hold: float = 0.0) -> float:
    """R_target(t): ``start`` (1.0 = everything kept) for the first ``hold`` fraction of training, then
    falls to ``final`` over the next ``frac`` fraction (linear or cosine), then holds."""
    h = hold * total
    p = _progress(step - h, frac * total)
    if shape == "cosine":
        p = 0.5 - 0.5 * math.cos(math.pi * p)
    elif shape != "linear":
        raise ValueError(f"curriculum shape must be linear or cosine, got {shape!r}")
    return start + (final - start) * p


def distill_weight(step: int, total: int, start: float, end: float = 0.0, schedule: str = "constant",
                   frac: float = 0.5, shape: str = "linear", hold: float = 0.0) -> float:
    """alpha, the distillation weight: ``start`` throughout (constant), or (fade) moving from ``start`` to ``end``
    while the target ratio falls (``target_ratio``'s hold, span and shape), then held at ``end``: the teacher
    guides the first cuts and lets go as the student settles at the final budget. curriculum 0 (no fall): ``end``
    from the first step."""
    if schedule == "constant":
        return start
    if schedule != "fade":
        raise ValueError(f"distill schedule must be constant or fade, got {schedule!r}")
    return target_ratio(step, total, end, frac, shape, start=start, hold=hold)


def temperature(step: int, total: int, tau_start: float = 1.0, tau_end: float = 1.0, frac: float = 1.0) -> float:
    """Gumbel temperature, annealed geometrically from tau_start to tau_end over ``frac`` of training."""
    p = _progress(step, frac * total)
    return float(tau_start * (tau_end / tau_start) ** p)


def noise_scale(step: int, total: int, start: float = 1.0, end: float = 0.0, frac: float = 0.75) -> float:
    """Scale of the keep samples' logistic noise, linear from ``start`` to ``end`` over ``frac`` of training."""
    return float(start + (end - start) * _progress(step, frac * total))


def lr_factor(step: int, total: int, warmup: float = 0.1, end_factor: float = 0.0, power: float = 1.0) -> float:
    """METER's schedule: linear warm-up for ``warmup`` (fraction of steps if < 1, else steps), then
    polynomial decay (power 1 = linear) to ``end_factor`` x the base rate at the last step."""
    w = warmup * total if warmup < 1 else warmup
    if w > 0 and step < w:
        return (step + 1) / (w + 1)
    rest = max(1.0, total - w)
    p = min(1.0, max(0.0, (step - w) / rest))
    return end_factor + (1 - end_factor) * (1 - p) ** power
