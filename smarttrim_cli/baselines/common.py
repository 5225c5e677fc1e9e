"""What the baselines share: the policy protocol, where they act, how they are run and calibrated.

A baseline is a training-free rule applied at the token-trimmer (or head-trimmer) positions of a
model built on the trimmable core. It plugs in through ``TrimContext.policy`` (backbones/base.py):
``token_step``/``head_step`` hand every decision to the policy object instead of the learned
trimmers. ``Baseline.apply(model)`` returns an :class:`Applied` such that

    applied.model.run(applied.prepare(batch), mode="hard", **applied.kwargs)   # == applied.run(batch)

runs the baseline; for every baseline except ``downsample``, ``applied.model is model`` and
``applied.prepare`` is the identity, so ``model.run(batch, mode="hard", **applied.kwargs)`` works.

Costs follow trim/cost.py's (fvcore's) convention. What a rule computes beyond the backbone (EViT's
[CLS]-attention scores, ToMe's similarities) is recorded as ``const`` LayerCost rows named
``<key>/<what>`` whose ``n`` holds the per-instance MACs and whose full-model cost is 0, so
``total_macs`` still equals fvcore's count of the hard forward (tested).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..backbones.base import AttnWeights
from ..errors import SmartTrimError
from ..trim.context import LayerCost, count
from ..trim.cost import total_macs
from ..trim.topk import keep_topk


# ----- where baselines act (the family's streams, backbones/base.py StreamSpec) -----------------------
def _trim_config(model):
    if model.trim_config is not None:
        return model.trim_config
    from ..backbones import family_of

    return family_of(model).default_trim_config(model.config)


def token_positions(model, layers=None) -> list[str]:
    """Token-pruning positions as ``<stream>_<layer>`` names: ``layers`` (a {stream: [i, ...]} dict,
    a spec string "vision=1,3 ximage=0", or a list of names), default the model's token-trimmer layers."""
    if layers is None:
        layers = _trim_config(model).token_layers
    if isinstance(layers, str):
        from ..trim.config import parse_layer_spec
        layers = parse_layer_spec(layers, "baseline layers")
    if isinstance(layers, dict):
        n = model.stream_layers()
        names = []
        for stream, idx in layers.items():
            if stream not in n:
                raise SmartTrimError(f"baseline layers: unknown stream {stream!r} (this backbone has {', '.join(n)})")
            bad = [i for i in idx if not 0 <= int(i) < n[stream]]
            if bad:
                raise SmartTrimError(f"baseline layers: {bad} out of range for stream {stream!r} (0..{n[stream] - 1})")
            names += [f"{stream}_{int(i)}" for i in idx]
        return names
    return [str(x) for x in layers]


def head_positions(model, layers=None) -> dict[str, int]:
    """Head-pruning positions -> number of heads. Cross-modal layers have two (``_self``, ``_cross``).
    ``layers``: {stream: [i, ...]}; default the model's head-trimmer layers."""
    if layers is None:
        layers = _trim_config(model).head_layers
    c = model.config
    out = {}
    for stream, idx in layers.items():
        sp = model.streams.get(stream)
        if sp is None or sp.heads is None:
            where = ", ".join(s for s, x in model.streams.items() if x.heads is not None)
            raise SmartTrimError(f"baseline head layers: no heads on stream {stream!r} (this backbone has them on "
                                 f"{where})")
        H = int(getattr(c, sp.heads))
        for i in idx:
            for sub in sp.head_subs:
                out[f"{stream}_{int(i)}{sub}"] = H
    return out


# ----- attention weights of a position (the family's ``attention_weights``) ------------------------------
def attention_weights(model, name: str, which: str = "self") -> AttnWeights:
    """q/k weights of the attention at position ``name`` (``vision_3``, ``xtext_0``, ...). ``which``:
    ``self``, or ``cross`` (the attention through which a stream reads the stream it guides)."""
    return model.attention_weights(name, which)


def reader_position(model, name: str) -> str | None:
    """The position whose cross-attention reads the tokens at ``name`` (``ximage_2`` -> ``xtext_2``), or
    None where no stream reads them (StreamSpec.read_by)."""
    stream, i = name.rsplit("_", 1)
    sp = model.streams.get(stream)
    return f"{sp.read_by}_{i}" if sp is not None and sp.read_by else None


def key_weights(model, name: str) -> AttnWeights:
    """The attention whose keys the tokens at ``name`` become: their own self-attention, or, for tokens
    that only are read (BLIP's image tokens in the text encoder), the reader's cross-attention."""
    sp = model.streams.get(name.rsplit("_", 1)[0])
    if sp is not None and not sp.self_attention:
        return attention_weights(model, reader_position(model, name), "cross")
    return attention_weights(model, name, "self")


# ----- cost bookkeeping --------------------------------------------------------------------------------
def add_overhead(ctx, name: str, macs) -> None:
    """Record work a baseline adds (per-instance MACs, (B,)); the untrimmed model does none of it."""
    if ctx.record:
        macs = torch.as_tensor(macs, dtype=torch.float32)
        ctx.add(LayerCost(name, "const", {"macs": 1}, n=macs, n_full=torch.zeros_like(macs)))


