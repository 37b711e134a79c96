"""The pyfunc classifier, the registry and `vit predict`, against a real MLflow server (and a local S3, a fresh
subprocess and `mlflow models serve`): what is registered is what a user loads, and it predicts what the model does.

The tiny model has random weights (a non-zero head, so the scores differ): the tests compare the served predictions
with the in-process model's on the same images, which checks preprocessing, weights and class order, not accuracy.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import mlflow
import mlflow.sklearn
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import vit
from pipelines.cli import registry as registry_cli
from pipelines.registry import registry
from pipelines.registry.predict import ForeignModelError, check_platform_model, load_pyfunc, predict_images
from pipelines.registry.registry import RegistryError, describe_model, list_models, log_vit_model, promote
from vit.data import build_transform, normalize

IMAGE_SIZE = 32
CLASSES = [f"digit-{i}" for i in range(10)]
NUM_IMAGES = 12

# MLflow's own input-example code compares columns with a range (pandas 3 deprecates that); not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Operation with range is deprecated")


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def tracking(mlflow_server):
    """The session's MLflow server as tracking URI for this module, in the environment too (for subprocesses)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
        mlflow.set_tracking_uri(mlflow_server.uri)
        yield mlflow_server.uri
        mlflow.set_tracking_uri(None)  # MLflow's global (other modules set theirs); the context restores the env


@pytest.fixture(scope="module")
def digits() -> dict:
    """Real handwritten digits (8x8 grey, 0-16), upscaled to 32 px RGB: as uint8 arrays and as PNG bytes."""
    from sklearn.datasets import load_digits

    data = load_digits()
    arrays = []
    for image in data.images[:NUM_IMAGES]:
        grey = Image.fromarray((image * 255 / 16).astype(np.uint8)).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
        arrays.append(np.array(grey.convert("RGB")))
    return {"arrays": arrays, "pngs": [_png(a) for a in arrays], "targets": data.target[:NUM_IMAGES].tolist()}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    # head_zero_init=False: the paper's zero head would give every image the same (uniform) scores.
    model = vit.create_model("Mu/8", img_size=IMAGE_SIZE, num_classes=len(CLASSES), head_zero_init=False)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    vit.save_state_dict(model.state_dict(), model.config, path)
    return path


@pytest.fixture(scope="module")
def reference_logits(weights, digits) -> torch.Tensor:
    """The checkpoint's logits on the digits, computed here with the evaluation transform: the truth."""
    model = vit.load_model(weights).eval()
    transform = build_transform("eval", IMAGE_SIZE)
    with torch.inference_mode():
        return model(normalize(torch.stack([transform(png) for png in digits["pngs"]])))


@pytest.fixture(scope="module")
def reference(reference_logits) -> torch.Tensor:
    return torch.softmax(reference_logits, dim=-1)


@pytest.fixture(scope="module")
def experiment(tracking) -> str:
    return mlflow.create_experiment(_unique("registry"))


@pytest.fixture(scope="module")
def log_run(experiment, weights, digits):
    """Log one run with the model and (optionally) an eval/top1; returns its run id."""

    def log(top1: float | None, *, experiment_id: str = experiment) -> str:
        with mlflow.start_run(experiment_id=experiment_id) as run:
            if top1 is not None:
                mlflow.log_metric("eval/top1", top1)
            log_vit_model(str(weights), CLASSES, image_size=IMAGE_SIZE, example_image=digits["pngs"][0])
        return run.info.run_id

    return log


@pytest.fixture(scope="module")
def champion(log_run) -> str:
    """A registered model whose champion the prediction tests load; returns its name."""
    name = _unique("vit-champion")
    registry.register_model(log_run(0.9), name)
    assert promote(name).promoted
    return name


@pytest.fixture(scope="module")
def champion_model(champion):
    return mlflow.pyfunc.load_model(f"models:/{champion}@champion")


