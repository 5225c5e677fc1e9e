"""YAML recipes: where trimmers go (``trim:``) and training settings (``train:``), per backbone and task.

The bundled recipes are the repository's top-level ``recipes/`` folder. A wheel carries them as package data,
``smarttrim_cli/recipe_files/`` (setup.py maps the folder there); a source checkout (an editable install, or a
run from the clone) reads ``recipes/`` beside the package. An installation with neither is broken, and says so
rather than training on built-in defaults."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml

from .errors import SmartTrimError


def bundled_recipe_dir() -> Path:
    """The folder holding the bundled recipes; SmartTrimError when this installation has none."""
    packaged = Path(str(resources.files(__package__) / "recipe_files"))
    checkout = Path(__file__).resolve().parent.parent
    # the folder beside the package counts only in a source checkout (site-packages/recipes is someone else's)
    for d in (packaged, checkout / "recipes" if (checkout / "pyproject.toml").is_file() else None):
        if d is not None and d.is_dir() and any(d.glob("*.yaml")):
            return d
    raise SmartTrimError(f"{packaged}: smarttrim's bundled recipes are missing (not in the package, and "
                         f"{checkout} is not a source checkout with recipes/): reinstall smarttrim")


def bundled_recipe_names() -> list[str]:
    return sorted(p.name for p in bundled_recipe_dir().glob("*.yaml"))


def load_recipe(path) -> dict:
    """A recipe file, or a bundled recipe by name (``--recipe meter-vqa.yaml`` works from any directory)."""
    p = Path(path)
    if not p.is_file():
        bundled = bundled_recipe_dir() / p.name
        if not bundled.is_file():
            raise SmartTrimError(f"{path}: recipe not found (not a file, nor a bundled recipe: "
                                 f"{', '.join(bundled_recipe_names())})")
        p = bundled
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
