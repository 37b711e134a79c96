"""A model card for a registered version: what the model is, what it was trained and evaluated on, how well it
does (with 95% intervals), where it came from, and what it should and should not be used for.

    card = ModelCard(model_name="vit-demo", version="3", variant="Mu/8", ...)
    text = render_model_card(card)      # markdown: the `model_card.md` artifact `vit registry show NAME VERSION` prints
    line = card_summary(card)           # one paragraph: the version's description in the registry

Pure functions of a :class:`ModelCard`: the pipeline's register step gathers the facts, this module only words them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist

CARD_FILE = "model_card.md"  # the artifact's name on the run the version points to
INSPECTION_DIR = "inspection"  # the artifact folder, on the same run, of what the model learned (`vit inspect`)
SECTIONS = (
    "Model",
    "Data",
    "Training recipe",
    "Evaluation",
    "Few-shot linear probes",
    "Lineage",
    "Intended use",
    "Known limitations",
)
_SMALL_EVALUATION = 1000  # below this many images a top-1 interval is several points wide: worth saying


@dataclass(frozen=True, kw_only=True)
class DatasetFacts:
    role: str  # "pretraining" or "fine-tuning"
    source: str  # the corpus: a path or URL, or "synth" / "digits" (made by the pipeline)
    shards: str
    fingerprint: str | None  # the shards' content fingerprint (`vit.dataset_fingerprint` of the training run)


@dataclass(frozen=True, kw_only=True)
class RecipeFacts:
    stage: str  # "pretrain" or "finetune"
    steps: int | None
    epochs: float | None  # used when steps is None
    batch_size: int
    optimizer: str
    lr: float
    weight_decay: float
    schedule: str
    warmup_steps: int
    image_size: int
    resize_size: int | None = None


@dataclass(frozen=True, kw_only=True)
class ModelCard:
    """The facts a card states; each comes from the pipeline's outputs or config, none is inferred here."""

    model_name: str
    version: str
    variant: str  # "Mu/8", "B/16": the named size, else the widths
    parameters: int
    image_size: int  # the resolution it was fine-tuned and evaluated at
    resize_size: int | None  # resized to this before the central crop
    classes: list[str]
    datasets: list[DatasetFacts]
    recipes: list[RecipeFacts]
    split: str  # the evaluation split
    metrics: dict[str, float]  # eval/top1, eval/top5, eval/images, fewshot/<k>shot
    top1_correct: int | None = None  # the count behind eval/top1, from the per-image scores when there are some
    lineage: dict[str, str] = field(default_factory=dict)  # label -> run id, checkpoint, model URI, ...
    inspection: list[str] = field(default_factory=list)  # artifact paths of `vit inspect`'s report on the same run


