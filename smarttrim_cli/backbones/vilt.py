"""ViLT (Kim et al., 2021) on the trimmable core, from a Hugging Face ``ViltForQuestionAnswering`` directory.

Single stream: ``[text ; image CLS ; patches]`` through one pre-LN encoder (``vilt.encoder.layer.*``),
final ``vilt.layernorm``, ``vilt.pooler`` on the text [CLS], ``classifier`` (Linear, LayerNorm, GELU,
Linear). Module and parameter names are those of transformers, so the weight map is the identity.

Trimming happens inside the joint encoder, on two streams that share each layer:
- ``ximage``: image tokens (image CLS = position 0, then patches in raster order), guided by the
  text [CLS] state at that depth (token trimmers ``ximage_<i>``);
- ``xtext``: text tokens (optional), guided by the image CLS state;
- ``joint``: head trimmers of the joint self-attention (``joint_<i>``), from both [CLS] states.
Concatenation order inside a layer does not matter (attention is permutation-equivariant and the
position embeddings were added before), so the streams are gathered separately and concatenated.

Patch order: transformers' ``visual_embed`` draws the patches with ``torch.multinomial`` — a random
permutation on every call, even in eval. We feed fixed square images with no padding, so every patch
is valid and all of them are used, in raster order: the same set transformers uses with
``max_image_length=-1`` (the released VQA config), deterministically. A positive ``max_image_length``
(random subsampling in transformers) is not reproduced: all patches are kept and the trimmers do the
reducing.

The family contract (``FAMILY`` at the end; backbones/base.py ``Family``): transformers directories
(``model_type`` vilt, ``ViltForQuestionAnswering``), the processor config's preprocessing (mean/std
0.5, square resize), the directory's own BERT tokenizer, labels from ``id2label``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import SmartTrimError
from ..nn.layers import ViltLayer
from ..preprocess import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD
from ..trim.config import TrimConfig
from ..trim.context import LayerCost, TrimContext
from ..trim.cost import module_macs
from .base import AttnWeights, FamilyConfig, Stream, StreamSpec, TrimmableModel, interpolate_positions
from .hf_dir import HFFamily, load_hf_state_dict, match_state_dict, read_hf_config, weight_files

TASKS = ("vqa",)
ARCHITECTURES = {"ViltForQuestionAnswering": "vqa"}


@dataclass
class ViltConfig(FamilyConfig):
    task: str = "vqa"
    num_labels: int = 3129
    image_size: int = 384
    max_text_len: int = 40
    patch_size: int = 32
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    hidden_act: str = "gelu"
    eps: float = 1e-12
    vocab_size: int = 30522
    type_vocab_size: int = 2
    modality_type_vocab_size: int = 2
    max_position: int = 40
    pad_token_id: int = 0
    source_image_size: int = 384     # the checkpoint's position grid is source_image_size / patch_size
    extra: dict = field(default_factory=dict)


def default_trim_config(cfg: ViltConfig) -> TrimConfig:
    """Image tokens are ~80% of ViLT-B/32's tokens at 384²: trim them every other layer from layer
    L/6 on; heads in the upper half; text tokens are left alone."""
    L = cfg.layers
    return TrimConfig(token_layers={"ximage": list(range(max(1, L // 6), L, 2)), "xtext": []},
                      head_layers={"joint": list(range(L // 2, L))})


class _TextEmbeddings(nn.Module):
    def __init__(self, c: ViltConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden, padding_idx=c.pad_token_id)
        self.position_embeddings = nn.Embedding(c.max_position, c.hidden)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden)
        self.LayerNorm = nn.LayerNorm(c.hidden, eps=c.eps)

    def forward(self, ids):
        T = ids.shape[1]
        pos = torch.arange(T, device=ids.device).unsqueeze(0)
        x = self.word_embeddings(ids) + self.token_type_embeddings.weight[0]
        x = x + self.position_embeddings(pos)
        return self.LayerNorm(x)


class _PatchEmbeddings(nn.Module):
    def __init__(self, c: ViltConfig):
        super().__init__()
        self.projection = nn.Conv2d(3, c.hidden, c.patch_size, c.patch_size)


class _Embeddings(nn.Module):
    def __init__(self, c: ViltConfig):
        super().__init__()
        self.text_embeddings = _TextEmbeddings(c)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.hidden))
        self.patch_embeddings = _PatchEmbeddings(c)
        self.position_embeddings = nn.Parameter(torch.zeros(1, c.n_patches + 1, c.hidden))
        self.token_type_embeddings = nn.Embedding(c.modality_type_vocab_size, c.hidden)


class _Pooler(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.dense = nn.Linear(d, d)

    def forward(self, x0):
        return torch.tanh(self.dense(x0))


class ViltModel(TrimmableModel):
    family = "vilt"
    input_names = ("pixel_values", "input_ids", "attention_mask")
    # one joint encoder: its text and image tokens are trimmed as two streams, its heads as a third
    streams = {
        "xtext": StreamSpec("layers", "hidden", "hidden", None, note="heads belong to the joint stream"),
        "ximage": StreamSpec("layers", "hidden", "hidden", None, read_by="xtext", image=True,
                             note="heads belong to the joint stream"),
        "joint": StreamSpec("layers", "hidden", "hidden", "heads", tokens=False,
                            note="tokens belong to the xtext/ximage streams"),
    }
    pos_embedding = "vilt.embeddings.position_embeddings"
    pos_interpolation = ("bilinear", True)  # transformers' visual_embed

    def __init__(self, config: ViltConfig, trim: TrimConfig | None = None):
        super().__init__()
        c = self.config = config
        if c.task not in TASKS:
            raise SmartTrimError(f"unsupported ViLT task {c.task!r} (supported: {', '.join(TASKS)})")
        if c.image_size % c.patch_size:
            raise SmartTrimError(f"image size {c.image_size} is not a multiple of the patch size {c.patch_size}")
        self.vilt = nn.Module()
        self.vilt.embeddings = _Embeddings(c)
        self.vilt.encoder = nn.Module()
        self.vilt.encoder.layer = nn.ModuleList(
            ViltLayer(c.hidden, c.heads, c.intermediate, c.eps, c.hidden_act) for _ in range(c.layers))
        self.vilt.layernorm = nn.LayerNorm(c.hidden, eps=c.eps)
        self.vilt.pooler = _Pooler(c.hidden)
        self.classifier = nn.Sequential(nn.Linear(c.hidden, 2 * c.hidden), nn.LayerNorm(2 * c.hidden), nn.GELU(),
                                        nn.Linear(2 * c.hidden, c.num_labels))
        self.trim_config = None
        if trim is not None:
            self.attach_trimmers(trim)

    # ----- contract hooks ----------------------------------------------------------------------------
    def head(self):
        return self.classifier

    def attention_weights(self, name: str, which: str = "self") -> AttnWeights:
        """Layer i's joint self-attention at every position ``<stream>_<i>``: the text tokens read the image
        tokens through it (``cross``) as the tokens of each stream read their own (``self``)."""
        layer = self.vilt.encoder.layer[int(name.rsplit("_", 1)[1])]
        s = layer.attention.attention
        return AttnWeights(layer.layernorm_before, s.query.weight, s.query.bias, s.key.weight, s.key.bias,
                           layer.n_heads)

    # ----- forward ---------------------------------------------------------------------------------
    def forward(self, pixel_values, input_ids, attention_mask, pixel_values2=None, ctx: TrimContext | None = None):
        ctx = ctx or self.make_context()
        self.last_ctx = ctx
        c, mode = self.config, ctx.mode
        emb = self.vilt.embeddings
        B = input_ids.shape[0]
        dev = input_ids.device
        ones = torch.ones(B, device=dev)
        tt = emb.token_type_embeddings.weight

        # text: BERT embeddings + modality type 0
        xt = emb.text_embeddings(input_ids) + tt[0]
        text = Stream.start(xt, attention_mask, mode, all_valid=False)
        ctx.add(LayerCost("text_embed", "ln", {"d": c.hidden}, n=text.count(), n_full=text.n_full))
        if mode == "hard":
            text.drop_padding()

        # image: patches in raster order (deterministic), [CLS], positions, modality type 1
        proj = emb.patch_embeddings.projection
        xi = proj(pixel_values.to(proj.weight.dtype))
        gh, gw = xi.shape[-2:]
        xi = xi.flatten(2).transpose(1, 2)
        pos = emb.position_embeddings.to(xi.dtype)
        xi = torch.cat([emb.cls_token.to(xi.dtype).expand(B, 1, -1), xi], dim=1) + pos
        xi = xi + tt[1]
        Ni = xi.shape[1]
        ctx.add(LayerCost("patch_embed", "const", {"macs": gh * gw * proj.weight[0].numel() * c.hidden},
                          n=ones, n_full=ones))
        img = Stream.start(xi, torch.ones(B, Ni, device=dev), mode, all_valid=True)

        dims = {"d": c.hidden, "dff": c.intermediate, "dh": c.hidden // c.heads, "H": c.heads}
        for i, layer in enumerate(self.vilt.encoder.layer):
            t_cls, i_cls = text.x[:, 0], img.x[:, 0]
            self.token_step(f"xtext_{i}", text, i_cls, ctx)
            self.token_step(f"ximage_{i}", img, t_cls, ctx)
            gate, idx, hc = self.head_step(f"joint_{i}", t_cls, i_cls, ctx)
            nt = text.x.shape[1]
            x = torch.cat([text.x, img.x], dim=1)
            ta, ia = text.key_add(), img.key_add()  # padding masks, and log sizes with token fusion
            key_add = None if ta is None and ia is None else torch.cat(
                [a if a is not None else x.new_zeros(s.valid.shape) for a, s in ((ta, text), (ia, img))], dim=1)
            policy = None if text.soft_keep is None else torch.cat([text.soft_keep, img.soft_keep], dim=1)
            x = layer(x, key_add, policy, gate, idx)
            text.x, img.x = x[:, :nt], x[:, nt:]
            ctx.add(LayerCost(f"joint_{i}", "clip_block", dims, n=text.count() + img.count(),
                              n_full=text.n_full + img.n_full, h=hc))

        # final LayerNorm is per token and only the text [CLS] is pooled: normalise that one token
        pooled = self.vilt.pooler(self.vilt.layernorm(text.x[:, 0]))
        head = self.classifier
        ctx.add(LayerCost("head", "const", {"macs": 5 * c.hidden + c.hidden * c.hidden + module_macs(head)},
                          n=ones, n_full=ones))
        return head(pooled)


# ----- Hugging Face directories -----------------------------------------------------------------------
def _ignored(k: str) -> bool:
    # non-persistent buffers that older checkpoints carry
    return k.endswith(("text_embeddings.position_ids", "text_embeddings.token_type_ids"))


def config_from_hf(hf: dict, source: str, image_size: int | None = None) -> ViltConfig:
    arch = (hf.get("architectures") or [None])[0]
    if arch not in ARCHITECTURES:
        raise SmartTrimError(f"{source}: ViLT architecture {arch!r} is not supported "
                             f"(supported: {', '.join(ARCHITECTURES)})")
    if not hf.get("qkv_bias", True):
        raise SmartTrimError(f"{source}: ViLT with qkv_bias=false is not supported")
    img = hf.get("image_size", 384)
    patch = hf.get("patch_size", 32)
    if isinstance(img, (list, tuple)):
        if img[0] != img[1]:
            raise SmartTrimError(f"{source}: non-square ViLT image_size {img} is not supported")
        img = img[0]
    if isinstance(patch, (list, tuple)):
        patch = patch[0]
    id2label = hf.get("id2label") or {}
    num_labels = len(id2label) if id2label else int(hf.get("num_labels", 2))
    size = int(image_size or img)
    if size % patch:
        raise SmartTrimError(f"--image-size {size} is not a multiple of the patch size {patch}")
    return ViltConfig(
        task=ARCHITECTURES[arch], num_labels=num_labels, image_size=size,
        max_text_len=int(hf.get("max_position_embeddings", 40)), patch_size=int(patch),
        hidden=hf.get("hidden_size", 768), layers=hf.get("num_hidden_layers", 12),
        heads=hf.get("num_attention_heads", 12), intermediate=hf.get("intermediate_size", 3072),
        hidden_act=hf.get("hidden_act", "gelu"), eps=hf.get("layer_norm_eps", 1e-12),
        vocab_size=hf.get("vocab_size", 30522), type_vocab_size=hf.get("type_vocab_size", 2),
        modality_type_vocab_size=hf.get("modality_type_vocab_size", 2),
        max_position=hf.get("max_position_embeddings", 40), pad_token_id=hf.get("pad_token_id") or 0,
        source_image_size=int(img),
        extra={"architecture": arch, "max_image_length": hf.get("max_image_length", -1)})


def labels_from_hf(hf: dict, n: int) -> list[str]:
    id2label = hf.get("id2label") or {}
    return [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(n)]


def from_hf_dir(path, image_size: int | None = None, trim: TrimConfig | None = None, hf_config: dict | None = None):
    """Load a transformers ``ViltForQuestionAnswering`` directory exactly; returns (model, info)."""
    path = Path(path)
    hf = hf_config or read_hf_config(path)
    cfg = config_from_hf(hf, str(path), image_size)
    sd = load_hf_state_dict(path)
    model = ViltModel(cfg)
    key = "vilt.embeddings.position_embeddings"
    if key in sd:
        g_old, g_new = cfg.source_image_size // cfg.patch_size, cfg.image_size // cfg.patch_size
        if sd[key].shape[1] != g_old * g_old + 1:
            raise SmartTrimError(f"{path}: {key} has {sd[key].shape[1]} rows, config.json implies {g_old * g_old + 1}")
        sd[key] = interpolate_positions(sd[key], g_new, *ViltModel.pos_interpolation)
    ignored = match_state_dict(model, sd, path, _ignored, "ViltForQuestionAnswering")
    model.load_state_dict({k: v for k, v in sd.items() if k not in ignored}, strict=False)
    model.attach_trimmers(trim or default_trim_config(cfg))
    model.eval()
    return model, {"ignored_keys": ignored, "source_image_size": cfg.source_image_size, "hf_config": hf,
                   "labels": labels_from_hf(hf, cfg.num_labels), "files": weight_files(path)}


# ----- the family contract ---------------------------------------------------------------------------
# transformers' ViltImageProcessor defaults, for keys a processor config leaves out
PROCESSOR_DEFAULTS = {"name": "vilt", "mean": IMAGENET_STANDARD_MEAN, "std": IMAGENET_STANDARD_STD, "size": 384,
                      "resample": "bicubic"}


class ViltFamily(HFFamily):
    name = "vilt"
    style = "ported"
    Config = ViltConfig
    Model = ViltModel
    tasks = {"vqa": "multilabel"}
    hf_model_type = "vilt"
    hf_architectures = ARCHITECTURES
    processor_defaults = PROCESSOR_DEFAULTS

    def config_from_hf(self, hf: dict, source: str):
        return config_from_hf(hf, source)

    def from_dir(self, source: Path, hf: dict, image_size=None, tokenizer=None, answers=None):
        if answers is not None:
            raise SmartTrimError(f"{source}: --answers applies to BLIP VQA; ViLT's answers are its id2label")
        return from_hf_dir(source, image_size=image_size, hf_config=hf)

    def default_trim_config(self, config):
        return default_trim_config(config)


FAMILY = ViltFamily()
