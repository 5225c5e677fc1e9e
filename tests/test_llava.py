"""The LLaVA family (backbones/llava.py, "wrapped"): a tiny random ``LlavaForConditionalGeneration`` saved with
``save_pretrained`` (tests/tiny_llava.py), attached as ``smarttrim attach`` does, checked against transformers'
own model: keep-all equals it (logits and ``generate``), hard == soft given the same decisions, a batch keeping
different counts equals each input alone, kept tokens keep their original positions, gradients reach the
trimmer, the model directory round-trips, and unreadable sources are one-line errors."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import smarttrim_cli
from smarttrim_cli.attach import attach, full_macs
from smarttrim_cli.cli import app
from smarttrim_cli.trim.cost import macs_ratio, total_macs

from tiny_hf import center_token_trimmers
from tiny_llava import IMAGE, one, text_rows, tiny_inputs, write_tiny_llava

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["what color is the shape ?", "is there a red circle in the image ?", "what is in the image ?"]
KEY = "tok:image_0"


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_tiny_llava(tmp_path_factory.mktemp("llava") / "llava-tiny")


@pytest.fixture(scope="module")
def hf(src):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(str(src), local_files_only=True).eval()


@pytest.fixture(scope="module")
def attached(src, tmp_path_factory):
    out = tmp_path_factory.mktemp("attached") / "model"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SMARTTRIM_HOME", str(out.parent / "home"))
        torch.manual_seed(0)
        r = attach(src, out_dir=out)
    return out, r.model


@pytest.fixture(scope="module")
def batch(src):
    return tiny_inputs(src, PROMPTS)  # left-padded by the processor


def varied(m, b, seed=0):
    """Trimmer with input-dependent decisions: noisy weights, bias centred so about half the tokens go on b."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in sorted(m.token_trimmers.named_parameters()):
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    center_token_trimmers(m, b)
    return m


def test_keep_all_equals_transformers_logits_and_generate(attached, hf, batch):
    m = attached[1]
    with torch.no_grad():
        for i in range(len(PROMPTS)):
            b = one(batch, i)
            ref = hf(**b).logits
            for mode, kw in (("full", {}), ("hard", {"threshold": 1e-12})):
                got, ctx = m.run(b, mode=mode, **kw)
                assert (got - ref).abs().max() < 1e-5, mode
        ref = hf.generate(**batch, max_new_tokens=6, do_sample=False)[:, batch["input_ids"].shape[1]:]
        assert torch.equal(m.generate(batch, mode="full", max_new_tokens=6, do_sample=False), ref)
        assert torch.equal(m.generate(batch, mode="hard", threshold=1e-12, max_new_tokens=6, do_sample=False), ref)
        # fresh trimmers keep everything at the default threshold (init_keep): attach changes nothing
        assert torch.equal(m.generate(batch, mode="hard", max_new_tokens=6, do_sample=False), ref)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_hard_equals_soft_given_the_same_decisions(attached, batch, attn):
    m = smarttrim_cli.load(attached[0]).model
    m.hf.set_attn_implementation(attn)
    g = torch.Generator().manual_seed(3)
    forced = {KEY: (torch.rand(len(PROMPTS), m.config.image_tokens, generator=g) > 0.5).float()}
    with torch.no_grad():
        hard, ch = m.run(batch, mode="hard", forced=forced, record=True)
        soft, cs = m.run(batch, mode="soft", forced=forced)
    assert torch.equal(ch.decisions[KEY].bool(), cs.decisions[KEY].bool())
    assert 0 < ch.decisions[KEY].sum() < ch.decisions[KEY].numel()
    rows = text_rows(batch)
    assert (hard[rows] - soft[rows]).abs().max() < 1e-5


