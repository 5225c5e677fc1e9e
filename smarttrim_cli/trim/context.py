"""Per-forward trimming state: execution mode, threshold, cost records and the decisions taken."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

MODES = ("full", "soft", "hard")


@dataclass
class LayerCost:
    """What one layer computed, enough for the analytic cost model (trim/cost.py).

    ``n``/``m``/``h``/``h2`` are per-instance (B,) tensors: kept queries, kept keys (cross-attention),
    kept self-attention heads, kept cross-attention heads. ``*_full`` are the same without trimming.
    In soft mode they are sums of straight-through masks, so the cost is differentiable.
    """

    name: str
    kind: str
    dims: dict
    n: Any
    n_full: Any
    m: Any = None
    m_full: Any = None
    h: Any = None
    h2: Any = None


@dataclass
class TrimContext:
    mode: str = "full"
    threshold: Any = 0.5          # float or 0-d tensor (a graph input in ONNX)
    tau: float = 1.0              # Gumbel temperature (soft mode, training)
    record: bool = False          # collect LayerCost records
    forced: dict | None = None    # decisions to impose (name -> (B, N_orig) token mask or (B, H) head mask)
    keep_ratio: float | None = None  # fixed-ratio top-k instead of a threshold (baselines)
    # A training-free decision rule used instead of the learned trimmers (hard, or soft in eval): an
    # object with token_step(model, name, stream, c, ctx, key) and head_step(model, name, cls_own,
    # cls_other, ctx, key) (same returns as TrimmableModel's); see smarttrim_cli/baselines/.
    policy: Any = None
    records: list = field(default_factory=list)
    decisions: dict = field(default_factory=dict)
    keep_probs: dict = field(default_factory=dict)
    # soft mode: per token position, the share of its live tokens each input keeps (B,), differentiable
    # (the per-position floor of the training objective acts on it)
    keep_fraction: dict = field(default_factory=dict)
    noise: Any = None             # optional callable(key, logits) -> uniform(0,1) noise (soft mode, training)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")

    def gumbel_noise(self, key: str, logits: torch.Tensor):
        return None if self.noise is None else self.noise(key, logits)

    def add(self, cost: LayerCost):
        if self.record:
            self.records.append(cost)


def count(mask: torch.Tensor) -> torch.Tensor:
    """Per-instance number of kept entries of a (B, N) float/bool mask."""
    return mask.to(torch.float32).sum(1)
