"""Static head pruning: the same attention heads dropped for every input, chosen by importance.

Importance of a head = the mean, over calibration batches, of how much the model's prediction moves
when that head alone is removed (label-free, by the head's output kind: binary KL summed over answers
for a sigmoid head such as VQA's, KL of the softmax for class logits and ranked answers, squared
change of a retrieval score), measured with hard-mode forwards that slice the head out (one forward per head and position: cheap on a GPU, minutes for
METER-base on a CPU). Heads are then dropped in increasing order of importance across all positions
(Michel et al., 2019), keeping at least one per position, and ``calibrate`` bisects on how many are
dropped to match a mean GMACs ratio. Positions: the model's head-trimmer layers (or ``layers``).
Head pruning alone only reaches the attention part of the cost (about a third of a layer), so
low targets are out of its range; ``calibrate`` says so.

NB METER's text tower only consults head decisions when it has text trimmers (its cross-modal
context is computed for them), so text-tower positions are inert without them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import SmartTrimError
from .common import Applied, Baseline, Policy, bisect, full_costs, head_positions, measure


class StaticHeadPolicy(Policy):
    """Keep the heads ``keep[position]`` (a list of indices) of ``n_heads[position]`` for every input."""

    def __init__(self, keep: dict, n_heads: dict):
        self.keep = {k: torch.as_tensor(sorted(v), dtype=torch.long) for k, v in keep.items()}
        self.n_heads = dict(n_heads)

    def head_step(self, model, name, cls_own, cls_other, ctx, key):
        idx = self.keep.get(name)
        if idx is None:
            return None, None, None
        B, H = cls_own.shape[0], self.n_heads[name]
        idx = idx.to(cls_own.device)
        mask = torch.zeros(B, H, device=cls_own.device, dtype=cls_own.dtype).index_fill(1, idx, 1.0)
        if ctx.mode == "soft":
            ctx.decisions[key] = mask
            return mask, None, mask.sum(1)
        ctx.decisions[key] = mask > 0
        return None, idx, torch.full((B,), float(idx.numel()), device=cls_own.device)


def divergence(kind: str, ref: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Per-instance change of the prediction (B,) (label-free), as used for head importance; ``kind`` is the
    head's output kind (backbones/base.py OUTPUT_KINDS)."""
    ref, out = ref.float(), out.float()
    if kind == "multilabel":
        p = torch.sigmoid(ref)
        return (p * (F.logsigmoid(ref) - F.logsigmoid(out))
                + (1 - p) * (F.logsigmoid(-ref) - F.logsigmoid(-out))).sum(-1)
    if kind == "score":
        return (ref - out).pow(2).sum(-1)
    return (F.softmax(ref, -1) * (F.log_softmax(ref, -1) - F.log_softmax(out, -1))).sum(-1)


def head_importance(model, batches, positions: dict[str, int]) -> dict[str, list[float]]:
    """{position: [importance of each head]} = mean prediction change when that head alone is removed.
    Positions the forward never consults (see the module note) are left out."""
    from ..backbones import family_of

    kind = family_of(model).tasks[model.config.task]
    n = 0
    with torch.no_grad():
        if batches:
            _, ctx = model.run(batches[0], mode="hard", policy=StaticHeadPolicy(
                {p: list(range(H)) for p, H in positions.items()}, positions))
            seen = {k.split(":", 1)[1].split("/")[-1] for k in ctx.decisions if k.startswith("head:")}
            positions = {p: H for p, H in positions.items() if p in seen}
        imp = {p: [0.0] * H for p, H in positions.items()}
        for b in batches:
            ref, _ = model.run(b, mode="full")
            n += ref.shape[0]
            for p, H in positions.items():
                for h in range(H):
                    policy = StaticHeadPolicy({p: [j for j in range(H) if j != h]}, positions)
                    out, _ = model.run(b, mode="hard", policy=policy)
                    imp[p][h] += float(divergence(kind, ref, out).sum())
    return {p: [v / max(n, 1) for v in vals] for p, vals in imp.items()}


def drop_order(importance: dict[str, list[float]]) -> list[tuple[str, int]]:
    """(position, head) pairs from least to most important, never the last head of a position."""
    pairs = sorted(((v, p, h) for p, vals in importance.items() for h, v in enumerate(vals)))
    left = {p: len(v) for p, v in importance.items()}
    order = []
    for _, p, h in pairs:
        if left[p] > 1:
            left[p] -= 1
            order.append((p, h))
    return order


class StaticHeads(Baseline):
    name = "static-heads"
    kind = "head"

    def __init__(self, n_drop: int = 0, layers=None, importance: dict | None = None, drop_ratio: float | None = None):
        """``n_drop``: heads dropped (first ones in the importance order); ``drop_ratio``: the same as a
        fraction of the droppable heads. Importance comes from ``calibrate`` or ``estimate``."""
        super().__init__()
        self.n_drop, self.drop_ratio = int(n_drop), drop_ratio
        self.layers, self.importance = layers, importance

    def params(self) -> dict:
        return {"n_drop": self.n_drop, "layers": self.layers, "dropped": self.dropped_heads()}

    def estimate(self, model, batches):
        self.importance = head_importance(model, list(batches), head_positions(model, self.layers))
        return self

    def dropped_heads(self) -> dict[str, list[int]]:
        if self.importance is None:
            return {}
        order = drop_order(self.importance)
        n = self.n_drop if self.drop_ratio is None else round(self.drop_ratio * len(order))
        out: dict[str, list[int]] = {}
        for p, h in order[:n]:
            out.setdefault(p, []).append(h)
        return {p: sorted(v) for p, v in out.items()}

    def policy(self, model) -> StaticHeadPolicy:
        if self.importance is None and (self.n_drop or self.drop_ratio):
            raise SmartTrimError("static-heads: head importance unknown: call calibrate(model, batches, target) "
                                 "or estimate(model, batches) first")
        n_heads = {p: len(v) for p, v in (self.importance or {}).items()}
        keep = {p: [h for h in range(n_heads[p]) if h not in dropped] for p, dropped in self.dropped_heads().items()}
        return StaticHeadPolicy(keep, n_heads)

    def apply(self, model) -> Applied:
        return Applied(model, {"policy": self.policy(model)}, baseline=self)

    def calibrate(self, model, batches, target_macs_ratio: float, tol: float = 0.02, strict: bool = True,
                  iters: int = 24):
        batches = list(batches)
        if self.importance is None:
            self.estimate(model, batches)
        full = full_costs(model, batches)
        self.drop_ratio = None
        n_max = len(drop_order(self.importance))

        def f(k):  # ratio is non-increasing in k; bisect on -k to reuse the non-decreasing search
            self.n_drop = n_max - k
            return measure(model, self, batches, full)["ratio"]

        k, v, n = bisect(f, 0, n_max, float(target_macs_ratio), tol, iters, integer=True)
        lo_hi = (f(0), f(n_max)) if abs(v - target_macs_ratio) > tol else (None, None)
        self.n_drop = n_max - k
        return self._calibrated(target_macs_ratio, v, {"n_drop": self.n_drop, "of": n_max}, n, tol, strict, lo_hi)
