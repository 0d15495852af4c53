"""Topo-pack attention: the dense reference and the dispatcher over implementations.

Three implementations compute the same function (tests hold them equal in outputs and
gradients):

* ``dense``  — ``scaled_dot_product_attention`` with an explicit N×N boolean mask.
  O(N²) memory; the reference, and the public Hepato-LLaVA behaviour.
* ``gather`` — blocked attention in plain torch (:mod:`.gather`); trains on CPU.
* ``flex``   — ``flex_attention`` with an analytic block mask (:mod:`.flex`); CUDA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from slidevl.slidellm.encoder.config import ATTENTION_IMPLS
from slidevl.slidellm.encoder.gather import DEFAULT_CHUNK_ELEMENTS, topo_attention_gather
from slidevl.slidellm.encoder.layout import TokenLayout
from slidevl.slidellm.encoder.mask import dense_mask


def topo_attention_dense(q: Tensor, k: Tensor, v: Tensor, layout: TokenLayout, variant: str = "topo") -> Tensor:
    """Reference: SDPA with the materialised (B, 1, N, N) boolean mask."""
    mask = dense_mask(layout, variant)[:, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out * layout.token_valid()[:, None, :, None].to(out.dtype)


def resolve_impl(impl: str, device: torch.device) -> str:
    """``auto`` → ``flex`` on CUDA, ``gather`` elsewhere; explicit choices are checked."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention implementation must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "flex" if device.type == "cuda" else "gather"
    return impl


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
    impl = resolve_impl(impl, q.device)
    if impl == "gather":
        return topo_attention_gather(q, k, v, layout, variant, chunk_elements=chunk_elements)
    if impl == "flex":
        from slidevl.slidellm.encoder.flex import topo_attention_flex

        return topo_attention_flex(q, k, v, layout, variant, block_mask=block_mask, compile=flex_compile)
    return topo_attention_dense(q, k, v, layout, variant)
