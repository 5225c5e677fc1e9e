"""Per-input FLOPs with fvcore, and the analytic cost model beside it.

Convention (fvcore's, used everywhere in smarttrim): one multiply-add counts 1, so the figures are
MACs ("GMACs"); LayerNorm counts 5 per element; element-wise ops, softmax and gathers count 0.
torch's FlopCounterMode counts 2 per multiply-add: divide its numbers by 2 to compare.

fvcore traces the module on every call, so the hard forward's data-dependent gathers and head
slices are counted for the input at hand (about 1.5 forward passes per count). fvcore counts
``scaled_dot_product_attention`` as 0 (silently); :data:`SDPA_HANDLES` registers a handle for it so
that a backbone using fused attention is not under-counted.
"""
from __future__ import annotations

from functools import reduce
from operator import mul

import torch
import torch.nn as nn

from ..trim.cost import total_macs

# The fused-attention ops a trace may contain (the public op, and the kernels it may lower to).
SDPA_OPS = (
    "aten::scaled_dot_product_attention",
    "aten::_scaled_dot_product_attention_math",
    "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention",
)


def _shape(v):
    t = v.type()
    sizes = t.sizes() if hasattr(t, "sizes") else None
    return list(sizes) if sizes is not None else None


def sdpa_flop_jit(inputs, outputs) -> int:
    """MACs of ``scaled_dot_product_attention(q, k, v, ...)``: q·kᵀ (L·S·E) plus probs·v (L·S·Ev) per
    batch-and-head; the softmax, scaling and masking count 0, as fvcore's own handles do. A causal
    mask is counted as the full product (what the math kernel computes)."""
    q, k, v = (_shape(x) for x in inputs[:3])
    if q is None or k is None or v is None:
        return 0
    L, E = q[-2], q[-1]
    S, Ev = k[-2], v[-1]
    lead = reduce(mul, q[:-2], 1)
    return int(lead * L * S * (E + Ev))


SDPA_HANDLES = {name: sdpa_flop_jit for name in SDPA_OPS}


def flop_analysis(module: nn.Module, inputs: tuple):
    """An fvcore ``FlopCountAnalysis`` with the fused-attention handles and no warnings."""
    from fvcore.nn import FlopCountAnalysis

    fa = FlopCountAnalysis(module, inputs)
    fa.set_op_handle(**SDPA_HANDLES)
    fa.unsupported_ops_warnings(False)
    fa.uncalled_modules_warnings(False)
    fa.tracer_warnings("none")
    return fa


class TracedForward(nn.Module):
    """Wrap a TrimmableModel so that fvcore can trace one mode of it with positional tensor inputs."""

    def __init__(self, model, names, mode="hard", threshold=None, keep_ratio=None):
        super().__init__()
        self.model, self.names = model, tuple(names)
        self.mode, self.threshold, self.keep_ratio = mode, threshold, keep_ratio

    def forward(self, *tensors):
        ctx = self.model.make_context(mode=self.mode, threshold=self.threshold, keep_ratio=self.keep_ratio)
        return self.model(**dict(zip(self.names, tensors)), ctx=ctx)


def model_inputs(model, batch: dict) -> tuple[tuple, tuple]:
    """(names, tensors) of the model inputs present in a collated batch, in forward order."""
    names = tuple(k for k in model.input_names if batch.get(k) is not None)
    return names, tuple(batch[k] for k in names)


def fvcore_macs(model, batch: dict, mode: str = "hard", threshold=None, keep_ratio=None) -> int:
    """fvcore's MAC count of one forward of ``batch`` (meant for batch size 1: per-input cost)."""
    names, tensors = model_inputs(model, batch)
    with torch.no_grad():
        fa = flop_analysis(TracedForward(model, names, mode, threshold, keep_ratio), tensors)
        return int(fa.total())


def cost_model_macs(records, full: bool = False) -> list[float]:
    """Per-instance MACs from a recorded forward (trim/cost.py), as Python floats."""
    return [float(x) for x in torch.as_tensor(total_macs(records, full=full), dtype=torch.float64).reshape(-1)]
