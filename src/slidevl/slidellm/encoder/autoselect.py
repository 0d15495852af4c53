"""``attention_impl="auto"``: time the candidate implementations once, keep the fastest.

Which implementation wins depends on the device, the dtype and the size (the gather
path is launch-bound on a GPU, flex_attention pays for its block sparsity granularity,
the split path for its folded channels), so it is measured, not assumed. A probe runs
each candidate on random q/k/v of the same shape class (forward, plus backward when
gradients are on) and the winner is cached for the process, keyed by device, dtype,
size class and head shape. Every candidate computes the same function (tests hold them
equal to the dense reference), so the choice only changes speed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from slidevl.slidellm.encoder.layout import TokenLayout

#: flex_attention has no CPU backward and runs unfused there, so it only competes on CUDA;
#: ``dense`` is the O(N²) reference and never a candidate.
CPU_CANDIDATES = ("split", "gather")
CUDA_CANDIDATES = ("split", "gather", "flex")
_TIMED_RUNS = 2


@dataclass(frozen=True)
class ShapeClass:
    """What the probe result depends on; packs are rounded to the nearest power of two."""

    device: str
    dtype: torch.dtype
    packs: int
    pack_size: int
    n_heads: int
    head_dim: int
    variant: str
    grad: bool

    @classmethod
    def of(
        cls,
        device: torch.device,
        dtype: torch.dtype,
        *,
        num_packs: int,
        pack_size: int,
        n_heads: int,
        head_dim: int,
        variant: str,
        grad: bool,
    ) -> "ShapeClass":
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        packs = 2 ** round(math.log2(max(1, num_packs)))
        return cls(f"{device}:{name}", dtype, packs, pack_size, n_heads, head_dim, variant, grad)


_CHOICES: dict[ShapeClass, str] = {}
#: Seconds per candidate for every probed class (inf = the candidate failed), for reports.
PROBE_TIMES: dict[ShapeClass, dict[str, float]] = {}


def candidates(device: torch.device) -> tuple[str, ...]:
    return CUDA_CANDIDATES if device.type == "cuda" else CPU_CANDIDATES


def _probe(shape: ShapeClass, device: torch.device) -> dict[str, float]:
    from slidevl.slidellm.encoder.attention import topo_attention  # the dispatcher imports this module

    layout = TokenLayout(
        shape.pack_size,
        torch.ones(1, shape.packs, shape.pack_size**2, dtype=torch.bool, device=device),
        torch.ones(1, shape.packs, dtype=torch.bool, device=device),
    )
    # A private generator: probing must not shift the caller's random stream.
    gen = torch.Generator().manual_seed(0)
    qkv = [
        torch.randn(1, shape.n_heads, layout.num_tokens, shape.head_dim, generator=gen)
        .to(device, shape.dtype)
        .requires_grad_(shape.grad)
        for _ in range(3)
    ]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times: dict[str, float] = {}
    with torch.set_grad_enabled(shape.grad):
        for impl in candidates(device):
            best = math.inf
            try:
                for run in range(1 + _TIMED_RUNS):  # the first run warms up (and compiles flex)
                    sync()
                    t0 = time.perf_counter()
                    out = topo_attention(*qkv, layout, shape.variant, impl=impl)
                    if shape.grad:
                        torch.autograd.grad(out.sum(), qkv)
                    sync()
                    if run:
                        best = min(best, time.perf_counter() - t0)
            except (RuntimeError, NotImplementedError):
                # A candidate this device/torch cannot run (flex without a working
                # compiler, out of memory) is simply not eligible; the others still are.
                best = math.inf
            times[impl] = best
    return times


def choose_impl(
    device: torch.device,
    dtype: torch.dtype,
    *,
    num_packs: int,
    pack_size: int,
    n_heads: int,
    head_dim: int,
    variant: str,
    grad: bool,
) -> str:
    """The fastest candidate for this shape class on ``device`` (probed on first use)."""
    shape = ShapeClass.of(
        device, dtype, num_packs=num_packs, pack_size=pack_size, n_heads=n_heads, head_dim=head_dim, variant=variant, grad=grad
    )
    if shape not in _CHOICES:
        times = _probe(shape, device)
        PROBE_TIMES[shape] = times
        _CHOICES[shape] = min(times, key=times.__getitem__)
    return _CHOICES[shape]
