"""The linear-memory attention paths equal the dense masked reference.

Outputs and gradients of the gather path (CPU) and the flex_attention path (CUDA when
available; its block mask and mask_mod are checked on CPU too) against SDPA with the
explicit N×N boolean mask.
"""

from __future__ import annotations

import math

import pytest
import torch

from slidevl.slidellm.encoder import TokenLayout, dense_mask, grouped_attention, topo_attention
from slidevl.slidellm.encoder.flex import topo_block_mask


VARIANTS = ["topo", "patch_sees_summary", "dense"]


def _random_layout(n_packs: int, *, batch: int = 2, pack_size: int = 3, padding: bool = True, seed: int = 0) -> TokenLayout:
    g = torch.Generator().manual_seed(seed)
    s = pack_size * pack_size
    if not padding:
        return TokenLayout(pack_size, torch.ones(batch, n_packs, s, dtype=torch.bool), torch.ones(batch, n_packs, dtype=torch.bool))
    patch_valid = torch.rand(batch, n_packs, s, generator=g) < 0.7
    summary_valid = torch.rand(batch, n_packs, generator=g) < 0.8
    # the last slide is shorter: its trailing packs are batch padding
    cut = max(1, n_packs - max(1, n_packs // 3))
    patch_valid[-1, cut:] = False
    summary_valid[-1, cut:] = False
    patch_valid[0, 0] = False  # a pack whose patches are all missing
    return TokenLayout(pack_size, patch_valid, summary_valid)


def _qkv(layout: TokenLayout, heads: int, dim: int, dtype: torch.dtype, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    shape = (layout.batch_size, heads, layout.num_tokens, dim)
    return [torch.randn(shape, generator=g, dtype=dtype).requires_grad_(True) for _ in range(3)] + [
        torch.randn(shape, generator=g, dtype=dtype)
    ]


def _run(impl: str, layout, variant, q, k, v, weight, **kw):
    out = topo_attention(q, k, v, layout, variant, impl=impl, **kw)
    grads = torch.autograd.grad((out * weight).sum(), [q, k, v])
    return out.detach(), grads


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n_packs", [1, 2, 5, 17])
@pytest.mark.parametrize("padding", [True, False])
def test_gather_equals_dense_float64(variant: str, n_packs: int, padding: bool) -> None:
    layout = _random_layout(n_packs, padding=padding, seed=n_packs)
    q, k, v, w = _qkv(layout, heads=2, dim=8, dtype=torch.float64)
    ref_out, ref_grads = _run("dense", layout, variant, q, k, v, w)
    # a tiny chunk budget forces many chunks, exercising the chunk boundaries
    out, grads = _run("gather", layout, variant, q, k, v, w, chunk_elements=64)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    for name, a, b in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_gather_equals_dense_float32_larger(variant: str) -> None:
    layout = _random_layout(40, batch=1, seed=3)
    q, k, v, w = _qkv(layout, heads=4, dim=16, dtype=torch.float32)
    ref_out, ref_grads = _run("dense", layout, variant, q, k, v, w)
    out, grads = _run("gather", layout, variant, q, k, v, w, chunk_elements=1000)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_chunking_does_not_change_results() -> None:
    layout = _random_layout(23, batch=1, seed=5)
    q, k, v, w = _qkv(layout, heads=2, dim=8, dtype=torch.float64)
    whole = _run("gather", layout, "topo", q, k, v, w, chunk_elements=1 << 30)
    tiny = _run("gather", layout, "topo", q, k, v, w, chunk_elements=1)
    torch.testing.assert_close(whole[0], tiny[0], rtol=1e-12, atol=1e-12)
    for a, b in zip(whole[1], tiny[1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", ["gather", "dense"])
def test_padding_is_inert(impl: str) -> None:
    """Padding keys never receive attention and padded queries output zeros."""
    layout = _random_layout(6, seed=7)
    q, k, v, _ = _qkv(layout, heads=2, dim=8, dtype=torch.float64)
    valid = layout.token_valid()[:, None, :, None]
    out = topo_attention(q, k, v, layout, "topo", impl=impl)
    assert (out[~valid.expand_as(out)] == 0).all()
    q2, k2, v2 = (torch.where(valid, t, torch.randn_like(t) * 100) for t in (q, k, v))
    out2 = topo_attention(q2, k2, v2, layout, "topo", impl=impl)
    torch.testing.assert_close(out2, out, rtol=0, atol=1e-12)


def test_grouped_attention_matches_naive_and_gradcheck() -> None:
    g = torch.Generator().manual_seed(0)
    b, h, groups, m, l, s, d = 1, 2, 5, 3, 4, 6, 3
    q = torch.randn(b, h, groups, m, d, generator=g, dtype=torch.float64, requires_grad=True)
    kl = torch.randn(b, h, groups, l, d, generator=g, dtype=torch.float64, requires_grad=True)
    vl = torch.randn(b, h, groups, l, d, generator=g, dtype=torch.float64, requires_grad=True)
    ks = torch.randn(b, h, s, d, generator=g, dtype=torch.float64, requires_grad=True)
    vs = torch.randn(b, h, s, d, generator=g, dtype=torch.float64, requires_grad=True)
    lv = torch.rand(b, groups, l, generator=g) < 0.6
    sv = torch.rand(b, s, generator=g) < 0.6
    sv[0, 0] = True
    out = grouped_attention(q, kl, vl, ks, vs, local_valid=lv, shared_valid=sv, chunk_elements=7)
    # naive: concatenate keys per group, mask, softmax
    keys = torch.cat([kl, ks[:, :, None].expand(b, h, groups, s, d)], dim=3)
    vals = torch.cat([vl, vs[:, :, None].expand(b, h, groups, s, d)], dim=3)
    valid = torch.cat([lv, sv[:, None].expand(b, groups, s)], dim=2)
    scores = q @ keys.transpose(-1, -2) / math.sqrt(d)
    scores = scores.masked_fill(~valid[:, None, :, None, :], float("-inf"))
    naive = scores.softmax(-1) @ vals
    torch.testing.assert_close(out, naive, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda *t: grouped_attention(*t, local_valid=lv, shared_valid=sv, chunk_elements=7), (q, kl, vl, ks, vs)
    )


def test_query_without_any_key_outputs_zeros() -> None:
    q = torch.randn(1, 1, 2, 1, 4, dtype=torch.float64, requires_grad=True)
    ks = torch.randn(1, 1, 3, 4, dtype=torch.float64, requires_grad=True)
    vs = torch.randn(1, 1, 3, 4, dtype=torch.float64, requires_grad=True)
    out = grouped_attention(q, None, None, ks, vs, shared_valid=torch.zeros(1, 3, dtype=torch.bool))
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(ks.grad).all()


# ---------------------------------------------------------------- flex_attention


def _needed_blocks(layout: TokenLayout, variant: str, block: int) -> torch.Tensor:
    mask = dense_mask(layout, variant)
    b, n, _ = mask.shape
    nb = -(-n // block)
    padded = torch.zeros(b, nb * block, nb * block, dtype=torch.bool)
    padded[:, :n, :n] = mask
    return padded.view(b, nb, block, nb, block).any(dim=(2, 4))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n_packs,block", [(1, 16), (7, 16), (30, 32), (50, 128)])
def test_flex_block_mask_covers_every_allowed_pair(variant: str, n_packs: int, block: int) -> None:
    full = _random_layout(n_packs, batch=1, padding=False, seed=n_packs)
    listed = topo_block_mask(full, variant, block_size=block).to_dense().bool()[:, 0]
    needed = _needed_blocks(full, variant, block)
    # with every token valid the analytic block list is exact
    assert torch.equal(listed, needed)
    padded = _random_layout(n_packs, seed=n_packs)
    listed = topo_block_mask(padded, variant, block_size=block).to_dense().bool()[:, 0]
    assert not (_needed_blocks(padded, variant, block) & ~listed).any()


@pytest.mark.parametrize("variant", VARIANTS)
def test_flex_block_mask_with_narrower_key_blocks_is_exact(variant: str) -> None:
    """(query, key) block sizes: a pack is only k² keys wide, so key blocks may be narrower."""
    layout = _random_layout(30, batch=1, padding=False, seed=1)
    listed = topo_block_mask(layout, variant, block_size=(32, 16)).to_dense().bool()[:, 0]
    mask = dense_mask(layout, variant)
    n = mask.shape[1]
    nq, nk = -(-n // 32), -(-n // 16)
    padded = torch.zeros(1, nq * 32, nk * 16, dtype=torch.bool)
    padded[:, :n, :n] = mask
    assert torch.equal(listed, padded.view(1, nq, 32, nk, 16).any(dim=(2, 4)))


@pytest.mark.parametrize("variant", VARIANTS)
def test_flex_mask_mod_forward_equals_dense_on_cpu(variant: str) -> None:
    """Eager flex_attention on CPU (forward only) applies the same per-element rule."""
    import warnings

    layout = _random_layout(9, seed=11)
    q, k, v = (t.detach() for t in _qkv(layout, heads=2, dim=8, dtype=torch.float32)[:3])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "called without torch.compile" is expected here
        ref = topo_attention(q, k, v, layout, variant, impl="dense")
        out = topo_attention(q, k, v, layout, variant, impl="flex", flex_compile=False)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["topo", "patch_sees_summary"])
def test_compiled_flex_forward_uses_block_sparsity_correctly_on_cpu(variant: str) -> None:
    """Compiled flex on CPU honours the block list, so a missing block would show here."""
    layout = _random_layout(40, seed=13)
    q, k, v = (t.detach() for t in _qkv(layout, heads=2, dim=16, dtype=torch.float32)[:3])
    with torch.no_grad():
        ref = topo_attention(q, k, v, layout, variant, impl="dense")
        out = topo_attention(q, k, v, layout, variant, impl="flex", flex_compile=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex_attention training path needs CUDA")
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n_packs", [3, 40, 300])
def test_flex_equals_dense_on_cuda_with_gradients(variant: str, n_packs: int) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    layout = _random_layout(n_packs, seed=n_packs)
    layout = TokenLayout(layout.pack_size, layout.patch_valid.cuda(), layout.summary_valid.cuda())
    q, k, v, w = (t.detach().cuda().requires_grad_(t.requires_grad) for t in _qkv(layout, heads=4, dim=64, dtype=torch.float32))
    ref_out, ref_grads = _run("dense", layout, variant, q, k, v, w)
    out, grads = _run("flex", layout, variant, q, k, v, w)
    torch.testing.assert_close(out, ref_out, rtol=2e-5, atol=2e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    g_out, g_grads = _run("gather", layout, variant, q, k, v, w)
    torch.testing.assert_close(g_out, ref_out, rtol=2e-5, atol=2e-5)
    for a, b in zip(g_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
