"""What a user who installs the wheel gets: the package, and every recipe the repository bundles (an installed
smarttrim without its recipes would train on built-in defaults)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# build outputs and caches of the working copy must not leak into the wheel
_NOT_SOURCE = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                     "smarttrim-out", ".venv")

_CHECK = """
import json, smarttrim_cli
from smarttrim_cli.recipes import bundled_recipe_dir, bundled_recipe_names, load_recipe
from smarttrim_cli.train.config import default_recipe
print(json.dumps({"package": smarttrim_cli.__file__, "dir": str(bundled_recipe_dir()),
                  "names": bundled_recipe_names(),
                  "loaded": [load_recipe(n)["_path"] for n in bundled_recipe_names()],
                  "default": str(default_recipe("vqa", "vqa"))}))
"""


def _run(cmd, **kw):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kw)
    assert r.returncode == 0, f"{cmd}\n{r.stdout}\n{r.stderr}"
    return r.stdout


def test_installed_wheel_finds_every_bundled_recipe(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=_NOT_SOURCE)
    _run([sys.executable, "-m", "pip", "wheel", src, "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "w"])
    (wheel,) = (tmp_path / "w").glob("smarttrim-*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    py = venv / "bin" / "python"
    # The venv sees this environment's packages (torch, pip ...) after its own, also when this environment is
    # itself a venv (where --system-site-packages would show the base interpreter's instead).
    purelib = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())
    outer = [d for d in sys.path if Path(d).name in ("site-packages", "dist-packages") and Path(d).is_dir()]
    (purelib / "outer-env.pth").write_text("".join(f"{d}\n" for d in outer))
    _run([py, "-m", "pip", "install", "--no-deps", "-q", wheel])
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    got = json.loads(_run([py, "-c", _CHECK], cwd=work, env=env))

    installed = Path(got["package"]).resolve()
    assert installed.is_relative_to(venv.resolve()), got["package"]
    recipes = Path(got["dir"]).resolve()
    assert recipes.is_relative_to(venv.resolve()) and recipes.parent == installed.parent, got["dir"]
    assert got["names"] == sorted(p.name for p in (ROOT / "recipes").glob("*.yaml"))
    assert all(Path(p).resolve().parent == recipes for p in got["loaded"])
    assert Path(got["default"]) == recipes / "meter-vqa.yaml"


def test_a_recipe_that_is_neither_a_file_nor_bundled_is_a_one_line_error(tmp_path, monkeypatch):
    from smarttrim_cli.errors import SmartTrimError
    from smarttrim_cli.recipes import load_recipe

    monkeypatch.chdir(tmp_path)  # bundled names resolve from any directory
    assert load_recipe("meter-vqa.yaml")["_path"] == str(ROOT / "recipes" / "meter-vqa.yaml")
    with pytest.raises(SmartTrimError) as e:
        load_recipe("meter-vqa2.yaml")
    assert str(e.value).startswith("meter-vqa2.yaml: recipe not found") and "meter-vqa.yaml" in str(e.value)
    assert "\n" not in str(e.value)
