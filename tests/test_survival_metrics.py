"""C-index against lifelines, the NLL against a hand computation, risk groups and the KM plot."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from lifelines.statistics import logrank_test
from lifelines.utils import concordance_index
from PIL import Image
from sksurv.metrics import concordance_index_censored

from slidevl.survival.loss import hazards_and_survival, nll_loss, risk_from_survival
from slidevl.survival.metrics import c_index, plot_km, stratify


def _data(seed: int, n: int, tied: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    if tied:
        # Few distinct times and risks: many tied pairs of both kinds.
        return rng.integers(1, 8, n).astype(float), rng.integers(0, 2, n), rng.integers(0, 4, n).astype(float)
    return rng.exponential(20, n), rng.integers(0, 2, n), rng.normal(size=n)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_c_index_equals_sksurv_and_lifelines(seed: int, tied: bool) -> None:
    t, e, risk = _data(seed, 150, tied)
    ours = c_index(t, e, risk)
    assert ours == concordance_index_censored(e.astype(bool), t, risk)[0]
    # lifelines scores "higher = longer survival", so it gets the negated risk.
    assert ours == pytest.approx(concordance_index(t, -risk, e), abs=1e-12)


def test_c_index_known_values() -> None:
    t = np.array([1.0, 2.0, 3.0, 4.0])
    e = np.array([1, 1, 1, 0])
    assert c_index(t, e, np.array([4.0, 3.0, 2.0, 1.0])) == 1.0
    assert c_index(t, e, np.array([1.0, 2.0, 3.0, 4.0])) == 0.0
    assert c_index(t, e, np.ones(4)) == 0.5
    with pytest.raises(ValueError, match="at least one uncensored"):
        c_index(t, np.zeros(4), np.ones(4))


def _hand_nll(h: np.ndarray, y: int, c: int, alpha: float, eps: float = 1e-7) -> float:
    """Likelihood of one patient written out term by term."""
    s = np.cumprod(1 - h)
    s_before = 1.0 if y == 0 else s[y - 1]  # survived every bin before y
    died = -(math.log(max(s_before, eps)) + math.log(max(h[y], eps)))  # ... then the event in bin y
    survived = -math.log(max(s[y], eps))  # censored: survived bin y too
    uncensored = (1 - c) * died
    censored = c * survived
    return (1 - alpha) * (censored + uncensored) + alpha * uncensored


@pytest.mark.parametrize("alpha", [0.0, 0.15, 0.4])
def test_nll_matches_hand_computation(alpha: float) -> None:
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(12, 4))
    y = rng.integers(0, 4, 12)
    c = rng.integers(0, 2, 12)
    hazards, survival = hazards_and_survival(torch.tensor(logits, dtype=torch.float64))
    ours = nll_loss(hazards, survival, torch.tensor(y), torch.tensor(c), alpha=alpha)
    h = 1 / (1 + np.exp(-logits))
    expected = np.mean([_hand_nll(h[i], y[i], c[i], alpha) for i in range(12)])
    assert float(ours) == pytest.approx(expected, rel=1e-12)
    # survival=None recomputes S from the hazards.
    assert float(nll_loss(hazards, None, torch.tensor(y), torch.tensor(c), alpha=alpha)) == pytest.approx(expected, rel=1e-12)


def test_nll_clamps_zero_probabilities() -> None:
    hazards = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    loss = nll_loss(hazards, None, torch.tensor([1]), torch.tensor([0]))
    assert torch.isfinite(loss) and float(loss) == pytest.approx(-2 * math.log(1e-7))


def test_risk_is_negative_sum_of_survival() -> None:
    _, s = hazards_and_survival(torch.tensor([[0.0, 0.0], [5.0, 5.0]]))
    risk = risk_from_survival(s)
    assert risk[1] > risk[0]
    assert float(risk[0]) == pytest.approx(-(0.5 + 0.25))


def test_stratification_and_km_plot(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    risk = rng.normal(size=80)
    t = rng.exponential(30 * np.exp(-risk))
    e = rng.random(80) < 0.7
    strat = stratify(t, e, risk)
    assert strat.high.sum() == 40 and np.all(risk[strat.high] > strat.threshold)
    ref = logrank_test(t[strat.high], t[~strat.high], event_observed_A=e[strat.high], event_observed_B=e[~strat.high])
    assert strat.p_value == pytest.approx(ref.p_value) and strat.p_value < 0.05
    png = plot_km(tmp_path / "km.png", t, e, strat, title="test")
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 300
    tied = stratify(t, e, np.zeros(80))
    assert math.isnan(tied.p_value) and tied.as_dict()["n_high"] == 0
