"""Binary Gumbel-Softmax (logistic noise) with straight-through gradients, and inference decisions."""
from __future__ import annotations

import torch


def st_keep(logits: torch.Tensor, tau: float, training: bool, threshold=0.5, u=None) -> torch.Tensor:
    """0/1 keep decisions whose gradient is that of the relaxed sample.

    Training: hard sample of the binary Concrete (Gumbel-Softmax over keep/drop, which for two classes
    is a logistic perturbation). Otherwise: deterministic ``sigmoid(logits) > threshold``.
    ``u``: optional uniform(0, 1) noise of logits' shape to use instead of ``torch.rand_like`` (the
    training loop passes per-instance reproducible noise, so runs split across processes match).
    """
    if training:
        u = (torch.rand_like(logits) if u is None else u.to(logits.dtype)).clamp(1e-6, 1 - 1e-6)
        y = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / tau)
        hard = (y > 0.5).to(logits.dtype)
    else:
        y = torch.sigmoid(logits)
        hard = (y > threshold).to(logits.dtype)
    return hard - y.detach() + y
