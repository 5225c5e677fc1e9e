"""Backbone families: the registry, and how a source checkpoint finds its family.

Each family module (meter.py, blip.py, vilt.py, llava.py) declares in one place what the project asks of a
backbone, as a ``Family`` (base.py) named ``FAMILY``:

- ``name``, ``style`` ("ported": the original layers rebuilt on the core, trimmed inside; "wrapped":
  the transformers model kept as it is, trimmed at its boundaries through hooks);
- the checkpoints it reads: ``reads_file`` (single files, ``file_formats`` in words),
  ``hf_model_type`` / ``hf_architectures`` (transformers directories -> task; hf_dir.HFFamily holds
  what such families share), and ``load``, which returns a ``Loaded``: the model, its tokenizer
  (``load_tokenizer``: local files only), labels, ``preprocess`` dict (smarttrim_cli/preprocess.py)
  and provenance;
- ``tasks``: each task head and the kind of output it gives (base.OUTPUT_KINDS);
- ``default_trim_config`` (where trimmers go by default), ``default_preprocess`` (for a model built
  in code), ``build`` (a model from the config of a model directory), ``dummy_batch`` / ``image_tokens``
  (the inputs attach measures the full model's cost on, and how many image tokens it reports);
- through ``Model``: ``streams`` (StreamSpec per stream: layers, widths, heads, where trimmers may go,
  which stream reads which), ``attention_weights`` (how baselines score tokens by attention),
  ``at_resolution`` (the model at another input size), ``new_head``, ``input_names``.

attach, finetune, profile, export, the baselines and the demo ask these; none compares a family's
name. A new family is its module, its recipes, its test parameters and one line below.
"""
from __future__ import annotations

import importlib
from pathlib import Path

from ..errors import SmartTrimError

# name -> module holding FAMILY (imported on first use)
FAMILIES = {
    "meter": "smarttrim_cli.backbones.meter",
    "vilt": "smarttrim_cli.backbones.vilt",
    "blip": "smarttrim_cli.backbones.blip",
    "llava": "smarttrim_cli.backbones.llava",
}


def family(name: str):
    """The ``Family`` registered as ``name``."""
    if name not in FAMILIES:
        raise SmartTrimError(f"unknown backbone family {name!r} (supported: {', '.join(FAMILIES)})")
    return importlib.import_module(FAMILIES[name]).FAMILY


def family_of(model):
    """The ``Family`` of a model built by one."""
    return family(model.family)


def all_families() -> list:
    return [family(n) for n in FAMILIES]


def build(name: str, backbone_config: dict, trim_config: dict | None):
    """Rebuild a model (random weights) from the config stored in a model directory."""
    return family(name).build(backbone_config, trim_config)


# ----- which family reads a source --------------------------------------------------------------------
def hf_architectures() -> dict:
    """transformers architecture -> (family, task), over every family."""
    return {a: (f, t) for f in all_families() for a, t in f.hf_architectures.items()}


def detect_hf_architecture(path: Path, hf: dict, task=None) -> str:
    """The supported architecture of a HF directory: ``architectures`` in config.json, else
    ``model_type`` (+ --task). Anything else is a one-line error listing what is supported."""
    archs_all = hf_architectures()
    supported = ", ".join(archs_all)
    archs = [a for a in (hf.get("architectures") or []) if isinstance(a, str)]
    mtype = hf.get("model_type")
    if archs:
        arch = next((a for a in archs if a in archs_all), None)
        if arch is None:
            raise SmartTrimError(f"{path / 'config.json'}: unsupported architecture {archs[0]} (model_type {mtype!r}); "
                                 f"supported: {supported}")
    else:
        want = task if task not in (None, "auto") else None
        fams = [f for f in all_families() if f.hf_model_type is not None and f.hf_model_type == mtype]
        cands = [a for f in fams for a, t in f.hf_architectures.items() if want is None or t == want]
        arch = cands[0] if len(cands) == 1 else None
        if arch is None:
            tasks = list(dict.fromkeys(t for f in fams for t in f.hf_architectures.values()))
            hint = f" (pass {' or '.join('--task ' + t for t in tasks)})" if want is None and len(cands) > 1 else ""
            raise SmartTrimError(f"{path}: config.json names no supported architecture (model_type {mtype!r}){hint}; "
                                 f"supported: {supported}")
    fam_task = archs_all[arch][1]
    if task not in (None, "auto") and fam_task != task:
        raise SmartTrimError(f"{path}: --task {task} does not match the directory's {arch} (task {fam_task})")
    return arch


def for_source(path: Path, task=None):
    """-> (Family, hf_config or None) of a checkpoint file or a transformers directory."""
    from .hf_dir import read_hf_config

    path = Path(path)
    if not path.exists():
        raise SmartTrimError(f"{path}: no such file")
    if path.is_dir():
        if not (path / "config.json").is_file():
            files = " or ".join(d for f in all_families() for d in f.file_formats)
            raise SmartTrimError(f"{path}: is a directory without config.json; expected {files + ' or ' if files else ''}"
                                 f"a Hugging Face model directory ({', '.join(hf_architectures())})")
        hf = read_hf_config(path)
        arch = detect_hf_architecture(path, hf, task)
        if not hf.get("architectures"):
            hf = {**hf, "architectures": [arch]}
        return hf_architectures()[arch][0], hf
    for f in all_families():
        if f.reads_file(path):
            return f, None
    raise SmartTrimError(f"{path}: no backbone family reads this file (expected "
                         f"{' or '.join(d for f in all_families() for d in f.file_formats)})")
