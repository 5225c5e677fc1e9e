"""``smarttrim demo --backbone llava``: the demo's "existing VLM" as a small LLaVA-1.5-architecture model.

A real Hugging Face ``LlavaForConditionalGeneration`` directory (CLIP-style tower, MLP projector, a small Llama
LM, random init; ``save_pretrained`` + a word-level tokenizer with a chat template and ``<image>`` + a
``LlavaProcessor``), attached like any user's LLaVA, then trained from scratch as a generative VQA model by
``finetune --no-trim`` (recipes/llava.yaml's ``no_trim:`` trains the backbone). demo.py runs every other stage.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
PAD, BOS, EOS, IMAGE = 0, 1, 2, 4
# LLaVA-1.5's conversation layout ("USER: <image>\n... ASSISTANT:"), the assistant prefix ending the prompt
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}"
                 "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}"
                 "{% if m['role'] == 'assistant' %}</s> {% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")

# The tower is narrower than the LM so that the untrimmed part of the prefill (tower + text tokens) leaves the
# image tokens most of the LM's cost: the target below is reachable. 8 px patches: 64 image tokens at 64 px
# (easy-VQA), 256 at 128 px (scenes).
_NORMAL = dict(vision_width=64, vision_layers=2, vision_heads=4, vision_intermediate=128,
               text_hidden=160, text_layers=3, text_heads=4, text_intermediate=320, patch_size=8)
# quick: 3 LM layers, so that FastV (prunes after LM layer K=2) has a layer to run on
_QUICK = dict(vision_width=16, vision_layers=1, vision_heads=2, vision_intermediate=32,
              text_hidden=48, text_layers=3, text_heads=2, text_intermediate=96, patch_size=4)
SIZES = {"easyvqa": {"normal": dict(_NORMAL, image_size=64), "quick": dict(_QUICK, image_size=32)},
         "scenes": {"normal": dict(_NORMAL, image_size=128), "quick": dict(_QUICK, image_size=48)},
         "vqa": {"normal": dict(_NORMAL, image_size=64), "quick": dict(_QUICK, image_size=32)}}
for _d in SIZES.values():
    _d["long"] = _d["normal"]
TARGET_RATIO = 0.6  # of the full prefill GMACs (recipes/llava.yaml's default); the floor sits near 0.3-0.4

# Budgets, from the per-step times measured here (normal sizes, batch 32, 1 torch thread, 2 shared cores at load
# average 3.5-5.5): base easy-VQA 0.31-0.54 s/step (64 image tokens), scenes 1.1 s/step (256); trim and control
# 0.29 s/step on easy-VQA. A 4-epoch easy-VQA base run (1000 steps, 9.3 min) was at its best validation score after
# epoch 1 (exact match 68%, then 64-65%), hence 2 epochs. Scenes gets far fewer inputs than the METER demo's
# scenes run: expect a weaker base model there. quick: a few steps, the numbers mean nothing.
_NORMAL_BUDGETS = dict(base={"epochs": 2, "limit": 8000, "val_limit": 200, "lr": 1e-3, "batch_size": 32,
                             "max_new_tokens": 3, "workers": 0},
                       trim={"epochs": 1, "limit": 4000, "val_limit": 200, "batch_size": 32, "max_new_tokens": 3,
                             "workers": 0},
                       profile={"limit": 100, "iters": 10, "warmup": 2, "batch_size": 8, "throughput_batches": 1},
                       baselines={"calib_inputs": 64, "batch_size": 16}, export_runs=10)
_SCENES_BUDGETS = dict(_NORMAL_BUDGETS,
                       base=dict(_NORMAL_BUDGETS["base"], epochs=2, limit=5000),
                       trim=dict(_NORMAL_BUDGETS["trim"], limit=2000))
_QUICK_BUDGETS = dict(base={"max_steps": 6, "limit": 48, "val_limit": 8, "lr": 1e-3, "batch_size": 8,
                            "max_new_tokens": 2, "workers": 0},
                      trim={"max_steps": 12, "limit": 48, "val_limit": 8, "batch_size": 8, "max_new_tokens": 2,
                            "workers": 0, "lr_mult_trimmer": 2000},
                      profile={"limit": 6, "iters": 2, "warmup": 1, "batch_size": 2, "throughput_batches": 1},
                      baselines={"calib_inputs": 8, "batch_size": 4}, export_runs=2)
BUDGETS = {"normal": _NORMAL_BUDGETS, "quick": _QUICK_BUDGETS, "long": _NORMAL_BUDGETS}
SCENES_BUDGETS = dict(BUDGETS, normal=_SCENES_BUDGETS, long=_SCENES_BUDGETS)


def model_size(s) -> dict:
    return SIZES[s.dataset][s.size]


def budgets(s) -> dict:
    return (SCENES_BUDGETS if s.dataset == "scenes" else BUDGETS)[s.size]


def write_tokenizer(texts):
    """A word-level fast tokenizer over every lower-cased word of ``texts``, ``<image>`` one token."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in re.findall(r"[a-z0-9]+|[^\sa-z0-9]", t.lower())} - set(SPECIAL))
    vocab = {t: i for i, t in enumerate(SPECIAL + words)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>", padding_side="left",
                                  extra_special_tokens={"image_token": "<image>"})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_init(s, root: Path, data_dir, size: dict, questions, labels, say=print) -> dict:
    """Write the random LLaVA directory (``root/hf``) and attach it into ``root/init``. -> the stage's result."""
    import torch
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from .attach import attach
    from .data.generative import VQA_SHORT_ANSWER

    say("[1/7] word tokenizer with a chat template and a randomly initialised LLaVA-architecture model")
    tok = write_tokenizer(list(questions) + list(labels) + [VQA_SHORT_ANSWER, "user assistant :"])
    n_vocab = len(tok)
    text = dict(model_type="llama", vocab_size=n_vocab, hidden_size=size["text_hidden"],
                intermediate_size=size["text_intermediate"], num_hidden_layers=size["text_layers"],
                num_attention_heads=size["text_heads"], num_key_value_heads=size["text_heads"],
                max_position_embeddings=512 + (size["image_size"] // size["patch_size"]) ** 2,
                pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False)
    vis = dict(model_type="clip_vision_model", hidden_size=size["vision_width"],
               intermediate_size=size["vision_intermediate"], num_hidden_layers=size["vision_layers"],
               num_attention_heads=size["vision_heads"], image_size=size["image_size"],
               patch_size=size["patch_size"], projection_dim=size["vision_width"])
    cfg = LlavaConfig(text_config=text, vision_config=vis, image_token_id=IMAGE, pad_token_id=PAD,
                      vision_feature_select_strategy="default", vision_feature_layer=-1, tie_word_embeddings=False)
    torch.manual_seed(s.seed)
    hf = LlavaForConditionalGeneration(cfg).eval()
    hf.save_pretrained(str(root / "hf"))
    ip = CLIPImageProcessorPil(size={"shortest_edge": size["image_size"]},
                               crop_size={"height": size["image_size"], "width": size["image_size"]})
    LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=size["patch_size"], chat_template=CHAT_TEMPLATE,
                   vision_feature_select_strategy="default",
                   num_additional_image_tokens=1).save_pretrained(str(root / "hf"))
    (root / "answers.json").write_text(json.dumps(list(labels)))
    attach(root / "hf", out_dir=root / "init")
    return {"labels": len(labels), "vocab": n_vocab}
