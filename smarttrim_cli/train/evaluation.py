"""Validation: the task score and the per-input FLOPs ratio of what inference runs (hard mode, the rule's
decisions), gathered over ranks; and the end-of-run keep threshold of the learned trimmers."""
from __future__ import annotations

import math

import torch

from ..data import batch_to_device
from ..trim.cost import macs_ratio, total_macs
from . import distributed as D
from .batches import check_batch
from .objectives import SoftTargetClassification


@torch.no_grad()
def evaluate(model, loader, info: D.DistInfo, amp_ctx, objective=None, **run) -> dict:
    """Task score and per-input FLOPs ratio over this rank's shard of ``loader``, gathered over ranks. ``run``:
    the ``model.run`` keywords (a rule's ``run_kwargs``: hard mode at a threshold or under a policy; ``mode="full"``
    for the untrimmed model, ratio 1). ``objective``: how a batch is scored (default: classification)."""
    objective = objective or SoftTargetClassification(False)
    trimmed = run.get("mode", "hard") != "full"
    was = model.training
    model.eval()
    scores, ratios, macs = [], [], []
    for batch in loader:
        batch = objective.eval_batch(batch_to_device(check_batch(batch), info.device))
        with amp_ctx():
            s, ctx = objective.validate(model, batch, run)
        scores += s.tolist()
        ratios += (macs_ratio(ctx.records) if trimmed else torch.ones(len(s))).tolist()
        macs += total_macs(ctx.records).tolist()
    model.train(was)
    parts = D.gather_objects(info, (scores, ratios, macs))
    s = torch.tensor([x for p in parts for x in p[0]], dtype=torch.float64)
    r = torch.tensor([x for p in parts for x in p[1]], dtype=torch.float64)
    g = torch.tensor([x for p in parts for x in p[2]], dtype=torch.float64)
    if not len(s):
        return {"n": 0}
    q = torch.quantile(r, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
    return {"n": len(s), "score": float(s.mean()), "ratio_mean": float(r.mean()),
            "ratio_std": float(r.std(unbiased=False)), "ratio_p10": q[0], "ratio_median": q[1], "ratio_p90": q[2],
            "ratio_min": float(r.min()), "ratio_max": float(r.max()), "gmacs_mean": float(g.mean()) / 1e9}


def calibrate_threshold(model, loader, info: D.DistInfo, target: float, amp_ctx, tolerance: float = 0.0,
                        iters: int = 10, objective=None):
    """The keep threshold inference runs at: the trained one (``model.threshold``, where the Gumbel
    decisions were trained) when its mean ratio on ``loader``'s inputs is within ``tolerance`` of the
    target; otherwise the lowest higher threshold (fewer tokens) whose mean ratio is <= target, by
    bisection in logit space. It never lowers the threshold: moving it off the trained point in either
    direction shifts the decisions the backbone learnt to work with (measured on easy-VQA: lowering it to
    spend a 0.30 run's budget up to 0.33 cost 0.8 points; raising it from 0.23 to 0.22 cost 7.6).
    -> (threshold, its evaluation on the loader)."""
    def ev(t):
        return evaluate(model, loader, info, amp_ctx, objective, mode="hard", threshold=t)

    t0 = float(model.threshold)
    res0 = ev(t0)
    if res0["ratio_mean"] <= target + tolerance:
        return t0, res0
    thr = lambda z: float(torch.sigmoid(torch.tensor(z)))  # noqa: E731
    lo, hi = math.log(t0 / (1 - t0)), 8.0   # threshold = sigmoid(z)
    res_hi = ev(thr(hi))
    best = (thr(hi), res_hi)
    if res_hi["ratio_mean"] > target:
        return best  # even the highest threshold keeps too much: the closest we can get
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        res = ev(thr(mid))
        if res["ratio_mean"] <= target:
            hi, best = mid, (thr(mid), res)
        else:
            lo = mid
    return best
