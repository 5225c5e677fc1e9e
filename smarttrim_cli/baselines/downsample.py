"""Plain image downsampling: the same model at a lower input resolution, nothing trimmed.

``apply`` rebuilds the backbone at ``image_size`` (a multiple of the patch size) sharing every weight
with the original except the ViT positional embeddings, which are resampled on the patch grid as the
family's original code does (the model's ``at_resolution``, backbones/base.py); ``Applied.prepare`` resizes a batch's
images (bicubic, antialiased; the resize is preprocessing and not counted). A real deployment would
preprocess straight to ``image_size``. ``calibrate`` picks the size whose mean GMACs ratio (against
the original model at its own resolution) is nearest the target: resolution is discrete, so the
reachable ratios are a grid and the tolerance is whatever the nearest grid point gives.
"""
from __future__ import annotations

import torch.nn.functional as F

from ..errors import SmartTrimError
from .common import Applied, Baseline, Policy, full_costs, measure

IMAGE_KEYS = ("pixel_values", "pixel_values2")


def resized_model(model, image_size: int):
    """The same model at another resolution; weights shared with ``model`` (no copy)."""
    try:
        return model.at_resolution(int(image_size))
    except SmartTrimError as e:
        raise SmartTrimError(f"downsample: {e}") from None


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
