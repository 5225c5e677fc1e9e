"""``smarttrim attach``: a released checkpoint in, a trimmable model directory out."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import SmartTrimError
from .model_dir import default_attach_dir, save_model_dir, sha256
from .recipes import load_recipe
from .trim.config import TrimConfig
from .trim.cost import total_macs

TOKENIZER_FILES = {"roberta": ("vocab.json", "merges.txt"), "bert": ("vocab.txt",)}


def resolve_tokenizer(ckpt: Path, tokenizer_dir, family: str, name: str, vocab_size: int):
    """Find the text tokenizer locally: --tokenizer, a ``tokenizer/`` folder beside the checkpoint, the
    checkpoint's tokenizer name as a local path, or the local Hugging Face cache. Never the network."""
    from transformers import AutoTokenizer, BertTokenizer, RobertaTokenizer

    cls = RobertaTokenizer if family == "roberta" else BertTokenizer
    tried = []
    candidates = [Path(tokenizer_dir)] if tokenizer_dir else [ckpt.parent / "tokenizer", Path(name) if name else None]
    for d in candidates:
        if d is None:
            continue
        tried.append(str(d))
        if not d.is_dir():
            if tokenizer_dir:
                raise SmartTrimError(f"{d}: tokenizer directory not found")
            continue
        try:
            if (d / "tokenizer_config.json").is_file():
                tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
            else:
                missing = [f for f in TOKENIZER_FILES[family] if not (d / f).is_file()]
                if missing:
                    raise SmartTrimError(f"{d}: no {', '.join(missing)} for the {family} tokenizer")
                tok = cls.from_pretrained(str(d), local_files_only=True)
        except SmartTrimError:
            raise
        except Exception as e:
            raise SmartTrimError(f"{d}: cannot load tokenizer ({type(e).__name__})") from None
        break
    else:
        tok = None
        if name and not tokenizer_dir:
            try:  # a tokenizer already in the local Hugging Face cache; no download is attempted
                tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
            except Exception:
                tok = None
        if tok is None:
            want = " and ".join(TOKENIZER_FILES[family])
            raise SmartTrimError(f"{ckpt}: no tokenizer found locally (tried {', '.join(tried) or 'nothing'}"
                                 f"{' and the Hugging Face cache for ' + repr(name) if name else ''}); pass "
                                 f"--tokenizer DIR with the {name or family} tokenizer files ({want})")
    if len(tok) > vocab_size:
        raise SmartTrimError(f"tokenizer has {len(tok)} tokens but the checkpoint's text embeddings only "
                             f"{vocab_size}: wrong tokenizer for this model")
    return tok


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
    c = model.config
    T = text_len or c.max_text_len
    b = {"pixel_values": torch.zeros(batch, 3, c.image_size, c.image_size),
         "input_ids": torch.full((batch, T), 5, dtype=torch.long),
         "attention_mask": torch.ones(batch, T, dtype=torch.long)}
    if c.task == "nlvr2":
        b["pixel_values2"] = torch.zeros(batch, 3, c.image_size, c.image_size)
    return b


def full_macs(model, text_len=None) -> float:
    """MACs of the untrimmed model on one input (text of ``text_len`` tokens, default max_text_len)."""
    with torch.no_grad():
        _, ctx = model.run(dummy_batch(model, text_len), mode="full", record=True)
    return float(total_macs(ctx.records, full=True)[0])


