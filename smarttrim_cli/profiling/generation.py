"""``smarttrim profile`` for models whose output kind is ``text`` (decoder VLMs, e.g. LLaVA): full vs trimmed
greedy generation on the same inputs, in the same report as the classifiers (runner.py dispatches here).

Per input at batch 1 (the prompt is unpadded there): greedy answers of the reference ("full") and the trimmed
model, scored as VQA scores / exact match of the normalised answer; the prefill cost (one forward of the
prompt, the cost model, and fvcore on the first ``fvcore_limit`` inputs); the image tokens the trimmer kept.
Then timings of both models on the same inputs: time to first token (``generate`` with one new token), end to
end (``max_new_tokens`` tokens, EOS ignored so both models decode the same count), decode tokens/s (the
difference of the two), throughput at batch 1 and ``GEN_BATCH``, and the peak memory of a whole ``generate``
call (activations + KV cache; weights excluded).
"""
from __future__ import annotations

import datetime as _dt
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..atomic import write_json
from ..data import batch_to_device
from ..errors import SmartTrimError
from . import flops as fl
from . import latency as lt
from . import objects
from . import report as rp
from .runner import ProfileResult, _div, _item_id, _mb, _stats, default_out_dir, progress_bar  # runner imports us lazily

GEN_BATCH = 8                       # the batched throughput/memory measurement (LLaVA serving's usual size)
VQA_LIKE = ("vqa", "easyvqa", "scenes")  # datasets whose questions get the short-answer instruction (LLaVA-1.5 eval)


def _nanmean_pct(values):
    v = [x for x in values if x is not None and not math.isnan(x)]
    return float(np.mean(v) * 100.0) if v else None


def _none_nan(x):
    return None if x is None or math.isnan(x) else float(x)


def kept_tokens(ctx) -> int:
    """Image tokens kept by the last token trimmer of a recorded batch-1 context (a decoder VLM trims only the
    image tokens entering its LM; decisions are (1, N) masks in the original positions)."""
    keys = [k for k in ctx.decisions if k.startswith("tok:")]
    if not keys:
        raise SmartTrimError("the model recorded no token decisions: nothing is trimmed")
    return int(ctx.decisions[keys[-1]].sum())


def check_options(s) -> None:
    """Options that only mean something for classifier heads: one-line errors (exit 2)."""
    bad = [name for name, given in (("--sweep", bool(s.sweep)), ("--show", int(s.show) > 0),
                                    ("--batch-mode", s.batch_mode != "auto")) if given]
    if bad:
        raise SmartTrimError(f"{', '.join(bad)}: not available for a text-generating model (classification "
                             "heads only)")
    if int(s.max_new_tokens) < 1:
        raise SmartTrimError(f"--max-new-tokens must be >= 1, got {s.max_new_tokens}")


def open_split(s, loaded):
    from ..data import canonical_name, open_dataset

    key = "vqa" if str(s.dataset).strip().lower() == "scenes" else canonical_name(s.dataset)  # scenes: VQAv2 layout
    if key not in VQA_LIKE + ("prompts",):  # the ones with free-form questions
        raise SmartTrimError(f"--dataset {s.dataset}: a text-generating model is profiled on vqa, scenes, easyvqa "
                             "or prompts")
    split = s.split or {"easyvqa": "test", "prompts": "prompts"}.get(key, "val")
    # generated answers are scored against the raw answers; a one-entry placeholder vocabulary keeps VQAv2 from
    # building one (which needs its train split), its targets are unused
    ds = open_dataset(key, s.data_dir, split, image_size=loaded.model.config.image_size,
                      label2id={"yes": 0} if key == "vqa" else None, limit=s.limit, skip_bad=s.skip_bad,
                      preprocess=loaded.image_preprocessor())
    if len(ds) == 0:
        raise SmartTrimError(f"{s.dataset} {split}: no inputs to profile")
    return ("scenes" if key == "vqa" and str(s.dataset).strip().lower() == "scenes" else key), split, ds


def chat_processor(source):
    """The whole processor (chat template, image token, patch size): a model directory keeps it in tokenizer/
    (attach saves what the family loaded), a transformers directory at its root."""
    from ..data.generative import load_chat_processor

    sub = Path(source) / "tokenizer"
    return load_chat_processor(sub if (sub / "processor_config.json").is_file() else source)


