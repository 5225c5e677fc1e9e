"""`smarttrim attach` end to end through the CLI, including the error cases."""
import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import smarttrim_cli
from smarttrim_cli.cli import app

from tiny_meter import batch, write_tiny_ckpt

runner = CliRunner()


def _attach(*args):
    return runner.invoke(app, ["attach", *map(str, args)])


def test_attach_writes_model_dir_that_load_reads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src, _ = write_tiny_ckpt(tmp_path / "meter.ckpt", "vqa")
    r = _attach("meter.ckpt")
    assert r.exit_code == 0, r.output
    out = Path(os.environ["SMARTTRIM_HOME"]) / "model"
    for label in ("meter / vqa", "32² (patch 8)", "image 17", "parameters added", "GMACs", "ignored unused keys"):
        assert label in r.output, label
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["backbone"] == "meter" and cfg["task"] == "vqa"
    assert cfg["provenance"]["source_sha256"] and len(cfg["provenance"]["source_sha256"]) == 64
    assert (out / "model.safetensors").is_file() and (out / "tokenizer").is_dir()
    loaded = smarttrim_cli.load()  # no path: the one attach just wrote
    model = loaded.model
    assert loaded.source.resolve() == out.resolve() and model.mode == "hard"
    assert loaded.tokenizer is not None and len(model.token_trimmers) > 0 and len(model.head_trimmers) > 0
    b = batch(model)
    with torch.no_grad():
        full, _ = model.run(b, mode="full")
        ref, _ = src.run(b, mode="full")
        hard, _ = model.run(b)  # fresh trimmers keep everything (init_keep): equals full
    assert torch.equal(full, ref)
    assert torch.allclose(hard, full, atol=1e-5)


