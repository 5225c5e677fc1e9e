"""Synthetic multi-object scene VQA set ("scenes"), written in the real VQAv2 file layout.

Why: on easy-VQA every image holds exactly one large shape, so the informative share of the image is
the same for every input and per-input adaptive token trimming has nothing to exploit. Here each
image (128x128 by default) holds 1..``max_objects`` small, non-overlapping shapes (circle, square,
triangle, star, diamond; 7 well-separated named colours; small ~13 px or large ~21 px at 128 px) on a
textured background (faint gradient, light noise, a few thin grey lines that are not objects), so
the background is most of the image and the share of image tokens that matter varies per image and
per question. Question kinds need different amounts of the image:

* ``count_all``   "how many objects are there?"                      (number, 1..max_objects)
* ``count_color`` "how many red shapes are there?"                   (number, 0..)
* ``count_shape`` "how many circles are there?"                      (number, 0..)
* ``exist``       "is there a blue triangle?"                        (yes/no)
* ``attr_color``  "what color is the square?"      (asked only when exactly one square exists)
* ``attr_shape``  "what shape is the green object?" (asked only when exactly one green object exists)
* ``rel_yesno``   "is the red circle left of the blue square?"       (yes/no; both uniquely described)
* ``rel_attr``    "what color is the object left of the triangle?"   (exactly one object on that side)

Left/right compares object centres; a relation is only asked when the centres differ by at least
``relation_margin_px`` (recorded in ``scenes_meta.json``). For every image all valid candidate
questions are enumerated, a kind is drawn, and within the kind the answer used least so far in the
split is chosen (ties at random), so yes/no is ~50/50 per kind and counts, colours and shapes spread
out; the majority-answer share per split is recorded in ``scenes_meta.json`` and
:func:`answer_baselines` gives text-only baselines.

Layout of ``out_dir`` (``split`` in ``train``, ``val``)::

    v2_OpenEnded_mscoco_<split>2014_questions.json   VQAv2 questions (official file names)
    v2_mscoco_<split>2014_annotations.json       VQAv2 annotations (10 identical answers each)
    <split>2014/COCO_<split>2014_<image_id:012d>.jpg   JPEG, quality 95
    scenes_<split>.json                          per-image objects (shape, color, size, size_px,
                                                 center [x, y], bbox [x, y, w, h] COCO style) and
                                                 questions with their kind and structured params
    scenes_meta.json                             arguments, generator version, vocab, counts, stats

Train image ids are ``1..n_train``, val ids ``n_train+1..n_train+n_val`` (distinct, as in COCO);
``question_id = image_id * 10 + k``. Everything is a pure function of the arguments (each image uses
its own ``numpy`` generator seeded from ``(seed, split, index)``; no global RNG), so the same
arguments give byte-identical JSON and identical pixels.
"""
from __future__ import annotations

import json
import math
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from ..atomic import atomic_dir
from ..errors import SmartTrimError

__all__ = [
    "GENERATOR_VERSION",
    "SHAPES",
    "COLORS",
    "KINDS",
    "generate_scenes",
    "answer_baselines",
    "scene_sizes",
    "image_file_name",
]

GENERATOR_VERSION = 1
SPLITS = ("train", "val")
SHAPES = ("circle", "square", "triangle", "star", "diamond")
PLURALS = {s: s + "s" for s in SHAPES}
COLORS = {
    "red": (215, 40, 40),
    "orange": (245, 135, 20),
    "yellow": (235, 210, 25),
    "green": (35, 160, 55),
    "blue": (35, 75, 220),
    "purple": (145, 55, 190),
    "black": (25, 25, 25),
}
# kind -> (draw weight, VQAv2 answer_type)
KINDS = {
    "count_all": (0.7, "number"),
    "count_color": (1.0, "number"),
    "count_shape": (1.0, "number"),
    "exist": (1.0, "yes/no"),
    "attr_color": (1.0, "other"),
    "attr_shape": (1.0, "other"),
    "rel_yesno": (2.0, "yes/no"),
    "rel_attr": (2.0, "other"),
}
MAX_OBJECTS_LIMIT = 10
MAX_QUESTIONS_PER_IMAGE = 10  # question_id = image_id * 10 + k
_INFO = {
    "description": "SmartTrim synthetic multi-object scenes VQA (VQAv2 layout)",
    "version": f"scenes-{GENERATOR_VERSION}",
    "year": 2026,
    "contributor": "smarttrim_cli.data.scenes",
    "date_created": "1970-01-01 00:00:00",
}
_LICENSE = {"name": "Apache-2.0", "url": "https://www.apache.org/licenses/LICENSE-2.0"}


