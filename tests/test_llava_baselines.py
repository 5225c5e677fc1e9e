"""Training-free image-token baselines on the wrapped LLaVA family (baselines/image_tokens.py and one module per
rule), on a tiny real ``LlavaForConditionalGeneration`` (tests/tiny_llava.py): each keeps its count per input and
runs exactly as the model's forced decisions do; calibration reaches a GMACs target and the recorded cost is
fvcore's; each rule selects what its method says; a batch decides as its inputs alone."""
from __future__ import annotations

import pytest
import torch

from smarttrim_cli.backbones.llava import from_hf_dir
from smarttrim_cli.baselines import BASELINES, calibrate, calibrate_all, get_baseline, measure
from smarttrim_cli.baselines.dart import dart_select
from smarttrim_cli.baselines.divprune import cosine_distances
from smarttrim_cli.baselines.fastv import fastv_scores
from smarttrim_cli.baselines.image_tokens import n_keep
from smarttrim_cli.baselines.pool import grid_windows
from smarttrim_cli.baselines.visionzip import feature_layer, tower_attention
from smarttrim_cli.errors import SmartTrimError
from smarttrim_cli.trim.cost import total_macs

from tiny_llava import IMAGE, one, text_rows, tiny_inputs, write_tiny_llava

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["what color is the shape ?", "is there a red circle in the image ?", "what is in the image ?"]
KEY = "tok:image_0"
R = 0.3
CASES = [("random", {}), ("pool", {"mode": "stride"}), ("pool", {}), ("divprune", {}), ("dart", {"pivots": 2}),
         ("visionzip", {}), ("visionzip", {"contextual": 0}), ("fastv", {}), ("fastv", {"K": 1})]
ids_ = lambda v: v if isinstance(v, str) else "-".join(f"{k}={x}" for k, x in v.items()) or "default"  # noqa: E731


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    src = write_tiny_llava(tmp_path_factory.mktemp("llava") / "tiny", image_size=24)  # 6 x 6 image tokens
    m = from_hf_dir(src)[0].eval()
    return m, tiny_inputs(src, PROMPTS)  # left-padded


def feats(m, b):
    with torch.no_grad():
        return m.image_features(b["pixel_values"]).float()


def eager(m):
    class Eager:
        def __enter__(self):
            m.hf.set_attn_implementation("eager")

        def __exit__(self, *a):
            m.hf.set_attn_implementation("sdpa")
    return Eager()


def test_registry_and_calibrate_all_picks_the_wrapped_family_baselines(model):
    m, b = model
    names = ["random", "pool", "visionzip", "divprune", "dart", "fastv"]
    for name in names:
        assert name in BASELINES and get_baseline(name).name == name
    got = calibrate_all(m, [b], 0.8, tol=0.05)
    assert [bl.name for bl in got] == names
    assert all(bl.calibration["reached"] for bl in got if bl.name != "fastv"), [bl.calibration for bl in got]
    # FastV at K = 2 on a 2-layer LM: the scoring pass is the whole LM at full length, so it costs more than full
    fastv = got[-1].calibration
    assert not fastv["reached"] and fastv["ratio"] > 1.0, fastv
    # a rule that reads the batch first refuses to run on signals it did not read
    with pytest.raises(SmartTrimError, match="prepare"):
        m.run(b, mode="hard", policy=get_baseline("fastv").policy(m))


@pytest.mark.parametrize("name,kw", CASES, ids=ids_)
def test_keeps_its_count_and_runs_as_the_forced_decisions(model, name, kw):
    m, b = model
    N = m.config.image_tokens
    applied = get_baseline(name, keep_ratio=R, **kw).apply(m)
    with torch.no_grad():
        logits, ctx = applied.run(b, record=True)
        dec = ctx.decisions[KEY]
        forced, cf = m.run(b, mode="hard", forced={KEY: dec}, record=True)
    k = 9 if name == "pool" else n_keep(R, N)  # pool: round(6 * sqrt(0.3)) = 3 -> 3 x 3 windows
    assert dec.shape == (3, N) and torch.equal(dec.sum(1), torch.full((3,), float(k))) and bool((dec[:, 0] == 1).all())
    if name not in ("pool",):  # per-input decisions
        assert not all(torch.equal(dec[0], dec[i]) for i in (1, 2)), dec
    rows = text_rows(b)
    same = (logits[rows] - forced[rows]).abs().max()
    if (name, kw) in (("pool", {}), ("visionzip", {})):
        assert same > 1e-4  # pooled / merged states differ from the kept tokens' own
    else:
        assert same < 1e-5
    # the same cost accounting: the baseline's overhead rows where the forced run has the trimmer's
    base = [r for r in ctx.records if r.kind != "const"]
    own = [r for r in cf.records if r.kind != "token_trimmer"]
    assert torch.allclose(total_macs(base), total_macs(own))
    extra = [r.name for r in ctx.records if r.kind == "const"]
    assert extra == ([] if name in ("random", "pool") else [f"{KEY}/{name}" + {
        "divprune": "-distances", "dart": "-similarity", "visionzip": "-scores",
        "fastv": f"-first-{kw.get('K', 2)}-layers"}[name]]), extra
    if name == "fastv" and "K" not in kw:
        with torch.no_grad():
            g = applied.generate(b, max_new_tokens=3, do_sample=False)
            assert torch.equal(g, m.generate(b, mode="hard", forced={KEY: dec}, max_new_tokens=3, do_sample=False))


