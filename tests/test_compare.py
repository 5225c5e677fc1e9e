"""`smarttrim compare` on a tiny easy-VQA METER: SmartTrim against the training-free baselines at matched
mean GMACs, calibrated on inputs held apart from the evaluated ones, paired, gated."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from smarttrim_cli.cli import app
from smarttrim_cli.profiling.compare_report import FIELDS, missing_fields, schema_markdown

from test_profile import _write_nlvr2, assert_png, easyvqa_model
from tiny_meter import tiny_model_dir

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent
FAST = ["--threads", "1", "--batch-size", "8"]
TOKEN_BASELINES = ("random", "evit", "evit-fusion", "tome")  # one continuous keep ratio each: they reach any cost


def invoke(args):
    res = runner.invoke(app, ["compare", *args])
    return res, res.output


def report_at(path) -> dict:
    return json.loads(Path(path).read_text())


def test_report_matched_cost_disjoint_inputs_paired_and_chart(tmp_path):
    easyvqa_model(tmp_path)  # recorded as the latest model: no MODEL_DIR needed
    res, out = invoke(["--dataset", "easyvqa", "--limit", "16", "--calib-limit", "12", "--thresholds", "0.7",
                       "--ratios", "0.5", *FAST])
    assert res.exit_code == 0, out
    home = Path(__import__("os").environ["SMARTTRIM_HOME"])
    rep = report_at(home / "compare" / "compare.json")
    assert missing_fields(rep) == []
    assert rep["schema"] == "smarttrim-compare" and rep["settings"]["n_inputs"] == 16
    assert rep["settings"]["baselines"] == ["random", "evit", "evit-fusion", "tome", "static-heads", "downsample"]

    # held apart: the first 16 questions are evaluated, the next 12 calibrate (easy-VQA ids are question rows)
    inp = rep["inputs"]
    assert inp["evaluated_ids"] == list(range(16)) and inp["calibration_ids"] == list(range(16, 28))
    assert inp["disjoint"] and not set(inp["evaluated_ids"]) & set(inp["calibration_ids"])

    methods = rep["methods"]
    roles = [m["role"] for m in methods]
    assert roles[:3] == ["reference", "smarttrim", "smarttrim-sweep"] and set(roles[3:]) == {"baseline"}
    st = methods[1]
    assert st["threshold"] == 0.5 and 0 < st["gmacs_ratio"] < 0.9  # the tiny trimmers really drop tokens
    assert rep["target_ratio"] == pytest.approx(st["gmacs_ratio"])
    base = [m for m in methods if m["role"] == "baseline"]
    assert sorted({m["target_ratio"] for m in base}) == sorted([0.5, rep["target_ratio"]])
    assert len(base) == 2 * 6
    tol = rep["settings"]["match_tol"]
    for m in base:
        assert m["matched"] == (abs(m["gmacs_ratio"] - m["target_ratio"]) <= tol), m["name"]
        assert m["calibration"]["target"] == pytest.approx(m["target_ratio"])
        if m["family"] in TOKEN_BASELINES:  # calibrated on other inputs, at SmartTrim's cost on these
            assert m["matched"], (m["name"], m["gmacs_ratio"], m["target_ratio"])
        # paired on the same inputs: the mean of the per-input differences is the difference of the means
        assert len(m["per_input"]["score"]) == 16
        assert m["paired"]["margin"] == pytest.approx(st["accuracy"] - m["accuracy"], abs=1e-9)
        assert m["paired"]["wins"] + m["paired"]["losses"] + m["paired"]["ties"] == 16
    for m in methods[:3]:
        assert m["paired"] is None and m["matched"] is None and len(m["per_input"]["gmacs"]) == 16
    c = rep["comparison"]
    at = [m for m in base if m["target_ratio"] == rep["target_ratio"]]
    within = [m for m in at if m["gmacs_ratio"] <= rep["target_ratio"] + tol]  # matched, or cheaper
    assert {m["name"] for m in at if m["matched"]} <= {m["name"] for m in within}
    best = max(within, key=lambda m: m["accuracy"])
    assert c["best_baseline_accuracy"] == best["accuracy"]
    assert c["margin"] == pytest.approx(st["accuracy"] - best["accuracy"])
    assert c["drop"] == pytest.approx(methods[0]["accuracy"] - st["accuracy"])
    assert c["left_out"] == [m["name"] for m in at if m not in within]
    assert rep["gate"]["passed"] and rep["gate"]["min_margin"] is None
    assert_png(rep["files"]["pareto"])
    assert "smarttrim compare" in out and "evit-fusion" in out and "written:" in out and "matched" in out


def test_readme_carries_the_compare_schema():
    readme = (ROOT / "README.md").read_text()
    start, end = "<!-- compare-schema:start -->\n", "\n<!-- compare-schema:end -->"
    block = readme[readme.index(start) + len(start):readme.index(end)]
    assert block.strip() == schema_markdown().strip(), (
        "README's compare table is stale: regenerate it with\npython -c \"from smarttrim_cli.profiling."
        "compare_report import schema_markdown; print(schema_markdown())\"")
    assert all(f"`{k}`" in block for k in FIELDS)


def test_gate_on_the_margin_and_the_drop(tmp_path):
    d = easyvqa_model(tmp_path)
    args = [str(d), "--dataset", "easyvqa", "--limit", "8", "--calib-limit", "8", "--baselines", "evit,random", *FAST]
    res, out = invoke(args)
    assert res.exit_code == 0, out
    home = Path(__import__("os").environ["SMARTTRIM_HOME"])
    rep = report_at(home / "compare" / "compare.json")
    margin, drop = rep["comparison"]["margin"], rep["comparison"]["drop"]
    assert margin is not None and drop is not None

    res, out = invoke([*args, "--min-margin", f"{margin:.6f}", "--max-drop", f"{drop + 1e-6:.6f}"])
    assert res.exit_code == 0, out
    assert "gate passed" in out

    res, out = invoke([*args, "--min-margin", f"{margin + 0.5:g}", "--json", str(tmp_path / "fail.json")])
    assert res.exit_code == 1, out
    assert f"--min-margin {margin + 0.5:g}" in out and "Traceback" not in out
    failed = report_at(tmp_path / "fail.json")  # written all the same, with the failure in it
    assert failed["gate"]["passed"] is False and "--min-margin" in failed["gate"]["failures"][0]

    res, out = invoke([*args, "--max-drop", f"{drop - 1:g}"])
    assert res.exit_code == 1 and "--max-drop" in out, out


@pytest.mark.parametrize("args, needle", [
    (["--baselines", "evit,nope"], "--baselines: unknown baseline 'nope'"),
    (["--baselines", "evit-finetuned"], "needs a training run"),
    (["--ratios", "0.5,1.5"], "--ratios: ratio 1.5 is outside (0, 1]"),
    (["--thresholds", "0.3,x"], "--thresholds"),
    (["--calib-limit", "0"], "--calib-limit must be >= 1"),
    (["--match-tol", "2"], "--match-tol must be in (0, 1)"),
    (["--dataset", "coco-captions"], "not supported by compare yet"),
    (["--dataset", "nlvr2"], "has a vqa head"),
])
def test_bad_options_are_one_line_errors(tmp_path, args, needle):
    d = easyvqa_model(tmp_path)
    res, out = invoke([str(d), "--dataset", "easyvqa", "--limit", "4", *FAST, *args])
    assert res.exit_code == 2, out
    assert needle in out and "Traceback" not in out
    assert len([ln for ln in out.strip().splitlines() if ln.strip()]) == 1, repr(out)


def test_no_input_left_for_calibration_is_an_error(tmp_path):
    from smarttrim_cli import load
    from smarttrim_cli.data import open_dataset
    from smarttrim_cli.errors import SmartTrimError
    from smarttrim_cli.profiling.compare import split_inputs

    m = load(easyvqa_model(tmp_path), mode="hard")
    ds = open_dataset("easyvqa", None, "test", m.model.config.image_size, label2id=m.labels, limit=10)
    ev, cal = split_inputs(m, ds, 7, 8, 4)  # the split ends: a shorter calibration set, still apart
    assert ev.indices == list(range(7)) and cal.indices == [7, 8, 9]
    with pytest.raises(SmartTrimError, match="none is left to calibrate"):
        split_inputs(m, ds, 10, 8, 4)
    ev, cal = split_inputs(m, ds, 10, 4, 4, overlap_ok=True)  # the benchmarks' older rule
    assert cal.indices == [0, 1, 2, 3]


def test_baselines_act_on_the_recorded_reference(tmp_path):
    """The training-free baselines run on the model the user brought (recorded in config.json), not on the
    fine-tuned weights: a reference that always answers the most common answer, a trimmed model that never does."""
    from safetensors.torch import load_file, save_file

    from smarttrim_cli.data import open_dataset
    from smarttrim_cli.reference import labels_sha256, weights_sha256

    ref, trimmed = easyvqa_model(tmp_path, "ref"), easyvqa_model(tmp_path, "trimmed", seed=1)
    cfg = json.loads((ref / "config.json").read_text())
    ds = open_dataset("easyvqa", None, "test", 32, label2id=cfg["labels"], limit=8)
    answers = [int(ds[i]["target"].argmax()) for i in range(8)]
    k = max(set(answers), key=answers.count)
    for d, push in ((ref, 50.0), (trimmed, -50.0)):
        sd = load_file(str(d / "model.safetensors"))
        sd["vqa_classifier.3.bias"][k] += push
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    tcfg = json.loads((trimmed / "config.json").read_text())
    tcfg["reference"] = {"path": str(ref.resolve()), "sha256": weights_sha256(ref), "backbone": cfg["backbone"],
                         "task": cfg["task"], "labels_sha256": labels_sha256(cfg["labels"])}
    (trimmed / "config.json").write_text(json.dumps(tcfg))

    res, out = invoke([str(trimmed), "--dataset", "easyvqa", "--limit", "8", "--calib-limit", "8",
                       "--baselines", "evit,tome", *FAST, "--json", str(tmp_path / "c.json")])
    assert res.exit_code == 0, out
    rep = report_at(tmp_path / "c.json")
    assert rep["reference"]["model_dir"] == str(ref.resolve()) and rep["reference"]["source"] == "recorded"
    full, st = rep["methods"][0], rep["methods"][1]
    assert full["accuracy"] == pytest.approx(100 * answers.count(k) / 8) and full["accuracy"] > 0
    hit = [i for i, a in enumerate(answers) if a == k]
    assert all(st["per_input"]["score"][i] == 0 for i in hit)  # the trimmed weights never give that answer
    for m in rep["methods"][2:]:
        assert m["per_input"]["score"] == full["per_input"]["score"], m["name"]  # the reference's answers
    assert rep["comparison"]["drop"] == pytest.approx(full["accuracy"] - st["accuracy"]) and rep["comparison"]["drop"] > 0


def test_nlvr2_two_images_per_input(tmp_path):
    """A class-label task with two images per input: accuracy, both images' cost, the baselines on both passes."""
    _write_nlvr2(tmp_path / "nlvr2", n=8)
    d = tiny_model_dir(tmp_path / "m", "nlvr2")
    res, out = invoke([str(d), "--dataset", "nlvr2", "--data-dir", str(tmp_path / "nlvr2"), "--limit", "5",
                       "--calib-limit", "8", "--baselines", "evit,random", *FAST, "--json", str(tmp_path / "c.json")])
    assert res.exit_code == 0, out
    rep = report_at(tmp_path / "c.json")
    assert missing_fields(rep) == [] and rep["metric"] == "accuracy"
    assert rep["settings"]["n_inputs"] == 5 and rep["settings"]["calib_inputs"] == 3  # the split ends at 8
    assert rep["inputs"]["evaluated_ids"] == [f"dev-{i}-0-0" for i in range(5)] and rep["inputs"]["disjoint"]
    for m in rep["methods"]:
        assert all(s in (0.0, 1.0) for s in m["per_input"]["score"])
    for m in rep["methods"][2:]:
        assert m["matched"], (m["name"], m["gmacs_ratio"], m["target_ratio"])


