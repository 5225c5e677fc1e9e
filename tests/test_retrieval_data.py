"""Retrieval data: the Karpathy-split captions reader (COCO and Flickr30k), recall@k in `profile`, and the
ITM fine-tune (positives plus in-batch negative captions) through the CLI, on tiny JPEGs written in the
real ``dataset_coco.json`` / ``dataset_flickr30k.json`` format and a tiny random BLIP retrieval model."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import smarttrim_cli
from smarttrim_cli.cli import app
from smarttrim_cli.data import CaptionsDataset, Flickr30kCaptionsDataset, collate, open_dataset
from smarttrim_cli.errors import SmartTrimError
from smarttrim_cli.profiling.accuracy import image_to_text_recall, recall_at_k
from smarttrim_cli.train.objectives import NEGATIVE_ID, itm_batch, itm_negatives

from test_blip import write_tiny_blip
from tiny_meter import tiny_model_dir

runner = CliRunner()
# words of test_blip's tokenizer vocabulary, so that captions do not all collapse to [UNK]
CAPTIONS = ["is there a red circle", "what color is the shape", "two dogs", "blue ball",
            "what shape is in the image", "gray triangle"]
SPLITS = ["train", "train", "restval", "val", "val", "val", "test", "test"]
FAST = ["--iters", "1", "--warmup", "0", "--threads", "1", "--batch-size", "2", "--throughput-batches", "1"]


def save_jpeg(path: Path, seed: int, size=(28, 20)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, "JPEG", quality=90)
    return path


def entry(k: int, split: str, coco: bool) -> dict:
    """One ``images[]`` entry as Karpathy's files have it (two captions per image here, five in the real ones)."""
    caps = [CAPTIONS[k % len(CAPTIONS)], CAPTIONS[(k + 3) % len(CAPTIONS)]]
    sents = [{"tokens": c.split(), "raw": c.capitalize() + ".", "imgid": k, "sentid": 10 * k + j}
             for j, c in enumerate(caps)]
    e = {"sentids": [s["sentid"] for s in sents], "imgid": k, "sentences": sents, "split": split}
    if coco:
        folder = "val2014" if split in ("val", "test") else "train2014"
        e.update(filepath=folder, filename=f"COCO_{folder}_{100 + k:012d}.jpg", cocoid=100 + k)
    else:
        e["filename"] = f"{1000 + k}.jpg"
    return e


def make_karpathy(root: Path, coco: bool = True, splits=SPLITS) -> Path:
    images = [entry(k, s, coco) for k, s in enumerate(splits)]
    for k, e in enumerate(images):
        save_jpeg(root / (e["filepath"] if coco else "flickr30k-images") / e["filename"], seed=k, size=(28 + k, 20))
    name = "dataset_coco.json" if coco else "dataset_flickr30k.json"
    (root / name).write_text(json.dumps({"images": images, "dataset": "coco" if coco else "flickr30k"}))
    return root


# ----- the reader ------------------------------------------------------------------------------------------
def test_coco_reader_items_and_splits(tmp_path):
    root = make_karpathy(tmp_path / "coco")
    ds = open_dataset("coco-captions", root, "test", image_size=16)
    assert isinstance(ds, CaptionsDataset) and ds.task == "retrieval" and len(ds) == 4  # 2 images x 2 captions
    items = [ds[i] for i in range(len(ds))]
    assert [it["image_id"] for it in items] == [106, 106, 107, 107]   # cocoid: recall groups captions by it
    assert [it["sentid"] for it in items] == [60, 61, 70, 71]
    assert items[0]["text"] == "Is there a red circle." and items[1]["text"] == "Blue ball."
    assert items[0]["filename"] == "COCO_val2014_000000000106.jpg"
    assert items[0]["target"].dtype == torch.long and int(items[0]["target"]) == 1
    assert items[0]["image"].shape == (3, 16, 16)
    assert torch.equal(items[0]["image"], items[1]["image"])            # same image, other caption
    assert not torch.allclose(items[0]["image"], items[2]["image"])     # the JPEGs were decoded
    # Karpathy's train is train + restval (BLIP/ALBEF); the other splits alone; dev = val
    assert len(open_dataset("coco_captions", root, "train", 16)) == 6
    assert len(CaptionsDataset(root, "restval", 16)) == 2
    assert len(CaptionsDataset(root, "dev", 16)) == len(CaptionsDataset(root, "val", 16)) == 6
    assert len(CaptionsDataset(root, "val", 16, limit=3)) == 3
    with pytest.raises(SmartTrimError, match="unknown split 'minival'"):
        CaptionsDataset(root, "minival", 16)
    b = collate(items[:3], ds_tokenizer(tmp_path), 12)
    assert b["image_id"].tolist() == [106, 106, 107] and b["target"].tolist() == [1, 1, 1]