def record_tokens(s, ctx, key, keep=None) -> None:
    """The kept mask over the stream's original positions (hard mode), as the learned trimmer records it:
    of the gathered stream, or ``keep`` (B, n) over the stream's current slots (before a gather)."""
    if ctx.record:
        ctx.decisions[key] = s.kept_positions(keep)


class Policy:
    """Base policy: changes nothing (every token and head kept, no learned trimmer runs)."""

    def token_step(self, model, name, s, c, ctx, key):
        return None

    def head_step(self, model, name, cls_own, cls_other, ctx, key):
        return None, None, None


class TokenPolicy(Policy):
    """Score-and-keep rules (random, EViT): keep ceil(r * live) tokens at each position, [CLS] kept.

    Works in hard mode (kept tokens gathered) and in soft mode (masks, shapes fixed) unless the rule
    changes token states (fusion), which only hard mode can express."""

    soft_ok = True

    def __init__(self, names, keep_ratio: float, merge: bool = False):
        self.names = set(names)
        self.keep_ratio = float(keep_ratio)
        # merge: the learned trimmers' token fusion (trim/fusion.py; soft and hard), so that a fine-tuned
        # fixed-ratio rule can be compared with a fused SmartTrim on equal terms
        self.merge = bool(merge)

    def score(self, model, name, s, alive, c, ctx, key) -> torch.Tensor:
        raise NotImplementedError

    def fuse(self, model, name, s, keep, score, ctx):
        return keep

    def token_step(self, model, name, s, c, ctx, key):
        self.observe(model, name, s, c, ctx, key)
        if name not in self.names or self.keep_ratio >= 1.0:
            return
        if ctx.mode == "soft":
            if not self.soft_ok:
                raise SmartTrimError(f"{type(self).__name__}: this baseline changes token states; run it in hard mode")
            alive = s.soft_keep
            score = self.score(model, name, s, alive, c, ctx, key)
            keep = keep_topk(score, alive, self.keep_ratio)
            m = torch.cat([torch.ones_like(s.valid[:, :1]), (keep.to(s.x.dtype) * s.valid)[:, 1:]], dim=1)
            kept = s.soft_keep * m
            ctx.decisions[key] = kept.detach()  # with merge, as for the learned trimmers: before the fusion
            model._soft_keep(s, alive, kept, score, self.merge, ctx, key)
            return
        score = self.score(model, name, s, s.valid, c, ctx, key)
        keep = keep_topk(score, s.valid, self.keep_ratio)
        if self.merge:
            record_tokens(s, ctx, key, keep)
            keep = model._fuse(s, s.valid, keep.to(s.x.dtype) * s.valid, score, ctx, key) > 0.5
            s._gather(keep)
            return
        keep = self.fuse(model, name, s, keep, score, ctx)
        s._gather(keep)
        record_tokens(s, ctx, key)

    def observe(self, model, name, s, c, ctx, key):
        """Called at every token position (pruning or not), before any decision."""


# ----- running and calibrating --------------------------------------------------------------------------
def _identity(batch):
    return batch


@dataclass
class Applied:
    """A baseline ready to run: ``model.run(prepare(batch), mode="hard", **kwargs)``."""

    model: object
    kwargs: dict
    prepare: Callable = _identity
    baseline: object = None

    def run(self, batch: dict, mode: str = "hard", **kw):
        return self.model.run(self.prepare(batch), mode=mode, **{**self.kwargs, **kw})

    def generate(self, batch: dict, **kw):
        """Text models: the model's ``generate`` under the same rule (hard mode)."""
        return self.model.generate(self.prepare(batch), mode="hard", **{**self.kwargs, **kw})


def full_costs(model, batches) -> list[torch.Tensor]:
    """Per-batch (B,) MACs of the untrimmed model (the denominators of every ratio)."""
    out = []
    with torch.no_grad():
        for b in batches:
            _, ctx = model.run(b, mode="full", record=True)
            out.append(torch.as_tensor(total_macs(ctx.records), dtype=torch.float64).reshape(-1))
    return out


def measure(model, baseline, batches, full=None) -> dict:
    """Mean GMACs of the baseline's hard forward over ``batches`` and its ratio to the full model's
    (ratio of the means: sum trimmed / sum full)."""
    full = full if full is not None else full_costs(model, batches)
    applied = baseline.apply(model)
    got = []
    with torch.no_grad():
        for b in batches:
            _, ctx = applied.run(b, record=True)
            got.append(torch.as_tensor(total_macs(ctx.records), dtype=torch.float64).reshape(-1))
    t, f = torch.cat(got), torch.cat(full)
    return {"ratio": float(t.sum() / f.sum()), "gmacs": float(t.mean()) / 1e9, "gmacs_full": float(f.mean()) / 1e9,
            "n_inputs": int(t.numel())}