def scene_sizes(image_size: int) -> dict:
    """Pixel sizes used at ``image_size``: nominal small/large side, placement gap, relation margin."""
    k = image_size / 128.0
    return {
        "small": max(6, round(13 * k)),
        "large": max(10, round(21 * k)),
        "jitter": max(1, round(1 * k)),
        "gap": max(2, round(3 * k)),
        "relation_margin_px": max(5, round(10 * k)),
    }


# ----------------------------------------------------------------------------------------- arguments


def _check_int(name: str, value, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise SmartTrimError(f"scenes: {name} must be an integer, got {value!r}")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise SmartTrimError(f"scenes: {name} must be {rng}, got {value}")
    return value


def _check_args(n_train, n_val, seed, image_size, min_objects, max_objects, questions_per_image) -> dict:
    args = {
        "n_train": _check_int("n_train", n_train, 1),
        "n_val": _check_int("n_val", n_val, 1),
        "seed": _check_int("seed", seed, 0),
        "image_size": _check_int("image_size", image_size, 64, 1024),
        "min_objects": _check_int("min_objects", min_objects, 1, MAX_OBJECTS_LIMIT),
        "max_objects": _check_int("max_objects", max_objects, 1, MAX_OBJECTS_LIMIT),
        "questions_per_image": _check_int("questions_per_image", questions_per_image, 1, MAX_QUESTIONS_PER_IMAGE),
    }
    if args["max_objects"] < args["min_objects"]:
        raise SmartTrimError(
            f"scenes: max_objects ({args['max_objects']}) must be >= min_objects ({args['min_objects']})"
        )
    return args


# -------------------------------------------------------------------------------------------- scenes


def _split_rng(seed: int, split: str, index: int | None = None) -> np.random.Generator:
    key = [GENERATOR_VERSION, seed, SPLITS.index(split)]
    if index is not None:
        key.append(index)
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(key)))


