"""BLIP from Hugging Face ``BlipForQuestionAnswering`` / ``BlipForImageTextRetrieval`` directories: full
mode equals transformers (invariant 1), answer ranking and generation, preprocessing, answer lists, attach.
Invariants 2-5 and the baselines run on every family in test_family_conformance.py.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import smarttrim_cli
from smarttrim_cli.backbones import blip
from smarttrim_cli.cli import app
from smarttrim_cli.errors import SmartTrimError

from tiny_hf import ANSWERS, BOS, SEP, write_tiny_blip

@pytest.fixture(scope="module")
def vqa_dir(tmp_path_factory):
    return write_tiny_blip(tmp_path_factory.mktemp("hf") / "blip-vqa-tiny")


@pytest.fixture(scope="module")
def itm_dir(tmp_path_factory):
    return write_tiny_blip(tmp_path_factory.mktemp("hf") / "blip-itm-tiny", "BlipForImageTextRetrieval", seed=1)


def hf_model(path):
    import transformers

    arch = json.loads((Path(path) / "config.json").read_text())["architectures"][0]
    return getattr(transformers, arch).from_pretrained(str(path)).eval()


def batch(c, B=3, T=8, seed=1, pad_rows=(1,)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 30, (B, T), generator=g)
    ids[:, 0] = 2
    mask = torch.ones(B, T, dtype=torch.long)
    for r in pad_rows:
        if r < B:
            mask[r, T - 3:] = 0
            ids[r, T - 3:] = 0
    return {"pixel_values": torch.randn(B, 3, c.image_size, c.image_size, generator=g), "input_ids": ids,
            "attention_mask": mask}


def hf_answer_loglik(hf, qs, qmask, answer_ids, answer_mask):
    """log p(answer | question) with transformers' own text decoder (teacher forcing)."""
    out = torch.zeros(qs.shape[0], answer_ids.shape[0])
    for b in range(qs.shape[0]):
        n = int(qmask[b].sum())  # real question tokens only (see test_vqa_ranking_equals_transformers)
        for a in range(answer_ids.shape[0]):
            logits = hf.text_decoder(input_ids=answer_ids[a:a + 1], attention_mask=answer_mask[a:a + 1],
                                     encoder_hidden_states=qs[b:b + 1, :n]).logits[0, :-1]
            lp = logits.log_softmax(-1).gather(-1, answer_ids[a, 1:, None])[:, 0]
            out[b, a] = (lp * answer_mask[a, 1:]).sum()
    return out


# ----- invariant 1: full mode == transformers ----------------------------------------------------------
@pytest.mark.parametrize("image_size", [None, 48])
def test_itm_and_itc_equal_transformers(itm_dir, image_size):
    hf = hf_model(itm_dir)
    m, info = blip.from_hf_dir(itm_dir, image_size=image_size)
    assert m.config.task == "retrieval" and info["labels"] == ["no_match", "match"]
    b = batch(m.config)
    interp = {"interpolate_pos_encoding": image_size is not None}  # transformers interpolates per call
    with torch.no_grad():
        ref = hf(**b, **interp).itm_score
        ours, _ = m.run(b, mode="full")
        ref_itc = hf(**b, use_itm_head=False, **interp).itm_score
        img, txt = m.itc(b, mode="full")
    assert ours.shape == (3, 2)
    assert torch.allclose(ref, ours, atol=1e-5), (ref - ours).abs().max()
    assert torch.allclose(ref_itc, img @ txt.T, atol=1e-5)


