"""The evaluation step: top-1/top-5 of a trained model on a held-out split, and the paper's few-shot
linear evaluation of its frozen representation (1/5/10/25 shots, closed-form ridge regression).

Runs in the calling process (`vit evaluate`), on its GPU when it has one: evaluation reads a downstream set once,
which takes minutes, not the hours that justify a worker group. The pipeline's driver usually has no GPU: its
evaluate step runs the same function in one Ray task holding a GPU when the cluster has one
(``evaluate_on_cluster``), else in the driver as `vit evaluate` does.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

import vit
from pipelines.common.config import check
from pipelines.data.shards.format import dataset_fingerprint
from pipelines.data.stream import ShardSet, StreamSpec, make_loader, open_shards, read_classes
from pipelines.tracking.tracking import Tracker, TrackingConfig
from pipelines.training.weights import local_weights, resolve_weights
from vit.data import build_transform, normalize
from vit.evaluate import fewshot_accuracy, topk_hits


@dataclass(kw_only=True)
class EvaluationSettings:
    """How a model is scored: the same settings for `vit evaluate` and the pipeline's evaluate step."""

    split: str = "test"  # scored for top-1/top-5 and as the few-shot test set
    fewshot_split: str | None = "train"  # the labelled pool the k-shot examples come from; null: no few-shot
    shots: list[int] = field(default_factory=lambda: [1, 5, 10, 25])
    fewshot_val_per_class: int = 10  # extra pool examples per class that choose the ridge penalty
    image_size: int | None = None  # default: the model's own resolution
    resize_size: int | None = None  # resize before the central crop; default: as fine-tuned, else image_size * 8/7
    batch_size: int = 128
    loader_workers: int = 2  # decoding processes (0: decode in the evaluating process)

    def __post_init__(self) -> None:
        check(self.batch_size >= 1, f"batch_size: must be at least 1, got {self.batch_size}")
        check(self.loader_workers >= 0, f"loader_workers: must not be negative, got {self.loader_workers}")
        check(all(k >= 1 for k in self.shots), f"shots: every shot count must be at least 1, got {self.shots}")
        check(
            self.fewshot_val_per_class >= 0,
            f"fewshot_val_per_class: must not be negative, got {self.fewshot_val_per_class}",
        )
        for name in ("image_size", "resize_size"):
            value = getattr(self, name)
            check(value is None or value >= 1, f"{name}: must be at least 1 (or unset), got {value}")


@dataclass(kw_only=True)
class EvaluateConfig(EvaluationSettings):
    """`vit evaluate`: the settings, plus which model on which shards."""

    model: str = ""  # weights: a run, a checkpoint folder or a file (ours, or a released .npz/timm/HF)
    shards: str = ""  # the downstream set, as `vit shard` output
    # The pretrained weights the model was fine-tuned from (any form `model` takes): their frozen features are
    # few-shot evaluated too (`pretrained/fewshot/*`), and so is the same architecture left at its random
    # initialisation (`random_init/fewshot/*`): what the pretraining added, the paper's transfer measure.
    pretrained: str = ""
    random_init_seed: int = 0
    storage_options: dict = field(default_factory=dict)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


MAX_CONFUSION_CLASSES = 1000  # a confusion matrix of JFT's 18k classes would be 2.6 GB of counts


@dataclass
class EvaluationResult:
    metrics: dict[str, float]
    mlflow_run_id: str | None = None
    top1_correct: np.ndarray | None = None  # per image, in the stream's order: what a paired comparison needs
    labels: np.ndarray | None = None


