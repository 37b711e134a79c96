"""Does pretraining transfer at demo scale? Few-shot digits on frozen features: pretrained against random weights.

How to run
----------
    .venv/bin/python bench/transfer.py                 # the demo's corpus and recipe, 3 seeds: ~5 min on 2 cores
    .venv/bin/python bench/transfer.py --seeds 1 --steps 200 --images 2000   # smoke run, 15 s (worse than random)
    .venv/bin/python bench/transfer.py --set pretrain_data.synth.style=shapes   # any `vit run` override

What is measured
----------------
The paper's central claim in miniature (its Fig. 3/4 protocol): k-shot linear accuracy (closed-form ridge
regression, as ``vit evaluate``'s few-shot) on the 1,797 bundled digits (the pipeline's split: 1,437 to draw the
shots from, 360 to test), of the frozen representation of

* ``random``: the pretraining architecture (the demo's ViT-Mu/8 with its representation layer) as initialised
  with the seed, never trained;
* ``pretrained``: the same initialisation after the demo config's pretraining (``pipelines/configs/local.yaml``:
  corpus, model, steps, batch, optimiser, schedule, augmentation, and the loss the trainer picks for the
  labels: softmax when every image has one, sigmoid on multi-labels).

The pretraining corpus and the digits are written in memory (``memory://``) by the pipeline's own ``synth_corpus``
and ``import_digits``, with the config's settings (the same bytes as `vit run` writes), and the pretraining runs in
this one process
(``vit.train.train_step``, the same step as every Ray Train worker): the pipeline's data-parallel run reads the
images in another order, so its figures differ within seed noise. Each seed changes the initialisation, the data
order and the augmentation; every model's few-shot figure is the mean over ``--shot-draws`` draws of the shots.
The table ends with the mean and the standard deviation over seeds, and the margin: the mean difference in
points with the smaller of the per-seed differences, against the larger of the two seed spreads.

It also prints, for each pretrained model, the numbers behind the paper's Fig. 7 (``vit.analysis``): the
Spearman correlation between position-embedding similarity and 2-D patch distance, how much more alike the
embeddings of a row or a column are than others as far apart, and the mean attention distance of every block.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from harness import print_table  # noqa: E402  (bench/ is not a package)

import vit  # noqa: E402
from pipelines.common.storage import filesystem  # noqa: E402
from pipelines.data.corpus import import_digits, synth_corpus  # noqa: E402
from pipelines.orchestration.config import load_pipeline_config  # noqa: E402
from vit.analysis import fig7_statistics  # noqa: E402
from vit.data import build_transform, normalize, sample_rng  # noqa: E402
from vit.evaluate import fewshot_accuracy  # noqa: E402
from vit.train import build_optimizer, lr_at, train_step  # noqa: E402


def _written(url: str) -> tuple[list[dict], list[bytes]]:
    """A corpus written here: its label table's rows and each row's image bytes, in the table's order."""
    fs, root = filesystem(url)
    with fs.open(f"{root}/labels.parquet", "rb") as f:
        rows = pq.read_table(f).to_pylist()
    data = fs.cat([f"{root}/{row['path']}" for row in rows])
    return rows, [data[f"{root}/{row['path']}"] for row in rows]


def corpus(cfg, images: int) -> tuple[list[bytes], torch.Tensor, int]:
    """The config's pretraining corpus (``images`` of them) as ``synth_corpus`` writes it, in memory: the encoded
    images, and their targets as the trainer makes them (class ids when every image has one label, else multi-hot)."""
    url = f"memory://transfer-bench-{os.getpid()}/synth"
    synth_corpus(url, **{**dataclasses.asdict(cfg.pretrain_data.synth), "images": images}, overwrite=True)
    rows, encoded = _written(url)
    fs, root = filesystem(url)
    num_classes = len(json.loads(fs.cat_file(f"{root}/classes.json")))
    if all(len(row["label_ids"]) == 1 for row in rows):
        return encoded, torch.tensor([row["label_ids"][0] for row in rows]), num_classes
    targets = torch.zeros(len(rows), num_classes)
    for index, row in enumerate(rows):
        targets[index, row["label_ids"]] = 1.0
    return encoded, targets, num_classes


