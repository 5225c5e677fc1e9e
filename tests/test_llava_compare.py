"""``smarttrim compare`` on a text-generating model (profiling/compare_generation.py): a tiny real LLaVA directory
attached with an input-dependent trimmer (tests/llava_data.py), compared on a tiny prompts folder whose answers
come from the model's own outputs; the report is checked against ``generate`` by hand, the baselines'
calibration against measuring them by hand on the held-apart inputs, and the gate and option errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from smarttrim_cli.cli import app
from smarttrim_cli.profiling.compare_report import missing_fields

from llava_data import by_hand as generate_by_hand, trimmed_llava, write_images, write_prompts

pytestmark = pytest.mark.usefixtures("one_thread")
# the first four are evaluated (--limit 4), the last two calibrate the baselines (--calib-limit 2)
PROMPTS = ["what color is the shape ?", "is there a red circle ?", "what is in the image ?", "what shape is there ?",
           "is the shape blue ?", "what is there ?"]
N_EVAL, N_NEW, TOL = 4, 3, 0.05
WRAPPED = ["random", "pool", "visionzip", "divprune", "dart", "fastv"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        return trimmed_llava(tmp_path_factory.mktemp("llava-compare"), PROMPTS[:N_EVAL], mp.setenv)


@pytest.fixture(scope="module")
def by_hand(model_dir, tmp_path_factory):
    """The prompts folder and each input through the model's own generate. Answers mix the full and trimmed
    model's answers, so that scores are neither all 0 nor equal for both (a mix-up of methods shows)."""
    d = tmp_path_factory.mktemp("prompts")
    write_images(d, len(PROMPTS))
    write_prompts(d, PROMPTS, [["yes"]] * len(PROMPTS))
    _, rows = generate_by_hand(model_dir, d, N_NEW)
    f, h = [r["texts"]["full"] for r in rows], [r["texts"]["hard"] for r in rows]
    write_prompts(d, PROMPTS, [[f[0]] * 3 + [h[0]] * 7, [h[1]] * 2 + ["square"] * 8, ["circle"], [f[3]] * 10,
                               ["no"], ["red"]])
    m, rows = generate_by_hand(model_dir, d, N_NEW)
    return d, m, rows


def _compare(model_dir, data_dir, out, *opt):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SMARTTRIM_HOME", str(out / "home"))
        return CliRunner().invoke(app, ["compare", str(model_dir), "--dataset", "prompts", "--data-dir",
                                        str(data_dir), "--limit", str(N_EVAL), "--calib-limit", "2", "--out", str(out),
                                        "--max-new-tokens", str(N_NEW), "--tol", str(TOL), *opt])


