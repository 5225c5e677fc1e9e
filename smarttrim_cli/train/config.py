"""Training settings: defaults < recipe ``train:`` section < command-line options (``--set key=value``
reaches every key). Stored in the training state and in the output's config.json."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import yaml

from ..errors import SmartTrimError
from ..recipes import bundled_recipe_dir, load_recipe


@dataclass
class TrainConfig:
    # data
    dataset: str | None = None          # vqa | nlvr2 | snli | easyvqa (default: from the model's task)
    data_dir: str | None = None
    train_split: str | None = None      # default per dataset (train)
    val_split: str | None = None        # default per dataset (val / dev / test for easy-VQA)
    limit: int | None = None            # at most this many training inputs
    val_limit: int | None = None        # at most this many validation inputs (default: limit)
    skip_bad: bool = False
    workers: int = 2
    targets: str = "data"               # text tasks: data (the items' answers) | self (label-free: the full model's
                                        # own greedy answers, generated before training, kept in the state dir)
    max_new_tokens: int = 16            # text tasks: answer length cap of self targets and validation generation
    # schedule
    epochs: int = 10
    max_steps: int | None = None        # stop after this many optimizer steps (overrides epochs)
    batch_size: int = 32                # GLOBAL batch per optimizer step (all ranks, all accumulation steps)
    grad_accum: int = 1
    eval_batch_size: int | None = None  # per rank; default = the per-rank micro-batch
    # optimizer (METER: AdamW, linear warm-up then linear decay, lr multipliers)
    lr: float = 1e-5                    # uni-modal encoders
    lr_mult_cross_modal: float = 5.0    # cross-modal encoder (METER's lr_mult_cross_modal)
    lr_mult_head: float = 10.0          # task head (METER's lr_mult_head)
    lr_mult_trimmer: float = 50.0       # token and head trimmers
    lr_mult_lora: float = 10.0          # LoRA adapters (lora_rank > 0): LoRA wants a larger step than full tuning
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.98)
    eps: float = 1e-8
    warmup: float = 0.1                 # fraction of steps (< 1) or steps (>= 1)
    end_lr_factor: float = 0.0
    decay_power: float = 1.0
    grad_clip: float = 1.0              # max global grad norm; 0 = off
    amp: str = "auto"                   # auto (CUDA: bf16 if supported, else fp16) | bf16 | fp16 | off
    train_backbone: bool = True         # False: only the trimmers learn (and LoRA adapters, lora_rank > 0)
    lora_rank: int = 0                  # > 0: LoRA adapters of this rank on the language model's lora_targets
                                        # (families that declare one: LLaVA), which learn with the trimmers while
                                        # every other weight stays frozen (needs train_backbone false); 0 = off
    lora_alpha: float = 16.0            # the adapters' scale is lora_alpha / lora_rank
    lora_dropout: float = 0.0           # dropout on the adapters' input
    lora_targets: str = "q_proj,v_proj"  # comma-separated names of the linears to adapt, in every decoder layer
    # SmartTrim objective
    trim: bool = True                   # False = plain fine-tune (--no-trim): full mode, task loss only
    target_ratio: float = 0.5           # final FLOPs ratio (trimmed / full)
    curriculum: float = 0.5             # fraction of training over which the target falls from 1.0
    curriculum_hold: float = 0.0        # fraction at 1.0 before it starts falling
    curriculum_shape: str = "linear"    # linear | cosine
    tau_start: float = 1.0              # Gumbel temperature, annealed geometrically ...
    tau_end: float = 0.5                # ... to this
    tau_frac: float = 1.0               # ... over this fraction of training
    noise_start: float = 1.0            # scale of the Gumbel (logistic) noise of the keep samples, annealed
    noise_end: float = 0.3              # linearly to this (0: training takes the decisions inference takes;
    noise_frac: float = 0.75            # a little noise keeps the budget gradient alive), at this fraction
    distill_weight: float = 1.0         # alpha (0: no distillation, and no teacher pass at all)
    distill_schedule: str = "constant"  # constant | fade: alpha goes from distill_weight to distill_weight_end
    distill_weight_end: float = 0.0     # as the curriculum's target falls (same hold, span and shape), then holds
    teacher: str = "self"               # self: the full-capacity pass of the current weights (the paper's);
                                        # start: a frozen copy of the starting weights (not moved by training)
    teacher_task_weight: float = 0.0    # teacher self only: + this x the task loss of the full-capacity pass, with
                                        # gradients through it, so the teacher learns the task with the student
                                        # (its logits stay detached as distillation targets)
    distill_temperature: float = 1.0
    feature_weight: float = 0.0         # MSE between the pooled last-layer [CLS] features (trimmed vs full): the
                                        # head's input, i.e. last-hidden-state distillation next to the logits
    cost_weight: float = 20.0           # lambda of (mean_b R_b - R_t)^2
    dual_lr: float = 2.0                # Lagrangian step for nu (0 = off)
    nu_max: float = 20.0
    spread_weight: float = 0.5          # mu of var_b(R_b): keeps a few inputs from taking the budget
    floor_weight: float = 0.0           # per-position floor: weight of sum_p relu(R_t - mean_b keep_p)^2, so that
                                        # no token trimmer drops, on batch average, a larger share of its live
                                        # tokens than the target (0 = off; see losses.floor_loss)
    tolerance: float = 0.05             # an epoch counts as "at the target" if its ratio <= target + this
    calibrate: bool = True              # at the end, raise the keep threshold if validation misses the target
    calibrate_tolerance: float = 0.03   # ... by more than this share of it (0.03: 0.33 -> 0.34)
    calibrate_limit: int = 2000         # validation inputs used for that (bisection, ~12 passes)
    # bookkeeping
    seed: int = 0
    save_every: int = 200               # checkpoint every N optimizer steps (and at each epoch end)
    log_every: int = 10                 # JSON-lines log every N optimizer steps
    eval_before: bool = True            # validate the starting model (full capacity) first

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    def update(self, values: dict, source: str):
        known = {f.name: f for f in fields(self)}
        for k, v in values.items():
            key = k.replace("-", "_")
            if key not in known:
                raise SmartTrimError(f"{source}: unknown training setting {k!r} (known: {', '.join(sorted(known))})")
            setattr(self, key, _coerce(key, v, getattr(TrainConfig(), key), source))
        return self

    def check(self):
        if self.batch_size < 1 or self.grad_accum < 1:
            raise SmartTrimError(f"batch size ({self.batch_size}) and --grad-accum ({self.grad_accum}) must be >= 1")
        if self.trim and not 0.0 < self.target_ratio <= 1.0:
            raise SmartTrimError(f"--target-ratio must be in (0, 1], got {self.target_ratio}")
        if self.epochs < 1 and not self.max_steps:
            raise SmartTrimError("--epochs must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise SmartTrimError(f"--max-steps must be >= 1, got {self.max_steps}")
        if self.lr <= 0:
            raise SmartTrimError(f"--lr must be positive, got {self.lr}")
        if self.tau_start <= 0 or self.tau_end <= 0:
            raise SmartTrimError("Gumbel temperatures must be positive")
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise SmartTrimError(f"amp must be auto, bf16, fp16 or off, got {self.amp!r}")
        if self.curriculum_shape not in ("linear", "cosine"):
            raise SmartTrimError(f"curriculum_shape must be linear or cosine, got {self.curriculum_shape!r}")
        if self.teacher not in ("self", "start"):
            raise SmartTrimError(f"teacher must be self or start, got {self.teacher!r}")
        for k in ("distill_weight", "distill_weight_end", "teacher_task_weight", "feature_weight"):
            if getattr(self, k) < 0:
                raise SmartTrimError(f"{k} must be >= 0, got {getattr(self, k)}")
        if self.distill_temperature <= 0:
            raise SmartTrimError(f"distill_temperature must be positive, got {self.distill_temperature}")
        if self.distill_schedule not in ("constant", "fade"):
            raise SmartTrimError(f"distill_schedule must be constant or fade, got {self.distill_schedule!r}")
        if self.distill_schedule == "constant" and self.distill_weight_end != 0:
            raise SmartTrimError(f"distill_weight_end={self.distill_weight_end} needs distill_schedule=fade "
                                 "(constant keeps distill_weight throughout)")
        if self.targets not in ("data", "self"):
            raise SmartTrimError(f"targets must be data or self, got {self.targets!r}")
        if self.max_new_tokens < 1:
            raise SmartTrimError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        self.check_lora()
        if self.teacher_task_weight > 0 and self.teacher != "self":
            raise SmartTrimError(f"teacher_task_weight trains the teacher, so it needs teacher=self "
                                 f"(teacher={self.teacher} is frozen)")
        return self

    def check_lora(self):
        if self.lora_rank < 0:
            raise SmartTrimError(f"lora_rank must be >= 0 (0 = off), got {self.lora_rank}")
        if not self.lora_rank:
            return
        if self.lora_alpha <= 0:
            raise SmartTrimError(f"lora_alpha must be positive, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise SmartTrimError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not isinstance(self.lora_targets, str) or not any(t.strip() for t in self.lora_targets.split(",")):
            raise SmartTrimError(f"lora_targets must name linear layers, e.g. q_proj,v_proj; got {self.lora_targets!r}")
        if self.train_backbone:
            raise SmartTrimError(f"lora_rank={self.lora_rank} adapts a frozen language model, but train_backbone is "
                                 "true (full fine-tuning); set train_backbone=false, or lora_rank=0")


def _coerce(key, value, default, source):
    if value is None:
        return None
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            return bool(value)
        if isinstance(default, tuple):
            if isinstance(value, str):
                value = yaml.safe_load(value)
            return tuple(float(x) for x in value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if key == "lora_targets" and isinstance(value, (list, tuple)):  # a YAML list in a recipe
            return ",".join(str(v) for v in value)
        if default is None and isinstance(value, str):  # optional fields: int/str
            if key in ("max_steps", "limit", "val_limit", "eval_batch_size"):
                return int(value)
        return value
    except (TypeError, ValueError):
        raise SmartTrimError(f"{source}: bad value {value!r} for {key}") from None


def parse_sets(items: list[str] | None) -> dict:
    """``--set key=value`` (YAML scalars) -> dict."""
    out = {}
    for it in items or []:
        if "=" not in it:
            raise SmartTrimError(f"--set: expected KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v)
        except yaml.YAMLError:
            out[k.strip()] = v
    return out


def default_recipe(dataset: str | None, task: str, family: str = "meter"):
    """The bundled recipe for a dataset / task, or None when none is bundled for it."""
    recipes = bundled_recipe_dir()
    # a family-wide recipe (llava.yaml) first: the dataset recipes (easyvqa.yaml) are other families' settings
    names = [f"{family}.yaml"] + ([f"{dataset}.yaml"] if dataset == "easyvqa" else []) + [
        f"{family}-{dataset or task}.yaml", f"{family}-{task}.yaml"]
    for n in names:
        if (recipes / n).is_file():
            return recipes / n
    return None


# TrainConfig fields a --no-trim run does not read (benchmarks/pareto.py routes --set keys by it)
TRIM_ONLY = frozenset({"target_ratio", "curriculum", "curriculum_hold", "curriculum_shape", "tau_start", "tau_end",
                       "tau_frac", "noise_start", "noise_end", "noise_frac", "distill_weight", "distill_temperature",
                       "teacher", "teacher_task_weight", "distill_schedule", "distill_weight_end", "feature_weight",
                       "cost_weight", "dual_lr", "nu_max", "spread_weight", "floor_weight",
                       "tolerance", "calibrate", "calibrate_tolerance", "calibrate_limit", "lr_mult_trimmer"})
# ... and fields that change how a run is logged, not what it learns
BOOKKEEPING = frozenset({"workers", "save_every", "log_every"})
# fields added after run_settings keys were first cached (demo, pareto), with their defaults: left out of a run's
# settings while at the default, so a run that does not use them keeps the key (and the cached model) it had
LATER_DEFAULTS = {"teacher_task_weight": 0.0, "distill_schedule": "constant", "distill_weight_end": 0.0,
                  "targets": "data", "max_new_tokens": 16, "lora_rank": 0, "lora_alpha": 16.0, "lora_dropout": 0.0,
                  "lora_targets": "q_proj,v_proj", "lr_mult_lora": 10.0}


def run_settings(recipe=None, overrides: dict | None = None, **kw) -> dict:
    """The settings a run with ``recipe`` and ``overrides`` trains with (build_config's), less bookkeeping and,
    for a --no-trim run, less what it does not read: a cache key that changes when the recipe file does."""
    cfg, _ = build_config(recipe, overrides, **kw)
    drop = BOOKKEEPING | (frozenset() if cfg.trim else TRIM_ONLY)
    return {k: v for k, v in cfg.to_dict().items()
            if k not in drop and not (k in LATER_DEFAULTS and v == LATER_DEFAULTS[k])}


def build_config(recipe=None, overrides: dict | None = None, task: str = "vqa", family: str = "meter",
                 dataset: str | None = None) -> tuple[TrainConfig, dict | None]:
    """-> (config, recipe dict or None). ``overrides`` are command-line values (None = not given)."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    cfg = TrainConfig()
    # recipe=None: the bundled recipe for the dataset/task; recipe=False: built-in defaults only
    path = None if recipe is False else (recipe or default_recipe(dataset or overrides.get("dataset"), task, family))
    rec = load_recipe(path) if path else None
    if rec is not None:
        train = dict(rec.get("train") or {})
        if not isinstance(rec.get("train") or {}, dict):
            raise SmartTrimError(f"{rec['_path']}: `train:` must be a mapping")
        plain = train.pop("no_trim", None) or {}  # settings for --no-trim runs (e.g. training a base model)
        if not isinstance(plain, dict):
            raise SmartTrimError(f"{rec['_path']}: `train: no_trim:` must be a mapping")
        cfg.update(train, f"{rec['_path']} train:")
        trim = overrides.get("trim", cfg.trim)
        if isinstance(trim, str):
            trim = _coerce("trim", trim, True, "command line")
        if not trim:
            cfg.update(plain, f"{rec['_path']} train: no_trim:")
    cfg.update(overrides, "command line")
    return cfg.check(), rec
