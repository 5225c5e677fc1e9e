"""Physically remove dropped tokens (hard mode); batches are padded to their largest kept count."""
from __future__ import annotations

import torch


def kept_order(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices that put each row's kept tokens first, in their original order; and the kept count K.

    Uses top-k on ``keep * 2n - position`` rather than ``nonzero`` so that a batch is handled at once
    and an ONNX export keeps a data-dependent TopK + Gather.
    """
    n = keep.shape[1]
    pos = torch.arange(n, device=keep.device, dtype=torch.float32)
    key = keep.to(torch.float32) * (2 * n) - pos
    k = keep.sum(1).max()
    if torch.jit.is_tracing():
        k_arg = k  # the legacy exporter freezes int(k); a tensor stays dynamic
    elif torch.compiler.is_compiling():
        k_arg = k.item()
        torch._check(k_arg >= 1)
        torch._check(k_arg <= n)
    else:
        k_arg = int(k)
    idx = key.topk(k_arg, dim=1, sorted=True).indices
    return idx, k


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x: (B, N, D) or (B, N); idx: (B, K) -> (B, K, D) or (B, K)."""
    if x.dim() == 2:
        return x.gather(1, idx)
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
