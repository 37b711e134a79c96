"""The data commands: ``vit corpus synth|digits`` writes a corpus, ``vit shard`` turns one into WebDataset shards
and ``vit shard verify`` rechecks shards against their manifest."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from pipelines.cli.errors import fail

if TYPE_CHECKING:
    from pipelines.data.corpus import CorpusSummary


@click.group("corpus")
def corpus() -> None:
    """Write a corpus for the sharding job: a synthetic JFT-style set, or the real bundled digits."""


@corpus.command("synth")
@click.argument("dst")
@click.option("--images", type=int, required=True, help="Number of images.")
@click.option("--classes", type=int, required=True, help="Number of leaf classes (at least 2).")
@click.option("--superclasses", type=int, default=None, help="Superclasses grouping them [default: about sqrt].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--image-size", type=int, default=64, show_default=True, help="Side of the square images in pixels.")
@click.option("--label-noise", type=float, default=0.1, show_default=True, help="Share of images with a wrong label.")
@click.option("--layout", type=click.Choice(["table", "folder"]), default="table", show_default=True)
@click.option(
    "--style",
    type=click.Choice(["shapes", "glyphs"]),
    default="shapes",
    show_default=True,
    help="Drawn shapes on textured backgrounds (JPEG), or handwritten stroke glyphs, one an image (PNG).",
)
@click.option(
    "--scan-size",
    type=int,
    default=0,
    show_default=True,
    help="Glyphs: scanned at this many pixels with 17 ink levels, shown with square pixels (8: the digits' look).",
)
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
    style: str,
    scan_size: int,
    workers: int,
    overwrite: bool,
) -> None:
    """Write a synthetic JFT-style corpus with noisy multi-labels to DST (a path or fsspec URL)."""
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
            style=style,  # type: ignore[arg-type]
            scan_size=scan_size,
            workers=workers,
            overwrite=overwrite,
        )
    except (ValueError, OSError) as err:
        fail(str(err))
    _print_corpus(summary)


@corpus.command("digits")
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
        fail(str(err))
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


@click.command("shard")
@click.argument("src")
@click.argument("dst", required=False)
@click.option("--address", default=None, help="Ray cluster to run on (default: a local Ray).")
@click.option("--labels", default=None, help="Label table (parquet/csv/jsonl) [default: SRC/labels.*].")
@click.option("--source", type=click.Choice(["auto", "folder", "table", "tars"]), default="auto", show_default=True)
@click.option("--path-column", default="path", show_default=True)
@click.option("--label-column", default="labels", show_default=True)
@click.option(
    "--split-column",
    default=None,
    help="Column naming each row's split [a table's own `split` column, else --val-fraction].",
)
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
        fail("missing DST: vit shard SRC DST")
    from pipelines.data.shards import ShardConfig, ShardError, shard_corpus

    shard_bytes, max_file_bytes = options.pop("shard_bytes"), options.pop("max_file_bytes")
    options["eval_sets"] = list(options["eval_sets"])
    try:
        if shard_bytes:
            options["shard_bytes"] = _parse_bytes(shard_bytes, "--shard-bytes")
        elif options["shard_samples"] is None:
            del options["shard_samples"]  # ShardConfig's own default: written once, there
        if max_file_bytes:
            options["max_file_bytes"] = _parse_bytes(max_file_bytes, "--max-file-bytes")
        cfg = ShardConfig(src=src, dst=dst, **options)
    except ValueError as err:  # a ShardConfig check names its field: shown as the option that sets it
        field_name, sep, rest = str(err).partition(":")
        fail(f"--{field_name.replace('_', '-')}:{rest}" if sep and field_name in options else str(err))
    from pipelines.common.ray import init_ray

    init_ray(address)
    try:
        summary = shard_corpus(cfg, overwrite=overwrite, progress=True, log=click.echo)
    except (ShardError, FileNotFoundError, PermissionError) as err:
        fail(str(err))
    click.echo("")
    click.echo(summary.table())
    click.echo(f"\nshards, manifest.parquet, rejects.parquet and _info.json are in {dst}")


def _verify(dst: str | None) -> None:
    from pipelines.data.shards import verify_shards

    if dst is None:
        fail("missing DST: vit shard verify DST")
    problems = verify_shards(dst)
    for problem in problems:
        click.echo(problem)
    if problems:
        fail(f"{len(problems)} problem(s) in {dst}")
    click.echo(f"{dst}: every shard matches the manifest")


def _parse_bytes(text: str, option: str) -> int:
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    number = text.strip().upper().rstrip()
    unit = "".join(ch for ch in number if ch.isalpha())
    value = number[: len(number) - len(unit)].strip()
    if unit not in units or not value:
        raise ValueError(f"{option}: cannot read {text!r} (use e.g. 500MB or 1GB)")
    return int(float(value) * units[unit])
