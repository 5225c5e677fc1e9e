"""Methods side by side on the same inputs: accuracy, per-input cost, kept image tokens, objects.

    ev = EvalSet.build(loaded, ds, limit=1000, batch_size=32)     # fixed validation inputs, collated once
    full = ev.evaluate("full", lambda b: model.run(b, mode="full", record=True))
    trim = ev.evaluate("smarttrim", lambda b: trimmed.run(b, mode="hard", record=True))
    rows = [full, trim]; table = markdown_table(rows, full)

Every method is run by the same code: ``run(batch) -> (logits, ctx)`` with cost records (hard mode for
trimming methods), per-input score (VQA score, 0-1), per-input MACs from the cost model (trim/cost.py,
fvcore's convention: equal to fvcore's count of the hard forward, tested), image tokens alive after the
last image-stream token decision, and the scene's object count when the folder has ``scenes_<split>.json``.
Batches are collated once (text padded to the batch's longest); the cost model counts each input's real
tokens, so the costs equal batch-1 costs.

One comparison for every caller: ``split_inputs`` (evaluated inputs and calibration inputs held apart),
``evaluate_baselines`` (each training-free baseline calibrated to a cost, then evaluated) and
``compare_models`` (reference, SmartTrim and the baselines on the same inputs, paired) serve
``smarttrim compare`` (profiling/compare_runner.py) and the demo's baselines stage; ``EvalSet`` and the
charts also ``benchmarks/pareto.py``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..backbones.base import image_streams
from ..errors import SmartTrimError
from ..trim.cost import total_macs
from . import objects as obj

# the training-free baselines compared by default (baselines/): inference rules that need no training run
DEFAULT_BASELINES = ("random", "evit", "evit-fusion", "tome", "static-heads", "downsample")

def image_tokens_final(ctx, streams) -> torch.Tensor:
    """(B,) image tokens ([CLS] included) alive after the last token decision on the model's image ``streams``
    (backbones/base.py ``image_streams``, forward order; first image for NLVR2); None when nothing was decided."""
    order = {s: i for i, s in enumerate(streams)}
    keys = []
    for k in ctx.decisions:
        stream, _, layer = k[len("tok:"):].rpartition("_")
        if k.startswith("tok:") and stream in order and layer.isdigit():
            keys.append((order[stream], int(layer), k))
    if not keys:
        return None
    return ctx.decisions[max(keys)[2]].float().sum(1).cpu()


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
    indices: list = field(default_factory=list)  # positions in the dataset
    image_streams: tuple = ()  # where kept image tokens are counted (the family contract)

    @classmethod
    def build(cls, loaded, ds, limit: int | None = None, batch_size: int = 32, start: int = 0) -> "EvalSet":
        """``loaded``: the model_dir.LoadedModel whose tokenizer and inputs the batches are for."""
        from ..data import collate

        max_len = loaded.max_text_len
        n = len(ds) - start if limit is None else min(len(ds) - start, int(limit))
        index = obj.SceneIndex.for_dataset(ds)
        batches, ids = [], []
        keep = set(loaded.model.input_names) | {"target"}
        for b0 in range(start, start + n, batch_size):
            items = [ds[i] for i in range(b0, min(start + n, b0 + batch_size))]
            b = collate(items, loaded.tokenizer, max_len)
            batches.append({k: v for k, v in b.items() if k in keep})
            ids += [it.get("question_id", it.get("identifier")) for it in items]
        objs = [index.objects(q) if index is not None else None for q in ids]
        kinds = [index.kind(q) if index is not None else None for q in ids]
        return cls(batches, ids, objs, int(loaded.model.config.n_patches + 1),
                   str(index.path) if index is not None else None, kinds=kinds, indices=list(range(start, start + n)),
                   image_streams=image_streams(loaded.model))

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

    def to(self, device) -> "EvalSet":
        """Move the collated batches to ``device`` (in place); returns self."""
        from ..data import batch_to_device

        self.batches = [batch_to_device(b, device) for b in self.batches]
        return self

    def evaluate(self, name: str, run, per_input: bool = False, gen=None, **info) -> dict:
        """Run every batch through ``run(batch) -> (logits, ctx)`` (ctx with cost records) and summarise.
        ``per_input``: the row also holds ``per_input`` = {score, gmacs, image_tokens} lists in input order
        (paired tests). ``gen(batch, **generate_kwargs)``: the method's generate, read by text models' sets only."""
        from ..metrics import score

        scores, macs, toks = [], [], []
        with torch.no_grad():
            for b in self.batches:
                logits, ctx = run(b)
                scores.append(score(logits.float(), b["target"]).cpu())
                macs.append(torch.as_tensor(total_macs(ctx.records), dtype=torch.float64).reshape(-1).cpu())
                t = image_tokens_final(ctx, self.image_streams)
                toks.append(t if t is not None else torch.full((logits.shape[0],), float(info.get(
                    "image_tokens", self.n_image_tokens))))
        s = torch.cat(scores).double().numpy()
        g = (torch.cat(macs) / 1e9).numpy()
        t = torch.cat(toks).double().numpy()
        row = summarize(name, s, g, t, self.objects, self.full_gmacs or None, self.n_image_tokens,
                        kinds=self.kinds, **info)
        if per_input:
            row["per_input"] = {"score": s.tolist(), "gmacs": g.tolist(), "image_tokens": t.tolist()}
        return row


def fixed_keep_cost(model, batches, keep_ratio: float, streams=None, n_full: int | None = None) -> dict:
    """What keeping ``keep_ratio`` of the tokens at each of the model's own token trimmers costs on ``batches``:
    each batch's hard forward with the trimmers at that fixed ratio (``TrimContext.keep_ratio``: top-k of the
    trimmer's scores, the trimmer's own cost counted, as a trained SmartTrim pays it) against its untrimmed
    forward, both by the cost model. Turns an image-token keep ratio into the GMACs target SmartTrim trains to.
    ``streams``: where kept image tokens are counted (default the family's image streams); ``n_full``: the
    untrimmed image-token count (default the family's). -> {keep_ratio, gmacs_ratio (ratio of the means, as
    ``summarize``'s), gmacs_mean, gmacs_full_mean, image_tokens_mean, image_tokens_full, n_inputs}."""
    from ..backbones import family_of
    from ..baselines.common import full_costs

    if not 0.0 < float(keep_ratio) <= 1.0:
        raise SmartTrimError(f"keep ratio must be in (0, 1], got {keep_ratio}")
    if not model.token_trimmers:
        raise SmartTrimError("fixed_keep_cost: the model has no token trimmers to run at a fixed ratio")
    streams = image_streams(model) if streams is None else tuple(streams)
    n_full = int(family_of(model).image_tokens(model.config) if n_full is None else n_full)
    batches = list(batches)
    full = [f.cpu() for f in full_costs(model, batches)]  # the denominators the baselines calibrate against
    trim, toks = [], []
    with torch.no_grad():
        for b in batches:
            _, ct = model.run(b, mode="hard", keep_ratio=float(keep_ratio), record=True)
            trim.append(torch.as_tensor(total_macs(ct.records), dtype=torch.float64).reshape(-1).cpu())
            t = image_tokens_final(ct, streams)
            toks.append(t.double() if t is not None else torch.full_like(trim[-1], float(n_full)))
    if not full:
        raise SmartTrimError("fixed_keep_cost: no inputs")
    f, t, k = torch.cat(full), torch.cat(trim), torch.cat(toks)
    return {"keep_ratio": float(keep_ratio), "gmacs_ratio": float(t.sum() / f.sum()),
            "gmacs_mean": float(t.mean()) / 1e9, "gmacs_full_mean": float(f.mean()) / 1e9,
            "image_tokens_mean": float(k.mean()), "image_tokens_full": n_full, "n_inputs": int(f.numel())}


def split_positions(size: int, limit: int | None, calib_limit: int, overlap_ok: bool = False) -> tuple:
    """(evaluated count, calibration start, calibration count) of split_inputs' rule over ``size`` inputs."""
    n = size if limit is None else min(size, int(limit))
    start, m = n, min(int(calib_limit), size - n)
    if m < int(calib_limit) and overlap_ok:
        start, m = 0, min(int(calib_limit), size)
    if m < 1:
        raise SmartTrimError(f"--limit {limit} takes all {size} inputs of the split: none is left to calibrate "
                             "the baselines on (--calib-limit); lower --limit")
    return n, start, m


def split_inputs(loaded, ds, limit: int | None, calib_limit: int, batch_size: int,
                 overlap_ok: bool = False) -> tuple[EvalSet, EvalSet]:
    """(evaluation set: the first ``limit`` inputs of ``ds`` — the ones ``profile --limit`` reads —, calibration
    set: the next ``calib_limit``). Held apart: when the split ends first the calibration set is shorter, and
    an error when nothing is left for it. ``overlap_ok`` keeps the benchmarks' older rule (calibrate on the
    first inputs when the split is too small), under which their published numbers were measured."""
    n, start, m = split_positions(len(ds), limit, calib_limit, overlap_ok)
    ev = EvalSet.build(loaded, ds, limit=n, batch_size=batch_size)
    cal = EvalSet.build(loaded, ds, limit=m, batch_size=batch_size, start=start)
    return ev, cal


def paired(a, b) -> dict:
    """Paired difference a - b of per-input scores (0-1, same inputs in the same order), in points:
    {margin, margin_se (standard error of the mean difference), wins, losses, ties, n}."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = d.size
    return {"margin": float(d.mean()) * 100 if n else None,
            "margin_se": float(d.std(ddof=1) / math.sqrt(n)) * 100 if n > 1 else None,
            "wins": int((d > 0).sum()), "losses": int((d < 0).sum()), "ties": int((d == 0).sum()), "n": int(n)}


def evaluate_baselines(base, ev, calib_batches, target_ratio, names=DEFAULT_BASELINES, tol: float = 0.02,
                       console=None, per_input: bool = False, on_row=None, label: str = "{name}",
                       factories: dict | None = None) -> list[dict]:
    """Each training-free baseline calibrated on ``calib_batches`` to ``target_ratio`` (one ratio or a list) of
    the base model's mean GMACs, then evaluated on ``ev``: rows with the calibration record, baseline by
    baseline and, within one, ratio by ratio. ``label``: the row name, formatted with ``name`` (the baseline's)
    and ``ratio``; ``factories``: {name: () -> Baseline} for rules outside the registry (benchmarks' analysis
    rules); ``on_row(row)`` is called after each row (progress, printing)."""
    from ..baselines import get_baseline

    ev.set_full_gmacs(base)
    targets = [target_ratio] if isinstance(target_ratio, (int, float)) else list(target_ratio)
    rows = []
    for name in names:
        for r in targets:
            bl = (factories or {}).get(name, lambda n=name: get_baseline(n))()
            bl.calibrate(base, calib_batches, r, tol=tol, strict=False)
            applied = bl.apply(base)
            info = {"family": name, "target_ratio": r, "calibration": bl.calibration, "params": bl.params()}
            if name == "downsample":
                info["image_tokens"] = int(applied.model.config.n_patches + 1)
            rows.append(ev.evaluate(label.format(name=bl.name, ratio=r), lambda b, a=applied: a.run(b, record=True),
                                    per_input=per_input, gen=getattr(applied, "generate", None), **info))
            if console is not None:
                row = rows[-1]
                console.print(f"  {row['name']}: {row['accuracy']:.2f}% at {row['gmacs_mean']:.4g} GMACs "
                              f"(ratio {row['gmacs_ratio']:.3f}, target {r:.3f})", highlight=False)
            if on_row is not None:
                on_row(rows[-1])
    return rows


def calibrate_tokens(bl, base, calib_batches, streams, n_full: int, target_tokens: float, iters: int = 16):
    """Bisection on a keep-ratio baseline's ratio until its mean kept image tokens over ``calib_batches`` is
    nearest ``target_tokens``; sets ``calibration`` = {target_tokens, tokens, param, evaluations, tolerance,
    reached}. Tolerance: half a token (a rule keeps a whole count per input, so a fractional mean is not hit)."""
    from ..baselines.common import bisect

    def f(r):
        bl.keep_ratio = r
        bl.reset()
        a = bl.apply(base)
        got = []
        with torch.no_grad():
            for b in calib_batches:
                n = image_tokens_final(a.run(b, record=True)[1], streams)
                got.append(n if n is not None else torch.full((b["input_ids"].shape[0],), float(n_full)))
        return float(torch.cat(got).mean())

    r, v, n = bisect(f, 0.0, 1.0, float(target_tokens), 0.5, iters)
    bl.keep_ratio = r
    bl.reset()
    bl.calibration = {"target_tokens": float(target_tokens), "tokens": v, "param": {"keep_ratio": r},
                      "evaluations": n, "tolerance": 0.5, "reached": abs(v - target_tokens) <= 0.5 + 1e-9}
    return bl


def evaluate_token_matched(base, ev, calib_batches, target_tokens: float, names, on_row=None) -> list[dict]:
    """The second view: each keep-ratio baseline calibrated on ``calib_batches`` to ``target_tokens`` mean kept
    image tokens (SmartTrim's), then evaluated on ``ev``; rules without a keep ratio are skipped."""
    from ..baselines import get_baseline

    rows = []
    for name in names:
        bl = get_baseline(name)
        if not hasattr(bl, "keep_ratio"):
            continue
        calibrate_tokens(bl, base, calib_batches, ev.image_streams, ev.n_image_tokens, target_tokens)
        a = bl.apply(base)
        rows.append(ev.evaluate(f"{bl.name} (tokens)", lambda b, a=a: a.run(b, record=True), per_input=True,
                                gen=a.generate, family=name, target_tokens=float(target_tokens),
                                calibration=bl.calibration, params=bl.params()))
        if on_row is not None:
            on_row(rows[-1])
    return rows


def compare_models(trimmed, base, ev: EvalSet, calib_batches, *, threshold: float | None = None,
                   thresholds=(), ratios=(), names=DEFAULT_BASELINES, target: float | None = None,
                   tol: float = 0.02, full_name: str = "full (reference)", smarttrim_info: dict | None = None,
                   console=None, on_row=None, token_matched: bool = False) -> dict:
    """The reference ``base`` at full capacity, SmartTrim (``trimmed`` in hard mode at ``threshold``, default its
    own, and at each of ``thresholds``) and the training-free baselines acting on ``base``, every method on
    the inputs of ``ev``. The baselines are calibrated on ``calib_batches`` to ``target`` (default SmartTrim's
    measured mean GMACs ratio on ``ev``: matched cost) and to each of ``ratios``. Each row keeps its per-input
    scores; each baseline row gets ``paired``: SmartTrim minus the baseline on the same inputs. ``on_row(row)``
    is called after each row. ``token_matched``: also each keep-ratio baseline at SmartTrim's mean kept image
    tokens (evaluate_token_matched; text models' second view).
    -> {target_ratio, full, smarttrim, sweep, baselines, target_tokens, token_matched}."""
    thr = float(trimmed.threshold if threshold is None else threshold)
    ev.set_full_gmacs(base)

    def step(row):
        if on_row is not None:
            on_row(row)

    full = ev.evaluate(full_name, lambda b: base.run(b, mode="full", record=True), per_input=True, family="full",
                       gen=lambda b, **kw: base.generate(b, mode="full", **kw))
    step(full)
    st = ev.evaluate("smarttrim", lambda b: trimmed.run(b, mode="hard", threshold=thr, record=True), per_input=True,
                     gen=lambda b, **kw: trimmed.generate(b, mode="hard", threshold=thr, **kw),
                     family="smarttrim", threshold=thr, **(smarttrim_info or {}))
    step(st)
    sweep = []
    for t in sorted({round(float(x), 6) for x in thresholds} - {round(thr, 6)}):
        sweep.append(ev.evaluate(f"smarttrim t={t:g}", lambda b, t=t: trimmed.run(b, mode="hard", threshold=t,
                                                                                  record=True),
                                 per_input=True, family="smarttrim", threshold=t,
                                 gen=lambda b, t=t, **kw: trimmed.generate(b, mode="hard", threshold=t, **kw)))
        step(sweep[-1])
    target = float(st["gmacs_ratio"] if target is None else target)
    targets = [target] + [float(r) for r in sorted(set(ratios), reverse=True) if abs(float(r) - target) > 1e-9]
    rows = evaluate_baselines(base, ev, calib_batches, targets, names, tol=tol, console=console, per_input=True,
                              on_row=on_row)
    tok = (evaluate_token_matched(base, ev, calib_batches, st["image_tokens_mean"], names, on_row=on_row)
           if token_matched else [])
    for r in rows + tok:
        r["paired"] = paired(st["per_input"]["score"], r["per_input"]["score"])
    return {"target_ratio": target, "full": full, "smarttrim": st, "sweep": sweep, "baselines": rows,
            "target_tokens": st["image_tokens_mean"] if token_matched else None, "token_matched": tok}


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


def methods_chart(path, rows: list[dict], full: dict, title: str = "", control: dict | None = None,
                  ylabel: str = "accuracy (VQA score, %)"):
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
    ax.set_ylabel(ylabel)
    ax.set_title(title or "Accuracy against mean GMACs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    return save_png(fig, path, dpi=110)