def run_evaluation(
    cfg: EvaluateConfig,
    log: Callable[[str], None] = print,
    *,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    on_cluster: bool = False,
) -> EvaluationResult:
    """``evaluate_model`` as an MLflow run: the metrics, the confusion matrix (counts and a plot), the
    test shards as input, tagged with the model evaluated (and the run that trained it, via ``tags``).
    ``on_cluster``: scored by ``evaluate_on_cluster`` (on a GPU worker of the Ray cluster when it has one); the
    MLflow run is logged from here either way."""
    from pipelines.common.config import dump_config, to_dict

    tracker = Tracker.open(cfg.tracking)
    details: dict = {}
    metrics = (evaluate_on_cluster if on_cluster else evaluate_model)(cfg, log, details=details)
    per_image = {"top1_correct": details.get("top1_correct"), "labels": details.get("labels")}
    if tracker is None:
        return EvaluationResult(metrics, **per_image)
    config = {k: v for k, v in to_dict(cfg).items() if k != "tracking"}
    key = "evaluate:" + hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    shards = cfg.shards.rstrip("/")
    digest = dataset_fingerprint(shards, cfg.storage_options)
    run_id = tracker.start_run(
        key=key,
        name=f"evaluate {_model_label(cfg.model)} on {posixpath.basename(shards)}",
        parent_id=parent_run_id,
        tags={"vit.step": "evaluate", "vit.model": cfg.model, "vit.dataset": shards, **(tags or {})},
        description=(
            f"Top-1/top-5 of `{cfg.model}` on the {cfg.split} split of `{shards}`"
            + (
                f", and {'/'.join(map(str, cfg.shots))}-shot linear evaluation of its frozen features"
                if cfg.shots
                else ""
            )
        ),
    )
    tracker.log_params(run_id, config)
    tracker.log_dataset(run_id, shards, context="evaluation", digest=digest, name=posixpath.basename(shards))
    tracker.log_metrics(run_id, metrics)
    tracker.log_text(run_id, dump_config(cfg), "config.yaml")
    if "confusion" in details:
        classes = read_classes(cfg.shards, cfg.storage_options)
        confusion = details["confusion"]
        tracker.log_dict(run_id, {"classes": classes, "counts": confusion.tolist()}, "confusion_matrix.json")
        tracker.log_figure(run_id, confusion_figure(confusion, classes), "confusion_matrix.png")
    tracker.finish(run_id)
    return EvaluationResult(metrics, run_id, **per_image)


def _model_label(location: str) -> str:
    """``runs/finetune-x/checkpoint-00000500`` -> ``finetune-x@500``; other locations by their last part."""
    head, last = posixpath.split(location.rstrip("/"))
    if last.startswith("checkpoint-"):
        return f"{posixpath.basename(head)}@{int(last.removeprefix('checkpoint-'))}"
    return last


