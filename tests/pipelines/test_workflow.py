"""`vit run`, as a user runs it (the console script in a subprocess), tracked on a real `mlflow server`:
the whole pipeline at toy size, its cache, --from/--only, and a killed run that resumes."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

VIT = shutil.which("vit", path=str(Path(sys.executable).parent)) or "vit"

TINY = [
    "pretrain_data.synth.images=300",
    "pretrain.steps=6",
    "pretrain.optim.warmup_steps=2",
    "pretrain.checkpoint_every=3",
    "finetune.steps=6",
    "finetune.optim.warmup_steps=2",
    "evaluate.shots=[1,5]",
]


def vit_run(workdir: Path, *args: str, experiment: str, model: str) -> subprocess.CompletedProcess:
    settings = [*TINY, f"workdir={workdir}", f"tracking.experiment={experiment}", f"register.model_name={model}"]
    return subprocess.run([VIT, "run", *settings, *args], capture_output=True, text=True, timeout=600)


def child_runs(client, parent_id: str) -> dict[str, list]:
    experiment = client.get_run(parent_id).info.experiment_id
    runs = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    by_step: dict[str, list] = {}
    for run in runs:
        by_step.setdefault(run.data.tags["vit.step"], []).append(run)
    return by_step


@pytest.fixture(scope="module")
def pipeline(mlflow_server, tmp_path_factory):
    """One toy pipeline run, tracked on the session's server: (workdir, stdout, parent run id, stderr)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)  # for this module's subprocesses and clients
        workdir = tmp_path_factory.mktemp("pipeline") / "work"
        result = vit_run(workdir, experiment="wf", model="wf-model")
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        parent = re.search(r"pipeline run (\w+)", result.stdout)[1]
        yield workdir, result.stdout, parent, result.stderr


def test_the_pipeline_runs_every_step_and_tells_the_story_in_mlflow(pipeline):
    import mlflow

    workdir, stdout, parent_id, stderr = pipeline
    top1 = float(re.search(r"held-out top-1\s+([\d.]+)%", stdout)[1])
    # Training progress reaches the terminal (rank 0's lines, indented under their step), Ray's chatter does not.
    assert re.search(r"^\s+step 6\s+epoch [\d.]+\s+loss", stdout, re.MULTILINE), stdout
    assert "RayTrainWorker" not in stdout + stderr and "TrainController" not in stdout + stderr
    assert "streaming_executor" not in stderr and "Traceback" not in stderr  # nor Ray Data's per-dataset plans
    assert 0.0 <= top1 <= 100.0 and "models:/wf-model/1" in stdout and "mlflow" in stdout.lower()
    # the pretraining corpus is de-duplicated against the downstream test images (paper, section 4.1)
    assert f"without near-duplicates of the evaluation images in {workdir}/corpus/digits/test" in stdout
    client = mlflow.MlflowClient()
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "pipeline demo"
    assert {r.info.run_name for r in client.search_runs([parent.info.experiment_id])} >= {
        "pretrain Mu/8 on synth", "finetune from checkpoint-00000006 on digits"}  # fmt: skip
    steps = child_runs(client, parent_id)
    assert sorted(steps) == sorted(["corpus", "shard", "pretrain", "finetune", "evaluate", "register"])
    assert all(len(runs) == 1 and runs[0].info.status == "FINISHED" for runs in steps.values())
    pretrain, finetune, evaluate = steps["pretrain"][0], steps["finetune"][0], steps["evaluate"][0]
    assert finetune.data.tags["vit.pretrain_run_id"] == pretrain.info.run_id  # lineage: fine-tune -> pretrain
    assert evaluate.data.tags["vit.finetune_run_id"] == finetune.info.run_id
    assert finetune.inputs.dataset_inputs[0].dataset.digest == finetune.data.tags["vit.dataset_fingerprint"][:36]
    assert steps["shard"][0].data.metrics["finetune/written"] == 1797
    confusion = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=evaluate.info.run_id, artifact_path="confusion_matrix.json")).read_text())  # fmt: skip
    assert len(confusion["classes"]) == 10 and sum(map(sum, confusion["counts"])) == 360
    assert evaluate.data.metrics["eval/top1"] == pytest.approx(top1 / 100, abs=1e-4)
    # what the pretraining transferred: its frozen features and the same ViT untrained, probed beside the model
    assert {f"{m}/fewshot/{k}shot" for m in ("pretrained", "random_init") for k in (1, 5)} <= set(evaluate.data.metrics)
    assert re.search(r"^  pretrained\s+1shot [\d.]+%  5shot [\d.]+%", stdout, re.MULTILINE), stdout
    assert re.search(r"^  random init\s+1shot [\d.]+%", stdout, re.MULTILINE), stdout
    version = client.get_model_version_by_alias("wf-model", "champion")
    assert version.version == "1" and version.run_id == finetune.info.run_id
    assert client.get_model_version_by_alias("wf-model", "challenger").version == "1"


