"""What a trained ViT learned, as the paper shows it (§4.5): Fig. 6's attention rollout and Fig. 7's filters, position
embeddings and mean attention distance, written as PNGs, one JSON of the numbers and one self-contained HTML page.

    model, source = load_inspected_model("runs/demo/checkpoint-000100")   # or a file, a run, models:/NAME@alias
    images = default_images(source, model.config.img_size)               # or load_images(["cat.jpg"], ...)
    report = inspect_model(model, images, "inspection/", source=source)

Without images of its own, a model is looked at on a few of its own held-out evaluation images: the split of the
fine-tuning shards it was evaluated on, which a checkpoint of this platform's training (its ``trainer_state.json``)
and a registered model (its run's tags and params) record (``find_evaluation_set``). Only a model that records none
(a released .npz, timm or Hugging Face file, a bare weights file) falls back to scikit-learn's sample photographs;
the report says which images it shows and why.

The numbers come from :mod:`vit.analysis`; this module loads, lays out and writes. Figures are drawn on
``matplotlib.figure.Figure`` objects, which render through Agg without pyplot's global state or a display.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import html
import io
import itertools
import json
import posixpath
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

import vit
from vit.analysis import (
    attention_rollout,
    distance_by_depth,
    mean_attention_distance,
    patch_embed_components,
    pos_embed_similarity,
    position_structure,
)
from vit.data import build_transform, normalize
from vit.variants import RESNETS, SIZES

MODEL_URI_SCHEMES = ("models:/", "runs:/")  # MLflow model URIs; anything else is a weights location
DEFAULT_COMPONENTS = 28  # as many filter components as the paper's Fig. 7 shows
FIGURES = {
    "filters": "filters.png",
    "position_embeddings": "position_embeddings.png",
    "attention_distance": "attention_distance.png",
    "attention_rollout": "attention_rollout.png",
}
DEFAULT_NUM_IMAGES = 4  # held-out images the attention analyses look at when none are given
# The split a model was evaluated on when only its training config is known: evaluation's default (EvaluationSettings
# .split, what the pipeline's evaluate step scores), then the one training evaluated on (data.eval_split), then val.
HELD_OUT_SPLITS = ("test", "val")
# Tags the pipeline's register step puts on a registered version's run: the shards and split it was evaluated on.
EVAL_SHARDS_TAG = "vit.eval_shards"
EVAL_SPLIT_TAG = "vit.eval_split"
_SMALL_FORWARD = 10**8  # parameters x tokens below which one image's forward pass takes about a millisecond on a CPU
_SCAN_SAMPLES = 1000  # samples read at most to find images of different classes: a shard's worth, not a split's
SAMPLE_IMAGES_NOTE = (
    "no images were given: scikit-learn's bundled sample photographs (sklearn.datasets.load_sample_images: "
    "china.jpg, flower.jpg), resized and centre-cropped as for evaluation, stand in for held-out images"
)
NO_EVALUATION_SET = (
    "the model records no evaluation set (only a checkpoint or run of this platform's training and a registered "
    "model do)"
)
HYBRID_NOTE = (
    "hybrid model: its patch embedding sees the ResNet stem's feature map, not pixels, so it has no RGB filters "
    "to show (no filters.png)"
)
GAP_NOTE = (
    "pool='gap' model: it has no class token, and attention rollout follows the class token's attention "
    "(no attention_rollout.png)"
)


def load_inspected_model(location: str, storage_options: dict | None = None) -> tuple[vit.VisionTransformer, str]:
    """The model at ``location`` in eval mode, and a description of where it came from.

    ``location``: a weights file of any format ``vit.load_model`` reads, a checkpoint folder, a run folder (its
    latest committed checkpoint), or an MLflow model URI (``models:/NAME@alias``, ``models:/NAME/VERSION``,
    ``runs:/ID/model``), loaded as ``vit predict`` loads it, refusing models of other kinds before any of their
    code runs.
    """
    if location.startswith(MODEL_URI_SCHEMES):
        from pipelines.registry.predict import load_pyfunc

        # The pyfunc's own ViT, so the inspected weights are exactly the ones that serve predictions.
        model = load_pyfunc(location).unwrap_python_model().model
        return model.eval(), location
    from pipelines.training.weights import local_weights, resolve_weights

    weights = resolve_weights(location, storage_options)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = vit.load_model(local_weights(weights, storage_options), device=device)
    return model.eval(), weights


@dataclass(frozen=True)
class EvaluationSet:
    """Where a model's held-out evaluation images are: a split of a `vit shard` output, as it was evaluated."""

    shards: str  # the `vit shard` output folder (a path or an fsspec URL)
    split: str
    recorded_in: str  # where the model records it, for the report
    resize_size: int | None = None  # resized to this before the central crop, as evaluated; None: image_size * 8/7


