"""Prefill time and time to first token of a LLaVA-1.5-sized model at image-token keep ratios 1, 0.5, 0.25, 0.11,
against the prefill GMAC cut the cost model predicts (issue 17's goal: prefill speed-up >= 0.85x the GMAC cut).

    python benchmarks/llava_prefill.py [--text qwen2|llama] [--text-hidden 896] [--text-layers 24] [--device cpu]
                                       [--dtype float32] [--threads N] [--repeats 5] [--quick]
                                       [--json benchmarks/results/llava_prefill.json] [--plot ....png]

The model is built in code with random weights (nothing is downloaded): LLaVA-1.5's vision side (CLIP ViT-L/14 at
336 px, feature layer -2, 576 image tokens, two-layer MLP projector) and a ~0.5 B language model (default Qwen2-0.5B's
shape: hidden 896, 24 layers, 14 heads, 2 KV heads, MLP 4864), wrapped as smarttrim's LLaVA family. Each prompt is the
family's dummy batch (one image run + ``--text-len`` text tokens). Per keep ratio, every input gets a forced decision
keeping that share of its image tokens (its own random positions, the first always kept), so the timings measure the
trimmed sequence, not a trimmer's choice. Measured at batch 1 and 8, all ratios and the untrimmed model in one run:

    prefill   one forward of the prompt (vision tower, projector, trimmer, LM with its head): what the cost model costs
    ttft      ``generate(max_new_tokens=1)``: prefill through transformers' generate + the first token

speed-up = untrimmed median / trimmed median; GMAC cut = untrimmed prefill GMACs / trimmed (cost model, fvcore
convention). Median of ``--repeats`` after one warm-up. Not a test: a real run needs a quiet machine; ``--quick``
(a tiny config) only checks that the script works.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

RATIOS = (1.0, 0.5, 0.25, 0.11)
BATCHES = (1, 8)
GOAL = 0.85  # prefill speed-up at least this share of the GMAC cut
KEY = "tok:image_0"


def hf_config(a):
    """transformers' LlavaConfig: LLaVA-1.5's vision side with a small LM (or, --quick, a tiny one)."""
    from transformers import LlavaConfig

    if a.quick:
        vis = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=56,
                   patch_size=14, projection_dim=32)
        txt = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=256)
    else:
        vis = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   image_size=336, patch_size=14, projection_dim=768)
        txt = dict(hidden_size=a.text_hidden, intermediate_size=a.text_mlp, num_hidden_layers=a.text_layers,
                   num_attention_heads=a.text_heads, num_key_value_heads=a.text_kv_heads, vocab_size=a.vocab)
    image_token = txt["vocab_size"] - 1
    return LlavaConfig(vision_config=dict(model_type="clip_vision_model", **vis),
                       text_config=dict(model_type=a.text, max_position_embeddings=4096, **txt),
                       image_token_id=image_token, vision_feature_layer=-2,
                       vision_feature_select_strategy="default", projector_hidden_act="gelu")


def build(a):
    from transformers import LlavaForConditionalGeneration

    from smarttrim_cli.backbones.llava import LlavaModel, config_from_hf

    torch.manual_seed(0)
    hf = LlavaForConditionalGeneration(hf_config(a)).eval()
    hf.to(getattr(torch, a.dtype))
    cfg = config_from_hf(hf.config.to_dict(), "llava_prefill")
    return LlavaModel(cfg, hf=hf).to(a.device).eval()


def forced_keep(B: int, N: int, ratio: float, seed: int) -> torch.Tensor:
    """(B, N) decisions keeping round(ratio * N) image tokens per input: the first and random others."""
    k = max(1, round(ratio * N))
    g = torch.Generator().manual_seed(seed)
    m = torch.zeros(B, N)
    for b in range(B):
        m[b, 0] = 1
        m[b, 1 + torch.randperm(N - 1, generator=g)[:k - 1]] = 1
    return m


def median_seconds(fn, repeats: int, device) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()  # warm-up
    secs = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        secs.append(time.perf_counter() - t)
    return statistics.median(secs)


def measure(model, a) -> list[dict]:
    from smarttrim_cli.backbones.llava import FAMILY
    from smarttrim_cli.trim.cost import total_macs

    device = torch.device(a.device)
    N = model.config.image_tokens
    rows = []
    for B in BATCHES:
        batch = {k: v.to(device) for k, v in FAMILY.dummy_batch(model, text_len=a.text_len, batch=B).items()}
        batch["pixel_values"] = torch.randn_like(batch["pixel_values"]).to(getattr(torch, a.dtype))
        runs = {"full": dict(mode="full")}
        for r in RATIOS:
            runs[r] = dict(mode="hard", forced={KEY: forced_keep(B, N, r, seed=B).to(device)})
        with torch.no_grad():
            base = None
            for name, kw in runs.items():
                _, ctx = model.run(batch, record=True, **kw)
                macs = float(total_macs(ctx.records).sum()) / B / 1e9
                kept = None if name == "full" else int(ctx.decisions[KEY].sum()) / B
                pre = median_seconds(lambda: model.run(batch, **kw), a.repeats, device)
                ttft = median_seconds(lambda: model.generate(batch, max_new_tokens=1, do_sample=False, **kw),
                                      a.repeats, device)
                row = {"batch": B, "keep_ratio": None if name == "full" else name, "image_tokens_kept": kept,
                       "image_tokens": N, "prefill_gmacs": macs, "prefill_ms": pre * 1e3, "ttft_ms": ttft * 1e3}
                if name == "full":
                    base = row
                row["gmac_cut"] = base["prefill_gmacs"] / macs
                row["prefill_speedup"] = base["prefill_ms"] / row["prefill_ms"]
                row["ttft_speedup"] = base["ttft_ms"] / row["ttft_ms"]
                row["speedup_over_cut"] = row["prefill_speedup"] / row["gmac_cut"]
                row["goal_met"] = None if name == "full" else row["speedup_over_cut"] >= GOAL
                rows.append(row)
                print(f"  b={B} {str(name):>5}: kept {kept if kept is not None else N:>6.1f}/{N}  "
                      f"{macs:9.4g} GMACs  prefill {row['prefill_ms']:9.1f} ms  ttft {row['ttft_ms']:9.1f} ms",
                      flush=True)
    return rows


def table(rows) -> str:
    out = ["| batch | keep ratio | image tokens kept | prefill GMACs | GMAC cut | prefill ms | prefill speed-up | "
           "TTFT ms | TTFT speed-up | speed-up / cut |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kr = "full" if r["keep_ratio"] is None else f"{r['keep_ratio']:g}"
        kept = r["image_tokens"] if r["image_tokens_kept"] is None else r["image_tokens_kept"]
        out.append(f"| {r['batch']} | {kr} | {kept:g} | {r['prefill_gmacs']:.4g} | {r['gmac_cut']:.2f}x | "
                   f"{r['prefill_ms']:.1f} | {r['prefill_speedup']:.2f}x | {r['ttft_ms']:.1f} | "
                   f"{r['ttft_speedup']:.2f}x | {r['speedup_over_cut']:.2f} |")
    return "\n".join(out)


def plot(rows, path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    top = max(max(r["gmac_cut"], r["prefill_speedup"]) for r in rows) * 1.1
    ax.plot([1, top], [1, top], "k--", lw=1, label="speed-up = GMAC cut")
    ax.plot([1, top], [GOAL, GOAL * top], "r:", lw=1, label=f"goal: {GOAL}x the cut")
    for B, marker in zip(BATCHES, "os"):
        pts = [r for r in rows if r["batch"] == B and r["keep_ratio"] is not None]
        ax.plot([r["gmac_cut"] for r in pts], [r["prefill_speedup"] for r in pts], marker=marker,
                label=f"prefill, batch {B}")
        for r in pts:
            ax.annotate(f"{r['keep_ratio']:g}", (r["gmac_cut"], r["prefill_speedup"]), fontsize=7,
                        textcoords="offset points", xytext=(4, -8))
    ax.set_xlabel("prefill GMAC cut (full / trimmed, cost model)")
    ax.set_ylabel("prefill speed-up (full / trimmed, median)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--text", choices=("qwen2", "llama"), default="qwen2")
    ap.add_argument("--text-hidden", type=int, default=896)
    ap.add_argument("--text-mlp", type=int, default=4864)
    ap.add_argument("--text-layers", type=int, default=24)
    ap.add_argument("--text-heads", type=int, default=14)
    ap.add_argument("--text-kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--text-len", type=int, default=64, help="text tokens per prompt besides the image run")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="float32, bfloat16 (cuda), float16 (cuda)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="a tiny config: checks that the script runs")
    ap.add_argument("--json", type=Path, default=None, help="default: benchmarks/results/llava_prefill.json "
                    "(--quick: llava_prefill_quick.json, so a smoke run never replaces a real one)")
    ap.add_argument("--plot", type=Path, default=None, help="PNG (default: the JSON's path with .png)")
    a = ap.parse_args(argv)
    a.json = a.json or ROOT / "benchmarks/results" / f"llava_prefill{'_quick' if a.quick else ''}.json"
    if a.quick:
        a.repeats = min(a.repeats, 2)
        a.text_len = min(a.text_len, 8)
    if a.threads:
        torch.set_num_threads(a.threads)
    from smarttrim_cli.atomic import write_json
    from smarttrim_cli.profiling.latency import machine_info, versions

    model = build(a)
    lm = sum(p.numel() for p in model.hf.model.language_model.parameters())
    vis = sum(p.numel() for p in model.hf.model.vision_tower.parameters())
    print(f"LLaVA prefill: vision {vis / 1e6:.3g} M params, {model.config.image_tokens} image tokens; "
          f"{a.text} LM {lm / 1e6:.3g} M params; {a.dtype} on {a.device}, {torch.get_num_threads()} threads"
          + (" (--quick: tiny config)" if a.quick else ""), flush=True)
    rows = measure(model, a)
    trimmed = [r for r in rows if r["keep_ratio"] is not None and r["keep_ratio"] < 1]
    met = all(r["goal_met"] for r in trimmed)
    print(table(rows))
    print(f"goal: prefill speed-up >= {GOAL}x the prefill GMAC cut at every keep ratio < 1 and batch: "
          f"{'MET' if met else 'NOT MET'} (worst {min(r['speedup_over_cut'] for r in trimmed):.2f})")
    result = {"benchmark": "llava_prefill", "quick": a.quick, "goal": {"speedup_over_gmac_cut": GOAL, "met": met},
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
              "model": {"vision": "CLIP ViT-L/14-336" if not a.quick else "tiny CLIP",
                        "image_tokens": model.config.image_tokens, "vision_params": vis, "text": a.text,
                        "text_params": lm},
              "ratios": list(RATIOS), "batches": list(BATCHES), "rows": rows,
              "machine": machine_info(torch.device(a.device)), "versions": versions()}
    png = a.plot or a.json.with_suffix(".png")
    result["plot"] = str(plot(rows, png, f"LLaVA prefill ({'tiny' if a.quick else a.text}, {a.device})"))
    write_json(a.json, result, allow_nan=False)
    print(f"written: {a.json}, {png}")


if __name__ == "__main__":
    main()
