"""Image preprocessing, in plain PIL + numpy + torch (no torchvision): the one module that defines it.

Two transforms, chosen by the ``preprocess`` dict a model directory stores (``preprocessor(dict)``):

- ``ImagePreprocessor`` (METER/CLIP): the same steps, rounding included, as torchvision's
  ``Resize(size, BICUBIC)`` (shorter side to ``size``, longer side ``int(size * long / short)``) ->
  ``CenterCrop(size)`` (offsets ``round((dim - size) / 2)``) -> ``ToTensor()`` (/255) ->
  ``Normalize(mean, std)`` on a PIL image, which is METER's ``clip`` transform.
- ``HFImagePreprocessor`` (``resize: squash``; Hugging Face backbones): what transformers' PIL image
  processors do for a square target (uint8 PIL resize to S x S, then rescale, then normalise).

Every image is converted to RGB first (L, LA, RGBA, P, CMYK, I;16 ...); alpha is dropped, not
composited, as ``Image.convert("RGB")`` and METER do. backbones/ and data/ both import this module;
it imports neither.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .rgb import to_rgb

# OpenAI CLIP's normalisation (METER, BLIP) and transformers' IMAGENET_STANDARD_* (ViLT), defined once
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)

# PILImageResampling values as stored in processor configs
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
PIL_FILTERS = {"nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS,
        "bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
        "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING}


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


class HFImagePreprocessor:
    """``HFImagePreprocessor(image_size, mean, std)(pil) -> FloatTensor[3, S, S]``, as the PIL backend:
    RGB, uint8 resize to S x S, ``* rescale_factor``, ``(x - mean) / std``."""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float], resample: str = "bicubic",
                 rescale_factor: float = 1 / 255):
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.resample = resample
        self.rescale_factor = float(rescale_factor)
        self._mean = np.asarray(self.mean, dtype=np.float32)[:, None, None]
        self._std = np.asarray(self.std, dtype=np.float32)[:, None, None]

    def __repr__(self):
        return (f"HFImagePreprocessor(image_size={self.image_size}, mean={self.mean}, std={self.std}, "
                f"resample={self.resample!r})")

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = to_rgb(img)
        S = self.image_size
        if img.size != (S, S):
            img = img.resize((S, S), resample=PIL_FILTERS[self.resample])
        arr = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) * np.float32(self.rescale_factor)
        arr = (arr - self._mean) / self._std
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        m = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
        s = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(3, 1, 1)
        return (x * s + m) / (self.rescale_factor * 255.0)


def preprocessor(pre: dict):
    """The image transform a model directory's ``preprocess`` dict describes: ``resize: squash`` (HF
    backbones) -> HFImagePreprocessor; otherwise METER/CLIP's shorter-side resize + center crop."""
    if pre.get("resize") == "squash":
        return HFImagePreprocessor(pre["image_size"], pre["mean"], pre["std"], pre.get("resample", "bicubic"),
                                   pre.get("rescale_factor", 1 / 255))
    return ImagePreprocessor(pre["image_size"], pre["mean"], pre["std"])


__all__ = ["CLIP_MEAN", "CLIP_STD", "HFImagePreprocessor", "IMAGENET_STANDARD_MEAN", "IMAGENET_STANDARD_STD",
           "ImagePreprocessor", "preprocessor", "to_rgb"]
