"""The text task of decoder VLMs (a family whose task outputs "text", e.g. LLaVA): its objective and batches.

Training batches carry the labels as ``target`` (B, L; -100 except the answer tokens and the token closing the
turn, unshifted as transformers' models take them), so TrainStep passes them on like any target. Validation
batches hold the prompt only (what inference sees) with each item's ``answers`` and ``target_text``: the score
is that of the greedily generated answer (hard mode, ``model.generate``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.generative import IGNORE_INDEX, GenerativeCollate
from ..errors import SmartTrimError
from ..metrics import generated_exact_match, generated_vqa_score
from .objectives import Objective


def shifted(logits: torch.Tensor, labels: torch.Tensor):
    """(logits predicting token t+1, labels t+1, mask of answer positions): transformers' shift."""
    lab = labels[:, 1:]
    return logits[:, :-1].float(), lab, lab != IGNORE_INDEX


class NextToken(Objective):
    """Teacher-forced next-token cross-entropy on the answer tokens; KL(teacher || student) of the tempered
    next-token distributions on the same positions (x T^2, mean over answer tokens); validation: the VQA score of
    the generated answer (``vqa_scoring``, VQAv2's ten annotators), else exact match against the item's answer
    or, label-free, its target text (the full model's own answer)."""

    def __init__(self, tokenizer, temperature: float = 1.0, max_new_tokens: int = 16, vqa_scoring: bool = False):
        self.tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        self.temperature, self.max_new_tokens, self.vqa_scoring = temperature, max_new_tokens, vqa_scoring

    def task_loss(self, logits, target):
        x, lab, _ = shifted(logits, target)
        return F.cross_entropy(x.reshape(-1, x.shape[-1]), lab.reshape(-1), ignore_index=IGNORE_INDEX)

    def loss_count(self, target):
        return (target[:, 1:] != IGNORE_INDEX).sum()

    def distill_loss(self, student, teacher, target=None):
        if target is None:
            raise SmartTrimError("text distillation needs the labels (answer positions)")
        s, _, m = shifted(student, target)
        t = teacher.detach()[:, :-1].float()
        T = float(self.temperature)
        # per position KL(t || s), summed over the vocabulary; only answer positions count
        kl = F.kl_div(F.log_softmax(s[m] / T, -1), F.log_softmax(t[m] / T, -1), reduction="none", log_target=True)
        return kl.sum(-1).mean() * (T * T) if m.any() else s.sum() * 0

    def generate(self, model, batch, **run) -> list[str]:
        ids = model.generate(batch, max_new_tokens=self.max_new_tokens, do_sample=False, **run)
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def score_texts(self, texts, answers, targets) -> torch.Tensor:
        out = []
        for text, ans, tgt in zip(texts, answers, targets):
            if ans and self.vqa_scoring:
                out.append(generated_vqa_score(text, ans))
            else:
                out.append(generated_exact_match(text, ans or ([tgt] if tgt else [])))
        return torch.tensor(out, dtype=torch.float32)

    def validate(self, model, batch, run):
        # the cost records come from the prompt's forward under the same (deterministic) decisions generate takes
        _, ctx = model.run(batch, record=True, **run)
        texts = self.generate(model, batch, **run)
        return self.score_texts(texts, batch["answers"], batch["target_text"]), ctx


class TextCollate:
    """Reader items (with ``__index__``) -> training batches (``target`` = labels) or, ``mode="generate"``,
    validation / generation batches (prompt only, ``answers``, ``target_text``). A reader's or the collate's
    SmartTrimError becomes the ``__error__`` marker (one line, from a worker too)."""

    def __init__(self, processor, mode: str, instruction: str | None = None):
        self.mode, self.inner = mode, GenerativeCollate(processor, mode, instruction)

    def __call__(self, items):
        for it in items:
            if "__error__" in it:
                return {"__error__": it["__error__"]}
        idx = torch.tensor([it.pop("__index__") for it in items], dtype=torch.long)
        try:
            b = self.inner(items)
        except SmartTrimError as e:
            return {"__error__": str(e)}
        out = {k: b[k] for k in ("pixel_values", "input_ids", "attention_mask")}
        if self.mode == "train":
            out["target"] = b["labels"]
        else:
            out["answers"] = b["answers"]
            out["target_text"] = [it.get("target_text") for it in items]
        out["index"] = idx
        return out
