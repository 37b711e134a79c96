"""How the packages use their dependencies: `vit` imports none of the platform's, `pipelines` only public APIs."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EDGE = ("ray", "mlflow", "fsspec")  # what pipelines/ may use, through their public APIs only


def test_import_vit_loads_no_ray_mlflow_or_fsspec():
    code = "import sys, vit; print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'mlflow', 'fsspec'}))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def _private_uses(path: Path, root: Path = REPO) -> list[str]:
    """Imports of ``ray._private``, ``from mlflow.x import _y``, attribute chains like ``ray._raylet``."""
    found = []
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in EDGE:
            parts = node.module.split(".")
            names = [alias.name for alias in node.names]
            if any(p.startswith("_") for p in parts) or any(n.startswith("_") for n in names):
                found.append(f"{path.relative_to(root)}:{node.lineno}: from {node.module} import {', '.join(names)}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] in EDGE and any(p.startswith("_") for p in parts):
                    found.append(f"{path.relative_to(root)}:{node.lineno}: import {alias.name}")
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in EDGE:
                found.append(f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_pipelines_use_only_public_apis_of_ray_mlflow_and_fsspec():
    files = sorted((REPO / "pipelines").rglob("*.py")) + sorted((REPO / "bench").rglob("*.py"))
    assert len(files) > 10
    found = [use for path in files for use in _private_uses(path)]
    assert found == [], "\n".join(found)


def test_the_private_api_check_finds_what_it_looks_for(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from ray._private import services\nimport ray._raylet\nfrom mlflow.entities import _Thing\n"
        "import ray\nx = ray._private.worker\nfrom ray.train import Checkpoint\n"
    )
    assert len(_private_uses(sample, tmp_path)) == 4


def _calls_to(path: Path, names: set[str]) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node.func)}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and ast.unparse(node.func) in names
    ]


def test_urls_become_filesystems_and_ray_starts_in_one_place_each():
    """``pipelines.common.storage`` turns URLs into filesystems and ``pipelines.common.ray`` joins or starts
    Ray: a second way (a bare ``ray.init()`` joins whatever Ray runs on the machine) would drift."""
    files = sorted((REPO / "pipelines").rglob("*.py"))
    storage = [c for p in files if p.name != "storage.py" for c in _calls_to(p, {"fsspec.core.url_to_fs"})]
    assert storage == [], "\n".join(storage)
    starts = [c for p in files if p.parent.name != "common" for c in _calls_to(p, {"ray.init"})]
    assert starts == [], "\n".join(starts)
