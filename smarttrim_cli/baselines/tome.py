"""ToMe-style token merging (Bolya et al., 2023), training-free: at each pruning position merge the
live tokens down to ceil(r * n) by bipartite soft matching.

One round: alternate the live tokens into sets A (even slots) and B (odd slots); match every A token
to its most similar B token (cosine similarity of ``metric``: the states ``x``, or the keys ``k`` of
the attention the tokens enter next); merge the most similar A tokens into their matches by size-weighted
averaging. [CLS] (slot 0, in A) is never merged. A round merges at most |A| - 1 tokens, so a keep
ratio below 1/2 takes several rounds at the same position (each one recomputes the similarities).

Token sizes (how many original tokens each one stands for) are carried through the forward; with
``prop_attn`` (default on, as ToMe does for off-the-shelf models) attention adds log(size) to the
keys' scores (``Stream.key_bias``), in self- and cross-attention alike. The similarity products
(and, for ``metric="k"``, the key projection) are recorded in the cost model
(``<key>/tome-similarity``); the merges themselves are gathers and sums (0 MACs by convention).
Hard mode only: merging changes token states, which soft masks cannot express.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import SmartTrimError
from ..trim.context import count
from ..trim.gather import gather_rows, kept_order
from .common import Policy, RatioBaseline, add_overhead, key_weights, record_tokens, token_positions

METRICS = ("x", "k")


def _merge_round(x, metric, size, live, remaining):
    """One bipartite matching round over (B, n) slots. -> (x, metric, size, keep mask, merged (B,),
    per-instance similarity MACs)."""
    B, n, _ = x.shape
    ia = torch.arange(0, n, 2, device=x.device)
    ib = torch.arange(1, n, 2, device=x.device)
    la, lb = live[:, ia], live[:, ib]
    mn = F.normalize(metric.float(), dim=-1)
    sim = torch.matmul(mn[:, ia], mn[:, ib].transpose(1, 2))           # (B, nA, nB)
    sim = sim.masked_fill(~lb[:, None, :], float("-inf"))
    best, match = sim.max(-1)                                          # (B, nA)
    can = la & lb.any(1, keepdim=True)
    can = torch.cat([torch.zeros_like(can[:, :1]), can[:, 1:]], dim=1)  # [CLS] (slot 0) is never merged
    best = best.masked_fill(~can, float("-inf"))
    r = torch.minimum(remaining, can.sum(1))
    rank = best.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
    src = (rank < r.unsqueeze(1)) & can                                # A tokens merged this round
    dst = ib[match]                                                    # (B, nA) their slots in B
    w = size[:, ia] * src
    feats = torch.cat([x.float(), metric.float()], dim=-1) * size.unsqueeze(-1)
    acc = torch.zeros_like(feats).scatter_add(1, dst.unsqueeze(-1).expand(-1, -1, feats.shape[-1]),
                                              feats[:, ia] * src.unsqueeze(-1))
    acc_size = torch.zeros_like(size).scatter_add(1, dst, w)
    new_size = size + acc_size
    recv = (acc_size > 0).unsqueeze(-1)
    merged = (feats + acc) / new_size.unsqueeze(-1)
    d = x.shape[-1]
    x = torch.where(recv, merged[..., :d].to(x.dtype), x)
    metric = torch.where(recv, merged[..., d:].to(metric.dtype), metric)
    gone = torch.zeros_like(live).scatter(1, ia.unsqueeze(0).expand(B, -1), src)
    macs = count(la) * count(lb) * mn.shape[-1]
    return x, metric, new_size, live & ~gone, r, macs


class ToMePolicy(Policy):
    def __init__(self, names, keep_ratio, metric: str = "x", prop_attn: bool = True):
        self.names, self.keep_ratio = set(names), float(keep_ratio)
        self.metric, self.prop_attn = metric, prop_attn

    def token_step(self, model, name, s, c, ctx, key):
        if name not in self.names or self.keep_ratio >= 1.0:
            return
        if ctx.mode != "hard":
            raise SmartTrimError("tome: token merging changes token states; run it in hard mode")
        size = getattr(s, "tome_size", None)
        if size is None:
            size = torch.ones_like(s.valid, dtype=torch.float32)
        live = s.valid > 0
        n_live = count(live)
        target = torch.ceil(n_live * self.keep_ratio - 1e-6).clamp_min(1)
        remaining = (n_live - target).clamp_min(0).long()
        if self.metric == "k":
            w = key_weights(model, name)
            h = s.x if w.ln is None else w.ln(s.x)
            metric = F.linear(h, w.wk, w.bk)
            macs = n_live * h.shape[-1] * w.wk.shape[0]
            if w.ln is not None:
                macs = macs + 5 * n_live * h.shape[-1]
        else:
            metric, macs = s.x, torch.zeros_like(n_live)
        x = s.x
        while bool((remaining > 0).any()):
            x, metric, size, live, merged, m = _merge_round(x, metric, size, live, remaining)
            macs = macs + m * (remaining > 0)
            stuck = merged == 0  # nothing left to merge (e.g. [CLS] and one token): stop there
            remaining = torch.where(stuck, torch.zeros_like(remaining), remaining - merged)
            s.x = x
            if bool(stuck.all()):
                break
            idx = kept_order(live)[0]
            s._gather(live)  # merged A tokens leave; the next round re-alternates the survivors
            size, metric = gather_rows(size, idx), gather_rows(metric, idx)
            x, live = s.x, s.valid > 0
        s.tome_size = size
        if self.prop_attn:
            s.key_bias = size.clamp_min(1.0).log()
        add_overhead(ctx, f"{key}/tome-similarity", macs)
        record_tokens(s, ctx, key)


class ToMe(RatioBaseline):
    name = "tome"
    kind = "token"

    def __init__(self, keep_ratio: float = 0.5, layers=None, metric: str = "x", prop_attn: bool = True):
        super().__init__(keep_ratio, layers)
        if metric not in METRICS:
            raise SmartTrimError(f"tome: metric must be one of {', '.join(METRICS)}, got {metric!r}")
        self.metric, self.prop_attn = metric, bool(prop_attn)

    def params(self) -> dict:
        return {**super().params(), "metric": self.metric, "prop_attn": self.prop_attn}

    def policy(self, model):
        return ToMePolicy(token_positions(model, self.layers), self.keep_ratio, self.metric, self.prop_attn)
