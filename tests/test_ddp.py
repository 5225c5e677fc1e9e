"""DDP fine-tuning as a user launches it: ``python -m torch.distributed.run --nproc_per_node 2 -m smarttrim_cli
finetune ...`` (real processes, gloo on CPU, through the CLI), compared with the same command in one process
(``python -m smarttrim_cli finetune``, same global batch and seed). The loop claims a run does not depend on the
world size (inputs of step k, per-input Gumbel noise and the batch-mean budget are global), so the logged losses
match step by step and the written weights match to float rounding; and only rank 0 writes: one model directory,
no temporary files left, each log row once.

Families: a tiny METER (VQAv2 layout, SmartTrim self-distillation, backbone and trimmers trained) and a tiny LLaVA
(prompts folder, the generative next-token objective on given answers of different lengths, and the label-free
``targets=self`` whose answers rank 0 generates and rank 1 reads)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_finetune_data import model_for, write_vqa

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
               SMARTTRIM_HOME=str(home), TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    return env


def _finetune(args: list[str], home: Path, nproc: int) -> subprocess.CompletedProcess:
    if nproc == 1:
        launch = [sys.executable, "-m", "smarttrim_cli"]
    else:
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                  "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "smarttrim_cli"]
    r = subprocess.run([*launch, "finetune", *args, "--device", "cpu", "--workers", "0", "--no-progress"],
                       env=_env(home), cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    if nproc > 1 and r.returncode != 0 and any(s in r.stderr for s in ("EADDRINUSE", "errno: 98", "Permission denied",
                                                                        "Operation not permitted")):
        # a sandbox without local TCP: say so (the gloo rendezvous needs a port on 127.0.0.1), do not skip
        pytest.fail(f"gloo could not open a local TCP port for the process group:\n{r.stderr[-3000:]}")
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return r


def _log(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "finetune_log.jsonl").read_text().splitlines()]


def _check_written_once(parent: Path, out: Path, steps: int, world: int):
    """One model directory, complete, written by one process: no temporary files, each log row once."""
    assert sorted(p.name for p in parent.iterdir() if p.name.startswith(out.name)) == [out.name, out.name + ".state"]
    leftovers = [p for d in (out, Path(str(out) + ".state")) for p in d.rglob("*")
                 if ".tmp" in p.name or p.name.startswith(".") or p.name.endswith(("~", ".partial"))]
    assert not leftovers, leftovers
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    summary = json.loads((out / "finetune_summary.json").read_text())
    assert summary["world_size"] == world and summary["steps"] == steps
    assert json.loads((out / "config.json").read_text())["finetune"]["world_size"] == world
    for log in (_log(out), [json.loads(x) for x in (Path(str(out) + ".state") / "log.jsonl").read_text().splitlines()]):
        rows = [json.dumps(r, sort_keys=True) for r in log]
        assert len(rows) == len(set(rows)), "a log row written twice (by both ranks?)"
        assert [r["step"] for r in log if r["event"] == "step"] == list(range(1, steps + 1))


def _steps(out: Path) -> list[dict]:
    return [r for r in _log(out) if r["event"] == "step"]


def _same_run(one: Path, two: Path, start: dict, moved_prefixes, frozen_prefixes=()):
    """Step-by-step losses and the written weights of the 2-process run equal the 1-process run's."""
    s1, s2 = _steps(one), _steps(two)
    assert len(s1) == len(s2)
    for a, b in zip(s1, s2):
        for k in ("loss", "task", "distill", "cost", "ratio", "lr"):
            if k in a or k in b:
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), (a["step"], k, a[k], b[k])
    w1, w2 = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert w1.keys() == w2.keys() == start.keys()
    # Adam divides by sqrt(v): rounding differences of near-zero gradients (a batch of 4 per rank summed by the
    # all-reduce vs one batch of 8) become differences of a small fraction of the step size (lr 1e-3)
    diffs = sorted(((float((w1[k].float() - w2[k].float()).abs().max()), k) for k in w1), reverse=True)
    assert diffs[0][0] < 5e-4, diffs[:3]
    for prefix in moved_prefixes:  # not two untouched models compared
        assert any(not torch.equal(start[k], w2[k]) for k in start if k.startswith(prefix)), prefix
    for prefix in frozen_prefixes:
        assert all(torch.equal(start[k], w2[k]) for k in start if k.startswith(prefix)), prefix


