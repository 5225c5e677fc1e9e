"""Training data: the datasets a model's task trains on, their batches (each input's dataset index rides along:
it seeds the input's Gumbel noise); a fresh task head (the family's ``new_head``) when the data's labels are
not the model's."""
from __future__ import annotations

import torch

from ..errors import SmartTrimError
from .config import TrainConfig

TASK_DATASETS = {"vqa": ("vqa", "easyvqa"), "nlvr2": ("nlvr2",), "snli": ("snli",),
                 "retrieval": ("coco-captions", "flickr30k"), "generate": ("vqa", "easyvqa", "prompts")}
TASK_DEFAULT_DATASET = {"retrieval": "coco-captions", "generate": "vqa"}  # others: the dataset named like the task
DEFAULT_SPLITS = {"vqa": ("train", "val"), "nlvr2": ("train", "dev"), "snli": ("train", "dev"),
                  "easyvqa": ("train", "test"), "coco-captions": ("train", "val"), "flickr30k": ("train", "val"),
                  "prompts": ("train", "val")}  # prompts: <split>.jsonl, else prompts.jsonl for both


class IndexedDataset(torch.utils.data.Dataset):
    """Adds the dataset index to each item (it seeds the input's Gumbel noise) and turns a reader's
    SmartTrimError into a marker, so that a worker's error reaches the user as one line."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        try:
            item = self.ds[i]
        except SmartTrimError as e:
            return {"__error__": str(e)}
        item["__index__"] = i
        return item


class Collate:
    KEEP = ("pixel_values", "pixel_values2", "input_ids", "attention_mask", "target")

    def __init__(self, tokenizer, max_text_len: int, extra: tuple = ()):
        # extra: more item keys to keep (retrieval: image_id, so that negatives come from other images)
        self.tokenizer, self.max_text_len, self.keep = tokenizer, max_text_len, self.KEEP + tuple(extra)

    def __call__(self, items):
        from ..data import collate

        for it in items:
            if "__error__" in it:
                return {"__error__": it["__error__"]}
        idx = torch.tensor([it.pop("__index__") for it in items], dtype=torch.long)
        out = collate(items, self.tokenizer, self.max_text_len)
        out = {k: out[k] for k in self.keep if k in out}
        out["index"] = idx
        return out


def check_batch(batch):
    if "__error__" in batch:
        raise SmartTrimError(batch["__error__"])
    return batch


def open_train_val(loaded, cfg: TrainConfig, recipe: dict | None, new_head: bool):
    """-> (dataset name, train set, val set, labels). ``loaded``: the model_dir.LoadedModel being fine-tuned."""
    from ..data import NLVR2_LABELS, canonical_name, open_dataset

    from .objectives import output_kind

    model = loaded.model
    task = model.config.task
    name = cfg.dataset or ((recipe or {}).get("data") or {}).get("dataset") or TASK_DEFAULT_DATASET.get(task, task)
    name = canonical_name("vqa" if str(name).lower() == "scenes" else name)  # scenes: written in VQAv2's layout
    if output_kind(model) == "text":
        return open_text(loaded, cfg, name, new_head)
    if name not in TASK_DATASETS.get(task, ()):
        need = (": image-caption pairs, a Karpathy-split dataset_coco.json / dataset_flickr30k.json and its images "
                "in --data-dir" if task == "retrieval" else "")
        raise SmartTrimError(f"dataset {name!r} does not fit a {task} model (a {task} model trains on "
                             f"{', '.join(TASK_DATASETS.get(task, ())) or 'nothing supported'}{need})")
    if task == "retrieval" and model.config.num_labels != 2:
        raise SmartTrimError(f"{model.family} retrieval model: finetune trains an image-text matching head with 2 "
                             f"outputs (no_match, match), this model scores a pair with {model.config.num_labels}")
    tr_split, va_split = DEFAULT_SPLITS[name]
    tr_split, va_split = cfg.train_split or tr_split, cfg.val_split or va_split
    labels = loaded.labels
    if name == "nlvr2":
        label2id = None
    elif new_head:
        label2id = None
    elif name == "snli":
        label2id = {l: i for i, l in enumerate(labels)} if labels else None
    else:
        label2id = {l: i for i, l in enumerate(labels)} if labels else None
    size = model.config.image_size
    pre = loaded.image_preprocessor()
    try:
        train = open_dataset(name, cfg.data_dir, tr_split, size, label2id=label2id, limit=cfg.limit,
                             skip_bad=cfg.skip_bad, preprocess=pre)
    except SmartTrimError as e:
        if label2id is None or "label2id" not in str(e):
            raise
        raise SmartTrimError(f"{e} (the model's {len(labels)} labels do not fit this dataset; pass --new-head "
                             "to train a fresh head for its labels)") from None
    vl = cfg.val_limit if cfg.val_limit is not None else cfg.limit
    val = open_dataset(name, cfg.data_dir, va_split, size, label2id=getattr(train, "label2id", None),
                       limit=vl, skip_bad=cfg.skip_bad, preprocess=pre)
    labels = list(NLVR2_LABELS) if name == "nlvr2" else list(train.id2label)  # retrieval: no_match, match
    if len(labels) != model.config.num_labels:
        if new_head:
            model.new_head(len(labels))  # the family's fresh head (backbones/base.py)
        else:
            src = "the model's labels" if loaded.labels else f"the vocabulary built from {cfg.data_dir or 'the data'}"
            raise SmartTrimError(f"{name}: {src} has {len(labels)} answers but the model's classifier has "
                                 f"{model.config.num_labels} outputs; pass --new-head to train a fresh head "
                                 "for this label set")
    if not len(train):
        raise SmartTrimError(f"{name} {tr_split}: no training inputs"
                             + (f" ({train.skipped_summary()})" if train.skipped_summary() else ""))
    return name, train, val, labels


def open_text(loaded, cfg: TrainConfig, name: str, new_head: bool):
    """A text task's (decoder VLM's) train and val sets: any reader with questions; no labels, no head."""
    from ..data import open_dataset

    task = loaded.model.config.task
    if name not in TASK_DATASETS[task]:
        raise SmartTrimError(f"dataset {name!r} does not fit a {task} model, which answers in words (it trains on "
                             f"{', '.join(TASK_DATASETS[task])} or scenes: questions with answers, or prompts "
                             "answered by the model itself with --set targets=self)")
    if new_head:
        raise SmartTrimError(f"--new-head: a {task} model has no classifier head to replace (it answers in words)")
    if cfg.feature_weight > 0:
        raise SmartTrimError(f"feature_weight: a {task} model has no pooled feature to distil; use distill_weight")
    tr_split, va_split = DEFAULT_SPLITS[name]
    tr_split, va_split = cfg.train_split or tr_split, cfg.val_split or va_split
    pre = loaded.image_preprocessor()
    size = loaded.model.config.image_size
    # no classifier: a stub answer vocabulary spares the VQAv2 reader building one from annotations (which
    # unannotated questions, e.g. a test split trained on with targets=self, do not have)
    l2i = ["yes", "no"] if name == "vqa" else None
    kw = dict(label2id=l2i, skip_bad=cfg.skip_bad, preprocess=pre)
    train = open_dataset(name, cfg.data_dir, tr_split, size, limit=cfg.limit, **kw)
    vl = cfg.val_limit if cfg.val_limit is not None else cfg.limit
    val = open_dataset(name, cfg.data_dir, va_split, size, limit=vl, **kw)
    if not len(train):
        raise SmartTrimError(f"{name} {tr_split}: no training inputs"
                             + (f" ({train.skipped_summary()})" if train.skipped_summary() else ""))
    items = getattr(train, "_items", None)
    if cfg.targets == "data" and name == "prompts" and items and any(not it[3] for it in items):
        n = sum(not it[3] for it in items)
        raise SmartTrimError(f"{train.path}: {n} of {len(items)} prompts have no answer to train on; pass --set "
                             "targets=self to train on the full model's own answers")
    return name, train, val, None
