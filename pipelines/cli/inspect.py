"""``vit inspect``: the paper's pictures of what a model learned (Figs. 6 and 7) for one checkpoint or registered
model, as PNGs, a JSON of the numbers and one self-contained HTML page (``pipelines.evaluation.inspect``)."""

from __future__ import annotations

import click

from pipelines.cli.errors import fail, failing_on
from pipelines.cli.options import connect_tracking, image_files, tracking_uri_option


@click.command(name="inspect", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model")
@click.argument("images", nargs=-1)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for the report.")
@click.option(
    "--components",
    default=28,
    show_default=True,
    type=click.IntRange(min=1),
    help="Principal components of the patch-embedding filters to show.",
)
@click.option(
    "--num-images",
    default=4,  # pipelines.evaluation.inspect.DEFAULT_NUM_IMAGES, not imported here: it imports torch
    show_default=True,
    type=click.IntRange(min=1),
    help="Without IMAGES: how many of the model's held-out evaluation images to look at.",
)
@tracking_uri_option
def inspect_command(
    model: str, images: tuple[str, ...], out_dir: str, components: int, num_images: int, tracking_uri: str | None
) -> None:
    """Draw what MODEL learned: filters, position embeddings, attention distance and rollout, into --out.

    MODEL is a weights file (ours, or released .npz, timm or Hugging Face weights), a checkpoint folder, a run
    folder (its latest committed checkpoint) or a registered model, models:/NAME@alias or models:/NAME/VERSION.
    IMAGES (files or folders of them) are what the attention analyses look at; without them, --num-images of the
    model's own held-out evaluation images (the split of the shards a checkpoint or registered model of this
    platform was evaluated on), else, for a model that records none, scikit-learn's two sample photographs; the
    report says which and why. Writes filters.png, position_embeddings.png, attention_distance.png,
    attention_rollout.png, inspection.json and inspection.html.
    """
    import torch

    import vit
    from pipelines.evaluation.inspect import (
        MODEL_URI_SCHEMES,
        default_images,
        inspect_model,
        load_images,
        load_inspected_model,
    )

    files = image_files(images)
    if images and not files:
        fail("no images found")
    errors: tuple[type[Exception], ...] = (ValueError, OSError)
    if model.startswith(MODEL_URI_SCHEMES):
        from mlflow.exceptions import MlflowException  # MLflow only for registered models: it takes seconds to import

        from pipelines.registry.registry import RegistryError

        connect_tracking(tracking_uri)
        errors += (RegistryError, MlflowException)
    with failing_on(*errors, describe=_message):
        try:
            network, source = load_inspected_model(model)
        except vit.UnknownVariantError as err:
            fail(f"{err}\nname the variant first: vit convert {model} CHECKPOINT.safetensors --model SIZE/PATCH")
    size = network.config.img_size
    if files:
        with failing_on(ValueError, OSError):
            chosen = load_images(files, size)
    else:
        with failing_on(*errors, describe=_message):
            chosen = default_images(source, size, num_images)
    with torch.inference_mode():
        report = inspect_model(network, chosen, out_dir, source=source, components=components)
    for line in report["notes"]:
        click.echo(f"note: {line}")
    written = [*report["figures"].values(), "inspection.json", "inspection.html"]
    click.echo(f"wrote {', '.join(written)} to {out_dir}")


def _message(err: Exception) -> str:
    return getattr(err, "message", None) or str(err)  # MlflowException keeps its text in .message
