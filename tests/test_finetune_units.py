"""The pieces of the finetune objective and loop on their own: the budget penalty's data-parallel
surrogate, the curricula, the resumable sampler, the per-input noise, gradient accumulation."""
from __future__ import annotations

import pytest
import torch

from smarttrim_cli.train import curriculum as cur
from smarttrim_cli.train.distributed import InstanceNoise, ResumableSampler
from smarttrim_cli.train.losses import budget_loss, distill_loss, global_stats, task_loss


pytestmark = pytest.mark.usefixtures("one_thread")


def test_budget_surrogate_gradient_equals_global_penalty():
    """Two 'ranks' with the surrogate, gradients averaged (what DDP does), equal the gradient of the
    penalty lam*(m-t)^2 + nu*(m-t) + mu*var on the whole batch."""
    torch.manual_seed(0)
    z = torch.randn(8, requires_grad=True)
    lam, nu, mu, t = 7.0, 0.3, 0.5, 0.4
    r = torch.sigmoid(z)
    m = r.mean()
    exact = lam * (m - t) ** 2 + nu * (m - t) + mu * ((r * r).mean() - m * m)
    (g_exact,) = torch.autograd.grad(exact, z)

    stats = global_stats(r.detach())  # the all-reduced statistics of the whole batch
    grads = []
    for half in (slice(0, 4), slice(4, 8)):
        zz = z.detach().clone().requires_grad_(True)
        loss, parts = budget_loss(torch.sigmoid(zz)[half], t, stats, lam, nu, mu)
        (g,) = torch.autograd.grad(loss, zz)
        grads.append(g)
        assert float(loss.detach()) == pytest.approx(float(exact.detach()), rel=1e-5)  # the value is the penalty
    torch.testing.assert_close((grads[0] + grads[1]) / 2, g_exact, rtol=1e-5, atol=1e-7)
    # the batch MEAN is constrained, not each input: inputs below the target are not pushed up
    e = float(m.detach()) - t
    assert float(parts["cost"]) == pytest.approx(lam * e ** 2 + nu * e, rel=1e-5)


def test_losses():
    logits = torch.tensor([[2.0, -1.0, 0.0]])
    soft = torch.tensor([[1.0, 0.0, 0.3]])
    assert float(task_loss(logits, soft)) == pytest.approx(
        3 * float(torch.nn.functional.binary_cross_entropy_with_logits(logits, soft)))
    assert float(task_loss(logits, torch.tensor([0]))) == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits, torch.tensor([0]))))
    # distillation is minimal when the student equals the teacher
    for ml in (True, False):
        same = float(distill_loss(logits, logits, ml))
        other = float(distill_loss(logits, -logits, ml))
        assert other > same
    assert float(distill_loss(logits, logits, False)) == pytest.approx(0.0, abs=1e-6)


def test_curricula():
    assert cur.target_ratio(0, 100, 0.33, 0.5) == 1.0
    assert cur.target_ratio(25, 100, 0.33, 0.5) == pytest.approx((1 + 0.33) / 2)
    assert cur.target_ratio(50, 100, 0.33, 0.5) == pytest.approx(0.33)
    assert cur.target_ratio(99, 100, 0.33, 0.5) == pytest.approx(0.33)
    assert cur.target_ratio(10, 100, 0.5, 0.5, hold=0.2) == 1.0
    assert cur.temperature(0, 100, 1.0, 0.25) == 1.0 and cur.temperature(100, 100, 1.0, 0.25) == pytest.approx(0.25)
    assert cur.noise_scale(0, 100) == 1.0 and cur.noise_scale(75, 100, 1.0, 0.3) == pytest.approx(0.3)
    lr = [cur.lr_factor(s, 100, 0.1) for s in range(100)]
    assert lr[9] < lr[10] == pytest.approx(1.0, abs=0.02) and lr[-1] < 0.02
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))


