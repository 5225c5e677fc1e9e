"""The layer kinds shared by all backbones, with METER/CLIP/HF-BERT parameter names.

- ``ClipBlock``: pre-LN ViT block with fused q/k/v (CLIP ``ResidualAttentionBlock``), QuickGELU MLP.
- ``BertLayer``: post-LN BERT/RoBERTa layer (``attention.self.{query,key,value}``, ...).
- ``BertCrossLayer``: METER's co-attention layer (self-attention, cross-attention, FFN).

Each ``forward`` takes the attention-time masks of the current mode (see nn/attention.py); the
trimming decisions themselves are made by the backbone, which owns the trimmers.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import multi_head_attention


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class _InProj(nn.Module):
    """CLIP's ``nn.MultiheadAttention`` parameters (in_proj_weight/bias, out_proj) without its forward."""

    def __init__(self, d: int):
        super().__init__()
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d, d))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d))
        self.out_proj = nn.Linear(d, d)
        nn.init.xavier_uniform_(self.in_proj_weight)


class ClipBlock(nn.Module):
    def __init__(self, d: int, n_heads: int, mlp_ratio: float = 4.0, eps: float = 1e-5):
        super().__init__()
        self.d, self.n_heads = d, n_heads
        self.attn = _InProj(d)
        self.ln_1 = nn.LayerNorm(d, eps=eps)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(d, int(d * mlp_ratio)))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(int(d * mlp_ratio), d))
        self.ln_2 = nn.LayerNorm(d, eps=eps)

    def forward(self, x, key_add=None, key_policy=None, head_gate=None, head_idx=None):
        d = self.d
        w, b = self.attn.in_proj_weight, self.attn.in_proj_bias
        h = self.ln_1(x)
        x = x + multi_head_attention(
            h, h, w[:d], b[:d], w[d:2 * d], b[d:2 * d], w[2 * d:], b[2 * d:],
            self.attn.out_proj.weight, self.attn.out_proj.bias, self.n_heads,
            key_add, key_policy, head_gate, head_idx, prescale=True)
        return x + self.mlp(self.ln_2(x))


class _QKV(nn.Module):
    def __init__(self, d: int, d_kv: int):
        super().__init__()
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d_kv, d)
        self.value = nn.Linear(d_kv, d)


class _DenseLN(nn.Module):
    def __init__(self, d_in: int, d: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, d)
        self.LayerNorm = nn.LayerNorm(d, eps=eps)


class BertAttention(nn.Module):
    """HF ``BertAttention``: ``self.{query,key,value}`` then ``output.{dense,LayerNorm}`` (post-LN)."""

    def __init__(self, d: int, n_heads: int, eps: float, d_kv: int | None = None):
        super().__init__()
        self.n_heads = n_heads
        self.self = _QKV(d, d_kv or d)
        self.output = _DenseLN(d, d, eps)

    def forward(self, x, kv=None, key_add=None, key_policy=None, head_gate=None, head_idx=None):
        s = self.self
        kv = x if kv is None else kv
        a = multi_head_attention(
            x, kv, s.query.weight, s.query.bias, s.key.weight, s.key.bias, s.value.weight, s.value.bias,
            self.output.dense.weight, self.output.dense.bias, self.n_heads,
            key_add, key_policy, head_gate, head_idx)
        return self.output.LayerNorm(a + x)


class _Intermediate(nn.Module):
    def __init__(self, d: int, d_ff: int):
        super().__init__()
        self.dense = nn.Linear(d, d_ff)

    def forward(self, x):
        return F.gelu(self.dense(x))  # erf GELU, as BERT/RoBERTa and METER


class BertLayer(nn.Module):
    def __init__(self, d: int, n_heads: int, d_ff: int, eps: float):
        super().__init__()
        self.attention = BertAttention(d, n_heads, eps)
        self.intermediate = _Intermediate(d, d_ff)
        self.output = _DenseLN(d_ff, d, eps)

    def ffn(self, a):
        return self.output.LayerNorm(self.output.dense(self.intermediate(a)) + a)

    def forward(self, x, key_add=None, key_policy=None, head_gate=None, head_idx=None):
        return self.ffn(self.attention(x, None, key_add, key_policy, head_gate, head_idx))


class BertCrossLayer(BertLayer):
    """METER's co-attention layer: self-attention, cross-attention to the other stream, FFN."""

    def __init__(self, d: int, n_heads: int, d_ff: int, eps: float, d_kv: int | None = None):
        super().__init__(d, n_heads, d_ff, eps)
        self.crossattention = BertAttention(d, n_heads, eps, d_kv)

    def forward(self, x, y, self_add=None, self_policy=None, cross_add=None, cross_policy=None,
                gate_self=None, idx_self=None, gate_cross=None, idx_cross=None):
        a = self.attention(x, None, self_add, self_policy, gate_self, idx_self)
        a = self.crossattention(a, y, cross_add, cross_policy, gate_cross, idx_cross)
        return self.ffn(a)


