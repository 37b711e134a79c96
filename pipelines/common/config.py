"""Typed configs: nested dataclasses, loaded from YAML, with dotted command-line overrides.

    cfg = load_config(PretrainConfig, "pretrain.yaml", ["optim.lr=3e-3", "steps=5000"])

Every value is checked against its field's type; an error names the field (``optim.lr``) and
what was wrong, so a typo in a YAML file fails before any work starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value that does not fit its field; the message starts with the dotted field name."""


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = (), *, text: str | None = None
) -> T:
    """Defaults of ``cls``, updated by the YAML file at ``path`` (or the YAML ``text``), then by ``key.sub=value``
    overrides."""
    data: dict = {}
    if path is not None or text is not None:
        data = parse_mapping(Path(path).read_text() if text is None else text, path if text is None else "config text")
    data = apply_overrides(data, overrides)
    return from_dict(cls, data)


def parse_mapping(text: str, where: object) -> dict:
    """The YAML ``text`` of a config: a mapping (empty text: an empty one); a ``ConfigError`` naming ``where``."""
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML: {err}") from err
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level, got {type(loaded).__name__}")
    return loaded or {}


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """``["optim.lr=3e-3"]`` -> ``{"optim": {"lr": 0.003}}`` merged into a copy of ``data``."""
    merged = _deep_copy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = merged
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part} is not a section")
        node[parts[-1]] = value
    return merged


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, checking names and types recursively."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = prefix.rstrip(".") or cls.__name__
        raise ConfigError(f"{prefix}{unknown[0]}: unknown field in {where} (known: {', '.join(sorted(fields))})")
    kwargs = {
        name: _coerce(hints[name], _over_default(fields[name], value), prefix + name) for name, value in data.items()
    }
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        # A config's own checks (``__post_init__``) say "field: problem": prefixed here, the message names the
        # full field (``pretrain.optim.warmup_steps: ...``) wherever the config sits in a bigger one.
        field_name = str(err).split(":", 1)[0].split(".", 1)[0]
        if isinstance(err, ValueError) and field_name in fields:
            raise ConfigError(f"{prefix}{err}") from None
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {err}") from err


def check(condition: bool, message: str) -> None:
    """For ``__post_init__``: ``message`` starts with the field it is about (``"lr: must be positive"``)."""
    if not condition:
        raise ConfigError(message)


def _over_default(field: dataclasses.Field, value: Any) -> Any:
    """A partial section updates the field's own default, so ``optim: {lr: 0.1}`` keeps a recipe's other values."""
    if not isinstance(value, Mapping) or field.default_factory is dataclasses.MISSING:
        return value
    default = field.default_factory()
    if not dataclasses.is_dataclass(default):
        return value
    return _merge(to_dict(default), value)


def _merge(base: dict, update: Mapping) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def to_dict(obj: Any) -> Any:
    """A config as plain YAML-able data (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def dump_config(obj: Any) -> str:
    """The config as YAML, as written anywhere outside the process: credentials redacted."""
    from pipelines.common.redaction import redact

    return yaml.safe_dump(redact(to_dict(obj)), sort_keys=False)


def _coerce(tp: Any, value: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, name)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{name}: {value!r} fits none of {tp}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return value
        return from_dict(tp, value, prefix=name + ".")
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{name}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(a, v, f"{name}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{name}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    return value


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    return data
