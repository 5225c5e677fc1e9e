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

``fuse_nearest`` (``TrimConfig.fuse_mode: nearest``) merges each dropped token into whichever is closest
(cosine of the states): the kept token it resembles most, or that catch-all token. A fragment of an object
whose centre was kept joins that object's token, which then stands for the object's whole area, and the
catch-all holds background only; with a single catch-all, object fragments and background share one token.

Soft mode (training) and hard mode (inference) apply the same rule, so hard equals soft given the same
decisions; in soft mode the fused state and sizes are differentiable in the keep
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
    host, fused, total = _catch_all(x, size, alive - kept, logits)
    x = torch.where(host.unsqueeze(-1), fused.unsqueeze(1).to(x.dtype), x)
    size = torch.where(host, total.unsqueeze(1).to(size.dtype), size)
    kept = kept + host.to(x.dtype) * (1 - kept.detach())   # the host's slot is live again (value 1)
    return x, size, kept


def _catch_all(x, size, dropped, logits):
    """-> (host (B, n) bool: the dropped slot the trimmer scored highest, none where nothing was dropped;
    fused (B, d): the size-weighted mean of the dropped tokens; total (B,): original tokens dropped)."""
    w = dropped * size
    total = w.sum(1)
    fused = (w.unsqueeze(-1) * x).sum(1) / total.clamp_min(1.0).unsqueeze(-1)
    score = logits.float().masked_fill(dropped.detach() <= 0.5, float("-inf"))
    ar = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
    host = (ar == score.argmax(1).unsqueeze(1)) & (total.detach() > 0.5).unsqueeze(1)
    return host, fused, total


def size_bias(size: torch.Tensor, dtype) -> torch.Tensor:
    """log(size) as an additive attention-score bias per key (0 for ordinary tokens)."""
    return torch.log(size.clamp_min(1.0)).to(dtype)


def fuse_nearest(x: torch.Tensor, size: torch.Tensor, alive: torch.Tensor, kept: torch.Tensor,
                 logits: torch.Tensor):
    """-> (x, size, kept, macs): each dropped token merged into the candidate whose state is closest to its own
    (cosine): a kept token other than [CLS] (slot 0), or the catch-all token of ``fuse_dropped`` (the mean of
    all dropped tokens, at the dropped slot the trimmer scored highest), which is live only if something
    joined it. Every merge is a size-weighted mean and sizes add, so attention with log(size) stays exact for
    identical tokens. Same arguments as ``fuse_dropped``; ``macs`` (B,) is the per-input cost of the
    similarities and means (the untrimmed model does none of it).
    """
    n, d = x.shape[1], x.shape[2]
    dropped = alive - kept
    host, catch, _ = _catch_all(x, size, dropped, logits)
    ar = torch.arange(n, device=x.device).unsqueeze(0)
    cand_x = torch.where(host.unsqueeze(-1), catch.unsqueeze(1).to(x.dtype), x)
    cand = ((kept.detach() > 0.5) & (ar > 0)) | host
    xn = torch.nn.functional.normalize(x.detach().float(), dim=-1)
    cn = torch.nn.functional.normalize(cand_x.detach().float(), dim=-1)
    sim = torch.matmul(xn, cn.transpose(1, 2)).masked_fill(~cand.unsqueeze(1), float("-inf"))   # (B, n, n)
    to = (sim.argmax(-1).unsqueeze(-1) == ar.unsqueeze(1)).to(x.dtype)              # (B, n, n) one-hot rows
    eye = torch.eye(n, device=x.device, dtype=x.dtype).unsqueeze(0)
    wts = to * (dropped * size).unsqueeze(-1) + eye * (kept * size).unsqueeze(-1)  # row j: where token j goes
    new_size = wts.sum(1)                                                           # (B, n)
    merged = torch.matmul(wts.transpose(1, 2), x) / new_size.clamp_min(1e-6).unsqueeze(-1)
    live = new_size.detach() > 0.5
    x = torch.where(live.unsqueeze(-1), merged.to(x.dtype), x)
    size = torch.where(live, new_size.to(size.dtype), size)
    hostf = (host & live).to(kept.dtype)
    kept = kept + hostf * (1 - kept.detach())
    na = alive.detach().sum(1)
    macs = 2 * na * na * d  # the two (n x n x d) products over the live slots
    return x, size, kept, macs
