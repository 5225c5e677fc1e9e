"""Backbone families on the trimmable core. A family module provides a config class, a model class
and ``from_checkpoint``; the registry maps the ``backbone`` field of a model directory to them."""
from __future__ import annotations

from ..errors import SmartTrimError


def family(name: str):
    if name == "meter":
        from . import meter
        return meter
    raise SmartTrimError(f"unknown backbone family {name!r} (supported: meter)")


def build(name: str, backbone_config: dict, trim_config: dict | None):
    """Rebuild a model (random weights) from the config stored in a model directory."""
    from ..trim.config import TrimConfig

    fam = family(name)
    cfg = fam.MeterConfig.from_dict(backbone_config)
    model = fam.MeterModel(cfg)
    if trim_config is not None:
        model.attach_trimmers(TrimConfig.from_dict(trim_config))
    return model
