"""ViLT from a Hugging Face ``ViltForQuestionAnswering`` directory: invariants 1-4 and attach.

Tiny random configs are written with ``save_pretrained`` (the real on-disk format); every parameter
gets noise so that a mis-mapped weight shows up in the outputs.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fvcore.nn import FlopCountAnalysis
from PIL import Image
from typer.testing import CliRunner

import smarttrim_cli
from smarttrim_cli.backbones import vilt
from smarttrim_cli.cli import app
from smarttrim_cli.trim.cost import total_macs

from smarttrim_cli.data import EASYVQA_ANSWERS

LABELS = list(EASYVQA_ANSWERS)  # so that finetune/profile run on the bundled easy-VQA data
TEXTS = ["what color is the shape", "what shape is in the image", "is there a red circle", " ".join(LABELS)]


def write_tiny_vilt(path: Path, seed=0, image_size=64, patch=16, **kw) -> Path:
    from transformers import BertTokenizer, ViltConfig, ViltForQuestionAnswering, ViltImageProcessorPil

    from smarttrim_cli.tokenizers_local import write_word_tokenizer

    torch.manual_seed(seed)
    cfg = dict(vocab_size=60, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
               image_size=image_size, patch_size=patch, max_position_embeddings=16,
               id2label=dict(enumerate(LABELS)), label2id={a: i for i, a in enumerate(LABELS)})
    cfg.update(kw)
    hf = ViltForQuestionAnswering(ViltConfig(**cfg)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(str(path))
    tok_dir = write_word_tokenizer(Path(str(path) + "-vocab"), TEXTS)
    BertTokenizer(str(Path(tok_dir) / "vocab.txt")).save_pretrained(str(path))
    ViltImageProcessorPil(size={"shortest_edge": image_size}).save_pretrained(str(path))
    return Path(path)


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


def trimmed(path, init_keep=0.0, seed=0, **kw):
    m, _ = vilt.from_hf_dir(path, **kw)
    t = vilt.default_trim_config(m.config)
    t.token_layers = {"ximage": [1, 2], "xtext": [2]}
    t.head_layers = {"joint": [1, 2]}
    t.init_keep = init_keep
    m.attach_trimmers(t)
    torch.manual_seed(seed + 7)
    with torch.no_grad():
        for p in m.trimmer_parameters():
            p.add_(torch.randn_like(p) * 0.5)
    m.eval()
    center_token_trimmers(m, batch(m.config, B=4, seed=11))
    return m


def center_token_trimmers(m, b):
    """Shift each random token trimmer's bias so that it drops about half of its tokens on b (random
    tiny trimmers otherwise saturate: everything kept or everything dropped)."""
    outs = {}
    hooks = [tr.register_forward_hook(lambda mod, inp, out, k=k: outs.__setitem__(k, out))
             for k, tr in m.token_trimmers.items()]
    try:
        for _ in range(2):
            with torch.no_grad():
                m.run(b, mode="soft")
                for k, tr in m.token_trimmers.items():
                    tr.fc2.bias -= outs[k].median()
    finally:
        for h in hooks:
            h.remove()


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


# ----- invariants 2-4 --------------------------------------------------------------------------------------
def test_hard_keep_all_equals_full(vilt_dir):
    m = trimmed(vilt_dir)
    b = batch(m.config)
    with torch.no_grad():
        full, _ = m.run(b, mode="full")
        hard, ctx = m.run(b, mode="hard", threshold=1e-12, record=True)
    assert torch.allclose(full, hard, atol=1e-5), (full - hard).abs().max()
    assert "tok:ximage_1" in ctx.decisions and "head:joint_1" in ctx.decisions
    assert all(v.all() for k, v in ctx.decisions.items() if k.startswith("head:"))


def test_hard_equals_soft_given_same_decisions(vilt_dir):
    m = trimmed(vilt_dir)
    b = batch(m.config, B=4)
    with torch.no_grad():
        soft, sctx = m.run(b, mode="soft", record=True)
        hard, hctx = m.run(b, mode="hard", record=True, forced=sctx.decisions)
        full, _ = m.run(b, mode="full")
    assert torch.allclose(soft, hard, atol=1e-4), (soft - hard).abs().max()
    assert not torch.allclose(full, hard, atol=1e-3), "decisions changed nothing: the test would not see a bug"
    kept = sctx.decisions["tok:ximage_1"].sum(1)
    assert len(set(kept.tolist())) > 1, "instances should keep different token counts"
    assert sctx.decisions["tok:ximage_1"].shape == (4, m.config.n_patches + 1)
    assert torch.allclose(total_macs(sctx.records).double(), total_macs(hctx.records).double(), rtol=1e-6)
    # soft mode in eval decides like hard mode
    with torch.no_grad():
        soft2, _ = m.run(b, mode="soft")
        hard2, _ = m.run(b, mode="hard")
    assert torch.allclose(soft2, hard2, atol=1e-4)


class _Wrap(torch.nn.Module):
    def __init__(self, m, mode):
        super().__init__()
        self.m, self.mode = m, mode

    def forward(self, px, ids, mask):
        return self.m(px, ids, mask, ctx=self.m.make_context(mode=self.mode))


@pytest.mark.parametrize("mode", ["full", "hard"])
def test_cost_model_equals_fvcore(vilt_dir, mode):
    m = trimmed(vilt_dir)
    b = batch(m.config, B=1, T=7, pad_rows=())
    with torch.no_grad():
        _, ctx = m.run(b, mode=mode, record=True)
        fa = FlopCountAnalysis(_Wrap(m, mode), (b["pixel_values"], b["input_ids"], b["attention_mask"]))
        fa.unsupported_ops_warnings(False)
        fa.uncalled_modules_warnings(False)
        counted = fa.total()
    ours = float(total_macs(ctx.records)[0])
    assert abs(ours - counted) / counted < 0.01, (ours, counted)
    if mode == "hard":
        assert ours < float(total_macs(ctx.records, full=True)[0]) * 0.95


def test_soft_mode_trains_trimmers(vilt_dir):
    from smarttrim_cli.trim.cost import macs_ratio

    m = trimmed(vilt_dir).train()
    b = batch(m.config)
    logits, ctx = m.run(b, mode="soft", record=True)
    (logits.pow(2).mean() + macs_ratio(ctx.records).mean()).backward()
    assert all(p.grad is not None for p in m.trimmer_parameters())


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
    m = smarttrim_cli.load(out)
    assert m.tokenizer is not None and m.tokenizer("what color is the ball")["input_ids"][1] != 1  # not [UNK]
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


# ----- ONNX (invariant 5) and the other commands through the CLI -------------------------------------------
def test_onnx_export_cli_equals_hard_mode(vilt_dir, tmp_path):
    """`smarttrim export --onnx` on a ViLT model whose trimmers prune: onnxruntime == hard mode on texts
    of several lengths (the command validates and exits 1 when a check fails)."""
    from transformers import AutoTokenizer

    from smarttrim_cli.backbones.hf_dir import preprocess_config
    from smarttrim_cli.model_dir import save_model_dir

    m = trimmed(vilt_dir)
    save_model_dir(m, tmp_path / "m", tokenizer=AutoTokenizer.from_pretrained(str(vilt_dir)), labels=LABELS,
                   extra={"preprocess": preprocess_config(vilt_dir, vilt.PROCESSOR_DEFAULTS, None, m.config.max_text_len)})
    r = runner.invoke(app, ["export", str(tmp_path / "m"), "--onnx", "-o", str(tmp_path / "vilt.onnx"),
                            "--exporter", "legacy", "--no-timing"])  # dynamo works too, 5-10x slower
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    assert "✓ logits" in out and "✓ kept_tokens" in out and "very short" in out
    with torch.no_grad():
        _, ctx = m.run(batch(m.config, B=1, pad_rows=()), mode="hard", record=True)
    assert ctx.decisions["tok:ximage_1"].sum() < m.config.n_patches + 1  # the exported trimmers do prune


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
