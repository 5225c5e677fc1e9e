"""The two learned trimmers of SmartTrim (Wang et al., LREC-COLING 2024), one per chosen layer.

Token trimmer (per stream): keep/drop logits per token from ``MLP([W_x LN(x_i); W_g g; W_c LN(c)])``, with
``g`` the mean of the stream's live tokens and ``c`` the other modality's [CLS]. Head trimmer (per attention
block): one keep logit per head from both modalities' [CLS] states. Both start with a positive bias, so a
fresh attach keeps everything and changes nothing."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _hidden(d: int, reduction: int) -> int:
    return max(8, d // reduction)


class TokenTrimmer(nn.Module):
    """XModal-aware token trimmer: keep logit per token from [W_x x_i ; W_g g ; W_c c].

    g is the masked mean of the tokens still alive in this stream, c the other modality's [CLS]
    state, so what is kept depends on the question as well as on the image.
    """

    def __init__(self, d: int, d_ctx: int, reduction: int = 8, init_keep: float = 3.0):
        super().__init__()
        r = _hidden(d, reduction)
        self.d, self.d_ctx, self.r = d, d_ctx, r
        self.norm_x = nn.LayerNorm(d)
        self.norm_c = nn.LayerNorm(d_ctx)
        self.proj_x = nn.Linear(d, r)
        self.proj_g = nn.Linear(d, r)
        self.proj_c = nn.Linear(d_ctx, r)
        self.fc1 = nn.Linear(3 * r, r)
        self.fc2 = nn.Linear(r, 1)
        # Start by keeping everything: the curriculum begins at full capacity, and noisy masks
        # on a backbone that has not adapted yet only hurt it.
        nn.init.normal_(self.fc2.weight, std=0.02)
        nn.init.constant_(self.fc2.bias, init_keep)

    def forward(self, x: torch.Tensor, alive: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # decide in the trimmer's dtype whatever the stream's (a bf16 vision tower, fp32 trimmers)
        xn = self.norm_x(x.to(self.norm_x.weight.dtype))
        c = c.to(self.norm_c.weight.dtype)
        a = alive.unsqueeze(-1).to(xn.dtype)
        g = (xn * a).sum(1) / a.sum(1).clamp_min(1.0)
        n = x.shape[1]
        z = torch.cat([
            self.proj_x(xn),
            self.proj_g(g).unsqueeze(1).expand(-1, n, -1),
            self.proj_c(self.norm_c(c)).unsqueeze(1).expand(-1, n, -1),
        ], dim=-1)
        return self.fc2(F.gelu(self.fc1(F.gelu(z)))).squeeze(-1)

    def cost_dims(self) -> dict:
        return {"d": self.d, "dc": self.d_ctx, "r": self.r}


class HeadTrimmer(nn.Module):
    """Modal-adaptive head trimmer: keep logit per attention head from both modalities' [CLS]."""

    def __init__(self, d_own: int, d_other: int, n_heads: int, reduction: int = 8, init_keep: float = 3.0):
        super().__init__()
        din = d_own + d_other
        r = _hidden(din // 2, reduction)
        self.din, self.r, self.n_heads = din, r, n_heads
        self.norm = nn.LayerNorm(din)
        self.fc1 = nn.Linear(din, r)
        self.fc2 = nn.Linear(r, n_heads)
        nn.init.normal_(self.fc2.weight, std=0.02)
        nn.init.constant_(self.fc2.bias, init_keep)

    def forward(self, cls_own: torch.Tensor, cls_other: torch.Tensor) -> torch.Tensor:
        z = self.norm(torch.cat([cls_own, cls_other], dim=-1))
        return self.fc2(F.gelu(self.fc1(z)))

    def cost_dims(self) -> dict:
        return {"din": self.din, "r": self.r, "H": self.n_heads}
