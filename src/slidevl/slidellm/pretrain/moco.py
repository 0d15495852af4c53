"""Momentum contrast on summary tokens, with slide-aware negatives.

* Keys come from a momentum copy of the encoder (momentum 0.999) and go into a queue
  (8192 entries) together with the id of the slide they came from.
* Positives are found by grid position, not by sequence order: for a query pack the
  positive key is, in the other view, either the same pack (seen through different
  noise and symmetry) or one of its 8 grid neighbours, matched by ``pack_origin``.
* Negatives are the queue plus the other keys of the current batch, minus every key
  from the query's own slide: neighbouring packs of one slide look alike, and treating
  them as negatives (as the public code does) fights the positives.
"""

from __future__ import annotations

import copy
import hashlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: The 3×3 neighbourhood, the pack itself first.
NEIGHBOUR_OFFSETS = torch.tensor([[0, 0]] + [[dc, dr] for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (dc, dr) != (0, 0)])
EMPTY_SLIDE = -1


def slide_key(slide_id: str) -> int:
    """A stable non-negative int64 id for a slide name (same on every process and run)."""
    return int.from_bytes(hashlib.blake2b(slide_id.encode("utf-8"), digest_size=8).digest(), "little") >> 1


class ProjectionHead(nn.Module):
    """Two-layer MLP from summary tokens to the contrastive space (MoCo v2 style)."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.net(x), dim=-1)


class MoCoQueue(nn.Module):
    """Ring buffer of key features and the slide each came from (persisted as buffers)."""

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"queue size must be >= 1, got {size}")
        self.register_buffer("features", torch.zeros(size, dim))
        self.register_buffer("slides", torch.full((size,), EMPTY_SLIDE, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return int(self.features.shape[0])

    @torch.no_grad()
    def enqueue(self, keys: Tensor, slides: Tensor) -> None:
        """Append (n, dim) keys with their (n,) slide ids, overwriting the oldest entries."""
        keep = slides != EMPTY_SLIDE
        keys, slides = keys[keep][-self.size :], slides[keep][-self.size :]
        n = keys.shape[0]
        if n == 0:
            return
        idx = (int(self.ptr) + torch.arange(n, device=self.features.device)) % self.size
        self.features[idx] = keys.to(self.features.dtype)
        self.slides[idx] = slides.to(self.slides.device)
        self.ptr.fill_((int(self.ptr) + n) % self.size)


def pick_positives(
    query_origin: Tensor,
    key_origin: Tensor,
    key_valid: Tensor,
    generator: torch.Generator,
    same_pack_prob: float = 0.5,
) -> Tensor:
    """For each query pack, the index of its positive key pack in the other view, or -1.

    Args:
        query_origin: (Q, 2) original (col, row) of the query packs.
        key_origin: (K, 2) original (col, row) of the other view's packs.
        key_valid: (K,) bool.
        same_pack_prob: chance of taking the same pack when it is in the other view;
            otherwise a uniformly random 8-neighbour present there (falling back to the
            same pack when no neighbour is present, and vice versa).
    """
    q = query_origin.cpu().long()
    k = key_origin.cpu().long()
    kv = key_valid.cpu()
    kidx = torch.nonzero(kv).flatten()
    if q.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long)
    if kidx.numel() == 0:
        return torch.full((q.shape[0],), -1, dtype=torch.long)
    kk = k[kidx]
    lo = torch.minimum(q.amin(0), kk.amin(0)) - 1
    span = int((torch.maximum(q.amax(0), kk.amax(0)) - lo + 2).max())
    # Positions as single integers, so neighbour lookup is a sorted search.
    code = lambda g: (g[..., 1] - lo[1]) * span + (g[..., 0] - lo[0])  # noqa: E731
    kcode = code(kk)
    order = kcode.argsort()
    sorted_codes = kcode[order]
    cand_code = code(q[:, None, :] + NEIGHBOUR_OFFSETS[None])  # (Q, 9)
    pos = torch.searchsorted(sorted_codes, cand_code).clamp_max(sorted_codes.numel() - 1)
    found = sorted_codes[pos] == cand_code
    cand = torch.where(found, kidx[order[pos]], torch.full_like(pos, -1))
    same_ok = found[:, 0]
    nbr_ok = found[:, 1:]
    n_nbr = nbr_ok.sum(1)
    # A uniformly random present neighbour: random scores, absent ones pushed last.
    scores = torch.rand(nbr_ok.shape, generator=generator)
    scores = torch.where(nbr_ok, scores, torch.full_like(scores, 2.0))
    nbr_choice = cand[:, 1:].gather(1, scores.argmin(1, keepdim=True))[:, 0]
    want_same = torch.rand(q.shape[0], generator=generator) < same_pack_prob
    use_same = same_ok & (want_same | (n_nbr == 0))
    out = torch.where(use_same, cand[:, 0], torch.where(n_nbr > 0, nbr_choice, torch.full_like(nbr_choice, -1)))
    return out


def negative_mask(query_slides: Tensor, negative_slides: Tensor) -> Tensor:
    """(Q, M) bool: True where a candidate negative may be used (other slide, not empty)."""
    return (negative_slides[None, :] != query_slides[:, None]) & (negative_slides[None, :] != EMPTY_SLIDE)


def moco_logits(
    q: Tensor,
    k_pos: Tensor,
    query_slides: Tensor,
    negatives: Tensor,
    negative_slides: Tensor,
    temperature: float = 0.07,
) -> tuple[Tensor, Tensor]:
    """Logits (Q, 1 + M) with the positive in column 0 and excluded negatives at -inf.

    Returns the logits and the (Q, M) mask of negatives actually used.
    """
    pos = (q * k_pos).sum(-1, keepdim=True)
    neg = q @ negatives.to(q.dtype).T
    use = negative_mask(query_slides, negative_slides)
    neg = neg.masked_fill(~use, float("-inf"))
    return torch.cat([pos, neg], dim=1) / temperature, use


def moco_loss(
    q: Tensor,
    k_pos: Tensor,
    query_slides: Tensor,
    negatives: Tensor,
    negative_slides: Tensor,
    temperature: float = 0.07,
) -> tuple[Tensor, dict[str, float]]:
    """InfoNCE with the positive in column 0; returns the loss and a few statistics."""
    if q.shape[0] == 0:
        return q.sum() * 0.0, {"moco_queries": 0.0, "moco_negatives": 0.0, "moco_acc": float("nan")}
    logits, use = moco_logits(q, k_pos, query_slides, negatives, negative_slides, temperature)
    target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    loss = F.cross_entropy(logits, target)
    with torch.no_grad():
        acc = (logits.argmax(1) == 0).float().mean().item()
    return loss, {"moco_queries": float(q.shape[0]), "moco_negatives": use.sum(1).float().mean().item(), "moco_acc": acc}


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen copy of ``module`` to serve as the momentum (key) network."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target.eval()


@torch.no_grad()
def momentum_update(online: nn.Module, target: nn.Module, momentum: float = 0.999) -> None:
    """target ← momentum · target + (1 − momentum) · online, parameter by parameter."""
    for p_t, p_o in zip(target.parameters(), online.parameters(), strict=True):
        p_t.lerp_(p_o.detach().to(p_t.dtype), 1.0 - momentum)
    for b_t, b_o in zip(target.buffers(), online.buffers(), strict=True):
        b_t.copy_(b_o)
