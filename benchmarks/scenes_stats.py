"""How much of the scenes set the question alone answers: majority-answer and question-only baselines.

    python benchmarks/scenes_stats.py [--data-dir DIR] [--json benchmarks/results/scenes_stats.json]

Reads a scenes folder in the VQAv2 format (default: the one `smarttrim demo --dataset scenes --long`
generated; else generates the demo's set, seed 0, into a temporary folder). Baselines, scored on the
validation split against ``multiple_choice_answer`` (the ten annotator answers are identical, so this is
the VQA score):
- majority answer: the most frequent training answer, for every question;
- question only: for each question text, its most frequent training answer (unseen texts: the most
  frequent answer of their answer type, then the majority answer) — the best a model that ignores the
  image can do on texts it has seen.
Also: objects per image, answer types, and the question-only score per answer type. Prints a Markdown
table and saves JSON. Nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_split(d: Path, split: str):
    q = json.loads((d / f"v2_OpenEnded_mscoco_{split}2014_questions.json").read_text())["questions"]
    a = {x["question_id"]: x for x in json.loads((d / f"v2_mscoco_{split}2014_annotations.json").read_text())["annotations"]}
    return [(x["question"], a[x["question_id"]]["multiple_choice_answer"], a[x["question_id"]]["answer_type"]) for x in q]


def stats(d: Path) -> dict:
    train, val = load_split(d, "train"), load_split(d, "val")
    majority = Counter(ans for _, ans, _ in train).most_common(1)[0][0]
    by_text, by_type = defaultdict(Counter), defaultdict(Counter)
    for q, ans, t in train:
        by_text[q][ans] += 1
        by_type[t][ans] += 1

    def q_only(q, t):
        if q in by_text:
            return by_text[q].most_common(1)[0][0]
        return by_type[t].most_common(1)[0][0] if t in by_type else majority

    hits, per_type, seen = [], defaultdict(list), 0
    for q, ans, t in val:
        ok = q_only(q, t) == ans
        hits.append(ok)
        per_type[t].append(ok)
        seen += q in by_text
    meta = json.loads((d / "scenes_meta.json").read_text()) if (d / "scenes_meta.json").is_file() else {}
    return {
        "data_dir": str(d), "generator_args": meta.get("args"),
        "train_questions": len(train), "val_questions": len(val),
        "objects_per_image": {s: v.get("objects_per_image") for s, v in meta.get("splits", {}).items()},
        "majority_answer": majority,
        "majority_answer_score": 100 * sum(ans == majority for _, ans, _ in val) / len(val),
        "question_only_score": 100 * sum(hits) / len(hits),
        "val_texts_seen_in_train": 100 * seen / len(val),
        "question_only_by_answer_type": {t: {"questions": len(v), "score": 100 * sum(v) / len(v)}
                                         for t, v in sorted(per_type.items())},
        "answer_types_val": dict(Counter(t for _, _, t in val)),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "scenes_stats.json"))
    a = ap.parse_args(argv)
    if a.data_dir:
        d = Path(a.data_dir)
    else:
        from smarttrim_cli.demo import SCENES_DATA, DemoSettings, default_out_dir

        d = default_out_dir(DemoSettings(dataset="scenes", long=True)) / "scenes"
        if not (d / "scenes_meta.json").is_file():
            from smarttrim_cli.data.scenes import generate_scenes

            d = Path(tempfile.mkdtemp(prefix="scenes-")) / "scenes"
            generate_scenes(d, **dict(SCENES_DATA["long"], seed=0))
    out = stats(d)
    print(f"scenes set {d}: {out['train_questions']} training / {out['val_questions']} validation questions\n")
    print("| baseline (validation) | score (%) |\n|---|---|")
    print(f"| majority answer ({out['majority_answer']!r}) | {out['majority_answer_score']:.1f} |")
    print(f"| question only (most frequent training answer of the same text) | {out['question_only_score']:.1f} |")
    for t, v in out["question_only_by_answer_type"].items():
        print(f"| question only, {t} questions ({v['questions']}) | {v['score']:.1f} |")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    from smarttrim_cli.atomic import atomic_path

    with atomic_path(Path(a.json)) as tmp:
        tmp.write_text(json.dumps(out, indent=2))
    print(f"\nsaved {a.json}")


if __name__ == "__main__":
    main()