def test_vqa_encoder_and_ranking_equal_transformers(vqa_dir):
    hf = hf_model(vqa_dir)
    m, info = blip.from_hf_dir(vqa_dir)
    assert info["labels"] == ANSWERS and m.config.num_labels == len(ANSWERS)
    # answers are [DEC] answer [SEP] with the tokenizer's word pieces
    assert int(m.answer_ids[0, 0]) == BOS and int(m.answer_ids[0].gt(0).sum()) == 4  # [DEC] two dogs [SEP]
    b = batch(m.config)
    with torch.no_grad():
        vis = hf.vision_model(pixel_values=b["pixel_values"]).last_hidden_state
        q = hf.text_encoder(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                            encoder_hidden_states=vis).last_hidden_state
        text, img = m.encode(b["pixel_values"], b["input_ids"], b["attention_mask"], m.make_context(mode="full"))
        logits, _ = m.run(b, mode="full")
        ref = hf_answer_loglik(hf, q, b["attention_mask"], m.answer_ids, m.answer_mask)
    assert torch.allclose(vis, img.x, atol=1e-5)
    real = b["attention_mask"].bool()
    assert torch.allclose(q[real], text.x[real], atol=1e-5), (q[real] - text.x[real]).abs().max()
    assert logits.shape == (3, len(ANSWERS)) and bool((logits < 0).all())
    # NB transformers 5 drops the cross-attention mask (BlipTextSelfAttention reads encoder_attention_mask,
    # which BlipTextAttention never passes), so its decoder also attends to padded question slots. We mask
    # them as BLIP does; the reference above therefore feeds transformers the real question tokens only.
    assert torch.allclose(ref, logits, atol=1e-5), (ref - logits).abs().max()


def test_generation_equals_transformers(vqa_dir):
    hf = hf_model(vqa_dir)
    m, _ = blip.from_hf_dir(vqa_dir)
    b = batch(m.config, pad_rows=())
    with torch.no_grad():
        ref = hf.generate(**b, max_new_tokens=5, do_sample=False, num_beams=1)
        ours = m.generate(b, max_new_tokens=5, mode="full")
    for r, o in zip(ref.tolist(), ours):
        r = r[1:]  # transformers keeps the [DEC] start token
        assert o == (r[:r.index(SEP)] if SEP in r else r)


def test_two_stage_ranking(vqa_dir):
    """More answers than rank_k: the first answer token picks the candidates (BLIP's rank_answer)."""
    m, _ = blip.from_hf_dir(vqa_dir)
    b = batch(m.config)
    with torch.no_grad():
        all_scores, _ = m.run(b, mode="full")
        m.config.rank_k = 2
        two, ctx = m.run(b, mode="full", record=True)
    kept = two > -500
    assert bool((kept.sum(1) == 2).all())
    assert torch.allclose(two[kept], all_scores[kept], atol=1e-5)
    assert any(r.name.startswith("first_token/") for r in ctx.records)


# ----- preprocessing and answer lists ----------------------------------------------------------------------
def test_preprocessing_matches_the_pil_processor(vqa_dir):
    from transformers import BlipImageProcessorPil

    from smarttrim_cli.backbones.hf_dir import preprocess_config
    from smarttrim_cli.preprocess import preprocessor

    pre = preprocess_config(vqa_dir, blip.PROCESSOR_DEFAULTS, None, 35)
    assert pre["image_size"] == 32 and pre["resample"] == "bicubic"
    rng = np.random.default_rng(0)
    for mode, shape in (("RGB", (40, 70, 3)), ("L", (33, 21))):
        img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)
        ours = preprocessor(pre)(img)
        ref = BlipImageProcessorPil.from_pretrained(str(vqa_dir))(img, return_tensors="pt")["pixel_values"][0]
        assert torch.allclose(ours, ref, atol=1e-5), (mode, (ours - ref).abs().max())


def test_answer_list_formats_and_errors(tmp_path, vqa_dir):
    (tmp_path / "a.txt").write_text("yes\nno\n\nred\n")
    assert blip.read_answer_list(tmp_path / "a.txt") == ["yes", "no", "red"]
    (tmp_path / "a.json").write_text(json.dumps({"no": 1, "yes": 0}))
    assert blip.read_answer_list(tmp_path / "a.json") == ["yes", "no"]
    (tmp_path / "dup.txt").write_text("yes\nyes\n")
    with pytest.raises(SmartTrimError, match="duplicates"):
        blip.read_answer_list(tmp_path / "dup.txt")
    m, info = blip.from_hf_dir(vqa_dir, answers=tmp_path / "a.txt")
    assert info["labels"] == ["yes", "no", "red"] and m.config.num_labels == 3


# ----- attach ----------------------------------------------------------------------------------------------
runner = CliRunner()


