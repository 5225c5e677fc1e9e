"""Generative (LLaVA-1.5 layout) batches, generated-answer scores and the label-free prompts reader, on a tiny
word-level tokenizer + CLIPImageProcessor + LlavaProcessor saved to disk and loaded back (nothing downloaded)."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image

from smarttrim_cli.data import (VQA_SHORT_ANSWER, GenerativeCollate, PromptsDataset, VQAv2Dataset, WithTargetTexts,
                                generated_texts, image_token_count, load_chat_processor, majority_answer,
                                open_dataset)
from smarttrim_cli.errors import SmartTrimError
from smarttrim_cli.metrics import exact_match_generated, generated_vqa_score, vqa_score_generated

WORDS = ("user assistant : ? . , how many dogs are there what color is the cat answer question using a single "
         "word or phrase 2 3 red").split()
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
# LLaVA-1.5 style, closing the assistant turn with </s>; BOS comes from the tokenizer (as Llama's does)
EOS_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} "
                "{% else %}ASSISTANT: {% for c in m['content'] %}{{ c['text'] }}{% endfor %}</s>{% endif %}"
                "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
# ChatML-like: a newline after the closing token (must not become a second eos)
EOS_NEWLINE_TEMPLATE = EOS_TEMPLATE.replace("</s>{% endif %}", "</s>\n{% endif %}")
# llava-hf/llava-1.5-7b-hf's processor template: the answer ends with ' ' and no </s> (the collate adds the eos)
HF_TEMPLATE = ("{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
               "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
               "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
               "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
               "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
               "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
               "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def make_processor(out: Path, template: str | None = EOS_TEMPLATE, image_token: bool = True,
                   strategy: str = "default", extra: int = 1, crop=(8, 8), patch: int | None = 2):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    special = SPECIAL if image_token else [s for s in SPECIAL if s != "<image>"]
    vocab = {w: i for i, w in enumerate(special + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", chat_template=template,
                                  additional_special_tokens=["<image>"] if image_token else None)
    ip = CLIPImageProcessor(size={"shortest_edge": min(crop)}, crop_size={"height": crop[0], "width": crop[1]})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=patch, vision_feature_select_strategy=strategy,
                          num_additional_image_tokens=extra, chat_template=template)
    proc.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def proc_dir(tmp_path_factory):
    return make_processor(tmp_path_factory.mktemp("llava") / "proc")


@pytest.fixture(scope="module")
def processor(proc_dir):
    return load_chat_processor(proc_dir)


def item(question, answers=(), size=(8, 8), **extra):
    return {"image": torch.zeros(3, *size), "text": question, "answers": list(answers), **extra}


def real_ids(batch, i):
    return batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist()


# ----------------------------------------------------------------------------- prompts

@pytest.mark.parametrize("strategy, extra, crop", [("default", 1, (8, 8)), ("full", 1, (8, 8)),
                                                   ("default", 0, (8, 12))])
def test_generate_prompt_is_what_llava_processor_builds(tmp_path, strategy, extra, crop):
    processor = load_chat_processor(make_processor(tmp_path / "p", strategy=strategy, extra=extra, crop=crop))
    img = Image.new("RGB", (20, 10), (200, 10, 10))
    question = "How many dogs are there?"
    text = f"{question}\n{VQA_SHORT_ANSWER}"
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    ref = processor(images=[img], text=[processor.apply_chat_template(conv, add_generation_prompt=True)],
                    return_tensors="pt")
    pixels = ref["pixel_values"][0]
    batch = GenerativeCollate(processor, mode="generate", instruction=VQA_SHORT_ANSWER)(
        [{"image": pixels, "text": question, "answers": []}])
    assert batch["input_ids"].tolist() == ref["input_ids"].tolist()
    n_image = (batch["input_ids"] == processor.image_token_id).sum().item()
    assert n_image == (ref["input_ids"] == processor.image_token_id).sum().item()
    assert n_image == image_token_count(processor, *pixels.shape[-2:]) == \
        (crop[0] // 2) * (crop[1] // 2) + extra - (strategy == "default")
    assert torch.equal(batch["pixel_values"][0], pixels) and "labels" not in batch
    prefix = processor.tokenizer("ASSISTANT:", add_special_tokens=False)["input_ids"]
    assert real_ids(batch, 0)[-len(prefix):] == prefix  # ends with the assistant prefix, nothing after it
    assert batch["prompt_lengths"].tolist() == [len(real_ids(batch, 0))]


@pytest.mark.parametrize("template", [EOS_TEMPLATE, EOS_NEWLINE_TEMPLATE, HF_TEMPLATE],
                         ids=["closes-with-eos", "eos-newline", "llava-hf"])
def test_train_labels_cover_only_answer_and_eos_with_left_padding(tmp_path, template):
    processor = load_chat_processor(make_processor(tmp_path / "p", template=template))
    tok = processor.tokenizer
    items = [item("What color is the cat?", ["red"] * 10),
             item("How many dogs?", ["two", "2", "Two", "3", "3", "3", "three", "cat", "cat", "the cat"])]
    train = GenerativeCollate(processor, mode="train")(items)
    gen = GenerativeCollate(processor, mode="generate")(items)
    assert train["target_text"] == ["red", "3"]                     # most frequent normalised answer
    ids, mask, labels = train["input_ids"], train["attention_mask"], train["labels"]
    pads = (mask[1] == 0).sum().item()
    assert pads > 0 and mask[1, :pads].sum() == 0 and mask[1, pads:].all()       # left padding, shorter row
    assert (ids[1, :pads] == tok.pad_token_id).all() and (labels[1, :pads] == -100).all()
    assert mask[0].all()
    for i, answer in enumerate(["red", "3"]):
        n_answer = len(tok(answer, add_special_tokens=False)["input_ids"]) + 1      # + eos
        supervised = (labels[i] != -100).nonzero().flatten().tolist()
        assert supervised == list(range(ids.shape[1] - n_answer, ids.shape[1]))     # exactly the answer + eos
        assert labels[i, -1].item() == tok.eos_token_id
        assert tok.decode(labels[i][labels[i] != -100], skip_special_tokens=True).strip() == answer
        assert real_ids(train, i)[:-n_answer] == real_ids(gen, i)                 # same prompt as generation
        assert train["prompt_lengths"][i].item() == len(real_ids(gen, i)) == gen["prompt_lengths"][i].item()
    assert train["answers"][1][0] == "two" and gen["text"][1] == "How many dogs?"
    # what generate() returns: prompt + answer + eos, then pads where a row stopped early
    L = gen["input_ids"].shape[1]
    answer_ids = [labels[i][labels[i] != -100].tolist() for i in range(2)]
    tails = torch.tensor([answer_ids[0] + [tok.pad_token_id] * 2, answer_ids[1] + [tok.pad_token_id] * 2])
    assert generated_texts(processor, torch.cat([gen["input_ids"], tails], 1), L) == ["red", "3"]


def test_token_merged_across_prompt_and_answer_stays_in_the_prompt(tmp_path):
    """A BPE without pre-tokenizer merges '?▁ASSISTANT:▁' with the answer's leading space: the labels must still
    hold only the answer, after exactly the generation prompt."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Strip(" ", 1, 0)])
    tk.train_from_iterator(["USER: what color is the cat? ASSISTANT: red"] * 20,
                           trainers.BpeTrainer(vocab_size=200, special_tokens=SPECIAL))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tk.token_to_id("<s>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", additional_special_tokens=["<image>"], chat_template=HF_TEMPLATE)
    ip = CLIPImageProcessor(size={"shortest_edge": 4}, crop_size={"height": 4, "width": 4})
    LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=2, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1, chat_template=HF_TEMPLATE).save_pretrained(str(tmp_path / "bpe"))
    processor = load_chat_processor(tmp_path / "bpe")
    tok = processor.tokenizer
    prompt = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "what color is the cat?"}]}], add_generation_prompt=True)
    assert tok(prompt)["input_ids"] != tok(prompt + " red</s>")["input_ids"][:len(tok(prompt)["input_ids"])]
    batch = [item("what color is the cat?", ["red"], size=(4, 4))]
    train = GenerativeCollate(processor, mode="train")(batch)
    gen = GenerativeCollate(processor, mode="generate")(batch)
    n = gen["prompt_lengths"][0].item()
    assert train["input_ids"][0, :n].tolist() == gen["input_ids"][0].tolist() and train["prompt_lengths"][0] == n
    assert (train["labels"][0, :n] == -100).all() and (train["labels"][0, n:] != -100).all()
    assert tok.decode(train["labels"][0, n:], skip_special_tokens=True).strip() == "red"


