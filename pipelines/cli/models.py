"""The model commands, on the pure-PyTorch ``vit`` package alone: ``vit models`` lists the named variants and
``vit convert`` imports released weights into a checkpoint of this platform."""

from __future__ import annotations

import click

from pipelines.cli.errors import fail


@click.command("models")
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


@click.command("convert")
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

    try:
        weights = vit.read_checkpoint(src)
    except (OSError, ValueError) as err:
        fail(str(err))
    if num_classes is None:
        num_classes = weights.num_classes
    model = vit.create_model(
        name, num_classes=num_classes, img_size=img_size, representation_size=representation_size, device="meta"
    )
    try:
        report = vit.load_checkpoint(model, weights.tensors, pos_embed_method=pos_embed_method)
    except ValueError as err:
        fail(str(err))
    if report.reinitialized_head:
        model.head.to_empty(device="cpu")
        model.reset_head()
    path = vit.save_checkpoint(model, dst)
    click.echo(f"read {weights.format} weights from {src}")
    if report.resampled_pos_embed:
        old, new = report.resampled_pos_embed
        click.echo(f"resampled position embeddings {old[0]}x{old[1]} -> {new[0]}x{new[1]} ({pos_embed_method})")
    if report.dropped:
        click.echo(f"not loaded: {', '.join(report.dropped)}")
    click.echo(f"wrote {path}: ViT-{name}, {model.num_params() / 1e6:.1f}M parameters, {num_classes} classes")
