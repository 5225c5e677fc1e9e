"""Hugging Face model directories, offline: config.json, weights, tokenizer, and the image preprocessing
their processor config describes (the transform itself lives in smarttrim_cli/preprocess.py).

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
std, max_text_len, resize, resample, rescale_factor), and ``preprocess.preprocessor(preprocess_dict)``
rebuilds the transform from it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import SmartTrimError
from ..preprocess import PIL_FILTERS, RESAMPLE
from .base import Family, Loaded, check_keys


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


def preprocess_config(model_dir, defaults: dict, image_size: int | None, max_text_len: int) -> dict:
    """-> the ``preprocess`` dict stored in a smarttrim model directory: the processor config's steps, with
    ``defaults`` (a family's ``PROCESSOR_DEFAULTS``: name, mean, std, size, resample) for keys it leaves out."""
    proc = read_processor_config(model_dir) or {}
    dflt = defaults
    size = proc.get("size", dflt["size"])
    if isinstance(size, dict):
        side = size.get("height") or size.get("shortest_edge") or size.get("width") or dflt["size"]
    else:
        side = size
    resample = proc.get("resample", dflt["resample"])
    resample = RESAMPLE.get(resample, resample) if isinstance(resample, int) else str(resample).lower()
    if resample not in PIL_FILTERS:
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
            "source": "preprocessor_config.json" if proc else f"{dflt['name']} processor defaults"}


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
    ignored = check_keys(sd, expected, source, family, ignore, optional=("token_trimmers.", "head_trimmers."))
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


# ----- what every family read from a transformers directory shares ------------------------------------
class HFFamily(Family):
    """A family whose checkpoints are transformers directories: the architecture from config.json, the
    directory's own tokenizer, preprocessing from its processor config (``processor_defaults``: what
    transformers' image processor assumes where the config says nothing). A subclass gives
    ``config_from_hf(hf, source)`` and ``from_dir(source, hf, image_size, tokenizer, answers)`` ->
    (model, info with labels, files, source_image_size, ignored_keys)."""

    processor_defaults: dict = {}

    def config_from_hf(self, hf: dict, source: str):
        raise NotImplementedError

    def from_dir(self, source: Path, hf: dict, image_size=None, tokenizer=None, answers=None):
        raise NotImplementedError

    def load(self, source: Path, *, image_size=None, tokenizer=None, answers=None, task=None,
             hf_config=None) -> Loaded:
        hf = hf_config or read_hf_config(source)
        tok = self.load_tokenizer(source, tokenizer, self.config_from_hf(hf, str(source)))
        model, info = self.from_dir(source, hf, image_size=image_size, tokenizer=tok, answers=answers)
        c = model.config
        return Loaded(model, tok, info["labels"],
                      preprocess_config(source, self.processor_defaults, c.image_size, c.max_text_len),
                      f"hf-{hf['architectures'][0]}", info["files"], info["source_image_size"], info["ignored_keys"],
                      info)

    def load_tokenizer(self, source: Path, override=None, config=None):
        return load_hf_tokenizer(Path(override) if override else source, config.vocab_size)

    def default_preprocess(self, config) -> dict:
        d = self.processor_defaults
        return {"image_size": config.image_size, "mean": list(d["mean"]), "std": list(d["std"]),
                "max_text_len": config.max_text_len, "resize": "squash", "resample": d["resample"],
                "rescale_factor": 1 / 255}
