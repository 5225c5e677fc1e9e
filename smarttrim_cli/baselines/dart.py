"""DART (Wen et al., 2025, "Stop looking for important tokens ... duplication matters more"): keep pivot tokens
and, for each pivot, the tokens least duplicated with it.

Signal: the projected image features, before the language model. DART itself prunes inside the LM (layer 2) with
4 image + 4 text pivots picked by the L1 norm of that layer's keys, and duplication measured on its hidden states;
with no place inside the wrapped LM, this variant picks ``pivots`` (default 4) image pivots (token 0 excluded)
by the L1 norm of the projected features and measures duplication on them (no text pivots). The remaining
k - 1 - p places are split evenly among the pivots (the first ones take the remainder; DART's per-pivot quota)
and each pivot in turn keeps its quota of not-yet-kept tokens of lowest cosine similarity to it. Token 0 is kept
by the family's rule. Cost (``<key>/dart-similarity``): n * p * d MACs per input (norms: element-wise, 0).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .image_tokens import ImageBaseline, ImagePolicy, per_input


def dart_select(x: torch.Tensor, k: int, pivots: int):
    """(B, n, d) -> (keep (B, n) bool, pivot indices (B, p))."""
    B, n, _ = x.shape
    p = max(0, min(pivots, k - 1))
    kept = torch.zeros(B, n, dtype=torch.bool, device=x.device)
    kept[:, 0] = True
    norm = x.float().abs().sum(-1).masked_fill(kept, float("-inf"))  # L1, as DART ranks its keys
    piv = norm.argsort(dim=1, descending=True, stable=True)[:, :p]
    kept = kept.scatter(1, piv, torch.ones_like(piv, dtype=torch.bool))
    if p == 0:
        return kept, piv
    f = F.normalize(x.float(), dim=-1)
    sim = torch.matmul(f, f.gather(1, piv.unsqueeze(-1).expand(-1, -1, f.shape[-1])).transpose(1, 2))  # (B, n, p)
    rest = k - 1 - p
    for j in range(p):
        q = rest // p + (1 if j < rest % p else 0)
        if q == 0:
            continue
        s = sim[:, :, j].masked_fill(kept, float("inf"))
        j = s.argsort(dim=1, stable=True)[:, :q]
        kept = kept.scatter(1, j, torch.ones_like(j, dtype=torch.bool))
    return kept, piv


class DARTPolicy(ImagePolicy):
    def __init__(self, names, keep_ratio, pivots: int = 4):
        super().__init__(names, keep_ratio)
        self.pivots = int(pivots)

    def select(self, model, s, k, ctx, key):
        n, d = s.x.shape[1], s.x.shape[2]
        p = max(0, min(self.pivots, k - 1))
        per_input(ctx, s, f"{key}/dart-similarity", n * p * d)
        return dart_select(s.x, k, self.pivots)[0]


class DART(ImageBaseline):
    name = "dart"
    kind = "token"
    Policy = DARTPolicy

    def __init__(self, keep_ratio: float = 0.5, layers=None, pivots: int = 4):
        super().__init__(keep_ratio, layers)
        self.pivots = int(pivots)

    def params(self) -> dict:
        return {**super().params(), "pivots": self.pivots}

    def policy_kwargs(self) -> dict:
        return {"pivots": self.pivots}