def _sample_objects(rng: np.random.Generator, n: int, size: int) -> list[dict]:
    sz = scene_sizes(size)
    colors, shapes = list(COLORS), list(SHAPES)
    # A per-scene palette makes repeated colours/shapes common, so counts above 1 occur.
    # Palette sizes: usually ceil(n/3)..min(n, vocab) (varied scenes, unique referents), sometimes
    # 1..min(n, vocab) so that high per-colour / per-shape counts also occur.
    def palette(vocab: int) -> np.ndarray:
        lo = 1 if rng.random() < 0.3 else -(-n // 3)
        return rng.choice(vocab, size=int(rng.integers(lo, min(n, vocab) + 1)), replace=False)

    palette_c, palette_s = palette(len(colors)), palette(len(shapes))
    specs = []
    for _ in range(n):
        big = bool(rng.integers(2))
        side = sz["large" if big else "small"] + int(rng.integers(-sz["jitter"], sz["jitter"] + 1))
        specs.append(
            {
                "shape": shapes[int(palette_s[rng.integers(len(palette_s))])],
                "color": colors[int(palette_c[rng.integers(len(palette_c))])],
                "size": "large" if big else "small",
                "size_px": side,
            }
        )
    gap, border = sz["gap"], 2
    order = sorted(range(n), key=lambda i: -specs[i]["size_px"])  # place large ones first
    for _restart in range(200):
        boxes: dict[int, tuple[int, int, int]] = {}
        for i in order:
            s = specs[i]["size_px"]
            for _try in range(300):
                x0 = int(rng.integers(border, size - s - border + 1))
                y0 = int(rng.integers(border, size - s - border + 1))
                if all(
                    x0 + s + gap <= bx or bx + bs + gap <= x0 or y0 + s + gap <= by or by + bs + gap <= y0
                    for bx, by, bs in boxes.values()
                ):
                    boxes[i] = (x0, y0, s)
                    break
            else:
                break
        if len(boxes) == n:
            break
    else:  # pragma: no cover - capacity is far above MAX_OBJECTS_LIMIT at image_size >= 64
        raise SmartTrimError(f"scenes: cannot place {n} objects on a {size}x{size} image")
    objects = []
    for i in range(n):
        x0, y0, s = boxes[i]
        objects.append(
            {"id": i, **specs[i], "center": [x0 + s / 2, y0 + s / 2], "bbox": [x0, y0, s, s]}
        )
    return objects


def _shape_points(shape: str, x0: float, y0: float, s: float) -> list[tuple[float, float]]:
    x1, y1, cx, cy = x0 + s, y0 + s, x0 + s / 2, y0 + s / 2
    if shape == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    if shape == "diamond":
        return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    if shape == "star":
        r_out = s / 2
        r_in = r_out * 0.45
        cy_star = cy + r_out * (1 - math.cos(math.pi / 5)) / 2  # centre the star's vertical extent
        pts = []
        for k in range(10):
            r = r_out if k % 2 == 0 else r_in
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + r * math.cos(a), cy_star + r * math.sin(a)))
        return pts
    raise ValueError(shape)


