"""Log-domain batched Sinkhorn against POT, including where the plain-domain kernel underflows."""

from __future__ import annotations

import warnings

import numpy as np
import ot
import pytest
import torch
import torch.nn.functional as F

from slidevl.survival.sinkhorn import sinkhorn_log


def _cosine_cost(k: int, m: int, dim: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(k, dim, generator=g), dim=1)
    y = F.normalize(torch.randn(m, dim, generator=g), dim=1)
    return 1 - x @ y.T


def _pot(cost: torch.Tensor, eps: float, iters: int, tol: float, a: np.ndarray | None = None) -> np.ndarray:
    k, m = cost.shape
    a = np.full(k, 1 / k) if a is None else a
    return ot.sinkhorn(a, np.full(m, 1 / m), cost.double().numpy(), eps, method="sinkhorn_log",
                       numItermax=iters, stopThr=tol, warn=False)


def test_same_iterations_give_the_same_plan_as_pot() -> None:
    cost = _cosine_cost(8, 50).double()
    for iters in (1, 7, 37):
        ours = sinkhorn_log(cost, 0.1, max_iter=iters, tol=0.0)
        assert ours.n_iter == iters
        np.testing.assert_allclose(ours.plan.numpy(), _pot(cost, 0.1, iters, 0.0), rtol=1e-7, atol=1e-15)


def test_converged_plan_matches_pot_and_marginals() -> None:
    cost = _cosine_cost(16, 300, seed=1)
    ours = sinkhorn_log(cost, 0.1, max_iter=1000, tol=1e-9)
    ref = _pot(cost, 0.1, 1000, 1e-9)
    np.testing.assert_allclose(ours.plan.double().numpy(), ref, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(ours.plan.sum(1).numpy(), np.full(16, 1 / 16), rtol=1e-5)
    np.testing.assert_allclose(ours.plan.sum(0).numpy(), np.full(300, 1 / 300), rtol=1e-4)
    assert ours.error < 1e-6


@pytest.mark.parametrize("eps", [0.1, 0.01])
def test_ten_thousand_tokens_match_pot_log(eps: float) -> None:
    cost = _cosine_cost(16, 10_000, seed=2)
    ours = sinkhorn_log(cost, eps, max_iter=100, tol=1e-7)
    ref = _pot(cost, eps, 100, 1e-7)
    assert np.isfinite(ours.plan.numpy()).all()
    np.testing.assert_allclose(ours.plan.double().numpy(), ref, rtol=1e-4, atol=1e-4 * ref.max())
    if eps == 0.01:
        # In float32 the Gibbs kernel exp(-C/eps) underflows to exact zeros here, so the
        # plain-domain iteration cannot meet the marginals; the log domain does.
        assert (torch.exp(-cost / eps) == 0).float().mean() > 0.1
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plain = ot.sinkhorn(np.full(16, 1 / 16, np.float32), np.full(10_000, 1e-4, np.float32), cost.numpy(), eps,
                                numItermax=100, warn=False)
        plain_err = np.abs(np.nan_to_num(plain).sum(0) - 1e-4).max() * 1e4
        ours_err = np.abs(ours.plan.sum(0).numpy() - 1e-4).max() * 1e4
        assert ours_err < 1e-3 < plain_err


def test_batched_with_padding_equals_separate_problems() -> None:
    costs = torch.stack([_cosine_cost(4, 60, seed=s) for s in range(3)])
    a = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.float32)
    a = a / a.sum(1, keepdim=True)
    batched = sinkhorn_log(costs, 0.1, a=a, max_iter=500, tol=1e-9).plan
    for i in range(3):
        rows = int((a[i] > 0).sum())
        alone = sinkhorn_log(costs[i, :rows], 0.1, max_iter=500, tol=1e-9).plan
        torch.testing.assert_close(batched[i, :rows], alone, rtol=1e-5, atol=1e-9)
        assert torch.all(batched[i, rows:] == 0)
        ref = _pot(costs[i, :rows], 0.1, 500, 1e-9)
        np.testing.assert_allclose(batched[i, :rows].double().numpy(), ref, rtol=1e-4, atol=1e-9)


def test_plan_carries_no_gradient() -> None:
    cost = _cosine_cost(4, 20).requires_grad_(True)
    plan = sinkhorn_log(cost, 0.1).plan
    assert not plan.requires_grad
    with pytest.raises(ValueError, match="eps must be > 0"):
        sinkhorn_log(cost, 0.0)
