"""The pipeline and its stages: ``vit run`` (the whole cached pipeline), ``vit pretrain``, ``vit finetune`` and
``vit evaluate`` (one stage each, on Ray), and ``vit show-config`` (the settings any of them would use).

They share one way of taking settings, a config plus dotted OVERRIDES checked before any work starts, which is why
they live together.
"""

from __future__ import annotations

import time

import click

from pipelines.cli.errors import fail
from pipelines.common.config import ConfigError, dump_config, load_config


@click.command("run")
@click.argument("config", required=False)
@click.argument("overrides", nargs=-1)
@click.option("--from", "start_from", default=None, help="Re-run this step and every later one, even if done.")
@click.option("--only", default=None, help="Re-run only this step, on the others' cached outputs.")
@click.option(
    "--break-lock",
    is_flag=True,
    help="Take the workdir from the run holding it (only when you know that run is gone: a dead one's lease "
    "expires by itself).",
)
def run_command(
    config: str | None, overrides: tuple[str, ...], start_from: str | None, only: str | None, break_lock: bool
) -> None:
    """The whole pipeline: corpus -> shard -> pretrain -> finetune -> evaluate -> register.

    CONFIG is a YAML file, or the name of one shipped with the package (``local``, ``jft-b16``); default: the
    embedded local demo (``local``: a tiny ViT pretrained on a synthetic corpus and fine-tuned on real digits, on a
    local Ray, tracked in ./mlflow.db). ``env:NAME`` reads the YAML from an environment variable (how `vit submit`
    hands it to a Ray Job). A CONFIG with ``=`` in it is taken as the first override. Steps already done with the
    same settings are skipped.

    OVERRIDES are dotted settings, e.g. ``pretrain.steps=600 finetune.optim.lr=0.05 workdir=/tmp/demo``.
    """
    from pipelines.orchestration.config import load_pipeline_config
    from pipelines.orchestration.lease import LeaseLostError, WorkdirBusyError
    from pipelines.orchestration.workflow import StepFailedError, run_pipeline
    from pipelines.tracking.tracking import TrackingError

    if config is not None and "=" in config and not config.startswith("env:"):
        config, overrides = None, (config, *overrides)
    try:
        cfg = load_pipeline_config(config, overrides)
    except ConfigError as err:
        fail(str(err))
    started = time.perf_counter()
    try:
        result = run_pipeline(cfg, start_from=start_from, only=only, break_lock=break_lock, log=click.echo)
    except (ConfigError, TrackingError, WorkdirBusyError) as err:
        fail(str(err))
    except (StepFailedError, LeaseLostError) as err:  # exit 1, not 2: the settings were fine; the run stopped
        fail(f"{err}\nThe step's state is kept: run the same command again to resume it.", exit_code=1)
    out = result.outputs
    metrics = out.get("evaluate", {}).get("metrics", {})
    click.echo("")
    if "eval/top1" in metrics:
        click.echo(f"held-out top-1     {metrics['eval/top1']:.2%}  ({int(metrics.get('eval/images', 0))} test images)")
        click.echo(f"held-out top-5     {metrics['eval/top5']:.2%}")
    if _shots(metrics):
        click.echo(f"few-shot linear    {_shots(metrics)}  (frozen features)")
    # What the pretraining transferred (the evaluate step): its frozen features against the same ViT never trained.
    for prefix, label, what in (
        ("pretrained/", "  pretrained", "the pretrained model, before fine-tuning"),
        ("random_init/", "  random init", "the same ViT, never trained"),
    ):
        if _shots(metrics, prefix):
            click.echo(f"{label:<19}{_shots(metrics, prefix)}  ({what})")
    spent = ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items())
    cached = f"; cached: {', '.join(result.cached)}" if result.cached else ""
    click.echo(f"time               {time.perf_counter() - started:.0f} s  ({spent or 'nothing to do'}{cached})")
    click.echo(f"workdir            {result.workdir}  (corpus/, shards/, runs/, pipeline/ step states)")
    for step in ("pretrain", "finetune"):
        if out.get(step, {}).get("checkpoint"):
            click.echo(f"{step + ' weights':<19}{out[step]['checkpoint']}/model.safetensors")
    reg = out.get("register", {})
    if reg.get("model_name"):
        alias = "champion" if reg.get("promoted") else "challenger"
        click.echo(f"registered model   models:/{reg['model_name']}/{reg['version']}  (alias @{alias})")
        click.echo(f"predict            vit predict models:/{reg['model_name']}@champion IMAGE...")
    if result.tracking_uri:
        click.echo(f"MLflow             {result.tracking_uri}  (pipeline run {result.mlflow_run_id})")
        if result.tracking_uri.startswith("http"):
            click.echo(f"browse             open {result.tracking_uri}")
        else:
            click.echo(f"browse             mlflow ui --backend-store-uri {result.tracking_uri} --port 5000")
            click.echo("                   then open http://127.0.0.1:5000")


