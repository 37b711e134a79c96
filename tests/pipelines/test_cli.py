"""The ``vit`` command, run as a user runs it (a subprocess of the installed console script)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

import vit

VIT = shutil.which("vit", path=str(Path(sys.executable).parent)) or "vit"


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([VIT, *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_run_rejects_bad_settings_and_steps_by_name(tmp_path):
    result = run("run", "pretrain.optim.lr=fast")
    assert result.returncode == 2
    assert "pretrain.optim.lr" in result.stderr and "Traceback" not in result.stderr
    result = run("run", "pretrain.model=Q/16", f"workdir={tmp_path}")
    assert result.returncode == 2 and "pretrain.model" in result.stderr and "unknown model" in result.stderr
    result = run("run", "finetune.batch_size=129", f"workdir={tmp_path}")  # checked before minutes of sharding
    assert result.returncode == 2 and "finetune.batch_size: 129 does not split evenly" in result.stderr
    assert not (tmp_path / "corpus").exists()
    result = run("run", "--from", "deploy", f"workdir={tmp_path}")
    assert result.returncode == 2 and "--from: no step 'deploy'" in result.stderr
    result = run("run", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2 and "no such config file" in result.stderr


def test_the_same_mistake_is_the_same_error_before_any_work_in_every_command(tmp_path):
    """A setting checked by the config itself, named by its full field, in `vit run` and `vit pretrain`."""
    cases = [
        ("scale.num_workers=0", "scale.num_workers: must be at least 1, got 0"),
        ("optim.warmup_steps=150", "optim.warmup_steps: 150 warmup steps of a 100-step run"),
        ("batch_size=129", "batch_size: 129 does not split evenly over 2 workers"),
        ("optim.lr=-1", "optim.lr: must be positive"),
    ]
    for override, message in cases:
        result = run("run", f"workdir={tmp_path}", "pretrain.steps=100", f"pretrain.{override}")
        assert result.returncode == 2 and f"error: pretrain.{message}" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1
        result = run("pretrain", "data.shards=/nowhere", "steps=100", "optim.warmup_steps=10", override)
        assert result.returncode == 2 and f"error: {message}" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "corpus").exists() and not (tmp_path / "pipeline").exists()  # no step started


def test_run_reads_a_config_from_the_environment_and_leaves_no_file_behind(tmp_path):
    import os

    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp), "VIT_CFG": "name: from-env\npretrain: {optim: {lr: fast}}\n"}
    result = subprocess.run([VIT, "run", "env:VIT_CFG"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2 and "pretrain.optim.lr: expected a number" in result.stderr
    assert list(temp.iterdir()) == []
    result = subprocess.run([VIT, "run", "env:VIT_NOT_SET"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2 and "env:VIT_NOT_SET: the environment variable is not set" in result.stderr


def test_models_lists_variants_with_paper_sizes():
    result = run("models")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:]}
    assert rows["B/16"][5] == "86.6M" and rows["H/14"][5] == "632.0M"


def test_convert_imports_and_resamples(tmp_path):
    src = vit.create_model("Mu/8", img_size=32, num_classes=7)
    torch.save(src.state_dict(), tmp_path / "timm.pth")
    out = tmp_path / "converted.safetensors"
    result = run("convert", str(tmp_path / "timm.pth"), str(out), "--model", "Mu/8", "--img-size", "48")
    assert result.returncode == 0, result.stderr
    assert "4x4 -> 6x6" in result.stdout
    model = vit.load_model(out)
    assert model.config.img_size == 48 and model.config.num_classes == 7
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)

    result = run("convert", str(tmp_path / "timm.pth"), str(out), "--model", "Mu/8", "--num-classes", "3")
    assert result.returncode == 0, result.stderr
    assert "not loaded: head.weight, head.bias" in result.stdout
    assert torch.count_nonzero(vit.load_model(out).head.weight) == 0

    (tmp_path / "junk.pth").write_bytes(b"junk")
    result = run("convert", str(tmp_path / "junk.pth"), str(out), "--model", "Mu/8")
    assert result.returncode == 2 and "not a readable" in result.stderr


def test_corpus_shard_and_verify_from_the_command_line(tmp_path):
    """The digits importer, then `vit shard` on it (its split column is used), then `vit shard verify`."""
    digits, shards = tmp_path / "digits", tmp_path / "shards"
    assert run("corpus", "digits", str(digits)).returncode == 0
    result = run("shard", str(digits), str(shards), "--shard-samples", "400")
    assert result.returncode == 0, result.stderr
    assert re.search(r"written\s+1,797\s+test 360, train 1,437", result.stdout), result.stdout
    assert run("shard", "verify", str(shards)).returncode == 0
    (shards / "test-000000.tar").write_bytes(b"\0" * 1024)
    result = run("shard", "verify", str(shards))
    assert result.returncode == 2 and "test-000000.tar" in result.stdout
    result = run("shard", str(digits), str(tmp_path / "other"), "--shard-bytes", "lots")
    assert result.returncode == 2 and "--shard-bytes" in result.stderr


def test_registry_commands_do_not_make_an_empty_store_where_there_is_none(tmp_path):
    import os

    from PIL import Image

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    image = tmp_path / "digit.png"
    Image.new("RGB", (8, 8)).save(image)
    for args in (
        ["registry", "list"],
        ["registry", "show", "vit-demo"],
        ["predict", "models:/vit-demo@champion", image.name],
    ):
        result = subprocess.run([VIT, *args], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
        assert result.returncode == 2, result.stdout + result.stderr
        assert f"error: no MLflow store at {tmp_path}/mlflow.db" in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == [image]


def test_shard_settings_are_checked_before_ray_starts(tmp_path):
    (tmp_path / "corpus" / "a").mkdir(parents=True)
    cases = [
        (["--shard-samples", "-5"], "--shard-samples: must be at least 1"),
        (["--val-fraction", "1.5"], "--val-fraction: must be in [0, 1)"),
        (["--shard-bytes", "lots"], "--shard-bytes: cannot read 'lots'"),
        (["--max-file-bytes", "0"], "--max-file-bytes: must be at least 1"),
    ]
    for args, message in cases:
        result = run("shard", str(tmp_path / "corpus"), str(tmp_path / "shards"), *args)
        assert result.returncode == 2 and f"error: {message}" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and "Ray" not in result.stdout + result.stderr
    assert not (tmp_path / "shards").exists()


def test_every_command_answers_help_and_lives_in_the_module_of_its_group():
    from pipelines.cli import main

    modules = {name: command.callback.__module__ for name, command in main.commands.items()}
    assert modules == {
        **dict.fromkeys(["run", "pretrain", "finetune", "evaluate", "show-config"], "pipelines.cli.pipeline"),
        **dict.fromkeys(["corpus", "shard"], "pipelines.cli.data"),
        **dict.fromkeys(["models", "convert"], "pipelines.cli.models"),
        "inspect": "pipelines.cli.inspect",
        **dict.fromkeys(["submit", "jobs"], "pipelines.cli.jobs"),
        **dict.fromkeys(["registry", "predict"], "pipelines.cli.registry"),
        "schedule": "pipelines.cli.schedule",
    }
    for name in ["", *modules]:
        result = run(*name.split(), "--help")
        assert result.returncode == 0 and result.stdout.startswith("Usage: vit"), (name, result.stderr)


def test_one_error_helper_prints_error_lines_on_stderr_and_exits_2_unless_told_otherwise():
    import click
    from click.testing import CliRunner

    from pipelines.cli.errors import fail, failing_on

    @click.command()
    @click.argument("what")
    @failing_on(KeyError, describe=lambda err: f"no key {err.args[0]}")
    def command(what: str) -> None:
        if what == "key":
            raise KeyError("k")
        if what == "step":
            fail("the step broke\nrun the same command again", exit_code=1)
        if what == "bug":
            raise RuntimeError("not the user's to fix")
        fail(f"{what}: no such thing")

    runner = CliRunner()
    result = runner.invoke(command, ["key"])
    assert (result.exit_code, result.stdout, result.stderr) == (2, "", "error: no key k\n")
    result = runner.invoke(command, ["nothing"])
    assert (result.exit_code, result.stderr) == (2, "error: nothing: no such thing\n")
    result = runner.invoke(command, ["step"])
    assert (result.exit_code, result.stderr) == (1, "error: the step broke\nrun the same command again\n")
    result = runner.invoke(command, ["bug"])
    assert isinstance(result.exception, RuntimeError)  # not a user error: passed through, with its traceback
