"""The trimmed-model directory (Hugging Face style): config.json, model.safetensors, tokenizer/.

Never a pickle: weights are safetensors, everything else JSON. ``./smarttrim-out/latest`` records
the directory the last ``attach``/``finetune`` wrote, so later commands find it without arguments.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


from . import __version__
from .atomic import atomic_dir, atomic_path
from .errors import SmartTrimError



def workspace() -> Path:
    """Where commands write by default: ./smarttrim-out, or $SMARTTRIM_HOME."""
    return Path(os.environ.get("SMARTTRIM_HOME", "smarttrim-out"))


def default_attach_dir() -> Path:
    return workspace() / "model"

FORMAT = "smarttrim-model"


def sha256(path, chunk=1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def save_model_dir(model, out_dir, *, tokenizer=None, labels=None, provenance=None, extra=None) -> Path:
    """Write model + config (+ tokenizer) atomically into out_dir and record it as the latest model."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    cfg = {
        "format": FORMAT, "format_version": 1, "smarttrim_version": __version__,
        "backbone": model.family, "task": model.config.task,
        "backbone_config": model.config.to_dict(),
        "trim": model.trim_config.to_dict() if model.trim_config else None,
        "labels": list(labels) if labels is not None else None,
        "provenance": {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                       **(provenance or {})},
        **(extra or {}),
    }
    with atomic_dir(out_dir) as tmp:
        state, seen = {}, set()
        for k, v in model.state_dict().items():
            v = v.detach().cpu().contiguous()
            # tied weights (e.g. an LM head sharing the word embeddings) are one tensor under two names:
            # safetensors stores each name's own copy
            state[k] = v.clone() if (v.data_ptr(), v.nbytes) in seen else v
            seen.add((v.data_ptr(), v.nbytes))
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / "tokenizer"))
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    set_latest(out_dir)
    return out_dir


def set_latest(path: Path):
    try:
        with atomic_path(workspace() / "latest") as tmp:
            tmp.write_text(str(Path(path).resolve()) + "\n")
    except SmartTrimError:
        pass  # a read-only workspace only loses the convenience pointer


def default_model_dir() -> Path:
    """The model the last attach/finetune in this directory wrote."""
    p = workspace() / "latest"
    if p.is_file():
        d = Path(p.read_text().strip())
        if (d / "config.json").is_file():
            return d
    if (default_attach_dir() / "config.json").is_file():
        return default_attach_dir()
    raise SmartTrimError(f"no model given and none found in {workspace()}/: run `smarttrim attach CKPT` first "
                         "or pass MODEL_DIR")


def read_config(path) -> dict:
    path = Path(path)
    cfg_path = path / "config.json"
    if not path.is_dir():
        raise SmartTrimError(f"{path}: not a directory (expected a model directory written by smarttrim attach)")
    if not cfg_path.is_file():
        raise SmartTrimError(f"{path}: no config.json (expected a model directory written by smarttrim attach)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SmartTrimError(f"{cfg_path}: not valid JSON ({e})") from None
    if cfg.get("format") != FORMAT:
        raise SmartTrimError(f"{cfg_path}: not a smarttrim model directory (format {cfg.get('format')!r})")
    return cfg


@dataclass
class LoadedModel:
    """A trimmed-model directory in memory: what ``load`` returns.

    ``model``: the TrimmableModel (eval, in the execution mode ``load`` was given; ``threshold`` and the trim
    config are its own state). ``tokenizer``: from ``tokenizer/`` (None without one). ``labels``: the answer
    names (None when the directory has none). ``config``: the whole config.json ({} for a model built in code).
    ``source``: the directory (None for a model built in code).

    ``preprocess`` is config.json's ``preprocess`` entry ({} when absent), written by ``attach`` from the family:
    ``image_size`` (int), ``mean`` / ``std`` (3 floats), ``resize`` ("squash": square resize; otherwise
    shorter-side resize and centre crop), ``max_text_len`` (int), and for square resizes ``resample`` and
    ``rescale_factor``.
    """

    model: Any
    tokenizer: Any = None
    labels: Optional[list] = None
    config: dict = field(default_factory=dict)
    source: Optional[Path] = None

    @classmethod
    def in_memory(cls, model, tokenizer=None, labels=None) -> "LoadedModel":
        """A model built in code: no directory, so preprocessing falls back on its family's."""
        return cls(model=model, tokenizer=tokenizer, labels=labels)

    @property
    def preprocess(self) -> dict:
        return self.config.get("preprocess") or {}

    @property
    def max_text_len(self) -> int:
        """Texts are cut at this many tokens: the ``preprocess`` entry's, else the backbone config's."""
        return int(self.preprocess.get("max_text_len") or self.model.config.max_text_len)

    def image_preprocessor(self):
        """The image transform the model was trained with, from the ``preprocess`` entry (CLIP mean/std with
        shorter-side resize and centre crop for METER; the processor config's for BLIP/ViLT), or None (the
        data readers' default) when the entry has no mean. Readers use it so that every backbone sees its
        own normalisation."""
        from .preprocess import preprocessor

        pre = dict(self.preprocess)
        if not pre.get("mean"):
            return None
        pre.setdefault("image_size", self.model.config.image_size)
        return preprocessor(pre)

    def full_preprocess(self) -> dict:
        """The ``preprocess`` entry completed key by key by the family's defaults (a model built in code has
        only those)."""
        from .backbones import family_of

        p = dict(self.preprocess)
        for k, v in family_of(self.model).default_preprocess(self.model.config).items():
            p.setdefault(k, v)
        return p


def load_tokenizer(path):
    from transformers import AutoTokenizer

    tok_dir = Path(path) / "tokenizer"
    if not tok_dir.is_dir():
        return None
    try:
        return AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    except Exception as e:  # transformers raises many types for a broken folder
        raise SmartTrimError(f"{tok_dir}: cannot load tokenizer ({type(e).__name__}: {e})".split("\n")[0]) from None


def load(path=None, mode: str = "hard", device="cpu") -> LoadedModel:
    """Load a trimmed-model directory (default: the latest one written); the model is in eval, on ``device``,
    in execution ``mode`` ('hard': inference; 'soft': training; 'full': trimmers off)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .backbones import build

    path = Path(path) if path is not None else default_model_dir()
    cfg = read_config(path)
    model = build(cfg["backbone"], cfg["backbone_config"], cfg.get("trim"))
    wpath = path / "model.safetensors"
    if not wpath.is_file():
        raise SmartTrimError(f"{wpath}: missing")
    try:
        state = load_file(str(wpath))
    except (SafetensorError, OSError) as e:
        raise SmartTrimError(f"{wpath}: cannot read weights ({e})") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SmartTrimError(f"{wpath}: weights do not match config.json "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.mode = mode
    return LoadedModel(model=model.to(device).eval(), tokenizer=load_tokenizer(path), labels=cfg.get("labels"),
                       config=cfg, source=path)