def bisect(f, lo: float, hi: float, target: float, tol: float, iters: int = 24, integer: bool = False):
    """Find x in [lo, hi] whose f(x) (non-decreasing in x) is nearest ``target``; stops early when
    within tol / 4. -> (x, f(x), evaluations)."""
    cache = {}

    def ev(x):
        if x not in cache:
            cache[x] = f(x)
        return cache[x]

    best = min(((x, ev(x)) for x in (lo, hi)), key=lambda p: abs(p[1] - target))
    a, b = lo, hi
    for _ in range(iters):
        if abs(best[1] - target) <= tol / 4:
            break
        if integer and b - a <= 1:
            break
        m = (a + b) // 2 if integer else (a + b) / 2
        v = ev(m)
        if abs(v - target) < abs(best[1] - target):
            best = (m, v)
        if v < target:
            a = m
        else:
            b = m
    return best[0], best[1], len(cache)


class Baseline:
    """A training-free baseline: ``apply`` to run it, ``calibrate`` to match a mean GMACs ratio."""

    name = "baseline"
    kind = "token"

    def __init__(self):
        self.calibration: dict = {}

    def apply(self, model) -> Applied:
        raise NotImplementedError

    def params(self) -> dict:
        return {}

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "params": self.params(), "calibration": self.calibration}

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.params().items())})"

    def _calibrated(self, target, value, param, evals, tol, strict, lo_hi):
        ok = abs(value - target) <= tol
        self.calibration = {"target": float(target), "ratio": float(value), "param": param, "evaluations": evals,
                            "tolerance": float(tol), "reached": ok}
        if not ok and strict:
            raise SmartTrimError(f"{self.name}: cannot reach a mean GMACs ratio of {target:.3f} (reachable "
                                 f"{lo_hi[0]:.3f}..{lo_hi[1]:.3f}; nearest {value:.3f} at {param}); "
                                 "pick a target in range or pass strict=False")
        return self


class RatioBaseline(Baseline):
    """A token baseline parameterised by one keep ratio applied at every pruning position."""

    def __init__(self, keep_ratio: float = 0.5, layers=None):
        super().__init__()
        if not 0.0 <= float(keep_ratio) <= 1.0:
            raise SmartTrimError(f"{self.name}: keep ratio must be in [0, 1], got {keep_ratio}")
        self.keep_ratio = float(keep_ratio)
        self.layers = layers

    def params(self) -> dict:
        return {"keep_ratio": self.keep_ratio, "layers": self.layers}

    def policy(self, model) -> Policy:
        raise NotImplementedError

    def apply(self, model) -> Applied:
        return Applied(model, {"policy": self.policy(model)}, baseline=self)

    def reset(self):
        """Called before each calibration evaluation (random baselines reseed here)."""

    def calibrate(self, model, batches, target_macs_ratio: float, tol: float = 0.02, strict: bool = True,
                  iters: int = 24):
        """Bisection on the keep ratio until the mean GMACs ratio over ``batches`` is within ``tol``
        (absolute) of ``target_macs_ratio``; sets ``keep_ratio`` and ``calibration``. Returns self."""
        batches = list(batches)
        full = full_costs(model, batches)

        def f(r):
            self.keep_ratio = r
            self.reset()
            return measure(model, self, batches, full)["ratio"]

        r, v, n = bisect(f, 0.0, 1.0, float(target_macs_ratio), tol, iters)
        lo_hi = (f(0.0), f(1.0)) if abs(v - target_macs_ratio) > tol else (None, None)
        self.keep_ratio = r
        self.reset()
        return self._calibrated(target_macs_ratio, v, {"keep_ratio": r}, n, tol, strict, lo_hi)


def softmax_masked(scores: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim (keys) giving no weight to keys with alive == 0."""
    return scores.masked_fill(alive[:, None, None, :] <= 0, float("-inf")).softmax(-1)


def query_key_attention(h_q, q_alive, h_k, k_alive, w: AttnWeights):
    """Mean attention (over heads and live queries) that queries h_q (B,t,dq) pay to keys h_k (B,n,dk)
    under weights ``w``, computed as q·(W_k h) = (W_kᵀ q)·h: t·d·(dq + dk) + t·dk·H·n MACs instead of the
    n·dk·d of projecting every key. The key bias adds a per-query constant, which softmax ignores.
    -> (attention (B, n), per-instance MACs (B,))."""
    B, t, dq = h_q.shape
    n, dk = h_k.shape[1], h_k.shape[2]
    d = w.wq.shape[0]
    H = w.heads
    dh = d // H
    q = F.linear(h_q, w.wq, w.bq).view(B, t, H, dh).transpose(1, 2)            # (B,H,t,dh)
    u = torch.matmul(q, w.wk.reshape(H, dh, dk))                                # (B,H,t,dk)
    scores = torch.matmul(u, h_k.transpose(1, 2).unsqueeze(1)) / math.sqrt(dh)  # (B,H,t,n)
    p = softmax_masked(scores, k_alive).mean(1)                                 # (B,t,n)
    qa = q_alive.to(p.dtype)
    att = (p * qa.unsqueeze(-1)).sum(1) / qa.sum(1, keepdim=True).clamp_min(1.0)
    nt, nk = count(q_alive), count(k_alive)
    macs = nt * dq * d + nt * d * dk + nt * dk * H * nk
    return att, macs
