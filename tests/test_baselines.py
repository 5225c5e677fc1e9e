"""Baselines (smarttrim_cli/baselines): each runs in hard mode on a tiny METER, reaches the mean GMACs
ratio it is calibrated to, and the cost model still equals fvcore's count of its hard forward."""
import math

import pytest
import torch
from fvcore.nn import FlopCountAnalysis

from smarttrim_cli.backbones.meter import default_trim_config
from smarttrim_cli.baselines import BASELINES, apply, calibrate_all, get_baseline, measure
from smarttrim_cli.baselines.common import full_costs
from smarttrim_cli.baselines.downsample import Downsample
from smarttrim_cli.baselines.tome import _merge_round
from smarttrim_cli.errors import SmartTrimError
from smarttrim_cli.trim.cost import total_macs

from tiny_meter import batch, tiny_model

TARGET = 0.33   # the matched budget (a 3x GMAC cut)
TOL = 0.02      # absolute tolerance on the mean GMACs ratio
TOKEN_CASES = [("random", {}), ("evit", {}), ("evit", {"guide": "text"}), ("evit-fusion", {}), ("tome", {}),
               ("tome", {"metric": "k", "prop_attn": False})]


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(task="vqa"):
    # 64x64 images with 8x8 patches (65 image tokens) and 4 ViT blocks: token layers vision 1,3,
    # text 1, xtext 0, ximage 0; head layers vision 2,3, text 1, xtext/ximage 0,1.
    m = tiny_model(task, image_size=64, vision_layers=4)
    m.attach_trimmers(default_trim_config(m.config))
    return m.eval()


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def cal_batches(model):
    return [batch(model, B=4, T=9, seed=s) for s in (1, 2)]


class _Hard(torch.nn.Module):
    def __init__(self, applied):
        super().__init__()
        self.a, self.m = applied, applied.model

    def forward(self, px, ids, mask):
        return self.m(px, ids, mask, ctx=self.m.make_context(mode="hard", **self.a.kwargs))


def _fvcore_vs_cost_model(applied, b):
    b = applied.prepare(b)
    with torch.no_grad():
        _, ctx = applied.run(b, record=True)
        fa = FlopCountAnalysis(_Hard(applied), (b["pixel_values"], b["input_ids"], b["attention_mask"]))
        fa.unsupported_ops_warnings(False)
        fa.uncalled_modules_warnings(False)
        counted = fa.total()
    return float(total_macs(ctx.records)[0]), counted, ctx


def test_registry_names_and_errors():
    for name in ("random", "evit", "evit-fusion", "tome", "static-heads", "downsample", "smarttrim-no-distill",
                 "smarttrim-no-curriculum"):
        assert name in BASELINES and get_baseline(name).name == name
    with pytest.raises(SmartTrimError, match="unknown baseline"):
        get_baseline("nope")
    with pytest.raises(SmartTrimError, match="guide"):
        get_baseline("evit", guide="nope")
    with pytest.raises(SmartTrimError, match="keep ratio"):
        get_baseline("random", keep_ratio=1.5)
    assert get_baseline("smarttrim-no-distill").flags == {"distill_weight": 0.0}
    assert get_baseline("smarttrim-no-curriculum").flags == {"curriculum": 0.0}
    with pytest.raises(SmartTrimError, match="training run"):
        apply(_model(), "smarttrim-no-curriculum")


@pytest.mark.parametrize("name,kw", TOKEN_CASES, ids=lambda v: str(v) if isinstance(v, str) else "-".join(
    f"{k}={x}" for k, x in v.items()) or "default")
