"""Scenes in the profile (objects per input, the objects plot and JSON summary) and
`smarttrim demo --dataset scenes --quick` end to end."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from smarttrim_cli.cli import app
from tiny_meter import tiny_model_dir

runner = CliRunner()
PNG = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


def _qid_objects(scenes_json: Path) -> dict:
    return {q["question_id"]: sc["n_objects"] for sc in json.loads(scenes_json.read_text())["scenes"]
            for q in sc["questions"]}


def test_profile_reports_objects_on_scenes_and_null_elsewhere(tmp_path):
    from smarttrim_cli.data import build_vqa_vocab
    from smarttrim_cli.data.scenes import generate_scenes
    from smarttrim_cli.profiling.report import missing_fields
    from smarttrim_cli.profiling.runner import ProfileSettings, run_profile

    data = tmp_path / "scenes"
    generate_scenes(data, n_train=4, n_val=6, seed=1, image_size=64)
    labels = build_vqa_vocab(data, ["train", "val"], min_count=1)
    mdir = tiny_model_dir(tmp_path / "m", "vqa", labels=labels, num_labels=len(labels), image_size=64, patch_size=16)
    fast = dict(iters=1, warmup=0, batch_size=2, throughput_batches=1, fvcore_limit=1, threads=1)
    res = run_profile(ProfileSettings(model_dir=mdir, dataset="vqa", data_dir=data, split="val", limit=12, show=1,
                                      out_dir=tmp_path / "prof", **fast))
    rep = json.loads(Path(res.files["json"]).read_text())
    assert missing_fields(rep) == []
    truth = _qid_objects(data / "scenes_val.json")
    assert all(r["objects"] == truth[r["id"]] for r in rep["per_input"])
    ob = rep["objects"]
    assert ob["n_inputs"] == 12 and ob["n_unmatched"] == 0 and ob["image_tokens_full"] == 17
    assert sum(r["n"] for r in ob["by_objects"]) == 12
    for row in ob["by_objects"]:
        sel = [r for r in rep["per_input"] if r["objects"] == row["objects"]]
        assert row["image_tokens_final_mean"] == pytest.approx(sum(r["image_tokens_final"] for r in sel) / len(sel))
        assert row["gmacs_ratio_mean"] == pytest.approx(row["gmacs_trimmed_mean"] / row["gmacs_full_mean"])
    assert {k["kind"] for k in ob["by_kind"]} <= {"count_all", "count_color", "count_shape", "exist", "attr_color",
                                                   "attr_shape", "rel_yesno", "rel_attr"}
    for key in ("objects", "objects_show"):
        assert Path(rep["files"][key]).read_bytes()[:8] == PNG

    # a VQAv2 folder without scenes_<split>.json: the fields are there, and null
    (data / "scenes_val.json").rename(data / "moved.json")
    res = run_profile(ProfileSettings(model_dir=mdir, dataset="vqa", data_dir=data, split="val", limit=2,
                                      out_dir=tmp_path / "prof2", **fast))
    rep = json.loads(Path(res.files["json"]).read_text())
    assert rep["objects"] is None and all(r["objects"] is None for r in rep["per_input"])
    assert rep["files"]["objects"] is None and missing_fields(rep) == []


def test_demo_scenes_quick_end_to_end_and_reuse(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "demo"
    r = runner.invoke(app, ["demo", "--dataset", "scenes", "--quick", "-o", str(out), "--threads", "1"])
    assert r.exit_code == 0, r.output
    for label in ("started from vs trimmed", "trimmed vs control", "GMACs / input", "onnxruntime latency", "ONNX validation: passed",
                  "training-free baselines", "kept image tokens by objects"):
        assert label in r.output, label
    s = json.loads((out / "summary.json").read_text())
    assert s["onnx_validation_ok"] is True and s["trimmed"]["gmacs"] < s["full"]["gmacs"]
    meta = json.loads((out / "scenes" / "scenes_meta.json").read_text())
    assert meta["args"]["image_size"] == 64 and meta["args"]["max_objects"] == 6
    rep = json.loads((out / "profile" / "report.json").read_text())
    assert rep["model"]["image_size"] == 64 and rep["model"]["patch_size"] == 16 and rep["model"]["image_tokens"] == 17
    truth = _qid_objects(out / "scenes" / "scenes_val.json")
    assert rep["per_input"] and all(p["objects"] == truth[p["id"]] for p in rep["per_input"])
    assert s["objects"]["by_objects"] == rep["objects"]["by_objects"]
    names = [b["name"] for b in s["baselines"]]
    assert names[:2] == ["full (base)", "smarttrim"] and {"evit", "tome", "random", "downsample"} <= set(names)
    bl = json.loads((out / "baselines.json").read_text())
    assert bl["n_inputs"] == rep["settings"]["n_inputs"]
    assert bl["methods"][0]["accuracy"] == pytest.approx(rep["accuracy"]["trimmed"])  # same inputs, same answers
    # the profile's reference is the base SmartTrim started from (with its trimmers re-placed: same weights)
    assert rep["accuracy"]["reference"]["model_dir"].endswith("base-vision0.2_fusenearest")
    assert bl["full"]["accuracy"] == pytest.approx(rep["accuracy"]["full"])
    for png in ("profile/objects.png", "profile/objects_show.png", "baselines.png", "baselines_objects.png"):
        assert (out / png).read_bytes()[:8] == PNG, png
    for stage in ("init", "base", "trimmed"):
        assert (out / f".{stage}.done.json").is_file()
    # recipes/scenes.yaml places the image trimmers before ViT blocks 0 and 2 and fuses dropped tokens by the
    # nearest rule: SmartTrim was fine-tuned from a copy of the base with those trimmers
    import smarttrim_cli
    for name in ("trimmed", "base-vision0.2_fusenearest"):
        t = smarttrim_cli.load(out / name).model.trim_config
        assert t.fuse and t.fuse_mode == "nearest" and t.token_layers["vision"] == [0, 2], name
        assert t.token_layers["ximage"] == smarttrim_cli.load(out / "base").model.trim_config.token_layers["ximage"]
    t = smarttrim_cli.load(out / "base").model.trim_config
    assert not t.fuse and t.token_layers["vision"] != [0, 2]

    # a second run regenerates and retrains nothing: it goes straight to profiling
    class Reached(Exception):
        pass

    def no_training(*a, **k):
        raise AssertionError("retrained although the first run's models are there")

    def no_generation(*a, **k):
        raise AssertionError("rewrote the cached scenes")

    def stop(*a, **k):
        raise Reached

    import smarttrim_cli.data.scenes as sc

    real = sc._generate_split
    monkeypatch.setattr(sc, "_generate_split", no_generation)
    monkeypatch.setattr("smarttrim_cli.train.loop.finetune", no_training)
    monkeypatch.setattr("smarttrim_cli.profiling.runner.run_profile", stop)
    from smarttrim_cli.demo import DemoSettings, run_demo

    with pytest.raises(Reached):
        run_demo(DemoSettings(dataset="scenes", quick=True, out_dir=str(out)), say=lambda m: None)
    monkeypatch.setattr(sc, "_generate_split", real)


def test_demo_scenes_bad_arguments(tmp_path):
    r = runner.invoke(app, ["demo", "--quick", "--dataset", "scenes", "--target-ratio", "3", "-o", str(tmp_path / "d")])
    assert r.exit_code == 2 and "--target-ratio" in r.output and "Traceback" not in r.output
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("mine")
    r = runner.invoke(app, ["demo", "--quick", "--dataset", "scenes", "--data-dir", str(tmp_path / "full"),
                            "-o", str(tmp_path / "d2")])
    assert r.exit_code == 2 and "refusing to replace" in r.output and (tmp_path / "full" / "x.txt").is_file()