@pytest.fixture(scope="module")
def image_files(digits, tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("images")
    paths = []
    for i, png in enumerate(digits["pngs"]):
        (root / f"{i:02d}.png").write_bytes(png)
        paths.append(str(root / f"{i:02d}.png"))
    return paths


def _check(out: pd.DataFrame | list[dict], reference: torch.Tensor) -> None:
    """Predictions agree with the in-process model: the argmax exactly, the scores to float32 precision."""
    rows = out.to_dict(orient="records") if isinstance(out, pd.DataFrame) else out
    assert [r["class_id"] for r in rows] == reference.argmax(-1).tolist()
    assert [r["label"] for r in rows] == [CLASSES[i] for i in reference.argmax(-1).tolist()]
    np.testing.assert_allclose([r["probability"] for r in rows], reference.max(-1).values.numpy(), atol=1e-5)


# --- registry ------------------------------------------------------------------------------------------------------


def test_registering_a_run_twice_returns_the_same_version(log_run):
    name = _unique("vit-idem")
    run_id = log_run(0.5)
    first = registry.register_model(run_id, name)
    again = registry.register_model(run_id, name)
    assert again.version == first.version == "1"
    assert first.tags["metric.eval/top1"] == "0.5"
    assert run_id in first.description
    assert first.aliases == ["challenger"]
    second = registry.register_model(log_run(0.6), name)
    assert second.version == "2"
    info = describe_model(name)
    assert [v["version"] for v in info["versions"]] == ["2", "1"]
    assert info["aliases"] == {"challenger": "2"}
    assert (info["versions"][1]["metrics"], info["versions"][1]["run_id"]) == ({"eval/top1": 0.5}, run_id)
    assert any(m["name"] == name and m["latest_version"] == "2" for m in list_models())


def test_promotion_needs_a_strictly_better_metric_or_force(log_run):
    name = _unique("vit-promote")
    registry.register_model(log_run(0.5), name)
    first = promote(name)
    assert (first.promoted, first.version, first.previous_champion) == (True, "1", None)

    registry.register_model(log_run(0.4), name)
    worse = promote(name)
    assert not worse.promoted and (worse.candidate_value, worse.champion_value) == (0.4, 0.5)
    assert "not better" in worse.reason
    tie = promote(name, 1)
    assert not tie.promoted and "already" in tie.reason

    forced = promote(name, force=True)
    assert (forced.promoted, forced.version, forced.previous_champion) == (True, "2", "1")

    registry.register_model(log_run(0.7), name)
    better = promote(name)
    assert (better.promoted, better.version, better.previous_champion) == (True, "3", "2")
    assert describe_model(name)["aliases"] == {"champion": "3", "challenger": "3"}
    assert not promote(name, 1).promoted  # 0.5 < 0.7


def test_registry_errors_are_clear(log_run):
    with pytest.raises(RegistryError, match="no registered model 'vit-missing"):
        promote(_unique("vit-missing"))
    name = _unique("vit-errors")
    registry.register_model(log_run(None), name)
    with pytest.raises(RegistryError, match="has no version 7"):
        promote(name, 7)
    with pytest.raises(RegistryError, match="has no 'eval/top1'"):
        promote(name)
    assert promote(name, force=True).promoted
    with pytest.raises(RegistryError, match="no run '0123abc'"):
        registry.register_model("0123abc", name)
    with pytest.raises(RegistryError, match="no logged model named 'ema'"):
        registry.register_model(log_run(0.1), name, artifact_name="ema")


# --- prediction ----------------------------------------------------------------------------------------------------


def test_bytes_paths_arrays_and_base64_predict_alike(champion, champion_model, digits, image_files, reference):
    grey = [a[:, :, 0] for a in digits["arrays"]]  # (H, W): the digits are grey, so the RGB channels are equal
    inputs = {
        "bytes": digits["pngs"],
        "paths": image_files,
        "arrays": digits["arrays"],
        "grey arrays": grey,
        "base64": [base64.b64encode(png).decode() for png in digits["pngs"]],
        "nested lists": [a.tolist() for a in grey],
    }
    for kind, images in inputs.items():
        column = np.empty(len(images), dtype=object)  # pandas would stack same-shaped arrays into a 2-d block
        for i, image in enumerate(images):
            column[i] = image
        out = champion_model.predict(pd.DataFrame({"image": column}), params={"top_k": 3})
        assert list(out.columns) == ["label", "class_id", "probability", "top_labels", "top_probabilities"], kind
        _check(out, reference)
        assert all(len(t) == 3 for t in out["top_labels"]), kind
    # A plain list, batched smaller than the input, through the library function.
    rows = predict_images(f"models:/{champion}@champion", digits["arrays"], batch_size=5, progress=False)
    _check(rows, reference)
    assert rows[0]["image"] == "#0" and len(rows[0]["top_probabilities"]) == 5


def test_a_multi_label_model_scores_with_a_sigmoid(experiment, weights, digits, reference_logits):
    with mlflow.start_run(experiment_id=experiment):
        info = log_vit_model(weights, CLASSES, image_size=IMAGE_SIZE, resize_size=37, multi_label=True)
    out = mlflow.pyfunc.load_model(info.model_uri).predict(pd.DataFrame({"image": digits["pngs"]}), {"top_k": 10})
    scores = torch.sigmoid(reference_logits)  # resize_size=37 is the default for 32 (32 * 8 / 7), written out
    _check(out, scores)
    top = np.array(out["top_probabilities"].tolist())  # (N, 10): all classes, best first, not summing to 1
    np.testing.assert_allclose(top, scores.sort(-1, descending=True).values.numpy(), atol=1e-5)


def test_an_undecodable_image_names_its_row(champion, champion_model, digits, image_files, tmp_path):
    frame = pd.DataFrame({"image": [digits["pngs"][0], b"this is not an image", digits["pngs"][1]]})
    with pytest.raises(ValueError, match=r"row 1: cannot decode image"):
        champion_model.predict(frame)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(digits["pngs"][0][:60])
    with pytest.raises(ValueError, match=rf"{truncated}: cannot decode image"):
        predict_images(f"models:/{champion}@champion", [*image_files[:3], str(truncated)], batch_size=2, progress=False)
    with pytest.raises(ValueError, match="row 0: .* is not an existing file or base64"):
        champion_model.predict(pd.DataFrame({"image": ["/no/such/file.png"]}))


@pytest.mark.slow
def test_the_champion_loads_in_a_fresh_process_with_its_own_code(champion, image_files, reference, tmp_path):
    """A new interpreter, outside the repository, isolated (-I: no PYTHONPATH, no cwd): the model brings `vit`."""
    script = (
        "import json, sys, mlflow, pandas as pd\n"
        "model = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "out = model.predict(pd.DataFrame({'image': sys.argv[2:]}))\n"
        "print(json.dumps({'vit': sys.modules['vit'].__file__, 'rows': out.to_dict(orient='records')}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-c", script, f"models:/{champion}@champion", *image_files],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(answer["vit"]).parts[-3:] == ("code", "vit", "__init__.py"), answer["vit"]
    _check(answer["rows"], reference)


def test_an_experiment_on_s3_logs_and_loads(s3_bucket, tracking, weights, digits, reference):
    experiment_id = mlflow.create_experiment(_unique("registry-s3"), artifact_location=f"{s3_bucket}/mlflow")
    with mlflow.start_run(experiment_id=experiment_id):
        info = log_vit_model(str(weights), CLASSES, image_size=IMAGE_SIZE)
    assert info.artifact_path.startswith(f"{s3_bucket}/mlflow/")
    model = mlflow.pyfunc.load_model(info.model_uri)
    _check(model.predict(pd.DataFrame({"image": digits["pngs"]})), reference)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _end_group(process: subprocess.Popen) -> None:
    """End a process started with ``start_new_session=True`` and everything it forked."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.mark.slow
def test_mlflow_models_serve_answers_base64_images(champion, digits, reference, tmp_path):
    port = _free_port()
    bin_dir = str(Path(sys.executable).parent)  # `mlflow models serve` runs `uvicorn` from PATH: as if activated
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [str(Path(bin_dir) / "mlflow"), "models", "serve", "-m", f"models:/{champion}@champion"]
        + ["--env-manager", "local", "--host", "127.0.0.1", "-p", str(port), "-w", "1"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,  # uvicorn workers: end the whole group below
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow models serve did not come up"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        images = [base64.b64encode(png).decode() for png in digits["pngs"]]
        body = {"dataframe_split": {"columns": ["image"], "data": [[i] for i in images]}, "params": {"top_k": 2}}
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            rows = json.load(response)["predictions"]
        _check(rows, reference)
        assert all(len(r["top_labels"]) == 2 for r in rows)
        bad = urllib.request.Request(
            request.full_url,
            data=json.dumps({"dataframe_split": {"columns": ["image"], "data": [["bm90IGFuIGltYWdl"]]}}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(bad, timeout=60)
        assert error.value.code == 400 and "row 0: cannot decode image" in error.value.read().decode()
        # A request must not make the server read its own files.
        path = tmp_path / "on-the-server.png"
        path.write_bytes(digits["pngs"][0])
        local = urllib.request.Request(
            request.full_url,
            data=json.dumps({"dataframe_split": {"columns": ["image"], "data": [[str(path)]]}}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(local, timeout=60)
        assert error.value.code == 400 and "a served model reads no files" in error.value.read().decode()
    finally:
        _end_group(server)
        log.close()


# --- command line --------------------------------------------------------------------------------------------------


def test_cli_lists_shows_promotes_and_predicts(tracking, champion, image_files, reference, log_run):
    runner = CliRunner()
    listed = runner.invoke(registry_cli.registry, ["list"])
    assert listed.exit_code == 0, listed.output
    assert any(line.split()[:3] == [champion, "1", "1"] for line in listed.stdout.splitlines())

    shown = runner.invoke(registry_cli.registry, ["show", champion])
    assert shown.exit_code == 0, shown.output
    assert "challenger,champion" in shown.stdout and "0.9000" in shown.stdout

    name = _unique("vit-cli")
    registry.register_model(log_run(0.3), name)
    promoted = runner.invoke(registry_cli.registry, ["promote", name, "--metric", "eval/top1"])
    assert promoted.exit_code == 0 and promoted.stdout.startswith("promoted version 1"), promoted.output
    registry.register_model(log_run(0.2), name)
    kept = runner.invoke(registry_cli.registry, ["promote", name])
    assert kept.exit_code == 0 and kept.stdout.startswith("kept version 1 as champion: not better"), kept.output

    table = runner.invoke(registry_cli.predict, [f"models:/{champion}@champion", *image_files[:4]])
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()  # the progress bar goes to stderr
    assert lines[0].split()[:5] == ["image", "label", "probability", "label2", "p2"]  # the default top 5
    assert lines[0].split()[-2:] == ["label5", "p5"]
    assert [line.split()[1] for line in lines[1:]] == [CLASSES[i] for i in reference.argmax(-1)[:4].tolist()]

    as_json = runner.invoke(
        registry_cli.predict, [f"models:/{champion}@champion", str(Path(image_files[0]).parent), "--json"]
    )
    assert as_json.exit_code == 0, as_json.output
    rows = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [r["image"] for r in rows] == image_files
    _check(rows, reference)


def test_cli_shows_a_version_and_says_when_it_has_no_model_card(tracking, champion):
    runner = CliRunner()
    shown = runner.invoke(registry_cli.registry, ["show", champion, "1"])
    assert shown.exit_code == 0, shown.output
    assert shown.stdout.startswith(f"{champion} version 1  (challenger, champion)") and "no model card" in shown.stdout
    as_json = runner.invoke(registry_cli.registry, ["show", champion, "1", "--json"])
    assert as_json.exit_code == 0 and json.loads(as_json.stdout)["model_card"] is None, as_json.output
    missing = runner.invoke(registry_cli.registry, ["show", champion, "9"])
    assert missing.exit_code == 2 and "has no version 9" in missing.stderr, missing.output


def test_a_local_store_shows_a_version_by_its_number(tmp_path, monkeypatch):
    """A sqlite store gives version numbers as ints, a server as strings: `show NAME 1` finds it either way."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = mlflow.MlflowClient(uri)
    client.create_registered_model("local-model")
    client.create_model_version("local-model", source=(tmp_path / "weights").as_uri())
    shown = CliRunner().invoke(registry_cli.registry, ["show", "local-model", "1", "--tracking-uri", uri])
    assert shown.exit_code == 0, shown.output
    assert shown.stdout.startswith("local-model version 1  (no alias)") and "no model card" in shown.stdout


def test_cli_user_errors_exit_2_without_a_traceback(tracking, champion, image_files):
    runner = CliRunner()
    cases = {
        "no registered model": ["promote", _unique("vit-nope")],
        "has no version 9": ["promote", champion, "9"],
        f"no registered model '{champion}x'": ["show", f"{champion}x"],
    }
    for message, args in cases.items():
        result = runner.invoke(registry_cli.registry, args)
        assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.output, result.output
    missing = runner.invoke(registry_cli.predict, [f"models:/{champion}@champion", "/no/such/image.png"])
    assert missing.exit_code == 2 and missing.stderr == "error: no such file: /no/such/image.png\n"
    unknown = runner.invoke(registry_cli.predict, [f"models:/{champion}@nobody", image_files[0]])
    assert unknown.exit_code == 2 and unknown.stderr.startswith("error:"), unknown.output
    try:
        down = runner.invoke(registry_cli.registry, ["list", "--tracking-uri", f"http://127.0.0.1:{_free_port()}"])
        assert down.exit_code == 2 and down.stderr.startswith("error: cannot reach the MLflow server"), down.output
    finally:
        mlflow.set_tracking_uri(tracking)


def test_the_prediction_table_shows_the_top_k_labels_of_each_image(tracking, champion, image_files, reference):
    runner = CliRunner()
    uri = f"models:/{champion}@champion"
    table = runner.invoke(registry_cli.predict, [uri, *image_files[:4], "--top-k", "3"])
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["image", "label", "probability", "label2", "p2", "label3", "p3"]
    best = reference[:4].topk(3, dim=-1)
    assert len(lines) == 5
    for line, path, ids, probabilities in zip(lines[1:], image_files, best.indices.tolist(), best.values.tolist()):
        cells = line.split()
        assert cells[0] == path and len(cells) == 7, line
        assert cells[1::2] == [CLASSES[i] for i in ids], line  # best first
        assert [float(p) for p in cells[2::2]] == pytest.approx(probabilities, abs=1e-4), line

    one = runner.invoke(registry_cli.predict, [uri, image_files[0], "--top-k", "1"])
    assert one.exit_code == 0 and one.stdout.splitlines()[0].split() == ["image", "label", "probability"]
    every = runner.invoke(registry_cli.predict, [uri, image_files[0], "--top-k", "50"])  # at most every class
    assert every.exit_code == 0 and every.stdout.splitlines()[0].split()[-2:] == ["label10", "p10"], every.output


# --- refusing models of other kinds ---------------------------------------------------------------------------------


class _WritesOnUnpickle:
    """Unpickling this writes a file: a pickle can call any function it names, so loading one runs its code."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (self.path, "unpickled"))


class _HostilePickledModel(mlflow.pyfunc.PythonModel):
    """A cloudpickled python_model that writes the sentinel when unpickled, loaded and used."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel
        self.payload = _WritesOnUnpickle(sentinel)

    def load_context(self, context):
        self.sentinel.write_text("load_context ran")

    def predict(self, context, model_input: list[str], params=None) -> list[str]:
        self.sentinel.write_text("predict ran")
        return model_input


@pytest.fixture
def look_alike_artifacts(weights, tmp_path) -> dict[str, str]:
    """Our model's artifacts, so that a hostile model looks like ours in everything but its code."""
    (tmp_path / "classes.json").write_text(json.dumps(CLASSES))
    (tmp_path / "preprocessing.json").write_text(json.dumps({"image_size": IMAGE_SIZE}))
    return {
        "weights": str(weights),
        "classes": str(tmp_path / "classes.json"),
        "preprocessing": str(tmp_path / "preprocessing.json"),
    }


def _register_run_model(experiment: str, log) -> str:
    """Log a model named "model" in a new run with ``log()``, register it as we register ours; its URI."""
    name = _unique("vit-hostile")
    with mlflow.start_run(experiment_id=experiment) as run:
        log()
    registry.register_model(run.info.run_id, name)
    return f"models:/{name}@challenger"


def test_predict_refuses_a_pickled_python_model_and_runs_none_of_it(
    tracking, experiment, champion, image_files, look_alike_artifacts, tmp_path
):
    sentinel = tmp_path / "sentinel"
    uri = _register_run_model(
        experiment,
        lambda: mlflow.pyfunc.log_model(
            name="model",
            python_model=_HostilePickledModel(sentinel),
            artifacts=look_alike_artifacts,
            metadata={"vit_platform": "1"},  # the marker proves nothing: anyone can write it
            pip_requirements=["mlflow"],
        ),
    )
    sentinel.unlink(missing_ok=True)
    message = (
        f"{uri} is not a model of this platform (its pyfunc is a pickled python_model: loading it would run "
        "arbitrary code); load it with mlflow directly if you trust it"
    )
    refused = CliRunner().invoke(registry_cli.predict, [uri, image_files[0]])
    assert refused.exit_code == 2, refused.output
    assert refused.stderr.splitlines()[-1] == f"error: {message}" and "Traceback" not in refused.output
    with pytest.raises(ForeignModelError) as error:
        predict_images(uri, [image_files[0]], progress=False)
    assert str(error.value) == message
    with pytest.raises(ForeignModelError, match="pickled python_model"):
        load_pyfunc(uri)
    assert not sentinel.exists()

    ours = CliRunner().invoke(registry_cli.predict, [f"models:/{champion}@champion", image_files[0]])
    assert ours.exit_code == 0, ours.output
    # The control: MLflow itself loads it, and that runs the pickle's code.
    mlflow.pyfunc.load_model(uri)
    assert sentinel.exists()


def test_predict_refuses_other_code_and_other_flavors(
    tracking, experiment, digits, image_files, look_alike_artifacts, tmp_path
):
    sentinel = tmp_path / "sentinel"
    code = tmp_path / "classifier.py"
    code.write_text(
        "import pathlib\n"
        "import mlflow\n"
        f"pathlib.Path({str(sentinel)!r}).write_text('foreign code ran')\n"
        "class Model(mlflow.pyfunc.PythonModel):\n"
        "    def predict(self, context, model_input: list[str], params=None) -> list[str]:\n"
        "        return model_input\n"
        "mlflow.models.set_model(Model())\n"
    )
    foreign = _register_run_model(
        experiment,
        lambda: mlflow.pyfunc.log_model(
            name="model",
            python_model=str(code),
            artifacts=look_alike_artifacts,
            metadata={"vit_platform": "1"},
            pip_requirements=["mlflow"],
        ),
    )
    assert sentinel.exists()  # MLflow ran the file when logging it: a model from code runs its code
    sentinel.unlink()
    with pytest.raises(ForeignModelError, match=r"its pyfunc is the code file 'classifier.py', not .* pyfunc_model.py"):
        predict_images(foreign, digits["pngs"][:1], progress=False)
    assert not sentinel.exists()

    from sklearn.linear_model import LogisticRegression

    flat = np.stack(digits["arrays"])[..., 0].reshape(NUM_IMAGES, -1)
    fitted = LogisticRegression(max_iter=50).fit(flat, digits["targets"])
    other = _register_run_model(experiment, lambda: mlflow.sklearn.log_model(fitted, name="model"))
    refused = CliRunner().invoke(registry_cli.predict, [other, image_files[0]])
    assert refused.exit_code == 2, refused.output
    assert "is not a model of this platform (its pyfunc is loaded by 'mlflow.sklearn'" in refused.stderr


def test_our_model_is_recognised_by_its_structure_and_loads(champion, digits, reference):
    from mlflow.models import Model

    uri = f"models:/{champion}@champion"
    mlmodel = Model.load(uri)
    assert mlmodel.metadata["vit_platform"] == "1"
    check_platform_model(uri, mlmodel)  # passes
    flavor = mlmodel.flavors["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model" and "python_model" not in flavor
    assert Path(flavor["model_code_path"]).name == "pyfunc_model.py"
    _check(load_pyfunc(uri).predict(pd.DataFrame({"image": digits["pngs"]})), reference)
