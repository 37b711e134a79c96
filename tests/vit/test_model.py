"""Unit tests of vit/model.py and vit/variants.py: shapes, sizes, gradients, init, attention, resolution."""

from __future__ import annotations

import dataclasses
import math
import os
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vit.hybrid import Bottleneck
from vit.model import Attention, DropPath, PreLogits, VisionTransformer, ViTConfig
from vit.posemb import resample_pos_embed
from vit.variants import RESNETS, SIZES, create_model, decode_variant, list_models, model_config

# Paper Table 1 (Ti and S from DeiT): layers, width D, MLP size, heads.
PAPER_TABLE = {
    "Ti": (12, 192, 768, 3),
    "S": (12, 384, 1536, 6),
    "B": (12, 768, 3072, 12),
    "L": (24, 1024, 4096, 16),
    "H": (32, 1280, 5120, 16),
}
# Paper Table 1 parameter counts (1000 classes, 224 px).
PAPER_PARAMS = {"Ti/16": 5.7e6, "S/16": 22e6, "B/16": 86e6, "L/16": 307e6, "H/14": 632e6}

VARIANTS = list(dict.fromkeys([*list_models(), "Mu/16"]))  # the registry plus the test size
SMALL_VARIANTS = [n for n in VARIANTS if n.split("/")[0] in ("Mu", "Ti")]


def _size_and_patch(name: str) -> tuple[str, int]:
    """ "R50+B/16" -> ("B", 16): the ViT size and the total pixels per grid cell, read off the name."""
    size, patch = name.split("+")[-1].split("/")
    return size, int(patch)


def _stem_params(layers: tuple[int, ...], width_factor: int, in_chans: int) -> int:
    """Parameters of a BiT ResNet stem (bias-free convs, GroupNorm with affine), counted by hand."""
    base = 64 * width_factor
    n = in_chans * base * 7 * 7 + 2 * base  # root conv + GroupNorm
    chans = base
    for i, depth in enumerate(layers):
        mid, out = base * 2**i, base * 4 * 2**i
        for unit in range(depth):
            cin = chans if unit == 0 else out
            if unit == 0 and (i > 0 or cin != out):
                n += cin * out + 2 * out  # projection shortcut
            n += cin * mid + 2 * mid + 9 * mid * mid + 2 * mid + mid * out + 2 * out
        chans = out
    return n


def _expected_params(cfg: ViTConfig) -> int:
    """Parameter count of a ViT from its hyper-parameters, eqs. (1)-(4) counted by hand."""
    D, M, L, P = cfg.width, cfg.mlp_dim, cfg.depth, cfg.patch_size
    n, embed_in, stride = 0, cfg.in_chans, P
    if cfg.resnet_layers is not None:
        n += _stem_params(cfg.resnet_layers, cfg.resnet_width, cfg.in_chans)
        embed_in = 256 * cfg.resnet_width * 2 ** (len(cfg.resnet_layers) - 1)
        stride = P * 4 * 2 ** (len(cfg.resnet_layers) - 1)
    cls = cfg.pool == "cls"
    tokens = (cfg.img_size // stride) ** 2 + cls
    n += embed_in * P * P * D + D  # patch projection E
    n += tokens * D + cls * D  # E_pos and x_class
    attn = 3 * D * D + (3 * D if cfg.qkv_bias else 0) + D * D + D
    mlp = D * M + M + M * D + D
    n += L * (attn + mlp + 2 * 2 * D)  # two LayerNorms per block
    n += 2 * D  # final LayerNorm
    features = D
    if cfg.representation_size:
        n += D * cfg.representation_size + cfg.representation_size
        features = cfg.representation_size
    if cfg.num_classes:
        n += features * cfg.num_classes + cfg.num_classes
    return n


def _loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    target = torch.arange(out.shape[0]) % out.shape[1]
    return F.cross_entropy(out, target)


# ---------------------------------------------------------------------------- variants and shapes
def test_size_table_matches_paper_table_1():
    for size, (layers, width, mlp, heads) in PAPER_TABLE.items():
        assert SIZES[size] == (width, layers, mlp, heads), size


def test_registry_names_decode_and_cover_paper_models():
    names = list_models()
    assert len(names) == len(set(names))
    for expected in ["Ti/16", "S/16", "B/16", "B/32", "L/16", "L/32", "H/14", "R50+B/16"]:
        assert expected in names
    for name in names:
        fields = decode_variant(name)
        size, _ = _size_and_patch(name)
        assert (fields["width"], fields["depth"], fields["mlp_dim"], fields["num_heads"]) == SIZES[size]


def test_decode_hybrid_names():
    assert decode_variant("R50+B/16") == dict(
        width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=1, resnet_layers=(3, 4, 9)
    )
    tiny_hybrid = decode_variant("R26+Mu/32")
    assert tiny_hybrid["resnet_layers"] == RESNETS["R26"] == (2, 2, 2, 2)
    assert tiny_hybrid["patch_size"] == 1  # four stages: the stem alone has stride 32
    assert decode_variant("R50+L/32")["patch_size"] == 2  # stem stride 16, then 2x2 patches
    assert decode_variant("  B/16 ") == decode_variant("B/16")


@pytest.mark.parametrize("name", VARIANTS)
def test_shapes_on_meta(name):
    size, patch = _size_and_patch(name)
    D = SIZES[size][0]
    side = 224 // patch
    tokens = side * side + 1
    model = create_model(name, num_classes=7, device="meta")
    assert model.grid_size == (side, side)
    x = torch.empty(2, 3, 224, 224, device="meta")

    feats = model.forward_features(x)
    assert feats.shape == (2, tokens, D)
    assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features) == (2, D)
    assert model.forward_head(feats).shape == (2, 7)
    assert model(x).shape == (2, 7)

    trunk = create_model(name, num_classes=0, device="meta")
    assert isinstance(trunk.head, nn.Identity)
    assert trunk(x).shape == (2, D)