def _render(rng: np.random.Generator, objects: list[dict], size: int) -> tuple[Image.Image, dict]:
    # Background: light tinted grey, faint linear gradient, light noise, a few thin grey lines.
    base = rng.uniform(198, 228) + rng.uniform(-7, 7, size=3)
    angle = rng.uniform(0, 2 * math.pi)
    amp = rng.uniform(4, 14)
    t = np.linspace(-0.5, 0.5, size)
    grad = (np.cos(angle) * t[None, :] + np.sin(angle) * t[:, None]) * 2 * amp
    arr = base[None, None, :] + grad[..., None] + rng.normal(0.0, 4.0, size=(size, size, 3))
    img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    lines = []
    for _ in range(int(rng.integers(1, 4))):
        a, b = (int(v) for v in rng.integers(0, size, size=2))
        vertical = bool(rng.integers(2))
        xy = [a, 0, b, size - 1] if vertical else [0, a, size - 1, b]
        grey = int(rng.integers(135, 185))
        draw.line(xy, fill=(grey, grey, grey), width=1)
        lines.append({"xy": xy, "grey": grey})
    # Objects: drawn at 2x on a transparent layer and box-downsampled (anti-aliased edges).
    layer = Image.new("RGBA", (2 * size, 2 * size), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    for o in objects:
        jitter = rng.integers(-12, 13, size=3)
        fill = tuple(int(v) for v in np.clip(np.array(COLORS[o["color"]]) + jitter, 0, 255)) + (255,)
        x0, y0, s, _ = o["bbox"]
        X0, Y0, S = 2 * x0, 2 * y0, 2 * s
        if o["shape"] == "circle":
            d.ellipse([X0, Y0, X0 + S - 1, Y0 + S - 1], fill=fill)
        elif o["shape"] == "square":
            d.rectangle([X0, Y0, X0 + S - 1, Y0 + S - 1], fill=fill)
        else:
            d.polygon(_shape_points(o["shape"], X0, Y0, S - 1), fill=fill)
    layer = layer.resize((size, size), Image.Resampling.BOX)
    out = img.convert("RGBA")
    out.alpha_composite(layer)
    background = {"base_rgb": [round(float(v), 2) for v in base], "gradient_deg": round(math.degrees(angle), 2),
                  "gradient_amp": round(float(amp), 2), "lines": lines}
    return out.convert("RGB"), background


# ----------------------------------------------------------------------------------------- questions


def _refs(obj: dict, objects: list[dict]) -> list[tuple[str, dict]]:
    """All unique referring expressions for ``obj``: (text, filter on shape/color)."""
    same_shape = sum(o["shape"] == obj["shape"] for o in objects)
    same_color = sum(o["color"] == obj["color"] for o in objects)
    same_both = sum(o["shape"] == obj["shape"] and o["color"] == obj["color"] for o in objects)
    out = []
    if same_both == 1:
        out.append((f"the {obj['color']} {obj['shape']}", {"color": obj["color"], "shape": obj["shape"]}))
    if same_shape == 1:
        out.append((f"the {obj['shape']}", {"shape": obj["shape"]}))
    if same_color == 1:
        out.append((f"the {obj['color']} object", {"color": obj["color"]}))
    return out


def _candidates(objects: list[dict], rng: np.random.Generator, margin: float) -> list[dict]:
    """Every valid question for the scene: dicts with kind, question, answer, question_type, params."""
    c = []

    def add(kind, question, answer, qtype, params):
        c.append({"kind": kind, "question": question, "answer": str(answer), "question_type": qtype,
                  "params": params})

    add("count_all", "how many objects are there?", len(objects), "how many", {})
    for col in COLORS:
        add("count_color", f"how many {col} shapes are there?", sum(o["color"] == col for o in objects),
            "how many", {"color": col})
    for sh in SHAPES:
        add("count_shape", f"how many {PLURALS[sh]} are there?", sum(o["shape"] == sh for o in objects),
            "how many", {"shape": sh})
    for col in COLORS:
        for sh in SHAPES:
            present = any(o["color"] == col and o["shape"] == sh for o in objects)
            article = "an" if col[0] in "aeiou" else "a"
            add("exist", f"is there {article} {col} {sh}?", "yes" if present else "no", "is there a",
                {"color": col, "shape": sh})
    shape_n = Counter(o["shape"] for o in objects)
    color_n = Counter(o["color"] for o in objects)
    for o in objects:
        if shape_n[o["shape"]] == 1:
            add("attr_color", f"what color is the {o['shape']}?", o["color"], "what color is the",
                {"shape": o["shape"]})
        if color_n[o["color"]] == 1:
            add("attr_shape", f"what shape is the {o['color']} object?", o["shape"], "what shape is the",
                {"color": o["color"]})
    refs = {o["id"]: _refs(o, objects) for o in objects}
    pick = {i: r[int(rng.integers(len(r)))] for i, r in refs.items() if r}
    for a in objects:
        for b in objects:
            if a is b or a["id"] not in pick or b["id"] not in pick:
                continue
            if abs(a["center"][0] - b["center"][0]) < margin:
                continue
            (ta, fa), (tb, fb) = pick[a["id"]], pick[b["id"]]
            for rel in ("left", "right"):
                yes = (a["center"][0] < b["center"][0]) == (rel == "left")
                add("rel_yesno", f"is {ta} {rel} of {tb}?", "yes" if yes else "no", "is the",
                    {"subject": fa, "relation": rel, "anchor": fb})
    for x in objects:
        if x["id"] not in pick:
            continue
        others = [o for o in objects if o is not x]
        if any(abs(o["center"][0] - x["center"][0]) < margin for o in others):
            continue
        tx, fx = pick[x["id"]]
        for rel in ("left", "right"):
            side = [o for o in others if (o["center"][0] < x["center"][0]) == (rel == "left")]
            if len(side) != 1:
                continue
            for attr in ("color", "shape"):
                add("rel_attr", f"what {attr} is the object {rel} of {tx}?", side[0][attr], f"what {attr} is the",
                    {"anchor": fx, "relation": rel, "attribute": attr})
    return c


def _select(cands: list[dict], rng: np.random.Generator, counters: dict, k: int) -> list[dict]:
    """Pick ``k`` distinct questions: draw a kind (fresh kinds first), then the least-used answer."""
    pools: dict[str, list[dict]] = defaultdict(list)
    for q in cands:
        pools[q["kind"]].append(q)
    chosen, used_kinds = [], set()
    for _ in range(k):
        avail = [kd for kd in KINDS if pools[kd]]
        if not avail:  # pragma: no cover - count/exist candidates alone exceed MAX_QUESTIONS_PER_IMAGE
            break
        fresh = [kd for kd in avail if kd not in used_kinds] or avail
        w = np.array([KINDS[kd][0] for kd in fresh])
        kind = fresh[int(rng.choice(len(fresh), p=w / w.sum()))]
        pool = pools[kind]
        answers = sorted({q["answer"] for q in pool})
        low = min(counters[kind][a] for a in answers)
        best = [a for a in answers if counters[kind][a] == low]
        ans = best[int(rng.integers(len(best)))]
        options = [q for q in pool if q["answer"] == ans]
        q = options[int(rng.integers(len(options)))]
        pool.remove(q)
        counters[kind][ans] += 1
        used_kinds.add(kind)
        chosen.append(q)
    return chosen


# ------------------------------------------------------------------------------------------- writing


def _file_names(split: str) -> dict:
    return {
        "questions": f"v2_OpenEnded_mscoco_{split}2014_questions.json",
        "annotations": f"v2_mscoco_{split}2014_annotations.json",
        "scenes": f"scenes_{split}.json",
        "images": f"{split}2014",
    }


def image_file_name(split: str, image_id: int) -> str:
    """COCO-style image file name, relative to ``<out_dir>/<split>2014``."""
    return f"COCO_{split}2014_{image_id:012d}.jpg"


def _dump(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=True, separators=(",", ":"))
        f.write("\n")


def _answer_stats(questions: list[dict]) -> dict:
    by_answer = Counter(q["answer"] for q in questions)
    by_kind = defaultdict(Counter)
    for q in questions:
        by_kind[q["kind"]][q["answer"]] += 1
    maj, maj_n = max(sorted(by_answer.items()), key=lambda kv: kv[1]) if by_answer else ("", 0)
    return {
        "questions": len(questions),
        "majority_answer": maj,
        "majority_share": round(maj_n / max(1, len(questions)), 4),
        "answers": dict(sorted(by_answer.items(), key=lambda kv: (-kv[1], kv[0]))),
        "by_kind": {kd: dict(sorted(by_kind[kd].items())) for kd in KINDS if kd in by_kind},
    }


def _generate_split(root: Path, split: str, args: dict, id_offset: int, progress) -> dict:
    size = args["image_size"]
    sz = scene_sizes(size)
    names = _file_names(split)
    img_dir = root / names["images"]
    img_dir.mkdir()
    pick_rng = _split_rng(args["seed"], split)  # sequential: question choice depends on running counts
    counters: dict[str, Counter] = defaultdict(Counter)
    n_images = args["n_train"] if split == "train" else args["n_val"]
    scenes, vqa_q, vqa_a, all_q = [], [], [], []
    for i in range(n_images):
        rng = _split_rng(args["seed"], split, i)
        image_id = id_offset + i + 1
        n_obj = int(rng.integers(args["min_objects"], args["max_objects"] + 1))
        objects = _sample_objects(rng, n_obj, size)
        img, background = _render(rng, objects, size)
        fname = image_file_name(split, image_id)
        img.save(img_dir / fname, "JPEG", quality=95, subsampling=0)
        chosen = _select(_candidates(objects, pick_rng, sz["relation_margin_px"]), pick_rng, counters,
                         args["questions_per_image"])
        qrecs = []
        for k, q in enumerate(chosen):
            qid = image_id * 10 + k
            atype = KINDS[q["kind"]][1]
            qrecs.append({"question_id": qid, "kind": q["kind"], "question": q["question"], "answer": q["answer"],
                          "answer_type": atype, "question_type": q["question_type"], "params": q["params"]})
            vqa_q.append({"image_id": image_id, "question": q["question"], "question_id": qid})
            vqa_a.append({
                "question_id": qid,
                "image_id": image_id,
                "question_type": q["question_type"],
                "answer_type": atype,
                "multiple_choice_answer": q["answer"],
                "answers": [{"answer": q["answer"], "answer_confidence": "yes", "answer_id": j} for j in range(1, 11)],
            })
        all_q.extend(qrecs)
        scenes.append({"image_id": image_id, "file_name": f"{names['images']}/{fname}", "width": size,
                       "height": size, "n_objects": n_obj, "background": background, "objects": objects,
                       "questions": qrecs})
        if progress is not None:
            progress(1)
    subtype = f"{split}2014"
    _dump(root / names["questions"], {"info": _INFO, "task_type": "Open-Ended", "data_type": "mscoco",
                                      "license": _LICENSE, "data_subtype": subtype, "questions": vqa_q})
    _dump(root / names["annotations"], {"info": _INFO, "license": _LICENSE, "data_type": "mscoco",
                                        "data_subtype": subtype, "annotations": vqa_a})
    _dump(root / names["scenes"], {"split": split, "image_size": size, "relation_margin_px": sz["relation_margin_px"],
                                   "scenes": scenes})
    return {"images": n_images, "questions": len(vqa_q), "image_ids": [id_offset + 1, id_offset + n_images],
            "objects_per_image": dict(sorted(Counter(str(s["n_objects"]) for s in scenes).items(),
                                             key=lambda kv: int(kv[0]))),
            "answer_stats": _answer_stats(all_q)}


def _complete(out_dir: Path, args: dict) -> dict | None:
    """The stored meta if ``out_dir`` holds a complete set generated with ``args``, else None."""
    try:
        meta = json.loads((out_dir / "scenes_meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("version") != GENERATOR_VERSION or meta.get("args") != args:
        return None
    for split in SPLITS:
        names = _file_names(split)
        if not all((out_dir / names[key]).is_file() for key in ("questions", "annotations", "scenes")):
            return None
        img_dir = out_dir / names["images"]
        expected = meta.get("splits", {}).get(split, {}).get("images")
        try:
            if sum(1 for p in os.scandir(img_dir) if p.name.endswith(".jpg")) != expected:
                return None
        except OSError:
            return None
    return meta


def generate_scenes(
    out_dir: str | os.PathLike,
    n_train: int = 3000,
    n_val: int = 600,
    seed: int = 0,
    image_size: int = 128,
    min_objects: int = 1,
    max_objects: int = 6,
    questions_per_image: int = 3,
    progress: Callable[[int], object] | None = None,
) -> dict:
    """Write the scenes VQA set to ``out_dir`` (see the module docstring) and return its meta dict.

    The set is built in a temporary directory beside ``out_dir`` and renamed into place at the end.
    If ``out_dir`` already holds a complete set made with the same arguments and generator version,
    nothing is written and its stored meta is returned. An existing older/different scenes set is
    replaced; any other non-empty ``out_dir`` is refused. ``progress(advance)`` is called once per
    image written (or once with ``n_train + n_val`` on a cache hit). Raises ``SmartTrimError`` on bad
    arguments or an unwritable ``out_dir``.
    """
    args = _check_args(n_train, n_val, seed, image_size, min_objects, max_objects, questions_per_image)
    if progress is not None and not callable(progress):
        raise SmartTrimError("scenes: progress must be a callable taking the number of images advanced")
    out = Path(out_dir)
    cached = _complete(out, args)
    if cached is not None:
        if progress is not None:
            progress(args["n_train"] + args["n_val"])
        return cached
    if out.exists():
        if not out.is_dir():
            raise SmartTrimError(f"{out}: exists and is not a directory")
        try:
            non_empty = any(out.iterdir())
        except OSError as e:
            raise SmartTrimError(f"{out}: cannot read ({e.strerror or e})") from None
        if non_empty and not (out / "scenes_meta.json").is_file():
            raise SmartTrimError(f"{out}: directory is not empty and holds no scenes set; refusing to replace it")
    sz = scene_sizes(args["image_size"])
    with atomic_dir(out) as tmp:
        try:
            splits = {
                "train": _generate_split(tmp, "train", args, 0, progress),
                "val": _generate_split(tmp, "val", args, args["n_train"], progress),
            }
        except OSError as e:
            raise SmartTrimError(f"{out}: cannot write scenes ({e.strerror or e})") from None
        meta = {
            "generator": "smarttrim_cli.data.scenes",
            "version": GENERATOR_VERSION,
            "args": args,
            "shapes": list(SHAPES),
            "colors": {k: list(v) for k, v in COLORS.items()},
            "sizes_px": {"small": sz["small"], "large": sz["large"], "jitter": sz["jitter"]},
            "relation_margin_px": sz["relation_margin_px"],
            "kinds": {k: {"weight": w, "answer_type": t} for k, (w, t) in KINDS.items()},
            "splits": splits,
        }
        _dump(tmp / "scenes_meta.json", meta)
    return json.loads((out / "scenes_meta.json").read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------------------- baselines


def _load_vqa(out_dir: Path, split: str) -> list[tuple[str, str, str]]:
    names = _file_names(split)
    try:
        qs = json.loads((out_dir / names["questions"]).read_text(encoding="utf-8"))["questions"]
        an = json.loads((out_dir / names["annotations"]).read_text(encoding="utf-8"))["annotations"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SmartTrimError(f"{out_dir}: cannot read the {split} VQAv2 files ({e})") from None
    by_id = {a["question_id"]: a for a in an}
    out = []
    for q in qs:
        a = by_id.get(q["question_id"])
        if a is None:
            raise SmartTrimError(f"{out_dir}: {split} question {q['question_id']} has no annotation")
        out.append((q["question"], a["question_type"], a["multiple_choice_answer"]))
    return out


def _majority(counter: Counter) -> str:
    return max(sorted(counter.items()), key=lambda kv: kv[1])[0]


def answer_baselines(out_dir: str | os.PathLike) -> dict:
    """Text-only baselines on val, trained on train (exact-match accuracy; all 10 answers agree).

    * ``majority_accuracy``: always answer the most frequent train answer.
    * ``question_type_accuracy``: most frequent train answer per VQAv2 ``question_type`` prefix.
    * ``question_only_accuracy``: most frequent train answer per exact question string, falling back
      to the question-type prior, then to the global majority, for strings unseen in train.
    """
    out = Path(out_dir)
    train, val = _load_vqa(out, "train"), _load_vqa(out, "val")
    if not train or not val:
        raise SmartTrimError(f"{out}: train or val split has no questions")
    glob = Counter(a for _, _, a in train)
    by_q, by_t = defaultdict(Counter), defaultdict(Counter)
    for q, t, a in train:
        by_q[q][a] += 1
        by_t[t][a] += 1
    maj = _majority(glob)
    maj_q = {q: _majority(c) for q, c in by_q.items()}
    maj_t = {t: _majority(c) for t, c in by_t.items()}
    n = len(val)
    acc_maj = sum(a == maj for _, _, a in val) / n
    acc_t = sum(a == maj_t.get(t, maj) for _, t, a in val) / n
    acc_q = sum(a == maj_q.get(q, maj_t.get(t, maj)) for q, t, a in val) / n
    val_counts = Counter(a for _, _, a in val)
    top_val, top_val_n = max(sorted(val_counts.items()), key=lambda kv: kv[1])
    return {
        "majority_answer": maj,
        "majority_accuracy": acc_maj,
        "question_type_accuracy": acc_t,
        "question_only_accuracy": acc_q,
        "question_only_coverage": sum(q in maj_q for q, _, _ in val) / n,
        "val_majority_answer": top_val,
        "val_majority_share": top_val_n / n,
        "n_train_questions": len(train),
        "n_val_questions": n,
        "n_answers": len(glob),
    }
