"""Dataset readers (VQAv2, NLVR2, SNLI-VE, easy-VQA, COCO/Flickr30k Karpathy-split captions, label-free
prompts), METER/CLIP image preprocessing, VQA answer normalisation and scoring, and batch collate functions
(encoder models: :func:`collate`; decoder VLMs: :class:`GenerativeCollate`).

    from smarttrim_cli.data import open_dataset, make_collate
    ds = open_dataset("vqa", None, "val", image_size=576, label2id=ckpt_label2id, skip_bad=True)
    loader = DataLoader(ds, batch_size=32, num_workers=4, collate_fn=make_collate(tokenizer, 50))

Images are decoded lazily in ``__getitem__`` (i.e. in DataLoader workers). Every reader validates its
files when it is built; a missing file, a malformed row or (in ``__getitem__``) a missing/unreadable
image raises :class:`smarttrim_cli.errors.SmartTrimError` with a one-line message naming the file and
the row. With ``skip_bad=True`` bad rows are skipped and each image is checked (exists, and
``PIL.Image.verify`` passes) while indexing; skips are counted in ``dataset.skipped`` (reason ->
count; ``dataset.skipped_summary()`` formats it).

Default data folders: ``default_data_dir(name)`` = ``$SMARTTRIM_DATA/<name>`` when the variable is
set, else ``~/.cache/smarttrim/data/<name>``; easy-VQA defaults to the installed package's data.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..errors import SmartTrimError
from .captions import ITM_LABELS, CaptionsDataset, Flickr30kCaptionsDataset
from .common import ReaderBase
from .easyvqa import EASYVQA_ANSWERS, EasyVQADataset, easyvqa_data_dir
from .generative import (VQA_SHORT_ANSWER, GenerativeCollate, WithTargetTexts, generated_texts,
                         image_token_count, load_chat_processor)
from .nlvr2 import NLVR2_LABELS, NLVR2Dataset
from ..preprocess import CLIP_MEAN, CLIP_STD, ImagePreprocessor
from .prompts import PromptsDataset
from .snli_ve import SNLI_LABEL2ID, SNLI_LABELS, SNLIVEDataset
from .vqa_answers import (build_answer_vocab, majority_answer, normalize_answer, soft_score,
                          target_tensor, vqa_score, vqa_targets)
from .vqav2 import VQAv2Dataset, build_vqa_vocab

DATASETS: dict[str, type[ReaderBase]] = {
    "vqa": VQAv2Dataset,
    "nlvr2": NLVR2Dataset,
    "snli": SNLIVEDataset,
    "easyvqa": EasyVQADataset,
    "coco-captions": CaptionsDataset,
    "flickr30k": Flickr30kCaptionsDataset,
    "prompts": PromptsDataset,
}
ALIASES = {"vqav2": "vqa", "vqa2": "vqa", "snli-ve": "snli", "snli_ve": "snli", "snlive": "snli",
           "easy-vqa": "easyvqa", "easy_vqa": "easyvqa", "nlvr": "nlvr2",
           "coco_captions": "coco-captions", "coco-karpathy": "coco-captions", "flickr": "flickr30k",
           "flickr30k-captions": "flickr30k", "flickr30k_captions": "flickr30k", "f30k": "flickr30k",
           "prompt": "prompts", "label-free": "prompts"}
LAYOUT_HINTS = {
    "vqa": "v2_OpenEnded_mscoco_<split>_questions.json, v2_mscoco_<split>_annotations.json, <split>/COCO_*.jpg",
    "nlvr2": "<split>.json, images/<split>/...-img0.png",
    "snli": "snli_ve_<split>.jsonl, flickr30k_images/<id>.jpg",
    "easyvqa": "<split>/questions.json, <split>/images/<id>.png",
    "coco-captions": "dataset_coco.json (Karpathy split), <filepath>/<filename> (val2014/COCO_val2014_*.jpg)",
    "flickr30k": "dataset_flickr30k.json (Karpathy split), flickr30k-images/<filename>",
    "prompts": '<split>.jsonl or prompts.jsonl ({"image": "rel/path.jpg", "prompt": ...} per line), images',
}


def canonical_name(name: str) -> str:
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in DATASETS:
        raise SmartTrimError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return key


def default_data_dir(name: str) -> Path:
    """``$SMARTTRIM_DATA/<name>`` if SMARTTRIM_DATA is set, else ``~/.cache/smarttrim/data/<name>``.

    For easy-VQA, when that folder does not exist, the installed package's data folder.
    """
    key = canonical_name(name)
    root = os.environ.get("SMARTTRIM_DATA")
    base = Path(os.path.expanduser(root)) if root else Path.home() / ".cache" / "smarttrim" / "data"
    path = base / key
    if key == "easyvqa" and not path.is_dir():
        return easyvqa_data_dir()
    return path


def open_dataset(name: str, data_dir: str | os.PathLike | None, split: str, image_size: int,
                 label2id: Mapping[str, int] | Sequence[str] | None = None, limit: int | None = None,
                 skip_bad: bool = False, preprocess=None) -> ReaderBase:
    """Open a reader by name: ``vqa``, ``nlvr2``, ``snli``, ``easyvqa``, ``coco-captions``, ``flickr30k`` or ``prompts``
    (aliases: vqav2, snli-ve, easy-vqa, coco_captions, flickr ...). ``data_dir=None`` uses
    :func:`default_data_dir`. ``preprocess``: the model's image transform
    (``model_dir.LoadedModel.image_preprocessor()``); default METER/CLIP's. ``label2id``: answer vocabulary for
    vqa/easyvqa (e.g. from the checkpoint), label order for snli; ignored by nlvr2, the caption readers and prompts."""
    key = canonical_name(name)
    explicit = data_dir is not None
    path = Path(os.path.expanduser(str(data_dir))) if explicit else default_data_dir(key)
    if not path.is_dir():
        how = ("given with --data-dir" if explicit else
               "default; set SMARTTRIM_DATA or pass --data-dir DIR")
        what = "is not a directory" if path.exists() else "does not exist"
        raise SmartTrimError(f"{key} data directory {path} {what} ({how}); expected "
                             f"{LAYOUT_HINTS[key]}")
    kwargs: dict[str, Any] = dict(split=split, image_size=image_size, limit=limit, skip_bad=skip_bad,
                                  preprocess=preprocess)
    if key != "nlvr2":
        kwargs["label2id"] = label2id
    return DATASETS[key](path, **kwargs)


def collate(batch: Sequence[dict], tokenizer, max_text_len: int) -> dict[str, Any]:
    """Batch items of any reader.

    Returns ``pixel_values`` [B,3,H,W] (and ``pixel_values2`` for NLVR2), the tokenizer's tensors
    (``input_ids``, ``attention_mask``, and e.g. ``token_type_ids`` if it returns them) padded to the
    longest text in the batch and truncated to ``max_text_len`` tokens, ``target`` (stacked: float
    [B, num_labels] for VQA-style readers, long [B] for NLVR2/SNLI-VE), ``text`` (list of str), and
    every other item key: integers as a LongTensor [B] (``question_id``, ``image_id`` ...), anything
    else as a list.
    """
    if not batch:
        raise ValueError("collate: empty batch")
    out: dict[str, Any] = {"pixel_values": torch.stack([b["image"] for b in batch])}
    if "image2" in batch[0]:
        out["pixel_values2"] = torch.stack([b["image2"] for b in batch])
    texts = [b["text"] for b in batch]
    enc = tokenizer(texts, padding="longest", truncation=True, max_length=int(max_text_len),
                    return_tensors="pt")
    for k, v in enc.items():
        if isinstance(v, torch.Tensor):
            out[k] = v
    out["target"] = torch.stack([torch.as_tensor(b["target"]) for b in batch])
    out["text"] = texts
    for key in batch[0]:
        if key in ("image", "image2", "text", "target") or key in out:
            continue
        values = [b.get(key) for b in batch]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            out[key] = torch.tensor(values, dtype=torch.long)
        else:
            out[key] = values
    return out


def batch_to_device(batch: dict, device) -> dict:
    """The batch's tensors moved to ``device`` (non-blocking: the copy is ordered before any use on that
    device); other values (texts, lists) as they are."""
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def make_collate(tokenizer, max_text_len: int):
    """``collate`` with the tokenizer bound: a picklable ``collate_fn`` for DataLoader workers."""
    return functools.partial(collate, tokenizer=tokenizer, max_text_len=max_text_len)


__all__ = [
    "open_dataset", "default_data_dir", "collate", "make_collate", "batch_to_device", "canonical_name", "DATASETS",
    "VQAv2Dataset", "NLVR2Dataset", "SNLIVEDataset", "EasyVQADataset", "ImagePreprocessor",
    "CLIP_MEAN", "CLIP_STD", "build_answer_vocab", "build_vqa_vocab", "normalize_answer",
    "soft_score", "vqa_targets", "target_tensor", "vqa_score", "EASYVQA_ANSWERS", "SNLI_LABELS",
    "SNLI_LABEL2ID", "NLVR2_LABELS", "easyvqa_data_dir", "CaptionsDataset", "Flickr30kCaptionsDataset",
    "ITM_LABELS", "PromptsDataset", "GenerativeCollate", "WithTargetTexts", "VQA_SHORT_ANSWER",
    "image_token_count", "load_chat_processor", "majority_answer", "generated_texts",
]