def test_the_registered_version_carries_its_model_card(pipeline):
    import mlflow

    from pipelines.registry.model_card import SECTIONS

    _, _, parent_id, _ = pipeline
    client = mlflow.MlflowClient()
    version = client.get_model_version("wf-model", "1")
    card = Path(mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path="model_card.md")).read_text()
    assert re.findall(r"^## (.+)$", card, re.MULTILINE) == list(SECTIONS)
    summary = card.split("\n\n")[1]  # the paragraph under the title
    assert version.description.startswith(summary) and summary.startswith("ViT-Mu/8 (")
    steps = {step: runs[0].info.run_id for step, runs in child_runs(client, parent_id).items()}
    finetune = client.get_run(steps["finetune"])
    assert version.run_id == steps["finetune"] and f"- pipeline run: `{parent_id}`" in card
    assert f"`{steps['pretrain']}`" in card and f"`{steps['evaluate']}`" in card
    assert f"`{finetune.data.tags['vit.dataset_fingerprint']}`" in card  # the shards it was fine-tuned on
    top1 = finetune.data.metrics["eval/top1"]
    assert re.search(rf"\| eval/top1 \| {top1:.2%} \| \[[\d.]+%, [\d.]+%\] \|", card), card
    assert re.search(r"^\| 5 \| [\d.]+% \|", card, re.MULTILINE)  # evaluate.shots=[1,5]
    assert re.search(r"^\| 5 \| [\d.]+% \| [\d.]+% \| [+-][\d.]+% \|", card, re.MULTILINE)  # pretrained vs untrained
    assert "| finetune | 6 steps | 128 | sgd |" in card and "only 360 images" in card

    shown = subprocess.run([VIT, "registry", "show", "wf-model", "1"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert shown.stdout.startswith("wf-model version 1  (challenger, champion)") and card.strip() in shown.stdout


def test_the_registered_version_carries_what_it_learned_on_its_held_out_images(pipeline, tmp_path):
    """The register step's `vit inspect` report sits beside the card on the version's run, drawn on four of the
    test digits the version was evaluated on; `vit inspect models:/NAME/VERSION` finds the same images."""
    import mlflow
    from click.testing import CliRunner

    from pipelines.cli import main
    from pipelines.evaluation.inspect import FIGURES

    workdir, stdout, _, _ = pipeline
    client = mlflow.MlflowClient()
    version = client.get_model_version("wf-model", "1")
    listed = sorted(Path(f.path).name for f in client.list_artifacts(version.run_id, "inspection"))
    assert listed == sorted([*FIGURES.values(), "inspection.json", "inspection.html"])
    report = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=version.run_id, artifact_path="inspection/inspection.json")).read_text())  # fmt: skip
    assert report["model"]["source"] == "models:/wf-model/1" and report["model"]["variant"] == "Mu/8"
    images = report["images"]
    assert images["origin"] == "evaluation" and len(images["names"]) == 4
    evaluated = images["evaluation"]
    assert (evaluated["shards"], evaluated["split"]) == (str(workdir / "shards" / "digits"), "test")
    assert len({name.rsplit(" ", 1)[1] for name in images["names"]}) == 4  # "KEY (DIGIT)": four different digits
    assert len(report["attention_distance"]["distances"]) == 4  # a distance per block of Mu's four
    card = Path(mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path="model_card.md")).read_text()
    assert "`inspection/inspection.html` (one self-contained page)" in card and "`inspection/filters.png`" in card
    assert "inspection of 4 test images: inspection/inspection.html" in stdout

    again = CliRunner().invoke(main, ["inspect", "models:/wf-model/1", "--num-images", "2", "--out", str(tmp_path)])
    assert again.exit_code == 0, again.output
    found = json.loads((tmp_path / "inspection.json").read_text())["images"]
    assert found["names"] == images["names"][:2] and found["evaluation"]["split"] == "test"
    assert f"vit.eval_shards and vit.eval_split of MLflow run {version.run_id}" in found["evaluation"]["recorded_in"]


