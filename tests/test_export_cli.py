"""`smarttrim export --onnx` end to end through the Typer app.

The CLI tests use the legacy exporter (SMARTTRIM_EXPORTER / --exporter legacy) to stay fast; the
dynamo exporter, the default, is exercised on the same kind of model in test_export_onnx.py.
"""
import json
import os
from pathlib import Path

import onnx
import pytest
from typer.testing import CliRunner

from smarttrim_cli.cli import app
from test_export_onnx import one_torch_thread, varied_model_dir  # noqa: F401


def run(args):
    return CliRunner().invoke(app, args)


def test_bare_onnx_flag_writes_the_default_path(tmp_path, monkeypatch):
    """`smarttrim export --onnx` exactly as the issue writes it: latest model, ./smarttrim-out/model.onnx,
    validation lines and the latency table against the full graph."""
    monkeypatch.setenv("SMARTTRIM_EXPORTER", "legacy")
    varied_model_dir(tmp_path / "model")  # records itself as the latest model in $SMARTTRIM_HOME
    r = run(["export", "--onnx", "--runs", "2"])
    assert r.exit_code == 0, r.output
    out = Path(os.environ["SMARTTRIM_HOME"]) / "model.onnx"
    assert out.is_file()
    onnx.checker.check_model(str(out))
    for name in ("logits", "kept_tokens", "kept_heads"):
        assert f"✓ {name}:" in r.output, r.output
    assert "✗" not in r.output
    assert "atol 0.0001" in r.output
    assert "onnxruntime latency" in r.output and "speedup" in r.output
    assert not list(out.parent.glob(".model.onnx*"))  # no temp files or full-graph leftovers


def test_paths_opset_atol_quantize_and_report(tmp_path):
    md = varied_model_dir(tmp_path / "model")
    out = tmp_path / "out" / "model.onnx"
    rep = tmp_path / "report.json"
    r = run(["export", str(md), "--onnx", str(out), "--opset", "18", "--atol", "1e-4", "--quantize", "int8",
             "--exporter", "legacy", "--no-timing", "--report", str(rep)])
    assert r.exit_code == 0, r.output
    q = tmp_path / "out" / "model.int8.onnx"
    assert out.is_file() and q.is_file()
    onnx.checker.check_model(str(q))
    assert q.stat().st_size < 0.75 * out.stat().st_size
    assert "✓ logits (int8):" in r.output and "✓ task score (int8):" in r.output
    d = json.loads(rep.read_text())
    assert d["ok"] is True and d["export"]["opset"] == 18 and d["export"]["exporter"] == "legacy"
    assert d["validation"]["atol"] == 1e-4 and all(c["ok"] for c in d["validation"]["checks"])
    assert d["int8"]["size_bytes"] < d["int8"]["float_size_bytes"] and d["int8"]["gathered_int8"] > 0
    assert d["timing"] == []


def test_broken_tolerance_exits_1(tmp_path):
    md = varied_model_dir(tmp_path / "model")
    out = tmp_path / "model.onnx"
    r = run(["export", str(md), "--onnx", str(out), "--atol", "1e-15", "--exporter", "legacy", "--no-timing"])
    assert r.exit_code == 1, r.output
    assert "✗ logits:" in r.output and "atol 1e-15" in r.output
    assert "validation failed" in r.output
    assert out.is_file()  # written and checked; the user sees why it failed


def test_no_validate_and_model_dir_given_to_onnx(tmp_path):
    """`smarttrim export --onnx MODEL_DIR` reads the directory as the model; --no-validate skips the
    check, so even an impossible tolerance passes."""
    md = varied_model_dir(tmp_path / "model")
    r = run(["export", "--onnx", str(md), "--no-validate", "--no-timing", "--atol", "1e-15", "--exporter", "legacy"])
    assert r.exit_code == 0, r.output
    assert (Path(os.environ["SMARTTRIM_HOME"]) / "model.onnx").is_file()
    assert "✓" not in r.output and "✗" not in r.output


@pytest.mark.parametrize("args, msg", [
    (["export"], "--onnx"),
    (["export", "nowhere", "--onnx"], "nowhere"),
    (["export", "--onnx", "--quantize", "int4"], "int4"),
    (["export", "--onnx", "--exporter", "magic"], "magic"),
])
def test_user_errors_are_one_line(tmp_path, args, msg):
    if "nowhere" not in args:
        varied_model_dir(tmp_path / "model")
    r = run(args)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0], r.output
