"""Checkpoint round trips in every format, with independent references.

* ``.npz``: random weights in the JAX release layout, run through a NumPy implementation of the
  paper's equations written here from the JAX code's conventions (not through our converter).
* Hugging Face: ``transformers``' own ViT, loaded both ways, logits equal within 1e-5.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle

import numpy as np
import pytest
import torch
from scipy.special import erf

import vit
from vit.checkpoint import FORMAT_NAME, CheckpointMismatchError, UnsafeCheckpointError, detect_format

transformers = pytest.importorskip("transformers")

MU = dict(width=64, depth=2, num_heads=4, mlp_dim=128)


def tiny(**overrides) -> vit.VisionTransformer:
    fields = dict(img_size=32, patch_size=8, num_classes=5, head_zero_init=False, **MU)
    fields.update(overrides)
    return vit.VisionTransformer(vit.ViTConfig(**fields)).eval()


def images(n=3, size=32, seed=0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ the JAX release format


def random_npz_params(
    *, width=64, depth=2, heads=4, mlp=128, patch=8, grid=4, classes=5, rep=None, naming="vit", seed=0
):
    """Random weights with the names and shapes of the original JAX checkpoints."""
    rng = np.random.default_rng(seed)

    def r(*shape, scale=0.1):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    dh = width // heads
    p = {
        "embedding/kernel": r(patch, patch, 3, width),
        "embedding/bias": r(width),
        "cls": r(1, 1, width),
        "Transformer/posembed_input/pos_embedding": r(1, grid * grid + 1, width),
        "Transformer/encoder_norm/scale": 1 + r(width),
        "Transformer/encoder_norm/bias": r(width),
        "head/kernel": r(rep or width, classes),
        "head/bias": r(classes),
    }
    if rep:
        p["pre_logits/kernel"], p["pre_logits/bias"] = r(width, rep), r(rep)
    # vision_transformer numbers Flax modules by position; big_vision by type.
    ln0, ln1, attn, mlp_name = (
        ("LayerNorm_0", "LayerNorm_2", "MultiHeadDotProductAttention_1", "MlpBlock_3")
        if naming == "vit"
        else ("LayerNorm_0", "LayerNorm_1", "MultiHeadDotProductAttention_0", "MlpBlock_0")
    )
    for i in range(depth):
        b = f"Transformer/encoderblock_{i}/"
        for ln in (ln0, ln1):
            p[b + ln + "/scale"], p[b + ln + "/bias"] = 1 + r(width), r(width)
        for name in ("query", "key", "value"):
            p[f"{b}{attn}/{name}/kernel"], p[f"{b}{attn}/{name}/bias"] = r(width, heads, dh), r(heads, dh)
        p[f"{b}{attn}/out/kernel"], p[f"{b}{attn}/out/bias"] = r(heads, dh, width), r(width)
        p[f"{b}{mlp_name}/Dense_0/kernel"], p[f"{b}{mlp_name}/Dense_0/bias"] = r(width, mlp), r(mlp)
        p[f"{b}{mlp_name}/Dense_1/kernel"], p[f"{b}{mlp_name}/Dense_1/bias"] = r(mlp, width), r(width)
    return p, (ln0, ln1, attn, mlp_name)


def numpy_vit_forward(p, names, x_nchw, *, patch, heads, depth, eps=1e-6, rep=False):
    """The paper's eqs. (1)-(4) in NumPy on JAX-layout weights (NHWC, (in, out) kernels)."""
    ln0, ln1, attn, mlp_name = names
    x = x_nchw.transpose(0, 2, 3, 1).astype(np.float64)  # NHWC as in JAX
    B, H, W, C = x.shape
    gh, gw = H // patch, W // patch
    patches = x.reshape(B, gh, patch, gw, patch, C).transpose(0, 1, 3, 2, 4, 5).reshape(B, gh * gw, -1)
    tokens = patches @ p["embedding/kernel"].reshape(-1, p["embedding/kernel"].shape[-1]) + p["embedding/bias"]
    cls = np.broadcast_to(p["cls"], (B, 1, tokens.shape[-1]))
    z = np.concatenate([cls, tokens], axis=1) + p["Transformer/posembed_input/pos_embedding"]

    def layer_norm(v, scale, bias):
        mu = v.mean(-1, keepdims=True)
        var = ((v - mu) ** 2).mean(-1, keepdims=True)
        return (v - mu) / np.sqrt(var + eps) * scale + bias

    def gelu(v):
        return 0.5 * v * (1 + erf(v / np.sqrt(2)))

    for i in range(depth):
        b = f"Transformer/encoderblock_{i}/"
        y = layer_norm(z, p[b + ln0 + "/scale"], p[b + ln0 + "/bias"])
        q, k, v = (
            np.einsum("btd,dhk->bthk", y, p[f"{b}{attn}/{n}/kernel"]) + p[f"{b}{attn}/{n}/bias"]
            for n in ("query", "key", "value")
        )
        logits = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1])
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        out = np.einsum("bhqs,bshk->bqhk", weights, v)
        z = z + np.einsum("bqhk,hkd->bqd", out, p[f"{b}{attn}/out/kernel"]) + p[f"{b}{attn}/out/bias"]
        y = layer_norm(z, p[b + ln1 + "/scale"], p[b + ln1 + "/bias"])
        hidden = gelu(y @ p[f"{b}{mlp_name}/Dense_0/kernel"] + p[f"{b}{mlp_name}/Dense_0/bias"])
        z = z + hidden @ p[f"{b}{mlp_name}/Dense_1/kernel"] + p[f"{b}{mlp_name}/Dense_1/bias"]
    y = layer_norm(z, p["Transformer/encoder_norm/scale"], p["Transformer/encoder_norm/bias"])[:, 0]
    if rep:
        y = np.tanh(y @ p["pre_logits/kernel"] + p["pre_logits/bias"])
    return y @ p["head/kernel"] + p["head/bias"]


