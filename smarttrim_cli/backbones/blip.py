"""BLIP (Li et al., 2022) on the trimmable core, from Hugging Face ``BlipForQuestionAnswering`` and
``BlipForImageTextRetrieval`` directories. Module and parameter names are those of transformers
(``vision_model.*``, ``text_encoder.*``, ``text_decoder.*``, ``itm_head`` ...), so the weight map is the
identity; the LM head's ``decoder`` weight/bias are tied to the word embeddings / ``cls.predictions.bias``.

Forward: question embeddings -> ViT (pre-LN, fused qkv; no attention mask) -> ``post_layernorm`` ->
BERT text encoder whose every layer self-attends over the question and cross-attends to the image
tokens -> task head:
- ``vqa``: the answer decoder ranks a fixed answer list, as the original BLIP evaluates VQA: logits are
  the log-likelihoods ``log p(answer | question, image)`` (B, num_answers). With more answers than
  ``rank_k`` BLIP's two stages are used: the first answer token's probability picks the top ``rank_k``
  candidates, which are then scored in full; the others get their first-token log-probability - 1000.
  ``generate()`` decodes an answer greedily instead (transformers' ``generate`` path).
- ``retrieval``: ITM logits (B, 2) from ``itm_head`` on the fused [CLS]; ``itc()`` gives the
  contrastive (ITC) features of the uni-modal towers.

Trimmers (streams): ``vision`` (ViT token + head trimmers, guided by the question: the masked mean of
the question's embeddings, which exist before the ViT runs); ``ximage`` (token trimmers on the image
tokens the text encoder cross-attends to from text layer i on, guided by the text [CLS] state at that
depth; dropping them removes their K/V projections and attention columns); ``xtext`` (head trimmers of
the text encoder's self- and cross-attention, ``xtext_<i>_self``/``_cross``; optional token trimmers
on question tokens). The answer decoder is not trimmed.

The family contract (``FAMILY`` at the end; backbones/base.py ``Family``): transformers directories
(``model_type`` blip, the two architectures above), the processor config's preprocessing (CLIP
mean/std, square resize), the directory's own BERT tokenizer, the answer list for VQA.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import SmartTrimError
from ..nn.attention import NEG, pad_to_additive
from ..nn.layers import BertCrossLayer, BlipVisionLayer
from ..preprocess import CLIP_MEAN, CLIP_STD
from ..trim.config import TrimConfig
from ..trim.context import LayerCost, TrimContext
from .base import AttnWeights, FamilyConfig, Stream, StreamSpec, TrimmableModel, interpolate_positions
from .hf_dir import (HFFamily, load_hf_state_dict, load_hf_tokenizer, match_state_dict, read_hf_config,
                     weight_files)

TASKS = ("vqa", "retrieval")
ARCHITECTURES = {"BlipForQuestionAnswering": "vqa", "BlipForImageTextRetrieval": "retrieval"}
ANSWER_FILES = ("answer_list.json", "answer_list.txt", "answers.json", "answers.txt")


@dataclass
class BlipConfig(FamilyConfig):
    task: str = "vqa"
    num_labels: int = 3128            # vqa: answers in the ranked list; retrieval: 2 (ITM)
    image_size: int = 384
    max_text_len: int = 35
    patch_size: int = 16
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    vision_intermediate: int = 3072
    vision_eps: float = 1e-5
    vision_act: str = "gelu"
    text_hidden: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_intermediate: int = 3072
    text_eps: float = 1e-12
    vocab_size: int = 30524
    max_position: int = 512
    pad_token_id: int = 0
    bos_token_id: int = 30522
    sep_token_id: int = 102
    answer_len: int = 0               # vqa: tokens per answer ([DEC] answer [SEP] padding)
    rank_k: int = 128
    itm_hidden: int = 256
    source_image_size: int = 384
    extra: dict = field(default_factory=dict)


def default_trim_config(cfg: BlipConfig) -> TrimConfig:
    """ViT tokens every other block from L/4 on, the image tokens the text encoder reads in its first
    and middle layers, heads in the upper half of the ViT and in every text layer."""
    lv, lt = cfg.vision_layers, cfg.text_layers
    return TrimConfig(
        token_layers={"vision": list(range(max(1, lv // 4), lv, 2)), "ximage": sorted({0, lt // 2}) if lt > 1 else [0],
                      "xtext": []},
        head_layers={"vision": list(range(lv // 2, lv)), "xtext": list(range(lt))})


# ----- modules with transformers' names ---------------------------------------------------------------
class _VisionEmbeddings(nn.Module):
    def __init__(self, c: BlipConfig):
        super().__init__()
        d = c.vision_width
        self.class_embedding = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.patch_embedding = nn.Conv2d(3, d, c.patch_size, c.patch_size)
        self.position_embedding = nn.Parameter(torch.randn(1, c.n_patches + 1, d) * 0.02)


class _TextEmbeddings(nn.Module):
    def __init__(self, c: BlipConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.text_hidden, padding_idx=c.pad_token_id)
        self.position_embeddings = nn.Embedding(c.max_position, c.text_hidden)
        self.LayerNorm = nn.LayerNorm(c.text_hidden, eps=c.text_eps)

    def forward(self, ids):
        pos = torch.arange(ids.shape[-1], device=ids.device)
        return self.LayerNorm(self.word_embeddings(ids) + self.position_embeddings(pos))


def _text_tower(c: BlipConfig) -> nn.Module:
    m = nn.Module()
    m.embeddings = _TextEmbeddings(c)
    m.encoder = nn.Module()
    m.encoder.layer = nn.ModuleList(BertCrossLayer(c.text_hidden, c.text_heads, c.text_intermediate, c.text_eps,
                                                   c.vision_width) for _ in range(c.text_layers))
    return m


class _Transform(nn.Module):
    def __init__(self, c: BlipConfig):
        super().__init__()
        self.dense = nn.Linear(c.text_hidden, c.text_hidden)
        self.LayerNorm = nn.LayerNorm(c.text_hidden, eps=c.text_eps)

    def forward(self, x):
        return self.LayerNorm(F.gelu(self.dense(x)))


class _Predictions(nn.Module):
    """``cls.predictions``: transform, then the word embeddings (tied) as output projection + ``bias``."""

    def __init__(self, c: BlipConfig):
        super().__init__()
        self.transform = _Transform(c)
        self.bias = nn.Parameter(torch.zeros(c.vocab_size))


def _split(x, H):
    """(..., n, H*dh) -> (..., H, n, dh)"""
    *lead, n, d = x.shape
    return x.view(*lead, n, H, d // H).transpose(-3, -2)


def _merge(x):
    """(..., H, n, dh) -> (..., n, H*dh)"""
    x = x.transpose(-3, -2)
    return x.reshape(*x.shape[:-2], -1)


def _attend(q, k, v, add):
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if add is not None:
        scores = scores + add
    return torch.matmul(scores.softmax(-1), v)


class BlipModel(TrimmableModel):
    family = "blip"
    input_names = ("pixel_values", "input_ids", "attention_mask")
    # the ViT; the question tokens of the text encoder (self + cross heads); the image tokens it reads
    streams = {
        "vision": StreamSpec("vision_layers", "vision_width", "text_hidden", "vision_heads", image=True),
        "xtext": StreamSpec("text_layers", "text_hidden", "vision_width", "text_heads", ("_self", "_cross")),
        "ximage": StreamSpec("text_layers", "vision_width", "text_hidden", None, read_by="xtext",
                             self_attention=False, image=True,
                             note="it holds the image tokens the text encoder reads; their heads are the text "
                                  "layers' cross-attention heads: put head trimmers on xtext"),
    }
    pos_embedding = "vision_model.embeddings.position_embedding"

    def __init__(self, config: BlipConfig, trim: TrimConfig | None = None):
        super().__init__()
        c = self.config = config
        if c.task not in TASKS:
            raise SmartTrimError(f"unsupported BLIP task {c.task!r} (supported: {', '.join(TASKS)})")
        if c.image_size % c.patch_size:
            raise SmartTrimError(f"image size {c.image_size} is not a multiple of the patch size {c.patch_size}")
        self.vision_model = nn.Module()
        self.vision_model.embeddings = _VisionEmbeddings(c)
        self.vision_model.encoder = nn.Module()
        self.vision_model.encoder.layers = nn.ModuleList(
            BlipVisionLayer(c.vision_width, c.vision_heads, c.vision_intermediate, c.vision_eps, c.vision_act)
            for _ in range(c.vision_layers))
        self.vision_model.post_layernorm = nn.LayerNorm(c.vision_width, eps=c.vision_eps)
        self.text_encoder = _text_tower(c)
        if c.task == "vqa":
            if c.answer_len < 2:
                raise SmartTrimError("BLIP VQA needs an answer list (answer_len >= 2)")
            self.text_decoder = nn.Module()
            self.text_decoder.bert = _text_tower(c)
            self.text_decoder.cls = nn.Module()
            self.text_decoder.cls.predictions = _Predictions(c)
            self.register_buffer("answer_ids", torch.zeros(c.num_labels, c.answer_len, dtype=torch.long))
            self.register_buffer("answer_mask", torch.zeros(c.num_labels, c.answer_len, dtype=torch.long))
        else:
            self.vision_proj = nn.Linear(c.vision_width, c.itm_hidden)
            self.text_proj = nn.Linear(c.text_hidden, c.itm_hidden)
            self.itm_head = nn.Linear(c.text_hidden, 2)
        self.trim_config = None
        if trim is not None:
            self.attach_trimmers(trim)

    # ----- contract hooks ----------------------------------------------------------------------------
    def head(self):
        return self.text_decoder if self.config.task == "vqa" else self.itm_head

    def attention_weights(self, name: str, which: str = "self") -> AttnWeights:
        """``vision_<i>``: ViT block i (fused qkv, pre-LN); ``xtext_<i>``/``ximage_<i>``: text layer i's
        self-attention (``self``) or its cross-attention to the image tokens (``cross``)."""
        stream, i = name.rsplit("_", 1)
        i = int(i)
        if stream == "vision":
            blk = self.vision_model.encoder.layers[i]
            d, w, b = blk.d, blk.self_attn.qkv.weight, blk.self_attn.qkv.bias
            return AttnWeights(blk.layer_norm1, w[:d], b[:d], w[d:2 * d], b[d:2 * d], blk.n_heads)
        layer = self.text_encoder.encoder.layer[i]
        if stream == "ximage" and which == "self":
            raise SmartTrimError("blip: the image tokens the text encoder reads do not attend among themselves")
        att = layer.attention if which == "self" else layer.crossattention
        s = att.self
        return AttnWeights(None, s.query.weight, s.query.bias, s.key.weight, s.key.bias, att.n_heads)

    # ----- encoder -----------------------------------------------------------------------------------
    def encode(self, pixel_values, input_ids, attention_mask, ctx: TrimContext):
        """-> (text Stream of fused question states, image Stream after post_layernorm)."""
        text = self.embed_text(input_ids, attention_mask, ctx)
        img = self.encode_image(pixel_values, text, ctx)
        return self.fuse(text, img, ctx), img

    def embed_text(self, input_ids, attention_mask, ctx: TrimContext) -> Stream:
        c = self.config
        text = Stream.start(self.text_encoder.embeddings(input_ids), attention_mask, ctx.mode, all_valid=False)
        ctx.add(LayerCost("text_embed", "ln", {"d": c.text_hidden}, n=text.count(), n_full=text.n_full))
        if ctx.mode == "hard":
            text.drop_padding()
        return text

    def encode_image(self, pixel_values, text: Stream, ctx: TrimContext) -> Stream:
        """ViT + post_layernorm; its trimmers are guided by the question (masked mean of its embeddings)."""
        c, mode = self.config, ctx.mode
        B = pixel_values.shape[0]
        dev = pixel_values.device
        ones = torch.ones(B, device=dev)
        q_ctx = None
        if mode != "full" and (ctx.policy is not None or any(
                k.startswith("vision_") for k in list(self.token_trimmers) + list(self.head_trimmers))):
            w = text.valid.unsqueeze(-1)
            q_ctx = (text.x * w).sum(1) / w.sum(1).clamp_min(1.0)

        emb = self.vision_model.embeddings
        conv = emb.patch_embedding
        xi = conv(pixel_values.to(conv.weight.dtype))
        gh, gw = xi.shape[-2:]
        xi = xi.flatten(2).transpose(1, 2)
        xi = torch.cat([emb.class_embedding.to(xi.dtype).expand(B, 1, -1), xi], dim=1)
        xi = xi + emb.position_embedding.to(xi.dtype)
        ctx.add(LayerCost("patch_embed", "const", {"macs": gh * gw * conv.weight[0].numel() * c.vision_width},
                          n=ones, n_full=ones))
        img = Stream.start(xi, torch.ones(B, xi.shape[1], device=dev), mode, all_valid=True)

        dv = {"d": c.vision_width, "dff": c.vision_intermediate, "dh": c.vision_width // c.vision_heads,
              "H": c.vision_heads}
        for i, blk in enumerate(self.vision_model.encoder.layers):
            name = f"vision_{i}"
            gate = idx = hc = None
            if q_ctx is not None:
                self.token_step(name, img, q_ctx, ctx)
                gate, idx, hc = self.head_step(name, img.x[:, 0], q_ctx, ctx)
            img.x = blk(img.x, img.key_add(), img.soft_keep, gate, idx)
            ctx.add(LayerCost(name, "clip_block", dv, n=img.count(), n_full=img.n_full, h=hc))
        img.x = self.vision_model.post_layernorm(img.x)
        ctx.add(LayerCost("post_layernorm", "ln", {"d": c.vision_width}, n=img.count(), n_full=img.n_full))
        return img

    def fuse(self, text: Stream, img: Stream, ctx: TrimContext) -> Stream:
        """The text encoder: self-attention over the question, cross-attention to the image tokens."""
        c = self.config
        dx = {"d": c.text_hidden, "dkv": c.vision_width, "dff": c.text_intermediate,
              "dh": c.text_hidden // c.text_heads, "H": c.text_heads}
        i_cls = img.x[:, 0]
        for i, layer in enumerate(self.text_encoder.encoder.layer):
            t_cls = text.x[:, 0]
            self.token_step(f"xtext_{i}", text, i_cls, ctx)
            self.token_step(f"ximage_{i}", img, t_cls, ctx)
            gs, is_, hs = self.head_step(f"xtext_{i}_self", t_cls, i_cls, ctx)
            gc, ic, hx = self.head_step(f"xtext_{i}_cross", t_cls, i_cls, ctx)
            text.x = layer(text.x, img.x, text.key_add(), text.soft_keep, img.key_add(), img.soft_keep, gs, is_, gc, ic)
            ctx.add(LayerCost(f"xtext_{i}", "cross_layer", dx, n=text.count(), n_full=text.n_full,
                              m=img.count(), m_full=img.n_full, h=hs, h2=hx))
        return text

    def forward(self, pixel_values, input_ids, attention_mask, pixel_values2=None, ctx: TrimContext | None = None):
        ctx = ctx or self.make_context()
        self.last_ctx = ctx
        text, _ = self.encode(pixel_values, input_ids, attention_mask, ctx)
        if self.config.task == "retrieval":
            ones = torch.ones(text.x.shape[0], device=text.x.device)
            ctx.add(LayerCost("head", "const", {"macs": 2 * self.config.text_hidden}, n=ones, n_full=ones))
            return self.itm_head(text.x[:, 0])
        return self.rank_answers(text.x, self._question_mask(text), ctx)

    @staticmethod
    def _question_mask(text: Stream):
        return text.soft_keep if text.soft_keep is not None else text.valid

    # ----- answer decoder --------------------------------------------------------------------------
    def _decoder_kv(self, qs):
        """Cross-attention K/V of the question states, once per question and decoder layer."""
        H = self.config.text_heads
        out = []
        for layer in self.text_decoder.bert.encoder.layer:
            s = layer.crossattention.self
            out.append((_split(s.key(qs), H).unsqueeze(1), _split(s.value(qs), H).unsqueeze(1)))
        return out

    def _decode(self, ids, kv, q_add):
        """ids (B, a, L) answer tokens -> last hidden states (B, a, L, d). Causal self-attention within
        each answer, cross-attention to the question (kv from ``_decoder_kv``, additive mask q_add)."""
        H = self.config.text_heads
        L = ids.shape[-1]
        x = self.text_decoder.bert.embeddings(ids)
        causal = torch.full((L, L), NEG, dtype=x.dtype, device=x.device).triu(1)
        for layer, (k, v) in zip(self.text_decoder.bert.encoder.layer, kv):
            a, s = layer.attention, layer.attention.self
            ctx = _attend(_split(s.query(x), H), _split(s.key(x), H), _split(s.value(x), H), causal)
            x = a.output.LayerNorm(a.output.dense(_merge(ctx)) + x)
            a = layer.crossattention
            ctx = _attend(_split(a.self.query(x), H), k, v, q_add)
            x = a.output.LayerNorm(a.output.dense(_merge(ctx)) + x)
            x = layer.ffn(x)
        return x

    def _lm_logits(self, h):
        p = self.text_decoder.cls.predictions
        return F.linear(p.transform(h), self.text_decoder.bert.embeddings.word_embeddings.weight, p.bias)

    def _record_decoder(self, ctx, name, a, L, m, m_full, B, dev, kv_cost=True):
        c = self.config
        d = c.text_hidden
        n = torch.full((B,), float(a), device=dev)
        rows = torch.full((B,), float(a * max(L - 1, 1)), device=dev)
        ctx.add(LayerCost(f"{name}/embed", "ln", {"d": d}, n=n * L, n_full=n * L))
        # the question's K/V are projected once per decoder layer (dkv=0 where an earlier stage paid for them)
        dd = {"d": d, "dkv": d if kv_cost else 0, "dff": c.text_intermediate, "L": L, "H": c.text_heads}
        for i in range(c.text_layers):
            ctx.add(LayerCost(f"{name}/layer_{i}", "answer_decoder", dd, n=n, n_full=n, m=m, m_full=m_full))
        ctx.add(LayerCost(f"{name}/lm_transform", "linear", {"din": d, "dout": d}, n=rows, n_full=rows))
        ctx.add(LayerCost(f"{name}/lm_ln", "ln", {"d": d}, n=rows, n_full=rows))
        ctx.add(LayerCost(f"{name}/lm_vocab", "linear", {"din": d, "dout": c.vocab_size}, n=rows, n_full=rows))

    def _score(self, ids, mask, kv, q_add):
        """Sum of log p(token_t | tokens_<t, question) over each answer's real tokens after [DEC]."""
        h = self._decode(ids, kv, q_add)
        logp = self._lm_logits(h[..., :-1, :]).log_softmax(-1)
        tok = logp.gather(-1, ids[..., 1:].unsqueeze(-1)).squeeze(-1)
        return (tok * mask[..., 1:].to(tok.dtype)).sum(-1)

    def rank_answers(self, qs, qmask, ctx: TrimContext | None = None):
        """(B, num_answers) answer log-likelihoods given question states qs (B, m, d), mask (B, m)."""
        ctx = ctx or self.make_context()
        c = self.config
        B, m = qs.shape[:2]
        dev = qs.device
        q_add = ((1.0 - qmask.to(qs.dtype)) * NEG)[:, None, None, None, :]
        kv = self._decoder_kv(qs)
        A, L = self.answer_ids.shape
        m_cost = qmask.to(torch.float32).sum(1)  # question tokens the decoder reads (cost convention: real ones)
        if A <= c.rank_k:
            self._record_decoder(ctx, "answers", A, L, m_cost, m_cost, B, dev)
            ids = self.answer_ids.unsqueeze(0).expand(B, A, L)
            return self._score(ids, self.answer_mask.unsqueeze(0).expand(B, A, L), kv, q_add)
        # BLIP's two stages: first-token probabilities pick rank_k candidates, which are scored in full
        k = c.rank_k
        self._record_decoder(ctx, "first_token", 1, 1, m_cost, m_cost, B, dev, kv_cost=False)  # K/V shared
        start = self.answer_ids[:1, :1].expand(B, 1, 1)
        first = self._lm_logits(self._decode(start, kv, q_add)[:, 0, 0]).log_softmax(-1)  # (B, V)
        lp1 = first.index_select(1, self.answer_ids[:, 1])                               # (B, A)
        top = lp1.topk(k, dim=1).indices                                                 # (B, k)
        self._record_decoder(ctx, "answers", k, L, m_cost, m_cost, B, dev)
        full = self._score(self.answer_ids[top], self.answer_mask[top], kv, q_add)
        return (lp1 - 1000.0).scatter(1, top, full)

    @torch.no_grad()
    def generate(self, batch: dict, max_new_tokens: int = 10, **ctx_kw) -> list[list[int]]:
        """Greedy answer generation (transformers' ``BlipForQuestionAnswering.generate`` without beams):
        token ids after [DEC], up to and without [SEP]."""
        if self.config.task != "vqa":
            raise SmartTrimError("generate() needs a BLIP VQA model")
        ctx = self.make_context(**ctx_kw)
        text, _ = self.encode(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], ctx)
        qs, qmask = text.x, self._question_mask(text)
        q_add = ((1.0 - qmask.to(qs.dtype)) * NEG)[:, None, None, None, :]
        kv = self._decoder_kv(qs)
        B = qs.shape[0]
        ids = torch.full((B, 1, 1), self.config.bos_token_id, dtype=torch.long, device=qs.device)
        done = torch.zeros(B, dtype=torch.bool, device=qs.device)
        for _ in range(max_new_tokens):
            nxt = self._lm_logits(self._decode(ids, kv, q_add)[:, 0, -1]).argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, self.config.pad_token_id), nxt)
            ids = torch.cat([ids, nxt.view(B, 1, 1)], dim=-1)
            done |= nxt == self.config.sep_token_id
            if bool(done.all()):
                break
        out = []
        for row in ids[:, 0, 1:].tolist():
            out.append(row[:row.index(self.config.sep_token_id)] if self.config.sep_token_id in row else row)
        return out

    # ----- contrastive features (retrieval) -------------------------------------------------------------
    def itc(self, batch: dict, **ctx_kw):
        """-> (image_feat, text_feat), L2-normalised ITC features: ``vision_proj`` of the ViT [CLS] and
        ``text_proj`` of the text encoder's [CLS] run without cross-attention (as transformers'
        ``use_itm_head=False``). ``image_feat @ text_feat.T`` is the similarity matrix."""
        if self.config.task != "retrieval":
            raise SmartTrimError("itc() needs a BLIP retrieval model")
        ctx = self.make_context(**ctx_kw)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        img = self.encode_image(batch["pixel_values"], self.embed_text(ids, mask, ctx), ctx)
        x = self.text_encoder.embeddings(ids)
        add = pad_to_additive(mask, x.dtype)
        for layer in self.text_encoder.encoder.layer:
            x = layer.ffn(layer.attention(x, None, add))
        return F.normalize(self.vision_proj(img.x[:, 0]), dim=-1), F.normalize(self.text_proj(x[:, 0]), dim=-1)


