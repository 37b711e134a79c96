"""The ``vit`` command."""

from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING

import click

from pipelines.common.config import ConfigError, dump_config, load_config

if TYPE_CHECKING:
    from pipelines.data.corpus import CorpusSummary


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """The open ViT platform: the Vision Transformer from raw corpus to registered model."""


@main.command("run")
@click.argument("config", required=False)
@click.argument("overrides", nargs=-1)
@click.option("--from", "start_from", default=None, help="Re-run this step and every later one, even if done.")
@click.option("--only", default=None, help="Re-run only this step, on the others' cached outputs.")
def run_command(config: str | None, overrides: tuple[str, ...], start_from: str | None, only: str | None) -> None:
    """The whole pipeline: corpus -> shard -> pretrain -> finetune -> evaluate -> register.

    CONFIG is a YAML file, or the name of one shipped with the package (``local``, ``jft-b16``); default: the
    embedded local demo (``local``: a tiny ViT pretrained on a synthetic corpus and fine-tuned on real digits, on a
    local Ray, tracked in ./mlflow.db). ``env:NAME`` reads the YAML from an environment variable (how `vit submit`
    hands it to a Ray Job). A CONFIG with ``=`` in it is taken as the first override. Steps already done with the
    same settings are skipped.

    OVERRIDES are dotted settings, e.g. ``pretrain.steps=600 finetune.optim.lr=0.05 workdir=/tmp/demo``.
    """
    from pipelines.orchestration.workflow import (
        LOCAL_CONFIG,
        PipelineConfig,
        StepFailedError,
        find_config,
        run_pipeline,
    )
    from pipelines.tracking.tracking import TrackingError

    if config is not None and "=" in config and not config.startswith("env:"):
        config, overrides = None, (config, *overrides)
    try:
        if config is not None and config.startswith("env:"):
            text = os.environ.get(config.removeprefix("env:"))
            if text is None:
                raise ConfigError(f"{config}: the environment variable is not set")
            cfg = load_config(PipelineConfig, overrides=overrides, text=text)
        elif config is not None and find_config(config) is None:
            raise ConfigError(f"{config}: no such config file (nor a shipped one: {_shipped_configs()})")
        else:
            cfg = load_config(PipelineConfig, find_config(config) if config else LOCAL_CONFIG, overrides)
    except ConfigError as err:
        _fail(str(err))
    started = time.perf_counter()
    try:
        result = run_pipeline(cfg, start_from=start_from, only=only, log=click.echo)
    except (ConfigError, TrackingError) as err:
        _fail(str(err))
    except StepFailedError as err:
        click.echo(f"error: {err}", err=True)
        click.echo("The step's state is kept: run the same command again to resume it.", err=True)
        sys.exit(1)
    out = result.outputs
    metrics = out.get("evaluate", {}).get("metrics", {})
    click.echo("")
    if "eval/top1" in metrics:
        click.echo(f"held-out top-1     {metrics['eval/top1']:.2%}  ({int(metrics.get('eval/images', 0))} test images)")
        click.echo(f"held-out top-5     {metrics['eval/top5']:.2%}")
    fewshot = "  ".join(f"{k.split('/')[1]} {v:.1%}" for k, v in metrics.items() if k.startswith("fewshot/"))
    if fewshot:
        click.echo(f"few-shot linear    {fewshot}  (frozen features)")
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


