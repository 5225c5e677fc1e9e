"""Multi-head attention on explicit weights, with token policies (soft) and head slicing (hard).

One function serves CLIP's fused in-projection and BERT's separate query/key/value: callers pass
weight views. Attention is computed with explicit matmuls (not SDPA) so that fvcore counts it and
so that the full mode follows the original implementations operation by operation.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

NEG = -10000.0  # METER/BERT's additive mask value; exp() of it underflows to exactly 0 in fp32
POLICY_CAP = 5.0  # see policy_softmax


def policy_softmax(scores: torch.Tensor, policy: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Softmax over keys where a key with policy 0 gets no weight, differentiable in the policy.

    A dropped token neither is attended (its weight is ~0) nor changes the others (renormalised);
    the gradient reaches the keep decisions through the product (DynamicViT-style masking).
    """
    p = policy[:, None, None, :].to(scores.dtype)
    # Shift by the max over the KEPT keys ([CLS] always is), not over all keys: then the kept weights
    # sum to >= 1 and eps stays negligible. With the max over all keys, a row whose kept keys all score
    # far below a dropped one had a sum ~0, became eps-dominated and sent gradients of 1/eps = 1e6 to
    # the dropped key's decision (seen as grad norms of 1e5 when training trimmers). A dropped key's
    # exponent is capped at POLICY_CAP above the kept max, bounding that gradient (its forward weight
    # is 0 anyway).
    s = scores.detach()
    top = s.masked_fill(p.detach() <= 0, float("-inf")).amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, s.amax(-1, keepdim=True))  # a row with no key kept
    w = (scores - top).clamp(max=POLICY_CAP).exp() * p
    return (w + eps / w.shape[-1]) / (w.sum(-1, keepdim=True) + eps)


def _heads_rows(w: torch.Tensor, n_heads: int, idx: torch.Tensor) -> torch.Tensor:
    """Keep the rows (output features) of the heads in idx: (H*dh, ...) -> (h*dh, ...)."""
    dh = w.shape[0] // n_heads
    return w.reshape(n_heads, dh, *w.shape[1:]).index_select(0, idx).reshape(-1, *w.shape[1:])


def multi_head_attention(
    xq: torch.Tensor,
    xkv: torch.Tensor,
    wq, bq, wk, bk, wv, bv, wo, bo,
    n_heads: int,
    key_add: torch.Tensor | None = None,
    key_policy: torch.Tensor | None = None,
    head_gate: torch.Tensor | None = None,
    head_idx: torch.Tensor | None = None,
    prescale: bool = False,
) -> torch.Tensor:
    """Attention of xq (B, n, d) over xkv (B, m, d_kv), projected back by wo.

    key_add: (B, m) additive mask (padding); key_policy: (B, m) soft keep mask (soft mode);
    head_gate: (B, h) multiplies each head's output; head_idx: kept heads (hard mode) whose q/k/v
    rows and output-projection columns are sliced out, so dropped heads cost nothing.
    prescale: scale q before the product (CLIP/nn.MultiheadAttention) instead of the scores (BERT).
    """
    B, n, _ = xq.shape
    m = xkv.shape[1]
    dh = wq.shape[0] // n_heads
    if head_idx is not None:
        wq, wk, wv = (_heads_rows(w, n_heads, head_idx) for w in (wq, wk, wv))
        bq, bk, bv = (_heads_rows(b, n_heads, head_idx) for b in (bq, bk, bv))
        wo = wo.reshape(wo.shape[0], n_heads, dh).index_select(1, head_idx).reshape(wo.shape[0], -1)
    h = wq.shape[0] // dh
    q = F.linear(xq, wq, bq).view(B, n, h, dh).transpose(1, 2)
    k = F.linear(xkv, wk, bk).view(B, m, h, dh).transpose(1, 2)
    v = F.linear(xkv, wv, bv).view(B, m, h, dh).transpose(1, 2)
    if prescale:
        scores = torch.matmul(q * (1.0 / math.sqrt(dh)), k.transpose(-1, -2))
    else:
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(dh)
    if key_add is not None:
        scores = scores + key_add[:, None, None, :].to(scores.dtype)
    probs = scores.softmax(-1) if key_policy is None else policy_softmax(scores, key_policy)
    ctx = torch.matmul(probs, v)
    if head_gate is not None:
        ctx = ctx * head_gate[:, :, None, None].to(ctx.dtype)
    ctx = ctx.transpose(1, 2).reshape(B, n, h * dh)
    return F.linear(ctx, wo, bo)


def pad_to_additive(pad: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """(B, m) 1/0 validity mask -> (B, m) additive mask as METER builds it: (1 - m) * -10000."""
    return (1.0 - pad.to(dtype)) * NEG
