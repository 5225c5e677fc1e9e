"""Parameters added by the trimmers and full-model GMACs (cost model vs fvcore) for a METER-sized
configuration: CLIP-B/16 at 288², RoBERTa-base, 6 co-attention layers, random weights.

    python benchmarks/meter_size.py [--image-size 288] [--text-len 50] [--json benchmarks/results/meter_size.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from fvcore.nn import FlopCountAnalysis

from smarttrim_cli.attach import dummy_batch, summary
from smarttrim_cli.backbones.meter import MeterConfig, MeterModel, default_trim_config
from smarttrim_cli.trim.cost import total_macs


class _Fwd(torch.nn.Module):
    def __init__(self, m, mode):
        super().__init__()
        self.m, self.mode = m, mode

    def forward(self, px, ids, mask):
        return self.m(px, ids, mask, ctx=self.m.make_context(mode=self.mode))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--image-size", type=int, default=288)
    ap.add_argument("--text-len", type=int, default=50)
    ap.add_argument("--json", default="benchmarks/results/meter_size.json")
    a = ap.parse_args()
    torch.manual_seed(0)
    cfg = MeterConfig(task="vqa", num_labels=3129, image_size=a.image_size, max_text_len=a.text_len)
    model = MeterModel(cfg)
    model.attach_trimmers(default_trim_config(cfg))
    model.eval()
    s = summary(model)
    b = dummy_batch(model, a.text_len)
    out = {"config": "CLIP-B/16 + RoBERTa-base + 6 co-attention layers (METER), random weights",
           "image_size": a.image_size, "text_len": a.text_len, "machine": platform.platform(),
           "torch": torch.__version__, "threads": torch.get_num_threads(),
           "params_backbone": s["params_backbone"], "params_added": s["params_added"],
           "params_added_pct": s["params_added_pct"], "trim_config": model.trim_config.to_dict()}
    with torch.no_grad():
        for mode in ("full", "hard"):
            _, ctx = model.run(b, mode=mode, record=True)
            fa = FlopCountAnalysis(_Fwd(model, mode), (b["pixel_values"], b["input_ids"], b["attention_mask"]))
            fa.unsupported_ops_warnings(False)
            fa.uncalled_modules_warnings(False)
            t = time.perf_counter()
            counted = fa.total()
            out[f"{mode}_gmacs_cost_model"] = float(total_macs(ctx.records)[0]) / 1e9
            out[f"{mode}_gmacs_fvcore"] = counted / 1e9
            out[f"{mode}_fvcore_seconds"] = time.perf_counter() - t
    out["note"] = ("hard = fresh trimmers (keep everything at threshold 0.5): the full cost plus the trimmers' own "
                   "cost; GMACs in fvcore's convention (one multiply-add = 1)")
    print(json.dumps(out, indent=2))
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
