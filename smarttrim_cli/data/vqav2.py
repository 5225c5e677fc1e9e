"""VQAv2 reader over the official file layout.

Accepted layout (``<full>`` is the official split name ``train2014``, ``val2014``, ``test2015`` or
``test-dev2015``; ``split`` may be given either as that name or as ``train``/``val``/``test``/
``test-dev``)::

    <data_dir>/v2_OpenEnded_mscoco_<full>_questions.json   {"questions": [{"image_id", "question", "question_id"}, ...]}
    <data_dir>/v2_mscoco_<full>_annotations.json            {"annotations": [{"question_id", "image_id",
                                                              "multiple_choice_answer", "answers": [{"answer", ...} x10]}, ...]}
    <data_dir>/<img>/COCO_<img>_<image_id:012d>.jpg         images

Both json files are also looked up under ``<data_dir>/questions/`` and ``<data_dir>/annotations/``.
The annotations file is required except for test splits (``test*``: targets are then all zero and
``answers`` empty). ``<img>`` is the image folder of the split, ``train2014``, ``val2014`` or
``test2015`` (test-dev2015 uses the test2015 images); it is looked up as, in this order,
``<data_dir>/<img>``, ``<data_dir>/<short>`` (``train``, ``val``, ``test``),
``<data_dir>/images/<img>`` and ``<data_dir>/images/<short>``. Inside it the file is
``COCO_<img>_<image_id:012d>.jpg`` (official name) or, failing that, ``<image_id:012d>.jpg``.

Answer vocabulary: ``label2id`` when given (e.g. from a model checkpoint), otherwise built as METER
does: ``multiple_choice_answer`` of train2014 then val2014 (those of the two annotation files that
exist), normalised, kept when seen at least 9 times, in first-occurrence order (3,129 labels on the
full data). Targets are VQA soft scores (see :mod:`.vqa_answers`).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Sequence


from ..errors import SmartTrimError
from .common import (SKIP_BAD_ROW, SKIP_NO_ANNOTATION, SKIP_NO_ANSWER, BadRow, ReaderBase,
                     as_path, get_field, load_image, load_json, one_line)
from ..preprocess import ImagePreprocessor
from .vqa_answers import VQA_MIN_COUNT, build_answer_vocab, normalize_answer, target_tensor, vqa_targets

SPLIT_ALIASES = {
    "train": "train2014", "val": "val2014", "test": "test2015", "test-dev": "test-dev2015",
    "testdev": "test-dev2015",
}
VOCAB_SPLITS = ("train2014", "val2014")


def official_split(split: str) -> str:
    """``train`` -> ``train2014`` etc.; official names pass through."""
    s = str(split).strip()
    return SPLIT_ALIASES.get(s.lower(), s)


def image_split(full: str) -> str:
    return "test2015" if full.startswith("test-dev") else full


def short_split(full: str) -> str:
    return re.sub(r"\d{4}$", "", full)


def questions_file(data_dir: Path, full: str) -> list[Path]:
    name = f"v2_OpenEnded_mscoco_{full}_questions.json"
    return [data_dir / name, data_dir / "questions" / name, data_dir / "annotations" / name]


def annotations_file(data_dir: Path, full: str) -> list[Path]:
    name = f"v2_mscoco_{full}_annotations.json"
    return [data_dir / name, data_dir / "annotations" / name, data_dir / "questions" / name]


def image_dirs(data_dir: Path, full: str) -> list[Path]:
    img, short = image_split(full), short_split(image_split(full))
    return [data_dir / img, data_dir / short, data_dir / "images" / img, data_dir / "images" / short]


def _first_file(candidates: Sequence[Path]) -> Path | None:
    for c in candidates:
        if c.is_file():
            return c
    return None


def _load_list(path: Path, key: str) -> list:
    data = load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise SmartTrimError(f"{path}: expected a JSON object with a {key!r} list")
    return data[key]


def _parse_annotation(row) -> tuple[int, int | None, str | None, list[str]]:
    qid = get_field(row, "question_id", int)
    image_id = row.get("image_id")
    if image_id is not None and (isinstance(image_id, bool) or not isinstance(image_id, int)):
        raise BadRow(f"'image_id' should be int, got {one_line(repr(image_id))[:60]}")
    mca = row.get("multiple_choice_answer")
    if mca is not None and not isinstance(mca, str):
        raise BadRow(f"'multiple_choice_answer' should be str, got {one_line(repr(mca))[:60]}")
    answers = get_field(row, "answers", list)
    out = []
    for j, a in enumerate(answers):
        if isinstance(a, dict) and isinstance(a.get("answer"), str):
            out.append(a["answer"])
        elif isinstance(a, str):  # tolerate plain strings
            out.append(a)
        else:
            raise BadRow(f"answers[{j}] has no 'answer' string")
    return qid, image_id, mca, out


def build_vqa_vocab(data_dir: str | Path, splits: Sequence[str] = VOCAB_SPLITS,
                    min_count: int = VQA_MIN_COUNT) -> list[str]:
    """METER's answer list (label id = position) from the annotation files of ``splits`` that exist.

    Raises SmartTrimError if none exists or a row lacks ``multiple_choice_answer``.
    """
    data_dir = as_path(data_dir)
    stream: list[str] = []
    found = []
    for sp in splits:
        full = official_split(sp)
        path = _first_file(annotations_file(data_dir, full))
        if path is None:
            continue
        found.append(path)
        for i, row in enumerate(_load_list(path, "annotations")):
            if not isinstance(row, dict) or not isinstance(row.get("multiple_choice_answer"), str):
                raise SmartTrimError(f"{path} annotations[{i}]: missing 'multiple_choice_answer'")
            stream.append(row["multiple_choice_answer"])
    if not found:
        names = ", ".join(f"v2_mscoco_{official_split(s)}_annotations.json" for s in splits)
        raise SmartTrimError(f"{data_dir}: cannot build the VQA answer vocabulary, none of {names} "
                             "found; pass the label list of the model (label2id)")
    return build_answer_vocab(stream, min_count=min_count)


def _check_label2id(label2id) -> dict[str, int]:
    if isinstance(label2id, (list, tuple)):
        label2id = {a: i for i, a in enumerate(label2id)}
    if not isinstance(label2id, Mapping) or not label2id:
        raise SmartTrimError("label2id must be a non-empty mapping answer -> label id")
    out = {}
    for k, v in label2id.items():
        if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise SmartTrimError(f"label2id: bad entry {k!r}: {v!r} (expected str -> int >= 0)")
        out[k] = v
    if len(set(out.values())) != len(out):
        raise SmartTrimError("label2id: two answers share a label id")
    return out


class VQAv2Dataset(ReaderBase):
    """VQAv2 questions as items ``{"image": FloatTensor[3,H,W], "text": str, "target":
    FloatTensor[num_labels], "question_id": int, "image_id": int, "answers": list[str]}``.

    ``answers`` are the raw annotator answers (empty for test splits). Attributes: ``label2id``,
    ``id2label``, ``num_labels``, ``skipped`` (reason -> count), ``questions_path``,
    ``annotations_path`` (None for a test split without one), ``image_dir``.
    ``drop_unanswerable=True`` drops questions none of whose answers is in the vocabulary (METER's
    train/val files exclude them), counted as ``skipped["no answer in vocabulary"]``.
    ``vocab_splits``/``min_count``: where and how the vocabulary is built when ``label2id`` is None.
    """

    task = "vqa"

    def __init__(self, data_dir: str | Path, split: str = "val2014", image_size: int = 576,
                 label2id: Mapping[str, int] | Sequence[str] | None = None, limit: int | None = None,
                 skip_bad: bool = False, drop_unanswerable: bool = False,
                 vocab_splits: Sequence[str] = VOCAB_SPLITS, min_count: int = VQA_MIN_COUNT,
                 preprocess: ImagePreprocessor | None = None):
        super().__init__(image_size, limit, skip_bad, preprocess)
        self.data_dir = data_dir = as_path(data_dir)
        if not data_dir.is_dir():
            raise SmartTrimError(f"{data_dir}: VQAv2 data directory does not exist")
        self.split = full = official_split(split)
        is_test = full.startswith("test")

        qpath = _first_file(questions_file(data_dir, full))
        if qpath is None:
            raise SmartTrimError(f"{questions_file(data_dir, full)[0]}: VQAv2 questions file not found"
                                 f" (split {split!r})")
        self.questions_path = qpath
        apath = _first_file(annotations_file(data_dir, full))
        if apath is None and not is_test:
            raise SmartTrimError(f"{annotations_file(data_dir, full)[0]}: VQAv2 annotations file not "
                                 f"found (required for split {full!r})")
        self.annotations_path = apath

        idir = next((d for d in image_dirs(data_dir, full) if d.is_dir()), None)
        if idir is None:
            tried = ", ".join(str(d) for d in image_dirs(data_dir, full))
            raise SmartTrimError(f"VQAv2 {full}: no image folder (tried {tried})")
        self.image_dir = idir
        self._img = image_split(full)

        # annotations: question_id -> (answers, multiple_choice_answer)
        anns: dict[int, list[str]] = {}
        bad_ann: set[int] = set()
        mca_stream: list[str] = []
        if apath is not None:
            for i, row in enumerate(_load_list(apath, "annotations")):
                try:
                    qid, _iid, mca, answers = _parse_annotation(row)
                except BadRow as e:
                    qid = row.get("question_id") if isinstance(row, dict) else None
                    if isinstance(qid, int):
                        bad_ann.add(qid)
                    self._bad(SKIP_BAD_ROW, f"{apath} annotations[{i}]"
                              f"{f' (question {qid})' if qid is not None else ''}: {e}")
                    continue
                anns[qid] = answers
                if mca is not None:
                    mca_stream.append(mca)

        # vocabulary
        if label2id is None:
            label2id = self._build_vocab(vocab_splits, full, mca_stream, min_count)
        self.label2id = _check_label2id(label2id)
        self.num_labels = max(self.label2id.values()) + 1
        self.id2label = [""] * self.num_labels
        for a, i in self.label2id.items():
            self.id2label[i] = a

        # questions
        self._items: list[tuple[int, int, str, list[str], dict[int, float]]] = []
        checked: dict[Path, str | None] = {}
        for i, row in enumerate(_load_list(qpath, "questions")):
            if self._full(len(self._items)):
                break
            try:
                qid = get_field(row, "question_id", int)
                image_id = get_field(row, "image_id", int)
                question = get_field(row, "question", str)
            except BadRow as e:
                self._bad(SKIP_BAD_ROW, f"{qpath} questions[{i}]: {e}")
                continue
            if apath is not None:
                if qid not in anns:
                    if qid in bad_ann:
                        continue  # already counted as a bad annotation row
                    self._bad(SKIP_NO_ANNOTATION, f"{qpath} questions[{i}]: question {qid} has no "
                              f"annotation in {apath.name}")
                    continue
                answers = anns[qid]
                targets = vqa_targets(answers, self.label2id)
                if drop_unanswerable and not targets:
                    self.skipped[SKIP_NO_ANSWER] += 1
                    continue
            else:
                answers, targets = [], {}
            if not self._check_images([self.image_path(image_id)], f"question {qid}", checked):
                continue
            self._items.append((qid, image_id, question, answers, targets))

    def _build_vocab(self, vocab_splits, full, mca_stream, min_count) -> list[str]:
        vocab_full = [official_split(s) for s in vocab_splits]
        stream: list[str] = []
        found = False
        for vs in vocab_full:
            if vs == full and self.annotations_path is not None:
                stream.extend(mca_stream)
                found = True
                continue
            path = _first_file(annotations_file(self.data_dir, vs))
            if path is None:
                continue
            found = True
            for i, row in enumerate(_load_list(path, "annotations")):
                mca = row.get("multiple_choice_answer") if isinstance(row, dict) else None
                if not isinstance(mca, str):
                    self._bad(SKIP_BAD_ROW, f"{path} annotations[{i}]: missing 'multiple_choice_answer'")
                    continue
                stream.append(mca)
        if not found:
            names = ", ".join(f"v2_mscoco_{s}_annotations.json" for s in vocab_full)
            raise SmartTrimError(f"{self.data_dir}: cannot build the VQA answer vocabulary, none of "
                                 f"{names} found; pass the model's label list (label2id)")
        vocab = build_answer_vocab(stream, min_count=min_count)
        if not vocab:
            raise SmartTrimError(f"{self.data_dir}: no VQA answer occurs {min_count} times in "
                                 f"{', '.join(vocab_full)}; the answer vocabulary would be empty")
        return vocab

    def image_path(self, image_id: int) -> Path:
        official = self.image_dir / f"COCO_{self._img}_{image_id:012d}.jpg"
        if official.is_file():
            return official
        bare = self.image_dir / f"{image_id:012d}.jpg"
        return bare if bare.is_file() else official

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> dict:
        qid, image_id, question, answers, targets = self._items[index]
        image = load_image(self.image_path(image_id), self.preprocess, f"question {qid}")
        return {
            "image": image,
            "text": question,
            "target": target_tensor(targets, self.num_labels),
            "question_id": qid,
            "image_id": image_id,
            "answers": list(answers),
        }


__all__ = ["VQAv2Dataset", "build_vqa_vocab", "official_split", "normalize_answer"]
