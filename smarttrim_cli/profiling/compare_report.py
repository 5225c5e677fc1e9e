"""The compare report: its JSON schema (documented here and in the README), the rich table, and the gate
(--min-margin / --max-drop).

Scores are percent; a method's ``paired.margin`` is SmartTrim's score minus the method's on the same inputs,
in points, with the standard error of that mean difference (the inputs are shared, so the paired error is
much smaller than either score's own). "Matched" means a baseline's measured mean GMACs ratio on the
evaluated inputs is within ``settings.match_tol`` of the ratio it was calibrated to.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import ValidationFailed
from . import report as rp

SCHEMA = "smarttrim-compare"
SCHEMA_VERSION = 1

_ROW = ("{name, family, role, n, accuracy, accuracy_se, gmacs_mean, gmacs_std, gmacs_p10, gmacs_p50, gmacs_p90, "
        "gmacs_ratio, gmacs_reduction, image_tokens_mean, image_tokens_full, threshold, target_ratio, target_tokens, "
        "matched, "
        "calibration, params, paired, per_input}")

# Every documented field of compare.json (dotted path; "[]" = each element of a list) -> meaning.
FIELDS: dict[str, str] = {
    "schema": f'"{SCHEMA}"',
    "schema_version": f"{SCHEMA_VERSION}; bumped when a field changes meaning or is removed",
    "created": "UTC time the run finished (ISO 8601)",
    "command": "the command line",
    "wall_seconds": "duration of the whole run",
    "convention": "how GMACs are counted (text)",
    "machine": "as in the profile report (hostname, platform, cpu, torch_threads, device, gpu, ...)",
    "versions": "smarttrim, torch, transformers, fvcore, numpy, matplotlib, onnxruntime",
    "settings": "every option that shapes the numbers",
    "settings.model_dir": "the trimmed model compared (SmartTrim)",
    "settings.dataset": "dataset reader (vqa, nlvr2, snli, easyvqa; text models: prompts, vqa, scenes, easyvqa)",
    "settings.data_dir": "data directory read",
    "settings.split": "split read",
    "settings.limit": "--limit: inputs evaluated (null = all but the calibration inputs)",
    "settings.calib_limit": "--calib-limit: inputs held apart to calibrate the baselines on",
    "settings.n_inputs": "inputs evaluated",
    "settings.calib_inputs": "inputs calibrated on (fewer than calib_limit when the split ends first)",
    "settings.skipped": "bad rows/images skipped with --skip-bad (reason -> count)",
    "settings.threshold": "SmartTrim's keep threshold (the model's unless --threshold)",
    "settings.thresholds": "--thresholds: more SmartTrim thresholds (its curve; may be empty)",
    "settings.ratios": "--ratios: more target GMACs ratios for the baselines (may be empty)",
    "settings.baselines": "the training-free baselines compared (--baselines)",
    "settings.reference": "--reference as given (null: the recorded one; \"self\"; a directory)",
    "settings.tol": "--tol: absolute tolerance of each baseline's calibration on the calibration inputs",
    "settings.match_tol": "--match-tol: a baseline is matched when |its ratio - its target| <= this on the evaluated inputs",
    "settings.batch_size": "evaluation batch size (costs are per input, as at batch 1; text models: 1)",
    "settings.max_new_tokens": "text models: --max-new-tokens, the greedy answer length; else null",
    "settings.device": "--device",
    "settings.threads": "torch intra-op threads",
    "inputs": "which inputs did what",
    "inputs.evaluated": "dataset positions of the evaluated inputs (the first n_inputs: profile --limit reads the same)",
    "inputs.calibration": "dataset positions of the calibration inputs (the next ones)",
    "inputs.evaluated_ids": "question_id / identifier of each evaluated input (null where the reader has none)",
    "inputs.calibration_ids": "same, calibration inputs",
    "inputs.disjoint": "true: no input is in both sets",
    "reference": "{model_dir, source, sha256, why}: the model the baselines act on and `full` describes (as "
                 "profile's accuracy.reference; model_dir null: MODEL_DIR's own weights at full capacity)",
    "metric": "vqa_score or accuracy; text models: vqa_score_generated (the greedy answer's VQA score)",
    "target_ratio": "SmartTrim's measured mean GMACs ratio on the evaluated inputs: the cost every baseline is "
                    "calibrated to (matched cost)",
    "target_tokens": "text models: SmartTrim's mean kept image tokens on the evaluated inputs, the second view's "
                     "target (baseline-tokens rows); else null",
    "methods": f"one row per method, every one on the evaluated inputs: {_ROW}",
    "methods[].name": "full (reference), smarttrim, smarttrim t=<threshold> (--thresholds), or the baseline's name",
    "methods[].family": "full, smarttrim, or the baseline's name (one line per family in the chart)",
    "methods[].role": "reference, smarttrim, smarttrim-sweep, baseline (at matched GMACs) or baseline-tokens (text "
                      "models: at matched mean kept image tokens, named '<baseline> (tokens)'; not in comparison)",
    "methods[].n": "inputs evaluated",
    "methods[].accuracy": "score (percent) with accuracy_se its standard error over the inputs",
    "methods[].accuracy_se": "standard error of accuracy",
    "methods[].gmacs_mean": "mean GMACs per input (cost model, fvcore convention; text models: the prefill), with "
                            "gmacs_std/_p10/_p50/_p90",
    "methods[].gmacs_ratio": "gmacs_mean / the reference's full-capacity mean",
    "methods[].gmacs_reduction": "1 / gmacs_ratio",
    "methods[].image_tokens_mean": "image tokens kept: alive after the last token decision on the model's image "
                                   "streams (mean; backbones/base.py image_streams)",
    "methods[].image_tokens_full": "image tokens of an untrimmed input",
    "methods[].target_tokens": "baseline-tokens rows: the mean kept image tokens calibrated to; else null",
    "methods[].threshold": "SmartTrim rows: keep threshold; else null",
    "methods[].target_ratio": "baselines: the GMACs ratio calibrated to (target_ratio or one of --ratios); else null",
    "methods[].matched": "baselines: |gmacs_ratio - target_ratio| <= settings.match_tol; else null",
    "methods[].calibration": "baselines: {target, ratio (on the calibration inputs), param, evaluations, tolerance, "
                             "reached}; baseline-tokens: {target_tokens, tokens, param, evaluations, tolerance "
                             "(half a token), reached}; else null",
    "methods[].params": "baselines: the calibrated setting (keep ratio, heads dropped, image size); else null",
    "methods[].paired": "baselines: {margin (SmartTrim - this, points, same inputs), margin_se, wins, losses, ties, "
                        "n}: SmartTrim at settings.threshold against this row; else null",
    "methods[].per_input": "{score (0-1), gmacs, image_tokens (kept), text (text models: the generated answer)} "
                           "per evaluated input, in inputs.evaluated order",
    "comparison": "SmartTrim against the baselines at its cost: the rows with target_ratio = target_ratio whose "
                  "measured ratio is at most target_ratio + settings.match_tol (matched, or cheaper: a coarse grid)",
    "comparison.best_baseline": "name of the best-scoring of those (null: every baseline spent more)",
    "comparison.best_baseline_accuracy": "its score",
    "comparison.best_baseline_gmacs_ratio": "its measured GMACs ratio",
    "comparison.margin": "SmartTrim's score - best_baseline's, in points (paired over the same inputs); "
                         "--min-margin reads it",
    "comparison.margin_se": "standard error of margin (paired)",
    "comparison.drop": "reference score - SmartTrim's, in points; --max-drop reads it",
    "comparison.left_out": "baselines at target_ratio that could not get down to it (more than match_tol above; "
                           "not counted in best_baseline)",
    "gate": "the CI gate",
    "gate.min_margin": "--min-margin or null",
    "gate.max_drop": "--max-drop or null",
    "gate.margin": "comparison.margin",
    "gate.drop": "comparison.drop",
    "gate.passed": "true when every given bound holds",
    "gate.failures": "one message per failed bound",
    "table": "the comparison as a markdown table",
    "files": "paths written: json, pareto (accuracy against mean GMACs, PNG)",
}


def missing_fields(report: dict) -> list[str]:
    return rp.missing_fields(report, FIELDS)


def schema_markdown() -> str:
    """The README table of compare.json fields."""
    return rp.schema_markdown(FIELDS)


# ----- the gate ----------------------------------------------------------------------------------------
def evaluate_gate(report: dict, min_margin: float | None, max_drop: float | None) -> dict:
    c = report["comparison"]
    margin, drop = c["margin"], c["drop"]
    failures = []
    if min_margin is not None:
        if margin is None:
            failures.append(f"no baseline got down to SmartTrim's cost ({', '.join(c['left_out']) or 'none run'}), so "
                            f"--min-margin {min_margin:g} cannot hold")
        elif margin < min_margin:
            failures.append(f"SmartTrim's margin over the best baseline ({c['best_baseline']}) is {margin:+.2f} pts, "
                            f"below --min-margin {min_margin:g}")
    if max_drop is not None:
        if drop is None:
            failures.append(f"the drop against the reference was not measured, so --max-drop {max_drop:g} cannot hold")
        elif drop > max_drop:
            failures.append(f"{report['metric']} drop {drop:.2f} pts against the reference is above --max-drop "
                            f"{max_drop:g}")
    return {"min_margin": min_margin, "max_drop": max_drop, "margin": margin, "drop": drop,
            "passed": not failures, "failures": failures}


def raise_if_failed(report: dict):
    g = report["gate"]
    if not g["passed"]:
        raise ValidationFailed("compare gate failed: " + "; ".join(g["failures"]))


# ----- the table ---------------------------------------------------------------------------------------
def _f(x, fmt="{:.2f}"):
    return "–" if x is None else fmt.format(x)


def render(report: dict, console) -> None:
    from rich.table import Table

    s, c = report["settings"], report["comparison"]
    t = Table(title=f"smarttrim compare: {Path(s['model_dir']).name} on {s['dataset']}/{s['split']} "
                    f"({s['n_inputs']} inputs evaluated, baselines calibrated on {s['calib_inputs']} others; "
                    f"matched cost {report['target_ratio']:.3f} of the full GMACs)", title_justify="left")
    for col, just in (("method", "left"), ("target", "right"), (f"{report['metric']} (%)", "right"),
                      ("SmartTrim − method (paired)", "right"), ("mean GMACs", "right"), ("ratio", "right"),
                      ("image tokens", "right"), ("matched", "center")):
        t.add_column(col, justify=just, no_wrap=col == "method")
    for r in report["methods"]:
        p = r.get("paired")
        tgt = _f(r.get("target_ratio"), "{:.3f}") if r.get("target_tokens") is None else f"{r['target_tokens']:.1f} tok"
        t.add_row(r["name"], tgt, f"{_f(r['accuracy'])} ± {_f(r['accuracy_se'])}",
                  "–" if not p else f"{_f(p['margin'], '{:+.2f}')} ± {_f(p['margin_se'])}",
                  _f(r["gmacs_mean"], "{:.4g}"), _f(r["gmacs_ratio"], "{:.3f}"),
                  _f(r.get("image_tokens_mean"), "{:.1f}"),
                  "–" if r.get("matched") is None else ("yes" if r["matched"] else "[red]no[/]"))
    console.print(t)
    ref = report["reference"]
    console.print(f"full = {ref.get('why')}; the baselines act on that model (training-free)", highlight=False)
    if c["best_baseline"] is not None:
        console.print(f"at matched cost: SmartTrim {c['margin']:+.2f} ± {_f(c['margin_se'])} pts against the best "
                      f"baseline ({c['best_baseline']}, {c['best_baseline_accuracy']:.2f}%); drop against the "
                      f"reference {_f(c['drop'], '{:+.2f}')} pts", highlight=False)
    if c["left_out"]:
        console.print(f"could not get down to SmartTrim's cost (left out of the margin): {', '.join(c['left_out'])}",
                      highlight=False)
    console.print("written: " + ", ".join(str(v) for v in report["files"].values() if v), highlight=False)
    g = report["gate"]
    rp.print_gate(console, g, ("min_margin", "max_drop"),
                  f"margin {_f(g['margin'], '{:+.2f}')} pts, drop {_f(g['drop'])} pts")
