"""A tiny METER model directory whose trimmers keep varied, input-dependent token counts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tiny_meter import tiny_model_dir


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models are overhead-bound; on a shared 2-core machine two OpenMP threads per op wait on
    each other (a tiny forward went from 14 ms to 1.7 s), so the PyTorch side of these tests uses one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def spread_trimmers(model, seed: int = 11):
    """Make each token's keep score depend mostly on the token itself, with a wide logit range, so that
    different inputs and thresholds keep different numbers of tokens (and heads)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for tr in list(model.token_trimmers.values()) + list(model.head_trimmers.values()):
            tr.fc2.weight.normal_(0, 1.0)
            tr.fc2.bias.fill_(0.3)
            if hasattr(tr, "proj_x"):
                tr.proj_x.weight.mul_(6.0)
                tr.proj_g.weight.mul_(0.3)
                tr.proj_c.weight.mul_(0.3)
    return model


SMALL = {"kw": {"text_layers": 1, "vision_layers": 2, "cross_layers": 1},
         "trim": {"token_layers": {"text": [0], "vision": [1], "xtext": [0], "ximage": [0]},
                  "head_layers": {"vision": [1], "ximage": [0]}}}


def varied_model_dir(path: Path, task: str = "vqa", small: bool = False, fuse: bool = False) -> Path:
    """tiny_model_dir + spread_trimmers, saved back as a model directory (records it as latest).
    small: one text and one cross-modal layer, fewer head trimmers (the dynamo exporter's symbolic
    tracing time grows with the graph: this halves it), every stream still trimmed."""
    import smarttrim_cli
    from smarttrim_cli.model_dir import read_config, save_model_dir

    path = Path(path)
    if small:
        tiny_model_dir(path, task, trim_kw={**SMALL["trim"], "fuse": fuse}, **SMALL["kw"])
    else:
        tiny_model_dir(path, task, trim_kw={"fuse": fuse})
    loaded = smarttrim_cli.load(path)
    spread_trimmers(loaded.model)
    cfg = read_config(path)
    save_model_dir(loaded.model, path, tokenizer=loaded.tokenizer, labels=loaded.labels,
                   extra={"preprocess": cfg["preprocess"]})
    return path