def prompt_inputs(loaded, name: str):
    """(processor, collate, instruction) building a text model's generation inputs for dataset ``name``: one
    chat prompt per item, the short-answer instruction on VQA-like sets (profile and compare share them)."""
    from ..data.generative import VQA_SHORT_ANSWER, GenerativeCollate

    instruction = VQA_SHORT_ANSWER if name in VQA_LIKE else None
    processor = chat_processor(loaded.source)
    return processor, GenerativeCollate(processor, mode="generate", instruction=instruction), instruction


def answer_text(processor, new_ids) -> str:
    """The first answer of ``generate``'s output (the new tokens only), decoded."""
    from ..data.generative import generated_texts

    return generated_texts(processor, new_ids, 0)[0]


class Generator:
    """One model's greedy ``generate`` on collated batches (``trimmed``: hard mode at ``threshold``)."""

    def __init__(self, model, trimmed: bool, threshold: float, record: bool = False):
        # record: the prefill's decisions in model.last_ctx (per-input profiling, not timing)
        self.model, self.trimmed, self.threshold, self.record = model, trimmed, threshold, record

    def __call__(self, b, n, force=False):
        kw = {"min_new_tokens": n} if force else {}
        if self.trimmed:
            return self.model.generate(b, mode="hard", threshold=self.threshold, max_new_tokens=n, do_sample=False,
                                       record=self.record, **kw)
        return self.model.generate(b, mode="full", max_new_tokens=n, do_sample=False, **kw)


def _timed(fn, device) -> float:
    lt.sync(device)
    t0 = time.perf_counter()
    fn()
    lt.sync(device)
    return time.perf_counter() - t0


def measure_speed(gen: Generator, singles, batches, n_new, warmup, device) -> dict:
    """TTFT, end-to-end, decode tokens/s at batch 1 (each input timed as TTFT then end to end, paired), then
    throughput of the batched inputs. Seconds lists, so summaries are the caller's."""
    for b in singles[:max(1, min(warmup, len(singles)))]:
        gen(b, 1)
        gen(b, n_new, force=True)
    ttft, e2e = [], []
    for b in singles:
        ttft.append(_timed(lambda: gen(b, 1), device))
        e2e.append(_timed(lambda: gen(b, n_new, force=True), device))
    dec = sum(e - t for e, t in zip(e2e, ttft))
    out = {"ttft": ttft, "e2e": e2e,
           "decode_tokens_per_s": (n_new - 1) * len(singles) / dec if n_new > 1 and dec > 0 else None,
           "batch_1": {"inputs_per_s": len(e2e) / sum(e2e), "tokens_per_s": n_new * len(e2e) / sum(e2e),
                       "seconds": float(sum(e2e)), "inputs": len(e2e)}}
    gen(batches[0], n_new, force=True)  # warm-up at this batch size
    secs = [_timed(lambda: gen(b, n_new, force=True), device) for b in batches]
    k = sum(int(b["input_ids"].shape[0]) for b in batches)
    out["batch_n"] = {"inputs_per_s": k / sum(secs), "tokens_per_s": n_new * k / sum(secs),
                      "seconds": float(sum(secs)), "inputs": k}
    return out


