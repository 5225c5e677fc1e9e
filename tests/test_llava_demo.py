"""`smarttrim demo --backbone llava --quick`: a small Hugging Face LLaVA trained from scratch as a generative VQA
model, trimmed, profiled and exported, on easy-VQA and scenes; and `--backbone` leaves the METER demo's cache keys
as they were."""
from __future__ import annotations

import json
from dataclasses import asdict

import pytest
from typer.testing import CliRunner

import smarttrim_cli
from smarttrim_cli import demo
from smarttrim_cli.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
_STAGE_INIT = demo.Stage.__init__


def _run(out, dataset):
    r = runner.invoke(app, ["demo", "--backbone", "llava", "--dataset", dataset, "--quick", "-o", str(out),
                            "--threads", "1"])
    assert r.exit_code == 0, r.output
    return r.output, json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("dataset", ["easyvqa", "scenes"])
def test_llava_demo_quick_end_to_end(tmp_path, dataset):
    out = tmp_path / "demo"
    text, s = _run(out, dataset)
    assert "ONNX validation: passed" in text and "kept image tokens" in text and "exact match" in text
    assert s["settings"]["backbone"] == "llava" and s["metric"] == "vqa_score_generated"
    for k in ("full", "trimmed"):
        assert isinstance(s[k]["score"], float) and 0 <= s[k]["score"] <= 100, k
    g = s["generation"]
    full_tokens = (48 if dataset == "scenes" else 32) ** 2 // 16  # the quick sizes: 4 px patches
    assert g["image_tokens"]["full"] == full_tokens
    assert g["image_tokens"]["kept"]["mean"] < full_tokens  # the trimmer drops image tokens...
    assert g["prefill_gmacs"]["trimmed"]["mean"] < g["prefill_gmacs"]["full"]["mean"]  # ...and the prefill costs less
    assert s["trimmed"]["gmacs"] < s["full"]["gmacs"]
    assert s["onnx_validation_ok"] is True and (out / "model.onnx").is_file()
    # compare's training-free baselines on the base model's image tokens, at the trimmed model's cost
    names = [b["name"] for b in s["baselines"]]
    assert names[:2] == ["full (base)", "smarttrim"] and "fastv" in names, names
    assert all(b["accuracy"] is not None and b["gmacs_mean"] > 0 for b in s["baselines"])
    assert isinstance(s["control"]["score"], float)
    assert s["control"]["steps"] == demo.budgets(demo.DemoSettings(quick=True, backbone="llava"))["trim"]["max_steps"]
    # the "existing VLM" is a real transformers LLaVA directory; every stage's output is a model directory
    from transformers import LlavaForConditionalGeneration

    assert isinstance(LlavaForConditionalGeneration.from_pretrained(str(out / "hf")), LlavaForConditionalGeneration)
    for name in ("init", "base", "trimmed", "control"):
        m = smarttrim_cli.load(out / name).model
        assert m.family == "llava" and m.config.task == "generate", name
    # the base was trained: its LM differs from the random init
    a, b = (smarttrim_cli.load(out / n).model.state_dict() for n in ("init", "base"))
    assert any(not (a[k] == b[k]).all() for k in a if "language_model" in k)


def _meter_keys(monkeypatch, tmp_path, s):
    """The stage keys prepare() writes for ``s``, up to the base model's training (stopped there)."""
    keys = {}
    real = _STAGE_INIT  # not the attribute: an earlier call's patch would record into its own dict

    def record(self, root, name, key, fresh):
        keys[name] = json.loads(json.dumps(key, default=str))
        real(self, root, name, key, fresh)

    class Stop(Exception):
        pass

    def stop(*a, **k):
        raise Stop

    monkeypatch.setattr(demo.Stage, "__init__", record)
    monkeypatch.setattr("smarttrim_cli.train.loop.finetune", stop)
    with pytest.raises(Stop):
        demo.prepare(s, say=lambda m: None)
    return keys


def test_meter_stage_keys_unchanged_by_backbone(tmp_path, monkeypatch):
    from smarttrim_cli.train.config import run_settings

    plain = _meter_keys(monkeypatch, tmp_path, demo.DemoSettings(quick=True, out_dir=str(tmp_path / "a")))
    named = _meter_keys(monkeypatch, tmp_path, demo.DemoSettings(quick=True, out_dir=str(tmp_path / "b"),
                                                                 backbone="meter"))
    assert plain == named
    # the keys as the demo wrote them before --backbone existed
    base_key = {"dataset": "easyvqa", "data_dir": None, "size": demo.MODEL_SIZES["quick"], "seed": 0}
    assert plain["init"] == json.loads(json.dumps(base_key))
    over = {"dataset": "easyvqa", "data_dir": None, "seed": 0, "train_split": "train", "val_split": "test",
            **demo.BUDGETS["quick"]["base"], "trim": False}
    assert plain["base"] == json.loads(json.dumps({**base_key, "train": run_settings("easyvqa.yaml", over)},
                                                  default=str))
    llava = _meter_keys(monkeypatch, tmp_path, demo.DemoSettings(quick=True, out_dir=str(tmp_path / "c"),
                                                                 backbone="llava"))
    assert llava["init"]["backbone"] == "llava" and llava["init"] != plain["init"]


def test_cli_backbone_option(monkeypatch):
    r = runner.invoke(app, ["demo", "--quick", "--backbone", "blip"])
    assert r.exit_code != 0 and "--backbone must be one of meter, llava" in " ".join(r.output.split())
    seen = []

    class Stop(Exception):
        pass

    def capture(s, **k):
        seen.append(s)
        raise Stop

    monkeypatch.setattr(demo, "run_demo", capture)
    for extra in ([], ["--backbone", "meter"], ["--backbone", "llava"]):
        with pytest.raises(Stop):
            runner.invoke(app, ["demo", "--quick", *extra], catch_exceptions=False)
    assert asdict(seen[0]) == asdict(seen[1]) and seen[0].target_ratio == 0.33
    assert seen[2].backbone == "llava" and seen[2].target_ratio == demo.BACKBONES["llava"].target_ratio


def test_library_settings_take_the_backbones_target():
    # the library, not only the CLI, defaults a llava demo to its own budget (0.33 suits METER, not LLaVA)
    assert demo.BACKBONES["llava"].target_ratio != 0.33
    assert demo.DemoSettings(backbone="llava").target_ratio == demo.BACKBONES["llava"].target_ratio
    assert demo.DemoSettings().target_ratio == 0.33
    assert demo.DemoSettings(backbone="llava", target_ratio=0.5).target_ratio == 0.5
