"""torchrun / DDP plumbing: process group from the environment, a resumable distributed sampler,
per-input reproducible Gumbel noise, and small collective helpers that are no-ops in one process."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..devices import resolve_device


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    owns_group: bool = False   # this module created the process group (and destroys it)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init(device: str | None = None) -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR ...):
    NCCL on GPU, gloo on CPU. Without those variables: one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    if world <= 1:
        return DistInfo(0, 1, 0, dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world,
                                **({"device_id": dev} if dev.type == "cuda" else {}))
        owns = True
    return DistInfo(rank, world, local, dev, backend, owns)


def shutdown(info: DistInfo):
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(info: DistInfo):
    """-> a function summing a tensor over ranks in place (None in one process)."""
    if not info.distributed:
        return None

    def f(t: torch.Tensor):
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t
    return f


def broadcast_object(info: DistInfo, obj):
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(info: DistInfo, obj) -> list:
    if not info.distributed:
        return [obj]
    out = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo):
    if info.distributed:
        dist.barrier()


class ResumableSampler(torch.utils.data.Sampler):
    """Distributed sampler over a map-style dataset: each epoch a permutation seeded by (seed, epoch)
    (or the natural order without shuffle), split across ranks as ``DistributedSampler`` does
    (rank r takes positions r, r+W, ...), starting ``start`` positions into this rank's share (resume).

    With ``pad=True`` (training) the permutation is padded by wrapping round to a multiple of the world
    size, so every rank has the same number of inputs; evaluation uses ``pad=False`` (no duplicates).
    With W ranks each taking micro-batches of B/W, micro-batch k of all ranks together holds exactly
    the inputs of batch k of one process with batch B (positions kB .. kB+B-1 of the permutation).
    """

    def __init__(self, n: int, rank: int = 0, world: int = 1, shuffle: bool = True, seed: int = 0,
                 pad: bool = True):
        self.n, self.rank, self.world = n, rank, world
        self.shuffle, self.seed, self.pad = shuffle, seed, pad
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0):
        self.epoch, self.start = int(epoch), int(start)

    def order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
            idx = torch.randperm(self.n, generator=g).tolist()
        else:
            idx = list(range(self.n))
        W = self.world
        if self.pad and idx and len(idx) % W:
            extra = W - len(idx) % W
            idx += (idx * (extra // len(idx) + 1))[:extra]
        return idx[self.rank::W]

    def __iter__(self):
        return iter(self.order()[self.start:])

    def __len__(self):
        return max(0, len(self.order()) - self.start)


# ----- reproducible Gumbel noise -------------------------------------------------------------------
_M16 = 0xFFFF
_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for 0 <= x < 2^32 held in int64, without int64 overflow."""
    lo, hi = x & _M16, x >> 16
    return (lo * c + (((hi * c) & _M16) << 16)) & _M32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """Chris Wellons' lowbias32 integer hash, elementwise on int64 tensors holding 32-bit values."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _key_hash(*parts) -> int:
    return int.from_bytes(hashlib.blake2s(repr(parts).encode(), digest_size=4).digest(), "little")


class InstanceNoise:
    """Uniform(0, 1) noise that is a pure function of (seed, step, input id, decision key, position).

    Passed as ``TrimContext.noise``: the Gumbel sample an input gets no longer depends on which process
    it landed on or on what else is in its batch, so data-parallel and single-process runs match, and
    a resumed run draws the same noise as an uninterrupted one.

    ``scale`` multiplies the logistic noise the sample adds to the keep logits (1: the binary Concrete
    sample; 0: the deterministic ``logit > 0`` decision that inference takes).
    """

    def __init__(self, seed: int, step: int, ids: torch.Tensor, scale: float = 1.0):
        self.seed, self.step, self.scale = int(seed), int(step), float(scale)
        self.ids = ids.long()

    def __call__(self, key: str, logits: torch.Tensor) -> torch.Tensor:
        B = logits.shape[0]
        rest = logits.shape[1:]
        n = int(torch.tensor(rest).prod()) if len(rest) else 1
        salt = _key_hash(self.seed, self.step, key)
        ids = self.ids.to(logits.device).reshape(B, 1)
        pos = torch.arange(n, device=logits.device, dtype=torch.long).reshape(1, n)
        h = _hash32(_hash32(ids ^ salt) + pos * 0x9E3779B1 % (1 << 32))
        h = _hash32(h ^ (salt >> 7))
        u = (h.to(torch.float64) + 0.5) / float(1 << 32)
        if self.scale != 1.0:  # logit(u') = scale * logit(u): the sample adds scale x logistic noise
            u = torch.sigmoid(self.scale * (torch.log(u) - torch.log1p(-u)))
        return u.to(torch.float32).reshape(logits.shape)
