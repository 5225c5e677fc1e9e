"""LLaVA's opt-in trimmers inside the vision tower (stream ``vision``, backbones/llava.py ``trim_tower``): the tower
run layer by layer from transformers' modules equals ``get_image_features`` and the model equals transformers with
everything kept (CLIP and SigLIP towers), hard == soft given the same decisions, a batch keeping different counts
equals each input alone, gradients reach the tower's trimmers, the cost model equals fvcore, ``--token-layers
vision=1 --head-layers vision=1`` attaches and loads bit-exact, and the image-side ONNX graph matches PyTorch hard.
Tiny random LLaVA directories (tests/tiny_llava.py), no mocks."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import smarttrim_cli
from smarttrim_cli.attach import attach
from smarttrim_cli.cli import app
from smarttrim_cli.trim.cost import macs_ratio, total_macs

from test_llava import PROMPTS, one
from tiny_hf import center_token_trimmers
from tiny_llava import text_rows, tiny_inputs, write_tiny_llava

pytestmark = pytest.mark.usefixtures("one_thread")
LAYERS = {"vision": [0, 1]}  # the tiny tower runs 2 layers (vision_feature_layer -2 of 3)
TOWERS = {"clip": "llama", "siglip": "qwen2"}
TOK, HEAD = ("tok:vision_0", "tok:vision_1", "tok:image_0"), ("head:vision_0", "head:vision_1")


def _attached(root, vision):
    src = write_tiny_llava(root / "src", seed=4, text=TOWERS[vision], vision=vision)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SMARTTRIM_HOME", str(root / "home"))
        torch.manual_seed(0)
        attach(src, out_dir=root / "model", token_layers=LAYERS, head_layers=LAYERS)
    return src, root / "model"


@pytest.fixture(scope="module", params=list(TOWERS))
def tower(request, tmp_path_factory):
    """(vision kind, source directory, attached model directory) with trimmers at both tower layers."""
    return (request.param, *_attached(tmp_path_factory.mktemp(request.param), request.param))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return _attached(tmp_path_factory.mktemp("clip"), "clip")


def varied(m, b, seed=0):
    """Input-dependent decisions everywhere: noisy trimmers, token biases centred (about half dropped at each
    position), head biases 0 (about half the heads)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in (m.token_trimmers, m.head_trimmers):
            for _, p in sorted(mod.named_parameters()):
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
        for ht in m.head_trimmers.values():
            ht.fc2.bias.zero_()
    center_token_trimmers(m, b)
    return m


