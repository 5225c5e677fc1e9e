"""``--quantize int8``: onnxruntime dynamic quantization on top of the trimmed graph.

Adaptive trimming composes with static compression: the graph still gathers kept tokens and kept
heads per input, and its matrix products run in int8.

1. onnxruntime's basic graph optimisation (constant folding) folds weight slices the exporter left in
   the graph (CLIP's fused q/k/v projection is sliced at run time), so that they become initializers.
2. ``onnxruntime.quantization.quantize_dynamic``: MatMuls with a constant weight -> int8 weights,
   activations quantized on the fly (u8 x s8, per-tensor scales). The trimmers stay in float: they are
   <1% of the cost and their scores decide which tokens survive.
3. Head slicing gathers the kept heads' weight rows at run time, so those MatMuls have no constant
   weight and step 2 leaves them in float. ``quantize_gathered_weights`` rewrites them: the weight is
   stored in int8 (per-tensor symmetric scale), the same Gather/Reshape/Transpose chain runs on the int8
   tensor, and the product is an ``MatMulInteger`` on the dynamically quantized activation, rescaled to
   float; exactly what onnxruntime emits for a constant weight, with the slicing kept.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import SmartTrimError
from .onnx_export import META, TRIMMER_PREFIX, save_onnx

LAYOUT_OPS = {"Transpose", "Reshape", "Gather", "Slice", "Squeeze", "Unsqueeze", "Flatten", "Identity"}
MIN_WEIGHT_ELEMENTS = 4096


@dataclass
class QuantResult:
    path: Path
    size_bytes: int
    float_size_bytes: int
    matmuls_int8: int           # by onnxruntime's quantizer (constant weights)
    gathered_int8: int          # head-sliced weights rewritten here
    matmuls_float: int          # left in float (attention products, trimmers)
    external_data: bool


def _fold_constants(src: Path, dst: Path):
    """onnxruntime's basic optimisations (constant folding, standard ops only) written back to ONNX."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(dst)
    so.log_severity_level = 3
    if src.stat().st_size > (1 << 31) - (64 << 20) or Path(str(src) + ".data").exists():
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", dst.name + ".data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(src), sess_options=so, providers=["CPUExecutionProvider"])


def _trimmer_nodes(proto) -> list[str]:
    """Names to exclude from quantization (the quantizer first rewrites a Gemm into ``<name>_MatMul``)."""
    names = [n.name for n in proto.graph.node if n.name.startswith(TRIMMER_PREFIX)]
    return names + [n + "_MatMul" for n in names]


def quantize_gathered_weights(proto, exclude_prefix: str = TRIMMER_PREFIX) -> int:
    """Rewrite float MatMuls whose weight is a float initializer seen through layout ops (Gather of the
    kept heads, Reshape, Transpose, Slice ...) into int8 MatMulInteger; returns how many. In place."""
    from onnx import TensorProto, helper, numpy_helper

    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    prod = {o: n for n in g.node for o in n.output}
    new_inits, memo_w, memo_chain, memo_a, memo_s = [], {}, {}, {}, {}
    rewritten = 0
    out_nodes = []
    counter = [0]

    def fresh(base):
        counter[0] += 1
        return f"{base}__smarttrim_q{counter[0]}"

    def weight_chain(name):
        chain, x = [], name
        while x in prod and prod[x].op_type in LAYOUT_OPS and prod[x].input:
            chain.append(prod[x])
            x = prod[x].input[0]
        if x in inits and inits[x].data_type == TensorProto.FLOAT and len(inits[x].dims) >= 2 \
                and int(np.prod(inits[x].dims)) >= MIN_WEIGHT_ELEMENTS and chain:
            return x, chain[::-1]
        return None, None

    for node in g.node:
        if node.op_type != "MatMul" or node.name.startswith(exclude_prefix) or node.input[1] in inits:
            out_nodes.append(node)
            continue
        w, chain = weight_chain(node.input[1])
        if w is None:
            out_nodes.append(node)
            continue
        # int8 copy of the weight (per-tensor symmetric, as onnxruntime's dynamic quantizer does)
        if w not in memo_w:
            arr = numpy_helper.to_array(inits[w]).astype(np.float32)
            scale = float(np.abs(arr).max()) / 127.0 or 1.0
            q = np.clip(np.rint(arr / scale), -127, 127).astype(np.int8)
            qn = fresh(w)
            new_inits.append(numpy_helper.from_array(q, qn))
            sn = fresh(w + "_scale")
            new_inits.append(numpy_helper.from_array(np.array(scale, np.float32), sn))
            memo_w[w] = (qn, sn)
        qn, sn = memo_w[w]
        # the same layout chain on the int8 tensor
        cur = qn
        for c in chain:
            key = (c.output[0],)
            if key not in memo_chain:
                out = fresh(c.output[0])
                out_nodes.append(helper.make_node(c.op_type, [cur] + list(c.input[1:]), [out],
                                                  name=fresh(c.name or c.op_type), **{
                                                      a.name: helper.get_attribute_value(a) for a in c.attribute}))
                memo_chain[key] = out
            cur = memo_chain[key]
        a = node.input[0]
        if a not in memo_a:
            aq, asc, azp = fresh(a), fresh(a + "_scale"), fresh(a + "_zp")
            out_nodes.append(helper.make_node("DynamicQuantizeLinear", [a], [aq, asc, azp], name=fresh("dql")))
            memo_a[a] = (aq, asc, azp)
        aq, asc, azp = memo_a[a]
        if (asc, sn) not in memo_s:
            s = fresh("scale")
            out_nodes.append(helper.make_node("Mul", [asc, sn], [s], name=fresh("scale_mul")))
            memo_s[(asc, sn)] = s
        bzp = fresh("b_zp")
        new_inits.append(numpy_helper.from_array(np.array(0, np.int8), bzp))
        y32, yf = fresh(node.output[0] + "_i32"), fresh(node.output[0] + "_f")
        out_nodes.append(helper.make_node("MatMulInteger", [aq, cur, azp, bzp], [y32], name=fresh(node.name + "_int8")))
        out_nodes.append(helper.make_node("Cast", [y32], [yf], to=TensorProto.FLOAT, name=fresh("cast")))
        out_nodes.append(helper.make_node("Mul", [yf, memo_s[(asc, sn)]], [node.output[0]], name=fresh("rescale")))
        rewritten += 1
    del g.node[:]
    g.node.extend(out_nodes)
    g.initializer.extend(new_inits)
    _remove_dead(proto)
    return rewritten


