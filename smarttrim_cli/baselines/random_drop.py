"""Random token dropping: at each pruning position keep ceil(r * n) of the n live tokens, chosen
uniformly at random ([CLS] always kept). Seeded: the same seed gives the same choices for the same
sequence of batches; each forward draws fresh choices."""
from __future__ import annotations

import torch

from .common import RatioBaseline, TokenPolicy, token_positions


class RandomPolicy(TokenPolicy):
    def __init__(self, names, keep_ratio, seed: int = 0):
        super().__init__(names, keep_ratio)
        self.generator = torch.Generator().manual_seed(int(seed))

    def score(self, model, name, s, alive, c, ctx, key):
        return torch.rand(alive.shape, generator=self.generator).to(alive.device)


class RandomDrop(RatioBaseline):
    name = "random"
    kind = "token"

    def __init__(self, keep_ratio: float = 0.5, layers=None, seed: int = 0):
        super().__init__(keep_ratio, layers)
        self.seed = int(seed)

    def params(self) -> dict:
        return {**super().params(), "seed": self.seed}

    def policy(self, model):
        return RandomPolicy(token_positions(model, self.layers), self.keep_ratio, self.seed)
