"""The image side of a wrapped decoder VLM (LLaVA) as one ONNX graph: vision tower + projector + token trimmer
(and the trimmers inside the tower, where attached: the model's own ``trim_image``).

Inputs: ``pixel_values`` (1, 3, H, W), ``guide`` (1, D): the masked mean of the prompt's text-token embeddings
(export/image_prefill.prompt_guide, from the LM's embedding table), ``threshold`` (0-d float). Outputs:
``image_embeds`` (1, K, D) the kept projected image features (K per input: TopK + Gather with a data-dependent
size), ``image_positions`` (1, K) int64 their indices in the prompt's image run, ``image_keep`` (1, N) bool.
Batch 1: each input keeps its own count, and the caller rebuilds one prompt per input anyway. The language model
stays in transformers (``generate`` with its KV cache): export/image_prefill.py feeds it these outputs.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

from ..errors import SmartTrimError

PROMPTS = {"question": "what color is the shape in the image ?", "very short prompt": "?",
           "long prompt": "is there a red circle or a blue square in the image and what color is the shape ?"}
UNSUPPORTED = {"quantize": "int8 quantisation of the image graph is not supported yet (its output feeds an LM "
                           "kept in float); export without --quantize"}


def family_graph(model):
    """The graph the model's family asks ``export --onnx`` for (Family.export_graph), None for the default one."""
    from ..backbones import family_of

    spec = family_of(model).export_graph(model)
    if spec is None:
        return None
    spec = dict(spec)
    kind = spec.pop("kind")
    if kind not in GRAPHS:
        raise SmartTrimError(f"{model.family}: export graph {kind!r} is not one this version writes")
    return GRAPHS[kind](model, **spec)


