"""easy-VQA reader (the ``easy-vqa`` PyPI package: 64x64 images of one shape, 13 answers).

Layout (that of the installed package, ``<site-packages>/easy_vqa/data``, used by default)::

    <data_dir>/{train,test}/questions.json     [[question, answer, image_id], ...]
    <data_dir>/{train,test}/images/<image_id>.png

Splits: ``train`` (38,575 questions, 4,000 images) and ``test`` (9,673 questions, 1,000 images);
there is no validation split. Vocabulary: the 13 answers sorted alphabetically (``EASYVQA_ANSWERS``,
label id = position); an answer outside it is a bad row.

Items, like VQAv2's: ``{"image": T[3,H,W], "text": str, "target": FloatTensor[13] (one-hot 1.0),
"question_id": int (row index in questions.json), "image_id": int, "answers": [answer]}``.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Mapping, Sequence

from ..errors import SmartTrimError
from .common import SKIP_BAD_ROW, BadRow, ReaderBase, as_path, load_image, load_json, one_line
from ..preprocess import ImagePreprocessor
from .vqa_answers import target_tensor

EASYVQA_ANSWERS = ("black", "blue", "brown", "circle", "gray", "green", "no", "rectangle", "red",
                   "teal", "triangle", "yellow", "yes")
EASYVQA_SPLITS = ("train", "test")


def easyvqa_data_dir() -> Path:
    """The ``data`` folder of the installed ``easy_vqa`` package (located without importing it)."""
    spec = importlib.util.find_spec("easy_vqa")
    if spec is None or not spec.submodule_search_locations:
        raise SmartTrimError("easy-VQA: the easy-vqa package is not installed (pip install easy-vqa), "
                             "or pass --data-dir with its train/ and test/ folders")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


class EasyVQADataset(ReaderBase):
    """easy-VQA questions; see the module docstring for layout and item keys."""

    task = "easyvqa"

    def __init__(self, data_dir: str | Path | None = None, split: str = "test", image_size: int = 64,
                 label2id: Mapping[str, int] | Sequence[str] | None = None, limit: int | None = None,
                 skip_bad: bool = False, preprocess: ImagePreprocessor | None = None):
        super().__init__(image_size, limit, skip_bad, preprocess)
        self.data_dir = data_dir = easyvqa_data_dir() if data_dir is None else as_path(data_dir)
        split = str(split).lower()
        if split not in EASYVQA_SPLITS:
            raise SmartTrimError(f"easy-VQA has splits {', '.join(EASYVQA_SPLITS)}, not {split!r}")
        self.split = split
        if label2id is None:
            label2id = EASYVQA_ANSWERS
        if isinstance(label2id, (list, tuple)):
            label2id = {a: i for i, a in enumerate(label2id)}
        self.label2id = dict(label2id)
        missing = [a for a in EASYVQA_ANSWERS if a not in self.label2id]
        if missing:
            raise SmartTrimError(f"easy-VQA: label2id lacks the answers {', '.join(missing)}")
        self.num_labels = max(self.label2id.values()) + 1
        self.id2label = [""] * self.num_labels
        for a, i in self.label2id.items():
            self.id2label[i] = a

        qpath = data_dir / split / "questions.json"
        if not qpath.is_file():
            raise SmartTrimError(f"{qpath}: easy-VQA questions file not found")
        self.questions_path = qpath
        self.image_dir = data_dir / split / "images"
        if not self.image_dir.is_dir():
            raise SmartTrimError(f"{self.image_dir}: easy-VQA image folder not found")
        rows = load_json(qpath)
        if not isinstance(rows, list):
            raise SmartTrimError(f"{qpath}: expected a JSON list of [question, answer, image_id]")

        items: list[tuple[int, int, str, str]] = []
        checked: dict[Path, str | None] = {}
        for i, row in enumerate(rows):
            if self._full(len(items)):
                break
            try:
                if not isinstance(row, list) or len(row) != 3:
                    raise BadRow(f"expected [question, answer, image_id], got {one_line(repr(row))[:80]}")
                question, answer, image_id = row
                if not isinstance(question, str) or not isinstance(answer, str):
                    raise BadRow("question and answer must be strings")
                if isinstance(image_id, bool) or not isinstance(image_id, int) or image_id < 0:
                    raise BadRow(f"image_id must be an integer >= 0, got {image_id!r}")
                if answer not in self.label2id:
                    raise BadRow(f"answer {answer!r} is not one of the {len(self.label2id)} answers")
            except BadRow as e:
                self._bad(SKIP_BAD_ROW, f"{qpath} row {i}: {e}")
                continue
            if not self._check_images([self.image_path(image_id)], f"row {i}", checked):
                continue
            items.append((i, image_id, question, answer))
        self._items = items

    def image_path(self, image_id: int) -> Path:
        return self.image_dir / f"{image_id}.png"

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> dict:
        row, image_id, question, answer = self._items[index]
        image = load_image(self.image_path(image_id), self.preprocess,
                           f"{self.questions_path.name} row {row}")
        return {
            "image": image,
            "text": question,
            "target": target_tensor({self.label2id[answer]: 1.0}, self.num_labels),
            "question_id": row,
            "image_id": image_id,
            "answers": [answer],
        }


__all__ = ["EasyVQADataset", "EASYVQA_ANSWERS", "easyvqa_data_dir"]
