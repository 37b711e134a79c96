"""The deployment files: the Ray cluster launcher config against Ray's own schema, the KubeRay and MLflow
manifests for what the platform needs of them (and what it must not have: an open Ray cluster, a credential in a
manifest, an image by tag only), the image's Dockerfile, and every pipeline config they carry through the real loader.
MLflow's login and Host check are exercised against a real server in tests/test_mlflow_auth.py."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.cli import main
from pipelines.common.config import load_config
from pipelines.orchestration.config import PipelineConfig

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ("infra/kuberay/rayjob-pipeline.yaml", "infra/kuberay/raycronjob-pipeline.yaml", "infra/mlflow/mlflow.yaml")
PINNED = re.compile(r"^[a-z0-9][a-z0-9._/:-]*@sha256:[0-9a-f]{64}$")  # name[:tag]@sha256:<64 hex>


def manifests(path: str) -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all((ROOT / path).read_text()) if doc}


def ray_cluster_specs() -> dict[str, dict]:
    """Every Ray cluster the manifests start: the RayJob's and the RayCronJob's job template's."""
    return {
        "RayJob": manifests("infra/kuberay/rayjob-pipeline.yaml")["RayJob"]["spec"]["rayClusterSpec"],
        "RayCronJob": manifests("infra/kuberay/raycronjob-pipeline.yaml")["RayCronJob"]["spec"]["jobTemplate"][
            "rayClusterSpec"
        ],
    }


