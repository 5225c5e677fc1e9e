"""Where a trained SmartTrim model spends and loses: the diagnostics behind BENCHMARKS.md sections 6-7.

Works on the `smarttrim demo --long` folders that benchmarks/pareto.py trains into.

    python benchmarks/trim_diagnostics.py decisions --dataset scenes --run trimmed
        share of heads kept per head position and mean image/text tokens kept per token position
        (hard mode, threshold 0.5, the first 256 validation inputs)
    python benchmarks/trim_diagnostics.py scores --dataset easyvqa [--run trimmed --ref evit-ft-r0.33]
        the same validation inputs pareto.py evaluates: RUN at threshold 0.5; RUN with a fixed per-input keep
        share on its own trimmer scores (0.3-0.45); RUN's and REF's backbones under training-free EViT (+fusion)
        calibrated to 0.33 (and, on a fused model, EViT with the same size-weighted fusion)
    python benchmarks/trim_diagnostics.py floor --dataset scenes --run RUN [--run RUN2 ...]
        the lowest mean GMACs ratio RUN's trimmer placement can reach: every trimmer at threshold 1 - 1e-6, so it
        drops every token and head it may (the first 256 validation inputs); below it no threshold goes
    python benchmarks/trim_diagnostics.py coverage --dataset scenes --run RUN [--ref EVIT_FT_RUN]
        scenes only: the share of the drawn objects whose centre patch is among the image tokens kept after
        the last image-stream trimmer (RUN at its saved threshold; REF, a fine-tuned EViT folder, at its keep
        ratio), by number of objects and question kind, on the same validation inputs
    python benchmarks/trim_diagnostics.py counting --dataset scenes --run RUN [--run RUN2 ...]
        scenes only: on the "how many objects" questions, predicted minus true count (histogram) of the base model
        at full capacity and of each RUN (a SmartTrim folder) at its saved threshold: over- or under-counting
    python benchmarks/trim_diagnostics.py thresholds --dataset scenes --run RUN --thresholds 0.5,0.47,0.4
        accuracy and mean GMACs ratio of RUN at each keep threshold on the validation inputs pareto.py evaluates:
        what lowering the threshold (spending more of the budget) buys; the thresholds are picked by hand on
        these same inputs, so an upper bound, not a calibrated setting
    python benchmarks/trim_diagnostics.py token-only --dataset easyvqa --target 0.33
        a SmartTrim fine-tune from the base with its head trimmers removed (token trimmers only), the demo's
        --long settings; writes <folder>/tokonly-r<target> and prints its final and calibrated validation

Prints; nothing is asserted or saved beside the model the token-only run trains.
"""
from __future__ import annotations

import argparse
import json

import torch


from smarttrim_cli.demo import DemoSettings, eval_data, prepare, trim_overrides
from smarttrim_cli.model_dir import load


def decisions(p, run: str):
    ev, _ = eval_data(p, load(p.base_dir, mode="hard"), 256, 8, 64)
    m = load(p.root / run, mode="hard").model
    m.threshold = m.trim_config.threshold = 0.5
    heads, tokens = {}, {}
    for b in ev.batches[:4]:
        _, ctx = m.run(b, mode="hard", record=True)
        for k, v in ctx.decisions.items():
            if k.startswith("head:"):
                heads.setdefault(k, []).append(v.float().mean().item())
            else:
                tokens.setdefault(k, []).append(v.float().sum(1).mean().item())
    print(f"{run}: share of heads kept", {k: round(sum(v) / len(v), 3) for k, v in heads.items()})
    print(f"{run}: tokens kept (mean count)", {k: round(sum(v) / len(v), 1) for k, v in tokens.items()})


