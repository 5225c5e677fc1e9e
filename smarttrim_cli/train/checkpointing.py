"""Training state on disk: ``<output>.state/`` beside the output model directory.

    last.pt            model, optimizer, scheduler, grad scaler, the decision rule's state (SmartTrim: the
                       budget's dual variable) and settings, step, history, sampler position (derived from
                       the step) and every rank's RNG states
    best.safetensors   weights of the best validation so far (+ best.json: which epoch and why)
    log.jsonl          the JSON-lines training log (rewritten from last.pt's history on resume)

Every file is written atomically (temporary file + rename), so a crash or pre-emption at any moment
leaves the previous checkpoint intact. ``last.pt`` holds only tensors and plain Python values and is
read back with ``torch.load(weights_only=True)``: no arbitrary unpickling.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_path
from ..errors import SmartTrimError

STATE_FORMAT = "smarttrim-train-state"


def state_dir_for(output: Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".state")


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": [s for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": {"kind": str(np_state[0]), "keys": torch.from_numpy(np.asarray(np_state[1]).astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
    }


def set_rng_state(s: dict):
    torch.set_rng_state(s["torch"])
    if s.get("cuda") and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])
    py = s["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = s["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))


def save_state(path: Path, state: dict):
    state = {"format": STATE_FORMAT, "version": 1, **state}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SmartTrimError(f"{path}: no training checkpoint to resume") from None
    except Exception as e:  # torch raises many types for a truncated or foreign file
        raise SmartTrimError(f"{path}: cannot read training checkpoint ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:160]})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise SmartTrimError(f"{path}: not a smarttrim training checkpoint")
    return state


def save_best(state_dir: Path, model, info: dict):
    from safetensors.torch import save_file

    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(state_dir / "best.safetensors") as tmp:
        save_file(weights, str(tmp), metadata={"format": "pt"})
    write_json(state_dir / "best.json", info)


def load_best(state_dir: Path) -> dict | None:
    from safetensors.torch import load_file

    p = state_dir / "best.safetensors"
    return load_file(str(p)) if p.is_file() else None


def write_json(path: Path, obj):
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def write_jsonl(path: Path, rows: list[dict]):
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))


def append_jsonl(path: Path, row: dict):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
