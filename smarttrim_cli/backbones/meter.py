"""METER (Dou et al., 2022) on the trimmable core, with the original checkpoint's weight names.

Layout of the released model (zdou0830/METER): a CLIP ViT-B/16 visual tower with 11 residual blocks (CLIP's last
one dropped, no ``visual.proj``, ``ln_post`` on every token, QuickGELU); a RoBERTa-base text encoder (12 layers,
LayerNorm eps 1e-5, pooler unused); 768->768 ``cross_modal_{text,image}_transform``; token-type embeddings; 6
BERT-style post-LN co-attention layers per stream (self-attention, cross-attention, FFN; LayerNorm eps 1e-12,
erf GELU) updated in parallel, both streams computed from the previous layer's two outputs; tanh poolers on
token 0 of each stream, concatenated into the task head. Forward order with trimmers: the cheap text tower runs first so its
[CLS] can guide the vision tower's token and head trimmers; in the cross-modal encoder each stream is
guided by the other stream's [CLS] of the previous layer.

The family contract (``FAMILY`` at the end; backbones/base.py ``Family``): released Lightning ``.ckpt``
files, CLIP preprocessing (shorter-side resize + centre crop), the RoBERTa/BERT tokenizer found beside
the checkpoint, streams ``text``/``vision``/``xtext``/``ximage``, heads VQA/NLVR2/SNLI-VE (class logits)
and retrieval (one score).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import SmartTrimError
from ..nn.layers import BertCrossLayer, BertLayer, ClipBlock
from ..preprocess import CLIP_MEAN, CLIP_STD
from ..trim.config import TrimConfig
from ..trim.context import LayerCost, TrimContext
from ..trim.cost import module_macs
from .base import (AttnWeights, Family, FamilyConfig, Loaded, Stream, StreamSpec, TrimmableModel, check_keys,
                   interpolate_positions)

TASKS = ("vqa", "nlvr2", "snli", "retrieval")
HEAD_PREFIX = {"vqa": "vqa_classifier", "nlvr2": "nlvr2_classifier", "snli": "snli_classifier",
               "retrieval": "rank_output"}

# Keys present in released METER files that the model never uses (CLIP's text half and final LayerNorm, RoBERTa's
# pooler, a position-id buffer): ignored by exact name, so any other unmatched key is still reported.
UNUSED_KEYS = ("vit_model.token_embedding.weight", "vit_model.positional_embedding",
               "text_transformer.embeddings.position_ids")
UNUSED_PREFIXES = ("vit_model.ln_final.", "text_transformer.pooler.")


@dataclass
class MeterConfig(FamilyConfig):
    task: str = "vqa"
    num_labels: int = 3129
    image_size: int = 288
    max_text_len: int = 50
    # CLIP visual tower
    patch_size: int = 16
    vision_width: int = 768
    vision_layers: int = 11
    vision_heads: int = 12
    # text tower
    text_family: str = "roberta"      # roberta: positions offset by the padding index; bert: 0..T-1
    vocab_size: int = 50265
    text_hidden: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_intermediate: int = 3072
    max_position: int = 514
    text_type_vocab: int = 1
    pad_token_id: int = 1
    text_eps: float = 1e-5
    # cross-modal encoder
    hidden: int = 768
    cross_layers: int = 6
    cross_heads: int = 12
    cross_intermediate: int = 3072
    num_token_types: int = 2
    has_itm: bool = False
    extra: dict = field(default_factory=dict)


def default_trim_config(cfg: MeterConfig) -> TrimConfig:
    """Defaults: most cost scales with image tokens, so trim them early and repeatedly in the vision
    tower and the cross-modal image stream; text tokens once per encoder; heads in the upper half of
    the uni-modal towers and everywhere in the cross-modal encoder."""
    lv, lt, lx = cfg.vision_layers, cfg.text_layers, cfg.cross_layers
    return TrimConfig(
        token_layers={"vision": list(range(max(1, lv // 4), lv, 2)), "text": [lt // 2] if lt > 1 else [],
                      "xtext": list(range(0, lx, 2)), "ximage": list(range(0, lx, 2))},
        head_layers={"vision": list(range(lv // 2, lv)), "text": list(range(lt // 2, lt)),
                     "xtext": list(range(lx)), "ximage": list(range(lx))},
    )


class _Visual(nn.Module):
    def __init__(self, c: MeterConfig):
        super().__init__()
        d = c.vision_width
        self.conv1 = nn.Conv2d(3, d, c.patch_size, c.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(d) * d ** -0.5)
        self.positional_embedding = nn.Parameter(torch.randn(c.n_patches + 1, d) * d ** -0.5)
        self.ln_pre = nn.LayerNorm(d)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(ClipBlock(d, c.vision_heads) for _ in range(c.vision_layers))
        self.ln_post = nn.LayerNorm(d)


class _TextEmbeddings(nn.Module):
    def __init__(self, c: MeterConfig):
        super().__init__()
        self.family, self.pad = c.text_family, c.pad_token_id
        self.word_embeddings = nn.Embedding(c.vocab_size, c.text_hidden, padding_idx=c.pad_token_id)
        self.position_embeddings = nn.Embedding(c.max_position, c.text_hidden)
        self.token_type_embeddings = nn.Embedding(c.text_type_vocab, c.text_hidden)
        self.LayerNorm = nn.LayerNorm(c.text_hidden, eps=c.text_eps)

    def forward(self, ids):
        if self.family == "roberta":  # RoBERTa numbers real tokens from padding_idx + 1
            real = ids.ne(self.pad).long()
            pos = torch.cumsum(real, 1) * real + self.pad
        else:
            pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        x = self.word_embeddings(ids) + self.token_type_embeddings.weight[0] + self.position_embeddings(pos)
        return self.LayerNorm(x)


class _Pooler(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.dense = nn.Linear(d, d)

    def forward(self, x):
        return torch.tanh(self.dense(x[:, 0]))


def _classifier(d_in, d_hidden, n_out):
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.LayerNorm(d_hidden), nn.GELU(), nn.Linear(d_hidden, n_out))


_CROSS = ("_self", "_cross")


class MeterModel(TrimmableModel):
    family = "meter"
    input_names = ("pixel_values", "input_ids", "attention_mask", "pixel_values2")
    # text tower, CLIP vision tower, and the two streams of the co-attention layers (self + cross heads each)
    streams = {
        "text": StreamSpec("text_layers", "text_hidden", "vision_width", "text_heads"),
        "vision": StreamSpec("vision_layers", "vision_width", "text_hidden", "vision_heads", image=True),
        "xtext": StreamSpec("cross_layers", "hidden", "hidden", "cross_heads", _CROSS),
        "ximage": StreamSpec("cross_layers", "hidden", "hidden", "cross_heads", _CROSS, read_by="xtext", image=True),
    }
    pos_embedding = "vit_model.visual.positional_embedding"

    def __init__(self, config: MeterConfig, trim: TrimConfig | None = None):
        super().__init__()
        c = self.config = config
        if c.task not in TASKS:
            raise SmartTrimError(f"unsupported METER task {c.task!r} (supported: {', '.join(TASKS)})")
        self.vit_model = nn.Module()
        self.vit_model.visual = _Visual(c)
        self.text_transformer = nn.Module()
        self.text_transformer.embeddings = _TextEmbeddings(c)
        self.text_transformer.encoder = nn.Module()
        self.text_transformer.encoder.layer = nn.ModuleList(
            BertLayer(c.text_hidden, c.text_heads, c.text_intermediate, c.text_eps) for _ in range(c.text_layers))
        self.cross_modal_text_transform = nn.Linear(c.text_hidden, c.hidden)
        self.cross_modal_image_transform = nn.Linear(c.vision_width, c.hidden)
        self.token_type_embeddings = nn.Embedding(c.num_token_types, c.hidden)
        self.cross_modal_text_layers = nn.ModuleList(
            BertCrossLayer(c.hidden, c.cross_heads, c.cross_intermediate, 1e-12) for _ in range(c.cross_layers))
        self.cross_modal_image_layers = nn.ModuleList(
            BertCrossLayer(c.hidden, c.cross_heads, c.cross_intermediate, 1e-12) for _ in range(c.cross_layers))
        self.cross_modal_text_pooler = _Pooler(c.hidden)
        self.cross_modal_image_pooler = _Pooler(c.hidden)
        h2 = 2 * c.hidden
        if c.task == "vqa":
            self.vqa_classifier = _classifier(h2, h2, c.num_labels)
        elif c.task == "snli":
            self.snli_classifier = _classifier(h2, h2, c.num_labels)
        elif c.task == "nlvr2":
            self.nlvr2_classifier = _classifier(2 * h2, h2, c.num_labels)
        else:
            self.rank_output = nn.Linear(h2, 1)
            if c.has_itm:
                self.itm_score = nn.Module()
                self.itm_score.fc = nn.Linear(h2, 2)
        self.trim_config = None
        if trim is not None:
            self.attach_trimmers(trim)

    # ----- contract hooks ----------------------------------------------------------------------------
    def head(self):
        return getattr(self, HEAD_PREFIX[self.config.task])

    def attention_weights(self, name: str, which: str = "self") -> AttnWeights:
        stream, i = name.rsplit("_", 1)
        i = int(i)
        if stream == "vision":
            blk = self.vit_model.visual.transformer.resblocks[i]
            d, w, b = blk.d, blk.attn.in_proj_weight, blk.attn.in_proj_bias
            return AttnWeights(blk.ln_1, w[:d], b[:d], w[d:2 * d], b[d:2 * d], blk.n_heads)
        layers = {"text": self.text_transformer.encoder.layer, "xtext": self.cross_modal_text_layers,
                  "ximage": self.cross_modal_image_layers}[stream]
        att = layers[i].attention if which == "self" else layers[i].crossattention
        s = att.self
        return AttnWeights(None, s.query.weight, s.query.bias, s.key.weight, s.key.bias, att.n_heads)

    def new_head(self, num_labels: int):
        """A fresh classifier (METER's initialisation: N(0, 0.02), zero biases, LayerNorm 1/0)."""
        c = self.config
        if c.task not in ("vqa", "snli", "nlvr2"):
            return super().new_head(num_labels)
        h2 = 2 * c.hidden
        head = _classifier(2 * h2 if c.task == "nlvr2" else h2, h2, num_labels)
        for mod in head.modules():
            if isinstance(mod, nn.Linear):
                nn.init.normal_(mod.weight, std=0.02)
                nn.init.zeros_(mod.bias)
        setattr(self, HEAD_PREFIX[c.task], head)
        c.num_labels = num_labels

    # ----- forward ---------------------------------------------------------------------------------
    def forward(self, pixel_values, input_ids, attention_mask, pixel_values2=None, ctx: TrimContext | None = None):
        ctx = ctx or self.make_context()
        self.last_ctx = ctx
        c = self.config
        if c.task == "nlvr2":
            if pixel_values2 is None:
                raise SmartTrimError("NLVR2 needs two images (pixel_values2)")
            f1 = self.encode(pixel_values, input_ids, attention_mask, 1, ctx, "")
            f2 = self.encode(pixel_values2, input_ids, attention_mask, 2, ctx, "img2/")
            feats = torch.cat([f1, f2], dim=-1)
        else:
            feats = self.encode(pixel_values, input_ids, attention_mask, 1, ctx, "")
        head = self.head()
        B = feats.shape[0]
        ones = torch.ones(B, device=feats.device)
        ctx.add(LayerCost("head", "const", {"macs": module_macs(head)}, n=ones, n_full=ones))
        return head(feats)

    def encode(self, pixel_values, input_ids, attention_mask, image_type: int, ctx: TrimContext, prefix: str):
        c, mode = self.config, ctx.mode
        vis = self.vit_model.visual
        B = input_ids.shape[0]
        dev = input_ids.device
        ones = torch.ones(B, device=dev)

        # image tokens: patch embedding, [CLS], positions, ln_pre
        xi = vis.conv1(pixel_values.to(vis.conv1.weight.dtype))
        gh, gw = xi.shape[-2:]
        xi = xi.flatten(2).transpose(1, 2)
        xi = torch.cat([vis.class_embedding.to(xi.dtype).expand(B, 1, -1), xi], dim=1)
        xi = vis.ln_pre(xi + vis.positional_embedding.to(xi.dtype))
        Ni = xi.shape[1]
        ctx.add(LayerCost(prefix + "patch_embed", "const",
                          {"macs": gh * gw * vis.conv1.weight[0].numel() * c.vision_width + 5 * Ni * c.vision_width},
                          n=ones, n_full=ones))
        img = Stream.start(xi, torch.ones(B, Ni, device=dev), mode, all_valid=True)

        # text tokens
        xt = self.text_transformer.embeddings(input_ids)
        text = Stream.start(xt, attention_mask, mode, all_valid=False)
        ctx.add(LayerCost(prefix + "text_embed", "ln", {"d": c.text_hidden}, n=text.count(), n_full=text.n_full))
        if mode == "hard":
            text.drop_padding()
        want_img_ctx = any(k.startswith("text_") for k in list(self.token_trimmers) + list(self.head_trimmers))
        img_ctx = xi[:, 1:].mean(1) if (mode != "full" and want_img_ctx) else None

        dt = {"d": c.text_hidden, "dff": c.text_intermediate, "dh": c.text_hidden // c.text_heads, "H": c.text_heads}
        for i, layer in enumerate(self.text_transformer.encoder.layer):
            name = f"text_{i}"
            self.token_step(name, text, img_ctx, ctx, prefix + name)
            gate, idx, hc = self.head_step(name, text.x[:, 0], img_ctx, ctx, prefix + name) if img_ctx is not None else (None, None, None)
            text.x = layer(text.x, text.key_add(), text.soft_keep, gate, idx)
            ctx.add(LayerCost(prefix + name, "bert_layer", dt, n=text.count(), n_full=text.n_full, h=hc))
        t_cls = text.x[:, 0]

        dv = {"d": c.vision_width, "dff": 4 * c.vision_width, "dh": c.vision_width // c.vision_heads, "H": c.vision_heads}
        for i, blk in enumerate(vis.transformer.resblocks):
            name = f"vision_{i}"
            self.token_step(name, img, t_cls, ctx, prefix + name)
            gate, idx, hc = self.head_step(name, img.x[:, 0], t_cls, ctx, prefix + name)
            img.x = blk(img.x, img.key_add(), img.soft_keep, gate, idx)
            ctx.add(LayerCost(prefix + name, "clip_block", dv, n=img.count(), n_full=img.n_full, h=hc))

        img.x = self.cross_modal_image_transform(vis.ln_post(img.x))
        ctx.add(LayerCost(prefix + "ln_post", "ln", {"d": c.vision_width}, n=img.count(), n_full=img.n_full))
        ctx.add(LayerCost(prefix + "image_transform", "linear", {"din": c.vision_width, "dout": c.hidden},
                          n=img.count(), n_full=img.n_full))
        text.x = self.cross_modal_text_transform(text.x)
        ctx.add(LayerCost(prefix + "text_transform", "linear", {"din": c.text_hidden, "dout": c.hidden},
                          n=text.count(), n_full=text.n_full))
        tt = self.token_type_embeddings.weight
        text.x = text.x + tt[0]
        img.x = img.x + tt[image_type]

        dx = {"d": c.hidden, "dkv": c.hidden, "dff": c.cross_intermediate, "dh": c.hidden // c.cross_heads,
              "H": c.cross_heads}
        for i, (tl, il) in enumerate(zip(self.cross_modal_text_layers, self.cross_modal_image_layers)):
            x0, y0 = text.x[:, 0], img.x[:, 0]
            self.token_step(f"xtext_{i}", text, y0, ctx, f"{prefix}xtext_{i}")
            self.token_step(f"ximage_{i}", img, x0, ctx, f"{prefix}ximage_{i}")
            gts, its, hts = self.head_step(f"xtext_{i}_self", x0, y0, ctx, f"{prefix}xtext_{i}_self")
            gtc, itc, htc = self.head_step(f"xtext_{i}_cross", x0, y0, ctx, f"{prefix}xtext_{i}_cross")
            gis, iis, his = self.head_step(f"ximage_{i}_self", y0, x0, ctx, f"{prefix}ximage_{i}_self")
            gic, iic, hic = self.head_step(f"ximage_{i}_cross", y0, x0, ctx, f"{prefix}ximage_{i}_cross")
            t_add, i_add = text.key_add(), img.key_add()
            x1 = tl(text.x, img.x, t_add, text.soft_keep, i_add, img.soft_keep, gts, its, gtc, itc)
            y1 = il(img.x, text.x, i_add, img.soft_keep, t_add, text.soft_keep, gis, iis, gic, iic)
            nt, ni = text.count(), img.count()
            ctx.add(LayerCost(f"{prefix}xtext_{i}", "cross_layer", dx, n=nt, n_full=text.n_full, m=ni,
                              m_full=img.n_full, h=hts, h2=htc))
            ctx.add(LayerCost(f"{prefix}ximage_{i}", "cross_layer", dx, n=ni, n_full=img.n_full, m=nt,
                              m_full=text.n_full, h=his, h2=hic))
            text.x, img.x = x1, y1

        ctx.add(LayerCost(prefix + "poolers", "const", {"macs": 2 * c.hidden * c.hidden}, n=ones, n_full=ones))
        return torch.cat([self.cross_modal_text_pooler(text.x), self.cross_modal_image_pooler(img.x)], dim=-1)


# ----- checkpoints ------------------------------------------------------------------------------------
def _count(prefix: str, sd: dict) -> int:
    idx = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0


def config_from_state_dict(sd: dict, hp: dict, source: str) -> MeterConfig:
    """Read the architecture off tensor shapes; the sacred config (``hp``) adds resolution, text length
    and head counts where shapes cannot tell them."""
    def need(key):
        if key not in sd:
            raise SmartTrimError(f"{source}: not a METER checkpoint with a CLIP visual tower (missing {key!r})")
        return sd[key]

    conv = need("vit_model.visual.conv1.weight")
    pos = need("vit_model.visual.positional_embedding")
    word = need("text_transformer.embeddings.word_embeddings.weight")
    need("cross_modal_text_layers.0.attention.self.query.weight")
    width, patch = conv.shape[0], conv.shape[-1]
    grid = int(round((pos.shape[0] - 1) ** 0.5))
    if grid * grid != pos.shape[0] - 1:
        raise SmartTrimError(f"{source}: vit_model.visual.positional_embedding has {pos.shape[0]} rows, not 1 + a square")
    heads = [t for t in TASKS if any(k.startswith(HEAD_PREFIX[t] + ".") for k in sd)]
    if not heads:
        raise SmartTrimError(f"{source}: no task head found (expected one of "
                             f"{', '.join(p + '.*' for p in HEAD_PREFIX.values())}); pre-training checkpoints "
                             "need a task fine-tune first")
    task = heads[0]
    if task == "retrieval":
        num_labels = 1
    else:
        num_labels = sd[f"{HEAD_PREFIX[task]}.3.weight"].shape[0]
    tok = str(hp.get("tokenizer", ""))
    max_pos = sd["text_transformer.embeddings.position_embeddings.weight"].shape[0]
    roberta = "roberta" in tok or (not tok and max_pos == 514)
    text_hidden = word.shape[1]
    hidden = need("cross_modal_text_transform.weight").shape[0]
    ext = hp.get("smarttrim", {}) if isinstance(hp.get("smarttrim", {}), dict) else {}
    return MeterConfig(
        task=task, num_labels=num_labels,
        image_size=int(hp.get("image_size") or grid * patch),
        max_text_len=int(hp.get("max_text_len") or 50),
        patch_size=patch, vision_width=width, vision_layers=_count("vit_model.visual.transformer.resblocks.", sd),
        vision_heads=int(ext.get("vision_heads", max(1, width // 64))),
        text_family="roberta" if roberta else "bert", vocab_size=word.shape[0], text_hidden=text_hidden,
        text_layers=_count("text_transformer.encoder.layer.", sd),
        text_heads=int(ext.get("text_heads", max(1, text_hidden // 64))),
        text_intermediate=sd["text_transformer.encoder.layer.0.intermediate.dense.weight"].shape[0],
        max_position=max_pos,
        text_type_vocab=sd["text_transformer.embeddings.token_type_embeddings.weight"].shape[0],
        pad_token_id=1 if roberta else 0, text_eps=1e-5 if roberta else 1e-12,
        hidden=hidden, cross_layers=_count("cross_modal_text_layers.", sd),
        cross_heads=int(hp.get("num_heads") or max(1, hidden // 64)),
        cross_intermediate=sd["cross_modal_text_layers.0.intermediate.dense.weight"].shape[0],
        num_token_types=sd["token_type_embeddings.weight"].shape[0],
        has_itm=task == "retrieval" and "itm_score.fc.weight" in sd,
        extra={"source_image_size": grid * patch, "tokenizer": tok, "vit": str(hp.get("vit", ""))},
    )


def is_unused_key(k: str) -> bool:
    return k in UNUSED_KEYS or k.startswith(UNUSED_PREFIXES)


def from_checkpoint(path, image_size: int | None = None, trim: TrimConfig | None = None):
    """Load a released METER Lightning ``.ckpt`` exactly; returns (model, info)."""
    from ..checkpoint_io import load_lightning_checkpoint

    ck = load_lightning_checkpoint(path)
    sd = {k[len("model."):] if k.startswith("model.") and "model.vit_model.visual.conv1.weight" in ck["state_dict"]
          else k: v for k, v in ck["state_dict"].items()}
    hp = ck.get("config") or {}
    cfg = config_from_state_dict(sd, hp, str(path))
    src_size = cfg.image_size
    pos_key = "vit_model.visual.positional_embedding"
    if image_size:
        if image_size % cfg.patch_size:
            raise SmartTrimError(f"--image-size {image_size} is not a multiple of the patch size {cfg.patch_size}")
        cfg.image_size = image_size
    model = MeterModel(cfg)
    expected = model.state_dict()
    ignored = check_keys(sd, expected, path, "METER", is_unused_key)
    state = {k: sd[k] for k in expected}
    state[pos_key] = interpolate_positions(sd[pos_key], cfg.image_size // cfg.patch_size)
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise SmartTrimError(f"{path}: {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
    model.load_state_dict(state, strict=True)
    model.attach_trimmers(trim or default_trim_config(cfg))
    model.eval()
    info = {"ignored_keys": ignored, "source_image_size": src_size, "config": hp, "meta": ck.get("meta", {})}
    return model, info


def lightning_checkpoint(model: MeterModel, hp: dict | None = None, include_unused: bool = True) -> dict:
    """The backbone as METER's own training code saves it: a Lightning container whose ``state_dict`` has
    the original key names (and the unused CLIP/RoBERTa keys real files carry). Written to disk with
    ``checkpoint_io.save_lightning_checkpoint`` (the demo and the tests make METER files this way)."""
    c = model.config
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()
          if not k.startswith(("token_trimmers.", "head_trimmers."))}
    if include_unused:
        d = c.vision_width
        sd["vit_model.token_embedding.weight"] = torch.zeros(16, d)
        sd["vit_model.positional_embedding"] = torch.zeros(8, d)
        sd["vit_model.ln_final.weight"] = torch.ones(d)
        sd["vit_model.ln_final.bias"] = torch.zeros(d)
        sd["text_transformer.pooler.dense.weight"] = torch.zeros(c.text_hidden, c.text_hidden)
        sd["text_transformer.pooler.dense.bias"] = torch.zeros(c.text_hidden)
        sd["text_transformer.embeddings.position_ids"] = torch.arange(c.max_position).unsqueeze(0)
    config = {"image_size": c.image_size, "max_text_len": c.max_text_len, "num_heads": c.cross_heads,
              "hidden_size": c.hidden, "num_top_layer": c.cross_layers, "patch_size": c.patch_size,
              "tokenizer": c.extra.get("tokenizer") or ("roberta-base" if c.text_family == "roberta" else "bert-base-uncased"),
              "vit": "ViT-B/16", "loss_names": {t: int(t == c.task) for t in ("vqa", "nlvr2", "snli", "irtr", "itm", "mlm")},
              "smarttrim": {"vision_heads": c.vision_heads, "text_heads": c.text_heads}}
    config.update(hp or {})
    return {"epoch": 0, "global_step": 0, "pytorch-lightning_version": "1.3.2", "state_dict": sd,
            "hyper_parameters": {"config": config}, "callbacks": {}, "optimizer_states": [], "lr_schedulers": []}


# ----- tokenizer and labels ----------------------------------------------------------------------------
TOKENIZER_FILES = {"roberta": ("vocab.json", "merges.txt"), "bert": ("vocab.txt",)}


def resolve_tokenizer(ckpt: Path, tokenizer_dir, family: str, name: str, vocab_size: int):
    """Find the text tokenizer locally: --tokenizer, a ``tokenizer/`` folder beside the checkpoint, the
    checkpoint's tokenizer name as a local path, or the local Hugging Face cache. Never the network."""
    from transformers import AutoTokenizer, BertTokenizer, RobertaTokenizer

    cls = RobertaTokenizer if family == "roberta" else BertTokenizer
    tried = []
    candidates = [Path(tokenizer_dir)] if tokenizer_dir else [ckpt.parent / "tokenizer", Path(name) if name else None]
    for d in candidates:
        if d is None:
            continue
        tried.append(str(d))
        if not d.is_dir():
            if tokenizer_dir:
                raise SmartTrimError(f"{d}: tokenizer directory not found")
            continue
        try:
            if (d / "tokenizer_config.json").is_file():
                tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
            else:
                missing = [f for f in TOKENIZER_FILES[family] if not (d / f).is_file()]
                if missing:
                    raise SmartTrimError(f"{d}: no {', '.join(missing)} for the {family} tokenizer")
                tok = cls.from_pretrained(str(d), local_files_only=True)
        except SmartTrimError:
            raise
        except Exception as e:
            raise SmartTrimError(f"{d}: cannot load tokenizer ({type(e).__name__})") from None
        break
    else:
        tok = None
        if name and not tokenizer_dir:
            try:  # a tokenizer already in the local Hugging Face cache; no download is attempted
                tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
            except Exception:
                tok = None
        if tok is None:
            want = " and ".join(TOKENIZER_FILES[family])
            raise SmartTrimError(f"{ckpt}: no tokenizer found locally (tried {', '.join(tried) or 'nothing'}"
                                 f"{' and the Hugging Face cache for ' + repr(name) if name else ''}); pass "
                                 f"--tokenizer DIR with the {name or family} tokenizer files ({want})")
    if len(tok) > vocab_size:
        raise SmartTrimError(f"tokenizer has {len(tok)} tokens but the checkpoint's text embeddings only "
                             f"{vocab_size}: wrong tokenizer for this model")
    return tok


def read_labels(path, num_labels: int) -> list[str]:
    """A label list lining up with the classifier: a JSON list, or a text file with one label a line."""
    import json

    p = Path(path)
    if not p.is_file():
        raise SmartTrimError(f"{p}: answers file not found")
    text = p.read_text(encoding="utf-8")
    try:
        labels = json.loads(text) if text.lstrip().startswith("[") else [ln.strip() for ln in text.splitlines() if ln.strip()]
    except json.JSONDecodeError as e:
        raise SmartTrimError(f"{p}: not a valid JSON list ({e.msg} at line {e.lineno})") from None
    if not all(isinstance(x, str) for x in labels):
        raise SmartTrimError(f"{p}: labels must be strings")
    if len(labels) != num_labels:
        raise SmartTrimError(f"{p}: {len(labels)} labels, but the checkpoint's classifier has {num_labels} outputs")
    return labels


# ----- the family contract ---------------------------------------------------------------------------
class MeterFamily(Family):
    name = "meter"
    style = "ported"
    Config = MeterConfig
    Model = MeterModel
    tasks = {"vqa": "multilabel", "nlvr2": "classes", "snli": "classes", "retrieval": "score"}
    file_formats = ("a METER .ckpt file",)

    def reads_file(self, path: Path) -> bool:
        return path.is_file()  # released METER files are Lightning .ckpt files under any name

    def load(self, source: Path, *, image_size=None, tokenizer=None, answers=None, task=None,
             hf_config=None) -> Loaded:
        """``answers``: the label names lining up with the classifier (a METER file carries none)."""
        if task is not None and task != "auto":
            raise SmartTrimError(f"{source}: --task applies to Hugging Face directories; a METER checkpoint's task "
                                 "is read from its head")
        model, info = from_checkpoint(source, image_size=image_size)
        c = model.config
        tok = self.load_tokenizer(source, tokenizer, c)
        labels = read_labels(answers, c.num_labels) if answers is not None else None
        return Loaded(model, tok, labels, self.default_preprocess(c), "meter-lightning-ckpt", [source],
                      info["source_image_size"], info["ignored_keys"], info)

    def load_tokenizer(self, source: Path, override=None, config=None):
        c = config
        return resolve_tokenizer(source, override, c.text_family, c.extra.get("tokenizer", ""), c.vocab_size)

    def default_trim_config(self, config):
        return default_trim_config(config)

    def default_preprocess(self, config) -> dict:
        return {"image_size": config.image_size, "mean": list(CLIP_MEAN), "std": list(CLIP_STD),
                "max_text_len": config.max_text_len}


FAMILY = MeterFamily()
