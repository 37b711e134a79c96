"""Pretraining and fine-tuning on a real local Ray (2 CPU workers): DDP, FSDP, resume, divergence, evaluation."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vit
from pipelines.common.config import ConfigError
from pipelines.evaluation.evaluate import EvaluateConfig, evaluate_model
from pipelines.training.config import load_train_config
from pipelines.training.driver import TrainingDivergedError, plan_training, run_training
from pipelines.training.loop import _Loop, _Window
from pipelines.training.weights import build_model, resolve_weights

# 12 steps of 16 images = 2 workers x 2 micro-batches of 4 (gradient accumulation), checkpoints every 4.
TINY = [
    "model=Mu/8",
    "data.image_size=32",
    "data.loader_workers=1",
    "data.shuffle_block=16",
    "batch_size=16",
    "micro_batch_size=4",
    "steps=12",
    "optim.warmup_steps=2",
    "optim.lr=1e-3",
    "log_every=4",
    "checkpoint_every=4",
    "model_args={dropout: 0.1}",  # exercises the RNG state across a resume
]


def pretrain_config(shards: str, storage: Path, name: str, *extra: str):
    return load_train_config(
        "pretrain", None, [*TINY, f"data.shards={shards}", f"storage_path={storage}", f"name={name}", *extra]
    )


def weights(path: str) -> dict[str, torch.Tensor]:
    return load_file(path)


# Credentials as a user gives them (the local filesystem ignores them): none may leave the process.
FAKE_KEY, FAKE_SECRET = "AKIAFAKEKEY0123456789", "wJalrXUtnFEMI-fake-secret-K7MDENG"
WITH_CREDENTIALS = [
    f"data.storage_options={{key: {FAKE_KEY}, secret: {FAKE_SECRET}}}",
    f"storage_options={{client_kwargs: {{aws_secret_access_key: {FAKE_SECRET}}}}}",
]


@pytest.fixture(scope="module")
def ddp_run(synth_shards, tmp_path_factory):
    storage = tmp_path_factory.mktemp("runs")
    cfg = pretrain_config(synth_shards, storage, "ddp", *WITH_CREDENTIALS)
    return run_training(cfg, log=lambda *_: None), storage


def test_pretraining_runs_the_paper_recipe_and_reports_health(ddp_run):
    result, _ = ddp_run
    assert result.steps == 12 and result.segments == [[0, 12]]
    assert [r["step"] for r in result.history] == [4, 8, 12]
    for key in ("train/loss", "train/lr", "train/grad_norm", "train/images_per_s", "train/data_wait"):
        assert all(key in r for r in result.history), key
    assert 0.0 <= result.history[-1]["train/data_wait"] <= 1.0
    assert 0.0 <= result.metrics["eval/top1"] <= 1.0 and result.metrics["eval/images"] > 0
    # multi-label shards: sigmoid loss with big_vision's -10 head bias, the representation layer on
    model = vit.load_model(result.model_path)
    assert model.config.representation_size == model.config.width
    assert model.config.head_bias_init == -10.0
    assert sorted(p.name for p in Path(result.run_dir).glob("checkpoint-*")) == [
        "checkpoint-00000004",
        "checkpoint-00000008",
        "checkpoint-00000012",
    ]
    state = json.loads((Path(result.checkpoint) / "trainer_state.json").read_text())
    assert state["step"] == 12 and state["samples_seen"] == 12 * 16 and state["batches_per_rank"] == 24


def test_pretraining_is_an_mlflow_run_with_every_step_lineage_and_artifacts(ddp_run, synth_shards):
    """The default local store (sqlite): params, rank 0's loss at every step, the shards as input, artifacts."""
    import mlflow

    result, _ = ddp_run
    client = mlflow.MlflowClient()
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "pretrain Mu/8 on shards"
    assert run.data.params["optim.lr"] == "0.001" and run.data.params["batch_size"] == "16"
    assert not any("storage_options" in k or k.startswith("tracking") for k in run.data.params)
    assert run.data.tags["vit.run_dir"] == result.run_dir and "Pretraining" in run.data.tags["mlflow.note.content"]
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in losses) == list(range(1, 13))  # every step, each once
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/images_per_s")] == [4, 8, 12]
    assert run.data.metrics["eval/top1"] == pytest.approx(result.metrics["eval/top1"])
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.source_type == "local" and synth_shards in dataset_input.dataset.source
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "training_curves.png", "checkpoint", "shards.json"} <= artifacts
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="checkpoint/model.safetensors")
    assert weights(local).keys() == weights(result.model_path).keys()


