"""LLaVA (Liu et al., 2023), "wrapped": the transformers ``LlavaForConditionalGeneration`` is kept unmodified as
``model.hf`` (so ``generate()``, the KV cache, SDPA and dtypes keep working) and SmartTrim trims where the image
tokens cross into the language model: one token trimmer (stream ``image``, position 0, ``image_0``) over the
projected image features, guided by the prompt (the masked mean of its text-token embeddings, image placeholders
excluded), so each input keeps its own number of image tokens. The first image token is always kept (base.py's
rule: no input loses its image entirely).

Opt-in, inside the vision tower (stream ``vision``, ``--token-layers vision=...`` / ``--head-layers vision=...``;
the default placement is image_0 alone): token trimmers before chosen tower layers and head trimmers in them, as
in the paper's uni-modal encoders, guided by the same prompt guide. The tower then runs layer by layer here
(``trim_tower``) from transformers' modules (embeddings, CLIP's pre-LayerNorm, the encoder layers up to
``vision_feature_layer``), attention on the shared core (nn/attention.py), equal to ``get_image_features`` with
nothing dropped. [CLS] and the first image token are never dropped; a token dropped in the tower never reaches
the projector and is a dropped image token in the LM's sequence (hard: absent; soft: keep 0 carried into
image_0's mask); the survivors keep their index in the image run, hence their LM position ids.

Layout (the choice this module makes): **kept tokens keep their original position ids**, the ones the untrimmed
sequence gives them (``cumsum(attention_mask) - 1``, as transformers' ``generate`` numbers a left-padded prompt),
so RoPE sees distances of the layout the model was trained on; dropped tokens leave gaps. Per mode:

- ``full``: the untrimmed sequence (transformers' own merge of image features into the placeholders).
- ``hard`` (inference): the kept image embeddings are gathered, the sequence rebuilt as ``inputs_embeds`` +
  ``attention_mask`` + ``position_ids`` (with gaps) and **left-padded** across the batch (inputs keeping different
  counts), then fed to the LM. ``run`` scatters the logits back to the ``input_ids`` columns (rows at dropped image
  positions and padding are 0). ``generate`` prefills with that sequence through transformers' ``generate()``:
  5.25 keeps explicit ``position_ids`` and continues them with ``last + 1`` per decode step, which after left
  packing is the untrimmed length, so decode positions are those of the full layout.
- ``soft`` (training): the full sequence with an additive 4-D mask (causal, padding, and per key ``(1 - m) * NEG``
  from the straight-through keep mask ``m``), which transformers passes to SDPA/eager as it is. Dropped keys get
  exactly zero weight in fp32, so soft == hard given the same decisions; the gradient reaches ``m`` as that of
  ``log m`` at ``m = 1`` (the policy gradient of a kept key), bounded, unlike the raw ``NEG`` slope.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import SmartTrimError
from ..nn.attention import NEG, multi_head_attention
from ..preprocess import CLIP_MEAN, CLIP_STD
from ..trim.config import TrimConfig
from ..trim.context import LayerCost, TrimContext, count
from ..trim.gather import gather_rows, kept_order
from .base import FamilyConfig, Stream, StreamSpec, TrimmableModel
from .hf_dir import HFFamily, load_hf_tokenizer, read_hf_config, read_processor_config, weight_files

ARCHITECTURES = {"LlavaForConditionalGeneration": "generate"}
TEXT_MODELS = ("llama", "mistral", "qwen2")
VISION_MODELS = ("clip_vision_model", "siglip_vision_model")


@dataclass
class LlavaConfig(FamilyConfig):
    task: str = "generate"
    hf: dict = field(default_factory=dict)   # transformers' LlavaConfig.to_dict(): rebuilds the wrapped model
    image_size: int = 336
    patch_size: int = 14
    image_tokens: int = 576                  # placeholders per image: the ``image`` stream's length
    text_hidden: int = 4096
    vocab_size: int = 32064
    image_token_id: int = 32000
    boundaries: int = 1                      # trimmer positions on the image stream (after the projector)
    max_text_len: int = 64                   # text tokens of the prompt used for cost summaries
    extra: dict = field(default_factory=dict)

    # the vision tower's geometry, read from ``hf`` (not stored: directories written before the stream existed
    # load unchanged)
    @property
    def _vision(self) -> dict:
        return self.hf.get("vision_config") or {}

    @property
    def vision_layers(self) -> int:
        """Tower layers up to ``vision_feature_layer`` (the ``vision`` stream's positions; hidden_states[0] is the
        embeddings)."""
        k = int(self.hf.get("vision_feature_layer", -2))
        return k if k >= 0 else int(self._vision.get("num_hidden_layers", 24)) + 1 + k

    @property
    def vision_hidden(self) -> int:
        return int(self._vision.get("hidden_size", 1024))

    @property
    def vision_heads(self) -> int:
        return int(self._vision.get("num_attention_heads", 16))


def default_trim_config(cfg: LlavaConfig) -> TrimConfig:
    return TrimConfig(token_layers={"image": [0]}, head_layers={})


def _hf_model(hf_dict: dict):
    import transformers

    cfg = transformers.LlavaConfig.from_dict(hf_dict)
    dt = hf_dict.get("dtype")
    return transformers.LlavaForConditionalGeneration._from_config(
        cfg, dtype=getattr(torch, dt) if isinstance(dt, str) and hasattr(torch, dt) else None)


@dataclass
class Prefill:
    """What reaches the LM: embeddings, mask (2-D, or 4-D additive in soft mode), position ids, and the
    ``input_ids`` column of each slot (None: the slots are the columns)."""

    embeds: torch.Tensor
    mask: torch.Tensor
    pos: torch.Tensor
    cols: torch.Tensor | None
    n: torch.Tensor          # (B,) tokens the LM processes (soft: differentiable)
    n_full: torch.Tensor     # (B,) untrimmed


def left_pack(keep: torch.Tensor):
    """(B, L) bool -> (idx (B, K), valid (B, K)): the kept columns in order, right-aligned (left padding)."""
    idx, _ = kept_order(keep)
    K = idx.shape[1]
    n = keep.sum(1, keepdim=True)
    j = torch.arange(K, device=keep.device).unsqueeze(0)
    # slots j < K - n take the (distinct) non-kept indices kept_order put after the kept ones
    return idx.gather(1, (j - (K - n)) % K), j >= K - n


def soft_mask(keyw: torch.Tensor, valid: torch.Tensor, dtype) -> torch.Tensor:
    """(B, 1, L, L) additive mask: causal and padding as transformers builds them (a padding query sees itself,
    so no row is empty), plus ``(1 - keyw) * NEG`` on the keys with the gradient of ``log keyw`` at 1."""
    B, L = keyw.shape
    causal = torch.ones(L, L, dtype=torch.bool, device=keyw.device).tril()
    allowed = (causal.unsqueeze(0) & valid.unsqueeze(1)) | torch.eye(L, dtype=torch.bool, device=keyw.device)
    w = keyw.to(dtype)
    bias = (1 - w.detach()) * NEG + (w - w.detach())
    return torch.where(allowed, bias.unsqueeze(1), torch.finfo(dtype).min).unsqueeze(1)


def _tower_layer(layer, x, heads: int, key_add=None, policy=None, gate=None, idx=None):
    """One CLIP/SigLIP encoder layer (pre-LN) from transformers' own modules, its attention on the shared core
    (nn/attention.py: padding mask, soft keep policy, head gate / kept head indices)."""
    a = layer.self_attn
    h = layer.layer_norm1(x)
    x = x + multi_head_attention(h, h, a.q_proj.weight, a.q_proj.bias, a.k_proj.weight, a.k_proj.bias,
                                 a.v_proj.weight, a.v_proj.bias, a.out_proj.weight, a.out_proj.bias, heads,
                                 key_add, policy, gate, idx)
    return x + layer.mlp(layer.layer_norm2(x))


class LlavaModel(TrimmableModel):
    family = "llava"
    # forward order: the tower's tokens, then the projected image tokens (reports count the last decision)
    streams = {"vision": StreamSpec(layers="vision_layers", width="vision_hidden", guide="text_hidden",
                                    heads="vision_heads", image=True,
                                    note="the vision tower's layers up to vision_feature_layer, opt-in"),
               "image": StreamSpec(layers="boundaries", width="text_hidden", guide="text_hidden", tokens=True,
                                   self_attention=False, image=True,
                                   note="one position: the projected image tokens entering the language model")}
    input_names = ("input_ids", "attention_mask", "pixel_values")

    def __init__(self, config: LlavaConfig, trim: TrimConfig | None = None, hf=None):
        super().__init__()
        self.config = config
        self.hf = hf if hf is not None else _hf_model(config.hf)
        self.attach_trimmers(trim or default_trim_config(config))

    def attach_trimmers(self, trim):
        if trim.fuse:  # a merged token has no original position, and the wrapped attention takes no size bias
            raise SmartTrimError("llava: token fusion (--fuse) is not supported; dropped image tokens are removed")
        return super().attach_trimmers(trim)

    def unused_parameters(self):
        """The tower's layers after ``vision_feature_layer`` and its post-LayerNorm: the LM reads hidden_states at
        the feature layer, so no loss reaches them."""
        vt = self.hf.model.vision_tower
        mods = list(vt.encoder.layers[self.config.vision_layers:])
        if getattr(vt, "post_layernorm", None) is not None:
            mods.append(vt.post_layernorm)
        return [p for m in mods for p in m.parameters()]

    def lora_module(self):
        return self.hf.model.language_model  # the decoder layers (q_proj ... down_proj); not the tower or projector

    # ----- the sequence the LM sees ----------------------------------------------------------------------
    def _layout(self, ids, mask):
        c = self.config
        L = ids.shape[1]
        valid = mask > 0
        is_img = (ids == c.image_token_id) & valid
        col = torch.arange(L, device=ids.device).unsqueeze(0)
        first = torch.where(is_img, col, L).amin(1)
        last = torch.where(is_img, col, -1).amax(1)
        n_img = is_img.sum(1)
        if bool(((n_img != c.image_tokens) | (last - first + 1 != n_img)).any()):
            raise SmartTrimError(f"llava: each input needs one contiguous run of {c.image_tokens} image tokens "
                                 f"(id {c.image_token_id}); got {n_img.tolist()} (expand them with the processor)")
        img_idx = (is_img.long().cumsum(1) - 1).clamp_min(0)
        pos = (mask.long().cumsum(1) - 1).masked_fill(~valid, 0)
        return valid, is_img, img_idx, pos

    def image_features(self, pixel_values):
        out = self.hf.model.get_image_features(pixel_values=pixel_values, return_dict=True)
        return torch.stack(list(out.pooler_output))

    # ----- the image tokens: tower (run here where it is trimmed), projector -------------------------------
    def tower_trimmed(self) -> bool:
        """Whether trimmers sit inside the vision tower (the ``vision`` stream, opt-in)."""
        return any(k.startswith("vision_") for k in (*self.token_trimmers, *self.head_trimmers))

    def _feature_start(self) -> int:
        """Index of the first feature token in the tower's sequence: the "default" strategy drops token 0
        ([CLS] for CLIP), as transformers' ``get_image_features`` does."""
        return 1 if self.hf.config.vision_feature_select_strategy == "default" else 0

    def image_stream(self, pixel_values, guide, ctx: TrimContext, dtype=None) -> Stream:
        """The projected image tokens (fp32) as the ``image`` stream, before ``image_0``: transformers'
        ``get_image_features`` when the tower is untrimmed (or in full mode), else the tower run here layer by layer.
        Tokens dropped in the tower are absent (hard) or have keep 0 (soft); the others keep their index in the
        image run, so the LM's layout (and position ids) is the untrimmed one. ``dtype``: the LM's (None: the
        tower's)."""
        if ctx.mode == "full" or not self.tower_trimmed():
            feats = self.image_features(pixel_values)
            feats = feats if dtype is None else feats.to(dtype)
            B, N, _ = feats.shape
            self._record_vision(ctx, B, N, feats.device)
            return Stream.start(feats.float(), torch.ones(B, N, device=feats.device), ctx.mode, all_valid=True)
        v = self.trim_tower(pixel_values, guide, ctx)
        f = self._feature_start()
        x = self.hf.model.multi_modal_projector(v.x[:, f:])  # hard: dropped tokens never reach the projector
        x = (x if dtype is None else x.to(dtype)).float()
        keep = None if v.soft_keep is None else v.soft_keep[:, f:].float()
        N = v.n_orig - f
        s = Stream(x, v.valid[:, f:].float(), v.pos[:, f:] - f, torch.full_like(v.n_full, N), keep, v.all_valid, N)
        self._record_projector(ctx, s.count(), s.n_full)
        return s

    def trim_tower(self, pixel_values, guide, ctx: TrimContext) -> Stream:
        """The vision tower up to ``vision_feature_layer`` from transformers' modules (embeddings, CLIP's
        pre-LayerNorm, encoder layers), trimmed inside: token trimmer ``vision_<i>`` decides which tokens enter
        layer i, head trimmer ``vision_<i>`` gates its heads, both guided by the prompt (``guide``). -> the stream
        at the feature layer; ``pos``: index in the tower's sequence ([CLS] first for CLIP), which always keeps
        its first ``_feature_start() + 1`` tokens ([CLS], and the first image token as ``image_0`` does)."""
        vt = self.hf.model.vision_tower
        x = vt.embeddings(pixel_values)
        pre = getattr(vt, "pre_layrnorm", None)  # CLIP's; SigLIP has none
        if pre is not None:
            x = pre(x)
        B, n, _ = x.shape
        self._record_embed(ctx, B, x.device)
        s = Stream.start(x, torch.ones(B, n, device=x.device), ctx.mode, all_valid=True)
        s.reserved = self._feature_start() + 1
        c, dims = self.config, self._vision_dims()
        for i, layer in enumerate(vt.encoder.layers[:c.vision_layers]):
            self.token_step(f"vision_{i}", s, guide, ctx)
            gate, idx, h = self.head_step(f"vision_{i}", self._tower_summary(s, pre is not None), guide, ctx)
            s.x = _tower_layer(layer, s.x, c.vision_heads, s.key_add(), s.soft_keep, gate, idx)
            ctx.add(LayerCost(f"vision_{i}", "clip_block", dims, n=s.count(), n_full=s.n_full, h=h))
        return s

    @staticmethod
    def _tower_summary(s: Stream, cls: bool) -> torch.Tensor:
        """The tower's own summary for a head trimmer: [CLS] (CLIP), else the mean of the live tokens (SigLIP)."""
        if cls:
            return s.x[:, 0]
        w = (s.soft_keep if s.soft_keep is not None else s.valid).unsqueeze(-1).to(s.x.dtype)
        return (s.x * w).sum(1) / w.sum(1).clamp_min(1.0)

    def prefill(self, input_ids, attention_mask, pixel_values, ctx: TrimContext, pack: bool = False) -> Prefill:
        """Trim (per ``ctx``) and build the LM's inputs. ``pack``: left-packed even in full mode (generate)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        valid, is_img, img_idx, pos = self._layout(input_ids, attention_mask)
        text = self.hf.get_input_embeddings()(input_ids)
        # the trimmer decides in fp32 whatever the model's dtype (bf16 -> fp32 -> bf16 leaves the features exact)
        tmask = (valid & ~is_img).unsqueeze(-1).float()
        guide = (text.float() * tmask).sum(1) / tmask.sum(1).clamp_min(1.0)
        s = self.image_stream(pixel_values, guide, ctx, text.dtype)
        B, N = s.x.shape[0], s.n_orig
        self.token_step("image_0", s, guide, ctx)
        if ctx.mode == "hard":  # back to the (B, N) layout: kept rows in place, the rest unused
            kept_img = s.kept_positions() > 0
            feats = s.x.new_zeros(B, N, s.x.shape[-1], dtype=text.dtype).scatter(
                1, s.pos.unsqueeze(-1).expand(-1, -1, s.x.shape[-1]), s.x.to(text.dtype))
        else:
            feats = s.x.to(text.dtype)
            kept_img = torch.ones(B, N, dtype=torch.bool, device=feats.device)
        embeds = torch.where(is_img.unsqueeze(-1), gather_rows(feats, img_idx), text)
        n_full = count(valid)
        if ctx.mode == "soft":
            keyw = torch.where(is_img, s.soft_keep.gather(1, img_idx), valid.float())
            return Prefill(embeds, soft_mask(keyw, valid, embeds.dtype), pos, None, keyw.sum(1), n_full)
        keep = valid & (~is_img | kept_img.gather(1, img_idx))
        if ctx.mode == "full" and not pack:
            return Prefill(embeds, attention_mask, pos, None, n_full, n_full)
        idx, slot = left_pack(keep)
        return Prefill(gather_rows(embeds, idx), slot.long(), gather_rows(pos, idx).masked_fill(~slot, 0), idx,
                       count(slot), n_full)

    # ----- forward and generate ----------------------------------------------------------------------------
    def forward(self, input_ids, attention_mask=None, pixel_values=None, ctx: TrimContext | None = None):
        """-> logits (B, L, V) aligned with ``input_ids`` (hard mode: rows at dropped image tokens and padding 0)."""
        ctx = ctx or self.make_context()
        p = self.prefill(input_ids, attention_mask, pixel_values, ctx)
        out = self.hf.model.language_model(inputs_embeds=p.embeds, attention_mask=p.mask, position_ids=p.pos,
                                           use_cache=False)
        self._record_lm(ctx, p, with_head=True)
        logits = self.hf.lm_head(out.last_hidden_state)
        if p.cols is None:
            return logits
        full = logits.new_zeros(input_ids.shape + logits.shape[-1:])
        return full.scatter(1, p.cols.unsqueeze(-1).expand(-1, -1, logits.shape[-1]), logits)

    @torch.no_grad()
    def generate(self, batch: dict, mode: str | None = None, max_new_tokens: int = 20, threshold=None, forced=None,
                 keep_ratio=None, policy=None, record: bool = False, **generate_kwargs):
        """Prefill with the (trimmed, position-preserving, left-packed) prompt and decode with transformers'
        ``generate``. -> the new token ids (B, T) only. ``mode``: "hard" or "full"; ``record``: the prefill's
        decisions and costs in ``last_ctx``."""
        ctx = self.make_context(mode=mode, threshold=threshold, forced=forced, keep_ratio=keep_ratio, policy=policy,
                                record=record)
        if ctx.mode == "soft":
            raise SmartTrimError("generate: mode must be hard or full (soft mode is for training)")
        p = self.prefill(batch["input_ids"], batch.get("attention_mask"), batch["pixel_values"], ctx, pack=True)
        self.last_ctx = ctx
        return self.hf.generate(inputs_embeds=p.embeds, attention_mask=p.mask, position_ids=p.pos,
                                max_new_tokens=max_new_tokens, **generate_kwargs)

    # ----- cost records (trim/cost.py) ----------------------------------------------------------------------
    def _vision_dims(self) -> dict:
        v = self.hf.config.vision_config
        return {"d": v.hidden_size, "dff": v.intermediate_size, "dh": v.hidden_size // v.num_attention_heads,
                "H": v.num_attention_heads}

    def _tower_tokens(self) -> int:
        v = self.hf.config.vision_config
        return (v.image_size // v.patch_size) ** 2 + (1 if v.model_type == "clip_vision_model" else 0)

    def _record_embed(self, ctx, B, device):
        """The patch embedding and CLIP's pre-LayerNorm: before any tower trimmer, always untrimmed."""
        if not ctx.record:
            return
        v = self.hf.config.vision_config
        n_patch = (v.image_size // v.patch_size) ** 2
        ones = torch.ones(B, device=device)
        ctx.add(LayerCost("vision_patch", "linear", {"din": 3 * v.patch_size ** 2, "dout": v.hidden_size},
                          n=ones * n_patch, n_full=ones * n_patch))
        if v.model_type == "clip_vision_model":  # CLIP's pre-LayerNorm
            n_tok = self._tower_tokens()
            ctx.add(LayerCost("vision_pre_ln", "ln", {"d": v.hidden_size}, n=ones * n_tok, n_full=ones * n_tok))

    def _record_projector(self, ctx, n, n_full):
        proj = self.hf.model.multi_modal_projector
        for lin in (proj.linear_1, proj.linear_2):
            ctx.add(LayerCost("projector", "linear", {"din": lin.in_features, "dout": lin.out_features},
                              n=n, n_full=n_full))

    def _record_vision(self, ctx, B, N, device):
        """The untrimmed tower up to the feature layer (what the features depend on: fvcore's count of the traced
        graph; transformers also runs the layers after it, whose output nothing reads), then the projector."""
        if not ctx.record:
            return
        self._record_embed(ctx, B, device)
        ones = torch.ones(B, device=device)
        n_tok, dims = self._tower_tokens(), self._vision_dims()
        for i in range(self.config.vision_layers):
            ctx.add(LayerCost(f"vision_{i}", "clip_block", dims, n=ones * n_tok, n_full=ones * n_tok))
        self._record_projector(ctx, ones * N, ones * N)

    def _record_lm(self, ctx, p: Prefill, with_head: bool):
        if not ctx.record:
            return
        t = self.hf.config.text_config
        dh = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
        dims = {"d": t.hidden_size, "dff": t.intermediate_size, "dh": dh, "H": t.num_attention_heads,
                "KVH": t.num_key_value_heads or t.num_attention_heads}
        for i in range(t.num_hidden_layers):
            ctx.add(LayerCost(f"lm_{i}", "decoder_layer", dims, n=p.n, n_full=p.n_full, m=p.n, m_full=p.n_full))
        if with_head:
            ctx.add(LayerCost("lm_head", "linear", {"din": t.hidden_size, "dout": t.vocab_size}, n=p.n,
                              n_full=p.n_full))

    # ----- the image side alone (export/image_graph.py: tower + projector + trimmer as one ONNX graph) -----
    def prompt_guide(self, input_ids, attention_mask=None):
        """(B, D) fp32: the trimmer's guide as ``prefill`` computes it (masked mean of the text-token embeddings;
        export/image_prefill.prompt_guide is the same from the transformers model alone)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        text = self.hf.get_input_embeddings()(input_ids)
        m = ((attention_mask > 0) & (input_ids != self.config.image_token_id)).unsqueeze(-1).float()
        return (text.float() * m).sum(1) / m.sum(1).clamp_min(1.0)

    def trim_image(self, pixel_values, guide, ctx: TrimContext) -> Stream:
        """The image tokens through the trimmer alone (``prefill``'s first half): ``s.x`` the kept projected
        features (fp32), ``s.pos`` their indices in the image run."""
        s = self.image_stream(pixel_values, guide.float(), ctx)
        self.token_step("image_0", s, guide.float(), ctx)
        return s


# ----- reading a transformers directory -----------------------------------------------------------------
def _key_names(files) -> list[str]:
    from safetensors import safe_open

    keys = []
    for f in files:
        try:
            if f.name.endswith(".safetensors"):
                with safe_open(str(f), "pt") as h:
                    keys += list(h.keys())
            else:
                keys += list(torch.load(str(f), map_location="meta", weights_only=True))
        except Exception as e:
            raise SmartTrimError(f"{f}: cannot read weights ({type(e).__name__})") from None
    return keys


def config_from_hf(hf: dict, source: str, max_text_len: int = 64) -> LlavaConfig:
    p = f"{source}/config.json"
    t, v = hf.get("text_config") or {}, hf.get("vision_config") or {}
    if t.get("model_type", "llama") not in TEXT_MODELS or v.get("model_type", "clip_vision_model") not in VISION_MODELS:
        raise SmartTrimError(f"{p}: unsupported LLaVA towers (text {t.get('model_type')!r}, vision "
                             f"{v.get('model_type')!r}); supported: text {', '.join(TEXT_MODELS)}, vision "
                             f"{', '.join(VISION_MODELS)}")
    try:
        import transformers

        full = transformers.LlavaConfig.from_dict(hf)
    except Exception as e:
        raise SmartTrimError(f"{p}: not a valid LLaVA config ({type(e).__name__})") from None
    vc, tc = full.vision_config, full.text_config
    n = (vc.image_size // vc.patch_size) ** 2
    if full.vision_feature_select_strategy == "full" and vc.model_type == "clip_vision_model":
        n += 1
    if not isinstance(full.vision_feature_layer, int):
        raise SmartTrimError(f"{p}: vision_feature_layer {full.vision_feature_layer} (several layers) is not supported")
    return LlavaConfig(hf=full.to_dict(), image_size=vc.image_size, patch_size=vc.patch_size, image_tokens=n,
                       text_hidden=tc.hidden_size, vocab_size=tc.vocab_size, image_token_id=full.image_token_id,
                       max_text_len=max_text_len, extra={"architecture": "LlavaForConditionalGeneration"})


def from_hf_dir(path, hf_config: dict | None = None, trim: TrimConfig | None = None):
    """Load a transformers LLaVA directory exactly (the wrapped model is transformers' own); -> (model, info)."""
    from transformers import LlavaForConditionalGeneration

    path = Path(path)
    hf_config = hf_config or read_hf_config(path)
    cfg = config_from_hf(hf_config, str(path))
    files = weight_files(path)
    if not any("multi_modal_projector." in k for k in _key_names(files)):
        raise SmartTrimError(f"{files[0]}: no multi-modal projector weights (multi_modal_projector.*): not a LLaVA "
                             f"checkpoint")
    try:
        hf, info = LlavaForConditionalGeneration.from_pretrained(str(path), local_files_only=True,
                                                                 output_loading_info=True)
    except Exception as e:
        raise SmartTrimError(f"{path}: cannot load with transformers ({type(e).__name__}: {e})".split("\n")[0]) \
            from None
    if info.get("missing_keys"):
        miss = sorted(info["missing_keys"])
        raise SmartTrimError(f"{files[0]}: {len(miss)} missing weight(s): {', '.join(miss[:4])}")
    cfg.hf = hf.config.to_dict()
    model = LlavaModel(cfg, trim, hf=hf.eval()).eval()
    return model, {"ignored_keys": sorted(info.get("unexpected_keys") or []), "source_image_size": cfg.image_size,
                   "hf_config": hf_config, "labels": None, "files": files}


# ----- the family contract ---------------------------------------------------------------------------
PROCESSOR_DEFAULTS = {"name": "clip", "mean": CLIP_MEAN, "std": CLIP_STD, "size": 336, "resample": "bicubic"}


class LlavaFamily(HFFamily):
    name = "llava"
    style = "wrapped"
    Config = LlavaConfig
    Model = LlavaModel
    tasks = {"generate": "text"}
    hf_model_type = "llava"
    hf_architectures = ARCHITECTURES
    processor_defaults = PROCESSOR_DEFAULTS

    def config_from_hf(self, hf: dict, source: str):
        return config_from_hf(hf, source)

    def from_dir(self, source: Path, hf: dict, image_size=None, tokenizer=None, answers=None):
        if image_size is not None:
            raise SmartTrimError(f"{source}: --image-size is not supported for LLaVA (its projector reads one grid)")
        return from_hf_dir(source, hf)

    def load(self, source: Path, **kw):
        got = super().load(source, **kw)
        if kw.get("tokenizer") is None:  # the whole processor (chat template, image token, patch size) when it loads
            try:
                from transformers import AutoProcessor

                got.tokenizer = AutoProcessor.from_pretrained(str(source), local_files_only=True)
            except Exception:  # e.g. a torchvision-backed image processor without torchvision: the tokenizer
                pass
        proc = read_processor_config(source) or {}
        if proc.get("do_center_crop", True) and proc.get("crop_size"):  # CLIP: shorter side, then centre crop
            got.preprocess["resize"] = "shorter_crop"
        return got

    def load_tokenizer(self, source: Path, override=None, config=None):
        return load_hf_tokenizer(Path(override) if override else source, config.vocab_size)

    def default_trim_config(self, config):
        return default_trim_config(config)

    def image_tokens(self, config) -> int:
        return config.image_tokens

    def export_graph(self, model):
        return {"kind": "image_side", "image_token_id": model.config.image_token_id,
                "image_tokens": model.config.image_tokens}

    def dummy_batch(self, model, text_len=None, batch=1):
        c = model.config
        T = text_len or c.max_text_len
        ids = torch.full((batch, T + c.image_tokens), 5, dtype=torch.long)
        ids[:, 1:1 + c.image_tokens] = c.image_token_id
        return {"pixel_values": torch.zeros(batch, 3, c.image_size, c.image_size), "input_ids": ids,
                "attention_mask": torch.ones_like(ids)}


FAMILY = LlavaFamily()

__all__ = ["FAMILY", "LlavaConfig", "LlavaModel", "from_hf_dir", "left_pack", "soft_mask"]