def test_target_choice_tie_override_and_label_free(processor):
    assert majority_answer(["cat", "dog", "Dog", "cat"]) == "cat" and majority_answer([]) is None
    collate = GenerativeCollate(processor, mode="train")
    assert collate([item("What?", ["Red", "red", "2"])])["target_text"] == ["red"]
    assert collate([item("What?", ["red"], target_text="2")])["target_text"] == ["2"]  # given target wins
    with pytest.raises(SmartTrimError, match="no answers and no target_text"):
        collate([item("What?", [], question_id=7)])
    ds = WithTargetTexts([item("What?"), item("How many?")], ["red", "3"])
    assert collate([ds[0], ds[1]])["target_text"] == ["red", "3"]
    # a DataLoader worker gets the collate by pickling: the copy must batch identically
    batch = [item("How many dogs?", ["2"] * 10)]
    again = pickle.loads(pickle.dumps(collate))(batch)
    assert all(torch.equal(again[k], v) for k, v in collate(batch).items() if torch.is_tensor(v))


def test_missing_chat_template_or_image_token_is_a_one_line_error_naming_the_directory(tmp_path):
    no_template = make_processor(tmp_path / "no-template", template=None)
    with pytest.raises(SmartTrimError, match="no chat template") as e:
        load_chat_processor(no_template)
    assert str(no_template) in str(e.value) and "\n" not in str(e.value)
    no_image = make_processor(tmp_path / "no-image", image_token=False)
    with pytest.raises(SmartTrimError, match="no image token") as e:
        load_chat_processor(no_image)
    assert str(no_image) in str(e.value) and "\n" not in str(e.value)
    no_patch = make_processor(tmp_path / "no-patch", patch=None)
    with pytest.raises(SmartTrimError, match="no patch_size") as e:
        load_chat_processor(no_patch)
    assert str(no_patch) in str(e.value)
    with pytest.raises(SmartTrimError, match="mode must be"):
        GenerativeCollate(load_chat_processor(make_processor(tmp_path / "ok")), mode="eval")