@pytest.mark.parametrize("naming", ["vit", "big_vision"])
@pytest.mark.parametrize("rep", [None, 48])
def test_npz_matches_numpy_reference(tmp_path, naming, rep):
    params, names = random_npz_params(naming=naming, rep=rep)
    if naming == "big_vision":  # big_vision nests the tower and keeps pos_embedding at the top
        saved = {"img/" + k: v for k, v in params.items()}
        saved["img/pos_embedding"] = saved.pop("img/Transformer/posembed_input/pos_embedding")
    else:
        saved = params
    path = tmp_path / "ViT.npz"
    np.savez(path, **saved)

    model = tiny(representation_size=rep)
    report = vit.load_checkpoint(model, path)
    assert report.format == "npz" and not report.dropped and not report.reinitialized_head

    x = images()
    expected = numpy_vit_forward(params, names, x.numpy(), patch=8, heads=4, depth=2, rep=bool(rep))
    with torch.no_grad():
        got = model(x).double().numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_npz_scanned_layers_are_unstacked(tmp_path):
    params, names = random_npz_params()
    scanned = {k: v for k, v in params.items() if "encoderblock_" not in k}
    block_keys = {k.split("/", 2)[2] for k in params if "encoderblock_" in k}
    for rest in block_keys:
        scanned["Transformer/encoderblock/" + rest] = np.stack(
            [params[f"Transformer/encoderblock_{i}/{rest}"] for i in range(2)]
        )
    np.savez(tmp_path / "scan.npz", **scanned)
    a, b = tiny(), tiny()
    np.savez(tmp_path / "plain.npz", **params)
    vit.load_checkpoint(a, tmp_path / "scan.npz")
    vit.load_checkpoint(b, tmp_path / "plain.npz")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_npz_fine_tune_at_higher_resolution(tmp_path):
    """The paper's fine-tuning: drop pre-logits, new zero head, E_pos bilinearly resampled."""
    params, _ = random_npz_params(rep=48)
    np.savez(tmp_path / "ViT.npz", **params)
    model = tiny(img_size=48, num_classes=3, head_zero_init=True)
    report = vit.load_checkpoint(model, tmp_path / "ViT.npz")
    assert report.resampled_pos_embed == ((4, 4), (6, 6))
    assert report.reinitialized_head
    assert set(report.dropped) == {"pre_logits.fc.weight", "pre_logits.fc.bias", "head.weight", "head.bias"}
    assert torch.count_nonzero(model.head.weight) == 0
    # class token embedding untouched; the grid part is resampled, not copied
    saved_pos = torch.from_numpy(params["Transformer/posembed_input/pos_embedding"])
    assert torch.equal(model.pos_embed[:, :1], saved_pos[:, :1])
    assert model.pos_embed.shape == (1, 37, 64)
    # corners of an align_corners bilinear resample are the original corners
    old = saved_pos[0, 1:].reshape(4, 4, 64)
    new = model.pos_embed[0, 1:].detach().reshape(6, 6, 64)
    for (i, j), (k, l) in [((0, 0), (0, 0)), ((0, 3), (0, 5)), ((3, 0), (5, 0)), ((3, 3), (5, 5))]:
        torch.testing.assert_close(new[k, l], old[i, j])