def test_token_baseline_reaches_ratio_and_cost_equals_fvcore(model, cal_batches, name, kw):
    bl = get_baseline(name, **kw).calibrate(model, cal_batches, TARGET, tol=TOL)
    cal = bl.calibration
    assert cal["reached"] and abs(cal["ratio"] - TARGET) <= TOL, cal
    # an independent measurement agrees with what calibrate reported
    assert measure(model, bl, cal_batches)["ratio"] == pytest.approx(cal["ratio"], abs=1e-9)
    # the cost model equals fvcore's count of the baseline's hard forward at batch 1
    ours, counted, ctx = _fvcore_vs_cost_model(bl.apply(model), batch(model, B=1, T=7, pad_rows=()))
    assert abs(ours - counted) / counted < 0.01, (ours, counted)
    assert ours < 0.5 * float(total_macs(ctx.records, full=True)[0])
    # the per-position kept counts are those the keep ratio asks for (+1 fused token for EViT fusion)
    r, extra = bl.keep_ratio, int(bl.params().get("fuse", False))
    n_vis = 65
    for key in ("tok:vision_1", "tok:vision_3", "tok:ximage_0"):
        want = min(math.ceil(n_vis * r - 1e-6) + extra, n_vis)
        assert int(ctx.decisions[key].sum()) == want, (key, int(ctx.decisions[key].sum()), want)
        n_vis = want


def test_keep_ratio_one_and_native_resolution_equal_full(model):
    b = batch(model, B=3)
    with torch.no_grad():
        full, _ = model.run(b, mode="full")
        for bl in (get_baseline("random", keep_ratio=1.0), get_baseline("evit-fusion", keep_ratio=1.0),
                   get_baseline("tome", keep_ratio=1.0), get_baseline("static-heads"),
                   Downsample(model.config.image_size)):
            out, _ = bl.apply(model).run(b)
            assert torch.allclose(full, out, atol=1e-5), (bl, (full - out).abs().max())


def test_evit_soft_equals_hard(model):
    """Soft masks and hard gathers take the same EViT decisions and give the same outputs."""
    b = batch(model, B=4)
    bl = get_baseline("evit", keep_ratio=0.4, guide="text")
    with torch.no_grad():
        soft, sctx = bl.apply(model).run(b, mode="soft", record=True)
        hard, hctx = bl.apply(model).run(b, mode="hard", record=True)
        full, _ = model.run(b, mode="full")
    assert torch.allclose(soft, hard, atol=1e-4), (soft - hard).abs().max()
    assert not torch.allclose(full, hard, atol=1e-3)
    for k, v in hctx.decisions.items():
        assert torch.equal(v > 0.5, sctx.decisions[k] > 0.5), k
    assert torch.allclose(total_macs(sctx.records).double(), total_macs(hctx.records).double(), rtol=1e-6)
    with pytest.raises(SmartTrimError, match="hard mode"):
        get_baseline("tome", keep_ratio=0.5).apply(model).run(b, mode="soft")


def test_random_is_seeded(model):
    b = batch(model, B=2)
    runs = []
    for seed in (3, 3, 4):
        with torch.no_grad():
            _, ctx = get_baseline("random", keep_ratio=0.3, seed=seed).apply(model).run(b, record=True)
        runs.append(ctx.decisions["tok:vision_1"])
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    assert bool(runs[0][:, 0].all())  # [CLS] kept


def test_tome_merge_round_is_a_size_weighted_average():
    # tokens 1 and 2 are near-duplicates, 3 and 4 too; [CLS] (0) is similar to 1 but protected.
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [1.0, 0.12], [0.0, 1.0], [0.1, 1.0], [-1.0, 0.2]]])
    size = torch.tensor([[1.0, 3.0, 1.0, 1.0, 1.0, 1.0]])
    live = torch.ones(1, 6, dtype=torch.bool)
    x2, _, size2, keep, merged, macs = _merge_round(x, x, size, live, torch.tensor([2]))
    assert merged.tolist() == [2] and keep.tolist() == [[True, True, False, True, False, True]]
    # A = slots 0, 2, 4; B = 1, 3, 5: slot 2 merges into 1 and slot 4 into 3
    assert torch.allclose(x2[0, 1], (3 * x[0, 1] + x[0, 2]) / 4) and torch.allclose(x2[0, 3], (x[0, 3] + x[0, 4]) / 2)
    assert size2[0, keep[0]].sum() == size.sum() and size2[0, 1] == 4
    assert float(macs[0]) == 3 * 3 * 2


