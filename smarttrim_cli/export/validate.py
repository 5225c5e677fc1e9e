"""Check an exported graph in onnxruntime against PyTorch's hard mode (and an int8 graph against it).

Inputs are real ones, made the way a user's would be: PIL images through the model's preprocessing
and questions through its tokenizer, at several text lengths (a very short text, a long one cut at
``max_text_len``), several thresholds, batch 1 and batch 2 (padded), and a blank image at a threshold
so high that almost every token is pruned. One pass/fail line per output, with the tolerance used,
in the manner of ``optimum-cli export onnx``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw

from .onnx_export import TrimmedGraph, graph_args

QUESTIONS = {
    "question": "what color is the shape to the left of the small circle?",
    "very short text": "",
    "long text": ("how many objects in this picture are both larger than the red square and placed above "
                  "the blue triangle that sits next to the green circle in the lower right corner?"),
    "short question": "why?",
}
EXTREME_THRESHOLD = 0.999
LOW_THRESHOLD = 0.001


def scene_image(size: int, seed: int) -> Image.Image:
    """A deterministic picture of a few coloured shapes on a textured background."""
    rng = np.random.default_rng(seed)
    s = max(int(size), 16)
    bg = rng.integers(40, 215, 3)
    arr = np.clip(bg + rng.normal(0, 18, (s, s, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 6))):
        r = int(rng.integers(max(2, s // 12), max(3, s // 4)))
        x, y = (int(v) for v in rng.integers(r, s - r, 2))
        col = tuple(int(v) for v in rng.integers(0, 256, 3))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            d.ellipse([x - r, y - r, x + r, y + r], fill=col)
        elif kind == 1:
            d.rectangle([x - r, y - r, x + r, y + r], fill=col)
        else:
            d.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=col)
    return img


def blank_image(size: int) -> Image.Image:
    return Image.new("RGB", (max(int(size), 16), max(int(size), 16)), (128, 128, 128))


def encode_images(loaded, images) -> torch.Tensor:
    """``loaded``: a model_dir.LoadedModel (``LoadedModel.in_memory`` for a model built in code)."""
    from ..preprocess import preprocessor

    pre = preprocessor(loaded.full_preprocess())  # the model's own transform (CLIP crop or HF squash)
    return torch.stack([pre(im) for im in images])


def encode_texts(loaded, texts) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize as training does (data.collate): pad to the longest, cut at max_text_len."""
    c = loaded.model.config
    L = int(loaded.full_preprocess()["max_text_len"])
    tok = loaded.tokenizer
    if tok is not None:
        enc = tok(list(texts), padding="longest", truncation=True, max_length=L, return_tensors="pt")
        return enc["input_ids"].long(), enc["attention_mask"].long()
    # no tokenizer in the model directory: byte-level ids, [CLS]=0 ... [SEP]=2 (shapes are what matters)
    rows = [[0] + [4 + (b % max(1, c.vocab_size - 5)) for b in t.encode()][: L - 2] + [2] for t in texts]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), c.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


@dataclass
class Case:
    name: str
    batch: dict              # torch tensors: pixel_values[, pixel_values2], input_ids, attention_mask
    threshold: float

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.batch["input_ids"].shape)

    def feeds(self) -> dict:
        f = {k: v.numpy() for k, v in self.batch.items()}
        f["threshold"] = np.array(self.threshold, dtype=np.float32)
        return f


def default_thresholds(model) -> list[float]:
    t = float(model.trim_config.threshold if model.trim_config else 0.5)
    lo, hi = max(0.05, round(t - 0.2, 3)), min(0.95, round(t + 0.2, 3))
    return sorted({lo, t, hi}, key=lambda v: (v != t, v))


def make_cases(loaded, thresholds=None, seed: int = 0) -> list[Case]:
    """Batch-1 inputs of several text lengths and batch-2 padded inputs, each at every threshold, plus a
    blank image at threshold 0.999 (almost everything pruned) and a question at 0.001 (almost all kept).
    ``loaded``: a model_dir.LoadedModel (its preprocessing and tokenizer make the inputs)."""
    model = loaded.model
    size = int(loaded.full_preprocess()["image_size"])
    thresholds = list(thresholds) if thresholds else default_thresholds(model)
    nlvr2 = model.config.task == "nlvr2"
    imgs = [scene_image(size, seed + i) for i in range(4)]

    def mk(images, texts, images2=None):
        ids, mask = encode_texts(loaded, texts)
        b = {"pixel_values": encode_images(loaded, images), "input_ids": ids, "attention_mask": mask}
        if nlvr2:
            b["pixel_values2"] = encode_images(loaded, images2 or list(reversed(images)))
        return b

    singles = [("question", mk([imgs[0]], [QUESTIONS["question"]], [imgs[3]])),
               ("very short text", mk([imgs[1]], [QUESTIONS["very short text"]], [imgs[2]])),
               ("long text", mk([imgs[2]], [QUESTIONS["long text"]], [imgs[1]]))]
    pair = ("batch of 2, padded", mk([imgs[3], imgs[0]], [QUESTIONS["long text"], QUESTIONS["short question"]],
                                     [imgs[1], imgs[2]]))
    cases = [Case(n, b, float(t)) for t in thresholds for n, b in singles + [pair]]
    blank = mk([blank_image(size)], [QUESTIONS["short question"]], [blank_image(size)])
    cases.append(Case("blank image, almost all pruned", blank, EXTREME_THRESHOLD))
    cases.append(Case("question, almost all kept", singles[0][1], LOW_THRESHOLD))
    return cases