# ----- Hugging Face directories -----------------------------------------------------------------------
_TIED = ("text_decoder.cls.predictions.decoder.weight", "text_decoder.cls.predictions.decoder.bias")


def _ignored(k: str) -> bool:
    return (k in _TIED or k.endswith("embeddings.position_ids") or ".pooler." in k
            or k in ("logit_scale", "text_encoder.pooler.dense.weight", "text_encoder.pooler.dense.bias"))


# transformers' BlipTextConfig / BlipVisionConfig defaults, for keys a config.json leaves out
_TEXT_DEFAULTS = {"vocab_size": 30524, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                  "num_attention_heads": 8, "max_position_embeddings": 512, "hidden_act": "gelu",
                  "layer_norm_eps": 1e-12, "bos_token_id": 30522, "pad_token_id": 0, "sep_token_id": 102}
_VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                    "image_size": 384, "patch_size": 16, "hidden_act": "gelu", "layer_norm_eps": 1e-5}


def config_from_hf(hf: dict, source: str, image_size: int | None = None) -> BlipConfig:
    arch = (hf.get("architectures") or [None])[0]
    if arch not in ARCHITECTURES:
        raise SmartTrimError(f"{source}: BLIP architecture {arch!r} is not supported "
                             f"(supported: {', '.join(ARCHITECTURES)})")
    t = {**_TEXT_DEFAULTS, **(hf.get("text_config") or {})}
    v = {**_VISION_DEFAULTS, **(hf.get("vision_config") or {})}
    if t["hidden_act"] != "gelu":
        raise SmartTrimError(f"{source}: BLIP text hidden_act {t['hidden_act']!r} is not supported (gelu only)")
    size = int(image_size or v["image_size"])
    if size % v["patch_size"]:
        raise SmartTrimError(f"--image-size {size} is not a multiple of the patch size {v['patch_size']}")
    return BlipConfig(
        task=ARCHITECTURES[arch], num_labels=2, image_size=size, max_text_len=min(35, t["max_position_embeddings"]),
        patch_size=v["patch_size"], vision_width=v["hidden_size"], vision_layers=v["num_hidden_layers"],
        vision_heads=v["num_attention_heads"], vision_intermediate=v["intermediate_size"],
        vision_eps=v["layer_norm_eps"], vision_act=v["hidden_act"],
        text_hidden=t["hidden_size"], text_layers=t["num_hidden_layers"], text_heads=t["num_attention_heads"],
        text_intermediate=t["intermediate_size"], text_eps=t["layer_norm_eps"], vocab_size=t["vocab_size"],
        max_position=t["max_position_embeddings"], pad_token_id=t["pad_token_id"] or 0,
        bos_token_id=t["bos_token_id"], sep_token_id=t["sep_token_id"],
        itm_hidden=int(hf.get("image_text_hidden_size", 256)), source_image_size=int(v["image_size"]),
        extra={"architecture": arch})


