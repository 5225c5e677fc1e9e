"""Plain image downsampling: the same model at a lower input resolution, nothing trimmed.

``apply`` rebuilds the backbone at ``image_size`` (a multiple of the patch size) sharing every weight
with the original except the ViT positional embeddings, which are interpolated bicubically on the
patch grid (backbones/meter.py ``interpolate_positions``); ``Applied.prepare`` resizes a batch's
images (bicubic, antialiased; the resize is preprocessing and not counted). A real deployment would
preprocess straight to ``image_size``. ``calibrate`` picks the size whose mean GMACs ratio (against
the original model at its own resolution) is nearest the target: resolution is discrete, so the
reachable ratios are a grid and the tolerance is whatever the nearest grid point gives.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..errors import SmartTrimError
from .common import Applied, Baseline, Policy, full_costs, measure

IMAGE_KEYS = ("pixel_values", "pixel_values2")


def resized_model(model, image_size: int):
    """The same METER at another resolution; weights shared with ``model`` (no copy)."""
    if getattr(model, "family", "") != "meter":
        raise SmartTrimError(f"downsample supports the METER family, not {model.family!r}")
    from ..backbones.meter import MeterModel, interpolate_positions

    c = model.config
    if image_size == c.image_size:
        return model
    if image_size < c.patch_size or image_size % c.patch_size:
        raise SmartTrimError(f"downsample: image size {image_size} is not a positive multiple of the patch size "
                             f"{c.patch_size}")
    cfg = dataclasses.replace(c, extra=dict(c.extra))
    cfg.image_size = int(image_size)
    with torch.device("meta"):
        small = MeterModel(cfg, model.trim_config)
    sd = dict(model.state_dict(keep_vars=True))
    key = "vit_model.visual.positional_embedding"
    sd[key] = torch.nn.Parameter(interpolate_positions(sd[key].detach(), image_size // c.patch_size),
                                 requires_grad=False)
    small.load_state_dict(sd, strict=True, assign=True)
    small.threshold = model.threshold
    return small.eval() if not model.training else small


def resize_batch(batch: dict, image_size: int) -> dict:
    out = dict(batch)
    for k in IMAGE_KEYS:
        v = batch.get(k)
        if v is not None and v.shape[-1] != image_size:
            out[k] = F.interpolate(v.float(), size=(image_size, image_size), mode="bicubic", align_corners=False,
                                   antialias=True).to(v.dtype)
    return out


class Downsample(Baseline):
    name = "downsample"
    kind = "resolution"

    def __init__(self, image_size: int | None = None):
        super().__init__()
        self.image_size = image_size
        self._cache = {}

    def params(self) -> dict:
        return {"image_size": self.image_size}

    def apply(self, model) -> Applied:
        size = self.image_size or model.config.image_size
        k = (id(model), size)
        if k not in self._cache:
            self._cache = {k: resized_model(model, size)}
        return Applied(self._cache[k], {"policy": Policy()}, lambda b: resize_batch(b, size), baseline=self)

    def sizes(self, model) -> list[int]:
        p, s = model.config.patch_size, model.config.image_size
        return list(range(p, s + 1, p))

    def calibrate(self, model, batches, target_macs_ratio: float, tol: float = 0.02, strict: bool = False):
        """Pick the image size whose ratio is nearest the target (ratios grow with the size, so a
        bisection over the size grid). ``strict``: raise if the nearest is further than ``tol``."""
        batches = list(batches)
        full = full_costs(model, batches)
        sizes = self.sizes(model)
        seen = {}

        def f(i):
            if i not in seen:
                seen[i] = measure(model, Downsample(sizes[i]), batches, full)["ratio"]
            return seen[i]

        lo, hi = 0, len(sizes) - 1
        while hi - lo > 1:  # smallest index with ratio >= target lies in (lo, hi]
            mid = (lo + hi) // 2
            if f(mid) < target_macs_ratio:
                lo = mid
            else:
                hi = mid
        i = min((lo, hi), key=lambda j: abs(f(j) - target_macs_ratio))
        self.image_size, self._cache = sizes[i], {}
        far = abs(f(i) - target_macs_ratio) > tol
        lo_hi = (f(0), f(len(sizes) - 1)) if far else (None, None)
        measured = {sizes[j]: round(seen[j], 4) for j in sorted(seen)}
        return self._calibrated(target_macs_ratio, f(i), {"image_size": sizes[i], "measured": measured}, len(seen),
                                tol, strict, lo_hi)
