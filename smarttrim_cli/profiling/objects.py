"""Where the trimmer spends compute, per number of objects in the image (synthetic scenes).

The scenes set (``smarttrim_cli/data/scenes.py``) is written in the VQAv2 layout with one extra file
per split, ``scenes_<split>.json``, that lists each image's objects and each question's kind. When the
profiled dataset folder has that file, ``smarttrim profile`` adds:

* ``per_input[].objects``: the number of objects in the input's image (null for other datasets);
* ``objects`` in report.json: per object count, the mean kept image tokens and GMACs of the trimmed
  model (and the full model's), scores, plus Spearman's rank correlation between objects and kept
  tokens / GMACs and a plain verdict (``direction``);
* ``objects.png``: kept image tokens and GMACs against the number of objects (box per count, means
  joined), so a user sees whether the trimmer spends compute where it is needed;
* ``objects_show.png``: one input per object count with the patches the trimmer dropped greyed out.

The same summaries serve the side-by-side comparisons (``smarttrim demo`` baselines, benchmarks/pareto.py)
through :func:`by_objects` and :func:`lines_chart`.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from .plots import pyplot, save_png


# ----- the scene index -------------------------------------------------------------------------------
class SceneIndex:
    """question_id -> (number of objects, question kind) from a ``scenes_<split>.json``."""

    def __init__(self, path: Path, by_question: dict[int, tuple[int, str]], by_image: dict[int, int]):
        self.path, self.by_question, self.by_image = Path(path), by_question, by_image

    @classmethod
    def load(cls, path) -> "SceneIndex":
        from ..errors import SmartTrimError

        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            by_q, by_img = {}, {}
            for sc in data["scenes"]:
                n = int(sc["n_objects"])
                by_img[int(sc["image_id"])] = n
                for q in sc.get("questions", []):
                    by_q[int(q["question_id"])] = (n, str(q.get("kind", "")))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SmartTrimError(f"{path}: not a scenes file ({type(e).__name__}: {e})") from None
        return cls(path, by_q, by_img)

    @classmethod
    def for_dataset(cls, ds) -> "SceneIndex | None":
        """The index of a dataset reader whose folder holds ``scenes_<split>.json`` (VQAv2 layout), else None."""
        path = scenes_file(getattr(ds, "data_dir", None), getattr(ds, "split", None))
        return cls.load(path) if path is not None else None

    def objects(self, question_id) -> int | None:
        hit = self.by_question.get(_int(question_id))
        return None if hit is None else hit[0]

    def kind(self, question_id) -> str | None:
        hit = self.by_question.get(_int(question_id))
        return None if hit is None else hit[1]


def _int(x):
    try:
        return int(x)
    except (TypeError, ValueError):
        return None


def scenes_file(data_dir, split) -> Path | None:
    """``<data_dir>/scenes_<split>.json`` for a split given as ``val`` or ``val2014`` (None if absent)."""
    if data_dir is None or split is None:
        return None
    short = re.sub(r"\d{4}$", "", str(split))
    p = Path(data_dir) / f"scenes_{short}.json"
    return p if p.is_file() else None


# ----- statistics ------------------------------------------------------------------------------------
def _ranks(a: np.ndarray) -> np.ndarray:
    order = np.argsort(a, kind="stable")
    r = np.empty(len(a), dtype=np.float64)
    r[order] = np.arange(len(a), dtype=np.float64)
    for v in np.unique(a):  # ties share their mean rank
        m = a == v
        if m.sum() > 1:
            r[m] = r[m].mean()
    return r


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (ties averaged); None when either side is constant or n < 3."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    rx, ry = _ranks(x), _ranks(y)
    return float(np.corrcoef(rx, ry)[0, 1])


def direction(rho: float | None, threshold: float = 0.1) -> str:
    if rho is None:
        return "flat (no variation)"
    if rho > threshold:
        return "more on crowded images"
    if rho < -threshold:
        return "fewer on crowded images"
    return "flat"


def by_objects(objects: Sequence, values: dict[str, Sequence]) -> list[dict]:
    """Rows per object count: {"objects", "n", "<key>_mean", "<key>_std" for each series in ``values``}.
    Inputs whose object count is None are left out."""
    objs = np.asarray([-1 if o is None else int(o) for o in objects])
    out = []
    for k in sorted(set(objs.tolist()) - {-1}):
        m = objs == k
        row = {"objects": int(k), "n": int(m.sum())}
        for key, vals in values.items():
            v = np.asarray([np.nan if x is None else float(x) for x in vals], dtype=np.float64)[m]
            v = v[~np.isnan(v)]
            row[f"{key}_mean"] = float(v.mean()) if v.size else None
            row[f"{key}_std"] = float(v.std()) if v.size else None
        out.append(row)
    return out


def annotate(rows: list[dict], index: SceneIndex | None) -> None:
    """Set ``objects`` (and keep ``id`` as the question id) on every per-input row; None without an index."""
    for r in rows:
        r["objects"] = index.objects(r.get("id")) if index is not None else None


def summary(rows: list[dict], index: SceneIndex, image_tokens_full: int, gmacs_key: str = "gmacs_trimmed",
            full_key: str = "gmacs_full") -> dict:
    """The report's ``objects`` field (see the module docstring)."""
    have = [r for r in rows if r.get("objects") is not None]
    objs = [r["objects"] for r in have]
    tok = [r["image_tokens_final"] for r in have]
    g = [r[gmacs_key] for r in have]
    gf = [r[full_key] for r in have]
    series = {"image_tokens_final": tok, "gmacs_trimmed": g, "gmacs_full": gf,
              "score_full": [r.get("score_full") for r in have], "score_trimmed": [r.get("score_trimmed") for r in have]}
    table = by_objects(objs, series)
    for row in table:
        row["kept_frac_mean"] = (row["image_tokens_final_mean"] / image_tokens_full
                                 if row["image_tokens_final_mean"] is not None else None)
        row["gmacs_ratio_mean"] = (row["gmacs_trimmed_mean"] / row["gmacs_full_mean"]
                                   if row["gmacs_full_mean"] else None)
    kinds = {}
    for r in have:
        k = index.kind(r.get("id")) or "?"
        kinds.setdefault(k, []).append(r)
    by_kind = [{"kind": k, "n": len(v), "image_tokens_final_mean": float(np.mean([r["image_tokens_final"] for r in v])),
                "gmacs_trimmed_mean": float(np.mean([r[gmacs_key] for r in v])),
                "score_trimmed": (float(np.mean([r["score_trimmed"] for r in v])) * 100
                                  if all(r.get("score_trimmed") is not None for r in v) else None)}
               for k, v in sorted(kinds.items())]
    rho_t, rho_g = spearman(objs, tok), spearman(objs, g)
    slope = None
    if len(set(objs)) > 1:
        slope = float(np.polyfit(np.asarray(objs, float), np.asarray(tok, float), 1)[0])
    return {"source": str(index.path), "n_inputs": len(have), "n_unmatched": len(rows) - len(have),
            "image_tokens_full": int(image_tokens_full), "gmacs_source": gmacs_key,
            "spearman_tokens": rho_t, "spearman_gmacs": rho_g, "tokens_per_object": slope,
            "direction": direction(rho_t), "by_objects": table, "by_kind": by_kind}


