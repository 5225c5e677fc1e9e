"""VisionZip (Yang et al., CVPR 2025), dominant tokens: keep the image tokens the vision tower's [CLS] attends to most.

Signal: the attention of the tower layer whose output LLaVA reads (``vision_feature_layer``), [CLS] query row,
summed over heads (VisionZip's ``attentions[-2][:, :, 0, 1:]``), computed explicitly from that layer's own
LayerNorm and q/k projections (SDPA returns no weights) on the layer's input, captured with a pre-hook (the tower
stops there). A tower without [CLS] (SigLIP) ranks by the mean attention each token receives over all queries.
Only dominant tokens: VisionZip's contextual tokens (the rest merged into a few by key similarity, before the
projector) are not built, since the family's features are taken after the projector. Cost recorded
(``<key>/visionzip-scores``): the [CLS] row's scores, n * d MACs per input (the layer computes q and k anyway and
VisionZip reads its attention map; the tower's recomputation here is not counted).
"""
from __future__ import annotations

import torch

from ..errors import SmartTrimError
from .image_tokens import ImageBaseline, ImagePolicy, per_input, layer_input, top_k, wrapped


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


def tower_attention(model, pixel_values) -> tuple[torch.Tensor, int]:
    """-> (scores (B, n_feat) of the image features, per-input MACs): [CLS] attention summed over heads."""
    hf = wrapped(model, "visionzip")
    layers, li = feature_layer(model)
    layer = layers[li]
    args, kw = layer_input(layer, lambda: hf.model.vision_tower(pixel_values.to(hf.dtype)))
    h = layer.layer_norm1(args[0] if args else kw["hidden_states"])
    a = layer.self_attn
    B, T, d = h.shape
    H = a.num_heads
    q = a.q_proj(h).view(B, T, H, -1).transpose(1, 2)
    k = a.k_proj(h).view(B, T, H, -1).transpose(1, 2)
    n_feat = model.config.image_tokens
    off = T - n_feat  # 1: CLIP's [CLS], which "default" feature selection drops
    cls = hf.config.vision_config.model_type == "clip_vision_model"
    if cls:
        p = (torch.matmul(q[:, :, :1], k.transpose(2, 3)) * a.scale).float().softmax(-1)[:, :, 0]  # (B, H, T)
        score = p.sum(1)
        macs = T * d
    else:
        p = (torch.matmul(q, k.transpose(2, 3)) * a.scale).float().softmax(-1)
        score = p.sum(1).mean(1)
        macs = T * T * d
    return score[:, off:], macs


class VisionZipPolicy(ImagePolicy):
    def prepare(self, model, batch):
        with torch.no_grad():
            self.scores, self.macs = tower_attention(model, batch["pixel_values"])

    def select(self, model, s, k, ctx, key):
        scores = self.prepared(s, "scores")
        per_input(ctx, s, f"{key}/visionzip-scores", self.macs)
        return top_k(scores.gather(1, s.pos), k)


class VisionZip(ImageBaseline):
    name = "visionzip"
    kind = "token"
    Policy = VisionZipPolicy