def test_sampler_global_batches_do_not_depend_on_world_size():
    one = ResumableSampler(21, 0, 1, seed=3).order()
    two = [ResumableSampler(21, r, 2, seed=3).order() for r in range(2)]
    assert sorted(one) == list(range(21)) and len(two[0]) == len(two[1]) == 11
    B = 4  # global batch 4: one process takes 4, each of 2 ranks takes 2
    for k in range(5):
        assert sorted(one[k * B:(k + 1) * B]) == sorted(two[0][k * 2:(k + 1) * 2] + two[1][k * 2:(k + 1) * 2])
    s = ResumableSampler(21, 0, 1, seed=3)
    s.set_epoch(0, start=8)
    assert list(s) == one[8:]
    s.set_epoch(1)
    assert list(s) != one and sorted(s) == list(range(21))
    ev = [ResumableSampler(5, r, 2, shuffle=False, pad=False).order() for r in range(2)]
    assert ev == [[0, 2, 4], [1, 3]]


def test_instance_noise_is_per_input_and_uniform():
    logits = torch.zeros(3, 500)
    a = InstanceNoise(0, 5, torch.tensor([7, 8, 9]))("tok:vision_2", logits)
    b = InstanceNoise(0, 5, torch.tensor([9, 7]))("tok:vision_2", logits[:2])
    assert torch.equal(a[2], b[0]) and torch.equal(a[0], b[1])  # the same input gets the same noise
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(a, InstanceNoise(0, 6, torch.tensor([7, 8, 9]))("tok:vision_2", logits))
    assert not torch.equal(a, InstanceNoise(0, 5, torch.tensor([7, 8, 9]))("tok:vision_4", logits))
    assert 0 < float(a.min()) and float(a.max()) < 1 and abs(float(a.mean()) - 0.5) < 0.03
    assert abs(float((a < 0.1).float().mean()) - 0.1) < 0.03
    flat = InstanceNoise(0, 5, torch.tensor([7, 8, 9]), scale=0.0)("tok:vision_2", logits)
    assert torch.allclose(flat, torch.full_like(flat, 0.5))  # scale 0: the deterministic decision


def test_grad_accumulation_matches_one_batch(tmp_path):
    from test_finetune_data import model_for, write_vqa
    from smarttrim_cli.train.loop import finetune

    data = write_vqa(tmp_path / "vqa", n_train=16, n_val=8)
    model = model_for(tmp_path, "vqa")
    ov = dict(data_dir=str(data), batch_size=8, max_steps=2, workers=0, lr=1e-3, trim=False, eval_before=False,
              save_every=0, log_every=1)
    a = finetune(model, tmp_path / "a", overrides=ov, recipe=False, progress=False)
    b = finetune(model, tmp_path / "b", overrides=dict(ov, grad_accum=2), recipe=False, progress=False)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    worst = max(float((sa[k] - sb[k]).abs().max()) for k in sa)
    assert worst < 1e-4, worst  # Adam turns float rounding in near-zero gradients into ~1% of a step


def test_floor_loss_value_and_gradient():
    """The per-position floor: zero when every position keeps at least the floor on batch average; else the
    squared shortfall summed over positions, with the gradient of that expression on each input's share."""
    from smarttrim_cli.train.losses import floor_loss

    a = torch.tensor([0.1, 0.3], requires_grad=True)   # mean 0.2: 0.13 short of 0.33
    b = torch.tensor([0.5, 0.6], requires_grad=True)   # above the floor: no term
    loss = floor_loss({"tok:vision_1": a, "tok:ximage_0": b}, 0.33)
    assert loss.item() == pytest.approx(0.13 ** 2, rel=1e-5)
    loss.backward()
    assert torch.allclose(a.grad, torch.full((2,), -2 * 0.13 / 2), atol=1e-6)
    assert torch.all(b.grad == 0)
    assert floor_loss({"k": torch.tensor([0.4, 0.5])}, 0.33).item() == 0.0