def ds_tokenizer(tmp_path):
    from transformers import BertTokenizer

    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "is", "red"]) + "\n")
    return BertTokenizer(str(tmp_path / "vocab.txt"))


def test_flickr_reader_layout(tmp_path):
    root = make_karpathy(tmp_path / "f30k", coco=False)
    ds = open_dataset("flickr30k", root, "val", image_size=16)
    assert isinstance(ds, Flickr30kCaptionsDataset) and len(ds) == 6
    assert [ds[i]["image_id"] for i in (0, 2, 4)] == [3, 4, 5]          # no cocoid: imgid
    assert ds[0]["filename"] == "1003.jpg" and ds[0]["image"].shape == (3, 16, 16)
    (root / "flickr30k-images").rename(root / "flickr30k_images")      # the SNLI-VE folder name works too
    assert len(open_dataset("f30k", root, "test", 16)) == 4
    (root / "flickr30k_images").rename(root / "elsewhere")
    with pytest.raises(SmartTrimError) as e:
        open_dataset("flickr30k", root, "test", 16)
    msg = str(e.value)
    assert "\n" not in msg and "no image folder" in msg and str(root / "flickr30k-images") in msg


def test_reader_errors_are_one_line_and_skip_bad_counts(tmp_path):
    root = make_karpathy(tmp_path / "coco")
    path = root / "dataset_coco.json"
    with pytest.raises(SmartTrimError) as e:
        open_dataset("flickr30k", root, "test", 16)                    # the flickr file is not there
    assert str(e.value).startswith(f"{root / 'dataset_flickr30k.json'}: Flickr30k captions file not found")
    with pytest.raises(SmartTrimError, match="coco-captions data directory .*nowhere does not exist"):
        open_dataset("coco-captions", tmp_path / "nowhere", "test", 16)

    good = json.loads(path.read_text())
    path.write_text('{"images": [\n{"split": "test",,}]}')
    with pytest.raises(SmartTrimError, match=r"dataset_coco.json line 2 column \d+: invalid JSON"):
        CaptionsDataset(root, "test", 16)
    path.write_text(json.dumps(good["images"]))                        # a bare list: not the Karpathy format
    with pytest.raises(SmartTrimError, match="expected a JSON object with an 'images' list"):
        CaptionsDataset(root, "test", 16)

    bad = json.loads(json.dumps(good))
    del bad["images"][6]["filename"]
    bad["images"][7]["sentences"][1] = {"tokens": 5, "sentid": 71}
    path.write_text(json.dumps(bad))
    with pytest.raises(SmartTrimError) as e:
        CaptionsDataset(root, "test", 16)
    assert str(e.value) == f"{path} images[6]: missing 'filename'"
    del bad["images"][6]
    path.write_text(json.dumps(bad))
    with pytest.raises(SmartTrimError) as e:
        CaptionsDataset(root, "test", 16)
    assert str(e.value) == f"{path} images[6] sentences[1]: missing 'raw'"
    # a bad row of another split is not read at all
    assert len(CaptionsDataset(root, "val", 16)) == 6

    # skip_bad: bad rows are counted per row, missing/unreadable images per caption
    bad = json.loads(json.dumps(good))
    del bad["images"][6]["filename"]
    bad["images"][7]["sentences"][1]["raw"] = "   "
    path.write_text(json.dumps(bad))
    (root / "val2014" / good["images"][3]["filename"]).unlink()
    (root / "val2014" / good["images"][4]["filename"]).write_bytes(b"not a jpeg")
    ds = CaptionsDataset(root, "test", 16, skip_bad=True)
    assert len(ds) == 1 and dict(ds.skipped) == {"bad row": 2}
    ds = CaptionsDataset(root, "val", 16, skip_bad=True)
    assert len(ds) == 2 and dict(ds.skipped) == {"missing image": 2, "unreadable image": 2}
    ds = CaptionsDataset(root, "val", 16)                              # without: the error comes at read time
    with pytest.raises(SmartTrimError) as e:
        ds[0]
    assert "\n" not in str(e.value) and "COCO_val2014_000000000103.jpg: image not found" in str(e.value)


