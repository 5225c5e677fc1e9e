"""``smarttrim compare`` for models whose output kind is ``text`` (decoder VLMs, e.g. LLaVA): the inputs and the
per-method scoring; the comparison itself is compare.compare_models, as for classifiers (compare_runner.py
dispatches on the output kind).

Each input alone (batch 1: its prompt unpadded, as ``profile`` reads it): a method's prefill forward gives its
cost (cost model, fvcore's convention) and the image tokens it kept; its greedy ``generate`` gives the answer,
scored as the VQA score against the item's answers. Prompts, decoding and scoring are profiling/generation.py's.
The baselines are calibrated on the held-apart inputs, also one by one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch

from ..backbones import family_of
from ..backbones.base import image_streams
from ..errors import SmartTrimError
from ..trim.cost import total_macs
from . import compare as cmp
from . import generation as gn
from . import objects as obj


def is_text(model) -> bool:
    """Whether the model's task gives text (backbones/base.py OUTPUT_KINDS), whatever its family."""
    return family_of(model).tasks.get(model.config.task) == "text"


def check_options(s) -> None:
    """Options that only mean something for classifier heads: one-line errors (exit 2)."""
    if s.batch_size is not None:
        raise SmartTrimError("--batch-size: not available for a text-generating model (classification heads only; "
                             "each prompt is evaluated alone, unpadded)")
    if int(s.max_new_tokens or 16) < 1:
        raise SmartTrimError(f"--max-new-tokens must be >= 1, got {s.max_new_tokens}")


@dataclass
class TextEvalSet(cmp.EvalSet):
    """``EvalSet`` of batch-1 prompts whose ``evaluate`` scores the method's generated answers."""

    answers: list = field(default_factory=list)
    processor: object = None
    max_new_tokens: int = 16

    @classmethod
    def build_text(cls, loaded, ds, collate, processor, start: int, n: int, max_new_tokens: int,
                   need_answers: bool = True) -> "TextEvalSet":
        from .runner import _item_id

        m = loaded.model
        keep = set(m.input_names)
        index = obj.SceneIndex.for_dataset(ds)
        items = [ds[i] for i in range(start, start + n)]
        answers = [list(it.get("answers") or []) for it in items]
        if need_answers and not all(answers):
            i = start + next(j for j, a in enumerate(answers) if not a)
            raise SmartTrimError(f"input {i} has no answers: compare scores generated answers against them")
        ids = [_item_id(it) for it in items]
        return cls([{k: v for k, v in collate([it]).items() if k in keep} for it in items], ids,
                   [index.objects(q) if index is not None else None for q in ids],
                   int(family_of(m).image_tokens(m.config)), str(index.path) if index is not None else None,
                   kinds=[index.kind(q) if index is not None else None for q in ids],
                   indices=list(range(start, start + n)), image_streams=image_streams(m), answers=answers,
                   processor=processor, max_new_tokens=int(max_new_tokens))

    def evaluate(self, name: str, run, per_input: bool = False, gen=None, **info) -> dict:
        """``run(batch) -> (logits, ctx)``: the prefill forward (cost, kept tokens); ``gen(batch, **kw)``: its
        ``generate`` (the answer). Row as EvalSet's; ``per_input`` also holds the answers (``text``)."""
        from ..metrics import generated_vqa_score

        if gen is None:
            raise SmartTrimError(f"{name}: a text model's method needs its generate")
        scores, macs, toks, texts = [], [], [], []
        with torch.no_grad():
            for b, ans in zip(self.batches, self.answers):
                _, ctx = run(b)
                macs.append(float(torch.as_tensor(total_macs(ctx.records), dtype=torch.float64).reshape(-1)[0]))
                t = cmp.image_tokens_final(ctx, self.image_streams)
                toks.append(float(t[0]) if t is not None else float(info.get("image_tokens", self.n_image_tokens)))
                texts.append(gn.answer_text(self.processor, gen(b, max_new_tokens=self.max_new_tokens,
                                                                do_sample=False)))
                scores.append(generated_vqa_score(texts[-1], ans))
        s, g, t = np.asarray(scores, dtype=np.float64), np.asarray(macs) / 1e9, np.asarray(toks)
        row = cmp.summarize(name, s, g, t, self.objects, self.full_gmacs or None, self.n_image_tokens,
                            kinds=self.kinds, **info)
        if per_input:
            row["per_input"] = {"score": s.tolist(), "gmacs": g.tolist(), "image_tokens": t.tolist(), "text": texts}
        return row


def split_inputs(s, loaded, total):
    """(dataset name, split, dataset, evaluated set, calibration set) under compare's split rule (the first
    ``limit`` inputs evaluated, the next ``calib_limit`` held apart to calibrate on)."""
    name, split, ds = gn.open_split(SimpleNamespace(dataset=s.dataset, data_dir=s.data_dir, split=s.split,
                                                    limit=total, skip_bad=s.skip_bad), loaded)
    processor, collate, _ = gn.prompt_inputs(loaded, name)
    limit = s.limit if s.limit is not None else max(len(ds) - int(s.calib_limit), 0)
    n, start, m = cmp.split_positions(len(ds), limit, s.calib_limit)
    n_new = int(s.max_new_tokens or 16)
    ev = TextEvalSet.build_text(loaded, ds, collate, processor, 0, n, n_new)
    cal = TextEvalSet.build_text(loaded, ds, collate, processor, start, m, n_new, need_answers=False)
    return name, split, ds, ev, cal