def test_floor_term_enters_the_loss_only_when_weighted(tmp_path):
    """Soft-mode training records each token position's kept share, and the floor term enters the loss
    (logged as 'floor') only when floor_weight > 0."""
    from test_finetune_data import model_for, write_vqa

    from smarttrim_cli.train.loop import finetune

    data = write_vqa(tmp_path / "vqa")
    model = model_for(tmp_path, "vqa")
    base = dict(data_dir=str(data), dataset="vqa", batch_size=4, max_steps=3, target_ratio=0.3, curriculum=0.0,
                eval_before=False, calibrate=False, workers=0, log_every=1)
    on = finetune(model, tmp_path / "on", overrides=dict(base, floor_weight=50.0), recipe=False, progress=False)
    off = finetune(model, tmp_path / "off", overrides=base, recipe=False, progress=False)
    s_on = [r for r in on.history if r["event"] == "step"]
    s_off = [r for r in off.history if r["event"] == "step"]
    assert all("floor" in r and r["floor"] >= 0 for r in s_on) and not any("floor" in r for r in s_off)
    # same first batch, same weights: the losses differ by exactly the weighted floor term
    assert s_on[0]["loss"] == pytest.approx(s_off[0]["loss"] + 50.0 * s_on[0]["floor"], rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("teacher", ["self", "start"])
def test_teacher_is_the_current_or_the_starting_weights(tmp_path, teacher):
    """teacher=self distils from the full pass of the weights being trained; teacher=start from a frozen copy of
    the weights the objective was built with, whatever training does to the model afterwards."""
    import smarttrim_cli
    from test_finetune_data import model_for

    from smarttrim_cli.train.config import TrainConfig
    from smarttrim_cli.train.objectives import SoftTargetClassification
    from smarttrim_cli.train.rules import LearnedTrimmers
    from smarttrim_cli.train.step import TrainStep

    m = smarttrim_cli.load(model_for(tmp_path, "vqa"), mode="soft").model.train()
    g = torch.Generator().manual_seed(0)
    B, c = 3, m.config
    pix = torch.randn(B, 3, c.image_size, c.image_size, generator=g)
    ids = torch.randint(5, 30, (B, 6), generator=g)
    att = torch.ones(B, 6, dtype=torch.long)
    target = torch.rand(B, c.num_labels, generator=g)
    with torch.no_grad():
        start_logits = m(pix, ids, att, ctx=m.make_context(mode="full"))
    cfg, rule = TrainConfig(teacher=teacher, noise_start=0.0), LearnedTrimmers()
    rule.bind(m, cfg, total=1)
    obj = TrainStep(m, cfg, rule, SoftTargetClassification(multilabel=True))
    assert not any(p is q for p in obj.parameters() for q in (obj._teacher[0].parameters() if obj._teacher else []))
    with torch.no_grad():  # "training" moves the weights
        for p in m.backbone_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        now_logits = m(pix, ids, att, ctx=m.make_context(mode="full"))
    rule.begin_step(0)  # no noise (noise_start=0): the trimmers (init keep-all) keep everything
    assert rule.noise == 0.0 and rule.tau == 1.0 and rule.target == 1.0
    _, parts = obj(pix, ids, att, target, torch.arange(B))
    # the student is the moved weights at full capacity; the teacher differs by setting
    want = distill_loss(now_logits, start_logits if teacher == "start" else now_logits, multilabel=True)
    other = distill_loss(now_logits, now_logits if teacher == "start" else start_logits, multilabel=True)
    assert abs(float(want - other)) > 1e-3  # the perturbation changes the logits enough to tell them apart
    assert float(parts["distill"]) == pytest.approx(float(want), rel=1e-4, abs=1e-5)


def test_teacher_setting_is_checked():
    from smarttrim_cli.errors import SmartTrimError
    from smarttrim_cli.train.config import TrainConfig

    with pytest.raises(SmartTrimError, match="teacher must be self or start"):
        TrainConfig(teacher="frozen").check()