# ----- negatives and recall, as units ----------------------------------------------------------------------
def test_itm_negatives_come_from_other_images():
    ids = torch.tensor([5, 5, 7, 9])
    assert itm_negatives(ids).tolist() == [2, 2, 3, 0]                 # the next row showing another image
    assert itm_negatives(torch.tensor([4, 4, 4])).tolist() == [-1, -1, -1]
    # hard negatives: sampled by ITC similarity, never a caption of the same image
    sim = torch.full((4, 4), -1.0)
    sim[0, 3] = sim[1, 2] = sim[2, 0] = sim[3, 1] = 1.0
    sim[0, 1] = 1.0                                                    # same image as row 0: must not be drawn
    draws = torch.stack([itm_negatives(ids, sim, torch.Generator().manual_seed(s)) for s in range(50)])
    assert (draws[:, 0] != 1).all() and (draws[:, 0] != 0).all()
    assert (draws == torch.tensor([3, 2, 0, 1])).float().mean() > 0.9  # softmax(sim / 0.07): nearly the hardest
    same = [itm_negatives(ids, sim * 0, torch.Generator().manual_seed(3)).tolist() for _ in range(2)]
    assert same[0] == same[1]                                          # seeded: a resumed run redraws the same

    batch = {"pixel_values": torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 2, 2),
             "input_ids": torch.arange(4).view(4, 1) + 10, "attention_mask": torch.ones(4, 1, dtype=torch.long),
             "target": torch.ones(4, dtype=torch.long), "index": torch.tensor([20, 21, 22, 23])}
    out = itm_batch(batch, torch.tensor([2, -1, 3, 0]))
    assert out["target"].tolist() == [1, 1, 1, 1, 0, 0, 0]
    assert out["pixel_values"][:, 0, 0, 0].tolist() == [0, 1, 2, 3, 0, 2, 3]   # the row's own image ...
    assert out["input_ids"][:, 0].tolist() == [10, 11, 12, 13, 12, 13, 10]     # ... with the negative's caption
    assert out["index"].tolist()[4:] == [20 + NEGATIVE_ID, 22 + NEGATIVE_ID, 23 + NEGATIVE_ID]


def test_image_to_text_recall():
    # 4 texts, 2 images; texts 0,1 show image 0 and texts 2,3 image 1
    s = torch.tensor([[0.9, 0.1], [0.2, 0.3], [0.5, 0.4], [0.0, 0.1]])
    pos = [0, 0, 1, 1]
    assert recall_at_k(s, pos, ks=(1,)) == {"recall@1": 50.0}         # texts 0 and 3 rank their image first
    # each image's best own text (0.9; 0.4) beats every other text in its column
    assert image_to_text_recall(s, pos, ks=(1, 2)) == {"recall@1": 100.0, "recall@2": 100.0}
    s[2, 1], s[3, 1] = 0.05, 0.02                                      # image 1's texts now rank 3rd and 4th
    assert image_to_text_recall(s, pos, ks=(1, 2, 3)) == {"recall@1": 50.0, "recall@2": 50.0, "recall@3": 100.0}