def run_generation(s, loaded, ref, ref_model, device, threads, console, t_start):
    from ..backbones import family_of
    from ..data.vqa_answers import normalize_answer
    from ..metrics import generated_exact_match, generated_vqa_score

    check_options(s)
    model = loaded.model
    cfg = model.config
    threshold = float(model.threshold if s.threshold is None else s.threshold)
    name, split, ds = open_split(s, loaded)
    processor, collate, instruction = prompt_inputs(loaded, name)
    n = len(ds)
    n_new = int(s.max_new_tokens)
    fv_n = n if s.fvcore_limit is None else min(n, int(s.fvcore_limit))
    out_dir = Path(s.out_dir) if s.out_dir else default_out_dir()
    full_gen = Generator(ref_model or model, False, threshold)
    trim_gen = Generator(model, True, threshold)
    trim_rec = Generator(model, True, threshold, record=True)
    same_gen = Generator(model, False, threshold)
    N = family_of(model).image_tokens(cfg)

    def one(item):
        return batch_to_device(collate([item]), device)

    def answer(gen, b):
        ids = gen(b, n_new)
        return answer_text(processor, ids), ids  # generate returns the new tokens only

    rows, items = [], []
    with progress_bar(console) as prog, torch.no_grad():
        tid = prog.add_task("per-input answers and prefill cost", total=n)
        for i in range(n):
            item = ds[i]
            b = one(item)
            mb = {k: b[k] for k in model.input_names}
            _, cf = model.run(mb, mode="full", record=True)
            _, ch = model.run(mb, mode="hard", threshold=threshold, record=True)
            t_full, _ = answer(full_gen, b)
            t_trim, _ = answer(trim_rec, b)
            kept = kept_tokens(model.last_ctx)
            if kept != kept_tokens(ch):  # generate and the costed forward must take one decision
                raise SmartTrimError(f"input {i}: generate kept {kept} image tokens, the prefill forward "
                                     f"{kept_tokens(ch)}")
            t_same = t_full if ref_model is None else answer(same_gen, b)[0]
            answers = list(item.get("answers") or [])
            row = {"index": i, "id": _item_id(item), "text_tokens": int(b["attention_mask"].sum()) - N,
                   "gmacs_full": fl.cost_model_macs(cf.records)[0] / 1e9,
                   "gmacs_trimmed": fl.cost_model_macs(ch.records)[0] / 1e9,
                   "fvcore_gmacs_full": None, "fvcore_gmacs_trimmed": None,
                   "image_tokens_final": kept, "image_tokens_full": N, "image_keep_ratio": kept / N,
                   "score_full": _none_nan(generated_vqa_score(t_full, answers)),
                   "score_trimmed": _none_nan(generated_vqa_score(t_trim, answers)),
                   "exact_full": _none_nan(generated_exact_match(t_full, answers)),
                   "exact_trimmed": _none_nan(generated_exact_match(t_trim, answers)),
                   "pred_full": normalize_answer(t_full), "pred_trimmed": normalize_answer(t_trim),
                   "pred_full_label": t_full, "pred_trimmed_label": t_trim,
                   "score_same_weights_full": _none_nan(generated_vqa_score(t_same, answers)),
                   "pred_same_weights_full": normalize_answer(t_same)}
            if i < fv_n:
                row["fvcore_gmacs_full"] = fl.fvcore_macs(model, mb, mode="full") / 1e9
                row["fvcore_gmacs_trimmed"] = fl.fvcore_macs(model, mb, mode="hard", threshold=threshold) / 1e9
            rows.append(row)
            items.append(item)
            prog.advance(tid)

    # timings: the first `iters` inputs at batch 1, `throughput_batches` batches of GEN_BATCH (cycling)
    n_lat = min(n, int(s.iters))
    B = min(GEN_BATCH, n)
    singles = [one(items[i]) for i in range(n_lat)]
    order = [i % n for i in range(B * int(s.throughput_batches))]
    batches = [batch_to_device(collate([items[i] for i in order[k:k + B]]), device) for k in range(0, len(order), B)]
    with torch.no_grad(), progress_bar(console) as prog:
        tid = prog.add_task("generation timing", total=2)
        # "full" timings are the profiled weights at full capacity: the reference's architecture, as for classifiers
        sp_full = measure_speed(same_gen, singles, batches, n_new, int(s.warmup), device)
        prog.advance(tid)
        sp_trim = measure_speed(trim_gen, singles, batches, n_new, int(s.warmup), device)
        prog.advance(tid)
        mem = {k: {"batch_1": _mb(lt.peak_memory_bytes(lambda g=g: g(singles[0], n_new, force=True), device)),
                   "batch_n": _mb(lt.peak_memory_bytes(lambda g=g: g(batches[0], n_new, force=True), device))}
               for k, g in (("full", same_gen), ("trimmed", trim_gen))}

    scenes = objects.SceneIndex.for_dataset(ds)
    objects.annotate(rows, scenes)
    report = _assemble(s, loaded, ref, name, split, ds, threshold, device, threads, B, fv_n, n_new, instruction,
                       rows, sp_full, sp_trim, mem, N)
    report["objects"] = objects.summary(rows, scenes, N) if scenes is not None else None
    files = {"json": str(Path(s.json_path) if s.json_path else out_dir / "report.json"), "flops_hist": None,
             "layers": None, "pareto": None, "show": []}
    from . import plots

    files["flops_hist"] = str(plots.flops_histogram(
        Path(s.plot_path) if s.plot_path else out_dir / "flops_hist.png", [r["gmacs_trimmed"] for r in rows],
        [r["gmacs_full"] for r in rows], title=f"{Path(report['settings']['model_dir']).name} on {name}/{split}: "
        f"prefill cost at threshold {threshold:g}", convention="cost model, fvcore convention"))
    report["files"] = files
    report["gate"] = rp.evaluate_gate(report, s.min_speedup, s.max_drop, s.speedup_metric)
    report["machine"]["load_average"] = lt.machine_info(device)["load_average"]
    report["wall_seconds"] = time.perf_counter() - t_start
    write_json(files["json"], report, allow_nan=False)
    return ProfileResult(report, files)


