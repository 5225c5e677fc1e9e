"""LoRA (Hu et al., 2021) of our own: ``y = W x + b + (alpha / r) * B A x`` on chosen ``nn.Linear`` layers.

B starts at zero, so a wrapped model is bit-identical to the one it wraps until training moves B (adding an exact
0 changes no float). The adapters are fp32 whatever the layer's dtype: Adam's small updates round away in bf16.
A wrapped layer keeps its own weight as ``<name>.base.weight``; ``merged`` swaps in plain ``nn.Linear`` layers with
``W + (alpha / r) B A`` for the time of a save, so a written model directory holds the family's own weight names.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn

from ..errors import SmartTrimError


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.base, self.rank, self.scaling = base, rank, alpha / rank
        dev = base.weight.device
        a = torch.empty(rank, base.in_features)
        # A as nn.Linear's default init (kaiming-uniform, a=sqrt(5)); a seeded generator keeps the global RNG as it was
        bound = 1.0 / math.sqrt(base.in_features)
        a.uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a.to(dev))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.is_merged = False

    def delta(self) -> torch.Tensor:
        """(out, in) fp32: what the adapter adds to the weight."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x):
        y = self.base(x)
        if self.is_merged:
            return y
        h = self.dropout(x).to(self.lora_A.dtype)
        return y + ((h @ self.lora_A.t()) @ self.lora_B.t() * self.scaling).to(y.dtype)

    @torch.no_grad()
    def merge(self):
        """Fold the adapter into the base weight (in place; ``unmerge`` takes it out, up to rounding)."""
        if not self.is_merged:
            self.base.weight += self.delta().to(self.base.weight.dtype)
            self.is_merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.is_merged:
            self.base.weight -= self.delta().to(self.base.weight.dtype)
            self.is_merged = False

    def merged_linear(self) -> nn.Linear:
        """A new plain layer with the adapted weight (this one is left as it is)."""
        # skip_init: no random init of a weight about to be overwritten (a 7B model's layers are large)
        lin = nn.utils.skip_init(nn.Linear, self.base.in_features, self.base.out_features,
                                 bias=self.base.bias is not None, device=self.base.weight.device,
                                 dtype=self.base.weight.dtype)
        with torch.no_grad():
            w = self.base.weight if self.is_merged else self.base.weight + self.delta().to(self.base.weight.dtype)
            lin.weight.copy_(w)
            if self.base.bias is not None:
                lin.bias.copy_(self.base.bias)
        return lin.requires_grad_(False)


def parse_targets(targets) -> list[str]:
    """``"q_proj,v_proj"`` (or a list) -> the attribute names of the linears to wrap."""
    if isinstance(targets, str):
        targets = targets.split(",")
    return [t.strip() for t in targets if str(t).strip()]


def _linears(module: nn.Module):
    """(parent, attribute name, layer) of every nn.Linear under ``module`` (not inside a LoRALinear)."""
    out = []
    for _, parent in module.named_modules():
        if isinstance(parent, LoRALinear):
            continue
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                out.append((parent, name, child))
    return out


def apply_lora(module: nn.Module, targets, rank: int, alpha: float, dropout: float = 0.0, seed: int = 0,
               where: str = "the language model") -> list[LoRALinear]:
    """Wrap every ``nn.Linear`` of ``module`` whose attribute name is in ``targets`` (in module order); every
    parameter of ``module`` is frozen, the adapters train. -> the wrappers."""
    names = parse_targets(targets)
    found = _linears(module)
    hits = [(p, n, lin) for p, n, lin in found if n in names]
    missing = sorted(set(names) - {n for _, n, _ in hits})
    if missing:
        have = sorted({n for _, n, _ in found})
        raise SmartTrimError(f"lora_targets: {', '.join(missing)} name(s) no linear layer of {where} "
                             f"(its linears: {', '.join(have)})")
    module.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    wrapped = []
    for parent, name, lin in hits:
        w = LoRALinear(lin, rank, alpha, dropout, generator=g)
        setattr(parent, name, w)
        wrapped.append(w)
    return wrapped


def lora_layers(model: nn.Module) -> list[tuple[nn.Module, str, LoRALinear]]:
    return [(p, n, c) for _, p in model.named_modules() for n, c in p.named_children() if isinstance(c, LoRALinear)]


@contextlib.contextmanager
def merged(model: nn.Module):
    """Inside: every LoRALinear of ``model`` replaced by a plain nn.Linear with the adapted weight (the model's
    state dict then has the unwrapped model's keys: what a model directory stores); after: the wrappers are back,
    unchanged. No-op without LoRA."""
    layers = lora_layers(model)
    for parent, name, w in layers:
        setattr(parent, name, w.merged_linear())
    try:
        yield model
    finally:
        for parent, name, w in layers:
            setattr(parent, name, w)