def read_answer_list(path) -> list[str]:
    """A JSON list of answers (BLIP's answer_list.json) or a text file with one answer per line."""
    p = Path(path)
    if not p.is_file():
        raise SmartTrimError(f"{p}: answer list not found")
    text = p.read_text(encoding="utf-8", errors="replace")
    if p.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SmartTrimError(f"{p}: not valid JSON ({e})") from None
        if isinstance(data, dict):  # {"answer": index} vocabularies
            data = [a for a, _ in sorted(data.items(), key=lambda kv: kv[1])]
        if not isinstance(data, list) or not all(isinstance(a, str) for a in data):
            raise SmartTrimError(f"{p}: expected a JSON list of answer strings")
        answers = data
    else:
        answers = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not answers:
        raise SmartTrimError(f"{p}: the answer list is empty")
    if len(set(answers)) != len(answers):
        raise SmartTrimError(f"{p}: the answer list has duplicates")
    return answers


def find_answer_list(model_dir, answers=None):
    """--answers FILE, else an answer list shipped in the model directory; None when there is none."""
    if answers is not None:
        return read_answer_list(answers) if not isinstance(answers, (list, tuple)) else list(answers)
    for name in ANSWER_FILES:
        if (Path(model_dir) / name).is_file():
            return read_answer_list(Path(model_dir) / name)
    return None


