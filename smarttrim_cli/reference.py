"""The model a trimmed model is measured against: the one the user brought.

``finetune`` (and the backbone with it) moves the weights, so the fine-tuned weights run at full capacity are
not what the user had: a gate on "trimmed vs the same weights untrimmed" hides what the fine-tune itself cost.
Every directory written from another one therefore records

- ``provenance.lineage``: the directories it was derived from, nearest first ({path, sha256 of
  model.safetensors, made_by}), back to what ``attach`` wrote (whose own provenance names the user's file);
- ``reference`` (top-level config key), only when it was trained *with* trimming (SmartTrim, the fine-tuned
  EViT rule): the nearest ancestor that was not — the directory ``attach`` wrote, or a plain fine-tune of it —
  as {path, sha256, backbone, task, labels_sha256}. A directory without one (attach output, a plain fine-tune, a
  copy with re-placed trimmers) is its own reference.

It is a reference by path and hash, not a copy: it costs about 300 bytes of config.json, not a second set of
weights; a moved original is found again with ``profile --reference DIR`` (its hash must match), a deleted one
can only be replaced knowingly with ``--reference self``.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import SmartTrimError

SELF = "self"


def weights_sha256(model_dir) -> str:
    from .model_dir import sha256

    return sha256(Path(model_dir) / "model.safetensors")


def labels_sha256(labels) -> str | None:
    return None if labels is None else hashlib.sha256(json.dumps(list(labels)).encode()).hexdigest()


def _made_by(cfg: dict) -> str:
    prov = cfg.get("provenance") or {}
    return prov.get("made_by") or (f"finetune ({prov['finetune_mode']})" if prov.get("finetune_mode") else "attach")


def derived_config(src, src_cfg: dict, made_by: str, trains_trimming: bool, labels=None) -> dict:
    """The config.json entries of a directory derived from ``src`` (its config ``src_cfg``): ``provenance``
    additions (made_by, lineage) and ``reference``. ``labels``: the derived model's, when a new head changed
    them (then no ancestor can score its outputs and it has no reference). Hashes ``src``'s weights (seconds
    for a METER-sized file)."""
    src = Path(src).resolve()
    digest = weights_sha256(src)
    parent = {"path": str(src), "sha256": digest, "made_by": _made_by(src_cfg)}
    lineage = [parent] + list((src_cfg.get("provenance") or {}).get("lineage") or [])
    ref = None
    new_head = labels is not None and labels_sha256(labels) != labels_sha256(src_cfg.get("labels"))
    if trains_trimming and not new_head:
        ref = src_cfg.get("reference") or {"path": str(src), "sha256": digest, "backbone": src_cfg.get("backbone"),
                                           "task": src_cfg.get("task"), "labels_sha256": labels_sha256(src_cfg.get("labels"))}
    return {"provenance": {"made_by": made_by, "lineage": lineage}, "reference": ref}


def inherited_provenance(src_cfg: dict) -> dict:
    """The source's provenance a derived directory keeps (where the weights first came from), without the
    fields each derivation writes afresh."""
    return {k: v for k, v in (src_cfg.get("provenance") or {}).items() if k not in ("created", "made_by", "lineage")}


@dataclass
class Reference:
    """The resolved reference of a profiled model: ``path`` None means the model's own weights at full capacity."""

    path: Path | None
    source: str       # "recorded" (config.json), "--reference" (given), "self"
    why: str          # one line for the report
    sha256: str | None = None

    @property
    def is_self(self) -> bool:
        return self.path is None

    def to_dict(self) -> dict:
        return {"model_dir": None if self.path is None else str(self.path), "source": self.source,
                "sha256": self.sha256, "why": self.why}


def _compatible(model_dir: Path, cfg: dict, ref_dir: Path, ref_cfg: dict, flag: str):
    """One-line error unless ``ref_dir`` can score the same inputs as ``model_dir`` on the same label set."""
    what = f"{flag} {ref_dir}" if flag else f"the reference model {ref_dir} (recorded in {model_dir}/config.json)"
    for key in ("backbone", "task"):
        if ref_cfg.get(key) != cfg.get(key):
            raise SmartTrimError(f"{what}: {key} {ref_cfg.get(key)!r} does not match {model_dir}'s {cfg.get(key)!r}")
    if labels_sha256(ref_cfg.get("labels")) != labels_sha256(cfg.get("labels")):
        raise SmartTrimError(f"{what}: its labels differ from {model_dir}'s ({len(ref_cfg.get('labels') or [])} vs "
                             f"{len(cfg.get('labels') or [])} answers), so the two cannot be scored against each other")
    a, b = ref_cfg.get("backbone_config") or {}, cfg.get("backbone_config") or {}
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if diff:
        k = diff[0]
        raise SmartTrimError(f"{what}: a different architecture than {model_dir} ({k}: {a.get(k)!r} vs {b.get(k)!r})")
    if (ref_cfg.get("preprocess") or {}) != (cfg.get("preprocess") or {}):
        raise SmartTrimError(f"{what}: its image/text preprocessing differs from {model_dir}'s")


def resolve_reference(model_dir, cfg: dict, given: str | Path | None = None) -> Reference:
    """The model ``model_dir`` (config ``cfg``) is scored against: ``given`` (``--reference``: a directory, or
    "self"), else the one its config.json records, else itself. One-line errors for a missing, changed or
    mismatched reference."""
    from .model_dir import read_config

    model_dir = Path(model_dir)
    rec = cfg.get("reference")
    if given is not None and str(given) == SELF:
        return Reference(None, "--reference", "--reference self: the profiled weights at full capacity")
    if given is not None:
        ref_dir = Path(given)
        ref_cfg = read_config(ref_dir)  # one-line errors for a missing or foreign directory
        if ref_dir.resolve() == model_dir.resolve():
            return Reference(None, "--reference", "--reference names the profiled directory itself")
        digest = weights_sha256(ref_dir) if (ref_dir / "model.safetensors").is_file() else None
        if digest is None:
            raise SmartTrimError(f"--reference {ref_dir}: no model.safetensors")
        if rec and digest != rec.get("sha256"):
            raise SmartTrimError(f"--reference {ref_dir}: its weights (sha256 {digest[:12]}) are not the model "
                                 f"{model_dir} was fine-tuned from (sha256 {str(rec.get('sha256'))[:12]}, recorded "
                                 f"from {rec.get('path')})")
        _compatible(model_dir, cfg, ref_dir, ref_cfg, "--reference")
        return Reference(ref_dir, "--reference", f"--reference {ref_dir}", digest)
    if not rec:
        return Reference(None, SELF, "the directory records no other model (attach output, a plain fine-tune, or "
                                     "written before smarttrim recorded references): its own weights at full capacity")
    ref_dir = Path(rec.get("path") or "")
    hint = "pass --reference DIR if it moved, or --reference self to score against the fine-tuned weights"
    if not (ref_dir / "config.json").is_file() or not (ref_dir / "model.safetensors").is_file():
        raise SmartTrimError(f"{model_dir}/config.json: the model it was fine-tuned from, {ref_dir}, is missing "
                             f"({hint})")
    digest = weights_sha256(ref_dir)
    if digest != rec.get("sha256"):
        raise SmartTrimError(f"{ref_dir}/model.safetensors: changed since {model_dir} was fine-tuned from it "
                             f"(sha256 {digest[:12]}, recorded {str(rec.get('sha256'))[:12]}; {hint})")
    _compatible(model_dir, cfg, ref_dir, read_config(ref_dir), "")
    return Reference(ref_dir, "recorded", f"the model {model_dir.name} was fine-tuned from (recorded in its "
                                          "config.json)", digest)
