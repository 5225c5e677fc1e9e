"""Image preprocessing of METER/CLIP, in plain PIL + torch (no torchvision).

Same steps, rounding included, as torchvision's ``Resize(size, BICUBIC)`` (shorter side to ``size``,
longer side ``int(size * long / short)``) -> ``CenterCrop(size)`` (offsets ``round((dim - size) / 2)``)
-> ``ToTensor()`` (/255) -> ``Normalize(mean, std)`` on a PIL image, which is METER's ``clip`` transform.
Every image is converted to RGB first (L, LA, RGBA, P, CMYK, I;16 ...); alpha is dropped, not
composited, as ``Image.convert("RGB")`` and METER do.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..rgb import to_rgb

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImagePreprocessor:
    """``ImagePreprocessor(image_size)(pil_image) -> FloatTensor[3, image_size, image_size]``.

    Resize the shorter side to ``image_size`` (bicubic), center-crop ``image_size`` x ``image_size``,
    scale to [0, 1], normalise with ``mean``/``std`` (CLIP's by default).
    """

    def __init__(self, image_size: int, mean: Sequence[float] = CLIP_MEAN,
                 std: Sequence[float] = CLIP_STD):
        image_size = int(image_size)
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError("mean and std need 3 values (R, G, B)")
        if any(float(s) <= 0 for s in std):
            raise ValueError(f"std must be positive, got {tuple(std)}")
        self.image_size = image_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._mean_t = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        self._std_t = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)

    def __repr__(self) -> str:
        return f"ImagePreprocessor(image_size={self.image_size}, mean={self.mean}, std={self.std})"

    def resize_crop(self, img: Image.Image) -> Image.Image:
        """RGB PIL image of ``image_size`` x ``image_size`` (before tensor conversion)."""
        img = to_rgb(img)
        size = self.image_size
        w, h = img.size
        if w <= 0 or h <= 0:
            raise ValueError(f"empty image ({w}x{h})")
        if w <= h:
            new_w, new_h = size, int(size * h / w)
        else:
            new_w, new_h = int(size * w / h), size
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
        left = int(round((new_w - size) / 2.0))
        top = int(round((new_h - size) / 2.0))
        if (left, top, new_w, new_h) != (0, 0, size, size):
            img = img.crop((left, top, left + size, top + size))
        return img

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = self.resize_crop(img)
        arr = np.asarray(img, dtype=np.uint8)  # [H, W, 3]
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
        return x.sub_(self._mean_t).div_(self._std_t)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of the normalisation: [3,H,W] or [B,3,H,W] back to [0, 1] pixel values."""
        return x * self._std_t.to(x) + self._mean_t.to(x)


__all__ = ["ImagePreprocessor", "CLIP_MEAN", "CLIP_STD"]