def test_npz_hybrid_keys_map_onto_the_resnet_stem(tmp_path):
    model = vit.create_model("R26+Mu/32", img_size=64, num_classes=5)
    sd = model.state_dict()
    params = {}

    def kernel(t):  # torch (out, in, kh, kw) -> JAX (kh, kw, in, out)
        return t.numpy().transpose(2, 3, 1, 0)

    rng = np.random.default_rng(0)
    for name, t in sd.items():
        sd[name] = torch.from_numpy(rng.standard_normal(t.shape).astype(np.float32))
    params["conv_root/kernel"] = kernel(sd["stem.stem.conv.weight"])
    params["gn_root/scale"], params["gn_root/bias"] = (
        sd["stem.stem.norm.weight"].numpy(),
        sd["stem.stem.norm.bias"].numpy(),
    )
    for s, stage in enumerate(model.stem.stages):
        for u, block in enumerate(stage.blocks):
            ours = f"stem.stages.{s}.blocks.{u}."
            jax = f"block{s + 1}/unit{u + 1}/"
            for i in (1, 2, 3):
                params[f"{jax}conv{i}/kernel"] = kernel(sd[f"{ours}conv{i}.weight"])
                params[f"{jax}gn{i}/scale"] = sd[f"{ours}norm{i}.weight"].numpy()
                params[f"{jax}gn{i}/bias"] = sd[f"{ours}norm{i}.bias"].numpy()
            if block.downsample is not None:
                params[f"{jax}conv_proj/kernel"] = kernel(sd[f"{ours}downsample.conv.weight"])
                params[f"{jax}gn_proj/scale"] = sd[f"{ours}downsample.norm.weight"].numpy()
                params[f"{jax}gn_proj/bias"] = sd[f"{ours}downsample.norm.bias"].numpy()
    vit_params, _ = random_npz_params(patch=1, grid=2, depth=4)
    vit_params["embedding/kernel"] = kernel(sd["patch_embed.proj.weight"])
    params.update(vit_params)
    np.savez(tmp_path / "R26.npz", **params)
    report = vit.load_checkpoint(model, tmp_path / "R26.npz")
    assert report.format == "npz" and not report.missing
    for name in ("stem.stem.conv.weight", "stem.stages.1.blocks.0.downsample.conv.weight", "patch_embed.proj.weight"):
        assert torch.equal(model.state_dict()[name], sd[name]), name


# ------------------------------------------------------------------ Hugging Face parity


def hf_config(**overrides):
    fields = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=32,
        patch_size=8,
        num_labels=5,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        attn_implementation="eager",
    )
    fields.update(overrides)
    attn = fields.pop("attn_implementation")
    cfg = transformers.ViTConfig(**fields)
    cfg._attn_implementation = attn
    return cfg


def test_hf_weights_into_ours_give_the_same_logits():
    torch.manual_seed(1)
    hf = transformers.ViTForImageClassification(hf_config()).eval()
    ours = tiny()
    report = vit.load_checkpoint(ours, hf.state_dict())
    assert report.format == "hf" and not report.dropped
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(pixel_values=x).logits, atol=1e-5, rtol=0)


def test_our_weights_into_hf_give_the_same_logits():
    torch.manual_seed(2)
    ours = tiny()
    hf = transformers.ViTForImageClassification(hf_config()).eval()
    result = hf.load_state_dict(vit.to_hf_state_dict(ours, legacy_names=False))
    assert not result.missing_keys and not result.unexpected_keys
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).logits, ours(x), atol=1e-5, rtol=0)


def test_hub_layout_folder_round_trip(tmp_path):
    """Legacy Hub names in a save_pretrained folder: transformers reads them, and so do we."""
    from safetensors.torch import save_file

    ours = tiny()
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file(vit.to_hf_state_dict(ours), str(folder / "model.safetensors"), metadata={"format": "pt"})
    hf_config().save_pretrained(folder)
    hf = transformers.ViTForImageClassification.from_pretrained(folder).eval()
    back = tiny()
    assert vit.load_checkpoint(back, folder).format == "hf"
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).logits, ours(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(back(x), ours(x), atol=0, rtol=0)


def test_hf_vit_model_pooler_is_the_pre_logits_layer():
    torch.manual_seed(3)
    hf = transformers.ViTModel(hf_config()).eval()
    ours = tiny(num_classes=0, representation_size=64)
    vit.load_checkpoint(ours, hf.state_dict())
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(pixel_values=x).pooler_output, atol=1e-5, rtol=0)
    # without a representation layer the pooler is dropped, and said so
    report = vit.load_checkpoint(tiny(num_classes=0), hf.state_dict())
    assert report.dropped == ["pre_logits.fc.weight", "pre_logits.fc.bias"]


def test_hf_export_refuses_what_hf_cannot_hold():
    with pytest.raises(ValueError, match="class token"):
        vit.to_hf_state_dict(tiny(pool="gap"))
    with pytest.raises(ValueError, match="pre-logits"):
        vit.to_hf_state_dict(tiny(representation_size=32))