@pytest.mark.parametrize("name", SMALL_VARIANTS)
def test_small_variants_run_on_cpu(name):
    _, patch = _size_and_patch(name)
    img = 4 * patch  # a 4x4 grid keeps every patch size fast
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, img_size=img, head_zero_init=False).eval()
    D = SIZES[name.split("/")[0]][0]
    x = torch.randn(2, 3, img, img)
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        assert feats.shape == (2, 17, D)
        assert pre.shape == (2, model.num_features) == (2, D)
        assert logits.shape == (2, 7)
        assert torch.isfinite(logits).all()
        torch.testing.assert_close(logits, model.head(pre))
        torch.testing.assert_close(pre, feats[:, 0])  # class-token pooling, no pre-logits layer

        trunk = create_model(name, num_classes=0, img_size=img).eval()
        missing, unexpected = trunk.load_state_dict(model.state_dict(), strict=False)
        assert missing == [] and sorted(unexpected) == ["head.bias", "head.weight"]
        torch.testing.assert_close(trunk(x), pre)


def test_pool_gap_and_representation_shapes(tiny_model, images):
    x = images()
    gap = tiny_model(pool="gap").eval()
    assert gap.cls_token is None
    assert gap.pos_embed.shape == (1, 16, 32)
    with torch.no_grad():
        feats = gap.forward_features(x)
        assert feats.shape == (2, 16, 32)
        torch.testing.assert_close(gap.forward_head(feats, pre_logits=True), feats.mean(dim=1))

    rep = tiny_model(representation_size=24).eval()
    assert isinstance(rep.pre_logits, PreLogits) and rep.num_features == 24
    with torch.no_grad():
        pre = rep.forward_head(rep.forward_features(x), pre_logits=True)
    assert pre.shape == (2, 24)
    assert pre.abs().max() <= 1.0  # tanh
    assert rep(x).shape == (2, 5)