# ----- METER: SmartTrim on VQAv2 -----------------------------------------------------------------------
def test_meter_smarttrim_torchrun_2_processes_equals_1(tmp_path):
    data = write_vqa(tmp_path / "vqa", n_train=16, n_val=8)
    model = model_for(tmp_path, "vqa")
    steps = 3
    args = [str(model), "--dataset", "vqa", "--data-dir", str(data), "--batch-size", "8", "--max-steps", str(steps),
            "--lr", "1e-3", "--target-ratio", "0.5", "--seed", "3", "--set", "lr_mult_trimmer=20",
            "--set", "curriculum=0.5", "--set", "log_every=1", "--set", "eval_before=false", "--set", "save_every=0",
            "--set", "calibrate=false", "--val-limit", "8"]
    _finetune([*args, "-o", str(tmp_path / "one" / "ft")], tmp_path / "home", 1)
    _finetune([*args, "-o", str(tmp_path / "two" / "ft")], tmp_path / "home", 2)
    _check_written_once(tmp_path / "two", tmp_path / "two" / "ft", steps, world=2)
    _check_written_once(tmp_path / "one", tmp_path / "one" / "ft", steps, world=1)
    start = load_file(str(model / "model.safetensors"))
    _same_run(tmp_path / "one" / "ft", tmp_path / "two" / "ft", start,
              ("token_trimmers.", "head_trimmers.", "cross_modal_text_layers.", "vqa_classifier."))
    # the budget penalty was on (the SmartTrim objective, not a plain fine-tune) and rank 0 wrote what both ran
    assert all("cost" in r and "distill" in r for r in _steps(tmp_path / "two" / "ft"))


# ----- LLaVA: the generative objective ------------------------------------------------------------------
@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    from llava_data import attached_word_llava

    root = tmp_path_factory.mktemp("ddp_llava")
    attached_word_llava(root, image_size=32, patch=4)
    return root


@pytest.mark.parametrize("mode", ["data", "self", "no-trim"])
def test_llava_generative_torchrun_2_processes_equals_1(llava, tmp_path, mode):
    """data: SmartTrim on given answers; self: label-free (the full model's own answers); no-trim: a plain fine-tune
    of the whole model (the recipe's --no-trim section trains the backbone)."""
    from test_llava_finetune import write_prompts

    model = llava / "attached"
    # answers of different token lengths: the two ranks' halves of a batch hold different numbers of answer tokens
    # (before the fix in TrainStep._rank_share each rank's per-token mean counted equally: the losses differed)
    answers = None if mode == "self" else ["red", "blue circle", "a big green square", "yes"]
    data = write_prompts(tmp_path / "prompts", 8, answers)
    steps = 3
    args = [str(model), "--dataset", "prompts", "--data-dir", str(data), "--batch-size", "4",
            "--max-steps", str(steps), "--seed", "1", "--lr", "1e-3", "--set", "max_new_tokens=3",
            "--set", "log_every=1", "--set", "eval_before=false", "--set", "save_every=0", "--limit", "8",
            "--val-limit", "4"]
    if mode == "no-trim":
        args += ["--no-trim"]
    else:
        args += ["--target-ratio", "0.6", "--set", "lr_mult_trimmer=150", "--set", "calibrate=false",
                 "--set", f"targets={'self' if mode == 'self' else 'data'}"]
    one, two = tmp_path / "one" / "ft", tmp_path / "two" / "ft"
    _finetune([*args, "-o", str(one)], tmp_path / "home", 1)
    _finetune([*args, "-o", str(two)], tmp_path / "home", 2)
    _check_written_once(tmp_path / "two", two, steps, world=2)
    start = load_file(str(model / "model.safetensors"))
    if mode == "no-trim":
        # the whole model trains, except the tower's layers after vision_feature_layer and its post-LayerNorm, which
        # no loss reaches (frozen by the loop: before, DDP without find_unused_parameters failed at step 2)
        tower = "hf.model.vision_tower."
        last = max(int(k.split(".")[5]) for k in start if k.startswith(tower + "encoder.layers."))
        frozen = (f"{tower}encoder.layers.{last}.", f"{tower}post_layernorm.")  # the tiny CLIP tower has both
        assert all(any(k.startswith(f) for k in start) for f in frozen)
        _same_run(one, two, start, ("hf.model.language_model.", "hf.model.multi_modal_projector.",
                                    f"{tower}encoder.layers.0."), frozen_prefixes=frozen)
    else:
        # the llava recipe freezes the backbone: the trimmer moves, the LM, tower and projector stay bit-identical
        _same_run(one, two, start, ("token_trimmers.",), frozen_prefixes=("hf.",))
    if mode == "self":
        # rank 0 generated the full model's answers, rank 1 read them: the same answers as one process's
        texts = [json.loads((d / "self_targets.json").read_text()) for d in (one, two)]
        assert texts[0] == texts[1]
