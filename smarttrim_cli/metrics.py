"""Per-input task scores from logits and targets, shared by training (validation) and profiling (compare).

Below both train/ and profiling/, so neither imports the other for a score.
"""
from __future__ import annotations

import torch


def is_multilabel(target: torch.Tensor) -> bool:
    """VQA-style soft-score targets (float [B, L]) vs class ids (integer [B])."""
    return target.is_floating_point() and target.dim() == 2


def score(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-input task score: VQA score (soft score of the argmax) or accuracy."""
    pred = logits.argmax(-1)
    if is_multilabel(target):
        return target.float().gather(1, pred.unsqueeze(1)).squeeze(1)
    return (pred == target.long()).float()