def module_model_dir(tmp_path_factory, name="model", task="vqa", small=False, fuse=False) -> Path:
    """For module-scoped fixtures: the per-test SMARTTRIM_HOME is not set yet, so use a private one."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp(name)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SMARTTRIM_HOME", str(root / "home"))
        return varied_model_dir(root / name, task, small, fuse)


# ----- tests -------------------------------------------------------------------------------------------------
import numpy as np  # noqa: E402
import onnx  # noqa: E402

import smarttrim_cli  # noqa: E402
from smarttrim_cli.export.onnx_export import export_onnx, read_metadata  # noqa: E402
from smarttrim_cli.export.ort_session import make_session  # noqa: E402
from smarttrim_cli.export.validate import Case, make_cases, validate_against_torch  # noqa: E402
from tiny_meter import batch as random_batch  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return module_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def legacy_onnx(model_dir, tmp_path_factory):
    m = smarttrim_cli.load(model_dir)
    return export_onnx(m, tmp_path_factory.mktemp("legacy") / "model.onnx", exporter="legacy")


def _extra_cases(m):
    """Random-token inputs beside the real ones: batch 3 with padding, a one-token text, odd lengths."""
    out = []
    for B, T, thr, seed in ((3, 5, 0.4, 3), (1, 1, 0.5, 4), (2, 11, 0.6, 5), (1, 7, 0.2, 6)):
        b = random_batch(m, B=B, T=T, seed=seed, pad_rows=(1,) if B > 1 and T > 3 else ())
        out.append(Case(f"random B={B} T={T}", b, thr))
    return out


def _check_graph_matches_torch(path, loaded):
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path))
    ops = {n.op_type for n in proto.graph.node}
    assert {"TopK", "NonZero", "GatherElements"} <= ops, ops  # data-dependent selection inside the graph
    ins = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    assert isinstance(ins["input_ids"][0], str) and isinstance(ins["input_ids"][1], str), ins  # dynamic batch, text
    assert ins["threshold"] == []  # a 0-d graph input
    sess = make_session(path, "cpu", 2)
    cases = make_cases(loaded) + _extra_cases(loaded.model)
    rep = validate_against_torch(sess, loaded.model, cases, atol=1e-4)
    assert rep.ok, [c for c in rep.checks if not c.ok]
    # the inputs really ran with different token counts (else the test could not see a frozen shape)
    counts = {tuple(c.kept_tokens) for c in rep.cases}
    assert len(counts) >= 5, counts
    blank = [c for c in rep.cases if c.name.startswith("blank")][0]
    assert blank.image_tokens_kept <= 2 < blank.image_tokens
    assert {c.batch for c in rep.cases} >= {1, 2, 3}
    assert {c.text_len for c in rep.cases} >= {1, 2, 12}
    return rep


def test_dynamo_export_equals_torch_hard_mode(tmp_path_factory, tmp_path):
    m = smarttrim_cli.load(module_model_dir(tmp_path_factory, "small", small=True))
    assert set(m.model.token_trimmers) == {"text_0", "vision_1", "xtext_0", "ximage_0"}
    res = export_onnx(m, tmp_path / "dyn.onnx", exporter="dynamo")
    assert res.exporter == "dynamo" and res.fallback_reason is None
    _check_graph_matches_torch(res.path, m)


def test_legacy_export_equals_torch_hard_mode(model_dir, legacy_onnx):
    m = smarttrim_cli.load(model_dir)
    assert legacy_onnx.exporter == "legacy"
    _check_graph_matches_torch(legacy_onnx.path, m)


@pytest.mark.parametrize("fuse_mode", ["single", "nearest"])
def test_export_with_token_fusion_equals_torch(tmp_path_factory, tmp_path, fuse_mode):
    """Token fusion (merge + log-size attention bias) stays dynamic in the graph and matches PyTorch, for both
    merge rules (one catch-all token; each dropped token into the closest kept one)."""
    m = smarttrim_cli.load(module_model_dir(tmp_path_factory, "fused", fuse=True))
    t = m.model.trim_config
    assert t.fuse
    t.fuse_mode = fuse_mode
    res = export_onnx(m, tmp_path / "fused.onnx", exporter="legacy")
    rep = _check_graph_matches_torch(res.path, m)
    # fusion changed the function: the same weights without it give other logits on the same inputs
    b = make_cases(m)[0]
    with torch.no_grad():
        on, _ = m.model.run(b.batch, mode="hard", threshold=b.threshold)
        t.fuse = False
        off, _ = m.model.run(b.batch, mode="hard", threshold=b.threshold)
    assert rep.ok and not torch.allclose(on, off, atol=1e-3)


def test_metadata_in_the_file(model_dir, legacy_onnx):
    md = read_metadata(legacy_onnx.path)
    assert md["version"] == smarttrim_cli.__version__
    assert md["backbone"] == "meter" and md["task"] == "vqa"
    assert float(md["default_threshold"]) == 0.5
    assert json.loads(md["labels"]) == [f"answer{i}" for i in range(7)]
    assert json.loads(md["preprocess"])["image_size"] == 32
    assert json.loads(md["kept_tokens_layers"]) == legacy_onnx.token_layers and legacy_onnx.token_layers
    assert "tokenizer_json" in md and md["model_dir"] == str(model_dir.resolve())
    # trimmer nodes are marked (int8 keeps them in float) and no exporter debug metadata is left
    proto = onnx.load(str(legacy_onnx.path))
    assert any(n.name.startswith("smarttrim_trimmer/") for n in proto.graph.node)
    assert not any(n.metadata_props for n in proto.graph.node)


def test_frozen_token_count_is_caught(model_dir, tmp_path, monkeypatch):
    """What the legacy exporter does with int(k): k frozen at the tracing inputs' count. The
    validation must fail on the other inputs, in onnxruntime or in the comparison."""
    from smarttrim_cli.trim import gather

    real = gather.kept_order

    def frozen(keep):
        idx, k = real(keep)
        if torch.jit.is_tracing():
            n = keep.shape[1]
            key = keep.to(torch.float32) * (2 * n) - torch.arange(n, dtype=torch.float32)
            idx = key.topk(int(k), dim=1, sorted=True).indices  # int(k): a constant in the trace
        return idx, k

    m = smarttrim_cli.load(model_dir)
    monkeypatch.setattr("smarttrim_cli.backbones.base.kept_order", frozen)
    res = export_onnx(m, tmp_path / "frozen.onnx", exporter="legacy")
    monkeypatch.undo()
    rep = validate_against_torch(make_session(res.path, "cpu", 2), m.model, make_cases(m), atol=1e-4)
    assert not rep.ok
    assert not [c for c in rep.checks if c.name == "logits"][0].ok


def test_int8_graph_is_valid_smaller_and_close(model_dir, legacy_onnx, tmp_path):
    from smarttrim_cli.export.quantize import quantize_int8
    from smarttrim_cli.export.validate import validate_quantized

    m = smarttrim_cli.load(model_dir)
    q = quantize_int8(legacy_onnx.path, tmp_path / "model.int8.onnx")
    onnx.checker.check_model(str(q.path), full_check=True)
    assert q.size_bytes < 0.75 * q.float_size_bytes
    assert q.gathered_int8 > 0 and q.matmuls_int8 > 0
    proto = onnx.load(str(q.path))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("MatMulInteger") >= q.gathered_int8
    # trimmers stay in float; gathered head slices are gathered from int8 weights
    assert not any(n.op_type == "MatMulInteger" and n.name.startswith("smarttrim_trimmer/") for n in proto.graph.node)
    inits = {t.name: t.data_type for t in proto.graph.initializer}
    prod = {o: n for n in proto.graph.node for o in n.output}
    gathered = [prod[n.input[1]] for n in proto.graph.node if n.op_type == "MatMulInteger" and n.input[1] in prod]
    assert gathered, "no MatMulInteger reads a run-time (head-sliced) weight"
    assert read_metadata(q.path)["quantization"].startswith("int8")
    cases = make_cases(m)
    rep = validate_quantized(make_session(q.path, "cpu", 2), make_session(legacy_onnx.path, "cpu", 2), "vqa", cases)
    assert rep.ok, rep.checks
    assert inits  # initializers survived dead-node removal


def test_large_graphs_use_external_data(legacy_onnx, model_dir, tmp_path, monkeypatch):
    """Over 2 GB the weights go to MODEL.onnx.data (checked by path, written atomically); simulated by
    lowering the limit. The result loads and runs like the inline file."""
    from smarttrim_cli.export import onnx_export

    monkeypatch.setattr(onnx_export, "TWO_GB", 1 << 20)
    out = tmp_path / "big.onnx"
    size, external = onnx_export.save_onnx(onnx.load(str(legacy_onnx.path)), out)
    assert external and (tmp_path / "big.onnx.data").is_file()
    assert out.stat().st_size < 0.3 * size  # the weights moved out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    m = smarttrim_cli.load(model_dir)
    case = make_cases(m)[0]
    a = make_session(out, "cpu", 1).run(None, case.feeds())
    b = make_session(legacy_onnx.path, "cpu", 1).run(None, case.feeds())
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_execution_providers():
    from smarttrim_cli.errors import SmartTrimError
    from smarttrim_cli.export.ort_session import available_providers, select_providers, session_options

    assert select_providers("cpu") == ["CPUExecutionProvider"]
    assert select_providers("auto")[-1] == "CPUExecutionProvider"
    if "CUDAExecutionProvider" not in available_providers():
        with pytest.raises(SmartTrimError, match="onnxruntime-gpu"):
            select_providers("cuda")
    with pytest.raises(SmartTrimError):
        select_providers("tpu")
    so = session_options(None, ["CPUExecutionProvider"])
    assert so.intra_op_num_threads == 2  # the timing default on CPU
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_threshold_decisions_agree_near_0_and_1(tmp_path):
    """onnxruntime's Sigmoid has an absolute error of ~1e-7, so `sigmoid(x) > t` decided differently from
    PyTorch for small thresholds; the core decides `x > logit(t)` (trim/gumbel.above_threshold), which an
    exported graph computes exactly like PyTorch. Logits packed around each threshold's boundary."""
    from smarttrim_cli.trim.gumbel import above_threshold

    class Decide(torch.nn.Module):
        def forward(self, logits, threshold):
            return above_threshold(logits, threshold).to(torch.int64)

    x = torch.randn(1, 8)
    path = tmp_path / "decide.onnx"
    torch.onnx.export(Decide(), (x, torch.tensor(0.5)), str(path), dynamo=False, input_names=["logits", "threshold"],
                      dynamic_axes={"logits": {1: "n"}})
    sess = make_session(path, "cpu", 1)
    for t in (1e-7, 1e-6, 1e-4, 1e-2, 0.3, 0.5, 0.9, 0.999, 1 - 1e-6):
        z = float(np.log(t) - np.log1p(-t))
        logits = (z + torch.linspace(-0.05, 0.05, 2001, dtype=torch.float64)).float().unsqueeze(0)
        ref = above_threshold(logits, t).to(torch.int64).numpy()
        got = sess.run(None, {"logits": logits.numpy(), "threshold": np.array(t, np.float32)})[0]
        assert (ref == got).all(), (t, int((ref != got).sum()))
        # and it is the sigmoid rule wherever float64 can tell them apart
        p = torch.sigmoid(logits.double())
        clear = (p - t).abs() > 1e-6 * t
        assert (ref.astype(bool) == (p > t).numpy())[clear.numpy()].all()
