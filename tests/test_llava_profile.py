"""``smarttrim profile`` on a text-generating model (profiling/generation.py): a tiny real LLaVA directory
(tests/tiny_llava.py) attached with an input-dependent trimmer, profiled on a tiny prompts folder with answers
through the CLI; the report is checked against the model's own ``generate``, fvcore and the decisions."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import smarttrim_cli
from smarttrim_cli.attach import attach
from smarttrim_cli.cli import app
from smarttrim_cli.profiling.report import FIELDS, missing_fields

from tiny_hf import center_token_trimmers
from tiny_llava import tiny_inputs, write_tiny_llava

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [("what color is the shape ?", ["red"] * 6 + ["blue"] * 4), ("is there a red circle ?", ["yes"]),
           ("what is in the image ?", ["circle", "square"]), ("what shape is there ?", ["square"] * 10)]
N_NEW = 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from safetensors.torch import save_file

    base = tmp_path_factory.mktemp("llava-profile")
    src = write_tiny_llava(base / "src")
    out = base / "model"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SMARTTRIM_HOME", str(base / "home"))
        torch.manual_seed(0)
        attach(src, out_dir=out)
        m = smarttrim_cli.load(out).model
    # an input-dependent trimmer (random tiny trimmers keep all or nothing): noisy, centred on real prompts
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in sorted(m.token_trimmers.named_parameters()):
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    center_token_trimmers(m, tiny_inputs(src, [p for p, _ in PROMPTS]))
    save_file({k: v.detach().contiguous() for k, v in m.state_dict().items()}, str(out / "model.safetensors"))
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("prompts")
    rng = np.random.default_rng(1)
    with open(d / "prompts.jsonl", "w") as f:
        for i, (q, a) in enumerate(PROMPTS):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(d / f"im{i}.png")
            f.write(json.dumps({"image": f"im{i}.png", "prompt": q, "answer": a}) + "\n")
    return d


@pytest.fixture(scope="module")
def profiled(model_dir, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SMARTTRIM_HOME", str(out / "home"))
        r = CliRunner().invoke(app, ["profile", str(model_dir), "--dataset", "prompts", "--data-dir", str(data_dir),
                                     "--out", str(out), "--max-new-tokens", str(N_NEW), "--iters", "2",
                                     "--warmup", "1", "--throughput-batches", "1", "--fvcore-limit", "2"])
    return r, out