def test_batch_keeping_different_counts_equals_each_input_alone(attached, batch):
    m = varied(smarttrim_cli.load(attached[0]).model, batch)
    with torch.no_grad():
        logits, ctx = m.run(batch, mode="hard", record=True)
        kept = ctx.decisions[KEY].sum(1)
        assert len(set(kept.tolist())) > 1 and kept.min() < m.config.image_tokens, kept
        gen = m.generate(batch, max_new_tokens=5, do_sample=False)
        rows = text_rows(batch)
        for i in range(len(PROMPTS)):
            b = one(batch, i)
            alone, c1 = m.run(b, mode="hard", record=True)
            assert torch.equal(c1.decisions[KEY][0], ctx.decisions[KEY][i])
            keep = batch["attention_mask"][i] > 0
            assert (alone[0][rows[i][keep]] - logits[i][rows[i]]).abs().max() < 1e-5
            g1 = m.generate(b, max_new_tokens=5, do_sample=False)
            assert torch.equal(g1[0], gen[i])
        # right-padded prompts are packed to the left the same way
        order = torch.argsort((batch["attention_mask"] == 0).long(), dim=1, stable=True)
        right = {k: (v.gather(1, order) if k != "pixel_values" else v) for k, v in batch.items()}
        assert bool((right["attention_mask"][:, 0] == 1).all()) and bool((right["attention_mask"][:, -1] == 0).any())
        assert torch.equal(m.generate(right, max_new_tokens=5, do_sample=False), gen)


def test_kept_tokens_keep_their_original_positions(attached, hf, batch):
    """What reaches the LM: the kept tokens, left-padded, at their original position ids; and the result equals
    transformers' own LM run on the untrimmed sequence with the dropped tokens removed and positions kept."""
    m = varied(smarttrim_cli.load(attached[0]).model, batch, seed=1)
    seen = {}

    def hook(mod, args, kw):
        seen.update(kw)
    h = m.hf.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            logits, ctx = m.run(batch, mode="hard", record=True)
    finally:
        h.remove()
    pos, mask = seen["position_ids"], seen["attention_mask"]
    assert mask.dim() == 2 and bool((mask[:, -1] == 1).all())  # left padding
    ids, am = batch["input_ids"], batch["attention_mask"]
    for i in range(len(PROMPTS)):
        real = am[i] > 0
        is_img = ids[i][real] == IMAGE
        kept_img = ctx.decisions[KEY][i] > 0.5
        keep = ~is_img
        keep[is_img] = kept_img
        expect = torch.arange(int(real.sum()))[keep]
        assert torch.equal(pos[i][mask[i] > 0], expect)
        assert int(keep.sum()) < int(real.sum())  # something was dropped
        # reference: transformers' merge of the full sequence, dropped rows removed, original positions
        b = one(batch, i)
        with torch.no_grad():
            emb = hf.get_input_embeddings()(b["input_ids"])
            feats = torch.cat(list(hf.model.get_image_features(pixel_values=b["pixel_values"]).pooler_output))
            emb = emb.masked_scatter((b["input_ids"] == IMAGE).unsqueeze(-1), feats)
            ref = hf(inputs_embeds=emb[:, keep], position_ids=expect.unsqueeze(0)).logits[0]
        got = logits[i][real][keep]
        assert (got[~is_img[keep]] - ref[~is_img[keep]]).abs().max() < 1e-5

    # decoding continues from the untrimmed length: RoPE distances stay those of the full layout
    calls = []
    h = m.hf.model.language_model.register_forward_pre_hook(
        lambda mod, args, kw: calls.append(kw["position_ids"].clone()), with_kwargs=True)
    try:
        with torch.no_grad():
            m.generate(batch, max_new_tokens=3, do_sample=False, eos_token_id=None)
    finally:
        h.remove()
    assert torch.equal(calls[0], pos) and len(calls) == 3
    untrimmed = am.sum(1, keepdim=True)
    for t, p in enumerate(calls[1:]):
        assert torch.equal(p, untrimmed + t)