def _remove_dead(proto):
    """Drop nodes whose outputs nobody reads, then initializers nobody reads."""
    g = proto.graph
    needed = {o.name for o in g.output}
    keep = []
    for node in reversed(list(g.node)):
        if any(o in needed for o in node.output if o):
            keep.append(node)
            needed.update(i for i in node.input if i)
            for a in node.attribute:  # subgraphs (If/Loop) read outer names
                if a.g is not None and a.g.node:
                    for n2 in a.g.node:
                        needed.update(n2.input)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    live = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(live)


def quantize_int8(src, dst, keep_trimmers_float: bool = True) -> QuantResult:
    """int8 graph at ``dst`` from the float graph ``src`` (atomic write; metadata kept and extended)."""
    import logging

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise SmartTrimError(f"{src}: no such ONNX file")
    float_size = src.stat().st_size + (Path(str(src) + ".data").stat().st_size if Path(str(src) + ".data").exists() else 0)
    td = Path(tempfile.mkdtemp(prefix=".smarttrim-int8-", dir=dst.parent if str(dst.parent) else "."))
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs a warning per tensor whose type it cannot infer
    try:
        folded = td / "folded.onnx"
        _fold_constants(src, folded)
        exclude = _trimmer_nodes(onnx.load(str(folded), load_external_data=False)) if keep_trimmers_float else []
        q1 = td / "q1.onnx"
        big = folded.stat().st_size > (1 << 31) - (64 << 20) or (td / "folded.onnx.data").exists()
        quantize_dynamic(str(folded), str(q1), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                         nodes_to_exclude=exclude, use_external_data_format=big,
                         extra_options={"MatMulConstBOnly": True})
        proto = onnx.load(str(q1), load_external_data=True)
        n_const = sum(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in proto.graph.node)
        n_gathered = quantize_gathered_weights(proto)
        n_float = sum(n.op_type == "MatMul" for n in proto.graph.node)
        src_meta = {p.key: p.value for p in onnx.load(str(src), load_external_data=False).metadata_props}
        src_meta[META + "quantization"] = ("int8 dynamic (onnxruntime quantize_dynamic, per-tensor s8 weights, "
                                           "u8 activations); head-sliced weights gathered in int8; trimmers float")
        src_meta[META + "float_graph"] = src.name
        del proto.metadata_props[:]
        onnx.helper.set_model_props(proto, src_meta)
        size, external = save_onnx(proto, dst)
    except SmartTrimError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SmartTrimError(f"{dst}: int8 quantization failed ({type(e).__name__}: {first})") from None
    finally:
        root.setLevel(level)
        shutil.rmtree(td, ignore_errors=True)
    return QuantResult(dst, size, float_size, n_const, n_gathered, n_float, external)


def int8_path_for(path) -> Path:
    """``model.onnx`` -> ``model.int8.onnx``."""
    p = Path(path)
    return p.with_name(p.stem + ".int8" + (p.suffix or ".onnx"))


__all__ = ["quantize_int8", "quantize_gathered_weights", "int8_path_for", "QuantResult"]
