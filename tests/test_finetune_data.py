"""Tiny datasets written in each real on-disk format (VQAv2, NLVR2, SNLI-VE, easy-VQA) for the
finetune tests, and how finetune treats bad rows and missing images.

Each image is a grey 32x32 picture with one coloured square somewhere, so there is something to learn
(the colour) and something to trim (the background patches).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tiny_meter import tiny_model_dir


pytestmark = pytest.mark.usefixtures("one_thread")


COLORS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (40, 70, 220)}
VQA_LABELS = ["red", "green", "blue", "yes", "no"]


def _picture(rng, color: str, size: int = 32) -> Image.Image:
    arr = np.full((size, size, 3), 120, np.int16) + rng.integers(-12, 13, (size, size, 3))
    s = size * 3 // 8
    x, y = rng.integers(0, size - s, 2)
    arr[y:y + s, x:x + s] = COLORS[color]
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _qa(rng, color: str, k: int):
    if k % 2 == 0:
        return "what color is the square?", color
    asked = list(COLORS)[int(rng.integers(0, 3))]
    return f"is the square {asked}?", "yes" if asked == color else "no"


def write_vqa(root: Path, n_train=48, n_val=16, seed=0, balanced=False) -> Path:
    """VQAv2: v2_OpenEnded_mscoco_<split>_questions.json, v2_mscoco_<split>_annotations.json,
    <split>/COCO_<split>_<id:012d>.jpg."""
    rng = np.random.default_rng(seed)
    for split, n, id0 in (("train2014", n_train, 1), ("val2014", n_val, 10_000)):
        (root / split).mkdir(parents=True, exist_ok=True)
        qs, anns = [], []
        for k in range(n):
            iid = id0 + k
            color = list(COLORS)[int(rng.integers(0, 3))]
            if balanced:  # every colour equally often among the colour questions
                color = list(COLORS)[(k // 2) % 3]
            _picture(rng, color).save(root / split / f"COCO_{split}_{iid:012d}.jpg", quality=95)
            q, a = _qa(rng, color, k)
            qid = iid * 10
            qs.append({"image_id": iid, "question": q, "question_id": qid})
            anns.append({"question_id": qid, "image_id": iid, "question_type": "what", "answer_type": "other",
                         "multiple_choice_answer": a,
                         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j in range(10)]})
        (root / f"v2_OpenEnded_mscoco_{split}_questions.json").write_text(json.dumps(
            {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {}, "data_subtype": split,
             "questions": qs}))
        (root / f"v2_mscoco_{split}_annotations.json").write_text(json.dumps(
            {"info": {}, "license": {}, "data_subtype": split, "annotations": anns}))
    return root


def write_nlvr2(root: Path, n_train=32, n_val=16, seed=0) -> Path:
    """NLVR2: <split>.json (JSON lines), images/train/<dir>/train-N-0-img{0,1}.png, images/dev/dev-N-0-img{0,1}.png."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("dev", n_val)):
        lines = []
        for k in range(n):
            c0, c1 = (list(COLORS)[int(i)] for i in rng.integers(0, 3, 2))
            asked = list(COLORS)[int(rng.integers(0, 3))]
            row = {"identifier": f"{split}-{k}-0-0", "sentence": f"the left square is {asked}",
                   "label": "True" if asked == c0 else "False", "synset": "square", "query": "square",
                   "left_url": "x", "right_url": "y", "writer": "w", "validation": {}, "extra_validations": {}}
            if split == "train":
                row["directory"] = k % 3
                d = root / "images" / "train" / str(k % 3)
            else:
                d = root / "images" / split
            d.mkdir(parents=True, exist_ok=True)
            _picture(rng, c0).save(d / f"{split}-{k}-0-img0.png")
            _picture(rng, c1).save(d / f"{split}-{k}-0-img1.png")
            lines.append(json.dumps(row))
        (root / f"{split}.json").write_text("\n".join(lines) + "\n")
    return root