# ------------------------------------------------------------------ our format and timm


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_own_format_round_trip(tmp_path, suffix):
    model = tiny(pool="gap", representation_size=32, drop_path=0.1)
    path = vit.save_checkpoint(model, tmp_path / f"sub/model{suffix}")
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    loaded = vit.load_model(path).eval()
    assert loaded.config == model.config
    x = images()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # fine-tuning overrides: new grid and a new head
    bigger = vit.load_model(path, img_size=48, num_classes=2)
    assert bigger.pos_embed.shape == (1, 36, 64) and bigger.head.out_features == 2


def test_timm_state_dicts_load(tmp_path):
    from safetensors.torch import save_file

    model = tiny()
    sd = model.state_dict()
    torch.save(sd, tmp_path / "timm.pth")
    save_file(sd, str(tmp_path / "timm.safetensors"))
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3}, tmp_path / "train.pth.tar")
    x = images()
    for name in ("timm.pth", "timm.safetensors", "train.pth.tar"):
        other = tiny()
        assert vit.load_checkpoint(other, tmp_path / name).format == "timm"
        with torch.no_grad():
            assert torch.equal(other(x), model(x)), name


def test_timm_hybrid_backbone_prefix():
    model = vit.create_model("R26+Mu/32", img_size=64, num_classes=5, head_zero_init=False).eval()
    timm_sd = {
        k.replace("stem.stem.", "patch_embed.backbone.stem.").replace("stem.stages.", "patch_embed.backbone.stages."): v
        for k, v in model.state_dict().items()
    }
    assert any(k.startswith("patch_embed.backbone.stages.0.blocks.0.downsample.conv") for k in timm_sd)
    other = vit.create_model("R26+Mu/32", img_size=64, num_classes=5).eval()
    vit.load_checkpoint(other, timm_sd)
    x = images(size=64)
    with torch.no_grad():
        assert torch.equal(other(x), model(x))


def test_timm_variants_that_are_not_the_paper_model_are_refused():
    sd = tiny().state_dict()
    sd["fc_norm.weight"] = torch.ones(64)
    with pytest.raises(ValueError, match="fc_norm"):
        vit.load_checkpoint(tiny(), sd)


# ------------------------------------------------------------------ the variant of released weights


def _scanned(params: dict, depth: int) -> dict:
    """big_vision's scan_layers layout: every block's arrays stacked under ``encoderblock/``."""
    out = {k: v for k, v in params.items() if "encoderblock_" not in k}
    for rest in {k.split("/", 2)[2] for k in params if "encoderblock_" in k}:
        out["Transformer/encoderblock/" + rest] = np.stack(
            [params[f"Transformer/encoderblock_{i}/{rest}"] for i in range(depth)]
        )
    return out


@pytest.mark.parametrize("layout", ["vit", "big_vision", "scanned"])
def test_npz_of_no_named_width_gives_its_heads_in_the_query_kernels(tmp_path, layout):
    """Width 48 is no named size: the head count comes from the (D, heads, D/heads) kernels alone."""
    naming = "big_vision" if layout == "big_vision" else "vit"
    params, names = random_npz_params(width=48, heads=6, mlp=96, depth=3, rep=24, classes=7, naming=naming)
    saved = _scanned(params, 3) if layout == "scanned" else params
    if layout == "big_vision":  # the tower nested, pos_embedding at its top
        saved = {"params/img/" + k: v for k, v in params.items()}
        saved["params/img/pos_embedding"] = saved.pop("params/img/Transformer/posembed_input/pos_embedding")
    np.savez(tmp_path / "w.npz", **saved)

    config = vit.infer_model_config(tmp_path / "w.npz")
    assert (config.width, config.depth, config.num_heads, config.mlp_dim) == (48, 3, 6, 96)
    assert (config.patch_size, config.img_size, config.num_classes, config.representation_size) == (8, 32, 7, 24)
    assert config.pool == "cls" and config.qkv_bias and config.resnet_layers is None and config.layer_norm_eps == 1e-6

    model = vit.load_model(tmp_path / "w.npz").eval()  # the whole model, read off the file
    x = images()
    expected = numpy_vit_forward(params, names, x.numpy(), patch=8, heads=6, depth=3, rep=True)
    with torch.no_grad():
        np.testing.assert_allclose(model(x).double().numpy(), expected, atol=1e-4, rtol=1e-4)

    # fine-tuning: another resolution, a new head, no pre-logits
    tuned = vit.load_model(tmp_path / "w.npz", img_size=48, num_classes=3, representation_size=None)
    assert tuned.config.num_heads == 6 and tuned.pos_embed.shape == (1, 37, 48) and tuned.head.out_features == 3
    assert torch.count_nonzero(tuned.head.weight) == 0
    torch.testing.assert_close(tuned.blocks[2].mlp.fc2.weight, model.blocks[2].mlp.fc2.weight, atol=0, rtol=0)


