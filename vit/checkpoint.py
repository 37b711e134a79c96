"""Save and load ViT weights: our own format and the released ones.

Formats read (detected from the keys, not the file name):

* ``vit``   -- ours: ``save_checkpoint`` output (``.safetensors`` or ``.pt``), config included.
* ``timm``  -- timm ``VisionTransformer`` state dicts (``.pth``, ``.bin``, ``.safetensors``). Our
  module names are timm's, so only hybrids (``patch_embed.backbone.*``) are renamed.
* ``npz``   -- the original JAX release (google-research/vision_transformer and big_vision):
  ``Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel``, ``pre_logits/kernel``.
* ``hf``    -- Hugging Face ``ViTModel`` / ``ViTForImageClassification`` (a file or a
  ``save_pretrained`` folder, sharded or not).

Loading adapts what fine-tuning needs: the classifier is dropped and re-initialised when the class
count differs, the pre-logits layer is dropped when the model has none (the paper's fine-tuning),
and position embeddings are resampled when the patch grid differs. Anything else that does not fit
raises :class:`CheckpointMismatchError` naming the missing, unexpected and mis-shaped keys.

Nothing here unpickles arbitrary objects: ``torch.load(weights_only=True)``,
``np.load(allow_pickle=False)`` and safetensors only. A file never makes us allocate more than it
holds: tensors larger than their storage (expanded views) are refused, and :func:`load_model`
checks the config against the tensors in the file before it builds anything.

:func:`load_model` builds the model of a file of any format: ours carry their config, and for the
released formats :func:`infer_model_config` reads it off the tensors (the head count from ``.npz``
query kernels, else from the named size of that width).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from vit.model import VisionTransformer, ViTConfig
from vit.posemb import ResampleMethod, infer_grid, resample_pos_embed
from vit.variants import SIZES, size_of_width

FORMAT_NAME = "vit-platform"
FORMAT_VERSION = 1

StateDict = dict[str, torch.Tensor]


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not fit the model; lists what is missing, extra or mis-shaped."""

    def __init__(
        self,
        fmt: str,
        missing: list[str],
        unexpected: list[str],
        mismatched: list[str],
        *,
        source: str | os.PathLike | None = None,
        problem: str = "does not fit the model",
    ):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        self.source = source

        def show(title: str, items: list[str]) -> str:
            if not items:
                return ""
            more = f" ... and {len(items) - 12} more" if len(items) > 12 else ""
            return f"\n  {title} ({len(items)}): " + ", ".join(items[:12]) + more

        super().__init__(
            f"{fmt} checkpoint{f' {source}' if source is not None else ''} {problem}"
            + show("missing keys", missing)
            + show("unexpected keys", unexpected)
            + show("shape mismatches", mismatched)
        )


@dataclass
class LoadReport:
    """What ``load_checkpoint`` did, for logs and tests."""

    format: str
    resampled_pos_embed: tuple[tuple[int, int], tuple[int, int]] | None = None  # (old grid, new grid)
    reinitialized_head: bool = False
    dropped: list[str] = field(default_factory=list)  # checkpoint keys deliberately not loaded
    missing: list[str] = field(default_factory=list)  # only with strict=False
    unexpected: list[str] = field(default_factory=list)  # only with strict=False
    config: dict | None = None  # the saved ViTConfig (our format only)


# ---------------------------------------------------------------------------- reading files


def _read(src: str | os.PathLike | BinaryIO | Mapping) -> tuple[dict[str, Any], dict]:
    """Tensors (or arrays) by name, plus metadata, from a path, a folder, a file object or a dict."""
    if isinstance(src, Mapping):
        return _unwrap(dict(src))
    if hasattr(src, "read"):
        head = src.read(8)
        src.seek(0)
        if head[:2] == b"PK" and not _is_torch_zip(src):
            with np.load(src, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}, {}
        name = getattr(src, "name", "the file object")
        return _unwrap_torch(_torch_load(src, name), name)
    path = Path(src)
    if path.is_dir():
        return _read_folder(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}, {}
    return _unwrap_torch(_torch_load(path, path), path)