# ----- plots -----------------------------------------------------------------------------------------
def objects_chart(path, rows: list[dict], image_tokens_full: int, gmacs_key: str = "gmacs_trimmed",
                  full_key: str = "gmacs_full", title: str = "") -> Path:
    """Two panels against the number of objects: kept image tokens and GMACs per input (box per count,
    means joined; the full model dashed)."""
    plt = pyplot()
    have = [r for r in rows if r.get("objects") is not None]
    ks = sorted({r["objects"] for r in have})
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, full, lab in ((a1, "image_tokens_final", None, "image tokens kept after the last trimmer"),
                               (a2, gmacs_key, full_key, "GMACs per input")):
        data = [[r[key] for r in have if r["objects"] == k] for k in ks]
        if ks:
            ax.boxplot(data, positions=ks, widths=0.5, showfliers=False)
            ax.plot(ks, [float(np.mean(d)) for d in data], "o-", color="#4c72b0", label="trimmed (mean)")
        if full is None:
            ax.axhline(image_tokens_full, color="#c44e52", ls="--", label=f"full model ({image_tokens_full})")
        elif have:
            fm = float(np.mean([r[full] for r in have]))
            ax.axhline(fm, color="#c44e52", ls="--", label=f"full model ({fm:.3g})")
        ax.set_xlabel("objects in the image")
        ax.set_ylabel(lab)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    rho = spearman([r["objects"] for r in have], [r["image_tokens_final"] for r in have])
    fig.suptitle(title or ("Compute against scene complexity"
                           + (f" (Spearman rho, tokens vs objects: {rho:+.2f})" if rho is not None else "")))
    return save_png(fig, path, dpi=110)


