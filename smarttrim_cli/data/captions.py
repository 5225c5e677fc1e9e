"""Image-caption pairs in the Karpathy split format (COCO and Flickr30k retrieval: BLIP, ALBEF, METER).

Accepted layout::

    <data_dir>/dataset_coco.json       {"images": [{"filepath": "val2014", "filename": "COCO_val2014_...jpg",
                                         "split": "train"|"restval"|"val"|"test", "imgid": 0, "cocoid": 391895,
                                         "sentences": [{"raw": "A man ...", "tokens": [...], "sentid": 0}, ...]}, ...],
                                        "dataset": "coco"}
    <data_dir>/<filepath>/<filename>   COCO images (``val2014/COCO_val2014_...jpg``; also ``<data_dir>/images/<filepath>/``)

    <data_dir>/dataset_flickr30k.json  the same, without ``filepath`` and ``cocoid``
    <data_dir>/flickr30k-images/<filename>   Flickr30k images (the official archive's folder; also
                                       ``flickr30k_images/``, ``images/``)

The json file is also looked up under ``<data_dir>/annotations/`` and ``<data_dir>/data/``. An entry
with a ``filepath`` is read from ``<data_dir>/<filepath>/``, one without from the flat Flickr folder.

``split``: ``train`` (Karpathy's ``train`` plus ``restval``, the 113k-image training set that BLIP and
ALBEF use), ``restval``, ``val`` (= ``dev``), ``test``. Each ``sentences[].raw`` caption is one item
(its ``tokens`` joined when ``raw`` is missing); captions are kept as written (the tokenizer lowercases).

Items: ``{"image": T[3,H,W], "text": caption, "target": LongTensor scalar 1 (ITM "match"),
"image_id": int (``cocoid``, else ``imgid``, else the entry's position: recall groups captions by it),
"sentid": int, "filename": str}``. Items come image by image, so ``limit`` keeps whole images' captions
together except the last.

Only entries of the requested split are validated. With ``skip_bad``, a malformed entry or caption counts
once as ``"bad row"``; a missing or unreadable image counts once per caption it would have given.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import SmartTrimError
from .common import (SKIP_BAD_ROW, BadRow, ReaderBase, as_path, get_field, load_image, load_json, one_line,
                     verify_image)
from ..preprocess import ImagePreprocessor

SPLITS = ("train", "restval", "val", "test")
SPLIT_ALIASES = {"dev": "val"}
SPLIT_MEMBERS = {"train": ("train", "restval")}  # Karpathy's restval joins train, as in BLIP/ALBEF
ITM_LABELS = ("no_match", "match")  # BLIP's itm_head outputs; label id = position


class CaptionsDataset(ReaderBase):
    """(image, caption) pairs of a Karpathy-split json; see the module docstring."""

    task = "retrieval"
    json_name = "dataset_coco.json"
    title = "COCO captions"
    flat_dirs = ("flickr30k-images", "flickr30k_images", "images")  # entries without a filepath
    num_labels = 2
    id2label = list(ITM_LABELS)

    def __init__(self, data_dir: str | Path, split: str = "test", image_size: int = 384,
                 label2id=None, limit: int | None = None, skip_bad: bool = False,
                 preprocess: ImagePreprocessor | None = None):
        # label2id is accepted for the registry's uniform call and ignored: pairs are all "match"
        super().__init__(image_size, limit, skip_bad, preprocess)
        self.data_dir = data_dir = as_path(data_dir)
        if not data_dir.is_dir():
            raise SmartTrimError(f"{data_dir}: {self.title} data directory does not exist")
        split = str(split).strip().lower()
        self.split = split = SPLIT_ALIASES.get(split, split)
        if split not in SPLITS:
            raise SmartTrimError(f"{self.title}: unknown split {split!r} (Karpathy splits: {', '.join(SPLITS)}; "
                                 "train includes restval)")
        members = SPLIT_MEMBERS.get(split, (split,))
        cands = [data_dir / self.json_name, data_dir / "annotations" / self.json_name, data_dir / "data" / self.json_name]
        jpath = next((c for c in cands if c.is_file()), None)
        if jpath is None:
            raise SmartTrimError(f"{cands[0]}: {self.title} file not found (the Karpathy split json; also tried "
                                 f"annotations/ and data/)")
        self.json_path = jpath
        data = load_json(jpath)
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise SmartTrimError(f"{jpath}: expected a JSON object with an 'images' list (Karpathy split format)")

        self._roots: dict[str | None, Path] = {}
        items: list[tuple[int, int, str, str | None, str, int]] = []
        for i, row in enumerate(data["images"]):
            if self._full(len(items)):
                break
            where = f"{jpath} images[{i}]"
            try:
                row_split = get_field(row, "split", str)
                if row_split not in members:
                    continue
                filename = get_field(row, "filename", str)
                filepath = row.get("filepath")
                if filepath is not None and not isinstance(filepath, str):
                    raise BadRow(f"'filepath' should be str, got {one_line(repr(filepath))[:60]}")
                sentences = get_field(row, "sentences", list)
                image_id = next((row[k] for k in ("cocoid", "imgid")
                                 if isinstance(row.get(k), int) and not isinstance(row.get(k), bool)), i)
            except BadRow as e:
                self._bad(SKIP_BAD_ROW, f"{where}: {e}")
                continue
            path = self._root(filepath) / filename
            captions = []
            for j, s in enumerate(sentences):
                try:
                    captions.append((_caption(s), s.get("sentid")))
                except BadRow as e:
                    self._bad(SKIP_BAD_ROW, f"{where} sentences[{j}]: {e}")
            if self.skip_bad and captions:  # one check per image; every caption of a bad one is a skip
                reason = verify_image(path)
                if reason is not None:
                    self.skipped[reason] += len(captions)
                    continue
            for text, sentid in captions:
                if self._full(len(items)):
                    break
                items.append((i, image_id, filename, filepath, text,
                              sentid if isinstance(sentid, int) and not isinstance(sentid, bool) else len(items)))
        self._items = items

    def _root(self, filepath: str | None) -> Path:
        """The folder an entry's image is in: ``<data_dir>[/images]/<filepath>`` or the flat Flickr folder
        (found once per filepath; a one-line error naming what was tried when none exists)."""
        if filepath not in self._roots:
            if filepath is None:
                tried = [self.data_dir / d for d in self.flat_dirs]
            else:
                tried = [self.data_dir / filepath, self.data_dir / "images" / filepath]
            found = next((t for t in tried if t.is_dir()), None)
            if found is None:
                what = "entries without a filepath" if filepath is None else f"filepath {filepath!r}"
                raise SmartTrimError(f"{self.title}: no image folder for {what} in {self.json_path.name} "
                                     f"(tried {', '.join(str(t) for t in tried)})")
            self._roots[filepath] = found
        return self._roots[filepath]

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> dict:
        i, image_id, filename, filepath, text, sentid = self._items[index]
        image = load_image(self._root(filepath) / filename, self.preprocess, f"{self.json_path.name} images[{i}]")
        return {"image": image, "text": text, "target": torch.tensor(1, dtype=torch.long), "image_id": image_id,
                "sentid": sentid, "filename": filename}


class Flickr30kCaptionsDataset(CaptionsDataset):
    json_name = "dataset_flickr30k.json"
    title = "Flickr30k captions"


def _caption(s) -> str:
    if not isinstance(s, dict):
        raise BadRow(f"expected a JSON object, got {type(s).__name__}")
    raw = s.get("raw")
    if raw is None and isinstance(s.get("tokens"), list) and all(isinstance(t, str) for t in s["tokens"]):
        raw = " ".join(s["tokens"])
    if raw is None:
        raise BadRow("missing 'raw'")
    if not isinstance(raw, str):
        raise BadRow(f"'raw' should be str, got {one_line(repr(raw))[:60]}")
    if not raw.strip():
        raise BadRow("empty caption")
    return " ".join(raw.split())


__all__ = ["CaptionsDataset", "Flickr30kCaptionsDataset", "ITM_LABELS"]
