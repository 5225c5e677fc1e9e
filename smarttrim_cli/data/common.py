"""Shared pieces of the dataset readers: file checks, JSON/JSON-lines reading, lazy image loading,
one-line errors and the ``skipped`` bookkeeping used with ``skip_bad=True``.

Skip reasons (keys of ``dataset.skipped``): ``"bad row"`` (malformed JSON row or missing/invalid
field), ``"missing image"``, ``"unreadable image"``, ``"no annotation"`` (VQAv2 question without an
annotation in a split that has annotations), ``"no answer in vocabulary"`` (VQAv2 with
``drop_unanswerable=True``).
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from PIL import Image

from ..errors import SmartTrimError
from ..preprocess import ImagePreprocessor

SKIP_BAD_ROW = "bad row"
SKIP_MISSING_IMAGE = "missing image"
SKIP_UNREADABLE_IMAGE = "unreadable image"
SKIP_NO_ANNOTATION = "no annotation"
SKIP_NO_ANSWER = "no answer in vocabulary"


class BadRow(Exception):
    """A malformed row; the reader turns it into a SmartTrimError or a skip."""


def one_line(text: Any) -> str:
    """Collapse whitespace/newlines so that an error message stays on one line."""
    return " ".join(str(text).split())


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise SmartTrimError(f"{path}: {what} not found" + ("" if path.parent.is_dir() else
                                                            f" (no directory {path.parent})"))
    return path


def first_existing(candidates: Sequence[Path]) -> Path | None:
    for c in candidates:
        if c.exists():
            return c
    return None


def load_json(path: Path) -> Any:
    """Whole-file JSON; errors name the file and the line/column."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise SmartTrimError(f"{path} line {e.lineno} column {e.colno}: invalid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise SmartTrimError(f"{path}: not UTF-8 text ({one_line(e)})") from None
    except OSError as e:
        raise SmartTrimError(f"{path}: cannot read ({e.strerror or one_line(e)})") from None


def iter_json_lines(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """Yield ``(line_number, row, error)`` for every non-blank line; ``row`` is None when ``error``."""
    try:
        f = open(path, "r", encoding="utf-8")
    except OSError as e:
        raise SmartTrimError(f"{path}: cannot read ({e.strerror or one_line(e)})") from None
    with f:
        lineno = 0
        while True:
            try:
                line = f.readline()
            except UnicodeDecodeError as e:
                raise SmartTrimError(f"{path} line {lineno + 1}: not UTF-8 text ({one_line(e)})") from None
            if not line:
                break
            lineno += 1
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, None, f"invalid JSON ({e.msg} at column {e.colno})"
                continue
            if not isinstance(row, dict):
                yield lineno, None, f"expected a JSON object, got {type(row).__name__}"
                continue
            yield lineno, row, None


def get_field(row: dict, key: str, types: type | tuple = str) -> Any:
    """``row[key]``, checked for presence and type; raises BadRow otherwise."""
    if not isinstance(row, dict):
        raise BadRow(f"expected a JSON object, got {type(row).__name__}")
    if key not in row or row[key] is None:
        raise BadRow(f"missing {key!r}")
    value = row[key]
    if types is int and isinstance(value, bool) or not isinstance(value, types):
        names = types.__name__ if isinstance(types, type) else "/".join(t.__name__ for t in types)
        raise BadRow(f"{key!r} should be {names}, got {one_line(repr(value))[:60]}")
    return value


def verify_image(path: Path) -> str | None:
    """Cheap check used with skip_bad: None if ``path`` exists and PIL can parse it, else a reason."""
    if not path.is_file():
        return SKIP_MISSING_IMAGE
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception:  # PIL raises many types (UnidentifiedImageError, SyntaxError, OSError ...)
        return SKIP_UNREADABLE_IMAGE
    return None


def load_image(path: Path, preprocess: ImagePreprocessor, context: str) -> torch.Tensor:
    """Decode and preprocess one image; one-line SmartTrimError naming the file and ``context``."""
    try:
        with Image.open(path) as im:
            im.load()
            return preprocess(im)
    except FileNotFoundError:
        raise SmartTrimError(f"{path}: image not found ({context})") from None
    except SmartTrimError:
        raise
    except Exception as e:
        raise SmartTrimError(f"{path}: cannot read image ({context}; {one_line(e)[:120]})") from None


class ReaderBase(torch.utils.data.Dataset):
    """Bookkeeping shared by the readers: skip counting, bad-row policy, limit."""

    task: str = ""

    def __init__(self, image_size: int, limit: int | None, skip_bad: bool,
                 preprocess: ImagePreprocessor | None = None):
        if limit is not None and int(limit) < 0:
            raise SmartTrimError(f"--limit must be >= 0, got {limit}")
        self.limit = None if limit is None else int(limit)
        self.skip_bad = bool(skip_bad)
        self.image_size = int(image_size)
        self.preprocess = preprocess or ImagePreprocessor(image_size)
        self.skipped: Counter = Counter()

    def _bad(self, reason: str, message: str) -> None:
        """Skip (when skip_bad) or raise a one-line SmartTrimError."""
        if self.skip_bad:
            self.skipped[reason] += 1
            return
        raise SmartTrimError(one_line(message))

    def _full(self, n: int) -> bool:
        return self.limit is not None and n >= self.limit

    def _check_images(self, paths: Sequence[Path], context: str,
                      cache: dict | None = None) -> bool:
        """With skip_bad: verify images now (cached per path); False (and counted) if one is bad."""
        if not self.skip_bad:
            return True
        for p in paths:
            if cache is not None and p in cache:
                reason = cache[p]
            else:
                reason = verify_image(p)
                if cache is not None:
                    cache[p] = reason
            if reason is not None:
                self.skipped[reason] += 1
                return False
        return True

    def skipped_summary(self) -> str:
        """E.g. ``"skipped 3 (2 missing image, 1 bad row)"``, or ``""`` when nothing was skipped."""
        total = sum(self.skipped.values())
        if not total:
            return ""
        parts = ", ".join(f"{n} {k}" for k, n in sorted(self.skipped.items(), key=lambda kv: -kv[1]))
        return f"skipped {total} ({parts})"


def index_tree(root: Path, suffix: str) -> dict[str, Path]:
    """Map file name -> path for every file ending with ``suffix`` under ``root`` (one walk; the
    first one found wins when a name repeats)."""
    found: dict[str, Path] = {}
    if not root.is_dir():
        return found
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        for fn in files:
            if fn.endswith(suffix) and fn not in found:
                found[fn] = Path(dirpath) / fn
    return found


def as_path(p: str | os.PathLike) -> Path:
    return Path(os.path.expanduser(str(p)))

