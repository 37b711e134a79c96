"""The checkpoint formats: telling them apart by their keys, and converting released key layouts to ours.

* ``vit``   -- ours (``vit.checkpoint.save_checkpoint``), marked ``FORMAT_NAME``; our names are timm's.
* ``timm``  -- timm ``VisionTransformer`` state dicts: only hybrids (``patch_embed.backbone.*``) are renamed.
* ``npz``   -- the original JAX release (google-research/vision_transformer and big_vision):
  ``Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel``, ``pre_logits/kernel``; kernels
  are transposed and per-head query/key/value kernels joined into one ``qkv`` weight.
* ``hf``    -- Hugging Face ``ViTModel`` / ``ViTForImageClassification``, under the Hub's (transformers 4) or
  transformers 5's module names; :func:`to_hf_state_dict` goes the other way.

Keys that have no place in our model are kept under ``__unconverted__/`` so that a strict load names them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from vit.model import VisionTransformer

FORMAT_NAME = "vit-platform"
FORMAT_VERSION = 1

StateDict = dict[str, torch.Tensor]


def detect_format(state: Mapping[str, Any], meta: Mapping | None = None) -> str:
    """'vit', 'timm', 'npz' or 'hf' from the names of the tensors."""
    if meta and meta.get("format") == FORMAT_NAME:
        return "vit"
    keys = list(state)
    if any("encoderblock" in k or k.endswith("embedding/kernel") for k in keys):
        return "npz"
    if any("embeddings.patch_embeddings" in k or ".attention.attention.query" in k for k in keys):
        return "hf"
    if any(k.startswith(("patch_embed.", "blocks.")) for k in keys):
        return "timm"
    sample = ", ".join(keys[:5])
    raise ValueError(f"unrecognised checkpoint format (first keys: {sample}); expected ours, timm, .npz or HF ViT")


def _from_timm(state: Mapping[str, Any]) -> StateDict:
    """timm and our own names, which are timm's but for the hybrid's ResNet stem."""
    out: StateDict = {}
    for key, value in state.items():
        if key.startswith(("fc_norm.", "norm_pre.", "reg_token", "attn_pool.")):
            raise ValueError(
                f"timm checkpoint has {key!r}: that ViT variant (pool-then-norm, registers or attention "
                "pooling) is not the paper's model and is not supported"
            )
        key = key.replace("patch_embed.backbone.stem.", "stem.stem.").replace(
            "patch_embed.backbone.stages.", "stem.stages."
        )
        if key.startswith("patch_embed.backbone.norm."):
            continue  # identity in the post-activation hybrid; no tensors in practice
        out[key] = _tensor(value)
    return out


_NPZ_PREFIXES = ("params/", "opt/target/", "img/")


def _from_npz(state: Mapping[str, Any]) -> StateDict:
    """Original JAX release names (vision_transformer and big_vision) to ours."""
    arrays: dict[str, np.ndarray] = {}
    for key, value in state.items():
        for prefix in _NPZ_PREFIXES:
            key = key.removeprefix(prefix)
        arrays[key] = np.asarray(value)
    arrays = _unscan_blocks(arrays)

    out: StateDict = {}

    def put(name: str, array: np.ndarray) -> None:
        out[name] = torch.from_numpy(np.ascontiguousarray(array))

    def conv(kernel: np.ndarray) -> np.ndarray:  # (kh, kw, in, out) -> (out, in, kh, kw)
        return kernel.transpose(3, 2, 0, 1)

    block_modules: dict[int, dict[str, dict[str, np.ndarray]]] = {}
    block_re = re.compile(r"^Transformer/encoderblock_(\d+)/([^/]+)/(.+)$")
    unit_re = re.compile(r"^block(\d+)/unit(\d+)/(conv|gn)(\d|_proj)/(kernel|scale|bias)$")
    for key, a in arrays.items():
        if m := block_re.match(key):
            block_modules.setdefault(int(m[1]), {}).setdefault(m[2], {})[m[3]] = a
        elif key == "embedding/kernel":
            put("patch_embed.proj.weight", conv(a))
        elif key == "embedding/bias":
            put("patch_embed.proj.bias", a)
        elif key == "cls":
            put("cls_token", a)
        elif key in ("Transformer/posembed_input/pos_embedding", "pos_embedding"):
            put("pos_embed", a)
        elif key.startswith("Transformer/encoder_norm/"):
            put("norm.weight" if key.endswith("scale") else "norm.bias", a)
        elif key in ("pre_logits/kernel", "head/kernel"):
            put(key.split("/")[0].replace("pre_logits", "pre_logits.fc") + ".weight", a.T)
        elif key in ("pre_logits/bias", "head/bias"):
            put(key.split("/")[0].replace("pre_logits", "pre_logits.fc") + ".bias", a)
        elif key == "conv_root/kernel":
            put("stem.stem.conv.weight", conv(a))
        elif key.startswith("gn_root/"):
            put("stem.stem.norm." + ("weight" if key.endswith("scale") else "bias"), a)
        elif m := unit_re.match(key):
            stage, unit, kind, idx, param = int(m[1]) - 1, int(m[2]) - 1, m[3], m[4], m[5]
            prefix = f"stem.stages.{stage}.blocks.{unit}."
            if idx == "_proj":
                prefix += "downsample." + ("conv" if kind == "conv" else "norm")
            else:
                prefix += ("conv" if kind == "conv" else "norm") + idx
            put(
                prefix + ".weight" if param in ("kernel", "scale") else prefix + ".bias",
                conv(a) if kind == "conv" else a,
            )
        elif key.startswith("MAPHead"):
            raise ValueError(f"npz checkpoint has an attention-pooling head ({key}); not the paper's model")
        else:
            out["__unconverted__/" + key] = torch.from_numpy(np.ascontiguousarray(a))

    for i, modules in sorted(block_modules.items()):
        p = f"blocks.{i}."
        norms = sorted((k for k in modules if k.startswith("LayerNorm_")), key=lambda k: int(k.split("_")[1]))
        attn = [k for k in modules if k.startswith("MultiHeadDotProductAttention")]
        mlp = [k for k in modules if k.startswith("MlpBlock")]
        if len(norms) != 2 or len(attn) != 1 or len(mlp) != 1:
            raise ValueError(f"npz block {i} has unexpected modules: {sorted(modules)}")
        for name, target in zip(norms, ("norm1", "norm2")):
            put(p + target + ".weight", modules[name]["scale"])
            put(p + target + ".bias", modules[name]["bias"])
        a = modules[attn[0]]
        D = a["query/kernel"].shape[0]
        # (D, H, Dh) kernels -> one (3D, D) torch weight; rows are [q heads..., k heads..., v heads...]
        put(
            p + "attn.qkv.weight",
            np.concatenate([a[f"{n}/kernel"].reshape(D, -1).T for n in ("query", "key", "value")]),
        )
        if "query/bias" in a:
            put(p + "attn.qkv.bias", np.concatenate([a[f"{n}/bias"].reshape(-1) for n in ("query", "key", "value")]))
        put(p + "attn.proj.weight", a["out/kernel"].reshape(-1, D).T)
        put(p + "attn.proj.bias", a["out/bias"])
        m_ = modules[mlp[0]]
        put(p + "mlp.fc1.weight", m_["Dense_0/kernel"].T)
        put(p + "mlp.fc1.bias", m_["Dense_0/bias"])
        put(p + "mlp.fc2.weight", m_["Dense_1/kernel"].T)
        put(p + "mlp.fc2.bias", m_["Dense_1/bias"])
    return out


def _unscan_blocks(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """big_vision's ``scan_layers`` stores all blocks stacked under ``encoderblock/``; split them."""
    scanned = {k: v for k, v in arrays.items() if k.startswith("Transformer/encoderblock/")}
    if not scanned:
        return arrays
    out = {k: v for k, v in arrays.items() if k not in scanned}
    for key, value in scanned.items():
        rest = key.removeprefix("Transformer/encoderblock/")
        for i in range(value.shape[0]):
            out[f"Transformer/encoderblock_{i}/{rest}"] = value[i]
    return out