def test_pool_gives_the_language_model_window_means(model):
    m, b = model
    seen = {}
    h = m.hf.model.language_model.register_forward_pre_hook(lambda mod, a, kw: seen.update(kw), with_kwargs=True)
    try:
        with torch.no_grad():
            _, ctx = get_baseline("pool", keep_ratio=0.25).apply(m).run(b, record=True)  # 6 x 6 -> 3 x 3
    finally:
        h.remove()
    f = feats(m, b)
    win = grid_windows(6, 3)
    assert torch.equal(win.reshape(6, 6)[:2, :2], torch.zeros(2, 2, dtype=torch.long)) and int(win.max()) == 8
    dec = ctx.decisions[KEY] > 0.5
    assert torch.equal(dec[0].nonzero().squeeze(1), torch.tensor([0, 2, 4, 12, 14, 16, 24, 26, 28]))
    emb = seen["inputs_embeds"]
    for i in range(3):
        real = seen["attention_mask"][i] > 0
        ids = b["input_ids"][i][b["attention_mask"][i] > 0][seen["position_ids"][i][real]]  # packed: original ids
        got = emb[i][real][ids == IMAGE]  # the 9 pooled tokens, in grid order
        want = torch.stack([f[i][win == w].mean(0) for w in range(9)])
        assert (got - want).abs().max() < 1e-5


@pytest.mark.parametrize("name", ["divprune", "fastv"])
def test_calibration_reaches_the_target(model, name):
    m, b = model
    bl = get_baseline(name)
    lo = measure(m, get_baseline(name, keep_ratio=0.0), [b])["ratio"]
    hi = measure(m, get_baseline(name, keep_ratio=1.0), [b])["ratio"]
    target = (lo + hi) / 2
    calibrate(m, bl, [b], target, tol=0.02)
    assert bl.calibration["reached"] and abs(measure(m, bl, [b])["ratio"] - target) <= 0.02, (lo, hi, bl.calibration)
    assert 0.0 < bl.keep_ratio < 1.0


class _Traced(torch.nn.Module):
    def __init__(self, m, policy):
        super().__init__()
        self.m, self.policy = m, policy

    def forward(self, ids, mask, pixels):
        return self.m(ids, mask, pixels, ctx=self.m.make_context(mode="hard", policy=self.policy))


@pytest.mark.parametrize("name", ["divprune", "dart", "pool"])
def test_recorded_cost_equals_fvcore(model, name):
    """fvcore counts the traced hard forward with the rule inside it (its similarity products included)."""
    from fvcore.nn import FlopCountAnalysis

    m, b = model
    applied = get_baseline(name, keep_ratio=R).apply(m)
    with eager(m):
        for i in range(2):
            x = one(b, i)
            with torch.no_grad():
                _, ctx = applied.run(x, record=True)
                fa = FlopCountAnalysis(_Traced(m, applied.kwargs["policy"]),
                                       (x["input_ids"], x["attention_mask"], x["pixel_values"]))
                fa.unsupported_ops_warnings(False)
                fa.uncalled_modules_warnings(False)
                fa.tracer_warnings("none")
                counted = fa.total()
            assert float(total_macs(ctx.records)[0]) == pytest.approx(float(counted), rel=1e-9), (name, i)
            assert total_macs(ctx.records)[0] < total_macs(ctx.records, full=True)[0]


def min_pairwise(d, keep):
    idx = keep.nonzero().squeeze(1)
    sub = d[idx][:, idx] + torch.eye(len(idx)) * 1e9
    return float(sub.min())


def test_divprune_keeps_a_more_diverse_set_than_random(model):
    m, b = model
    with torch.no_grad():
        _, ctx = get_baseline("divprune", keep_ratio=R).apply(m).run(b, record=True)
    d = cosine_distances(feats(m, b))
    N, k = m.config.image_tokens, n_keep(R, m.config.image_tokens)
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        div = min_pairwise(d[i], ctx.decisions[KEY][i] > 0.5)
        rand = []
        for _ in range(20):
            keep = torch.zeros(N, dtype=torch.bool)
            keep[torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(N - 1, generator=g)[:k - 1]])] = True
            rand.append(min_pairwise(d[i], keep))
        assert div > max(rand), (div, rand)


