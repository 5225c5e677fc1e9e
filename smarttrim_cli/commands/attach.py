"""smarttrim attach CKPT_OR_HF_DIR [-o DIR]"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..cli import app, console, user_errors


@app.command()
@user_errors
def attach(
    checkpoint: Path = typer.Argument(..., help="A released METER checkpoint (PyTorch Lightning .ckpt) or a local "
                                      "Hugging Face model directory (BlipForQuestionAnswering, "
                                      "BlipForImageTextRetrieval, ViltForQuestionAnswering, "
                                      "LlavaForConditionalGeneration)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output",
                                          help="Model directory to write (default: ./smarttrim-out/model)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Local tokenizer folder (roberta-base: "
                                             "vocab.json + merges.txt). Default: ./tokenizer beside the checkpoint, "
                                             "then the local Hugging Face cache."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Run at this resolution (positional "
                                             "embeddings interpolated) (default: the checkpoint's)."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="YAML recipe whose `trim:` section places trimmers."),
    token_layers: Optional[str] = typer.Option(None, "--token-layers", help="Token trimmer layers per stream, e.g. "
                                               "'vision=2,4,6 ximage=0,2,4' (streams: text, vision, xtext, ximage)."),
    head_layers: Optional[str] = typer.Option(None, "--head-layers", help="Head trimmer layers per stream, "
                                              "same syntax; 'text=' turns a stream off."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Default keep threshold (0-1), default 0.5."),
    fuse: Optional[bool] = typer.Option(None, "--fuse/--no-fuse", help="Merge the tokens each trimmer drops into one "
                                        "token weighted by its size in later attention (default: the recipe's "
                                        "`trim: fuse`, else off)."),
    fuse_mode: Optional[str] = typer.Option(None, "--fuse-mode", help="With --fuse: 'single' merges the dropped "
                                            "tokens into one; 'nearest' merges each into the kept token closest to "
                                            "it, or into that one (default: the recipe's `trim: fuse_mode`, else "
                                            "single)."),
    task: Optional[str] = typer.Option(None, "--task", help="Hugging Face directories: vqa, retrieval or generate; checked "
                                       "against config.json (needed only when it names no architecture)."),
    answers: Optional[Path] = typer.Option(None, "--answers", help="Answer names as a JSON list or one per line. "
                                           "METER: the labels of its classifier, in order (its files carry none). "
                                           "BLIP VQA: the answer list to rank (default: answer_list.json in the "
                                           "directory)."),
):
    """Insert token and head trimmers into a checkpoint and write a trimmable model directory."""
    from ..attach import attach as run_attach
    from ..trim.config import parse_layer_spec

    with console.status("loading checkpoint and building the trimmable model"):
        res = run_attach(checkpoint, output, tokenizer, image_size, recipe,
                         parse_layer_spec(token_layers, "--token-layers") if token_layers else None,
                         parse_layer_spec(head_layers, "--head-layers") if head_layers else None, threshold,
                         task=task, answers=answers, fuse=fuse, fuse_mode=fuse_mode)
    s = res.summary
    t = Table(title=f"smarttrim attach: {checkpoint.name}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("backbone / task", f"{s['backbone']} / {s['task']}")
    res_note = f"{s['image_size']}² (patch {s['patch_size']})"
    if res.info["source_image_size"] != s["image_size"]:
        res_note += f", positional embeddings interpolated from {res.info['source_image_size']}²"
    t.add_row("resolution", res_note)
    t.add_row("tokens per stream", f"image {s['image_tokens']} · text ≤ {s['text_tokens']}")
    fmt = lambda d: "; ".join(f"{k} {v}" for k, v in d.items()) or "none"  # noqa: E731
    t.add_row("token trimmers", f"{s['n_token_trimmers']}: {fmt(s['token_trimmers'])}"
              + (f"; dropped tokens fused ({s.get('fuse_mode', 'single')})" if s.get("fuse") else ""))
    co = any(len(res.model.streams[k].head_subs) > 1 for k in s["head_trimmers"])  # one per attention of a layer
    t.add_row("head trimmers", f"{s['n_head_trimmers']}: {fmt(s['head_trimmers'])}"
              + (" (co-attention: self + cross)" if co else ""))
    t.add_row("parameters added", f"{s['params_added']:,} ({s['params_added_pct']:.2f}% of {s['params_backbone']:,})")
    t.add_row("full model, one input", f"{s['full_gmacs']:.2f} GMACs (fvcore convention; text of {s['text_tokens']} tokens)")
    t.add_row("ignored unused keys", str(len(res.info["ignored_keys"])))
    t.add_row("written to", str(res.out_dir))
    console.print(t)