def wilson_interval(correct: int, total: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a proportion: unlike the normal approximation it stays inside [0, 1] and is
    honest near 0% and 100%, where small evaluation sets of good models live."""
    if total <= 0:
        raise ValueError("total must be positive")
    if not 0 <= correct <= total:
        raise ValueError(f"correct must be in [0, {total}], got {correct}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = correct / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def _interval(accuracy: float | None, images: int | None, correct: int | None = None) -> str:
    if accuracy is None or not images:
        return "-"
    low, high = wilson_interval(correct if correct is not None else round(accuracy * images), images)
    return f"[{low:.1%}, {high:.1%}]"


def _images(card: ModelCard) -> int | None:
    images = card.metrics.get("eval/images")
    return int(images) if images else None


def _fewshot(card: ModelCard, prefix: str = "") -> list[tuple[int, float]]:
    """(shots, accuracy) of the model's ``fewshot/<k>shot`` metrics, or of those under ``prefix`` (``pretrained/``:
    the pretrained model it was fine-tuned from; ``random_init/``: the same architecture never trained)."""
    shots = []
    for key, value in card.metrics.items():
        if key.startswith(prefix + "fewshot/") and key.endswith("shot"):
            count = key.removeprefix(prefix + "fewshot/").removesuffix("shot")
            if count.isdigit():
                shots.append((int(count), value))
    return sorted(shots)


def _steps(recipe: RecipeFacts) -> str:
    return f"{recipe.steps:,} steps" if recipe.steps is not None else f"{recipe.epochs:g} epochs"


def _is_toy(card: ModelCard) -> bool:
    return any(d.source in ("synth", "digits") for d in card.datasets)


def card_summary(card: ModelCard) -> str:
    """One paragraph: what the model is, its headline figure with its interval, and what it was made from."""
    data = " and ".join(f"{d.role} on {d.source} (fingerprint {d.fingerprint or 'unknown'})" for d in card.datasets)
    text = (
        f"ViT-{card.variant} ({card.parameters:,} parameters, {card.image_size}px) classifying "
        f"{len(card.classes)} classes; {data}."
    )
    top1, images = card.metrics.get("eval/top1"), _images(card)
    if top1 is not None:
        interval = _interval(top1, images, card.top1_correct)
        text += f" Top-1 {top1:.1%} (95% interval {interval}) on {images} {card.split} images."
    if _is_toy(card):
        text += " A toy-scale demonstration model, not for real use."
    return text + f" The model card ({CARD_FILE}) has the details."


def intended_use(card: ModelCard) -> str:
    if _is_toy(card):
        return (
            "Demonstrating and testing the platform: that the pipeline trains, evaluates, registers, promotes and "
            "serves a model end to end. It is not meant to classify anything for real."
        )
    resize = f"resized to {card.resize_size}px, " if card.resize_size else ""
    return (
        f"Classifying images into the {len(card.classes)} classes of its fine-tuning data, for images like those "
        f"(the same kind of source and labelling), {resize}centre-cropped to {card.image_size}px. Measure it on "
        "data from the intended setting before relying on it: the figures here hold for the evaluation split only."
    )


def known_limitations(card: ModelCard) -> list[str]:
    limits = []
    for data in card.datasets:
        if data.source == "synth":
            limits.append(
                f"{data.role.capitalize()} data is a small synthetic corpus (generated shapes or glyphs with noisy "
                "labels), not natural images: its features say little about what a JFT or ImageNet-21k pretraining "
                "would give."
            )
        elif data.source == "digits":
            limits.append(
                f"{data.role.capitalize()} data is scikit-learn's 1,797 8x8 grey handwritten digits, upsampled: "
                "it says nothing about photographs, other scripts or digits written or scanned differently."
            )
    for recipe in card.recipes:
        if recipe.steps is not None and recipe.steps < 1000:
            stage = {"pretrain": "Pretraining", "finetune": "Fine-tuning"}.get(recipe.stage, recipe.stage)
            limits.append(f"{stage} ran for only {recipe.steps:,} steps: toy scale.")
    images = _images(card)
    if images is None:
        limits.append("No top-1 evaluation (the head does not fit the evaluation set's classes): few-shot only.")
    else:
        correct = card.top1_correct if card.top1_correct is not None else round(card.metrics["eval/top1"] * images)
        low, high = wilson_interval(correct, images)
        small = f"only {images} images" if images < _SMALL_EVALUATION else f"{images:,} images"
        limits.append(
            f"Evaluated on {small} of the {card.split} split: top-1's 95% interval is {(high - low) * 100:.1f} points "
            "wide, so smaller differences between versions are noise (promotion compares versions on the same "
            "images with a paired bootstrap for that reason)."
        )
    limits.append(
        "The intervals cover the sampling of evaluation images only: not training randomness (one seed, one run), "
        "nor images unlike the evaluation split."
    )
    return limits


def render_model_card(card: ModelCard) -> str:
    """The card as markdown, with every section of :data:`SECTIONS` in that order."""
    images = _images(card)
    lines = [f"# Model card: {card.model_name} version {card.version}", "", card_summary(card), ""]

    lines += ["## Model", ""]
    lines += [
        f"- Variant: ViT-{card.variant}",
        f"- Parameters: {card.parameters:,}",
        f"- Resolution: {card.image_size}px"
        + (f" (resized to {card.resize_size}px, then centre-cropped)" if card.resize_size else ""),
        f"- Classes ({len(card.classes)}): {', '.join(card.classes[:20])}{', ...' if len(card.classes) > 20 else ''}",
    ]
    if card.inspection:
        page = [path for path in card.inspection if path.endswith(".html")]
        others = [f"`{path}`" for path in card.inspection if not path.endswith(".html")]
        lines.append(
            f"- What it learned, drawn as the paper does (Figs. 6 and 7: filters, position embeddings, attention "
            f"distance and rollout) on held-out {card.split} images: "
            + (f"`{page[0]}` (one self-contained page), " if page else "")
            + f"{', '.join(others)}; artifacts of this version's run"
        )
    lines.append("")

    lines += ["## Data", "", "| role | source | shards | fingerprint |", "|---|---|---|---|"]
    lines += [f"| {d.role} | `{d.source}` | `{d.shards}` | `{d.fingerprint or '-'}` |" for d in card.datasets]
    lines.append("")

    lines += ["## Training recipe", ""]
    lines += ["| stage | length | batch | optimizer | lr | weight decay | schedule | warmup | image size |"]
    lines += ["|---|---|---|---|---|---|---|---|---|"]
    for r in card.recipes:
        size = f"{r.image_size}px" + (f" (from {r.resize_size}px)" if r.resize_size else "")
        lines.append(
            f"| {r.stage} | {_steps(r)} | {r.batch_size} | {r.optimizer} | {r.lr:g} | {r.weight_decay:g} | "
            f"{r.schedule} | {r.warmup_steps} | {size} |"
        )
    lines.append("")

    lines += ["## Evaluation", ""]
    if images is None:
        lines += ["No top-1/top-5 evaluation: the head does not fit the evaluation set's classes.", ""]
    else:
        lines += [
            f"On {images} images of the `{card.split}` split; 95% Wilson score intervals.",
            "",
            "| metric | value | 95% interval |",
            "|---|---|---|",
        ]
        for key in ("eval/top1", "eval/top5"):
            value = card.metrics.get(key)
            if value is not None:
                correct = card.top1_correct if key == "eval/top1" else None
                lines.append(f"| {key} | {value:.2%} | {_interval(value, images, correct)} |")
        lines.append("")

    lines += ["## Few-shot linear probes", ""]
    shots = _fewshot(card)
    if shots:
        lines += [
            f"A ridge-regression probe on frozen features from k labelled images per class, scored on the same "
            f"{card.split} images.",
            "",
            "| shots per class | top-1 | 95% interval |",
            "|---|---|---|",
        ]
        lines += [f"| {k} | {value:.2%} | {_interval(value, images)} |" for k, value in shots]
    else:
        lines.append("None were run.")
    lines.append("")
    pretrained, untrained = dict(_fewshot(card, "pretrained/")), dict(_fewshot(card, "random_init/"))
    if pretrained and untrained:
        lines += [
            "What the pretraining transferred (the paper's measure): the same probes on the frozen features of the "
            "pretrained model before fine-tuning, and of the same architecture at its random initialisation.",
            "",
            "| shots per class | pretrained | random init | difference |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {k} | {pretrained[k]:.2%} | {untrained[k]:.2%} | {pretrained[k] - untrained[k]:+.2%} |"
            for k in sorted(pretrained.keys() & untrained.keys())
        ]
        lines.append("")

    lines += ["## Lineage", ""]
    lines += [f"- {label}: `{value}`" for label, value in card.lineage.items() if value] or ["- unknown"]
    lines.append("")

    lines += ["## Intended use", "", intended_use(card), ""]
    lines += ["## Known limitations", ""]
    lines += [f"- {limit}" for limit in known_limitations(card)]
    return "\n".join(lines) + "\n"
