"""Does a GMAC cut become a wall-clock cut? METER-sized model, CPU, fixed keep ratios of image tokens.

Configuration: METER with random weights at the size of the released model: CLIP ViT-B/16 visual
tower (11 blocks) at 288² (325 image tokens), RoBERTa-base text encoder (12 layers), 6 co-attention
layers per stream, VQA head (3129 answers). One text of ``--text-len`` real tokens (no padding).

Trimming: ONE token trimmer on the image stream, at vision layer ``--trim-layer`` (default 2, the first
image token trimmer of the default trim config), run with ``model.run(..., mode="hard", keep_ratio=r)``:
top-k of the trimmer's scores keeps ceil(r x 325) image tokens ([CLS] always kept), which then flow
through the remaining vision blocks and the cross-modal image stream. No head trimming, no text
trimming. So "keep ratio r" means: r of the image tokens survive from that layer on.
Ratio 1.0 runs the trimmer and the gather but keeps every token (measures their overhead).
Baseline: the untouched model (mode="full") on the same input.

Measured per ratio: GMACs per input (cost model, fvcore convention; equals fvcore's count, see
tests/test_core_invariants.py), batch-1 latency and batch-N throughput (seconds per batch). Speedups
use the minimum over the timed calls by default (``--stat``: best of N, as timeit recommends on a
machine shared with other processes); medians are saved too. The settings are timed round-robin
(full, r1, r2, ... each round) so that load from other processes hits all of them alike. Goal (issue): latency
speedup >= 0.85 x GMAC reduction at batch 1, throughput speedup >= 0.7 x at batch 16. Nothing is
asserted; the script prints and saves JSON.

    python benchmarks/latency_meter.py [--threads 2] [--ratios 1.0,0.5,0.33] [--json benchmarks/results/latency_meter.json]
    python benchmarks/latency_meter.py --threads 1 --clock cpu --json ...   # on a busy shared machine
    python benchmarks/latency_meter.py --profile-ops      # where the time goes in the trimmed forward
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from smarttrim_cli.atomic import write_json
from smarttrim_cli.backbones.meter import MeterConfig, MeterModel
from smarttrim_cli.trim.config import TrimConfig
from smarttrim_cli.trim.cost import total_macs


def build(image_size: int, trim_layer: int) -> MeterModel:
    torch.manual_seed(0)
    cfg = MeterConfig(task="vqa", num_labels=3129, image_size=image_size)
    m = MeterModel(cfg)
    m.attach_trimmers(TrimConfig(token_layers={"vision": [trim_layer]}, head_layers={}))
    return m.eval()


def make_batch(cfg: MeterConfig, B: int, T: int) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, cfg.vocab_size, (B, T), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2  # <s> ... </s>
    return {"pixel_values": torch.randn(B, 3, cfg.image_size, cfg.image_size, generator=g),
            "input_ids": ids, "attention_mask": torch.ones(B, T, dtype=torch.long)}


def settings(ratios):
    return [("full", None)] + [(f"keep_{r:g}", r) for r in ratios]


def call(model, batch, ratio):
    if ratio is None:
        return model.run(batch, mode="full")
    return model.run(batch, mode="hard", keep_ratio=ratio)


def gmacs(model, ratio, cfg, T) -> dict:
    with torch.no_grad():
        _, ctx = (model.run(make_batch(cfg, 1, T), mode="full", record=True) if ratio is None else
                  model.run(make_batch(cfg, 1, T), mode="hard", keep_ratio=ratio, record=True))
    out = {"gmacs": float(total_macs(ctx.records)[0]) / 1e9}
    if ratio is not None:
        kept = [float(r.n[0]) for r in ctx.records if r.name.startswith("ximage_")]
        out["image_tokens_kept"] = kept[0] if kept else None
    return out


def timed_round_robin(model, batch, sets, warmup: int, iters: int, clock=time.perf_counter) -> dict:
    """{name: [seconds per call]}; each round calls every setting once, in a rotating order."""
    with torch.no_grad():
        for _ in range(warmup):
            for _, r in sets:
                call(model, batch, r)
        times = {name: [] for name, _ in sets}
        for it in range(iters):
            order = sets[it % len(sets):] + sets[:it % len(sets)]
            for name, r in order:
                t0 = clock()
                call(model, batch, r)
                times[name].append(clock() - t0)
    return times


def profile_ops(model, cfg, T, ratio, top=18):
    from torch.profiler import ProfilerActivity, profile

    b = make_batch(cfg, 1, T)
    with torch.no_grad():
        for _ in range(2):
            call(model, b, ratio)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                call(model, b, ratio)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--image-size", type=int, default=288)
    ap.add_argument("--text-len", type=int, default=16)
    ap.add_argument("--trim-layer", type=int, default=2)
    ap.add_argument("--ratios", default="1.0,0.5,0.33")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--b1-warmup", type=int, default=5)
    ap.add_argument("--b1-iters", type=int, default=10)
    ap.add_argument("--bn-warmup", type=int, default=1)
    ap.add_argument("--bn-iters", type=int, default=3)
    ap.add_argument("--skip-batched", action="store_true")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: perf_counter; cpu: process CPU time (time.process_time), which other processes "
                         "on a shared machine barely disturb; use it with --threads 1 (with more threads it "
                         "adds up every thread's busy and spin-wait time)")
    ap.add_argument("--stat", choices=("min", "median"), default="min",
                    help="statistic of the timed calls the speedups use (min: best of N, timeit's convention, "
                         "the least disturbed by other processes on a shared machine); both are saved")
    ap.add_argument("--profile-ops", action="store_true", help="print a torch.profiler op table and exit")
    ap.add_argument("--json", default="benchmarks/results/latency_meter.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ratios = [float(x) for x in a.ratios.split(",")]
    model = build(a.image_size, a.trim_layer)
    cfg = model.config
    if a.profile_ops:
        for r in (None, ratios[-1]):
            print(f"--- {'full' if r is None else f'keep_ratio {r}'} (batch 1) ---")
            profile_ops(model, cfg, a.text_len, r)
        return
    sets = settings(ratios)
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    cost = {name: gmacs(model, r, cfg, a.text_len) for name, r in sets}
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    b1 = timed_round_robin(model, make_batch(cfg, 1, a.text_len), sets, a.b1_warmup, a.b1_iters, clock)
    bn = None if a.skip_batched else timed_round_robin(model, make_batch(cfg, a.batch, a.text_len), sets,
                                                       a.bn_warmup, a.bn_iters, clock)
    rows = []
    full_g = cost["full"]["gmacs"]
    stat = min if a.stat == "min" else statistics.median
    full_b1 = stat(b1["full"])
    full_bn = stat(bn["full"]) if bn else None
    for name, r in sets:
        g = cost[name]["gmacs"]
        red = full_g / g
        lat = stat(b1[name])
        row = {"setting": name, "keep_ratio": r, "gmacs": g, "gmac_reduction": red,
               "image_tokens_kept": cost[name].get("image_tokens_kept"),
               "b1_latency_ms": lat * 1e3, "b1_latency_ms_p50": statistics.median(b1[name]) * 1e3,
               "b1_latency_ms_min": min(b1[name]) * 1e3, "b1_latency_ms_all": [t * 1e3 for t in b1[name]],
               "b1_speedup": full_b1 / lat, "b1_speedup_over_gmac_reduction": full_b1 / lat / red,
               "b1_speedup_p50": statistics.median(b1["full"]) / statistics.median(b1[name])}
        if bn:
            sec = stat(bn[name])
            row.update({f"b{a.batch}_seconds_per_batch": sec, f"b{a.batch}_inputs_per_s": a.batch / sec,
                        f"b{a.batch}_seconds_all": bn[name], f"b{a.batch}_speedup": full_bn / sec,
                        f"b{a.batch}_speedup_over_gmac_reduction": full_bn / sec / red,
                        f"b{a.batch}_speedup_p50": statistics.median(bn["full"]) / statistics.median(bn[name])})
        if r is not None:
            row["goal_b1_met"] = row["b1_speedup"] >= 0.85 * red
            if bn:
                row[f"goal_b{a.batch}_met"] = row[f"b{a.batch}_speedup"] >= 0.7 * red
        rows.append(row)
    out = {
        "benchmark": "latency_meter", "config": "METER: CLIP ViT-B/16 (11 blocks) + RoBERTa-base + 6 co-attention "
        "layers, VQA head, random weights", "image_size": a.image_size, "image_tokens": cfg.n_patches + 1,
        "text_len": a.text_len, "trim": f"one image token trimmer at vision layer {a.trim_layer}, top-k keep_ratio; "
        "no head or text trimming", "baseline": "mode=full (untouched model)",
        "threads": torch.get_num_threads(), "batch": a.batch, "statistic": a.stat,
        "clock": "time.process_time (process CPU time)" if a.clock == "cpu" else "time.perf_counter (wall)",
        "b1": {"warmup_rounds": a.b1_warmup, "timed_rounds": a.b1_iters},
        "batched": None if bn is None else {"warmup_rounds": a.bn_warmup, "timed_rounds": a.bn_iters},
        "goal": "b1 latency speedup >= 0.85 x GMAC reduction; batch-16 throughput speedup >= 0.7 x",
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "load_average_before": load_before, "load_average_after": os.getloadavg(),
                    "note": "2 CPU cores shared with other engineers' processes during the run"},
        "wall_seconds": time.perf_counter() - t_start, "results": rows,
    }
    print(f"METER-sized, {a.image_size}² ({cfg.n_patches + 1} image tokens), text {a.text_len}, "
          f"{torch.get_num_threads()} threads, {a.clock} clock, {a.stat} of the timed calls, load avg before {load_before[0]:.2f} "
          f"after {os.getloadavg()[0]:.2f}")
    hdr = f"{'setting':>10} {'GMACs':>8} {'reduct.':>8} {'b1 ms':>8} {'b1 x':>6} {'b1 x/red':>8}"
    if bn:
        hdr += f" {'b%d in/s' % a.batch:>9} {'b%d x' % a.batch:>6} {'x/red':>6}"
    print(hdr)
    for row in rows:
        line = (f"{row['setting']:>10} {row['gmacs']:8.2f} {row['gmac_reduction']:8.2f} {row['b1_latency_ms']:8.1f} "
                f"{row['b1_speedup']:6.2f} {row['b1_speedup_over_gmac_reduction']:8.2f}")
        if bn:
            line += (f" {row[f'b{a.batch}_inputs_per_s']:9.2f} {row[f'b{a.batch}_speedup']:6.2f} "
                     f"{row[f'b{a.batch}_speedup_over_gmac_reduction']:6.2f}")
        print(line)
    if a.json:
        p = write_json(a.json, out)
        print(f"written {p}")


if __name__ == "__main__":
    main()