def test_credentials_reach_neither_the_run_folder_nor_mlflow(ddp_run, tmp_path):
    """The config travels with every checkpoint and MLflow run, its credentials never: one rule redacts them."""
    import mlflow
    import yaml

    result, _ = ddp_run
    leaked = [p for p in Path(result.run_dir).rglob("*") if p.is_file() and FAKE_SECRET.encode() in p.read_bytes()]
    assert leaked == []
    artifacts = Path(mlflow.artifacts.download_artifacts(run_id=result.mlflow_run_id, dst_path=str(tmp_path)))
    files = [p for p in artifacts.rglob("*") if p.is_file()]
    assert {"config.yaml", "trainer_state.json"} <= {p.name for p in files}
    for secret in (FAKE_KEY, FAKE_SECRET):
        assert [p for p in files if secret.encode() in p.read_bytes()] == [], secret
    config = yaml.safe_load((artifacts / "config.yaml").read_text())
    assert config["data"]["storage_options"] == {"key": "<redacted>", "secret": "<redacted>"}
    assert config["optim"]["lr"] == 1e-3  # the rest is all there
    state = json.loads((Path(result.checkpoint) / "trainer_state.json").read_text())
    assert state["config"]["storage_options"]["client_kwargs"] == {"aws_secret_access_key": "<redacted>"}


def test_a_halted_run_resumes_to_the_same_weights(ddp_run, synth_shards):
    uninterrupted, storage = ddp_run
    halted = run_training(pretrain_config(synth_shards, storage, "resumed", "halt_after_steps=6"), log=lambda *_: None)
    assert halted.steps == 6 and Path(halted.checkpoint).name == "checkpoint-00000006"
    resumed = run_training(pretrain_config(synth_shards, storage, "resumed"), log=lambda *_: None)
    assert resumed.steps == 12 and resumed.segments == [[0, 6], [6, 12]]
    assert [r["step"] for r in resumed.history] == [4, 6, 8, 12]
    assert resumed.mlflow_run_id == halted.mlflow_run_id  # one MLflow run across the attempts, no duplicates
    import mlflow

    losses = mlflow.MlflowClient().get_metric_history(resumed.mlflow_run_id, "train/loss")
    assert sorted(m.step for m in losses) == list(range(1, 13))
    a, b = weights(uninterrupted.model_path), weights(resumed.model_path)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_fsdp_trains_the_same_model_as_ddp(ddp_run, synth_shards):
    ddp, storage = ddp_run
    fsdp = run_training(pretrain_config(synth_shards, storage, "fsdp", "scale.strategy=fsdp"), log=lambda *_: None)
    assert fsdp.steps == 12
    shards = list((Path(fsdp.checkpoint) / "state").glob("*.distcp"))
    assert len(shards) == 2  # each rank wrote its own shard of the state
    a, b = weights(ddp.model_path), weights(fsdp.model_path)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=2e-5, rtol=1e-4, msg=key)


def test_finetuning_from_a_run_to_s3_with_polyak_averaging(ddp_run, digits_shards, s3_bucket, s3_storage_options):
    pretrained, _ = ddp_run
    cfg = load_train_config(
        "finetune",
        None,
        [
            f"init_from={pretrained.run_dir}",
            f"data.shards={digits_shards}",
            "data.image_size=40",  # 5x5 patches instead of pretraining's 4x4: E_pos is resampled
            "data.flip=false",
            "data.loader_workers=0",
            "batch_size=32",
            "steps=8",
            "optim.warmup_steps=2",
            "checkpoint_every=4",
            "log_every=4",
            "ema_decay=0.9",
            f"storage_path={s3_bucket}/runs",
        ],
    )
    cfg.storage_options = s3_storage_options
    result = run_training(cfg, log=lambda *_: None)
    assert result.run_dir == f"{s3_bucket}/runs/{result.name}"
    assert result.checkpoint.startswith("s3://") and result.steps == 8
    assert "eval/top1" in result.metrics
    metrics = evaluate_model(
        EvaluateConfig(
            model=result.run_dir,
            shards=digits_shards,
            shots=[1, 5],
            loader_workers=0,
            storage_options=s3_storage_options,
        ),
        log=lambda *_: None,
    )
    # the evaluator scores the same averaged weights on the same split as the training loop did
    assert metrics["eval/top1"] == pytest.approx(result.metrics["eval/top1"])
    assert set(metrics) >= {"fewshot/1shot", "fewshot/5shot"}