def tokenize_answers(tokenizer, answers: list[str], bos_token_id: int):
    """BLIP's answer tokens: ``[DEC] answer [SEP]`` padded to the longest (the [CLS] slot becomes [DEC])."""
    enc = tokenizer(list(answers), padding="longest", return_tensors="pt")
    ids, mask = enc["input_ids"].clone(), enc["attention_mask"].clone()
    ids[:, 0] = bos_token_id
    return ids, mask


def from_hf_dir(path, image_size: int | None = None, trim: TrimConfig | None = None, answers=None, tokenizer=None,
                hf_config: dict | None = None):
    """Load a transformers BLIP VQA / retrieval directory exactly; returns (model, info).

    VQA ranks an answer list: ``answers`` (a list, or a file) or an ``answer_list.json`` in the
    directory; the tokenizer (the directory's own by default) turns it into answer tokens."""
    path = Path(path)
    hf = hf_config or read_hf_config(path)
    cfg = config_from_hf(hf, str(path), image_size)
    if cfg.task == "vqa":
        answer_list = find_answer_list(path, answers)
        if answer_list is None:
            raise SmartTrimError(f"{path}: BLIP VQA ranks answers from a list, as BLIP evaluates VQA: pass --answers "
                                 f"FILE (a JSON list such as BLIP's answer_list.json, or one answer per line) or put "
                                 f"answer_list.json in the directory")
        tok = tokenizer or load_hf_tokenizer(path, cfg.vocab_size)
        ids, mask = tokenize_answers(tok, answer_list, cfg.bos_token_id)
        if int(ids.max()) >= cfg.vocab_size:
            raise SmartTrimError(f"{path}: answer tokens exceed the text vocabulary ({cfg.vocab_size})")
        cfg.num_labels, cfg.answer_len = len(answer_list), ids.shape[1]
    else:
        answer_list, ids, mask = None, None, None
    sd = load_hf_state_dict(path)
    model = BlipModel(cfg)
    key = "vision_model.embeddings.position_embedding"
    if key in sd:
        g_old, g_new = cfg.source_image_size // cfg.patch_size, cfg.image_size // cfg.patch_size
        if sd[key].shape[1] != g_old * g_old + 1:
            raise SmartTrimError(f"{path}: {key} has {sd[key].shape[1]} rows, config.json implies {g_old * g_old + 1}")
        sd[key] = interpolate_positions(sd[key], g_new, *BlipModel.pos_interpolation)
    if ids is not None:
        sd["answer_ids"], sd["answer_mask"] = ids, mask
    ignored = match_state_dict(model, sd, path, _ignored, hf["architectures"][0])
    model.load_state_dict({k: v for k, v in sd.items() if k not in ignored}, strict=False)
    model.attach_trimmers(trim or default_trim_config(cfg))
    model.eval()
    labels = answer_list if answer_list is not None else ["no_match", "match"]
    return model, {"ignored_keys": ignored, "source_image_size": cfg.source_image_size, "hf_config": hf,
                   "labels": labels, "files": weight_files(path)}


# ----- the family contract ---------------------------------------------------------------------------
# transformers' BlipImageProcessor defaults, for keys a processor config leaves out
PROCESSOR_DEFAULTS = {"name": "blip", "mean": CLIP_MEAN, "std": CLIP_STD, "size": 384, "resample": "bicubic"}


class BlipFamily(HFFamily):
    name = "blip"
    style = "ported"
    Config = BlipConfig
    Model = BlipModel
    tasks = {"vqa": "answer_loglik", "retrieval": "classes"}
    hf_model_type = "blip"
    hf_architectures = ARCHITECTURES
    processor_defaults = PROCESSOR_DEFAULTS

    def config_from_hf(self, hf: dict, source: str):
        return config_from_hf(hf, source)

    def from_dir(self, source: Path, hf: dict, image_size=None, tokenizer=None, answers=None):
        """``answers``: the answer list VQA ranks (else the directory's answer_list.json)."""
        return from_hf_dir(source, image_size=image_size, answers=answers, tokenizer=tokenizer, hf_config=hf)

    def default_trim_config(self, config):
        return default_trim_config(config)


FAMILY = BlipFamily()
