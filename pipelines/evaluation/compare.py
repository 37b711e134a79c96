"""Is the challenger really better than the champion? A paired bootstrap over the evaluation images.

Both models are scored on the same images (same keys, same evaluation set fingerprint), so each image gives a
paired difference ``d = challenger_correct - champion_correct`` in {-1, 0, +1}. The accuracy gain is the mean of
``d``; its sampling noise is estimated by resampling the images with replacement (Efron & Tibshirani's paired
bootstrap, as in the model-comparison literature, e.g. Koehn 2004 for MT). Since ``d`` takes only three values, a
resample of n images is a multinomial draw of how many +1s and -1s it holds: exact, and O(resamples) rather than
O(n x resamples), so a JFT-size evaluation set costs the same milliseconds as a small one.

The challenger wins when the one-sided lower confidence bound of the gain is above ``min_improvement``: better by
more than noise, not just a higher number.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Comparison:
    champion: float  # accuracy of each on the paired images
    challenger: float
    gain: float  # challenger - champion
    lower: float  # one-sided lower confidence bound of the gain
    confidence: float
    min_improvement: float
    images: int
    resamples: int
    better: bool  # lower > min_improvement

    @property
    def margin(self) -> float:
        """How far the observed gain sits above its lower bound: the noise a gain has to clear."""
        return self.gain - self.lower

    def reason(self) -> str:
        verdict = "better" if self.better else "not better"
        return (
            f"challenger {self.challenger:.2%} vs champion {self.champion:.2%} on the same {self.images:,} images: "
            f"gain {self.gain:+.2%}, {self.confidence:.0%} lower bound {self.lower:+.2%} "
            f"({'>' if self.better else '<='} the {self.min_improvement:.2%} required): {verdict} "
            f"(paired bootstrap, {self.resamples:,} resamples)"
        )

    def as_dict(self) -> dict:
        return asdict(self) | {"margin": self.margin}


def paired_bootstrap(
    champion_correct: np.ndarray,
    challenger_correct: np.ndarray,
    *,
    confidence: float = 0.95,
    min_improvement: float = 0.0,
    resamples: int = 10_000,
    seed: int = 0,
) -> Comparison:
    """Compare two models' per-image correctness (booleans over the same images, in the same order)."""
    champion = np.asarray(champion_correct, dtype=bool)
    challenger = np.asarray(challenger_correct, dtype=bool)
    if champion.shape != challenger.shape or champion.ndim != 1:
        raise ValueError(f"need 1-D arrays over the same images, got shapes {champion.shape} and {challenger.shape}")
    n = len(champion)
    if n == 0:
        raise ValueError("no images to compare on")
    if not 0.5 <= confidence < 1.0:
        raise ValueError(f"confidence: must be in [0.5, 1), got {confidence}")
    if resamples < 100:
        raise ValueError(f"resamples: at least 100 for a usable bound, got {resamples}")
    wins = int(np.sum(challenger & ~champion))
    losses = int(np.sum(champion & ~challenger))
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, [wins / n, losses / n, (n - wins - losses) / n], size=resamples)
    gains = (counts[:, 0] - counts[:, 1]) / n
    lower = float(np.quantile(gains, 1.0 - confidence, method="lower"))
    return Comparison(
        champion=float(champion.mean()),
        challenger=float(challenger.mean()),
        gain=(wins - losses) / n,
        lower=lower,
        confidence=confidence,
        min_improvement=min_improvement,
        images=n,
        resamples=resamples,
        better=lower > min_improvement,
    )


def align(champion: dict[str, bool], challenger: dict[str, bool]) -> tuple[np.ndarray, np.ndarray]:
    """The two models' correctness over the images both were scored on, by key; refuses sets that differ."""
    if champion.keys() != challenger.keys():
        only_one = len(champion.keys() ^ challenger.keys())
        raise ValueError(f"the two evaluations cover different images ({only_one} keys in only one): not comparable")
    keys = sorted(champion)
    return np.array([champion[k] for k in keys]), np.array([challenger[k] for k in keys])
