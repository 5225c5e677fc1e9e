"""A tiny Hugging Face LLaVA directory written with ``save_pretrained`` (the real on-disk format): a random
``LlavaForConditionalGeneration`` (CLIP tower, MLP projector, Llama LM), a WordLevel tokenizer with an
``<image>`` token and a chat template, and a ``LlavaProcessor`` with a ``CLIPImageProcessorPil``. Noise on every
parameter so that a mis-wired weight shows up in the outputs. Nothing is downloaded."""
from __future__ import annotations

from pathlib import Path

import torch

WORDS = ["what", "color", "is", "the", "shape", "in", "image", "a", "red", "blue", "circle", "square", "yes", "no",
         "user", "assistant", ":", "?", "green", "there"]
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
PAD, BOS, EOS, IMAGE = 0, 1, 2, 4
VOCAB = 64
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}"
                 "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}"
                 "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")  # a prefix of the assistant turn


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>", padding_side="left",
                                  extra_special_tokens={"image_token": "<image>"})
    tok.padding_side = "left"
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llava_config(text="llama", vision="clip", image_size=16, patch=4, tie=False, vocab=VOCAB, **kw):
    from transformers import LlavaConfig

    text_cfg = dict(model_type=text, vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=PAD,
                    bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=tie)
    vis_cfg = dict(model_type="clip_vision_model" if vision == "clip" else "siglip_vision_model", hidden_size=24,
                   intermediate_size=40, num_hidden_layers=3, num_attention_heads=4, image_size=image_size,
                   patch_size=patch)
    if vision == "clip":
        vis_cfg["projection_dim"] = 16
    return LlavaConfig(text_config=text_cfg, vision_config=vis_cfg, image_token_id=IMAGE, pad_token_id=PAD,
                       vision_feature_select_strategy="default" if vision == "clip" else "full",
                       tie_word_embeddings=tie, **kw)


def write_tiny_llava(path: Path, seed=0, text="llama", vision="clip", image_size=16, patch=4, tie=False,
                     dtype=torch.float32, vocab=VOCAB) -> Path:
    """``vocab``: the LM's vocabulary size (64 by default, more than the tokenizer's words; len(SPECIAL + WORDS)
    makes every generated id a word or a special token, so that greedy answers decode to text)."""
    from transformers import CLIPImageProcessorPil, LlavaForConditionalGeneration, LlavaProcessor

    torch.manual_seed(seed)
    hf = LlavaForConditionalGeneration(tiny_llava_config(text, vision, image_size, patch, tie, vocab=vocab)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf = hf.to(dtype)
    hf.save_pretrained(str(path))
    ip = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                               crop_size={"height": image_size, "width": image_size})
    LlavaProcessor(image_processor=ip, tokenizer=tiny_tokenizer(), patch_size=patch, chat_template=CHAT_TEMPLATE,
                   vision_feature_select_strategy=hf.config.vision_feature_select_strategy,
                   num_additional_image_tokens=1 if vision == "clip" else 0).save_pretrained(str(path))
    return Path(path)


def tiny_inputs(path: Path, prompts, seed=0):
    """(processor batch: input_ids with expanded <image> runs, attention_mask (left-padded), pixel_values)."""
    from PIL import Image
    from transformers import AutoProcessor

    import numpy as np

    proc = AutoProcessor.from_pretrained(str(path), local_files_only=True)
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)) for _ in prompts]
    texts = [proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}],
                                      add_generation_prompt=True) for p in prompts]
    return dict(proc(images=images, text=texts, return_tensors="pt", padding=True))


def one(b, i):
    """Input i of a processor batch alone, without its padding."""
    keep = b["attention_mask"][i] > 0
    return {"input_ids": b["input_ids"][i:i + 1, keep], "attention_mask": b["attention_mask"][i:i + 1, keep],
            "pixel_values": b["pixel_values"][i:i + 1]}


def text_rows(b):
    """(B, L) True at the real text tokens (not padding, not image placeholders)."""
    return (b["attention_mask"] > 0) & (b["input_ids"] != IMAGE)