def test_tome_low_ratio_needs_several_rounds_and_keeps_sizes(model):
    b = batch(model, B=2)
    with torch.no_grad():
        _, ctx = get_baseline("tome", keep_ratio=0.1, layers={"vision": [1]}).apply(model).run(b, record=True)
    assert ctx.decisions["tok:vision_1"].sum(1).tolist() == [7.0, 7.0]  # ceil(0.1 * 65)
    sims = [r for r in ctx.records if r.name == "tok:vision_1/tome-similarity"]
    assert sims and float(sims[0].n[0]) > 33 * 32 * 64  # more than one round of similarities


def test_static_heads_reach_ratio_same_heads_for_all_and_fvcore(model, cal_batches):
    bl = get_baseline("static-heads").calibrate(model, cal_batches, 0.85, tol=TOL)
    assert bl.calibration["reached"] and abs(bl.calibration["ratio"] - 0.85) <= TOL, bl.calibration
    dropped = bl.dropped_heads()
    assert dropped and all(len(v) < 4 for v in dropped.values())
    assert "text_1" in bl.importance and all(v >= 0 for vals in bl.importance.values() for v in vals)
    with torch.no_grad():
        _, ctx = bl.apply(model).run(batch(model, B=3), record=True)
    heads = {k: v for k, v in ctx.decisions.items() if k.startswith("head:")}
    assert heads and all(bool((v == v[:1]).all()) for v in heads.values())  # static: every input the same
    assert sum(int((~v[0]).sum()) for v in heads.values()) == bl.n_drop
    ours, counted, _ = _fvcore_vs_cost_model(bl.apply(model), batch(model, B=1, T=7, pad_rows=()))
    assert abs(ours - counted) / counted < 0.01, (ours, counted)
    # dropping heads only touches attention: a 3x cut is out of reach, and calibrate says so
    with pytest.raises(SmartTrimError, match="cannot reach"):
        get_baseline("static-heads", importance=bl.importance).calibrate(model, cal_batches, TARGET)
    # soft gates and hard slicing agree
    b = batch(model, B=2)
    with torch.no_grad():
        soft, _ = bl.apply(model).run(b, mode="soft")
        hard, _ = bl.apply(model).run(b, mode="hard")
    assert torch.allclose(soft, hard, atol=1e-4)


def test_downsample_picks_nearest_size_and_fvcore(model, cal_batches):
    bl = get_baseline("downsample").calibrate(model, cal_batches, TARGET)
    full = full_costs(model, cal_batches)
    ratios = {s: measure(model, Downsample(s), cal_batches, full)["ratio"] for s in Downsample().sizes(model)}
    assert ratios == dict(sorted(ratios.items())) and list(ratios.values()) == sorted(ratios.values())
    best = min(ratios, key=lambda s: abs(ratios[s] - TARGET))
    assert bl.image_size == best and bl.calibration["ratio"] == pytest.approx(ratios[best])
    gaps = [b - a for a, b in zip(list(ratios.values()), list(ratios.values())[1:])]
    assert abs(bl.calibration["ratio"] - TARGET) <= max(gaps) / 2  # as near as the resolution grid allows
    applied = bl.apply(model)
    assert applied.model.config.image_size == best and model.config.image_size == 64
    assert applied.model.cross_modal_text_layers[0].attention.self.query.weight is \
        model.cross_modal_text_layers[0].attention.self.query.weight  # weights shared, not copied
    ours, counted, ctx = _fvcore_vs_cost_model(applied, batch(model, B=1, T=7, pad_rows=()))
    assert abs(ours - counted) / counted < 0.01, (ours, counted)
    assert not ctx.decisions  # nothing trimmed: only the resolution changed


