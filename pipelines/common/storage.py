"""The one place that turns a URL (a local path, ``file://``, ``s3://``, ``memory://``: anything fsspec knows)
into a filesystem and a path, joins paths under it, and writes files that appear whole or not at all.

Every stage reads and writes through these, so a workdir, a corpus or a shard folder can live on any of them."""

from __future__ import annotations

import hashlib
import json
import posixpath
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec


def filesystem(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for ``url`` and the path on it, without a trailing slash (so joins never double it).

    Without listings cached: fsspec shares one instance per set of options in a process, and a long-lived process
    (a Ray worker, a scheduler) would otherwise answer from a listing made before new objects arrived, and call
    them missing. Our data changes under us by design (new images every week), so every question goes to the
    store. ``use_listings_cache`` in ``storage_options`` overrides this."""
    options = {"use_listings_cache": False, **(storage_options or {})}
    fs, path = fsspec.core.url_to_fs(url, **options)
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


@dataclass(frozen=True)
class ListedFile:
    """One object of a listing, identified without reading it: its path under the listed root, its size, and
    what the store says changes when the content does (a version id or ETag on object stores, else mtime)."""

    path: str
    size: int
    version: str


def list_files(url: str, storage_options: dict | None = None) -> list[ListedFile]:
    """Every file under ``url`` (recursively, hidden names included), sorted by path; one listing call per
    folder on a local disk, a paginated ``ListObjectsV2`` on S3, never a byte of content."""
    fs, root = filesystem(url, storage_options)
    if not fs.exists(root):
        raise FileNotFoundError(f"{url} does not exist")
    found = fs.find(root, detail=True) if fs.isdir(root) else {root: fs.info(root)}
    files = []
    for path, info in found.items():
        if info.get("type", "file") != "file":
            continue
        relative = relative_path(path, root) if path != root else posixpath.basename(path)
        files.append(ListedFile(relative, int(info.get("size") or 0), _version(info)))
    return sorted(files, key=lambda f: f.path)


def relative_path(path: str, root: str) -> str:
    """``path`` relative to ``root``, both as a filesystem names them (``bucket/key`` on S3, ``/abs`` locally).
    ``posixpath.relpath`` alone reads the working directory for paths without a leading ``/`` (every S3 path),
    and fails where that directory is gone (a Ray Job's unpacked working dir, cleaned up under it)."""
    return posixpath.relpath(posixpath.join("/", path), posixpath.join("/", root))


def listing_fingerprint(files: list[ListedFile]) -> str:
    """A digest of a listing: equal for equal (path, size, version) sets, whatever order they were listed in."""
    digest = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.path):
        digest.update(f"{f.path}\0{f.size}\0{f.version}\n".encode())
    return digest.hexdigest()[:16]


def _version(info: dict) -> str:
    """What identifies this content in ``info`` (fsspec's detail dict): the store's own version first."""
    for key in ("VersionId", "version_id", "generation", "ETag", "etag", "md5Hash"):
        value = info.get(key)
        if value not in (None, "", "null"):
            return f"{key}={str(value).strip(chr(34))}"
    for key in ("mtime", "LastModified", "last_modified", "created"):
        value = info.get(key)
        if value is not None:
            return f"{key}={value.isoformat() if hasattr(value, 'isoformat') else value}"
    return ""
