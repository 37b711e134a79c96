"""Reading weight files without running them, and without believing the sizes they declare.

Nothing here unpickles arbitrary objects: ``torch.load(weights_only=True)``,
``np.load(allow_pickle=False)`` and safetensors only. A file never makes us allocate more than it
holds: tensors larger than their storage (expanded views) are refused, and a saved config is checked
against the tensors in the file, on the meta device, before a model of that config is built.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from vit.formats import FORMAT_NAME
from vit.model import VisionTransformer, ViTConfig


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


class UnsafeCheckpointError(ValueError):
    """The file holds something loading it would have to run as code, or more than it has bytes for."""


def read_weights(src: str | os.PathLike | BinaryIO | Mapping) -> tuple[dict[str, Any], dict]:
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
                state.update(read_weights(path / shard)[0])
            return state, {}
    for name in ("model.safetensors", "pytorch_model.bin", "model.pt", "model.pth"):
        if (path / name).exists():
            return read_weights(path / name)
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


def source_name(src: object) -> str | None:
    """What messages call ``src``: its path or file name; None for a state dict, which has none."""
    if isinstance(src, Mapping):
        return None
    if hasattr(src, "read"):
        return str(getattr(src, "name", "the file object"))
    return str(src)


def check_bytes(src: object, raw: Mapping[str, Any]) -> None:
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


def check_saved_config(src: object, saved: dict, raw: Mapping[str, Any]) -> None:
    """Refuse a file whose saved config does not describe exactly the tensors it holds.

    The config decides how much :func:`vit.checkpoint.load_model` allocates, and it is a few bytes of JSON: a tiny
    file could declare a model of any size. Here the model is built on the meta device (no memory)
    and its state dict must match the file's tensors name for name and shape for shape, so the model
    built afterwards is no larger than the tensors the file really holds, which must in turn fit
    in the bytes on disk. The module count is checked first: even on meta, building costs time
    and memory per block.
    """

    def refuse(problem: str, missing=(), unexpected=(), mismatched=()) -> CheckpointMismatchError:
        return CheckpointMismatchError(
            "vit", list(missing), list(unexpected), list(mismatched), source=source_name(src), problem=problem
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
        raise ValueError(f"{source_name(src)} is refused: its saved config describes no model: {err}") from err
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
    check_bytes(src, raw)