def test_soft_mode_gradients_reach_the_trimmer_and_the_cost(attached, batch):
    m = varied(smarttrim_cli.load(attached[0]).model, batch).train()
    logits, ctx = m.run(batch, mode="soft", record=True, tau=1.0)
    ratio = macs_ratio(ctx.records)
    assert bool((ratio <= 1).all()) and ratio.requires_grad
    (logits[text_rows(batch)].logsumexp(-1).sum() + ratio.sum()).backward()
    for n, p in m.token_trimmers.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_cost_records_measure_the_prefill(attached, batch):
    m = varied(smarttrim_cli.load(attached[0]).model, batch)
    assert full_macs(m) > 0
    with torch.no_grad():
        _, ctx = m.run(batch, mode="hard", record=True)
    assert bool((total_macs(ctx.records) < total_macs(ctx.records, full=True)).all())


class _Forward(torch.nn.Module):
    """A positional-argument forward in one mode, for fvcore's tracer."""

    def __init__(self, m, mode):
        super().__init__()
        self.m, self.mode = m, mode

    def forward(self, ids, mask, pixels):
        return self.m(ids, mask, pixels, ctx=self.m.make_context(mode=self.mode))


def test_cost_model_equals_fvcore(attached, batch):
    """fvcore counts the traced graph (eager attention: it has no count for SDPA's fused kernel)."""
    from fvcore.nn import FlopCountAnalysis

    m = varied(smarttrim_cli.load(attached[0]).model, batch)
    m.hf.set_attn_implementation("eager")
    for i in range(2):
        b = one(batch, i)
        for mode in ("full", "hard"):
            fa = FlopCountAnalysis(_Forward(m, mode), (b["input_ids"], b["attention_mask"], b["pixel_values"]))
            fa.unsupported_ops_warnings(False)
            fa.uncalled_modules_warnings(False)
            with torch.no_grad():
                _, ctx = m.run(b, mode=mode, record=True)
            assert float(total_macs(ctx.records)[0]) == pytest.approx(float(fa.total()), rel=1e-9), (i, mode)
        assert total_macs(ctx.records)[0] < total_macs(ctx.records, full=True)[0]  # hard mode dropped tokens


def test_attach_then_load_is_bit_exact(attached, batch):
    out, m = attached
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["backbone"] == "llava" and cfg["task"] == "generate"
    assert (out / "tokenizer" / "processor_config.json").is_file()  # the whole processor, chat template included
    loaded = smarttrim_cli.load(out)
    a, b = m.state_dict(), loaded.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.tokenizer.convert_tokens_to_ids("<image>") == IMAGE
    m2 = varied(loaded.model, batch)
    m1 = varied(smarttrim_cli.load(out).model, batch)
    with torch.no_grad():
        assert torch.equal(m1.run(batch, mode="hard")[0], m2.run(batch, mode="hard")[0])
        assert torch.equal(m1.generate(batch, max_new_tokens=4), m2.generate(batch, max_new_tokens=4))