@dataclass(frozen=True)
class InspectionImages:
    """The images the attention analyses look at, and where they come from."""

    pixels: torch.Tensor  # (B, 3, S, S) uint8, preprocessed as evaluation preprocesses them
    names: list[str]
    origin: Literal["given", "evaluation", "sample"]  # the caller's, the model's held-out set, scikit-learn's photos
    note: str | None = None  # which images stand in for ones not given, and why: the report shows it
    evaluation: EvaluationSet | None = None


def load_images(paths: Sequence[str], size: int, resize_size: int | None = None) -> InspectionImages:
    """Image files as uint8 pixels (B, 3, size, size), resized and centre-cropped as evaluation does."""
    transform = build_transform("eval", size, resize_size)
    pixels = []
    for path in paths:
        try:
            pixels.append(transform(Path(path).read_bytes()))
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from err
    return InspectionImages(torch.stack(pixels), [Path(p).name for p in paths], "given")


def sample_images(size: int, why: str) -> InspectionImages:
    """scikit-learn's two sample photographs (deterministic, and shipped with a dependency we have), with a note
    saying ``why`` they stand in for held-out images."""
    from sklearn.datasets import load_sample_images

    loaded = load_images(list(load_sample_images().filenames), size)
    return dataclasses.replace(loaded, origin="sample", note=f"{SAMPLE_IMAGES_NOTE}: {why}")


def evaluation_images(
    evaluation: EvaluationSet, size: int, count: int = DEFAULT_NUM_IMAGES, storage_options: dict | None = None
) -> InspectionImages:
    """``count`` images of ``evaluation``'s split, in the shards' order, each of another class while the first
    samples hold enough classes (a rollout of four different things says more than one of four alike). Only the
    images kept are decoded; ``ValueError`` (or ``OSError``) when the split cannot be read or holds no image."""
    from pipelines.data.shards.format import sample_image, sample_label_ids
    from pipelines.data.stream import open_shards, read_classes

    shards = open_shards(evaluation.shards, evaluation.split, storage_options)
    classes = read_classes(evaluation.shards, storage_options)
    transform = build_transform("eval", size, evaluation.resize_size)
    picked: list[tuple[int, torch.Tensor, str]] = []  # (order read, pixels, name)
    spare: list[tuple[int, torch.Tensor, str]] = []  # images of classes already picked, in case too few classes
    seen: set[int | None] = set()
    with contextlib.closing(_samples(shards.urls, storage_options)) as samples:
        for read, sample in enumerate(itertools.islice(samples, _SCAN_SAMPLES)):
            try:
                label: int | None = sample_label_ids(sample)[0]
            except (ValueError, KeyError, IndexError):  # unlabelled: still an image of the set
                label = None
            new_class = label not in seen
            if not new_class and len(spare) >= count:
                continue
            try:
                image = transform(sample_image(sample))
            except ValueError:  # an undecodable sample: evaluation skips it too
                continue
            name = str(sample["__key__"])
            if label is not None and 0 <= label < len(classes):
                name += f" ({classes[label]})"
            (picked if new_class else spare).append((read, image, name))
            seen.add(label)
            if len(picked) == count:
                break
    chosen = sorted(picked + spare[: count - len(picked)], key=lambda entry: entry[0])
    if not chosen:
        raise ValueError(f"the {evaluation.split} split of {evaluation.shards} has no readable image")
    note = (
        f"no images were given: {len(chosen)} held-out images of the model's evaluation set, the {evaluation.split} "
        f"split of {evaluation.shards} (recorded in {evaluation.recorded_in}), one of each class first, in the "
        f"shards' order, resized and centre-cropped as evaluated"
    )
    pixels = torch.stack([image for _, image, _ in chosen])
    return InspectionImages(pixels, [name for _, _, name in chosen], "evaluation", note, evaluation)


