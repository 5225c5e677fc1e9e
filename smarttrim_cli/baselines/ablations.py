"""SmartTrim ablations: training runs, not inference rules. Each maps to `smarttrim finetune` training
settings (train/config.py ``TrainConfig`` keys, reachable with ``--set key=value``); train it with the
same recipe and ``--target-ratio`` as the full method, then profile the resulting model directory as
any SmartTrim model.

- ``smarttrim-no-distill``: ``distill_weight=0`` (no self-distillation from the full-capacity pass:
  task loss + cost loss only);
- ``smarttrim-no-curriculum``: ``curriculum=0`` (the target ratio is the final one from the first
  step instead of falling from 1.0).
"""
from __future__ import annotations

from ..errors import SmartTrimError
from .common import Baseline


class TrainingAblation(Baseline):
    kind = "training"

    def __init__(self, name: str, flags: dict, description: str):
        super().__init__()
        self.name, self.flags, self.description = name, dict(flags), description

    def params(self) -> dict:
        return {"training_flags": self.flags}

    def finetune_args(self) -> list[str]:
        """Extra `smarttrim finetune` arguments that select this ablation."""
        return [a for k, v in self.flags.items() for a in ("--set", f"{k}={v}")]

    def _training(self, what):
        raise SmartTrimError(f"{self.name} is a training run, not an inference rule: train it with "
                             f"`smarttrim finetune ... {' '.join(self.finetune_args())}` and profile the model "
                             f"it writes ({what} is not available)")

    def apply(self, model):
        self._training("apply")

    def calibrate(self, model, batches, target_macs_ratio, **kw):
        self._training("calibrate")


def no_distill() -> TrainingAblation:
    return TrainingAblation("smarttrim-no-distill", {"distill_weight": 0.0},
                            "SmartTrim trained without self-distillation (distill_weight=0)")


def no_curriculum() -> TrainingAblation:
    return TrainingAblation("smarttrim-no-curriculum", {"curriculum": 0.0},
                            "SmartTrim trained without the ratio curriculum (curriculum=0)")