def _reference_forward(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """Eqs. (1)-(4) written out with plain tensor ops on the model's state dict, in float64."""
    cfg = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    D, H, P = cfg.width, cfg.num_heads, cfg.patch_size
    Dh = D // H

    def ln(z, prefix):
        return F.layer_norm(z, (D,), sd[prefix + ".weight"], sd[prefix + ".bias"], eps=1e-6)

    def dense(z, prefix):
        return z @ sd[prefix + ".weight"].T + sd[prefix + ".bias"]

    patches = F.unfold(x.double(), kernel_size=P, stride=P).transpose(1, 2)  # (B, N, C*P*P)
    z = patches @ sd["patch_embed.proj.weight"].flatten(1).T + sd["patch_embed.proj.bias"]  # x_p E
    B, N, _ = z.shape
    if cfg.pool == "cls":
        z = torch.cat([sd["cls_token"].expand(B, 1, D), z], dim=1)
    z = z + sd["pos_embed"]  # (B, T, D)
    T = z.shape[1]
    for i in range(cfg.depth):
        p = f"blocks.{i}"
        q, k, v = dense(ln(z, p + ".norm1"), p + ".attn.qkv").split(D, dim=-1)
        q, k, v = (t.reshape(B, T, H, Dh).transpose(1, 2) for t in (q, k, v))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(Dh), dim=-1)
        z = z + dense((weights @ v).transpose(1, 2).reshape(B, T, D), p + ".attn.proj")  # eq. (2)
        hidden = F.gelu(dense(ln(z, p + ".norm2"), p + ".mlp.fc1"))
        z = z + dense(hidden, p + ".mlp.fc2")  # eq. (3)
    z = ln(z, "norm")
    y = z[:, 0] if cfg.pool == "cls" else z.mean(dim=1)  # eq. (4)
    if cfg.representation_size:
        y = torch.tanh(dense(y, "pre_logits.fc"))
    return dense(y, "head")


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(pool="gap"), dict(representation_size=24), dict(depth=1, num_heads=2, patch_size=4)],
    ids=["cls", "gap", "repr", "patch4"],
)
def test_forward_matches_reference_implementation(tiny_model, images, overrides):
    model = tiny_model(head_zero_init=False, **overrides).eval()
    assert model.norm.eps == model.blocks[0].norm1.eps == 1e-6  # the JAX code's LayerNorm epsilon
    with torch.no_grad():
        for p in model.parameters():  # move LayerNorm scales, biases and the class token off 1 and 0
            p.add_(0.2 * torch.randn_like(p))
        x = images(batch=3)
        torch.testing.assert_close(model(x).double(), _reference_forward(model, x), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- parameter counts
@pytest.mark.parametrize("name", list(PAPER_PARAMS))
def test_param_counts_match_paper_table_1(name):
    model = create_model(name, num_classes=1000, img_size=224, device="meta")
    assert abs(model.num_params() - PAPER_PARAMS[name]) / PAPER_PARAMS[name] < 0.01


@pytest.mark.parametrize(
    "name,overrides",
    [(n, {}) for n in VARIANTS]
    + [
        ("B/16", dict(pool="gap")),
        ("B/16", dict(representation_size=768, num_classes=21843)),
        ("B/16", dict(num_classes=0)),
        ("B/16", dict(qkv_bias=False)),
        ("B/16", dict(img_size=384)),
        ("S/32", dict(in_chans=1, num_classes=10, img_size=96)),
        ("R50+B/16", dict(img_size=384, pool="gap")),
        ("R26+Mu/32", dict(img_size=64, num_classes=5, resnet_width=2)),
    ],
)
def test_param_count_formula(name, overrides):
    model = create_model(name, device="meta", **overrides)
    assert model.num_params() == _expected_params(model.config)
    head = sum(p.numel() for p in model.head.parameters())
    assert model.num_params(exclude_head=True) == model.num_params() - head


# ---------------------------------------------------------------------------- gradients
def _assert_all_params_get_gradient(model: nn.Module) -> None:
    """Every parameter gets a non-zero gradient, except the key bias of attention.

    Adding a constant to every key adds the same q.b_k to a query's scores over all keys, which
    softmax ignores: the key bias has a (numerically) zero gradient by construction.
    """
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        if name.endswith("attn.qkv.bias"):
            q, k, v = p.grad.chunk(3)
            assert q.abs().sum() > 0 and v.abs().sum() > 0, name
            assert k.norm() < 1e-4 * q.norm(), name
        else:
            assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "overrides",
    [dict(pool="cls"), dict(pool="gap"), dict(representation_size=16), dict(pool="gap", representation_size=16)],
    ids=["cls", "gap", "cls-repr", "gap-repr"],
)
def test_gradients_reach_every_parameter(tiny_model, images, overrides):
    model = tiny_model(head_zero_init=False, **overrides).train()
    _loss(model, images()).backward()
    _assert_all_params_get_gradient(model)


