"""The synthetic multi-object scenes VQA generator: determinism, VQAv2 layout, answers, balance, cache."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from smarttrim_cli.data.scenes import COLORS, SHAPES, answer_baselines, generate_scenes
from smarttrim_cli.errors import SmartTrimError

SMALL = dict(n_train=24, n_val=8, seed=0, image_size=96, max_objects=5)
SPLITS = ("train", "val")


def _load(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def _images(root: Path, split: str) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted((root / f"{split}2014").iterdir())}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scenes") / "small"
    generate_scenes(root, **SMALL)
    return root


@pytest.fixture(scope="module")
def medium(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scenes") / "medium"
    generate_scenes(root, n_train=400, n_val=100, seed=3)
    return root


def test_deterministic_same_seed_identical_other_seed_differs(small, tmp_path):
    again = tmp_path / "again"
    generate_scenes(again, **SMALL)
    jsons = sorted(p.name for p in small.glob("*.json"))
    assert len(jsons) == 7
    for name in jsons:
        assert (small / name).read_bytes() == (again / name).read_bytes(), name
    for split in SPLITS:
        a, b = _images(small, split), _images(again, split)
        assert a.keys() == b.keys()
        for name in a:
            assert np.array_equal(a[name], b[name]), name

    other = tmp_path / "other"
    generate_scenes(other, **{**SMALL, "seed": 1})
    assert (other / "scenes_train.json").read_bytes() != (small / "scenes_train.json").read_bytes()
    a, b = _images(small, "train"), _images(other, "train")
    assert sum(not np.array_equal(a[n], b[n]) for n in a) == len(a)


def test_vqav2_layout(small):
    meta = _load(small / "scenes_meta.json")
    seen_image_ids: set[int] = set()
    for split in SPLITS:
        qf = _load(small / f"v2_OpenEnded_mscoco_{split}2014_questions.json")
        af = _load(small / f"v2_mscoco_{split}2014_annotations.json")
        assert qf["task_type"] == "Open-Ended" and qf["data_type"] == "mscoco"
        assert qf["data_subtype"] == f"{split}2014" and isinstance(qf["info"], dict)
        qs, anns = qf["questions"], af["annotations"]
        n_images = SMALL["n_train"] if split == "train" else SMALL["n_val"]
        assert len(qs) == len(anns) == n_images * 3 == meta["splits"][split]["questions"]
        by_id = {a["question_id"]: a for a in anns}
        assert len(by_id) == len(anns) == len({q["question_id"] for q in qs})
        per_image = Counter()
        for q in qs:
            assert set(q) == {"image_id", "question", "question_id"}
            assert isinstance(q["image_id"], int) and isinstance(q["question"], str)
            assert q["question_id"] // 10 == q["image_id"]
            per_image[q["image_id"]] += 1
            a = by_id[q["question_id"]]
            assert a["image_id"] == q["image_id"]
            assert a["answer_type"] in {"yes/no", "number", "other"}
            assert isinstance(a["question_type"], str) and q["question"].startswith(a["question_type"])
            assert len(a["answers"]) == 10
            assert [x["answer_id"] for x in a["answers"]] == list(range(1, 11))
            for x in a["answers"]:
                assert x["answer"] == a["multiple_choice_answer"] and x["answer_confidence"] == "yes"
            if a["answer_type"] == "yes/no":
                assert a["multiple_choice_answer"] in {"yes", "no"}
            if a["answer_type"] == "number":
                assert a["multiple_choice_answer"].isdigit()
        assert Counter(q["question_id"] % 10 for q in qs) == {0: n_images, 1: n_images, 2: n_images}
        assert len(per_image) == n_images and set(per_image.values()) == {3}
        assert not (set(per_image) & seen_image_ids)  # image ids distinct across splits, as in COCO
        seen_image_ids |= set(per_image)
        files = sorted((small / f"{split}2014").iterdir())
        assert len(files) == n_images
        for image_id in per_image:
            path = small / f"{split}2014" / f"COCO_{split}2014_{image_id:012d}.jpg"
            with Image.open(path) as im:
                assert im.format == "JPEG" and im.mode == "RGB" and im.size == (96, 96)


def _matches(obj: dict, filt: dict) -> bool:
    return all(obj[k] == v for k, v in filt.items())


def _the(objects: list[dict], filt: dict) -> dict:
    hits = [o for o in objects if _matches(o, filt)]
    assert len(hits) == 1, (filt, objects)
    return hits[0]


def _expected(q: dict, objects: list[dict], margin: float) -> str:
    """Recompute an answer from the stored objects, independently of the generator."""
    p, kind = q["params"], q["kind"]
    if kind == "count_all":
        return str(len(objects))
    if kind == "count_color":
        assert p["color"] in q["question"]
        return str(sum(o["color"] == p["color"] for o in objects))
    if kind == "count_shape":
        assert p["shape"] in q["question"]
        return str(sum(o["shape"] == p["shape"] for o in objects))
    if kind == "exist":
        assert f"{p['color']} {p['shape']}" in q["question"]
        return "yes" if any(_matches(o, p) for o in objects) else "no"
    if kind == "attr_color":
        assert set(p) == {"shape"} and p["shape"] in q["question"]
        return _the(objects, p)["color"]
    if kind == "attr_shape":
        assert set(p) == {"color"} and p["color"] in q["question"]
        return _the(objects, p)["shape"]
    if kind == "rel_yesno":
        a, b = _the(objects, p["subject"]), _the(objects, p["anchor"])
        assert a is not b and f" {p['relation']} of " in q["question"]
        dx = a["center"][0] - b["center"][0]
        assert abs(dx) >= margin
        return "yes" if (dx < 0) == (p["relation"] == "left") else "no"
    if kind == "rel_attr":
        x = _the(objects, p["anchor"])
        assert f"what {p['attribute']} is the object {p['relation']} of " in q["question"]
        others = [o for o in objects if o is not x]
        assert all(abs(o["center"][0] - x["center"][0]) >= margin for o in others)
        side = [o for o in others if (o["center"][0] < x["center"][0]) == (p["relation"] == "left")]
        assert len(side) == 1
        return side[0][p["attribute"]]
    raise AssertionError(f"unknown kind {kind}")


def test_answers_consistent_with_scene_description(small):
    meta = _load(small / "scenes_meta.json")
    size = SMALL["image_size"]
    kinds = Counter()
    for split in SPLITS:
        doc = _load(small / f"scenes_{split}.json")
        margin = doc["relation_margin_px"]
        assert margin == meta["relation_margin_px"] > 0
        anns = {a["question_id"]: a for a in _load(small / f"v2_mscoco_{split}2014_annotations.json")["annotations"]}
        qtext = {q["question_id"]: q["question"]
                 for q in _load(small / f"v2_OpenEnded_mscoco_{split}2014_questions.json")["questions"]}
        for scene in doc["scenes"]:
            objects = scene["objects"]
            assert scene["n_objects"] == len(objects)
            for o in objects:
                assert o["shape"] in SHAPES and o["color"] in COLORS and o["size"] in {"small", "large"}
                x, y, w, h = o["bbox"]
                assert w == h == o["size_px"] and 0 <= x and 0 <= y and x + w <= size and y + h <= size
                assert o["center"] == [x + w / 2, y + h / 2]
            for i, a in enumerate(objects):  # no overlap
                for b in objects[i + 1:]:
                    ax, ay, aw, _ = a["bbox"]
                    bx, by, bw, _ = b["bbox"]
                    assert ax + aw <= bx or bx + bw <= ax or ay + aw <= by or by + bw <= ay
            smalls = [o["size_px"] for o in objects if o["size"] == "small"]
            larges = [o["size_px"] for o in objects if o["size"] == "large"]
            if smalls and larges:
                assert max(smalls) < min(larges)
            for q in scene["questions"]:
                kinds[q["kind"]] += 1
                assert q["answer"] == _expected(q, objects, margin), q
                assert anns[q["question_id"]]["multiple_choice_answer"] == q["answer"]
                assert anns[q["question_id"]]["image_id"] == scene["image_id"]
                assert qtext[q["question_id"]] == q["question"]
    assert len(kinds) >= 6, kinds


def test_rendered_objects_match_description(small):
    """The pixel at each object's centre has the object's named colour (JPEG and jitter tolerated)."""
    doc = _load(small / "scenes_train.json")
    checked = 0
    for scene in doc["scenes"]:
        img = np.asarray(Image.open(small / scene["file_name"]), dtype=np.int32)
        for o in scene["objects"]:
            cx, cy = (int(v) for v in o["center"])
            if o["shape"] == "triangle":
                cy += o["size_px"] // 6  # the top of a triangle is thin
            got = img[cy, cx]
            want = np.array(COLORS[o["color"]])
            nearest = min(COLORS, key=lambda c: np.abs(np.array(COLORS[c]) - got).sum())
            assert nearest == o["color"], (scene["image_id"], o, got.tolist())
            assert np.abs(got - want).max() < 60
            checked += 1
    assert checked > 20


def test_object_count_varies_and_background_dominates(tmp_path):
    root = tmp_path / "s"
    meta = generate_scenes(root, n_train=60, n_val=6, seed=5, min_objects=1, max_objects=6)
    counts = [s["n_objects"] for s in _load(root / "scenes_train.json")["scenes"]]
    assert set(counts) == set(range(1, 7))
    assert max(Counter(counts).values()) <= 20
    assert meta["splits"]["train"]["objects_per_image"] == {str(k): v for k, v in sorted(Counter(counts).items())}
    area = max(sum(o["size_px"] ** 2 for o in s["objects"])
               for s in _load(root / "scenes_train.json")["scenes"]) / 128 ** 2
    assert area < 0.3  # the background is most of every image


def test_answer_balance(medium):
    meta = _load(medium / "scenes_meta.json")
    qs = [q for s in _load(medium / "scenes_train.json")["scenes"] for q in s["questions"]]
    assert len(qs) == 1200
    answers = Counter(q["answer"] for q in qs)
    top, top_n = answers.most_common(1)[0]
    assert top_n / len(qs) < 0.35, answers
    assert meta["splits"]["train"]["answer_stats"]["majority_share"] == pytest.approx(top_n / len(qs), abs=1e-4)
    by_kind: dict[str, Counter] = {}
    for q in qs:
        by_kind.setdefault(q["kind"], Counter())[q["answer"]] += 1
    assert set(by_kind) == {"count_all", "count_color", "count_shape", "exist", "attr_color", "attr_shape",
                            "rel_yesno", "rel_attr"}
    for kind in ("exist", "rel_yesno"):
        c = by_kind[kind]
        assert set(c) == {"yes", "no"} and abs(c["yes"] - c["no"]) <= 1, (kind, c)
    numbers = by_kind["count_all"] + by_kind["count_color"] + by_kind["count_shape"]
    assert set(numbers) >= {str(k) for k in range(0, 7)}
    assert max(numbers.values()) / sum(numbers.values()) < 0.3
    assert set(by_kind["attr_color"]) == set(COLORS) and set(by_kind["attr_shape"]) == set(SHAPES)


def test_answer_baselines(medium):
    b = answer_baselines(medium)
    assert b["n_train_questions"] == 1200 and b["n_val_questions"] == 300
    for key in ("majority_accuracy", "question_type_accuracy", "question_only_accuracy", "val_majority_share"):
        assert 0.0 <= b[key] <= 1.0
    assert b["majority_accuracy"] < 0.35
    assert b["question_only_accuracy"] < 0.5  # not solvable from the text alone
    assert b["majority_answer"] in {"yes", "no", "0", "1", "2", "3"}


def test_answer_baselines_missing_files(tmp_path):
    with pytest.raises(SmartTrimError):
        answer_baselines(tmp_path)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_objects": 4, "max_objects": 3},
        {"image_size": 63},
        {"n_train": 0},
        {"n_val": 0},
        {"seed": -1},
        {"min_objects": 0},
        {"max_objects": 11},
        {"questions_per_image": 11},
        {"n_train": 2.5},
        {"image_size": True},
        {"progress": 3},
    ],
)
def test_bad_arguments_raise(tmp_path, kwargs):
    with pytest.raises(SmartTrimError) as e:
        generate_scenes(tmp_path / "out", **{"n_train": 2, "n_val": 1, **kwargs})
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_unwritable_out_dir_raises(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(SmartTrimError) as e:
        generate_scenes(blocker / "out", n_train=2, n_val=1)
    assert "\n" not in str(e.value)
    with pytest.raises(SmartTrimError):
        generate_scenes(blocker, n_train=2, n_val=1)


def test_refuses_to_replace_unrelated_directory(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(SmartTrimError):
        generate_scenes(out, n_train=2, n_val=1)
    assert (out / "keep.txt").read_text() == "precious"


def test_cache_reuse_and_regeneration(tmp_path):
    out = tmp_path / "c"
    ticks: list[int] = []
    meta = generate_scenes(out, n_train=6, n_val=3, progress=ticks.append)
    assert ticks == [1] * 9
    watched = [out / "scenes_meta.json", out / "v2_mscoco_train2014_annotations.json",
               *sorted((out / "train2014").iterdir())]
    stamps = [p.stat().st_mtime_ns for p in watched]
    ticks.clear()
    again = generate_scenes(out, n_train=6, n_val=3, progress=ticks.append)
    assert again == meta and ticks == [9]
    assert [p.stat().st_mtime_ns for p in watched] == stamps
    # Different arguments: regenerated in place; no temporary directories are left beside it.
    other = generate_scenes(out, n_train=6, n_val=3, seed=9)
    assert other["args"]["seed"] == 9 and _load(out / "scenes_meta.json")["args"]["seed"] == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    # An incomplete set (an image removed) is regenerated rather than reused.
    victim = sorted((out / "val2014").iterdir())[0]
    victim.unlink()
    generate_scenes(out, n_train=6, n_val=3, seed=9)
    assert victim.exists()


def test_project_vqav2_reader_reads_the_set(small):
    """The project's VQAv2 reader (when present) loads the generated files unchanged."""
    vqav2 = pytest.importorskip("smarttrim_cli.data.vqav2")
    ds = vqav2.VQAv2Dataset(small, split="val", image_size=96)
    assert len(ds) == SMALL["n_val"] * 3
    item = ds[0]
    assert tuple(item["image"].shape) == (3, 96, 96)
    assert len(item["answers"]) == 10