def confusion_figure(confusion: torch.Tensor, classes: list[str]):
    """Rows: the true class; columns: the predicted one; each row normalised to its class's images."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    n = len(classes)
    rates = confusion.double() / confusion.sum(dim=1, keepdim=True).clamp(min=1)
    figure = Figure(figsize=(2 + 0.45 * n, 1.5 + 0.45 * n), layout="constrained")
    ax = figure.add_subplot()
    image = ax.imshow(rates.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=ax, label="share of the true class")
    if n <= 50:
        ax.set_xticks(range(n), classes, rotation=90)
        ax.set_yticks(range(n), classes)
        for i in range(n):
            for j in range(n):
                if confusion[i, j]:
                    color = "white" if rates[i, j] > 0.5 else "black"
                    ax.text(j, i, str(int(confusion[i, j])), ha="center", va="center", fontsize=7, color=color)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    return figure


def evaluate_on_cluster(
    cfg: EvaluateConfig, log: Callable[[str], None] = print, *, details: dict | None = None
) -> dict[str, float]:
    """``evaluate_model``, in a Ray task holding one GPU when the Ray cluster has any, else in this process. The
    cluster: the connected one, or inside a Ray Job (``RAY_ADDRESS`` set) the job's; without either, this process
    (starting a Ray only to look for GPUs would cost more than it could save).

    The task's log lines are passed to ``log`` when it ends; ``details`` gets what ``evaluate_model`` puts there,
    plus ``worker``: the task's ``pid``, ``node`` and ``device``. A worker without CUDA (a GPU only declared to Ray)
    still evaluates, on its CPU."""
    import ray

    if not ray.is_initialized() and os.environ.get("RAY_ADDRESS"):
        from pipelines.common.ray import init_ray

        init_ray()
    if not ray.is_initialized() or not ray.cluster_resources().get("GPU", 0) > 0:
        return evaluate_model(cfg, log, details=details)
    task = ray.remote(num_gpus=1)(_evaluate_in_task)  # retried if its node dies: scoring again is harmless
    metrics, found, lines = ray.get(task.remote(cfg))
    for line in lines:
        log(line)
    if details is not None:
        details.update(found)
    return metrics


def _evaluate_in_task(cfg: EvaluateConfig) -> tuple[dict[str, float], dict, list[str]]:
    import ray

    lines: list[str] = []
    details: dict = {}
    device = _device()
    node = ray.get_runtime_context().get_node_id()
    lines.append(f"in a Ray task on node {node[:12]} (pid {os.getpid()}, {device})")
    metrics = evaluate_model(cfg, lines.append, details=details)
    details["worker"] = {"pid": os.getpid(), "node": node, "device": str(device)}
    return metrics, details, lines


def _device() -> torch.device:
    """Where scoring runs: the GPU Ray gave the task (it sets CUDA_VISIBLE_DEVICES), or this process's, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def evaluate_model(
    cfg: EvaluateConfig, log: Callable[[str], None] = print, *, details: dict | None = None
) -> dict[str, float]:
    """``{"eval/top1", "eval/top5", "fewshot/1shot", ...}``: top-k only when the head fits the set's classes.
    ``details``, when given, receives the ``confusion`` matrix (true class x predicted class counts)."""
    if not cfg.model or not cfg.shards:
        raise ValueError("model and shards are both needed")
    started = time.perf_counter()
    model, test = _model_and_test_set(cfg)
    image_size = model.config.img_size
    results: dict[str, float] = {}

    if model.config.num_classes == test.num_classes:
        scored = _score(model, _batches(test, cfg, image_size, cfg.resize_size), test.num_classes)
        if details is not None:
            details.update(scored)
            if not scored["confusion"].numel():
                details.pop("confusion")
        total = len(scored["top1_correct"])
        results.update({"eval/top1": scored["top1"], "eval/top5": scored["top5"], "eval/images": total})
        log(f"top-1 {results['eval/top1']:.2%}  top-5 {results['eval/top5']:.2%} on {total} {cfg.split} images")
    else:
        log(f"the head has {model.config.num_classes} classes, {cfg.shards} has {test.num_classes}: few-shot only")

    if cfg.fewshot_split and cfg.shots:
        fewshot = _fewshot(model, cfg, test, cfg.resize_size)
        results.update(fewshot)
        log("few-shot " + _shots_line(fewshot))
        if cfg.pretrained:
            pretrained = _load(cfg.pretrained, cfg)
            untrained = _reinitialised(pretrained, cfg.random_init_seed)
            # At its own resolution; with the fine-tuning's resize only where that is the same (else the default).
            resize = cfg.resize_size if pretrained.config.img_size == image_size else None
            for prefix, network in (("pretrained", pretrained), ("random_init", untrained)):
                results.update({f"{prefix}/{k}": v for k, v in _fewshot(network, cfg, test, resize).items()})
            log(
                f"few-shot of the pretrained model's frozen features {_shots_line(results, 'pretrained/')}; "
                f"at random init {_shots_line(results, 'random_init/')}"
            )
    results["eval/seconds"] = time.perf_counter() - started
    return results


def _fewshot(
    model: vit.VisionTransformer, cfg: EvaluateConfig, test: ShardSet, resize_size: int | None
) -> dict[str, float]:
    """``{"fewshot/1shot": ...}``: k-shot linear accuracy of ``model``'s frozen features, at its own resolution."""
    pool = open_shards(cfg.shards, cfg.fewshot_split, cfg.storage_options)
    image_size = model.config.img_size
    per_class = max(cfg.shots) + cfg.fewshot_val_per_class
    train_x, train_y = _features(model, _batches(pool, cfg, image_size, resize_size), per_class, pool.num_classes)
    test_x, test_y = _features(model, _batches(test, cfg, image_size, resize_size))
    return fewshot_accuracy(
        train_x, train_y, test_x, test_y, pool.num_classes, cfg.shots, val_per_class=cfg.fewshot_val_per_class
    )


def _shots_line(metrics: dict[str, float], prefix: str = "") -> str:
    return "  ".join(f"{k.rsplit('/', 1)[1]} {v:.2%}" for k, v in metrics.items() if k.startswith(prefix + "fewshot/"))