def _pair(full, trim, speed):
    return {"full": full, "trimmed": trim, "speedup": speed}


def _assemble(s, loaded, ref, name, split, ds, threshold, device, threads, B, fv_n, n_new, instruction, rows,
              spf, spt, mem, N) -> dict:
    model = loaded.model
    cfg = model.config
    n = len(rows)
    use_fv = fv_n == n
    g_full = [r["fvcore_gmacs_full" if use_fv else "gmacs_full"] for r in rows]
    g_trim = [r["fvcore_gmacs_trimmed" if use_fv else "gmacs_trimmed"] for r in rows]
    rel = [abs(r[a] - r[b]) / r[a] if r[a] else 0.0 for r in rows[:fv_n]
           for a, b in (("fvcore_gmacs_full", "gmacs_full"), ("fvcore_gmacs_trimmed", "gmacs_trimmed"))]
    fstats, tstats = _stats(g_full), _stats(g_trim)
    ratio = _div(tstats["mean"], fstats["mean"])
    sc_full, sc_trim = _nanmean_pct(r["score_full"] for r in rows), _nanmean_pct(r["score_trimmed"] for r in rows)
    sc_same = _nanmean_pct(r["score_same_weights_full"] for r in rows)
    em_full, em_trim = _nanmean_pct(r["exact_full"] for r in rows), _nanmean_pct(r["exact_trimmed"] for r in rows)
    drop = None if sc_full is None or sc_trim is None else sc_full - sc_trim
    ttf, ttt = lt.summarize_ms(spf["ttft"]), lt.summarize_ms(spt["ttft"])
    e2f, e2t = lt.summarize_ms(spf["e2e"]), lt.summarize_ms(spt["e2e"])
    ttft_speed = _div(ttf["p50"], ttt["p50"])
    tp_speed = _div(spt["batch_n"]["inputs_per_s"], spf["batch_n"]["inputs_per_s"])
    kept = [r["image_tokens_final"] for r in rows]
    tc = model.trim_config
    weights = _mb(lt.param_bytes(model))
    mem_method = ("torch.cuda.max_memory_allocated minus memory allocated before the generate call"
                  if device.type == "cuda" else
                  "torch.profiler (profile_memory) running sum of tensor allocations during the generate call")
    return {
        "schema": rp.SCHEMA, "schema_version": rp.SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": s.command or " ".join(sys.argv), "wall_seconds": None, "convention": rp.CONVENTION,
        "machine": lt.machine_info(device), "versions": lt.versions(),
        "settings": {"model_dir": str(loaded.source), "dataset": name, "data_dir": str(getattr(ds, "data_dir",
                     s.data_dir)), "split": split, "limit": s.limit, "n_inputs": n,
                     "skipped": dict(getattr(ds, "skipped", {}) or {}), "threshold": threshold,
                     "reference": None if s.reference is None else str(s.reference), "sweep": [],
                     "device": str(device), "threads": threads, "batch_size": B, "warmup": int(s.warmup),
                     "iters": int(s.iters), "throughput_batches": int(s.throughput_batches), "fvcore_inputs": fv_n,
                     "batch_mode": "pad", "max_new_tokens": n_new},
        "model": {"backbone": model.family, "task": cfg.task, "image_size": cfg.image_size,
                  "patch_size": cfg.patch_size, "image_tokens": N, "max_text_len": cfg.max_text_len,
                  "params": sum(p.numel() for p in model.backbone_parameters()),
                  "params_trimmers": sum(p.numel() for p in model.trimmer_parameters()), "weights_mb": weights,
                  "token_layers": {k: v for k, v in (tc.token_layers if tc else {}).items() if v},
                  "head_layers": {k: v for k, v in (tc.head_layers if tc else {}).items() if v},
                  "default_threshold": float(model.threshold)},
        "accuracy": {"metric": "vqa_score_generated", "full": sc_full, "trimmed": sc_trim, "drop": drop,
                     "agreement": float(np.mean([r["pred_full"] == r["pred_trimmed"] for r in rows]) * 100.0),
                     "reference": ref.to_dict(), "same_weights_full": sc_same,
                     "same_weights_drop": None if sc_same is None or sc_trim is None else sc_same - sc_trim,
                     "recall": None},
        "flops": {"unit": "GMACs", "source": "fvcore" if use_fv else "cost_model", "full": fstats, "trimmed": tstats,
                  "ratio": ratio, "speedup": _div(1.0, ratio),
                  "fvcore_check": {"n_inputs": fv_n, "max_rel_diff": max(rel) if rel else None,
                                   "mean_rel_diff": float(np.mean(rel)) if rel else None}},
        "latency": {"batch_size": 1, "warmup": int(s.warmup), "iters": len(spf["ttft"]),
                    "distinct_inputs": len(spf["ttft"]), "full": ttf, "trimmed": ttt, "speedup": ttft_speed},
        "throughput": {"batch_size": B, "batches": int(s.throughput_batches), "full": spf["batch_n"],
                       "trimmed": dict(spt["batch_n"], mode="pad"), "modes": {"pad": spt["batch_n"]},
                       "speedup": tp_speed},
        "memory": {"unit": "MB", "method": mem_method, "weights_mb": weights, "full": mem["full"],
                   "trimmed": mem["trimmed"]},
        "ratios": {"gmacs": ratio, "latency_p50": _div(ttt["p50"], ttf["p50"]), "throughput": tp_speed,
                   "memory_batch_1": _div(mem["trimmed"]["batch_1"], mem["full"]["batch_1"]),
                   "memory_batch_n": _div(mem["trimmed"]["batch_n"], mem["full"]["batch_n"])},
        "speedup": {"gmacs": _div(1.0, ratio), "latency": ttft_speed, "throughput": tp_speed},
        "layers": [], "sweep": [], "per_input": rows, "objects": None, "gate": None, "files": None,
        "generation": {
            "max_new_tokens": n_new, "instruction": instruction,
            "exact_match": {"full": em_full, "trimmed": em_trim,
                            "drop": None if em_full is None or em_trim is None else em_full - em_trim},
            "image_tokens": {"full": N, "kept": _stats(kept), "keep_ratio": float(np.mean(kept)) / N},
            "prefill_gmacs": {"full": _stats(r["gmacs_full"] for r in rows),
                              "trimmed": _stats(r["gmacs_trimmed"] for r in rows)},
            "ttft_ms": _pair(ttf, ttt, ttft_speed),
            "e2e_ms": _pair(e2f, e2t, _div(e2f["p50"], e2t["p50"])),
            "decode_tokens_per_s": _pair(spf["decode_tokens_per_s"], spt["decode_tokens_per_s"],
                                         _div(spt["decode_tokens_per_s"], spf["decode_tokens_per_s"])),
            "throughput": {"batch_1": _pair(spf["batch_1"], spt["batch_1"],
                                            _div(spt["batch_1"]["inputs_per_s"], spf["batch_1"]["inputs_per_s"])),
                           "batch_n": _pair(spf["batch_n"], spt["batch_n"], tp_speed), "batch_size": B},
            "peak_memory_mb": {"method": mem_method + " (activations and KV cache; weights excluded)",
                               "batch_1": {k: mem[k]["batch_1"] for k in mem},
                               "batch_n": {k: mem[k]["batch_n"] for k in mem}},
        },
    }
