"""`smarttrim demo --quick` end to end: every stage, every artefact; a second run reuses the training."""
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from smarttrim_cli.cli import app

runner = CliRunner()


def test_demo_quick_end_to_end_and_reuse(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "demo"
    r = runner.invoke(app, ["demo", "--quick", "-o", str(out), "--threads", "2"])
    assert r.exit_code == 0, r.output
    for label in ("started from vs trimmed", "trimmed vs control", "GMACs / input", "onnxruntime latency",
                  "ONNX validation: passed"):
        assert label in r.output, label
    s = json.loads((out / "summary.json").read_text())
    # the closing table compares with the model SmartTrim started from, next to the equal-steps control
    ref = Path(s["reference"]["model_dir"])
    assert ref.parent == out.resolve() and ref.name.startswith("base") and s["reference"]["source"] == "recorded"
    assert json.loads((out / "trimmed" / "config.json").read_text())["reference"]["path"] == str(ref)
    assert s["control"]["score"] is not None and s["control"]["steps"] == 4
    assert json.loads((out / "control" / "config.json").read_text())["provenance"]["made_by"] == "finetune (plain)"
    assert s["onnx_validation_ok"] is True
    assert s["trimmed"]["gmacs"] < s["full"]["gmacs"]  # the trimmed model really computes less
    for key in ("score", "gmacs", "cpu_latency_ms_p50", "ort_latency_ms"):
        assert s["full"][key] is not None and s["trimmed"][key] is not None, key
    assert (out / "init.ckpt").is_file() and (out / "model.onnx").is_file()
    report = json.loads((out / "profile" / "report.json").read_text())
    assert report["schema"] == "smarttrim-profile"
    pngs = list((out / "profile").rglob("*.png")) + list(out.glob("*/*.png"))
    assert len(pngs) >= 3 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    for stage in ("init", "base", "trimmed", "control"):
        assert (out / f".{stage}.done.json").is_file()

    # a second run trains nothing: it goes straight to profiling
    class Reached(Exception):
        pass

    def no_training(*a, **k):
        raise AssertionError("retrained although the first run's models are there")

    def stop(*a, **k):
        raise Reached

    monkeypatch.setattr("smarttrim_cli.train.loop.finetune", no_training)
    monkeypatch.setattr("smarttrim_cli.profiling.runner.run_profile", stop)
    from smarttrim_cli.demo import DemoSettings, run_demo

    with pytest.raises(Reached):
        run_demo(DemoSettings(quick=True, out_dir=str(out)), say=lambda m: None)

    # an edited recipe (a newer smarttrim's, say) retrains what it changes: a trimming setting retrains the
    # SmartTrim fine-tune, not the base model
    from smarttrim_cli.recipes import RECIPE_DIR

    text = (RECIPE_DIR / "easyvqa.yaml").read_text()
    assert "  cost_weight: 20.0" in text
    edited = tmp_path / "easyvqa.yaml"
    edited.write_text(text.replace("  cost_weight: 20.0", "  cost_weight: 21.0"))
    monkeypatch.setattr("smarttrim_cli.demo.RECIPES", {"easyvqa": str(edited)})
    trained = []

    def record(model_dir, output, **k):
        trained.append(Path(output).name)
        raise Reached

    monkeypatch.setattr("smarttrim_cli.train.loop.finetune", record)
    with pytest.raises(Reached):
        run_demo(DemoSettings(quick=True, out_dir=str(out)), say=lambda m: None)
    assert trained == ["trimmed"]


def test_demo_bad_arguments(tmp_path):
    r = runner.invoke(app, ["demo", "--quick", "--dataset", "coco", "-o", str(tmp_path / "d")])
    assert r.exit_code == 2 and "--dataset must be one of" in r.output
    r = runner.invoke(app, ["demo", "--quick", "--dataset", "vqa", "--data-dir", str(tmp_path / "nope"),
                            "-o", str(tmp_path / "d2")])
    assert r.exit_code == 2 and "nope" in r.output and "Traceback" not in r.output