def test_attach_cli_vqa_and_retrieval(vqa_dir, itm_dir, tmp_path):
    out = tmp_path / "vqa"
    r = runner.invoke(app, ["attach", str(vqa_dir), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "blip / vqa" in r.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["backbone"] == "blip" and cfg["labels"] == ANSWERS
    assert cfg["preprocess"]["resize"] == "squash" and cfg["preprocess"]["image_size"] == 32
    loaded = smarttrim_cli.load(out)
    m = loaded.model
    assert loaded.tokenizer is not None and len(m.head_trimmers) > 0
    b = batch(m.config, pad_rows=())
    hf = hf_model(vqa_dir)
    with torch.no_grad():
        full, _ = m.run(b, mode="full")
        hard, _ = m.run(b)
        vis = hf.vision_model(pixel_values=b["pixel_values"]).last_hidden_state
        q = hf.text_encoder(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                            encoder_hidden_states=vis).last_hidden_state
        ref = hf_answer_loglik(hf, q, b["attention_mask"], m.answer_ids, m.answer_mask)
    assert torch.allclose(full, ref, atol=1e-5) and torch.allclose(hard, full, atol=1e-5)

    out2 = tmp_path / "itm"
    r = runner.invoke(app, ["attach", str(itm_dir), "-o", str(out2), "--task", "retrieval"])
    assert r.exit_code == 0, r.output
    m2 = smarttrim_cli.load(out2).model
    with torch.no_grad():
        assert torch.allclose(m2.run(b, mode="full")[0], hf_model(itm_dir)(**b).itm_score, atol=1e-5)


def test_attach_blip_vqa_without_answer_list_is_a_clear_error(tmp_path):
    d = write_tiny_blip(tmp_path / "blip-vqa", answers=False)
    r = runner.invoke(app, ["attach", str(d), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "--answers" in r.output and "Traceback" not in r.output
    (tmp_path / "answers.txt").write_text("yes\nno\n")
    r = runner.invoke(app, ["attach", str(d), "-o", str(tmp_path / "o"), "--answers", str(tmp_path / "answers.txt")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "o" / "config.json").read_text())["labels"] == ["yes", "no"]


# ----- ONNX (invariant 5) and the other commands through the CLI -------------------------------------------
def test_finetune_cli(vqa_dir, tmp_path):
    """A few fine-tuning steps through the CLI (profile runs in test_vilt.py; same code path)."""
    out, ft = tmp_path / "attached", tmp_path / "finetuned"
    assert runner.invoke(app, ["attach", str(vqa_dir), "-o", str(out)]).exit_code == 0
    r = runner.invoke(app, ["finetune", str(out), "-o", str(ft), "--dataset", "easyvqa", "--limit", "8",
                            "--max-steps", "2", "--batch-size", "4", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    m = smarttrim_cli.load(ft)
    assert m.model.family == "blip" and m.labels == ANSWERS


@pytest.mark.parametrize("name,task", [("blip-vqa.yaml", "vqa"), ("blip-retrieval.yaml", "retrieval")])
def test_recipes_fit_blip_base(name, task):
    """The bundled recipes place trimmers on BLIP-base's layer counts (narrow widths keep this fast)."""
    from smarttrim_cli.recipes import load_recipe
    from smarttrim_cli.train.config import build_config
    from smarttrim_cli.trim.config import TrimConfig

    r = load_recipe(name)
    assert r["backbone"] == "blip" and r["task"] == task
    c = blip.BlipConfig(task=task, num_labels=2, answer_len=3, image_size=32, patch_size=16, vision_width=16,
                        vision_heads=4, vision_intermediate=16, text_hidden=16, text_heads=4,
                        text_intermediate=16, vocab_size=40, max_position=8, bos_token_id=38)
    m = blip.BlipModel(c).attach_trimmers(TrimConfig.from_dict(r["trim"]))
    assert len(m.token_trimmers) == sum(len(v) for v in r["trim"]["token_layers"].values())
    cfg, _ = build_config(r["_path"], {}, task=task, family="blip")
    assert cfg.lr > 0