def tower_tokens(m) -> int:
    """Tokens of the tower's sequence: the patches, and [CLS] for CLIP."""
    v = m.hf.config.vision_config
    return (v.image_size // v.patch_size) ** 2 + (1 if v.model_type == "clip_vision_model" else 0)


def forced_decisions(m, B, seed=3):
    """Random decisions for every trimmer position (token masks over original positions, head masks)."""
    g = torch.Generator().manual_seed(seed)
    out = {k: (torch.rand(B, tower_tokens(m), generator=g) > 0.4).float() for k in TOK[:2]}
    out[TOK[2]] = (torch.rand(B, m.config.image_tokens, generator=g) > 0.3).float()
    out.update({k: (torch.rand(B, m.config.vision_heads, generator=g) > 0.5).float() for k in HEAD})
    return out


def test_default_attach_adds_no_tower_trimmers_and_the_stream_is_declared(clip):
    from smarttrim_cli.backbones.llava import LlavaModel, default_trim_config

    m = smarttrim_cli.load(clip[1]).model
    assert default_trim_config(m.config).token_layers == {"image": [0]} and not default_trim_config(m.config).head_layers
    assert m.stream_layers() == {"vision": 2, "image": 1}
    assert sorted(m.token_trimmers) == ["image_0", "vision_0", "vision_1"]
    assert sorted(m.head_trimmers) == ["vision_0", "vision_1"]
    tr = m.token_trimmers["vision_0"]
    assert (tr.d, tr.d_ctx) == (24, 32)  # tower width, guided by the prompt (text width)
    assert list(LlavaModel.streams)[:2] == ["vision", "image"]  # forward order: the last image decision counts


def test_keep_all_equals_transformers(tower):
    from transformers import LlavaForConditionalGeneration

    vision, src, out = tower
    m = smarttrim_cli.load(out).model
    hf = LlavaForConditionalGeneration.from_pretrained(str(src), local_files_only=True).eval()
    b = tiny_inputs(src, PROMPTS)
    with torch.no_grad():
        ref_feats = torch.stack(list(hf.model.get_image_features(pixel_values=b["pixel_values"]).pooler_output))
        ctx = m.make_context(mode="hard", threshold=1e-12, record=True)
        s = m.image_stream(b["pixel_values"], torch.zeros(len(PROMPTS), m.config.text_hidden), ctx)
        assert {"tok:vision_0", "tok:vision_1", "head:vision_1"} <= set(ctx.decisions)  # the tower ran here
        assert s.x.shape == ref_feats.shape and (s.x - ref_feats).abs().max() < 1e-5
        rows = b["attention_mask"] > 0
        ref = hf(**b).logits
        for mode in ("hard", "soft"):
            got, _ = m.run(b, mode=mode, threshold=1e-12)
            assert (got - ref)[rows].abs().max() < 1e-5, mode
        want = hf.generate(**b, max_new_tokens=5, do_sample=False)[:, b["input_ids"].shape[1]:]
        assert torch.equal(m.generate(b, mode="hard", threshold=1e-12, max_new_tokens=5, do_sample=False), want)


def test_hard_equals_soft_given_the_same_decisions(tower):
    vision, src, out = tower
    m = smarttrim_cli.load(out).model
    b = tiny_inputs(src, PROMPTS)
    forced = forced_decisions(m, len(PROMPTS))
    with torch.no_grad():
        hard, ch = m.run(b, mode="hard", forced=forced, record=True)
        soft, cs = m.run(b, mode="soft", forced=forced, record=True)
    for k in TOK + HEAD:
        assert torch.equal(ch.decisions[k].bool(), cs.decisions[k].bool()), k
    for k in ("tok:vision_1", "tok:image_0", "head:vision_1"):
        d = ch.decisions[k]
        assert 0 < d.sum() < d.numel(), k  # partial decisions: trimming is exercised
    # tokens dropped in the tower stay dropped: image_0's decisions are within the tower's (after [CLS])
    f = m._feature_start()
    assert bool((ch.decisions["tok:image_0"] <= ch.decisions["tok:vision_1"][:, f:]).all())
    assert bool((ch.decisions["tok:vision_1"][:, :f + 1] == 1).all())  # [CLS] and the first image token kept
    rows = text_rows(b)
    assert (hard[rows] - soft[rows]).abs().max() < 1e-5
    with torch.no_grad():  # alone, hard mode slices out the dropped heads (in a batch, only those no input keeps)
        for i in range(len(PROMPTS)):
            bi, keep = one(b, i), b["attention_mask"][i] > 0
            alone, _ = m.run(bi, mode="hard", forced={k: v[i:i + 1] for k, v in forced.items()})
            assert (alone[0][rows[i][keep]] - soft[i][rows[i]]).abs().max() < 1e-5, i
    # the cost records agree too (soft: sums of the same masks)
    assert torch.allclose(total_macs(ch.records), total_macs(cs.records))


def test_batch_keeping_different_counts_equals_each_input_alone(clip):
    src, out = clip
    b = tiny_inputs(src, PROMPTS)
    m = varied(smarttrim_cli.load(out).model, b)
    with torch.no_grad():
        logits, ctx = m.run(b, mode="hard", record=True)
        for k in ("tok:vision_0", "tok:vision_1"):
            kept = ctx.decisions[k].sum(1)
            assert len(set(kept.tolist())) > 1, (k, kept)
        heads = ctx.decisions["head:vision_1"]
        assert 0 < heads.sum() < heads.numel() and len(set(heads.sum(1).tolist())) > 1, heads
        gen = m.generate(b, max_new_tokens=5, do_sample=False)
        rows = text_rows(b)
        for i in range(len(PROMPTS)):
            bi = one(b, i)
            alone, c1 = m.run(bi, mode="hard", record=True)
            for k in TOK + HEAD:
                assert torch.equal(c1.decisions[k][0].bool(), ctx.decisions[k][i].bool()), (i, k)
            keep = b["attention_mask"][i] > 0
            assert (alone[0][rows[i][keep]] - logits[i][rows[i]]).abs().max() < 1e-5
            assert torch.equal(m.generate(bi, max_new_tokens=5, do_sample=False)[0], gen[i])


def test_soft_mode_gradients_reach_the_tower_trimmers(clip):
    """Through the outputs (attention policy and head gates) and, separately, through the cost."""
    src, out = clip
    b = tiny_inputs(src, PROMPTS)
    m = varied(smarttrim_cli.load(out).model, b).train()
    tower = [(n, p) for n, p in m.named_parameters() if n.startswith(("token_trimmers.vision_",
                                                                       "head_trimmers.vision_"))]
    assert len(tower) == 2 * 14 + 2 * 6  # two token trimmers (7 layers, weight and bias), two head trimmers (3)
    logits, ctx = m.run(b, mode="soft", record=True, tau=1.0)
    ratio = macs_ratio(ctx.records)
    assert bool((ratio < 1).all()) and ratio.requires_grad
    for loss in (logits[text_rows(b)].logsumexp(-1).sum(), ratio.sum()):
        m.zero_grad()
        loss.backward(retain_graph=True)
        for n, p in tower:
            assert p.grad is not None and p.grad.abs().sum() > 0, n


class _Forward(torch.nn.Module):
    def __init__(self, m, **kw):
        super().__init__()
        self.m, self.kw = m, kw

    def forward(self, ids, mask, pixels):
        return self.m(ids, mask, pixels, ctx=self.m.make_context(**self.kw))


def test_cost_model_equals_fvcore(clip):
    """fvcore counts the traced prefill (eager attention): everything kept, and partial decisions (tower tokens and
    heads dropped). The partial ones come from input-dependent trimmers, not ``forced``: with forced decisions the
    token trimmers' logits are unused and the tracer drops them as dead code, so fvcore would not count them."""
    from fvcore.nn import FlopCountAnalysis

    src, out = clip
    b = tiny_inputs(src, PROMPTS)
    m = varied(smarttrim_cli.load(out).model, b)
    m.hf.set_attn_implementation("eager")
    for i in range(2):
        bi = one(b, i)
        for kw in ({"mode": "hard", "threshold": 1e-12}, {"mode": "hard"}):
            fa = FlopCountAnalysis(_Forward(m, **kw), (bi["input_ids"], bi["attention_mask"], bi["pixel_values"]))
            fa.unsupported_ops_warnings(False)
            fa.uncalled_modules_warnings(False)
            with torch.no_grad():
                _, ctx = m.run(bi, record=True, **kw)
            assert float(total_macs(ctx.records)[0]) == pytest.approx(float(fa.total()), rel=1e-9), (i, kw)
        by = {r.name: r for r in ctx.records}
        assert float(by["vision_1"].n[0]) < float(by["vision_1"].n_full[0])  # tower tokens dropped
        assert float(by["vision_0"].h[0]) < m.config.vision_heads or float(by["vision_1"].h[0]) < m.config.vision_heads
        assert total_macs(ctx.records)[0] < total_macs(ctx.records, full=True)[0]


def test_attach_cli_vision_options_then_load_is_bit_exact(tmp_path):
    src = write_tiny_llava(tmp_path / "src", seed=5)
    out = tmp_path / "o"
    r = CliRunner().invoke(app, ["attach", str(src), "-o", str(out), "--token-layers", "vision=1",
                                 "--head-layers", "vision=1"])
    assert r.exit_code == 0, r.output
    assert "head trimmers" in r.output and "1: vision [1]" in r.output and "co-attention" not in r.output
    trim = json.loads((out / "config.json").read_text())["trim"]
    assert trim["token_layers"] == {"image": [0], "vision": [1]} and trim["head_layers"] == {"vision": [1]}
    a, c = smarttrim_cli.load(out).model, smarttrim_cli.load(out).model
    assert sorted(a.token_trimmers) == ["image_0", "vision_1"] and sorted(a.head_trimmers) == ["vision_1"]
    sa, sc = a.state_dict(), c.state_dict()
    assert sa.keys() == sc.keys() and all(torch.equal(sa[k], sc[k]) for k in sa)
    b = tiny_inputs(src, PROMPTS)
    varied(a, b), varied(c, b)
    with torch.no_grad():
        la, ca = a.run(b, mode="hard", record=True)
        lc, _ = c.run(b, mode="hard")
        assert torch.equal(la, lc)
        assert ca.decisions["tok:vision_1"].sum() < ca.decisions["tok:vision_1"].numel()


def test_out_of_range_tower_layer_is_a_one_line_error(tmp_path):
    src = write_tiny_llava(tmp_path / "src", seed=5)
    r = CliRunner().invoke(app, ["attach", str(src), "-o", str(tmp_path / "o"), "--head-layers", "vision=2"])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert "vision" in r.output and "out of range" in r.output


def test_onnx_image_graph_with_tower_trimmers_equals_pytorch_hard(clip, tmp_path):
    from smarttrim_cli.export.run import run_export
    from smarttrim_cli.model_dir import read_config, save_model_dir

    from test_llava_export import ort_kept, torch_kept

    import onnxruntime as ort

    src, out = clip
    loaded = smarttrim_cli.load(out)
    b = tiny_inputs(src, PROMPTS + ["?"], seed=3)
    varied(loaded.model, b)
    d = tmp_path / "model"
    save_model_dir(loaded.model, d, tokenizer=loaded.tokenizer, extra={"preprocess": read_config(out)["preprocess"]})
    rep = run_export(d, tmp_path / "m.onnx", timing=False)
    assert rep.ok, rep.failure_line()
    model = smarttrim_cli.load(d, mode="hard").model
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    tower_dropped = 0
    for i in range(len(PROMPTS) + 1):
        bi = one(b, i)
        for thr in (0.3, 0.5, 0.8):
            _, emb, pos = torch_kept(model, bi, thr)
            got = ort_kept(model, sess, bi, thr)
            np.testing.assert_array_equal(got["image_positions"][0], pos)
            np.testing.assert_allclose(got["image_embeds"][0], emb, atol=1e-4, rtol=0)
            with torch.no_grad():
                _, ctx = model.run(bi, mode="hard", threshold=thr, record=True)
            tower_dropped += int(ctx.decisions["tok:vision_1"].sum() < ctx.decisions["tok:vision_1"].numel())
    assert tower_dropped >= 3
    rep = run_export(d, tmp_path / "legacy.onnx", exporter="legacy", timing=False)  # the kept counts stay dynamic
    assert rep.ok and rep.export.exporter == "legacy", rep.failure_line()
    sess = ort.InferenceSession(str(tmp_path / "legacy.onnx"), providers=["CPUExecutionProvider"])
    for thr in (0.3, 0.8):
        np.testing.assert_array_equal(ort_kept(model, sess, one(b, 0), thr)["image_positions"][0],
                                      torch_kept(model, one(b, 0), thr)[2])


def test_label_free_finetune_trains_the_tower_trimmers_and_leaves_the_model_frozen(tmp_path, monkeypatch):
    """``recipes/llava.yaml`` with tower trimmers attached: the tower's trimmers learn with the image trimmer, the
    language model, tower and projector stay bit-identical."""
    from smarttrim_cli.train.loop import finetune

    from test_llava_finetune import SETTINGS, write_prompts

    src = write_tiny_llava(tmp_path / "src", seed=6)
    monkeypatch.setenv("SMARTTRIM_HOME", str(tmp_path / "home"))
    torch.manual_seed(0)
    attach(src, out_dir=tmp_path / "attached", token_layers={"vision": [1]}, head_layers={"vision": [1]})
    data = write_prompts(tmp_path / "prompts", 8)
    res = finetune(tmp_path / "attached", tmp_path / "out", progress=False, device="cpu",
                   overrides={**SETTINGS, "data_dir": str(data), "epochs": 2, "limit": 8, "val_limit": 4})
    start = smarttrim_cli.load(tmp_path / "attached").model.state_dict()
    end = smarttrim_cli.load(res.output).model.state_dict()
    assert start.keys() == end.keys()
    for pre in ("token_trimmers.vision_1.", "head_trimmers.vision_1.", "token_trimmers.image_0."):
        assert any(not torch.equal(start[k], end[k]) for k in end if k.startswith(pre)), pre
    frozen = [k for k in end if not k.startswith(("token_trimmers.", "head_trimmers."))]
    assert len(frozen) > 50 and all(torch.equal(start[k], end[k]) for k in frozen)


def test_profile_reports_a_tower_trimmed_model_with_its_fvcore_check(clip, tmp_path, monkeypatch):
    """``smarttrim profile`` on a model trimming inside the tower: the report's cost equals fvcore's and the kept
    image tokens are the last image decision's (image_0: the tower's drops included)."""
    import shutil

    from safetensors.torch import save_file

    from llava_data import by_hand, write_images, write_prompts

    src, out = clip
    d, data = tmp_path / "model", tmp_path / "prompts"
    shutil.copytree(out, d)  # the attached directory (its whole processor), with input-dependent trimmers
    loaded = smarttrim_cli.load(d)
    varied(loaded.model, tiny_inputs(src, PROMPTS))
    save_file({k: v.detach().contiguous() for k, v in loaded.model.state_dict().items()}, str(d / "model.safetensors"))
    data.mkdir()
    write_images(data, len(PROMPTS))
    write_prompts(data, PROMPTS, [["red"], ["yes"], ["circle"]])
    monkeypatch.setenv("SMARTTRIM_HOME", str(tmp_path / "home"))
    r = CliRunner().invoke(app, ["profile", str(d), "--dataset", "prompts", "--data-dir", str(data), "--out",
                                 str(tmp_path / "rep"), "--max-new-tokens", "2", "--iters", "1", "--warmup", "0",
                                 "--throughput-batches", "1", "--fvcore-limit", "2"])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["flops"]["fvcore_check"]["max_rel_diff"] < 1e-9
    _, rows = by_hand(d, data, 2)
    per = rep["per_input"]
    assert [p["image_tokens_final"] for p in per] == [h["kept"] for h in rows]
    tower = [int(h["ctx"].decisions["tok:vision_1"].sum()) for h in rows]
    assert min(tower) < tower_tokens(loaded.model), tower  # the tower trimmed these inputs
    assert rep["flops"]["trimmed"]["mean"] < rep["flops"]["full"]["mean"]


@pytest.mark.parametrize("name", ["pool", "visionzip", "divprune", "dart", "fastv"])
def test_image_token_baselines_act_after_the_projector_only(clip, name):
    """On a model trimming inside the tower, the image-token baselines still decide at image_0 (the tokens entering
    the LM) and give what they give on the same model without tower trimmers."""
    from smarttrim_cli.backbones.llava import default_trim_config
    from smarttrim_cli.baselines import get_baseline

    src, out = clip
    b = tiny_inputs(src, PROMPTS)
    tower = smarttrim_cli.load(out).model
    plain = smarttrim_cli.load(out).model
    plain.attach_trimmers(default_trim_config(plain.config))
    assert tower.tower_trimmed() and not plain.tower_trimmed()
    got = {}
    for key, m in (("tower", tower), ("plain", plain)):
        bl = get_baseline(name)
        bl.keep_ratio = 0.5
        with torch.no_grad():
            got[key] = bl.apply(m).run(b, record=True)
    (lt, ct), (lp, cp) = got["tower"], got["plain"]
    assert set(ct.decisions) == {"tok:image_0"}
    assert torch.equal(ct.decisions["tok:image_0"].bool(), cp.decisions["tok:image_0"].bool())
    assert 0 < ct.decisions["tok:image_0"].sum() < ct.decisions["tok:image_0"].numel()
    rows = text_rows(b)
    assert (lt[rows] - lp[rows]).abs().max() < 1e-5
