"""VisionZip (Yang et al., CVPR 2025): dominant image tokens by the vision tower's [CLS] attention, plus a few
contextual tokens merged from the rest.

Dominant: the attention of the tower layer whose output LLaVA reads (``vision_feature_layer``), [CLS] query row,
summed over heads (VisionZip's ``attentions[-2][:, :, 0, 1:]``), computed explicitly from that layer's own
LayerNorm and q/k projections (SDPA returns no weights). A tower without [CLS] (SigLIP) ranks by the mean
attention each token receives over all queries.

Contextual (VisionZip's merging, as its released code does it): the non-dominant tokens in order, every
``step``-th one a target (``step = n_rest // c``), each other one assigned to its most similar target by the
cosine of that layer's keys (mean over heads); a contextual token = target state + mean of its group's states,
on the feature-layer states before the projector, then projected by the model's own projector. It replaces the
target token's features and keeps the target's position id. ``contextual``: the share of the k kept tokens that
are contextual (VisionZip's 10 of 64); 0 gives dominant tokens only.

Cost recorded (``<key>/visionzip-scores``): the [CLS] row's scores (T * d; VisionZip reads the attention map the
layer computes anyway), the key similarities (n_other * c * d_head) and the projector on the c contextual
tokens. The model's own records still count the projector on all N tokens (VisionZip projects only the kept ones),
and this module's recomputation of the tower is not counted.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import SmartTrimError
from ..trim.cost import module_macs
from ..trim.gather import gather_rows
from .image_tokens import ImageBaseline, ImagePolicy, n_keep, per_input, top_k, wrapped

CONTEXTUAL = 10 / 64


def feature_layer(model):
    """(the tower's encoder layers, index of the layer whose output is the feature layer)."""
    hf = wrapped(model, "visionzip")
    vt = hf.model.vision_tower
    body = getattr(vt, "vision_model", vt)  # transformers 5 flattened CLIPVisionModel; SigLIP keeps vision_model
    layers = body.encoder.layers
    k = hf.config.vision_feature_layer
    if not isinstance(k, int):
        raise SmartTrimError("visionzip: several feature layers are not supported")
    idx = k if k >= 0 else len(layers) + 1 + k  # hidden_states[0] is the embeddings
    if idx < 1:
        raise SmartTrimError("visionzip: the feature layer is the embeddings (no attention to read)")
    return layers, idx - 1


def tower_signals(model, pixel_values) -> dict:
    """Scores (B, N) of the image features, feature-layer states (B, N, dv), head-mean keys (B, N, dh), MACs."""
    hf = wrapped(model, "visionzip")
    layers, li = feature_layer(model)
    out = hf.model.vision_tower(pixel_values.to(hf.dtype), output_hidden_states=True)
    layer = layers[li]
    h = layer.layer_norm1(out.hidden_states[li])
    a = layer.self_attn
    B, T, d = h.shape
    q = a.q_proj(h).view(B, T, a.num_heads, -1).transpose(1, 2)
    k = a.k_proj(h).view(B, T, a.num_heads, -1).transpose(1, 2)
    off = T - model.config.image_tokens  # 1: CLIP's [CLS], which "default" feature selection drops
    if hf.config.vision_config.model_type == "clip_vision_model":
        score = (torch.matmul(q[:, :, :1], k.transpose(2, 3)) * a.scale).float().softmax(-1)[:, :, 0].sum(1)
        macs = T * d
    else:
        score = (torch.matmul(q, k.transpose(2, 3)) * a.scale).float().softmax(-1).sum(1).mean(1)
        macs = T * T * d
    return {"scores": score[:, off:], "hidden": out.hidden_states[li + 1][:, off:], "keys": k.mean(1)[:, off:],
            "macs": macs}


def tower_attention(model, pixel_values):
    """-> (dominance scores (B, N), per-input MACs)."""
    t = tower_signals(model, pixel_values)
    return t["scores"], t["macs"]


def contextual_tokens(dom: torch.Tensor, hidden: torch.Tensor, keys: torch.Tensor, c: int):
    """dom (B, N) bool (same count per row) -> (target indices (B, c), merged states (B, c, dv), MACs)."""
    B, N, dv = hidden.shape
    rest = N - int(dom[0].sum())
    c = min(c, rest)
    rem = dom.long().argsort(dim=1, stable=True)[:, :rest]  # the non-dominant tokens, in order
    ti = torch.arange(0, rest, max(1, rest // c), device=dom.device)[:c]
    oi = torch.ones(rest, dtype=torch.bool, device=dom.device).index_fill(0, ti, False).nonzero().squeeze(1)
    tgt, oth = rem[:, ti], rem[:, oi]
    m = F.normalize(keys.float(), dim=-1)
    assign = torch.matmul(gather_rows(m, oth), gather_rows(m, tgt).transpose(1, 2)).argmax(-1)  # (B, n_other)
    h = hidden.float()
    agg = torch.zeros(B, c, dv, device=h.device).scatter_add(1, assign.unsqueeze(-1).expand(-1, -1, dv),
                                                               gather_rows(h, oth))
    cnt = torch.zeros(B, c, device=h.device).scatter_add(1, assign, torch.ones_like(assign, dtype=h.dtype))
    merged = gather_rows(h, tgt) + agg / cnt.clamp_min(1).unsqueeze(-1)
    return tgt, merged, len(oi) * c * keys.shape[-1]


class VisionZipPolicy(ImagePolicy):
    def __init__(self, names, keep_ratio, contextual: float = CONTEXTUAL):
        super().__init__(names, keep_ratio)
        self.contextual = float(contextual)

    def prepare(self, model, batch):
        with torch.no_grad():
            t = tower_signals(model, batch["pixel_values"])
            N = t["scores"].shape[1]
            k = n_keep(self.keep_ratio, N)
            c = min(round(k * self.contextual), k - 1)
            keep = top_k(t["scores"], k - c)
            self.macs, self.targets = t["macs"], None
            if c > 0 and k < N:
                proj = wrapped(model, "visionzip").model.multi_modal_projector
                tgt, merged, macs = contextual_tokens(keep, t["hidden"], t["keys"], c)
                self.targets, self.states = tgt, proj(merged.to(t["hidden"].dtype)).float()
                keep = keep.scatter(1, tgt, torch.ones_like(tgt, dtype=torch.bool))
                self.macs += macs + module_macs(proj, tgt.shape[1])
            self.keep = keep

    def select(self, model, s, k, ctx, key):
        keep = self.prepared(s, "keep")  # the first position: slots are the original tokens (s.pos = arange)
        per_input(ctx, s, f"{key}/visionzip-scores", self.macs)
        return keep

    def substitute(self, model, s, keep):
        if self.targets is not None:
            idx = self.targets.to(s.x.device).unsqueeze(-1).expand(-1, -1, s.x.shape[-1])
            s.x = s.x.scatter(1, idx, self.states.to(s.x.device, s.x.dtype))


class VisionZip(ImageBaseline):
    name = "visionzip"
    kind = "token"
    Policy = VisionZipPolicy

    def __init__(self, keep_ratio: float = 0.5, layers=None, contextual: float = CONTEXTUAL):
        super().__init__(keep_ratio, layers)
        if not 0.0 <= float(contextual) < 1.0:
            raise SmartTrimError(f"visionzip: contextual share must be in [0, 1), got {contextual}")
        self.contextual = float(contextual)

    def params(self) -> dict:
        return {**super().params(), "contextual": self.contextual}

    def policy_kwargs(self) -> dict:
        return {"contextual": self.contextual}
