"""VQAv2 answers: normalisation, the answer vocabulary, soft targets and the VQA score.

The normalisation reproduces, behaviour for behaviour, the ``normalize_word`` that METER (and ViLT,
from which METER took it) applies to VQAv2 answers, itself the answer processing of the official VQA
evaluation script (``processPunctuation`` + ``processDigitArticle``):

1. punctuation ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``: each mark is deleted when it touches a
   space in the raw answer (``"p "``/``" p"``) or when the answer has a digit-comma-digit group
   (``"1,000"``), otherwise replaced by a space;
2. periods not followed by a digit are deleted (``"3.5"`` keeps its period); like the original, which
   passes ``re.UNICODE`` where ``re.sub`` expects ``count``, at most 32 are deleted;
3. lower-case, split on whitespace; number words ``none zero one ... ten`` become digits
   (``none`` -> ``0``); articles ``a an the`` are dropped;
4. contractions written without an apostrophe are restored (``dont`` -> ``don't``);
5. re-join with single spaces and delete any remaining comma.

It is kept identical (quirks included) so that a vocabulary built here from VQAv2 train+val with
``min_count=9`` gives METER's 3,129 labels in METER's order, i.e. label ids that match a released
checkpoint's classifier.
"""
from __future__ import annotations

import re
from collections import Counter
from functools import lru_cache
from typing import Iterable, Mapping, Sequence

import torch

# Contractions of the official VQA evaluation script (as in METER/ViLT's glossary). Keys that start
# with a capital letter can never match (words are lower-cased first); they are kept for fidelity.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
               "@", "`", ",", "?", "!")
# The original pattern is "(?!<=\d)(\.)(?!\d)"; its first group is a (mistyped) lookahead that never
# blocks a period, so in effect: a period not followed by a digit.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PERIOD_STRIP_COUNT = int(re.UNICODE)  # the original passes re.UNICODE (32) as sub()'s count

VQA_MIN_COUNT = 9  # METER/ViLT: answers seen at least 9 times among train+val multiple-choice answers


@lru_cache(maxsize=1 << 18)
def normalize_answer(answer: str) -> str:
    """Normalise one VQA answer exactly as METER's ``normalize_word`` (see module docstring)."""
    text = str(answer)
    out = text
    has_digit_comma = _COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:
        if (p + " " in text) or (" " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)
    words = []
    for w in out.lower().split():
        w = NUMBER_WORDS.get(w, w)
        if w not in ARTICLES:
            words.append(w)
    words = [CONTRACTIONS.get(w, w) for w in words]
    return " ".join(words).replace(",", "")


def build_answer_vocab(answers: Iterable[str], min_count: int = VQA_MIN_COUNT,
                       normalize: bool = True) -> list[str]:
    """Answers seen at least ``min_count`` times, in order of first occurrence.

    ``answers`` is the stream of VQAv2 ``multiple_choice_answer`` strings (train, then val, in file
    order); each is normalised first unless ``normalize=False``. Position in the list = label id.
    """
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    counts: Counter = Counter()
    for a in answers:  # Counter keeps first-insertion order
        counts[normalize_answer(a) if normalize else a] += 1
    return [a for a, n in counts.items() if n >= min_count]


def soft_score(n_matching: int) -> float:
    """VQA soft score of an answer given by ``n_matching`` of the 10 annotators: 0/1/2/3/>=4 ->
    0.0/0.3/0.6/0.9/1.0 (the average of min(1, n/3) over the 10 leave-one-out subsets, rounded as in
    METER/ViLT)."""
    n = int(n_matching)
    if n < 0:
        raise ValueError(f"number of matching annotators must be >= 0, got {n_matching}")
    return (0.0, 0.3, 0.6, 0.9)[n] if n < 4 else 1.0


def majority_answer(answers: Iterable[str]) -> str | None:
    """The most frequent normalised answer (ties: the one given first), or None when there is none."""
    counts: Counter = Counter(normalize_answer(a) for a in answers)
    return counts.most_common(1)[0][0] if counts else None  # most_common is stable: first wins a tie


def vqa_targets(answers: Sequence[str], label2id: Mapping[str, int],
                normalize: bool = True) -> dict[int, float]:
    """Soft targets ``{label_id: score}`` from the (usually 10) annotator answers of one question.

    Answers are normalised (unless ``normalize=False``) and counted; answers outside ``label2id``
    are dropped, so the dict may be empty (the question is then unanswerable by the classifier).
    """
    counts: Counter = Counter(normalize_answer(a) if normalize else a for a in answers)
    out: dict[int, float] = {}
    for ans, n in counts.items():
        lid = label2id.get(ans)
        if lid is not None:
            out[int(lid)] = soft_score(n)
    return out


def target_tensor(targets: Mapping[int, float], num_labels: int) -> torch.Tensor:
    """Dense FloatTensor[num_labels] from a ``{label_id: score}`` dict."""
    t = torch.zeros(num_labels, dtype=torch.float32)
    for lid, score in targets.items():
        t[lid] = score
    return t


def vqa_score(pred_label_ids: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-question VQA score: the target's soft score at the predicted label.

    ``pred_label_ids``: LongTensor[B] of predicted label ids, or logits [B, num_labels] (their argmax
    is taken). ``target``: FloatTensor[B, num_labels] of soft scores (a single [num_labels] target
    with a scalar prediction also works). Returns FloatTensor[B]; average it for the dataset score.
    """
    target = torch.as_tensor(target)
    pred = torch.as_tensor(pred_label_ids)
    if target.dim() == 1:  # one question: scalar label id or logits [num_labels]
        target = target.unsqueeze(0)
        pred = pred.reshape(1) if pred.dim() == 0 else pred.reshape(1, -1) if pred.numel() > 1 else pred.reshape(1)
    if target.dim() != 2:
        raise ValueError(f"target must be [B, num_labels], got shape {tuple(target.shape)}")
    if pred.dim() == 2:
        if pred.shape != target.shape:
            raise ValueError(f"logits shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        pred = pred.argmax(dim=1)
    pred = pred.reshape(-1).long()
    if pred.shape[0] != target.shape[0]:
        raise ValueError(f"{pred.shape[0]} predictions for {target.shape[0]} targets")
    return target.gather(1, pred.to(target.device).unsqueeze(1)).squeeze(1).float()


__all__ = [
    "normalize_answer", "build_answer_vocab", "majority_answer", "soft_score", "vqa_targets", "target_tensor",
    "vqa_score", "VQA_MIN_COUNT",
]