def _shipped_configs() -> str:
    from pipelines.orchestration.workflow import CONFIGS_DIR

    return ", ".join(sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml")))


@main.command()
@click.option("--meta/--no-meta", default=True, help="Count on the meta device (no memory used).")
def models(meta: bool) -> None:
    """List the named variants with their sizes and parameter counts (1000 classes, 224 px)."""
    import vit

    click.echo(f"{'name':<10} {'width':>5} {'depth':>5} {'heads':>5} {'mlp':>5} {'params':>9} {'GFLOPs':>7}")
    for name in vit.list_models():
        model = vit.create_model(name, device="meta" if meta else None)
        c = model.config
        click.echo(
            f"{name:<10} {c.width:>5} {c.depth:>5} {c.num_heads:>5} {c.mlp_dim:>5} "
            f"{model.num_params() / 1e6:>8.1f}M {model.flops_per_image() / 1e9:>7.1f}"
        )


@main.command()
@click.argument("src")
@click.argument("dst")
@click.option("--model", "name", required=True, help='Variant of the weights, e.g. "B/16" or "R50+B/16".')
@click.option("--num-classes", type=int, default=None, help="Classes of the new head (default: the checkpoint's).")
@click.option("--img-size", type=int, default=224, show_default=True, help="Resolution; E_pos is resampled to it.")
@click.option("--representation-size", type=int, default=None, help="Keep a pre-logits layer of this size.")
@click.option("--pos-embed-method", type=click.Choice(["bilinear", "bicubic"]), default="bilinear", show_default=True)
def convert(
    src: str,
    dst: str,
    name: str,
    num_classes: int | None,
    img_size: int,
    representation_size: int | None,
    pos_embed_method: str,
) -> None:
    """Import released weights (.npz, timm, Hugging Face) into a vit-platform checkpoint DST."""
    import vit
    from vit.checkpoint import _read, detect_format

    try:
        raw, meta = _read(src)
        fmt = detect_format(raw, meta)
    except (OSError, ValueError) as err:
        _fail(str(err))
    if num_classes is None:
        num_classes = _head_size(raw, fmt)
    model = vit.create_model(
        name, num_classes=num_classes, img_size=img_size, representation_size=representation_size, device="meta"
    )
    try:
        report = vit.load_checkpoint(model, raw, pos_embed_method=pos_embed_method)
    except ValueError as err:
        _fail(str(err))
    if report.reinitialized_head:
        model.head.to_empty(device="cpu")
        model.reset_head()
    path = vit.save_checkpoint(model, dst)
    click.echo(f"read {fmt} weights from {src}")
    if report.resampled_pos_embed:
        old, new = report.resampled_pos_embed
        click.echo(f"resampled position embeddings {old[0]}x{old[1]} -> {new[0]}x{new[1]} ({pos_embed_method})")
    if report.dropped:
        click.echo(f"not loaded: {', '.join(report.dropped)}")
    click.echo(f"wrote {path}: ViT-{name}, {model.num_params() / 1e6:.1f}M parameters, {num_classes} classes")


def _head_size(raw: dict, fmt: str) -> int:
    for key in ("head.weight", "classifier.weight"):
        if key in raw:
            return int(raw[key].shape[0])
    for key in ("head/kernel", "img/head/kernel", "params/head/kernel"):
        if key in raw:
            return int(raw[key].shape[-1])
    return 0


@main.command()
@click.argument("src")
@click.argument("dst", required=False)
@click.option("--address", default=None, help="Ray cluster to run on (default: a local Ray).")
@click.option("--labels", default=None, help="Label table (parquet/csv/jsonl) [default: SRC/labels.*].")
@click.option("--source", type=click.Choice(["auto", "folder", "table", "tars"]), default="auto", show_default=True)
@click.option("--path-column", default="path", show_default=True)
@click.option("--label-column", default="labels", show_default=True)
@click.option("--split-column", default=None, help="Column naming each row's split (else --val-fraction).")
@click.option("--val-fraction", type=float, default=0.0, show_default=True, help="Held-out share, by key hash.")
@click.option("--shard-samples", type=int, default=None, help="Samples per shard [default: 10000].")
@click.option("--shard-bytes", type=str, default=None, help="Target bytes per shard instead, e.g. 1GB or 500MB.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the global shuffle.")
@click.option("--max-side", type=int, default=None, help="Resize longer sides above this on ingest.")
@click.option("--eval-set", "eval_sets", multiple=True, help="Downstream set to de-duplicate against (repeatable).")
@click.option("--dedup-distance", type=int, default=4, show_default=True, help="Max pHash Hamming distance.")
@click.option(
    "--max-file-bytes",
    type=str,
    default=None,
    help="Reject inputs larger than this, unread, e.g. 64MiB or 500MB [default: 64MiB].",
)
@click.option(
    "--follow-symlinks",
    is_flag=True,
    help="Read symlinks to regular files anywhere (default: only those resolving inside SRC).",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace shards made with other settings (only in a folder holding nothing but `vit shard` outputs).",
)
def shard(src: str, dst: str | None, address: str | None, overwrite: bool, **options) -> None:
    """Shard the corpus at SRC into WebDataset tars at DST (any fsspec URL: a path, s3://...).

    `vit shard verify DST` rechecks every shard against the manifest instead.
    """
    if src == "verify":
        _verify(dst)
        return
    if dst is None:
        _fail("missing DST: vit shard SRC DST")
    from pipelines.data.shard import ShardConfig, ShardError, shard_corpus

    shard_bytes, max_file_bytes = options.pop("shard_bytes"), options.pop("max_file_bytes")
    options["eval_sets"] = list(options["eval_sets"])
    try:
        if shard_bytes:
            options["shard_bytes"] = _parse_bytes(shard_bytes, "--shard-bytes")
        elif options["shard_samples"] is None:
            options["shard_samples"] = 10_000
        if max_file_bytes:
            options["max_file_bytes"] = _parse_bytes(max_file_bytes, "--max-file-bytes")
        cfg = ShardConfig(src=src, dst=dst, **options)
    except ValueError as err:  # a ShardConfig check names its field: shown as the option that sets it
        field_name, sep, rest = str(err).partition(":")
        _fail(f"--{field_name.replace('_', '-')}:{rest}" if sep and field_name in options else str(err))
    from pipelines.common.ray import init_ray

    init_ray(address)
    try:
        summary = shard_corpus(cfg, overwrite=overwrite, progress=True, log=click.echo)
    except (ShardError, FileNotFoundError, PermissionError) as err:
        _fail(str(err))
    click.echo("")
    click.echo(summary.table())
    click.echo(f"\nshards, manifest.parquet, rejects.parquet and _info.json are in {dst}")


def _verify(dst: str | None) -> None:
    from pipelines.data.shard import verify_shards

    if dst is None:
        _fail("missing DST: vit shard verify DST")
    problems = verify_shards(dst)
    for problem in problems:
        click.echo(problem)
    if problems:
        _fail(f"{len(problems)} problem(s) in {dst}")
    click.echo(f"{dst}: every shard matches the manifest")


def _parse_bytes(text: str, option: str) -> int:
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    number = text.strip().upper().rstrip()
    unit = "".join(ch for ch in number if ch.isalpha())
    value = number[: len(number) - len(unit)].strip()
    if unit not in units or not value:
        raise ValueError(f"{option}: cannot read {text!r} (use e.g. 500MB or 1GB)")
    return int(float(value) * units[unit])


def _train_command(recipe: str, config_path: str | None, overrides: tuple[str, ...], address: str | None) -> None:
    from pipelines.training.config import load_train_config
    from pipelines.training.driver import TrainingDataError, TrainingDivergedError, plan_training, run_training

    try:
        cfg = load_train_config(recipe, config_path, overrides)
        plan_training(cfg)  # checks the config against the shards before any cluster starts
    except (ConfigError, FileNotFoundError, ValueError) as err:
        _fail(str(err))
    from pipelines.common.ray import init_ray
    from pipelines.tracking.tracking import TrackingError

    init_ray(address)
    try:
        result = run_training(cfg, log=click.echo)
    except (TrainingDivergedError, TrainingDataError, TrackingError) as err:
        _fail(str(err))
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


@main.command()
@_train_options
def pretrain(config_path: str | None, address: str | None, overrides: tuple[str, ...]) -> None:
    """Pretrain a ViT on shards with the paper's recipe (Table 3) on Ray Train.

    OVERRIDES are dotted settings, e.g. ``data.shards=s3://bucket/jft model=B/16 scale.strategy=fsdp``.
    Running the same ``name`` again resumes from its latest checkpoint.
    """
    _train_command("pretrain", config_path, overrides, address)


@main.command()
@_train_options
def finetune(config_path: str | None, address: str | None, overrides: tuple[str, ...]) -> None:
    """Fine-tune pretrained weights on a downstream set with the paper's recipe (Table 4).

    ``init_from`` names the weights: a pretraining run folder, a checkpoint folder, or a file.
    """
    _train_command("finetune", config_path, overrides, address)


@main.command()
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
        _fail(str(err))
    if result.mlflow_run_id:
        click.echo(f"MLflow run {result.mlflow_run_id}")


@main.group()
def corpus() -> None:
    """Write a corpus for the sharding job: a synthetic JFT-style set, or the real bundled digits."""


@corpus.command()
@click.argument("dst")
@click.option("--images", type=int, required=True, help="Number of images.")
@click.option("--classes", type=int, required=True, help="Number of leaf classes (at least 2).")
@click.option("--superclasses", type=int, default=None, help="Superclasses grouping them [default: about sqrt].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--image-size", type=int, default=64, show_default=True, help="Side of the square images in pixels.")
@click.option("--label-noise", type=float, default=0.1, show_default=True, help="Share of images with a wrong label.")
@click.option("--layout", type=click.Choice(["table", "folder"]), default="table", show_default=True)
@click.option("--workers", type=int, default=1, show_default=True, help="Processes rendering images.")
@click.option("--overwrite", is_flag=True, help="Replace a corpus already at DST.")
def synth(
    dst: str,
    images: int,
    classes: int,
    superclasses: int | None,
    seed: int,
    image_size: int,
    label_noise: float,
    layout: str,
    workers: int,
    overwrite: bool,
) -> None:
    """Write a synthetic JFT-style corpus of JPEGs with noisy multi-labels to DST (a path or fsspec URL)."""
    from pipelines.data.corpus import synth_corpus

    try:
        summary = synth_corpus(
            dst,
            images=images,
            classes=classes,
            superclasses=superclasses,
            seed=seed,
            image_size=image_size,
            label_noise=label_noise,
            layout=layout,
            workers=workers,
            overwrite=overwrite,
        )
    except (ValueError, OSError) as err:
        _fail(str(err))
    _print_corpus(summary)


@corpus.command()
@click.argument("dst")
@click.option("--scale", type=int, default=4, show_default=True, help="Upscaling of the 8x8 digits.")
@click.option("--split-fraction", type=float, default=0.2, show_default=True, help="Stratified test share.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace a corpus already at DST.")
def digits(dst: str, scale: int, split_fraction: float, seed: int, overwrite: bool) -> None:
    """Write scikit-learn's 1,797 real handwritten digits to DST as a labelled, split PNG set."""
    from pipelines.data.corpus import import_digits

    try:
        summary = import_digits(dst, scale=scale, split_fraction=split_fraction, seed=seed, overwrite=overwrite)
    except (ValueError, OSError) as err:
        _fail(str(err))
    _print_corpus(summary)


def _print_corpus(summary: CorpusSummary) -> None:
    hierarchy = f", {summary.superclasses} superclasses" if summary.superclasses else ""
    click.echo(f"wrote {summary.images:,} images ({summary.classes} classes{hierarchy}) to {summary.root}")
    click.echo(f"time      {summary.seconds:.1f} s  ({summary.images_per_s:,.0f} images/s)")
    click.echo(f"bytes     {summary.bytes / 1e6:,.1f} MB  ({summary.bytes / summary.images / 1e3:.1f} kB per image)")
    if summary.splits:
        click.echo("splits    " + ", ".join(f"{name} {count:,}" for name, count in summary.splits.items()))
    if summary.labels:
        click.echo(f"labels    {summary.labels}")
    click.echo(f"classes   {summary.classes_file}")


@main.command("show-config")
@click.argument("kind", type=click.Choice(["pipeline", "pretrain", "finetune", "evaluate"]))
@click.argument("overrides", nargs=-1)
def show_config(kind: str, overrides: tuple[str, ...]) -> None:
    """Print a job's resolved config as YAML (defaults plus OVERRIDES)."""
    from pipelines.evaluation.evaluate import EvaluateConfig
    from pipelines.orchestration.workflow import LOCAL_CONFIG, PipelineConfig
    from pipelines.training.config import CONFIGS

    kinds = {"pipeline": PipelineConfig, "evaluate": EvaluateConfig, **CONFIGS}
    try:
        path = LOCAL_CONFIG if kind == "pipeline" else None
        click.echo(dump_config(load_config(kinds[kind], path, overrides)), nl=False)
    except ConfigError as err:
        _fail(str(err))


def _add_edge_commands() -> None:
    """The registry, prediction and Ray Job commands live with their code; their modules import MLflow and
    Ray only inside the commands, so `vit --help` stays fast."""
    from pipelines.orchestration import jobs
    from pipelines.registry import registry

    for command in (registry.registry, registry.predict, jobs.submit, jobs.jobs):
        main.add_command(command)


_add_edge_commands()

if __name__ == "__main__":
    main()
