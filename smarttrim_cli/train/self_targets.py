"""Label-free training data (``targets=self``): the full model's own greedy answers to the training (and
validation) inputs become their ``target_text``. Generated once, before training, batched, in full mode, and
kept in the state directory (``self_targets.json``) under a key of everything they depend on, so that a resume
(or a rerun with the same model, data and settings) reads them instead of generating them again."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..data import batch_to_device
from .batches import IndexedDataset, check_batch

FILE = "self_targets.json"
EMPTY = "empty self answer"  # the full model answered nothing: no answer token to train on


class SelfTargets(Dataset):
    """``base``'s items that got a non-empty answer, each with ``target_text``; ``skipped`` adds those left out."""

    def __init__(self, base, texts: list[str]):
        self.base = base
        self.keep = [i for i, t in enumerate(texts) if t]
        self.texts = texts
        self.skipped = dict(getattr(base, "skipped", {}) or {})
        if len(self.keep) < len(texts):
            self.skipped[EMPTY] = len(texts) - len(self.keep)

    def __len__(self):
        return len(self.keep)

    def __getitem__(self, i):
        j = self.keep[i]
        return {**self.base[j], "target_text": self.texts[j]}

    def skipped_summary(self) -> str:
        return ", ".join(f"{n} {why}" for why, n in self.skipped.items())


def cache_key(src: Path, ds, split: str, cfg, instruction) -> str:
    """What the answers depend on: the model's weights file (path, size, mtime), the inputs (their prompts and
    image paths where the reader says them), the split, the answer cap and the instruction."""
    w = Path(src) / "model.safetensors"
    st = w.stat() if w.is_file() else None
    items = getattr(ds, "_items", None)
    parts = {"model": str(Path(src).resolve()), "size": st and st.st_size, "mtime": st and st.st_mtime_ns,
             "dataset": cfg.dataset, "data_dir": cfg.data_dir, "split": split, "n": len(ds), "limit": cfg.limit,
             "max_new_tokens": cfg.max_new_tokens, "instruction": instruction,
             "items": repr(items)[:1_000_000] if items is not None else None}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@torch.no_grad()
def generate_targets(model, objective, ds, collate, batch_size: int, device, amp_ctx, progress=None) -> list[str]:
    """The full model's greedy answer to every item of ``ds`` (in order)."""
    loader = torch.utils.data.DataLoader(IndexedDataset(ds), batch_size=batch_size, shuffle=False, collate_fn=collate)
    was = model.training
    model.eval()
    out: list[str] = []
    for batch in loader:
        batch = batch_to_device(check_batch(batch), device)
        with amp_ctx():
            out += objective.generate(model, batch, mode="full")
        if progress is not None:
            progress(len(batch["index"]))
    model.train(was)
    return out


def load_or_generate(state_dir: Path, key: str, name: str, make) -> tuple[list[str], bool]:
    """-> (texts, reused): ``name``'s answers from the state directory's file when its key matches, else
    ``make()``'s, written there."""
    path = Path(state_dir) / FILE
    data = json.loads(path.read_text()) if path.is_file() else {}
    got = data.get(name)
    if got and got.get("key") == key:
        return list(got["texts"]), True
    texts = make()
    data[name] = {"key": key, "texts": texts}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)
    return texts, False
