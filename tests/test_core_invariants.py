"""Invariants 2-4 of shared/DESIGN.md on tiny METER models, for every task head."""
import pytest
import torch
from fvcore.nn import FlopCountAnalysis

from smarttrim_cli.backbones.meter import default_trim_config
from smarttrim_cli.trim.cost import total_macs

from tiny_meter import batch, tiny_model

TASKS = ["vqa", "nlvr2", "snli", "retrieval"]


def trimmed(task, init_keep=0.0, seed=0):
    m = tiny_model(task, seed)
    t = default_trim_config(m.config)
    t.init_keep = init_keep  # ~half the tokens and heads dropped at threshold 0.5
    m.attach_trimmers(t)
    torch.manual_seed(seed + 7)
    for p in m.trimmer_parameters():  # random trimmers with varied decisions per instance
        with torch.no_grad():
            p.add_(torch.randn_like(p) * 0.5)
    return m.eval()


@pytest.mark.parametrize("task", TASKS)
def test_hard_keep_all_equals_full(task):
    m = trimmed(task)
    b = batch(m)
    with torch.no_grad():
        full, _ = m.run(b, mode="full")
        hard, ctx = m.run(b, mode="hard", threshold=1e-12, record=True)
    assert torch.allclose(full, hard, atol=1e-5), (full - hard).abs().max()
    # and it really kept everything (the threshold path was exercised, not skipped)
    assert ctx.decisions and all(v.all() for k, v in ctx.decisions.items() if k.startswith("head:"))


@pytest.mark.parametrize("task", TASKS)
def test_hard_equals_soft_given_same_decisions(task):
    m = trimmed(task)
    b = batch(m, B=4)
    with torch.no_grad():
        soft, sctx = m.run(b, mode="soft", record=True)
        hard, hctx = m.run(b, mode="hard", record=True, forced=sctx.decisions)
        full, _ = m.run(b, mode="full")
    assert torch.allclose(soft, hard, atol=1e-4), (soft - hard).abs().max()
    assert not torch.allclose(full, hard, atol=1e-3), "decisions changed nothing: the test would not see a bug"
    kept = sctx.decisions["tok:vision_1"].sum(1)
    assert len(set(kept.tolist())) > 1, "instances should keep different token counts"
    # the per-instance costs of the two paths agree as well
    assert torch.allclose(total_macs(sctx.records).double(), total_macs(hctx.records).double(), rtol=1e-6)


def test_soft_eval_decides_like_hard():
    """Without forcing, soft mode in eval takes the same threshold decisions as hard mode."""
    m = trimmed("vqa")
    b = batch(m, B=4)
    with torch.no_grad():
        soft, _ = m.run(b, mode="soft")
        hard, _ = m.run(b, mode="hard")
    assert torch.allclose(soft, hard, atol=1e-4)


def test_soft_mode_is_differentiable_in_trimmers():
    m = trimmed("vqa").train()
    b = batch(m)
    logits, ctx = m.run(b, mode="soft", record=True, tau=1.0)
    from smarttrim_cli.trim.cost import macs_ratio
    loss = logits.pow(2).mean() + macs_ratio(ctx.records).mean()
    loss.backward()
    grads = [p.grad for p in m.trimmer_parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


class _Hard(torch.nn.Module):
    def __init__(self, m, mode):
        super().__init__()
        self.m, self.mode = m, mode

    def forward(self, px, ids, mask):
        return self.m(px, ids, mask, ctx=self.m.make_context(mode=self.mode))


@pytest.mark.parametrize("mode", ["full", "hard"])
@pytest.mark.parametrize("task", ["vqa", "snli"])
def test_cost_model_equals_fvcore(task, mode):
    m = trimmed(task)
    b = batch(m, B=1, T=7, pad_rows=())
    with torch.no_grad():
        _, ctx = m.run(b, mode=mode, record=True)
        fa = FlopCountAnalysis(_Hard(m, mode), (b["pixel_values"], b["input_ids"], b["attention_mask"]))
        fa.unsupported_ops_warnings(False)
        fa.uncalled_modules_warnings(False)
        counted = fa.total()
    ours = float(total_macs(ctx.records)[0])
    assert abs(ours - counted) / counted < 0.01, (ours, counted)
    if mode == "hard":
        assert ours < float(total_macs(ctx.records, full=True)[0]) * 0.95  # trimming really cut the count


def test_cost_model_falls_with_threshold():
    m = trimmed("vqa")
    b = batch(m, B=1, pad_rows=())
    costs = []
    with torch.no_grad():
        for thr in (1e-9, 0.3, 0.5, 0.7, 0.99):
            _, ctx = m.run(b, mode="hard", threshold=thr, record=True)
            costs.append(float(total_macs(ctx.records)[0]))
    assert costs == sorted(costs, reverse=True) and costs[0] > costs[-1]
