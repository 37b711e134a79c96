"""Fine-tuning released weights with no model named (``model: null``): the variant is read off the file.

Tiny files in each release's own layout (the original JAX ``.npz``, timm, Hugging Face), written here from a
model of ours; ``build_model`` must rebuild that model from the file alone, and the pipeline must fine-tune it
with ``pretrain: null``, as the README promises.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

import vit
from pipelines.common.config import ConfigError
from pipelines.training.config import load_train_config
from pipelines.training.weights import build_model, init_model_config


def random_model(name: str = "Mu/8", *, seed: int = 0, **overrides) -> vit.VisionTransformer:
    """A model with every parameter random (LayerNorms and head included), so that each tensor is told apart."""
    torch.manual_seed(seed)
    model = vit.create_model(name, head_zero_init=False, **overrides)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.1)
    return model.eval()


def odd_model(**overrides) -> vit.VisionTransformer:
    """Width 48: the width of no named size (its 4 heads are only known from an .npz's kernel shapes)."""
    fields = dict(width=48, depth=2, num_heads=4, mlp_dim=96, patch_size=8, img_size=16, num_classes=5)
    return random_model(**{**fields, **overrides})


def npz_params(model: vit.VisionTransformer) -> dict[str, np.ndarray]:
    """Our weights under the names and in the shapes of google-research/vision_transformer's .npz files."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    D, H = model.config.width, model.config.num_heads
    p = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),  # (kh, kw, in, out)
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
        "head/kernel": sd["head.weight"].T,
        "head/bias": sd["head.bias"],
    }
    if "pre_logits.fc.weight" in sd:
        p["pre_logits/kernel"], p["pre_logits/bias"] = sd["pre_logits.fc.weight"].T, sd["pre_logits.fc.bias"]
    for i in range(model.config.depth):
        b, ours = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        p[b + "LayerNorm_0/scale"], p[b + "LayerNorm_0/bias"] = sd[ours + "norm1.weight"], sd[ours + "norm1.bias"]
        p[b + "LayerNorm_2/scale"], p[b + "LayerNorm_2/bias"] = sd[ours + "norm2.weight"], sd[ours + "norm2.bias"]
        attn = b + "MultiHeadDotProductAttention_1/"
        weights = np.split(sd[ours + "attn.qkv.weight"], 3)
        biases = np.split(sd[ours + "attn.qkv.bias"], 3)
        for name, weight, bias in zip(("query", "key", "value"), weights, biases):
            p[f"{attn}{name}/kernel"] = weight.T.reshape(D, H, D // H)  # (D, heads, D/heads)
            p[f"{attn}{name}/bias"] = bias.reshape(H, D // H)
        p[attn + "out/kernel"] = sd[ours + "attn.proj.weight"].T.reshape(H, D // H, D)
        p[attn + "out/bias"] = sd[ours + "attn.proj.bias"]
        mlp = b + "MlpBlock_3/"
        p[mlp + "Dense_0/kernel"], p[mlp + "Dense_0/bias"] = sd[ours + "mlp.fc1.weight"].T, sd[ours + "mlp.fc1.bias"]
        p[mlp + "Dense_1/kernel"], p[mlp + "Dense_1/bias"] = sd[ours + "mlp.fc2.weight"].T, sd[ours + "mlp.fc2.bias"]
    return {k: np.ascontiguousarray(v) for k, v in p.items()}


def write_npz(model: vit.VisionTransformer, path: Path) -> Path:
    np.savez(path, **npz_params(model))
    return path


def write_timm_pth(model: vit.VisionTransformer, path: Path) -> Path:
    torch.save({"model": model.state_dict(), "epoch": 300}, path)  # as timm's train script saves them
    return path


def write_timm_safetensors(model: vit.VisionTransformer, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def write_hf_file(model: vit.VisionTransformer, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file(vit.to_hf_state_dict(model), str(path), metadata={"format": "pt"})
    return path


def write_hf_folder(model: vit.VisionTransformer, path: Path) -> Path:
    path.mkdir()
    write_hf_file(model, path / "model.safetensors")
    return path


# name: (writer, source model) -- the .npz of a width of no named size; timm and HF of Ti's width, one block
FORMATS = {
    "jax.npz": (write_npz, lambda: odd_model(representation_size=24)),
    "timm.pth": (write_timm_pth, lambda: random_model("Ti/16", depth=1, img_size=32, num_classes=7)),
    "timm.safetensors": (write_timm_safetensors, lambda: random_model("Ti/16", depth=1, img_size=32, num_classes=7)),
    "hf.safetensors": (write_hf_file, lambda: random_model("Ti/16", depth=1, img_size=32, num_classes=7)),
    "hf": (write_hf_folder, lambda: random_model("Ti/16", depth=1, img_size=32, num_classes=7)),
}


def finetune_config(init_from: Path, *extra: str):
    return load_train_config("finetune", None, [f"init_from={init_from}", *extra])


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_build_model_reads_the_variant_off_released_weights(tmp_path, name):
    write, make = FORMATS[name]
    source = make()
    path = write(source, tmp_path / name)
    image_size = source.config.img_size * 2  # fine-tuning at twice the resolution, as the paper does
    cfg = finetune_config(path, f"data.image_size={image_size}")
    assert cfg.model is None

    model = build_model(cfg, num_classes=10, multi_label=False)

    # what the driver can check before any worker starts (the file does not hold head_zero_init: the default)
    assert init_model_config(cfg) == dataclasses.replace(source.config, head_zero_init=True)
    got, want = model.config, source.config
    assert (got.width, got.depth, got.num_heads, got.mlp_dim, got.patch_size) == (
        want.width, want.depth, want.num_heads, want.mlp_dim, want.patch_size)  # fmt: skip
    assert got.num_classes == 10 and got.img_size == image_size and got.representation_size is None
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    trunk = {k: v for k, v in source.state_dict().items() if k.startswith(("blocks.", "patch_embed.", "norm."))}
    for key, value in trunk.items():
        torch.testing.assert_close(model.state_dict()[key], value, atol=0, rtol=0, msg=key)
    old = source.config.grid_size
    expected = vit.resample_pos_embed(source.pos_embed, (old[0] * 2, old[1] * 2), old_grid=old, num_prefix_tokens=1)
    torch.testing.assert_close(model.pos_embed, expected)


@pytest.mark.parametrize("name", ["timm.pth", "hf.safetensors"])
def test_weights_of_no_named_width_ask_for_finetune_model(tmp_path, name):
    """timm and HF files do not hold the head count: a width of no named size needs the variant named."""
    write, _ = FORMATS[name]
    source = odd_model()
    path = write(source, tmp_path / name)
    with pytest.raises(ConfigError, match=r"^model: .*width 48 is that of no named size") as err:
        build_model(finetune_config(path, "data.image_size=16"), num_classes=10, multi_label=False)
    assert "`finetune.model`" in str(err.value) and "num_heads" in str(err.value) and str(path) in str(err.value)
    with pytest.raises(ConfigError, match="`finetune.model`"):
        init_model_config(finetune_config(path))

    # named: the head count alone, or a variant with the sizes it does not share with the weights
    for extra in (
        ["model_args={num_heads: 4}"],
        ["model=S/8", "model_args={width: 48, depth: 2, num_heads: 4, mlp_dim: 96}"],
    ):
        model = build_model(finetune_config(path, "data.image_size=16", *extra), num_classes=10, multi_label=False)
        assert model.config.num_heads == 4
        torch.testing.assert_close(model.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight, atol=0, rtol=0)


TINY = ["finetune.steps=6", "finetune.optim.warmup_steps=2", "evaluate.shots=[1,5]", "finetune.data.loader_workers=0"]


def test_the_pipeline_fine_tunes_a_released_npz_without_pretraining(ray_local, tmp_path):
    """README, "Your own corpus": `pretrain: null` with `finetune.init_from: ViT-B_16.npz`, at toy size."""
    from pipelines.common.config import load_config
    from pipelines.orchestration.config import LOCAL_CONFIG, PipelineConfig
    from pipelines.orchestration.workflow import run_pipeline

    source = odd_model(representation_size=24)  # 16 px, a 2x2 grid: the demo's 32 px resamples it to 4x4
    npz = write_npz(source, tmp_path / "ViT-tiny.npz")
    overrides = [*TINY, "pretrain=null", f"finetune.init_from={npz}", f"workdir={tmp_path / 'work'}"]
    cfg = load_config(PipelineConfig, LOCAL_CONFIG, [*overrides, "tracking.enabled=false"])
    assert cfg.pretrain is None and cfg.finetune.model is None
    messages: list[str] = []

    result = run_pipeline(cfg, log=messages.append)

    assert result.ran == ["corpus", "shard", "finetune", "evaluate", "register"], messages
    assert result.outputs["pretrain"] == {} and "ViT-tiny.npz" in "\n".join(messages)
    tuned = vit.load_model(result.outputs["finetune"]["model_path"])
    config = tuned.config
    assert (config.width, config.depth, config.num_heads, config.mlp_dim, config.patch_size) == (48, 2, 4, 96, 8)
    assert config.num_classes == 10 and config.img_size == 32 and config.representation_size is None
    # Six SGD steps of lr <= 0.2, momentum 0.9, gradients clipped at norm 1 move the weights by at most
    # 0.2 * (1 + 1.9 + ... + 4.7) < 3.6 in all: little, next to the npz trunk's norm (about 17); a model not
    # started from the npz would be as far from it as the trunk is large.
    keys = [k for k in source.state_dict() if k.startswith("blocks.")]
    start = torch.cat([source.state_dict()[k].flatten() for k in keys])
    end = torch.cat([tuned.state_dict()[k].flatten() for k in keys])
    assert (end - start).norm() < 3.6 < start.norm() / 4, (float((end - start).norm()), float(start.norm()))
    top1 = result.outputs["evaluate"]["metrics"]["eval/top1"]
    assert 0.0 <= top1 <= 1.0 and "fewshot/5shot" in result.outputs["evaluate"]["metrics"]