def test_attach_options_and_recipe(tmp_path):
    write_tiny_ckpt(tmp_path / "meter.ckpt", "snli")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("trim:\n  token_layers: {vision: [1], text: [], xtext: [], ximage: [1]}\n"
                      "  head_layers: {vision: [], text: [], xtext: [1], ximage: []}\n  threshold: 0.4\n")
    r = _attach(tmp_path / "meter.ckpt", "-o", tmp_path / "out", "--recipe", recipe, "--image-size", 48,
                "--head-layers", "ximage=0")
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["trim"]["token_layers"] == {"vision": [1], "text": [], "xtext": [], "ximage": [1]}
    assert cfg["trim"]["head_layers"]["ximage"] == [0] and cfg["trim"]["threshold"] == 0.4
    assert cfg["backbone_config"]["image_size"] == 48
    m = smarttrim_cli.load(tmp_path / "out").model
    assert sorted(m.token_trimmers) == ["vision_1", "ximage_1"]
    assert sorted(m.head_trimmers) == sorted(["xtext_1_cross", "xtext_1_self", "ximage_0_cross", "ximage_0_self"])
    assert cfg["trim"]["fuse"] is False and not m.trim_config.fuse and "fused" not in r.output
    # token fusion: from the recipe's `trim: fuse`, and --no-fuse overrides it
    recipe.write_text(recipe.read_text() + "  fuse: true\n")
    r = _attach(tmp_path / "meter.ckpt", "-o", tmp_path / "fused", "--recipe", recipe)
    assert r.exit_code == 0, r.output
    assert smarttrim_cli.load(tmp_path / "fused").model.trim_config.fuse and "dropped tokens fused" in r.output
    r = _attach(tmp_path / "meter.ckpt", "-o", tmp_path / "unfused", "--recipe", recipe, "--no-fuse")
    assert r.exit_code == 0, r.output
    assert not smarttrim_cli.load(tmp_path / "unfused").model.trim_config.fuse
    # streams a recipe does not name keep the backbone's default placement
    partial = tmp_path / "partial.yaml"
    partial.write_text("trim:\n  token_layers: {vision: [0]}\n")
    r = _attach(tmp_path / "meter.ckpt", "-o", tmp_path / "partial", "--recipe", partial)
    assert r.exit_code == 0, r.output
    assert _attach(tmp_path / "meter.ckpt", "-o", tmp_path / "plain").exit_code == 0
    dflt = smarttrim_cli.load(tmp_path / "plain").model.trim_config.token_layers
    got = json.loads((tmp_path / "partial" / "config.json").read_text())["trim"]["token_layers"]
    assert got["vision"] == [0] and {k: v for k, v in got.items() if k != "vision"} == {
        k: v for k, v in dflt.items() if k != "vision"} and dflt["vision"] != [0]
    # the fusion rule: single unless the recipe or --fuse-mode says nearest; an unknown one is a one-line error
    assert smarttrim_cli.load(tmp_path / "fused").model.trim_config.fuse_mode == "single"
    r = _attach(tmp_path / "meter.ckpt", "-o", tmp_path / "nearest", "--recipe", recipe, "--fuse-mode", "nearest")
    assert r.exit_code == 0, r.output
    assert smarttrim_cli.load(tmp_path / "nearest").model.trim_config.fuse_mode == "nearest" and "(nearest)" in r.output
    r = _attach(tmp_path / "meter.ckpt", "-o", tmp_path / "bad", "--recipe", recipe, "--fuse-mode", "closest")
    assert r.exit_code != 0 and "fuse_mode must be one of single, nearest" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("content,needle", [
    (None, "no such file"),
    (b"", None),
    (b"hello, I am a text file\n", None),
    ("half", None),
])
def test_bad_checkpoint_files(tmp_path, content, needle):
    write_tiny_ckpt(tmp_path / "good.ckpt", "vqa")
    p = tmp_path / "bad.ckpt"
    if content == "half":
        data = (tmp_path / "good.ckpt").read_bytes()
        p.write_bytes(data[: len(data) // 2])
    elif content is not None:
        p.write_bytes(content)
    r = _attach(p, "-o", tmp_path / "out", "--tokenizer", tmp_path / "tokenizer")
    assert r.exit_code in (1, 2), r.output
    assert "Traceback" not in r.output and "bad.ckpt" in r.output
    if needle:
        assert needle in r.output
    assert not (tmp_path / "out").exists()


def test_wrong_architecture_and_layer_errors(tmp_path):
    torch.save({"state_dict": {"bert.encoder.layer.0.attention.self.query.weight": torch.zeros(4, 4)}},
               tmp_path / "bert.ckpt")
    r = _attach(tmp_path / "bert.ckpt", "-o", tmp_path / "out")
    assert r.exit_code == 2 and "not a METER checkpoint" in r.output and not (tmp_path / "out").exists()
    write_tiny_ckpt(tmp_path / "m.ckpt", "vqa")
    r = _attach(tmp_path / "m.ckpt", "-o", tmp_path / "out", "--token-layers", "vision=5")
    assert r.exit_code == 2 and "out of range" in r.output and not (tmp_path / "out").exists()
    r = _attach(tmp_path / "m.ckpt", "-o", tmp_path / "out", "--token-layers", "audio=1")
    assert r.exit_code == 2 and "unknown stream" in r.output


def test_missing_tokenizer_says_which_path(tmp_path):
    write_tiny_ckpt(tmp_path / "m.ckpt", "vqa", with_tokenizer=False)
    r = _attach(tmp_path / "m.ckpt", "-o", tmp_path / "out")
    assert r.exit_code == 2, r.output
    assert "--tokenizer" in r.output and "vocab.json" in r.output
    assert not (tmp_path / "out").exists()


def test_unwritable_output(tmp_path):
    write_tiny_ckpt(tmp_path / "m.ckpt", "vqa")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = _attach(tmp_path / "m.ckpt", "-o", blocker / "out")
    assert r.exit_code == 2 and "cannot write" in r.output and "Traceback" not in r.output


def test_existing_output_is_replaced_only_on_success(tmp_path):
    write_tiny_ckpt(tmp_path / "m.ckpt", "vqa")
    out = tmp_path / "out"
    assert _attach(tmp_path / "m.ckpt", "-o", out).exit_code == 0
    before = (out / "model.safetensors").read_bytes()
    r = _attach(tmp_path / "m.ckpt", "-o", out, "--token-layers", "vision=9")
    assert r.exit_code == 2
    assert (out / "model.safetensors").read_bytes() == before


def test_answers_file_gives_meter_labels(tmp_path):
    write_tiny_ckpt(tmp_path / "m.ckpt", "vqa")  # 7 outputs
    (tmp_path / "answers.txt").write_text("\n".join(f"a{i}" for i in range(7)) + "\n")
    r = _attach(tmp_path / "m.ckpt", "-o", tmp_path / "out", "--answers", tmp_path / "answers.txt")
    assert r.exit_code == 0, r.output
    assert smarttrim_cli.load(tmp_path / "out").labels == [f"a{i}" for i in range(7)]
    (tmp_path / "short.json").write_text('["yes", "no"]')
    r = _attach(tmp_path / "m.ckpt", "-o", tmp_path / "out2", "--answers", tmp_path / "short.json")
    assert r.exit_code == 2 and "2 labels" in r.output and "7 outputs" in r.output
    assert not (tmp_path / "out2").exists()