class UnsafeCheckpointError(ValueError):
    """The file holds something loading it would have to run as code, or more than it has bytes for."""


def _torch_load(src: str | os.PathLike | BinaryIO, name: object) -> Any:
    """``torch.load(weights_only=True)``, with our own message when it refuses.

    torch's message for a refused pickle advises retrying with ``weights_only=False``, i.e. running
    whatever the file asks for; that advice is not passed on.
    """
    try:
        return torch.load(src, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        asked = re.search(r"GLOBAL ([\w.]{1,200})", str(err))
        if asked:
            raise UnsafeCheckpointError(
                f"{name} is refused: it holds arbitrary Python objects (it asks for {asked[1]}), which "
                "loading would have to run as code. Only weights are read: tensors in plain containers "
                "(a state dict), or safetensors / .npz files."
            ) from None
        raise UnsafeCheckpointError(
            f"{name} is not a readable weights-only PyTorch checkpoint: a pickle with instructions or "
            "objects beyond tensors in plain containers, or not a checkpoint at all; refused"
        ) from None
    except Exception as err:  # RuntimeError and others for garbage, truncated or foreign files
        raise ValueError(f"{name} is not a readable weights-only PyTorch checkpoint: {err}") from err


def _unwrap_torch(obj: Any, name: object = "the file object") -> tuple[dict[str, Any], dict]:
    """:func:`_unwrap` for what ``torch.load`` returned, refusing tensors that claim more than their storage.

    A pickle can describe a tensor of any shape over a one-element storage (stride 0): a file of a
    few hundred bytes would otherwise hand us terabytes to copy.
    """
    state, meta = _unwrap(obj)
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            claimed, held = value.numel() * value.element_size(), value.untyped_storage().nbytes()
            if claimed > held:
                raise UnsafeCheckpointError(
                    f"{name}: tensor {key!r} of shape {tuple(value.shape)} claims {claimed} bytes over a storage "
                    f"of {held} bytes (an expanded or overlapping view); refused"
                )
    return state, meta


def _is_torch_zip(f: BinaryIO) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(f) as z:
            return any(n.endswith("data.pkl") for n in z.namelist())
    finally:
        f.seek(0)


def _read_folder(path: Path) -> tuple[dict[str, Any], dict]:
    """A Hugging Face ``save_pretrained`` folder (single file or sharded with an index)."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            for shard in shards:  # an index names files beside it, never elsewhere
                if not isinstance(shard, str) or shard in ("", ".", "..") or Path(shard).name != shard:
                    raise UnsafeCheckpointError(f"{index} is refused: it names {shard!r}, not a file of {path}")
            state: dict[str, Any] = {}
            for shard in shards:
                state.update(_read(path / shard)[0])
            return state, {}
    for name in ("model.safetensors", "pytorch_model.bin", "model.pt", "model.pth"):
        if (path / name).exists():
            return _read(path / name)
    raise FileNotFoundError(f"no weights file in folder {path}")


def _unwrap(obj: Any) -> tuple[dict[str, Any], dict]:
    """Find the state dict inside training checkpoints ({'model': ...}, {'state_dict': ...})."""
    meta: dict = {}
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT_NAME:
        meta = {"format": FORMAT_NAME, "config": json.dumps(obj.get("config"))}
        obj = obj["state_dict"]
    for key in ("state_dict", "model", "module", "state_dict_ema", "model_ema"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor | np.ndarray) for v in obj.values()):
        raise ValueError("checkpoint holds no state dict (a mapping of names to tensors)")
    state = dict(obj)
    # DDP and torch.compile prefixes
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state, meta


def _tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    array = np.asarray(value)
    if array.dtype.kind not in "fiub":
        raise ValueError(f"unsupported array dtype {array.dtype}")
    return torch.from_numpy(np.ascontiguousarray(array))


# ---------------------------------------------------------------------------- format detection


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


@dataclass(frozen=True)
class CheckpointContents:
    """What :func:`read_checkpoint` found: the tensors under the file's own names, its metadata and its format."""

    tensors: dict[str, Any]  # torch tensors, or numpy arrays for .npz
    metadata: dict
    format: str  # 'vit', 'timm', 'npz' or 'hf' (see detect_format)

    @property
    def num_classes(self) -> int:
        """The classifier's output count, off ``head`` (ours, timm), ``classifier`` (Hugging Face) or
        ``head/kernel`` (.npz); 0 without one."""
        for key in ("head.weight", "classifier.weight"):
            if key in self.tensors:
                return int(self.tensors[key].shape[0])
        for key in ("head/kernel", "img/head/kernel", "params/head/kernel"):  # JAX kernels are (in, out)
            if key in self.tensors:
                return int(self.tensors[key].shape[-1])
        return 0


def read_checkpoint(src: str | os.PathLike | BinaryIO | Mapping[str, Any]) -> CheckpointContents:
    """Read the weights in ``src`` (a file of any supported format, a ``save_pretrained`` folder, a file object or a
    state dict) without building a model: to look at them first, e.g. to size a model for them.

    Nothing is converted: ``tensors`` keep the file's names and can be handed to :func:`load_checkpoint` as they are,
    so a file is read once. Training checkpoints are unwrapped to their state dict, and DDP or ``torch.compile``
    prefixes dropped, as in :func:`load_checkpoint`. Raises ``FileNotFoundError`` when there are no weights at
    ``src``, and ``ValueError`` for weights it cannot read or recognise (:class:`UnsafeCheckpointError`, a
    ``ValueError``, for a file that loading would have to run as code).
    """
    tensors, metadata = _read(src)
    return CheckpointContents(tensors=tensors, metadata=metadata, format=detect_format(tensors, metadata))


# ---------------------------------------------------------------------------- converters


def _from_timm(state: Mapping[str, Any]) -> StateDict:
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


# ---------------------------------------------------------------------------- loading


def load_checkpoint(
    model: VisionTransformer,
    src: str | os.PathLike | BinaryIO | Mapping[str, Any],
    *,
    strict: bool = True,
    pos_embed_method: ResampleMethod = "bilinear",
) -> LoadReport:
    """Load weights of any supported format into ``model``, adapting head and position embeddings.

    With ``strict=True`` (the default) nothing is loaded unless every model tensor is accounted
    for; the error names the missing, unexpected and mis-shaped keys. A model on the meta device
    gets the checkpoint's tensors assigned (no copy into empty storage).
    """
    raw, meta = _read(src)
    return _load_state(model, raw, meta, strict=strict, pos_embed_method=pos_embed_method)


def _load_state(
    model: VisionTransformer, raw: Mapping[str, Any], meta: Mapping, *, strict: bool, pos_embed_method: ResampleMethod
) -> LoadReport:
    fmt = detect_format(raw, meta)
    return _load_converted(model, fmt, _CONVERTERS[fmt](raw), meta, strict=strict, pos_embed_method=pos_embed_method)


def _load_converted(
    model: VisionTransformer,
    fmt: str,
    state: StateDict,
    meta: Mapping,
    *,
    strict: bool,
    pos_embed_method: ResampleMethod,
) -> LoadReport:
    """:func:`_load_state` for tensors already under our names."""
    report = LoadReport(format=fmt)
    if meta.get("config"):
        report.config = json.loads(meta["config"])

    target = model.state_dict()
    # The paper fine-tunes without the pretraining representation layer.
    if "pre_logits.fc.weight" in state and "pre_logits.fc.weight" not in target:
        report.dropped += [k for k in state if k.startswith("pre_logits.")]
    # A new task: the classifier is replaced by a freshly initialised one.
    head_fits = all(k in state and state[k].shape == target[k].shape for k in target if k.startswith("head."))
    if not head_fits or not any(k.startswith("head.") for k in target):
        report.dropped += [k for k in state if k.startswith("head.")]
        report.reinitialized_head = any(k.startswith("head.") for k in target)
    state = {k: v for k, v in state.items() if k not in report.dropped}

    if "pos_embed" in state and state["pos_embed"].shape != target["pos_embed"].shape:
        state["pos_embed"], report.resampled_pos_embed = _adapt_pos_embed(
            model, state["pos_embed"], report.config, pos_embed_method
        )

    expected = {k for k in target if not (report.reinitialized_head and k.startswith("head."))}
    missing = sorted(expected - set(state))
    unexpected = sorted(k.removeprefix("__unconverted__/") for k in set(state) - set(target))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(target[k].shape)}"
        for k in expected & set(state)
        if state[k].shape != target[k].shape
    )
    if mismatched or (strict and (missing or unexpected)):
        raise CheckpointMismatchError(fmt, missing, unexpected, mismatched)
    report.missing, report.unexpected = missing, unexpected

    on_meta = any(p.is_meta for p in model.parameters())
    loadable = {k: v.to(dtype=target[k].dtype) for k, v in state.items() if k in target}
    model.load_state_dict(loadable, strict=False, assign=on_meta)
    if report.reinitialized_head and not on_meta:
        model.reset_head()
    return report


