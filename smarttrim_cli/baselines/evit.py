"""EViT-style attention top-k (Liang et al., 2022): at each pruning position keep the ceil(r * n)
live tokens that the [CLS] token attends to most (attention averaged over heads), optionally fusing
the dropped ones into one extra token (EViT's "inattentive token fusion").

The attention is that of the layer about to run (the pruning happens before it), computed from the
layer's own q/k weights as q·(W_k x) = (W_kᵀ q)·x, which costs about 2·d² + n·d·H MACs per position
instead of re-projecting every key; it is recorded in the cost model (``<key>/evit-scores``).

``guide``:
- ``cls``: the stream's own [CLS] query (EViT);
- ``text_cls``: for a stream another one reads (``StreamSpec.read_by``: the image tokens the text
  reads), the text [CLS]'s attention to those tokens through the reader's attention weights (METER,
  BLIP: the text layer's cross-attention; ViLT: the joint self-attention, softmax over the image keys
  alone); its query is the text [CLS] state entering the layer (in a co-attention layer the real query
  comes after the self-attention sub-layer);
- ``text``: the same, averaged over every live text token.
Positions of streams nobody reads always use ``cls``; streams whose tokens do not attend among
themselves (BLIP's image tokens in the text encoder) always use the text-guided score.

Fusion (hard mode only): the dropped tokens' states, weighted by their attention, are averaged into
one token carried at the position of the most-attended dropped token (so decisions and overlays
show it there); later positions treat it as an ordinary token, as EViT does.
"""
from __future__ import annotations

import torch

from ..errors import SmartTrimError
from ..trim.context import count
from .common import (RatioBaseline, TokenPolicy, add_overhead, attention_weights, query_key_attention,
                     reader_position, token_positions)

GUIDES = ("cls", "text_cls", "text")


class EViTPolicy(TokenPolicy):
    def __init__(self, names, keep_ratio, guide: str = "cls", fuse: bool = False, merge: bool = False):
        super().__init__(names, keep_ratio, merge)
        self.guide, self.fuse_tokens = guide, fuse
        self.soft_ok = not fuse
        self._readers = {}

    def observe(self, model, name, s, c, ctx, key):
        # a reading stream (the text) as it enters layer i, before the stream it reads: kept for ``text``
        stream, i = name.rsplit("_", 1)
        for other, sp in model.streams.items():
            if sp.read_by == stream:
                self._readers[key[:len(key) - len(name)] + f"{other}_{i}"] = s

    def score(self, model, name, s, alive, c, ctx, key):
        reader = reader_position(model, name)
        own = model.streams[name.rsplit("_", 1)[0]].self_attention
        if reader is not None and (self.guide != "cls" or not own):
            w = attention_weights(model, reader, "cross")
            t = self._readers.get(key) if self.guide == "text" else None
            if t is not None:
                q, qa = t.x, (t.soft_keep if ctx.mode == "soft" else t.valid)
            else:
                q = c.unsqueeze(1)
                qa = torch.ones(q.shape[0], 1, device=q.device)
            h = s.x
            if w.ln is not None:  # a pre-LN layer reads normalised states (ViLT's joint attention)
                q, h = w.ln(q), w.ln(s.x)
            att, macs = query_key_attention(q, qa, h, alive, w)
            if w.ln is not None:
                macs = macs + 5 * h.shape[-1] * ((alive > 0).sum(1) + count(qa))
        else:
            w = attention_weights(model, name, "self")
            h = s.x if w.ln is None else w.ln(s.x)
            att, macs = query_key_attention(h[:, :1], torch.ones_like(alive[:, :1]), h, alive, w)
            if w.ln is not None:
                macs = macs + 5 * h.shape[-1] * (alive > 0).sum(1)
        add_overhead(ctx, f"{key}/evit-scores", macs)
        return att

    def fuse(self, model, name, s, keep, score, ctx):
        if not self.fuse_tokens:
            return keep
        dropped = (s.valid > 0) & ~keep
        w = (score.float() + 1e-12) * dropped  # + eps: a uniform average if every weight underflowed
        has = dropped.any(1, keepdim=True)
        host = torch.nn.functional.one_hot(w.masked_fill(~dropped, -1.0).argmax(1), keep.shape[1]).bool() & has
        wsum = w.sum(1, keepdim=True).clamp_min(1e-12)
        fused = ((s.x.float() * w.unsqueeze(-1)).sum(1, keepdim=True) / wsum.unsqueeze(-1)).to(s.x.dtype)
        s.x = torch.where(host.unsqueeze(-1), fused, s.x)
        return keep | host


class EViT(RatioBaseline):
    name = "evit"
    kind = "token"

    def __init__(self, keep_ratio: float = 0.5, layers=None, guide: str = "cls", fuse: bool = False,
                 merge: bool = False):
        super().__init__(keep_ratio, layers)
        if guide not in GUIDES:
            raise SmartTrimError(f"evit: guide must be one of {', '.join(GUIDES)}, got {guide!r}")
        self.guide, self.fuse = guide, bool(fuse)
        self.merge = bool(merge)  # the learned trimmers' token fusion (TokenPolicy), not EViT's own ``fuse``
        if fuse:
            self.name = "evit-fusion"

    def params(self) -> dict:
        return {**super().params(), "guide": self.guide, "fuse": self.fuse, "merge": self.merge}

    def policy(self, model):
        return EViTPolicy(token_positions(model, self.layers), self.keep_ratio, self.guide, self.fuse, self.merge)
