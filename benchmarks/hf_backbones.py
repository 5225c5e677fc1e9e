"""BLIP-base and ViLT-B/32 on the trimmable core: GMACs and CPU latency, full vs trimmed at fixed keep ratios.

Configurations (random weights, real sizes; the shapes of the released checkpoints' config.json):
- ``vilt-vqa``: ViLT-B/32 (dandelin/vilt-b32-finetuned-vqa): 12 layers x 768, 384² -> 144 patches + CLS,
  3129 answers. One token trimmer on the image stream at joint layer ``--trim-layer``.
- ``blip-itm``: BLIP ViT-B/16 at 384² (576 patches + CLS, 12 blocks) + 12-layer BERT text encoder with
  cross-attention (12 heads), ITM head. One token trimmer in the ViT at block ``--trim-layer``; the text
  encoder then cross-attends to the kept image tokens only.
- ``blip-vqa``: the same encoder + the answer decoder ranking ``--answers`` candidates of
  ``--answer-len`` tokens with BLIP's two stages (first token picks ``--rank-k``, these are scored in
  full). The answer tokens are synthetic (random ids, lengths 1-4 words): no tokenizer is downloaded.

Trimming: ``model.run(batch, mode="hard", keep_ratio=r)`` — the trimmer keeps the ceil(r x N) top-scoring
image tokens (CLS always kept), which flow through every later layer. No head trimming. Ratio 1.0 runs
the trimmer and the gather but keeps every token (their overhead). Baseline: mode="full".

Measured: GMACs per input (cost model, fvcore convention, equal to fvcore's count of the same forward:
tests/test_blip.py, tests/test_vilt.py), batch-1 latency (median over timed calls, settings timed
round-robin so that load from other processes hits all alike), torch threads as given. Nothing is
asserted; the script prints a Markdown table and saves JSON.

    python benchmarks/hf_backbones.py [--threads 2] [--ratios 1.0,0.5,0.33] [--models vilt-vqa,blip-itm,blip-vqa]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from smarttrim_cli.atomic import write_json
from smarttrim_cli.backbones.blip import BlipConfig, BlipModel
from smarttrim_cli.backbones.vilt import ViltConfig, ViltModel
from smarttrim_cli.trim.config import TrimConfig
from smarttrim_cli.trim.cost import total_macs


def build(name: str, a) -> tuple:
    torch.manual_seed(0)
    if name == "vilt-vqa":
        m = ViltModel(ViltConfig(num_labels=3129))
        m.attach_trimmers(TrimConfig(token_layers={"ximage": [a.trim_layer]}, head_layers={}))
    else:
        task = "vqa" if name == "blip-vqa" else "retrieval"
        cfg = BlipConfig(task=task, num_labels=a.answers if task == "vqa" else 2,
                         answer_len=a.answer_len if task == "vqa" else 0, rank_k=a.rank_k)
        m = BlipModel(cfg)
        if task == "vqa":  # synthetic answers: [DEC] w1..wk [SEP] pad, k in 1..answer_len-2
            g = torch.Generator().manual_seed(2)
            A, L = cfg.num_labels, cfg.answer_len
            lens = torch.randint(1, L - 1, (A,), generator=g)
            ids = torch.randint(1000, 30000, (A, L), generator=g)
            pos = torch.arange(L).unsqueeze(0)
            mask = (pos <= lens.unsqueeze(1) + 1).long()
            ids = torch.where(pos == lens.unsqueeze(1) + 1, torch.full_like(ids, cfg.sep_token_id), ids) * mask
            ids[:, 0] = cfg.bos_token_id
            m.answer_ids.copy_(ids)
            m.answer_mask.copy_(mask)
        m.attach_trimmers(TrimConfig(token_layers={"vision": [a.trim_layer]}, head_layers={}))
    return m.eval()


def make_batch(m, T: int) -> dict:
    c = m.config
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 29000, (1, T), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    return {"pixel_values": torch.randn(1, 3, c.image_size, c.image_size, generator=g), "input_ids": ids,
            "attention_mask": torch.ones(1, T, dtype=torch.long)}


def run(m, b, ratio, record=False):
    if ratio is None:
        return m.run(b, mode="full", record=record)
    return m.run(b, mode="hard", keep_ratio=ratio, record=record)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="vilt-vqa,blip-itm,blip-vqa")
    ap.add_argument("--ratios", default="1.0,0.5,0.33")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--text-len", type=int, default=12)
    ap.add_argument("--trim-layer", type=int, default=2)
    ap.add_argument("--answers", type=int, default=3128)
    ap.add_argument("--answer-len", type=int, default=6)
    ap.add_argument("--rank-k", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--json", default="benchmarks/results/hf_backbones.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ratios = [float(r) for r in a.ratios.split(",")]
    sets = [("full", None)] + [(f"keep_{r:g}", r) for r in ratios]
    out = {"settings": vars(a), "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                            "torch": torch.__version__, "threads": a.threads,
                                            "load_avg_start": os.getloadavg()}, "models": {}}
    for name in a.models.split(","):
        m = build(name, a)
        b = make_batch(m, a.text_len)
        res = {}
        with torch.no_grad():
            for label, r in sets:
                _, ctx = run(m, b, r, record=True)
                macs = float(total_macs(ctx.records)[0])
                enc = sum(float(total_macs([x])[0]) for x in ctx.records
                          if not x.name.startswith(("answers/", "first_token/")))
                res[label] = {"gmacs": macs / 1e9, "encoder_gmacs": enc / 1e9, "times": []}
            for _ in range(a.warmup):
                for _, r in sets:
                    run(m, b, r)
            for _ in range(a.iters):  # round-robin
                for label, r in sets:
                    t0 = time.perf_counter()
                    run(m, b, r)
                    res[label]["times"].append(time.perf_counter() - t0)
        full = res["full"]
        for label, v in res.items():
            v["latency_ms"] = 1000 * statistics.median(v["times"])
            v["gmacs_reduction"] = full["gmacs"] / v["gmacs"]
            v["encoder_gmacs_reduction"] = full["encoder_gmacs"] / v["encoder_gmacs"]
            v["latency_speedup"] = full["latency_ms"] / v["latency_ms"]
        out["models"][name] = res
        print(f"\n{name} (batch 1, text {a.text_len} tokens, {a.threads} threads)")
        print("| setting | GMACs | encoder GMACs | GMAC cut | latency ms (median) | speed-up |")
        print("|---|---|---|---|---|---|")
        for label, v in res.items():
            print(f"| {label} | {v['gmacs']:.2f} | {v['encoder_gmacs']:.2f} | {v['gmacs_reduction']:.2f}x | "
                  f"{v['latency_ms']:.0f} | {v['latency_speedup']:.2f}x |")
        del m
    out["machine"]["load_avg_end"] = os.getloadavg()
    if a.json:
        p = write_json(a.json, out)
        print(f"\nsaved {p}")


if __name__ == "__main__":
    main()