def _adapt_pos_embed(
    model: VisionTransformer, pos_embed: torch.Tensor, saved_config: dict | None, method: ResampleMethod
) -> tuple[torch.Tensor, tuple[tuple[int, int], tuple[int, int]]]:
    prefix = model.num_prefix_tokens
    num_patches = pos_embed.shape[1] - prefix
    if saved_config is not None:
        old_grid = ViTConfig(**_config_fields(saved_config)).grid_size
    else:
        old_grid = infer_grid(num_patches)
    if old_grid[0] * old_grid[1] != num_patches:
        raise CheckpointMismatchError(
            "pos_embed",
            [],
            [],
            [f"pos_embed: {pos_embed.shape[1]} tokens is not {prefix} prefix token(s) + a {old_grid} grid"],
        )
    new = resample_pos_embed(pos_embed, model.grid_size, old_grid=old_grid, num_prefix_tokens=prefix, method=method)
    return new, (tuple(old_grid), tuple(model.grid_size))


def _config_fields(config: Mapping) -> dict:
    known = {f.name for f in dataclasses.fields(ViTConfig)}
    return {k: v for k, v in config.items() if k in known}


# ---------------------------------------------------------------------------- saving


def save_checkpoint(model: VisionTransformer, path: str | os.PathLike) -> Path:
    """Write weights and config; ``.safetensors`` by suffix, otherwise a weights-only torch file.

    The file is written to a temporary name and renamed, so a crash never leaves half a checkpoint.
    """
    return save_state_dict(model.state_dict(), model.config, path)


