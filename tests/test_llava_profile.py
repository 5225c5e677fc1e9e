"""``smarttrim profile`` on a text-generating model (profiling/generation.py): a tiny real LLaVA directory
(tests/tiny_llava.py) attached with an input-dependent trimmer, profiled on a tiny prompts folder with answers
through the CLI; the report is checked against the model's own ``generate``, fvcore and the decisions."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from smarttrim_cli.cli import app
from smarttrim_cli.profiling.report import missing_fields

from llava_data import by_hand as generate_by_hand, trimmed_llava, write_images, write_prompts

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [("what color is the shape ?", ["red"] * 6 + ["blue"] * 4), ("is there a red circle ?", ["yes"]),
           ("what is in the image ?", ["circle", "square"]), ("what shape is there ?", ["square"] * 10)]
N_NEW = 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        return trimmed_llava(tmp_path_factory.mktemp("llava-profile"), [p for p, _ in PROMPTS], mp.setenv)


def _write_prompts(d, answers):
    write_prompts(d, [p for p, _ in PROMPTS], answers)


@pytest.fixture(scope="module")
def data_dir(model_dir, tmp_path_factory):
    """Four images and prompts; answers built from the model's own greedy answers, so that scores are neither
    all 0 nor equal for both models (a full/trimmed mix-up or a wrong scoring shows)."""
    d = tmp_path_factory.mktemp("prompts")
    write_images(d, len(PROMPTS))
    _write_prompts(d, [a for _, a in PROMPTS])
    _, rows = _by_hand(model_dir, d)
    f, h = [r["texts"]["full"] for r in rows], [r["texts"]["hard"] for r in rows]
    _write_prompts(d, [[f[0]] * 3 + [h[0]] * 7, [h[1]] * 2 + ["square"] * 8, ["circle"], [f[3]] * 10])
    return d


@pytest.fixture(scope="module")
def profiled(model_dir, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SMARTTRIM_HOME", str(out / "home"))
        r = CliRunner().invoke(app, ["profile", str(model_dir), "--dataset", "prompts", "--data-dir", str(data_dir),
                                     "--out", str(out), "--max-new-tokens", str(N_NEW), "--iters", "2",
                                     "--warmup", "1", "--throughput-batches", "1", "--fvcore-limit", "2"])
    return r, out


@pytest.fixture(scope="module")
def report(profiled):
    r, out = profiled
    assert r.exit_code == 0, r.output
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def by_hand(model_dir, data_dir):
    return _by_hand(model_dir, data_dir)


def _by_hand(model_dir, data_dir):
    return generate_by_hand(model_dir, data_dir, N_NEW)


def test_cli_writes_a_complete_report_for_full_and_trimmed(profiled, report):
    _, out = profiled
    assert sorted(p.name for p in out.iterdir() if p.name != "home") == ["flops_hist.png", "report.json"]  # no temp
    assert missing_fields(report) == [] and report["schema_version"] == 3
    g = report["generation"]
    assert g["max_new_tokens"] == N_NEW and report["settings"]["n_inputs"] == len(PROMPTS)
    for pair in (g["ttft_ms"], g["e2e_ms"]):
        assert pair["full"]["n"] == pair["trimmed"]["n"] == 2 and pair["full"]["p50"] > 0 < pair["trimmed"]["p50"]
    assert g["e2e_ms"]["full"]["p50"] > g["ttft_ms"]["full"]["p50"]  # N_NEW tokens take longer than one
    assert g["decode_tokens_per_s"]["full"] > 0 < g["decode_tokens_per_s"]["trimmed"]
    tp = g["throughput"]
    assert tp["batch_size"] == len(PROMPTS) and tp["batch_n"]["full"]["inputs"] == len(PROMPTS)
    for k in ("batch_1", "batch_n"):
        assert tp[k]["full"]["tokens_per_s"] > 0 < tp[k]["trimmed"]["tokens_per_s"]
        assert g["peak_memory_mb"][k]["full"] > 0 < g["peak_memory_mb"][k]["trimmed"]
    # a batch of 4 decoding holds more (KV cache, activations) than a batch of 1
    assert g["peak_memory_mb"]["batch_n"]["full"] > g["peak_memory_mb"]["batch_1"]["full"]
    assert report["latency"]["full"] == g["ttft_ms"]["full"] and report["speedup"]["latency"] == g["ttft_ms"]["speedup"]


def test_accuracy_equals_scoring_generate_by_hand(report, by_hand):
    from smarttrim_cli.data.vqa_answers import normalize_answer
    from smarttrim_cli.metrics import generated_exact_match, generated_vqa_score

    _, rows = by_hand
    assert any(h["texts"]["full"] != h["texts"]["hard"] for h in rows)  # the two models answer differently
    assert 0 < report["accuracy"]["trimmed"] != report["accuracy"]["full"] > 0
    for r, h in zip(report["per_input"], rows):
        assert r["pred_full_label"] == h["texts"]["full"] and r["pred_trimmed_label"] == h["texts"]["hard"]
        assert r["pred_trimmed"] == normalize_answer(h["texts"]["hard"])
        assert r["score_full"] == pytest.approx(generated_vqa_score(h["texts"]["full"], h["answers"]))
        assert r["score_trimmed"] == pytest.approx(generated_vqa_score(h["texts"]["hard"], h["answers"]))
        assert r["exact_trimmed"] == pytest.approx(generated_exact_match(h["texts"]["hard"], h["answers"]))
    for key, fn in (("full", generated_vqa_score), ("hard", generated_vqa_score)):
        want = 100 * np.mean([fn(h["texts"][key], h["answers"]) for h in rows])
        assert report["accuracy"]["full" if key == "full" else "trimmed"] == pytest.approx(want)
    want = 100 * np.mean([generated_exact_match(h["texts"]["hard"], h["answers"]) for h in rows])
    assert report["generation"]["exact_match"]["trimmed"] == pytest.approx(want)


def test_trimmed_prefill_costs_less_and_equals_fvcore(report, by_hand):
    from smarttrim_cli.profiling.flops import fvcore_macs
    from smarttrim_cli.trim.cost import total_macs

    m, rows = by_hand
    per = report["per_input"]
    for r, h in zip(per, rows):
        assert r["gmacs_trimmed"] == pytest.approx(float(total_macs(h["ctx"].records)[0]) / 1e9, rel=1e-9)
        assert r["gmacs_trimmed"] < r["gmacs_full"] if h["kept"] < r["image_tokens_full"] else True
    assert report["flops"]["trimmed"]["mean"] < report["flops"]["full"]["mean"]
    checked = [r for r in per if r["fvcore_gmacs_trimmed"] is not None]
    assert len(checked) == 2 and report["flops"]["fvcore_check"]["max_rel_diff"] < 1e-9
    for r in checked:
        assert r["fvcore_gmacs_trimmed"] == pytest.approx(r["gmacs_trimmed"], rel=1e-9)
        assert r["fvcore_gmacs_full"] == pytest.approx(r["gmacs_full"], rel=1e-9)
    # fvcore counted here, independently of the report, on the first input
    b = {k: rows[0]["batch"][k] for k in m.input_names}
    assert fvcore_macs(m, b, mode="hard") / 1e9 == pytest.approx(per[0]["gmacs_trimmed"], rel=1e-9)


def test_kept_image_tokens_match_the_decisions(report, by_hand):
    _, rows = by_hand
    per = report["per_input"]
    kept = [h["kept"] for h in rows]
    assert [r["image_tokens_final"] for r in per] == kept
    N = per[0]["image_tokens_full"]
    assert len(set(kept)) > 1 and max(kept) < N  # the trimmer is input-dependent and trims
    assert [r["image_keep_ratio"] for r in per] == pytest.approx([k / N for k in kept])
    st = report["generation"]["image_tokens"]
    assert st["kept"]["mean"] == pytest.approx(np.mean(kept)) and st["kept"]["p10"] == pytest.approx(np.percentile(kept, 10))
    assert st["keep_ratio"] == pytest.approx(np.mean(kept) / N)


@pytest.mark.parametrize("opt", [["--sweep", "0.3"], ["--show", "1"], ["--batch-mode", "bucket"]])
def test_classification_only_option_is_a_one_line_error(model_dir, data_dir, tmp_path, monkeypatch, opt):
    monkeypatch.setenv("SMARTTRIM_HOME", str(tmp_path / "home"))
    r = CliRunner().invoke(app, ["profile", str(model_dir), "--dataset", "prompts", "--data-dir", str(data_dir),
                                 "--out", str(tmp_path / "o"), *opt])
    assert r.exit_code == 2, r.output
    lines = [x for x in r.output.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and opt[0] in lines[0] and "Traceback" not in r.output
    assert not (tmp_path / "o" / "report.json").exists()


def test_llava_prefill_benchmark_quick_writes_the_four_ratios(tmp_path):
    out = tmp_path / "prefill.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "llava_prefill.py"), "--quick", "--threads", "1",
                        "--repeats", "1", "--json", str(out)], capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["ratios"] == [1.0, 0.5, 0.25, 0.11] and res["batches"] == [1, 8] and res["quick"] is True
    N = res["model"]["image_tokens"]
    for B in (1, 8):
        rows = {row["keep_ratio"]: row for row in res["rows"] if row["batch"] == B}
        assert set(rows) == {None, 1.0, 0.5, 0.25, 0.11}
        for ratio in (1.0, 0.5, 0.25, 0.11):  # forced decisions keep that share; fewer tokens, fewer GMACs
            assert rows[ratio]["image_tokens_kept"] == max(1, round(ratio * N))
            assert rows[ratio]["prefill_ms"] > 0 and rows[ratio]["ttft_ms"] > 0
        cuts = [rows[x]["gmac_cut"] for x in (1.0, 0.5, 0.25, 0.11)]
        assert cuts == sorted(cuts) and cuts[-1] > 1.2
    assert "goal" in r.stdout and Path(res["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_scenes_folder_scores_ten_answers_and_counts_objects(model_dir, tmp_path, monkeypatch):
    """--dataset scenes: the VQAv2 layout with ten answers a question; no classifier vocabulary is needed."""
    from smarttrim_cli.data.scenes import generate_scenes

    monkeypatch.setenv("SMARTTRIM_HOME", str(tmp_path / "home"))
    generate_scenes(tmp_path / "scenes", n_train=1, n_val=2, image_size=64, questions_per_image=2)
    r = CliRunner().invoke(app, ["profile", str(model_dir), "--dataset", "scenes", "--data-dir",
                                 str(tmp_path / "scenes"), "--limit", "3", "--out", str(tmp_path / "o"),
                                 "--iters", "1", "--warmup", "0", "--throughput-batches", "1", "--fvcore-limit", "0",
                                 "--max-new-tokens", "2"])
    assert r.exit_code == 0, r.output
    assert "time to first" in r.output and "decode b=1" in r.output  # the generation table (narrow: wrapped)
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert missing_fields(rep) == [] and rep["settings"]["dataset"] == "scenes" and rep["settings"]["n_inputs"] == 3
    assert rep["generation"]["instruction"] and rep["flops"]["source"] == "cost_model"
    assert all(isinstance(x["objects"], int) for x in rep["per_input"]) and rep["objects"]["n_inputs"] == 3


def test_report_write_is_atomic(model_dir, data_dir, tmp_path, monkeypatch):
    """A write failing half-way leaves the previous report whole and no partial file beside it."""
    import pathlib

    monkeypatch.setenv("SMARTTRIM_HOME", str(tmp_path / "home"))
    out = tmp_path / "o"
    out.mkdir()
    (out / "report.json").write_text('{"old": true}\n')
    real = pathlib.Path.write_text

    def half_then_fail(self, data, *a, **kw):
        if "smarttrim-profile" in data:
            real(self, data[:100], *a, **kw)
            raise OSError("disk full")
        return real(self, data, *a, **kw)

    monkeypatch.setattr(pathlib.Path, "write_text", half_then_fail)
    r = CliRunner().invoke(app, ["profile", str(model_dir), "--dataset", "prompts", "--data-dir", str(data_dir),
                                 "--out", str(out), "--limit", "1", "--iters", "1", "--warmup", "0",
                                 "--throughput-batches", "1", "--fvcore-limit", "0", "--max-new-tokens", "1"])
    assert r.exit_code != 0 and "disk full" in repr(r.exception)
    assert (out / "report.json").read_text() == '{"old": true}\n'
    assert sorted(p.name for p in out.iterdir()) == ["flops_hist.png", "report.json"]
