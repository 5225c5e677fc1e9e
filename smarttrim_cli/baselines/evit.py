"""EViT-style attention top-k (Liang et al., 2022): at each pruning position keep the ceil(r * n)
live tokens that the [CLS] token attends to most (attention averaged over heads), optionally fusing
the dropped ones into one extra token (EViT's "inattentive token fusion").

The attention is that of the layer about to run (the pruning happens before it), computed from the
layer's own q/k weights as q·(W_k x) = (W_kᵀ q)·x, which costs about 2·d² + n·d·H MACs per position
instead of re-projecting every key; it is recorded in the cost model (``<key>/evit-scores``).

``guide``:
- ``cls``: the stream's own [CLS] query (EViT);
- ``text_cls``: for the cross-modal image stream, the text [CLS]'s cross-attention to the image
  tokens (the text co-attention layer's cross-attention weights; its query is the text [CLS] state
  entering the layer, where the real query comes after the self-attention sub-layer);
- ``text``: the same, averaged over every live text token.
Positions other than the cross-modal image stream always use ``cls``.

Fusion (hard mode only): the dropped tokens' states, weighted by their attention, are averaged into
one token carried at the position of the most-attended dropped token (so decisions and overlays
show it there); later positions treat it as an ordinary token, as EViT does.
"""
from __future__ import annotations

import torch

from ..errors import SmartTrimError
from .common import (RatioBaseline, TokenPolicy, add_overhead, attention_weights, query_key_attention,
                     token_positions)

GUIDES = ("cls", "text_cls", "text")


class EViTPolicy(TokenPolicy):
    def __init__(self, names, keep_ratio, guide: str = "cls", fuse: bool = False, merge: bool = False):
        super().__init__(names, keep_ratio, merge)
        self.guide, self.fuse_tokens = guide, fuse
        self.soft_ok = not fuse
        self._text = {}

    def observe(self, model, name, s, c, ctx, key):
        if name.startswith("xtext_"):  # the text stream as it enters co-attention layer i (forward order)
            self._text[key.replace("xtext_", "ximage_")] = s

    def score(self, model, name, s, alive, c, ctx, key):
        stream = name.rsplit("_", 1)[0]
        if stream == "ximage" and self.guide != "cls":
            w = attention_weights(model, name.replace("ximage_", "xtext_"), "cross")
            t = self._text.get(key) if self.guide == "text" else None
            if t is not None:
                q, qa = t.x, (t.soft_keep if ctx.mode == "soft" else t.valid)
            else:
                q = c.unsqueeze(1)
                qa = torch.ones(q.shape[0], 1, device=q.device)
            att, macs = query_key_attention(q, qa, s.x, alive, w)
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
