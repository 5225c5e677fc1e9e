"""The SmartTrim objective (self-distillation under a compute budget), one function per part.

    L = L_task(trimmed) + alpha * L_distill(trimmed || full) + L_cost

* ``task_loss``: METER's losses. VQA-style targets (float [B, L] soft scores) use binary cross-entropy
  times the number of labels, as METER does; class targets (long [B]: NLVR2, SNLI-VE) cross-entropy.
* ``distill_loss``: the full-capacity pass of the same weights is the teacher. Multi-label heads:
  BCE of the student logits against ``sigmoid(teacher / T)``; single-label heads: KL(teacher || student)
  of the tempered softmaxes times T^2. Optional MSE on the pooled features (``feature_loss``).
* ``budget_loss``: the budget control, the fragile part. The squared penalty is on the **batch mean**
  ratio, ``lam * (mean_b R_b - R_t)^2``, so inputs may differ from each other (a per-instance penalty
  forces every input to the same ratio), plus a dual (Lagrangian) term ``nu * (mean_b R_b - R_t)``
  whose multiplier ``nu`` is raised while the batch keeps too much and lowered when it keeps too
  little (``Budget.update``), which removes the steady-state offset of a squared penalty alone, and a
  small term on the spread, ``mu * var_b(R_b)``, so that a few inputs cannot take the whole budget
  while the rest keep nothing.

Data parallelism: ``budget_loss`` takes the batch statistics of the *global* batch (all ranks) and
returns a surrogate whose value is the penalty and whose gradient, once DDP averages the ranks'
gradients, is exactly the gradient of the penalty on the global batch. So N processes with B/N inputs
each follow the same trajectory as one process with B inputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..metrics import is_multilabel


def task_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    if is_multilabel(target):
        return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype)) * target.shape[1]
    return F.cross_entropy(logits, target.long())


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, multilabel: bool, temperature: float = 1.0):
    s, t = student.float(), teacher.detach().float()
    T = float(temperature)
    if multilabel:
        return F.binary_cross_entropy_with_logits(s / T, torch.sigmoid(t / T)) * s.shape[1]
    return F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), reduction="batchmean",
                    log_target=True) * (T * T)


def feature_loss(student_feats: torch.Tensor, teacher_feats: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(student_feats.float(), teacher_feats.detach().float())


@dataclass
class BatchStats:
    """Statistics of the per-input ratios over the global batch (identical on every rank)."""

    mean: torch.Tensor      # 0-d, detached
    sq_mean: torch.Tensor   # 0-d, detached: mean of R_b^2
    count: int

    @property
    def var(self) -> torch.Tensor:
        return (self.sq_mean - self.mean ** 2).clamp_min(0)


def global_stats(ratio: torch.Tensor, all_reduce=None) -> BatchStats:
    """Mean and mean square of ``ratio`` (B,) over all ranks. ``all_reduce(t)`` sums a tensor over
    ranks in place (None: a single process)."""
    r = ratio.detach().float()
    t = torch.stack([r.sum(), (r * r).sum(), torch.tensor(float(r.numel()), device=r.device)])
    if all_reduce is not None:
        all_reduce(t)
    n = t[2].clamp_min(1)
    return BatchStats(t[0] / n, t[1] / n, int(t[2].item()))


def budget_loss(ratio: torch.Tensor, target: float, stats: BatchStats, lam: float, nu: float, mu: float):
    """-> (surrogate loss for backward, {"cost": penalty value, "spread": spread term value}).

    ``ratio``: this rank's per-input R_b (differentiable); ``stats``: the global batch's statistics.
    Value: lam*(m - R_t)^2 + nu*(m - R_t) + mu*var. Gradient (after DDP's mean over ranks) equals that
    of the same expression on the global batch: d/dR_b = [2*lam*(m - R_t) + nu - 2*mu*m] / B + 2*mu*R_b / B.
    """
    r = ratio.float()
    m = stats.mean
    err = m - target
    local_mean = r.mean()
    local_sq = (r * r).mean()
    # first-order surrogates: zero value, the right gradient
    d_mean = local_mean - local_mean.detach()
    d_sq = local_sq - local_sq.detach()
    pen_value = lam * err ** 2 + nu * err
    spread_value = mu * stats.var
    loss = (pen_value + spread_value).detach() + (2 * lam * err + nu - 2 * mu * m) * d_mean + mu * d_sq
    return loss, {"cost": pen_value.detach(), "spread": spread_value.detach()}


def floor_loss(keep_fraction: dict, floor: float, all_reduce=None) -> torch.Tensor:
    """sum_p relu(floor - mean_b K_bp)^2 over the token positions p, K_bp the share of its live tokens input b
    keeps at p. The budget alone lets the learned trimmers put all the cutting at the first position (a
    token dropped there saves every later layer, so the cost gradient is largest there), where the features
    are shallowest: on the scenes set at a 0.33 target the first of three positions kept 15% of the image
    tokens and the later ones kept all of those. The floor asks every position to keep, on batch average, at
    least the target share of what reaches it (what fixed-ratio EViT keeps everywhere), and leaves inputs
    free to differ. The batch mean is global over ranks (``all_reduce`` sums in place), so its gradient,
    averaged by DDP, equals that of the single-process penalty, as in ``budget_loss``."""
    total = None
    for k in sorted(keep_fraction):
        f = keep_fraction[k].float()
        local = f.mean()
        gap = (floor - global_stats(f, all_reduce).mean).clamp_min(0)
        # value gap^2; gradient -2 gap / B_local on each local K_b, which DDP's mean over ranks makes -2 gap / B
        term = gap ** 2 - 2 * gap * (local - local.detach())
        total = term if total is None else total + term
    return total if total is not None else torch.zeros(())


class Budget:
    """The dual variable ``nu`` of the ratio constraint (Lagrangian-style adaptive strength).

    After each optimizer step, ``nu += dual_lr * (m - R_t)`` with m the step's mean ratio, clipped to
    [-nu_max, nu_max]. Every rank sees the same m, so ``nu`` stays identical across ranks.
    """

    def __init__(self, dual_lr: float = 0.0, nu_max: float = 50.0, nu: float = 0.0):
        self.dual_lr, self.nu_max, self.nu = float(dual_lr), float(nu_max), float(nu)

    def update(self, mean_ratio: float, target: float):
        if self.dual_lr > 0:
            self.nu = max(-self.nu_max, min(self.nu_max, self.nu + self.dual_lr * (mean_ratio - target)))

    def state_dict(self):
        return {"nu": self.nu}

    def load_state_dict(self, d):
        self.nu = float(d["nu"])