def save_state_dict(state: Mapping[str, torch.Tensor], config: ViTConfig, path: str | os.PathLike) -> Path:
    """:func:`save_checkpoint` for weights held apart from a model, e.g. gathered from FSDP shards."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = dataclasses.asdict(config)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(
                state,
                tmp,
                metadata={"format": FORMAT_NAME, "version": str(FORMAT_VERSION), "config": json.dumps(config)},
            )
        else:
            torch.save({"format": FORMAT_NAME, "version": FORMAT_VERSION, "config": config, "state_dict": state}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_model(path: str | os.PathLike, *, device: torch.device | str | None = None, **overrides) -> VisionTransformer:
    """Build the model of a checkpoint of any format and load its weights.

    Ours carry their config; for released weights (``.npz``, timm, Hugging Face) it is read off the
    tensors (:func:`infer_model_config`). ``overrides`` change config fields first, e.g.
    ``img_size=384`` or ``num_classes=10`` for fine-tuning (the position embeddings are resampled
    and the head re-initialised), ``representation_size=None`` to drop a pre-logits layer, or
    ``num_heads`` for released weights whose width is that of no named size. The file is read once,
    and checked against the config before the model is built.
    """
    raw, meta = _read(path)
    fmt, fields, state = _describe(path, raw, meta)
    del raw  # the converted tensors are what is loaded; for .npz the originals can go
    model = VisionTransformer(_configure(path, fmt, fields, overrides), device=device)
    _load_converted(model, fmt, state, meta, strict=True, pos_embed_method="bilinear")
    return model


class UnknownVariantError(ValueError):
    """Released weights that do not say how many attention heads their model has: the variant must be named.

    ``format``, ``width`` and ``source`` say which weights, for callers that word their own advice.
    """

    def __init__(self, message: str, *, format: str, width: int, source: str | None):
        super().__init__(message)
        self.format, self.width, self.source = format, width, source


def infer_model_config(src: str | os.PathLike | BinaryIO | Mapping[str, Any], **overrides) -> ViTConfig:
    """The :class:`ViTConfig` of the weights in ``src`` (a path, a folder, a file object or a state
    dict), with ``overrides`` over its fields.

    Ours carry their config. For the released formats it is read off the tensors: width, patch size
    and input channels from the patch embedding, depth from the number of blocks, MLP width from the
    first block, a hybrid's ResNet stem (stage depths and width) from its units, the resolution from
    the position embeddings, the class count from the head (0 without one), the pre-logits size from
    that layer, the pooling from the class token and ``qkv_bias`` from the biases. The head count
    shows only in the ``.npz`` layout (query kernels are (D, heads, D/heads)); for timm and Hugging
    Face weights it is the head count of the named size of that width (``vit.variants.SIZES``: Ti
    192/3, S 384/6, B 768/12, L 1024/16, H 1280/16), and a width of no named size raises
    :class:`UnknownVariantError` unless ``num_heads`` is given (``overrides`` win over the file).
    LayerNorm eps is 1e-6, that of the JAX code and timm, with which the released weights were
    trained (Hugging Face's configs say 1e-12, a default of the conversion).

    The config is checked against the tensors on a meta-device model (nothing is allocated): a file
    that holds no whole model (missing, unexpected or mis-shaped tensors) is refused here, with the
    same :class:`CheckpointMismatchError` a strict load would raise.
    """
    raw, meta = _read(src)
    fmt, fields, _ = _describe(src, raw, meta)
    return _configure(src, fmt, fields, overrides)


def _source_name(src: object) -> str | None:
    if isinstance(src, Mapping):
        return None
    if hasattr(src, "read"):
        return str(getattr(src, "name", "the file object"))
    return str(src)


def _describe(src: object, raw: Mapping[str, Any], meta: Mapping) -> tuple[str, dict, StateDict]:
    """The format, the config fields the file describes (``num_heads`` None where it does not say) and its
    tensors under our names; fields and tensors are checked against each other before anything is built."""
    fmt = detect_format(raw, meta)
    if fmt == "vit" and meta.get("config"):
        try:
            saved = _config_fields(json.loads(meta["config"]))
        except (TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"{_source_name(src)}: its saved config is not readable: {err}") from err
        _check_saved_config(src, saved, raw)  # the file's word on sizes is checked before anything is built
        return fmt, saved, _from_timm(raw)
    state = _CONVERTERS[fmt](raw)
    fields = _released_fields(_source_name(src), fmt, raw, state)
    _check_released(src, fmt, fields, state)
    if fmt != "npz":  # np.load's arrays own their memory; torch pickles can share one storage among many tensors
        _check_bytes(src, raw)
    return fmt, fields, state


def _released_fields(source: str | None, fmt: str, raw: Mapping[str, Any], state: StateDict) -> dict:
    """The ViTConfig fields that released weights (our names, ``state``) describe; see :func:`infer_model_config`."""
    what = f"{fmt} checkpoint{f' {source}' if source is not None else ''}"

    def tensor(key: str, ndim: int, role: str) -> torch.Tensor | None:
        value = state.get(key)
        if value is not None and value.ndim != ndim:
            raise ValueError(f"{what}: {key} ({role}) has shape {tuple(value.shape)}, not {ndim}-D")
        return value

    embed = tensor("patch_embed.proj.weight", 4, "the patch embedding")
    if embed is None or embed.shape[-1] != embed.shape[-2]:
        raise ValueError(f"{what} has no square patch embedding (patch_embed.proj.weight): not a ViT")
    width, patch = int(embed.shape[0]), int(embed.shape[-1])
    depth = len({int(m[1]) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    fc1 = tensor("blocks.0.mlp.fc1.weight", 2, "the first block's MLP")
    if not depth or fc1 is None:
        raise ValueError(f"{what} has no encoder blocks (blocks.0.mlp.fc1.weight): not a ViT")
    units = {(int(m[1]), int(m[2])) for k in state if (m := re.match(r"stem\.stages\.(\d+)\.blocks\.(\d+)\.", k))}
    per_stage = Counter(stage for stage, _ in units)
    layers = tuple(per_stage[i] for i in range(len(per_stage))) or None
    if layers is None:
        in_chans, resnet_width, stride = int(embed.shape[1]), 1, patch
    else:  # a hybrid: the ResNet stem's feature map is the patch grid
        root = tensor("stem.stem.conv.weight", 4, "the ResNet stem's root convolution")
        if root is None:
            raise ValueError(f"{what} has ResNet stages but no root convolution (stem.stem.conv.weight)")
        in_chans, resnet_width = int(root.shape[1]), max(1, int(root.shape[0]) // 64)
        stride = patch * 4 * 2 ** (len(layers) - 1)
    pos = tensor("pos_embed", 3, "the position embeddings")
    if pos is None:
        raise ValueError(f"{what} has no position embeddings (pos_embed)")
    pool = "cls" if "cls_token" in state else "gap"
    try:
        side = infer_grid(int(pos.shape[1]) - (1 if pool == "cls" else 0))[0]
    except ValueError as err:
        raise ValueError(f"{what}: {err}") from None
    if side < 1:
        raise ValueError(f"{what}: its position embeddings hold no patch positions")
    head = tensor("head.weight", 2, "the classifier")
    pre_logits = tensor("pre_logits.fc.weight", 2, "the pre-logits layer")
    return dict(
        img_size=side * stride,
        patch_size=patch,
        in_chans=in_chans,
        num_classes=int(head.shape[0]) if head is not None else 0,
        width=width,
        depth=depth,
        num_heads=_npz_heads(what, raw) if fmt == "npz" else None,
        mlp_dim=int(fc1.shape[0]),
        pool=pool,
        representation_size=int(pre_logits.shape[0]) if pre_logits is not None else None,
        qkv_bias="blocks.0.attn.qkv.bias" in state,
        resnet_layers=layers,
        resnet_width=resnet_width,
    )


def _npz_heads(what: str, raw: Mapping[str, Any]) -> int | None:
    """The head count of JAX weights: query kernels are (D, heads, D/heads), (L, D, heads, D/heads) when scanned."""
    counts = {int(np.shape(v)[-2]) for k, v in raw.items() if "encoderblock" in k and k.endswith("query/kernel")}
    if len(counts) > 1:
        raise ValueError(f"{what}: its query kernels disagree on the number of heads: {sorted(counts)}")
    return counts.pop() if counts else None


def _check_released(src: object, fmt: str, fields: dict, state: StateDict) -> None:
    """Refuse released weights that do not hold exactly the model their tensors describe (checked on meta)."""
    source = _source_name(src)
    try:  # the head count changes no shape
        expected = VisionTransformer(ViTConfig(**{**fields, "num_heads": 1}), device="meta").state_dict()
    except Exception as err:  # ValueError, RuntimeError from sizes that make no model
        where = f" {source}" if source is not None else ""
        raise ValueError(f"{fmt} checkpoint{where}: its tensors describe no model: {err}") from err
    found = {k: tuple(v.shape) for k, v in state.items()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(k.removeprefix("__unconverted__/") for k in set(found) - set(expected))
    mismatched = sorted(
        f"{k}: checkpoint {found[k]} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(found)
        if found[k] != tuple(expected[k].shape)
    )
    if missing or unexpected or mismatched:
        problem = "does not hold a whole ViT (the model its patch embedding and blocks describe)"
        raise CheckpointMismatchError(fmt, missing, unexpected, mismatched, source=source, problem=problem)


def _configure(src: object, fmt: str, fields: dict, overrides: Mapping[str, Any]) -> ViTConfig:
    """The described fields with ``overrides``; a released model's head count from its width when the file has none."""
    fields = {**fields, **overrides}
    if "num_heads" in fields and fields["num_heads"] is None:
        size = size_of_width(fields["width"])
        if size is None:
            source = _source_name(src)
            sizes = ", ".join(f"{name} {w}" for name, (w, *_) in SIZES.items())
            raise UnknownVariantError(
                f"{fmt} checkpoint{f' {source}' if source is not None else ''}: its width {fields['width']} is that "
                f"of no named size ({sizes}) and the {fmt} layout does not say how many attention heads the model "
                "has; name the variant: give num_heads (or build the model with vit.create_model and load the "
                "weights with vit.load_checkpoint)",
                format=fmt,
                width=fields["width"],
                source=source,
            )
        fields["num_heads"] = SIZES[size][3]
    return ViTConfig(**fields)


def _check_bytes(src: object, raw: Mapping[str, Any]) -> None:
    """Refuse tensors that claim more bytes than the file (or folder) holds: views sharing one storage."""
    if not isinstance(src, str | os.PathLike):
        return
    claimed = sum(v.numel() * v.element_size() if isinstance(v, torch.Tensor) else v.nbytes for v in raw.values())
    source = Path(src)
    files = [f for f in source.iterdir() if f.is_file()] if source.is_dir() else [source]
    on_disk = sum(f.stat().st_size for f in files)
    if claimed > on_disk:
        raise UnsafeCheckpointError(
            f"{src} is refused before building a model: its tensors claim {claimed} bytes but it holds "
            f"{on_disk} bytes (tensors sharing or expanding storage)"
        )


def _check_saved_config(src: object, saved: dict, raw: Mapping[str, Any]) -> None:
    """Refuse a file whose saved config does not describe exactly the tensors it holds.

    The config decides how much :func:`load_model` allocates, and it is a few bytes of JSON: a tiny
    file could declare a model of any size. Here the model is built on the meta device (no memory)
    and its state dict must match the file's tensors name for name and shape for shape, so the model
    built afterwards is no larger than the tensors the file really holds, which must in turn fit
    in the bytes on disk. The module count is checked first: even on meta, building costs time
    and memory per block.
    """

    def refuse(problem: str, missing=(), unexpected=(), mismatched=()) -> CheckpointMismatchError:
        return CheckpointMismatchError(
            "vit", list(missing), list(unexpected), list(mismatched), source=_source_name(src), problem=problem
        )

    before = "is refused before building a model: its saved config"
    blocks = {int(m[1]) for k in raw if (m := re.match(r"blocks\.(\d+)\.", k))}
    depth = saved.get("depth", ViTConfig.depth)
    if type(depth) is not int or depth != len(blocks) or blocks != set(range(len(blocks))):
        raise refuse(f"{before} declares depth {depth!r} but the file holds {len(blocks)} encoder block(s)")
    layers = saved.get("resnet_layers", ViTConfig.resnet_layers)
    units = {(int(m[1]), int(m[2])) for k in raw if (m := re.match(r"stem\.stages\.(\d+)\.blocks\.(\d+)\.", k))}
    per_stage = Counter(stage for stage, _ in units)
    held = [per_stage[i] for i in range(len(per_stage))]
    if (units or layers is not None) and not (isinstance(layers, list | tuple) and list(layers) == held):
        raise refuse(f"{before} declares ResNet stages {layers!r} but the file holds {held or 'none'}")
    try:
        config = ViTConfig(**saved)
        expected = VisionTransformer(config, device="meta").state_dict()
    except Exception as err:  # TypeError, ValueError, RuntimeError from sizes that make no model
        raise ValueError(f"{_source_name(src)} is refused: its saved config describes no model: {err}") from err
    found = {k: tuple(v.shape) for k, v in raw.items()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = sorted(
        f"{k}: file {found[k]} vs config {tuple(expected[k].shape)}"
        for k in set(expected) & set(found)
        if found[k] != tuple(expected[k].shape)
    )
    if missing or unexpected or mismatched:
        raise refuse(f"{before} does not describe the tensors it holds", missing, unexpected, mismatched)
    _check_bytes(src, raw)
