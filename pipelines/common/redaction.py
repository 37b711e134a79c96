"""What never leaves the process: credentials in configs.

One rule decides what is a secret, and every place a config leaves the process applies it: the
``config.yaml`` artifact of a run, the config inside each checkpoint's ``trainer_state.json``, the
params of an MLflow run, and the config text a Ray Job carries (``vit submit``).

    redact({"storage_options": {"key": "AKIA...", "client_kwargs": {"endpoint_url": "http://s3"}}})
    # {"storage_options": {"key": "<redacted>", "client_kwargs": {"endpoint_url": "http://s3"}}}

A value is a secret when its field name says so (fsspec's ``key``/``secret``/``token`` of s3fs and gcsfs,
``password``, ``*_access_key*``, Azure's ``account_key``/``sas_token``/``connection_string``, ...), or,
for a URL, the password part of ``scheme://user:password@host``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

REDACTED = "<redacted>"

# A field whose last word is one of these holds a credential (s3fs: key/secret/token; gcsfs: token).
_SECRET_LAST_WORDS = {"key", "secret", "token", "password", "passwd", "pwd", "credential", "credentials"}
# A field with one of these anywhere in its name does too (aws_access_key_id, client_secret, sas_token, ...).
_SECRET_PARTS = (
    "secret",
    "password",
    "passwd",
    "credential",
    "access_key",
    "private_key",
    "api_key",
    "account_key",
    "session_token",
    "sas_token",
    "connection_string",
    "auth",
)
_URL_PASSWORD = re.compile(r"^(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/@\s:]*):(?P<password>[^/@\s]+)@")


def is_secret_field(name: str) -> bool:
    """True for a field name that holds a credential: ``key``, ``secret``, ``aws_secret_access_key``, ...
    (``key_column`` or ``sort_keys`` do not)."""
    lowered = str(name).lower().replace("-", "_")
    words = [w for w in re.split(r"[_.]", lowered) if w]
    if words and words[-1] in _SECRET_LAST_WORDS:
        return True
    return any(part in lowered for part in _SECRET_PARTS)


def redact_url(value: str) -> str:
    """``https://user:pw@host/x`` -> ``https://user:<redacted>@host/x``; other strings unchanged."""
    return _URL_PASSWORD.sub(lambda m: f"{m['head']}:{REDACTED}@", value)


def redact(data: Any, *, drop: bool = False) -> Any:
    """A copy of ``data`` (nested mappings, lists, strings) with every secret replaced by ``<redacted>``, or
    left out with ``drop`` (what a cluster gets: it should fall back to credentials of its own)."""
    if isinstance(data, Mapping):
        out = {}
        for key, value in data.items():
            if is_secret_field(key) and value not in (None, "", {}, []):
                if not drop:
                    out[key] = REDACTED
                continue
            out[key] = redact(value, drop=drop)
        return out
    if isinstance(data, list | tuple):
        return type(data)(redact(v, drop=drop) for v in data)
    if isinstance(data, str):
        return redact_url(data)
    return data


def secret_fields(data: Any, prefix: str = "") -> list[str]:
    """The dotted names of every secret in ``data`` (``pretrain_data.storage_options.secret``), to warn about."""
    found: list[str] = []
    if isinstance(data, Mapping):
        for key, value in data.items():
            name = f"{prefix}{key}"
            if is_secret_field(key) and value not in (None, "", {}, []):
                found.append(name)
            else:
                found += secret_fields(value, name + ".")
    elif isinstance(data, list | tuple):
        for i, value in enumerate(data):
            found += secret_fields(value, f"{prefix.rstrip('.')}[{i}].")
    elif isinstance(data, str) and redact_url(data) != data:
        found.append(prefix.rstrip("."))
    return found
