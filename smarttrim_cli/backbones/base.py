"""What every backbone shares: the family contract (``Family``, ``StreamSpec``, ``Loaded``) and the
trimmable model base (``TrimmableModel``: per-mode decision steps, trimmer placement, inference API).

A family module (meter.py, blip.py, vilt.py) subclasses both and registers its ``Family`` in
backbones/__init__.py. Everything outside backbones/ asks the contract, never a family by name.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import SmartTrimError
from ..nn.attention import pad_to_additive
from ..trim.context import LayerCost, TrimContext, count
from ..trim.fusion import fuse_dropped, fuse_nearest, size_bias
from ..trim.gather import gather_rows, kept_order
from ..trim.gumbel import above_threshold, st_keep
from ..trim.topk import keep_topk
from ..trim.trimmers import HeadTrimmer, TokenTrimmer

# What a task head returns (``Family.tasks``): how losses, distillation and label-free comparisons read it.
OUTPUT_KINDS = {
    "multilabel": "class logits, a sigmoid each (VQA with soft targets)",
    "classes": "class logits under one softmax (NLVR2, SNLI-VE, ITM no-match/match)",
    "answer_loglik": "log-likelihood of each answer of a fixed list (ranked: a softmax over the answers)",
    "score": "one matching score per input (retrieval ranking)",
    "text": "generated token ids (decoder VLMs)",
}
# "ported": the original layers rebuilt on the core (nn/layers.py) under their original parameter names,
# trimmed inside every layer. "wrapped": the transformers model itself kept (generate(), KV cache, SDPA),
# trimmed only where tokens cross a boundary (after the projector, inside the vision tower) through hooks.
STYLES = ("ported", "wrapped")


# ----- the family contract ------------------------------------------------------------------------------
@dataclass(frozen=True)
class StreamSpec:
    """One token stream of a backbone and where trimmers may go on it. Widths, head counts and layer
    counts are names of the family's config attributes, so one spec serves every size of the model."""

    layers: str                     # how many positions the stream has (a trimmer at i decides what enters layer i)
    width: str                      # its token width
    guide: str                      # width of the cross-modal context that guides its trimmers
    heads: str | None = None        # heads of the attention at each position; None: no head trimmers here
    head_subs: tuple = ("",)        # one head trimmer per attention of a layer ("_self", "_cross" in co-attention)
    tokens: bool = True             # token trimmers may go here
    read_by: str | None = None      # the stream whose (cross-)attention reads these tokens: text-guided rules
    self_attention: bool = True     # the tokens attend among themselves at each position (EViT's own [CLS] guide)
    note: str = ""                  # said when a trimmer is put where it cannot go
    image: bool = False             # it carries image tokens (reports count the kept image tokens on these)


class FamilyConfig:
    """What every family's config dataclass shares: the dict stored in a model directory and back (unknown keys
    ignored, so an older directory still loads), and the patch count of its image grid."""

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class AttnWeights:
    """q/k weights of one attention, for rules that score tokens by attention (baselines/)."""

    ln: nn.Module | None  # pre-LN blocks normalise the attention input; post-LN (BERT) do not
    wq: torch.Tensor
    bq: torch.Tensor
    wk: torch.Tensor
    bk: torch.Tensor
    heads: int


@dataclass
class Loaded:
    """What a family's loader hands to ``smarttrim attach``."""

    model: "TrimmableModel"
    tokenizer: object                       # a transformers tokenizer, saved into the model directory
    labels: list | None                     # output names lining up with the head (None: unnamed)
    preprocess: dict                        # the ``preprocess`` entry of config.json (smarttrim_cli/preprocess.py)
    source_format: str                      # provenance: e.g. "meter-lightning-ckpt", "hf-BlipForQuestionAnswering"
    source_files: list = field(default_factory=list)  # the weight files read (hashed into the provenance)
    source_image_size: int = 0
    ignored_keys: list = field(default_factory=list)  # checkpoint keys known to be unused
    info: dict = field(default_factory=dict)