def walk(node, key: str):
    """Every value stored under ``key`` anywhere in a parsed YAML document."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from walk(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item, key)


def all_containers():
    for path in MANIFESTS:
        for doc in yaml.safe_load_all((ROOT / path).read_text()):
            for containers in walk(doc or {}, "containers"):
                for container in containers:
                    yield path, container


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
    assert any("pip install" in c and '-e "/home/ubuntu/vit[gpu]"' in c for c in config["setup_commands"])


def test_every_node_of_the_launched_cluster_runs_with_the_same_ray_token():
    """Token authentication on the head and every worker (RAY_AUTH_MODE=token where `ray start` runs), the token
    copied from the user's machine to Ray's default path on each node, and never written into the config."""
    from ray._private.authentication.authentication_token_setup import _get_default_token_path

    text = (ROOT / "ray_cluster.yaml").read_text()
    config = yaml.safe_load(text)
    home = Path("/home") / config["auth"]["ssh_user"]
    token_path = home / _get_default_token_path().relative_to(Path.home())  # where `ray start` looks: ~/.ray/auth_token
    assert config["file_mounts"][str(token_path)] == "~/.ray/auth_token"  # `ray up` stops when it is missing
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts and all(shlex.split(c)[:3] == ["RAY_AUTH_MODE=token", "ray", "start"] for c in starts), key
    assert "--address=$RAY_HEAD_IP:6379" in " ".join(config["worker_start_ray_commands"])
    assert "RAY_AUTH_TOKEN" not in text and "auth_token:" not in text.replace("/.ray/auth_token:", "")
    assert "0.0.0.0" not in text  # never a dashboard (and its Jobs API) on every interface


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
    for name in ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD",
                 "MLFLOW_FLASK_SERVER_SECRET_KEY"):  # fmt: skip
        assert "secretKeyRef" in env[name]["valueFrom"], name
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"


def mlflow_server_argv(namespace: str = "vit") -> list[str]:
    """The argv the manifest's shell command gives `mlflow server` in a namespace: the real /bin/sh runs it, with a
    stand-in ``mlflow`` first on PATH that writes down its arguments."""
    import tempfile

    container = manifests("infra/mlflow/mlflow.yaml")["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["/bin/sh", "-c"]
    with tempfile.TemporaryDirectory() as tmp:
        fake = Path(tmp) / "mlflow"
        fake.write_text('#!/bin/sh\nprintf \'%s\\0\' mlflow "$@" > "$ARGV_OUT"\n')
        fake.chmod(0o755)
        out = Path(tmp) / "argv"
        env = {"PATH": f"{tmp}:/usr/bin:/bin", "ARGV_OUT": str(out), "POD_NAMESPACE": namespace,
               "MLFLOW_BACKEND_STORE_URI": "postgresql://db/mlflow"}  # fmt: skip
        subprocess.run(container["command"] + container["args"], env=env, check=True, timeout=30)
        return out.read_text().split("\0")[:-1]


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_the_mlflow_server_asks_for_a_login_and_knows_its_own_service_names():
    """The basic-auth app; its config and admin from Secrets; and --allowed-hosts naming the Service as clients in
    the cluster call it (MLflow 3 answers 403 to any other Host, while /health, the readiness probe, still passes)."""
    docs = manifests("infra/mlflow/mlflow.yaml")
    service = docs["Service"]["metadata"]["name"]
    (port,) = (p["port"] for p in docs["Service"]["spec"]["ports"])
    argv = mlflow_server_argv("vit")
    assert argv[:2] == ["mlflow", "server"] and option(argv, "--app-name") == "basic-auth"
    assert option(argv, "--backend-store-uri") == "postgresql://db/mlflow"
    hosts = option(argv, "--allowed-hosts").split(",")
    for name in (service, f"{service}.vit", f"{service}.vit.svc", f"{service}.vit.svc.cluster.local"):
        assert name in hosts and f"{name}:{port}" in hosts, name
    assert "*" not in hosts and {"localhost:*", "127.0.0.1:*"} <= set(hosts)  # kubectl port-forward
    assert f"{service}.default.svc:{port}" in option(mlflow_server_argv("default"), "--allowed-hosts").split(",")
    # the tracking URI the shipped cluster recipe uses is one of them
    config_text = manifests("infra/kuberay/rayjob-pipeline.yaml")["ConfigMap"]["data"]["pipeline.yaml"]
    netloc = yaml.safe_load(config_text)["tracking"]["uri"].split("://", 1)[1].split("/", 1)[0]
    assert netloc in hosts
    # the auth app's config is a file from a Secret (its users database URI holds a password)
    spec = docs["Deployment"]["spec"]["template"]["spec"]
    container = spec["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    config_path = Path(env["MLFLOW_AUTH_CONFIG_PATH"]["value"])
    (mount,) = (m for m in container["volumeMounts"] if Path(m["mountPath"]) == config_path.parent)
    (volume,) = (v for v in spec["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] and config_path.name in {i["path"] for i in volume["secret"]["items"]}
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert spec["automountServiceAccountToken"] is False


def test_every_ray_container_runs_with_token_authentication_from_a_secret():
    """KubeRay's authOptions (token mode, the token from a Secret: KubeRay also gives it to the job's submitter),
    and the same env on the head and on every worker group's containers, so no Ray process runs without it."""
    for kind, cluster in ray_cluster_specs().items():
        auth = cluster["authOptions"]
        assert auth["mode"] == "token" and auth["secretName"], kind
        groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
        assert len(groups) >= 2, kind
        for group in groups:
            for container in group["template"]["spec"]["containers"]:
                where = f"{kind} {container['name']}"
                env = {e["name"]: e for e in container["env"]}
                assert env["RAY_AUTH_MODE"] == {"name": "RAY_AUTH_MODE", "value": "token"}, where
                ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
                assert ref == {"name": auth["secretName"], "key": "auth_token"}, where  # KubeRay's key
                assert "RAY_AUTH_TOKEN_PATH" not in env, where
                # the pipeline's MLflow login and S3 credentials come from Secrets too (never in a job's runtime_env)
                refs = {e["secretRef"]["name"] for e in container["envFrom"]}
                assert {"vit-s3", "mlflow-client"} <= refs, where
            assert "dashboard-host" not in group["rayStartParams"], kind


SECRET_LOOKING = re.compile(r"(AKIA[0-9A-Z]{16}|-----BEGIN|[A-Za-z0-9+/=_-]{32,})")
# Names the redaction rule calls secret ("auth") whose literal values are settings: a mode, a file from a Secret.
SETTINGS_NOT_CREDENTIALS = {"RAY_AUTH_MODE": "token", "MLFLOW_AUTH_CONFIG_PATH": "/etc/mlflow-auth/basic_auth.ini"}


