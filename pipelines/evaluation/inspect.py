"""What a trained ViT learned, as the paper shows it (§4.5): Fig. 6's attention rollout and Fig. 7's filters, position
embeddings and mean attention distance, written as PNGs, one JSON of the numbers and one self-contained HTML page.

    model, source = load_inspected_model("runs/demo/checkpoint-000100")   # or a file, a run, models:/NAME@alias
    pixels, names, note = load_images([], model.config.img_size)        # no files: scikit-learn's sample images
    report = inspect_model(model, pixels, names, "inspection/", source=source, images_note=note)

The numbers come from :mod:`vit.analysis`; this module loads, lays out and writes. Figures are drawn on
``matplotlib.figure.Figure`` objects, which render through Agg without pyplot's global state or a display.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import vit
from vit.analysis import attention_rollout, mean_attention_distance, patch_embed_components, pos_embed_similarity
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
SAMPLE_IMAGES_NOTE = (
    "no images were given: scikit-learn's bundled sample photographs (sklearn.datasets.load_sample_images: "
    "china.jpg, flower.jpg), resized and centre-cropped as for evaluation, stand in for held-out images"
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


def load_images(paths: Sequence[str], size: int) -> tuple[torch.Tensor, list[str], str | None]:
    """uint8 pixels (B, 3, size, size) as evaluation preprocesses them, their names, and a note when, no ``paths``
    given, scikit-learn's sample photographs stand in (deterministic, and shipped with a dependency we have)."""
    note = None
    if not paths:
        from sklearn.datasets import load_sample_images

        paths, note = list(load_sample_images().filenames), SAMPLE_IMAGES_NOTE
    transform = build_transform("eval", size)
    pixels = []
    for path in paths:
        try:
            pixels.append(transform(Path(path).read_bytes()))
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from err
    return torch.stack(pixels), [Path(p).name for p in paths], note


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
    pixels: torch.Tensor,
    names: Sequence[str],
    out_dir: str | Path,
    *,
    source: str,
    images_note: str | None = None,
    components: int = DEFAULT_COMPONENTS,
) -> dict[str, Any]:
    """Compute the analyses of ``model`` on uint8 ``pixels`` (B, 3, S, S), write the figures, ``inspection.json`` and
    ``inspection.html`` into ``out_dir``, and return the report that the JSON holds."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    param = next(model.parameters())
    h, w = model.grid_size
    notes = [n for n in (images_note,) if n]
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
        "images": {"names": list(names), "size": cfg.img_size, "sample_images": images_note is not None},
    }

    if cfg.resnet_layers is None:
        pcs, ratio = patch_embed_components(model, components)
        report["filters"] = {"components": len(pcs), "explained_variance_ratio": _numbers(ratio)}
        figures["filters"] = filters_figure(pcs, ratio)
    else:
        report["filters"] = None
        notes.append(HYBRID_NOTE)

    similarity = pos_embed_similarity(model)  # (h, w, h, w)
    report["position_embeddings"] = {"grid": [h, w], "similarity": _numbers(similarity.reshape(h * w, h * w))}
    figures["position_embeddings"] = position_figure(similarity)

    # One image at a time: every block's (H, T, T) attention is held at once, which for large models on many images
    # would not fit; the per-image distances average to what one batch would give.
    distances, maps = [], []
    for image in pixels:
        x = normalize(image[None].to(param.device), dtype=param.dtype)
        distances.append(mean_attention_distance(model, x).float().cpu())
        if cfg.pool == "cls":
            maps.append(attention_rollout(model, x)[0].float().cpu())
    distance = torch.stack(distances).mean(dim=0)  # (L, H)
    report["attention_distance"] = {"unit": "pixels", "image_size": cfg.img_size, "distances": _numbers(distance)}
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