class ImageTrimGraph(nn.Module):
    input_names = ("pixel_values", "guide", "threshold")
    output_names = ("image_embeds", "image_positions", "image_keep")
    kind = "image_side"

    def __init__(self, model, image_token_id: int, image_tokens: int):
        super().__init__()
        self.m = model
        self.image_token_id, self.image_tokens = int(image_token_id), int(image_tokens)
        self.token_layers = [k for k in model.token_trimmers]
        self.head_layers = [k for k in model.head_trimmers]  # LLaVA's tower heads (stream vision), if attached

    def forward(self, pixel_values, guide, threshold):
        ctx = self.m.make_context(mode="hard", threshold=threshold, record=True)
        s = self.m.trim_image(pixel_values, guide, ctx)
        keep = [v for k, v in ctx.decisions.items() if k.startswith("tok:")][-1] > 0.5
        return s.x, s.pos, keep

    def example_args(self, seed: int = 0) -> tuple:
        c = self.m.config
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(1, 3, c.image_size, c.image_size, generator=g),
                torch.randn(1, c.text_hidden, generator=g), torch.tensor(0.5))

    dynamic_shapes = None  # fixed inputs; the kept count K is data-dependent (an unbacked size)
    dynamic_axes = {"image_embeds": {1: "kept"}, "image_positions": {1: "kept"}}

    def metadata(self) -> dict:
        return {"graph": self.kind, "batch": "1", "image_token_id": str(self.image_token_id),
                "image_tokens": str(self.image_tokens),
                "guide": "masked mean (fp32) of the prompt's text-token embeddings, image placeholders and "
                         "padding excluded: smarttrim_cli.export.image_prefill.prompt_guide",
                "serve": "smarttrim_cli.export.image_prefill.generate_from_onnx"}

    def refuse(self, option: str):
        raise SmartTrimError(f"{self.m.family}: {UNSUPPORTED[option]}")

    # ----- validation against PyTorch hard mode ------------------------------------------------------------
    def cases(self, loaded, thresholds=None) -> list:
        """(name, batch, threshold): scene images with prompts of several lengths at each threshold, a very
        short prompt at 0.999 (almost every token dropped) and a question at 0.001 (almost all kept)."""
        from .validate import EXTREME_THRESHOLD, LOW_THRESHOLD, default_thresholds, encode_images, scene_image

        size = int(loaded.full_preprocess()["image_size"])
        thresholds = list(thresholds) if thresholds else default_thresholds(self.m)
        batches = {name: self.prompt_batch(loaded, encode_images(loaded, [scene_image(size, i)]), text)
                   for i, (name, text) in enumerate(PROMPTS.items())}
        out = [(name, b, float(t)) for name, b in batches.items() for t in thresholds]
        out.append(("very short prompt, almost all dropped", batches["very short prompt"], EXTREME_THRESHOLD))
        out.append(("question, almost all kept", batches["question"], LOW_THRESHOLD))
        return out

    def prompt_batch(self, loaded, pixel_values, text: str) -> dict:
        """``<bos> <image> x N text``: the layout the processor writes (batch 1, no padding)."""
        tok = getattr(loaded.tokenizer, "tokenizer", loaded.tokenizer)  # a processor holds its tokenizer
        ids = list(tok(text)["input_ids"]) if tok is not None else [1] + [5] * max(1, len(text.split()))
        ids = ids[:1] + [self.image_token_id] * self.image_tokens + ids[1:]
        t = torch.tensor([ids])
        return {"input_ids": t, "attention_mask": torch.ones_like(t), "pixel_values": pixel_values}

    def reference(self, batch: dict, threshold: float) -> dict:
        """PyTorch hard mode through the model's own prefill: the kept image rows and their indices."""
        ctx = self.m.make_context(mode="hard", threshold=threshold)
        with torch.no_grad():
            p = self.m.prefill(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], ctx, pack=True)
        ids = batch["input_ids"][0]
        first = int((ids == self.image_token_id).nonzero()[0, 0])
        cols = p.cols[0]
        img = ids[cols] == self.image_token_id
        return {"image_embeds": p.embeds[0, img].float().numpy(), "image_positions": (cols[img] - first).numpy()}

    def validate(self, sess, loaded, thresholds=None, atol: float = 1e-4):
        from .image_prefill import run_graph
        from .validate import CaseResult, OutputCheck, ValidationReport, _first_line

        rep = ValidationReport(atol=atol)
        names = [o.name for o in sess.get_outputs()]
        missing = [n for n in self.output_names if n not in names]
        rep.checks.append(OutputCheck("output names", not missing, ", ".join(names), "exact"))
        if missing:
            return rep
        worst, same, errors, cases = 0.0, 0, [], self.cases(loaded, thresholds)
        for name, b, thr in cases:
            ref = self.reference(b, thr)
            try:
                got = run_graph(sess, b["pixel_values"], self.m.prompt_guide(b["input_ids"]).detach(), thr)
            except Exception as e:
                errors.append(f"{name}: {_first_line(e)}")
                continue
            pos = got["image_positions"].reshape(-1)
            eq = np.array_equal(pos, ref["image_positions"])
            diff = float(np.max(np.abs(got["image_embeds"][0].astype(np.float64) - ref["image_embeds"]))) \
                if eq and pos.size else (0.0 if eq else math.inf)
            same += eq
            worst = max(worst, diff)
            rep.cases.append(CaseResult(name, 1, int(b["input_ids"].shape[1]), thr, diff, eq, True, int(pos.size),
                                        self.image_tokens, [len(ref["image_positions"])]))
        n = len(cases)
        what = f"onnxruntime failed on {len(errors)}/{n} inputs ({errors[0]})" if errors else \
            f"max |onnxruntime - PyTorch hard| = {worst:.2e} over {n} inputs"
        rep.checks.append(OutputCheck("image_embeds", not errors and worst <= atol, what, f"atol {atol:g}"))
        rep.checks.append(OutputCheck("image_positions", not errors and same == n,
                                      f"same kept set on {same}/{n} inputs", "exact"))
        return rep


GRAPHS = {ImageTrimGraph.kind: ImageTrimGraph}
