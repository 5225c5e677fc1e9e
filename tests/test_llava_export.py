"""`smarttrim export --onnx` of a LLaVA model (export/image_graph.py): the image side (tower + projector + trimmer)
as one ONNX graph, checked in onnxruntime against PyTorch hard mode (the model's own ``prefill``), the threshold
input, ``generate`` from the ONNX outputs through ``inputs_embeds`` (export/image_prefill.py) against
``LlavaModel.generate(mode="hard")``, and the CLI. Tiny random LLaVA (tests/tiny_llava.py) with input-dependent
trimmer decisions."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

import smarttrim_cli
from smarttrim_cli.attach import attach
from smarttrim_cli.cli import app
from smarttrim_cli.export.image_prefill import generate_from_onnx, lm_inputs, prompt_guide, run_graph
from smarttrim_cli.export.onnx_export import read_metadata
from smarttrim_cli.export.run import run_export
from smarttrim_cli.model_dir import read_config, save_model_dir

from test_llava import one, varied
from tiny_llava import IMAGE, tiny_inputs, write_tiny_llava

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["what color is the shape ?", "?", "is there a red circle in the image ?", "what is in the image ?"]
N = 16  # image tokens of the tiny model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """An attached tiny LLaVA whose trimmer drops about half the image tokens, saved back as a model directory."""
    root = tmp_path_factory.mktemp("llava-export")
    src = write_tiny_llava(root / "src")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SMARTTRIM_HOME", str(root / "home"))
        torch.manual_seed(0)
        attach(src, out_dir=root / "model")
        loaded = smarttrim_cli.load(root / "model")
        varied(loaded.model, tiny_inputs(src, PROMPTS))
        save_model_dir(loaded.model, root / "model", tokenizer=loaded.tokenizer,
                       extra={"preprocess": read_config(root / "model")["preprocess"]})
    return root / "model", src


@pytest.fixture(scope="module")
def exported(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    rep = run_export(model_dir[0], out, timing=False)
    return out, rep


@pytest.fixture(scope="module")
def model(model_dir):
    return smarttrim_cli.load(model_dir[0], mode="hard").model


@pytest.fixture(scope="module")
def sess(exported):
    import onnxruntime as ort

    return ort.InferenceSession(str(exported[0]), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def inputs(model_dir):
    b = tiny_inputs(model_dir[1], PROMPTS, seed=3)
    return [one(b, i) for i in range(len(PROMPTS))]


def torch_kept(model, b, thr):
    """PyTorch hard mode as generate() runs it: the kept image rows of the LM's prompt and their image indices."""
    with torch.no_grad():
        p = model.prefill(b["input_ids"], b["attention_mask"], b["pixel_values"],
                          model.make_context(mode="hard", threshold=thr), pack=True)
    ids = b["input_ids"][0]
    cols = p.cols[0]
    img = ids[cols] == IMAGE
    first = int((ids == IMAGE).nonzero()[0, 0])
    return p, p.embeds[0, img].numpy(), (cols[img] - first).numpy()


def ort_kept(model, sess, b, thr):
    return run_graph(sess, b["pixel_values"], prompt_guide(model.hf, b["input_ids"]).detach(), thr)


def test_export_report_validates_and_describes_the_graph(exported):
    out, rep = exported
    assert rep.ok and rep.validation is not None, rep.failure_line()
    names = {c.name for c in rep.validation.checks}
    assert {"image_embeds", "image_positions"} <= names
    kept = [c.image_tokens_kept for c in rep.validation.cases]
    assert min(kept) <= 2 and any(0 < k < N for k in kept), kept  # a nearly-empty case and a partial one
    md = read_metadata(out)
    assert md["graph"] == "image_side" and md["batch"] == "1" and int(md["image_token_id"]) == IMAGE
    m = onnx.load(str(out))
    assert [i.name for i in m.graph.input] == ["pixel_values", "guide", "threshold"]
    assert [o.name for o in m.graph.output] == ["image_embeds", "image_positions", "image_keep"]


@pytest.mark.parametrize("thr", [0.5, 0.9, 0.999])
def test_ort_kept_embeddings_and_positions_equal_pytorch_hard(model, sess, inputs, thr):
    counts = []
    for b in inputs:
        _, emb, pos = torch_kept(model, b, thr)
        got = ort_kept(model, sess, b, thr)
        np.testing.assert_array_equal(got["image_positions"][0], pos)
        np.testing.assert_allclose(got["image_embeds"][0], emb, atol=1e-4, rtol=0)
        np.testing.assert_array_equal(np.flatnonzero(got["image_keep"][0]), pos)
        counts.append(len(pos))
    if thr == 0.5:
        assert any(0 < c < N for c in counts), counts  # trimming is exercised, not keep-all
    if thr == 0.999:
        assert max(counts) <= 2, counts  # keeps very few tokens (the first image token always)


