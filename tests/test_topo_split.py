"""The split (folded-channel SDPA) attention and ``auto`` selection equal the dense reference.

Outputs and gradients against SDPA with the explicit N×N mask: float64 to rounding
error, float32 to 1e-5, bfloat16 within a stated tolerance (below). On CUDA every
implementation, flex included, is checked with gradients in float32 and bfloat16.
"""

from __future__ import annotations

import math

import pytest
import torch

from slidevl.slidellm.encoder import TokenLayout, TopoPackConfig, TopoPackEncoder, folded_attention, topo_attention
from slidevl.slidellm.encoder import autoselect
from slidevl.slidellm.encoder.synthetic import full_pack_batch

from test_topo_attention import VARIANTS, _qkv, _random_layout, _run

#: bfloat16 keeps 8 significant bits (relative rounding 2^-9). Outputs may differ from
#: the float32 reference by 2^-6 of the reference's largest magnitude, gradients (one
#: more rounded matmul chain) by 2^-5: a few roundings' worth, while a wrong mask or a
#: missing key shifts values by O(1) of that magnitude.
BF16_OUT_TOL = 2.0**-6
BF16_GRAD_TOL = 2.0**-5


def _assert_bf16_close(got: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    err = (got.float() - ref).abs().max().item()
    bound = tol * ref.abs().max().item()
    assert err <= bound, f"{what}: max error {err:.4g} > {bound:.4g} ({tol:.4g} of max |ref|)"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n_packs", [1, 2, 5, 17])
@pytest.mark.parametrize("padding", [True, False])
def test_split_equals_dense_float64(variant: str, n_packs: int, padding: bool) -> None:
    layout = _random_layout(n_packs, padding=padding, seed=n_packs)
    q, k, v, w = _qkv(layout, heads=2, dim=8, dtype=torch.float64)
    ref_out, ref_grads = _run("dense", layout, variant, q, k, v, w)
    out, grads = _run("split", layout, variant, q, k, v, w)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    for name, a, b in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_split_equals_dense_float32(variant: str) -> None:
    layout = _random_layout(40, batch=2, seed=3)
    q, k, v, w = _qkv(layout, heads=4, dim=64, dtype=torch.float32)
    ref_out, ref_grads = _run("dense", layout, variant, q, k, v, w)
    out, grads = _run("split", layout, variant, q, k, v, w)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["split", "gather"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_bfloat16_equals_float32_dense_reference(impl: str, variant: str) -> None:
    """bf16 inputs through the implementation vs the float32 dense reference on the same values."""
    layout = _random_layout(40, batch=2, seed=3)
    q, k, v, w = _qkv(layout, heads=4, dim=32, dtype=torch.float32)
    bf = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    f32 = [t.detach().float().requires_grad_() for t in bf]
    ref_out, ref_grads = _run("dense", layout, variant, *f32, w)
    out, grads = _run(impl, layout, variant, *bf, w.bfloat16())
    assert out.dtype == torch.bfloat16
    _assert_bf16_close(out, ref_out, BF16_OUT_TOL, "output")
    for name, a, b in zip("qkv", grads, ref_grads):
        _assert_bf16_close(a, b, BF16_GRAD_TOL, f"d{name}")


def test_split_padding_is_inert() -> None:
    layout = _random_layout(6, seed=7)
    q, k, v, _ = _qkv(layout, heads=2, dim=8, dtype=torch.float64)
    valid = layout.token_valid()[:, None, :, None]
    out = topo_attention(q, k, v, layout, "topo", impl="split")
    assert (out[~valid.expand_as(out)] == 0).all()
    q2, k2, v2 = (torch.where(valid, t, torch.randn_like(t) * 100) for t in (q, k, v))
    torch.testing.assert_close(topo_attention(q2, k2, v2, layout, "topo", impl="split"), out, rtol=0, atol=1e-12)


def test_folded_attention_matches_naive_and_gradcheck() -> None:
    g = torch.Generator().manual_seed(0)
    b, h, groups, m, l, s, d = 1, 2, 5, 3, 4, 6, 3
    shapes = [(b, h, groups, m, d), (b, h, groups, l, d), (b, h, groups, l, d), (b, h, s, d), (b, h, s, d)]
    q, kl, vl, ks, vs = (torch.randn(sh, generator=g, dtype=torch.float64, requires_grad=True) for sh in shapes)
    lv = torch.rand(b, groups, l, generator=g) < 0.6
    sv = torch.rand(b, s, generator=g) < 0.6
    sv[0, 0] = True  # every query keeps a valid key
    out = folded_attention(q, kl, vl, ks, vs, local_valid=lv, shared_valid=sv)
    keys = torch.cat([kl, ks[:, :, None].expand(b, h, groups, s, d)], dim=3)
    vals = torch.cat([vl, vs[:, :, None].expand(b, h, groups, s, d)], dim=3)
    valid = torch.cat([lv, sv[:, None].expand(b, groups, s)], dim=2)
    scores = (q @ keys.transpose(-1, -2) / math.sqrt(d)).masked_fill(~valid[:, None, :, None, :], float("-inf"))
    torch.testing.assert_close(out, scores.softmax(-1) @ vals, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *t: folded_attention(*t, local_valid=lv, shared_valid=sv), (q, kl, vl, ks, vs))


# ---------------------------------------------------------------- auto selection


@pytest.fixture
def fresh_choices(monkeypatch):
    monkeypatch.setattr(autoselect, "_CHOICES", {})
    monkeypatch.setattr(autoselect, "PROBE_TIMES", {})


def _shape(packs: int = 40, dtype: torch.dtype = torch.float32, grad: bool = True) -> dict:
    return dict(num_packs=packs, pack_size=3, n_heads=2, head_dim=8, variant="topo", grad=grad)


def test_auto_picks_the_fastest_probe_and_caches_per_shape_class(fresh_choices, monkeypatch) -> None:
    calls = []

    def fake_probe(shape, device):
        calls.append(shape)
        return {"split": 2.0, "gather": 1.0} if shape.grad else {"split": 1.0, "gather": 2.0}

    monkeypatch.setattr(autoselect, "_probe", fake_probe)
    cpu = torch.device("cpu")
    assert autoselect.choose_impl(cpu, torch.float32, **_shape(40)) == "gather"
    assert autoselect.choose_impl(cpu, torch.float32, **_shape(33)) == "gather"  # same class (32..45 → 32)
    assert len(calls) == 1 and calls[0].packs == 32
    assert autoselect.choose_impl(cpu, torch.float32, **_shape(40, grad=False)) == "split"
    assert autoselect.choose_impl(cpu, torch.bfloat16, **_shape(40)) == "gather"
    assert len(calls) == 3


def test_real_probe_times_every_cpu_candidate_and_skips_failures(fresh_choices, monkeypatch) -> None:
    from slidevl.slidellm.encoder import attention

    def broken(*args, **kwargs):
        raise RuntimeError("this candidate cannot run here")

    monkeypatch.setattr(attention, "topo_attention_gather", broken)
    state = torch.random.get_rng_state()
    assert autoselect.choose_impl(torch.device("cpu"), torch.float32, **_shape(8)) == "split"
    assert torch.equal(torch.random.get_rng_state(), state), "probing must not consume the global RNG"
    (times,) = autoselect.PROBE_TIMES.values()
    assert set(times) == set(autoselect.CPU_CANDIDATES)
    assert times["gather"] == math.inf and 0 < times["split"] < math.inf


@pytest.mark.parametrize("variant", VARIANTS)
def test_encoder_auto_equals_dense_with_gradients(fresh_choices, variant: str) -> None:
    cfg = dict(patch_dim=16, pack_dim=8, global_dim=8, d_model=32, n_layers=2, n_heads=4, ffn_dim=64, dropout=0.0, mask_variant=variant)
    batch = full_pack_batch(12, 16, pack_dim=8, global_dim=8)
    torch.manual_seed(0)
    # float64: summed over every token, float32 rounding would blur a real difference.
    enc = TopoPackEncoder(TopoPackConfig(**cfg, attention_impl="auto")).double()
    ref = TopoPackEncoder(TopoPackConfig(**cfg, attention_impl="dense")).double()
    ref.load_state_dict(enc.state_dict())
    enc(batch).tokens.square().sum().backward()
    ref(batch).tokens.square().sum().backward()
    (choice,) = autoselect._CHOICES.values()
    assert choice in autoselect.CPU_CANDIDATES
    torch.testing.assert_close(enc(batch).tokens, ref(batch).tokens, rtol=1e-10, atol=1e-10)
    for (name, a), b in zip(enc.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-10, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n_packs", [3, 300])
def test_every_impl_equals_dense_on_cuda(dtype: torch.dtype, variant: str, n_packs: int) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu_layout = _random_layout(n_packs, seed=n_packs)
    layout = TokenLayout(cpu_layout.pack_size, cpu_layout.patch_valid.cuda(), cpu_layout.summary_valid.cuda())
    q, k, v, w = (t.detach().cuda() for t in _qkv(layout, heads=4, dim=64, dtype=torch.float32))
    f32 = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out, ref_grads = _run("dense", layout, variant, *f32, w)
    for impl in ("split", "gather", "flex", "auto"):
        inputs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out, grads = _run(impl, layout, variant, *inputs, w.to(dtype))
        if dtype == torch.float32:
            torch.testing.assert_close(out, ref_out, rtol=2e-5, atol=2e-5, msg=lambda m: f"{impl}: {m}")
            for a, b in zip(grads, ref_grads):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"{impl}: {m}")
        else:
            _assert_bf16_close(out, ref_out, BF16_OUT_TOL, f"{impl} output")
            for name, a, b in zip("qkv", grads, ref_grads):
                _assert_bf16_close(a, b, BF16_GRAD_TOL, f"{impl} d{name}")
