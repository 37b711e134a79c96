"""The paired bootstrap that gates promotion: better by more than noise, or not promoted."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.evaluation.compare import align, paired_bootstrap


def _pair(n: int, wins: int, losses: int, both: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    champion, challenger = np.zeros(n, bool), np.zeros(n, bool)
    challenger[:wins] = True
    champion[wins : wins + losses] = True
    champion[wins + losses : wins + losses + both] = challenger[wins + losses : wins + losses + both] = True
    order = np.random.default_rng(seed).permutation(n)
    return champion[order], challenger[order]


def test_the_same_model_twice_is_not_better():
    champion, _ = _pair(1000, 0, 0, 900)
    result = paired_bootstrap(champion, champion.copy())
    assert result.gain == 0 and result.lower <= 0 and not result.better
    assert result.champion == result.challenger == 0.9


def test_a_clear_gain_is_better_and_a_gain_within_noise_is_not():
    clear = paired_bootstrap(*_pair(1000, 60, 10, 800))
    assert clear.gain == pytest.approx(0.05) and clear.better
    assert 0.02 < clear.lower < 0.05  # sd of the gain ~ sqrt(70)/1000 ~ 0.0084: lower ~ 0.05 - 1.645 * 0.0084
    noisy = paired_bootstrap(*_pair(1000, 12, 8, 800))  # +0.4 points from 20 disagreements
    assert noisy.gain == pytest.approx(0.004) and not noisy.better and noisy.lower < 0
    assert "not better" in noisy.reason() and "same 1,000 images" in noisy.reason()


def test_min_improvement_and_confidence_raise_the_bar():
    pair = _pair(1000, 40, 10, 800)  # +3 points
    assert paired_bootstrap(*pair).better
    assert not paired_bootstrap(*pair, min_improvement=0.03).better
    loose, strict = paired_bootstrap(*pair, confidence=0.8), paired_bootstrap(*pair, confidence=0.999)
    assert strict.lower < loose.lower


def test_the_multinomial_shortcut_matches_resampling_the_images():
    champion, challenger = _pair(400, 30, 18, 300, seed=3)
    fast = paired_bootstrap(champion, challenger, resamples=20_000, seed=1)
    rng = np.random.default_rng(2)
    d = challenger.astype(float) - champion.astype(float)
    gains = np.array([d[rng.integers(0, len(d), len(d))].mean() for _ in range(20_000)])
    assert fast.lower == pytest.approx(np.quantile(gains, 0.05), abs=0.004)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="same images"):
        paired_bootstrap(np.ones(3, bool), np.ones(4, bool))
    with pytest.raises(ValueError, match="no images"):
        paired_bootstrap(np.ones(0, bool), np.ones(0, bool))
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap(np.ones(3, bool), np.ones(3, bool), confidence=1.0)
    with pytest.raises(ValueError, match="different images"):
        align({"a": True, "b": False}, {"a": True, "c": True})
    champion, challenger = align({"b": False, "a": True}, {"a": False, "b": True})
    assert champion.tolist() == [True, False] and challenger.tolist() == [False, True]
