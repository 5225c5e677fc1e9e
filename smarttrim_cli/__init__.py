"""smarttrim: adaptive per-input token and head trimming (SmartTrim) for vision-language models.

    import smarttrim_cli
    loaded = smarttrim_cli.load("smarttrim-out/model")  # a LoadedModel: .model (hard mode), .tokenizer, .labels, ...
"""
__version__ = "0.1.0"


def load(path=None, mode: str = "hard", device="cpu"):
    """Load a trimmed-model directory written by ``smarttrim attach``/``finetune``; returns a
    ``model_dir.LoadedModel`` (``model``, ``tokenizer``, ``labels``, ``preprocess``, ``config``, ``source``)."""
    from .model_dir import load as _load

    return _load(path, mode=mode, device=device)


__all__ = ["load", "__version__"]