def test_threshold_input_changes_the_kept_count_as_in_pytorch(model, sess, inputs):
    b = inputs[0]
    thrs = [0.01, 0.2, 0.4, 0.5, 0.6, 0.8, 0.99]
    ort_n = [ort_kept(model, sess, b, t)["image_positions"].shape[1] for t in thrs]
    pt_n = [len(torch_kept(model, b, t)[2]) for t in thrs]
    assert ort_n == pt_n
    assert len(set(ort_n)) >= 3 and ort_n == sorted(ort_n, reverse=True), ort_n


def test_lm_inputs_from_onnx_equal_the_hard_prefill(model, sess, inputs):
    """The helper rebuilds exactly what generate(mode="hard") feeds the LM: embeddings, positions with gaps."""
    for b in inputs:
        p, _, _ = torch_kept(model, b, 0.5)
        got = ort_kept(model, sess, b, 0.5)
        li = lm_inputs(model.hf, b["input_ids"], b["attention_mask"], got["image_embeds"], got["image_positions"])
        assert torch.equal(li["position_ids"], p.pos)
        assert torch.equal(li["attention_mask"], p.mask)
        torch.testing.assert_close(li["inputs_embeds"], p.embeds, atol=1e-4, rtol=0)


def test_lm_inputs_drop_left_padding_as_the_prefill_does(model, sess, model_dir):
    b = tiny_inputs(model_dir[1], PROMPTS, seed=3)
    b = {k: v[1:2] for k, v in b.items()}  # "?": the shortest prompt, left-padded in the batch
    assert (b["attention_mask"] == 0).any()
    p, _, _ = torch_kept(model, b, 0.5)
    got = run_graph(sess, b["pixel_values"], prompt_guide(model.hf, b["input_ids"], b["attention_mask"]).detach(), 0.5)
    li = lm_inputs(model.hf, b["input_ids"], b["attention_mask"], got["image_embeds"], got["image_positions"])
    assert torch.equal(li["position_ids"], p.pos)
    torch.testing.assert_close(li["inputs_embeds"], p.embeds, atol=1e-4, rtol=0)


def test_generate_from_onnx_equals_model_generate_hard(model, sess, inputs):
    trimmed = 0
    for thr in (0.5, 0.9):
        for b in inputs:
            want = model.generate(b, mode="hard", threshold=thr, max_new_tokens=8, do_sample=False)
            got = generate_from_onnx(model.hf, sess, b["input_ids"], b["attention_mask"], b["pixel_values"], thr,
                                     max_new_tokens=8, do_sample=False)
            assert torch.equal(got, want), (thr, got, want)
            trimmed += len(torch_kept(model, b, thr)[2]) < N
    assert trimmed >= 3  # most inputs decode from a trimmed prompt (positions with gaps)


def test_legacy_exporter_keeps_the_kept_count_dynamic(model_dir, model, inputs, tmp_path):
    import onnxruntime as ort

    rep = run_export(model_dir[0], tmp_path / "legacy.onnx", exporter="legacy", timing=False)
    assert rep.ok and rep.export.exporter == "legacy", rep.failure_line()
    s = ort.InferenceSession(str(tmp_path / "legacy.onnx"), providers=["CPUExecutionProvider"])
    for thr in (0.2, 0.9, 0.999):
        np.testing.assert_array_equal(ort_kept(model, s, inputs[0], thr)["image_positions"][0],
                                      torch_kept(model, inputs[0], thr)[2])


def test_cli_writes_the_model_and_report(model_dir, tmp_path):
    out, rep = tmp_path / "o" / "model.onnx", tmp_path / "export.json"
    r = CliRunner().invoke(app, ["export", "--onnx", str(model_dir[0]), "-o", str(out), "--report", str(rep),
                                 "--no-timing"])
    assert r.exit_code == 0, r.output
    onnx.checker.check_model(str(out))
    d = json.loads(rep.read_text())
    assert d["ok"] and d["validation"]["ok"] and d["export"]["outputs"][0] == "image_embeds"
    assert "✓ image_embeds" in r.output and "✓ image_positions" in r.output and "✗" not in r.output
    assert "generate_from_onnx" in r.output
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx"]  # no temp files left
    assert not list(tmp_path.glob(".export.json*"))


def test_onnx_predict_points_to_the_generate_helper(exported):
    from smarttrim_cli.errors import SmartTrimError
    from smarttrim_cli.onnx_predict import OnnxPredictor

    with pytest.raises(SmartTrimError, match="generate_from_onnx"):
        OnnxPredictor(exported[0], device="cpu")


def test_int8_is_a_one_line_error(model_dir, tmp_path):
    out = tmp_path / "model.onnx"
    r = CliRunner().invoke(app, ["export", str(model_dir[0]), "--onnx", str(out), "--quantize", "int8"])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert "int8" in r.output and "not supported" in r.output
    assert not out.exists()
