"""Backbone families on the trimmable core.

A family module provides ``Config`` (dataclass with to_dict/from_dict), ``Model`` (a
``TrimmableModel``), ``default_trim_config(config)`` and a loader for its original checkpoint format.
The registry maps the ``backbone`` field of a model directory to that module.
"""
from __future__ import annotations

import importlib

from ..errors import SmartTrimError

FAMILIES = {"meter": "smarttrim_cli.backbones.meter", "vilt": "smarttrim_cli.backbones.vilt",
            "blip": "smarttrim_cli.backbones.blip"}


def family(name: str):
    if name not in FAMILIES:
        raise SmartTrimError(f"unknown backbone family {name!r} (supported: {', '.join(FAMILIES)})")
    return importlib.import_module(FAMILIES[name])


def build(name: str, backbone_config: dict, trim_config: dict | None):
    """Rebuild a model (random weights) from the config stored in a model directory."""
    from ..trim.config import TrimConfig

    fam = family(name)
    model = fam.Model(fam.Config.from_dict(backbone_config))
    if trim_config is not None:
        model.attach_trimmers(TrimConfig.from_dict(trim_config))
    return model
