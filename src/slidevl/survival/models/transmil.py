"""TransMIL (Shao et al., NeurIPS 2021): correlated MIL with a transformer.

Faithful layout: a 512-d embedding, a class token, two transformer layers with
Nyström self-attention (pre-norm, residual), the PPEG positional encoder between
them (depthwise 7/5/3 convolutions on the square-padded token grid, in bag order),
a final LayerNorm, and the class token classified.

Attention: exact softmax attention when the sequence has at most
``full_attention_max`` tokens (default 1024, where it is cheap and exact), the
Nyström approximation (segment-mean landmarks, iterative Moore–Penrose inverse) above
it. Both paths share the same weights, including the depthwise residual convolution
on the values from the Nyströmformer, so a model trained on small bags runs on large ones.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from slidevl.survival.data import PatientBag
from slidevl.survival.models.base import SURVIVAL_MODELS, ModelOutput, SurvivalModel


def _pinv_iterative(x: torch.Tensor, iters: int = 6) -> torch.Tensor:
    """Moore–Penrose inverse by the Razavi et al. iteration used in Nyströmformer."""
    abs_x = x.abs()
    scale = abs_x.sum(dim=-1).amax(dim=-1) * abs_x.sum(dim=-2).amax(dim=-1)
    z = x.transpose(-1, -2) / scale[..., None, None]
    for _ in range(iters):
        xz = x @ z
        z = 0.25 * z @ _eye_minus(13, xz @ _eye_minus(15, xz @ _eye_minus(7, xz)))
    return z


def _eye_minus(c: float, m: torch.Tensor) -> torch.Tensor:
    """c·I − m without materialising the identity."""
    out = -m
    out.diagonal(dim1=-2, dim2=-1).add_(c)
    return out


class NystromAttention(nn.Module):
    """Multi-head self-attention, exact for short sequences and Nyström-approximated for long ones."""

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        num_landmarks: int = 256,
        pinv_iterations: int = 6,
        residual_kernel: int = 33,
        dropout: float = 0.1,
        full_attention_max: int = 1024,
    ) -> None:
        super().__init__()
        self.heads = heads
        self.dim_head = dim // heads
        self.num_landmarks = num_landmarks
        self.pinv_iterations = pinv_iterations
        self.full_attention_max = full_attention_max
        self.scale = self.dim_head ** -0.5
        self.to_qkv = nn.Linear(dim, 3 * heads * self.dim_head, bias=False)
        self.to_out = nn.Sequential(nn.Linear(heads * self.dim_head, dim), nn.Dropout(dropout))
        self.res_conv = nn.Conv2d(heads, heads, (residual_kernel, 1), padding=(residual_kernel // 2, 0), groups=heads, bias=False)

    def _nystrom(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, h, n, d = q.shape
        m = self.num_landmarks
        seg = math.ceil(n / m)
        pad = seg * m - n
        if pad:
            # Zero-pad at the front so every landmark averages exactly ``seg`` rows.
            q, k, v = (F.pad(t, (0, 0, pad, 0)) for t in (q, k, v))
        q_l = q.reshape(b, h, m, seg, d).sum(dim=3) / seg
        k_l = k.reshape(b, h, m, seg, d).sum(dim=3) / seg
        if pad:
            # Padded keys must not receive attention from real queries.
            key_mask = torch.zeros(seg * m, dtype=torch.bool, device=q.device)
            key_mask[:pad] = True
        kernel_1 = torch.softmax(q @ k_l.transpose(-1, -2), dim=-1)
        kernel_2 = torch.softmax(q_l @ k_l.transpose(-1, -2), dim=-1)
        sim_3 = q_l @ k.transpose(-1, -2)
        if pad:
            sim_3 = sim_3.masked_fill(key_mask, float("-inf"))
        kernel_3 = torch.softmax(sim_3, dim=-1)
        out = (kernel_1 @ _pinv_iterative(kernel_2, self.pinv_iterations)) @ (kernel_3 @ v)
        return out[:, :, pad:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.to_qkv(x).view(b, n, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        q = q * self.scale
        if n <= self.full_attention_max or n <= self.num_landmarks:
            out = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
        else:
            out = self._nystrom(q, k, v)
        out = out + self.res_conv(v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class TransLayer(nn.Module):
    def __init__(self, dim: int, **attn_kwargs: int | float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim, heads=8, num_landmarks=dim // 2, **attn_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(self.norm(x))


class PPEG(nn.Module):
    """Pyramid position encoding generator: depthwise 7x7, 5x5, 3x3 convolutions plus identity."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj7 = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.proj5 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.proj3 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        b, _, c = x.shape
        cls, tokens = x[:, :1], x[:, 1:]
        grid = tokens.transpose(1, 2).reshape(b, c, side, side)
        grid = grid + self.proj7(grid) + self.proj5(grid) + self.proj3(grid)
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)


@SURVIVAL_MODELS.register("transmil")
class TransMIL(SurvivalModel):

    def __init__(
        self, in_dim: int, n_bins: int = 4, dim: int = 512, dropout: float = 0.1, full_attention_max: int = 1024
    ) -> None:
        super().__init__(in_dim=in_dim, n_bins=n_bins, dim=dim, dropout=dropout, full_attention_max=full_attention_max)
        self.fc1 = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        attn = dict(dropout=dropout, full_attention_max=full_attention_max)
        self.layer1 = TransLayer(dim, **attn)
        self.ppeg = PPEG(dim)
        self.layer2 = TransLayer(dim, **attn)
        self.norm = nn.LayerNorm(dim)
        self.fc2 = nn.Linear(dim, n_bins)

    def forward(self, bag: PatientBag, *, evidence: bool = False) -> ModelOutput:
        h = self.fc1(bag.patch).unsqueeze(0)
        n = h.shape[1]
        side = math.ceil(math.sqrt(n))
        extra = side * side - n
        # Square the sequence by repeating its first tokens, as in the reference model.
        h = torch.cat([h, h[:, :extra]], dim=1)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1)
        h = self.layer2(self.ppeg(self.layer1(h), side))
        return ModelOutput(self.fc2(self.norm(h)[:, 0]).squeeze(0))
