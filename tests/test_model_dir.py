"""Each backbone's readers get the model's own image transform (config.json `preprocess`)."""
import torch
from PIL import Image

import smarttrim_cli
from smarttrim_cli.model_dir import image_preprocessor

from tiny_meter import tiny_model_dir


def test_meter_model_uses_clip_normalisation_with_crop(tmp_path):
    m = smarttrim_cli.load(tiny_model_dir(tmp_path / "m"))
    pre = image_preprocessor(m)
    x = pre(Image.new("RGB", (64, 40), (128, 128, 128)))
    assert x.shape == (3, 32, 32)
    want = (128 / 255 - 0.48145466) / 0.26862954
    assert abs(float(x[0, 0, 0]) - want) < 1e-4


def test_hf_squash_config_uses_its_own_mean_and_no_crop(tmp_path):
    m = smarttrim_cli.load(tiny_model_dir(tmp_path / "m"))
    m.smarttrim_config["preprocess"] = {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "resize": "squash"}
    img = Image.new("RGB", (64, 16), (128, 128, 128))
    img.paste((255, 255, 255), (0, 0, 8, 16))  # a white strip at the left edge survives a squash, not a crop
    x = image_preprocessor(m)(img)
    assert x.shape == (3, 32, 32)
    assert abs(float(x[0, 16, 16]) - (128 / 255 - 0.5) / 0.5) < 1e-2
    assert float(x[0, 16, 0]) > 0.9
