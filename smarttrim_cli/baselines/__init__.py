"""Baselines on the same trimmable core, for comparison with SmartTrim at matched mean GMACs.

    from smarttrim_cli.baselines import get_baseline, BASELINES
    bl = get_baseline("evit-fusion").calibrate(model, batches, 0.33)   # keep ratio found by bisection
    applied = bl.apply(model)
    logits, ctx = applied.run(batch, record=True)                      # hard mode, cost records in ctx

See common.py for the protocol; one module per baseline.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import SmartTrimError
from .ablations import TrainingAblation, no_curriculum, no_distill
from .common import Applied, Baseline, Policy, full_costs, measure
from .dart import DART
from .divprune import DivPrune
from .downsample import Downsample
from .fastv import FastV
from .evit import EViT
from .pool import Pool
from .random_drop import RandomDrop
from .static_heads import StaticHeads
from .tome import ToMe
from .visionzip import VisionZip


@dataclass(frozen=True)
class BaselineInfo:
    factory: Callable
    kind: str          # token | head | resolution | training
    description: str
    styles: tuple = ("ported",)  # family styles it runs on (backbones/base.py STYLES): calibrate_all's default


WRAPPED = ("wrapped",)
BASELINES: dict[str, BaselineInfo] = {
    "random": BaselineInfo(RandomDrop, "token", "random token dropping at a fixed keep ratio per pruning layer",
                           ("ported", "wrapped")),
    "evit": BaselineInfo(EViT, "token", "EViT-style top-k: keep the tokens the [CLS] (or the text) attends to most"),
    "evit-fusion": BaselineInfo(lambda **kw: EViT(**{"fuse": True, **kw}), "token",
                                "EViT top-k with the dropped tokens fused into one attention-weighted token"),
    "tome": BaselineInfo(ToMe, "token", "ToMe-style bipartite token merging (training-free)"),
    "static-heads": BaselineInfo(StaticHeads, "head", "the same least-important heads dropped for every input"),
    "downsample": BaselineInfo(Downsample, "resolution", "the full model at a lower input resolution"),
    # decoder VLMs (image_tokens.py): which projected image tokens enter the language model, per input
    "pool": BaselineInfo(Pool, "token", "image-token grid average-pooled to g x g windows (mode=stride: one token "
                         "per window)", WRAPPED),
    "visionzip": BaselineInfo(VisionZip, "token", "VisionZip: dominant tokens by the vision tower's [CLS] attention "
                              "at the feature layer, plus contextual tokens merged from the rest", WRAPPED),
    "divprune": BaselineInfo(DivPrune, "token", "DivPrune: greedy max-min cosine diversity of the projected "
                             "image features", WRAPPED),
    "dart": BaselineInfo(DART, "token", "DART: max-L1-norm pivot tokens, then the tokens least similar to each pivot",
                         WRAPPED),
    "fastv": BaselineInfo(FastV, "token", "FastV: the last prompt token's attention to the image tokens at LM "
                          "layer K (two passes; the first K layers counted at full length)", WRAPPED),
    "evit-finetuned": BaselineInfo(lambda **kw: _evit_finetuned(**kw), "training",
                                   "training run: fixed-ratio EViT top-k whose backbone is fine-tuned with "
                                   "SmartTrim's training loop and self-distillation objective for the same steps "
                                   "(train.loop.finetune with evit_finetuned.EViTRule); apply() runs its rule"),
    "smarttrim-no-distill": BaselineInfo(lambda **kw: no_distill(), "training",
                                         "ablation (training run): SmartTrim without self-distillation"),
    "smarttrim-no-curriculum": BaselineInfo(lambda **kw: no_curriculum(), "training",
                                            "ablation (training run): SmartTrim without the ratio curriculum"),
}


def _evit_finetuned(**kw):
    from .evit_finetuned import EViTFinetuned

    return EViTFinetuned(**kw)


def get_baseline(name: str, **kw) -> Baseline:
    """A baseline by registry name; keyword arguments go to its constructor."""
    info = BASELINES.get(name)
    if info is None:
        raise SmartTrimError(f"unknown baseline {name!r} (known: {', '.join(BASELINES)})")
    try:
        return info.factory(**kw)
    except TypeError as e:
        raise SmartTrimError(f"baseline {name!r}: {e}") from None


def apply(model, baseline) -> Applied:
    """``apply(model, "tome")`` or ``apply(model, baseline_object)`` -> Applied (see common.py)."""
    return (get_baseline(baseline) if isinstance(baseline, str) else baseline).apply(model)


def calibrate(model, baseline, batches, target_macs_ratio: float, **kw) -> Baseline:
    """Calibrate a baseline (name or object) to a mean GMACs ratio over ``batches``; returns it."""
    bl = get_baseline(baseline) if isinstance(baseline, str) else baseline
    return bl.calibrate(model, batches, target_macs_ratio, **kw)


def calibrate_all(model, batches, target_macs_ratio: float, names=None, tol: float = 0.02) -> list[Baseline]:
    """Every inference baseline for the model's family style (or ``names``) calibrated to the target, best effort:
    a baseline that cannot reach it (static heads at low targets, the resolution grid) comes back with
    ``calibration["reached"] = False`` and its nearest setting. Training ablations are skipped."""
    from ..backbones import family_of

    batches = list(batches)
    style = family_of(model).style
    out = []
    for name in names or [n for n, i in BASELINES.items() if i.kind != "training" and style in i.styles]:
        out.append(calibrate(model, name, batches, target_macs_ratio, tol=tol, strict=False))
    return out


__all__ = ["BASELINES", "DART", "Applied", "Baseline", "BaselineInfo", "DivPrune", "Downsample", "EViT", "FastV",
           "Policy", "Pool", "RandomDrop", "StaticHeads", "ToMe", "VisionZip", "TrainingAblation", "apply", "calibrate",
           "calibrate_all", "full_costs", "get_baseline", "measure"]
