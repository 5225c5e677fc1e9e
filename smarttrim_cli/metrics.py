"""Per-input task scores from logits and targets, shared by training (validation) and profiling (compare).

Below both train/ and profiling/, so neither imports the other for a score.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .data.vqa_answers import majority_answer, normalize_answer, soft_score


def is_multilabel(target: torch.Tensor) -> bool:
    """VQA-style soft-score targets (float [B, L]) vs class ids (integer [B])."""
    return target.is_floating_point() and target.dim() == 2


def score(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-input task score: VQA score (soft score of the argmax) or accuracy."""
    pred = logits.argmax(-1)
    if is_multilabel(target):
        return target.float().gather(1, pred.unsqueeze(1)).squeeze(1)
    return (pred == target.long()).float()


# ---- generated answers (decoder VLMs): scored on VQA's normalised strings, as the official evaluation does

VQA_ANNOTATORS = 10  # VQAv2's answers per question: what the soft score's leave-one-out averaging assumes


def generated_vqa_score(text: str, answers: Sequence[str]) -> float:
    """VQA soft score of one generated answer against the annotators' answers (``"Two."`` vs ten ``"2"`` ->
    1.0; an answer 2 of 10 gave -> 0.6). Fewer than ten answers are not VQAv2 annotations (easy-VQA's one answer,
    a prompts row's accepted answers): 1.0 when the answer matches any of them, else 0 — the soft score would
    count easy-VQA's only answer as 0.3. NaN without answers: the score is undefined, not 0."""
    if not answers:
        return float("nan")
    pred = normalize_answer(text)
    n = sum(normalize_answer(a) == pred for a in answers)
    return soft_score(n) if len(answers) >= VQA_ANNOTATORS else float(n > 0)


def generated_exact_match(text: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised generated answer equals the most frequent normalised answer (ties: the first);
    label-free agreement passes ``[full model's answer]``. NaN without answers."""
    target = majority_answer(answers)
    return float("nan") if target is None else float(normalize_answer(text) == target)


def vqa_score_generated(texts: Sequence[str], answers: Sequence[Sequence[str]]) -> torch.Tensor:
    """Per-input VQA score of generated answers: FloatTensor[B], like :func:`score`."""
    if len(texts) != len(answers):
        raise ValueError(f"{len(texts)} generated answers for {len(answers)} answer lists")
    return torch.tensor([generated_vqa_score(t, a) for t, a in zip(texts, answers)], dtype=torch.float32)


def exact_match_generated(texts: Sequence[str], answers: Sequence[Sequence[str]]) -> torch.Tensor:
    """Per-input exact match of generated answers against the most frequent answer: FloatTensor[B]."""
    if len(texts) != len(answers):
        raise ValueError(f"{len(texts)} generated answers for {len(answers)} answer lists")
    return torch.tensor([generated_exact_match(t, a) for t, a in zip(texts, answers)], dtype=torch.float32)