def test_zero_head_gives_gradient_only_to_head_on_first_step(tiny_model, images):
    model = tiny_model(head_zero_init=True, representation_size=16).train()
    x = images(batch=4)
    _loss(model, x).backward()
    for name, p in model.named_parameters():
        if name.startswith("head."):
            assert p.grad.abs().sum() > 0, name
        else:
            # d loss / d features = W_head^T (...) = 0 exactly, so nothing below the head moves.
            assert torch.count_nonzero(p.grad) == 0, name

    # After one step the head is no longer zero, and the trunk starts to learn.
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    model.zero_grad()
    _loss(model, x).backward()
    _assert_all_params_get_gradient(model)


def test_decoded_tiny_hybrid_is_buildable():
    assert decode_variant("R26+Mu/32")["resnet_layers"] == (2, 2, 2, 2)
    model = create_model("R26+Mu/32", img_size=64, num_classes=5, device="meta")
    assert model.stem is not None and model.grid_size == (2, 2)


def test_gradients_reach_every_parameter_of_tiny_hybrid(images):
    torch.manual_seed(0)
    model = create_model("R26+Mu/32", img_size=64, num_classes=5, head_zero_init=False).train()
    x = images(size=64)
    _loss(model, x).backward()

    # The stem's residual branches start at zero (last GroupNorm scale 0, as BiT): on the first
    # step only the shortcut path and that scale learn, everything inside a branch gets no gradient.
    units = [m for m in model.stem.modules() if isinstance(m, Bottleneck)]
    assert len(units) == sum(RESNETS["R26"])
    for unit in units:
        assert unit.norm3.weight.grad.abs().sum() > 0
        for inner in (unit.conv1, unit.norm1, unit.conv2, unit.norm2, unit.conv3):
            for p in inner.parameters():
                assert torch.count_nonzero(p.grad) == 0
    assert model.stem.stem.conv.weight.grad.abs().sum() > 0  # the root conv, through the shortcuts

    # With the branches switched on, every parameter of the hybrid learns.
    with torch.no_grad():
        for unit in units:
            unit.norm3.weight.fill_(1.0)
    model.zero_grad()
    _loss(model, x).backward()
    _assert_all_params_get_gradient(model)