def _timm_file(model: vit.VisionTransformer, path) -> None:
    torch.save(model.state_dict(), path)


def _timm_safetensors(model: vit.VisionTransformer, path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def _hf_file(model: vit.VisionTransformer, path) -> None:
    from safetensors.torch import save_file

    save_file(vit.to_hf_state_dict(model), str(path), metadata={"format": "pt"})


def _hf_folder(model: vit.VisionTransformer, path) -> None:
    path.mkdir()
    _hf_file(model, path / "model.safetensors")


WRITERS = {"timm.pth": _timm_file, "timm.safetensors": _timm_safetensors, "hf.safetensors": _hf_file, "hf": _hf_folder}


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_timm_and_hf_weights_take_the_heads_of_the_named_size_of_their_width(tmp_path, name):
    """Ti's width, 192, gives 3 heads (a single block keeps the file small)."""
    source = vit.create_model("Ti/16", depth=1, img_size=32, num_classes=7, head_zero_init=False).eval()
    WRITERS[name](source, tmp_path / name)
    config = vit.infer_model_config(tmp_path / name)
    assert config == dataclasses.replace(source.config, head_zero_init=True)  # the one field no file holds
    model = vit.load_model(tmp_path / name).eval()
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "name, names",
    [(n, "timm") for n in ("Ti/16", "S/32", "B/16", "L/16", "H/14", "R50+B/16")]
    + [(n, "hf") for n in ("Ti/16", "S/32", "B/16", "L/16", "H/14")],  # Hugging Face ViT has no hybrid
)
def test_every_named_size_is_recognised_from_its_tensors_on_the_meta_device(name, names):
    """Full-size models, built on meta: only shapes are read, nothing is allocated."""
    model = vit.create_model(name, img_size=224, num_classes=21843, device="meta")
    state = model.state_dict() if names == "timm" else vit.to_hf_state_dict(model)
    assert vit.infer_model_config(state) == model.config


def test_a_hybrid_is_recognised_from_its_resnet_stages(tmp_path):
    model = vit.create_model("R26+Mu/32", img_size=64, num_classes=5)
    renamed = {k.replace("stem.", "patch_embed.backbone.", 1): v for k, v in model.state_dict().items()}
    torch.save(renamed, tmp_path / "r26.pth")  # timm's names for the stem
    config = vit.infer_model_config(tmp_path / "r26.pth")
    assert config.resnet_layers == (2, 2, 2, 2) and config.patch_size == 1 and config.img_size == 64
    assert config == model.config


@pytest.mark.parametrize("name", ["timm.pth", "hf.safetensors"])
def test_weights_of_no_named_width_without_a_head_count_must_be_named(tmp_path, name):
    source = tiny(width=48, num_heads=4, mlp_dim=96)
    WRITERS[name](source, tmp_path / name)
    with pytest.raises(vit.UnknownVariantError, match=r"width 48 is that of no named size.*give num_heads") as err:
        vit.infer_model_config(tmp_path / name)
    assert str(tmp_path / name) in str(err.value) and err.value.width == 48
    with pytest.raises(vit.UnknownVariantError):
        vit.load_model(tmp_path / name)
    assert vit.infer_model_config(tmp_path / name, num_heads=4).num_heads == 4
    model = vit.load_model(tmp_path / name, num_heads=4).eval()
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), atol=1e-5, rtol=0)


def test_released_weights_that_hold_no_whole_model_are_refused(tmp_path):
    params, _ = random_npz_params()
    del params["Transformer/encoder_norm/scale"]
    np.savez(tmp_path / "partial.npz", **params)
    with pytest.raises(CheckpointMismatchError, match="does not hold a whole ViT") as err:
        vit.infer_model_config(tmp_path / "partial.npz")
    assert err.value.missing == ["norm.weight"] and str(tmp_path / "partial.npz") in str(err.value)
    sd = tiny().state_dict()
    sd["blocks.0.mlp.fc2.weight"] = sd["blocks.0.mlp.fc2.weight"][:, :32]
    with pytest.raises(CheckpointMismatchError, match="blocks.0.mlp.fc2.weight"):
        vit.infer_model_config(sd)
    with pytest.raises(ValueError, match="no square patch embedding"):
        vit.infer_model_config({k: v for k, v in sd.items() if not k.startswith("patch_embed.")})