def summary(model) -> dict:
    c = model.config
    n_backbone = sum(p.numel() for p in model.backbone_parameters())
    n_added = sum(p.numel() for p in model.trimmer_parameters())
    t = model.trim_config
    return {
        "backbone": model.family, "task": c.task, "image_size": c.image_size, "patch_size": c.patch_size,
        "image_tokens": c.n_patches + 1, "text_tokens": c.max_text_len,
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


def read_labels(path, num_labels: int) -> list[str]:
    """A label list lining up with the classifier: a JSON list, or a text file with one label a line."""
    import json

    p = Path(path)
    if not p.is_file():
        raise SmartTrimError(f"{p}: answers file not found")
    text = p.read_text(encoding="utf-8")
    try:
        labels = json.loads(text) if text.lstrip().startswith("[") else [ln.strip() for ln in text.splitlines() if ln.strip()]
    except json.JSONDecodeError as e:
        raise SmartTrimError(f"{p}: not a valid JSON list ({e.msg} at line {e.lineno})") from None
    if not all(isinstance(x, str) for x in labels):
        raise SmartTrimError(f"{p}: labels must be strings")
    if len(labels) != num_labels:
        raise SmartTrimError(f"{p}: {len(labels)} labels, but the checkpoint's classifier has {num_labels} outputs")
    return labels


def attach(ckpt, out_dir=None, tokenizer=None, image_size=None, recipe=None, token_layers=None,
           head_layers=None, threshold=None, task=None, answers=None, fuse=None,
           fuse_mode=None) -> AttachResult:
    """``answers``: for METER, the label names lining up with its classifier (the file carries none);
    for BLIP VQA, the answer list to rank."""
    from .backbones import meter

    ckpt = Path(ckpt)
    if not ckpt.exists():
        raise SmartTrimError(f"{ckpt}: no such file")
    if ckpt.is_dir():
        return attach_hf_dir(ckpt, out_dir, tokenizer, image_size, recipe, token_layers, head_layers, threshold,
                             task, answers, fuse, fuse_mode)
    if task is not None and task != "auto":
        raise SmartTrimError(f"{ckpt}: --task applies to Hugging Face directories; a METER checkpoint's task "
                             "is read from its head")
    model, info = meter.from_checkpoint(ckpt, image_size=image_size)
    model.attach_trimmers(trim_config_for(model, recipe, token_layers, head_layers, threshold, fuse, fuse_mode))
    c = model.config
    tok = resolve_tokenizer(ckpt, tokenizer, c.text_family, c.extra.get("tokenizer", ""), c.vocab_size)
    label_list = read_labels(answers, c.num_labels) if answers is not None else None
    out_dir = Path(out_dir) if out_dir else default_attach_dir()
    s = summary(model)
    save_model_dir(model, out_dir, tokenizer=tok, labels=label_list, provenance={
        "source": str(ckpt.resolve()), "source_sha256": sha256(ckpt), "source_format": "meter-lightning-ckpt",
        "source_image_size": info["source_image_size"], "ignored_keys": info["ignored_keys"]},
        extra={"preprocess": {"image_size": c.image_size, "mean": list(meter.CLIP_MEAN), "std": list(meter.CLIP_STD),
                              "max_text_len": c.max_text_len}})
    return AttachResult(model, out_dir, s, info)


# ----- Hugging Face model directories (BLIP, ViLT) ------------------------------------------------------
# architecture -> (backbone family, task)
HF_ARCHITECTURES = {"ViltForQuestionAnswering": ("vilt", "vqa"), "BlipForQuestionAnswering": ("blip", "vqa"),
                    "BlipForImageTextRetrieval": ("blip", "retrieval")}
_BY_MODEL_TYPE = {("vilt", "vqa"): "ViltForQuestionAnswering", ("blip", "vqa"): "BlipForQuestionAnswering",
                  ("blip", "retrieval"): "BlipForImageTextRetrieval"}


def detect_hf_architecture(path: Path, hf: dict, task=None) -> str:
    """The supported architecture of a HF directory: ``architectures`` in config.json, else
    ``model_type`` (+ --task). Anything else is a one-line error listing what is supported."""
    supported = ", ".join(HF_ARCHITECTURES)
    archs = [a for a in (hf.get("architectures") or []) if isinstance(a, str)]
    mtype = hf.get("model_type")
    if archs:
        arch = next((a for a in archs if a in HF_ARCHITECTURES), None)
        if arch is None:
            raise SmartTrimError(f"{path}: unsupported architecture {archs[0]} (model_type {mtype!r}); "
                                 f"supported: {supported}")
    else:
        t = task if task not in (None, "auto") else ("vqa" if mtype == "vilt" else None)
        arch = _BY_MODEL_TYPE.get((mtype, t))
        if arch is None:
            hint = " (pass --task vqa or --task retrieval)" if mtype == "blip" and t is None else ""
            raise SmartTrimError(f"{path}: config.json names no supported architecture (model_type {mtype!r}){hint}; "
                                 f"supported: {supported}")
    if task not in (None, "auto") and HF_ARCHITECTURES[arch][1] != task:
        raise SmartTrimError(f"{path}: --task {task} does not match the directory's {arch} "
                             f"(task {HF_ARCHITECTURES[arch][1]})")
    return arch


def attach_hf_dir(path: Path, out_dir=None, tokenizer=None, image_size=None, recipe=None, token_layers=None,
                  head_layers=None, threshold=None, task=None, answers=None, fuse=None,
                  fuse_mode=None) -> AttachResult:
    import hashlib

    from .backbones import family
    from .backbones.hf_preprocess import (load_hf_tokenizer, preprocess_config, read_hf_config,
                                          weight_files)

    if not (path / "config.json").is_file():
        raise SmartTrimError(f"{path}: is a directory without config.json; expected a METER .ckpt file or a "
                             f"Hugging Face model directory ({', '.join(HF_ARCHITECTURES)})")
    hf = read_hf_config(path)
    arch = detect_hf_architecture(path, hf, task)
    fam_name, _ = HF_ARCHITECTURES[arch]
    if not hf.get("architectures"):
        hf = {**hf, "architectures": [arch]}
    fam = family(fam_name)
    vocab = fam.config_from_hf(hf, str(path)).vocab_size
    tok = load_hf_tokenizer(Path(tokenizer) if tokenizer else path, vocab)
    if fam_name == "blip":
        model, info = fam.from_hf_dir(path, image_size=image_size, answers=answers, tokenizer=tok, hf_config=hf)
    else:
        if answers is not None:
            raise SmartTrimError(f"{path}: --answers applies to BLIP VQA; ViLT's answers are its id2label")
        model, info = fam.from_hf_dir(path, image_size=image_size, hf_config=hf)
    model.attach_trimmers(trim_config_for(model, recipe, token_layers, head_layers, threshold, fuse, fuse_mode))
    c = model.config
    files = weight_files(path)
    digest = sha256(files[0]) if len(files) == 1 else \
        hashlib.sha256("".join(sha256(f) for f in files).encode()).hexdigest()  # shards: hash of their hashes
    out_dir = Path(out_dir) if out_dir else default_attach_dir()
    s = summary(model)
    save_model_dir(model, out_dir, tokenizer=tok, labels=info["labels"], provenance={
        "source": str(path.resolve()), "source_sha256": digest, "source_files": [f.name for f in files],
        "source_format": f"hf-{arch}", "source_image_size": info["source_image_size"],
        "ignored_keys": info["ignored_keys"]},
        extra={"preprocess": preprocess_config(path, fam_name, c.image_size, c.max_text_len)})
    return AttachResult(model, out_dir, s, info)
