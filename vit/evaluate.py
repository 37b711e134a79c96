"""Evaluation: top-k accuracy over a data iterable, and few-shot linear accuracy of frozen features."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
import torch
from torch import nn


def topk_hits(logits: torch.Tensor, targets: torch.Tensor, k: int) -> int:
    """Samples whose top-k predictions include a true label (class ids (B,) or multi-hot (B, K))."""
    top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices
    if targets.ndim == 1:
        return int((top == targets[:, None]).any(dim=-1).sum())
    return int((targets.gather(1, top) > 0).any(dim=-1).sum())


@torch.no_grad()
def topk_accuracy(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], ks: tuple[int, ...] = (1, 5)
) -> dict[str, float]:
    """Fraction of samples whose label is among the top-k logits, as ``{"top1": ..., "top5": ...}``."""
    model.eval()
    correct = {k: 0 for k in ks}
    total = 0
    for images, labels in batches:
        logits = model(images)
        for k in ks:
            correct[k] += topk_hits(logits, labels, k)
        total += labels.shape[0]
    if total == 0:
        raise ValueError("no samples to evaluate")
    return {f"top{k}": correct[k] / total for k in ks}


# --- few-shot linear evaluation ---------------------------------------------------------------------
#
# The paper (Sec. 4.1) also reports few-shot accuracy: a regularised least-squares regression from the
# frozen representation of k images per class to {-1, 1}^K targets, solved in closed form. As in
# big_vision's evaluator: features are standardised with the few-shot subset's mean and std (+1e-5), a
# constant feature of 100 carries the bias (so its penalty is 1e4 times weaker than the others'), and
# the ridge problem goes through one eigendecomposition of the Gram matrix, which makes every further
# l2 strength nearly free. Ours: float64 throughout, and l2 picked from a grid on held-out examples
# (big_vision uses one fixed l2).

BIAS_FEATURE = 100.0
L2_REGS = tuple(2.0**k for k in range(-5, 15))  # the grid fewshot_accuracy picks from


@torch.no_grad()
def extract_features(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-logits representations of every image: float32 features (N, D) and labels (N,), on the CPU.

    ``batches`` yields model inputs as ``topk_accuracy`` takes them (normalised, on the model's device).
    The model is put in eval mode and given back in the mode it was in.
    """
    was_training = model.training
    model.eval()
    features, labels = [], []
    try:
        for images, targets in batches:
            tokens = model.forward_features(images)  # (B, T, D)
            features.append(model.forward_head(tokens, pre_logits=True).float().cpu())  # (B, D)
            labels.append(targets.cpu())
    finally:
        model.train(was_training)
    if not features:
        raise ValueError("no samples to extract features from")
    return torch.cat(features), torch.cat(labels)