def write_snli(root: Path, n_train=32, n_val=16, seed=0) -> Path:
    """SNLI-VE: snli_ve_<split>.jsonl, flickr30k_images/<Flickr30K_ID>.jpg."""
    rng = np.random.default_rng(seed)
    (root / "flickr30k_images").mkdir(parents=True, exist_ok=True)
    fid = 1000
    for split, n in (("train", n_train), ("dev", n_val)):
        lines = []
        for k in range(n):
            fid += 1
            color = list(COLORS)[int(rng.integers(0, 3))]
            _picture(rng, color).save(root / "flickr30k_images" / f"{fid}.jpg", quality=95)
            kind = int(rng.integers(0, 3))
            if kind == 0:
                hyp, gold = f"the square is {color}", "entailment"
            elif kind == 1:
                other = [c for c in COLORS if c != color][int(rng.integers(0, 2))]
                hyp, gold = f"the square is {other}", "contradiction"
            else:
                hyp, gold = "the square was painted yesterday", "neutral"
            lines.append(json.dumps({"Flickr30K_ID": str(fid), "sentence1": "a square on grey", "sentence2": hyp,
                                     "gold_label": gold, "pairID": f"{fid}#0r1{gold[0]}", "captionID": f"{fid}#0"}))
        (root / f"snli_ve_{split}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def write_easyvqa(root: Path, n_train=32, n_val=16, seed=0) -> Path:
    """easy-VQA: {train,test}/questions.json ([question, answer, image_id] rows), {train,test}/images/<id>.png."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_val)):
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        rows = []
        for k in range(n):
            color = list(COLORS)[int(rng.integers(0, 3))]
            _picture(rng, color, 64).save(root / split / "images" / f"{k}.png")
            q, a = _qa(rng, color, k)
            rows.append([q, a, k])
        (root / split / "questions.json").write_text(json.dumps(rows))
    return root


def model_for(tmp_path: Path, task: str, **kw) -> Path:
    """A tiny METER model directory (as attach writes it) whose trimmers start keeping everything."""
    from smarttrim_cli.data import EASYVQA_ANSWERS

    labels = kw.pop("labels", None)
    if task == "vqa" and labels is None:
        labels = VQA_LABELS
    if labels == "easyvqa":
        labels = list(EASYVQA_ANSWERS)
    extra = {"num_labels": len(labels)} if labels else {}
    return tiny_model_dir(tmp_path / f"model-{task}", task, trim_kw={"init_keep": 3.0}, labels=labels, **extra, **kw)


FAST = ["--epochs", "1", "--batch-size", "8", "--workers", "0", "--no-progress", "--set", "eval_before=false"]


def _cli(args):
    from smarttrim_cli.cli import app

    return CliRunner().invoke(app, ["finetune", *args])


# ----- bad rows and missing images ------------------------------------------------------------------
def test_vqa_bad_row_is_one_line_error_or_skipped(tmp_path):
    data = write_vqa(tmp_path / "vqa", n_train=16, n_val=8)
    qpath = data / "v2_OpenEnded_mscoco_train2014_questions.json"
    q = json.loads(qpath.read_text())
    del q["questions"][3]["question"]
    qpath.write_text(json.dumps(q))
    model = model_for(tmp_path, "vqa")
    r = _cli([str(model), "--data-dir", str(data), "-o", str(tmp_path / "out"), *FAST])
    assert r.exit_code == 2, r.output
    err = r.output.strip().splitlines()
    assert len(err) == 1 and "v2_OpenEnded_mscoco_train2014_questions.json" in err[0] and "question" in err[0]
    assert not (tmp_path / "out").exists()

    r = _cli([str(model), "--data-dir", str(data), "-o", str(tmp_path / "out"), *FAST, "--skip-bad"])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "out" / "finetune_summary.json").read_text())
    assert summary["train_inputs"] == 15 and summary["skipped"]["train"] == {"bad row": 1}
    assert "1 bad row" in r.output


def test_missing_image_is_one_line_error_or_skipped(tmp_path):
    data = write_snli(tmp_path / "snli", n_train=16, n_val=8)
    first = json.loads((data / "snli_ve_train.jsonl").read_text().splitlines()[5])
    (data / "flickr30k_images" / f"{first['Flickr30K_ID']}.jpg").unlink()
    model = model_for(tmp_path, "snli")
    r = _cli([str(model), "--data-dir", str(data), "-o", str(tmp_path / "out"), *FAST])
    assert r.exit_code == 2, r.output
    err = r.output.strip().splitlines()
    assert len(err) == 1 and f"{first['Flickr30K_ID']}.jpg" in err[0], r.output
    assert "Traceback" not in r.output and not (tmp_path / "out").exists()

    r = _cli([str(model), "--data-dir", str(data), "-o", str(tmp_path / "out"), *FAST, "--skip-bad"])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "out" / "finetune_summary.json").read_text())
    assert summary["skipped"]["train"] == {"missing image": 1} and summary["train_inputs"] == 15


def test_missing_data_dir_and_wrong_dataset(tmp_path):
    model = model_for(tmp_path, "vqa")
    r = _cli([str(model), "--data-dir", str(tmp_path / "nope"), *FAST])
    assert r.exit_code == 2 and "nope" in r.output and len(r.output.strip().splitlines()) == 1
    r = _cli([str(model), "--dataset", "nlvr2", "--data-dir", str(tmp_path), *FAST])
    assert r.exit_code == 2 and "does not fit a vqa model" in r.output


def test_label_count_mismatch_needs_new_head(tmp_path):
    data = write_easyvqa(tmp_path / "easy", n_train=16, n_val=8)
    model = model_for(tmp_path, "vqa")  # 5 labels, easy-VQA has 13
    r = _cli([str(model), "--dataset", "easyvqa", "--data-dir", str(data), "-o", str(tmp_path / "o"), *FAST])
    assert r.exit_code == 2
    assert "--new-head" in r.output and len(r.output.strip().splitlines()) == 1
    r = _cli([str(model), "--dataset", "easyvqa", "--data-dir", str(data), "-o", str(tmp_path / "o"), *FAST,
              "--new-head", "--no-trim"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg["backbone_config"]["num_labels"] == 13 and len(cfg["labels"]) == 13
    import smarttrim_cli
    m = smarttrim_cli.load(tmp_path / "o")
    assert m.model.head()[-1].out_features == 13 and m.labels[0] == "black"


def test_vqa_model_without_labels_builds_vocabulary(tmp_path):
    """A VQAv2 model directory without label names: the vocabulary comes from the data (METER's rule);
    it must have as many answers as the classifier has outputs."""
    data = write_vqa(tmp_path / "vqa", n_train=64, n_val=16, balanced=True)  # each answer >= 9 times
    for n_out in (7, 5):
        model = model_for(tmp_path / str(n_out), "vqa", labels=[f"a{i}" for i in range(n_out)])
        cfg = json.loads((model / "config.json").read_text())
        cfg["labels"] = None
        (model / "config.json").write_text(json.dumps(cfg))
        r = _cli([str(model), "--data-dir", str(data), "-o", str(tmp_path / "o"), *FAST, "--max-steps", "1"])
        if n_out == 7:
            assert r.exit_code == 2 and "vocabulary built from" in r.output and "--new-head" in r.output, r.output
            assert "5 answers" in r.output and "7 outputs" in r.output
        else:
            assert r.exit_code == 0, r.output
            labels = json.loads((tmp_path / "o" / "config.json").read_text())["labels"]
            assert sorted(labels) == sorted(VQA_LABELS)
