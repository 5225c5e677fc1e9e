"""The self-distillation variants (issue 19), each a training setting, each checked on what the student is trained
against: the same batch and weights under two settings, the teacher's logits and features captured, and the loss
terms compared with what they should be. Tiny METER model, one TrainStep forward (no training run) unless said."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import smarttrim_cli
from smarttrim_cli.errors import SmartTrimError
from smarttrim_cli.train import curriculum as cur
from smarttrim_cli.train.config import TrainConfig, build_config, parse_sets, run_settings
from smarttrim_cli.train.losses import distill_loss, task_loss
from smarttrim_cli.train.objectives import objective_for
from smarttrim_cli.train.rules import LearnedTrimmers
from smarttrim_cli.train.step import TrainStep


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from test_finetune_data import model_for

    return model_for(tmp_path_factory.mktemp("teacher"), "vqa")


def _model(model_dir, trimming=True):
    """The tiny model in training mode; ``trimming``: token trimmers at keep logit 0, so that (with the default
    Gumbel noise) the student drops about half of the tokens and differs from the full-capacity teacher."""
    m = smarttrim_cli.load(model_dir, mode="soft").model.train()
    if trimming:
        with torch.no_grad():
            for t in m.token_trimmers.values():
                t.fc2.bias.zero_()
    return m


def _batch(m, B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = m.config
    return (torch.randn(B, 3, c.image_size, c.image_size, generator=g), torch.randint(5, 30, (B, 6), generator=g),
            torch.ones(B, 6, dtype=torch.long), torch.rand(B, c.num_labels, generator=g), torch.arange(B))


def _step(m, batch, step=0, total=1, **settings):
    """One training forward under ``settings`` at optimizer step ``step`` of ``total`` -> (loss, parts, the logits
    of every forward of ``m`` in call order: [teacher, student] or [student])."""
    cfg = TrainConfig(**settings).check()
    rule = LearnedTrimmers()
    rule.bind(m, cfg, total)
    rule.begin_step(step)
    ts = TrainStep(m, cfg, rule, objective_for(m, "vqa", cfg))
    seen = []
    h = m.register_forward_hook(lambda mod, args, out: seen.append(out))
    try:
        loss, parts = ts(*batch)
    finally:
        h.remove()
    return loss, parts, seen


def _f(loss) -> float:
    return float(loss.detach())


def _penalties(parts):
    return float(parts["cost"]) + float(parts["spread"])  # the budget surrogate's value (floor off)


# ----- 1. none: distill_weight=0 -------------------------------------------------------------------------------
def test_no_distillation_runs_no_teacher_and_has_no_distill_term(model_dir):
    m = _model(model_dir)
    b = _batch(m)
    loss0, p0, seen0 = _step(m, b, distill_weight=0.0)
    loss1, p1, seen1 = _step(m, b)  # the default: distill_weight 1, teacher self
    assert len(seen0) == 1 and len(seen1) == 2            # the teacher pass is skipped, not only weighted by 0
    assert "distill" not in p0 and "distill" in p1
    assert _f(loss0) == pytest.approx(float(p0["task"]) + _penalties(p0), rel=1e-5)
    # same batch, weights and noise: the default adds exactly one distill term, which is not zero
    assert float(p1["distill"]) > 0.1
    assert _f(loss1) == pytest.approx(_f(loss0) + float(p1["distill"]), rel=1e-5)
    # teacher=start with nothing to distil makes no frozen copy either
    cfg = TrainConfig(teacher="start", distill_weight=0.0)
    rule = LearnedTrimmers()
    rule.bind(m, cfg, 1)
    assert TrainStep(m, cfg, rule, objective_for(m, "vqa", cfg))._teacher == ()


def test_no_distillation_run_logs_no_distill(tmp_path):
    """A run with distill_weight=0 trains, logs and plots with no distill part (the progress line and the plot
    read the log rows)."""
    from test_finetune_data import model_for, write_vqa

    from smarttrim_cli.train.loop import finetune

    data = write_vqa(tmp_path / "vqa", n_train=16, n_val=8)
    ov = dict(data_dir=str(data), dataset="vqa", batch_size=4, max_steps=2, eval_before=False, calibrate=False,
              workers=0, log_every=1, save_every=0, distill_weight=0.0)
    res = finetune(model_for(tmp_path, "vqa"), tmp_path / "out", overrides=ov, recipe=False, progress=False)
    steps = [r for r in res.history if r["event"] == "step"]
    assert len(steps) == 2 and not any("distill" in r for r in steps) and all("task" in r for r in steps)
    assert "plot_error" not in res.summary and (res.output / "training.png").is_file()


# ----- 2-3. the moving teacher (self) and the frozen start: tests/test_finetune_units.py ------------------------
# (test_teacher_is_the_current_or_the_starting_weights: moved weights, the distill term against each teacher)


# ----- 4. the teacher trained on the task too ------------------------------------------------------------------
def test_teacher_task_weight_trains_the_full_pass_with_detached_targets(model_dir):
    """teacher_task_weight=W adds W x task loss of the full-capacity logits, whose gradient reaches the weights
    through the full pass; the distillation target stays detached (else its gradient would add to the sum)."""
    W = 2.0
    m = _model(model_dir)
    b = _batch(m)
    pix, ids, att, target, _ = b
    grads = []
    for w in (0.0, W):
        m.zero_grad(set_to_none=True)
        loss, parts, seen = _step(m, b, teacher_task_weight=w)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
        if w == 0:
            loss0, parts0 = _f(loss), parts
            assert "teacher_task" not in parts and not seen[0].requires_grad  # the default teacher: no graph
    full_task = task_loss(seen[0].detach(), target)
    assert float(parts["teacher_task"]) == pytest.approx(float(full_task), rel=1e-5)
    assert float(parts["distill"]) == pytest.approx(float(parts0["distill"]), rel=1e-5)  # the same target
    assert _f(loss) == pytest.approx(loss0 + W * float(full_task), rel=1e-5)
    # gradient: that of the default loss plus W x that of the full pass's task loss, nothing more
    m.zero_grad(set_to_none=True)
    task_loss(m(pix, ids, att, ctx=m.make_context(mode="full")), target).backward()
    g_full = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    g0, gW = grads
    assert set(gW) == set(g0)
    moved = 0
    for n in g0:
        want = g0[n] + W * g_full.get(n, torch.zeros_like(g0[n]))
        torch.testing.assert_close(gW[n], want, rtol=1e-4, atol=1e-6, msg=n)
        moved += int(n in g_full and float(g_full[n].abs().max()) > 1e-6)
    assert moved > 10  # the backbone and head are reached through the full pass
    assert not any(n.startswith(("token_trimmers.", "head_trimmers.")) for n in g_full)  # trimmers off there


# ----- 5. fading distillation, temperature -----------------------------------------------------------------
def test_fade_schedule_values():
    f = lambda s, **kw: cur.distill_weight(s, 100, 1.0, schedule="fade", frac=0.5, **kw)  # noqa: E731
    assert f(0) == 1.0 and f(25) == pytest.approx(0.5) and f(50) == 0.0 and f(99) == 0.0
    assert f(25, end=0.2) == pytest.approx(0.6) and f(99, end=0.2) == pytest.approx(0.2)
    assert f(10, hold=0.2) == 1.0 and f(45, hold=0.2) == pytest.approx(0.5)   # follows the curriculum's hold
    assert f(25, shape="cosine") == pytest.approx(0.5) and f(10, shape="cosine") > f(10)
    assert cur.distill_weight(0, 100, 1.0, schedule="fade", frac=0.0) == 0.0  # no curriculum: faded already
    # the default (constant) is distill_weight at every step
    assert all(cur.distill_weight(s, 100, 0.7) == 0.7 for s in (0, 25, 50, 99))


def test_fade_weights_the_distill_term_by_step(model_dir):
    """At the start the faded weight is distill_weight, mid-curriculum half of it, at the end distill_weight_end
    (0: no teacher pass); the constant schedule keeps the full weight on the same batch at the same step."""
    m = _model(model_dir)
    b = _batch(m)
    fade = dict(distill_schedule="fade", curriculum=0.5, distill_weight=1.0)
    for step, alpha in ((0, 1.0), (25, 0.5), (50, 0.0), (99, 0.0)):
        loss_c, pc, _ = _step(m, b, step=step, total=100)
        loss_f, pf, seen = _step(m, b, step=step, total=100, **fade)
        assert float(pc["task"]) == pytest.approx(float(pf["task"]), rel=1e-6)  # same student pass
        assert _f(loss_c) == pytest.approx(float(pc["task"]) + float(pc["distill"]) + _penalties(pc), rel=1e-5)
        if alpha > 0:
            assert float(pf["distill"]) == pytest.approx(float(pc["distill"]), rel=1e-6)
            assert _f(loss_f) == pytest.approx(float(pf["task"]) + alpha * float(pf["distill"]) + _penalties(pf),
                                                  rel=1e-5)
        else:
            assert "distill" not in pf and len(seen) == 1
            assert _f(loss_f) == pytest.approx(float(pf["task"]) + _penalties(pf), rel=1e-5)
    # to a floor: distill_weight_end
    loss_e, pe, _ = _step(m, b, step=99, total=100, distill_weight_end=0.25, **fade)
    assert _f(loss_e) == pytest.approx(float(pe["task"]) + 0.25 * float(pe["distill"]) + _penalties(pe), rel=1e-5)


def test_fade_run_logs_its_weight_and_skips_the_faded_teacher(tmp_path):
    from test_finetune_data import model_for, write_vqa

    from smarttrim_cli.train.loop import finetune

    data = write_vqa(tmp_path / "vqa", n_train=16, n_val=8)
    ov = dict(data_dir=str(data), dataset="vqa", batch_size=4, max_steps=4, curriculum=0.5, eval_before=False,
              calibrate=False, workers=0, log_every=1, save_every=0, distill_schedule="fade")
    res = finetune(model_for(tmp_path, "vqa"), tmp_path / "out", overrides=ov, recipe=False, progress=False)
    steps = [r for r in res.history if r["event"] == "step"]
    assert [r["alpha"] for r in steps] == [1.0, 0.5, 0.0, 0.0]
    assert ["distill" in r for r in steps] == [True, True, False, False]
    assert "plot_error" not in res.summary  # the plot draws distill where the steps have it


def test_temperature_changes_the_target(model_dir):
    """distill_temperature=T: the student's logits / T against sigmoid(teacher / T) (VQA), so the soft targets move
    towards 0.5 and the term differs from T=1's on the same logits."""
    m = _model(model_dir)
    b = _batch(m)
    _, p1, seen1 = _step(m, b)
    _, p2, seen2 = _step(m, b, distill_temperature=2.0)
    teacher, student = seen2[0].detach().float(), seen2[1].detach().float()
    torch.testing.assert_close(teacher, seen1[0].detach().float())
    L = teacher.shape[1]
    for T, parts in ((1.0, p1), (2.0, p2)):
        want = F.binary_cross_entropy_with_logits(student / T, torch.sigmoid(teacher / T)) * L
        assert float(parts["distill"]) == pytest.approx(float(want), rel=1e-5)
    assert abs(float(p2["distill"]) - float(p1["distill"])) > 1e-3
    # the targets themselves: flatter at T=2
    assert float((torch.sigmoid(teacher / 2) - 0.5).abs().max()) < float((torch.sigmoid(teacher) - 0.5).abs().max())
    # single-label heads (NLVR2, SNLI-VE): KL of the tempered softmaxes times T^2
    s, t = torch.tensor([[1.0, -0.5, 0.2]]), torch.tensor([[2.0, 0.0, -1.0]])
    want = F.kl_div(F.log_softmax(s / 2, -1), F.softmax(t / 2, -1), reduction="batchmean") * 4
    assert float(distill_loss(s, t, False, 2.0)) == pytest.approx(float(want), rel=1e-5)