# ----------------------------------------------------------------------------- scores

def test_generated_answer_scores():
    assert generated_vqa_score("Two.", ["2"] * 10) == 1.0
    assert generated_vqa_score("a cat", ["cat", "cat"] + ["dog"] * 8) == 0.6
    assert generated_vqa_score("zebra", ["2"] * 10) == 0.0
    # fewer than ten answers (easy-VQA's one, a prompts row's accepted ones): a match scores 1, not the soft 0.3
    assert generated_vqa_score("Circle.", ["circle"]) == 1.0
    assert generated_vqa_score("red", ["blue", "red"]) == 1.0 and generated_vqa_score("teal", ["circle"]) == 0.0
    s = vqa_score_generated(["Two.", "cat", "zebra"], [["2"] * 10, ["cat", "cat"] + ["dog"] * 8, ["2"] * 10])
    assert s.dtype == torch.float32 and s.tolist() == pytest.approx([1.0, 0.6, 0.0])
    em = exact_match_generated(["Dog!", "cat", "3"], [["cat", "cat"] + ["dog"] * 8, ["cat", "dog"], ["2"]])
    assert em.tolist() == [1.0, 1.0, 0.0]
    assert torch.isnan(vqa_score_generated(["x"], [[]])).all()   # undefined without answers, not a silent 0


# ----------------------------------------------------------------------------- label-free readers

