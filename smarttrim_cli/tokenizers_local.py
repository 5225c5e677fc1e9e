"""Small tokenizers written to disk in the real Hugging Face formats, for models trained here
(the demo's from-scratch base model) and for tests. Nothing is downloaded."""
from __future__ import annotations

import json
import re
from pathlib import Path


def _byte_alphabet() -> list[str]:
    """GPT-2/RoBERTa's byte-to-character table: printable bytes map to themselves, the rest to 256+i."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out, extra = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def write_byte_bpe_tokenizer(out_dir) -> Path:
    """A RoBERTa-format byte-level BPE tokenizer (vocab.json + merges.txt) with no merges: every byte
    is a token. 261 entries; ``<pad>`` is 1 as in RoBERTa."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for ch in _byte_alphabet():
        vocab.setdefault(ch, len(vocab))
    vocab["<mask>"] = len(vocab)
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n")
    return out


def write_word_tokenizer(out_dir, texts, min_count: int = 1) -> Path:
    """A BERT-format WordPiece ``vocab.txt`` holding every lower-cased word of ``texts``."""
    from collections import Counter

    words = Counter(w for t in texts for w in re.findall(r"[a-z0-9]+|[^\sa-z0-9]", t.lower()))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = special + sorted(w for w, n in words.items() if n >= min_count)
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return out
