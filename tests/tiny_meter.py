"""Tiny METER models saved exactly as METER does (Lightning container, original key names)."""
from __future__ import annotations

from pathlib import Path

import torch

from smarttrim_cli.backbones.meter import MeterConfig, MeterModel, lightning_checkpoint
from smarttrim_cli.checkpoint_io import save_lightning_checkpoint
from smarttrim_cli.tokenizers_local import write_byte_bpe_tokenizer

NUM_LABELS = {"vqa": 7, "nlvr2": 2, "snli": 3, "retrieval": 1}


def tiny_config(task: str = "vqa", image_size: int = 32, **kw) -> MeterConfig:
    cfg = dict(task=task, num_labels=NUM_LABELS[task], image_size=image_size, max_text_len=12, patch_size=8,
               vision_width=64, vision_layers=2, vision_heads=4, vocab_size=300, text_hidden=64, text_layers=2,
               text_heads=4, text_intermediate=128, max_position=40, hidden=64, cross_layers=2, cross_heads=4,
               cross_intermediate=128, num_token_types=3 if task == "nlvr2" else 2, has_itm=task == "retrieval")
    cfg.update(kw)
    return MeterConfig(**cfg)


def tiny_model(task="vqa", seed=0, **kw) -> MeterModel:
    torch.manual_seed(seed)
    m = MeterModel(tiny_config(task, **kw))
    # Non-trivial LayerNorm affine parameters, so that a mis-mapped weight shows up in outputs.
    for name, p in m.named_parameters():
        if p.dim() == 1:
            with torch.no_grad():
                p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


def write_tiny_ckpt(path: Path, task="vqa", seed=0, with_tokenizer=True, **kw):
    """-> (model it came from, state_dict written)."""
    model = tiny_model(task, seed, **kw)
    ck = lightning_checkpoint(model)
    save_lightning_checkpoint(ck, path)
    sd = ck["state_dict"]
    if with_tokenizer:
        write_byte_bpe_tokenizer(Path(path).parent / "tokenizer")
    return model, sd


def batch(model, B=3, T=9, seed=1, pad_rows=(1,)):
    """Random images and byte-token texts; rows in pad_rows get padding at the end."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    ids = torch.randint(4, 260, (B, T), generator=g)
    ids[:, 0] = 0
    mask = torch.ones(B, T, dtype=torch.long)
    for r in pad_rows:
        if r < B:
            mask[r, T - 3:] = 0
            ids[r, T - 3:] = c.pad_token_id
    b = {"pixel_values": torch.randn(B, 3, c.image_size, c.image_size, generator=g),
         "input_ids": ids, "attention_mask": mask}
    if c.task == "nlvr2":
        b["pixel_values2"] = torch.randn(B, 3, c.image_size, c.image_size, generator=g)
    return b


def tiny_model_dir(path: Path, task="vqa", seed=0, trim_kw=None, labels=None, **kw) -> Path:
    """A trimmed-model directory (as `smarttrim attach` writes) holding a tiny METER with trimmers
    that drop a good share of tokens at threshold 0.5 (init_keep 0)."""
    from transformers import RobertaTokenizer

    from smarttrim_cli.backbones.meter import default_trim_config
    from smarttrim_cli.model_dir import save_model_dir

    m = tiny_model(task, seed, **kw)
    t = default_trim_config(m.config)
    t.init_keep = 0.0
    for k, v in (trim_kw or {}).items():
        setattr(t, k, v)
    m.attach_trimmers(t)
    tok = RobertaTokenizer.from_pretrained(str(write_byte_bpe_tokenizer(Path(path).parent / f"tok-{Path(path).name}")))
    c = m.config
    if labels is None and task == "vqa":
        labels = [f"answer{i}" for i in range(c.num_labels)]
    save_model_dir(m, path, tokenizer=tok, labels=labels, extra={"preprocess": {
        "image_size": c.image_size, "mean": [0.48145466, 0.4578275, 0.40821073],
        "std": [0.26862954, 0.26130258, 0.27577711], "max_text_len": c.max_text_len}})
    return Path(path)
