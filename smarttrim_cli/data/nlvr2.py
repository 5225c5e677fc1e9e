"""NLVR2 reader (lil-lab/nlvr layout).

Accepted layout::

    <data_dir>/<split>.json            JSON lines (one object per line, despite the extension):
                                       {"identifier": "dev-850-0-0", "sentence": ..., "label": "True"|"False",
                                        "directory": 42 (train only), "left_url", "right_url", ...}
    <data_dir>/images/train/<directory>/train-10171-0-img0.png, ...-img1.png   (train: numbered subfolders)
    <data_dir>/images/dev/dev-850-0-img0.png, ...-img1.png                      (dev, test1: flat)

``split``: ``train``, ``dev``, ``test1``, ``test2`` (``val`` = ``dev``, ``test`` = ``test1``). The json
file is also looked up as ``<data_dir>/data/<split>.json`` (the repository's ``nlvr2/data/``) and with
a ``.jsonl`` extension; the image folder also as ``<data_dir>/<split>/`` (ViLT's layout). The image
pair of an example is ``<identifier without its last -N>-img0.png`` / ``-img1.png``, in the row's
``directory`` subfolder when the row has one; if a train row has no ``directory`` the file is looked
up anywhere under the split's image folder.

Items: ``{"image": T[3,H,W] (left, img0), "image2": T[3,H,W] (right, img1), "text": str,
"target": LongTensor scalar (1 = "True", 0 = "False"), "identifier": str}``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import SmartTrimError
from .common import (SKIP_BAD_ROW, BadRow, ReaderBase, as_path, index_tree, get_field,
                     iter_json_lines, load_image)
from ..preprocess import ImagePreprocessor

SPLIT_ALIASES = {"val": "dev", "test": "test1"}
NLVR2_LABELS = ("False", "True")  # label id = position


def _json_candidates(data_dir: Path, split: str) -> list[Path]:
    return [data_dir / f"{split}.json", data_dir / "data" / f"{split}.json",
            data_dir / f"{split}.jsonl", data_dir / "data" / f"{split}.jsonl"]


def _parse_label(value) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return int(value.strip().lower() == "true")
    raise BadRow(f"'label' should be \"True\" or \"False\", got {value!r}")


class NLVR2Dataset(ReaderBase):
    """NLVR2 sentence + image pair; see the module docstring for layout and item keys."""

    task = "nlvr2"
    num_labels = 2

    def __init__(self, data_dir: str | Path, split: str = "dev", image_size: int = 288,
                 limit: int | None = None, skip_bad: bool = False,
                 preprocess: ImagePreprocessor | None = None):
        super().__init__(image_size, limit, skip_bad, preprocess)
        self.data_dir = data_dir = as_path(data_dir)
        if not data_dir.is_dir():
            raise SmartTrimError(f"{data_dir}: NLVR2 data directory does not exist")
        self.split = split = SPLIT_ALIASES.get(str(split).lower(), str(split))
        cands = _json_candidates(data_dir, split)
        jpath = next((c for c in cands if c.is_file()), None)
        if jpath is None:
            raise SmartTrimError(f"{cands[0]}: NLVR2 {split} file not found (also tried "
                                 f"{cands[1]}, {cands[2].name})")
        self.json_path = jpath
        roots = [data_dir / "images" / split, data_dir / split]
        self.image_dir = next((r for r in roots if r.is_dir()), None)
        if self.image_dir is None:
            raise SmartTrimError(f"NLVR2 {split}: no image folder (tried {roots[0]}, {roots[1]})")

        self._located: dict[str, Path] | None = None
        rows: list[tuple[int, str, str, int, str | None]] = []
        for lineno, row, err in iter_json_lines(jpath):
            if self._full(len(rows)):
                break
            where = f"{jpath} line {lineno}"
            if err:
                self._bad(SKIP_BAD_ROW, f"{where}: {err}")
                continue
            try:
                ident = get_field(row, "identifier", str)
                sentence = get_field(row, "sentence", str)
                label = _parse_label(get_field(row, "label", (str, bool)))
                if ident.count("-") < 2:
                    raise BadRow(f"identifier {ident!r} is not <split>-<set>-<pair>-<n>")
                directory = row.get("directory")
                if directory is not None and not isinstance(directory, (int, str)):
                    raise BadRow(f"'directory' should be a folder number, got {directory!r}")
            except BadRow as e:
                self._bad(SKIP_BAD_ROW, f"{where}: {e}")
                continue
            rows.append((lineno, ident, sentence, label,
                         None if directory is None else str(directory)))
            if self.skip_bad:  # check images now, so that limit counts good rows only
                if not self._check_images(self._pair_paths(rows[-1]), f"line {lineno}", None):
                    rows.pop()
        self._items = rows

    def _stem(self, ident: str) -> str:
        return ident.rsplit("-", 1)[0]

    def _pair_paths(self, item) -> tuple[Path, Path]:
        _lineno, ident, _s, _l, directory = item
        stem = self._stem(ident)
        names = (f"{stem}-img0.png", f"{stem}-img1.png")
        base = self.image_dir / directory if directory is not None else self.image_dir
        paths = tuple(base / n for n in names)
        if directory is None and not all(p.is_file() for p in paths):
            # no 'directory' field: look anywhere below the split's image folder (walked once)
            located = self._located_map()
            paths = tuple(located.get(n, p) for n, p in zip(names, paths))
        return paths  # type: ignore[return-value]

    def _located_map(self) -> dict[str, Path]:
        if self._located is None:
            has_subdirs = any(p.is_dir() for p in self.image_dir.iterdir())
            self._located = index_tree(self.image_dir, ".png") if has_subdirs else {}
        return self._located

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> dict:
        item = self._items[index]
        lineno, ident, sentence, label, _d = item
        p0, p1 = self._pair_paths(item)
        ctx = f"{ident}, {self.json_path.name} line {lineno}"
        return {
            "image": load_image(p0, self.preprocess, ctx),
            "image2": load_image(p1, self.preprocess, ctx),
            "text": sentence,
            "target": torch.tensor(label, dtype=torch.long),
            "identifier": ident,
        }


__all__ = ["NLVR2Dataset", "NLVR2_LABELS"]
