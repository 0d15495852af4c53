"""Topo-pack attention through ``torch.nn.attention.flex_attention`` (the CUDA path).

The block mask is built analytically from the layout in O(number of blocks), not by
evaluating the mask on an N×N grid: every query token's allowed keys are a handful of
contiguous index ranges (its pack's patches, the summary block, the global token), so
the non-empty (query block, key block) pairs follow from those ranges directly. Inside
the kernel the exact per-element rule is :func:`slidevl.slidellm.encoder.mask.allowed`.

On CPU flex_attention runs forward only (and unfused in eager mode); it is used there
in tests to check the block mask, while training on CPU uses the gather path.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable

import torch
from torch import Tensor

from slidevl.slidellm.encoder.layout import PATCH, SUMMARY, TokenLayout
from slidevl.slidellm.encoder.mask import allowed, check_variant

BLOCK_SIZE = 128


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _key_ranges(layout: TokenLayout, variant: str, length: int) -> tuple[Tensor, Tensor, Tensor]:
    """Query index, and [lo, hi) key ranges covering every allowed key of that query.

    Returns flat tensors (q, lo, hi); a query may appear in several ranges.
    """
    device = layout.device
    n, p, s = layout.num_tokens, layout.num_packs, layout.slots
    npt = p * s
    t = layout.token_type(length)
    pk = layout.token_pack(length)
    idx = torch.arange(length, device=device)
    real = t >= 0
    if variant == "dense":
        q = idx[real]
        return q, torch.zeros_like(q), torch.full_like(q, n)
    qs, los, his = [], [], []

    def add(sel: Tensor, lo: Tensor, hi: Tensor) -> None:
        qs.append(idx[sel])
        los.append(lo)
        his.append(hi)

    is_patch, is_summary = t == PATCH, t == SUMMARY
    own_pack = pk.clamp_min(0)
    # Own pack's patches (patch and summary queries).
    sel = is_patch | is_summary
    add(sel, own_pack[sel] * s, own_pack[sel] * s + s)
    # The global key (every real query).
    add(real, torch.full((int(real.sum()),), n - 1, device=device), torch.full((int(real.sum()),), n, device=device))
    # Summary queries: the whole summary block.
    add(is_summary, torch.full((int(is_summary.sum()),), npt, device=device), torch.full((int(is_summary.sum()),), npt + p, device=device))
    if variant == "patch_sees_summary":
        add(is_patch, npt + own_pack[is_patch], npt + own_pack[is_patch] + 1)
    return torch.cat(qs), torch.cat(los), torch.cat(his)


def topo_block_mask(layout: TokenLayout, variant: str = "topo", block_size: int | tuple[int, int] = BLOCK_SIZE):
    """The flex_attention ``BlockMask`` of a layout (one per slide of the batch).

    ``block_size`` is one size for query and key blocks, or ``(query, key)`` sizes:
    a pack is only k² keys wide, so narrower key blocks waste less of each block.
    Block sparsity is computed from key ranges (cost linear in the number of tokens
    plus the number of blocks); the exact rule is applied per element by ``mask_mod``.
    """
    from torch.nn.attention.flex_attention import BlockMask

    check_variant(variant)
    q_block, kv_block = (block_size, block_size) if isinstance(block_size, int) else block_size
    n = layout.num_tokens
    nqb, nkb = _ceil_div(n, q_block), _ceil_div(n, kv_block)
    length = max(nqb * q_block, nkb * kv_block)
    device = layout.device
    q, lo, hi = _key_ranges(layout, variant, length)
    qb = q // q_block
    lo_b = lo // kv_block
    hi_b = (hi - 1) // kv_block + 1  # exclusive block end
    # Difference array over key blocks: +1 where a range starts, -1 past where it ends.
    diff = torch.zeros(nqb, nkb + 1, dtype=torch.int32, device=device)
    ones = torch.ones_like(qb, dtype=torch.int32)
    diff.index_put_((qb, lo_b), ones, accumulate=True)
    diff.index_put_((qb, hi_b), -ones, accumulate=True)
    blocks = diff.cumsum(dim=1)[:, :nkb] > 0
    kv_num = blocks.sum(dim=1).to(torch.int32)
    # Stable sort puts the listed key blocks first, in increasing order.
    kv_idx = torch.argsort((~blocks).to(torch.int8), dim=1, stable=True).to(torch.int32)
    b = layout.batch_size
    kv_num = kv_num[None, None].expand(b, 1, nqb).contiguous()
    kv_idx = kv_idx[None, None].expand(b, 1, nqb, nkb).contiguous()
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        BLOCK_SIZE=(q_block, kv_block),
        mask_mod=topo_mask_mod(layout, variant, length),
        seq_lengths=(n, n),
    )


def topo_mask_mod(layout: TokenLayout, variant: str, length: int) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """A flex_attention ``mask_mod`` closing over the layout's lookup tables.

    Tables are padded to ``length`` (a block multiple) so index lookups for positions
    past the sequence end stay in bounds; those positions are PAD and never allowed.
    """
    t = layout.token_type(length)
    pk = layout.token_pack(length)
    valid = layout.token_valid()
    valid = torch.cat([valid, valid.new_zeros(valid.shape[0], length - valid.shape[1])], dim=1)

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return allowed(t[q_idx], pk[q_idx], t[kv_idx], pk[kv_idx], valid[b, kv_idx], variant)

    return mask_mod


@lru_cache(maxsize=1)
def _compiled_flex() -> Callable[..., Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    # Default dynamic-shape handling: slides differ in length, and marking the sequence
    # dimension dynamic after the first change avoids recompiling for every slide.
    return torch.compile(flex_attention)


def topo_attention_flex(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: TokenLayout,
    variant: str = "topo",
    *,
    block_mask=None,
    compile: bool = True,
    kernel_options: dict | None = None,
) -> Tensor:
    """Topo-pack attention with flex_attention; (B, H, N, d) in, (B, H, N, d) out.

    Pass a prebuilt ``block_mask`` (from :func:`topo_block_mask`) to reuse it across
    layers. ``kernel_options`` go to flex_attention (tile sizes must divide the block
    mask's block sizes). Outputs of padding queries are zero, as in the other implementations.
    """
    from torch.nn.attention.flex_attention import flex_attention

    check_variant(variant)
    if q.shape[2] != layout.num_tokens:
        raise ValueError(f"sequence length {q.shape[2]} does not match the layout ({layout.num_tokens} tokens)")
    if block_mask is None:
        block_mask = topo_block_mask(layout, variant)
    fn = _compiled_flex() if compile else flex_attention
    out = fn(q, k, v, block_mask=block_mask, kernel_options=kernel_options)
    return out * layout.token_valid()[:, None, :, None].to(out.dtype)
