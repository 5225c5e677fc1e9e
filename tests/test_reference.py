"""profile scores a trimmed model against the model the user brought, not against its own fine-tuned weights.

The case is built deliberately: a plain fine-tune learns the task (the "existing VLM"), then a SmartTrim
fine-tune at a learning rate far too high wrecks the backbone. Trimmed and untrimmed, the wrecked weights score
alike, so a gate on "trimmed vs the same weights untrimmed" passes; against the original it must fail.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from smarttrim_cli.cli import app
from smarttrim_cli.model_dir import read_config, sha256
from smarttrim_cli.profiling.report import SCHEMA_VERSION

from test_finetune_data import VQA_LABELS, model_for, write_vqa
from tiny_meter import write_tiny_ckpt

FAST = ["--dataset", "vqa", "--limit", "32", "--iters", "1", "--warmup", "0", "--batch-size", "4",
        "--throughput-batches", "1", "--fvcore-limit", "0", "--threads", "1"]
TRAIN = dict(workers=0, log_every=1, eval_before=False, save_every=0, batch_size=8)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """meter.ckpt -> attach -> base (plain fine-tune, learns the task) -> trimmed (SmartTrim at lr 0.05: the backbone collapses)."""
    from smarttrim_cli.train.loop import finetune

    tmp = tmp_path_factory.mktemp("chain")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SMARTTRIM_HOME", str(tmp / "home"))
        data = write_vqa(tmp / "vqa", n_train=64, n_val=32, balanced=True)
        # the user's file, attached as a user would
        write_tiny_ckpt(tmp / "meter.ckpt", "vqa", num_labels=len(VQA_LABELS))
        (tmp / "answers.txt").write_text("\n".join(VQA_LABELS) + "\n")
        attached = tmp / "attached"
        r = CliRunner().invoke(app, ["attach", str(tmp / "meter.ckpt"), "-o", str(attached), "--answers",
                                     str(tmp / "answers.txt")])
        assert r.exit_code == 0, r.output
        ov = dict(TRAIN, data_dir=str(data))
        finetune(attached, tmp / "base", overrides=dict(ov, trim=False, lr=1e-3, max_steps=160), recipe=False,
                 progress=False)
        finetune(tmp / "base", tmp / "trimmed", overrides=dict(ov, lr=0.05, max_steps=16, target_ratio=0.5,
                                                               lr_mult_trimmer=20), recipe=False, progress=False)
    torch.set_num_threads(n)
    return {"data": data, "attached": attached, "base": tmp / "base", "trimmed": tmp / "trimmed", "root": tmp}


def profile(model_dir, data, *args, out=None):
    out = Path(out or Path(model_dir).parent / f"profile-{Path(model_dir).name}")
    res = CliRunner().invoke(app, ["profile", str(model_dir), "--data-dir", str(data), *FAST, "--out", str(out), *args])
    rep = out / "report.json"
    return res, (json.loads(rep.read_text()) if rep.is_file() else None)


def test_finetune_records_lineage_and_reference(chain):
    base, trimmed, attached = (read_config(chain[k]) for k in ("base", "trimmed", "attached"))
    # attach output and a plain fine-tune are their own reference
    assert attached.get("reference") is None and base.get("reference") is None
    ref = trimmed["reference"]
    assert ref["path"] == str(chain["base"].resolve())
    assert ref["sha256"] == sha256(chain["base"] / "model.safetensors")
    assert (ref["backbone"], ref["task"]) == ("meter", "vqa")
    # every derived directory names its ancestors, nearest first, back to what attach wrote
    lineage = trimmed["provenance"]["lineage"]
    assert [e["path"] for e in lineage] == [str(chain["base"].resolve()), str(Path(chain["attached"]).resolve())]
    assert [e["made_by"] for e in lineage] == ["finetune (plain)", "attach"]
    assert trimmed["provenance"]["made_by"] == "finetune (smarttrim)"
    # ... and, through it, the user's file
    assert trimmed["provenance"]["source_sha256"] == sha256(chain["root"] / "meter.ckpt")


def test_gate_reads_the_original_not_the_finetuned_weights(chain):
    res_b, base = profile(chain["base"], chain["data"])
    assert res_b.exit_code == 0, res_b.output
    assert base["accuracy"]["reference"]["source"] == "self"
    res, rep = profile(chain["trimmed"], chain["data"])
    assert res.exit_code == 0, res.output
    a = rep["accuracy"]
    assert rep["schema_version"] == SCHEMA_VERSION >= 2  # the version that added the reference fields, or later
    assert a["reference"]["source"] == "recorded" and a["reference"]["model_dir"] == str(chain["base"].resolve())
    # full is the original's score, measured on the same inputs as when the original is profiled on its own
    assert a["full"] == base["accuracy"]["full"]
    assert a["drop"] == pytest.approx(a["full"] - a["trimmed"])
    assert a["same_weights_drop"] == pytest.approx(a["same_weights_full"] - a["trimmed"])
    # the built case: the fine-tune cost the original's accuracy, trimming on top of it cost (almost) nothing
    assert a["drop"] > a["same_weights_drop"] + 10, a
    bound = a["same_weights_drop"] + (a["drop"] - a["same_weights_drop"]) / 2
    res, rep = profile(chain["trimmed"], chain["data"], "--max-drop", f"{bound:.3f}")
    assert res.exit_code == 1, res.output
    assert "against the reference" in res.output and str(chain["base"].resolve()) in res.output
    assert rep["gate"]["passed"] is False and rep["gate"]["drop"] == pytest.approx(a["drop"])
    # what the gate used to read: the same weights at full capacity, which pass the same bound
    res, rep = profile(chain["trimmed"], chain["data"], "--max-drop", f"{bound:.3f}", "--reference", "self")
    assert res.exit_code == 0, res.output
    assert rep["accuracy"]["full"] == a["same_weights_full"] and rep["accuracy"]["reference"]["model_dir"] is None


def test_attach_output_is_its_own_reference(chain, tmp_path):
    res, rep = profile(chain["attached"], chain["data"], out=tmp_path / "p")
    assert res.exit_code == 0, res.output
    a = rep["accuracy"]
    assert a["reference"]["source"] == "self" and a["reference"]["model_dir"] is None
    assert a["full"] == a["same_weights_full"] and a["drop"] == a["same_weights_drop"]
    assert all(r["score_full"] == r["score_same_weights_full"] for r in rep["per_input"])


def test_mismatched_reference_is_a_one_line_error(chain, tmp_path):
    # the attached model has other weights than the base the trimmed model was fine-tuned from
    res, _ = profile(chain["trimmed"], chain["data"], "--reference", str(chain["attached"]), out=tmp_path / "p")
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert str(chain["attached"]) in res.output and "not the model" in res.output
    assert len(res.output.strip().splitlines()) == 1
    # a model with other labels, for a directory that records no reference
    other = model_for(tmp_path, "vqa", labels=["a", "b", "c"])
    res, _ = profile(chain["base"], chain["data"], "--reference", str(other), out=tmp_path / "q")
    assert res.exit_code == 2 and "labels differ" in res.output and str(other) in res.output
    res, _ = profile(chain["trimmed"], chain["data"], "--reference", str(tmp_path / "nowhere"), out=tmp_path / "r")
    assert res.exit_code == 2 and str(tmp_path / "nowhere") in res.output


def test_moved_or_changed_reference(chain, tmp_path):
    trimmed = tmp_path / "trimmed"
    shutil.copytree(chain["trimmed"], trimmed)
    cfg = json.loads((trimmed / "config.json").read_text())
    moved = tmp_path / "moved-base"
    shutil.copytree(chain["base"], moved)
    cfg["reference"]["path"] = str(tmp_path / "gone")
    (trimmed / "config.json").write_text(json.dumps(cfg))
    res, _ = profile(trimmed, chain["data"], out=tmp_path / "p")
    assert res.exit_code == 2 and "is missing" in res.output and str(tmp_path / "gone") in res.output
    res, rep = profile(trimmed, chain["data"], "--reference", str(moved), out=tmp_path / "p")  # same hash: accepted
    assert res.exit_code == 0, res.output
    assert rep["accuracy"]["reference"]["source"] == "--reference"
    # the original overwritten after the fine-tune: its hash no longer matches
    cfg["reference"]["path"] = str(moved)
    (trimmed / "config.json").write_text(json.dumps(cfg))
    shutil.copy(chain["attached"] / "model.safetensors", moved / "model.safetensors")
    res, _ = profile(trimmed, chain["data"], out=tmp_path / "q")
    assert res.exit_code == 2 and "changed since" in res.output and str(moved) in res.output


def test_finetune_refuses_to_overwrite_its_source(chain, tmp_path):
    src = tmp_path / "m"
    shutil.copytree(chain["base"], src)
    res = CliRunner().invoke(app, ["finetune", str(src), "-o", str(src), "--data-dir", str(chain["data"]),
                                   "--max-steps", "1", "--no-progress"])
    assert res.exit_code == 2 and "being fine-tuned" in res.output
    assert sha256(src / "model.safetensors") == sha256(chain["base"] / "model.safetensors")
