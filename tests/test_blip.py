"""BLIP from Hugging Face ``BlipForQuestionAnswering`` / ``BlipForImageTextRetrieval`` directories:
invariants 1-4, answer ranking and generation, attach.

Tiny random configs are written with ``save_pretrained``, with the fixes shared/NOTES.md lists for
random BLIP configs (vision ``initializer_range`` 0.02; 4 text heads set explicitly) and noise on
every parameter so that a mis-mapped weight shows up in the outputs.
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
from smarttrim_cli.backbones import blip
from smarttrim_cli.cli import app
from smarttrim_cli.errors import SmartTrimError
from smarttrim_cli.trim.cost import total_macs

from smarttrim_cli.data import EASYVQA_ANSWERS

# multi-token answers first (padding inside the answer list), then easy-VQA's, so finetune/profile can run
ANSWERS = ["two dogs", "blue ball"] + list(EASYVQA_ANSWERS)
TEXTS = ["what color is the shape", "what shape is in the image", "is there a red circle", " ".join(ANSWERS)]
VOCAB, BOS, SEP = 60, 58, 3  # word tokenizer: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4


def write_tiny_blip(path: Path, arch="BlipForQuestionAnswering", seed=0, answers=True) -> Path:
    import transformers
    from transformers import BertTokenizer, BlipConfig, BlipImageProcessorPil

    from smarttrim_cli.tokenizers_local import write_word_tokenizer

    torch.manual_seed(seed)
    cfg = BlipConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=24, bos_token_id=BOS, sep_token_id=SEP,
                         pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           image_size=32, patch_size=8, initializer_range=0.02),
        image_text_hidden_size=16)
    hf = getattr(transformers, arch)(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(str(path))
    tok_dir = write_word_tokenizer(Path(str(path) + "-vocab"), TEXTS + ANSWERS)
    BertTokenizer(str(Path(tok_dir) / "vocab.txt")).save_pretrained(str(path))
    BlipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(str(path))
    if answers and arch == "BlipForQuestionAnswering":
        (Path(path) / "answer_list.json").write_text(json.dumps(ANSWERS))
    return Path(path)


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


def trimmed(path, init_keep=0.0, seed=0, **kw):
    m, _ = blip.from_hf_dir(path, **kw)
    t = blip.default_trim_config(m.config)
    t.token_layers = {"vision": [1], "ximage": [1], "xtext": [1]}
    t.head_layers = {"vision": [1, 2], "xtext": [0, 1]}
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


# ----- invariants 2-4 --------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["vqa", "retrieval"])
def test_hard_keep_all_equals_full(task, vqa_dir, itm_dir):
    m = trimmed(vqa_dir if task == "vqa" else itm_dir)
    b = batch(m.config)
    with torch.no_grad():
        full, _ = m.run(b, mode="full")
        hard, ctx = m.run(b, mode="hard", threshold=1e-12, record=True)
    assert torch.allclose(full, hard, atol=1e-5), (full - hard).abs().max()
    assert {"tok:vision_1", "tok:ximage_1", "head:xtext_0_cross", "head:vision_2"} <= set(ctx.decisions)
    assert all(v.all() for k, v in ctx.decisions.items() if k.startswith("head:"))


@pytest.mark.parametrize("task", ["vqa", "retrieval"])
def test_hard_equals_soft_given_same_decisions(task, vqa_dir, itm_dir):
    m = trimmed(vqa_dir if task == "vqa" else itm_dir)
    b = batch(m.config, B=4)
    with torch.no_grad():
        soft, sctx = m.run(b, mode="soft", record=True)
        hard, hctx = m.run(b, mode="hard", record=True, forced=sctx.decisions)
        full, _ = m.run(b, mode="full")
        soft2, _ = m.run(b, mode="soft")
        hard2, _ = m.run(b, mode="hard")
    assert torch.allclose(soft, hard, atol=1e-4), (soft - hard).abs().max()
    assert not torch.allclose(full, hard, atol=1e-3), "decisions changed nothing: the test would not see a bug"
    for key in ("tok:vision_1", "tok:ximage_1"):
        assert len(set(sctx.decisions[key].sum(1).tolist())) > 1, key
    assert sctx.decisions["tok:ximage_1"].shape == (4, m.config.n_patches + 1)
    assert torch.allclose(total_macs(sctx.records).double(), total_macs(hctx.records).double(), rtol=1e-6)
    assert torch.allclose(soft2, hard2, atol=1e-4)


class _Wrap(torch.nn.Module):
    def __init__(self, m, mode):
        super().__init__()
        self.m, self.mode = m, mode

    def forward(self, px, ids, mask):
        return self.m(px, ids, mask, ctx=self.m.make_context(mode=self.mode))


@pytest.mark.parametrize("mode", ["full", "hard"])
@pytest.mark.parametrize("task", ["vqa", "retrieval"])
def test_cost_model_equals_fvcore(task, mode, vqa_dir, itm_dir):
    m = trimmed(vqa_dir if task == "vqa" else itm_dir)
    if task == "vqa" and mode == "hard":
        m.config.rank_k = 3  # exercise the two-stage ranking's cost records too
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
        assert ours < float(total_macs(ctx.records, full=True)[0]) * 0.97


def test_soft_mode_trains_trimmers(itm_dir):
    from smarttrim_cli.trim.cost import macs_ratio

    m = trimmed(itm_dir).train()
    b = batch(m.config)
    logits, ctx = m.run(b, mode="soft", record=True)
    (logits.pow(2).mean() + macs_ratio(ctx.records).mean()).backward()
    assert all(p.grad is not None for p in m.trimmer_parameters())


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
    m = smarttrim_cli.load(out)
    assert m.tokenizer is not None and len(m.head_trimmers) > 0
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
    m2 = smarttrim_cli.load(out2)
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
def test_onnx_export_equals_hard_mode(vqa_dir, tmp_path):
    """BLIP VQA (answer ranking included) through onnxruntime on texts of several lengths."""
    from smarttrim_cli.export.onnx_export import export_onnx
    from smarttrim_cli.export.ort_session import make_session
    from smarttrim_cli.export.validate import make_cases, validate_against_torch

    m = trimmed(vqa_dir)
    export_onnx(m, tmp_path / "blip.onnx", exporter="legacy")  # the dynamo exporter works too, 5-10x slower
    rep = validate_against_torch(make_session(tmp_path / "blip.onnx", device="cpu"), m, make_cases(m, [0.5]))
    assert all(c.ok for c in rep.checks), rep.checks
    assert min(c.image_tokens_kept for c in rep.cases) < m.config.n_patches


def test_finetune_cli(vqa_dir, tmp_path):
    """A few fine-tuning steps through the CLI (profile runs in test_vilt.py; same code path)."""
    out, ft = tmp_path / "attached", tmp_path / "finetuned"
    assert runner.invoke(app, ["attach", str(vqa_dir), "-o", str(out)]).exit_code == 0
    r = runner.invoke(app, ["finetune", str(out), "-o", str(ft), "--dataset", "easyvqa", "--limit", "8",
                            "--max-steps", "2", "--batch-size", "4", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    m = smarttrim_cli.load(ft)
    assert m.family == "blip" and m.labels == ANSWERS


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
