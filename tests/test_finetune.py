"""smarttrim finetune on a tiny METER and tiny data in the real formats: the loss falls, the achieved
FLOPs ratio follows the curriculum to the target, kill-and-resume equals an uninterrupted run, the
plain (--no-trim) mode, and the command line."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from test_finetune_data import model_for, write_nlvr2, write_vqa

TINY = dict(workers=0, lr=1e-3, lr_mult_trimmer=20, log_every=1, eval_before=False, save_every=0)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_loss_falls_and_ratio_follows_curriculum(tmp_path):
    from smarttrim_cli.train.loop import finetune

    data = write_vqa(tmp_path / "vqa", n_train=64, n_val=32)
    model = model_for(tmp_path, "vqa")
    res = finetune(model, tmp_path / "out", overrides=dict(TINY, data_dir=str(data), batch_size=8, max_steps=48,
                                                         target_ratio=0.5, curriculum=0.5, eval_before=True),
                   recipe=False, progress=False)
    steps = [r for r in res.history if r["event"] == "step"]
    vals = [r for r in res.history if r["event"] == "val"]
    assert len(steps) == 48 and len(vals) == 6
    # the loss falls: task loss of the trimmed pass and the total
    first, last = steps[:8], steps[-8:]
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    assert mean(last, "task") < 0.85 * mean(first, "task")
    assert mean(last, "loss") < 0.85 * mean(first, "loss")
    # the curriculum: target 1.0 -> 0.5 over the first half, then held
    assert steps[0]["target"] == 1.0 and steps[23]["target"] == pytest.approx(0.5 + 0.5 / 24, abs=1e-6)
    assert all(r["target"] == 0.5 for r in steps[24:])
    # the achieved ratio (training batches, mean over inputs) follows it down and reaches the target
    assert max(abs(r["ratio"] - r["target"]) for r in steps[12:]) < 0.2
    assert steps[6]["ratio"] > steps[18]["ratio"] > steps[30]["ratio"]
    assert abs(mean(steps[-12:], "ratio") - 0.5) < 0.06
    # inference (hard mode) on the validation set: near the target at the trained threshold; the
    # calibration keeps that threshold when within 3% of the target, else raises it onto the target;
    # inputs get different ratios (adaptive, not one ratio for all)
    assert abs(vals[-1]["ratio_mean"] - 0.5) <= 0.15, vals[-1]
    cal = res.summary["calibrated"]
    if res.summary["best"]["ratio_mean"] <= 0.5 * 1.03:
        assert cal["threshold"] == 0.5 and cal["ratio_mean"] == pytest.approx(res.summary["best"]["ratio_mean"])
    else:
        assert cal["threshold"] > 0.5 and cal["ratio_mean"] <= 0.5, cal
    assert cal["ratio_std"] > 0.01, cal
    assert res.summary["unreachable_target"] is None  # 0.5 is above what this placement can reach
    # starting model evaluated at full capacity; the selected model is one at the target
    assert res.summary["base"]["ratio_mean"] == 1.0
    assert res.summary["best"] is not None and res.summary["best"]["ratio_mean"] <= 0.55
    # outputs: a model directory that load() takes, log, plot, summary
    out = res.output
    import smarttrim_cli
    loaded = smarttrim_cli.load(out)
    m = loaded.model
    assert m.threshold == pytest.approx(cal["threshold"]) and m.trim_config.threshold == m.threshold
    assert loaded.labels == ["red", "green", "blue", "yes", "no"] and loaded.config["finetune"]["mode"] == "smarttrim"
    assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(line) for line in (out / "finetune_log.jsonl").read_text().splitlines()]
    assert rows[0]["event"] == "val_full" and rows[1]["event"] == "step"
    assert {"step", "loss", "task", "distill", "cost", "ratio", "target", "tau", "lr", "inputs_per_s"} <= set(rows[1])
    assert (res.state_dir / "last.pt").is_file() and (res.state_dir / "best.safetensors").is_file()
    # the best checkpoint is what was written
    best = load_file(str(res.state_dir / "best.safetensors"))
    written = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(best[k], written[k]) for k in best)


def test_target_below_the_placements_floor_is_reported(tmp_path):
    """A target under the lowest ratio the trimmer placement reaches (every droppable token and head dropped)
    cannot be trained to: finetune says so before training, in the log and the summary."""
    import smarttrim_cli
    from smarttrim_cli.train.loop import finetune
    from smarttrim_cli.train.rules import lowest_ratio

    data = write_vqa(tmp_path / "vqa", n_train=16, n_val=8)
    model = model_for(tmp_path, "vqa")
    res = finetune(model, tmp_path / "out", overrides=dict(TINY, data_dir=str(data), batch_size=8, max_steps=1,
                                                         target_ratio=0.01), recipe=False, progress=False)
    u = res.summary["unreachable_target"]
    assert u is not None and u["target"] == 0.01 and 0.01 < u["lowest_ratio"] < 1.0
    assert [r for r in res.history if r["event"] == "unreachable_target"] == [u]
    # it is the floor: at that threshold every trimmer keeps only [CLS], and no threshold goes lower
    loaded = smarttrim_cli.load(model, mode="hard")
    m = loaded.model
    from smarttrim_cli.data import open_dataset
    from smarttrim_cli.profiling.compare import EvalSet
    ds = open_dataset("vqa", data, "val2014", m.config.image_size, label2id={a: i for i, a in enumerate(loaded.labels)})
    batch = EvalSet.build(loaded, ds, limit=8, batch_size=8).batches[0]
    low = lowest_ratio(m, batch)
    _, ctx = m.run(batch, mode="hard", record=True, threshold=1 - 1e-6)
    assert all(int(v.sum(1).max()) == 1 for k, v in ctx.decisions.items() if k.startswith("tok:"))
    from smarttrim_cli.trim.cost import macs_ratio

    _, ctx_half = m.run(batch, mode="hard", record=True, threshold=0.5)
    assert low <= float(macs_ratio(ctx_half.records).mean()) + 1e-9


class _Kill(Exception):
    pass


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    from smarttrim_cli.train.loop import finetune

    data = write_nlvr2(tmp_path / "nlvr2", n_train=24, n_val=8)
    model = model_for(tmp_path, "nlvr2")
    ov = dict(TINY, data_dir=str(data), batch_size=4, epochs=2, save_every=4, target_ratio=0.5, curriculum=0.5)
    ref = finetune(model, tmp_path / "ref", overrides=ov, recipe=False, progress=False)

    def kill(step):
        if step == 7:  # after the checkpoint at step 4 and the epoch-end one at 6; step 7 is lost
            raise _Kill()
    with pytest.raises(_Kill):
        finetune(model, tmp_path / "run", overrides=ov, recipe=False, progress=False, on_step=kill)
    assert not (tmp_path / "run").exists()
    with pytest.raises(Exception, match="different settings"):
        finetune(model, tmp_path / "run", overrides=dict(ov, lr=2e-3), resume=True, recipe=False, progress=False)
    res = finetune(model, tmp_path / "run", overrides=ov, resume=True, recipe=False, progress=False)
    assert res.summary["resumed_from_step"] == 6 and res.summary["steps"] == 12
    a, b = ref.model.state_dict(), res.model.state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    # the log has each step once, as the uninterrupted run's
    steps = [r["step"] for r in res.history if r["event"] == "step"]
    assert steps == list(range(1, 13))
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("elapsed_s", "inputs_per_s")} for r in h]  # noqa
    assert strip(res.history) == strip(ref.history)


def test_evit_rule_kill_and_resume_equals_uninterrupted(tmp_path):
    """The fine-tuned fixed-ratio EViT runs through the same loop, so it resumes exactly too: killed after its
    checkpoints, resumed, it continues from the checkpoint (not from scratch) and ends with the uninterrupted run's
    weights and log; a different keep ratio is refused."""
    from smarttrim_cli.baselines.evit_finetuned import EViTRule
    from smarttrim_cli.train.loop import finetune

    data = write_vqa(tmp_path / "vqa", n_train=24, n_val=8)
    model = model_for(tmp_path, "vqa")
    ov = dict(TINY, data_dir=str(data), batch_size=4, epochs=2, save_every=4, curriculum=0.5)
    ref = finetune(model, tmp_path / "ref", overrides=ov, recipe=False, progress=False, rule=EViTRule(0.5))

    def kill(step):
        if step == 10:  # after the checkpoint at step 8, two steps into epoch 2; steps 9, 10 are lost
            raise _Kill()
    with pytest.raises(_Kill):
        finetune(model, tmp_path / "run", overrides=ov, recipe=False, progress=False, rule=EViTRule(0.5), on_step=kill)
    with pytest.raises(Exception, match="different settings.*keep_ratio"):
        finetune(model, tmp_path / "run", overrides=ov, resume=True, recipe=False, progress=False, rule=EViTRule(0.4))
    seen = []
    res = finetune(model, tmp_path / "run", overrides=ov, resume=True, recipe=False, progress=False,
                   rule=EViTRule(0.5), on_step=seen.append)
    assert seen == list(range(9, 13)) and res.summary["resumed_from_step"] == 8  # continued, not restarted
    assert res.summary["mode"] == "evit-finetuned" and res.summary["keep_ratio"] == 0.5
    # the final weights (last.pt after step 12: the written model may be an earlier epoch's best) and the written ones
    from smarttrim_cli.train.checkpointing import load_state

    a, b = (load_state(r.state_dir / "last.pt")["model"] for r in (ref, res))
    assert load_state(res.state_dir / "last.pt")["step"] == 12
    start = load_file(str(model / "model.safetensors"))
    assert any(not torch.equal(start[k], a[k]) for k in start if k.startswith("vqa_classifier."))  # it trained
    for sa, sb in ((a, b), (ref.model.state_dict(), res.model.state_dict())):
        for k in sa:
            torch.testing.assert_close(sb[k], sa[k], rtol=0, atol=1e-6, msg=k)
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("elapsed_s", "inputs_per_s")} for r in h]  # noqa
    assert strip(res.history) == strip(ref.history)
    keep = [r["keep_ratio"] for r in res.history if r["event"] == "step"]
    assert len(keep) == 12 and keep[0] == 1.0 and keep[-1] == pytest.approx(0.5)  # the curriculum, resumed too


def test_no_trim_plain_finetune(tmp_path):
    from smarttrim_cli.train.loop import finetune

    data = write_vqa(tmp_path / "vqa", n_train=32, n_val=16)
    model = model_for(tmp_path, "vqa")
    res = finetune(model, tmp_path / "out", overrides=dict(TINY, data_dir=str(data), batch_size=8, max_steps=16,
                                                         trim=False), recipe=False, progress=False)
    steps = [r for r in res.history if r["event"] == "step"]
    assert "distill" not in steps[0] and all(r["ratio"] == 1.0 for r in steps)
    assert sum(r["task"] for r in steps[-4:]) < 0.85 * sum(r["task"] for r in steps[:4])
    start, end = load_file(str(model / "model.safetensors")), load_file(str(res.output / "model.safetensors"))
    trim_keys = [k for k in start if k.startswith(("token_trimmers.", "head_trimmers."))]
    assert trim_keys and all(torch.equal(start[k], end[k]) for k in trim_keys)
    assert not all(torch.equal(start[k], end[k]) for k in start if k.startswith("vqa_classifier."))
    assert res.summary["mode"] == "plain" and res.summary["best"]["ratio_mean"] == 1.0


def test_cli_finetune_defaults_and_latest(tmp_path, monkeypatch):
    from smarttrim_cli.cli import app
    from smarttrim_cli.model_dir import default_model_dir

    data = write_vqa(tmp_path / "vqa", n_train=16, n_val=8)
    model = model_for(tmp_path, "vqa")  # recorded as the latest model
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["finetune", "--data-dir", str(data), "--batch-size", "8", "--max-steps", "2",
                                 "--workers", "0", "--target-ratio", "0.33", "--set", "tau_end=0.3",
                                 "--set", "eval_before=no", "--no-progress"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "smarttrim-out" / "finetuned"
    assert default_model_dir().resolve() == out.resolve()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["finetune"]["target_ratio"] == 0.33 and cfg["provenance"]["finetuned_from"] == str(model.resolve())
    summary = json.loads((out / "finetune_summary.json").read_text())
    assert summary["config"]["tau_end"] == 0.3 and summary["config"]["lr"] == pytest.approx(5e-6)  # recipe
    assert "selected weights" in r.output and "written model" in r.output and "FLOPs ratio" in r.output
    r = CliRunner().invoke(app, ["finetune", "--data-dir", str(data), "--set", "nonsense=1"])
    assert r.exit_code == 2 and "unknown training setting 'nonsense'" in r.output


def test_calibration_keeps_trained_threshold_or_raises_it():
    """End-of-run calibration: inside target + tolerance the trained threshold stays (moving it shifts
    decisions the backbone was trained with); above it, the threshold rises until the mean ratio fits;
    it never falls to spend a budget the run did not use."""
    import contextlib

    from tiny_meter import batch, tiny_model

    from smarttrim_cli.backbones.meter import default_trim_config
    from smarttrim_cli.train.distributed import DistInfo
    from smarttrim_cli.train.evaluation import calibrate_threshold, evaluate

    m = tiny_model()
    t = default_trim_config(m.config)
    t.init_keep = 0.45  # near the threshold: keeps almost all at 0.5, a third at 0.9
    m.attach_trimmers(t)
    batches = []
    for s in range(4):
        b = batch(m, B=6, seed=s)
        b["target"] = torch.zeros(6, m.config.num_labels)
        batches.append(b)
    info, amp = DistInfo(), contextlib.nullcontext
    at_trained = evaluate(m, batches, info, amp, mode="hard")["ratio_mean"]
    assert at_trained > 0.8, at_trained
    # within tolerance (and below the target): unchanged, never lowered to spend more
    thr, res = calibrate_threshold(m, batches, info, at_trained - 0.01, amp, tolerance=0.02)
    assert thr == 0.5 and res["ratio_mean"] == pytest.approx(at_trained)
    thr, res = calibrate_threshold(m, batches, info, at_trained + 0.2, amp, tolerance=0.0)
    assert thr == 0.5
    # above target + tolerance: raised until it fits
    target = at_trained - 0.3
    thr, res = calibrate_threshold(m, batches, info, target, amp, tolerance=0.01)
    assert thr > 0.5 and res["ratio_mean"] <= target
    assert res["ratio_mean"] == pytest.approx(evaluate(m, batches, info, amp, mode="hard", threshold=thr)["ratio_mean"])
