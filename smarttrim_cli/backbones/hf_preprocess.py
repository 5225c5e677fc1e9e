"""Hugging Face model directories, offline: config.json, weights, and image preprocessing from the
processor config.

transformers 5 builds BLIP/ViLT image processors on torchvision; without it only the ``*Pil``
classes work. We need neither: the steps are read from ``preprocessor_config.json`` (or
``processor_config.json``'s ``image_processor`` entry) and applied with PIL + numpy + torch, the way
the PIL backend does (uint8 PIL resize, then rescale, then normalise).

smarttrim feeds fixed square images (one ``image_size`` per model, as for METER), so:
- BLIP (``size: {height, width}``): resize to ``image_size`` x ``image_size`` — exactly the processor.
- ViLT (``size: {shortest_edge: 384}`` plus a longest-edge cap and ``size_divisor``, padded batches
  with a ``pixel_mask``): we resize to ``image_size`` x ``image_size`` as well (``resize: squash``),
  so every patch is valid. That differs from the processor for non-square images (which keeps the
  aspect ratio and pads); the model itself still follows ViLT exactly for the image it is given.

The result is stored in the model directory's ``config.json`` as ``preprocess`` (image_size, mean,
std, max_text_len, resize, resample, rescale_factor), and ``preprocessor(preprocess_dict)`` rebuilds
the transform from it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import SmartTrimError

# transformers' constants (image_utils), repeated so that no processor class is imported
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)

# PILImageResampling values as stored in processor configs
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_PIL = {"nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS,
        "bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
        "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING}

# processor defaults per model type, used for keys a config leaves out
DEFAULTS = {
    "blip": {"mean": OPENAI_CLIP_MEAN, "std": OPENAI_CLIP_STD, "size": 384, "resample": "bicubic"},
    "vilt": {"mean": IMAGENET_STANDARD_MEAN, "std": IMAGENET_STANDARD_STD, "size": 384, "resample": "bicubic"},
}


def read_processor_config(model_dir) -> dict | None:
    """The image-processor dict of a HF directory, or None when it has none."""
    d = Path(model_dir)
    for name in ("preprocessor_config.json", "processor_config.json"):
        p = d / name
        if not p.is_file():
            continue
        try:
            data = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SmartTrimError(f"{p}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise SmartTrimError(f"{p}: expected a JSON object")
        if name == "processor_config.json":
            data = data.get("image_processor") or {}
            if not data:
                continue
        return data
    return None


def preprocess_config(model_dir, model_type: str, image_size: int | None, max_text_len: int) -> dict:
    """-> the ``preprocess`` dict stored in a smarttrim model directory."""
    proc = read_processor_config(model_dir) or {}
    dflt = DEFAULTS[model_type]
    size = proc.get("size", dflt["size"])
    if isinstance(size, dict):
        side = size.get("height") or size.get("shortest_edge") or size.get("width") or dflt["size"]
    else:
        side = size
    resample = proc.get("resample", dflt["resample"])
    resample = RESAMPLE.get(resample, resample) if isinstance(resample, int) else str(resample).lower()
    if resample not in _PIL:
        raise SmartTrimError(f"{model_dir}: unsupported resample {resample!r} in the processor config")
    do_norm = proc.get("do_normalize", True)
    mean = list(proc.get("image_mean", dflt["mean"])) if do_norm else [0.0, 0.0, 0.0]
    std = list(proc.get("image_std", dflt["std"])) if do_norm else [1.0, 1.0, 1.0]
    if len(mean) == 1:
        mean = mean * 3
    if len(std) == 1:
        std = std * 3
    return {"image_size": int(image_size or side), "mean": [float(m) for m in mean], "std": [float(s) for s in std],
            "max_text_len": int(max_text_len), "resize": "squash", "resample": resample,
            "rescale_factor": float(proc.get("rescale_factor", 1 / 255)) if proc.get("do_rescale", True) else 1.0,
            "source": "preprocessor_config.json" if proc else f"{model_type} processor defaults"}


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
        from ..rgb import to_rgb

        img = to_rgb(img)
        S = self.image_size
        if img.size != (S, S):
            img = img.resize((S, S), resample=_PIL[self.resample])
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
    from ..data.preprocess import ImagePreprocessor

    return ImagePreprocessor(pre["image_size"], pre["mean"], pre["std"])


# ----- config and weights of a HF directory -----------------------------------------------------------
def read_hf_config(model_dir) -> dict:
    p = Path(model_dir) / "config.json"
    if not p.is_file():
        raise SmartTrimError(f"{model_dir}: no config.json (expected a Hugging Face model directory)")
    try:
        cfg = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SmartTrimError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise SmartTrimError(f"{p}: expected a JSON object")
    return cfg


def weight_files(model_dir) -> list[Path]:
    """model.safetensors, a sharded safetensors index, or pytorch_model.bin (read with weights_only)."""
    d = Path(model_dir)
    if (d / "model.safetensors").is_file():
        return [d / "model.safetensors"]
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (d / index).is_file():
            try:
                wm = json.loads((d / index).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
                raise SmartTrimError(f"{d / index}: not a weight index (no weight_map)") from None
            files = sorted({d / f for f in wm.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise SmartTrimError(f"{d / index}: shard(s) missing: {', '.join(missing[:3])}")
            return files
    if (d / "pytorch_model.bin").is_file():
        return [d / "pytorch_model.bin"]
    raise SmartTrimError(f"{d}: no weights (model.safetensors, a sharded index, or pytorch_model.bin)")


def load_hf_state_dict(model_dir) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    sd = {}
    for f in weight_files(model_dir):
        try:
            if f.name.endswith(".safetensors"):
                sd.update(load_file(str(f)))
            else:
                sd.update(torch.load(str(f), map_location="cpu", weights_only=True))
        except (SafetensorError, OSError, RuntimeError, EOFError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise SmartTrimError(f"{f}: cannot read weights ({msg})") from None
        except Exception as e:  # pickle errors of a .bin that is not a plain state dict
            raise SmartTrimError(f"{f}: cannot read weights safely ({type(e).__name__})") from None
    return sd


def match_state_dict(model, sd: dict, source, ignore=lambda k: False, family: str = "") -> list[str]:
    """Check the HF keys against the model's (same names); raise a one-line error listing the first
    mismatches. Returns the ignored keys."""
    expected = model.state_dict()
    trim = ("token_trimmers.", "head_trimmers.")
    ignored = sorted(k for k in sd if k not in expected and ignore(k))
    unexpected = sorted(k for k in sd if k not in expected and not ignore(k))
    missing = sorted(k for k in expected if k not in sd and not k.startswith(trim))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {', '.join(unexpected[:4])}"
                         f"{' ...' if len(unexpected) > 4 else ''}")
        raise SmartTrimError(f"{source}: does not match the {family} layout: {'; '.join(parts)}")
    for k, v in expected.items():
        if k in sd and tuple(sd[k].shape) != tuple(v.shape):
            raise SmartTrimError(f"{source}: {k} has shape {tuple(sd[k].shape)}, expected {tuple(v.shape)}")
    return ignored


def load_hf_tokenizer(model_dir, vocab_size: int):
    """The tokenizer saved in the HF directory itself (BertTokenizer for BLIP/ViLT), never the network."""
    from transformers import AutoTokenizer, BertTokenizer

    d = Path(model_dir)
    try:
        if (d / "tokenizer_config.json").is_file() or (d / "tokenizer.json").is_file():
            tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
        elif (d / "vocab.txt").is_file():
            tok = BertTokenizer(str(d / "vocab.txt"))  # BertTokenizerFast(vocab_file=) ignores the file
        else:
            raise SmartTrimError(f"{d}: no tokenizer files (tokenizer_config.json/tokenizer.json or vocab.txt)")
    except SmartTrimError:
        raise
    except Exception as e:
        raise SmartTrimError(f"{d}: cannot load the tokenizer ({type(e).__name__})") from None
    if len(tok) > vocab_size:
        raise SmartTrimError(f"{d}: tokenizer has {len(tok)} tokens but the text embeddings only {vocab_size}")
    return tok
