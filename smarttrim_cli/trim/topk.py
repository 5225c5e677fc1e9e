"""The fixed-ratio rule: keep the highest-scoring share of each instance's live tokens (EViT's top-k, and the
learned trimmers run at a fixed keep ratio)."""
from __future__ import annotations

import torch

from .context import count


def keep_topk(score: torch.Tensor, alive: torch.Tensor, ratio: float, reserve_cls: bool = True) -> torch.Tensor:
    """(B, n) bool: keep ceil(ratio * live) of each instance's live tokens (at least 1), highest score first.

    ``reserve_cls``: token 0 ([CLS]) takes one of those places whatever its score (the baselines' rule). False:
    it ranks by its score like any token; the learned trimmers' callers then keep it on top of the k."""
    k = torch.ceil(count(alive) * ratio - 1e-6).clamp_min(1)  # float32 makes 0.3 * 50 = 15.000001
    s = score.float().masked_fill(alive <= 0, float("-inf"))
    if reserve_cls:
        s = torch.cat([torch.full_like(s[:, :1], float("inf")), s[:, 1:]], dim=1)
    rank = s.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
    return (rank < k.unsqueeze(1)) & (alive > 0)