@pytest.fixture(scope="module")
def report(model_dir, by_hand, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    r = _compare(model_dir, by_hand[0], out)
    assert r.exit_code == 0, r.output
    return json.loads((out / "compare.json").read_text())


def rows_of(report, role):
    return [m for m in report["methods"] if m["role"] == role]


def test_cli_writes_every_wrapped_baseline_row(report):
    assert missing_fields(report) == [] and report["metric"] == "vqa_score_generated"
    assert report["settings"]["max_new_tokens"] == N_NEW and report["settings"]["batch_size"] == 1
    base = rows_of(report, "baseline")
    assert [m["name"] for m in base] == WRAPPED == report["settings"]["baselines"]
    N = report["methods"][0]["image_tokens_full"]
    for m in base:
        assert m["n"] == N_EVAL and 0 <= m["accuracy"] <= 100 and m["gmacs_ratio"] > 0
        assert 1 <= m["image_tokens_mean"] <= N and len(m["per_input"]["image_tokens"]) == N_EVAL
        assert m["paired"]["n"] == N_EVAL and m["paired"]["margin"] is not None and m["paired"]["margin_se"] is not None
        d = np.subtract(rows_of(report, "smarttrim")[0]["per_input"]["score"], m["per_input"]["score"])
        assert m["paired"]["margin"] == pytest.approx(100 * d.mean())
    assert open(report["files"]["pareto"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "divprune" in report["table"]


def test_each_baseline_is_calibrated_on_the_held_apart_inputs_to_smarttrims_cost(report, by_hand):
    from smarttrim_cli.baselines import get_baseline, measure

    _, m, rows = by_hand
    inp = report["inputs"]
    assert inp["evaluated"] == list(range(N_EVAL)) and inp["calibration"] == [4, 5] and inp["disjoint"]
    target = report["target_ratio"]
    assert target == pytest.approx(rows_of(report, "smarttrim")[0]["gmacs_ratio"]) and target < 1
    cal = [{k: r["batch"][k] for k in m.input_names} for r in rows[N_EVAL:]]
    for row in rows_of(report, "baseline"):
        c = row["calibration"]
        assert row["target_ratio"] == pytest.approx(target)
        # the recorded calibration ratio is that of the calibrated setting on the calibration inputs, not others
        bl = get_baseline(row["family"], keep_ratio=row["params"]["keep_ratio"])
        assert measure(m, bl, cal)["ratio"] == pytest.approx(c["ratio"], rel=1e-6)
        if row["family"] == "fastv":  # two full-length LM layers to score on a 2-layer LM: dearer than full
            assert not c["reached"] and row["name"] in report["comparison"]["left_out"]
            continue
        assert c["reached"] and abs(c["ratio"] - target) <= TOL
        assert abs(row["gmacs_ratio"] - target) <= 2 * TOL, row  # measured on the evaluated inputs


def test_second_view_at_matched_image_tokens(report, by_hand):
    from smarttrim_cli.baselines import get_baseline
    from smarttrim_cli.profiling.compare import image_tokens_final

    _, m, rows = by_hand
    st = rows_of(report, "smarttrim")[0]
    assert report["target_tokens"] == pytest.approx(st["image_tokens_mean"])
    tok = rows_of(report, "baseline-tokens")
    assert [r["family"] for r in tok] == WRAPPED and all(r["name"].endswith("(tokens)") for r in tok)
    cal = [{k: r["batch"][k] for k in m.input_names} for r in rows[N_EVAL:]]
    for row in tok:
        c = row["calibration"]
        assert row["target_tokens"] == pytest.approx(st["image_tokens_mean"]) and c["reached"], row
        assert abs(row["image_tokens_mean"] - st["image_tokens_mean"]) <= 0.5 + 1e-9  # whole counts per input
        assert row["gmacs_ratio"] > 0 and row["paired"]["n"] == N_EVAL and row["matched"] is None
        # the recorded count is the calibrated setting's on the held-apart inputs
        a = get_baseline(row["family"], keep_ratio=row["params"]["keep_ratio"]).apply(m)
        with torch.no_grad():
            got = torch.cat([image_tokens_final(a.run(b, record=True)[1], ("image",)) for b in cal]).mean()
        assert float(got) == pytest.approx(c["tokens"])
    assert all(r["name"] != report["comparison"]["best_baseline"] for r in tok)  # the gate reads matched GMACs


def test_smarttrim_and_full_rows_score_their_own_generate(report, by_hand):
    from smarttrim_cli.metrics import generated_vqa_score

    _, _, rows = by_hand
    ev = rows[:N_EVAL]
    full, st = report["methods"][0], rows_of(report, "smarttrim")[0]
    assert st["per_input"]["text"] == [r["texts"]["hard"] for r in ev]
    assert full["per_input"]["text"] == [r["texts"]["full"] for r in ev]
    want = [generated_vqa_score(r["texts"]["hard"], r["answers"]) for r in ev]
    assert st["per_input"]["score"] == pytest.approx(want) and st["accuracy"] == pytest.approx(100 * np.mean(want))
    assert full["accuracy"] == pytest.approx(100 * np.mean([generated_vqa_score(r["texts"]["full"], r["answers"])
                                                            for r in ev]))
    assert 0 < st["accuracy"] != full["accuracy"] > 0
    # kept image tokens through the contract: SmartTrim's per input are its decisions; full keeps all
    assert st["per_input"]["image_tokens"] == [r["kept"] for r in ev]
    assert st["image_tokens_mean"] < full["image_tokens_mean"]
    assert full["image_tokens_mean"] == full["image_tokens_full"]


def test_image_tokens_final_reads_the_image_streams_of_the_contract(by_hand):
    from smarttrim_cli.backbones.base import image_streams
    from smarttrim_cli.profiling.compare import image_tokens_final

    _, m, rows = by_hand
    ctx = rows[0]["ctx"]
    assert image_streams(m) == ("vision", "image")  # the tower's (opt-in, no trimmers here), then the projected
    assert image_tokens_final(ctx, image_streams(m)).tolist() == [rows[0]["kept"]]
    assert image_tokens_final(ctx, ("vision", "ximage")) is None  # streams without decisions count nothing
    ctx.decisions["tok:image_1"] = torch.ones(1, 3, dtype=torch.bool)  # a later position of the stream wins
    try:
        assert image_tokens_final(ctx, image_streams(m)).tolist() == [3]
    finally:
        del ctx.decisions["tok:image_1"]


def test_gate_fails_on_an_impossible_margin(model_dir, by_hand, tmp_path):
    r = _compare(model_dir, by_hand[0], tmp_path / "o", "--baselines", "random,divprune", "--min-margin", "1000")
    assert r.exit_code == 1, r.output
    rep = json.loads((tmp_path / "o" / "compare.json").read_text())
    assert not rep["gate"]["passed"] and "min-margin" in rep["gate"]["failures"][0]


@pytest.mark.parametrize("opt", [["--batch-size", "8"], ["--baselines", "evit"]])
def test_classification_only_option_is_a_one_line_error(model_dir, by_hand, tmp_path, opt):
    r = _compare(model_dir, by_hand[0], tmp_path / "o", *opt)
    assert r.exit_code == 2, r.output
    lines = [x for x in r.output.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and opt[0] in lines[0] and "Traceback" not in r.output
    assert not (tmp_path / "o" / "compare.json").exists()


def test_scenes_folder_compares_with_object_counts(model_dir, tmp_path):
    """--dataset scenes: the VQAv2 layout with ten answers a question, and per-object-count rows."""
    from smarttrim_cli.data.scenes import generate_scenes

    generate_scenes(tmp_path / "scenes", n_train=1, n_val=3, image_size=64, questions_per_image=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SMARTTRIM_HOME", str(tmp_path / "home"))
        r = CliRunner().invoke(app, ["compare", str(model_dir), "--dataset", "scenes", "--data-dir",
                                     str(tmp_path / "scenes"), "--limit", "3", "--calib-limit", "2", "--out",
                                     str(tmp_path / "o"), "--max-new-tokens", "2", "--baselines", "random,pool"])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "o" / "compare.json").read_text())
    assert missing_fields(rep) == [] and rep["settings"]["dataset"] == "scenes" and rep["settings"]["n_inputs"] == 3
    assert rep["inputs"]["calibration"] == [3, 4] and [m["name"] for m in rows_of(rep, "baseline")] == ["random", "pool"]
    st = rows_of(rep, "smarttrim")[0]
    assert sum(b["n"] for b in st["by_objects"]) == 3


def test_fixed_keep_cost_is_the_trimmers_at_a_fixed_ratio_measured_by_hand(by_hand):
    """compare.fixed_keep_cost: the GMACs ratio keeping a share of the image tokens gives (what turns an image-token
    keep ratio into SmartTrim's GMACs target), against each input's full and fixed-ratio forwards by hand."""
    import math

    from smarttrim_cli.errors import SmartTrimError
    from smarttrim_cli.profiling.compare import fixed_keep_cost
    from smarttrim_cli.trim.cost import total_macs

    _, m, rows = by_hand
    batches = [r["batch"] for r in rows]
    N = m.config.image_tokens
    got = {k: fixed_keep_cost(m, batches, k) for k in (0.25, 0.5, 1.0)}
    for k, c in got.items():
        full, trim, kept = [], [], []
        with torch.no_grad():
            for b in batches:
                full.append(float(total_macs(m.run(b, mode="full", record=True)[1].records)))
                _, ctx = m.run(b, mode="hard", keep_ratio=k, record=True)
                trim.append(float(total_macs(ctx.records)))
                kept.append(int(ctx.decisions["tok:image_0"].sum()))
        assert c["gmacs_ratio"] == pytest.approx(sum(trim) / sum(full), rel=1e-9)
        assert c["gmacs_full_mean"] == pytest.approx(np.mean(full) / 1e9, rel=1e-9)
        assert c["image_tokens_mean"] == pytest.approx(np.mean(kept)) and c["image_tokens_full"] == N
        assert c["n_inputs"] == len(batches) and c["keep_ratio"] == k
        # top-k of the trimmer's scores, plus the first token the family always keeps when it is not among them
        assert all(math.ceil(k * N) <= n <= min(N, math.ceil(k * N) + 1) for n in kept)
    # fewer image tokens, a cheaper prefill; keeping all of them costs the full model plus the trimmer
    assert got[0.25]["gmacs_ratio"] < got[0.5]["gmacs_ratio"] < 1.0 < got[1.0]["gmacs_ratio"] < 1.05
    with pytest.raises(SmartTrimError, match="keep ratio"):
        fixed_keep_cost(m, batches, 0.0)