class Family:
    """What the project asks of a backbone family, declared once in its module.

    A newcomer reads this class, then one family module. ``attach`` finds the family of a source
    (``reads_file`` / ``hf_architectures``) and calls ``load``; ``model_dir.load`` calls ``build``;
    ``finetune``, ``profile``, ``export`` and the baselines read ``tasks``, ``default_preprocess`` and
    the model's ``streams`` / ``attention_weights`` / ``at_resolution`` / ``new_head``. Nothing outside
    backbones/ compares a family's name.

    Both styles fit: a "ported" family (METER, BLIP, ViLT) rebuilds the original layers from nn/layers.py
    and calls ``token_step``/``head_step`` inside its forward. A "wrapped" family (decoder VLMs) keeps the
    transformers model as a submodule of its ``Model`` (still a TrimmableModel: the trimmers, modes and
    decision steps are the same) and calls the steps at its boundaries (after the projector, in the vision
    tower), from its own forward around the wrapped model's parts or from hooks; its ``streams`` name those
    boundaries, ``attention_weights`` and
    ``at_resolution`` may stay unimplemented (the baselines that need them then say so), and its
    ``tasks`` may give ``text`` (generated ids), and ``dummy_batch`` / ``image_tokens`` say what its inputs
    look like (backbones/llava.py)."""

    name: str = ""                   # the ``backbone`` field of a model directory
    style: str = "ported"            # STYLES
    Config: type = None              # dataclass: to_dict/from_dict, task, image_size, patch_size, max_text_len, ...
    Model: type = None               # a TrimmableModel
    tasks: dict = {}                 # task -> output kind (OUTPUT_KINDS)
    file_formats: tuple = ()         # single-file checkpoints it reads, in words (for error messages)
    hf_model_type: str | None = None         # transformers ``model_type`` of the directories it reads
    hf_architectures: dict = {}              # transformers architecture -> task

    def reads_file(self, path: Path) -> bool:
        """Whether ``path`` (a file) is a checkpoint of this family's own format."""
        return False

    def load(self, source: Path, *, image_size=None, tokenizer=None, answers=None, task=None,
             hf_config: dict | None = None) -> Loaded:
        """Load ``source`` exactly (full mode reproduces the original model): the model with the family's
        default trimmers, its tokenizer (``tokenizer``: a directory that overrides the source's), labels
        (``answers``: a file or list, where the family takes one) and preprocessing."""
        raise NotImplementedError

    def load_tokenizer(self, source: Path, override=None, config=None):
        """The text tokenizer of ``source`` (``override``: a tokenizer directory the user named), found
        locally, never on the network; checked against the text embeddings of ``config``."""
        raise NotImplementedError

    def default_trim_config(self, config):
        """Where trimmers go when a recipe says nothing (a TrimConfig)."""
        raise NotImplementedError

    def default_preprocess(self, config) -> dict:
        """The ``preprocess`` dict for a model built in code (no source directory to read it from)."""
        raise NotImplementedError

    def build(self, backbone_config: dict, trim_config: dict | None = None):
        """Rebuild a model (random weights) from the config stored in a model directory."""
        from ..trim.config import TrimConfig

        model = self.Model(self.Config.from_dict(backbone_config))
        if trim_config is not None:
            model.attach_trimmers(TrimConfig.from_dict(trim_config))
        return model

    def image_tokens(self, config) -> int:
        """Image tokens of one input as the trimmers see them (summaries): ViT patches + [CLS] by default."""
        return config.n_patches + 1

    def dummy_batch(self, model, text_len=None, batch: int = 1) -> dict:
        """A zero image and ``text_len`` text tokens (default ``max_text_len``) in the model's input layout:
        what ``smarttrim attach`` measures the full model's cost on. A decoder VLM adds its image placeholders."""
        c = model.config
        T = text_len or c.max_text_len
        b = {"pixel_values": torch.zeros(batch, 3, c.image_size, c.image_size),
             "input_ids": torch.full((batch, T), 5, dtype=torch.long),
             "attention_mask": torch.ones(batch, T, dtype=torch.long)}
        if c.task == "nlvr2":  # two images per input
            b["pixel_values2"] = torch.zeros(batch, 3, c.image_size, c.image_size)
        return b

    def export_graph(self, model):
        """What ``export --onnx`` writes: None for the whole trimmed model (export/onnx_export.TrimmedGraph:
        logits out); a wrapped decoder VLM returns ``{"kind": "image_side", "image_token_id": .., "image_tokens":
        ..}``: its image side only (export/image_graph.py: the model's ``trim_image`` and ``prompt_guide``), whose
        outputs the caller feeds to transformers' ``generate`` (export/image_prefill.py)."""
        return None

    @property
    def streams(self) -> dict:
        return self.Model.streams


