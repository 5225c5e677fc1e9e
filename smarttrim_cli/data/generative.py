"""Reader items -> batches for decoder VLMs (LLaVA-1.5 layout: a chat-template tokenizer with an ``<image>``
token, a CLIP image processor, ``LlavaProcessor``).

    collate = GenerativeCollate(load_chat_processor(model_dir), mode="train", instruction=VQA_SHORT_ANSWER)
    loader = DataLoader(open_dataset("vqa", d, "val", 336, preprocess=...), batch_size=8, collate_fn=collate)

A batch is left-padded (generation needs it; training shares it): ``input_ids``/``attention_mask`` (B, L),
``pixel_values`` (B, 3, H, W), ``prompt_lengths`` (B; real prompt tokens, pads excluded), ``answers`` (list of
lists), ``text`` (the questions) and, with ``mode="train"``, ``labels`` (B, L, unshifted as HF models expect;
-100 except the answer tokens and the token closing the assistant turn) and ``target_text``. The prompt is the
tokenizer's own chat template (user turn = image + question [+ "\\n" + instruction]) ending with the assistant
prefix; its single ``<image>`` is expanded to the model's number of image tokens exactly as ``LlavaProcessor``
does. The training target is an item's ``target_text`` when it has one (label-free: the full model's own
answer), else the most frequent normalised annotator answer. Nothing is truncated.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from ..errors import SmartTrimError
from .common import one_line
from .vqa_answers import majority_answer

VQA_SHORT_ANSWER = "Answer the question using a single word or phrase."  # LLaVA-1.5's VQAv2 instruction
MODES = ("train", "generate")
IGNORE_INDEX = -100  # torch cross_entropy's default ignore_index


def _where(processor) -> str:
    tok = getattr(processor, "tokenizer", processor)
    return str(getattr(tok, "name_or_path", "") or type(processor).__name__)


def _template(processor) -> str | None:
    tok = getattr(processor, "tokenizer", processor)
    return getattr(processor, "chat_template", None) or getattr(tok, "chat_template", None)


def check_chat_processor(processor, where: str | None = None) -> None:
    """One-line SmartTrimError naming ``where`` (default: the tokenizer's directory) when the tokenizer has no
    chat template or no single image token, the processor no patch size, or the template does not put exactly
    one image in the user turn."""
    where = where or _where(processor)
    tok = getattr(processor, "tokenizer", processor)
    if not _template(processor):
        raise SmartTrimError(f"{where}: the tokenizer has no chat template (chat_template.jinja or "
                             "'chat_template' in tokenizer_config.json); a generative VLM needs one")
    image_token = getattr(processor, "image_token", None) or getattr(tok, "image_token", None) or "<image>"
    tid = tok.convert_tokens_to_ids(image_token)
    if tid is None or tid == tok.unk_token_id or tok.encode(image_token, add_special_tokens=False) != [tid]:
        raise SmartTrimError(f"{where}: the tokenizer has no image token {image_token!r} (one token of its "
                             "vocabulary is needed where the image goes)")
    if hasattr(processor, "image_processor") and not getattr(processor, "patch_size", None):
        raise SmartTrimError(f"{where}: the processor has no patch_size, so the number of image tokens is "
                             "unknown (set 'patch_size' in processor_config.json)")
    prompt = _render(processor, "?", None)[0]
    if prompt.count(image_token) != 1:
        raise SmartTrimError(f"{where}: the chat template puts {prompt.count(image_token)} image tokens "
                             "in a user turn with one image, expected 1")


def load_chat_processor(model_dir: str | os.PathLike):
    """``AutoProcessor.from_pretrained(model_dir)`` (local files only), checked by :func:`check_chat_processor`."""
    path = Path(os.path.expanduser(str(model_dir)))
    if not path.is_dir():
        raise SmartTrimError(f"{path}: processor directory does not exist")
    from transformers import AutoProcessor  # heavy; only generative paths need it

    try:
        processor = AutoProcessor.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises OSError/ValueError/KeyError ... for a bad directory
        raise SmartTrimError(f"{path}: cannot load a processor ({one_line(e)[:200]})") from None
    if not hasattr(processor, "tokenizer") or not hasattr(processor, "image_processor"):
        raise SmartTrimError(f"{path}: not a vision-language processor (needs a tokenizer and an image "
                             f"processor, got {type(processor).__name__})")
    check_chat_processor(processor, str(path))
    return processor


def image_token_count(processor, height: int, width: int) -> int:
    """Image tokens for one (height, width) image, as ``LlavaProcessor.replace_image_token`` counts them:
    patches + ``num_additional_image_tokens`` (CLS), minus 1 for ``vision_feature_select_strategy="default"``
    (which drops CLS)."""
    patch = getattr(processor, "patch_size", None)
    if not patch:
        raise SmartTrimError(f"{_where(processor)}: the processor has no patch_size, so the number of image "
                             "tokens is unknown (set 'patch_size' in processor_config.json)")
    n = (int(height) // patch) * (int(width) // patch) + int(getattr(processor, "num_additional_image_tokens", 0) or 0)
    if getattr(processor, "vision_feature_select_strategy", None) == "default":
        n -= 1
    return n


def _render(processor, question: str, answer: str | None) -> tuple[str, str | None]:
    """(prompt ending with the assistant prefix, prompt + answer turn or None) from the chat template."""
    tok = getattr(processor, "tokenizer", processor)
    template = _template(processor)
    # structured content: the form processor chat templates (llava-hf) iterate over
    conv: list[dict] = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = tok.apply_chat_template(conv, chat_template=template, tokenize=False, add_generation_prompt=True)
    if answer is None:
        return prompt, None
    conv.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return prompt, tok.apply_chat_template(conv, chat_template=template, tokenize=False)


class GenerativeCollate:
    """Picklable ``collate_fn``: reader items -> a left-padded generative batch (see the module docstring).

    ``processor``: a loaded processor or its directory. ``mode="train"``: prompt + answer + end-of-turn, with
    ``labels``; ``mode="generate"``: prompt only.
    ``instruction``: appended to each question after a newline (e.g. :data:`VQA_SHORT_ANSWER`).
    """

    def __init__(self, processor, mode: str = "train", instruction: str | None = None):
        if mode not in MODES:
            raise SmartTrimError(f"generative collate: mode must be one of {', '.join(MODES)}, got {mode!r}")
        if isinstance(processor, (str, os.PathLike)):
            processor = load_chat_processor(processor)
        check_chat_processor(processor)
        self.processor = processor
        self.mode = mode
        self.instruction = instruction.strip() if instruction else None
        tok = self.tokenizer = getattr(processor, "tokenizer", processor)
        self.image_token = getattr(processor, "image_token", None) or getattr(tok, "image_token", None) or "<image>"
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id  # masked out anyway
        if self.pad_id is None:
            raise SmartTrimError(f"{_where(processor)}: the tokenizer has neither a pad nor an eos token")
        # tokens that may close an assistant turn (eos, <|im_end|> ...); the image and pad tokens never do
        self._closers = {t.content for t in getattr(tok, "added_tokens_decoder", {}).values() if t.special}
        self._closers.discard(self.image_token)
        self._closers.discard(tok.pad_token)
        if tok.eos_token:
            self._closers.add(tok.eos_token)

    def question(self, text: str) -> str:
        return f"{text}\n{self.instruction}" if self.instruction else text

    def encode(self, question: str, height: int, width: int, target: str | None = None) -> tuple[list[int], int]:
        """(token ids, prompt length) of one example; ``target`` None -> the generation prompt only."""
        tok = self.tokenizer
        prompt, full = _render(self.processor, self.question(question), target)
        if prompt.count(self.image_token) != 1:
            raise SmartTrimError(f"question {one_line(question)[:60]!r}: the prompt holds "
                                 f"{prompt.count(self.image_token)} image tokens, expected 1")
        completion = ""
        if full is not None:
            if not full.startswith(prompt):
                raise SmartTrimError(f"{_where(self.processor)}: the chat template's generation prompt is not a "
                                     "prefix of its assistant turn; cannot separate the answer")
            # drop trailing spaces/newlines after the answer (llava-hf's template ends it with ' '): the model
            # should learn "answer</s>" as LLaVA-1.5 was trained, and stop there
            completion = full[len(prompt):].rstrip()
            if not any(completion.endswith(c) for c in self._closers) and tok.eos_token:
                completion += tok.eos_token
        expanded = prompt.replace(self.image_token, self.image_token * image_token_count(self.processor, height, width))
        # as ProcessorMixin.apply_chat_template: no second BOS when the template already writes one
        special = not (tok.bos_token and prompt.startswith(tok.bos_token))
        prompt_ids = tok(expanded, add_special_tokens=special)["input_ids"]
        if full is None:
            return list(prompt_ids), len(prompt_ids)
        prompt_ids = list(prompt_ids)
        # tokenised in context, the answer's first token is the one the model emits ("▁red" after "ASSISTANT:")
        ids = list(tok(expanded + completion, add_special_tokens=special)["input_ids"])
        if ids[:len(prompt_ids)] != prompt_ids:
            # a token merged across the boundary: keep generation's exact prompt, so the labels hold answer only
            ids = prompt_ids + list(tok(completion, add_special_tokens=False)["input_ids"])
        if len(ids) <= len(prompt_ids):
            raise SmartTrimError(f"question {one_line(question)[:60]!r}: the answer {target!r} adds no tokens")
        return ids, len(prompt_ids)

    def target_for(self, item: dict) -> str:
        target = item.get("target_text")
        if isinstance(target, str) and target.strip():
            return target.strip()
        target = majority_answer(item.get("answers") or [])
        if not target:
            ref = item.get("question_id", item.get("text"))
            raise SmartTrimError(f"item {ref!r}: no answers and no target_text to train on (label-free data "
                                 "needs the full model's answers as target_text)")
        return target

    def __call__(self, batch: Sequence[dict]) -> dict[str, Any]:
        if not batch:
            raise ValueError("generative collate: empty batch")
        seqs, plens, targets = [], [], []
        for item in batch:
            h, w = item["image"].shape[-2:]
            target = self.target_for(item) if self.mode == "train" else None
            ids, n = self.encode(item["text"], h, w, target)
            seqs.append(ids)
            plens.append(n)
            targets.append(target)
        L = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), L), dtype=torch.long)
        labels = torch.full((len(seqs), L), IGNORE_INDEX, dtype=torch.long)
        for i, (s, n) in enumerate(zip(seqs, plens)):
            off = L - len(s)  # left padding
            input_ids[i, off:] = torch.tensor(s, dtype=torch.long)
            mask[i, off:] = 1
            labels[i, off + n:] = torch.tensor(s[n:], dtype=torch.long)
        out: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask,
                               "pixel_values": torch.stack([b["image"] for b in batch]),
                               "prompt_lengths": torch.tensor(plens, dtype=torch.long),
                               "answers": [list(b.get("answers") or []) for b in batch],
                               "text": [b["text"] for b in batch]}
        if self.mode == "train":
            out["labels"] = labels
            out["target_text"] = targets
        for key in ("question_id", "image_id"):
            values = [b.get(key) for b in batch]
            if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                out[key] = torch.tensor(values, dtype=torch.long)
        return out


def generated_texts(processor, sequences: torch.Tensor, input_length: int) -> list[str]:
    """The answers in ``model.generate`` output: the tokens after the (left-padded, so shared) prompt length,
    decoded without special tokens and stripped; feed them to ``metrics.vqa_score_generated`` or, label-free, back
    as ``target_text``."""
    tok = getattr(processor, "tokenizer", processor)
    return [t.strip() for t in tok.batch_decode(sequences[:, int(input_length):], skip_special_tokens=True)]


class WithTargetTexts(Dataset):
    """``dataset`` whose item ``i`` also carries ``target_text = texts[i]`` (label-free training on the full
    model's greedy answers)."""

    def __init__(self, dataset, texts: Sequence[str]):
        if len(texts) != len(dataset):
            raise SmartTrimError(f"{len(texts)} target texts for {len(dataset)} items")
        self.dataset, self.texts = dataset, list(texts)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return {**self.dataset[index], "target_text": self.texts[index]}


__all__ = ["GenerativeCollate", "WithTargetTexts", "generated_texts", "VQA_SHORT_ANSWER", "IGNORE_INDEX",
           "check_chat_processor", "load_chat_processor", "image_token_count"]
