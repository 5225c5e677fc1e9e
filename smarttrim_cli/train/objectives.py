"""The objective: what a task trains on and how validation scores it. The loop asks an objective for the
batch the model sees (``train_batch``, ``eval_batch``), the loss of the trimmed (student) logits against the
labels (``task_loss``), their distillation towards the full-capacity (teacher) logits (``distill_loss``), and
each input's validation score (``score``); the decision rule (rules.py) decides what is trimmed.

    SoftTargetClassification   VQA (multi-label BCE, sigmoid soft targets), NLVR2 / SNLI-VE (softmax CE, KL)
    RetrievalITM               image-text matching: positives plus one hard negative caption each, then as above
    NextToken                  decoder VLMs (task output "text"): teacher-forced answer-token cross-entropy,
                               per-answer-token KL, validation on greedily generated answers

Which one: the family's output kind for the model's task (``Family.tasks``), never the family's name.
"""
from __future__ import annotations

import torch

from ..metrics import score
from .losses import distill_loss, task_loss

# ----- image-text matching (retrieval) -------------------------------------------------------------------
ITC_TEMP = 0.07           # BLIP's initial ITC temperature (transformers' BLIP checkpoints do not store the learnt one)
NEGATIVE_ID = 1 << 30     # Gumbel-noise id of input i's negative pair: i + NEGATIVE_ID (its own noise, not i's)


def itm_negatives(image_id: torch.Tensor, sim: torch.Tensor | None = None, generator=None) -> torch.Tensor:
    """For each row, the row whose caption is its negative, from another image of the batch (-1: none,
    every row shows that image). With ``sim`` (B images x B captions, ITC cosine): BLIP's hard negatives,
    sampled with weights softmax(sim / ITC_TEMP) + 1e-4 over the other images' captions (sampled, not the
    arg-max, as BLIP does: the closest caption of another image may describe this one too). Without: the
    next row, cyclically, that shows another image (deterministic, for validation)."""
    image_id = image_id.reshape(-1).cpu()
    B = image_id.numel()
    other = image_id[:, None] != image_id[None, :]
    has = other.any(1)
    if sim is None:
        dist = (torch.arange(B)[None, :] - torch.arange(B)[:, None]) % B
        neg = dist.masked_fill(~other, B).argmin(1)
    else:
        w = (torch.softmax(sim.detach().float().cpu() / ITC_TEMP, 1) + 1e-4) * other
        w[~has] = 1.0  # a row without a candidate draws anything; dropped below
        neg = torch.multinomial(w, 1, generator=generator).squeeze(1)
    return torch.where(has, neg, torch.full_like(neg, -1))


def itm_batch(batch: dict, neg: torch.Tensor) -> dict:
    """Positives (every row, target 1 "match") followed by one negative pair per row with a negative
    (the row's image with caption ``neg[row]``, target 0): the image-text matching batch. ``index`` (the
    Gumbel-noise ids), when present, gets NEGATIVE_ID added for the negatives."""
    rows = (neg >= 0).nonzero().squeeze(1).to(batch["input_ids"].device)
    cap = neg.to(rows.device)[rows]
    out = {"pixel_values": torch.cat([batch["pixel_values"], batch["pixel_values"][rows]]),
           "input_ids": torch.cat([batch["input_ids"], batch["input_ids"][cap]]),
           "attention_mask": torch.cat([batch["attention_mask"], batch["attention_mask"][cap]])}
    pos = torch.ones_like(batch["target"]).long()
    out["target"] = torch.cat([pos, torch.zeros(len(rows), dtype=torch.long, device=pos.device)])
    if "index" in batch:
        out["index"] = torch.cat([batch["index"], batch["index"][rows] + NEGATIVE_ID])
    return out