def _reinitialised(model: vit.VisionTransformer, seed: int) -> vit.VisionTransformer:
    """The same architecture, as initialised with ``seed`` and never trained; the global RNG is left alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = vit.VisionTransformer(model.config, device=next(model.parameters()).device)
    return fresh.eval()


@torch.no_grad()
def _score(model: vit.VisionTransformer, batches, num_classes: int) -> dict:
    """Top-1/top-5 over ``batches``, with what a paired comparison needs: each image's top-1 correctness and
    primary label, in the stream's order (fixed for given shards and loader settings)."""
    hits, correct, primaries = torch.zeros(2, dtype=torch.long), [], []
    n = num_classes if num_classes <= MAX_CONFUSION_CLASSES else 0
    confusion = torch.zeros(n, n, dtype=torch.long)
    device = next(model.parameters()).device
    for images, targets in batches:
        logits = model(normalize(images.to(device))).float().cpu()
        hits += torch.tensor([topk_hits(logits, targets, 1), topk_hits(logits, targets, 5)])
        predicted = logits.argmax(dim=-1)
        primary = targets.argmax(dim=-1) if targets.ndim == 2 else targets
        # multi-label: the top prediction is right when it is any of the image's labels (as topk_hits counts it)
        correct.append(targets.gather(1, predicted[:, None])[:, 0] > 0 if targets.ndim == 2 else predicted == targets)
        primaries.append(primary.clone())  # the loader refills its batch buffers (recycle_batches): keep a copy
        if n:
            confusion += torch.bincount(primary * n + predicted, minlength=n * n).view_as(confusion)
    if not correct:
        raise ValueError("no images to score")
    total = sum(len(c) for c in correct)
    return {
        "top1": hits[0].item() / total,
        "top5": hits[1].item() / total,
        "top1_correct": torch.cat(correct).numpy(),
        "labels": torch.cat(primaries).numpy(),
        "confusion": confusion,
    }


def top1_correct(cfg: EvaluateConfig) -> tuple[np.ndarray, np.ndarray]:
    """Each image's top-1 correctness and primary label on ``cfg.split`` (no few-shot): a champion re-scored on
    the challenger's evaluation set, in the same order as ``evaluate_model`` scores it with the same settings."""
    model, test = _model_and_test_set(cfg)
    if model.config.num_classes != test.num_classes:
        raise ValueError(f"{cfg.model}: its head has {model.config.num_classes} classes, the set {test.num_classes}")
    scored = _score(model, _batches(test, cfg, model.config.img_size, cfg.resize_size), test.num_classes)
    return scored["top1_correct"], scored["labels"]


def _model_and_test_set(cfg: EvaluateConfig) -> tuple[vit.VisionTransformer, ShardSet]:
    """The model to score (in eval mode, at ``cfg.image_size`` if set) and the split it is scored on."""
    return _load(cfg.model, cfg, cfg.image_size), open_shards(cfg.shards, cfg.split, cfg.storage_options)


def _load(location: str, cfg: EvaluateConfig, image_size: int | None = None) -> vit.VisionTransformer:
    path = local_weights(resolve_weights(location, cfg.storage_options), cfg.storage_options)
    return vit.load_model(path, device=_device(), **({"img_size": image_size} if image_size else {})).eval()


def _batches(
    shards: ShardSet, cfg: EvaluateConfig, image_size: int, resize_size: int | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    spec = StreamSpec(
        shards=shards,
        transform=build_transform("eval", image_size, resize_size),
        batch_size=cfg.batch_size,
        shuffle_block=1,
        repeat=False,
        recycle_batches=True,  # each batch is used (normalised into a new tensor) before the next is asked for
    )
    # uint8 pixels: moved to the model's device as they are (a quarter of the bytes of floats), normalised there.
    for images, targets, _ in make_loader(spec, workers=cfg.loader_workers):
        yield images, targets


@torch.no_grad()
def _features(
    model: vit.VisionTransformer, batches, keep_per_class: int | None = None, num_classes: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen representations (pre-logits) and primary labels; at most ``keep_per_class`` per class."""
    features, labels, counts = [], [], {}
    device = next(model.parameters()).device
    for images, targets in batches:
        primary = targets.argmax(dim=-1) if targets.ndim == 2 else targets
        if keep_per_class is not None:
            wanted = []
            for i, label in enumerate(primary.tolist()):
                if counts.get(label, 0) < keep_per_class:
                    counts[label] = counts.get(label, 0) + 1
                    wanted.append(i)
            if not wanted:
                continue
            images, primary = images[wanted], primary[wanted]
        tokens = model.forward_features(normalize(images.to(device)))
        features.append(model.forward_head(tokens, pre_logits=True).float().cpu())
        labels.append(primary.clone())  # a view of a buffer the loader refills, unless indexed above
        if keep_per_class is not None and sum(counts.values()) >= keep_per_class * num_classes:
            break  # every class has its examples: the rest of the pool is not needed
    if not features:
        raise ValueError("no images to compute features of")
    return torch.cat(features), torch.cat(labels)