# ----- 6. last-hidden-state distillation: feature_weight ---------------------------------------------------
def test_feature_weight_distils_the_pooled_last_hidden_state(model_dir):
    """feature_weight=w adds w x MSE between the student's and the teacher's input to the head (the pooled [CLS]
    states of the last layer), the teacher's detached."""
    m = _model(model_dir)
    b = _batch(m)
    feats = []
    h = m.head().register_forward_pre_hook(lambda mod, args: feats.append(args[0].detach()))
    try:
        loss0, p0, _ = _step(m, b)
        feats.clear()
        loss1, p1, _ = _step(m, b, feature_weight=0.5)
    finally:
        h.remove()
    assert "feature" not in p0
    want = F.mse_loss(feats[1].float(), feats[0].float())  # [teacher, student]
    assert float(want) > 1e-5  # the trimmed student's pooled state differs from the full pass's
    assert float(p1["feature"]) == pytest.approx(float(want), rel=1e-5)
    assert _f(loss1) == pytest.approx(_f(loss0) + 0.5 * float(want), rel=1e-5)
    # it distils even with the logit distillation off (the teacher pass then runs for it alone)
    loss2, p2, seen = _step(m, b, distill_weight=0.0, feature_weight=0.5)
    assert len(seen) == 2 and _f(loss2) == pytest.approx(float(p2["task"]) + 0.5 * float(p2["feature"])
                                                            + _penalties(p2), rel=1e-5)