class Objective:
    """The interface the loop trains through; see the module docstring."""

    def train_batch(self, model, inputs: dict, target, index, step: int):
        """-> (inputs, target, index): what the teacher and the student see at training step ``step``."""
        return inputs, target, index

    def eval_batch(self, batch: dict) -> dict:
        """A validation batch (already on the device) as evaluation runs it."""
        return batch

    def task_loss(self, logits, target):
        raise NotImplementedError

    def loss_count(self, target):
        """How many terms ``task_loss`` / ``distill_loss`` average over in this batch, where that is not the batch
        size (a text objective: its answer tokens), else None. Under DDP, TrainStep reweights each rank's means by
        it, so that the step's loss is the mean over the global batch's terms."""
        return None

    def distill_loss(self, student, teacher, target=None):
        """``target``: the step's labels (a text objective distils on the answer tokens only)."""
        raise NotImplementedError

    def score(self, logits, target):
        """Per-input validation scores (their mean is the reported score)."""
        raise NotImplementedError

    def validate(self, model, batch: dict, run: dict):
        """-> (per-input scores, the TrimContext with the cost records of what inference runs)."""
        logits, ctx = model.run(batch, record=True, **run)
        return self.score(logits, batch["target"]), ctx


class SoftTargetClassification(Objective):
    """Class logits against soft targets: multi-label BCE with sigmoid distillation (VQA), or softmax cross-
    entropy with KL distillation (NLVR2, SNLI-VE, ITM)."""

    def __init__(self, multilabel: bool, temperature: float = 1.0):
        self.multilabel, self.temperature = multilabel, temperature

    def task_loss(self, logits, target):
        return task_loss(logits, target)

    def distill_loss(self, student, teacher, target=None):
        return distill_loss(student, teacher, self.multilabel, self.temperature)

    def score(self, logits, target):
        return score(logits.float(), target)


class RetrievalITM(SoftTargetClassification):
    """Image-text matching: each pair of the batch plus one negative caption of another image (training: BLIP's
    hard negatives; validation: a fixed one), then a 2-way classification of match / no match."""

    def __init__(self, seed: int, temperature: float = 1.0):
        super().__init__(False, temperature)
        self.seed = seed

    def negatives(self, model, inputs, image_id, index, step):
        """BLIP's hard negatives from the full model's ITC similarities where it has them (``itc``), else
        uniform over the other images' captions. The draw is seeded by (seed, step, the batch's smallest
        input id), so a resumed run draws the same negatives. They come from this process's micro-batch
        (BLIP gathers them over GPUs), so with several processes or --grad-accum a retrieval run is not
        the same as a single-process one, unlike the other tasks."""
        if hasattr(model, "itc"):
            with torch.no_grad():
                img, txt = model.itc(inputs, mode="full")
            sim = img.float() @ txt.float().T
        else:
            sim = torch.zeros(len(image_id), len(image_id))  # softmax of zeros: uniform
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 1_000_003 + int(index.min()))
        return itm_negatives(image_id, sim, g)

    def train_batch(self, model, inputs, target, index, step):
        image_id = inputs.pop("image_id")
        neg = self.negatives(model, inputs, image_id, index, step)
        pairs = itm_batch(dict(inputs, target=target, index=index), neg)
        target, index = pairs.pop("target"), pairs.pop("index")
        return pairs, target, index

    def eval_batch(self, batch):
        return itm_batch(batch, itm_negatives(batch["image_id"]))


def output_kind(model) -> str:
    """What the model's task outputs, by its family's contract ("text" for a generative VLM)."""
    from ..backbones import family_of

    return family_of(model).tasks.get(model.config.task, "")


def objective_for(model, dataset: str, cfg, tokenizer=None) -> Objective:
    """The objective of ``model``'s task on ``dataset``; ``tokenizer`` decodes generated answers (text tasks)."""
    if output_kind(model) == "text":
        from .generation import NextToken

        return NextToken(tokenizer, cfg.distill_temperature, cfg.max_new_tokens, vqa_scoring=dataset == "vqa")
    if model.config.task == "retrieval":
        return RetrievalITM(cfg.seed, cfg.distill_temperature)
    return SoftTargetClassification(dataset in ("vqa", "easyvqa"), cfg.distill_temperature)