def test_no_manifest_holds_a_credential():
    """Credentials only through Secrets: no Secret objects in the files, no env value that is a credential (by
    name, a URL with a password, or a long random-looking string), every secret-named variable from a Secret."""
    from pipelines.common.redaction import is_secret_field, redact_url

    for path in MANIFESTS:
        docs = [d for d in yaml.safe_load_all((ROOT / path).read_text()) if d]
        assert "Secret" not in {d["kind"] for d in docs}, path
    containers = list(all_containers())
    assert len(containers) == 5  # 2 Ray clusters x (head + workers), the MLflow server
    for path, container in containers:
        for entry in container.get("env", []):
            where = f"{path} {container['name']} {entry['name']}"
            if "value" in entry:
                value = str(entry["value"])
                if is_secret_field(entry["name"]):  # a setting about credentials, never one
                    assert SETTINGS_NOT_CREDENTIALS.get(entry["name"]) == value, where
                assert redact_url(value) == value and not SECRET_LOOKING.search(value), where
            else:
                source = entry["valueFrom"]
                assert set(source) <= {"secretKeyRef", "fieldRef"}, where
                if is_secret_field(entry["name"]):
                    assert "secretKeyRef" in source, where
        for source in container.get("envFrom", []):
            assert set(source) == {"secretRef"}, f"{path} {container['name']}"  # never a ConfigMap of credentials
        for arg in container.get("args", []) + container.get("command", []):
            assert redact_url(arg) == arg and not SECRET_LOOKING.search(arg.replace("0" * 64, "")), path


def test_every_image_is_pinned_by_digest():
    images = [(path, container["image"]) for path, container in all_containers()]
    assert len(images) == 5
    for path, image in images:
        assert PINNED.match(image), f"{path}: {image} is not pinned by digest"
    dockerfile = (ROOT / "infra/docker/Dockerfile").read_text()
    bases = re.findall(r"^FROM\s+(\S+)", dockerfile, re.MULTILINE)
    assert bases and all(PINNED.match(base) for base in bases), bases
    assert all(base.startswith("rayproject/ray:2.60.0-") for base in bases)  # the Ray of pyproject's pin


def test_pin_images_pins_the_dockerfile_and_every_manifest(tmp_path):
    """infra/docker/pin_images.py with a stand-in `docker` that answers as `buildx imagetools inspect` does."""
    import shutil

    for path in ("infra/docker/Dockerfile", *MANIFESTS):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / path, tmp_path / path)
    digest = "sha256:" + "ab" * 32
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/calls\necho \'"{digest}"\'\n')
    (bin_dir / "docker").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    script = [sys.executable, str(ROOT / "infra/docker/pin_images.py"), "--root", str(tmp_path)]
    subprocess.run([*script, "base"], env=env, check=True, capture_output=True, timeout=60)
    reference = "registry.example.com/team/vit-platform:0.1.0"
    subprocess.run([*script, "image", reference], env=env, check=True, capture_output=True, timeout=60)
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[0].startswith("buildx imagetools inspect rayproject/ray:2.60.0-py311-gpu ")
    assert calls[1].startswith(f"buildx imagetools inspect {reference} ")
    assert f"FROM rayproject/ray:2.60.0-py311-gpu@{digest}\n" in (tmp_path / "infra/docker/Dockerfile").read_text()
    for path in MANIFESTS:
        images = list(walk(list(yaml.safe_load_all((tmp_path / path).read_text())), "image"))
        assert images and set(images) == {f"{reference}@{digest}"}, path
    refused = subprocess.run([*script, "image", "vit-platform:latest@" + digest], env=env, capture_output=True,
                             text=True, timeout=60)  # fmt: skip
    assert refused.returncode != 0 and "expected REGISTRY/vit-platform:TAG" in refused.stderr


def test_the_image_installs_the_gpu_and_server_extras():
    """nvidia-ml-py (MLflow's GPU system metrics) and the server's PostgreSQL driver and basic-auth app come as
    extras the Dockerfile installs, not as dependencies of every install."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[<>=!~; ]", r, maxsplit=1)[0].lower() for r in requirements}

    assert "nvidia-ml-py" in names(extras["gpu"])
    assert {"psycopg2-binary", "mlflow[auth]"} <= names(extras["server"])
    for name in ("nvidia-ml-py", "psycopg2-binary", "psycopg"):
        assert name not in names(project["dependencies"]) | names(extras["test"]), name
    dockerfile = (ROOT / "infra/docker/Dockerfile").read_text()
    installs = [shlex.split(line) for line in re.findall(r"^RUN (pip install .*)$", dockerfile, re.MULTILINE)]
    (package,) = (words[words.index("-e") + 1] for words in installs if "-e" in words)
    assert package.startswith(".[") and {"gpu", "server"} <= set(package[2:-1].split(","))
    assert [w for words in installs for w in words if w.startswith("torch")] == ["torch==2.13.0"]  # pinned first


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