def _samples(urls: Sequence[str], storage_options: dict | None) -> Iterator[dict]:
    """The samples of the tars at ``urls``, in order, read as they are needed."""
    from pipelines.common.storage import filesystem
    from pipelines.data.shards.format import iter_tar_samples

    for url in urls:
        fs, path = filesystem(url, storage_options)
        with fs.open(path, "rb") as f:
            yield from iter_tar_samples(f, shard=url)


def default_images(
    source: str, size: int, count: int = DEFAULT_NUM_IMAGES, storage_options: dict | None = None
) -> InspectionImages:
    """The images a model is inspected on when none are given: ``count`` of its own held-out evaluation images
    (``find_evaluation_set`` of ``source``, the location ``load_inspected_model`` returned), else scikit-learn's
    photographs, with a note saying why (it records no evaluation set, or the one it records cannot be read)."""
    evaluation = find_evaluation_set(source, storage_options)
    if evaluation is None:
        return sample_images(size, NO_EVALUATION_SET)
    try:
        return evaluation_images(evaluation, size, count, storage_options)
    except (ValueError, OSError) as err:  # moved or deleted shards: the figures are still worth drawing
        where = f"the {evaluation.split} split of {evaluation.shards}"
        why = f"the model's evaluation set, {where}, cannot be read ({type(err).__name__}: {err})"
        return sample_images(size, why)


def find_evaluation_set(source: str, storage_options: dict | None = None) -> EvaluationSet | None:
    """The held-out set ``source`` was evaluated on, as the model records it; None when it records none.

    ``source``: a weights location as ``load_inspected_model`` returns it, or an MLflow model URI. A weights file in a
    checkpoint of this platform's training has its ``trainer_state.json`` beside it, whose config names the shards; a
    registered model's run carries the tags the register step writes (``vit.eval_shards``, ``vit.eval_split``), and a
    training run the same config as params (versions registered before those tags)."""
    if source.startswith(MODEL_URI_SCHEMES):
        return _evaluation_set_of_run(_run_of_model(source), storage_options)
    from pipelines.common.storage import filesystem, read_json
    from pipelines.training.loop import STATE_FILE

    state_file = posixpath.join(posixpath.dirname(source.rstrip("/")), STATE_FILE)
    fs, path = filesystem(state_file, storage_options)
    try:
        data = read_json(fs, path).get("config", {}).get("data", {})
    except (FileNotFoundError, ValueError, AttributeError):  # no checkpoint of ours: a released or bare weights file
        return None
    if not isinstance(data, dict) or not data.get("shards"):
        return None
    split = _held_out_split(data["shards"], data.get("eval_split"), storage_options)
    if split is None:
        return None
    return EvaluationSet(data["shards"], split, state_file, data.get("resize_size"))


def _held_out_split(shards: str, trained_eval_split: str | None, storage_options: dict | None) -> str | None:
    """The split of ``shards`` the model was evaluated on: ``HELD_OUT_SPLITS`` in turn, the one training evaluated on
    (``data.eval_split``) after the first; None when the shards have none of them (or cannot be read)."""
    from pipelines.data.stream import read_info

    try:
        splits = read_info(shards, storage_options).get("splits", {})
    except (ValueError, OSError):
        return None
    first, *others = HELD_OUT_SPLITS
    candidates = [first, *([trained_eval_split] if trained_eval_split not in (None, "auto") else []), *others]
    return next((split for split in candidates if split in splits), None)


