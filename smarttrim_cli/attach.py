"""``smarttrim attach``: a released checkpoint in, a trimmable model directory out."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .model_dir import default_attach_dir, save_model_dir, sha256
from .recipes import load_recipe
from .trim.config import TrimConfig
from .trim.cost import total_macs


def trim_config_for(model, recipe=None, token_layers=None, head_layers=None, threshold=None, fuse=None,
                    fuse_mode=None) -> TrimConfig:
    from .backbones import family

    cfg = family(model.family).default_trim_config(model.config)
    source = "defaults"
    if recipe:
        r = load_recipe(recipe)
        t = r.get("trim") or {}
        # streams the recipe names replace the backbone's defaults; the others keep them (as --token-layers)
        if "token_layers" in t:
            cfg.token_layers.update({k: list(v or []) for k, v in t["token_layers"].items()})
        if "head_layers" in t:
            cfg.head_layers.update({k: list(v or []) for k, v in t["head_layers"].items()})
        for k in ("threshold", "reduction", "init_keep", "fuse", "fuse_mode"):
            if k in t:
                setattr(cfg, k, t[k])
        source = r["_path"]
    if token_layers:
        cfg.token_layers.update(token_layers)
        source = "--token-layers"
    if head_layers:
        cfg.head_layers.update(head_layers)
        source = "--head-layers"
    if threshold is not None:
        cfg.threshold = threshold
    if fuse is not None:
        cfg.fuse = bool(fuse)
    if fuse_mode is not None:
        cfg.fuse_mode = fuse_mode
    cfg = TrimConfig.from_dict(cfg.to_dict())
    cfg.validate(model.stream_layers(), source)
    return cfg


def dummy_batch(model, text_len=None, batch=1):
    from .backbones import family_of

    return family_of(model).dummy_batch(model, text_len, batch)


def full_macs(model, text_len=None) -> float:
    """MACs of the untrimmed model on one input (text of ``text_len`` tokens, default max_text_len)."""
    with torch.no_grad():
        _, ctx = model.run(dummy_batch(model, text_len), mode="full", record=True)
    return float(total_macs(ctx.records, full=True)[0])


def summary(model) -> dict:
    from .backbones import family_of

    c = model.config
    n_backbone = sum(p.numel() for p in model.backbone_parameters())
    n_added = sum(p.numel() for p in model.trimmer_parameters())
    t = model.trim_config
    return {
        "backbone": model.family, "task": c.task, "image_size": c.image_size, "patch_size": c.patch_size,
        "image_tokens": family_of(model).image_tokens(c), "text_tokens": c.max_text_len,
        "token_trimmers": {k: v for k, v in t.token_layers.items() if v},
        "head_trimmers": {k: v for k, v in t.head_layers.items() if v},
        "n_token_trimmers": len(model.token_trimmers), "n_head_trimmers": len(model.head_trimmers),
        "params_backbone": n_backbone, "params_added": n_added, "params_added_pct": 100.0 * n_added / n_backbone,
        "full_gmacs": full_macs(model) / 1e9, "threshold": t.threshold, "fuse": bool(t.fuse),
        "fuse_mode": t.fuse_mode,
    }


@dataclass
class AttachResult:
    model: object
    out_dir: Path
    summary: dict
    info: dict


def attach(ckpt, out_dir=None, tokenizer=None, image_size=None, recipe=None, token_layers=None,
           head_layers=None, threshold=None, task=None, answers=None, fuse=None,
           fuse_mode=None) -> AttachResult:
    """A checkpoint file or a transformers directory in, a trimmable model directory out. Its family
    (backbones/) reads it; ``answers`` means what that family says (METER: label names lining up with
    its classifier; BLIP VQA: the answer list to rank)."""
    import hashlib

    from .backbones import for_source

    ckpt = Path(ckpt)
    fam, hf = for_source(ckpt, task)
    got = fam.load(ckpt, image_size=image_size, tokenizer=tokenizer, answers=answers, task=task, hf_config=hf)
    model = got.model
    model.attach_trimmers(trim_config_for(model, recipe, token_layers, head_layers, threshold, fuse, fuse_mode))
    files = got.source_files
    digest = sha256(files[0]) if len(files) == 1 else \
        hashlib.sha256("".join(sha256(f) for f in files).encode()).hexdigest()  # shards: hash of their hashes
    provenance = {"source": str(ckpt.resolve()), "source_sha256": digest}
    if ckpt.is_dir():
        provenance["source_files"] = [f.name for f in files]
    provenance.update({"source_format": got.source_format, "source_image_size": got.source_image_size,
                       "ignored_keys": got.ignored_keys})
    out_dir = Path(out_dir) if out_dir else default_attach_dir()
    s = summary(model)
    save_model_dir(model, out_dir, tokenizer=got.tokenizer, labels=got.labels, provenance=provenance,
                   extra={"preprocess": got.preprocess})
    return AttachResult(model, out_dir, s, got.info)