def test_dart_keeps_the_pivots_and_the_tokens_least_like_them(model):
    m, b = model
    f = feats(m, b)
    k = n_keep(R, m.config.image_tokens)
    for p in (1, 3):
        with torch.no_grad():
            _, ctx = get_baseline("dart", keep_ratio=R, pivots=p).apply(m).run(b, record=True)
        dec = ctx.decisions[KEY] > 0.5
        for i in range(3):
            piv = 1 + f[i, 1:].abs().sum(-1).argsort(descending=True)[:p]  # largest L1 norms, token 0 aside
            assert bool(dec[i, piv].all())
            if p == 1:  # one pivot: the rest are the k - 2 tokens least similar to it
                sim = torch.nn.functional.cosine_similarity(f[i], f[i, piv], dim=-1)
                sim[0], sim[piv] = float("inf"), float("inf")
                want = set(sim.argsort()[:k - 2].tolist()) | {0, int(piv)}
                assert set(dec[i].nonzero().squeeze(1).tolist()) == want
        assert torch.equal(dec, dart_select(f, k, p)[0])


def test_visionzip_dominant_tokens_are_the_top_cls_attention(model):
    m, b = model
    layers, li = feature_layer(m)
    assert li == len(layers) - 2  # LLaVA's feature layer -2: the output of the second-to-last layer
    with eager(m), torch.no_grad():
        out = m.hf.model.vision_tower(b["pixel_values"], output_attentions=True)
        ref = out.attentions[li][:, :, 0, 1:].sum(1)  # [CLS] row, patches, summed over heads
    got, _ = tower_attention(m, b["pixel_values"])
    assert (got - ref).abs().max() < 1e-5
    with torch.no_grad():
        _, ctx = get_baseline("visionzip", keep_ratio=R, contextual=0).apply(m).run(b, record=True)
    k = n_keep(R, m.config.image_tokens)
    for i in range(3):
        top = set((1 + ref[i, 1:].argsort(descending=True)[:k - 1]).tolist()) | {0}
        assert set((ctx.decisions[KEY][i] > 0.5).nonzero().squeeze(1).tolist()) == top


