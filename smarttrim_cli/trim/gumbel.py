"""Binary Gumbel-Softmax (logistic noise) with straight-through gradients, and inference decisions."""
from __future__ import annotations

import torch


def above_threshold(logits: torch.Tensor, threshold) -> torch.Tensor:
    """``sigmoid(logits) > threshold``, decided in logit space: ``logits > log(t) - log(1 - t)``.

    The same decision (sigmoid is monotone), but it stays exact near 0 and 1 in every runtime:
    onnxruntime's Sigmoid has an absolute error of ~1.3e-7 (relative error > 1% below p = 1e-5,
    measured with onnxruntime 1.32), so an exported graph compared probabilities with thresholds below
    ~1e-3 differently from PyTorch. ``threshold`` may be a float or a 0-d tensor (an ONNX graph input).
    """
    t = threshold if torch.is_tensor(threshold) else torch.tensor(float(threshold))
    t = t.to(device=logits.device, dtype=torch.float32)
    return logits.to(torch.float32) > torch.log(t) - torch.log(1 - t)


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
        hard = above_threshold(logits, threshold).to(logits.dtype)
    return hard - y.detach() + y