def image_streams(model) -> tuple:
    """The model's image streams in forward order (``StreamSpec.image``): where kept image tokens are counted."""
    return tuple(n for n, s in model.streams.items() if s.image)

    def __repr__(self):
        return f"<family {self.name} ({self.style}): {', '.join(self.tasks)}>"


def check_keys(sd: dict, expected: dict, source, layout: str, ignore=lambda k: False, optional: tuple = ()) -> list[str]:
    """Compare a source's weight names with the model's (``expected``): a one-line error naming the first missing
    and unexpected keys. ``ignore``: source keys known to be unused; ``optional``: model key prefixes a source
    need not have (the trimmers, which attach adds). -> the ignored keys."""
    ignored = sorted(k for k in sd if k not in expected and ignore(k))
    unexpected = sorted(k for k in sd if k not in expected and not ignore(k))
    missing = sorted(k for k in expected if k not in sd and not (optional and k.startswith(optional)))
    if missing or unexpected:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                parts.append(f"{len(keys)} {what} key(s): {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}")
        raise SmartTrimError(f"{source}: does not match the {layout} layout: {'; '.join(parts)}")
    return ignored


def interpolate_positions(pos: torch.Tensor, new_grid: int, mode: str = "bicubic",
                          align_corners: bool = False) -> torch.Tensor:
    """ViT positional embeddings ((N, d) or (1, N, d), [CLS] row first) resampled on the patch grid to
    ``new_grid``², as the family's original code does it (``mode``, ``align_corners``); [CLS] kept."""
    p = pos[0] if pos.dim() == 3 else pos
    old = int(round((p.shape[0] - 1) ** 0.5))
    if old == new_grid:
        return pos
    grid = p[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode=mode, align_corners=align_corners)
    out = torch.cat([p[:1], grid.permute(0, 2, 3, 1).reshape(new_grid * new_grid, -1).to(pos.dtype)])
    return out.unsqueeze(0) if pos.dim() == 3 else out


@dataclass
class Stream:
    """A token stream during a forward: states, which slots hold real tokens, the soft-mode keep mask, original
    positions."""

    x: torch.Tensor
    valid: torch.Tensor          # (B, n) 1 = real token (hard: kept and not a batch-padding slot), 0 = padding
    pos: torch.Tensor            # (B, n) original positions
    n_full: torch.Tensor         # (B,) tokens the untrimmed model would process
    soft_keep: torch.Tensor | None  # (B, n) soft mode: cumulative straight-through keep mask (the layers' policy)
    all_valid: bool              # no padding anywhere: attention needs no additive mask
    n_orig: int = 0
    key_bias: torch.Tensor | None = None  # (B, n) extra additive key bias, e.g. log token sizes (ToMe)
    size: torch.Tensor | None = None      # (B, n) original tokens each slot stands for (token fusion only)
    reserved: int = 1            # leading tokens never dropped ([CLS]; LLaVA's tower: [CLS] and the first image token)

    @classmethod
    def start(cls, x, valid, mode: str, all_valid: bool):
        B, n = valid.shape
        pos = torch.arange(n, device=x.device).unsqueeze(0).expand(B, n)
        valid = valid.to(x.dtype)
        return cls(x, valid, pos, count(valid), valid if mode == "soft" else None, all_valid, n)

    def key_add(self):
        add = None if self.all_valid else pad_to_additive(self.valid, self.x.dtype)
        if self.key_bias is not None:  # proportional attention: ToMe (baselines/tome.py), token fusion (trim/fusion.py)
            add = self.key_bias.to(self.x.dtype) if add is None else add + self.key_bias.to(self.x.dtype)
        return add

    def count(self):
        return count(self.soft_keep if self.soft_keep is not None else self.valid)

    def kept_positions(self, keep=None) -> torch.Tensor:
        """Hard mode: the (B, n_orig) kept mask over the stream's original positions, for reports and overlays:
        of the live slots, or of ``keep`` (B, n) over the current slots (before a gather)."""
        kept = self.valid if keep is None else keep.to(self.valid.dtype) * self.valid
        return torch.zeros(self.valid.shape[0], self.n_orig, dtype=self.valid.dtype,
                           device=self.valid.device).scatter(1, self.pos, kept)

    def drop_padding(self):
        """Hard mode: remove padding tokens before any compute is spent on them."""
        self._gather(self.valid > 0)

    def _gather(self, keep):
        idx, _ = kept_order(keep)
        self.x = gather_rows(self.x, idx)
        self.valid = gather_rows(keep.to(self.x.dtype), idx)
        self.pos = gather_rows(self.pos, idx)
        if self.key_bias is not None:
            self.key_bias = gather_rows(self.key_bias, idx)
        if self.size is not None:
            self.size = gather_rows(self.size, idx)
        self.all_valid = self.x.shape[0] == 1  # batch of one: every gathered token is real


