"""Topo-pack attention: the dense reference and the dispatcher over implementations.

Four implementations compute the same function (tests hold them equal in outputs and
gradients):

* ``dense``  — ``scaled_dot_product_attention`` with an explicit N×N boolean mask.
  O(N²) memory; the reference, and the public Hepato-LLaVA behaviour.
* ``gather`` — blocked attention in plain torch (:mod:`.gather`); chunked, linear memory.
* ``split``  — one fused SDPA per part of the mask, private keys folded into channels
  (:mod:`.split`); linear memory, flash kernels on GPU.
* ``flex``   — ``flex_attention`` with an analytic block mask (:mod:`.flex`); CUDA.

``auto`` times the candidates once per device and shape class (:mod:`.autoselect`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from slidevl.slidellm.encoder.autoselect import choose_impl
from slidevl.slidellm.encoder.config import ATTENTION_IMPLS
from slidevl.slidellm.encoder.gather import DEFAULT_CHUNK_ELEMENTS, topo_attention_gather
from slidevl.slidellm.encoder.layout import TokenLayout
from slidevl.slidellm.encoder.mask import dense_mask
from slidevl.slidellm.encoder.split import topo_attention_split


def topo_attention_dense(q: Tensor, k: Tensor, v: Tensor, layout: TokenLayout, variant: str = "topo") -> Tensor:
    """Reference: SDPA with the materialised (B, 1, N, N) boolean mask."""
    mask = dense_mask(layout, variant)[:, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out * layout.token_valid()[:, None, :, None].to(out.dtype)


def resolve_impl(impl: str, layout: TokenLayout, *, dtype: torch.dtype, n_heads: int, head_dim: int, variant: str) -> str:
    """``auto`` → the candidate that measured fastest for this shape class; explicit choices are checked."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention implementation must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    return choose_impl(
        layout.device,
        dtype,
        num_packs=layout.num_packs,
        pack_size=layout.pack_size,
        n_heads=n_heads,
        head_dim=head_dim,
        variant=variant,
        grad=torch.is_grad_enabled(),
    )


def topo_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: TokenLayout,
    variant: str = "topo",
    *,
    impl: str = "auto",
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    flex_compile: bool = True,
    block_mask=None,
) -> Tensor:
    """Topo-pack attention of (B, H, N, d) q/k/v with the chosen implementation."""
    impl = resolve_impl(impl, layout, dtype=q.dtype, n_heads=q.shape[1], head_dim=q.shape[3], variant=variant)
    if impl == "split":
        return topo_attention_split(q, k, v, layout, variant)
    if impl == "gather":
        return topo_attention_gather(q, k, v, layout, variant, chunk_elements=chunk_elements)
    if impl == "flex":
        from slidevl.slidellm.encoder.flex import topo_attention_flex

        return topo_attention_flex(q, k, v, layout, variant, block_mask=block_mask, compile=flex_compile)
    return topo_attention_dense(q, k, v, layout, variant)
