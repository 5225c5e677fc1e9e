"""SNLI-VE reader (visual entailment: Flickr30k image as premise, SNLI hypothesis as text).

Accepted layout::

    <data_dir>/snli_ve_<split>.jsonl      JSON lines: {"Flickr30K_ID": "3416050480", "sentence1": premise caption,
                                           "sentence2": hypothesis, "gold_label": "entailment"|"neutral"|"contradiction", ...}
    <data_dir>/flickr30k_images/<Flickr30K_ID>.jpg

``split``: ``train``, ``dev``, ``test`` (``val`` = ``dev``). The jsonl file is also looked up under
``<data_dir>/data/`` and ``<data_dir>/annotations/``; the image folder also as
``<data_dir>/flickr30k-images/`` (the name inside the official Flickr30k archive) and
``<data_dir>/Flickr30K/images/`` (METER's layout).

The text is ``sentence2`` (the hypothesis) alone, as METER does; the image stands for the premise.

Label order (``SNLI_LABELS``, label id = position): **0 contradiction, 1 neutral, 2 entailment**.
This is METER's order (``meter/utils/write_snli.py``: ``{'contradiction': 0, 'neutral': 1,
'entailment': 2}``), so the ids match the 3 outputs of a released METER SNLI-VE classifier. Pass
``label2id`` to use another order.

Items: ``{"image": T[3,H,W], "text": str, "target": LongTensor scalar, "image_id": str,
"line": int}``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from ..errors import SmartTrimError
from .common import (SKIP_BAD_ROW, BadRow, ReaderBase, as_path, get_field, iter_json_lines,
                     load_image)
from ..preprocess import ImagePreprocessor

SPLIT_ALIASES = {"val": "dev"}
SNLI_LABELS = ("contradiction", "neutral", "entailment")
SNLI_LABEL2ID = {name: i for i, name in enumerate(SNLI_LABELS)}


class SNLIVEDataset(ReaderBase):
    """SNLI-VE hypothesis + Flickr30k image; see the module docstring for layout, labels, items."""

    task = "snli"

    def __init__(self, data_dir: str | Path, split: str = "dev", image_size: int = 384,
                 label2id: Mapping[str, int] | None = None, limit: int | None = None,
                 skip_bad: bool = False, preprocess: ImagePreprocessor | None = None):
        super().__init__(image_size, limit, skip_bad, preprocess)
        self.data_dir = data_dir = as_path(data_dir)
        if not data_dir.is_dir():
            raise SmartTrimError(f"{data_dir}: SNLI-VE data directory does not exist")
        self.label2id = dict(SNLI_LABEL2ID if label2id is None else label2id)
        if sorted(self.label2id) != sorted(SNLI_LABELS) or sorted(self.label2id.values()) != [0, 1, 2]:
            raise SmartTrimError(f"SNLI-VE label2id must map {', '.join(SNLI_LABELS)} to 0, 1, 2; "
                                 f"got {self.label2id}")
        self.id2label = [""] * 3
        for name, i in self.label2id.items():
            self.id2label[i] = name
        self.num_labels = 3
        self.split = split = SPLIT_ALIASES.get(str(split).lower(), str(split))
        name = f"snli_ve_{split}.jsonl"
        cands = [data_dir / name, data_dir / "data" / name, data_dir / "annotations" / name]
        jpath = next((c for c in cands if c.is_file()), None)
        if jpath is None:
            raise SmartTrimError(f"{cands[0]}: SNLI-VE {split} file not found")
        self.json_path = jpath
        roots = [data_dir / "flickr30k_images", data_dir / "flickr30k-images",
                 data_dir / "Flickr30K" / "images"]
        self.image_dir = next((r for r in roots if r.is_dir()), None)
        if self.image_dir is None:
            raise SmartTrimError(f"SNLI-VE: no Flickr30k image folder (tried "
                                 f"{', '.join(str(r) for r in roots)})")

        items: list[tuple[int, str, str, int]] = []
        checked: dict[Path, str | None] = {}
        for lineno, row, err in iter_json_lines(jpath):
            if self._full(len(items)):
                break
            where = f"{jpath} line {lineno}"
            if err:
                self._bad(SKIP_BAD_ROW, f"{where}: {err}")
                continue
            try:
                image_id = get_field(row, "Flickr30K_ID", (str, int))
                if isinstance(image_id, bool) or not str(image_id).strip():
                    raise BadRow(f"bad 'Flickr30K_ID' {image_id!r}")
                image_id = str(image_id).strip()
                if image_id.endswith(".jpg"):
                    image_id = image_id[:-4]
                text = get_field(row, "sentence2", str)
                gold = get_field(row, "gold_label", str)
                if gold not in self.label2id:
                    raise BadRow(f"unknown gold_label {gold!r} (expected {', '.join(SNLI_LABELS)})")
            except BadRow as e:
                self._bad(SKIP_BAD_ROW, f"{where}: {e}")
                continue
            if not self._check_images([self.image_path(image_id)], f"line {lineno}", checked):
                continue
            items.append((lineno, image_id, text, self.label2id[gold]))
        self._items = items

    def image_path(self, image_id: str) -> Path:
        return self.image_dir / f"{image_id}.jpg"

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> dict:
        lineno, image_id, text, label = self._items[index]
        image = load_image(self.image_path(image_id), self.preprocess,
                           f"{self.json_path.name} line {lineno}")
        return {"image": image, "text": text, "target": torch.tensor(label, dtype=torch.long),
                "image_id": image_id, "line": lineno}


__all__ = ["SNLIVEDataset", "SNLI_LABELS", "SNLI_LABEL2ID"]