# Per-block names: Hugging Face checkpoints on the Hub (transformers 4) and transformers 5 modules.
_HF_BLOCK_LEGACY = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.attention.query": "q",
    "attention.attention.key": "k",
    "attention.attention.value": "v",
    "attention.output.dense": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
_HF_BLOCK_V5 = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.q_proj": "q",
    "attention.k_proj": "k",
    "attention.v_proj": "v",
    "attention.o_proj": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "pooler.dense.weight": "pre_logits.fc.weight",
    "pooler.dense.bias": "pre_logits.fc.bias",
    "classifier.weight": "head.weight",
    "classifier.bias": "head.bias",
}


def _from_hf(state: Mapping[str, Any]) -> StateDict:
    """Hugging Face names (with or without the ``vit.`` prefix, either naming scheme) to ours."""
    out: StateDict = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    layer_re = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$")
    for key, value in state.items():
        t = _tensor(value)
        key = key.removeprefix("vit.")
        if key == "embeddings.mask_token":
            continue  # only used for masked-image-modelling pretraining
        if m := layer_re.match(key):
            i, module, param = int(m[1]), m[2], m[3]
            ours = (_HF_BLOCK_LEGACY if key.startswith("encoder.") else _HF_BLOCK_V5).get(module)
            if ours in ("q", "k", "v"):
                qkv.setdefault((i, param), {})[ours] = t
            elif ours:
                out[f"blocks.{i}.{ours}.{param}"] = t
            else:
                out["__unconverted__/" + key] = t
            continue
        out[_HF_TOP.get(key) or "__unconverted__/" + key] = t
    for (i, param), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"HF layer {i} is missing some of query/key/value {param}")
        out[f"blocks.{i}.attn.qkv.{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


_CONVERTERS = {"vit": _from_timm, "timm": _from_timm, "npz": _from_npz, "hf": _from_hf}


def convert(state: Mapping[str, Any], fmt: str) -> StateDict:
    """The tensors of a checkpoint in format ``fmt`` (see :func:`detect_format`) under our names."""
    return _CONVERTERS[fmt](state)


def _tensor(value: Any) -> torch.Tensor:
    """A torch tensor of a tensor or a numeric array; object and string arrays are refused."""
    if isinstance(value, torch.Tensor):
        return value
    array = np.asarray(value)
    if array.dtype.kind not in "fiub":
        raise ValueError(f"unsupported array dtype {array.dtype}")
    return torch.from_numpy(np.ascontiguousarray(array))


def to_hf_state_dict(
    model: VisionTransformer, *, for_classification: bool = True, legacy_names: bool = True
) -> StateDict:
    """Our weights under Hugging Face names.

    ``for_classification``: ``ViTForImageClassification`` (``vit.`` prefix, ``classifier``) or
    ``ViTModel`` (whose tanh pooler is our pre-logits layer). ``legacy_names``: the names of the
    checkpoints on the Hub, which every transformers version's ``from_pretrained`` reads; False
    gives transformers 5's module names, for ``load_state_dict`` on an instantiated v5 model.
    """
    cfg = model.config
    if cfg.resnet_layers is not None or cfg.pool != "cls":
        raise ValueError("Hugging Face ViT has a class token and no ResNet stem: only pure cls-token models export")
    if not cfg.qkv_bias:
        raise ValueError("Hugging Face ViT always has q/k/v biases; this model has qkv_bias=False")
    if for_classification and cfg.representation_size:
        raise ValueError("ViTForImageClassification has no pre-logits layer; export with for_classification=False")
    prefix = "vit." if for_classification else ""
    block_names, layer = (_HF_BLOCK_LEGACY, "encoder.layer") if legacy_names else (_HF_BLOCK_V5, "layers")
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out: StateDict = {}
    for hf_name, ours in _HF_TOP.items():
        if ours not in sd:
            continue
        if hf_name.startswith("classifier"):  # only ViTForImageClassification has a classifier
            if for_classification:
                out[hf_name] = sd[ours]
        elif hf_name.startswith("pooler"):  # only ViTModel has a pooler
            if not for_classification:
                out[hf_name] = sd[ours]
        else:
            out[prefix + hf_name] = sd[ours]
    for i in range(cfg.depth):
        q_k_v = dict(
            zip("qkv", zip(sd[f"blocks.{i}.attn.qkv.weight"].chunk(3), sd[f"blocks.{i}.attn.qkv.bias"].chunk(3)))
        )
        for hf_name, ours in block_names.items():
            for j, param in enumerate(("weight", "bias")):
                value = q_k_v[ours][j] if ours in q_k_v else sd[f"blocks.{i}.{ours}.{param}"]
                out[f"{prefix}{layer}.{i}.{hf_name}.{param}"] = value.clone()
    return out
