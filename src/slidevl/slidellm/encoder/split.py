"""Split topo-pack attention: each part of the mask as one fused SDPA call.

The topo mask has the same shape of work as :mod:`.gather` describes: groups of queries
that see keys *shared* by all of them (the global token for patch queries; the summary
block and the global token for summary queries) plus a few keys *private* to their pack
(its k² patches, and for ``patch_sees_summary`` its summary), all under one softmax.
A fused ``scaled_dot_product_attention`` (flash / memory-efficient kernels) only takes
shared keys, so the private keys are folded into extra head channels::

    q' = [ q          ‖ q·k_private (l) ‖ 1    ]      one row per query
    k' = [ k_shared   ‖ 0               ‖ bias ]      S shared keys, bias = 0 or -BIG
         [ 0          ‖ e_j             ‖ 0    ]      l "slot" keys, j = 1..l
    v' = [ v_shared   ‖ 0               ‖ 0    ]
         [ 0          ‖ e_j             ‖ 0    ]

For slot key j the score q'·k'_j is exactly the query's score against its j-th private
key, so one SDPA over S + l keys is the exact masked softmax: its first d output channels
are the shared keys' share of the output and the next l channels are the probabilities
of the private keys, which then weight the private values (a tiny batched matmul).
Invalid shared keys (padding) get a -BIG bias through the last channel and invalid
private keys a -BIG score, so no mask tensor reaches the kernel and it stays on its
fastest path. Nothing N×N exists: the summary term is a P×(P+1+k²) flash attention,
the patch term an (N×(1+k²)) one. Everything is ordinary autograd, so gradients are
those of SDPA's own backward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from slidevl.slidellm.encoder.layout import TokenLayout
from slidevl.slidellm.encoder.mask import check_variant

#: Additive score of a masked key, in raw q·k units (before the 1/sqrt(d) scale). Finite
#: so that 0 · BIG stays 0 in the other channels' products; 3e4 fits float16, and
#: exp(-3e4 / sqrt(d)) underflows to exactly 0 for any head width up to 10^6.
MASKED_SCORE = 3.0e4
#: Fused kernels want head widths in multiples of 8.
_CHANNEL_MULTIPLE = 8


def _padding_mask(valid: Tensor | None) -> Tensor | None:
    # An all-True mask would only add channels and work for nothing.
    return None if valid is None or bool(valid.all()) else valid


def folded_attention(
    q: Tensor,
    local_k: Tensor | None,
    local_v: Tensor | None,
    shared_k: Tensor,
    shared_v: Tensor,
    *,
    local_valid: Tensor | None = None,
    shared_valid: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Attention of grouped queries over per-group private keys plus shared keys.

    Same contract as :func:`slidevl.slidellm.encoder.gather.grouped_attention`, except
    that every query must have at least one valid key (the topo layout guarantees it:
    the global token is always valid).

    Args:
        q: (B, H, G, m, d) queries, ``m`` per group.
        local_k, local_v: (B, H, G, l, d) keys/values private to each group, or None.
        shared_k, shared_v: (B, H, S, d) keys/values every query sees.
        local_valid: (B, G, l) bool, None = all valid.
        shared_valid: (B, S) bool, None = all valid.
        scale: score scale, default 1/sqrt(d).
    """
    b, h, g, m, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    qf = q.reshape(b, h, g * m, d)
    local_valid = _padding_mask(local_valid)
    shared_valid = _padding_mask(shared_valid)
    n_local = 0 if local_k is None else local_k.shape[3]
    if n_local == 0 and shared_valid is None:
        return F.scaled_dot_product_attention(qf, shared_k, shared_v, scale=scale).view(b, h, g, m, -1)

    n_shared = shared_k.shape[2]
    bias = shared_valid is not None
    width = d + n_local + int(bias)
    pad = -width % _CHANNEL_MULTIPLE
    parts_q = [qf]
    if n_local:
        local_scores = torch.matmul(q, local_k.transpose(-1, -2))  # (B, H, G, m, l)
        if local_valid is not None:
            local_scores = local_scores.masked_fill(~local_valid[:, None, :, None, :], -MASKED_SCORE)
        parts_q.append(local_scores.reshape(b, h, g * m, n_local))
    if bias:
        parts_q.append(qf.new_ones(b, h, g * m, 1))
    if pad:
        parts_q.append(qf.new_zeros(b, h, g * m, pad))
    q2 = torch.cat(parts_q, dim=-1)

    # Shared rows carry their own keys/values, zeros in the slot channels and (keys only)
    # the padding bias; the l slot rows are the same one-hot rows for every query.
    zeros = shared_k.new_zeros(b, h, n_shared, n_local)
    k_cols, v_cols = [shared_k, zeros], [shared_v, zeros]
    if bias:
        key_bias = torch.where(shared_valid, 0.0, -MASKED_SCORE).to(shared_k.dtype)
        k_cols.append(key_bias[:, None, :, None].expand(b, h, n_shared, 1))
        v_cols.append(shared_v.new_zeros(b, h, n_shared, 1))
    if pad:
        k_cols.append(shared_k.new_zeros(b, h, n_shared, pad))
        v_cols.append(shared_v.new_zeros(b, h, n_shared, pad))
    slot = q.new_zeros(n_local, width + pad)
    slot[:, d : d + n_local] = torch.eye(n_local, dtype=q.dtype, device=q.device)
    slot = slot.expand(b, h, n_local, -1)
    k2 = torch.cat([torch.cat(k_cols, dim=-1), slot], dim=2)
    v2 = torch.cat([torch.cat(v_cols, dim=-1), slot], dim=2)
    o2 = F.scaled_dot_product_attention(q2, k2, v2, scale=scale)
    out = o2[..., :d].reshape(b, h, g, m, d)
    if n_local:
        probs = o2[..., d : d + n_local].reshape(b, h, g, m, n_local)
        out = out + torch.matmul(probs, local_v)
    return out


