"""Analytic cost model: multiply-accumulates per layer from kept tokens and heads.

Convention: fvcore's — one multiply-add counts 1 (so "GMACs"), LayerNorm counts 5 per element,
element-wise ops, softmax and gathers count 0. Invariant 4 (tests) checks this against fvcore's
count of the hard forward. Every function is vectorised over instances, and differentiable when
the counts are (soft mode), which is what the training loss needs.
"""
from __future__ import annotations

import torch

from .context import LayerCost


def _attn(n, m, d_q, d_kv, h, dh):
    """q from d_q, k/v from d_kv over m keys, scores and weighted sum, output projection back to d_q."""
    return n * d_q * h * dh + 2 * m * d_kv * h * dh + 2 * n * m * h * dh + n * h * dh * d_q


def layer_macs(rec: LayerCost, full: bool = False):
    """MACs of one recorded layer, per instance. full=True: the same layer with nothing trimmed."""
    k, dm = rec.kind, rec.dims
    n = rec.n_full if full else rec.n
    m = rec.m_full if full else rec.m
    H = dm.get("H")
    h = H if (full or rec.h is None) else rec.h
    h2 = H if (full or rec.h2 is None) else rec.h2
    if k in ("clip_block", "bert_layer"):
        d, dff, dh = dm["d"], dm["dff"], dm["dh"]
        return _attn(n, n, d, d, h, dh) + 2 * n * d * dff + 2 * 5 * n * d
    if k == "cross_layer":
        d, dkv, dff, dh = dm["d"], dm["dkv"], dm["dff"], dm["dh"]
        return (_attn(n, n, d, d, h, dh) + _attn(n, m, d, dkv, h2, dh)
                + 2 * n * d * dff + 3 * 5 * n * d)
    if k == "decoder_layer":
        # pre-norm decoder layer (Llama/Mistral/Qwen2): grouped-query attention over m keys, gated MLP (three
        # projections); RMSNorm is element-wise (0, as fvcore counts it)
        d, dff, dh, kvh = dm["d"], dm["dff"], dm["dh"], dm["KVH"]
        return n * d * h * dh + 2 * m * d * kvh * dh + 2 * n * m * h * dh + n * h * dh * d + 3 * n * d * dff
    if k == "token_trimmer":
        if full:
            return 0 * n
        d, dc, r = dm["d"], dm["dc"], dm["r"]
        return 5 * n * d + n * d * r + 5 * dc + d * r + dc * r + n * 3 * r * r + n * r
    if k == "head_trimmer":
        if full:
            return 0 * n
        din, r = dm["din"], dm["r"]
        return n * (5 * din + din * r + r * dm["H"])
    if k == "linear":
        return n * dm["din"] * dm["dout"]
    if k == "ln":
        return 5 * n * dm["d"]
    if k == "const":
        return n * dm["macs"]
    if k == "answer_decoder":
        # BLIP's answer decoder layer over n answers of L tokens each (causal self-attention within an
        # answer, cross-attention to m question tokens whose K/V are projected once per question)
        d, dkv, dff, L = dm["d"], dm["dkv"], dm["dff"], dm["L"]
        q = n * L
        return (4 * q * d * d + 2 * n * L * L * d                       # self-attention
                + 2 * q * d * d + 2 * m * dkv * d + 2 * q * m * d       # cross-attention
                + 2 * q * d * dff + 3 * 5 * q * d)                      # FFN, 3 LayerNorms
    raise ValueError(f"unknown layer kind {k!r}")


def module_macs(mod, rows: int = 1) -> int:
    """MACs of a small fixed-size module (a task head, a pooler) over ``rows`` rows: its Linear and
    LayerNorm layers, in the same convention. Recorded as a ``const`` layer."""
    import torch.nn as nn

    macs = 0
    for m in mod.modules():
        if isinstance(m, nn.Linear):
            macs += rows * m.in_features * m.out_features
        elif isinstance(m, nn.LayerNorm):
            macs += rows * 5 * m.normalized_shape[0]
    return macs


def total_macs(records: list[LayerCost], full: bool = False) -> torch.Tensor:
    """Per-instance total MACs (B,) of a recorded forward."""
    tot = 0
    for rec in records:
        tot = tot + layer_macs(rec, full)
    return torch.as_tensor(tot)


def macs_ratio(records: list[LayerCost]) -> torch.Tensor:
    """R̂ = cost(trimmed) / cost(full), per instance; differentiable in soft mode."""
    return total_macs(records) / total_macs(records, full=True).detach()


def per_layer(records: list[LayerCost]) -> list[dict]:
    """Per-layer summary (mean over the batch) for reports and charts."""
    rows = []
    for rec in records:
        def mean(v):
            return None if v is None else float(torch.as_tensor(v, dtype=torch.float64).mean())
        rows.append({"name": rec.name, "kind": rec.kind, "tokens": mean(rec.n), "tokens_full": mean(rec.n_full),
                     "heads": mean(rec.h), "cross_heads": mean(rec.h2),
                     "macs": mean(layer_macs(rec)), "macs_full": mean(layer_macs(rec, True))})
    return rows