def test_divergence_stops_with_a_clear_error_and_keeps_the_last_checkpoint(synth_shards, tmp_path, ray_local):
    cfg = pretrain_config(
        synth_shards, tmp_path, "diverges", "optim.lr=1e30", "optim.grad_clip_norm=null", "checkpoint_every=1"
    )
    with pytest.raises(TrainingDivergedError, match=r"non-finite .* at step 2; .*checkpoint-00000001"):
        run_training(cfg, log=lambda *_: None)
    assert [p.name for p in (tmp_path / "diverges").glob("checkpoint-*")] == ["checkpoint-00000001"]


# --------------------------------------------------------------------------------------------- without Ray


def _loop(shards: str, tmp_path: Path, *extra: str) -> _Loop:
    cfg = pretrain_config(shards, tmp_path, "local", "model_args={dropout: 0.0}", "scale.num_workers=1", *extra)
    plan = plan_training(cfg)
    return _Loop(cfg, plan, rank=0, world=1, device=torch.device("cpu"))


def test_gradient_accumulation_equals_one_big_batch(synth_shards, tmp_path):
    torch.manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    results = []
    for micro in (16, 4):
        loop = _loop(synth_shards, tmp_path, f"micro_batch_size={micro}")
        targets = (torch.rand(16, loop.plan.num_classes, generator=torch.Generator().manual_seed(1)) < 0.3).float()
        assert loop.plan.accum_steps == 16 // micro
        batches = iter([(images[i : i + micro], targets[i : i + micro], 0) for i in range(0, 16, micro)])
        metrics = loop._train_step(batches, lr=1e-3, window=_Window())
        results.append((metrics["train/grad_norm"], [p.detach().clone() for p in loop.model.parameters()]))
    (norm_a, params_a), (norm_b, params_b) = results
    assert norm_a == pytest.approx(norm_b, rel=1e-5)
    for a, b in zip(params_a, params_b):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_compiled_blocks_train_like_eager_and_checkpoint_plain_weights(synth_shards, tmp_path, monkeypatch):
    """scale.compile=True through a worker's real loop (steps, evaluation, checkpoint), Ray's part replaced by a
    local copy: the same per-step losses as eager, and a checkpoint that loads into a plain model and resumes."""
    import shutil

    import ray.train
    from torch._dynamo.utils import counters

    def report(metrics, *, checkpoint, checkpoint_dir_name):  # what Ray's upload to storage amounts to here
        shutil.copytree(checkpoint.path, Path(run_dir) / checkpoint_dir_name)

    monkeypatch.setattr(ray.train, "report", report)
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    settings = ["data.loader_workers=0", "batch_size=8", "micro_batch_size=4", "steps=4", "checkpoint_every=4"]
    torch._dynamo.reset()
    counters.clear()
    runs = {}
    for use_compile in (False, True):
        loop = _loop(synth_shards, tmp_path / str(use_compile), *settings, f"scale.compile={use_compile}")
        run_dir = loop.plan.run_dir
        outcome = loop.run()
        assert outcome["status"] == "finished" and "eval/top1" in outcome["metrics"]
        runs[use_compile] = loop
    eager, compiled = runs[False], runs[True]
    assert all(block._compiled_call_impl is not None for block in compiled.model.blocks)
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]  # whole blocks, no fallback
    for (step, *values), (step_c, *values_c) in zip(eager.step_values, compiled.step_values, strict=True):
        assert step == step_c and values_c == pytest.approx(values, rel=1e-4), step
    # the checkpoint holds plain names (no _orig_mod.): vit.load_model and an eager loop's resume both take it
    checkpoint = Path(compiled.plan.run_dir) / "checkpoint-00000004"
    plain = vit.load_model(checkpoint / "model.safetensors")
    trained = compiled.model.state_dict()
    assert plain.state_dict().keys() == trained.keys() == eager.model.state_dict().keys()
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(value, trained[key], atol=0, rtol=0, msg=key)
        torch.testing.assert_close(value, eager.model.state_dict()[key], atol=1e-5, rtol=1e-4, msg=key)
    resumed = _loop(synth_shards, tmp_path / "resumed", *settings)
    resumed._restore(checkpoint)
    assert resumed.step == 4
    for key, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, trained[key], atol=0, rtol=0, msg=key)