# ----- settings: --set, recipes, checks, cache keys, resume ------------------------------------------------
def test_variant_settings_parse_and_bad_values_are_one_line_errors(tmp_path):
    cfg, _ = build_config(False, parse_sets(["teacher_task_weight=1", "distill_schedule=fade",
                                             "distill_weight_end=0.2"]))
    assert (cfg.teacher_task_weight, cfg.distill_schedule, cfg.distill_weight_end) == (1.0, "fade", 0.2)
    rec = tmp_path / "r.yaml"
    rec.write_text("backbone: meter\ntask: vqa\ntrain:\n  distill_schedule: fade\n  teacher_task_weight: 0.5\n")
    cfg, _ = build_config(str(rec), {})
    assert (cfg.distill_schedule, cfg.teacher_task_weight) == ("fade", 0.5)
    for bad, msg in ((dict(distill_schedule="sometimes"), "distill_schedule must be constant or fade"),
                     (dict(distill_weight_end=0.3), "needs distill_schedule=fade"),
                     (dict(teacher="start", teacher_task_weight=1.0), "needs teacher=self"),
                     (dict(distill_weight=-1.0), "distill_weight must be >= 0"),
                     (dict(teacher_task_weight=-0.5), "teacher_task_weight must be >= 0"),
                     (dict(distill_temperature=0.0), "distill_temperature must be positive")):
        with pytest.raises(SmartTrimError, match=msg) as e:
            TrainConfig(**bad).check()
        assert "\n" not in str(e.value)


