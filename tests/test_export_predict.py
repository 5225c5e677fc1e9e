"""smarttrim_cli.onnx_predict: serving an exported file with numpy + PIL + tokenizers, no PyTorch."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import smarttrim_cli
from smarttrim_cli.export.onnx_export import export_onnx
from smarttrim_cli.export.validate import scene_image
from test_export_onnx import module_model_dir, one_torch_thread  # noqa: F401


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    md = module_model_dir(tmp_path_factory, "predict-model")
    m = smarttrim_cli.load(md)
    res = export_onnx(m, tmp_path_factory.mktemp("predict") / "model.onnx", exporter="legacy")
    return md, res.path


def _images():
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (45, 70, 3), dtype=np.uint8), "RGB")
    return [rgb, rgb.convert("RGBA"), rgb.convert("L"), rgb.convert("P"), rgb.transpose(Image.Transpose.ROTATE_90),
            Image.fromarray(rng.integers(0, 65535, (40, 33), dtype=np.uint16).astype(np.int32), "I")]


def test_numpy_preprocessing_equals_the_torch_one():
    from smarttrim_cli.preprocess import ImagePreprocessor
    from smarttrim_cli.onnx_predict import preprocess_image

    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    pre = ImagePreprocessor(32, mean, std)
    for im in _images():
        a = preprocess_image(im, 32, mean, std)
        b = pre(im).numpy()
        assert a.shape == b.shape == (3, 32, 32) and a.dtype == np.float32
        assert np.abs(a - b).max() < 1e-5, im.mode


def test_tokenizer_from_the_file_equals_the_model_dirs(exported):
    from smarttrim_cli.onnx_predict import OnnxPredictor

    md, path = exported
    m = smarttrim_cli.load(md)
    p = OnnxPredictor(path, "cpu", 1)
    texts = ["what color is the circle?", "", "a very long question " * 10]
    ids, mask = p.tokenizer(texts)
    ref = m.tokenizer(texts, padding="longest", truncation=True, max_length=m.model.config.max_text_len, return_tensors="np")
    assert ids.shape[1] == m.model.config.max_text_len
    assert (ids == ref["input_ids"]).all() and (mask == ref["attention_mask"]).all()


def test_predict_without_torch_matches_pytorch(exported, tmp_path):
    md, path = exported
    img = tmp_path / "scene.png"
    scene_image(50, 7).save(img)
    q = "what color is the circle on the left?"
    code = ("import sys; sys.modules['torch'] = None\n"  # any torch import now fails
            "from smarttrim_cli.onnx_predict import main\n"
            f"rc = main([{str(path)!r}, {str(img)!r}, {q!r}, '--threshold', '0.45', '--top-k', '7', '--json',"
            " '--device', 'cpu'])\n"
            "assert 'torch' not in sys.modules or sys.modules['torch'] is None\n"
            "sys.exit(rc)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)

    from smarttrim_cli.export.validate import encode_images

    m = smarttrim_cli.load(md)
    enc = m.tokenizer([q], truncation=True, max_length=m.model.config.max_text_len, return_tensors="pt")
    b = {"pixel_values": encode_images(m, [Image.open(img)]), "input_ids": enc["input_ids"],
         "attention_mask": enc["attention_mask"]}
    with torch.no_grad():
        logits, ctx = m.model.run(b, mode="hard", threshold=0.45, record=True)
    probs = torch.sigmoid(logits[0]).numpy()
    order = np.argsort(-probs)
    assert [pr["label"] for pr in got["predictions"]] == [m.labels[i] for i in order]
    assert np.allclose([pr["score"] for pr in got["predictions"]], probs[order], atol=1e-5)
    kept = {k[4:]: int(v.sum()) for k, v in ctx.decisions.items() if k.startswith("tok:")}
    assert got["kept_tokens"] == kept


def test_predict_errors_are_one_line(exported, tmp_path):
    from smarttrim_cli.onnx_predict import main

    _, path = exported
    assert main([str(path), str(tmp_path / "missing.png"), "what?"]) == 2
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    img = tmp_path / "x.png"
    scene_image(40, 1).save(img)
    assert main([str(bad), str(img), "what?"]) == 2
