"""Blocked ("gather") topo-pack attention in plain torch: linear memory, trains on CPU.

The topo mask decomposes into a few dense pieces:

* patch queries:   a [P, k², k²] block per pack (+ the global key, + own summary);
* summary queries: their own pack's k² patches + all P summaries + the global key;
* the global query: itself only.

All of them are instances of one pattern: G groups of m queries, each group with its
own ``l`` local keys, plus ``S`` keys shared by everyone, under a single softmax over
the ``l + S`` keys. The shared part costs O(G·m·S); for summaries that is the O(P²)
term, so the kernels walk over query groups in chunks and, like flash attention, keep
only the output and the log-sum-exp for backward, recomputing scores chunk by chunk.
Peak memory is linear in P (set by ``chunk_elements``) instead of quadratic.

One autograd Function covers the whole layout and reads/writes q, k, v and their
gradients through views, so no sequence-sized temporaries are made for slicing,
reshaping or concatenating the token groups.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from slidevl.slidellm.encoder.layout import TokenLayout
from slidevl.slidellm.encoder.mask import check_variant

#: Score elements held at once per chunk (8 MiB in float32).
DEFAULT_CHUNK_ELEMENTS = 1 << 21


def _chunk_groups(q: Tensor, n_local: int, n_shared: int, chunk_elements: int) -> int:
    """Groups per chunk so that scores and per-chunk outputs/gradients fit the budget."""
    b, h, g, m, d = q.shape
    per_group = b * h * (m * (n_local + n_shared) + (m + n_local) * d)
    return max(1, min(g, chunk_elements // max(1, per_group)))


def _all_or_none(mask: Tensor | None) -> Tensor | None:
    # An all-True mask costs a masked_fill per chunk for nothing.
    return None if mask is None or bool(mask.all()) else mask


def _scores(qc: Tensor, klc: Tensor, ks: Tensor, lvc: Tensor | None, sv: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    """Masked local (B,H,c,m,l) and shared (B,H,c,m,S) scores of one chunk of groups."""
    b, h, c, m, d = qc.shape
    sl = torch.matmul(qc, klc.transpose(-1, -2)).mul_(scale)
    ss = torch.matmul(qc.reshape(b, h, c * m, d), ks.transpose(-1, -2)).view(b, h, c, m, -1).mul_(scale)
    if lvc is not None:
        sl.masked_fill_(~lvc[:, None, :, None, :], float("-inf"))
    if sv is not None:
        ss.masked_fill_(~sv[:, None, None, None, :], float("-inf"))
    return sl, ss


def _forward_groups(
    q: Tensor,
    kl: Tensor,
    vl: Tensor,
    ks: Tensor,
    vs: Tensor,
    lv: Tensor | None,
    sv: Tensor | None,
    scale: float,
    chunk_elements: int,
    out: Tensor,
    lse: Tensor,
) -> None:
    """Write attention outputs (B,H,G,m,dv) into ``out`` and log-sum-exps into ``lse``."""
    b, h, g, m, _ = q.shape
    n_local, n_shared = kl.shape[3], ks.shape[2]
    c = _chunk_groups(q, n_local, n_shared, chunk_elements)
    for g0 in range(0, g, c):
        g1 = min(g, g0 + c)
        cc = g1 - g0
        sl, ss = _scores(q[:, :, g0:g1], kl[:, :, g0:g1], ks, lv[:, g0:g1] if lv is not None else None, sv, scale)
        mx = ss.amax(-1)
        if n_local:
            mx = torch.maximum(mx, sl.amax(-1))
        # Rows with no valid key at all: keep the arithmetic finite; they output zeros.
        mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
        sl = sl.sub_(mx[..., None]).exp_()
        ss = ss.sub_(mx[..., None]).exp_()
        denom = ss.sum(-1) + sl.sum(-1)
        o = torch.matmul(ss.view(b, h, cc * m, n_shared), vs).view(b, h, cc, m, -1)
        if n_local:
            o += torch.matmul(sl, vl[:, :, g0:g1])
        empty = denom == 0
        out[:, :, g0:g1] = o / torch.where(empty, torch.ones_like(denom), denom)[..., None]
        # +inf log-sum-exp makes every recomputed probability exp(s - inf) = 0.
        lse[:, :, g0:g1] = torch.where(empty, torch.full_like(denom, float("inf")), mx + torch.log(denom))


def _backward_groups(
    q: Tensor,
    kl: Tensor,
    vl: Tensor,
    ks: Tensor,
    vs: Tensor,
    lv: Tensor | None,
    sv: Tensor | None,
    scale: float,
    chunk_elements: int,
    out: Tensor,
    lse: Tensor,
    grad_out: Tensor,
    dq: Tensor,
    dkl: Tensor,
    dvl: Tensor,
    dks: Tensor,
    dvs: Tensor,
) -> None:
    """Accumulate gradients of one grouped attention into the given buffers (all ``+=``)."""
    b, h, g, m, d = q.shape
    n_local, n_shared = kl.shape[3], ks.shape[2]
    c = _chunk_groups(q, n_local, n_shared, chunk_elements)
    for g0 in range(0, g, c):
        g1 = min(g, g0 + c)
        cc = g1 - g0
        qc, klc, vlc = q[:, :, g0:g1], kl[:, :, g0:g1], vl[:, :, g0:g1]
        sl, ss = _scores(qc, klc, ks, lv[:, g0:g1] if lv is not None else None, sv, scale)
        lse_c = lse[:, :, g0:g1, :, None]
        pl = sl.sub_(lse_c).exp_()
        ps = ss.sub_(lse_c).exp_()
        go = grad_out[:, :, g0:g1]
        go_flat = go.reshape(b, h, cc * m, -1)
        dvs += torch.matmul(ps.view(b, h, cc * m, n_shared).transpose(-1, -2), go_flat)
        # The softmax Jacobian's row term, per chunk so no sequence-sized temporary is made.
        dc = (go * out[:, :, g0:g1]).sum(-1, keepdim=True)
        dss = torch.matmul(go_flat, vs.transpose(-1, -2)).view(b, h, cc, m, n_shared)
        dss = dss.sub_(dc).mul_(ps).mul_(scale)
        dss_flat = dss.view(b, h, cc * m, n_shared)
        dks += torch.matmul(dss_flat.transpose(-1, -2), qc.reshape(b, h, cc * m, d))
        dq[:, :, g0:g1] += torch.matmul(dss_flat, ks).view(b, h, cc, m, d)
        if n_local:
            dvl[:, :, g0:g1] += torch.matmul(pl.transpose(-1, -2), go)
            dsl = torch.matmul(go, vlc.transpose(-1, -2)).sub_(dc).mul_(pl).mul_(scale)
            dkl[:, :, g0:g1] += torch.matmul(dsl.transpose(-1, -2), qc)
            dq[:, :, g0:g1] += torch.matmul(dsl, klc)


class _GroupedAttention(torch.autograd.Function):
    """Softmax attention over [local keys per group ‖ shared keys], chunked over groups."""

    @staticmethod
    def forward(ctx, q, kl, vl, ks, vs, lv, sv, scale, chunk_elements):  # type: ignore[override]
        b, h, g, m, _ = q.shape
        out = q.new_empty(b, h, g, m, vs.shape[-1])
        lse = q.new_empty(b, h, g, m)
        _forward_groups(q, kl, vl, ks, vs, lv, sv, scale, chunk_elements, out, lse)
        ctx.save_for_backward(q, kl, vl, ks, vs, out, lse)
        ctx.masks = (lv, sv)
        ctx.args = (scale, chunk_elements)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        q, kl, vl, ks, vs, out, lse = ctx.saved_tensors
        grads = [torch.zeros_like(t) for t in (q, kl, vl, ks, vs)]
        _backward_groups(q, kl, vl, ks, vs, *ctx.masks, *ctx.args, out, lse, grad_out.contiguous(), *grads)
        return (*grads, None, None, None, None)


def grouped_attention(
    q: Tensor,
    local_k: Tensor | None,
    local_v: Tensor | None,
    shared_k: Tensor,
    shared_v: Tensor,
    *,
    local_valid: Tensor | None = None,
    shared_valid: Tensor | None = None,
    scale: float | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> Tensor:
    """Attention of grouped queries over per-group local keys plus shared keys.

    Args:
        q: (B, H, G, m, d) queries, ``m`` per group.
        local_k, local_v: (B, H, G, l, d) keys/values private to each group, or None.
        shared_k, shared_v: (B, H, S, d) keys/values every query sees.
        local_valid: (B, G, l) bool, False keys are ignored; None = all valid.
        shared_valid: (B, S) bool; None = all valid.
        scale: score scale, default 1/sqrt(d).
        chunk_elements: upper bound on score elements held at once.

    Returns:
        (B, H, G, m, d) outputs; a query without any valid key gets zeros.
    """
    b, h, g, m, d = q.shape
    if local_k is None or local_v is None:
        local_k = q.new_zeros(b, h, g, 0, d)
        local_v = q.new_zeros(b, h, g, 0, shared_v.shape[-1])
        local_valid = None
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    return _GroupedAttention.apply(
        q, local_k, local_v, shared_k, shared_v, _all_or_none(local_valid), _all_or_none(shared_valid), scale, int(chunk_elements)
    )


class _TopoGatherAttention(torch.autograd.Function):
    """The whole topo-pack layout in one Function, working on views of q, k, v."""

    @staticmethod
    def forward(ctx, q, k, v, patch_valid, summary_valid, token_valid, variant, scale, chunk):  # type: ignore[override]
        # q, k, v are usually strided views of one fused qkv projection. Every reshape
        # below only splits or re-merges the token axis, so they stay views and nothing
        # sequence-sized is copied (or saved twice for backward).
        b, h, n, d = q.shape
        p, s = patch_valid.shape[1], patch_valid.shape[2]
        npt = p * s
        out = q.new_zeros(b, h, n, v.shape[-1])
        lse = q.new_zeros(b, h, n)
        for args, o, l in _parts(q, k, v, patch_valid, summary_valid, token_valid, variant, out, lse, p, s, npt, n):
            _forward_groups(*args, scale, chunk, o, l)
        if variant != "dense":
            out[:, :, -1] = v[:, :, -1]  # the global token attends only to itself
        out *= token_valid[:, None, :, None].to(out.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.masks = (patch_valid, summary_valid, token_valid)
        ctx.args = (variant, scale, chunk)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        patch_valid, summary_valid, token_valid = ctx.masks
        variant, scale, chunk = ctx.args
        b, h, n, d = q.shape
        p, s = patch_valid.shape[1], patch_valid.shape[2]
        npt = p * s
        # Padding queries output constant zeros: their gradients must not flow anywhere.
        if not bool(token_valid.all()):
            grad_out = grad_out * token_valid[:, None, :, None].to(grad_out.dtype)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        parts = _parts(q, k, v, patch_valid, summary_valid, token_valid, variant, out, lse, p, s, npt, n)
        grads = _parts(dq, dk, dv, patch_valid, summary_valid, token_valid, variant, grad_out, None, p, s, npt, n, grads=True)
        for (args, o, l), (gargs, go, _) in zip(parts, grads):
            dq_p, dkl, dvl, dks, dvs = gargs[:5]
            if isinstance(dkl, tuple):
                # patch_sees_summary: local keys were [pack patches ‖ own summary], a copy;
                # route its gradient back to the two places it came from.
                dkl_buf, dvl_buf = args[1].new_zeros(args[1].shape), args[2].new_zeros(args[2].shape)
                _backward_groups(*args, scale, chunk, o, l, go, dq_p, dkl_buf, dvl_buf, dks, dvs)
                dkl[0].add_(dkl_buf[:, :, :, :s])
                dkl[1].add_(dkl_buf[:, :, :, s])
                dvl[0].add_(dvl_buf[:, :, :, :s])
                dvl[1].add_(dvl_buf[:, :, :, s])
            else:
                _backward_groups(*args, scale, chunk, o, l, go, dq_p, dkl, dvl, dks, dvs)
        if variant != "dense":
            dv[:, :, -1] += grad_out[:, :, -1]
        return dq, dk, dv, None, None, None, None, None, None


def _parts(q, k, v, patch_valid, summary_valid, token_valid, variant, out, lse, p, s, npt, n, grads=False):
    """(grouped-attention arguments, output view, lse view) for every part of the layout.

    With ``grads=True`` the same views are taken on gradient buffers; local keys built
    by concatenation are then returned as (patch view, summary view) pairs.
    """
    b, h = q.shape[:2]
    if variant == "dense":
        args = (q[:, :, :, None], q.new_zeros(b, h, n, 0, q.shape[-1]), v.new_zeros(b, h, n, 0, v.shape[-1]), k, v, None, _all_or_none(token_valid))
        return [(args, out[:, :, :, None], lse[:, :, :, None] if lse is not None else None)]
    qp, kp, vp = (t[:, :, :npt].view(b, h, p, s, -1) for t in (q, k, v))
    pv = _all_or_none(patch_valid)
    if variant == "patch_sees_summary":
        if grads:
            kl = (kp, k[:, :, npt : npt + p])
            vl = (vp, v[:, :, npt : npt + p])
        else:
            kl = torch.cat([kp, k[:, :, npt : npt + p, None]], dim=3)
            vl = torch.cat([vp, v[:, :, npt : npt + p, None]], dim=3)
        lv = _all_or_none(torch.cat([patch_valid, summary_valid[..., None]], dim=-1))
    else:
        kl, vl, lv = kp, vp, pv
    patch_part = (
        (qp, kl, vl, k[:, :, -1:], v[:, :, -1:], lv, None),
        out[:, :, :npt].view(b, h, p, s, -1),
        lse[:, :, :npt].view(b, h, p, s) if lse is not None else None,
    )
    # Summaries and the global token are the contiguous tail of the sequence: one shared block.
    summary_part = (
        (q[:, :, npt : npt + p, None], kp, vp, k[:, :, npt:], v[:, :, npt:], pv, _all_or_none(token_valid[:, npt:])),
        out[:, :, npt : npt + p, None],
        lse[:, :, npt : npt + p, None] if lse is not None else None,
    )
    return [patch_part, summary_part]


def topo_attention_gather(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: TokenLayout,
    variant: str = "topo",
    *,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> Tensor:
    """Topo-pack attention for (B, H, N, d) q/k/v in the layout's token order.

    Cost is O(N·k² + P²) time and O(N·k² + chunk) memory for the ``topo`` and
    ``patch_sees_summary`` variants; ``dense`` is O(N²) time but still chunked memory.
    Outputs of padding queries are zero.
    """
    check_variant(variant)
    n, d = q.shape[2], q.shape[3]
    if n != layout.num_tokens:
        raise ValueError(f"sequence length {n} does not match the layout ({layout.num_tokens} tokens)")
    return _TopoGatherAttention.apply(
        q,
        k,
        v,
        layout.patch_valid,
        layout.summary_valid,
        layout.token_valid(),
        variant,
        1.0 / math.sqrt(d),
        int(chunk_elements),
    )