def lines_chart(path, series: dict[str, list[dict]], key: str = "image_tokens_final_mean",
                ylabel: str = "image tokens kept (mean)", full_value: float | None = None, title: str = "") -> Path:
    """One line per method: ``series[name]`` = rows of :func:`by_objects`; y = ``row[key]``."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rows in series.items():
        rows = [r for r in rows if r.get(key) is not None]
        ax.plot([r["objects"] for r in rows], [r[key] for r in rows], "o-", label=name, lw=1.5)
    if full_value is not None:
        ax.axhline(full_value, color="black", ls="--", lw=1, label="full model")
    ax.set_xlabel("objects in the image")
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best", ncol=2)
    ax.set_title(title or "Kept image tokens against the number of objects")
    return save_png(fig, path, dpi=110)


def montage(path, examples: list[dict], title: str = "") -> Path:
    """One column per example: the image with the patches dropped by the last image-stream trimmer greyed
    out. ``examples``: {"image": (H, W, 3) in [0, 1], "keep": kept mask over the patch grid (N,) or None
    (nothing trimmed), "label": caption}."""
    from .overlays import _shade

    plt = pyplot()
    n = max(1, len(examples))
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 3.0), squeeze=False)
    for ax, ex in zip(axes[0], examples):
        img = ex["image"]
        keep = ex.get("keep")
        if keep is not None:
            grid = int(round(math.sqrt(keep.size)))
            img = _shade(img, keep, grid)
        ax.imshow(np.clip(img, 0, 1), interpolation="nearest")
        ax.set_title(ex.get("label", ""), fontsize=8)
        ax.axis("off")
    for ax in axes[0][len(examples):]:
        ax.axis("off")
    fig.suptitle(title or "Kept patches (dropped ones greyed) by number of objects", fontsize=10)
    return save_png(fig, path, dpi=110)


def pick_examples(rows: list[dict], per_count: int = 1) -> list[int]:
    """Row indices: the first ``per_count`` inputs of each object count (ascending count)."""
    seen: dict[int, int] = {}
    out = []
    for i, r in enumerate(rows):
        k = r.get("objects")
        if k is None or seen.get(k, 0) >= per_count:
            continue
        seen[k] = seen.get(k, 0) + 1
        out.append(i)
    return sorted(out, key=lambda i: (rows[i]["objects"], i))


def last_image_keep(decisions: dict) -> np.ndarray | None:
    """Kept mask over the patch grid after the last image-stream token trimmer of a hard forward (batch 1)."""
    from .overlays import image_panels

    panels = image_panels(decisions)
    return panels[-1][1] if panels else None


def write_outputs(report: dict, out_dir, model, ds, make_batch, threshold: float, pre: dict, show: bool) -> dict:
    """The profile's object files: ``objects.png`` (always, when report["objects"] is set) and, when
    ``show``, ``objects_show.png`` (one input per object count, hard forward at ``threshold``).
    ``make_batch(item)`` -> a batch of one for ``model``. -> {"objects": path|None, "objects_show": path|None}."""
    import torch

    files = {"objects": None, "objects_show": None}
    summ = report.get("objects")
    if not summ:
        return files
    out_dir = Path(out_dir)
    rows = report["per_input"]
    st = report["settings"]
    files["objects"] = str(objects_chart(
        out_dir / "objects.png", rows, summ["image_tokens_full"],
        title=(f"{Path(st['model_dir']).name} on {st['dataset']}/{st['split']}: compute against objects "
               f"(Spearman rho tokens {_fmt(summ['spearman_tokens'])}, GMACs {_fmt(summ['spearman_gmacs'])})")))
    if show:
        from .overlays import denormalize

        from ..preprocess import CLIP_MEAN, CLIP_STD  # directories from before `preprocess` was recorded

        mean = pre.get("mean") or list(CLIP_MEAN)
        std = pre.get("std") or list(CLIP_STD)
        examples = []
        with torch.no_grad():
            for i in pick_examples(rows):
                item = ds[rows[i]["index"]]
                batch = make_batch(item)
                _, ctx = model.run({k: batch[k] for k in model.input_names if k in batch}, mode="hard",
                                   threshold=threshold, record=True)
                keep = last_image_keep({k: v.cpu() for k, v in ctx.decisions.items()})
                kept = int(keep.sum()) if keep is not None else None
                n_patch = keep.size if keep is not None else report["model"]["image_tokens"] - 1
                examples.append({"image": denormalize(item["image"], mean, std), "keep": keep,
                                 "label": f"{rows[i]['objects']} object{'s' if rows[i]['objects'] != 1 else ''}: "
                                          f"{kept if kept is not None else n_patch}/{n_patch} patches\n"
                                          f"{item['text'][:34]}"})
        if examples:
            files["objects_show"] = str(montage(out_dir / "objects_show.png", examples))
    return files


def _fmt(x):
    return "n/a" if x is None else f"{x:+.2f}"
