"""Dataset readers: tiny data written in each real on-disk format, read back and checked."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from smarttrim_cli.data import (CLIP_MEAN, CLIP_STD, EASYVQA_ANSWERS, SNLI_LABELS, EasyVQADataset,
                                ImagePreprocessor, NLVR2Dataset, SNLIVEDataset, VQAv2Dataset,
                                build_answer_vocab, build_vqa_vocab, collate, default_data_dir,
                                make_collate, normalize_answer, open_dataset, soft_score, vqa_score,
                                vqa_targets)
from smarttrim_cli.errors import SmartTrimError


# ----------------------------------------------------------------------------- helpers

def save_image(path: Path, size=(24, 18), color=(200, 30, 60), fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def ann(qid, iid, answers, mca=None):
    return {"question_id": qid, "image_id": iid, "question_type": "what", "answer_type": "other",
            "multiple_choice_answer": mca if mca is not None else answers[0],
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                        for i, a in enumerate(answers)]}


def make_vqa(root: Path, image_folder="{split}", with_test=False) -> Path:
    """train2014: 12 questions (vocab: 'yes' x9 first, then '2' x9 via 'two'/'2'; 'cat' only 3x);
    val2014: 3 questions on 2 images."""
    train_q, train_a = [], []
    for k in range(12):
        qid, iid = 1000 + k, 9 + (k % 2)
        train_q.append({"image_id": iid, "question": f"train question {k}?", "question_id": qid})
        if k < 9:
            mca = "yes"
        else:
            mca = "cat"
        train_a.append(ann(qid, iid, [mca] * 10, mca))
    val_q = [{"image_id": 42, "question": "How many dogs?", "question_id": 42001},
             {"image_id": 42, "question": "Is it sunny?", "question_id": 42002},
             {"image_id": 7, "question": "What animal?", "question_id": 7001}]
    val_a = [ann(42001, 42, ["two", "2", "Two", "3", "3", "3", "three", "cat", "cat", "the cat"], "two"),
             ann(42002, 42, ["yes"] * 2 + ["no"] * 8, "no"),
             ann(7001, 7, ["giraffe"] * 10, "giraffe")]
    # 9 more val answers of "2" (written as number words and digits) so that "2" reaches min_count
    for k in range(8):
        val_q.append({"image_id": 7, "question": f"count {k}", "question_id": 7100 + k})
        val_a.append(ann(7100 + k, 7, ["2"] * 10, "two" if k % 2 else "2"))
    root.mkdir(parents=True, exist_ok=True)
    (root / "v2_OpenEnded_mscoco_train2014_questions.json").write_text(json.dumps({"questions": train_q}))
    (root / "v2_mscoco_train2014_annotations.json").write_text(json.dumps({"annotations": train_a}))
    (root / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps({"questions": val_q}))
    (root / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": val_a}))
    for split, ids in (("train2014", (9, 10)), ("val2014", (42, 7))):
        folder = root / image_folder.format(split=split, short=split[:-4])
        for i in ids:
            save_image(folder / f"COCO_{split}_{i:012d}.jpg", size=(32 + i, 20), color=(i * 5 % 255, 90, 40))
    if with_test:
        (root / "v2_OpenEnded_mscoco_test2015_questions.json").write_text(json.dumps(
            {"questions": [{"image_id": 5, "question": "What?", "question_id": 5000}]}))
        save_image(root / "test2015" / "COCO_test2015_000000000005.jpg")
    return root


# ----------------------------------------------------------------------------- answers

@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"), ("none", "0"), ("the dog.", "dog"), ("A Red Car!", "red car"),
    ("dont know", "don't know"), ("1,000", "1000"), ("3.5", "3.5"), ("t-shirt", "t shirt"),
    ("yes ?", "yes"), ("(left)", "left"), ("  fire   hydrant ", "fire hydrant"), ("one or two", "1 or 2"),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_build_answer_vocab_first_occurrence_order_and_min_count():
    stream = ["no"] * 2 + ["Yes"] + ["two"] * 3 + ["yes."] * 2 + ["no"] + ["2"] + ["cat"] * 2
    # normalised counts: no 3, yes 3, 2 4, cat 2  ->  first occurrences: no, yes, 2, cat
    assert build_answer_vocab(stream, min_count=3) == ["no", "yes", "2"]
    assert build_answer_vocab(stream, min_count=4) == ["2"]
    assert build_answer_vocab(stream, min_count=1) == ["no", "yes", "2", "cat"]
    assert build_answer_vocab(stream, min_count=1, normalize=False)[:3] == ["no", "Yes", "two"]


def test_soft_score_and_targets():
    assert [soft_score(n) for n in range(7)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0, 1.0]
    label2id = {"2": 0, "3": 1, "cat": 2, "dog": 3}
    t = vqa_targets(["two", "2", "Two", "3", "3", "3", "three", "cat", "the cat", "zebra"], label2id)
    # "2" x3 -> 0.9, "3" x4 -> 1.0, "cat" x2 -> 0.6, "zebra" out of vocabulary, "dog" absent
    assert t == {0: 0.9, 1: 1.0, 2: 0.6}
    assert vqa_targets(["zebra"] * 10, label2id) == {}


def test_vqa_score_uses_target_of_argmax():
    target = torch.tensor([[0.9, 1.0, 0.0], [0.0, 0.3, 0.6]])
    assert vqa_score(torch.tensor([0, 0]), target).tolist() == pytest.approx([0.9, 0.0])
    logits = torch.tensor([[0.1, 2.0, -1.0], [0.0, 0.5, 0.4]])
    assert vqa_score(logits, target).tolist() == pytest.approx([1.0, 0.3])
    assert vqa_score(torch.tensor(2), target[1]).tolist() == pytest.approx([0.6])


# ----------------------------------------------------------------------------- preprocessing

def test_preprocess_shape_crop_and_normalisation():
    pp = ImagePreprocessor(8)
    gray = Image.new("RGB", (20, 10), (128, 128, 128))
    x = pp(gray)
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32
    expected = (128 / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(x[:, 4, 4], expected, atol=1e-6)

    # no resize needed (height == size): 14 wide -> crop columns 2..11 (offset round(4 / 2))
    arr = np.full((10, 14, 3), 255, np.uint8)
    arr[:, :3] = (255, 0, 0)      # columns 0-2 red: only column 2 is inside the crop
    arr[:, 11:] = (0, 0, 255)     # columns 11-13 blue: only column 11 is inside
    pp10 = ImagePreprocessor(10, mean=(0, 0, 0), std=(1, 1, 1))
    assert pp10.resize_crop(Image.fromarray(arr)).size == (10, 10)
    x = pp10(Image.fromarray(arr))
    assert x[:, :, 0].tolist() == [[1.0] * 10, [0.0] * 10, [0.0] * 10]
    assert x[:, :, 9].tolist() == [[0.0] * 10, [0.0] * 10, [1.0] * 10]
    assert torch.all(x[:, :, 1:9] == 1.0)
    # shorter side resized (40x120 -> 10x30), then the middle 10 rows kept: the white middle third
    tall = np.zeros((120, 40, 3), np.uint8)
    tall[40:80] = 255
    x = pp10(Image.fromarray(tall))
    assert x.shape == (3, 10, 10)
    assert torch.all(x[:, 2:8] > 0.95) and x.mean() > 0.8
    wide = pp10(Image.fromarray(np.ascontiguousarray(tall.transpose(1, 0, 2))))
    assert torch.allclose(wide, x.transpose(1, 2), atol=1e-6)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "CMYK", "I;16"])
def test_preprocess_converts_any_mode(mode):
    img = Image.new("RGB", (12, 12), (10, 200, 30)).convert(mode)
    x = ImagePreprocessor(6)(img)
    assert x.shape == (3, 6, 6) and torch.isfinite(x).all()
    if mode == "L":  # grey replicated on 3 channels: equal before normalisation
        raw = ImagePreprocessor(6, mean=(0, 0, 0), std=(1, 1, 1))(img)
        assert torch.equal(raw[0], raw[1]) and torch.equal(raw[1], raw[2])


def test_preprocess_rejects_bad_arguments():
    with pytest.raises(ValueError):
        ImagePreprocessor(0)
    with pytest.raises(ValueError):
        ImagePreprocessor(8, std=(1, 0, 1))


# ----------------------------------------------------------------------------- VQAv2

def test_vqa_vocab_targets_and_items(tmp_path):
    root = make_vqa(tmp_path / "vqa")
    # vocab: train "yes" x9 (first), "cat" only 3x (dropped); val adds "2" x9 ("two"/"2" merged)
    assert build_vqa_vocab(root) == ["yes", "2"]
    ds = VQAv2Dataset(root, split="val", image_size=16)
    assert ds.split == "val2014" and ds.id2label == ["yes", "2"] and ds.num_labels == 2
    assert len(ds) == 11 and dict(ds.skipped) == {}
    item = ds[0]
    assert set(item) == {"image", "text", "target", "question_id", "image_id", "answers"}
    assert item["image"].shape == (3, 16, 16)
    assert item["text"] == "How many dogs?" and item["question_id"] == 42001 and item["image_id"] == 42
    assert item["answers"][0] == "two" and len(item["answers"]) == 10
    assert item["target"].tolist() == pytest.approx([0.0, 0.9])       # "two","2","Two" -> "2" x3
    assert ds[1]["target"].tolist() == pytest.approx([0.6, 0.0])      # "yes" x2
    assert ds[2]["target"].tolist() == [0.0, 0.0]                     # giraffe: not in vocabulary
    assert ds[1]["image_id"] == 42 and torch.equal(ds[0]["image"], ds[1]["image"])

    # label2id from a checkpoint: order and size follow it
    ds2 = VQAv2Dataset(root, split="val2014", image_size=16, label2id={"giraffe": 3, "2": 0}, limit=3)
    assert len(ds2) == 3 and ds2.num_labels == 4
    assert ds2[2]["target"].tolist() == [0.0, 0.0, 0.0, 1.0]
    assert ds2[0]["target"].tolist() == pytest.approx([0.9, 0.0, 0.0, 0.0])

    ds3 = VQAv2Dataset(root, split="val", image_size=16, drop_unanswerable=True)
    assert len(ds3) == 10 and ds3.skipped["no answer in vocabulary"] == 1
    # vocabulary from train only, lower min_count: "yes" (9x) then "cat" (3x)
    ds4 = VQAv2Dataset(root, split="val", image_size=16, vocab_splits=["train"], min_count=3, limit=1)
    assert ds4.id2label == ["yes", "cat"] and ds4[0]["target"].tolist() == pytest.approx([0.0, 0.9])  # "cat", "cat", "the cat"


@pytest.mark.parametrize("folder", ["images/{split}", "{short}", "images/{short}"])
def test_vqa_accepts_image_layouts(tmp_path, folder):
    root = make_vqa(tmp_path / "vqa", image_folder=folder)
    ds = VQAv2Dataset(root, split="train", image_size=8, limit=2)
    assert len(ds) == 2 and ds[1]["image"].shape == (3, 8, 8)
    assert ds.image_dir == root / folder.format(split="train2014", short="train")


def test_vqa_test_split_without_annotations(tmp_path):
    root = make_vqa(tmp_path / "vqa", with_test=True)
    ds = VQAv2Dataset(root, split="test", image_size=8, label2id=["yes", "no"])
    assert ds.annotations_path is None and len(ds) == 1
    item = ds[0]
    assert item["answers"] == [] and item["target"].tolist() == [0.0, 0.0]


def test_vqa_errors_name_file_and_row(tmp_path):
    root = make_vqa(tmp_path / "vqa")
    qfile = root / "v2_OpenEnded_mscoco_val2014_questions.json"
    data = json.loads(qfile.read_text())
    del data["questions"][1]["image_id"]
    qfile.write_text(json.dumps(data))
    with pytest.raises(SmartTrimError) as e:
        VQAv2Dataset(root, split="val", image_size=8)
    msg = str(e.value)
    assert str(qfile) in msg and "questions[1]" in msg and "'image_id'" in msg and "\n" not in msg

    # missing image and unreadable image: raised lazily, naming file and question
    (root / "val2014" / "COCO_val2014_000000000042.jpg").unlink()
    (root / "val2014" / "COCO_val2014_000000000007.jpg").write_bytes(b"not a jpeg at all")
    data["questions"][1]["image_id"] = 42
    qfile.write_text(json.dumps(data))
    ds = VQAv2Dataset(root, split="val", image_size=8)
    with pytest.raises(SmartTrimError) as e:
        ds[0]
    assert str(e.value) == f"{root / 'val2014' / 'COCO_val2014_000000000042.jpg'}: image not found (question 42001)"
    with pytest.raises(SmartTrimError) as e:
        ds[2]
    msg = str(e.value)
    assert msg.startswith(f"{root / 'val2014' / 'COCO_val2014_000000000007.jpg'}: cannot read image (question 7001")
    assert "\n" not in msg

    # missing annotations file for a non-test split
    (root / "v2_mscoco_val2014_annotations.json").unlink()
    with pytest.raises(SmartTrimError, match="v2_mscoco_val2014_annotations.json"):
        VQAv2Dataset(root, split="val", image_size=8, label2id=["yes"])
    # invalid JSON names file and line
    (root / "v2_mscoco_train2014_annotations.json").write_text('{"annotations": [\n{"question_id": 1,,}]}')
    with pytest.raises(SmartTrimError, match=r"v2_mscoco_train2014_annotations.json line 2 column"):
        VQAv2Dataset(root, split="train", image_size=8, label2id=["yes"])


def test_vqa_skip_bad_counts(tmp_path):
    root = make_vqa(tmp_path / "vqa")
    (root / "val2014" / "COCO_val2014_000000000042.jpg").unlink()                 # 2 questions
    qfile = root / "v2_OpenEnded_mscoco_val2014_questions.json"
    data = json.loads(qfile.read_text())
    data["questions"][3]["question"] = None                                        # bad row
    data["questions"].append({"image_id": 7, "question": "orphan?", "question_id": 999})  # no annotation
    qfile.write_text(json.dumps(data))
    with pytest.raises(SmartTrimError, match=r"questions\[3\]: missing 'question'"):
        VQAv2Dataset(root, split="val", image_size=8, label2id=["2"])
    ds = VQAv2Dataset(root, split="val", image_size=8, label2id=["2"], skip_bad=True)
    assert dict(ds.skipped) == {"missing image": 2, "bad row": 1, "no annotation": 1}
    assert len(ds) == 12 - 4
    assert [ds[i]["question_id"] for i in range(2)] == [7001, 7101]
    assert ds.skipped_summary() == "skipped 4 (2 missing image, 1 bad row, 1 no annotation)"
    # an unreadable image is caught at index time with skip_bad
    (root / "val2014" / "COCO_val2014_000000000007.jpg").write_bytes(b"\xff\xd8garbage")
    ds = VQAv2Dataset(root, split="val", image_size=8, label2id=["2"], skip_bad=True)
    assert len(ds) == 0 and ds.skipped["unreadable image"] == 8  # every question on image 7


# ----------------------------------------------------------------------------- NLVR2

def nlvr_row(ident, sentence, label, **extra):
    return {"validation": {}, "sentence": sentence, "left_url": "http://x/l.jpg", "writer": "w",
            "label": label, "right_url": "http://x/r.jpg", "synset": "n1", "query": "q",
            "identifier": ident, "extra_validations": {}, **extra}


def make_nlvr2(root: Path) -> Path:
    write_jsonl(root / "dev.json", [nlvr_row("dev-850-0-0", "Both images show dogs.", "True"),
                                    nlvr_row("dev-850-0-1", "There are three dogs.", "False"),
                                    nlvr_row("dev-851-2-3", "Empty.", "False")])
    for stem in ("dev-850-0", "dev-851-2"):
        save_image(root / "images" / "dev" / f"{stem}-img0.png", color=(255, 0, 0))
        save_image(root / "images" / "dev" / f"{stem}-img1.png", color=(0, 0, 255))
    write_jsonl(root / "train.json", [nlvr_row("train-10171-0-0", "Left has more.", "True", directory=44),
                                      nlvr_row("train-7-1-2", "Right has more.", "False", directory=3)])
    for d, stem in ((44, "train-10171-0"), (3, "train-7-1")):
        save_image(root / "images" / "train" / str(d) / f"{stem}-img0.png", color=(0, 255, 0))
        save_image(root / "images" / "train" / str(d) / f"{stem}-img1.png", color=(0, 0, 0))
    return root


def test_nlvr2_items_and_layouts(tmp_path):
    root = make_nlvr2(tmp_path / "nlvr2")
    ds = NLVR2Dataset(root, split="val", image_size=8)
    assert ds.split == "dev" and len(ds) == 3
    item = ds[0]
    assert set(item) == {"image", "image2", "text", "target", "identifier"}
    assert item["target"].dtype == torch.long and item["target"].shape == () and item["target"].item() == 1
    assert ds[1]["target"].item() == 0 and ds[2]["identifier"] == "dev-851-2-3"
    # img0 (red) is "image", img1 (blue) is "image2"
    assert item["image"][0].mean() > item["image"][2].mean()
    assert item["image2"][2].mean() > item["image2"][0].mean()
    tr = NLVR2Dataset(root, split="train", image_size=8)       # numbered subfolders via "directory"
    assert [tr[i]["target"].item() for i in range(2)] == [1, 0]
    assert tr[1]["image"].shape == (3, 8, 8)
    # train rows without "directory": found anywhere below images/train
    write_jsonl(root / "train.json", [nlvr_row("train-7-1-2", "Right has more.", "False")])
    assert NLVR2Dataset(root, split="train", image_size=8)[0]["image2"].shape == (3, 8, 8)


def test_nlvr2_errors_and_skip_bad(tmp_path):
    root = make_nlvr2(tmp_path / "nlvr2")
    rows = [nlvr_row("dev-850-0-0", "ok", "True"), "{not json", nlvr_row("dev-850-0-1", "x", "maybe"),
            {"identifier": "dev-851-2-3", "label": "True"}, nlvr_row("dev-999-0-0", "no images", "True")]
    write_jsonl(root / "dev.json", rows)
    with pytest.raises(SmartTrimError) as e:
        NLVR2Dataset(root, split="dev", image_size=8)
    assert str(e.value).startswith(f"{root / 'dev.json'} line 2: invalid JSON")
    write_jsonl(root / "dev.json", [rows[0], rows[3]])
    with pytest.raises(SmartTrimError, match=r"dev.json line 2: missing 'sentence'"):
        NLVR2Dataset(root, split="dev", image_size=8)
    write_jsonl(root / "dev.json", rows)
    ds = NLVR2Dataset(root, split="dev", image_size=8, skip_bad=True)
    assert len(ds) == 1 and dict(ds.skipped) == {"bad row": 3, "missing image": 1}
    write_jsonl(root / "dev.json", [rows[4]])
    ds = NLVR2Dataset(root, split="dev", image_size=8)
    with pytest.raises(SmartTrimError, match=r"dev-999-0-img0.png: image not found \(dev-999-0-0, dev.json line 1\)"):
        ds[0]
    with pytest.raises(SmartTrimError, match=r"test1.json: NLVR2 test1 file not found"):
        NLVR2Dataset(root, split="test", image_size=8)


# ----------------------------------------------------------------------------- SNLI-VE

def snli_row(fid, hyp, gold):
    return {"Flickr30K_ID": fid, "sentence1": "A man rides a horse.", "sentence2": hyp,
            "gold_label": gold, "pairID": f"{fid}.jpg#0r1e", "captionID": f"{fid}.jpg#0"}


def make_snli(root: Path) -> Path:
    write_jsonl(root / "snli_ve_dev.jsonl", [snli_row("1001", "A person is outside.", "entailment"),
                                             snli_row("1001", "The man is sad.", "neutral"),
                                             snli_row("2002", "Nobody is here.", "contradiction")])
    save_image(root / "flickr30k_images" / "1001.jpg", size=(40, 30))
    save_image(root / "flickr30k_images" / "2002.jpg", size=(30, 40))
    return root


def test_snli_ve_items_and_label_order(tmp_path):
    root = make_snli(tmp_path / "snli")
    ds = SNLIVEDataset(root, split="val", image_size=12)
    assert SNLI_LABELS == ("contradiction", "neutral", "entailment")
    assert [ds[i]["target"].item() for i in range(3)] == [2, 1, 0]
    item = ds[0]
    assert item["text"] == "A person is outside." and item["image"].shape == (3, 12, 12)
    assert item["image_id"] == "1001" and item["target"].dtype == torch.long
    flipped = SNLIVEDataset(root, split="dev", image_size=12,
                            label2id={"entailment": 0, "neutral": 1, "contradiction": 2}, limit=1)
    assert len(flipped) == 1 and flipped[0]["target"].item() == 0


def test_snli_ve_errors_and_skip_bad(tmp_path):
    root = make_snli(tmp_path / "snli")
    rows = [snli_row("1001", "ok", "entailment")] * 6 + [{"Flickr30K_ID": "1001", "sentence2": "x"}]
    write_jsonl(root / "snli_ve_dev.jsonl", rows)
    with pytest.raises(SmartTrimError) as e:
        SNLIVEDataset(root, split="dev", image_size=8)
    assert str(e.value) == f"{root / 'snli_ve_dev.jsonl'} line 7: missing 'gold_label'"
    rows = [snli_row("1001", "ok", "entailment"), snli_row("1001", "?", "-"), snli_row("3003", "gone", "neutral")]
    write_jsonl(root / "snli_ve_dev.jsonl", rows)
    with pytest.raises(SmartTrimError, match=r"line 2: unknown gold_label '-'"):
        SNLIVEDataset(root, split="dev", image_size=8)
    ds = SNLIVEDataset(root, split="dev", image_size=8, skip_bad=True)
    assert len(ds) == 1 and dict(ds.skipped) == {"bad row": 1, "missing image": 1}
    (root / "flickr30k_images" / "1001.jpg").write_bytes(b"")
    ds = SNLIVEDataset(root, split="dev", image_size=8, limit=1)
    with pytest.raises(SmartTrimError, match=r"1001.jpg: cannot read image \(snli_ve_dev.jsonl line 1"):
        ds[0]
    with pytest.raises(SmartTrimError, match="snli_ve_train.jsonl: SNLI-VE train file not found"):
        SNLIVEDataset(root, split="train", image_size=8)


# ----------------------------------------------------------------------------- easy-VQA

def test_easyvqa_reads_installed_package():
    ds = open_dataset("easyvqa", None, "test", image_size=32, limit=40)
    assert len(ds) == 40 and ds.num_labels == 13
    assert ds.id2label == sorted(ds.id2label) == list(EASYVQA_ANSWERS)
    qs = json.loads((ds.data_dir / "test" / "questions.json").read_text())
    assert sorted({a for _q, a, _i in qs}) == list(EASYVQA_ANSWERS)
    item = ds[0]
    assert set(item) == {"image", "text", "target", "question_id", "image_id", "answers"}
    assert item["text"] == qs[0][0] and item["answers"] == [qs[0][1]] and item["image_id"] == qs[0][2]
    assert item["target"].sum() == 1.0 and ds.id2label[int(item["target"].argmax())] == qs[0][1]
    assert item["image"].shape == (3, 32, 32) and item["image"].std() > 0.1   # a real picture
    with pytest.raises(SmartTrimError, match="easy-VQA has splits train, test"):
        open_dataset("easy-vqa", None, "val", image_size=32)


def test_easyvqa_bad_rows_in_copied_layout(tmp_path):
    root = tmp_path / "ev"
    (root / "test").mkdir(parents=True)
    (root / "test" / "questions.json").write_text(json.dumps(
        [["what shape?", "circle", 0], ["what color?", "purple", 0], ["is it?", "yes"], ["q", "no", 1]]))
    save_image(root / "test" / "images" / "0.png")
    with pytest.raises(SmartTrimError, match=r"questions.json row 1: answer 'purple'"):
        EasyVQADataset(root, "test", 8)
    ds = EasyVQADataset(root, "test", 8, skip_bad=True)
    assert len(ds) == 1 and dict(ds.skipped) == {"bad row": 2, "missing image": 1}


# ----------------------------------------------------------------------------- registry, collate

def test_open_dataset_registry_and_default_dirs(tmp_path, monkeypatch):
    monkeypatch.delenv("SMARTTRIM_DATA", raising=False)
    assert default_data_dir("vqa") == Path.home() / ".cache" / "smarttrim" / "data" / "vqa"
    monkeypatch.setenv("SMARTTRIM_DATA", str(tmp_path))
    assert default_data_dir("snli-ve") == tmp_path / "snli"
    make_snli(tmp_path / "snli")
    ds = open_dataset("snli", None, "dev", image_size=8)
    assert isinstance(ds, SNLIVEDataset) and len(ds) == 3
    with pytest.raises(SmartTrimError) as e:
        open_dataset("nlvr2", None, "dev", image_size=8)
    assert str(tmp_path / "nlvr2") in str(e.value) and "--data-dir" in str(e.value)
    with pytest.raises(SmartTrimError, match="--data-dir"):
        open_dataset("vqa", tmp_path / "nowhere", "val", image_size=8)
    with pytest.raises(SmartTrimError, match="unknown dataset 'gqa'"):
        open_dataset("gqa", tmp_path, "val", image_size=8)


@pytest.fixture(scope="module")
def bert_tokenizer(tmp_path_factory):
    from transformers import BertTokenizer
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "how", "many", "dogs", "?", "is", "it",
             "sunny", "both", "images", "show", "there", "are", "three", "."]
    path = tmp_path_factory.mktemp("tok") / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n")
    return BertTokenizer(str(path))


def test_collate_vqa_and_nlvr2(tmp_path, bert_tokenizer):
    ds = VQAv2Dataset(make_vqa(tmp_path / "vqa"), split="val", image_size=8)
    batch = collate([ds[0], ds[1]], bert_tokenizer, max_text_len=40)
    assert batch["pixel_values"].shape == (2, 3, 8, 8)
    # "how many dogs ?" -> CLS + 4 + SEP = 6; "is it sunny ?" -> 6: longest = 6, no padding needed
    assert batch["input_ids"].shape == (2, 6) and batch["attention_mask"].sum().item() == 12
    assert batch["target"].shape == (2, 2) and batch["target"].dtype == torch.float32
    assert batch["question_id"].tolist() == [42001, 42002] and batch["text"][0] == "How many dogs?"
    assert isinstance(batch["answers"], list) and len(batch["answers"][0]) == 10
    short = collate([ds[0], ds[2]], bert_tokenizer, max_text_len=4)   # truncation
    assert short["input_ids"].shape == (2, 4)
    assert short["input_ids"][0, -1].item() == bert_tokenizer.sep_token_id

    nl = NLVR2Dataset(make_nlvr2(tmp_path / "nlvr2"), split="dev", image_size=8)
    loader = torch.utils.data.DataLoader(nl, batch_size=3, num_workers=1,
                                         collate_fn=make_collate(bert_tokenizer, 40))
    (b,) = list(loader)
    assert b["pixel_values"].shape == b["pixel_values2"].shape == (3, 3, 8, 8)
    assert b["target"].tolist() == [1, 0, 0] and b["target"].dtype == torch.long
    # padded to the longest: "both images show dogs ." is 7 tokens, "empty ." only 4
    lengths = b["attention_mask"].sum(1).tolist()
    assert lengths == [7, 7, 4] and b["input_ids"].shape == (3, 7)
    assert b["input_ids"][2, 4:].tolist() == [bert_tokenizer.pad_token_id] * 3
    assert b["identifier"] == ["dev-850-0-0", "dev-850-0-1", "dev-851-2-3"]
