"""The one place that turns a URL (a local path, ``file://``, ``s3://``, ``memory://``: anything fsspec knows)
into a filesystem and a path, joins paths under it, and writes files that appear whole or not at all.

Every stage reads and writes through these, so a workdir, a corpus or a shard folder can live on any of them."""

from __future__ import annotations

import json
import posixpath
import uuid
from typing import Any

import fsspec


def filesystem(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for ``url`` and the path on it, without a trailing slash (so joins never double it)."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path.rstrip("/") or path


def join(base: str, *names: str) -> str:
    """``base/name/...`` for URLs and fsspec paths alike (always ``/``, whatever the local OS)."""
    return posixpath.join(base.rstrip("/") or "/", *names)


def is_remote(url: str) -> bool:
    """True for a URL with a scheme other than ``file://``: a location other machines can reach as it is."""
    return "://" in url and not url.startswith("file://")


def open_for_writing(fs: fsspec.AbstractFileSystem, path: str, mode: str = "wb"):
    """``fs.open`` that first creates the parent folder (needed locally, harmless on object stores)."""
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    return fs.open(path, mode)


def write_atomically(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader (or a crash) never sees half of it: a sibling temporary
    file renamed into place. On an object store a single PUT is already all-or-nothing, and a rename would
    be a copy, so it is written directly."""
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    if "file" not in _protocols(fs):
        fs.pipe_file(path, data)
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)


def write_json(fs: fsspec.AbstractFileSystem, path: str, value: Any, *, indent: int | None = 1) -> None:
    """``value`` as JSON (one trailing newline), written atomically."""
    write_atomically(fs, path, (json.dumps(value, indent=indent) + "\n").encode())


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    with fs.open(path, "rb") as f:
        return json.load(f)


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)
