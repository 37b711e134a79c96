from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from pipelines.common.config import ConfigError, apply_overrides, dump_config, load_config


@dataclass(kw_only=True)
class Inner:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["cosine", "linear"] = "cosine"


@dataclass(kw_only=True)
class Outer:
    name: str = "run"
    steps: int = 10
    clip: float | None = 1.0
    enabled: bool = True
    optim: Inner = field(default_factory=Inner)
    tags: list[str] = field(default_factory=list)


def test_defaults_yaml_and_overrides_merge(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 20\noptim:\n  lr: 0.01\n  schedule: linear\ntags: [a, b]\n")
    cfg = load_config(Outer, path, ["optim.lr=3e-3", "clip=null", "name=x"])
    assert cfg == Outer(name="x", steps=20, clip=None, optim=Inner(lr=3e-3, schedule="linear"), tags=["a", "b"])
    assert cfg.optim.betas == (0.9, 0.999)


def test_round_trip_through_yaml(tmp_path):
    cfg = Outer(steps=3, optim=Inner(betas=(0.8, 0.9)))
    path = tmp_path / "dump.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(Outer, path) == cfg


@pytest.mark.parametrize(
    "overrides, field_name, what",
    [
        (["steps=ten"], "steps", "integer"),
        (["steps=1.5"], "steps", "integer"),
        (["optim.lr=fast"], "optim.lr", "number"),
        (["optim.schedule=step"], "optim.schedule", "not one of"),
        (["optim.betas=[0.9]"], "optim.betas", "2 items"),
        (["enabled=maybe"], "enabled", "true or false"),
        (["optim.lrr=1"], "optim.lrr", "unknown field"),
        (["stepz=1"], "stepz", "unknown field"),
        (["optim=3"], "optim", "mapping"),
    ],
)
def test_errors_name_the_field(overrides, field_name, what):
    with pytest.raises(ConfigError) as err:
        load_config(Outer, None, overrides)
    assert str(err.value).startswith(field_name + ":")
    assert what in str(err.value)


def test_malformed_files_and_overrides(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(Outer, listy)
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["novalue"])
