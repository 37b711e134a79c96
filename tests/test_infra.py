"""The deployment files: the Ray cluster launcher config against Ray's own schema, the KubeRay and MLflow
manifests for what the platform needs of them, and every pipeline config they carry through the real loader."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest
import yaml

from pipelines.cli import main
from pipelines.common.config import load_config
from pipelines.orchestration.config import PipelineConfig

ROOT = Path(__file__).resolve().parent.parent


def manifests(path: str) -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all((ROOT / path).read_text()) if doc}


def test_the_cluster_launcher_config_is_valid_for_ray():
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    jsonschema.validate(config, schema)  # what `ray up` checks first
    assert config["head_node_type"] in config["available_node_types"]
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start  # reached through `ray dashboard`'s SSH tunnel only
    assert {".venv", "runs", ".git"} <= set(config["rsync_exclude"])
    assert any("pip install" in c and "-e /home/ubuntu/vit" in c for c in config["setup_commands"])


@pytest.mark.parametrize("path", ["pipelines/configs/local.yaml", "pipelines/configs/jft-b16.yaml"])
def test_shipped_pipeline_configs_load(path):
    cfg = load_config(PipelineConfig, ROOT / path)
    assert cfg.register.model_name and cfg.finetune is not None


def test_the_rayjob_runs_vit_run_on_the_mounted_config(tmp_path):
    docs = manifests("infra/kuberay/rayjob-pipeline.yaml")
    config_text = docs["ConfigMap"]["data"]["pipeline.yaml"]
    (tmp_path / "pipeline.yaml").write_text(config_text)
    cfg = load_config(PipelineConfig, tmp_path / "pipeline.yaml")  # the config the job will run
    assert cfg.workdir.startswith("s3://") and cfg.tracking.uri.startswith("http://mlflow.")
    job = docs["RayJob"]["spec"]
    argv = shlex.split(job["entrypoint"])
    assert argv[:4] == ["python", "-m", "pipelines.cli", "run"] and "run" in main.commands
    head = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount = head["containers"][0]["volumeMounts"][0]
    assert argv[4] == os.path.join(mount["mountPath"], "pipeline.yaml")
    assert head["volumes"][0]["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    assert job["shutdownAfterJobFinishes"] is True
    # credentials come from a Secret, never from the config
    assert "secret" not in config_text.lower() and head["containers"][0]["envFrom"][0]["secretRef"]


def test_the_cronjob_schedules_the_same_job():
    job = manifests("infra/kuberay/rayjob-pipeline.yaml")["RayJob"]["spec"]
    cron = manifests("infra/kuberay/raycronjob-pipeline.yaml")["RayCronJob"]["spec"]
    assert cron["jobTemplate"] == job
    assert len(cron["schedule"].split()) == 5 and cron["suspend"] is False


def test_the_mlflow_server_is_internal_and_keeps_its_secrets_out_of_the_manifest():
    docs = manifests("infra/mlflow/mlflow.yaml")
    assert docs["Service"]["spec"]["type"] == "ClusterIP"
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    command = " ".join(container["args"])
    assert "mlflow server" in command and "$MLFLOW_BACKEND_STORE_URI" in command
    env = {e["name"]: e for e in container["env"]}
    assert "secretKeyRef" in env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"


def test_the_kuberay_configmap_carries_exactly_the_shipped_cluster_recipe():
    """One source: the ConfigMap's pipeline.yaml is the text of pipelines/configs/jft-b16.yaml, comments included,
    and the job's cluster has the GPUs that recipe asks for."""
    docs = manifests("infra/kuberay/rayjob-pipeline.yaml")
    recipe = (ROOT / "pipelines" / "configs" / "jft-b16.yaml").read_text()
    assert docs["ConfigMap"]["data"]["pipeline.yaml"] == recipe
    cfg = load_config(PipelineConfig, ROOT / "pipelines" / "configs" / "jft-b16.yaml")
    (workers,) = docs["RayJob"]["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus = workers["replicas"] * int(
        workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    )
    assert gpus == cfg.pretrain.scale.num_workers


def test_a_plain_install_ships_the_configs_so_vit_run_finds_its_default_anywhere(tmp_path):
    """`pip install .` (not editable): the package carries its configs, and the installed `vit` finds the embedded
    default (and the shipped recipes by name) from any folder."""
    import shutil
    import subprocess
    import sys

    source, target = tmp_path / "source", tmp_path / "site"  # a copy: the build leaves its folders in the source
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "build", "*.egg-info"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target),
         str(source)],
        check=True, capture_output=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert (target / "pipelines" / "configs" / "local.yaml").is_file()
    assert (target / "pipelines" / "configs" / "jft-b16.yaml").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = (
        "import pipelines, sys; from pipelines.cli import main;"
        "assert pipelines.__file__.startswith(sys.argv[1]), pipelines.__file__;"
        "main(['show-config', 'pipeline'])"
    )
    shown = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, cwd=elsewhere,
                           env=env, timeout=120)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert yaml.safe_load(shown.stdout)["workdir"] == "runs/demo"  # the embedded demo's, not PipelineConfig's default
    run = subprocess.run([sys.executable, "-c", "from pipelines.cli import main; main()", "run", "jft-b16",
                          "tracking.uri=sqlite:///x.db", "pretrain.optim.lr=fast"],
                         capture_output=True, text=True, cwd=elsewhere, env=env, timeout=120)  # fmt: skip
    assert run.returncode == 2 and "pretrain.optim.lr: expected a number" in run.stderr  # found jft-b16 by name
