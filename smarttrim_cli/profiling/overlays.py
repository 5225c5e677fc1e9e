"""``--show N``: what the trimmer kept, drawn on the image (the paper's token-trimming figure).

One PNG per input: the (preprocessed) image, the question with the text tokens that survived
trimming in black and the dropped ones struck through in grey, and for every image-stream layer with
a token trimmer (vision tower, then cross-modal image stream) the image again with the dropped
patches greyed out. Decisions come from the hard forward (``ctx.decisions["tok:<stream>_<i>"]``: a
kept mask over the stream's original positions; position 0 is [CLS], the rest the patch grid row by
row); they are cumulative, so each panel shows what is still alive after that layer's trimmer.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .plots import pyplot, save_png

_LAYER = re.compile(r"^tok:(vision|ximage)_(\d+)$")
_TEXT = re.compile(r"^tok:(text|xtext)_(\d+)$")


def image_panels(decisions: dict) -> list[tuple[str, np.ndarray]]:
    """[(layer name, kept mask over patches (N-1,))] for image-stream token trimmers in forward order."""
    rows = []
    for key, mask in decisions.items():
        m = _LAYER.match(key)
        if m:
            order = (0 if m.group(1) == "vision" else 1, int(m.group(2)))
            rows.append((order, key[4:], torch.as_tensor(mask)[0, 1:].float().cpu().numpy()))
    return [(name, mask) for _, name, mask in sorted(rows, key=lambda r: r[0])]


def text_keep(decisions: dict, n_tokens: int) -> np.ndarray:
    """Kept mask over the question's tokens after the last text-stream token trimmer (all 1 if none)."""
    last = None
    for key, mask in decisions.items():
        m = _TEXT.match(key)
        if m:
            order = (0 if m.group(1) == "text" else 1, int(m.group(2)))
            if last is None or order > last[0]:
                last = (order, mask)
    if last is None:
        return np.ones(n_tokens)
    v = torch.as_tensor(last[1])[0].float().cpu().numpy()
    return v[:n_tokens] if v.size >= n_tokens else np.concatenate([v, np.zeros(n_tokens - v.size)])


def _shade(image: np.ndarray, keep: np.ndarray, grid: int) -> np.ndarray:
    """Grey out (and darken) the patches whose keep value is 0."""
    h, w = image.shape[:2]
    ph, pw = h // grid, w // grid
    cell = keep.reshape(grid, grid)
    mask = np.kron(cell, np.ones((ph, pw)))[:h, :w][..., None]
    grey = image.mean(-1, keepdims=True) * 0.35 + 0.5
    return image * mask + np.broadcast_to(grey, image.shape) * (1 - mask)


def write_overlay(path, image: np.ndarray, question: str, tokens: Sequence[str], token_keep: np.ndarray,
                  panels: list[tuple[str, np.ndarray]], caption: str = "") -> Path:
    """image: (H, W, 3) floats in [0, 1]; panels: [(layer name, kept mask over the patch grid)]."""
    plt = pyplot()
    n = 1 + len(panels)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig = plt.figure(figsize=(3.0 * cols, 3.0 * rows + 1.1))
    gs = fig.add_gridspec(rows + 1, cols, height_ratios=[0.35] + [1] * rows)
    tax = fig.add_subplot(gs[0, :])
    tax.axis("off")
    renderer = fig.canvas.get_renderer()
    tax.text(0.0, 0.9, "Q:", fontsize=11, weight="bold", transform=tax.transAxes, va="top")
    x = 0.045
    y = 0.9
    for tok, k in zip(tokens, token_keep):
        t = tax.text(x, y, tok, fontsize=11, transform=tax.transAxes, va="top",
                     color="black" if k > 0.5 else "#aaaaaa")
        bb = t.get_window_extent(renderer=renderer).transformed(tax.transAxes.inverted())
        if k <= 0.5:
            tax.plot([bb.x0, bb.x1], [(bb.y0 + bb.y1) / 2] * 2, color="#aaaaaa", lw=1, transform=tax.transAxes)
        x = bb.x1 + 0.008
        if x > 0.95:
            x, y = 0.045, y - 0.4
    if caption:
        tax.text(0.0, 0.05, caption, fontsize=8, transform=tax.transAxes, va="bottom", color="#333333")
    if not question and not tokens:
        tax.text(0.045, 0.9, "(no text)", fontsize=11, transform=tax.transAxes, va="top")

    def panel(i, img, title):
        ax = fig.add_subplot(gs[1 + i // cols, i % cols])
        ax.imshow(np.clip(img, 0, 1), interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")

    panel(0, image, "input")
    for i, (name, keep) in enumerate(panels, start=1):
        grid = int(round(math.sqrt(keep.size)))
        panel(i, _shade(image, keep, grid), f"after {name}: {int(keep.sum())}/{keep.size} patches")
    return save_png(fig, path, dpi=100)


def question_tokens(tokenizer, input_ids: torch.Tensor) -> list[str]:
    """Each token of the (unpadded) question as readable text, specials included."""
    ids = [int(i) for i in input_ids.reshape(-1)]
    if tokenizer is None:
        return [str(i) for i in ids]
    return [tokenizer.decode([i]).strip() or "·" for i in ids]


def denormalize(pixel_values: torch.Tensor, mean, std) -> np.ndarray:
    """(3, H, W) normalised tensor -> (H, W, 3) floats in [0, 1]."""
    x = pixel_values.detach().float().cpu()
    x = x * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    return x.clamp(0, 1).permute(1, 2, 0).numpy()