def test_attach_cli_writes_the_directory(src, tmp_path):
    r = CliRunner().invoke(app, ["attach", str(src), "-o", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert "llava / generate" in r.output and "image 16" in r.output


def _one_line_error(src, out):
    r = CliRunner().invoke(app, ["attach", str(src), "-o", str(out)])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    return " ".join(r.output.split())


def test_missing_projector_or_unsupported_architecture_is_a_one_line_error(src, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "no-projector"
    shutil.copytree(src, bad)
    sd = load_file(str(bad / "model.safetensors"))
    save_file({k: v for k, v in sd.items() if "multi_modal_projector." not in k}, str(bad / "model.safetensors"),
              metadata={"format": "pt"})
    line = _one_line_error(bad, tmp_path / "o1")
    assert "model.safetensors" in line and "multi_modal_projector" in line

    arch = tmp_path / "next"
    shutil.copytree(src, arch)
    hf = json.loads((arch / "config.json").read_text())
    (arch / "config.json").write_text(json.dumps({**hf, "architectures": ["LlavaNextForConditionalGeneration"]}))
    line = _one_line_error(arch, tmp_path / "o2")
    assert "config.json" in line and "unsupported architecture LlavaNextForConditionalGeneration" in line

    tower = tmp_path / "gpt2-tower"
    shutil.copytree(src, tower)
    hf["text_config"]["model_type"] = "gpt2"
    (tower / "config.json").write_text(json.dumps(hf))
    line = _one_line_error(tower, tmp_path / "o3")
    assert "config.json" in line and "gpt2" in line


def test_fusion_is_refused(src, tmp_path):
    r = CliRunner().invoke(app, ["attach", str(src), "-o", str(tmp_path / "o"), "--fuse"])
    assert r.exit_code == 2 and "fusion" in r.output and "Traceback" not in r.output


def test_qwen2_siglip_keep_all_equals_transformers(tmp_path):
    from transformers import LlavaForConditionalGeneration

    src = write_tiny_llava(tmp_path / "qwen-siglip", seed=2, text="qwen2", vision="siglip")
    hf = LlavaForConditionalGeneration.from_pretrained(str(src), local_files_only=True).eval()
    m = attach(src, out_dir=tmp_path / "o").model
    b = tiny_inputs(src, PROMPTS[:2])
    with torch.no_grad():
        got, _ = m.run(one(b, 0), mode="hard", threshold=1e-12)
        assert (got - hf(**one(b, 0)).logits).abs().max() < 1e-5
        ref = hf.generate(**b, max_new_tokens=4, do_sample=False)[:, b["input_ids"].shape[1]:]
        assert torch.equal(m.generate(b, mode="hard", threshold=1e-12, max_new_tokens=4, do_sample=False), ref)
    from fvcore.nn import FlopCountAnalysis

    m.hf.set_attn_implementation("eager")
    b = one(b, 1)
    fa = FlopCountAnalysis(_Forward(m, "full"), (b["input_ids"], b["attention_mask"], b["pixel_values"]))
    fa.unsupported_ops_warnings(False)
    with torch.no_grad():
        _, ctx = m.run(b, mode="full", record=True)
    # fvcore does not count SigLIP's patch embedding (its conv2d with padding="valid" traces to an op fvcore skips)
    counted = [r for r in ctx.records if r.name != "vision_patch"]
    assert float(total_macs(counted)[0]) == pytest.approx(float(fa.total()), rel=1e-9)


def test_tied_bf16_source_round_trips_and_keeps_its_dtype(tmp_path):
    from transformers import LlavaForConditionalGeneration

    src = write_tiny_llava(tmp_path / "tied", seed=3, tie=True, dtype=torch.bfloat16)
    m = attach(src, out_dir=tmp_path / "o").model
    loaded = smarttrim_cli.load(tmp_path / "o").model
    hf = loaded.hf
    assert hf.dtype == torch.bfloat16 and hf.lm_head.weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
    a, b = m.state_dict(), loaded.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    batch = tiny_inputs(src, PROMPTS[:2])
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    ref_model = LlavaForConditionalGeneration.from_pretrained(str(src), local_files_only=True).eval()
    with torch.no_grad():
        ref = ref_model.generate(**batch, max_new_tokens=4, do_sample=False)[:, batch["input_ids"].shape[1]:]
        assert torch.equal(loaded.generate(batch, mode="hard", threshold=1e-12, max_new_tokens=4, do_sample=False), ref)
        forced = {KEY: (torch.rand(2, loaded.config.image_tokens, generator=torch.Generator().manual_seed(0)) > 0.5)}
        forced[KEY][:, 0] = True  # the first image token is always kept
        logits, ctx = loaded.run(batch, mode="hard", forced=forced, record=True)
    assert logits.dtype == torch.bfloat16 and torch.equal(ctx.decisions[KEY].bool(), forced[KEY])
