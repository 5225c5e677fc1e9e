"""Task scores for the profile: VQA score, accuracy, recall@k; all in percent (points).

- ``vqa`` (VQAv2, easy-VQA): the VQA soft score of the arg-max answer (``data.vqa_score``), averaged.
- ``nlvr2``, ``snli``: accuracy of the arg-max class.
- ``retrieval``: text-to-image recall@1/5/10 over the distinct images of the profiled inputs (each
  input's own image is its positive); the headline score is recall@1. Image-to-text recall@k (an image
  is found when any of its texts ranks in the top k) comes from the same scores.

The drop reported everywhere is ``full score - trimmed score`` in points.
"""
from __future__ import annotations

from typing import Sequence

import torch

METRICS = {"vqa": "vqa_score", "nlvr2": "accuracy", "snli": "accuracy", "retrieval": "recall@1"}
RECALL_KS = (1, 5, 10)


def metric_name(task: str) -> str:
    return METRICS[task]


def instance_scores(task: str, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-input score in [0, 1] for classification-style tasks (B,)."""
    logits = logits.detach().float().cpu()
    target = torch.as_tensor(target).cpu()
    if task == "vqa":
        from ..data import vqa_score

        return vqa_score(logits, target.float())
    if task in ("nlvr2", "snli"):
        return (logits.argmax(-1) == target.reshape(-1).long()).float()
    raise ValueError(f"no per-input score for task {task!r}")


def predictions(logits: torch.Tensor) -> list[int]:
    return [int(i) for i in logits.detach().float().argmax(-1).reshape(-1).cpu()]


def recall_at_k(scores: torch.Tensor, positives: Sequence[int], ks=RECALL_KS) -> dict:
    """scores: (n_texts, n_images); positives[i] = column of text i's image -> {"recall@k": percent}."""
    scores = scores.float()
    pos = torch.as_tensor(list(positives), dtype=torch.long)
    own = scores.gather(1, pos.unsqueeze(1))
    rank = (scores > own).sum(1)  # 0 = the positive is ranked first (ties favour the positive)
    return {f"recall@{k}": float((rank < k).float().mean() * 100.0) for k in ks}


def image_to_text_recall(scores: torch.Tensor, positives: Sequence[int], ks=RECALL_KS) -> dict:
    """scores: (n_texts, n_images); positives[i] = column of text i's image -> {"recall@k": percent} over
    the images: the rank of an image's best-scored own text among all texts (ties favour the positive)."""
    s = scores.float().t()                                           # (images, texts)
    pos = torch.as_tensor(list(positives), dtype=torch.long)
    own = pos.unsqueeze(0) == torch.arange(s.shape[0]).unsqueeze(1)  # (images, texts): text is the image's
    best = s.masked_fill(~own, float("-inf")).amax(1, keepdim=True)
    rank = (s > best).sum(1)
    return {f"recall@{k}": float((rank < k).float().mean() * 100.0) for k in ks}


def percent(values: Sequence[float]) -> float | None:
    return None if len(values) == 0 else float(sum(values) / len(values) * 100.0)