# targets above each tiny model's floor (the default placements' cost with every droppable token dropped)
@pytest.mark.parametrize("family, ratio", [("vilt", 0.8), ("blip", 0.9)])
def test_hugging_face_families(tmp_path, family, ratio):
    """Nothing in compare is METER's: a ViLT and a BLIP VQA directory, attached, against two baselines."""
    from tiny_hf import write_tiny_blip, write_tiny_vilt

    src = (write_tiny_vilt if family == "vilt" else write_tiny_blip)(tmp_path / family)
    r = runner.invoke(app, ["attach", str(src), "-o", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    res, out = invoke([str(tmp_path / "m"), "--dataset", "easyvqa", "--limit", "8", "--calib-limit", "8",
                       "--baselines", "evit,tome", "--ratios", str(ratio), *FAST, "--json", str(tmp_path / "c.json")])
    assert res.exit_code == 0, out
    rep = report_at(tmp_path / "c.json")
    assert missing_fields(rep) == [] and rep["settings"]["n_inputs"] == 8
    at = [m for m in rep["methods"] if m["target_ratio"] == ratio]
    assert [m["family"] for m in at] == ["evit", "tome"]
    for m in at:
        assert m["matched"] and m["gmacs_ratio"] < ratio + 0.05, (m["name"], m["gmacs_ratio"])
