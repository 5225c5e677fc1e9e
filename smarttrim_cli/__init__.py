"""smarttrim: adaptive per-input token and head trimming (SmartTrim) for vision-language models.

    import smarttrim_cli
    model = smarttrim_cli.load("smarttrim-out/model")   # hard mode, ready for inference
"""
__version__ = "0.1.0"


def load(path=None, mode: str = "hard", device="cpu"):
    """Load a trimmed-model directory written by ``smarttrim attach``/``finetune``."""
    from .model_dir import load as _load

    return _load(path, mode=mode, device=device)


__all__ = ["load", "__version__"]