def _run_of_model(uri: str) -> str:
    """The MLflow run that logged the model ``uri`` (``models:/NAME/VERSION``, ``models:/NAME@alias``, a logged
    model's ``models:/ID``, ``runs:/ID/PATH``)."""
    from mlflow import MlflowClient
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    client = MlflowClient()
    if uri.startswith("runs:/"):
        return uri.removeprefix("runs:/").split("/", 1)[0]
    named = get_model_name_and_version(client, uri)
    if len(named) == 1:  # a logged model's id: no registered name
        return client.get_logged_model(named[0]).source_run_id
    return client.get_model_version(*named).run_id


def _evaluation_set_of_run(run_id: str, storage_options: dict | None) -> EvaluationSet | None:
    """From the register step's tags on the run, else from the run's training config (its params)."""
    from mlflow import MlflowClient

    run = MlflowClient().get_run(run_id)
    tags, params = run.data.tags, run.data.params
    resize = params.get("data.resize_size", "")
    resize_size = int(resize) if resize.isdigit() else None  # the fine-tuning's, which evaluation keeps by default
    if tags.get(EVAL_SHARDS_TAG) and tags.get(EVAL_SPLIT_TAG):
        where = f"the tags {EVAL_SHARDS_TAG} and {EVAL_SPLIT_TAG} of MLflow run {run_id}"
        return EvaluationSet(tags[EVAL_SHARDS_TAG], tags[EVAL_SPLIT_TAG], where, resize_size)
    shards = params.get("data.shards")
    if not shards:
        return None
    split = _held_out_split(shards, params.get("data.eval_split"), storage_options)
    if split is None:
        return None
    return EvaluationSet(shards, split, f"the params data.shards of MLflow run {run_id}", resize_size)


def variant_name(config: vit.ViTConfig) -> str | None:
    """The named size of ``config`` ("B/16", "R50+B/16"), or None for sizes of no name."""
    sizes = (config.width, config.depth, config.mlp_dim, config.num_heads)
    size = next((name for name, known in SIZES.items() if known == sizes), None)
    if size is None:
        return None
    if config.resnet_layers is None:
        return f"{size}/{config.patch_size}"
    resnet = next((name for name, layers in RESNETS.items() if layers == config.resnet_layers), None)
    return f"{resnet}+{size}/{config.feature_stride}" if resnet else None