def test_visionzip_contextual_tokens_merge_the_rest_before_the_projector(model):
    """k = 11 of 36 at r = 0.3: 9 dominant, 2 contextual (round(11 * 10 / 64)); each contextual token = its
    target's feature-layer state + the mean of the tokens whose keys are closest to it, projected, at the target."""
    m, b = model
    seen = {}
    h = m.hf.model.language_model.register_forward_pre_hook(lambda mod, a, kw: seen.update(kw), with_kwargs=True)
    try:
        with torch.no_grad():
            _, ctx = get_baseline("visionzip", keep_ratio=R).apply(m).run(b, record=True)
    finally:
        h.remove()
    layers, li = feature_layer(m)
    layer = layers[li]
    with eager(m), torch.no_grad():
        out = m.hf.model.vision_tower(b["pixel_values"], output_attentions=True, output_hidden_states=True)
        keys = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[li])).view(3, 37, 4, -1).mean(2)[:, 1:]
        for i in range(3):
            att = out.attentions[li][i, :, 0, 1:].sum(0)
            dom = {0} | set((1 + att[1:].argsort(descending=True)[:8]).tolist())
            rest = [j for j in range(36) if j not in dom]
            targets = rest[::len(rest) // 2][:2]
            groups = {t: [] for t in targets}
            for j in rest:
                if j not in targets:
                    sims = [float(torch.cosine_similarity(keys[i, j], keys[i, t], dim=0)) for t in targets]
                    groups[targets[sims.index(max(sims))]].append(j)
            assert set((ctx.decisions[KEY][i] > 0.5).nonzero().squeeze(1).tolist()) == dom | set(targets)
            real = seen["attention_mask"][i] > 0
            pos = seen["position_ids"][i][real]
            first = int((b["input_ids"][i][b["attention_mask"][i] > 0] == IMAGE).nonzero()[0])
            hid = out.hidden_states[li + 1][i, 1:]
            for t in targets:
                want = m.hf.model.multi_modal_projector(hid[t] + hid[groups[t]].mean(0))
                got = seen["inputs_embeds"][i][real][pos == first + t][0]
                assert (got - want).abs().max() < 1e-5


@pytest.mark.parametrize("K", [1, 2])
def test_fastv_scores_are_layer_k_attention_of_the_last_prompt_token(model, K):
    m, b = model
    with torch.no_grad():
        got, _ = fastv_scores(m, b, K)
        p = m.prefill(b["input_ids"], b["attention_mask"], b["pixel_values"], m.make_context(mode="full"))
        with eager(m):
            out = m.hf.model.language_model(inputs_embeds=p.embeds, attention_mask=p.mask, position_ids=p.pos,
                                            output_attentions=True, use_cache=False)
    att = out.attentions[K - 1][:, :, -1].mean(1)  # left padding: the last column is the last prompt token
    img = b["input_ids"] == IMAGE
    ref = torch.stack([att[i][img[i]] for i in range(3)])
    assert (got - ref).abs().max() < 1e-6
    # right padding: the last real token, not the last column
    order = torch.argsort((b["attention_mask"] == 0).long(), dim=1, stable=True)
    right = {k: (v.gather(1, order) if k != "pixel_values" else v) for k, v in b.items()}
    with torch.no_grad():
        got_r, _ = fastv_scores(m, right, K)
    assert (got_r - got).abs().max() < 1e-5


def test_fastv_cost_options(model):
    """``run``: the trimmed run plus K full layers; ``fastv``: FastV's own cost, the first K layers at full length
    and the rest on the kept tokens (from the forced run's records: its lm_i rows with full=True for i < K)."""
    from smarttrim_cli.trim.cost import layer_macs

    m, b = model
    with torch.no_grad():
        _, run = get_baseline("fastv", keep_ratio=R, K=1).apply(m).run(b, record=True)
        _, own = get_baseline("fastv", keep_ratio=R, K=1, cost="fastv").apply(m).run(b, record=True)
        _, cf = m.run(b, mode="hard", forced={KEY: run.decisions[KEY]}, record=True)
    base = [r for r in cf.records if r.kind != "token_trimmer"]
    lm0 = next(r for r in base if r.name == "lm_0")
    assert torch.allclose(total_macs(run.records), total_macs(base) + layer_macs(lm0, full=True))
    assert torch.allclose(total_macs(own.records), total_macs(base) + layer_macs(lm0, full=True) - layer_macs(lm0))
    with pytest.raises(SmartTrimError, match="cost"):
        get_baseline("fastv", cost="nope")


@pytest.mark.parametrize("name,kw", [c for c in CASES if c[0] != "random"], ids=ids_)
def test_a_batch_keeps_what_each_input_keeps_alone(model, name, kw):
    m, b = model
    applied = get_baseline(name, keep_ratio=R, **kw).apply(m)
    with torch.no_grad():
        logits, ctx = applied.run(b, record=True)
        rows = text_rows(b)
        for i in range(3):
            x = one(b, i)
            alone, c1 = applied.run(x, record=True)
            assert torch.equal(c1.decisions[KEY][0], ctx.decisions[KEY][i]), (name, i)
            keep = b["attention_mask"][i] > 0
            assert (alone[0][rows[i][keep]] - logits[i][rows[i]]).abs().max() < 1e-5


def test_qwen2_siglip_tower_without_cls(tmp_path):
    """A SigLIP tower has no [CLS]: VisionZip ranks by the mean attention each token receives; FastV reads a Qwen2
    layer (biased q/k projections); every rule keeps its count on the 4 x 4 grid."""
    src = write_tiny_llava(tmp_path / "qs", seed=2, text="qwen2", vision="siglip")
    m = from_hf_dir(src)[0].eval()
    b = tiny_inputs(src, PROMPTS[:2])
    layers, li = feature_layer(m)
    with eager(m), torch.no_grad():
        out = m.hf.model.vision_tower(b["pixel_values"], output_attentions=True)
        ref = out.attentions[li].sum(1).mean(1)  # summed over heads, averaged over queries
        p = m.prefill(b["input_ids"], b["attention_mask"], b["pixel_values"], m.make_context(mode="full"))
        lm = m.hf.model.language_model(inputs_embeds=p.embeds, attention_mask=p.mask, position_ids=p.pos,
                                       output_attentions=True, use_cache=False)
    assert (tower_attention(m, b["pixel_values"])[0] - ref).abs().max() < 1e-5
    att = lm.attentions[1][:, :, -1].mean(1)
    img = b["input_ids"] == IMAGE
    with torch.no_grad():
        assert (fastv_scores(m, b, 2)[0] - torch.stack([att[i][img[i]] for i in range(2)])).abs().max() < 1e-6
        for name in ("pool", "visionzip", "divprune", "dart", "fastv"):
            _, ctx = get_baseline(name, keep_ratio=0.25).apply(m).run(b, record=True)
            assert torch.equal(ctx.decisions[KEY].sum(1), torch.full((2,), 4.0)), name