# ---------------------------------------------------------------------------- determinism
def test_same_seed_same_init(tiny_model):
    a, b, c = tiny_model(seed=3), tiny_model(seed=3), tiny_model(seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert not torch.equal(sa["pos_embed"], sc["pos_embed"])
    assert not torch.equal(sa["blocks.0.attn.qkv.weight"], sc["blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize("pool", ["cls", "gap"])
def test_eval_forward_is_deterministic_and_batch_independent(tiny_model, images, pool):
    # A non-zero head: with the zero-initialised head every logit would equal the bias.
    model = tiny_model(head_zero_init=False, pool=pool, dropout=0.1, attn_dropout=0.1, drop_path=0.2).eval()
    x = images(batch=5)
    with torch.no_grad():
        batched = model(x)
        assert torch.equal(batched, model(x))
        assert batched.std(dim=0).min() > 0  # the samples really differ
        for i in range(len(x)):
            torch.testing.assert_close(model(x[i : i + 1])[0], batched[i], atol=1e-5, rtol=0)


def test_train_mode_is_stochastic_but_seeded(tiny_model, images):
    model = tiny_model(head_zero_init=False, dropout=0.1, attn_dropout=0.1, drop_path=0.2).train()
    x = images(batch=4)
    with torch.no_grad():
        assert not torch.allclose(model(x), model(x))
        torch.manual_seed(123)
        first = model(x)
        torch.manual_seed(123)
        second = model(x)
    assert torch.equal(first, second)


# ---------------------------------------------------------------------------- attention
def test_attention_maps_shape_and_rows(tiny_model, images):
    model = tiny_model(depth=3).eval()
    maps = model.get_attention_maps(images(batch=2))
    assert len(maps) == 3
    for attn in maps:
        assert attn.shape == (2, 4, 17, 17)
        assert (attn >= 0).all()
        torch.testing.assert_close(attn.sum(dim=-1), torch.ones(2, 4, 17), atol=1e-5, rtol=0)


def test_attention_maps_follow_the_real_forward(tiny_model, images):
    """Each block's map equals softmax(q k^T / sqrt(Dh)) of the input that block sees in forward()."""
    model = tiny_model(head_zero_init=False).eval()
    x = images(batch=2)
    inputs = []
    hooks = [b.attn.register_forward_hook(lambda m, args, out: inputs.append(args[0])) for b in model.blocks]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    maps = model.get_attention_maps(x)
    H, Dh = 4, 8
    for block, inp, attn in zip(model.blocks, inputs, maps):
        B, T, D = inp.shape
        q, k, _ = F.linear(inp, block.attn.qkv.weight, block.attn.qkv.bias).split(D, dim=-1)
        q = q.reshape(B, T, H, Dh).transpose(1, 2)
        k = k.reshape(B, T, H, Dh).transpose(1, 2)
        expected = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(Dh), dim=-1)
        torch.testing.assert_close(attn, expected, atol=1e-5, rtol=1e-4)


def test_explicit_attention_equals_sdpa_and_torch_mha(tiny_config):
    cfg = tiny_config(width=48, num_heads=6)
    torch.manual_seed(0)
    attn = Attention(cfg).eval()
    with torch.no_grad():
        attn.qkv.bias.normal_()  # exercise the bias too (init leaves it at zero)
        attn.proj.bias.normal_()
    x = torch.randn(3, 11, 48)
    with torch.no_grad():
        fused = attn(x)
        explicit, weights = attn(x, return_attention=True)
        torch.testing.assert_close(explicit, fused, atol=1e-5, rtol=0)
        assert weights.shape == (3, 6, 11, 11)

        # Independent reference: torch's own multi-head attention with the same weights.
        mha = nn.MultiheadAttention(48, 6, batch_first=True)
        mha.in_proj_weight.copy_(attn.qkv.weight)
        mha.in_proj_bias.copy_(attn.qkv.bias)
        mha.out_proj.weight.copy_(attn.proj.weight)
        mha.out_proj.bias.copy_(attn.proj.bias)
        ref, ref_weights = mha.eval()(x, x, x, need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(weights, ref_weights, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- dropout, stochastic depth
def test_dropout_and_drop_path_are_configured(tiny_model):
    model = tiny_model(depth=5, dropout=0.1, attn_dropout=0.2, drop_path=0.4)
    assert model.pos_drop.p == 0.1
    for block in model.blocks:
        assert block.attn.attn_dropout == 0.2
        assert block.attn.proj_drop.p == 0.1
        assert block.mlp.drop1.p == 0.1 and block.mlp.drop2.p == 0.1
    rates = [block.drop_path.rate for block in model.blocks]
    assert rates[0] == 0.0
    assert rates[-1] == pytest.approx(0.4)
    steps = [b - a for a, b in zip(rates, rates[1:])]
    assert steps == pytest.approx([0.1] * 4)

    plain = tiny_model(depth=5)
    assert plain.pos_drop.p == 0.0
    assert all(b.drop_path.rate == 0.0 and b.attn.attn_dropout == 0.0 for b in plain.blocks)


def test_every_dropout_is_used_in_train_forward(tiny_model, images):
    model = tiny_model(dropout=0.1, attn_dropout=0.1, drop_path=0.2).train()
    calls: Counter[str] = Counter()
    for name, module in model.named_modules():
        if isinstance(module, (nn.Dropout, DropPath)):
            module.register_forward_hook(lambda m, args, out, name=name: calls.update([name]))
    model(images())
    expected = {"pos_drop": 1}
    for i in range(model.config.depth):
        expected |= {f"blocks.{i}.attn.proj_drop": 1, f"blocks.{i}.mlp.drop1": 1, f"blocks.{i}.mlp.drop2": 1}
        expected[f"blocks.{i}.drop_path"] = 2  # one per residual branch
    assert calls == expected


def test_dropout_after_position_embeddings(tiny_model, images):
    model = tiny_model(dropout=0.5).train()
    seen = []
    model.blocks[0].register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        model(images(batch=8))
        z0 = model.pos_drop.eval()(model.embed(images(batch=8)))
    dropped = seen[0] == 0
    assert 0.4 < dropped.float().mean() < 0.6
    torch.testing.assert_close(seen[0][~dropped], 2 * z0[~dropped])  # survivors rescaled by 1 / (1 - p)


def test_regularisation_is_inactive_in_eval(tiny_model, images):
    reg = tiny_model(head_zero_init=False, dropout=0.3, attn_dropout=0.3, drop_path=0.5)
    plain = tiny_model(head_zero_init=False)
    plain.load_state_dict(reg.state_dict())
    x = images(batch=3)
    with torch.no_grad():
        torch.testing.assert_close(reg.eval()(x), plain.eval()(x), atol=0, rtol=0)
        assert not torch.allclose(reg.train()(x), plain(x))
        maps_reg = reg.eval().get_attention_maps(x)
        maps_plain = plain.get_attention_maps(x)
    for a, b in zip(maps_reg, maps_plain):
        assert torch.equal(a, b)


def test_drop_path_drops_whole_samples():
    drop = DropPath(0.5)
    x = torch.randn(2000, 3, 4) + 3.0
    torch.manual_seed(0)
    y = drop.train()(x)
    kept = (y != 0).flatten(1)
    assert (kept.all(dim=1) | ~kept.any(dim=1)).all()  # per sample: all kept or all dropped
    survivors = kept.all(dim=1)
    assert 0.4 < survivors.float().mean() < 0.6
    torch.testing.assert_close(y[survivors], x[survivors] / 0.5)  # survivors are rescaled by 1/keep
    assert torch.equal(drop.eval()(x), x)
    assert torch.equal(DropPath(0.0).train()(x), x)


# ---------------------------------------------------------------------------- resolution
def test_other_img_size_has_matching_position_embeddings():
    model = create_model("Mu/16", img_size=384, device="meta")
    assert model.grid_size == (24, 24)
    assert model.pos_embed.shape == (1, 24 * 24 + 1, 64)
    gap = create_model("Mu/16", img_size=384, pool="gap", device="meta")
    assert gap.pos_embed.shape == (1, 24 * 24, 64)
    hybrid = create_model("R50+B/16", img_size=384, device="meta")
    assert hybrid.pos_embed.shape == (1, 24 * 24 + 1, 768)


@pytest.mark.parametrize("size", [48, 16, 36, 39, (32, 40), (40, 32)])
def test_wrong_input_size_raises_clear_error(tiny_model, images, size):
    # 36 and 39 px would give the built 4x4 grid after the stride-8 convolution: still an error.
    model = tiny_model()
    h, w = (size, size) if isinstance(size, int) else size
    with pytest.raises(ValueError, match="dynamic_img_size") as info:
        model(images(size=size))
    assert f"{h}x{w}" in str(info.value) and "img_size=32" in str(info.value)


def test_wrong_input_size_raises_for_hybrid():
    model = create_model("R26+Mu/32", img_size=64, num_classes=3, device="meta")
    for h, w in [(96, 96), (40, 50), (63, 64)]:  # SAME padding would turn 40x50 and 63x64 into a 2x2 grid
        with pytest.raises(ValueError, match="dynamic_img_size"):
            model(torch.empty(1, 3, h, w, device="meta"))
    assert model(torch.empty(1, 3, 64, 64, device="meta")).shape == (1, 3)


def test_dynamic_img_size(tiny_model, images):
    static = tiny_model(head_zero_init=False).eval()
    dynamic = tiny_model(head_zero_init=False, dynamic_img_size=True).eval()
    dynamic.load_state_dict(static.state_dict())
    with torch.no_grad():
        x = images(batch=2)
        torch.testing.assert_close(dynamic(x), static(x), atol=0, rtol=0)

        big = images(batch=2, size=48)
        assert dynamic.forward_features(big).shape == (2, 37, 32)
        assert dynamic(images(batch=2, size=(32, 56))).shape == (2, 5)

        # Running at 48 px equals a model built at 48 px with E_pos resampled the same way.
        built = tiny_model(head_zero_init=False, img_size=48).eval()
        state = static.state_dict()
        state["pos_embed"] = resample_pos_embed(state["pos_embed"], (6, 6))
        built.load_state_dict(state)
        torch.testing.assert_close(dynamic(big), built(big), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- meta device, init
def _rss_bytes() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])  # resident pages, now (not the peak)
    return pages * os.sysconf("SC_PAGE_SIZE")


def test_meta_build_allocates_nothing():
    before = _rss_bytes()
    model = create_model("H/14", device="meta")  # 632M parameters: 2.5 GB if it were real
    after = _rss_bytes()
    assert all(p.is_meta for p in model.parameters())
    assert all(b.is_meta for b in model.buffers())
    assert after - before < 200 * 2**20


def test_meta_then_to_empty_and_init_weights():
    torch.manual_seed(0)
    model = create_model("Mu/16", num_classes=10, head_bias_init=-10.0, device="meta")
    model.to_empty(device="cpu")
    model.init_weights()
    for name, p in model.named_parameters():
        assert p.device.type == "cpu", name
        assert torch.isfinite(p).all(), name
    assert model.pos_embed.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.count_nonzero(model.head.weight) == 0
    assert torch.all(model.head.bias == -10.0)
    assert torch.count_nonzero(model.cls_token) == 0
    for name, p in model.named_parameters():
        if name.endswith("norm1.weight") or name.endswith("norm.weight"):
            assert torch.all(p == 1.0), name
    with torch.no_grad():
        out = model(torch.randn(2, 3, 224, 224))
    assert torch.all(out == -10.0)  # zero head: every logit is the bias

    hybrid = create_model("R26+Mu/32", img_size=64, device="meta")
    hybrid.to_empty(device="cpu")
    hybrid.init_weights()
    assert all(torch.isfinite(p).all() for p in hybrid.parameters())


def test_init_statistics_follow_the_jax_initialisers():
    torch.manual_seed(0)
    model = create_model("Ti/16", num_classes=10, head_zero_init=False, representation_size=192, device="meta")
    model.to_empty(device="cpu")
    model.init_weights()
    D = 192
    # Patch projection: LeCun normal truncated at 2 std, variance exactly 1/fan_in after truncation.
    w = model.patch_embed.proj.weight
    fan_in = 3 * 16 * 16
    assert w.var().item() == pytest.approx(1 / fan_in, rel=0.03)
    assert w.abs().max().item() <= 2 * math.sqrt(1 / fan_in) / 0.8796 + 1e-6
    # q, k and v: three D x D Xavier-uniform kernels, bound sqrt(6 / (D + D)), not one (3D x D).
    bound = math.sqrt(6 / (2 * D))
    for chunk in model.blocks[0].attn.qkv.weight.chunk(3):
        assert 0.98 * bound < chunk.abs().max().item() <= bound
    assert torch.count_nonzero(model.blocks[0].attn.qkv.bias) == 0
    # MLP: Xavier uniform, bias ~ N(0, 1e-6).
    fc1 = model.blocks[0].mlp.fc1
    assert fc1.weight.abs().max().item() <= math.sqrt(6 / (D + 4 * D))
    assert 0 < fc1.bias.abs().max().item() < 1e-5
    # Non-zero head when asked: Xavier uniform, bias zero.
    assert model.head.weight.abs().max().item() <= math.sqrt(6 / (D + 10))
    assert torch.count_nonzero(model.head.weight) > 0
    assert torch.count_nonzero(model.head.bias) == 0


def test_reset_head(tiny_model, images):
    model = tiny_model(head_zero_init=False, head_bias_init=-10.0)
    model.reset_head(num_classes=3)
    assert model.config.num_classes == 3 and model.head.out_features == 3
    assert torch.all(model.head.bias == -10.0)
    assert model(images()).shape == (2, 3)
    model.reset_head(num_classes=0)
    assert isinstance(model.head, nn.Identity)
    assert model(images()).shape == (2, 32)


# ---------------------------------------------------------------------------- config validation
def test_config_validation_errors():
    with pytest.raises(ValueError, match="pool"):
        ViTConfig(pool="avg")
    with pytest.raises(ValueError, match="divisible"):
        ViTConfig(width=100, num_heads=3)
    with pytest.raises(ValueError, match="multiple"):
        ViTConfig(img_size=100, patch_size=16)
    with pytest.raises(ValueError, match="positive"):
        ViTConfig(patch_size=0)
    with pytest.raises(ValueError, match="positive"):
        ViTConfig(num_heads=0)
    with pytest.raises(ValueError, match="ResNet stride"):
        ViTConfig(img_size=200, patch_size=1, resnet_layers=(3, 4, 9))  # 200 is not a multiple of 16
    assert ViTConfig(img_size=208, patch_size=1, resnet_layers=[3, 4, 9]).resnet_layers == (3, 4, 9)


@pytest.mark.parametrize("name", ["Z/16", "B16", "B/", "b/16", "B/0", "R77+B/16", "R50+B/8", "B/16/2", ""])
def test_unknown_variant_names(name):
    with pytest.raises(ValueError):
        create_model(name, device="meta")


def test_unknown_override_field():
    with pytest.raises(TypeError, match="drop_rate"):
        create_model("Mu/16", drop_rate=0.1, device="meta")
    with pytest.raises(TypeError, match="drop_rate"):
        model_config("Mu/16", drop_rate=0.1)
    cfg = model_config("B/16", img_size=384, dropout=0.1)
    assert (cfg.img_size, cfg.dropout, cfg.width) == (384, 0.1, 768)
    assert {f.name for f in dataclasses.fields(cfg)} >= {"img_size", "dropout", "width", "resnet_layers"}


# ---------------------------------------------------------------------------- FLOPs
def test_flops_b16_matches_literature():
    model = create_model("B/16", device="meta")
    assert model.flops_per_image() == pytest.approx(35.1e9, rel=0.05)  # 17.6 GMACs


@pytest.mark.parametrize(
    "name,img_size", [("Mu/16", 224), ("B/16", 224), ("L/32", 384), ("R50+B/16", 224), ("R26+Mu/32", 64)]
)
def test_flops_match_torch_flop_counter(name, img_size):
    # On meta, SDPA is counted as its two batched matmuls (the CPU kernel is not counted at all).
    model = create_model(name, img_size=img_size, device="meta")
    x = torch.empty(2, 3, img_size, img_size, device="meta")
    with FlopCounterMode(display=False) as counter:
        model(x)
    assert counter.get_total_flops() == 2 * model.flops_per_image()


def test_dtype_argument(images):
    model = create_model("Mu/16", img_size=32, num_classes=3, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    with torch.no_grad():
        out = model(images().to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == (2, 3)


def test_rates_outside_zero_one_are_rejected(tiny_config):
    for name in ("dropout", "attn_dropout", "drop_path"):
        with pytest.raises(ValueError, match=name):
            tiny_config(**{name: 1.0})
        with pytest.raises(ValueError, match=name):
            tiny_config(**{name: -0.1})


def test_dynamic_size_refuses_to_crop(tiny_model, images):
    model = tiny_model(dynamic_img_size=True)
    with pytest.raises(ValueError, match="not a multiple of the model's stride 8"):
        model(images(size=(36, 40)))
    assert model(images(size=(40, 48))).shape == (2, 5)


def test_no_weight_decay_names_only_existing_parameters(tiny_model):
    for pool in ("cls", "gap"):
        model = tiny_model(pool=pool)
        names = dict(model.named_parameters())
        skip = model.no_weight_decay()
        assert skip <= set(names)
        assert "pos_embed" in skip and ("cls_token" in skip) == (pool == "cls")
        assert "blocks.0.attn.qkv.weight" not in skip and "blocks.0.norm1.weight" in skip


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = create_model("Mu/4", num_classes=5, img_size=16)
    images = torch.randn(3, 3, 16, 16)

    def grads():
        model.zero_grad()
        model(images).square().sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.set_grad_checkpointing(True)
    checkpointed = grads()
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b)
    with torch.no_grad():  # no recomputation is needed without gradients
        assert model(images).shape == (3, 5)