def test_recipe_distillation_defaults_load_as_documented():
    """recipes/easyvqa.yaml: no self-distillation, so no teacher pass at all (BENCHMARKS.md section 8, easy-VQA);
    --set distill_weight=1 brings the paper's moving self teacher back. recipes/scenes.yaml: the teacher trained on
    the task too (section 8, scenes); distill_weight=0 alone keeps that teacher's task loss (a teacher pass), both at 0
    no teacher pass at all."""
    from smarttrim_cli.train.step import uses_teacher

    easy, _ = build_config("easyvqa.yaml", {"dataset": "easyvqa"})
    assert (easy.distill_weight, easy.teacher, easy.distill_schedule, easy.teacher_task_weight,
            easy.distill_temperature, easy.feature_weight) == (0.0, "self", "constant", 0.0, 1.0, 0.0)
    assert not uses_teacher(easy)
    back, _ = build_config("easyvqa.yaml", {"dataset": "easyvqa", **parse_sets(["distill_weight=1"])})
    assert back.distill_weight == 1.0 and uses_teacher(back)
    scenes, _ = build_config("scenes.yaml", {"dataset": "vqa"})
    assert (scenes.distill_weight, scenes.teacher, scenes.distill_schedule, scenes.teacher_task_weight,
            scenes.distill_temperature, scenes.feature_weight) == (1.0, "self", "constant", 1.0, 1.0, 0.0)
    assert uses_teacher(scenes)
    half, _ = build_config("scenes.yaml", {"dataset": "vqa", **parse_sets(["distill_weight=0"])})
    assert half.teacher_task_weight == 1.0 and uses_teacher(half)
    off, _ = build_config("scenes.yaml", {"dataset": "vqa", **parse_sets(["distill_weight=0", "teacher_task_weight=0"])})
    assert off.distill_weight == 0.0 and not uses_teacher(off)


def test_new_settings_stay_out_of_cache_keys_at_their_defaults():
    """demo and pareto cache trained models under run_settings: a run that does not use the new settings keeps
    the key it had before they existed; one that does gets its own."""
    plain = run_settings(False, {})
    assert not {"teacher_task_weight", "distill_schedule", "distill_weight_end"} & set(plain)
    assert run_settings(False, {"teacher_task_weight": 1.0})["teacher_task_weight"] == 1.0
    fade = run_settings(False, {"distill_schedule": "fade", "distill_weight_end": 0.2})
    assert fade["distill_schedule"] == "fade" and fade["distill_weight_end"] == 0.2
    assert run_settings(False, {"distill_schedule": "fade"}) != fade != plain


def test_resume_of_a_checkpoint_from_before_the_new_settings(tmp_path):
    """A checkpoint whose config predates the new settings ran at their defaults: it resumes under the defaults
    and is refused under another value."""
    from test_finetune_data import model_for, write_vqa

    from smarttrim_cli.train import checkpointing as ck
    from smarttrim_cli.train.loop import finetune

    data = write_vqa(tmp_path / "vqa", n_train=8, n_val=4)
    model = model_for(tmp_path, "vqa")
    ov = dict(data_dir=str(data), dataset="vqa", batch_size=4, max_steps=1, eval_before=False, calibrate=False,
              workers=0, log_every=1, save_every=1)
    res = finetune(model, tmp_path / "out", overrides=ov, recipe=False, progress=False)
    last = res.state_dir / "last.pt"
    st = ck.load_state(last)
    for k in ("teacher_task_weight", "distill_schedule", "distill_weight_end"):
        del st["config"][k]
    ck.save_state(last, {k: v for k, v in st.items() if k not in ("format", "version")})
    with pytest.raises(SmartTrimError, match="different settings"):
        finetune(model, tmp_path / "out", overrides=dict(ov, teacher_task_weight=1.0), resume=True, recipe=False,
                 progress=False)
    again = finetune(model, tmp_path / "out", overrides=ov, resume=True, recipe=False, progress=False)
    assert again.summary["resumed_from_step"] == 1

