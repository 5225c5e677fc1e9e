"""Tiny Hugging Face BLIP and ViLT directories written with ``save_pretrained`` (the real on-disk format),
with tokenizer and image-processor files, and noise on every parameter so that a mis-mapped weight
shows up in the outputs. Random BLIP configs need vision ``initializer_range`` 0.02 (the default 1e-10
makes all tokens alike) and the text head count set explicitly (transformers' default 8 is not BLIP's)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from smarttrim_cli.data import EASYVQA_ANSWERS

# multi-token answers first (padding inside the answer list), then easy-VQA's, so finetune/profile can run
ANSWERS = ["two dogs", "blue ball"] + list(EASYVQA_ANSWERS)
TEXTS = ["what color is the shape", "what shape is in the image", "is there a red circle", " ".join(ANSWERS)]
VOCAB, BOS, SEP = 60, 58, 3  # word tokenizer: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4


def write_tiny_blip(path: Path, arch="BlipForQuestionAnswering", seed=0, answers=True) -> Path:
    import transformers
    from transformers import BertTokenizer, BlipConfig, BlipImageProcessorPil

    from smarttrim_cli.tokenizers_local import write_word_tokenizer

    torch.manual_seed(seed)
    cfg = BlipConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=24, bos_token_id=BOS, sep_token_id=SEP,
                         pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           image_size=32, patch_size=8, initializer_range=0.02),
        image_text_hidden_size=16)
    hf = getattr(transformers, arch)(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(str(path))
    tok_dir = write_word_tokenizer(Path(str(path) + "-vocab"), TEXTS + ANSWERS)
    BertTokenizer(str(Path(tok_dir) / "vocab.txt")).save_pretrained(str(path))
    BlipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(str(path))
    if answers and arch == "BlipForQuestionAnswering":
        (Path(path) / "answer_list.json").write_text(json.dumps(ANSWERS))
    return Path(path)


LABELS = list(EASYVQA_ANSWERS)  # so that finetune/profile run on the bundled easy-VQA data
VILT_TEXTS = ["what color is the shape", "what shape is in the image", "is there a red circle", " ".join(LABELS)]


def write_tiny_vilt(path: Path, seed=0, image_size=64, patch=16, **kw) -> Path:
    from transformers import BertTokenizer, ViltConfig, ViltForQuestionAnswering, ViltImageProcessorPil

    from smarttrim_cli.tokenizers_local import write_word_tokenizer

    torch.manual_seed(seed)
    cfg = dict(vocab_size=60, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
               image_size=image_size, patch_size=patch, max_position_embeddings=16,
               id2label=dict(enumerate(LABELS)), label2id={a: i for i, a in enumerate(LABELS)})
    cfg.update(kw)
    hf = ViltForQuestionAnswering(ViltConfig(**cfg)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(str(path))
    tok_dir = write_word_tokenizer(Path(str(path) + "-vocab"), VILT_TEXTS)
    BertTokenizer(str(Path(tok_dir) / "vocab.txt")).save_pretrained(str(path))
    ViltImageProcessorPil(size={"shortest_edge": image_size}).save_pretrained(str(path))
    return Path(path)


def center_token_trimmers(m, b):
    """Shift each random token trimmer's bias so that it drops about half of its tokens on b (random
    tiny trimmers otherwise saturate: everything kept or everything dropped)."""
    outs = {}
    hooks = [tr.register_forward_hook(lambda mod, inp, out, k=k: outs.__setitem__(k, out))
             for k, tr in m.token_trimmers.items()]
    try:
        for _ in range(2):
            with torch.no_grad():
                m.run(b, mode="soft")
                for k, tr in m.token_trimmers.items():
                    tr.fc2.bias -= outs[k].median()
    finally:
        for h in hooks:
            h.remove()


