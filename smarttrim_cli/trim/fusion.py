"""Dropped-token fusion with proportional attention (``TrimConfig.fuse``).

A token trimmer that drops tokens also removes their share of every later softmax: with the background
gone, the attention an object receives no longer says how much of the image it is, and what the model
read from those proportions (counting, above all) is lost. Measured on the scenes set: a fine-tuned
trimmed model kept the full model's accuracy on colour and relation questions and fell from 76% to 34% on
"how many" questions, and trimmed weights did no better at full capacity (BENCHMARKS.md section 7).

Fusion keeps one token for what was dropped: the size-weighted mean of the dropped tokens' states, with
size = how many original tokens it stands for, and every later attention adds log(size) to that key's
score (ToMe's proportional attention; EViT fuses the same way without the size term). If the dropped
tokens were identical, attention over the kept tokens plus the fused one equals attention over all of
them exactly; for a textured background it stays close. The fused token sits at the position of the
dropped token the trimmer scored highest, is processed like any kept token, costs one token, and may be
dropped (and fused again, sizes adding up) by a later trimmer.

Soft mode (training) and hard mode (inference) apply the same rule, so hard equals soft given the same
decisions (DESIGN.md invariant 3); in soft mode the fused state and sizes are differentiable in the keep
mask (the weights of the mean are the straight-through drop decisions).
"""
from __future__ import annotations

import torch


def fuse_dropped(x: torch.Tensor, size: torch.Tensor, alive: torch.Tensor, kept: torch.Tensor,
                 logits: torch.Tensor):
    """-> (x, size, kept) with each row's dropped tokens merged into one of them (the host).

    x (B, n, d) states; size (B, n) tokens each slot stands for; alive (B, n) live before this trimmer;
    kept (B, n) live after it (float masks; soft mode: straight-through values); logits (B, n) the
    trimmer's keep logits, which pick the host among the dropped tokens. A row that dropped nothing is
    unchanged.
    """
    dropped = alive - kept                                   # 1 where this trimmer dropped a live token
    w = dropped * size
    total = w.sum(1)                                         # (B,) original tokens merged
    fused = (w.unsqueeze(-1) * x).sum(1) / total.clamp_min(1.0).unsqueeze(-1)
    n = x.shape[1]
    score = logits.float().masked_fill(dropped.detach() <= 0.5, float("-inf"))
    pick = score.argmax(1)
    host = (torch.arange(n, device=x.device).unsqueeze(0) == pick.unsqueeze(1)) & (total.detach() > 0.5).unsqueeze(1)
    hostf = host.to(x.dtype)
    x = torch.where(host.unsqueeze(-1), fused.unsqueeze(1).to(x.dtype), x)
    size = torch.where(host, total.unsqueeze(1).to(size.dtype), size)
    kept = kept + hostf * (1 - kept.detach())               # the host's slot is live again (value 1)
    return x, size, kept


def size_bias(size: torch.Tensor, dtype) -> torch.Tensor:
    """log(size) as an additive attention-score bias per key (0 for ordinary tokens)."""
    return torch.log(size.clamp_min(1.0)).to(dtype)