def digits(cfg) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The bundled digits as the pipeline imports (``import_digits``: its split) and evaluates them (the evaluate
    step's crop: its own resize_size, else the fine-tuning's): the train split's pixels and labels, then the test's."""
    url = f"memory://transfer-bench-{os.getpid()}/digits"
    import_digits(url, overwrite=True)
    rows, encoded = _written(url)
    ft = cfg.finetune.data
    transform = build_transform("eval", ft.image_size, cfg.evaluate.resize_size or ft.resize_size)
    pixels = torch.stack([transform(data) for data in encoded])
    labels = torch.tensor([row["primary_class"] for row in rows])
    test = torch.tensor([row["split"] == "test" for row in rows])
    return pixels[~test], labels[~test], pixels[test], labels[test]


@torch.no_grad()
def features(model: vit.VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat(
        [
            model.forward_head(model.forward_features(normalize(x[i : i + 256])), pre_logits=True)
            for i in range(0, len(x), 256)
        ]
    )


def fewshot(model, digit_set, shots, draws: int) -> dict[int, float]:
    train_x, train_y, test_x, test_y = digit_set
    a, b = features(model, train_x), features(model, test_x)
    results = [fewshot_accuracy(a, train_y, b, test_y, 10, shots, seed=d) for d in range(draws)]
    return {k: statistics.fmean(r[f"fewshot/{k}shot"] for r in results) for k in shots}


def build(cfg, num_classes: int, seed: int) -> vit.VisionTransformer:
    p = cfg.pretrain
    torch.manual_seed(seed)
    width = vit.model_config(p.model).width
    return vit.create_model(
        p.model, num_classes=num_classes, img_size=p.data.image_size, representation_size=width, **p.model_args
    )


def pretrain(cfg, model, encoded: list[bytes], targets: torch.Tensor, seed: int, steps: int) -> float:
    """The config's pretraining recipe in this process; returns the last 20 steps' mean loss."""
    p = cfg.pretrain
    transform = build_transform("pretrain", p.data.image_size, flip=p.data.flip, crop_area_min=p.data.crop_area_min)
    optimizer = build_optimizer(model, p.optim)
    order = np.random.default_rng([seed, 7])
    losses = []
    for step in range(steps):
        index = order.integers(0, len(encoded), size=p.batch_size)
        images = torch.stack([transform(encoded[i], sample_rng(seed, step, str(i))) for i in index])
        lr = lr_at(step, steps, p.optim)
        losses.append(
            train_step(
                model, optimizer, normalize(images), targets[index], lr=lr, grad_clip_norm=p.optim.grad_clip_norm
            )["train/loss"]
        )
    return statistics.fmean(losses[-20:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="a `vit run` config (default: the embedded demo)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="override, e.g. pretrain.steps=500"
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="pretraining steps [default: the config's]")
    parser.add_argument("--images", type=int, default=None, help="corpus size [default: the config's]")
    parser.add_argument("--shot-draws", type=int, default=3, help="draws of the k shots per model")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_pipeline_config(args.config, args.overrides)
    s, p = cfg.pretrain_data.synth, cfg.pretrain
    steps, images = args.steps or p.steps, args.images or s.images
    shots = tuple(cfg.evaluate.shots)
    started = time.perf_counter()
    encoded, targets, num_classes = corpus(cfg, images)
    digit_set = digits(cfg)
    print(
        f"corpus: {images} {s.style} images of {s.classes} classes ({s.image_size} px"
        f"{f', scanned at {s.scan_size} px' if s.style == 'glyphs' and s.scan_size else ''}), "
        f"{time.perf_counter() - started:.0f} s; pretraining {p.model}, {steps} steps of {p.batch_size}, "
        f"lr {p.optim.lr}"
    )
    rows, results, fig7 = [], {"random": [], "pretrained": []}, []
    for seed in range(args.seeds):
        model = build(cfg, num_classes, seed)
        results["random"].append(fewshot(model, digit_set, shots, args.shot_draws))
        t = time.perf_counter()
        loss = pretrain(cfg, model, encoded, targets, seed, steps)
        seconds = time.perf_counter() - t
        results["pretrained"].append(fewshot(model, digit_set, shots, args.shot_draws))
        fig7.append(fig7_statistics(model, digit_set[2][:64]))
        for kind in ("random", "pretrained"):
            extra = f"{loss:.3f}, {seconds:.0f} s" if kind == "pretrained" else "-"
            rows.append([kind, str(seed), *(f"{results[kind][-1][k]:.1%}" for k in shots), extra])
    for kind in ("random", "pretrained"):
        per_shot = [[r[k] for r in results[kind]] for k in shots]
        rows.append([kind, "mean", *(f"{statistics.fmean(v):.1%}" for v in per_shot), ""])
        if args.seeds > 1:
            rows.append([kind, "sd", *(f"{statistics.stdev(v):.1%}" for v in per_shot), ""])
    margin = []
    for k in shots:
        gaps = [b[k] - a[k] for a, b in zip(results["random"], results["pretrained"])]
        spread = max(statistics.stdev([r[k] for r in results[kind]]) if args.seeds > 1 else 0.0 for kind in results)
        margin.append(f"{statistics.fmean(gaps):+.1%} (min {min(gaps):+.1%}, sd {spread:.1%})")
    rows.append(["pretrained - random", "", *margin, ""])
    print_table(["features", "seed", *(f"{k}-shot" for k in shots), "final loss, time"], rows, left=2)
    print("\nFig. 7 on each pretrained model (vit.analysis.fig7_statistics):")
    fig_rows = [
        [
            str(seed),
            f"{f['position_spearman']:+.2f}",
            f"{f['row_column_excess']:+.3f}",
            " ".join(f"{d:.1f}" for d in f["attention_distance_by_block"]),
            " ".join(f"{lo:.1f}-{hi:.1f}" for lo, hi in f["attention_distance_range_by_block"]),
        ]
        for seed, f in enumerate(fig7)
    ]
    print_table(["seed", "pos-emb Spearman", "row/col excess", "mean distance by block (px)", "head range"], fig_rows)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
