"""Few-shot linear evaluation (closed-form ridge regression), feature extraction and top-k accuracy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vit
from vit.evaluate import extract_features, fewshot_accuracy, fewshot_linear, ridge_regression, topk_accuracy


def clusters(centres: np.ndarray, per_class: int, spread: float, rng: np.random.Generator):
    """``per_class`` Gaussian samples around each centre: features (N, D) float32, labels (N,) int64."""
    labels = np.repeat(np.arange(len(centres)), per_class)
    features = centres[labels] + spread * rng.normal(size=(len(labels), centres.shape[1]))
    return torch.tensor(features, dtype=torch.float32), torch.tensor(labels)


@pytest.fixture(scope="module")
def toy():
    """10 classes in 64-D, noisy enough that 1-shot is clearly worse than 5-shot: (train_x, train_y, test_x, test_y)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, 64))
    return (*clusters(centres, 60, 1.5, rng), *clusters(centres, 100, 1.5, rng))


def test_fewshot_separable_clusters(toy):
    results = fewshot_accuracy(*toy, num_classes=10, shots=(1, 5, 10))
    assert set(results) == {"fewshot/1shot", "fewshot/5shot", "fewshot/10shot"}
    assert results["fewshot/10shot"] > 0.9
    assert results["fewshot/1shot"] < results["fewshot/5shot"] - 0.1  # the noise makes one shot clearly harder


def test_fewshot_random_labels_near_chance():
    rng = np.random.default_rng(0)
    train_x, test_x = torch.tensor(rng.normal(size=(400, 64))), torch.tensor(rng.normal(size=(2000, 64)))
    train_y, test_y = torch.tensor(rng.integers(0, 10, 400)), torch.tensor(rng.integers(0, 10, 2000))
    results = fewshot_accuracy(train_x, train_y, test_x, test_y, num_classes=10, shots=(1, 5, 25))
    for accuracy in results.values():
        assert abs(accuracy - 0.1) < 0.03  # 2000 test points: the standard error is 0.007


def test_fewshot_single_l2_and_seed(toy):
    one = fewshot_accuracy(*toy, num_classes=10, shots=(5,), l2_regs=1024.0, seed=1)
    assert one == fewshot_accuracy(*toy, num_classes=10, shots=(5,), l2_regs=1024.0, seed=1)
    assert 0.0 <= one["fewshot/5shot"] <= 1.0


def test_fewshot_subset_sizes(toy, monkeypatch):
    import vit.evaluate as evaluate

    seen = []
    original = evaluate.fewshot_linear

    def spy(train_x, train_y, *args, **kwargs):
        seen.append((train_y.clone(), kwargs["val_y"].clone()))
        return original(train_x, train_y, *args, **kwargs)

    monkeypatch.setattr(evaluate, "fewshot_linear", spy)
    train_x, train_y, test_x, test_y = toy
    evaluate.fewshot_accuracy(train_x, train_y, test_x, test_y, 10, shots=(1, 5, 25), val_per_class=7)
    for (subset_y, val_y), k in zip(seen, (1, 5, 25)):
        assert torch.equal(torch.bincount(subset_y, minlength=10), torch.full((10,), k))
        assert torch.equal(torch.bincount(val_y, minlength=10), torch.full((10,), 7))


def test_fewshot_subsets_nested_and_disjoint_from_val(monkeypatch):
    import vit.evaluate as evaluate

    # Features are the example's own index, so the subsets can be read back from what fewshot_linear gets.
    labels = torch.arange(4).repeat_interleave(12)
    features = torch.arange(48, dtype=torch.float32)[:, None]
    seen = []

    def spy(train_x, train_y, *args, val_x, **kwargs):
        seen.append((set(train_x[:, 0].tolist()), set(val_x[:, 0].tolist())))
        return 0.0

    monkeypatch.setattr(evaluate, "fewshot_linear", spy)
    evaluate.fewshot_accuracy(features, labels, features, labels, 4, shots=(2, 5), val_per_class=3)
    (small, val), (large, val_again) = seen
    assert small < large and val == val_again and not (large & val) and len(val) == 12


