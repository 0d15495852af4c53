"""Mutual Contrastive Learning (MCL) between patch and region prototypes.

Per patient, the pooled kept patch tokens and the pooled kept region tokens are
projected and L2-normalised into a patch prototype and a region prototype. The patch
prototype's positive is the same patient's region prototype; its negatives are region
prototypes of other patients from a memory queue — and symmetrically for the region
prototype (bidirectional InfoNCE, temperature τ).

Queues follow MoCo: keys come from momentum (EMA) copies of the two projection heads
applied to detached prototypes, so queued entries drift slowly. The momentum branch
covers the projection heads only — copying the whole token pathway would double the
model for a term that only regularises it. With small cohorts a queue outlives an
epoch and holds earlier prototypes of the current patient; those are masked out of
the negatives (a patient is never its own negative).

Under multi-process training the keys of every process enter the queue, in process
order (MoCo's ``concat_all_gather``): each process sees the negatives a single process
would have seen, all queues stay identical, and DDP's broadcast of rank 0's buffers
before every forward loses nothing. A queue kept per process would be overwritten by
rank 0's at the next forward, dropping the other processes' patients.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _head(dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, out_dim))


def gather_keys(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Each tensor stacked over the processes of the default group in rank order; (1, ...) without one."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [t.unsqueeze(0) for t in tensors]
    gathered = []
    for t in tensors:
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())
        gathered.append(torch.stack(parts))
    return gathered


def info_nce(query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, tau: float) -> torch.Tensor:
    """-log softmax of the positive among [positive, negatives]; all inputs L2-normalised."""
    logits = torch.cat([(query * positive).sum().view(1), negatives @ query]) / tau
    return -torch.log_softmax(logits, dim=0)[0]


class MutualContrastive(nn.Module):
    def __init__(self, dim: int, proj_dim: int = 128, queue_size: int = 256, tau: float = 0.07, momentum: float = 0.99) -> None:
        super().__init__()
        self.tau, self.momentum = tau, momentum
        self.patch_head = _head(dim, proj_dim)
        self.region_head = _head(dim, proj_dim)
        self.patch_head_k = copy.deepcopy(self.patch_head).requires_grad_(False)
        self.region_head_k = copy.deepcopy(self.region_head).requires_grad_(False)
        self.register_buffer("queue_patch", torch.zeros(queue_size, proj_dim))
        self.register_buffer("queue_region", torch.zeros(queue_size, proj_dim))
        self.register_buffer("queue_owner", torch.full((queue_size,), -1, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def _momentum_update(self) -> None:
        for online, key in ((self.patch_head, self.patch_head_k), (self.region_head, self.region_head_k)):
            for p, k in zip(online.parameters(), key.parameters()):
                k.mul_(self.momentum).add_(p.detach(), alpha=1 - self.momentum)

    @torch.no_grad()
    def _enqueue(self, k_patch: torch.Tensor, k_region: torch.Tensor, owner: int) -> None:
        """Enqueue this patient's keys, and those of the patients the other processes hold now."""
        owners = torch.tensor(owner, dtype=torch.long, device=k_patch.device)
        k_patch, k_region, owners = gather_keys(k_patch, k_region, owners)
        size = self.queue_patch.shape[0]
        for p, r, o in zip(k_patch, k_region, owners):
            i = int(self.queue_ptr)
            self.queue_patch[i] = p
            self.queue_region[i] = r
            self.queue_owner[i] = o
            self.queue_ptr.fill_((i + 1) % size)

    def forward(self, patch_proto: torch.Tensor, region_proto: torch.Tensor, owner: int) -> torch.Tensor:
        """Bidirectional InfoNCE for one patient; updates the queues when training."""
        q_patch = F.normalize(self.patch_head(patch_proto), dim=-1)
        q_region = F.normalize(self.region_head(region_proto), dim=-1)
        with torch.no_grad():
            if self.training:
                self._momentum_update()
            k_patch = F.normalize(self.patch_head_k(patch_proto.detach()), dim=-1)
            k_region = F.normalize(self.region_head_k(region_proto.detach()), dim=-1)
            valid = (self.queue_owner >= 0) & (self.queue_owner != owner)
        loss = 0.5 * (
            info_nce(q_patch, k_region, self.queue_region[valid], self.tau)
            + info_nce(q_region, k_patch, self.queue_patch[valid], self.tau)
        )
        if self.training:
            self._enqueue(k_patch, k_region, owner)
        return loss
