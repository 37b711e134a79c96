"""What of a corpus is read, and how: only regular files, and none larger than ``max_file_bytes``.

Both are decided from the listing's own metadata (fsspec's ``ls``/``find`` with details: type and size at no
extra cost, locally and on object stores) and checked again on the open file before reading (a local file is
opened non-blocking and fstat'ed, an object is read by a ranged request of at most the cap). A FIFO, socket or
device is rejected as ``not-a-regular-file``, never opened for a blocking read. Symlinks (local only) are read
when they resolve to a regular file inside SRC (anywhere with ``follow_symlinks``), else rejected as
``symlink``; symlinked folders are never descended into. A label table names its files itself: those are read
wherever they are, links followed, but only when regular and within the cap.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

from fsspec.implementations.local import LocalFileSystem

from pipelines.data.shards.config import ShardConfig, ShardError


class _Refused(Exception):
    """An input refused before its bytes are read, with its reject reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def _entry(path: str, info: dict) -> list:
    """What the listing says of a file: [path, type, size, is a symlink] (compact: it travels in unit specs)."""
    return [path.rstrip("/"), info.get("type"), info.get("size"), bool(info.get("islink"))]


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file"


class _ListingCheck:
    """Rejects decided from the listing alone: nothing is opened, symlinks are resolved, nothing else stat'ed."""

    def __init__(self, fs, root: str, cfg: ShardConfig, *, cap: int | None = -1):
        self.cap = cfg.max_file_bytes if cap == -1 else cap  # None: no cap (tars)
        self.follow = cfg.follow_symlinks
        self.real_root = os.path.realpath(root) if isinstance(fs, LocalFileSystem) else None

    def reason(self, path: str, kind: str | None, size: int | None, link: bool) -> tuple[str, str] | None:
        if link and self.real_root is not None:
            return self._link(path)
        if kind not in ("file", None):  # None: a filesystem that does not say; the read checks
            return "not-a-regular-file", self._kind(path, kind)
        if self.cap is not None and size is not None and size > self.cap:
            return "file-too-large", f"{size} bytes > {self.cap}"
        return None

    def reasons(self, paths: list[str], infos: list[dict]) -> list[tuple[str, str] | None]:
        """``reason`` of each file from its listing details (fsspec's info dicts), in one pass."""
        cap = self.cap if self.cap is not None else float("inf")
        return [
            None
            if info.get("type") == "file" and not info.get("islink") and (info.get("size") or 0) <= cap
            else self.reason(path, info.get("type"), info.get("size"), bool(info.get("islink")))
            for path, info in zip(paths, infos)
        ]

    def _link(self, path: str) -> tuple[str, str] | None:
        try:
            target = os.path.realpath(path, strict=True)
            info = os.stat(target)
        except OSError as err:
            return "symlink", f"a broken link ({err.strerror})"
        if not stat.S_ISREG(info.st_mode):
            return "symlink", f"a link to {_file_kind(info.st_mode)} ({target})"
        if not self.follow and not target.startswith(self.real_root + os.sep):
            return "symlink", f"a link to {target}, outside the source"
        if self.cap is not None and info.st_size > self.cap:
            return "file-too-large", f"{info.st_size} bytes > {self.cap}"
        return None

    def _kind(self, path: str, kind: str) -> str:
        if self.real_root is None:
            return f"listed as {kind!r}"
        try:
            return _file_kind(os.lstat(path).st_mode)
        except OSError as err:
            return f"{kind} ({err.strerror})"


def _read_whole(fs, paths: list[str], cap: int) -> list[bytes | Exception]:
    """The bytes of each file, or the exception that stands for its reject; never more than ``cap`` + 1
    bytes of one file are read."""
    if isinstance(fs, LocalFileSystem):  # fsspec's cat costs ~20 us a file here, open() ~5
        return [_read_local(p, cap) for p in paths]
    got = fs.cat_ranges(paths, [0] * len(paths), [cap + 1] * len(paths), on_error="return")
    out: list[bytes | Exception] = []
    for path, data in zip(paths, got):
        if isinstance(data, Exception) and not isinstance(data, FileNotFoundError):
            # S3 refuses any range of an empty object (416): such an error is checked against the size
            # (asked afresh: a long-lived worker's filesystem may hold a listing from before the object)
            with contextlib.suppress(Exception):
                fs.invalidate_cache(path)
                data = b"" if fs.size(path) == 0 else data
        elif not isinstance(data, Exception) and len(data) > cap:
            data = _Refused("file-too-large", f"more than {cap} bytes")
        out.append(data)
    return out


def _read_local(path: str, cap: int) -> bytes | Exception:
    """A local file's bytes, or the exception that stands for its reject. Opened non-blocking (opening a
    FIFO would wait for a writer) and checked on the open file: a regular file, within ``cap``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:  # missing, unreadable: a reject, as fsspec's cat(on_error="return") gives
        if err.errno == errno.ENXIO:  # a socket
            return _Refused("not-a-regular-file", f"cannot be opened as a file ({err.strerror})")
        return err
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size > cap:
        os.close(fd)
        if not stat.S_ISREG(info.st_mode):
            return _Refused("not-a-regular-file", _file_kind(info.st_mode))
        return _Refused("file-too-large", f"{info.st_size} bytes > {cap}")
    with open(fd, "rb") as f:
        data = f.read(info.st_size + 1)  # one byte more: a file that grew since is read on, to the cap
        if len(data) > info.st_size:
            data += f.read(cap + 1 - len(data))
        if len(data) > cap:
            return _Refused("file-too-large", f"more than {cap} bytes")
        return data


def _check_regular_file(fs, path: str, what: str) -> None:
    """A label table or class list must be a regular file: reading a FIFO would wait forever."""
    kind = fs.info(path).get("type")
    if kind not in ("file", None):
        raise ShardError(f"{what} {path} is not a regular file ({kind})")


def _read_failure(err: Exception) -> tuple[str, str]:
    """The reject reason and detail of an input whose bytes could not be had."""
    if isinstance(err, _Refused):
        return err.reason, err.detail
    if isinstance(err, FileNotFoundError):
        return "missing-file", str(err)
    if isinstance(err, LookupError):
        return "no-image", str(err)
    return "read-error", f"{type(err).__name__}: {err}"
