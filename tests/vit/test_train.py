from __future__ import annotations

import math

import pytest
import torch

import vit
from vit.evaluate import topk_accuracy
from vit.train import OptimConfig, build_optimizer, classification_loss, lr_at, train_step


def test_warmup_then_cosine_and_linear():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, schedule="cosine")
    assert lr_at(0, 100, cfg) == pytest.approx(0.1)
    assert lr_at(9, 100, cfg) == pytest.approx(1.0)
    assert lr_at(55, 100, cfg) == pytest.approx(0.5)
    assert lr_at(100, 100, cfg) == pytest.approx(0.0, abs=1e-12)
    lin = OptimConfig(lr=2.0, warmup_steps=0, schedule="linear", min_lr_ratio=0.5)
    assert lr_at(50, 100, lin) == pytest.approx(1.5)
    assert lr_at(100, 100, lin) == pytest.approx(1.0)
    values = [lr_at(s, 100, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_weight_decay_skips_biases_norms_and_embeddings():
    model = vit.create_model("Mu/8", img_size=16, num_classes=3)
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert "blocks.0.attn.qkv.weight" in names and "head.weight" in names
    assert not names & {"pos_embed", "cls_token", "norm.weight", "blocks.0.attn.qkv.bias"}
    total = sum(len(g["params"]) for g in opt.param_groups)
    assert total == len(list(model.parameters()))


def test_sigmoid_loss_for_multi_hot_targets():
    logits = torch.tensor([[0.0, 0.0]])
    targets = torch.tensor([[1.0, 0.0]])
    assert classification_loss(logits, targets).item() == pytest.approx(2 * math.log(2))
    assert classification_loss(logits, torch.tensor([0])).item() == pytest.approx(math.log(2))


def test_train_step_reduces_loss_and_reports_health():
    torch.manual_seed(0)
    model = vit.create_model("Mu/8", img_size=16, num_classes=4)
    opt = build_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.0))
    x, y = torch.randn(16, 3, 16, 16), torch.arange(16) % 4
    first = train_step(model, opt, x, y, lr=1e-3)
    for _ in range(30):
        last = train_step(model, opt, x, y, lr=1e-3)
    assert last["train/loss"] < first["train/loss"] * 0.5
    assert first["train/grad_norm"] > 0 and first["train/lr"] == 1e-3


def test_non_finite_loss_stops_before_the_update():
    model = vit.create_model("Mu/8", img_size=16, num_classes=4)
    opt = build_optimizer(model, OptimConfig())
    before = model.patch_embed.proj.weight.clone()
    x = torch.full((2, 3, 16, 16), float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        train_step(model, opt, x, torch.tensor([0, 1]), lr=1e-3)
    assert torch.equal(model.patch_embed.proj.weight, before)


def test_topk_accuracy():
    class Fixed(torch.nn.Module):
        def forward(self, x):
            return x

    logits = torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.2, 0.7], [0.5, 0.3, 0.2]])
    labels = torch.tensor([0, 1, 2])
    acc = topk_accuracy(Fixed(), [(logits, labels)], ks=(1, 2))
    assert acc == {"top1": pytest.approx(1 / 3), "top2": pytest.approx(2 / 3)}
    with pytest.raises(ValueError):
        topk_accuracy(Fixed(), [], ks=(1,))