def test_released_tensors_sharing_one_storage_do_not_make_load_model_build_a_larger_model(tmp_path):
    """Every block a view of block 0's storage: a small file that claims a deep model is refused before building."""
    sd = tiny(depth=8).state_dict()
    for key in list(sd):
        if key.startswith("blocks."):
            sd[key] = sd["blocks.0." + key.split(".", 2)[2]]
    torch.save(sd, tmp_path / "shared.pth")
    with pytest.raises(UnsafeCheckpointError, match="claim .* bytes but it holds"):
        vit.load_model(tmp_path / "shared.pth")


# ------------------------------------------------------------------ errors and safety


def test_mismatch_names_missing_unexpected_and_shapes():
    deeper = tiny(depth=3).state_dict()
    with pytest.raises(CheckpointMismatchError) as err:
        vit.load_checkpoint(tiny(), deeper)
    assert "blocks.2.attn.qkv.weight" in err.value.unexpected
    assert "unexpected keys (12)" in str(err.value)

    with pytest.raises(CheckpointMismatchError) as err:
        vit.load_checkpoint(tiny(depth=3), tiny().state_dict())
    assert "blocks.2.mlp.fc1.weight" in err.value.missing

    wider_mlp = tiny(mlp_dim=256).state_dict()
    with pytest.raises(CheckpointMismatchError) as err:
        vit.load_checkpoint(tiny(), wider_mlp)
    assert any(m.startswith("blocks.0.mlp.fc1.weight") for m in err.value.mismatched)


def test_strict_false_loads_what_fits_and_reports_the_rest():
    src = tiny(depth=2)
    dst = tiny(depth=3)
    before = dst.blocks[2].mlp.fc1.weight.clone()
    report = vit.load_checkpoint(dst, src.state_dict(), strict=False)
    assert "blocks.2.mlp.fc1.weight" in report.missing
    assert torch.equal(dst.blocks[0].mlp.fc1.weight, src.blocks[0].mlp.fc1.weight)
    assert torch.equal(dst.blocks[2].mlp.fc1.weight, before)


def test_failed_strict_load_changes_nothing():
    dst = tiny(depth=3)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(CheckpointMismatchError):
        vit.load_checkpoint(dst, tiny(depth=2).state_dict())
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())


def test_meta_model_gets_tensors_assigned():
    src = tiny()
    meta = vit.VisionTransformer(src.config, device="meta")
    vit.load_checkpoint(meta, src.state_dict())
    assert not any(p.is_meta for p in meta.parameters())
    x = images()
    with torch.no_grad():
        assert torch.equal(meta.eval()(x), src(x))