# ----- profile and finetune through the CLI ----------------------------------------------------------------
@pytest.fixture(scope="module")
def itm_model(tmp_path_factory):
    """A tiny random BLIP retrieval model, attached (trimmers in place) as `smarttrim attach` writes it."""
    base = tmp_path_factory.mktemp("itm")
    hf = write_tiny_blip(base / "blip-itm-tiny", "BlipForImageTextRetrieval", seed=1)
    out = base / "attached"
    r = runner.invoke(app, ["attach", str(hf), "-o", str(out), "--task", "retrieval"])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return make_karpathy(tmp_path_factory.mktemp("data") / "coco")


def test_profile_recall_on_coco_captions(itm_model, coco, tmp_path):
    rep_path = tmp_path / "report.json"
    # threshold 0 keeps every token and head: the trimmed model must rank exactly as the full one
    r = runner.invoke(app, ["profile", str(itm_model), "--dataset", "coco-captions", "--data-dir", str(coco),
                            "--split", "val", "--limit", "0", "--threshold", "0", "--out", str(tmp_path), *FAST])
    assert r.exit_code == 0, r.output
    rep = json.loads(rep_path.read_text())
    assert rep["settings"]["dataset"] == "coco-captions" and rep["settings"]["n_inputs"] == 6
    assert [row["id"] for row in rep["per_input"]] == [30, 31, 40, 41, 50, 51]   # sentids
    rec = rep["accuracy"]["recall"]
    assert rec["texts"] == 6 and rec["images"] == 3
    for direction in (rec, rec["image_to_text"]):
        for model in ("full", "trimmed"):
            vals = [direction[model][f"recall@{k}"] for k in (1, 5, 10)]
            assert all(0.0 <= v <= 100.0 for v in vals) and vals == sorted(vals)
        assert direction["full"] == direction["trimmed"]
    assert rep["accuracy"]["full"] == rec["full"]["recall@1"] and rep["accuracy"]["drop"] == 0.0

    # the same recall, computed here: every caption against the 3 distinct images, ITM "match" logit
    loaded = smarttrim_cli.load(itm_model)
    m = loaded.model
    ds = open_dataset("coco-captions", coco, "val", m.config.image_size, preprocess=loaded.image_preprocessor())
    images = [ds[i] for i in (0, 2, 4)]
    scores = torch.zeros(6, 3)
    with torch.no_grad():
        for t in range(6):
            b = collate([dict(img, text=ds[t]["text"]) for img in images], loaded.tokenizer, m.config.max_text_len)
            scores[t] = m.run(b, mode="full")[0][:, 1]
    pos = [0, 0, 1, 1, 2, 2]
    for k, v in recall_at_k(scores, pos).items():
        assert rec["full"][k] == pytest.approx(v)
    for k, v in image_to_text_recall(scores, pos).items():
        assert rec["image_to_text"]["full"][k] == pytest.approx(v)


def test_profile_coco_captions_needs_a_retrieval_model(coco, tmp_path):
    d = tiny_model_dir(tmp_path / "vqa", "vqa")
    r = runner.invoke(app, ["profile", str(d), "--dataset", "coco-captions", "--data-dir", str(coco), *FAST])
    out = " ".join(r.output.split())  # the console wraps long lines
    assert r.exit_code == 2 and "Traceback" not in out
    assert "coco-captions is a retrieval dataset" in out and "vqa head" in out
    # a METER retrieval model scores a pair with one output (rank_output): no ITM head to fine-tune
    d = tiny_model_dir(tmp_path / "meter-irtr", "retrieval")
    r = runner.invoke(app, ["finetune", str(d), "-o", str(tmp_path / "o"), "--dataset", "coco-captions",
                            "--data-dir", str(coco), "--max-steps", "1", "--device", "cpu", "--no-progress"])
    out = " ".join(r.output.split())
    assert r.exit_code == 2 and "Traceback" not in out and "2 outputs (no_match, match)" in out