def topo_attention_split(q: Tensor, k: Tensor, v: Tensor, layout: TokenLayout, variant: str = "topo") -> Tensor:
    """Topo-pack attention of (B, H, N, d) q/k/v with one fused SDPA per part of the mask.

    Patch queries: private keys = own pack's patches (+ own summary), shared = global.
    Summary queries: private keys = own pack's patches, shared = summaries + global.
    The global query sees only itself, so its output is its own value. Outputs of
    padding queries are zero, as in the dense reference.
    """
    check_variant(variant)
    b, h, n, d = q.shape
    if n != layout.num_tokens:
        raise ValueError(f"sequence length {n} does not match the layout ({layout.num_tokens} tokens)")
    token_valid = layout.token_valid()
    p, s = layout.num_packs, layout.slots
    npt = p * s
    if variant == "dense":
        out = folded_attention(q[:, :, :, None], None, None, k, v, shared_valid=token_valid).view(b, h, n, d)
        return out * token_valid[:, None, :, None].to(out.dtype)
    kp, vp = (t[:, :, :npt].view(b, h, p, s, d) for t in (k, v))
    if variant == "patch_sees_summary":
        local_k = torch.cat([kp, k[:, :, npt : npt + p, None]], dim=3)
        local_v = torch.cat([vp, v[:, :, npt : npt + p, None]], dim=3)
        local_valid = torch.cat([layout.patch_valid, layout.summary_valid[..., None]], dim=-1)
    else:
        local_k, local_v, local_valid = kp, vp, layout.patch_valid
    patch_out = folded_attention(
        q[:, :, :npt].view(b, h, p, s, d), local_k, local_v, k[:, :, -1:], v[:, :, -1:], local_valid=local_valid
    )
    # Summaries and the global token are the contiguous tail of the sequence: one shared block.
    summary_out = folded_attention(
        q[:, :, npt : npt + p, None], kp, vp, k[:, :, npt:], v[:, :, npt:],
        local_valid=layout.patch_valid, shared_valid=token_valid[:, npt:],
    )
    out = torch.cat([patch_out.reshape(b, h, npt, d), summary_out.reshape(b, h, p, d), v[:, :, -1:]], dim=2)
    return out * token_valid[:, None, :, None].to(out.dtype)