def scores(p, run: str, ref: str, limit: int):
    from smarttrim_cli.baselines import get_baseline

    loaded_base = load(p.base_dir, mode="hard")
    base = loaded_base.model
    ev, cal = eval_data(p, loaded_base, limit, 128, 64)
    ev.set_full_gmacs(base)

    def show(row):
        print(f"{row['name']:42s} {row['accuracy']:6.2f}%  ratio {row['gmacs_ratio']:.3f}  "
              f"image tokens {row['image_tokens_mean']:.1f}", flush=True)

    m = load(p.root / run, mode="hard").model
    m.threshold = m.trim_config.threshold = 0.5
    show(ev.evaluate(f"{run} at threshold 0.5", lambda b: m.run(b, mode="hard", record=True)))
    for k in (0.3, 0.35, 0.4, 0.45):
        show(ev.evaluate(f"{run}, own scores, keep share {k}",
                         lambda b, k=k: m.run(b, mode="hard", record=True, keep_ratio=k)))
    for name, model in ((run, m), (ref, load(p.root / ref, mode="hard").model)):
        rules = [("evit", {}), ("evit-fusion", {})] + ([("evit", {"merge": True})] if model.trim_config.fuse else [])
        for rule, kw in rules:  # merge: the size-weighted token fusion the model was trained with (trim/fusion.py)
            a = get_baseline(rule, **kw).calibrate(model, cal, 0.33, tol=0.02, strict=False).apply(model)
            show(ev.evaluate(f"{name} backbone + {rule}{' (merge)' if kw else ''}", lambda b, a=a: a.run(b, record=True)))


def floor(p, runs: list[str]):
    from smarttrim_cli.train.rules import lowest_ratio
    from smarttrim_cli.trim.cost import macs_ratio

    ev, _ = eval_data(p, load(p.base_dir, mode="hard"), 256, 8, 64)
    for run in runs:
        m = load(p.root / run, mode="hard").model
        at_half = torch.cat([macs_ratio(m.run(b, mode="hard", threshold=0.5, record=True)[1].records)
                             for b in ev.batches]).mean().item()
        lowest = sum(lowest_ratio(m, b) * len(b["target"]) for b in ev.batches) / len(ev)
        print(f"{run}: GMACs ratio {at_half:.3f} at threshold 0.5, {lowest:.3f} with every droppable token and head "
              f"dropped (placement {m.trim_config.token_layers})")


def counting(p, runs: list[str], limit: int):
    from collections import Counter

    loaded_base = load(p.base_dir, mode="hard")
    ev, _ = eval_data(p, loaded_base, limit, 8, 64)
    scenes = _scenes(p)
    truth = {q["question_id"]: q["answer"] for sc in scenes["scenes"] for q in sc["questions"] if q["kind"] == "count_all"}
    for run in ["base"] + runs:
        lm = loaded_base if run == "base" else load(p.root / run, mode="hard")
        m = lm.model
        diff, i = Counter(), 0
        for b in ev.batches:
            pred = m.run(b, mode="full" if run == "base" else "hard")[0].argmax(-1).tolist()
            for j, k in enumerate(pred):
                ans = truth.get(ev.ids[i + j])
                if ans is not None:
                    label = lm.labels[k]
                    diff[int(label) - int(ans) if label.isdigit() else "not a number"] += 1
            i += len(pred)
        print(f"{run}: predicted - true count on {sum(diff.values())} count-all questions",
              dict(sorted(diff.items(), key=lambda kv: str(kv[0]))))


def thresholds(p, run: str, values: list[float], limit: int):
    loaded_base = load(p.base_dir, mode="hard")
    base = loaded_base.model
    ev, _ = eval_data(p, loaded_base, limit, 8, 64)
    ev.set_full_gmacs(base)
    m = load(p.root / run, mode="hard").model
    for t in values:
        m.threshold = m.trim_config.threshold = t
        r = ev.evaluate(run, lambda b: m.run(b, mode="hard", record=True))
        print(f"{run}: threshold {t:g}: accuracy {r['accuracy']:.2f}% at {r['gmacs_ratio']:.3f} of the full GMACs "
              f"({len(ev)} inputs)")


