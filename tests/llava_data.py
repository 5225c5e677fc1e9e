"""Tiny real data for a tiny real LLaVA directory (tests/tiny_llava.py), shared by the text-model tests
(test_llava_profile.py, test_llava_compare.py): the model attached with an input-dependent trimmer, a prompts
folder, and each input's answers through the model's own ``generate`` (to build answers from)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

import smarttrim_cli
from smarttrim_cli.attach import attach

from tiny_hf import center_token_trimmers
from tiny_llava import SPECIAL, WORDS, tiny_inputs, write_tiny_llava


def attached_word_llava(root: Path, **kw) -> Path:
    """``root/attached``: a tiny LLaVA whose vocabulary is the word tokenizer's (``write_tiny_llava`` options in
    ``kw``), attached with fresh trimmers (seed 0); SMARTTRIM_HOME under ``root``."""
    import pytest

    src = write_tiny_llava(root / "src", vocab=len(SPECIAL + WORDS), **kw)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SMARTTRIM_HOME", str(root / "home"))
        torch.manual_seed(0)
        attach(src, out_dir=root / "attached")
    return root / "attached"


def trimmed_llava(base: Path, prompts, monkeypatch_env) -> Path:
    """A tiny LLaVA attached (``base/model``) whose trimmer keeps some image tokens and drops others, varying with
    the input (random tiny trimmers keep all or nothing), and whose LM can only emit words (answers are text).
    ``monkeypatch_env(name, value)`` sets SMARTTRIM_HOME for attach."""
    from safetensors.torch import save_file

    src = write_tiny_llava(base / "src")
    out = base / "model"
    monkeypatch_env("SMARTTRIM_HOME", str(base / "home"))
    torch.manual_seed(0)
    attach(src, out_dir=out)
    m = smarttrim_cli.load(out).model
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in sorted(m.token_trimmers.named_parameters()):
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    center_token_trimmers(m, tiny_inputs(src, list(prompts)))
    with torch.no_grad():
        w = m.hf.lm_head.weight
        w[:len(SPECIAL)] = 0
        w[len(SPECIAL) + len(WORDS):] = 0
    save_file({k: v.detach().contiguous() for k, v in m.state_dict().items()}, str(out / "model.safetensors"))
    return out


def write_images(d: Path, n: int, seed: int = 1) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(d / f"im{i}.png")


def write_prompts(d: Path, prompts, answers) -> None:
    """``prompts.jsonl``: one row per prompt with image im<i>.png and its answers."""
    with open(d / "prompts.jsonl", "w") as f:
        for i, (q, a) in enumerate(zip(prompts, answers)):
            f.write(json.dumps({"image": f"im{i}.png", "prompt": q, "answer": a}) + "\n")


def by_hand(model_dir: Path, data_dir: Path, n_new: int):
    """Each input alone through the model's own ``generate`` (both modes) and its recorded prefill forward."""
    from smarttrim_cli.data import open_dataset
    from smarttrim_cli.data.generative import GenerativeCollate, generated_texts, load_chat_processor

    loaded = smarttrim_cli.load(model_dir)
    m = loaded.model
    proc = load_chat_processor(model_dir / "tokenizer")
    collate = GenerativeCollate(proc, mode="generate")
    ds = open_dataset("prompts", data_dir, "prompts", m.config.image_size, preprocess=loaded.image_preprocessor())
    rows = []
    with torch.no_grad():
        for i in range(len(ds)):
            b = collate([ds[i]])
            texts = {mode: generated_texts(proc, m.generate(b, mode=mode, max_new_tokens=n_new), 0)[0]
                     for mode in ("full", "hard")}
            _, ctx = m.run(b, mode="hard", record=True)
            rows.append({"texts": texts, "answers": ds[i]["answers"], "kept": int(ctx.decisions["tok:image_0"].sum()),
                         "ctx": ctx, "batch": b})
    return m, rows