def test_finetuning_starts_from_a_zero_head_and_resampled_position_embeddings(ddp_run, digits_shards):
    pretrained, _ = ddp_run
    source = vit.load_model(pretrained.model_path)
    cfg = load_train_config("finetune", None, [f"init_from={pretrained.run_dir}", "data.image_size=48"])
    model = build_model(cfg, num_classes=10, multi_label=False)
    assert model.config.num_classes == 10 and model.config.img_size == 48 and model.config.representation_size is None
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    expected = vit.resample_pos_embed(source.pos_embed, (6, 6), old_grid=(4, 4), num_prefix_tokens=1)
    torch.testing.assert_close(model.pos_embed, expected)
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert resolve_weights(pretrained.run_dir) == str(
        Path(pretrained.run_dir) / "checkpoint-00000012" / "model.safetensors"
    )


def test_configs_are_checked_before_anything_runs(synth_shards, tmp_path):
    def plan(*extra):
        return plan_training(pretrain_config(synth_shards, tmp_path, "x", *extra))

    assert plan().accum_steps == 2 and plan().micro_batch == 4
    with pytest.raises(ConfigError, match="batch_size: 15 does not split evenly over 2 workers"):
        plan("batch_size=15")
    with pytest.raises(ConfigError, match="micro_batch_size: 3 does not divide"):
        plan("micro_batch_size=3")
    with pytest.raises(ConfigError, match="data.eval_split: the shards have no split 'holdout'"):
        plan("data.eval_split=holdout")
    with pytest.raises(ConfigError, match="optim.lr: expected a number"):
        plan("optim.lr=fast")
    with pytest.raises(ConfigError, match="scale.strategy: 'zero' is not one of"):
        plan("scale.strategy=zero")
    with pytest.raises(ConfigError, match="init_from: fine-tuning needs"):
        plan_training(load_train_config("finetune", None, [f"data.shards={synth_shards}"]))
    # a partial section keeps the recipe's other values (the paper's Adam betas and linear decay)
    cfg = load_train_config("pretrain", None, ["optim.lr=3e-4"])
    assert (cfg.optim.lr, cfg.optim.schedule, cfg.optim.warmup_steps) == (3e-4, "linear", 10_000)
    finetune = load_train_config("finetune", None, [])
    assert (finetune.optim.name, finetune.batch_size, finetune.data.image_size) == ("sgd", 512, 384)
    assert dataclasses.asdict(finetune.optim)["weight_decay"] == 0.0


def test_a_damaged_shard_stops_training_once_with_one_error_line_naming_it(synth_shards, tmp_path):
    """A data error is deterministic: the same bytes fail again. No worker-group restarts (max_failures is for
    machines), no tracebacks: one `error:` line that names the shard."""
    import shutil
    import subprocess
    import sys

    shards = tmp_path / "shards"
    shutil.copytree(synth_shards, shards)
    damaged = shards / "train-000003.tar"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])  # cut short, as a failed copy leaves it
    vit_command = str(Path(sys.executable).parent / "vit")
    args = [a for a in TINY if not a.startswith("steps=")]
    result = subprocess.run(
        [vit_command, "pretrain", *args, "steps=40", "max_failures=3", "tracking.enabled=false",
         f"data.shards={shards}", f"storage_path={tmp_path / 'runs'}", "name=damaged"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "train-000003.tar" in errors[0] and "not retried" in errors[0], result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "restart" not in (result.stdout + result.stderr).lower()
    # Rank 0's progress lines reached the terminal, Ray's own messages did not.
    assert re.search(r"^step 4\s+epoch [\d.]+\s+loss", result.stdout, re.MULTILINE), result.stdout
    assert "RayTrainWorker" not in result.stdout + result.stderr and "pid=" not in result.stdout + result.stderr
