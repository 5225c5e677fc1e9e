"""The profile report: its JSON schema (stable field names, documented here and in the README),
the rich table, and the CI gate (--min-speedup / --max-drop).

Conventions: GMACs follow fvcore (one multiply-add = 1; LayerNorm 5 per element; softmax and
element-wise ops 0). Scores are percent; ``drop`` = full score - trimmed score, in points, where "full" is the
*reference*: the model the user brought (the one a fine-tuned directory records it started from; see
reference.py), not the fine-tuned weights at full capacity, which are reported as ``same_weights_full``.
``ratios`` are trimmed / full (lower is better for cost, higher for throughput); ``speedup`` is
always >= 1 when the trimmed model is better: full/trimmed for GMACs and latency, trimmed/full for
throughput.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import ValidationFailed

SCHEMA = "smarttrim-profile"
SCHEMA_VERSION = 3  # 2: accuracy.full / drop / per_input score_full are the reference model's
# 3: text-generating models (output kind "text"): the shared sections describe the prefill and greedy generate,
#    plus the `generation` section (null for the others) and per_input exact_* / image_keep_ratio
CONVENTION = ("GMACs = 1e9 multiply-adds as fvcore counts them (one multiply-add = 1; LayerNorm 5 per "
              "element; softmax, element-wise ops and gathers 0; fused SDPA counted by a registered "
              "handle). torch.utils.flop_counter reports 2x these numbers (FLOPs).")
SPEEDUP_METRICS = ("gmacs", "latency", "throughput")
NULL_SECTIONS = ("generation",)  # sections null in the reports they do not apply to

_STATS = "{n, mean, p10, p50, p90, min, max}"
_MS = "{n, mean, p50, p90, p99, min, max} in ms"

# Every documented field of report.json (dotted path; "[]" = each element of a list) -> meaning.
FIELDS: dict[str, str] = {
    "schema": f'"{SCHEMA}"',
    "schema_version": f"{SCHEMA_VERSION}; bumped when a field changes meaning or is removed",
    "created": "UTC time the run finished (ISO 8601)",
    "command": "the command line",
    "wall_seconds": "duration of the whole run",
    "convention": "how GMACs are counted (text)",
    "machine": "hostname, platform, python, cpu, cpu_count, torch_threads, torch_interop_threads, device, "
               "gpu ({name, memory_gb, cuda} or null), load_average (1/5/15 min at the end of the run)",
    "machine.torch_threads": "torch intra-op threads used for every timing",
    "machine.device": "cpu or cuda[:i]",
    "versions": "smarttrim, torch, transformers, fvcore, numpy, matplotlib, onnxruntime",
    "settings": "every option that shapes the numbers",
    "settings.model_dir": "the model directory profiled",
    "settings.dataset": "dataset reader (vqa, nlvr2, snli, easyvqa, coco-captions, flickr30k)",
    "settings.data_dir": "data directory read",
    "settings.split": "split read",
    "settings.limit": "--limit (null = all)",
    "settings.n_inputs": "inputs profiled",
    "settings.skipped": "bad rows/images skipped with --skip-bad (reason -> count)",
    "settings.threshold": "runtime keep threshold of the trimmed model",
    "settings.reference": "--reference as given (null: the recorded one; \"self\"; a directory)",
    "settings.sweep": "thresholds of the sweep (may be empty)",
    "settings.device": "--device",
    "settings.threads": "torch intra-op threads",
    "settings.batch_size": "batch size of the throughput measurement (capped at n_inputs; text models: 8, not "
                           "--batch-size)",
    "settings.warmup": "warm-up calls before the batch-1 latency timing",
    "settings.iters": "timed batch-1 calls per model",
    "settings.throughput_batches": "timed batches per model and mode",
    "settings.fvcore_inputs": "inputs whose FLOPs fvcore counted (the rest: cost model only)",
    "settings.batch_mode": "--batch-mode (auto, pad or bucket; text models: pad)",
    "settings.max_new_tokens": "text models: --max-new-tokens, greedy tokens per answer (else null)",
    "model": "backbone, task, image_size, patch_size, image_tokens, max_text_len, params, "
             "params_trimmers, weights_mb, token_layers, head_layers, default_threshold",
    "model.task": "the model's task head",
    "accuracy": "task scores (percent)",
    "accuracy.metric": "vqa_score, accuracy or recall@1; text models: vqa_score_generated (the VQA score of the "
                       "normalised greedy answer against the answers; inputs without answers left out)",
    "accuracy.full": "score of the reference model (accuracy.reference: the model the user brought) at full capacity",
    "accuracy.trimmed": "score of the trimmed model (the profiled directory) at settings.threshold",
    "accuracy.drop": "full - trimmed, in points: the loss against the reference; --max-drop reads it",
    "accuracy.agreement": "percent of inputs where the reference and the trimmed model predict the same answer "
                          "(null for retrieval)",
    "accuracy.reference": "{model_dir, source, sha256, why}: the model `full` describes. source: recorded (the "
                          "directory the profiled one was fine-tuned from, hash checked), --reference (given), or "
                          "self (attach output, a plain fine-tune, --reference self: model_dir null)",
    "accuracy.same_weights_full": "score of the profiled directory's own weights at full capacity (trimming off); "
                                  "equals full when the reference is self",
    "accuracy.same_weights_drop": "same_weights_full - trimmed, in points (what trimming alone costs these weights)",
    "accuracy.recall": "retrieval only: text-to-image {recall@1, recall@5, recall@10} for full (the reference), "
                       "trimmed and same_weights_full, plus image_to_text (same keys), texts and images counts; "
                       "else null",
    "flops": "per-input cost at batch 1 (unpadded text); text models: the prefill (one forward of the prompt, "
             "LM head on every prompt token, as fvcore counts that forward)",
    "flops.unit": '"GMACs"',
    "flops.source": "fvcore (every input counted by fvcore) or cost_model (analytic, trim/cost.py)",
    "flops.full": f"full-capacity GMACs per input {_STATS} (the reference has the same architecture, checked, "
                  "so the same cost)",
    "flops.trimmed": f"trimmed model GMACs per input {_STATS}",
    "flops.ratio": "mean trimmed GMACs / mean full GMACs",
    "flops.speedup": "1 / flops.ratio",
    "flops.fvcore_check": "{n_inputs, max_rel_diff, mean_rel_diff}: fvcore vs the cost model over the "
                          "inputs fvcore counted (both models)",
    "latency": "batch-1 wall-clock latency, per input, cycling through the first `iters` inputs; text models: time "
               "to first token (generation.ttft_ms)",
    "latency.full": f"full model {_MS}",
    "latency.trimmed": f"trimmed model {_MS}",
    "latency.speedup": "full p50 / trimmed p50",
    "throughput": "batched inference over the same inputs for both models; text models: greedy generate of "
                  "settings.max_new_tokens tokens at batch_size (generation.throughput.batch_n)",
    "throughput.batch_size": "inputs per batch",
    "throughput.full": "{inputs_per_s, seconds, inputs} of the full model (text padded to the batch's longest)",
    "throughput.trimmed": "{inputs_per_s, seconds, inputs, mode} of the trimmed model in the faster mode",
    "throughput.modes": "trimmed model per batching mode: pad (dataset order, kept tokens padded to the "
                        "batch max with a mask) and bucket (inputs sorted by their trimmed cost from the "
                        "batch-1 pass, then batched; an upper bound for a cost-aware scheduler)",
    "throughput.speedup": "trimmed inputs/s / full inputs/s",
    "memory": "peak bytes allocated by one forward beyond the weights (activations), MB; text models: by one "
              "generate call (activations and KV cache)",
    "memory.method": "how it was measured",
    "memory.weights_mb": "parameter bytes, MB",
    "memory.full": "{batch_1, batch_n} MB of the full model",
    "memory.trimmed": "{batch_1, batch_n} MB of the trimmed model (batch_n in throughput.trimmed.mode)",
    "ratios": "trimmed / full: gmacs, latency_p50, throughput, memory_batch_1, memory_batch_n",
    "speedup": "gmacs, latency, throughput speed-ups (>1 = trimmed faster); the gate reads one of them",
    "layers": "per layer of the forward, mean over inputs (image-1 pass only for NLVR2)",
    "layers[].name": "layer (<stream>_<i>, e.g. vision_3, ximage_0)",
    "layers[].stream": "the model's stream (METER: text, vision, xtext, ximage; ViLT: joint)",
    "layers[].tokens_mean": "tokens the layer processed (mean)",
    "layers[].tokens_full": "tokens without trimming (mean)",
    "layers[].tokens_kept_frac": "tokens_mean / tokens_full",
    "layers[].heads_kept_frac": "kept share of (self-)attention heads, null if the layer has no head trimmer",
    "layers[].cross_heads_kept_frac": "kept share of cross-attention heads (co-attention layers), else null",
    "layers[].gmacs_mean": "trimmed GMACs of the layer (mean)",
    "layers[].gmacs_full": "full GMACs of the layer (mean)",
    "sweep": "one row per threshold of --sweep plus settings.threshold, sorted by threshold",
    "sweep[].threshold": "keep threshold",
    "sweep[].score": "task score (percent)",
    "sweep[].drop": "full (reference) score - score",
    "sweep[].gmacs_mean": "mean trimmed GMACs (cost model)",
    "sweep[].gmacs_p10": "10th percentile",
    "sweep[].gmacs_p50": "median",
    "sweep[].gmacs_p90": "90th percentile",
    "sweep[].ratio": "gmacs_mean / full mean",
    "sweep[].speedup": "1 / ratio",
    "per_input": "one row per input",
    "per_input[].index": "position in the dataset",
    "per_input[].id": "question_id / identifier / line of the dataset row, when it has one",
    "per_input[].text_tokens": "real text tokens",
    "per_input[].gmacs_full": "full model, cost model",
    "per_input[].gmacs_trimmed": "trimmed model, cost model",
    "per_input[].fvcore_gmacs_full": "full model, fvcore (null if not counted)",
    "per_input[].fvcore_gmacs_trimmed": "trimmed model, fvcore (null if not counted)",
    "per_input[].image_tokens_final": "image tokens ([CLS] included) alive after the last image-stream token "
                                      "trimmer (model.image_tokens when there is none); text models: image "
                                      "tokens the trimmed model kept (its decisions)",
    "per_input[].image_tokens_full": "text models: image tokens of the untrimmed prompt (else null)",
    "per_input[].image_keep_ratio": "text models: image_tokens_final / image_tokens_full (else null)",
    "per_input[].score_full": "per-input score of the reference model (0-1; null for retrieval)",
    "per_input[].score_trimmed": "same, trimmed",
    "per_input[].pred_full": "arg-max label id of the reference model (null for retrieval; text models: its "
                             "normalised greedy answer)",
    "per_input[].pred_trimmed": "same, trimmed",
    "per_input[].pred_full_label": "its label string when the model has labels, else null (text models: the "
                                   "decoded answer as generated)",
    "per_input[].exact_full": "text models: 1/0 exact match of the reference's normalised answer with the most "
                              "frequent answer (null without answers; else null)",
    "per_input[].exact_trimmed": "same, trimmed",
    "per_input[].pred_trimmed_label": "same, trimmed",
    "per_input[].score_same_weights_full": "per-input score of the profiled weights at full capacity (null for "
                                           "retrieval)",
    "per_input[].pred_same_weights_full": "their arg-max label id",
    "per_input[].objects": "objects in the input's image (synthetic scenes: the folder has scenes_<split>.json), "
                           "else null",
    "objects": "scenes only, else null: {source, n_inputs, n_unmatched, image_tokens_full, gmacs_source, "
               "spearman_tokens, spearman_gmacs (rank correlation of objects with kept image tokens / trimmed "
               "GMACs), tokens_per_object (least-squares slope), direction (more/fewer on crowded images, flat), "
               "by_objects: [{objects, n, image_tokens_final_mean/_std, kept_frac_mean, gmacs_trimmed_mean/_std, "
               "gmacs_full_mean/_std, gmacs_ratio_mean, score_full_mean/_std, score_trimmed_mean/_std}], "
               "by_kind: [{kind, n, image_tokens_final_mean, gmacs_trimmed_mean, score_trimmed}]}",
    "gate": "the CI gate",
    "gate.speedup_metric": "which speedup the gate reads (--speedup-metric)",
    "gate.min_speedup": "--min-speedup or null",
    "gate.max_drop": "--max-drop or null",
    "gate.speedup": "the speedup read",
    "gate.drop": "accuracy.drop (against the reference)",
    "gate.passed": "true when every given bound holds",
    "gate.failures": "one message per failed bound",
    "generation": "text-generating models (output kind text), else null; full = the reference, trimmed = the "
                  "profiled model at settings.threshold, both greedy, on the same inputs",
    "generation.max_new_tokens": "greedy tokens per answer; every timing decodes exactly this many (EOS ignored) so "
                                 "both models decode the same count",
    "generation.instruction": "text appended to each question (vqa, scenes, easyvqa: LLaVA-1.5's short-answer "
                              "instruction; prompts: null)",
    "generation.exact_match": "{full, trimmed, drop}: percent exact match of the normalised answer with the most "
                              "frequent answer",
    "generation.image_tokens": f"{{full (image tokens per prompt), kept {_STATS} per input, keep_ratio (mean kept "
                               "/ full)}}",
    "generation.prefill_gmacs": f"{{full, trimmed}} prefill GMACs per input by the cost model {_STATS}",
    "generation.ttft_ms": f"{{full, trimmed, speedup}}: time to first token at batch 1 (prefill + one token) {_MS}; "
                          "speedup full p50 / trimmed p50",
    "generation.e2e_ms": f"{{full, trimmed, speedup}}: end to end at batch 1 (prefill + max_new_tokens tokens) {_MS}",
    "generation.decode_tokens_per_s": "{full, trimmed, speedup}: (max_new_tokens - 1) per input / (end to end - "
                                      "time to first token), paired on the same inputs, batch 1",
    "generation.throughput": "{batch_1, batch_n: {full, trimmed: {inputs_per_s, tokens_per_s, seconds, inputs}, "
                             "speedup}, batch_size}: greedy generate of max_new_tokens tokens",
    "generation.peak_memory_mb": "{method, batch_1: {full, trimmed}, batch_n: {full, trimmed}}: peak MB of one "
                                 "generate call beyond what was allocated before it (activations and KV cache)",
    "files": "paths written: json, flops_hist, layers, pareto (null when no sweep), show (list), objects and "
             "objects_show (scenes only: kept tokens/GMACs against objects; one overlay per object count when "
             "--show > 0; else null)",
}


def get_path(report: dict, path: str):
    """Value at a documented dotted path ("a.b", "list[].key" takes the first element); KeyError if absent."""
    cur = report
    for part in path.split("."):
        if part.endswith("[]"):
            cur = cur[part[:-2]]
            if not isinstance(cur, list):
                raise KeyError(path)
            if not cur:
                return None
            cur = cur[0]
        else:
            if not isinstance(cur, dict) or part not in cur:
                raise KeyError(path)
            cur = cur[part]
    return cur


def missing_fields(report: dict, fields: dict | None = None) -> list[str]:
    """Documented paths of ``fields`` (default: this report's FIELDS) absent from ``report``."""
    out = []
    for p in FIELDS if fields is None else fields:
        top = p.split(".")[0]
        if top in NULL_SECTIONS and "." in p and top in report and report[top] is None:
            continue  # a section that does not apply to this report: documented null, its fields with it
        try:
            get_path(report, p)
        except (KeyError, TypeError):
            out.append(p)
    return out


def schema_markdown(fields: dict | None = None) -> str:
    """The README table of report.json fields (``fields``: another report's FIELDS)."""
    lines = ["| field | meaning |", "|---|---|"]
    lines += [f"| `{k}` | {v.replace('|', '/')} |" for k, v in (FIELDS if fields is None else fields).items()]
    return "\n".join(lines)


# ----- the gate ----------------------------------------------------------------------------------------
def evaluate_gate(report: dict, min_speedup: float | None, max_drop: float | None, metric: str) -> dict:
    speed = report["speedup"].get(metric)
    drop = report["accuracy"]["drop"]
    failures = []
    if min_speedup is not None:
        if speed is None:
            failures.append(f"{metric} speedup was not measured, so --min-speedup {min_speedup:g} cannot hold")
        elif speed < min_speedup:
            failures.append(f"{metric} speedup {speed:.3f}x is below --min-speedup {min_speedup:g}")
    if max_drop is not None:
        if drop is None:
            failures.append(f"accuracy drop was not measured, so --max-drop {max_drop:g} cannot hold")
        elif drop > max_drop:
            ref = (report["accuracy"].get("reference") or {}).get("model_dir")
            against = f" against the reference {ref}" if ref else ""
            failures.append(f"{report['accuracy']['metric']} drop {drop:.2f} pts{against} is above --max-drop {max_drop:g}")
    return {"speedup_metric": metric, "min_speedup": min_speedup, "max_drop": max_drop, "speedup": speed,
            "drop": drop, "passed": not failures, "failures": failures}


def raise_if_failed(report: dict):
    g = report["gate"]
    if not g["passed"]:
        raise ValidationFailed("profile gate failed: " + "; ".join(g["failures"]))


# ----- the table ---------------------------------------------------------------------------------------
def _g(x):
    return "–" if x is None else f"{x:.4g}"


def _f(x, fmt="{:.3f}", none="–"):
    return none if x is None else fmt.format(x)


def render(report: dict, console) -> None:
    from rich.table import Table

    s, a, fl, lat, tp, mem = (report[k] for k in ("settings", "accuracy", "flops", "latency", "throughput",
                                                    "memory"))
    ref = a.get("reference") or {}
    full_name = f"full: {Path(ref['model_dir']).name}" if ref.get("model_dir") else "full"
    t = Table(title=f"smarttrim profile: {Path(s['model_dir']).name} on {s['dataset']}/{s['split']} "
                    f"({s['n_inputs']} inputs, threshold {s['threshold']:g}, {report['machine']['device']}, "
                    f"{report['machine']['torch_threads']} threads)", title_justify="left")
    t.add_column("measure", style="bold")
    t.add_column(full_name, justify="right")
    t.add_column("trimmed", justify="right")
    t.add_column("trimmed/full", justify="right")
    drop = a["drop"]
    t.add_row(f"{a['metric']} (%)", _f(a["full"], "{:.2f}"), _f(a["trimmed"], "{:.2f}"),
              "drop " + _f(drop, "{:+.2f} pts") if drop is not None else "–")

    if a.get("recall"):
        for k in a["recall"]["full"]:
            t.add_row(f"  {k} (%)", _f(a["recall"]["full"][k], "{:.2f}"), _f(a["recall"]["trimmed"][k], "{:.2f}"), "")
        i2t = a["recall"].get("image_to_text")
        for k in (i2t or {}).get("full", {}):
            t.add_row(f"  image-to-text {k} (%)", _f(i2t["full"][k], "{:.2f}"), _f(i2t["trimmed"][k], "{:.2f}"), "")
    t.add_row(f"GMACs / input, mean ({fl['source']})", _g(fl["full"]["mean"]), _g(fl["trimmed"]["mean"]),
              _f(fl["ratio"], "{:.3f}") + f"  ({_f(fl['speedup'], '{:.2f}')}x)")
    t.add_row("GMACs p10 / p50 / p90", " / ".join(_g(fl["full"][k]) for k in ("p10", "p50", "p90")),
              " / ".join(_g(fl["trimmed"][k]) for k in ("p10", "p50", "p90")), "")
    t.add_row(("time to first token" if report.get("generation") else "latency") + " b=1 p50 / p90 / p99 (ms)", " / ".join(_f(lat["full"][k], "{:.1f}") for k in ("p50", "p90", "p99")),
              " / ".join(_f(lat["trimmed"][k], "{:.1f}") for k in ("p50", "p90", "p99")),
              _f(report["ratios"]["latency_p50"]) + f"  ({_f(lat['speedup'], '{:.2f}')}x)")
    t.add_row(f"throughput b={tp['batch_size']} (inputs/s)", _f(tp["full"]["inputs_per_s"], "{:.2f}"),
              _f(tp["trimmed"]["inputs_per_s"], "{:.2f}") + f" [{tp['trimmed']['mode']}]",
              _f(report["ratios"]["throughput"]) + f"  ({_f(tp['speedup'], '{:.2f}')}x)")
    t.add_row(f"peak memory b=1 / b={tp['batch_size']} (MB)",
              f"{_f(mem['full']['batch_1'], '{:.1f}')} / {_f(mem['full']['batch_n'], '{:.1f}')}",
              f"{_f(mem['trimmed']['batch_1'], '{:.1f}')} / {_f(mem['trimmed']['batch_n'], '{:.1f}')}",
              f"{_f(report['ratios']['memory_batch_1'])} / {_f(report['ratios']['memory_batch_n'])}")
    console.print(t)
    if report.get("generation"):
        render_generation(report["generation"], console)
    console.print(f"full = {ref.get('why', 'the full-capacity model')}"
                  + ("" if ref.get("model_dir") is None else "; its cost, latency and memory are those of the same "
                     f"architecture at full capacity. The profiled weights at full capacity score "
                     f"{_f(a.get('same_weights_full'), '{:.2f}')} (trimmed: drop "
                     f"{_f(a.get('same_weights_drop'), '{:+.2f}')} pts against them)"), highlight=False)
    chk = fl["fvcore_check"]
    if chk["n_inputs"]:
        console.print(f"GMACs: fvcore convention (1 multiply-add = 1); fvcore vs cost model on "
                      f"{chk['n_inputs']} inputs: max rel. diff {chk['max_rel_diff']:.2e}", highlight=False)
    else:
        console.print("GMACs: fvcore convention (1 multiply-add = 1), from the cost model (fvcore skipped)",
                      highlight=False)
    others = {k: v for k, v in tp["modes"].items() if k != tp["trimmed"]["mode"]}
    if others:
        console.print("batched trimmed model: " + ", ".join(
            f"{k} {_f(v['inputs_per_s'], '{:.2f}')}/s" for k, v in tp["modes"].items())
            + f" -> {tp['trimmed']['mode']} used", highlight=False)
    if report["sweep"] and len(report["sweep"]) > 1:
        st = Table(title="threshold sweep", title_justify="left")
        for c in ("threshold", f"{a['metric']} (%)", "drop (pts)", "GMACs mean", "p10 / p50 / p90", "speedup"):
            st.add_column(c, justify="right")
        for r in report["sweep"]:
            st.add_row(f"{r['threshold']:g}", _f(r["score"], "{:.2f}"), _f(r["drop"], "{:+.2f}"),
                       _g(r["gmacs_mean"]), " / ".join(_g(r[k]) for k in ("gmacs_p10", "gmacs_p50", "gmacs_p90")),
                       _f(r["speedup"], "{:.2f}x"))
        console.print(st)
    files = report["files"]
    ob = report.get("objects")
    if ob and ob.get("by_objects"):
        console.print("kept image tokens by objects in the image: " + ", ".join(
            f"{r['objects']}: {_f(r['image_tokens_final_mean'], '{:.1f}')}" for r in ob["by_objects"])
            + f" of {ob['image_tokens_full']} (Spearman {_f(ob['spearman_tokens'], '{:+.2f}')}: {ob['direction']})",
            highlight=False)
    written = [files[k] for k in ("json", "flops_hist", "layers", "pareto", "objects", "objects_show") if files.get(k)]
    if files.get("show"):
        written.append(f"{len(files['show'])} overlays in {Path(files['show'][0]).parent}")
    console.print("written: " + ", ".join(str(w) for w in written), highlight=False)
    g = report["gate"]
    print_gate(console, g, ("min_speedup", "max_drop"),
               f"{g['speedup_metric']} speedup {_f(g['speedup'], '{:.3f}')}x, drop {_f(g['drop'], '{:.2f}')} pts")


def render_generation(g: dict, console) -> None:
    """Text-generating models: the generation measurements, full vs trimmed."""
    from rich.table import Table

    t = Table(title=f"greedy generation ({g['max_new_tokens']} new tokens)", title_justify="left")
    for c in ("measure", "full", "trimmed", "speed-up"):
        t.add_column(c, justify="right" if c != "measure" else "left")
    em = g["exact_match"]
    t.add_row("exact match (%)", _f(em["full"], "{:.2f}"), _f(em["trimmed"], "{:.2f}"),
              "drop " + _f(em["drop"], "{:+.2f} pts"))
    it = g["image_tokens"]
    t.add_row("image tokens mean (p10 / p90)", str(it["full"]), f"{_f(it['kept']['mean'], '{:.1f}')} "
              f"({_f(it['kept']['p10'], '{:.0f}')} / {_f(it['kept']['p90'], '{:.0f}')})",
              "keep " + _f(it["keep_ratio"], "{:.3f}"))
    for key, label in (("ttft_ms", "time to first token p50 (ms)"), ("e2e_ms", "end to end b=1 p50 (ms)")):
        t.add_row(label, _f(g[key]["full"]["p50"], "{:.1f}"), _f(g[key]["trimmed"]["p50"], "{:.1f}"),
                  _f(g[key]["speedup"], "{:.2f}x"))
    d = g["decode_tokens_per_s"]
    t.add_row("decode b=1 (tokens/s)", _f(d["full"], "{:.1f}"), _f(d["trimmed"], "{:.1f}"), _f(d["speedup"], "{:.2f}x"))
    tp = g["throughput"]
    for k, b in (("batch_1", 1), ("batch_n", tp["batch_size"])):
        t.add_row(f"throughput b={b} (inputs/s)", _f(tp[k]["full"]["inputs_per_s"], "{:.2f}"),
                  _f(tp[k]["trimmed"]["inputs_per_s"], "{:.2f}"), _f(tp[k]["speedup"], "{:.2f}x"))
    m = g["peak_memory_mb"]
    t.add_row(f"peak memory incl. KV cache b=1 / b={tp['batch_size']} (MB)",
              f"{_f(m['batch_1']['full'], '{:.1f}')} / {_f(m['batch_n']['full'], '{:.1f}')}",
              f"{_f(m['batch_1']['trimmed'], '{:.1f}')} / {_f(m['batch_n']['trimmed'], '{:.1f}')}", "")
    console.print(t)


def print_gate(console, gate: dict, bounds: tuple, summary: str) -> None:
    """The gate's verdict, when any of ``bounds`` was given: one green line, or one red line per failed bound."""
    if all(gate[b] is None for b in bounds):
        return
    if gate["passed"]:
        console.print(f"[bold green]gate passed[/] ({summary})")
    else:
        for f in gate["failures"]:
            console.print(f"[bold red]gate failed:[/] {f}", highlight=False)