def write_prompts(root: Path, rows) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "img").mkdir(exist_ok=True)
    Image.new("RGB", (12, 10), (0, 200, 0)).save(root / "img" / "a.png")
    (root / "prompts.jsonl").write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return root


def test_prompts_reader_good_missing_image_and_malformed_row(tmp_path, processor):
    good = write_prompts(tmp_path / "good", [{"image": "img/a.png", "prompt": "What color is it?"},
                                             {"image": "img/a.png", "prompt": "How many?", "answer": "2"}])
    ds = open_dataset("prompts", good, "prompts", image_size=8)
    assert isinstance(ds, PromptsDataset) and len(ds) == 2
    first, second = ds[0], ds[1]
    assert first["image"].shape == (3, 8, 8) and first["text"] == "What color is it?" and first["answers"] == []
    assert second["answers"] == ["2"] and second["question_id"] == 2
    batch = GenerativeCollate(processor, mode="generate")([first, second])
    assert batch["input_ids"].shape[0] == 2 and batch["answers"] == [[], ["2"]]

    missing = write_prompts(tmp_path / "missing", [{"image": "img/a.png", "prompt": "ok"},
                                                   {"image": "img/nope.png", "prompt": "gone"}])
    with pytest.raises(SmartTrimError) as e:
        open_dataset("prompts", missing, "prompts", image_size=8)
    assert "nope.png" in str(e.value) and "line 2" in str(e.value) and "\n" not in str(e.value)
    ds = open_dataset("prompts", missing, "prompts", image_size=8, skip_bad=True)
    assert len(ds) == 1 and ds.skipped == {"missing image": 1}

    bad = write_prompts(tmp_path / "bad", [{"image": "img/a.png", "prompt": "ok"}, "{not json",
                                           {"image": "img/a.png"}])
    with pytest.raises(SmartTrimError) as e:
        open_dataset("prompts", bad, "prompts", image_size=8)
    assert "prompts.jsonl line 2" in str(e.value) and "invalid JSON" in str(e.value) and "\n" not in str(e.value)
    ds = open_dataset("prompts", bad, "prompts", image_size=8, skip_bad=True)
    assert len(ds) == 1 and ds.skipped == {"bad row": 2}
    with pytest.raises(SmartTrimError, match="prompts file not found"):
        open_dataset("prompts", tmp_path, "prompts", image_size=8)


def test_scenes_items_train(tmp_path, processor):
    from smarttrim_cli.data.scenes import generate_scenes

    generate_scenes(tmp_path / "scenes", n_train=1, n_val=1, image_size=64, questions_per_image=2)
    ds = open_dataset("vqa", tmp_path / "scenes", "val", image_size=8, label2id=["yes"])
    batch = GenerativeCollate(processor, mode="train")([ds[0], ds[1]])
    assert batch["target_text"] == [majority_answer(ds[i]["answers"]) for i in range(2)]
    assert batch["pixel_values"].shape == (2, 3, 8, 8) and ((batch["labels"] != -100).sum(1) >= 2).all()


def test_vqav2_test_split_without_annotations_is_usable_label_free(tmp_path, proc_dir, processor):
    root = tmp_path / "vqa"
    root.mkdir()
    (root / "v2_OpenEnded_mscoco_test2015_questions.json").write_text(json.dumps(
        {"questions": [{"image_id": 5, "question": "What color is the cat?", "question_id": 5000}]}))
    (root / "test2015").mkdir()
    Image.new("RGB", (16, 12), (9, 9, 9)).save(root / "test2015" / "COCO_test2015_000000000005.jpg")
    ds = VQAv2Dataset(root, "test", image_size=8, label2id=["red"])
    assert len(ds) == 1 and ds[0]["answers"] == []
    gen = GenerativeCollate(proc_dir, mode="generate")([ds[0]])  # from the directory
    assert gen["answers"] == [[]] and gen["question_id"].tolist() == [5000]
    train = GenerativeCollate(processor, mode="train")([WithTargetTexts(ds, ["red"])[0]])
    assert train["target_text"] == ["red"] and (train["labels"] != -100).sum().item() == 2  # "red" + eos