def _train_command(recipe: str, config_path: str | None, overrides: tuple[str, ...], address: str | None) -> None:
    from pipelines.training.config import load_train_config
    from pipelines.training.driver import TrainingDataError, TrainingDivergedError, plan_training, run_training

    try:
        cfg = load_train_config(recipe, config_path, overrides)
        plan_training(cfg)  # checks the config against the shards before any cluster starts
    except (ConfigError, FileNotFoundError, ValueError) as err:
        fail(str(err))
    from pipelines.common.ray import init_ray
    from pipelines.tracking.tracking import TrackingError

    init_ray(address)
    try:
        result = run_training(cfg, log=click.echo)
    except (TrainingDivergedError, TrainingDataError, TrackingError) as err:
        fail(str(err))
    click.echo("")
    for key, value in result.metrics.items():
        if key.startswith("eval/") or key == "train/loss":
            click.echo(f"{key:<22} {value:.4g}")
    click.echo(f"{'steps':<22} {result.steps}")
    click.echo(f"{'checkpoint':<22} {result.checkpoint}")
    click.echo(f"{'weights':<22} {result.model_path}  (vit.load_model loads them)")
    if result.mlflow_run_id:
        click.echo(f"{'MLflow run':<22} {result.mlflow_run_id}")


_TRAIN_OPTIONS = [
    click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), help="YAML config file."),
    click.option("--address", default=None, help="Ray cluster to run on (default: a local Ray)."),
    click.argument("overrides", nargs=-1),
]


def _train_options(fn):
    for option in reversed(_TRAIN_OPTIONS):
        fn = option(fn)
    return fn


@click.command("pretrain")
@_train_options
def pretrain(config_path: str | None, address: str | None, overrides: tuple[str, ...]) -> None:
    """Pretrain a ViT on shards with the paper's recipe (Table 3) on Ray Train.

    OVERRIDES are dotted settings, e.g. ``data.shards=s3://bucket/jft model=B/16 scale.strategy=fsdp``.
    Running the same ``name`` again resumes from its latest checkpoint.
    """
    _train_command("pretrain", config_path, overrides, address)


@click.command("finetune")
@_train_options
def finetune(config_path: str | None, address: str | None, overrides: tuple[str, ...]) -> None:
    """Fine-tune pretrained weights on a downstream set with the paper's recipe (Table 4).

    ``init_from`` names the weights: a pretraining run folder, a checkpoint folder, or a file.
    """
    _train_command("finetune", config_path, overrides, address)


def _shots(metrics: dict[str, float], prefix: str = "") -> str:
    """``1shot 91.1%  5shot 96.9%``: the ``{prefix}fewshot/<k>shot`` metrics on one line."""
    return "  ".join(f"{k.rsplit('/', 1)[1]} {v:.1%}" for k, v in metrics.items() if k.startswith(prefix + "fewshot/"))


@click.command("evaluate")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), help="YAML config file.")
@click.argument("overrides", nargs=-1)
def evaluate(config_path: str | None, overrides: tuple[str, ...]) -> None:
    """Top-1/top-5 on a held-out split and few-shot linear accuracy (1/5/10/25 shots) of a trained model.

    OVERRIDES, e.g. ``model=runs/finetune-digits shards=shards/digits split=test``.
    """
    from pipelines.evaluation.evaluate import EvaluateConfig, run_evaluation
    from pipelines.tracking.tracking import TrackingError

    try:
        cfg = load_config(EvaluateConfig, config_path, overrides)
        result = run_evaluation(cfg, log=click.echo)
    except (ConfigError, FileNotFoundError, ValueError, TrackingError) as err:
        fail(str(err))
    if result.mlflow_run_id:
        click.echo(f"MLflow run {result.mlflow_run_id}")


@click.command("show-config")
@click.argument("kind", type=click.Choice(["pipeline", "pretrain", "finetune", "evaluate"]))
@click.argument("overrides", nargs=-1)
def show_config(kind: str, overrides: tuple[str, ...]) -> None:
    """Print a job's resolved config as YAML (defaults plus OVERRIDES)."""
    from pipelines.evaluation.evaluate import EvaluateConfig
    from pipelines.orchestration.config import LOCAL_CONFIG, PipelineConfig
    from pipelines.training.config import CONFIGS

    kinds = {"pipeline": PipelineConfig, "evaluate": EvaluateConfig, **CONFIGS}
    try:
        path = LOCAL_CONFIG if kind == "pipeline" else None
        click.echo(dump_config(load_config(kinds[kind], path, overrides)), nl=False)
    except ConfigError as err:
        fail(str(err))
