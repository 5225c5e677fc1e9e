"""The side-by-side comparison harness: objects statistics, the shared evaluation code, the fine-tuned
fixed-ratio EViT baseline, and benchmarks/pareto.py --quick end to end (on tiny real-format data)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tiny_meter import tiny_model_dir

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from smarttrim_cli.data.scenes import generate_scenes

    d = tmp_path_factory.mktemp("scenes") / "set"
    generate_scenes(d, n_train=8, n_val=6, seed=3, image_size=64, questions_per_image=3)
    return d


@pytest.fixture(scope="module")
def scene_model(scenes, tmp_path_factory):
    from smarttrim_cli.data import build_vqa_vocab

    labels = build_vqa_vocab(scenes, ["train", "val"], min_count=1)
    root = tmp_path_factory.mktemp("model")
    return tiny_model_dir(root / "m", "vqa", labels=labels, num_labels=len(labels), image_size=64, patch_size=16,
                          trim_kw={"init_keep": 3.0})


# ----- objects.py ------------------------------------------------------------------------------------------
def _average_ranks(v):
    """Rank of each value by definition: 1 + the number of smaller values + half the number of equal others
    (ties get the mean of the positions they share). Independent of the sort-based ranking under test."""
    v = np.asarray(v, dtype=np.float64)
    return np.array([1 + (v < a).sum() + ((v == a).sum() - 1) / 2 for a in v])


def _pearson(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / math.sqrt((a * a).sum() * (b * b).sum()))


def test_spearman_with_ties_matches_hand_computed_values():
    from smarttrim_cli.profiling.objects import direction, spearman

    # By hand: ranks x -> [1, 2.5, 2.5, 4, 5], y -> [2, 1, 5, 3.5, 3.5]; centred products sum to 3.5 and both
    # sums of squares are 9.5, so rho = 7/19. Without tie averaging (or with the no-ties shortcut formula,
    # which gives 0.4) the value differs.
    assert spearman([1, 2, 2, 3, 4], [2, 1, 4, 3, 3]) == pytest.approx(7 / 19, abs=1e-12)
    rng = np.random.default_rng(0)
    x = rng.integers(1, 7, 60)
    y = 3 * x + rng.normal(0, 4, 60).round()
    expected = _pearson(_average_ranks(x), _average_ranks(y))
    assert spearman(x, y) == pytest.approx(expected, abs=1e-12)
    assert spearman(x, -y) == pytest.approx(-expected, abs=1e-12)
    assert spearman([1, 1, 1], [1, 2, 3]) is None and spearman([1, 2], [2, 1]) is None
    assert direction(0.5) == "more on crowded images" and direction(-0.5) == "fewer on crowded images"
    assert direction(0.0) == "flat" and direction(None).startswith("flat")


def test_by_objects_groups_and_skips_unknown():
    from smarttrim_cli.profiling.objects import by_objects

    rows = by_objects([1, 2, 2, None, 1], {"t": [10, 20, 30, 99, 14]})
    assert [(r["objects"], r["n"], r["t_mean"]) for r in rows] == [(1, 2, 12.0), (2, 2, 25.0)]
    assert rows[1]["t_std"] == pytest.approx(5.0)


def test_scene_index_matches_the_scenes_file(scenes):
    from smarttrim_cli.data import open_dataset
    from smarttrim_cli.profiling.objects import SceneIndex, scenes_file

    assert scenes_file(scenes, "val2014") == scenes / "scenes_val.json" == scenes_file(scenes, "val")
    assert scenes_file(scenes, "test") is None and scenes_file(None, "val") is None
    ds = open_dataset("vqa", scenes, "val", 64, label2id=["yes", "no"])
    idx = SceneIndex.for_dataset(ds)
    raw = json.loads((scenes / "scenes_val.json").read_text())["scenes"]
    for sc in raw:
        for q in sc["questions"]:
            assert idx.objects(q["question_id"]) == sc["n_objects"] == len(sc["objects"])
            assert idx.kind(q["question_id"]) == q["kind"]
    assert idx.objects(123456789) is None
    (scenes.parent / "bad").mkdir(exist_ok=True)
    (scenes.parent / "bad" / "scenes_val.json").write_text("{}")
    from smarttrim_cli.errors import SmartTrimError

    with pytest.raises(SmartTrimError, match="scenes_val.json: not a scenes file"):
        SceneIndex.load(scenes.parent / "bad" / "scenes_val.json")


# ----- compare.py: one evaluation for every method -----------------------------------------------------------
def test_evalset_batched_costs_equal_batch_one_and_objects_attached(scene_model, scenes):
    from smarttrim_cli import load
    from smarttrim_cli.baselines import get_baseline
    from smarttrim_cli.data import open_dataset
    from smarttrim_cli.profiling.compare import EvalSet, markdown_table
    loaded = load(scene_model, mode="hard")
    m = loaded.model
    ds = open_dataset("vqa", scenes, "val", 64, label2id={a: i for i, a in enumerate(loaded.labels)})
    ev = EvalSet.build(loaded, ds, limit=10, batch_size=4)
    ev1 = EvalSet.build(loaded, ds, limit=10, batch_size=1)
    assert len(ev) == 10 and all(isinstance(o, int) and 1 <= o <= 6 for o in ev.objects)
    full = ev.set_full_gmacs(m)
    assert ev1.set_full_gmacs(m) == pytest.approx(full, rel=1e-9)  # padding is not counted
    bl = get_baseline("evit", keep_ratio=0.4)
    a = bl.apply(m)
    row = ev.evaluate("evit", lambda b: a.run(b, record=True), family="evit")
    row1 = ev1.evaluate("evit", lambda b: a.run(b, record=True), family="evit")
    assert row["gmacs_mean"] == pytest.approx(row1["gmacs_mean"], rel=1e-6)
    assert row["accuracy"] == pytest.approx(row1["accuracy"], abs=1e-9)
    assert row["image_tokens_mean"] == pytest.approx(row1["image_tokens_mean"])
    assert row["gmacs_ratio"] < 1 and row["image_tokens_mean"] < ev.n_image_tokens
    assert sum(r["n"] for r in row["by_objects"]) == 10
    # per question kind: the generator's kinds, counts adding up, each kind's accuracy the mean of its inputs' scores
    import json as _json
    from smarttrim_cli.data.scenes import KINDS
    truth = {q["question_id"]: q["kind"] for sc in _json.loads((scenes / "scenes_val.json").read_text())["scenes"]
             for q in sc["questions"]}
    assert ev.kinds == [truth[q] for q in ev.ids] and set(row["by_kind"]) <= set(KINDS)
    assert sum(v["n"] for v in row["by_kind"].values()) == 10
    n_acc = sum(v["n"] * v["accuracy"] for v in row["by_kind"].values()) / 10
    assert n_acc == pytest.approx(row["accuracy"], abs=1e-9)
    ref = ev.evaluate("full", lambda x: m.run(x, mode="full", record=True))
    assert ref["gmacs_ratio"] == pytest.approx(1.0) and ref["image_tokens_mean"] == ev.n_image_tokens
    md = markdown_table([ref, row], ref)
    assert md.count("\n") == 3 and "| evit |" in md


# ----- the fine-tuned fixed-ratio EViT baseline ------------------------------------------------------------
def test_evit_soft_training_rule_equals_hard_inference_rule(scene_model, scenes):
    """The rule evit-ft trains with (soft masks) is the rule it is evaluated with (hard gather)."""
    from smarttrim_cli import load
    from smarttrim_cli.baselines.common import token_positions
    from smarttrim_cli.baselines.evit import EViTPolicy
    from smarttrim_cli.data import collate, open_dataset

    loaded = load(scene_model, mode="hard")
    m = loaded.model
    ds = open_dataset("vqa", scenes, "val", 64, label2id={a: i for i, a in enumerate(loaded.labels)})
    b = collate([ds[i] for i in range(4)], loaded.tokenizer, 12)
    b = {k: b[k] for k in ("pixel_values", "input_ids", "attention_mask")}
    names = token_positions(m)
    with torch.no_grad():
        hard, ch = m.run(b, mode="hard", record=True, policy=EViTPolicy(names, 0.5))
        soft, cs = m.run(b, mode="soft", policy=EViTPolicy(names, 0.5))
    assert torch.allclose(hard, soft, atol=1e-4)
    key = "tok:ximage_0"
    assert torch.equal(ch.decisions[key].bool(), cs.decisions[key].bool())
    kept = ch.decisions["tok:vision_1"].sum(1)
    assert torch.all(kept == math.ceil(0.5 * 17))  # ceil(r * 17 live tokens), [CLS] among them
    # merge (the learned trimmers' token fusion): the same in both modes, and it changes the result
    with torch.no_grad():
        hard_m, chm = m.run(b, mode="hard", record=True, policy=EViTPolicy(names, 0.5, merge=True))
        soft_m, _ = m.run(b, mode="soft", policy=EViTPolicy(names, 0.5, merge=True))
    assert torch.allclose(hard_m, soft_m, atol=1e-4) and not torch.allclose(hard_m, hard, atol=1e-3)
    assert torch.equal(chm.decisions["tok:vision_1"], ch.decisions["tok:vision_1"])  # same rule, fused extra
    from smarttrim_cli.trim.cost import total_macs
    assert (total_macs(chm.records) > total_macs(ch.records)).all()  # the fused token costs a token


def test_evit_rule_finetune_trains_backbone_only_and_records_its_rule(scene_model, scenes, tmp_path):
    from safetensors.torch import load_file

    from smarttrim_cli import load
    from smarttrim_cli.baselines import BASELINES, get_baseline
    from smarttrim_cli.baselines.evit_finetuned import EViTFinetuned, EViTRule
    from smarttrim_cli.errors import SmartTrimError
    from smarttrim_cli.model_dir import read_config
    from smarttrim_cli.train.loop import finetune

    over = dict(dataset="vqa", data_dir=str(scenes), workers=0, batch_size=8, max_steps=3, lr=1e-3,
                eval_before=False, log_every=1, limit=16, val_limit=8)
    res = finetune(scene_model, tmp_path / "evit-ft", recipe=False, overrides=over, progress=False, rule=EViTRule(0.4))
    s = res.summary
    assert s["mode"] == "evit-finetuned" and s["steps"] == 3 and s["keep_ratio"] == 0.4
    steps = [r for r in res.history if r["event"] == "step"]
    assert len(steps) == 3 and all(r["keep_ratio"] <= 1.0 for r in steps)
    assert steps[-1]["keep_ratio"] == pytest.approx(0.4)  # the curriculum ends at the fixed ratio
    cfg = read_config(tmp_path / "evit-ft")
    assert cfg["evit_finetuned"]["keep_ratio"] == 0.4 and cfg["provenance"]["finetune_mode"] == "evit-finetuned"
    # written by the same finish step as SmartTrim's: its lineage, and the model it is measured against
    assert cfg["provenance"]["made_by"] == "finetune (evit-finetuned)"
    assert cfg["reference"]["path"] == str(Path(scene_model).resolve())
    before = load_file(str(Path(scene_model) / "model.safetensors"))
    after = load_file(str(tmp_path / "evit-ft" / "model.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and not any(k.startswith(("token_trimmers.", "head_trimmers.")) for k in changed)
    bl = EViTFinetuned.from_dir(tmp_path / "evit-ft")
    assert bl.keep_ratio == 0.4 and bl.name == "evit-finetuned"
    m = load(tmp_path / "evit-ft", mode="hard").model
    b = {"pixel_values": torch.randn(2, 3, 64, 64), "input_ids": torch.tensor([[0, 50, 60, 2]] * 2),
         "attention_mask": torch.ones(2, 4, dtype=torch.long)}
    _, ctx = bl.apply(m).run(b, record=True)
    assert torch.all(ctx.decisions["tok:vision_1"].sum(1) == math.ceil(0.4 * 17))  # ceil(r * live tokens), [CLS] among them
    assert "evit-finetuned" in BASELINES and get_baseline("evit-finetuned").name == "evit-finetuned"
    with pytest.raises(SmartTrimError, match="keep ratio"):
        EViTRule(1.5)
    with pytest.raises(SmartTrimError, match="evit_finetuned"):
        EViTFinetuned.from_dir(scene_model)


# ----- benchmarks/pareto.py --quick end to end ---------------------------------------------------------------
def test_pareto_quick_end_to_end(tmp_path):
    env = {"SMARTTRIM_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    import os

    env["PATH"] = os.environ.get("PATH", env["PATH"])
    out = tmp_path / "results"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pareto.py"), "--dataset", "scenes", "--quick",
                        "--ratios", "0.6", "--baselines", "evit,tome", "--threads", "1", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / "pareto_scenes_quick.json").read_text())
    names = [m["name"] for m in res["methods"]]
    assert names == ["SmartTrim @0.6", "EViT fine-tuned @0.6", "evit @0.6", "tome @0.6"]
    assert res["control"]["gmacs_ratio"] == pytest.approx(1.0) and res["full"]["gmacs_ratio"] == pytest.approx(1.0)
    for m in res["methods"]:
        assert m["n"] == res["eval_inputs"] and m["gmacs_ratio"] < 1.0
        assert m["by_objects"] and sum(b["n"] for b in m["by_objects"]) == m["n"]
    assert res["runs"]["control"]["summary"]["mode"] == "plain"
    assert res["runs"]["control"]["summary"]["steps"] == res["runs"]["smarttrim@0.6"]["summary"]["steps"]
    assert res["runs"]["evit-ft@0.6"]["summary"]["steps"] == res["runs"]["smarttrim@0.6"]["summary"]["steps"]
    g = res["goals"]
    assert g["ratio"] == 0.6 and "margin_over_best_baseline" in g and "drop_vs_control" in g
    for f in ("png", "objects_png"):
        assert Path(res["files"][f]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "pareto_scenes_quick.md").read_text()
    assert "Command: `python benchmarks/pareto.py --dataset scenes --quick" in md and "SmartTrim @0.6" in md

    # --token-layers/--fuse: SmartTrim and evit-ft start from a copy of the base with the token trimmers re-placed
    # and token fusion on; --head-layers re-places SmartTrim's head trimmers only (evit-ft trims no heads);
    # the control (which does not trim) is the one already trained, not retrained (--no-control evaluates it)
    r2 = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pareto.py"), "--dataset", "scenes", "--quick",
                         "--ratios", "0.6", "--baselines", "evit", "--threads", "1", "--token-layers", "vision=0",
                         "--head-layers", "xtext=", "--fuse", "--no-control", "--evit-set", "distill_temperature=2", "--out", str(tmp_path / "placed")], capture_output=True, text=True, env=env,
                        timeout=900)
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    res2 = json.loads((tmp_path / "placed" / "pareto_scenes_quick.json").read_text())
    assert res2["runs"]["control"]["dir"] == res["runs"]["control"]["dir"]
    assert res2["control"]["accuracy"] == res["control"]["accuracy"]
    for key, tail in (("smarttrim@0.6", "-vision0_hxtext-_fusenearest"), ("evit-ft@0.6", "-vision0_fusenearest-distill_temperature2")):
        d = Path(res2["runs"][key]["dir"])
        assert d.name.endswith(tail) and d != Path(res["runs"][key]["dir"]), d.name
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["trim"]["token_layers"]["vision"] == [0] and cfg["trim"]["fuse"] is True
        assert ("xtext" in cfg["trim"]["head_layers"]) == key.startswith("evit")
        if key.startswith("evit"):  # the fixed-ratio baseline trains and runs with the same token fusion
            assert cfg["evit_finetuned"]["merge"] is True
    assert json.loads((Path(res["runs"]["smarttrim@0.6"]["dir"]) / "config.json").read_text())["trim"][
        "token_layers"]["vision"] != [0]
    evit_cfg = json.loads((Path(res2["runs"]["evit-ft@0.6"]["dir"]) / "finetune_summary.json").read_text())["config"]
    assert evit_cfg["distill_temperature"] == 2 and json.loads((Path(res2["runs"]["smarttrim@0.6"]["dir"]) /
                                                                "finetune_summary.json").read_text())["config"][
        "distill_temperature"] == 1
    assert res2["full"]["accuracy"] == res["full"]["accuracy"]

    # benchmarks/seed_table.py finds the cached runs by pareto's own naming and reads their stamps (no training)
    run_dir = Path(res["runs"]["smarttrim@0.6"]["dir"])
    place = run_dir.name.removeprefix("smarttrim-r0.6")
    folder = run_dir.parent
    r3 = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "seed_table.py"), "--dataset", "scenes",
                         "--folder", str(folder), "--ratio", "0.6", "--seeds", "0,1", f"--place={place}",
                         "--variant", "recipe=", "--variant", "colder=distill_temperature=3",
                         "--out", str(tmp_path / "seeds" / "t")], capture_output=True, text=True, env=env, timeout=300)
    assert r3.returncode == 0, r3.stdout[-3000:] + r3.stderr[-3000:]
    tab = json.loads((tmp_path / "seeds" / "t.json").read_text())
    stamp = json.loads((folder / f".{run_dir.name}.done.json").read_text())["result"]
    rec, colder = tab["variants"]
    assert [x["run"] for x in rec["runs"]] == [run_dir.name] and rec["missing"] == [run_dir.name + "-seed1"]
    assert rec["score"]["mean"] == pytest.approx(stamp["calibrated"]["score"] * 100)
    assert rec["runs"][0]["objective"]["distill_weight"] == stamp["config"]["distill_weight"]
    assert colder["runs"] == [] and len(colder["missing"]) == 2
    assert tab["full"] == pytest.approx(json.loads((folder / ".base.done.json").read_text())["result"]["final"]["score"] * 100)
    assert (tmp_path / "seeds" / "t.png").read_bytes()[:4] == b"\x89PNG"