class _Touch:
    """Unpickling this creates a file: the stand-in for any code a pickle can run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_hostile_pickle_is_refused_without_advice_to_unpickle_it(tmp_path):
    sentinel = tmp_path / "SENTINEL"
    raw = tmp_path / "raw.pth"  # a bare pickle
    with open(raw, "wb") as f:
        pickle.dump({"patch_embed.proj.weight": _Touch(sentinel)}, f)
    zipped = tmp_path / "zipped.pth"  # torch.save's format, as a released checkpoint would be
    torch.save({"patch_embed.proj.weight": _Touch(sentinel)}, zipped)
    for path in (raw, zipped):
        with pytest.raises(UnsafeCheckpointError) as err:
            vit.load_checkpoint(tiny(), path)
        message = str(err.value)
        assert str(path) in message and "refused" in message
        assert "weights_only" not in message and "trusted source" not in message  # torch's advice is dropped
    with pytest.raises(UnsafeCheckpointError, match=r"arbitrary Python objects \(it asks for io\.open\)"):
        vit.load_checkpoint(tiny(), zipped)
    with open(zipped, "rb") as f, pytest.raises(UnsafeCheckpointError, match="zipped.pth is refused") as err:
        vit.load_checkpoint(tiny(), f)
    assert "weights_only" not in str(err.value)
    with pytest.raises(UnsafeCheckpointError):
        vit.load_model(zipped)
    assert not sentinel.exists()


def _hostile_config(**fields) -> dict:
    return {**dataclasses.asdict(vit.ViTConfig()), **fields}


def _write_ours(path, state: dict, config: dict):
    """A file in our format whose config says whatever the test wants."""
    from safetensors.torch import save_file

    if path.suffix == ".safetensors":
        save_file(state, str(path), metadata={"format": FORMAT_NAME, "version": "1", "config": json.dumps(config)})
    else:
        torch.save({"format": FORMAT_NAME, "version": 1, "config": config, "state_dict": state}, path)
    return path


def test_load_model_checks_the_saved_config_against_the_tensors_before_building(tmp_path):
    model = tiny()
    config = dataclasses.asdict(model.config)
    state = model.state_dict()
    deeper = _write_ours(tmp_path / "deeper.safetensors", state, {**config, "depth": 3})
    with pytest.raises(CheckpointMismatchError, match="declares depth 3 but the file holds 2") as err:
        vit.load_model(deeper)
    assert str(deeper) in str(err.value) and "refused before building a model" in str(err.value)

    wider = _write_ours(tmp_path / "wider.pt", state, {**config, "mlp_dim": 256})
    with pytest.raises(CheckpointMismatchError, match="refused before building a model") as err:
        vit.load_model(wider)
    assert str(wider) in str(err.value)
    assert "blocks.0.mlp.fc1.weight: file (128, 64) vs config (256, 64)" in err.value.mismatched

    hybrid = vit.create_model("R26+Mu/32", img_size=64, num_classes=5)
    stages = _write_ours(
        tmp_path / "stages.safetensors",
        hybrid.state_dict(),
        {**dataclasses.asdict(hybrid.config), "resnet_layers": [2, 2, 2, 3]},
    )
    with pytest.raises(CheckpointMismatchError, match=r"declares ResNet stages \[2, 2, 2, 3\] but the file holds"):
        vit.load_model(stages)
    nonsense = _write_ours(tmp_path / "nonsense.safetensors", state, {**config, "width": -64})
    with pytest.raises(ValueError, match="nonsense.safetensors is refused: its saved config describes no model"):
        vit.load_model(nonsense)
    # the honest files still load, hybrids included
    assert vit.load_model(_write_ours(tmp_path / "ok.safetensors", state, config)).config == model.config
    assert vit.load_model(vit.save_checkpoint(hybrid, tmp_path / "hybrid.pt")).config == hybrid.config


def test_tensors_claiming_more_than_their_storage_are_refused(tmp_path):
    model = tiny()
    config = dataclasses.asdict(model.config)
    # each tensor a view of one shared storage: every one fits in it, together they claim far more
    shared = torch.randn(max(v.numel() for v in model.state_dict().values()))
    views = {k: shared[: v.numel()].view(v.shape) for k, v in model.state_dict().items()}
    path = _write_ours(tmp_path / "shared.pt", views, config)
    with pytest.raises(UnsafeCheckpointError, match="shared.pt is refused before building a model: its tensors claim"):
        vit.load_model(path)
    # one element expanded (stride 0) to a whole tensor: refused on reading, whatever the model
    expanded = dict(model.state_dict(), pos_embed=torch.zeros(1).expand(1, 1 + 64 * 64, 64))
    torch.save(expanded, tmp_path / "expanded.pth")
    with pytest.raises(UnsafeCheckpointError, match="'pos_embed' of shape \\(1, 4097, 64\\) claims 1048832 bytes"):
        vit.load_checkpoint(tiny(), tmp_path / "expanded.pth")


_LOAD_UNDER_2_GIB_MORE = """
import json, resource, sys
import vit
from pathlib import Path

status = Path("/proc/self/status").read_text()
address_space = int(status.split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (address_space + (2 << 30), resource.RLIM_INFINITY))
outcomes = {}
for path in sys.argv[1:]:
    try:
        vit.load_model(path)
        outcomes[path] = "built"
    except BaseException as err:
        outcomes[path] = f"{type(err).__name__}: {err}"
