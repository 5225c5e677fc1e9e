"""What every trimmable backbone shares: the per-mode decision steps and the inference API."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nn.attention import pad_to_additive
from ..trim.context import LayerCost, TrimContext, count
from ..trim.fusion import fuse_dropped, fuse_nearest, size_bias
from ..trim.gather import gather_rows, kept_order
from ..trim.gumbel import above_threshold, st_keep
from ..trim.topk import keep_topk


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


def _cls_kept(mask: torch.Tensor) -> torch.Tensor:
    """Force token 0 ([CLS]) kept without in-place writes (autograd and export friendly)."""
    return torch.cat([torch.ones_like(mask[:, :1]), mask[:, 1:]], dim=1)


class TrimmableModel(nn.Module):
    """Base of backbones: owns ``token_trimmers``/``head_trimmers`` and the decision logic."""

    family = "base"

    def __init__(self):
        super().__init__()
        self.token_trimmers = nn.ModuleDict()
        self.head_trimmers = nn.ModuleDict()
        self.mode = "full"
        self.threshold = 0.5
        self.last_ctx: TrimContext | None = None

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
            kept = s.soft_keep * _cls_kept(m * s.valid)
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
            keep = _cls_kept(keep & (s.valid > 0))
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
