"""ViLT from a Hugging Face ``ViltForQuestionAnswering`` directory: full mode equals transformers
(invariant 1), deterministic patch order, preprocessing, attach. Invariants 2-5 and the baselines run on
every family in test_family_conformance.py.
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import smarttrim_cli
from smarttrim_cli.backbones import vilt
from smarttrim_cli.cli import app

from tiny_hf import LABELS, write_tiny_vilt

@pytest.fixture(scope="module")
def vilt_dir(tmp_path_factory):
    return write_tiny_vilt(tmp_path_factory.mktemp("hf") / "vilt-tiny")


def hf_model(path):
    from transformers import ViltForQuestionAnswering

    return ViltForQuestionAnswering.from_pretrained(str(path)).eval()


def batch(c, B=3, T=9, seed=1, pad_rows=(1,)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 40, (B, T), generator=g)
    ids[:, 0] = 2
    mask = torch.ones(B, T, dtype=torch.long)
    for r in pad_rows:
        if r < B:
            mask[r, T - 3:] = 0
            ids[r, T - 3:] = 0
    return {"pixel_values": torch.randn(B, 3, c.image_size, c.image_size, generator=g), "input_ids": ids,
            "attention_mask": mask}


@pytest.fixture
def raster_order(monkeypatch):
    """transformers' visual_embed permutes the patches with torch.multinomial; make it the identity
    (the order smarttrim uses) so that the comparison is exact rather than up to summation order."""
    orig = torch.multinomial

    def multinomial(inp, n, replacement=False, **kw):
        return torch.arange(n) if not replacement else orig(inp, n, replacement, **kw)

    monkeypatch.setattr(torch, "multinomial", multinomial)


# ----- invariant 1: full mode == transformers ----------------------------------------------------------
@pytest.mark.parametrize("image_size", [None, 96])
def test_full_mode_equals_transformers(vilt_dir, raster_order, image_size):
    hf = hf_model(vilt_dir)
    m, info = vilt.from_hf_dir(vilt_dir, image_size=image_size)
    assert info["labels"] == LABELS and m.config.num_labels == len(LABELS)
    b = batch(m.config)
    with torch.no_grad():
        ref = hf(**b).logits  # at 96² transformers interpolates the 4x4 position grid on the fly
        ours, _ = m.run(b, mode="full")
    assert ref.shape == ours.shape == (3, len(LABELS))
    assert torch.allclose(ref, ours, atol=1e-5), (ref - ours).abs().max()


def test_full_mode_is_deterministic_and_matches_any_patch_order(vilt_dir):
    """Without the monkeypatch transformers permutes patches at random: same result up to rounding."""
    hf = hf_model(vilt_dir)
    m, _ = vilt.from_hf_dir(vilt_dir)
    b = batch(m.config)
    with torch.no_grad():
        ours1, _ = m.run(b, mode="full")
        ours2, _ = m.run(b, mode="full")
        ref = hf(**b).logits
    assert torch.equal(ours1, ours2)
    assert torch.allclose(ref, ours1, atol=1e-5)


def test_unknown_keys_are_reported(tmp_path, vilt_dir):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    for f in vilt_dir.iterdir():
        if f.is_file():
            (bad / f.name).write_bytes(f.read_bytes())
    sd = load_file(str(bad / "model.safetensors"))
    sd["vilt.extra_thing.weight"] = torch.zeros(2)
    del sd["vilt.layernorm.bias"]
    save_file(sd, str(bad / "model.safetensors"))
    with pytest.raises(smarttrim_cli.errors.SmartTrimError, match="missing key.*vilt.layernorm.bias.*unexpected"):
        vilt.from_hf_dir(bad)


# ----- preprocessing ---------------------------------------------------------------------------------------
def test_preprocessing_matches_the_pil_processor(vilt_dir):
    from transformers import ViltImageProcessorPil

    from smarttrim_cli.backbones.hf_dir import preprocess_config
    from smarttrim_cli.preprocess import preprocessor

    pre = preprocess_config(vilt_dir, vilt.PROCESSOR_DEFAULTS, None, 16)
    assert pre["image_size"] == 64 and pre["mean"] == [0.5] * 3 and pre["resize"] == "squash"
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (50, 50, 3), dtype=np.uint8))
    ours = preprocessor(pre)(img)
    ref = ViltImageProcessorPil.from_pretrained(str(vilt_dir))(img, return_tensors="pt")["pixel_values"][0]
    assert ours.shape == ref.shape == (3, 64, 64)
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()


# ----- attach ----------------------------------------------------------------------------------------------
runner = CliRunner()


def test_attach_cli_on_hf_directory(vilt_dir, tmp_path, raster_order):
    out = tmp_path / "trimmed"
    r = runner.invoke(app, ["attach", str(vilt_dir), "-o", str(out), "--task", "vqa"])
    assert r.exit_code == 0, r.output
    assert "vilt / vqa" in r.output and "GMACs" in r.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["backbone"] == "vilt" and cfg["labels"] == LABELS
    assert cfg["provenance"]["source_format"] == "hf-ViltForQuestionAnswering"
    assert len(cfg["provenance"]["source_sha256"]) == 64
    assert cfg["preprocess"]["mean"] == [0.5, 0.5, 0.5] and cfg["preprocess"]["max_text_len"] == 16
    loaded = smarttrim_cli.load(out)
    m, tok = loaded.model, loaded.tokenizer
    assert tok is not None and tok("what color is the ball")["input_ids"][1] != 1  # not [UNK]
    assert len(m.token_trimmers) > 0 and len(m.head_trimmers) > 0
    b = batch(m.config)
    with torch.no_grad():
        full, _ = m.run(b, mode="full")
        hard, _ = m.run(b)  # fresh trimmers keep everything
        ref = hf_model(vilt_dir)(**b).logits
    assert torch.allclose(full, ref, atol=1e-5) and torch.allclose(hard, full, atol=1e-5)


def test_attach_rejects_wrong_task_and_unsupported_architectures(vilt_dir, tmp_path):
    r = runner.invoke(app, ["attach", str(vilt_dir), "-o", str(tmp_path / "o"), "--task", "retrieval"])
    assert r.exit_code == 2 and "does not match" in r.output and "Traceback" not in r.output
    other = tmp_path / "bert-dir"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"architectures": ["ViltForMaskedLM"], "model_type": "vilt"}))
    r = runner.invoke(app, ["attach", str(other), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2, r.output
    line = " ".join(r.output.split())
    assert "unsupported architecture ViltForMaskedLM" in line
    for arch in ("BlipForQuestionAnswering", "BlipForImageTextRetrieval", "ViltForQuestionAnswering"):
        assert arch in line
    empty = tmp_path / "empty"
    empty.mkdir()
    r = runner.invoke(app, ["attach", str(empty), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "without config.json" in " ".join(r.output.split())


# ----- the other commands through the CLI -------------------------------------------------------------
def test_finetune_and_profile_cli(vilt_dir, tmp_path):
    out, ft = tmp_path / "attached", tmp_path / "finetuned"
    assert runner.invoke(app, ["attach", str(vilt_dir), "-o", str(out)]).exit_code == 0
    r = runner.invoke(app, ["finetune", str(out), "-o", str(ft), "--dataset", "easyvqa", "--limit", "8",
                            "--max-steps", "2", "--batch-size", "4", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert json.loads((ft / "config.json").read_text())["backbone"] == "vilt"
    r = runner.invoke(app, ["profile", str(ft), "--dataset", "easyvqa", "--limit", "4", "--iters", "2", "--warmup",
                            "1", "--batch-size", "2", "--json", str(tmp_path / "p.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "p.json").read_text())


def test_recipe_fits_vilt_b32():
    from smarttrim_cli.recipes import load_recipe
    from smarttrim_cli.train.config import build_config
    from smarttrim_cli.trim.config import TrimConfig

    r = load_recipe("vilt-vqa.yaml")
    assert r["backbone"] == "vilt" and r["task"] == "vqa"
    m = vilt.ViltModel(vilt.ViltConfig(image_size=64, patch_size=32, hidden=16, heads=4, intermediate=16,
                                       num_labels=3, vocab_size=40))
    m.attach_trimmers(TrimConfig.from_dict(r["trim"]))
    assert sorted(m.token_trimmers) == sorted(f"ximage_{i}" for i in r["trim"]["token_layers"]["ximage"])
    assert len(m.head_trimmers) == 6
    cfg, _ = build_config(r["_path"], {}, task="vqa", family="vilt")
    assert cfg.lr == 1e-4