def torch_outputs(graph: TrimmedGraph, case: Case) -> dict:
    with torch.no_grad():
        out = graph(*graph_args(graph, case.batch, case.threshold))
    return {n: v.numpy() for n, v in zip(graph.output_names, out)}


def ort_outputs(sess, case: Case) -> dict:
    from .ort_session import feeds_for

    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds_for(sess, case.feeds()))))


@dataclass
class OutputCheck:
    """One line of the report: an output, pass/fail, what was compared and the tolerance used."""

    name: str
    ok: bool
    detail: str
    tolerance: str


@dataclass
class CaseResult:
    name: str
    batch: int
    text_len: int
    threshold: float
    max_abs_diff: float
    tokens_equal: bool
    heads_equal: bool
    image_tokens_kept: int | None = None   # ORT, first instance, at the last image-stream trimmer
    image_tokens: int | None = None
    kept_tokens: list | None = None         # PyTorch, first instance, every token trimmer


@dataclass
class ValidationReport:
    checks: list = field(default_factory=list)
    cases: list = field(default_factory=list)
    atol: float = 1e-4

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "atol": self.atol,
                "checks": [c.__dict__ for c in self.checks], "cases": [c.__dict__ for c in self.cases]}


def _first_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


def _last_image_layer(names: list[str]) -> int | None:
    idx = [i for i, n in enumerate(names) if n.split("/")[-1].startswith(("vision_", "ximage_"))]
    return idx[-1] if idx else None


def validate_against_torch(sess, model, cases: list[Case], atol: float = 1e-4, progress=None) -> ValidationReport:
    """onnxruntime outputs and kept counts vs PyTorch hard mode (the same wrapper, run eagerly)."""
    graph = TrimmedGraph(model).eval()
    want = list(graph.output_names)
    got_names = [o.name for o in sess.get_outputs()]
    rep = ValidationReport(atol=atol)
    missing = [n for n in want if n not in got_names]
    rep.checks.append(OutputCheck("output names", not missing,
                                  f"{', '.join(got_names)}" + (f" (missing {', '.join(missing)})" if missing else ""),
                                  "exact"))
    if missing:
        return rep
    img_layer = _last_image_layer(graph.token_layers)
    n_img = model.config.n_patches + 1
    worst, shape_ok, tok_bad, head_bad = 0.0, True, 0, 0
    errors = []
    for case in cases:
        ref = torch_outputs(graph, case)
        try:
            got = ort_outputs(sess, case)
        except Exception as e:  # a graph frozen to the tracing shapes fails on other lengths
            errors.append(f"{case.name}: {_first_line(e)}")
            got = {k: np.full((0,), np.nan) for k in want}
        if got["logits"].shape != ref["logits"].shape:
            shape_ok = False
            diff = math.inf
        else:
            diff = float(np.max(np.abs(got["logits"].astype(np.float64) - ref["logits"]))) if ref["logits"].size else 0.0
            if not np.isfinite(got["logits"]).all():
                diff = math.inf
        t_eq = got["kept_tokens"].shape == ref["kept_tokens"].shape and bool((got["kept_tokens"] == ref["kept_tokens"]).all())
        h_eq = got["kept_heads"].shape == ref["kept_heads"].shape and bool((got["kept_heads"] == ref["kept_heads"]).all())
        worst = max(worst, diff)
        tok_bad += not t_eq
        head_bad += not h_eq
        B, T = case.size
        kept = int(got["kept_tokens"][0, img_layer]) if img_layer is not None and got["kept_tokens"].ndim == 2 \
            and got["kept_tokens"].size else None
        rep.cases.append(CaseResult(case.name, B, T, case.threshold, diff, t_eq, h_eq, kept, n_img,
                                    [int(v) for v in ref["kept_tokens"][0]]))
        if progress:
            progress()
    n = len(cases)
    if errors:
        what = f"onnxruntime failed on {len(errors)}/{n} inputs ({errors[0]})"
    elif not shape_ok:
        what = f"shape mismatch over {n} inputs"
    else:
        what = f"max |onnxruntime - PyTorch hard| = {worst:.2e} over {n} inputs"
    rep.checks.append(OutputCheck("logits", not errors and shape_ok and worst <= atol, what, f"atol {atol:g}"))
    rep.checks.append(OutputCheck("kept_tokens", tok_bad == 0, f"equal on {n - tok_bad}/{n} inputs "
                                  f"({len(graph.token_layers)} token trimmers)", "exact"))
    rep.checks.append(OutputCheck("kept_heads", head_bad == 0, f"equal on {n - head_bad}/{n} inputs "
                                  f"({len(graph.head_layers)} head trimmers)", "exact"))
    return rep


