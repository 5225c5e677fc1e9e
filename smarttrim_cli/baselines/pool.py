"""Image-token pooling: the image-token grid (G x G) average-pooled to g x g windows, g = round(G * sqrt(r)).

Each window's pooled token is carried at the window's top-left token (its position id; token 0 is the first
window's), so the kept count is exactly g^2 for every input (input-independent, unlike the other rules).
``mode``: ``avg`` (default) replaces that token's state by the window's mean projected feature (the state the
language model sees; the policy rewrites it before the gather); ``stride`` keeps it as it is (strided
subsampling). Windows are those of adaptive pooling (rows i*G//g .. (i+1)*G//g - 1). Cost: sums only (0 MACs by
fvcore's convention). Needs a square grid (a tower without an extra [CLS] feature).
"""
from __future__ import annotations

import math

import torch

from ..errors import SmartTrimError
from .image_tokens import ImageBaseline, ImagePolicy

MODES = ("avg", "stride")


def grid_windows(G: int, g: int) -> torch.Tensor:
    """(G*G,) window index of each grid token, windows numbered row-major; window w's top-left token is its first."""
    edges = [i * G // g for i in range(g + 1)]
    band = torch.tensor([max(i for i in range(g) if edges[i] <= r) for r in range(G)])
    return (band.unsqueeze(1) * g + band.unsqueeze(0)).reshape(-1)


def pooled_side(keep_ratio: float, G: int) -> int:
    return max(1, min(G, round(G * math.sqrt(keep_ratio))))


class PoolPolicy(ImagePolicy):
    def __init__(self, names, keep_ratio, mode: str = "avg"):
        super().__init__(names, keep_ratio)
        self.mode = mode

    def _grid(self, n):
        G = math.isqrt(n)
        if G * G != n:
            raise SmartTrimError(f"pool: {n} image tokens are not a square grid")
        return G

    def select(self, model, s, k, ctx, key):
        G = self._grid(s.x.shape[1])
        win = grid_windows(G, pooled_side(self.keep_ratio, G)).to(s.x.device)
        first = torch.zeros_like(win, dtype=torch.bool)
        first[[int((win == w).nonzero()[0, 0]) for w in range(int(win.max()) + 1)]] = True  # top-left tokens
        self._win = win
        return first.unsqueeze(0).expand(s.x.shape[0], -1)

    def substitute(self, model, s, keep):
        if self.mode != "avg":
            return
        win = self._win
        g2 = int(win.max()) + 1
        B, _, d = s.x.shape
        # index_add (a sum, 0 MACs as fvcore counts it), not a matmul with a one-hot matrix
        total = torch.zeros(B, g2, d, dtype=s.x.dtype, device=s.x.device).index_add(1, win, s.x)
        size = torch.bincount(win, minlength=g2).to(s.x.dtype)
        mean = total / size.unsqueeze(-1)
        s.x = torch.where(keep.unsqueeze(-1), mean[:, win], s.x)


class Pool(ImageBaseline):
    name = "pool"
    kind = "token"
    Policy = PoolPolicy

    def __init__(self, keep_ratio: float = 0.25, layers=None, mode: str = "avg"):
        super().__init__(keep_ratio, layers)
        if mode not in MODES:
            raise SmartTrimError(f"pool: mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode

    def params(self) -> dict:
        return {**super().params(), "mode": self.mode}

    def policy_kwargs(self) -> dict:
        return {"mode": self.mode}
