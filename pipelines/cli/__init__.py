"""The ``vit`` command: one click group, its commands in one module per kind of work.

    pipeline.py  run, pretrain, finetune, evaluate, show-config
    data.py      corpus synth|digits, shard [verify]
    models.py    models, convert
    inspect.py   inspect: the paper's analysis figures (Figs. 6, 7) of one model
    jobs.py      submit, jobs list|status|logs|stop
    registry.py  registry list|show|promote, predict
    schedule.py  schedule add|list|run|pause|resume|remove|serve|render (Prefect, an optional extra)
    errors.py    fail: how every command reports a mistake the user can fix

The modules import Ray, MLflow, torch and the heavier parts of the platform inside their commands, so that
``vit --help`` stays fast. ``python -m pipelines.cli`` (``__main__.py``) runs the same group.
"""

from __future__ import annotations

import click

from pipelines.cli import data, inspect, jobs, models, pipeline, registry, schedule


@click.group(
    context_settings={"help_option_names": ["-h", "--help"]},
    commands=[
        pipeline.run_command,
        pipeline.pretrain,
        pipeline.finetune,
        pipeline.evaluate,
        pipeline.show_config,
        data.corpus,
        data.shard,
        models.models,
        models.convert,
        inspect.inspect_command,
        jobs.submit,
        jobs.jobs,
        registry.registry,
        registry.predict,
        schedule.schedule,
    ],
)
def main() -> None:
    """The open ViT platform: the Vision Transformer from raw corpus to registered model."""