def test_fewshot_class_too_small(toy):
    train_x, train_y, test_x, test_y = toy
    keep = (train_y != 3) | (torch.arange(len(train_y)) % 60 < 4)  # class 3 keeps 4 examples
    with pytest.raises(ValueError, match="class 3 has 4 training examples"):
        fewshot_accuracy(train_x[keep], train_y[keep], test_x, test_y, 10, shots=(1, 5))
    assert fewshot_accuracy(train_x[keep], train_y[keep], test_x, test_y, 10, shots=(1, 4))


def test_fewshot_linear_needs_val_for_several_l2(toy):
    train_x, train_y, test_x, test_y = toy
    with pytest.raises(ValueError, match="val_x"):
        fewshot_linear(train_x, train_y, test_x, test_y, 10, l2_reg=[1.0, 10.0])
    accuracy = fewshot_linear(
        train_x[::2], train_y[::2], test_x, test_y, 10, l2_reg=[1.0, 10.0], val_x=train_x[1::2], val_y=train_y[1::2]
    )
    assert accuracy > 0.9
    with pytest.raises(ValueError, match="outside"):
        fewshot_linear(train_x, train_y + 1, test_x, test_y, 10)


def test_fewshot_linear_accepts_numpy(toy):
    train_x, train_y, test_x, test_y = toy
    from_torch = fewshot_linear(train_x, train_y, test_x, test_y, 10, l2_reg=8.0)
    from_numpy = fewshot_linear(train_x.numpy(), train_y.numpy(), test_x.numpy(), test_y.numpy(), 10, l2_reg=8.0)
    assert from_torch == from_numpy > 0.9


@pytest.mark.parametrize("n, d", [(40, 6), (6, 40)], ids=["primal", "dual"])
def test_ridge_matches_direct_solve(n, d):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(n, d)), rng.normal(size=(n, 3))
    l2_regs = [0.01, 1.0, 100.0]
    for method in ("auto", "primal", "dual"):
        weights = ridge_regression(torch.tensor(x), torch.tensor(y), l2_regs, method=method).numpy()
        assert weights.shape == (3, d, 3)
        for w, l2 in zip(weights, l2_regs):
            direct = np.linalg.solve(x.T @ x + l2 * np.eye(d), x.T @ y)
            np.testing.assert_allclose(w, direct, rtol=1e-8, atol=1e-10)


def test_ridge_tends_to_least_squares():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(30, 5)), rng.normal(size=(30, 2))
    (weights,) = ridge_regression(torch.tensor(x), torch.tensor(y), [1e-10]).numpy()
    np.testing.assert_allclose(weights, np.linalg.lstsq(x, y, rcond=None)[0], rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="positive"):
        ridge_regression(torch.tensor(x), torch.tensor(y), [0.0])


def test_extract_features():
    torch.manual_seed(0)
    model = vit.create_model("Mu/4", num_classes=10, img_size=16)
    model.train()
    batches = [(torch.randn(4, 3, 16, 16), torch.arange(4) + i) for i in range(3)]
    features, labels = extract_features(model, batches)
    assert features.shape == (12, 64) and features.dtype == torch.float32 and features.device.type == "cpu"
    assert labels.tolist() == [0, 1, 2, 3, 1, 2, 3, 4, 2, 3, 4, 5]
    assert model.training  # the mode it was in comes back
    with torch.no_grad():
        model.eval()
        expected = model.forward_head(model.forward_features(batches[0][0]), pre_logits=True)
    torch.testing.assert_close(features[:4], expected)
    with pytest.raises(ValueError):
        extract_features(model, [])


def test_topk_accuracy_unchanged():
    class Fixed(torch.nn.Module):
        def forward(self, x):
            return x

    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.15, 0.05], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 1, 0])
    assert topk_accuracy(Fixed(), [(logits, labels)], ks=(1, 2)) == {"top1": 1 / 3, "top2": 2 / 3}
