"""What `load` returns (a LoadedModel), and each backbone's readers get the model's own image transform
(config.json `preprocess`)."""
import json

from PIL import Image

import smarttrim_cli
from smarttrim_cli.backbones.base import TrimmableModel
from smarttrim_cli.model_dir import LoadedModel

from tiny_meter import tiny_model_dir


def test_load_returns_the_directory_typed(tmp_path):
    path = tiny_model_dir(tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    got = smarttrim_cli.load(path, mode="soft")
    assert isinstance(got, LoadedModel) and isinstance(got.model, TrimmableModel)
    assert got.model.mode == "soft" and not got.model.training and got.source == path
    assert got.config == cfg and got.labels == cfg["labels"] and got.preprocess == cfg["preprocess"]
    assert got.tokenizer is not None and got.tokenizer("red")["input_ids"]
    assert got.max_text_len == cfg["preprocess"]["max_text_len"]
    # nothing is hung on the module any more: the directory's parts are the LoadedModel's
    assert not any(hasattr(got.model, a) for a in ("tokenizer", "labels", "smarttrim_config", "source_dir"))
    assert smarttrim_cli.load(path).model.mode == "hard"  # the default: inference


def test_in_memory_model_falls_back_on_its_family(tmp_path):
    m = smarttrim_cli.load(tiny_model_dir(tmp_path / "m")).model
    bare = LoadedModel.in_memory(m)
    assert bare.preprocess == {} and bare.image_preprocessor() is None and bare.source is None
    assert bare.max_text_len == m.config.max_text_len
    full = bare.full_preprocess()
    assert full["image_size"] == m.config.image_size and len(full["mean"]) == 3


def test_meter_model_uses_clip_normalisation_with_crop(tmp_path):
    m = smarttrim_cli.load(tiny_model_dir(tmp_path / "m"))
    pre = m.image_preprocessor()
    x = pre(Image.new("RGB", (64, 40), (128, 128, 128)))
    assert x.shape == (3, 32, 32)
    want = (128 / 255 - 0.48145466) / 0.26862954
    assert abs(float(x[0, 0, 0]) - want) < 1e-4


def test_hf_squash_config_uses_its_own_mean_and_no_crop(tmp_path):
    m = smarttrim_cli.load(tiny_model_dir(tmp_path / "m"))
    m.config["preprocess"] = {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "resize": "squash"}
    img = Image.new("RGB", (64, 16), (128, 128, 128))
    img.paste((255, 255, 255), (0, 0, 8, 16))  # a white strip at the left edge survives a squash, not a crop
    x = m.image_preprocessor()(img)
    assert x.shape == (3, 32, 32)
    assert abs(float(x[0, 16, 16]) - (128 / 255 - 0.5) / 0.5) < 1e-2
    assert float(x[0, 16, 0]) > 0.9


def test_readme_python_api_example_runs(tmp_path):
    """The README's Python API block, on a tiny model directory and a real image file."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("### Python API"):]
    code = re.search(r"```python\n(.*?)\n```", section, re.S).group(1)
    path = tiny_model_dir(tmp_path / "m")
    Image.new("RGB", (48, 40), (200, 30, 30)).save(tmp_path / "cat.jpg")
    code = code.replace('"smarttrim-out/model"', repr(str(path))).replace('"cat.jpg"', repr(str(tmp_path / "cat.jpg")))
    ns = {}
    exec(compile(code, "README.md", "exec"), ns)
    assert ns["loaded"].source == path and ns["logits"].shape == (1, len(ns["loaded"].labels))