def test_the_registered_champion_predicts_in_a_fresh_process(pipeline):
    workdir, _, _, _ = pipeline
    images = sorted((workdir / "corpus" / "digits" / "test").glob("*/*.png"))[:40:8]
    result = subprocess.run(
        [VIT, "predict", "models:/wf-model@champion", *map(str, images), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == len(images)
    assert all(row["label"] in [str(d) for d in range(10)] and 0.0 <= row["probability"] <= 1.0 for row in rows)


def test_a_rerun_skips_finished_steps_and_from_and_only_rerun_on_purpose(pipeline):
    import mlflow

    workdir, _, parent_id, _ = pipeline
    client = mlflow.MlflowClient()
    experiment = client.get_run(parent_id).info.experiment_id
    before = len(client.search_runs([experiment]))

    again = vit_run(workdir, experiment="wf", model="wf-model")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("skipped") == 6 and "nothing to do" in again.stdout
    assert len(client.search_runs([experiment])) == before  # same settings: the same parent, no new runs

    rerun = vit_run(workdir, "--from", "evaluate", experiment="wf", model="wf-model")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert rerun.stdout.count("skipped") == 4 and "evaluate" in rerun.stdout.split("time")[-1]
    assert [v.version for v in client.search_model_versions("name='wf-model'")] == ["1"]  # registering is idempotent
    first = client.get_model_version("wf-model", "1").run_id
    assert len(client.list_artifacts(first, "inspection")) == 6  # the register step again: its report replaced

    only = vit_run(workdir, "--only", "finetune", experiment="wf", model="wf-model")
    assert only.returncode == 0, only.stderr[-3000:]
    runs = sorted(p.name for p in (workdir / "runs").iterdir() if p.name.startswith("finetune-"))
    assert len(runs) == 2  # re-run on purpose: a fresh run folder, not a resume of the finished one
    follow = vit_run(workdir, experiment="wf", model="wf-model")  # evaluate and register see the new model
    assert follow.returncode == 0, follow.stderr[-3000:]
    assert follow.stdout.count("skipped") == 4
    versions = {v.version: v for v in client.search_model_versions("name='wf-model'")}
    assert sorted(versions) == ["1", "2"]
    assert client.get_model_version_by_alias("wf-model", "challenger").version == "2"
    champion = client.get_model_version_by_alias("wf-model", "champion").version
    # promoted only on evidence: both scored on the same images, the gain's lower bound above min_improvement
    tags = versions["2"].tags
    assert tags["promotion.decision"] == ("promoted" if champion == "2" else "not promoted")
    assert tags["promotion.champion_version"] == "1" and int(tags["promotion.images"]) == 360
    gain, lower = float(tags["promotion.gain"]), float(tags["promotion.lower"])
    top1 = {v: float(versions[v].tags["metric.eval/top1"]) for v in versions}
    assert gain == pytest.approx(top1["2"] - top1["1"], abs=1e-9)  # the champion re-scored as it was scored
    assert lower <= gain and (champion == "2") == (lower > 0.0)
    assert "paired bootstrap" in tags["promotion.reason"] and "Promotion: " in versions["2"].description
    assert versions["2"].description.startswith("ViT-Mu/8 (")  # the card's summary first, the decision after
    shown = subprocess.run([VIT, "registry", "show", "wf-model"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and f"version 2: {tags['promotion.decision']}: " in shown.stdout, shown.stdout


def test_a_killed_pipeline_resumes_where_it_stopped(mlflow_uri, tmp_path):
    """SIGKILL the whole `vit run` (driver, its Ray and workers) after pretraining's second checkpoint; the
    same command resumes pretraining from that checkpoint, in the same MLflow run, with no step logged twice."""
    import mlflow

    workdir = tmp_path / "work"
    longer = ["pretrain.steps=30", "pretrain.checkpoint_every=5", "pretrain.log_every=5", "finetune.steps=4"]
    settings = [*TINY, *longer, f"workdir={workdir}", "tracking.experiment=wf-kill", "register.model_name=wf-kill"]
    process = subprocess.Popen(
        [VIT, "run", *settings], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 300
    try:
        while not list((workdir / "runs").glob("pretrain-*/checkpoint-00000010/COMMITTED")):
            assert process.poll() is None, "the pipeline ended before it could be killed"
            assert time.monotonic() < deadline, "no second checkpoint within 300 s"
            time.sleep(0.2)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    state = json.loads((workdir / "pipeline" / "pretrain.json").read_text())
    assert state["status"] == "running"  # the process died: no one could write "failed"

    resumed = subprocess.run([VIT, "run", *settings], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "pretrain: resuming" in resumed.stdout and resumed.stdout.count("skipped") == 2  # corpus, shard
    (run_dir,) = (workdir / "runs").glob("pretrain-*")
    final = json.loads((run_dir / "checkpoint-00000030" / "trainer_state.json").read_text())
    (first, second) = final["segments"]  # [first, last) steps of each attempt
    assert first[0] == 0 and second[1] == 30 and second[0] % 5 == 0 and 10 <= second[0] <= first[1]
    client = mlflow.MlflowClient()
    run = client.search_runs(
        [client.get_experiment_by_name("wf-kill").experiment_id], filter_string="tags.`vit.step` = 'pretrain'"
    )
    assert len(run) == 1 and run[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run[0].info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, 31))  # every step once: the resumed attempt skips what was logged


def test_the_pipeline_runs_with_its_workdir_on_s3(s3_bucket, s3_storage_options, tmp_path):
    """Corpora, shards, checkpoints and the steps' state all on S3 (moto), through the same code; the
    finished pipeline is found again there and skipped."""
    import s3fs

    from pipelines.common.config import load_config
    from pipelines.orchestration.config import LOCAL_CONFIG, PipelineConfig
    from pipelines.orchestration.workflow import run_pipeline

    workdir = f"{s3_bucket}/work"
    overrides = [*TINY, "pretrain_data.synth.images=200", f"workdir={workdir}", "tracking.experiment=wf-s3"]
    overrides += ["register.model_name=wf-s3", "pretrain.data.loader_workers=0", "finetune.data.loader_workers=0"]
    cfg = load_config(PipelineConfig, LOCAL_CONFIG, overrides)
    cfg.storage_options = s3_storage_options
    messages: list[str] = []
    result = run_pipeline(cfg, log=messages.append)
    assert result.ran == ["corpus", "shard", "pretrain", "finetune", "evaluate", "register"], messages
    fs = s3fs.S3FileSystem(**s3_storage_options)
    fs.invalidate_cache()
    checkpoint = result.outputs["finetune"]["checkpoint"]
    assert checkpoint.startswith(workdir) and fs.exists(checkpoint.removeprefix("s3://") + "/model.safetensors")
    assert fs.exists(f"{workdir.removeprefix('s3://')}/pipeline/register.json")
    assert result.outputs["register"]["version"] == "1"
    again = run_pipeline(cfg, log=messages.append)
    assert again.ran == [] and len(again.cached) == 6


def test_a_failed_step_names_the_error_a_task_raised_and_the_file_it_could_not_find():
    import errno

    import ray.exceptions

    from pipelines.orchestration.workflow import _failure

    missing = FileNotFoundError(errno.ENOENT, "No such file or directory", "s3://bucket/corpus/labels.parquet")
    assert _failure(missing) == (
        "FileNotFoundError: [Errno 2] No such file or directory: 's3://bucket/corpus/labels.parquet'"
    )
    bare = FileNotFoundError(errno.ENOENT, "No such file or directory")
    bare.filename2 = None
    assert _failure(bare) == "FileNotFoundError: [Errno 2] No such file or directory"
    wrapped = ray.exceptions.RayTaskError("write_shard", "Traceback (most recent call last): ...", missing)
    wrapped = wrapped.as_instanceof_cause()  # what ray.get raises: a RayTaskError(FileNotFoundError)
    assert _failure(wrapped) == _failure(missing)
    assert "Traceback" not in _failure(wrapped)
