"""The core's own checks on tiny METER models: cost falls with the threshold, token fusion is exact where
it should be. Invariants 2-5 run on every family in test_family_conformance.py."""
import torch

from smarttrim_cli.backbones.meter import default_trim_config
from smarttrim_cli.trim.cost import total_macs

from tiny_meter import batch, tiny_model


def trimmed(task, init_keep=0.0, seed=0, fuse=False):
    m = tiny_model(task, seed)
    t = default_trim_config(m.config)
    t.init_keep = init_keep  # ~half the tokens and heads dropped at threshold 0.5
    t.fuse = bool(fuse)
    if fuse == "nearest":
        t.fuse_mode = "nearest"
    m.attach_trimmers(t)
    torch.manual_seed(seed + 7)
    for p in m.trimmer_parameters():  # random trimmers with varied decisions per instance
        with torch.no_grad():
            p.add_(torch.randn_like(p) * 0.5)
    return m.eval()


def test_cost_model_falls_with_threshold():
    m = trimmed("vqa")
    b = batch(m, B=1, pad_rows=())
    costs = []
    with torch.no_grad():
        for thr in (1e-9, 0.3, 0.5, 0.7, 0.99):
            _, ctx = m.run(b, mode="hard", threshold=thr, record=True)
            costs.append(float(total_macs(ctx.records)[0]))
    assert costs == sorted(costs, reverse=True) and costs[0] > costs[-1]


def test_fusion_with_identical_tokens_is_exact():
    """Token fusion's proportional attention: when the dropped tokens are identical, attention over the kept
    tokens plus the fused one (weighted by log size) is attention over all of them, so trimming image tokens
    with fusion changes nothing, in every layer kind (self- and cross-attention), while without fusion the
    same drops do."""
    outs = {}
    for fuse in (False, True, "nearest"):
        m = trimmed("vqa", fuse=fuse)
        with torch.no_grad():  # no positions: every patch of a uniform image is the same token in every layer
            m.vit_model.visual.positional_embedding[1:] = m.vit_model.visual.positional_embedding[1]
        b = batch(m, B=3)
        with torch.no_grad():
            _, sctx = m.run(b, mode="soft", record=True)
        g = torch.Generator().manual_seed(1)  # random image-token decisions ([CLS] kept); text tokens and heads all kept
        forced = {k: (torch.cat([torch.ones_like(v[:, :1]), (torch.rand(v[:, 1:].shape, generator=g) < 0.5).to(v.dtype)], 1)
                      if k.startswith(("tok:vision", "tok:ximage")) else torch.ones_like(v))
                  for k, v in sctx.decisions.items()}
        kept = forced["tok:vision_1"][:, 1:].sum(1)
        assert ((kept > 0) & (kept < forced["tok:vision_1"].shape[1] - 1)).all(), kept
        b["pixel_values"] = torch.ones_like(b["pixel_values"]) * torch.tensor([0.3, -0.2, 0.5]).view(1, 3, 1, 1)
        with torch.no_grad():
            full, _ = m.run(b, mode="full")
            hard, _ = m.run(b, mode="hard", forced=forced)
            soft, _ = m.run(b, mode="soft", forced=forced)
        outs[fuse] = ((hard - full).abs().max().item(), (soft - full).abs().max().item())
    assert outs[True][0] < 1e-4 and outs[True][1] < 1e-4, outs
    assert outs["nearest"][0] < 1e-4 and outs["nearest"][1] < 1e-4, outs
    assert outs[False][0] > 1e-3, outs  # without fusion the same drops change the output


def test_fused_token_carries_the_dropped_size():
    from smarttrim_cli.trim.fusion import fuse_dropped

    x = torch.arange(12, dtype=torch.float32).view(1, 4, 3)
    size = torch.tensor([[1.0, 2.0, 1.0, 3.0]])
    alive = torch.ones(1, 4)
    kept = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    logits = torch.tensor([[5.0, -1.0, 2.0, -0.5]])
    x2, size2, kept2 = fuse_dropped(x, size, alive, kept, logits)
    # tokens 1 (size 2) and 3 (size 3) merge into token 3 (the dropped one scored highest): mean weighted 2:3
    assert kept2.tolist() == [[1.0, 0.0, 1.0, 1.0]] and size2.tolist() == [[1.0, 2.0, 1.0, 5.0]]
    assert torch.allclose(x2[0, 3], (2 * x[0, 1] + 3 * x[0, 3]) / 5) and torch.equal(x2[0, :3], x[0, :3])
    # nothing dropped: nothing changes
    x3, size3, kept3 = fuse_dropped(x, size, alive, alive.clone(), logits)
    assert torch.equal(x3, x) and torch.equal(size3, size) and torch.equal(kept3, alive)


def test_nearest_fusion_joins_fragments_to_their_token_and_background_to_the_catch_all():
    from smarttrim_cli.trim.fusion import fuse_nearest

    red, blue, grey = torch.tensor([1.0, 0, 0]), torch.tensor([0, 1.0, 0]), torch.tensor([0, 0, 1.0])
    cls = torch.tensor([1.0, 1.0, 1.0])
    # slots: [CLS], red (kept), red fragment, blue (kept), grey, grey, blue fragment, dead padding slot
    x = torch.stack([cls, red, 0.9 * red + 0.1 * grey, blue, grey, grey * 1.1, blue + 0.2 * grey, red]).unsqueeze(0)
    size = torch.ones(1, 8)
    alive = torch.tensor([[1.0, 1, 1, 1, 1, 1, 1, 0]])
    kept = torch.tensor([[1.0, 1, 0, 1, 0, 0, 0, 0]])
    logits = torch.tensor([[9.0, 5, -1, 5, 0.5, -2, -3, 0]])
    x2, size2, kept2, macs = fuse_nearest(x, size, alive, kept, logits)
    # the red fragment joins red, the blue one joins blue, the two grey tokens become the catch-all at slot 4
    # (the dropped token scored highest); [CLS] absorbs nothing and the dead slot stays dead
    assert kept2.tolist() == [[1.0, 1, 0, 1, 1, 0, 0, 0]]
    assert size2[0, [0, 1, 3, 4]].tolist() == [1.0, 2.0, 2.0, 2.0]
    assert torch.allclose(x2[0, 1], (x[0, 1] + x[0, 2]) / 2) and torch.allclose(x2[0, 3], (x[0, 3] + x[0, 6]) / 2)
    assert torch.allclose(x2[0, 4], (x[0, 4] + x[0, 5]) / 2) and torch.equal(x2[0, 0], x[0, 0])
    assert macs.item() == 2 * 7 * 7 * 3
    # nothing dropped: nothing changes
    x3, size3, kept3, _ = fuse_nearest(x, size, alive, alive.clone(), logits)
    assert torch.equal(x3, x) and torch.equal(size3, size) and torch.equal(kept3, alive)
