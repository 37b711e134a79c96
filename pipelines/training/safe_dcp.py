"""Training state through ``torch.distributed.checkpoint``, without running what the folder holds.

    save_state({"model": model_sd, "optim": optim_sd}, folder / "state")   # every rank
    load_state(state, folder / "state")                                     # every rank; fills state in place

dcp's own reader trusts the checkpoint folder with the process: it reads ``.metadata`` with
``pickle.load``, and every non-tensor entry of the state (the optimizer's ``param_groups``: lr,
betas, momentum, ..., stored as BYTE_IO items) with ``torch.load(weights_only=False)``. Whoever can
write a run's folder could then run code on every training worker at the next resume. Here:

* ``.metadata`` is read by an unpickler that admits only what dcp writes there: the dataclasses of
  ``torch.distributed.checkpoint.metadata``, the file reader's ``_StorageInfo``, ``torch.Size``,
  dtypes and layouts, ``pathlib`` paths, and plain containers; it sets state only on instances of
  those dataclasses (never on a class). Anything else is refused, naming the file, before it is
  built. The entries must point at plain files of the folder, without stream transforms.
* BYTE_IO items are read with ``torch.load(weights_only=True)``, and only into entries the state
  holds as non-tensors.
* :func:`save_state` checks that what it writes reads back this way (a value ``weights_only``
  cannot load is refused when saved, not at a resume days later).

Refusals raise :class:`~vit.checkpoint.UnsafeCheckpointError`, on every rank that read the file.
Works without a process group (a single process) and under one (gloo, nccl), with plain tensors
and FSDP2's DTensors. Public torch APIs only: ``FileSystemReader``, ``DefaultLoadPlanner`` and
``DefaultSavePlanner`` and their documented extension points.
"""

from __future__ import annotations

import io
import os
import pathlib
import pickle
from pathlib import Path, PurePosixPath
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import (
    CheckpointException,
    DefaultLoadPlanner,
    DefaultSavePlanner,
    FileSystemReader,
    FileSystemWriter,
)
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import WriteItemType

from vit.checkpoint import UnsafeCheckpointError

__all__ = ["UnsafeCheckpointError", "load_state", "read_metadata", "save_state"]

METADATA_FILE = ".metadata"  # dcp's name for the global metadata; rank-local ones are __{rank}.metadata

# What dcp's Metadata legitimately holds (torch 2.13: plain and FSDP2/DTensor states, AdamW and SGD).
_DATACLASSES = {
    (dcp_metadata.__name__, "Metadata"),
    (dcp_metadata.__name__, "MetadataIndex"),
    (dcp_metadata.__name__, "StorageMeta"),
    (dcp_metadata.__name__, "TensorStorageMetadata"),
    (dcp_metadata.__name__, "BytesStorageMetadata"),
    (dcp_metadata.__name__, "ChunkStorageMetadata"),
    (dcp_metadata.__name__, "TensorProperties"),
    (dcp_filesystem.__name__, "_StorageInfo"),  # FileSystemWriter's per-item record: file, offset, length
}
_ENUMS = {(dcp_metadata.__name__, "_MEM_FORMAT_ENCODING")}  # TensorProperties' memory format
_PATHS = {"PosixPath", "PurePosixPath"}  # StorageMeta.checkpoint_id, when dcp.save was given a Path


def _resolve(module: str, name: str) -> Any:
    import importlib

    return getattr(importlib.import_module(module), name)


_INSTANCES = tuple(_resolve(module, name) for module, name in sorted(_DATACLASSES))
_STORAGE_INFO = _resolve(dcp_filesystem.__name__, "_StorageInfo")


def _layout(name: str) -> torch.layout:
    """What ``torch.serialization._get_layout`` does for a pickled ``torch.layout``, by name only."""
    layouts = {str(v): v for v in vars(torch).values() if isinstance(v, torch.layout)}
    if not isinstance(name, str) or name not in layouts:
        raise pickle.UnpicklingError(f"unknown torch layout {name!r}")
    return layouts[name]


class _MetadataUnpickler(pickle._Unpickler):
    """Python's own unpickler, restricted to what a dcp ``.metadata`` file holds.

    The pure-Python unpickler, so that BUILD can be checked too: the C one would let a pickle set
    attributes on an admitted class itself, not only on its instances.
    """

    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def refuse(self, what: str) -> UnsafeCheckpointError:
        return UnsafeCheckpointError(
            f"{self.path} is refused: it holds {what}, which a torch.distributed.checkpoint metadata file "
            "never does; unpickling it could run code. Refused before that was loaded."
        )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DATACLASSES or (module, name) in _ENUMS:
            return _resolve(module, name)
        if module == "torch":
            value = vars(torch).get(name)
            if name == "Size" or isinstance(value, torch.dtype):
                return value
        if (module, name) == ("torch.serialization", "_get_layout"):
            return _layout
        if module in ("pathlib", "pathlib._local") and name in _PATHS:
            return getattr(pathlib, name)
        raise self.refuse(f"a reference to {module}.{name}"[:300])

    def persistent_load(self, pid: Any) -> Any:
        raise self.refuse("a persistent id")

    def load_build(self) -> None:
        if not isinstance(self.stack[-2], _INSTANCES):
            raise self.refuse(f"state set on a {type(self.stack[-2]).__name__}")
        super().load_build()

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.BUILD[0]] = load_build


