"""Which torch device a ``--device`` option names (finetune, profile)."""
from __future__ import annotations

import re

import torch

from .errors import SmartTrimError


def resolve_device(device: str | None, local_rank: int = 0) -> torch.device:
    """``cpu``; ``cuda`` (this process's GPU: ``cuda:LOCAL_RANK`` under torchrun, else ``cuda:0``); ``cuda:N``;
    ``auto`` or None (CUDA when available, else the CPU)."""
    d = "auto" if device is None else str(device).strip().lower()
    if d in ("", "auto"):
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", d):
        raise SmartTrimError(f"--device must be cpu, cuda, cuda:N or auto, got {device!r}")
    if d.startswith("cuda") and not torch.cuda.is_available():
        raise SmartTrimError(f"--device {device}: CUDA is not available in this torch build "
                             f"({torch.__version__}) or on this machine")
    return torch.device(f"cuda:{local_rank}" if d == "cuda" else d)
