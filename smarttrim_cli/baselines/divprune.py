"""DivPrune (Alvar et al., CVPR 2025): keep the most diverse image tokens, a greedy max-min diversity selection.

Signal: the projected image features (what enters the language model); distance = 1 - cosine similarity.
Rule: the kept set starts with token 0 (which the family keeps anyway; DivPrune itself starts from the token
whose nearest neighbour is farthest), then repeatedly adds the token whose distance to its nearest kept token is
largest, until k tokens are kept. Cost (recorded as ``<key>/divprune-distances``): the n x n similarity matrix,
n^2 * d MACs per input; normalisation and the greedy loop are element-wise (0 by fvcore's convention).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .image_tokens import ImageBaseline, ImagePolicy, per_input


def cosine_distances(x: torch.Tensor) -> torch.Tensor:
    f = F.normalize(x.float(), dim=-1)
    return 1.0 - torch.matmul(f, f.transpose(1, 2))


def max_min_select(dist: torch.Tensor, k: int) -> torch.Tensor:
    """(B, n, n) distances -> (B, n) bool: greedy max-min from {0}; the earliest token wins a tie."""
    B, n, _ = dist.shape
    kept = torch.zeros(B, n, dtype=torch.bool, device=dist.device)
    kept[:, 0] = True
    nearest = dist[:, 0].clone()  # each token's distance to its nearest kept token
    rows = torch.arange(B, device=dist.device)
    for _ in range(k - 1):
        j = nearest.masked_fill(kept, float("-inf")).argmax(1)
        kept[rows, j] = True
        nearest = torch.minimum(nearest, dist[rows, j])
    return kept


class DivPrunePolicy(ImagePolicy):
    def select(self, model, s, k, ctx, key):
        n, d = s.x.shape[1], s.x.shape[2]
        per_input(ctx, s, f"{key}/divprune-distances", n * n * d)
        return max_min_select(cosine_distances(s.x), k)


class DivPrune(ImageBaseline):
    name = "divprune"
    kind = "token"
    Policy = DivPrunePolicy
