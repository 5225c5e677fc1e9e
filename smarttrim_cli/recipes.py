"""YAML recipes: where trimmers go (``trim:``) and training settings (``train:``), per backbone and task."""
from __future__ import annotations

from pathlib import Path

import yaml

from .errors import SmartTrimError

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"


def load_recipe(path) -> dict:
    p = Path(path)
    if not p.is_file() and (RECIPE_DIR / p.name).is_file():
        p = RECIPE_DIR / p.name  # `--recipe meter-vqa.yaml` works from any directory of a source checkout
    if not p.is_file():
        raise SmartTrimError(f"{path}: recipe not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise SmartTrimError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise SmartTrimError(f"{p}: a recipe is a YAML mapping with `trim:` and/or `train:` sections")
    unknown = set(data) - {"backbone", "task", "description", "trim", "train", "data"}
    if unknown:
        raise SmartTrimError(f"{p}: unknown section(s) {sorted(unknown)}")
    data["_path"] = str(p)
    return data