# ----- int8 against float --------------------------------------------------------------------------------
def task_agreement(task: str, ref: np.ndarray, got: np.ndarray) -> tuple[float, str]:
    """Share of inputs on which the int8 graph makes the float graph's decision: top-1 answer / label, or
    for retrieval (one score per pair) the same ordering of every pair of inputs."""
    if ref.shape[-1] > 1:
        return float(np.mean(ref.argmax(-1) == got.argmax(-1))), "top-1 agreement"
    r, g = ref.reshape(-1), got.reshape(-1)
    pairs = [(i, j) for i in range(len(r)) for j in range(i + 1, len(r))]
    if not pairs:
        return 1.0, "pairwise ranking agreement"
    return float(np.mean([(r[i] > r[j]) == (g[i] > g[j]) for i, j in pairs])), "pairwise ranking agreement"


def validate_quantized(q_sess, f_sess, task: str, cases: list[Case], rel_tol: float = 0.1,
                       min_agreement: float = 0.75, progress=None) -> ValidationReport:
    """int8 vs float graph: logits within ``rel_tol`` of the float logits' spread (max |Δ| / (max - min)
    of the float logits of each input), the task decision kept on ``min_agreement`` of the inputs; the
    kept-token counts are reported (int8 noise may move a token across the threshold)."""
    rep = ValidationReport(atol=rel_tol)
    rels, refs, gots, tok_same, tok_rel = [], [], [], 0, []
    for case in cases:
        f = ort_outputs(f_sess, case)
        try:
            q = ort_outputs(q_sess, case)
        except Exception as e:
            rep.checks.append(OutputCheck("logits (int8)", False, f"onnxruntime failed on {case.name}: "
                                          f"{_first_line(e)}", f"rel {rel_tol:g}"))
            return rep
        for b in range(f["logits"].shape[0]):
            fl, ql = f["logits"][b].astype(np.float64), q["logits"][b].astype(np.float64)
            spread = float(fl.max() - fl.min()) if fl.size > 1 else max(abs(float(fl.reshape(-1)[0])), 1.0)
            rels.append(float(np.max(np.abs(ql - fl))) / max(spread, 1e-6))
            refs.append(fl)
            gots.append(ql)
        same = f["kept_tokens"].shape == q["kept_tokens"].shape and bool((f["kept_tokens"] == q["kept_tokens"]).all())
        tok_same += same
        if f["kept_tokens"].size and f["kept_tokens"].shape == q["kept_tokens"].shape:
            tok_rel.append(float(np.abs(q["kept_tokens"] - f["kept_tokens"]).sum() / max(1, f["kept_tokens"].sum())))
        B, T = case.size
        rep.cases.append(CaseResult(case.name, B, T, case.threshold, rels[-1], same, True))
        if progress:
            progress()
    worst = max(rels) if rels else math.inf
    agree, what = task_agreement(task, np.stack(refs), np.stack(gots))
    n = len(cases)
    rep.checks.append(OutputCheck("logits (int8)", worst <= rel_tol,
                                  f"max |int8 - float| / float logit range = {worst:.3f} over {len(rels)} instances",
                                  f"rel {rel_tol:g}"))
    rep.checks.append(OutputCheck("task score (int8)", agree >= min_agreement,
                                  f"{what} with the float graph {agree:.0%} over {len(refs)} instances",
                                  f">= {min_agreement:.0%}"))
    mean_dev = float(np.mean(tok_rel)) if tok_rel else 0.0
    rep.checks.append(OutputCheck("kept_tokens (int8)", True,
                                  f"same counts on {tok_same}/{n} inputs, mean deviation {mean_dev:.1%} (reported)",
                                  "report only"))
    return rep