def coverage(p, run: str, ref: str | None, limit: int):
    from collections import defaultdict

    from smarttrim_cli.baselines.evit_finetuned import EViTFinetuned
    from smarttrim_cli.profiling.objects import last_image_keep

    loaded_base = load(p.base_dir, mode="hard")
    base = loaded_base.model
    ev, _ = eval_data(p, loaded_base, limit, 8, 64)
    grid = base.config.image_size // base.config.patch_size
    patch = base.config.patch_size
    scenes = _scenes(p)
    by_q = {}
    for sc in scenes["scenes"]:
        centres = [int(o["center"][1] // patch) * grid + int(o["center"][0] // patch) for o in sc["objects"]]
        for q in sc["questions"]:
            by_q[q["question_id"]] = (centres, q["kind"])
    models = [(run, load(p.root / run, mode="hard").model, None)]
    if ref:
        bl = EViTFinetuned.from_dir(p.root / ref)
        models.append((ref, load(p.root / ref, mode="hard").model, bl))
    for name, m, bl in models:
        runner = bl.apply(m) if bl is not None else None
        by_n, by_kind, i = defaultdict(list), defaultdict(list), 0
        for b in ev.batches:
            _, ctx = runner.run(b, record=True) if runner is not None else m.run(b, mode="hard", record=True)
            B = len(b["target"])
            for j in range(B):
                centres, kind = by_q[ev.ids[i + j]]
                row = last_image_keep({k: v[j:j + 1] for k, v in ctx.decisions.items()})
                share = sum(float(row[c]) for c in centres) / len(centres)
                by_n[len(centres)].append(share)
                by_kind[kind].append(share)
            i += B
        mean = lambda v: round(100 * sum(v) / len(v), 1)  # noqa: E731
        print(f"{name}: object centres kept (%) by objects", {k: mean(v) for k, v in sorted(by_n.items())})
        print(f"{name}: object centres kept (%) by kind", {k: mean(v) for k, v in sorted(by_kind.items())})


def _scenes(p) -> dict:
    """The generator's description of the validation scenes (objects, questions and their kinds)."""
    from smarttrim_cli.profiling.objects import scenes_file

    path = scenes_file(p.common["data_dir"], p.val_split)
    if path is None:
        raise SystemExit(f"no scenes_<split>.json in {p.common['data_dir']}: this diagnostic needs --dataset scenes")
    return json.loads(path.read_text())


def token_only(p, target: float):
    from smarttrim_cli.backbones import build
    from smarttrim_cli.model_dir import save_model_dir
    from smarttrim_cli.train.loop import finetune

    src = p.root / "base-tokonly"
    if not (src / "model.safetensors").is_file():
        loaded = load(p.base_dir, mode="hard")
        cfg = loaded.config
        m2 = build(cfg["backbone"], cfg["backbone_config"], dict(cfg["trim"], head_layers={}))
        missing, unexpected = m2.load_state_dict(loaded.model.state_dict(), strict=False)
        if missing or not all("head_trimmers" in k for k in unexpected):
            raise SystemExit(f"unexpected weights: missing {missing[:3]}, unexpected {unexpected[:3]}")
        save_model_dir(m2, src, tokenizer=loaded.tokenizer, labels=loaded.labels)
    res = finetune(src, p.root / f"tokonly-r{target:g}", recipe=p.recipe, overrides=trim_overrides(p, target),
                   progress=False)
    print(json.dumps({k: res.summary.get(k) for k in ("final", "calibrated")}, indent=1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=("decisions", "floor", "scores", "coverage", "counting", "thresholds",
                                           "token-only"))
    ap.add_argument("--dataset", default="easyvqa", choices=("easyvqa", "scenes"))
    ap.add_argument("--run", action="append", default=None,
                    help="model folder inside the demo folder (default: trimmed; floor: repeat for several)")
    ap.add_argument("--ref", default=None, help="scores, coverage: the fine-tuned EViT model folder to compare "
                    "(scores: default evit-ft-r0.33)")
    ap.add_argument("--limit", type=int, default=None,
                    help="scores, coverage, counting, thresholds: validation inputs (default 1000 for scores, else 1500)")
    ap.add_argument("--thresholds", default="0.5", help="thresholds: comma-separated keep thresholds")
    ap.add_argument("--target", type=float, default=0.33, help="token-only: target ratio")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    p = prepare(DemoSettings(dataset=a.dataset, long=True), say=lambda m: None)
    runs = a.run or ["trimmed"]
    if a.what == "floor":
        return floor(p, runs)
    if a.what == "counting":
        return counting(p, runs, a.limit or 1500)
    a.run = runs[0]
    if a.what == "decisions":
        decisions(p, a.run)
    elif a.what == "scores":
        scores(p, a.run, a.ref or "evit-ft-r0.33", a.limit or 1000)
    elif a.what == "thresholds":
        thresholds(p, a.run, [float(x) for x in a.thresholds.split(",") if x.strip()], a.limit or 1500)
    elif a.what == "coverage":
        coverage(p, a.run, a.ref, a.limit or 1500)
    else:
        token_only(p, a.target)


if __name__ == "__main__":
    main()