def read_metadata(path: str | os.PathLike) -> Metadata:
    """A dcp ``.metadata`` file, unpickled with only dcp's own classes admitted, and checked."""
    path = Path(path)
    with open(path, "rb") as f:
        try:
            metadata = _MetadataUnpickler(f, path).load()
        except UnsafeCheckpointError:
            raise
        except Exception as err:  # truncated, garbage, or a class called with arguments it refuses
            raise UnsafeCheckpointError(
                f"{path} is not a readable torch.distributed.checkpoint metadata file: {err}"
            ) from err
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise UnsafeCheckpointError(f"{path} is refused: it holds a {type(metadata).__name__}, not dcp Metadata")
    if not isinstance(metadata.storage_data, dict):
        raise UnsafeCheckpointError(f"{path} is refused: it has no storage table (FileSystemWriter's)")
    for index, info in metadata.storage_data.items():
        name = getattr(info, "relative_path", None)
        plain_file = isinstance(name, str) and name not in ("", ".", "..") and PurePosixPath(name).name == name
        if not isinstance(info, _STORAGE_INFO) or not plain_file or "\\" in name:
            raise UnsafeCheckpointError(
                f"{path} is refused: entry {getattr(index, 'fqn', index)!r} is stored at {name!r}, not in a file "
                "of the checkpoint folder"
            )
        if type(info.offset) is not int or type(info.length) is not int or info.offset < 0 or info.length < 0:
            raise UnsafeCheckpointError(f"{path} is refused: entry {index.fqn!r} has no valid offset and length")
        if info.transform_descriptors:  # compression and other stream extensions: save_state never writes them
            raise UnsafeCheckpointError(
                f"{path} is refused: entry {index.fqn!r} asks for stream transforms {info.transform_descriptors!r}"
            )
    return metadata


class _SafeReader(FileSystemReader):
    """``FileSystemReader`` whose metadata goes through :func:`read_metadata`."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self.refusal: UnsafeCheckpointError | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self.refusal is not None:  # no falling back to a rank-local file once one was refused
            raise self.refusal
        rank = kwargs.get("rank")
        name = METADATA_FILE if rank is None else f"__{rank}{METADATA_FILE}"
        try:
            metadata = read_metadata(Path(self.path) / name)
        except UnsafeCheckpointError as err:
            self.refusal = err
            raise
        if metadata.storage_meta is None:  # as FileSystemReader.read_metadata does
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` that reads BYTE_IO items with ``torch.load(weights_only=True)``."""

    def __init__(self, folder: Path):
        super().__init__()
        self.folder = folder
        self.refusal: UnsafeCheckpointError | None = None

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        where = self.folder / self.metadata.storage_data[read_item.storage_index].relative_path
        if isinstance(self.state_dict.get(fqn), torch.Tensor):
            self.refusal = UnsafeCheckpointError(f"{where}: entry {fqn!r} is a tensor here but bytes in the file")
            raise self.refusal
        try:
            loaded = torch.load(value, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            self.refusal = UnsafeCheckpointError(
                f"{where}: entry {fqn!r} is refused: it holds Python objects beyond tensors and plain containers, "
                "which loading would have to run as code"
            )
            raise self.refusal from None
        if self.flatten_state_dict:  # DefaultLoadPlanner.load_bytes, without its torch.load
            target: Any = self.original_state_dict
            *parents, last = self.mappings[fqn]
            for key in parents:
                target = target[key]
            target[last] = loaded
        else:
            self.state_dict[fqn] = loaded


class _CheckedSavePlanner(DefaultSavePlanner):
    """``DefaultSavePlanner`` that refuses a non-tensor value :func:`load_state` could not read back."""

    def __init__(self):
        super().__init__()
        self.refusal: TypeError | None = None

    def transform_object(self, write_item, object: Any):
        data = super().transform_object(write_item, object)
        if write_item.type == WriteItemType.BYTE_IO:
            try:
                torch.load(io.BytesIO(data.getvalue()), weights_only=True)
            except pickle.UnpicklingError:
                self.refusal = TypeError(
                    f"state entry {write_item.index.fqn!r} is a {type(object).__name__} that a resume could not "
                    "read back: only tensors, numbers, strings and plain containers of them are saved"
                )
                raise self.refusal from None
        return data


def _coordinator() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def save_state(state: dict[str, Any], path: str | os.PathLike) -> None:
    """``dcp.save(state, checkpoint_id=path)``, on every rank, refusing what :func:`load_state` would."""
    planner = _CheckedSavePlanner()
    try:
        dcp.save(state, storage_writer=FileSystemWriter(path), planner=planner)
    except (Exception, CheckpointException) as err:
        if planner.refusal is not None:
            raise TypeError(str(planner.refusal)) from err
        raise
    if _coordinator():  # the metadata just written must read back under the restrictions
        read_metadata(Path(path) / METADATA_FILE)


def load_state(state: dict[str, Any], path: str | os.PathLike) -> None:
    """``dcp.load(state, checkpoint_id=path)`` (in place, on every rank), running nothing the files hold."""
    reader, planner = _SafeReader(path), _SafeLoadPlanner(Path(path))
    try:
        dcp.load(state, storage_reader=reader, planner=planner)
    except (Exception, CheckpointException) as err:
        refusal = reader.refusal or planner.refusal
        if refusal is not None:
            raise UnsafeCheckpointError(str(refusal)) from err
        raise