def test_finetune_itm_on_coco_captions(itm_model, coco, tmp_path):
    ft = tmp_path / "ft"
    r = runner.invoke(app, ["finetune", str(itm_model), "-o", str(ft), "--dataset", "coco-captions", "--data-dir",
                            str(coco), "--max-steps", "2", "--batch-size", "4", "--device", "cpu", "--workers", "0",
                            "--no-progress"])
    assert r.exit_code == 0, r.output
    s = json.loads((ft / "finetune_summary.json").read_text())
    assert s["dataset"] == "coco-captions" and s["mode"] == "smarttrim"
    assert s["train_inputs"] == 6 and s["val_inputs"] == 6             # train = train + restval
    # validation scores ITM on the 6 positives plus one negative caption each where the batch has another
    # image: val batches of 4 hold images (3, 3, 4, 4) and (5, 5), so 4 negatives
    assert s["base"]["n"] == 10
    log = [json.loads(line) for line in (ft / "finetune_log.jsonl").read_text().splitlines()]
    steps = [row for row in log if row["event"] == "step"]
    assert len(steps) == 2 and all(np.isfinite(row["task"]) and row["task"] > 0 for row in steps)
    assert "distill" in steps[0] and "cost" in steps[0]                # the SmartTrim objective, unchanged
    loaded = smarttrim_cli.load(ft)
    m = loaded.model
    assert m.family == "blip" and m.config.task == "retrieval" and loaded.labels == ["no_match", "match"]
    # the ITC projections only pick negatives: not trained
    src = smarttrim_cli.load(itm_model).model
    assert torch.equal(m.vision_proj.weight, src.vision_proj.weight)
    assert not torch.equal(m.itm_head.weight, src.itm_head.weight)


def test_finetune_retrieval_model_on_vqa_data_is_a_one_line_error(itm_model, tmp_path):
    r = runner.invoke(app, ["finetune", str(itm_model), "-o", str(tmp_path / "o"), "--dataset", "easyvqa",
                            "--max-steps", "1", "--device", "cpu", "--no-progress"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    out = " ".join(r.output.split())
    assert "does not fit a retrieval model" in out and "coco-captions, flickr30k" in out
    assert "dataset_coco.json" in out


def test_objective_trains_itm_on_positives_and_negatives(itm_model, coco):
    """One step of the SmartTrim objective on a retrieval batch: teacher and student both see the 4
    positives and 4 negative captions (images 0,0,1,1: every row has another image in the batch)."""
    from smarttrim_cli.train.config import TrainConfig
    from smarttrim_cli.train.objectives import RetrievalITM
    from smarttrim_cli.train.rules import LearnedTrimmers
    from smarttrim_cli.train.step import TrainStep

    loaded = smarttrim_cli.load(itm_model, mode="soft")
    m = loaded.model.train()
    ds = open_dataset("coco-captions", coco, "train", m.config.image_size, preprocess=loaded.image_preprocessor())
    b = collate([ds[i] for i in range(4)], loaded.tokenizer, m.config.max_text_len)
    assert b["image_id"].tolist() == [100, 100, 101, 101]
    seen = []
    m.itm_head.register_forward_hook(lambda mod, inp, out: seen.append(out.shape[0]))
    cfg, rule = TrainConfig(), LearnedTrimmers()
    rule.bind(m, cfg, total=10)
    rule.begin_step(3)  # mid-curriculum: target below 1
    assert rule.target < 1.0
    obj = TrainStep(m, cfg, rule, RetrievalITM(cfg.seed))
    loss, parts = obj(b["pixel_values"], b["input_ids"], b["attention_mask"], b["target"], torch.arange(4),
                      image_id=b["image_id"])
    assert seen == [8, 8]                                               # teacher (full), student (soft)
    assert torch.isfinite(loss) and parts["distill"] >= 0
    loss.backward()
    assert all(p.grad is not None for p in m.trimmer_parameters())
    assert m.vision_proj.weight.grad is None                            # ITC only picks the negatives
