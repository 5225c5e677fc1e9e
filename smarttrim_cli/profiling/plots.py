"""PNG charts of a profile (matplotlib, Agg backend): the FLOPs histogram of the paper's Figure 1,
kept tokens/heads per layer, and the accuracy/FLOPs Pareto chart of a threshold sweep; ``pyplot`` and
``save_png`` for every chart of the package."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..atomic import atomic_path

STREAM_COLORS = {"text": "#1f77b4", "vision": "#d62728", "xtext": "#2ca02c", "ximage": "#ff7f0e", "joint": "#9467bd"}


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path, dpi: int = 120) -> Path:
    """Write ``fig`` to ``path`` atomically and close it."""
    plt = pyplot()
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def flops_histogram(path, trimmed_gmacs: Sequence[float], full_gmacs: Sequence[float], title: str = "",
                    convention: str = "fvcore MACs") -> Path:
    """Per-input GMACs of the trimmed model, with the full model's cost marked (Figure 1)."""
    import numpy as np

    plt = pyplot()
    t = np.asarray(trimmed_gmacs, dtype=float)
    f = np.asarray(full_gmacs, dtype=float)
    fig, ax = plt.subplots(figsize=(7, 4))
    lo = min(t.min(), f.min()) if t.size and f.size else 0.0
    hi = max(t.max(), f.max()) if t.size and f.size else 1.0
    span = max(hi - lo, 1e-9)
    bins = np.linspace(lo - 0.02 * span, hi + 0.02 * span, 41)
    ax.hist(t, bins=bins, color="#4c72b0", alpha=0.85, label=f"trimmed (n={t.size}, mean {t.mean():.3g})")
    fm = float(f.mean()) if f.size else 0.0
    ax.axvline(fm, color="#c44e52", ls="--", lw=2, label=f"full model ({fm:.3g})")
    if f.size and f.max() - f.min() > 1e-3 * max(fm, 1e-12):  # full cost varies with text length
        ax.axvspan(f.min(), f.max(), color="#c44e52", alpha=0.12, label="full model, range over inputs")
    ax.set_xlabel(f"GMACs per input ({convention})")
    ax.set_ylabel("inputs")
    ax.set_title(title or "Per-input cost of the trimmed model")
    ax.legend(loc="best", fontsize=8)
    return save_png(fig, path)


def layers_chart(path, layers: Sequence[dict], title: str = "") -> Path:
    """Mean kept share of tokens and of heads per layer, in forward order, one colour per stream.

    ``layers``: rows of report["layers"] (name, stream, tokens_kept_frac, heads_kept_frac, ...)."""
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(max(7, 0.28 * len(layers) + 2), 6), sharex=True)
    x = list(range(len(layers)))
    colors = [STREAM_COLORS.get(r["stream"], "#777777") for r in layers]
    a1.bar(x, [r["tokens_kept_frac"] * 100 for r in layers], color=colors)
    a1.set_ylabel("tokens kept (%)")
    a1.set_ylim(0, 105)
    trimmed = [i for i, r in enumerate(layers) if r["heads_kept_frac"] is not None]
    untouched = [i for i, r in enumerate(layers) if r["heads_kept_frac"] is None]
    a2.bar(trimmed, [layers[i]["heads_kept_frac"] * 100 for i in trimmed], color=[colors[i] for i in trimmed])
    a2.bar(untouched, [100] * len(untouched), color=[colors[i] for i in untouched], alpha=0.2)  # no head trimmer
    for xi, r in zip(x, layers):
        if r.get("cross_heads_kept_frac") is not None:
            a2.plot([xi - 0.4, xi + 0.4], [r["cross_heads_kept_frac"] * 100] * 2, color="black", lw=1.5)
    a2.set_ylabel("heads kept (%)")
    a2.set_ylim(0, 105)
    a2.set_xticks(x)
    a2.set_xticklabels([r["name"] for r in layers], rotation=90, fontsize=7)
    from matplotlib.patches import Patch
    from matplotlib.lines import Line2D

    seen = []
    for r in layers:
        if r["stream"] not in seen:
            seen.append(r["stream"])
    handles = [Patch(color=STREAM_COLORS.get(s, "#777777"), label=s) for s in seen]
    handles.append(Line2D([0], [0], color="black", lw=1.5, label="cross-attention heads"))
    a1.legend(handles=handles, fontsize=7, ncol=len(handles), loc="lower center", bbox_to_anchor=(0.5, 1.0),
              frameon=False)
    fig.suptitle(title or "What the trimmer kept, per layer (mean over inputs)")
    return save_png(fig, path)


def threshold_sweep_chart(path, points: Sequence[dict], full: dict, metric: str, title: str = "") -> Path:
    """Score against mean GMACs for each threshold of a sweep; the Pareto front joined; the full
    model marked. ``points``: {"threshold", "gmacs_mean", "score"}; ``full``: {"gmacs_mean", "score"}."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    pts = sorted(points, key=lambda p: p["gmacs_mean"])
    xs = [p["gmacs_mean"] for p in pts]
    ys = [p["score"] for p in pts]
    ax.scatter(xs, ys, color="#4c72b0", zorder=3, label="trimmed, by threshold")
    for p in pts:
        ax.annotate(f"{p['threshold']:g}", (p["gmacs_mean"], p["score"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    front, best = [], float("-inf")
    for p in pts:  # cheapest first: a point is on the front if it scores better than every cheaper one
        if p["score"] > best:
            front.append(p)
            best = p["score"]
    ax.plot([p["gmacs_mean"] for p in front], [p["score"] for p in front], color="#4c72b0", lw=1.5,
            label="Pareto front")
    ax.scatter([full["gmacs_mean"]], [full["score"]], marker="*", s=160, color="#c44e52", zorder=4,
               label="full model")
    ax.set_xlabel("mean GMACs per input (cost model, fvcore convention)")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(title or "Accuracy / FLOPs trade-off of the runtime keep threshold")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return save_png(fig, path)
