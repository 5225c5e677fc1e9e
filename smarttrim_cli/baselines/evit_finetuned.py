"""Fixed-ratio EViT whose backbone is fine-tuned with SmartTrim's objective: the strongest baseline we know of.

Rule (inference and training): the ``evit`` baseline's (evit.py) — at each pruning position (the model's
token-trimmer positions) keep the ceil(r * n) live tokens that the [CLS] token attends to most (the
attention of the layer about to run, averaged over heads), with one keep ratio r for every input and
every position. Nothing is learned about *which* tokens to keep: EViT ranks by [CLS] attention, not by
a scorer, so the learned trimmers are not used at all.

Training (``EViTRule``, a decision rule of SmartTrim's training loop, train/loop.py): the backbone is
fine-tuned by the same loop and with the same self-distillation objective as SmartTrim — task loss on the
pruned pass + ``distill_weight`` x distill(pruned || full pass, no gradient) — for the same number of
optimizer steps, on the same data in the same order (same seed and sampler), with the same batch size,
optimizer (AdamW, the recipe's learning rates and multipliers), warm-up/decay schedule, gradient clipping,
AMP, DDP and exact resume, built from the same recipe and overrides as the SmartTrim run
(train/config.py). There is no budget term (the ratio is fixed by construction). The keep ratio follows
SmartTrim's curriculum shape: it falls from 1.0 to r over the same fraction of training (EViT's own
keep-rate warm-up does the same), then holds. During training the rule runs in soft mode (dropped tokens
masked out of attention, shapes fixed), which equals the hard-mode gather given the same decisions
(invariant 3). Model selection mirrors SmartTrim's: validation (hard mode, the rule at r) after each
epoch, the best score among epochs after the curriculum has ended is kept.

Not in the paper's recipe: inattentive-token fusion (``evit-fusion`` stays a training-free baseline; a
model whose trimmers fuse, TrimConfig.fuse, trains and runs the rule with that fusion), and r chosen by
calibration to a mean GMACs ratio on the starting model (``keep_ratio_for``).

    from smarttrim_cli.baselines.evit_finetuned import EViTFinetuned, EViTRule, keep_ratio_for
    from smarttrim_cli.train.loop import finetune
    r = keep_ratio_for(base_model, batches, 0.33)
    res = finetune("base", "evit-ft", recipe="easyvqa.yaml", overrides={...}, rule=EViTRule(r))
    bl = EViTFinetuned.from_dir("evit-ft")          # an EViT baseline at the trained ratio
    applied = bl.apply(res.model); logits, ctx = applied.run(batch, record=True)
"""
from __future__ import annotations

from ..errors import SmartTrimError
from ..train.rules import FixedRatio
from .common import token_positions
from .evit import EViT, EViTPolicy

CONFIG_KEY = "evit_finetuned"


class EViTFinetuned(EViT):
    """The EViT rule at the keep ratio (and positions) an ``EViTRule`` fine-tune trained with; apply it to
    the model that run wrote. ``calibrate`` (inherited) re-tunes the ratio to a GMACs target."""

    name = "evit-finetuned"
    kind = "token"

    def __init__(self, keep_ratio: float = 0.5, layers=None, guide: str = "cls", model_dir=None, merge: bool = False):
        # merge: trained with the model's token fusion (TrimConfig.fuse)
        super().__init__(keep_ratio, layers, guide, fuse=False, merge=merge)
        self.name = "evit-finetuned"
        self.model_dir = None if model_dir is None else str(model_dir)

    def params(self) -> dict:
        return {**super().params(), "model_dir": self.model_dir}

    @classmethod
    def from_dir(cls, model_dir) -> "EViTFinetuned":
        from ..model_dir import read_config

        cfg = read_config(model_dir).get(CONFIG_KEY)
        if not cfg:
            raise SmartTrimError(f"{model_dir}/config.json: no `{CONFIG_KEY}` section (not written by an EViTRule fine-tune)")
        return cls(cfg["keep_ratio"], cfg.get("layers"), cfg.get("guide", "cls"), model_dir, bool(cfg.get("merge")))


def keep_ratio_for(model, batches, target_macs_ratio: float, tol: float = 0.01) -> float:
    """The EViT keep ratio whose mean GMACs ratio over ``batches`` is ``target_macs_ratio`` (bisection), with
    the token fusion ``EViTRule`` will train with when the model fuses (the fused tokens cost too)."""
    bl = EViT(merge=bool(getattr(model.trim_config, "fuse", False)))
    bl.calibrate(model, list(batches), target_macs_ratio, tol=tol, strict=False)
    return bl.keep_ratio


class EViTRule(FixedRatio):
    """The fixed-ratio EViT decision rule for ``train.loop.finetune(..., rule=EViTRule(r))``: at the model's token-
    trimmer positions (or ``layers``) keep the ceil(r * n) live tokens the ``guide`` attends to most, with the
    model's token fusion when its trimmers fuse. The learned trimmers are frozen and unused."""

    name = "evit-finetuned"
    names, merge = None, False  # set by bind, from the model

    def __init__(self, keep_ratio: float, guide: str = "cls", layers=None):
        super().__init__(keep_ratio)
        self.guide, self.layers = guide, layers

    def bind(self, model, cfg, total, all_reduce=None):
        super().bind(model, cfg, total, all_reduce)
        self.names = token_positions(model, self.layers)
        self.merge = bool(getattr(model.trim_config, "fuse", False))  # a model with token fusion: the rule fuses too

    def policy(self, ratio):
        return EViTPolicy(self.names, ratio, self.guide, merge=self.merge)

    def params(self):
        return {**super().params(), "guide": self.guide, "layers": self.names, "merge": self.merge}

    def model_sections(self, summary):
        return {CONFIG_KEY: {"keep_ratio": self.keep_ratio, "layers": self.names, "guide": self.guide,
                             "merge": self.merge, "steps": summary["steps"], "selected": summary["selected"]}}

    def title(self, dataset):
        return f"EViT (fixed keep ratio {self.keep_ratio:.3f}) + self-distillation, {dataset}"
