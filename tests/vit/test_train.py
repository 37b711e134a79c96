from __future__ import annotations

import contextlib
import math

import pytest
import torch

import vit
from vit.evaluate import topk_accuracy
from vit.train import NonFiniteError, OptimConfig, build_optimizer, classification_loss, lr_at, train_step


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
    with pytest.raises(FloatingPointError, match="non-finite loss") as err:
        train_step(model, opt, x, torch.tensor([0, 1]), lr=1e-3)
    assert isinstance(err.value, NonFiniteError) and err.value.what == "loss"
    assert torch.equal(model.patch_embed.proj.weight, before)
    assert all(p.grad is None for p in model.parameters())


def _tiny(seed: int = 0):
    torch.manual_seed(seed)
    model = vit.create_model("Mu/8", img_size=16, num_classes=4)
    return model, build_optimizer(model, OptimConfig(lr=1e-2))


def test_two_accumulated_micro_batches_make_the_step_of_their_concatenation():
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8) % 4
    whole, whole_opt = _tiny()
    one = train_step(whole, whole_opt, x, y, lr=1e-2)
    accumulated, accumulated_opt = _tiny()
    micro = [(x[:4], y[:4]), (x[4:], y[4:])]
    two = train_step(accumulated, accumulated_opt, lr=1e-2, micro_batches=iter(micro), accum_steps=2)
    assert two["train/loss"] == pytest.approx(one["train/loss"], rel=1e-6)
    assert two["train/grad_norm"] == pytest.approx(one["train/grad_norm"], rel=1e-5)
    for (name, a), b in zip(whole.named_parameters(), accumulated.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    with pytest.raises(ValueError, match="1 micro-batches for a step of accum_steps=2"):
        train_step(accumulated, accumulated_opt, lr=1e-2, micro_batches=iter(micro[:1]), accum_steps=2)


def test_no_sync_holds_all_but_the_last_micro_batch_and_autocast_each_forward():
    model, opt = _tiny()
    events = []

    def recorder(name):
        @contextlib.contextmanager
        def context():
            events.append(f"{name}(")
            yield
            events.append(f"){name}")

        return context

    model.register_forward_hook(lambda *_: events.append("forward"))
    model.head.weight.register_hook(lambda grad: events.append("backward"))
    micro = [(torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))] * 3
    train_step(
        model,
        opt,
        lr=1e-2,
        micro_batches=micro,
        no_sync=recorder("no_sync"),
        autocast=recorder("autocast"),
        before_update=lambda: events.append("before_update"),
    )
    held = ["no_sync(", "autocast(", "forward", ")autocast", "backward", ")no_sync"]
    assert events == [*held, *held, "autocast(", "forward", ")autocast", "backward", "before_update"]


def test_before_update_can_abandon_the_step_leaving_the_weights():
    model, opt = _tiny()
    before = [p.detach().clone() for p in model.parameters()]

    def refuse():
        raise RuntimeError("another worker met a damaged shard")

    with pytest.raises(RuntimeError, match="damaged shard"):
        train_step(model, opt, torch.randn(2, 3, 16, 16), torch.tensor([0, 1]), lr=1e-2, before_update=refuse)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(p.grad is None for p in model.parameters())


def test_an_empty_micro_batch_takes_part_with_a_zero_loss():
    x, y = torch.randn(4, 3, 16, 16), torch.arange(4)
    model, opt = _tiny()
    with torch.no_grad():
        alone = classification_loss(model(x), y).item()
    metrics = train_step(model, opt, lr=1e-2, micro_batches=[(x, y), (x[:0], y[:0])])
    assert metrics["train/loss"] == pytest.approx(alone / 2, rel=1e-5)
    assert math.isfinite(metrics["train/grad_norm"]) and metrics["train/grad_norm"] > 0


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