def test_baselines_run_on_nlvr2_both_images():
    m = tiny_model("nlvr2")
    m.attach_trimmers(default_trim_config(m.config)).eval()
    b = batch(m, B=2)
    for bl in calibrate_all(m, [b], 0.5, names=["random", "evit-fusion", "tome"]):
        with torch.no_grad():
            out, ctx = bl.apply(m).run(b, record=True)
        assert out.shape == (2, 2) and torch.isfinite(out).all()
        assert "tok:vision_1" in ctx.decisions and "tok:img2/vision_1" in ctx.decisions, bl
        assert abs(bl.calibration["ratio"] - 0.5) <= 0.1, bl.calibration  # 17 image tokens: a coarse grid


def test_cls_attention_scores_equal_the_layers_own_attention(model):
    """EViT's (W_kᵀ q)·x shortcut equals the layer's softmax(q kᵀ / sqrt(dh)) [CLS] row, averaged over
    heads, with dead keys (padding, dropped) given no weight."""
    from smarttrim_cli.baselines.common import attention_weights, query_key_attention

    torch.manual_seed(0)
    x = torch.randn(2, 11, 64)
    alive = torch.ones(2, 11)
    alive[1, 7:] = 0
    w = attention_weights(model, "vision_1")
    h = w.ln(x)
    att, macs = query_key_attention(h[:, :1], torch.ones(2, 1), h, alive, w)
    H, dh = w.heads, 64 // w.heads
    q = torch.nn.functional.linear(h[:, :1], w.wq, w.bq).view(2, 1, H, dh).transpose(1, 2)
    k = torch.nn.functional.linear(h, w.wk, w.bk).view(2, 11, H, dh).transpose(1, 2)
    s = (q @ k.transpose(-1, -2)) / dh ** 0.5 + (1 - alive)[:, None, None, :] * -1e9
    ref = s.softmax(-1).mean(1)[:, 0]
    assert torch.allclose(att, ref, atol=1e-6), (att - ref).abs().max()
    assert att[1, 7:].abs().max() == 0
    assert macs.tolist() == [64 * 64 + 64 * 64 + 64 * H * 11, 64 * 64 + 64 * 64 + 64 * H * 7]


def test_proportional_attention_key_bias_counts_a_merged_token_as_its_size():
    """Stream.key_bias = log(size): attending to [a, b] with b of size 2 equals attending to [a, b, b]."""
    from smarttrim_cli.backbones.base import Stream
    from smarttrim_cli.nn.attention import multi_head_attention

    torch.manual_seed(0)
    d, H = 8, 2
    W = [torch.randn(d, d) * 0.5 for _ in range(4)]
    bias = [torch.randn(d) * 0.1 for _ in range(4)]
    q = torch.randn(1, 3, d)
    a, b = torch.randn(1, 1, d), torch.randn(1, 1, d)

    def attend(kv, key_add):
        return multi_head_attention(q, kv, W[0], bias[0], W[1], bias[1], W[2], bias[2], W[3], bias[3], H, key_add)

    dup = attend(torch.cat([a, b, b], 1), None)
    s = Stream.start(torch.cat([q[:, :1], a, b], 1), torch.ones(1, 3), "hard", all_valid=True)
    assert s.key_add() is None  # nothing set: the hot path is unchanged
    s.key_bias = torch.tensor([[1.0, 1.0, 2.0]]).log()
    s._gather(torch.tensor([[False, True, True]]))  # the bias follows its tokens through gathers
    assert torch.allclose(s.key_bias, torch.tensor([[0.0, math.log(2.0)]]))
    merged = attend(torch.cat([a, b], 1), s.key_add())
    assert torch.allclose(dup, merged, atol=1e-5)
    assert not torch.allclose(dup, attend(torch.cat([a, b], 1), None), atol=1e-3)