def inspect_model(
    model: vit.VisionTransformer,
    images: InspectionImages,
    out_dir: str | Path,
    *,
    source: str,
    components: int = DEFAULT_COMPONENTS,
) -> dict[str, Any]:
    """Compute the analyses of ``model`` on ``images``, write the figures, ``inspection.json`` and
    ``inspection.html`` into ``out_dir``, and return the report that the JSON holds."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    param = next(model.parameters())
    h, w = model.grid_size
    pixels, names = images.pixels, images.names
    notes = [n for n in (images.note,) if n]
    figures: dict[str, Any] = {}
    report: dict[str, Any] = {
        "model": {
            "source": source,
            "variant": variant_name(cfg),
            "parameters": model.num_params(),
            "image_size": cfg.img_size,
            "patch_size": cfg.patch_size,
            "feature_stride": cfg.feature_stride,
            "grid": [h, w],
            "pool": cfg.pool,
            "hybrid": cfg.resnet_layers is not None,
            "config": dataclasses.asdict(cfg),
        },
        "images": {
            "names": list(names),
            "size": cfg.img_size,
            "origin": images.origin,
            "sample_images": images.origin == "sample",
            "evaluation": dataclasses.asdict(images.evaluation) if images.evaluation else None,
        },
    }

    if cfg.resnet_layers is None:
        pcs, ratio = patch_embed_components(model, components)
        report["filters"] = {"components": len(pcs), "explained_variance_ratio": _numbers(ratio)}
        figures["filters"] = filters_figure(pcs, ratio)
    else:
        report["filters"] = None
        notes.append(HYBRID_NOTE)

    similarity = pos_embed_similarity(model)  # (h, w, h, w)
    report["position_embeddings"] = {
        "grid": [h, w],
        "similarity": _numbers(similarity.reshape(h * w, h * w)),
        **position_structure(similarity),  # spearman (vs 2-D distance), row_column_excess
    }
    figures["position_embeddings"] = position_figure(similarity)

    # One image at a time: every block's (H, T, T) attention is held at once, which for large models on many images
    # would not fit; the per-image distances average to what one batch would give.
    distances, maps = [], []
    with _threads_for(model):
        for image in pixels:
            x = normalize(image[None].to(param.device), dtype=param.dtype)
            distances.append(mean_attention_distance(model, x).float().cpu())
            if cfg.pool == "cls":
                maps.append(attention_rollout(model, x)[0].float().cpu())
    distance = torch.stack(distances).mean(dim=0)  # (L, H)
    report["attention_distance"] = {
        "unit": "pixels",
        "image_size": cfg.img_size,
        "distances": _numbers(distance),
        **distance_by_depth(distance),
    }
    figures["attention_distance"] = distance_figure(distance, cfg.img_size, report["model"]["variant"])

    if maps:
        report["attention_rollout"] = {
            "maps": [{"image": name, "map": _numbers(m)} for name, m in zip(names, maps)],
        }
        figures["attention_rollout"] = rollout_figure(pixels, torch.stack(maps), names)
    else:
        report["attention_rollout"] = None
        notes.append(GAP_NOTE)

    pngs = {}
    for key, figure in figures.items():
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100)
        pngs[key] = buffer.getvalue()
        (out / FIGURES[key]).write_bytes(pngs[key])
    report["figures"] = {key: FIGURES[key] for key in pngs}
    report["notes"] = notes
    (out / "inspection.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "inspection.html").write_text(render_html(report, pngs))
    return report


@contextlib.contextmanager
def _threads_for(model: vit.VisionTransformer) -> Iterator[None]:
    """One intra-op thread while a small model looks at one image at a time on the CPU: its passes are too small to
    split, and on a busy 2-core machine threads waiting on each other made the demo model's inspection (Mu/8, 32 px,
    four images) take 4 s instead of 0.5 s. Larger models keep torch's threads."""
    h, w = model.grid_size
    on_cpu = next(model.parameters()).device.type == "cpu"
    if not on_cpu or model.num_params() * (h * w + 1) >= _SMALL_FORWARD:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _numbers(t: torch.Tensor) -> Any:
    """Nested lists of floats, rounded: 6 decimals are far below what the figures show and keep the JSON small."""
    return np.round(t.detach().float().cpu().numpy().astype(np.float64), 6).tolist()


# ---------------------------------------------------------------------------- figures