# ----- Hugging Face pre-LN blocks (BLIP vision tower, ViLT joint encoder) -------------------------------
def hf_activation(name: str) -> nn.Module:
    """The few ``ACT2FN`` activations BLIP/ViLT configs use, as plain torch modules."""
    acts = {"gelu": lambda: nn.GELU(), "gelu_new": lambda: nn.GELU(approximate="tanh"),
            "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"), "quick_gelu": QuickGELU,
            "relu": nn.ReLU, "silu": nn.SiLU}
    if name not in acts:
        raise ValueError(f"unsupported activation {name!r} (supported: {', '.join(acts)})")
    return acts[name]()


class _BlipSelfAttn(nn.Module):
    """BLIP vision attention parameters: fused ``qkv`` (rows s*d + h*dh + j, s = q, k, v) and ``projection``."""

    def __init__(self, d: int):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.projection = nn.Linear(d, d)


class _FcMLP(nn.Module):
    def __init__(self, d: int, d_ff: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(d, d_ff)
        self.act = hf_activation(act)
        self.fc2 = nn.Linear(d_ff, d)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class BlipVisionLayer(nn.Module):
    """HF ``BlipEncoderLayer``: pre-LN ViT block, ``self_attn.{qkv,projection}``, ``mlp.{fc1,fc2}``,
    ``layer_norm1``/``layer_norm2``. Same cost as ``ClipBlock`` (cost kind ``clip_block``)."""

    def __init__(self, d: int, n_heads: int, d_ff: int, eps: float = 1e-5, act: str = "gelu"):
        super().__init__()
        self.d, self.n_heads = d, n_heads
        self.self_attn = _BlipSelfAttn(d)
        self.layer_norm1 = nn.LayerNorm(d, eps=eps)
        self.mlp = _FcMLP(d, d_ff, act)
        self.layer_norm2 = nn.LayerNorm(d, eps=eps)

    def forward(self, x, key_add=None, key_policy=None, head_gate=None, head_idx=None):
        d = self.d
        w, b = self.self_attn.qkv.weight, self.self_attn.qkv.bias
        h = self.layer_norm1(x)
        x = x + multi_head_attention(
            h, h, w[:d], b[:d], w[d:2 * d], b[d:2 * d], w[2 * d:], b[2 * d:],
            self.self_attn.projection.weight, self.self_attn.projection.bias, self.n_heads,
            key_add, key_policy, head_gate, head_idx)
        return x + self.mlp(self.layer_norm2(x))


class _ViltSelfAttn(nn.Module):
    def __init__(self, d: int, bias: bool):
        super().__init__()
        self.query = nn.Linear(d, d, bias=bias)
        self.key = nn.Linear(d, d, bias=bias)
        self.value = nn.Linear(d, d, bias=bias)


class _Dense(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)


class _ViltAttention(nn.Module):
    def __init__(self, d: int, bias: bool):
        super().__init__()
        self.attention = _ViltSelfAttn(d, bias)
        self.output = _Dense(d, d)


class ViltLayer(nn.Module):
    """HF ``ViltLayer`` (ViT-style pre-LN block with BERT names): ``layernorm_before``,
    ``attention.attention.{query,key,value}``, ``attention.output.dense``, ``layernorm_after``,
    ``intermediate.dense``, ``output.dense``. Cost kind ``clip_block``."""

    def __init__(self, d: int, n_heads: int, d_ff: int, eps: float = 1e-12, act: str = "gelu", qkv_bias: bool = True):
        super().__init__()
        self.n_heads = n_heads
        self.attention = _ViltAttention(d, qkv_bias)
        self.intermediate = _Dense(d, d_ff)
        self.act = hf_activation(act)
        self.output = _Dense(d_ff, d)
        self.layernorm_before = nn.LayerNorm(d, eps=eps)
        self.layernorm_after = nn.LayerNorm(d, eps=eps)

    def forward(self, x, key_add=None, key_policy=None, head_gate=None, head_idx=None):
        s = self.attention.attention
        h = self.layernorm_before(x)
        x = x + multi_head_attention(
            h, h, s.query.weight, s.query.bias, s.key.weight, s.key.bias, s.value.weight, s.value.bias,
            self.attention.output.dense.weight, self.attention.output.dense.bias, self.n_heads,
            key_add, key_policy, head_gate, head_idx)
        return x + self.output.dense(self.act(self.intermediate.dense(self.layernorm_after(x))))
