"""`smarttrim profile` on tiny METER models: report fields, FLOPs agreement, gate, plots, datasets."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from smarttrim_cli.cli import app
from smarttrim_cli.data import EASYVQA_ANSWERS
from smarttrim_cli.profiling import flops as fl
from smarttrim_cli.profiling.accuracy import recall_at_k
from smarttrim_cli.profiling.report import FIELDS, missing_fields, schema_markdown

from tiny_meter import tiny_model_dir

runner = CliRunner()
# one thread: the machine's 2 cores are shared, and oversubscribed threads make tiny ops crawl
FAST = ["--limit", "5", "--iters", "2", "--warmup", "1", "--batch-size", "3", "--throughput-batches", "1",
        "--threads", "1"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def easyvqa_model(tmp_path, name="model", **kw) -> Path:
    return tiny_model_dir(tmp_path / name, "vqa", labels=list(EASYVQA_ANSWERS), num_labels=len(EASYVQA_ANSWERS), **kw)


def invoke(args):
    res = runner.invoke(app, ["profile", *args])
    return res, res.output  # stdout and stderr, interleaved


def assert_png(path):
    path = Path(path)
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 50 and im.size[1] > 50


def test_report_has_every_documented_field_and_valid_pngs(tmp_path, monkeypatch):
    easyvqa_model(tmp_path)  # recorded as the latest model: no MODEL_DIR needed
    res, out = invoke(["--dataset", "easyvqa", *FAST, "--sweep", "0.3,0.7", "--show", "2"])
    assert res.exit_code == 0, out
    home = Path(__import__("os").environ["SMARTTRIM_HOME"])
    rep_path = home / "profile" / "report.json"
    report = json.loads(rep_path.read_text())
    assert missing_fields(report) == []
    assert report["settings"]["n_inputs"] == 5 and len(report["per_input"]) == 5
    assert [r["threshold"] for r in report["sweep"]] == [0.3, 0.5, 0.7]
    for key in ("flops_hist", "layers", "pareto"):
        assert Path(report["files"][key]).parent == home / "profile"
        assert_png(report["files"][key])
    assert len(report["files"]["show"]) == 2
    for p in report["files"]["show"]:
        assert_png(p)
    # documented in the table the README carries
    md = schema_markdown()
    assert all(f"`{k}`" in md for k in FIELDS)
    # the rich table names the convention and what was measured
    assert "fvcore convention" in out and "latency" in out and "throughput" in out
    assert report["flops"]["source"] == "fvcore"
    assert report["throughput"]["trimmed"]["mode"] in ("pad", "bucket")
    assert set(report["throughput"]["modes"]) == {"pad", "bucket"}
    assert report["machine"]["torch_threads"] == report["settings"]["threads"] == 1
    assert report["gate"]["passed"] and report["gate"]["failures"] == []


def test_explicit_output_paths(tmp_path):
    d = easyvqa_model(tmp_path)
    res, out = invoke([str(d), "--dataset", "easyvqa", *FAST, "--json", str(tmp_path / "r" / "rep.json"),
                       "--plot", str(tmp_path / "h.png"), "--layers-plot", str(tmp_path / "l.png")])
    assert res.exit_code == 0, out
    report = json.loads((tmp_path / "r" / "rep.json").read_text())
    assert report["files"]["flops_hist"] == str(tmp_path / "h.png")
    assert report["files"]["pareto"] is None  # no sweep
    assert_png(tmp_path / "h.png")
    assert_png(tmp_path / "l.png")


def test_fvcore_count_equals_cost_model(tmp_path):
    d = easyvqa_model(tmp_path)
    res, out = invoke([str(d), "--dataset", "easyvqa", *FAST, "--limit", "4"])
    assert res.exit_code == 0, out
    report = json.loads((Path(__import__("os").environ["SMARTTRIM_HOME"]) / "profile" / "report.json").read_text())
    assert report["flops"]["fvcore_check"]["n_inputs"] == 4
    assert report["flops"]["fvcore_check"]["max_rel_diff"] < 0.01
    for r in report["per_input"]:
        assert r["fvcore_gmacs_trimmed"] == pytest.approx(r["gmacs_trimmed"], rel=0.01)
        assert r["fvcore_gmacs_full"] == pytest.approx(r["gmacs_full"], rel=0.01)
        assert r["gmacs_trimmed"] < 0.9 * r["gmacs_full"]  # the tiny trimmers really drop tokens
    assert report["flops"]["speedup"] > 1.1


def test_keep_all_threshold_speedup_one_and_no_drop(tmp_path):
    d = easyvqa_model(tmp_path)
    res, out = invoke([str(d), "--dataset", "easyvqa", *FAST, "--threshold", "0", "--min-speedup", "0.9",
                       "--max-drop", "0"])
    assert res.exit_code == 0, out
    report = json.loads((Path(__import__("os").environ["SMARTTRIM_HOME"]) / "profile" / "report.json").read_text())
    assert 0.9 < report["flops"]["speedup"] <= 1.0  # only the trimmers' own small cost is added
    assert report["accuracy"]["drop"] == 0
    assert report["accuracy"]["agreement"] == 100
    assert all(lay["tokens_kept_frac"] == 1.0 for lay in report["layers"])
    assert report["gate"]["passed"]
    assert "gate passed" in out


@pytest.mark.parametrize("args, named", [
    (["--min-speedup", "50"], "--min-speedup 50"),
    (["--max-drop", "-1"], "--max-drop -1"),
    (["--min-speedup", "2", "--speedup-metric", "latency", "--threshold", "0"], "latency speedup"),
])
def test_gate_failure_exits_1_naming_the_bound(tmp_path, args, named):
    d = easyvqa_model(tmp_path)
    res, out = invoke([str(d), "--dataset", "easyvqa", *FAST, "--threshold", "0", *args])
    assert res.exit_code == 1, out
    assert named in out
    assert "Traceback" not in out
    # the report is still written, with the failure in it
    report = json.loads((Path(__import__("os").environ["SMARTTRIM_HOME"]) / "profile" / "report.json").read_text())
    assert report["gate"]["passed"] is False and any(named in f for f in report["gate"]["failures"])


def test_missing_default_vqa_dir_is_one_line_error(tmp_path, monkeypatch):
    d = easyvqa_model(tmp_path)
    monkeypatch.setenv("SMARTTRIM_DATA", str(tmp_path / "nodata"))
    res, out = invoke([str(d), "--dataset", "vqa", *FAST])
    assert res.exit_code == 2, out
    assert "Traceback" not in out
    assert str(tmp_path / "nodata" / "vqa") in out and "does not exist" in out
    assert len([ln for ln in out.strip().splitlines() if ln.strip()]) == 1, repr(out)


@pytest.mark.parametrize("args, needle", [
    (["--dataset", "nlvr2"], "has a vqa head"),
    (["--dataset", "easyvqa", "--threshold", "1.5"], "--threshold must be in [0, 1]"),
    (["--dataset", "easyvqa", "--sweep", "0.3,x"], "--sweep"),
    (["--dataset", "easyvqa", "--device", "tpu"], "--device must be cpu, cuda, cuda:N or auto"),
    (["--dataset", "nope"], "unknown dataset"),
])
def test_user_errors(tmp_path, args, needle):
    d = easyvqa_model(tmp_path)
    res, out = invoke([str(d), *args, "--limit", "2"])
    assert res.exit_code == 2, out
    assert needle in out and "Traceback" not in out


def test_easyvqa_needs_an_easyvqa_model(tmp_path):
    d = tiny_model_dir(tmp_path / "m", "vqa")  # labels answer0..6
    res, out = invoke([str(d), "--dataset", "easyvqa", "--limit", "2"])
    assert res.exit_code == 2 and "not trained on easy-VQA" in out, out


@pytest.mark.skipif(torch.cuda.is_available(), reason="only meaningful without CUDA")
def test_cuda_unavailable_is_clear(tmp_path):
    d = easyvqa_model(tmp_path)
    res, out = invoke([str(d), "--dataset", "easyvqa", "--device", "cuda", "--limit", "2"])
    assert res.exit_code == 2 and "CUDA is not available" in out, out


def test_vqa_format_data_dir(tmp_path):
    """--dataset vqa reads the official VQAv2 layout (the synthetic scenes writer produces it)."""
    from smarttrim_cli.data.scenes import generate_scenes

    generate_scenes(tmp_path / "scenes", n_train=1, n_val=3, image_size=64, questions_per_image=2)
    d = tiny_model_dir(tmp_path / "m", "vqa", labels=["yes", "no", "1", "2", "3", "red", "circle"])
    res, out = invoke([str(d), "--dataset", "vqa", "--data-dir", str(tmp_path / "scenes"), "--split", "val",
                       "--limit", "4", "--iters", "2", "--warmup", "0", "--threads", "1", "--batch-size", "2",
                       "--throughput-batches", "1", "--show", "1", "--fvcore-limit", "2"])
    assert res.exit_code == 0, out
    report = json.loads((Path(__import__("os").environ["SMARTTRIM_HOME"]) / "profile" / "report.json").read_text())
    assert report["settings"]["n_inputs"] == 4 and report["settings"]["split"] == "val"
    assert report["flops"]["source"] == "cost_model" and report["flops"]["fvcore_check"]["n_inputs"] == 2
    assert [r["fvcore_gmacs_trimmed"] is None for r in report["per_input"]] == [False, False, True, True]
    assert report["per_input"][0]["id"] is not None
    assert_png(report["files"]["show"][0])


def _write_nlvr2(root: Path, n=3, size=24):
    (root / "images" / "dev").mkdir(parents=True)
    rows = []
    for i in range(n):
        ident = f"dev-{i}-0-0"
        for k in range(2):
            Image.new("RGB", (size, size), (40 * i, 80 * k, 120)).save(root / "images" / "dev" / f"dev-{i}-0-img{k}.png")
        rows.append(json.dumps({"identifier": ident, "sentence": f"there are {i} dogs", "label": "True" if i % 2 else "False"}))
    (root / "dev.json").write_text("\n".join(rows) + "\n")


def test_nlvr2_two_images(tmp_path):
    _write_nlvr2(tmp_path / "nlvr2")
    d = tiny_model_dir(tmp_path / "m", "nlvr2")
    res, out = invoke([str(d), "--dataset", "nlvr2", "--data-dir", str(tmp_path / "nlvr2"), "--limit", "3",
                       "--iters", "2", "--warmup", "0", "--threads", "1", "--batch-size", "2", "--throughput-batches", "1",
                       "--show", "1"])
    assert res.exit_code == 0, out
    report = json.loads((Path(__import__("os").environ["SMARTTRIM_HOME"]) / "profile" / "report.json").read_text())
    assert report["accuracy"]["metric"] == "accuracy"
    assert report["flops"]["fvcore_check"]["max_rel_diff"] < 0.01  # both image passes counted by both
    assert missing_fields(report) == []


def test_retrieval_recall(tmp_path):
    d = tiny_model_dir(tmp_path / "m", "retrieval")
    res, out = invoke([str(d), "--dataset", "easyvqa", "--limit", "4", "--iters", "2", "--warmup", "0", "--threads", "1",
                       "--batch-size", "2", "--throughput-batches", "1", "--sweep", "0.3"])
    assert res.exit_code == 0, out
    report = json.loads((Path(__import__("os").environ["SMARTTRIM_HOME"]) / "profile" / "report.json").read_text())
    rec = report["accuracy"]["recall"]
    assert set(rec["full"]) == {"recall@1", "recall@5", "recall@10"}
    assert report["accuracy"]["full"] == rec["full"]["recall@1"]
    assert rec["full"]["recall@10"] == 100.0  # at most 4 distinct images: the positive is always in the top 10
    assert len(report["sweep"]) == 2


# ----- units ----------------------------------------------------------------------------------------------
class _SDPA(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


class _Matmul(nn.Module):
    def forward(self, q, k, v):
        p = torch.matmul(q, k.transpose(-1, -2)).softmax(-1)
        return torch.matmul(p, v)


def test_sdpa_handle_counts_fused_attention():
    q, k, v = torch.randn(2, 3, 7, 8), torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 6)
    from fvcore.nn import FlopCountAnalysis

    bare = FlopCountAnalysis(_SDPA(), (q, k, v))
    bare.unsupported_ops_warnings(False)
    assert bare.total() == 0  # the problem the handle fixes
    fused = fl.flop_analysis(_SDPA(), (q, k, v)).total()
    explicit = fl.flop_analysis(_Matmul(), (q, k, v)).total()
    assert fused == explicit == 2 * 3 * 7 * 5 * (8 + 6)


def test_recall_at_k():
    s = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.5, 0.1], [0.3, 0.2, 0.1]])
    r = recall_at_k(s, [0, 1, 2], ks=(1, 2, 3))
    assert r == {"recall@1": pytest.approx(100 / 3), "recall@2": pytest.approx(200 / 3), "recall@3": 100.0}
