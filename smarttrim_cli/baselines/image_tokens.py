"""What the decoder-VLM image-token baselines share (pool, visionzip, divprune, dart, fastv; random works as is).

Each one decides, per input, which projected image tokens enter the language model, at the model's token
positions (LLaVA: ``image_0``, after the projector). The decision goes in exactly as a forced decision does
(backbones/base.py ``token_step``): a (B, N) keep mask over the stream's tokens, the family's rule keeping token 0,
then the same hard-mode gather, so positions, left-packing, batching and cost records are those SmartTrim's
trimmer gets; no trimmer runs (its cost is not counted). For the rules that only select,
``model.run(batch, mode="hard", forced=ctx.decisions)`` gives the same logits (tested). Two rules also replace
kept tokens' states (``substitute``, on the stream before the gather, which the family then feeds to the LM as it
does any kept feature): ``pool`` (window means) and ``visionzip`` (contextual tokens); forced decisions cannot
express that, so their forced run differs.

Count: ``k = ceil(r * N)`` tokens per input (at least 1; ``pool``: g^2 for its g x g windows), token 0 among
them (the family keeps it anyway, so it takes one of the k places, as ``keep_topk(reserve_cls=True)`` does for
the other baselines). Rules that need more than the projected features (VisionZip: the vision tower's attention,
FastV: the language model's) compute it per batch in ``prepare`` before the run; ``ImageApplied.run`` /
``.generate`` call it (those passes repeat the tower, whose second run is not counted). Hard mode only.

    bl = get_baseline("divprune").calibrate(model, batches, 0.5)   # keep ratio for half the prefill GMACs
    logits, ctx = bl.apply(model).run(batch, record=True)           # ctx.decisions["tok:image_0"]: (B, N)
    new_ids = bl.apply(model).generate(batch, max_new_tokens=32)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..backbones.base import _cls_kept, image_streams
from ..errors import SmartTrimError
from .common import Applied, Policy, RatioBaseline, add_overhead, token_positions


def n_keep(ratio: float, n: int) -> int:
    """Image tokens kept of ``n`` at keep ratio ``ratio`` (token 0 included)."""
    return max(1, min(n, math.ceil(ratio * n - 1e-6)))


def top_k(score: torch.Tensor, k: int) -> torch.Tensor:
    """(B, n) bool: token 0 and the k - 1 best-scoring others (ties: the earlier token, so deterministic)."""
    s = torch.cat([torch.full_like(score[:, :1], float("inf")), score[:, 1:].float()], dim=1)
    rank = s.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
    return rank < k


def image_positions(model, layers=None) -> list[str]:
    """Where the rules act: ``layers``, default the model's token positions on its last image stream (backbones/
    base.py ``image_streams``, forward order): where the projected image tokens enter the language model (LLaVA's
    ``image_0``, not the positions of its opt-in trimmers inside the vision tower)."""
    names = token_positions(model, layers)
    streams = image_streams(model)
    if layers is None and streams:
        names = [n for n in names if n.rsplit("_", 1)[0] == streams[-1]]
    return names


def per_input(ctx, s, name: str, macs) -> None:
    """Record the same overhead MACs for every input of the stream's batch (on its device)."""
    add_overhead(ctx, name, torch.full((s.x.shape[0],), float(macs), device=s.x.device))


def wrapped(model, what: str):
    """The transformers model a wrapped family keeps (``model.hf``); rules reading its towers need one."""
    hf = getattr(model, "hf", None)
    if hf is None or not hasattr(hf, "model"):
        raise SmartTrimError(f"{what}: needs a wrapped decoder VLM (a transformers model as ``model.hf`` with a vision "
                             "tower and a language model)")
    return hf


class _Captured(Exception):
    pass


def layer_input(layer: torch.nn.Module, call):
    """Run ``call()`` only until ``layer`` is entered; -> (args, kwargs) of that call (the rest is not run)."""
    got = {}

    def hook(mod, args, kwargs):
        got["a"], got["k"] = args, kwargs
        raise _Captured

    h = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        call()
    except _Captured:
        pass
    finally:
        h.remove()
    if not got:
        raise SmartTrimError("baseline: the layer it reads was never run")
    return got["a"], got["k"]


class ImagePolicy(Policy):
    """Keep ``select``'s tokens at the positions ``names``; ``substitute`` may replace kept tokens' states."""

    what = "image-tokens"

    def __init__(self, names, keep_ratio: float):
        self.names, self.keep_ratio = set(names), float(keep_ratio)

    def prepare(self, model, batch: dict):
        """Per-batch signals the rule needs beyond the stream (none by default)."""

    def prepared(self, s, what: str):
        """A signal ``prepare`` stored for this batch, used once (a stale one from another batch cannot be)."""
        v = self.__dict__.pop(what, None)
        if v is None or v.shape[0] != s.x.shape[0]:
            raise SmartTrimError(f"{type(self).__name__}: run it through apply(model).run/generate (prepare(model, "
                                 "batch) reads the batch first)")
        return v.to(s.x.device)

    def select(self, model, s, k: int, ctx, key) -> torch.Tensor:
        raise NotImplementedError

    def substitute(self, model, s, keep):
        """Change kept tokens' states before the gather (average pooling); nothing by default."""

    def token_step(self, model, name, s, c, ctx, key):
        if name not in self.names:
            return
        if ctx.mode != "hard":
            raise SmartTrimError(f"{type(self).__name__}: image-token baselines run in hard mode")
        if not bool((s.valid > 0).all()):
            raise SmartTrimError(f"{type(self).__name__}: expects every image token live at {name} (first position)")
        k = n_keep(self.keep_ratio, s.x.shape[1])
        keep = self.select(model, s, k, ctx, key)
        keep = _cls_kept(keep & (s.valid > 0))  # the forced-decision rule of token_step: token 0 kept
        self.substitute(model, s, keep)
        if ctx.record:
            ctx.decisions[key] = s.kept_positions(keep)
        s._gather(keep)


@dataclass
class ImageApplied(Applied):
    """``Applied`` whose run first lets the policy read the batch (``prepare``); also ``generate``."""

    def run(self, batch: dict, mode: str = "hard", **kw):
        self.kwargs["policy"].prepare(self.model, batch)
        return super().run(batch, mode=mode, **kw)

    def generate(self, batch: dict, **kw):
        self.kwargs["policy"].prepare(self.model, batch)
        return self.model.generate(batch, mode="hard", policy=self.kwargs["policy"], **kw)


class ImageBaseline(RatioBaseline):
    """An image-token baseline at one keep ratio; ``calibrate`` (RatioBaseline's bisection) tunes it."""

    Policy = ImagePolicy

    def policy_kwargs(self) -> dict:
        return {}

    def policy(self, model):
        return self.Policy(image_positions(model, self.layers), self.keep_ratio, **self.policy_kwargs())

    def apply(self, model) -> Applied:
        return ImageApplied(model, {"policy": self.policy(model)}, baseline=self)
