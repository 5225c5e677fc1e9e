"""Methods side by side on the same inputs: accuracy, per-input cost, kept image tokens, objects.

    ev = EvalSet.build(model, ds, limit=1000, batch_size=32)      # fixed validation inputs, collated once
    full = ev.evaluate("full", lambda b: model.run(b, mode="full", record=True))
    trim = ev.evaluate("smarttrim", lambda b: trimmed.run(b, mode="hard", record=True))
    rows = [full, trim]; table = markdown_table(rows, full)

Every method is run by the same code: ``run(batch) -> (logits, ctx)`` with cost records (hard mode for
trimming methods), per-input score (VQA score, 0-1), per-input MACs from the cost model (trim/cost.py,
fvcore's convention: equal to fvcore's count of the hard forward, tested), image tokens alive after the
last image-stream token decision, and the scene's object count when the folder has ``scenes_<split>.json``.
Batches are collated once (text padded to the batch's longest); the cost model counts each input's real
tokens, so the costs equal batch-1 costs. Used by ``smarttrim demo`` (baselines stage) and
``benchmarks/pareto.py``.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from ..trim.cost import total_macs
from . import objects as obj

_IMAGE_TOKENS = re.compile(r"^tok:(vision|ximage)_(\d+)$")


def image_tokens_final(ctx, n_full: int) -> torch.Tensor:
    """(B,) image tokens ([CLS] included) alive after the last image-stream token decision of a hard
    forward (first image for NLVR2); ``n_full`` when nothing was decided."""
    keys = [k for k in ctx.decisions if _IMAGE_TOKENS.match(k)]
    if not keys:
        return None
    last = max(keys, key=lambda k: (0 if "vision" in k else 1, int(k.rsplit("_", 1)[1])))
    return ctx.decisions[last].float().sum(1).cpu()


@dataclass
class EvalSet:
    """Fixed inputs, collated once: ``batches`` (model inputs + target), ``ids`` (question ids),
    ``objects`` and ``kinds`` (per input: number of objects and question kind; None outside the scenes set)."""

    batches: list
    ids: list
    objects: list
    n_image_tokens: int
    scenes_source: str | None = None
    full_gmacs: list = field(default_factory=list)
    kinds: list = field(default_factory=list)

    @classmethod
    def build(cls, model, ds, limit: int | None = None, batch_size: int = 32, start: int = 0) -> "EvalSet":
        from ..data import collate

        pre = model.smarttrim_config.get("preprocess") or {}
        max_len = int(pre.get("max_text_len") or model.config.max_text_len)
        n = len(ds) - start if limit is None else min(len(ds) - start, int(limit))
        index = obj.SceneIndex.for_dataset(ds)
        batches, ids = [], []
        keep = set(model.input_names) | {"target"}
        for b0 in range(start, start + n, batch_size):
            items = [ds[i] for i in range(b0, min(start + n, b0 + batch_size))]
            b = collate(items, model.tokenizer, max_len)
            batches.append({k: v for k, v in b.items() if k in keep})
            ids += [it.get("question_id", it.get("identifier")) for it in items]
        objs = [index.objects(q) if index is not None else None for q in ids]
        kinds = [index.kind(q) if index is not None else None for q in ids]
        return cls(batches, ids, objs, int(model.config.n_patches + 1),
                   str(index.path) if index is not None else None, kinds=kinds)

    def __len__(self):
        return len(self.ids)

    def set_full_gmacs(self, model) -> list:
        """Per-input GMACs of ``model`` untrimmed (the denominators of every ratio); computed once."""
        if not self.full_gmacs:
            with torch.no_grad():
                for b in self.batches:
                    _, ctx = model.run(b, mode="full", record=True)
                    self.full_gmacs += (total_macs(ctx.records).double() / 1e9).reshape(-1).tolist()
        return self.full_gmacs

    def evaluate(self, name: str, run, **info) -> dict:
        """Run every batch through ``run(batch) -> (logits, ctx)`` (ctx with cost records) and summarise."""
        from ..train.losses import score

        scores, macs, toks = [], [], []
        with torch.no_grad():
            for b in self.batches:
                logits, ctx = run(b)
                scores.append(score(logits.float(), b["target"]).cpu())
                macs.append(torch.as_tensor(total_macs(ctx.records), dtype=torch.float64).reshape(-1).cpu())
                t = image_tokens_final(ctx, self.n_image_tokens)
                toks.append(t if t is not None else torch.full((logits.shape[0],), float(info.get(
                    "image_tokens", self.n_image_tokens))))
        s = torch.cat(scores).double().numpy()
        g = (torch.cat(macs) / 1e9).numpy()
        t = torch.cat(toks).double().numpy()
        return summarize(name, s, g, t, self.objects, self.full_gmacs or None, self.n_image_tokens,
                         kinds=self.kinds, **info)


def _q(a, p):
    return float(np.percentile(a, p)) if a.size else None


def summarize(name, scores, gmacs, tokens, objects, full_gmacs, n_image_tokens, kinds=None, **info) -> dict:
    """One method's row: accuracy (percent) with its standard error, mean GMACs and their spread over
    the inputs, the ratio to the full model, kept image tokens, and the per-object-count and (scenes)
    per-question-kind tables."""
    n = len(scores)
    acc = float(scores.mean()) * 100 if n else None
    se = float(scores.std(ddof=1) / math.sqrt(n)) * 100 if n > 1 else None
    fm = float(np.mean(full_gmacs)) if full_gmacs is not None else None
    row = {"name": name, "n": n, "accuracy": acc, "accuracy_se": se,
           "gmacs_mean": float(gmacs.mean()), "gmacs_std": float(gmacs.std()), "gmacs_p10": _q(gmacs, 10),
           "gmacs_p50": _q(gmacs, 50), "gmacs_p90": _q(gmacs, 90),
           "gmacs_ratio": (float(gmacs.mean()) / fm) if fm else None,
           "gmacs_reduction": (fm / float(gmacs.mean())) if fm else None,
           "image_tokens_mean": float(tokens.mean()), "image_tokens_full": n_image_tokens, **info}
    if any(o is not None for o in objects):
        objs = [o for o in objects]
        row["by_objects"] = obj.by_objects(objs, {"image_tokens_final": tokens.tolist(), "gmacs": gmacs.tolist(),
                                                  "score": scores.tolist()})
        have = [i for i, o in enumerate(objs) if o is not None]
        row["spearman_tokens_objects"] = obj.spearman([objs[i] for i in have], tokens[have])
        row["spearman_gmacs_objects"] = obj.spearman([objs[i] for i in have], gmacs[have])
        row["direction"] = obj.direction(row["spearman_tokens_objects"])
        first, last = row["by_objects"][0], row["by_objects"][-1]
        row["tokens_most_vs_fewest_objects"] = (last["image_tokens_final_mean"] / first["image_tokens_final_mean"]
                                                if first["image_tokens_final_mean"] else None)
    if kinds and any(k for k in kinds):
        row["by_kind"] = {k: {"n": int(m.sum()), "accuracy": float(scores[m].mean()) * 100,
                              "image_tokens_final_mean": float(tokens[m].mean())}
                          for k in sorted({k for k in kinds if k})
                          for m in [np.array([x == k for x in kinds])]}
    return row


# ----- tables and charts -----------------------------------------------------------------------------
def _f(x, fmt="{:.2f}"):
    return "–" if x is None else fmt.format(x)


def markdown_table(rows: list[dict], reference: dict | None = None, control: dict | None = None) -> str:
    """Markdown: one line per method (accuracy ± s.e., deltas to the reference and control, GMACs, spread)."""
    head = ["method", "target", "accuracy (%)", "Δ full", "Δ control", "mean GMACs", "GMACs p10–p90",
            "reduction", "image tokens", "tokens vs objects (ρ)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        d_ref = (r["accuracy"] - reference["accuracy"]) if reference and r["accuracy"] is not None else None
        d_ctl = (r["accuracy"] - control["accuracy"]) if control and r["accuracy"] is not None else None
        tgt = r.get("target_ratio")
        lines.append("| " + " | ".join([
            r["name"], "–" if tgt is None else f"{1 / tgt:.1f}×",
            f"{_f(r['accuracy'])} ± {_f(r['accuracy_se'])}", _f(d_ref, "{:+.2f}"), _f(d_ctl, "{:+.2f}"),
            _f(r["gmacs_mean"], "{:.4f}"), f"{_f(r['gmacs_p10'], '{:.4f}')}–{_f(r['gmacs_p90'], '{:.4f}')}",
            _f(r.get("gmacs_reduction"), "{:.2f}×"), _f(r["image_tokens_mean"], "{:.1f}"),
            _f(r.get("spearman_tokens_objects"), "{:+.2f}")]) + " |")
    return "\n".join(lines)


def methods_chart(path, rows: list[dict], full: dict, title: str = "", control: dict | None = None):
    """Accuracy against mean GMACs: one marker/colour per method family, points of a family joined in
    cost order; the full model (and the equal-steps control) as stars."""
    from .plots import pyplot, save_png

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    fams: dict[str, list[dict]] = {}
    for r in rows:
        fams.setdefault(r.get("family", r["name"]), []).append(r)
    markers = "os^vD<>phX*"
    for i, (fam, pts) in enumerate(fams.items()):
        pts = sorted(pts, key=lambda p: p["gmacs_mean"])
        lw = 2.5 if fam.lower().startswith("smarttrim") else 1.2
        ax.plot([p["gmacs_mean"] for p in pts], [p["accuracy"] for p in pts], marker=markers[i % len(markers)],
                lw=lw, label=fam, zorder=3 if lw > 2 else 2)
    ax.scatter([full["gmacs_mean"]], [full["accuracy"]], marker="*", s=220, color="black", zorder=5,
               label=f"{full['name']} ({full['accuracy']:.1f})")
    if control is not None:
        ax.scatter([control["gmacs_mean"]], [control["accuracy"]], marker="*", s=220, color="#c44e52", zorder=5,
                   label=f"{control['name']} ({control['accuracy']:.1f})")
    ax.set_xlabel("mean GMACs per input (cost model, fvcore convention: 1 multiply-add = 1)")
    ax.set_ylabel("accuracy (VQA score, %)")
    ax.set_title(title or "Accuracy against mean GMACs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    return save_png(fig, path, dpi=110)
