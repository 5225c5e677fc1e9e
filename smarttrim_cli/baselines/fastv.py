"""FastV (Chen et al., ECCV 2024): keep the image tokens the last prompt token attends to most at LM layer K.

Signal: the attention of language-model layer K (1-based; default 2, FastV's K = 2) averaged over heads, the
last prompt token's row (the last real token: padding on either side respected), at the image columns, with
the softmax over the whole (untrimmed) prompt as the layer computes it. Computed explicitly from that layer's
input LayerNorm, q/k projections and rotary embedding (SDPA returns no weights) on the layer's input, captured
by a pre-hook on the untrimmed prompt (the first K - 1 layers run, then the LM stops).

Two passes, since the wrapped model has no place to drop tokens inside its LM: the scoring pass above (``prepare``),
then the hard trimmed run from the start. FastV itself runs the first K layers untrimmed and the rest trimmed.
``cost``: ``run`` (default) records what this implementation computes: the trimmed run (every layer trimmed) plus
the first K layers at full length (``<key>/fastv-first-K-layers``), which over-counts FastV's own cost by the K
layers on the kept tokens; ``fastv`` records FastV's own cost (the overhead row is then K x (full - trimmed)
layers), less than what this two-pass run computes. Neither counts the scoring pass's second vision-tower run.
"""
from __future__ import annotations

import importlib

import torch

from ..errors import SmartTrimError
from ..trim.context import LayerCost, count
from ..trim.cost import layer_macs
from .common import add_overhead
from .image_tokens import ImageBaseline, ImagePolicy, layer_input, top_k, wrapped

COSTS = ("run", "fastv")  # what the cost records count (module docstring)


def fastv_scores(model, batch: dict, K: int = 2):
    """-> (scores (B, N) over the image tokens, per-input MACs of the first K layers at full length (B,))."""
    hf = wrapped(model, "fastv")
    lm = hf.model.language_model
    if not 1 <= K <= len(lm.layers):
        raise SmartTrimError(f"fastv: K must be in 1..{len(lm.layers)} (the language model's layers), got {K}")
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    p = model.prefill(ids, mask, batch["pixel_values"], model.make_context(mode="full"))
    layer = lm.layers[K - 1]
    args, kw = layer_input(layer, lambda: lm(inputs_embeds=p.embeds, attention_mask=p.mask, position_ids=p.pos,
                                             use_cache=False))
    h = layer.input_layernorm(args[0] if args else kw["hidden_states"])
    cos, sin = kw["position_embeddings"]
    a = layer.self_attn
    B, L, _ = h.shape
    dh = a.head_dim
    last = L - 1 - (mask > 0).long().flip(1).argmax(1)  # last real token of each row
    rows = torch.arange(B, device=h.device)
    q = a.q_proj(h[rows, last]).view(B, -1, dh).unsqueeze(2)        # (B, H, 1, dh)
    k = a.k_proj(h).view(B, L, -1, dh).transpose(1, 2)              # (B, KVH, L, dh)
    rot = importlib.import_module(type(a).__module__).rotate_half
    c1, s1 = cos[rows, last][:, None, None], sin[rows, last][:, None, None]
    q = q * c1 + rot(q) * s1
    k = k * cos.unsqueeze(1) + rot(k) * sin.unsqueeze(1)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = torch.matmul(q, k.transpose(2, 3)).squeeze(2).float() * a.scaling    # (B, H, L)
    col = torch.arange(L, device=h.device)
    dead = (mask <= 0) | (col.unsqueeze(0) > last.unsqueeze(1))
    att = s.masked_fill(dead.unsqueeze(1), float("-inf")).softmax(-1).mean(1)  # (B, L)
    is_img = (ids == model.config.image_token_id) & (mask > 0)
    first = torch.where(is_img, col, L).amin(1)
    scores = att.gather(1, first.unsqueeze(1) + torch.arange(model.config.image_tokens, device=h.device))
    return scores, K * decoder_macs(model, count(mask > 0))


def decoder_macs(model, n):
    """MACs of one LM decoder layer over n tokens (per input), as the family records it."""
    t = wrapped(model, "fastv").config.text_config
    dh = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    dims = {"d": t.hidden_size, "dff": t.intermediate_size, "dh": dh, "H": t.num_attention_heads,
            "KVH": t.num_key_value_heads or t.num_attention_heads}
    return layer_macs(LayerCost("fastv", "decoder_layer", dims, n=n, n_full=n, m=n, m_full=n))


class FastVPolicy(ImagePolicy):
    def __init__(self, names, keep_ratio, K: int = 2, cost: str = "run"):
        super().__init__(names, keep_ratio)
        self.K, self.cost = int(K), cost

    def prepare(self, model, batch):
        with torch.no_grad():
            self.scores, self.macs = fastv_scores(model, batch, self.K)
            mask = batch.get("attention_mask")
            self.n = count(torch.ones_like(batch["input_ids"]) if mask is None else mask > 0)

    def select(self, model, s, k, ctx, key):
        scores = self.prepared(s, "scores")
        macs = self.macs
        if self.cost == "fastv":  # FastV's own cost: its first K layers on every token instead of the kept ones
            macs = macs - self.K * decoder_macs(model, self.n - (s.x.shape[1] - k))
        add_overhead(ctx, f"{key}/fastv-first-{self.K}-layers", macs)
        return top_k(scores.gather(1, s.pos), k)


class FastV(ImageBaseline):
    name = "fastv"
    kind = "token"
    Policy = FastVPolicy

    def __init__(self, keep_ratio: float = 0.5, layers=None, K: int = 2, cost: str = "run"):
        super().__init__(keep_ratio, layers)
        if cost not in COSTS:
            raise SmartTrimError(f"fastv: cost must be one of {', '.join(COSTS)}, got {cost!r}")
        self.K, self.cost = int(K), cost

    def params(self) -> dict:
        return {**super().params(), "K": self.K, "cost": self.cost}

    def policy_kwargs(self) -> dict:
        return {"K": self.K, "cost": self.cost}