def _cls_kept(mask: torch.Tensor, n: int = 1) -> torch.Tensor:
    """Force the first ``n`` tokens ([CLS]) kept without in-place writes (autograd and export friendly). Kept
    always, they stay the first ``n`` slots after every gather, so hard and soft mode reserve the same tokens."""
    return torch.cat([torch.ones_like(mask[:, :n]), mask[:, n:]], dim=1)


class TrimmableModel(nn.Module):
    """Base of backbones: owns ``token_trimmers``/``head_trimmers``, their placement and the decision logic.

    A family's model declares ``streams`` (StreamSpec per stream), ``input_names``, ``pos_embedding`` (the
    state-dict key of its ViT positions, for ``at_resolution``) and implements ``forward`` (calling
    ``token_step``/``head_step`` at each position) and ``attention_weights``."""

    family = "base"
    streams: dict = {}
    input_names: tuple = ()
    pos_embedding: str = ""                   # state-dict key of the ViT positional embeddings
    pos_interpolation: tuple = ("bicubic", False)  # (mode, align_corners) of the original code's resampling

    def __init__(self):
        super().__init__()
        self.token_trimmers = nn.ModuleDict()
        self.head_trimmers = nn.ModuleDict()
        self.mode = "full"  # the execution mode a context defaults to (model_dir.load sets the one asked for)
        self.threshold = 0.5
        self.last_ctx: TrimContext | None = None

    # ----- structure (from ``streams``) -------------------------------------------------------------------
    def stream_layers(self) -> dict:
        return {s: int(getattr(self.config, spec.layers)) for s, spec in self.streams.items()}

    def attach_trimmers(self, trim):
        """Insert token and head trimmers where ``trim`` (a TrimConfig) says, replacing any already there;
        sized by ``streams``: width d, guide width dc, and the position's head count."""
        c = self.config
        trim.validate(self.stream_layers())
        for kind, table, allowed in (("token", trim.token_layers, lambda sp: sp.tokens),
                                     ("head", trim.head_layers, lambda sp: sp.heads is not None)):
            for stream, layers in table.items():
                sp = self.streams[stream]
                if layers and not allowed(sp):
                    where = ", ".join(s for s, x in self.streams.items() if allowed(x))
                    raise SmartTrimError(f"{self.family}: no {kind} trimmers on stream {stream}"
                                         f"{' (' + sp.note + ')' if sp.note else ''}; {kind} trimmers go on {where}")
        self.token_trimmers = nn.ModuleDict()
        self.head_trimmers = nn.ModuleDict()
        for stream, layers in trim.token_layers.items():
            sp = self.streams[stream]
            for i in layers:
                self.token_trimmers[f"{stream}_{i}"] = TokenTrimmer(getattr(c, sp.width), getattr(c, sp.guide),
                                                                   trim.reduction, trim.init_keep)
        for stream, layers in trim.head_layers.items():
            sp = self.streams[stream]
            for i in layers:
                for sub in sp.head_subs:
                    self.head_trimmers[f"{stream}_{i}{sub}"] = HeadTrimmer(
                        getattr(c, sp.width), getattr(c, sp.guide), getattr(c, sp.heads), trim.reduction,
                        trim.init_keep)
        self.trim_config = trim
        self.threshold = trim.threshold
        return self

    def backbone_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith(("token_trimmers.", "head_trimmers."))]

    def trimmer_parameters(self):
        return [p for n, p in self.named_parameters() if n.startswith(("token_trimmers.", "head_trimmers."))]

    def unused_parameters(self):
        """Parameters no forward ever reaches (the loop freezes them: DDP runs without find_unused_parameters)."""
        return []

    def lora_module(self):
        """The language model whose linear layers LoRA may adapt (training setting lora_rank > 0), or None: the
        family supports no LoRA."""
        return None

    def attention_weights(self, name: str, which: str = "self") -> AttnWeights:
        """q/k weights of the attention at position ``name`` (``<stream>_<i>``): ``self``, or ``cross``
        (the attention through which the stream reads the tokens of the stream it guides)."""
        raise SmartTrimError(f"{self.family}: attention weights of {name} are not available")

    def at_resolution(self, image_size: int):
        """The same model at another input resolution, sharing every weight except the ViT positions
        (resampled as the original code does); ``self`` at its own resolution."""
        c = self.config
        if image_size == c.image_size:
            return self
        if not self.pos_embedding:
            raise SmartTrimError(f"{self.family}: no positional embeddings to resample")
        if image_size < c.patch_size or image_size % c.patch_size:
            raise SmartTrimError(f"image size {image_size} is not a positive multiple of the patch size "
                                 f"{c.patch_size}")
        cfg = dataclasses.replace(c, extra=dict(c.extra))
        cfg.image_size = int(image_size)
        with torch.device("meta"):
            other = type(self)(cfg, self.trim_config)
        sd = dict(self.state_dict(keep_vars=True))
        key = self.pos_embedding
        sd[key] = nn.Parameter(interpolate_positions(sd[key].detach(), image_size // c.patch_size,
                                                     *self.pos_interpolation), requires_grad=False)
        other.load_state_dict(sd, strict=True, assign=True)
        other.threshold = self.threshold
        return other.train(self.training)

    def new_head(self, num_labels: int):
        """Replace the task head by a freshly initialised one with ``num_labels`` outputs (finetune --new-head)."""
        raise SmartTrimError(f"--new-head: not supported for {self.family}/{self.config.task}")

    # ----- decisions -------------------------------------------------------------------------------
    def token_step(self, name: str, s: Stream, c: torch.Tensor, ctx: TrimContext, key: str | None = None):
        """Apply the token trimmer ``name`` to stream s (in place). ``key`` names the decision record."""
        if ctx.mode == "full":
            return
        if ctx.policy is not None:  # a training-free rule instead of the learned trimmers (baselines/)
            return ctx.policy.token_step(self, name, s, c, ctx, "tok:" + (key or name))
        if name not in self.token_trimmers:
            return
        key = "tok:" + (key or name)
        tr = self.token_trimmers[name]
        alive = s.soft_keep if ctx.mode == "soft" else s.valid
        logits = tr(s.x, alive, c)
        ctx.add(LayerCost(key, "token_trimmer", tr.cost_dims(), n=count(alive), n_full=s.n_full))
        forced = ctx.forced.get(key) if ctx.forced else None
        # fusion: the decisions recorded (and forced) are the trimmer's, before the dropped tokens are merged
        fuse = self.trim_config.fuse
        if ctx.mode == "soft":
            if forced is not None:
                m = forced.to(s.x.dtype)
            elif ctx.keep_ratio is not None:
                m = keep_topk(logits, alive, ctx.keep_ratio, reserve_cls=False).to(s.x.dtype)
            else:
                m = st_keep(logits, ctx.tau, self.training, ctx.threshold, ctx.gumbel_noise(key, logits))
            before = alive.sum(1).clamp_min(1.0)
            kept = s.soft_keep * _cls_kept(m * s.valid, s.reserved)
            ctx.decisions[key] = kept.detach()
            self._soft_keep(s, alive, kept, logits, fuse, ctx, key)
            ctx.keep_fraction[key] = s.soft_keep.sum(1) / before
            ctx.keep_probs[key] = torch.sigmoid(logits.detach())
        else:
            if forced is not None:
                keep = forced.to(s.x.device).gather(1, s.pos) > 0.5
            elif ctx.keep_ratio is not None:
                keep = keep_topk(logits, s.valid, ctx.keep_ratio, reserve_cls=False)
            else:
                keep = above_threshold(logits, ctx.threshold)
            keep = _cls_kept(keep & (s.valid > 0), s.reserved)
            if ctx.record:
                ctx.decisions[key] = s.kept_positions(keep)
            if fuse:
                keep = self._fuse(s, s.valid, keep.to(s.x.dtype), logits, ctx, key) > 0.5
            s._gather(keep)

    def _fuse(self, s: Stream, alive, kept, logits, ctx: TrimContext | None = None, key: str = ""):
        """Merge the tokens this trimmer dropped (trim/fusion.py, by ``trim_config.fuse_mode``). -> kept, the
        merged slot included. The nearest-token rule's similarities are recorded as overhead in ``ctx``."""
        if s.size is None:
            s.size = torch.ones_like(alive)
        if self.trim_config.fuse_mode == "nearest":
            s.x, s.size, kept, macs = fuse_nearest(s.x, s.size, alive, kept, logits)
            if ctx is not None:
                ctx.add(LayerCost(f"{key}/fuse", "const", {"macs": 1}, n=macs, n_full=torch.zeros_like(macs)))
        else:
            s.x, s.size, kept = fuse_dropped(s.x, s.size, alive, kept, logits)
        s.key_bias = size_bias(s.size, s.x.dtype)
        return kept

    def _soft_keep(self, s: Stream, alive, kept, score, fuse: bool, ctx: TrimContext | None = None, key: str = ""):
        """Soft mode: the stream's keep mask becomes ``kept``, with the dropped tokens merged first if ``fuse``
        (shared by the learned trimmers and the fixed-ratio rules of baselines/)."""
        s.soft_keep = self._fuse(s, alive, kept, score, ctx, key) if fuse else kept

    def head_step(self, name: str, cls_own, cls_other, ctx: TrimContext, key: str | None = None):
        """-> (gate (B,h) or None, kept head indices or None, per-instance kept count or None)."""
        if ctx.mode == "full":
            return None, None, None
        if ctx.policy is not None:
            return ctx.policy.head_step(self, name, cls_own, cls_other, ctx, "head:" + (key or name))
        if name not in self.head_trimmers:
            return None, None, None
        key = "head:" + (key or name)
        ht = self.head_trimmers[name]
        logits = ht(cls_own, cls_other)
        B, H = logits.shape
        ctx.add(LayerCost(key, "head_trimmer", ht.cost_dims(),
                          n=torch.ones(B, device=logits.device), n_full=torch.ones(B, device=logits.device)))
        top = F.one_hot(logits.argmax(1), H).to(logits.dtype)  # at least one head always kept
        forced = ctx.forced.get(key) if ctx.forced else None
        if ctx.mode == "soft":
            g = forced.to(logits.dtype) if forced is not None else st_keep(logits, ctx.tau, self.training, ctx.threshold,
                                                                      ctx.gumbel_noise(key, logits))
            g = torch.maximum(g, top)
            ctx.decisions[key] = g.detach()
            return g, None, g.sum(1)
        keep = (forced > 0.5) if forced is not None else above_threshold(logits, ctx.threshold)
        keep = keep | top.bool()
        ctx.decisions[key] = keep
        idx = keep.any(0).nonzero().squeeze(1)
        gate = None if B == 1 else keep.index_select(1, idx).to(logits.dtype)
        return gate, idx, count(keep)

    # ----- API -------------------------------------------------------------------------------------
    def make_context(self, mode=None, threshold=None, record=False, forced=None, keep_ratio=None, tau=1.0,
                     policy=None):
        return TrimContext(mode=mode or self.mode, threshold=self.threshold if threshold is None else threshold,
                           record=record, forced=forced, keep_ratio=keep_ratio, tau=tau, policy=policy)

    def run(self, batch: dict, **ctx_kw):
        """Forward one collated batch; returns (logits, TrimContext with records and decisions)."""
        ctx = self.make_context(**ctx_kw)
        logits = self(**{k: batch[k] for k in self.input_names if k in batch}, ctx=ctx)
        return logits, ctx
