"""What a Ray Job of the pipeline takes to the cluster, its package: the shell command it runs, the working dir
Ray uploads, the config as text, the environment and pip packages; and the checks, made here before anything is
sent, that none of it carries a credential or leaves the results where nobody could reach them.

Nothing here talks to a cluster or imports Ray: ``pipelines.orchestration.jobs`` submits what this module builds.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "CONFIG_ENV",
    "EXCLUDES",
    "FORWARDED_ENV",
    "MAX_CONFIG_BYTES",
    "MAX_PACKAGE_BYTES",
    "JobsError",
    "check_overrides",
    "check_overrides_carry_no_secrets",
    "check_results_reachable",
    "config_credentials_warning",
    "package_size",
    "pipeline_entrypoint",
    "pipeline_runtime_env",
]

CONFIG_ENV = "VIT_PIPELINE_YAML"
CLUSTER_PYTHON = "pipelines/orchestration/cluster_python.sh"  # relative to the job's working dir, the uploaded copy
# Where to send results, not credentials: the cluster gets its secrets from its own environment (instance roles,
# a secrets manager), never from the job's runtime_env, which anyone who can open the dashboard can read.
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL")
# Left out of the upload (gitwildmatch patterns, relative to the working dir; Ray also honours .gitignore and
# .rayignore). A leading "/" anchors to the top, so a package that happens to be called ``build`` still travels.
EXCLUDES = [
    ".git",
    ".venv",
    "venv",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    ".ipynb_checkpoints",
    "*.egg-info",
    "*.db",
    "/runs",
    "/mlruns",
    "/mlartifacts",
    "/ray_results",
    "/outputs",
    "/build",
    "/dist",
]
# Ray keeps an uploaded package in the GCS and refuses one of 512 MiB or more (its gRPC message limit).
MAX_PACKAGE_BYTES = 512 * 1024**2
# Linux refuses a single environment string longer than 128 KiB (MAX_ARG_STRLEN) when the job's process starts.
MAX_CONFIG_BYTES = 100 * 1024
_OWN_CREDENTIALS = (
    "give the cluster credentials of its own: an instance profile or IAM role on its nodes (ray_cluster.yaml), "
    "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the environment of `ray start` on every node, or a Kubernetes "
    "Secret (infra/kuberay)"
)


# Defined here, the lower of the two modules, so that both raise it; pipelines.orchestration.jobs re-exports it.
class JobsError(RuntimeError):
    """A problem the user can fix (address, job id, config, working dir): the CLI prints it without a traceback."""


def pipeline_entrypoint(config_path: str | None, overrides: Sequence[str] = ()) -> str:
    """The shell command the cluster runs:
    ``sh pipelines/orchestration/cluster_python.sh -m pipelines.cli run env:VIT_PIPELINE_YAML <overrides>``.

    The script runs the interpreter that runs the cluster's Ray, not the first ``python`` on the head's PATH (from
    a virtualenv that ``ray start`` ran from without activating it, another Python without Ray or this package).
    ``-m pipelines.cli`` rather than the ``vit`` script: the module comes from the uploaded working dir (the job's
    cwd), so the job runs the code as it is here even where the cluster installed another version. Overrides are
    shell-quoted: the entrypoint is run by a shell.
    """
    words = ["sh", CLUSTER_PYTHON, "-m", "pipelines.cli", "run"]
    if config_path is not None:
        words.append(f"env:{CONFIG_ENV}")
    words += list(overrides)
    return " ".join(shlex.quote(word) for word in words)


def _config_text(config_path: str) -> str:
    """The YAML text of a local file (or of a local environment variable, ``env:NAME``), checked to be a mapping."""
    from pipelines.common.config import ConfigError, parse_mapping

    if config_path.startswith("env:"):
        name = config_path[4:]
        if name not in os.environ:
            raise JobsError(f"config {config_path}: the environment variable {name} is not set")
        text = os.environ[name]
    else:
        from pipelines.orchestration.config import find_config

        path = find_config(config_path)
        if path is None:
            raise JobsError(f"config {config_path}: no such file (nor a config shipped with the package)")
        text = path.read_text()
    try:
        parse_mapping(text, f"config {config_path}")
    except ConfigError as err:
        raise JobsError(str(err)) from None
    if len(text.encode()) > MAX_CONFIG_BYTES:
        raise JobsError(f"config {config_path}: {len(text.encode())} bytes, more than an environment variable can hold")
    return text


def check_overrides(overrides: Sequence[str]) -> None:
    """Fail here, not minutes later on the cluster, when an override is not ``key=value``."""
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            raise JobsError(f"override {item!r} is not of the form key.sub=value")


def _requirements(path: str) -> list[str]:
    """The requirement lines of a pip requirements file (blank lines and comments dropped)."""
    file = Path(path)
    if not file.is_file():
        raise JobsError(f"requirements {path}: no such file")
    lines = [line.split(" #", 1)[0].strip() for line in file.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def _check_env(env: Mapping[str, str]) -> None:
    from pipelines.common.redaction import is_secret_field

    for key, value in env.items():
        if not key or not key.replace("_", "A").isalnum() or key[0].isdigit():
            raise JobsError(f"--env {key}=...: not a valid environment variable name")
        if not isinstance(value, str):
            raise JobsError(f"--env {key}: the value must be a string")
        if is_secret_field(key):
            raise JobsError(
                f"--env {key}: a credential; a job's environment is readable by anyone who can open the dashboard. "
                + _OWN_CREDENTIALS
            )


def _check_urls_carry_no_password(env: Mapping[str, str], where: str) -> None:
    """A URL with a login in it (``http://user:password@mlflow:5000``) would put the password in the job's
    runtime_env: refused, with how the cluster logs in instead."""
    from pipelines.common.redaction import redact_url

    for key, value in env.items():
        if redact_url(value) != value:
            raise JobsError(
                f"{key} in {where} carries a password ({redact_url(value)}); a job's environment is readable by "
                "anyone who can open the dashboard. Give the URL without it, and the cluster its own login: "
                "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD in the environment of `ray start` on every node, "
                "or the Kubernetes Secret mlflow-client (infra/kuberay)"
            )


def check_overrides_carry_no_secrets(overrides: Sequence[str]) -> None:
    """An override is part of the job's entrypoint, which the dashboard shows to anyone."""
    from pipelines.common.config import apply_overrides
    from pipelines.common.redaction import secret_fields

    found = secret_fields(apply_overrides({}, overrides))
    if found:
        raise JobsError(
            f"override {found[0]}: a credential; it would be stored in the job's entrypoint, readable by anyone "
            "who can open the dashboard. " + _OWN_CREDENTIALS[0].upper() + _OWN_CREDENTIALS[1:]
        )


def config_without_secrets(text: str) -> tuple[str, list[str]]:
    """The config text the cluster gets, and the dotted names of the credentials left out of it: the job falls back
    to the cluster's own (a config's comments and layout are kept when there is nothing to leave out)."""
    import yaml

    from pipelines.common.config import parse_mapping
    from pipelines.common.redaction import redact, secret_fields

    loaded = parse_mapping(text, "config text")
    found = secret_fields(loaded)
    if not found:
        return text, []
    return yaml.safe_dump(redact(loaded, drop=True), sort_keys=False), found


def config_credentials_warning(config_path: str) -> str | None:
    """The warning for a config that carries credentials (``pipeline_runtime_env`` leaves them out, and the job uses
    the cluster's own), naming them but not their values; None when it carries none."""
    _, left_out = config_without_secrets(_config_text(config_path))
    if not left_out:
        return None
    return (
        f"warning: the config carries credentials ({', '.join(left_out)}); they are not sent (a job's "
        f"environment is readable by anyone who can open the dashboard). The job uses the cluster's own: "
        + _OWN_CREDENTIALS
    )


def check_results_reachable(config_text: str | None, overrides: Sequence[str], env_vars: Mapping[str, str]) -> None:
    """Refuse a pipeline whose results would land in the job's temporary copy of the working dir on the cluster,
    where nobody can open them afterwards: a relative workdir, or a local MLflow store by default."""
    from pipelines.common.config import ConfigError, load_config
    from pipelines.orchestration.config import LOCAL_CONFIG, PipelineConfig

    try:
        if config_text is None:
            cfg = load_config(PipelineConfig, LOCAL_CONFIG, overrides)
        else:
            cfg = load_config(PipelineConfig, overrides=overrides, text=config_text)
    except ConfigError as err:
        raise JobsError(str(err)) from None
    gone = "lands in Ray's temporary copy of the working dir on the cluster, which nobody can open once the job ends"
    if "://" not in cfg.workdir and not cfg.workdir.startswith("/"):
        raise JobsError(
            f"workdir {cfg.workdir!r}: a relative path {gone}; set workdir to shared storage (s3://bucket/prefix) or "
            "an absolute path every node can reach"
        )
    if not cfg.tracking.enabled:
        return
    uri = cfg.tracking.uri or env_vars.get("MLFLOW_TRACKING_URI", "")
    if not uri or (uri.startswith("sqlite:///") and not uri.startswith("sqlite:////")):
        where = f"the store {uri}" if uri else "the default store (./mlflow.db)"
        raise JobsError(
            f"tracking.uri: {where} {gone}, and the registered model with it; set tracking.uri (or "
            "MLFLOW_TRACKING_URI here) to a tracking server you and the cluster can reach (http://HOST:5000), or "
            "tracking.enabled=false"
        )


def pipeline_runtime_env(
    config_path: str | None,
    *,
    working_dir: str = ".",
    requirements: str | None = None,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The job's ``runtime_env``: the working dir to upload (minus ``EXCLUDES``), the config text and the
    non-secret settings that say where results go (``FORWARDED_ENV``, when set here), ``env``, and ``pip``."""
    root = Path(working_dir).expanduser()
    if not root.is_dir():
        raise JobsError(f"working dir {working_dir}: no such directory")
    env_vars = {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}
    _check_urls_carry_no_password(env_vars, "the environment")
    if config_path is not None:
        env_vars[CONFIG_ENV], _ = config_without_secrets(_config_text(config_path))
    if env:
        _check_env(env)
        _check_urls_carry_no_password(env, "--env")
        env_vars.update(env)
    runtime_env: dict[str, Any] = {"working_dir": str(root.resolve()), "excludes": list(EXCLUDES)}
    if env_vars:
        runtime_env["env_vars"] = env_vars
    if requirements is not None:
        packages = _requirements(requirements)
        if packages:
            runtime_env["pip"] = packages
    return runtime_env


# What Ray itself leaves out of every upload (its default excludes); ours (EXCLUDES) come on top.
_RAY_DEFAULT_EXCLUDES = (".git", ".venv", "venv", "__pycache__", ".pytest_cache", ".mypy_cache", ".ipynb_checkpoints")


def package_size(working_dir: str, excludes: Sequence[str] = EXCLUDES) -> tuple[int, int]:
    """(files, bytes before compression) that Ray would upload from ``working_dir``: the same rules as Ray's walk
    (its default excludes, ``excludes``, and every .gitignore / .rayignore on the way, gitwildmatch patterns relative
    to their folder), so the check matches the upload. Raises ``JobsError`` when the total reaches Ray's limit,
    naming the largest entries to exclude."""
    import pathspec

    def spec(lines: Sequence[str]) -> pathspec.PathSpec:
        return pathspec.PathSpec.from_lines("gitwildmatch", lines)

    root = Path(working_dir).absolute()
    ignore_files = (".gitignore", ".rayignore")
    if os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") == "1":
        ignore_files = (".rayignore",)
    # The rules in force in each folder: (the folder their patterns are relative to, the patterns).
    rules: dict[Path, list[tuple[Path, pathspec.PathSpec]]] = {
        root: [(root, spec([*_RAY_DEFAULT_EXCLUDES, *excludes]))]
    }
    sizes: dict[str, int] = {}
    files = 0
    for folder, dirs, names in os.walk(root):
        here = Path(folder)
        specs = rules.pop(here) + [
            (here, spec((here / n).read_text().splitlines())) for n in ignore_files if n in names
        ]
        dirs[:] = [d for d in dirs if not _ignored(here / d, specs, is_dir=True)]
        rules.update({here / d: specs for d in dirs})
        for name in names:
            path = here / name
            if path.is_file() and not _ignored(path, specs, is_dir=False):
                files += 1
                entry = path.relative_to(root).parts[0]
                sizes[entry] = sizes.get(entry, 0) + path.stat().st_size
    total = sum(sizes.values())
    if total >= MAX_PACKAGE_BYTES:
        largest = sorted(sizes.items(), key=lambda item: -item[1])[:5]
        listing = ", ".join(f"{name} {_mib(size)}" for name, size in largest)
        raise JobsError(
            f"working dir {working_dir}: {files} files, {_mib(total)} to upload, over Ray's limit of "
            f"{_mib(MAX_PACKAGE_BYTES)}; largest: {listing}. Keep data and outputs out of it (put them in storage and "
            "pass their URLs in the config) or list them in a .rayignore file"
        )
    return files, total


def _ignored(path: Path, specs: Sequence[tuple[Path, Any]], *, is_dir: bool) -> bool:
    suffix = "/" if is_dir else ""
    return any(patterns.match_file(path.relative_to(base).as_posix() + suffix) for base, patterns in specs)


def _mib(size: float) -> str:
    return f"{size / 1024**2:.1f} MiB"