print(json.dumps(outcomes))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the address space from /proc")
def test_tiny_files_declaring_a_huge_model_are_refused_in_bounded_memory(tmp_path):
    """The review's case: a few hundred bytes declaring width 12288 x depth 96 (174 G parameters).

    Loaded in a child process allowed 2 GiB more address space than it has after importing torch:
    building any part of that model fails there with an allocation error instead of eating the
    machine; refusing it from the file alone raises our error.
    """
    import subprocess
    import sys

    huge = _hostile_config(width=12288, depth=96, num_heads=96, mlp_dim=49152)
    bare = _write_ours(tmp_path / "bare.safetensors", {"cls_token": torch.zeros(1, 1, 1)}, huge)
    assert bare.stat().st_size < 1024
    # every key the huge model has, each one number: gets past the block count to the shape check
    on_meta = vit.VisionTransformer(vit.ViTConfig(**huge), device="meta")
    shapes = {k: tuple(v.shape) for k, v in on_meta.state_dict().items()}
    keys = _write_ours(tmp_path / "keys.safetensors", {k: torch.zeros(1) for k in shapes}, huge)
    # every tensor at its full shape, each a single element expanded: a 200 kB file
    expanded = _write_ours(tmp_path / "expanded.pt", {k: torch.zeros(1).expand(s) for k, s in shapes.items()}, huge)
    assert expanded.stat().st_size < 1 << 20
    files = [str(bare), str(keys), str(expanded)]
    done = subprocess.run(
        [sys.executable, "-c", _LOAD_UNDER_2_GIB_MORE, *files], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    outcomes = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcomes[str(bare)].startswith("CheckpointMismatchError: vit checkpoint " + str(bare))
    assert "declares depth 96 but the file holds 0 encoder block(s)" in outcomes[str(bare)]
    assert outcomes[str(keys)].startswith("CheckpointMismatchError: vit checkpoint " + str(keys))
    assert "refused before building a model" in outcomes[str(keys)]
    assert outcomes[str(expanded)].startswith("UnsafeCheckpointError: " + str(expanded))
    assert "claims 49152 bytes over a storage of 4 bytes (an expanded or overlapping view)" in outcomes[str(expanded)]


def test_sharded_index_naming_files_outside_its_folder_is_refused(tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "hf"
    folder.mkdir()
    save_file(vit.to_hf_state_dict(tiny()), str(tmp_path / "outside.safetensors"))
    weight_map = {k: "../outside.safetensors" for k in vit.to_hf_state_dict(tiny())}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(UnsafeCheckpointError, match="names '../outside.safetensors', not a file of"):
        vit.load_checkpoint(tiny(), folder)
    # the same index naming its own shard loads
    (folder / "outside.safetensors").write_bytes((tmp_path / "outside.safetensors").read_bytes())
    weight_map = {k: "outside.safetensors" for k in weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert vit.load_checkpoint(tiny(), folder).format == "hf"


def test_npz_with_object_arrays_is_refused(tmp_path):
    np.savez(tmp_path / "evil.npz", cls=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="pickle"):
        vit.load_checkpoint(tiny(), tmp_path / "evil.npz")


def test_garbage_and_missing_files_give_clear_errors(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(ValueError, match="not a readable"):
        vit.load_checkpoint(tiny(), tmp_path / "junk.pth")
    with pytest.raises(FileNotFoundError):
        vit.load_checkpoint(tiny(), tmp_path / "absent.pth")
    with pytest.raises(ValueError, match="unrecognised checkpoint format"):
        vit.load_checkpoint(tiny(), {"foo.weight": torch.zeros(1)})
    torch.save({"foo.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="unrecognised checkpoint format"):
        vit.load_model(tmp_path / "other.pth")


def test_file_objects_and_detection():
    buffer = io.BytesIO()
    model = tiny()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    assert vit.load_checkpoint(tiny(), buffer).format == "timm"
    params, _ = random_npz_params()
    npz_buffer = io.BytesIO()
    np.savez(npz_buffer, **params)
    npz_buffer.seek(0)
    assert vit.load_checkpoint(tiny(), npz_buffer).format == "npz"
    assert detect_format(params) == "npz"


def test_read_checkpoint_gives_format_class_count_and_the_files_tensors_without_building_a_model(tmp_path):
    model = tiny(num_classes=7)
    vit.save_checkpoint(model, tmp_path / "ours.safetensors")
    _hf_folder(model, tmp_path / "hf")
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, tmp_path / "train.pth.tar")
    params, _ = random_npz_params(classes=3)
    np.savez(tmp_path / "w.npz", **params)
    names = ("ours.safetensors", "hf", "train.pth.tar", "w.npz")
    found = {name: vit.read_checkpoint(tmp_path / name) for name in names}
    assert {name: (c.format, c.num_classes) for name, c in found.items()} == {
        "ours.safetensors": ("vit", 7),
        "hf": ("hf", 7),
        "train.pth.tar": ("timm", 7),
        "w.npz": ("npz", 3),
    }
    assert "head.weight" in found["train.pth.tar"].tensors  # unwrapped, its DDP prefix dropped
    assert "Transformer/encoder_norm/scale" in found["w.npz"].tensors  # the file's names, not converted to ours
    assert vit.read_checkpoint(tiny(num_classes=0).state_dict()).num_classes == 0
    again = tiny(num_classes=7)
    vit.load_checkpoint(again, found["hf"].tensors)  # what was read loads as it is: the file is read once
    torch.testing.assert_close(again.head.weight, model.head.weight)
    with pytest.raises(FileNotFoundError):
        vit.read_checkpoint(tmp_path / "absent.pth")
    with pytest.raises(ValueError, match="unrecognised checkpoint format"):
        vit.read_checkpoint({"foo.weight": torch.zeros(1)})


def test_bicubic_resampling_on_load():
    src = tiny()
    dst = tiny(img_size=48)
    report = vit.load_checkpoint(dst, src.state_dict(), pos_embed_method="bicubic")
    assert report.resampled_pos_embed == ((4, 4), (6, 6))
    expected = vit.resample_pos_embed(src.pos_embed, (6, 6), method="bicubic")
    assert torch.equal(dst.pos_embed, expected)
