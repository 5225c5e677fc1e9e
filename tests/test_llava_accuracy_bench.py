"""benchmarks/llava_accuracy.py --quick end to end (issue 17's benchmark b): the LLaVA demo's quick model on the
scenes set, SmartTrim at two image-token keep ratios and a second seed, the control, the full model and every
image-token baseline at SmartTrim's GMACs and at its kept tokens; the outputs' structure and their numbers checked
against each other. The quick model's numbers mean nothing (a few steps): the test checks the harness."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WRAPPED = ["random", "pool", "visionzip", "divprune", "dart", "fastv"]
N_IMAGE = (48 // 4) ** 2  # the quick scenes LLaVA: 48 px images, 4 px patches


def _bench(tmp_path, *args):
    env = {"SMARTTRIM_HOME": str(tmp_path / "home"), "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "llava_accuracy.py"), "--quick", "--threads", "1",
                        *args], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def test_llava_accuracy_quick_end_to_end(tmp_path):
    out = tmp_path / "results"
    _bench(tmp_path, "--keep", "0.5,0.25", "--seeds", "0,1", "--seeds-keep", "0.25", "--out", str(out))
    res = json.loads((out / "llava_accuracy_scenes_quick.json").read_text())
    for f in ("png", "objects_png"):
        assert Path(res["files"][f]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "llava_accuracy_scenes_quick.md").read_text()
    assert "Command: `python benchmarks/llava_accuracy.py --quick" in md and "**Goals**" in md

    # every keep ratio at the first seed, the second seed at --seeds-keep only
    plan = [(0.5, 0), (0.25, 0), (0.25, 1)]
    assert [(r["keep_ratio"], r["seed"]) for r in res["results"]] == plan
    assert [(p["keep_ratio"], p["seed"]) for p in res["runs_plan"]] == plan

    # keep ratio -> GMACs target: the trimmer at the fixed ratio keeps ceil(k N) image tokens (+ the first one the
    # family always keeps when it is not among them), and fewer tokens cost less
    costs = res["keep_costs"]
    for k in (0.5, 0.25):
        c = costs[f"{k:g}"]
        assert c["image_tokens_full"] == N_IMAGE and c["n_inputs"] == res["eval_inputs"]
        assert math.ceil(k * N_IMAGE) <= c["image_tokens_mean"] <= math.ceil(k * N_IMAGE) + 1
        assert c["gmacs_target"] == round(c["gmacs_ratio"], 4)
    assert costs["0.25"]["gmacs_ratio"] < costs["0.5"]["gmacs_ratio"] < 1.0
    # GMACs per kept image token, to read a GMACs tolerance in tokens
    slope = ((costs["0.5"]["gmacs_ratio"] - costs["0.25"]["gmacs_ratio"])
             / (costs["0.5"]["image_tokens_mean"] - costs["0.25"]["image_tokens_mean"]))

    full, control = res["full"], res["control"]
    assert full["gmacs_ratio"] == pytest.approx(1.0) and control["gmacs_ratio"] == pytest.approx(1.0)
    assert full["image_tokens_mean"] == N_IMAGE and res["baselines"] == WRAPPED
    assert res["runs"]["control"]["steps"] == res["runs"]["smarttrim-k0.25"]["steps"]  # the equal-steps control
    for r in res["results"]:
        st, k = r["smarttrim"], r["keep_ratio"]
        target = costs[f"{k:g}"]["gmacs_target"]
        assert r["gmacs_target"] == st["gmacs_target"] == target == res["runs"][r["run"]]["gmacs_target"]
        assert r["run"] == f"smarttrim-k{k:g}" + (f"-seed{r['seed']}" if r["seed"] else "")
        cfg = json.loads((Path(res["runs"][r["run"]]["dir"]) / "finetune_summary.json").read_text())["config"]
        assert cfg["target_ratio"] == target and cfg["seed"] == r["seed"]
        assert r["image_tokens_expected"] == pytest.approx(k * N_IMAGE)
        # finetune's calibration leaves the run at most the tolerance above its target; when it is also not below
        # (reached), its kept tokens are k N within that tolerance read in tokens
        assert r["target_reached"] == (abs(st["gmacs_ratio"] - target) <= r["target_tolerance"])
        assert st["gmacs_ratio"] <= target + r["target_tolerance"]
        if r["target_reached"]:
            assert abs(st["image_tokens_mean"] - k * N_IMAGE) <= r["target_tolerance"] / slope + 1
        assert r["delta_vs_full"] == pytest.approx(st["accuracy"] - full["accuracy"])
        assert r["delta_vs_control"] == pytest.approx(st["accuracy"] - control["accuracy"])
        assert st["by_objects"] and sum(b["n"] for b in st["by_objects"]) == st["n"] == res["eval_inputs"]
        # every baseline, twice: calibrated to SmartTrim's GMACs ratio, and to its kept image tokens
        assert [b["family"] for b in r["gmacs_matched"]] == WRAPPED
        assert [b["name"] for b in r["tokens_matched"]] == [f"{n} (tokens)" for n in WRAPPED]
        for b in r["gmacs_matched"]:
            assert b["n"] == st["n"] and b["target_ratio"] == pytest.approx(st["gmacs_ratio"])
            if b["calibration"]["reached"]:  # calibrated on the held-apart prompts, evaluated on the others
                assert abs(b["gmacs_ratio"] - st["gmacs_ratio"]) <= b["calibration"]["tolerance"] + 0.02
        for b in r["tokens_matched"]:
            assert b["target_tokens"] == pytest.approx(st["image_tokens_mean"])
            if b["calibration"]["reached"]:
                assert abs(b["image_tokens_mean"] - st["image_tokens_mean"]) <= b["calibration"]["tolerance"] + 1e-6
        for view in ("gmacs", "tokens"):
            rows = r[f"{view}_matched"]
            within = [b for b in rows if b["name"] not in r[f"left_out_{view}"]]
            if within:
                best = max(within, key=lambda b: b["accuracy"])
                assert r[f"margin_{view}"] == pytest.approx(st["accuracy"] - best["accuracy"])
                assert r[f"best_baseline_{view}"] == best["name"]
    g = res["goals"]
    assert set(g["within_1_of_full_at_0.25"]["drop_per_seed"]) == {"0", "1"}
    assert g["ahead_of_every_baseline"]["judged"] <= 2 * len(plan)
    assert set(g["tokens_grow_with_objects"]["spearman"]) == {r["run"] for r in res["results"]}
    assert res["machine"]["load_average_start"] and res["torch_threads"] == 1

    # a second process finds every run cached (--train-only trains nothing more, evaluates nothing)
    text = _bench(tmp_path, "--keep", "0.25", "--seeds", "1", "--train-only", "--no-control", "--out",
                  str(tmp_path / "again"))
    assert "SmartTrim fine-tune" not in text and "training the base" not in text and "smarttrim-k0.25-seed1" in text
    assert not (tmp_path / "again").exists()
