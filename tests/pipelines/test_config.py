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


PIPELINE_MISTAKES = [
    ("pretrain: null\n", "finetune.init_from: with no pretrain step"),
    ("finetune_data:\n  source: ''\n", "finetune_data.source: give a corpus"),
    ("pretrain_data:\n  shard_samples: 0\n", "pretrain_data.shard_samples: must be at least 1"),
    ("evaluate:\n  loader_workers: -1\n", "evaluate.loader_workers: must not be negative"),
    ("pretrain:\n  batch_size: 6\n  scale:\n    num_workers: 4\n", "pretrain.batch_size"),
]


@pytest.mark.parametrize(("text", "expected"), PIPELINE_MISTAKES)
def test_vit_run_and_vit_submit_refuse_a_pipeline_mistake_with_the_same_words(tmp_path, text, expected):
    """The cross-field checks live in the config, so every command that loads it says the same thing."""
    import subprocess
    import sys
    from pathlib import Path

    from pipelines.orchestration.config import PipelineConfig

    with pytest.raises(ConfigError) as raised:
        load_config(PipelineConfig, text=text)
    assert str(raised.value).startswith(expected)
    config = tmp_path / "pipeline.yaml"
    config.write_text(text + "workdir: /tmp/never-made\n")
    vit = str(Path(sys.executable).parent / "vit")
    said = []
    for command in ([vit, "run", str(config)], [vit, "submit", str(config), "--address", "http://127.0.0.1:9"]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert result.returncode != 0
        said.append([line for line in result.stderr.splitlines() if expected in line])
    assert said[0] and said[0] == said[1], said
    assert not (tmp_path / "runs").exists() and not Path("/tmp/never-made").exists()
