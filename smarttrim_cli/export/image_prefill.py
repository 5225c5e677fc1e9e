"""Serve the image-side ONNX graph (export/image_graph.py) with transformers: the prompt guide in, the kept image
embeddings out, the LM prompt rebuilt as ``inputs_embeds`` + ``attention_mask`` + ``position_ids`` with gaps and
handed to ``generate``. Needs only the transformers LLaVA model (``hf``), not smarttrim's wrapper::

    sess = onnxruntime.InferenceSession("model.onnx")
    new_ids = generate_from_onnx(hf, sess, input_ids, attention_mask, pixel_values, threshold=0.5,
                                 max_new_tokens=20)

The prompt is the processor's (one contiguous run of ``image_token_id`` placeholders). Batch 1: the graph keeps a
per-input number of tokens.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import SmartTrimError


def prompt_guide(hf, input_ids, attention_mask=None) -> torch.Tensor:
    """(B, D) fp32: the masked mean of the prompt's text-token embeddings (image placeholders and padding
    excluded), looked up in the LM's embedding table: the graph's ``guide`` input."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    text = hf.get_input_embeddings()(input_ids)
    m = ((attention_mask > 0) & (input_ids != hf.config.image_token_id)).unsqueeze(-1).float()
    return (text.float() * m).sum(1) / m.sum(1).clamp_min(1.0)


def run_graph(sess, pixel_values, guide, threshold: float) -> dict:
    """-> {image_embeds (1, K, D), image_positions (1, K), image_keep (1, N)} as numpy."""
    feeds = {"pixel_values": np.asarray(pixel_values, dtype=np.float32),
             "guide": np.asarray(guide, dtype=np.float32), "threshold": np.array(threshold, dtype=np.float32)}
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def lm_inputs(hf, input_ids, attention_mask, image_embeds, image_positions) -> dict:
    """The LM's prompt from the kept image embeddings: text embeddings with the kept image rows in place, the
    dropped image tokens and padding removed, and the position ids the untrimmed prompt gives each kept token
    (``cumsum(attention_mask) - 1``, as transformers numbers a left-padded prompt), so dropped ones leave gaps."""
    if input_ids.shape[0] != 1:
        raise SmartTrimError(f"the image graph takes one input at a time (batch {input_ids.shape[0]})")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    ids, valid = input_ids[0], attention_mask[0] > 0
    is_img = (ids == hf.config.image_token_id) & valid
    img_cols = is_img.nonzero().squeeze(1)
    text = hf.get_input_embeddings()(input_ids)[0]
    kept = torch.as_tensor(np.asarray(image_positions)).reshape(-1).long()
    emb = torch.as_tensor(np.asarray(image_embeds)).reshape(len(kept), -1).to(text.dtype)
    if kept.numel() and int(kept.max()) >= img_cols.numel():
        raise SmartTrimError(f"image position {int(kept.max())} beyond the prompt's {img_cols.numel()} image tokens")
    cols = img_cols[kept]
    text = text.index_copy(0, cols, emb)
    keep = valid & ~is_img
    keep[cols] = True
    pos = attention_mask[0].long().cumsum(0) - 1
    return {"inputs_embeds": text[keep].unsqueeze(0), "attention_mask": torch.ones(1, int(keep.sum()),
            dtype=attention_mask.dtype), "position_ids": pos[keep].unsqueeze(0)}


@torch.no_grad()
def generate_from_onnx(hf, sess, input_ids, attention_mask, pixel_values, threshold: float, **generate_kwargs):
    """Trim in onnxruntime, decode with ``hf.generate``: -> the new token ids (1, T), as
    ``LlavaModel.generate(batch, mode="hard")`` gives them."""
    out = run_graph(sess, pixel_values, prompt_guide(hf, input_ids, attention_mask), threshold)
    return hf.generate(**lm_inputs(hf, input_ids, attention_mask, out["image_embeds"], out["image_positions"]),
                       **generate_kwargs)


__all__ = ["prompt_guide", "run_graph", "lm_inputs", "generate_from_onnx"]