def _mosaic(tiles: np.ndarray, cols: int, gap: int = 1) -> np.ndarray:
    """(n, th, tw[, 3]) tiles laid out in rows of ``cols``, separated by NaN (drawn as background)."""
    n, th, tw = tiles.shape[:3]
    rows = -(-n // cols)
    canvas = np.full((rows * (th + gap) - gap, cols * (tw + gap) - gap, *tiles.shape[3:]), np.nan)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        canvas[r * (th + gap) : r * (th + gap) + th, c * (tw + gap) : c * (tw + gap) + tw] = tile
    return canvas


def filters_figure(pcs: torch.Tensor, ratio: torch.Tensor):
    """Fig. 7 left: each component (C, P, P) min-max scaled into an RGB tile."""
    from matplotlib.figure import Figure

    tiles = pcs.float().cpu().numpy()
    if tiles.shape[1] != 3:  # other channel counts: show the channels' mean as grey
        tiles = np.repeat(tiles.mean(axis=1, keepdims=True), 3, axis=1)
    low = tiles.min(axis=(1, 2, 3), keepdims=True)
    span = np.maximum(tiles.max(axis=(1, 2, 3), keepdims=True) - low, 1e-12)
    tiles = ((tiles - low) / span).transpose(0, 2, 3, 1)  # (k, P, P, 3) in [0, 1]
    cols = min(7, len(tiles))
    canvas = _mosaic(tiles, cols)
    canvas = np.where(np.isnan(canvas), 1.0, canvas)  # white between tiles
    fig = Figure(figsize=(1.0 * cols + 0.5, 1.0 * -(-len(tiles) // cols) + 0.8))
    ax = fig.add_subplot()
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    shown = float(ratio.sum())
    ax.set_title(f"RGB embedding filters: first {len(tiles)} principal components ({shown:.0%} of the variance)")
    fig.tight_layout()
    return fig


def position_figure(similarity: torch.Tensor):
    """Fig. 7 centre: for each patch (row i, column j), its position embedding's cosine similarity to every other's."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    h, w = similarity.shape[:2]
    tiles = similarity.float().cpu().numpy().reshape(h * w, h, w)
    fig = Figure(figsize=(6.4, 6.0))
    ax = fig.add_subplot()
    cmap = colormaps["viridis"].with_extremes(bad="white")  # the NaN gaps between the small maps
    image = ax.imshow(_mosaic(tiles, w), cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
    ax.set_xticks([(w + 1) * j + (w - 1) / 2 for j in range(w)], [str(j + 1) for j in range(w)])
    ax.set_yticks([(h + 1) * i + (h - 1) / 2 for i in range(h)], [str(i + 1) for i in range(h)])
    ax.tick_params(length=0, labelsize=6 if max(h, w) > 16 else 8)
    ax.set_xlabel("input patch column")
    ax.set_ylabel("input patch row")
    ax.set_title("Position embedding similarity")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="cosine similarity")
    fig.tight_layout()
    return fig


def distance_figure(distance: torch.Tensor, image_size: int, variant: str | None):
    """Fig. 7 right: every head's mean attention distance against its block's depth."""
    from matplotlib.figure import Figure

    depth, heads = distance.shape
    fig = Figure(figsize=(5.2, 4.2))
    ax = fig.add_subplot()
    for head in range(heads):
        ax.scatter(np.arange(1, depth + 1), distance[:, head].numpy(), s=14, label=f"head {head + 1}")
    ax.set_xlabel("network depth (layer)")
    ax.set_ylabel("mean attention distance (pixels)")
    ax.set_xlim(0.5, depth + 0.5)
    ax.set_ylim(bottom=0)
    ax.set_title(f"{f'ViT-{variant}' if variant else 'ViT'}, {image_size}x{image_size} px images")
    if heads <= 16:
        ax.legend(fontsize=6, ncol=2, loc="lower right")
    fig.tight_layout()
    return fig


def rollout_figure(pixels: torch.Tensor, maps: torch.Tensor, names: Sequence[str]):
    """Fig. 6: each image beside itself masked by its attention rollout, upsampled to the image and scaled to 1."""
    from matplotlib.figure import Figure

    size = pixels.shape[-1]
    masks = F.interpolate(maps[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    masks = masks / masks.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)  # (B, S, S) in [0, 1]
    fig = Figure(figsize=(5.0, 2.5 * len(pixels) + 0.3))
    for i, (image, mask, name) in enumerate(zip(pixels, masks, names)):
        rgb = image.permute(1, 2, 0).numpy() / 255.0  # (S, S, 3)
        for j, (picture, title) in enumerate(((rgb, name), (rgb * mask[..., None].numpy(), "attention rollout"))):
            ax = fig.add_subplot(len(pixels), 2, 2 * i + j + 1)
            ax.imshow(picture)
            ax.set_title(title, fontsize=9)
            ax.set_axis_off()
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------- the page

_CAPTIONS = {
    "filters": "Fig. 7 left: principal components of the patch-embedding filters.",
    "position_embeddings": "Fig. 7 centre: cosine similarity between the position embeddings of the patches.",
    "attention_distance": "Fig. 7 right: mean attention distance per head against depth, over the images.",
    "attention_rollout": "Fig. 6: attention rollout from the class token to the image.",
}


def _images_origin(images: dict[str, Any]) -> str:
    if images["origin"] == "evaluation":
        evaluation = images["evaluation"]
        return f"the model's held-out evaluation set: the {evaluation['split']} split of {evaluation['shards']}"
    if images["origin"] == "sample":
        return "scikit-learn's sample photographs (no images given)"
    return "the files given"


def _findings(report: dict[str, Any]) -> list[tuple[str, str]]:
    """Fig. 7's findings as numbers, for the page's table (the JSON holds them all)."""
    position, distance = report["position_embeddings"], report["attention_distance"]
    by_block = distance["attention_distance_by_block"]
    return [
        (
            "position embeddings",
            f"Spearman {position['spearman']:+.2f} between similarity and 2-D distance (negative: nearer patches "
            f"more alike); rows/columns {position['row_column_excess']:+.3f} more alike than others as far apart",
        ),
        (
            "attention distance",
            "mean by block "
            + ", ".join(f"{d:.1f}" for d in by_block)
            + " px (lowest first); heads of the first block {:.1f}-{:.1f} px; Spearman with depth {:+.2f}".format(
                *distance["attention_distance_range_by_block"][0], distance["distance_depth_spearman"]
            ),
        ),
    ]


def render_html(report: dict[str, Any], pngs: dict[str, bytes]) -> str:
    """One page with every figure inline (base64 data: URIs): it opens anywhere, attached or offline."""
    m = report["model"]
    facts = [
        ("source", m["source"]),
        ("variant", f"ViT-{m['variant']}" if m["variant"] else "(no named size)"),
        ("parameters", f"{m['parameters']:,}"),
        ("image size", f"{m['image_size']}x{m['image_size']} px"),
        ("patch size", f"{m['patch_size']}" + (f" (stride {m['feature_stride']} px: hybrid)" if m["hybrid"] else "")),
        ("patch grid", f"{m['grid'][0]}x{m['grid'][1]}"),
        ("pooling", m["pool"]),
        ("width / depth / heads / MLP", "{width} / {depth} / {num_heads} / {mlp_dim}".format(**m["config"])),
        ("images", ", ".join(report["images"]["names"])),
        ("images from", _images_origin(report["images"])),
        *_findings(report),
    ]
    rows = "\n".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts)
    notes = "\n".join(f"<li>{html.escape(n)}</li>" for n in report["notes"])
    sections = []
    for key, png in pngs.items():
        data = base64.b64encode(png).decode("ascii")
        sections.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(FIGURES[key])}">'
            f"<figcaption>{html.escape(_CAPTIONS[key])}</figcaption></figure>"
        )
    figures = "\n".join(sections)
    title = html.escape(f"Inspection of {m['source']}")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; max-width: 60em; margin: 2em auto; color: #222; }}
th {{ text-align: left; padding-right: 1em; font-weight: normal; color: #666; }}
figure {{ margin: 2em 0; }} img {{ max-width: 100%; }} figcaption {{ color: #444; }}
</style></head>
<body>
<h1>{title}</h1>
<table>
{rows}
</table>
{f"<ul>{notes}</ul>" if notes else ""}
{figures}
</body></html>
"""


def log_inspection(
    tracker, run_id: str, model_uri: str, weights: str, evaluation: EvaluationSet, storage_options: dict | None = None
) -> tuple[list[str], int]:
    """What a registered version learned, on ``DEFAULT_NUM_IMAGES`` of its own held-out ``evaluation`` images, as
    artifacts of its run (``tracker``: a ``pipelines.tracking.Tracker``) under ``INSPECTION_DIR``; returns their
    paths and the number of images looked at. Tags on the run name the evaluation set, so `vit inspect
    models:/NAME/VERSION` finds the same images. Logged again (a retried step), the same paths are replaced, never
    duplicated."""
    import tempfile

    from pipelines.registry.model_card import INSPECTION_DIR

    tracker.set_tags(run_id, {EVAL_SHARDS_TAG: evaluation.shards, EVAL_SPLIT_TAG: evaluation.split})
    model = vit.load_model(weights).eval()  # on the CPU: four images through a model the caller already reads
    with tempfile.TemporaryDirectory(prefix="vit-inspection-") as tmp, torch.inference_mode():
        images = evaluation_images(evaluation, model.config.img_size, storage_options=storage_options)
        inspect_model(model, images, tmp, source=model_uri)
        written = sorted(path.name for path in Path(tmp).iterdir())
        for name in written:
            tracker.log_file(run_id, str(Path(tmp) / name), INSPECTION_DIR)
    return [f"{INSPECTION_DIR}/{name}" for name in written], len(images.names)
