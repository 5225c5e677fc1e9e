"""Label-free reader: a folder of images and prompts, for generative VLMs trained on their own answers.

Layout::

    <data_dir>/<split>.jsonl   or   <data_dir>/prompts.jsonl      one JSON object a line:
        {"image": "relative/path.jpg", "prompt": "What is shown?"}     optional "answer": str or [str, ...]
    <data_dir>/relative/path.jpg                                      image paths are relative to the file

Items, like VQAv2's: ``{"image": T[3,H,W], "text": prompt, "target": FloatTensor[0] (no classifier labels),
"question_id": line number, "answers": [answer, ...] (empty without one), "image_path": str}``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import SmartTrimError
from ..preprocess import ImagePreprocessor
from .common import SKIP_BAD_ROW, BadRow, ReaderBase, as_path, get_field, iter_json_lines, load_image

PROMPTS_FILE = "prompts.jsonl"


def prompts_file(data_dir: Path, split: str) -> Path:
    """``<split>.jsonl`` when it exists, else ``prompts.jsonl``."""
    by_split = data_dir / f"{split}.jsonl"
    return by_split if split and by_split.is_file() else data_dir / PROMPTS_FILE


class PromptsDataset(ReaderBase):
    """Images + prompts without (or with optional) answers; see the module docstring."""

    task = "generate"

    def __init__(self, data_dir: str | Path, split: str = "prompts", image_size: int = 336, label2id=None,
                 limit: int | None = None, skip_bad: bool = False, preprocess: ImagePreprocessor | None = None):
        super().__init__(image_size, limit, skip_bad, preprocess)  # label2id: accepted, unused (no labels)
        self.data_dir = data_dir = as_path(data_dir)
        if not data_dir.is_dir():
            raise SmartTrimError(f"{data_dir}: prompts data directory does not exist")
        self.split = split
        self.path = path = prompts_file(data_dir, split)
        if not path.is_file():
            raise SmartTrimError(f"{path}: prompts file not found (expected {split}.jsonl or {PROMPTS_FILE}: "
                                 '{"image": ..., "prompt": ...} per line)')
        self._items: list[tuple[int, Path, str, list[str]]] = []
        checked: dict[Path, str | None] = {}
        for lineno, row, error in iter_json_lines(path):
            if self._full(len(self._items)):
                break
            try:
                if error:
                    raise BadRow(error)
                image = path.parent / get_field(row, "image", str)
                prompt = get_field(row, "prompt", str)
                if not prompt.strip():
                    raise BadRow("empty 'prompt'")
                answer = row.get("answer")
                answers = [] if answer is None else [answer] if isinstance(answer, str) else answer
                if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
                    raise BadRow("'answer' should be a string or a list of strings")
            except BadRow as e:
                self._bad(SKIP_BAD_ROW, f"{path} line {lineno}: {e}")
                continue
            if not self.skip_bad and not image.is_file():
                raise SmartTrimError(f"{image}: image not found ({path.name} line {lineno})")
            if not self._check_images([image], f"line {lineno}", checked):
                continue
            self._items.append((lineno, image, prompt, answers))

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> dict:
        lineno, image, prompt, answers = self._items[index]
        return {"image": load_image(image, self.preprocess, f"{self.path.name} line {lineno}"),
                "text": prompt, "target": torch.zeros(0), "question_id": lineno, "answers": list(answers),
                "image_path": str(image)}


__all__ = ["PromptsDataset", "PROMPTS_FILE"]
