"""Serve an exported smarttrim ONNX file without PyTorch: numpy + PIL + tokenizers + onnxruntime.

    python -m smarttrim_cli.onnx_predict smarttrim-out/model.onnx photo.jpg "what is on the table?"

    from smarttrim_cli.onnx_predict import OnnxPredictor
    p = OnnxPredictor("smarttrim-out/model.onnx")
    p.predict(Image.open("photo.jpg"), "what is on the table?", threshold=0.6)

Everything needed travels in the file's metadata (``smarttrim export`` writes it): the preprocessing
(image size, mean, std, max text length), the label vocabulary and the tokenizer (``tokenizer.json``);
for a file without an inline tokenizer, the model directory's ``tokenizer/`` is used (or ``tokenizer=``).
Image preprocessing repeats METER's: shorter side resized (bicubic) to image_size, center crop,
/255, mean/std normalisation; text truncated to max_text_len tokens with the special tokens.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import SmartTrimError
from .export.ort_session import make_session
from .rgb import to_rgb

META = "smarttrim."


# ----- images (numpy twin of preprocess.py, which uses torch) ------------------------------------
def preprocess_image(img: Image.Image, image_size: int, mean, std, resize: str = "crop") -> np.ndarray:
    """PIL image -> float32 [3, S, S]: resize shorter side (bicubic), center crop, /255, normalise.
    ``resize="squash"`` (BLIP/ViLT processor configs): resize straight to S x S, no crop."""
    img = to_rgb(img)
    size = int(image_size)
    w, h = img.size
    if w <= 0 or h <= 0:
        raise SmartTrimError(f"empty image ({w}x{h})")
    if resize == "squash":
        img = img.resize((size, size), resample=Image.Resampling.BICUBIC)
        w, h = size, size
    new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    if (left, top, new_w, new_h) != (0, 0, size, size):
        img = img.crop((left, top, left + size, top + size))
    x = np.asarray(img, dtype=np.uint8).astype(np.float32).transpose(2, 0, 1) / np.float32(255.0)
    m = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    return (x - m) / s


def open_image(path) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise SmartTrimError(f"{path}: no such image file") from None
    except (OSError, ValueError) as e:
        raise SmartTrimError(f"{path}: cannot read image ({e})") from None


# ----- text ---------------------------------------------------------------------------------------------
class _Tokenizer:
    """input_ids / attention_mask as numpy int64, padded to the longest text, cut at max_len."""

    def __init__(self, meta: dict, max_len: int, pad_id: int, override=None):
        self.max_len, self.pad_id = int(max_len), int(pad_id)
        self._tok = self._hf = None
        if override is not None:
            self._load_dir(Path(override))
        elif meta.get("tokenizer_json"):
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_str(meta["tokenizer_json"])
            self._tok.no_padding()
            self._tok.enable_truncation(max_length=self.max_len)
            cfg = json.loads(meta.get("tokenizer_config") or "{}")
            pad = cfg.get("pad_token")
            if isinstance(pad, str) and self._tok.token_to_id(pad) is not None:
                self.pad_id = self._tok.token_to_id(pad)
        elif meta.get("tokenizer_dir") and Path(meta["tokenizer_dir"]).is_dir():
            self._load_dir(Path(meta["tokenizer_dir"]))
        else:
            raise SmartTrimError("the ONNX file carries no tokenizer and its model directory's tokenizer/ is not "
                                 "here: pass tokenizer=DIR (--tokenizer DIR)")

    def _load_dir(self, d: Path):
        if (d / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_file(str(d / "tokenizer.json"))
            self._tok.no_padding()
            self._tok.enable_truncation(max_length=self.max_len)
            return
        try:
            from transformers import AutoTokenizer

            self._hf = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
        except Exception as e:
            raise SmartTrimError(f"{d}: cannot load tokenizer ({type(e).__name__})") from None
        if self._hf.pad_token_id is not None:
            self.pad_id = int(self._hf.pad_token_id)

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if self._tok is not None:
            rows = [e.ids for e in self._tok.encode_batch(list(texts))]
        else:
            rows = self._hf(list(texts), truncation=True, max_length=self.max_len)["input_ids"]
        T = max(len(r) for r in rows)
        ids = np.full((len(rows), T), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), T), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
            mask[i, : len(r)] = 1
        return ids, mask


# ----- the predictor ------------------------------------------------------------------------------------
class OnnxPredictor:
    """An exported smarttrim graph, ready to answer: ``predict(image, text)``."""

    def __init__(self, path, device: str = "auto", threads: int | None = None, tokenizer=None):
        self.path = Path(path)
        self.session = make_session(self.path, device, threads)
        raw = self.session.get_modelmeta().custom_metadata_map
        self.meta = {k[len(META):]: v for k, v in raw.items() if k.startswith(META)}
        if not self.meta:
            raise SmartTrimError(f"{self.path}: no smarttrim metadata (not written by `smarttrim export --onnx`)")
        if self.meta.get("serve"):  # a family's own graph (e.g. a decoder VLM's image side) answers nothing alone
            raise SmartTrimError(f"{self.path}: a {self.meta.get('graph')} graph ({self.meta.get('backbone')}); "
                                 f"serve it with {self.meta['serve']}")
        self.task = self.meta.get("task", "vqa")
        cfg = json.loads(self.meta.get("config") or "{}")
        self.preprocess = json.loads(self.meta.get("preprocess") or "{}")
        bcfg = cfg.get("backbone_config") or {}
        for k, v in (("image_size", bcfg.get("image_size", 384)), ("max_text_len", bcfg.get("max_text_len", 40)),
                     ("mean", (0.48145466, 0.4578275, 0.40821073)), ("std", (0.26862954, 0.26130258, 0.27577711))):
            self.preprocess.setdefault(k, v)
        self.default_threshold = float(self.meta.get("default_threshold", 0.5))
        self.labels = self._labels()
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.token_layers = json.loads(self.meta.get("kept_tokens_layers") or "[]")
        self.head_layers = json.loads(self.meta.get("kept_heads_layers") or "[]")
        self.tokenizer = _Tokenizer(self.meta, self.preprocess["max_text_len"], bcfg.get("pad_token_id", 1), tokenizer)

    def _labels(self):
        if self.meta.get("labels"):
            return json.loads(self.meta["labels"])
        src = self.meta.get("labels_source", "")
        if src:
            p = Path(src.split("#")[0])
            if p.is_file():
                try:
                    return json.loads(p.read_text()).get("labels")
                except (OSError, json.JSONDecodeError):
                    return None
        return None

    def inputs(self, images, texts, images2=None, threshold=None) -> dict:
        """The feed dict for lists of PIL images and texts (one text per image)."""
        if len(images) != len(texts):
            raise SmartTrimError(f"{len(images)} images but {len(texts)} texts: give one text per image")
        p = self.preprocess
        px = np.stack([preprocess_image(im, p["image_size"], p["mean"], p["std"], p.get("resize", "crop"))
                       for im in images])
        ids, mask = self.tokenizer(texts)
        feed = {"pixel_values": px, "input_ids": ids, "attention_mask": mask}
        if "pixel_values2" in self.input_names:
            if images2 is None:
                raise SmartTrimError("this model (NLVR2) needs a second image per input")
            feed["pixel_values2"] = np.stack([preprocess_image(im, p["image_size"], p["mean"], p["std"],
                                                                 p.get("resize", "crop")) for im in images2])
        if "threshold" in self.input_names:
            thr = self.default_threshold if threshold is None else float(threshold)
            if not 0.0 < thr < 1.0:
                raise SmartTrimError(f"threshold must be in (0, 1), got {thr}")
            feed["threshold"] = np.array(thr, dtype=np.float32)
        return {k: v for k, v in feed.items() if k in self.input_names}

    def scores(self, logits: np.ndarray) -> np.ndarray:
        # the family's output kind (backbones/base.py OUTPUT_KINDS); files without it: VQA heads were multi-label
        kind = self.meta.get("output_kind") or ("multilabel" if self.task == "vqa" else "")
        if kind == "multilabel":  # a sigmoid per answer (BCE head)
            return 1.0 / (1.0 + np.exp(-logits))
        if logits.shape[-1] > 1:
            z = np.exp(logits - logits.max(-1, keepdims=True))
            return z / z.sum(-1, keepdims=True)
        return logits

    def predict_batch(self, images, texts, images2=None, threshold=None, top_k: int = 5) -> list[dict]:
        feed = self.inputs(images, texts, images2, threshold)
        outs = dict(zip(self.output_names, self.session.run(self.output_names, feed)))
        scores = self.scores(outs["logits"].astype(np.float64))
        res = []
        for b in range(scores.shape[0]):
            s = scores[b]
            r = {"text": texts[b]}
            if s.shape[-1] > 1:
                top = np.argsort(-s)[: max(1, int(top_k))]
                r["predictions"] = [{"label": self.labels[i] if self.labels and i < len(self.labels) else str(int(i)),
                                     "score": float(s[i])} for i in top]
            else:
                r["score"] = float(s[0])
            if "kept_tokens" in outs:
                r["kept_tokens"] = dict(zip(self.token_layers, (int(v) for v in outs["kept_tokens"][b])))
            if "kept_heads" in outs:
                r["kept_heads"] = dict(zip(self.head_layers, (int(v) for v in outs["kept_heads"][b])))
            res.append(r)
        return res

    def predict(self, image, text: str, image2=None, threshold=None, top_k: int = 5) -> dict:
        """One image (PIL image or path) and one question/hypothesis -> top answers, kept counts."""
        image = open_image(image) if not isinstance(image, Image.Image) else image
        if image2 is not None and not isinstance(image2, Image.Image):
            image2 = open_image(image2)
        return self.predict_batch([image], [text], [image2] if image2 is not None else None, threshold, top_k)[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m smarttrim_cli.onnx_predict",
                                 description="Run an exported smarttrim ONNX file on an image and a question "
                                             "(no PyTorch needed).")
    ap.add_argument("model", help="the .onnx file `smarttrim export --onnx` wrote")
    ap.add_argument("image", help="image file")
    ap.add_argument("text", help="question (VQA), sentence (NLVR2) or hypothesis (SNLI-VE)")
    ap.add_argument("--image2", help="second image (NLVR2)")
    ap.add_argument("--threshold", type=float, default=None, help="keep threshold (default: the model's)")
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder, if the file carries none")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    a = ap.parse_args(argv)
    try:
        p = OnnxPredictor(a.model, a.device, a.threads, a.tokenizer)
        r = p.predict(a.image, a.text, a.image2, a.threshold, a.top_k)
    except SmartTrimError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    if a.json:
        print(json.dumps(r, indent=2))
        return 0
    for pr in r.get("predictions", []):
        print(f"{pr['score']:.4f}  {pr['label']}")
    if "score" in r:
        print(f"score {r['score']:.4f}")
    if r.get("kept_tokens"):
        print("kept tokens: " + ", ".join(f"{k} {v}" for k, v in r["kept_tokens"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