class _Ridge:
    """Ridge regression min_W |XW - Y|^2 + l2 |W|^2 for many l2 from one eigendecomposition (float64).

    Primal (N >= D): W = (X^T X + l2 I)^-1 X^T Y, with X^T X = Q diag(e) Q^T: W = Q diag(1/(e + l2)) Q^T X^T Y.
    Dual (D > N):    W = X^T (X X^T + l2 I)^-1 Y, with X X^T = Q diag(e) Q^T: W = X^T Q diag(1/(e + l2)) Q^T Y.
    Both are ``left @ diag(1 / (e + l2)) @ right``; the dual only needs an (N, N) problem, cheap with few shots.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, method: Literal["auto", "primal", "dual"] = "auto"):
        x, y = x.double(), y.double()
        primal = x.shape[0] >= x.shape[1] if method == "auto" else method == "primal"
        if primal:
            self.eigs, q = torch.linalg.eigh(x.T @ x)  # (D,), (D, D)
            self.left, self.right = q, q.T @ (x.T @ y)  # (D, D), (D, K)
        else:
            self.eigs, q = torch.linalg.eigh(x @ x.T)  # (N,), (N, N)
            self.left, self.right = x.T @ q, q.T @ y  # (D, N), (N, K)

    def weights(self, l2_reg: float) -> torch.Tensor:
        if not l2_reg > 0:
            raise ValueError(f"l2_reg must be positive, got {l2_reg}")
        return (self.left / (self.eigs + l2_reg)) @ self.right  # (D, K)


def ridge_regression(
    x: torch.Tensor,
    y: torch.Tensor,
    l2_regs: Sequence[float],
    *,
    method: Literal["auto", "primal", "dual"] = "auto",
) -> torch.Tensor:
    """Closed-form ridge weights (L, D, K) in float64 for inputs x (N, D), targets y (N, K), each l2 in ``l2_regs``.

    ``method="auto"`` uses the (D, D) primal form when N >= D and the (N, N) dual form otherwise; they agree.
    """
    ridge = _Ridge(x, y, method)
    return torch.stack([ridge.weights(l2) for l2 in l2_regs])


def _as_tensor(a) -> torch.Tensor:
    return a.detach().cpu() if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))


def _check_labels(y: torch.Tensor, num_classes: int, name: str) -> torch.Tensor:
    y = y.long()
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"{name} has labels outside [0, {num_classes})")
    return y


def fewshot_linear(
    train_x,
    train_y,
    test_x,
    test_y,
    num_classes: int,
    *,
    l2_reg: float | Sequence[float] = 2.0**10,
    val_x=None,
    val_y=None,
) -> float:
    """Test accuracy of the closed-form least-squares classifier fitted on (train_x (N, D), train_y (N,)).

    Targets are 2 * one_hot - 1; features are standardised with train_x's statistics and given a bias
    feature. With several ``l2_reg`` values, the one with the best accuracy on (val_x, val_y) is used
    (ties: the lowest squared error on the val targets), so several values need val data.
    """
    train_x, test_x = _as_tensor(train_x).double(), _as_tensor(test_x).double()
    train_y = _check_labels(_as_tensor(train_y), num_classes, "train_y")
    test_y = _check_labels(_as_tensor(test_y), num_classes, "test_y")
    if train_x.shape[0] == 0 or test_x.shape[0] == 0:
        raise ValueError("few-shot evaluation needs at least one train and one test example")
    l2_regs = np.atleast_1d(np.asarray(l2_reg, dtype=np.float64)).tolist()
    if not l2_regs:
        raise ValueError("no l2_reg given")

    mean, std = train_x.mean(dim=0), train_x.std(dim=0, unbiased=False) + 1e-5

    def prepare(x: torch.Tensor) -> torch.Tensor:  # (n, D) -> (n, D + 1) standardised, with the bias feature
        x = (x - mean) / std
        return torch.cat([x, torch.full((x.shape[0], 1), BIAS_FEATURE, dtype=x.dtype)], dim=1)

    targets = 2.0 * torch.nn.functional.one_hot(train_y, num_classes).double() - 1.0  # (N, K)
    ridge = _Ridge(prepare(train_x), targets)
    if len(l2_regs) == 1:
        weights = ridge.weights(l2_regs[0])
    else:
        if val_x is None or val_y is None or len(val_y) == 0:
            raise ValueError("choosing among several l2_reg values needs val_x/val_y; or pass one l2_reg")
        val_x = prepare(_as_tensor(val_x).double())
        val_y = _check_labels(_as_tensor(val_y), num_classes, "val_y")
        val_targets = 2.0 * torch.nn.functional.one_hot(val_y, num_classes).double() - 1.0

        def score(w: torch.Tensor) -> tuple[float, float]:  # higher is better: accuracy, then -squared error
            scores = val_x @ w
            accuracy = (scores.argmax(dim=1) == val_y).double().mean().item()
            return accuracy, -((scores - val_targets) ** 2).mean().item()

        weights = max((ridge.weights(l2) for l2 in l2_regs), key=score)
    predictions = (prepare(test_x) @ weights).argmax(dim=1)
    return (predictions == test_y).double().mean().item()


def fewshot_accuracy(
    train_x,
    train_y,
    test_x,
    test_y,
    num_classes: int,
    shots: Sequence[int] = (1, 5, 10, 25),
    *,
    seed: int = 0,
    l2_regs: float | Sequence[float] = L2_REGS,
    val_per_class: int = 10,
) -> dict[str, float]:
    """k-shot linear accuracy for each k in ``shots``: ``{"fewshot/1shot": ..., "fewshot/5shot": ...}``.

    From (train_x, train_y), the features and labels of a labelled pool, each class's examples are
    shuffled once with ``seed``: the k-shot subset is the first k of them (so subsets are nested across
    shots), and up to ``val_per_class`` of the last ones, never in any subset, form the validation set
    that picks l2 from ``l2_regs`` (fixed across shots). A single l2 skips the validation set.
    Raises ValueError if a class has fewer than max(shots) examples.
    """
    train_y = _check_labels(_as_tensor(train_y), num_classes, "train_y")
    train_x = _as_tensor(train_x)
    if not shots or min(shots) < 1:
        raise ValueError(f"shots must be positive, got {tuple(shots)}")
    max_shots = max(shots)
    rng = np.random.default_rng(seed)
    labels = train_y.numpy()
    by_class = np.split(np.argsort(labels, kind="stable"), np.cumsum(np.bincount(labels, minlength=num_classes))[:-1])
    per_class, val_idx = [], []
    for c in range(num_classes):
        idx = rng.permutation(by_class[c])
        if len(idx) < max_shots:
            raise ValueError(f"class {c} has {len(idx)} training examples, fewer than the {max_shots} shots asked")
        num_val = min(val_per_class, len(idx) - max_shots)
        per_class.append(idx)
        val_idx.extend(idx[len(idx) - num_val :])
    val_idx = torch.as_tensor(np.array(val_idx, dtype=np.int64))
    results = {}
    for k in shots:
        subset = torch.as_tensor(np.concatenate([idx[:k] for idx in per_class]))
        results[f"fewshot/{k}shot"] = fewshot_linear(
            train_x[subset],
            train_y[subset],
            test_x,
            test_y,
            num_classes,
            l2_reg=l2_regs,
            val_x=train_x[val_idx],
            val_y=train_y[val_idx],
        )
    return results
