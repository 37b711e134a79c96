"""Data loading and training throughput against the bounds that frame them, measured in one run on one machine.

    .venv/bin/python bench/train.py            # ~8 min on 2 cores (corpus and shards made once, then cached)
    .venv/bin/python bench/train.py --quick    # smoke run: one round, a few batches and steps (~1 min)
    .venv/bin/python bench/train.py --data /path/to/shards --json out/bench-train.json

Data: a synthetic JFT-style corpus (``vit corpus synth``: --images JPEGs of --image-size px, --classes classes,
multi-label) sharded by ``vit shard`` (--shard-samples per tar), cached in --workdir; ``--data DIR`` uses an
existing ``vit shard`` output (its train split) instead. Every figure uses the pretrain transform (Inception crop,
flip, 224 px) and ``sample_rng`` per sample, as training does.

Data loading (P = --procs, B = --loader-batch):

* ``ceiling (1 proc)``: one process holds every sample's raw bytes in memory (read from the tars beforehand) and
  transforms them one after another. ``1 proc x P`` multiplies it by P: an upper bound that assumes P processes
  scale perfectly, which they do not when something else uses the cores.
* ``ceiling (P procs at once)``: P forked processes transform their shares of the same in-memory samples at the
  same time; images/s over the wall time from the common start to the last one's end. The loader is held to this
  one (target >= 90%): same processes, same cores, same moment.
* ``make_loader``: ``make_loader(StreamSpec(..., batch_size=B), workers=P)``; images/s from the arrival of batch
  --skip to that of batch --skip + --batches (start-up excluded). It reads the tars, shuffles, decodes, augments,
  collates and ships uint8 batches to the main process. ``0 workers`` runs the stream in the calling process and
  is compared with the 1-process ceiling: the stream's own cost, without the inter-process transfer.
* ``Ray Data``: ``read_webdataset(decoder=None)`` + ``map_batches`` (the same transform, batches of B) +
  ``iter_torch_batches(batch_size=B)`` on a local Ray of --ray-data-cpus CPUs, timed the same way, for the record.
  It runs under a timeout (--timeout): a hang or an error is reported, not waited on.

Each round (--rounds) is one subprocess running --inner passes of (ceiling 1 proc, loader in process, ceiling P
procs, loader with P workers) back to back, then one Ray Data subprocess. Ratios are taken within a pass (Ray
Data: against its round's median P-process ceiling); the table shows medians and the range over passes.

Training overhead (target <= 5%): ViT Ti/16 at 224 px, AdamW as the pretrain recipe sets it up (gradient clipping
at 1), the shards' loss (sigmoid for multi-label shards), --batch images per worker and step, --steps steps logged
every --log-every. Images/s per worker: all windows but the first (start-up), total images over total time.

* ``plain loop``: one process, ``torch.set_num_threads(1)`` and OMP_NUM_THREADS=1, fed by ``make_loader`` with
  1 loader worker, the same model ``run_training`` builds (``pipelines.training.weights.build_model``: pre-logits layer,
  head bias -10) and the same step (normalise, forward, loss, backward, clip, AdamW, zero_grad, ``.item()``s).
* ``run_training``: Ray Train with ``scale.num_workers=N``, ``scale.cpus_per_worker=1`` and
  ``data.loader_workers=1``; per-worker images/s from ``TrainResult.history``. Ray gives a 1-CPU actor
  OMP_NUM_THREADS=1: the script checks what a 1-CPU probe actor sees and prints it, so both sides train on one
  intra-op thread.

The plain loop runs before and after the one-worker run (A B A) and the mean of the two is the reference; the
two plain runs' difference is printed as the noise level. ``med vs plain`` compares median windows instead of
totals, which a short burst of outside load moves less.

Each job runs in a fresh subprocess (output in --workdir/logs). ``other CPU``: cores busy with processes that are
not this benchmark's (/proc/stat minus the CPU time of our processes) over the timed stretch (data rows) or the
whole training call (training rows). It errs high, never low. Well above 0 means something else competed for the
cores: absolute images/s are then low and the P-process ceiling falls short of 1 proc x P; ratios taken side by
side in time suffer less, but read them with the ranges.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from harness import CpuWindow, emit, median, run_worker, spread

IMAGE_SIZE = 224
MODEL = "Ti/16"
LOADER_TARGET = 0.90
OVERHEAD_TARGET = 0.05


# ---------------------------------------------------------------------------------------------- data workers


def _spec(shards_dir: str, batch: int, seed: int = 0):
    from pipelines.data.stream import StreamSpec, open_shards
    from vit.data import build_transform

    return StreamSpec(
        shards=open_shards(shards_dir, "train"),
        transform=build_transform("pretrain", IMAGE_SIZE),
        batch_size=batch,
        seed=seed,
    )


def _read_samples(shards_dir: str) -> list[tuple[str, bytes]]:
    """Every training sample's (key, image bytes), read from the tars into memory."""
    import fsspec

    from pipelines.data.stream import IMAGE_EXTENSIONS, iter_tar_samples, open_shards

    shards = open_shards(shards_dir, "train")
    samples = []
    for url in shards.urls:
        with fsspec.open(url, "rb") as f:
            for sample in iter_tar_samples(f):
                data = next(sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample)
                samples.append((sample["__key__"], data))
    return samples


def _transform_all(samples: list[tuple[str, bytes]], transform) -> None:
    from vit.data import sample_rng

    for key, data in samples:
        transform(data, sample_rng(0, 0, key))


def _ceiling_child(samples, transform, barrier, queue) -> None:
    import torch

    torch.set_num_threads(1)
    barrier.wait()
    start = time.perf_counter()
    _transform_all(samples, transform)
    queue.put((start, time.perf_counter()))


def ceiling_parallel(samples: list[tuple[str, bytes]], transform, procs: int) -> float:
    """images/s of ``procs`` forked processes transforming their shares of ``samples`` at once."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")  # the children inherit the samples: nothing is shipped to them
    barrier, queue = ctx.Barrier(procs), ctx.Queue()
    children = [
        ctx.Process(target=_ceiling_child, args=(samples[i::procs], transform, barrier, queue)) for i in range(procs)
    ]
    for child in children:
        child.start()
    spans = [queue.get() for _ in children]
    for child in children:
        child.join()
    return len(samples) / (max(end for _, end in spans) - min(start for start, _ in spans))


def time_batches(batches, skip: int, count: int) -> tuple[float, int]:
    """images/s from the arrival of batch ``skip`` to that of batch ``skip + count``, and the images counted."""
    iterator = iter(batches)
    for _ in range(skip + 1):
        next(iterator)
    start, images = time.perf_counter(), 0
    for _ in range(count):
        batch = next(iterator)
        images += len(batch[0] if isinstance(batch, list | tuple) else batch["image"])
    return images / (time.perf_counter() - start), images


def worker_data(shards_dir: str, opts: dict) -> dict:
    """``opts["inner"]`` passes of, back to back: ceiling 1 proc, make_loader in this process, ceiling P procs,
    make_loader with P workers."""
    import torch

    from pipelines.data.stream import make_loader

    torch.set_num_threads(1)
    procs, batch = opts["procs"], opts["batch"]
    spec = _spec(shards_dir, batch)
    samples = _read_samples(shards_dir)[: opts["ceiling_images"]]
    _transform_all(samples[:16], spec.transform)  # warm the libraries up
    passes = []
    for _ in range(opts["inner"]):
        cpu = CpuWindow()
        start = time.perf_counter()
        _transform_all(samples, spec.transform)
        single = len(samples) / (time.perf_counter() - start)
        single_other = cpu.other_cores()

        cpu = CpuWindow()
        inproc, _ = time_batches(make_loader(spec, workers=0), 1, opts["batches"])
        inproc_other = cpu.other_cores()

        cpu = CpuWindow()
        parallel = ceiling_parallel(samples, spec.transform, procs)
        parallel_other = cpu.other_cores()

        cpu = CpuWindow()
        # as the training loop uses it: batches consumed one at a time, their buffers recycled
        recycled = dataclasses.replace(spec, recycle_batches=True)
        rate, images = time_batches(make_loader(recycled, workers=procs), opts["skip"], opts["batches"])
        passes.append(
            {
                "ceiling_single": single,
                "ceiling_single_other": single_other,
                "inproc": inproc,
                "inproc_other": inproc_other,
                "ceiling_parallel": parallel,
                "ceiling_parallel_other": parallel_other,
                "loader": rate,
                "loader_other": cpu.other_cores(),
                "loader_images": images,
                "ceiling_images": len(samples),
            }
        )
    return {"passes": passes}


def worker_ray_data(shards_dir: str, opts: dict) -> dict:
    """read_webdataset(decoder=None) + map_batches(transform) + iter_torch_batches, on a local Ray."""
    import numpy as np
    import ray
    import ray.data

    from pipelines.data.stream import IMAGE_EXTENSIONS, open_shards
    from vit.data import encode_labels, sample_rng

    batch, skip, count = opts["batch"], opts["skip"], opts["batches"]
    spec = _spec(shards_dir, batch)
    shards = open_shards(shards_dir, "train")
    transform, classes, multi = spec.transform, shards.num_classes, shards.multi_label
    # enough passes over the tars for the timed batches (a Ray Dataset is one pass)
    passes = math.ceil((skip + count + 2) * batch / shards.samples)
    paths = [url for _ in range(passes) for url in shards.urls]

    def augment(rows: dict) -> dict:
        ext = next(e for e in IMAGE_EXTENSIONS if e in rows)
        images, targets = [], []
        for i, key in enumerate(rows["__key__"]):
            images.append(transform(rows[ext][i], sample_rng(0, 0, str(key))).numpy())
            if "json" in rows:
                ids = json.loads(rows["json"][i])["label_ids"]
            else:
                ids = [int(rows["cls"][i])]
            targets.append(encode_labels(ids, classes, multi_label=multi).numpy())
        return {"image": np.stack(images), "target": np.stack(targets)}

    ray.init(
        address="local",
        num_cpus=opts["ray_cpus"],
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    started = time.perf_counter()
    ds = ray.data.read_webdataset(paths, decoder=None)
    ds = ds.map_batches(augment, batch_size=batch, batch_format="numpy")
    cpu = CpuWindow(poll=True)
    rate, images = time_batches(ds.iter_torch_batches(batch_size=batch), skip, count)
    other = cpu.other_cores()
    return {
        "ray_data": rate,
        "ray_data_other": other,
        "ray_data_images": images,
        "seconds": time.perf_counter() - started,
    }


# ---------------------------------------------------------------------------------------------- training workers


def train_overrides(shards_dir: str, workdir: str, opts: dict, workers: int) -> list[str]:
    return [
        f"model={MODEL}",
        f"data.shards={shards_dir}",
        f"data.image_size={IMAGE_SIZE}",
        "data.loader_workers=1",
        "data.eval_split=null",
        f"batch_size={opts['batch'] * workers}",
        f"steps={opts['steps']}",
        f"log_every={opts['log_every']}",
        f"checkpoint_every={opts['steps']}",
        "keep_checkpoints=1",
        "max_failures=0",
        "optim.warmup_steps=0",
        f"scale.num_workers={workers}",
        "scale.cpus_per_worker=1",
        "scale.use_gpu=false",
        f"storage_path={workdir}/runs",
        f"name=bench-{os.getpid()}-{workers}",
    ]


def steady(windows: list[dict]) -> dict:
    """Images/s per worker and data-wait share over every logged window but the first (start-up)."""
    kept = windows[1:] or windows
    seconds = sum(w["seconds"] for w in kept)
    return {
        "per_worker": sum(w["images"] for w in kept) / seconds,
        "data_wait": sum(w["data_wait"] * w["seconds"] for w in kept) / seconds,
        "windows": [w["images"] / w["seconds"] for w in kept],
    }


def worker_plain(shards_dir: str, opts: dict) -> dict:
    """A plain single-process, single-threaded PyTorch loop fed by make_loader with one loader worker."""
    import torch

    from pipelines.data.stream import make_loader
    from pipelines.training.config import load_train_config
    from pipelines.training.driver import plan_training
    from pipelines.training.weights import build_model
    from vit.data import normalize
    from vit.train import build_optimizer, classification_loss, lr_at, set_lr

    torch.set_num_threads(1)
    cfg = load_train_config("pretrain", None, train_overrides(shards_dir, opts["workdir"], opts, 1))
    plan = plan_training(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, plan.num_classes, plan.multi_label)
    optimizer = build_optimizer(model, cfg.optim)
    spec = _spec(shards_dir, opts["batch"], cfg.seed)
    batches = iter(make_loader(spec, workers=1))
    model.train()
    windows, images, data_seconds = [], 0, 0.0
    cpu = CpuWindow()
    window_start = time.perf_counter()
    for step in range(plan.total_steps):
        set_lr(optimizer, lr_at(step, plan.total_steps, cfg.optim))
        started = time.perf_counter()
        x, y, _ = next(batches)
        data_seconds += time.perf_counter() - started
        loss = classification_loss(model(normalize(x)), y)
        loss.backward()
        loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip_norm).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        images += len(x)
        if (step + 1) % cfg.log_every == 0 or step + 1 == plan.total_steps:
            seconds = time.perf_counter() - window_start
            windows.append(
                {"step": step + 1, "images": images, "seconds": seconds, "data_wait": data_seconds / seconds}
            )
            window_start, images, data_seconds = time.perf_counter(), 0, 0.0
    return {
        **steady(windows),
        "history": windows,
        "threads": torch.get_num_threads(),
        "omp": os.environ.get("OMP_NUM_THREADS"),
        "other": cpu.other_cores(),
    }


def worker_ray_train(shards_dir: str, opts: dict) -> dict:
    """run_training with ``opts["workers"]`` one-CPU workers, one loader worker each."""
    import ray

    from pipelines.training.config import load_train_config
    from pipelines.training.driver import run_training

    workers = opts["workers"]
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)

    @ray.remote(num_cpus=1)
    class Probe:
        def threads(self) -> tuple[str | None, int]:
            import torch

            return os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()

    probe = Probe.remote()
    omp, threads = ray.get(probe.threads.remote())
    ray.kill(probe)
    cfg = load_train_config("pretrain", None, train_overrides(shards_dir, opts["workdir"], opts, workers))
    cpu = CpuWindow(poll=True)
    result = run_training(cfg, log=lambda *_: None)
    other = cpu.other_cores()
    shutil.rmtree(result.run_dir, ignore_errors=True)
    windows, previous = [], 0
    for record in result.history:
        images = (record["step"] - previous) * opts["batch"]
        seconds = images / record["train/images_per_s_per_worker"]
        windows.append(
            {"step": record["step"], "images": images, "seconds": seconds, "data_wait": record["train/data_wait"]}
        )
        previous = record["step"]
    return {**steady(windows), "history": windows, "threads": threads, "omp": omp, "other": other}


# ---------------------------------------------------------------------------------------------- driver


def ensure_shards(workdir: Path, images: int, image_size: int, classes: int, shard_samples: int) -> Path:
    from pipelines.data.corpus import synth_corpus

    corpus = workdir / f"corpus-{images}-{image_size}px-{classes}c"
    shards = workdir / f"shards-{images}-{image_size}px-{classes}c-{shard_samples}"
    if not (corpus / "labels.parquet").exists():
        print(f"generating a {images:,}-image corpus of {image_size} px JPEGs in {corpus} ...", flush=True)
        synth_corpus(
            str(corpus), images=images, classes=classes, seed=0, image_size=image_size, workers=os.cpu_count() or 1
        )
    if not (shards / "_info.json").exists():
        print(f"sharding it into {shards} ...", flush=True)
        opts = json.dumps({"dst": str(shards), "n": shard_samples})
        result = run_worker(
            [__file__, "--worker", "shard", str(corpus), opts],
            timeout=900,
            log=workdir / "logs" / "shard.log",
            raise_on_error=False,
        )
        if "error" in result:
            raise RuntimeError(f"sharding failed: {result['error']}")
    return shards


def worker_shard(corpus: str, opts: dict) -> dict:
    import ray

    from pipelines.data.shards import ShardConfig, shard_corpus

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    summary = shard_corpus(ShardConfig(src=corpus, dst=opts["dst"], shard_samples=opts["n"]), log=lambda *_: None)
    return {"written": summary.written, "shards": summary.shards}


def ratio_text(value: float | None) -> str:
    return "" if value is None else f"{value:.1%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "vit-bench-train")
    parser.add_argument("--data", help="an existing `vit shard` output (path or fsspec URL; its train split)")
    parser.add_argument("--images", type=int, default=1500, help="synthetic corpus size")
    parser.add_argument("--image-size", type=int, default=256, help="side of the synthetic JPEGs in pixels")
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--shard-samples", type=int, default=200)
    parser.add_argument("--procs", type=int, default=2, help="loader workers, and processes of the ceiling")
    parser.add_argument("--loader-batch", type=int, default=32, help="batch size of the data-loading jobs")
    parser.add_argument("--batches", type=int, default=40, help="timed batches of the data-loading jobs")
    parser.add_argument("--skip", type=int, default=6, help="batches before timing starts (start-up)")
    parser.add_argument("--ceiling-images", type=int, default=1500, help="in-memory samples the ceilings transform")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of (ceilings + loader, Ray Data)")
    parser.add_argument("--inner", type=int, default=3, help="passes of (ceilings, loader) in a round's process")
    parser.add_argument("--ray-data-cpus", type=int, default=os.cpu_count() or 1, help="num_cpus of Ray Data's Ray")
    parser.add_argument("--no-ray-data", action="store_true")
    parser.add_argument("--batch", type=int, default=16, help="training images per worker and step")
    parser.add_argument("--steps", type=int, default=48, help="training steps per run")
    parser.add_argument("--log-every", type=int, default=8, help="training steps per measured window")
    parser.add_argument("--train-workers", type=int, nargs="*", default=[1, 2], help="run_training worker counts")
    parser.add_argument("--no-train", action="store_true")
    parser.add_argument("--timeout", type=float, default=300, help="seconds a Ray Data job may take")
    parser.add_argument("--quick", action="store_true", help="a smoke run: one round, few batches and steps")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", nargs=3, metavar=("KIND", "DATA", "OPTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        kind, data, opts = args.worker
        fn = {
            "shard": worker_shard,
            "data": worker_data,
            "raydata": worker_ray_data,
            "plain": worker_plain,
            "raytrain": worker_ray_train,
        }
        emit(fn[kind](data, json.loads(opts)))
        return

    if args.quick:
        args.rounds, args.inner, args.batches, args.skip, args.ceiling_images = 1, 1, 8, 3, 256
        args.steps, args.log_every, args.train_workers = 4, 2, [1]
    started = time.perf_counter()
    args.workdir.mkdir(parents=True, exist_ok=True)
    shards = (
        (args.data if "://" in args.data else os.path.abspath(args.data))
        if args.data
        else ensure_shards(args.workdir, args.images, args.image_size, args.classes, args.shard_samples)
    )
    cores, procs, batch = os.cpu_count() or 1, args.procs, args.loader_batch
    load = os.getloadavg()
    logs = args.workdir / "logs"
    print(f"{cores} cores, load average {load[0]:.1f} at the start; shards {shards}; job logs in {logs}", flush=True)
    data_opts = {
        "procs": procs,
        "batch": batch,
        "batches": args.batches,
        "skip": args.skip,
        "ceiling_images": args.ceiling_images,
        "inner": args.inner,
        "ray_cpus": args.ray_data_cpus,
    }

    # ---- data loading: rounds of (ceilings + make_loader, Ray Data)
    rounds = []
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}: ceilings and make_loader ...", flush=True)
        data = run_worker(
            [__file__, "--worker", "data", str(shards), json.dumps(data_opts)],
            timeout=900,
            log=logs / f"data-{r}.log",
            raise_on_error=False,
        )
        ray_data = None
        if not args.no_ray_data:
            print(f"round {r + 1}/{args.rounds}: Ray Data ...", flush=True)
            job = ["--worker", "raydata", str(shards), json.dumps(data_opts)]
            ray_data = run_worker(
                [__file__, *job], timeout=args.timeout, log=logs / f"raydata-{r}.log", raise_on_error=False
            )
        rounds.append({"data": data, "ray_data": ray_data})

    # ---- training: plain, run_training(1 worker), plain again (ABA), then the other worker counts
    train: list[dict] = []
    if not args.no_train:
        train_opts = {"batch": args.batch, "steps": args.steps, "log_every": args.log_every}
        train_opts["workdir"] = str(args.workdir)
        jobs: list[tuple[str, int]] = [("plain", 1)]
        for i, workers in enumerate(args.train_workers):
            jobs.append(("raytrain", workers))
            if i == 0:
                jobs.append(("plain", 1))
        for kind, workers in jobs:
            what = "plain loop" if kind == "plain" else f"run_training with {workers} worker(s)"
            print(f"training: {what}, {args.steps} steps of {args.batch} images per worker ...", flush=True)
            env = {"OMP_NUM_THREADS": "1"} if kind == "plain" else None
            opts = json.dumps({**train_opts, "workers": workers})
            log = logs / f"{kind}-{workers}-{len(train)}.log"
            result = run_worker(
                [__file__, "--worker", kind, str(shards), opts], timeout=1200, log=log, env=env, raise_on_error=False
            )
            train.append({"kind": kind, "workers": workers, **result})

    wall = time.perf_counter() - started
    summary = report(args, rounds, train, cores)
    print(f"\nwall time {wall:.0f} s (data preparation included)")
    if args.json:
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "worker"}
        out = {"config": config, "shards": str(shards), "cores": cores, "load_at_start": load}
        out.update(rounds=rounds, train=train, summary=summary, wall_s=wall)
        args.json.write_text(json.dumps(out, indent=1))


def _round_ceiling(data: dict) -> float | None:
    if "error" in data:
        return None
    return statistics.median(p["ceiling_parallel"] for p in data["passes"])


def _ratios(values: list[float], references: list[float]) -> list[float]:
    return [v / r for v, r in zip(values, references)]


def report(args, rounds: list[dict], train: list[dict], cores: int) -> dict:
    procs, summary = args.procs, {}
    good = [p for r in rounds if "error" not in r["data"] for p in r["data"]["passes"]]
    print(
        f"\nData loading: pretrain transform (Inception crop + flip) to {IMAGE_SIZE} px, batch {args.loader_batch}, "
        f"{len(good)} measurements of each ({len(rounds)} rounds x {args.inner}), medians; {cores} cores"
    )
    print(f"{'method':<46}{'images/s':>10}{'vs':>9}{'ratio':>8}{'range':>11}{'target':>8}{'other CPU':>11}")
    for r in rounds:
        if "error" in r["data"]:
            print(f"{'ceilings + make_loader':<46}  failed: {r['data']['error']}")
    if good:
        single = [d["ceiling_single"] * procs for d in good]
        parallel = [d["ceiling_parallel"] for d in good]
        loader = [d["loader"] for d in good]
        one = [d["ceiling_single"] for d in good]
        inproc = [d["inproc"] for d in good]
        ones, par = "1 proc", f"{procs} procs"
        target = f">={LOADER_TARGET:.0%}"
        rows = [
            ("ceiling (1 proc)", one, ones, _ratios(one, one), "", "ceiling_single_other"),
            ("make_loader, 0 workers (in the process)", inproc, ones, _ratios(inproc, one), "", "inproc_other"),
            (
                f"ceiling (1 proc x {procs}, upper bound)",
                single,
                par,
                _ratios(single, parallel),
                "",
                "ceiling_single_other",
            ),
            (
                f"ceiling ({procs} procs at once)",
                parallel,
                par,
                _ratios(parallel, parallel),
                "",
                "ceiling_parallel_other",
            ),
            (f"make_loader, {procs} workers", loader, par, _ratios(loader, parallel), target, "loader_other"),
        ]
        for name, rates, reference, ratios, target, other in rows:
            print(
                f"{name:<46}{median(rates):>10,.0f}{reference:>9}{median(ratios):>8.1%}{spread(ratios):>11}"
                f"{target:>8}{median([d[other] for d in good]):>11.2f}"
            )
        summary["ceiling_1proc_x"] = median(single)
        summary["ceiling_parallel"] = median(parallel)
        summary["loader"] = median(loader)
        summary["loader_vs_ceiling"] = median([x / p for x, p in zip(loader, parallel)])
        summary["loader_vs_upper_bound"] = median([x / s for x, s in zip(loader, single)])
        summary["inproc_loader_vs_1proc"] = median([d["inproc"] / d["ceiling_single"] for d in good])
    if not args.no_ray_data:
        # Ray Data against the median P-process ceiling of its own round
        pairs = [(_round_ceiling(r["data"]), r["ray_data"]) for r in rounds]
        ok = [(c, rd) for c, rd in pairs if "error" not in rd and c is not None]
        name = f"Ray Data ({args.ray_data_cpus} CPUs): read_webdataset+map_batches"
        if ok:
            rates = [rd["ray_data"] for _, rd in ok]
            ratios = [rd["ray_data"] / c for c, rd in ok]
            others = [rd["ray_data_other"] for _, rd in ok]
            print(
                f"{name:<46}{median(rates):>10,.0f}{f'{procs} procs':>9}{median(ratios):>8.1%}{spread(ratios):>11}"
                f"{'record':>8}{median(others):>11.2f}"
            )
            summary["ray_data"] = median(rates)
            summary["ray_data_vs_ceiling"] = median(ratios)
        for _, rd in pairs:
            if "error" in rd:
                print(f"{name:<46}  failed: {rd['error']}")
                summary.setdefault("ray_data_errors", []).append(rd["error"])
    if "loader_vs_ceiling" in summary:
        print(
            f"make_loader = {summary['loader_vs_ceiling']:.1%} of the {procs}-process ceiling "
            f"({summary['loader_vs_upper_bound']:.1%} of 1 proc x {procs}); target >= {LOADER_TARGET:.0%}: "
            f"{'met' if summary['loader_vs_ceiling'] >= LOADER_TARGET else 'NOT met'}"
        )

    if not train:
        return summary
    print(
        f"\nTraining: ViT {MODEL} at {IMAGE_SIZE} px on CPU, {args.batch} images per worker and step, {args.steps} "
        f"steps, windows of {args.log_every} (the first excluded); 1 intra-op thread per training process"
    )
    print(
        f"{'method':<40}{'img/s/worker':>13}{'vs plain':>10}{'windows min/med/max':>21}{'med vs plain':>14}"
        f"{'target':>10}{'data wait':>11}{'other CPU':>11}"
    )
    plain = [t for t in train if t["kind"] == "plain" and "error" not in t]
    reference = statistics.mean(t["per_worker"] for t in plain) if plain else None
    reference_med = statistics.mean(statistics.median(t["windows"]) for t in plain) if plain else None
    summary["plain_per_worker"] = reference
    summary["plain_median_window"] = reference_med
    for i, t in enumerate(train):
        if t["kind"] == "plain":
            name = f"plain loop, run {sum(1 for u in train[: i + 1] if u['kind'] == 'plain')}"
            target = ""
        else:
            name = f"run_training, {t['workers']} worker{'s' if t['workers'] > 1 else ''}"
            target = f"<={OVERHEAD_TARGET:.0%} off" if t["workers"] == 1 else ""
        if "error" in t:
            print(f"{name:<40}  failed: {t['error']}")
            continue
        window_median = statistics.median(t["windows"])
        ratio = t["per_worker"] / reference if reference else None
        ratio_med = window_median / reference_med if reference_med else None
        windows = f"{min(t['windows']):.1f}/{window_median:.1f}/{max(t['windows']):.1f}"
        print(
            f"{name:<40}{t['per_worker']:>13.2f}{ratio_text(ratio):>10}{windows:>21}{ratio_text(ratio_med):>14}"
            f"{target:>10}{t['data_wait']:>11.1%}{t['other']:>11.2f}"
        )
        if t["kind"] == "raytrain":
            key = f"ray_train_{t['workers']}"
            summary[f"{key}_per_worker"] = t["per_worker"]
            summary[f"{key}_total"] = t["per_worker"] * t["workers"]
            summary[f"{key}_vs_plain"] = ratio
            summary[f"{key}_median_vs_plain"] = ratio_med
    threads = {f"{t['kind']}": (t.get("omp"), t.get("threads")) for t in train if "error" not in t}
    print(
        "threads: plain loop OMP_NUM_THREADS={} torch threads {}; a 1-CPU Ray actor sees OMP_NUM_THREADS={} and "
        "torch threads {}".format(*threads.get("plain", (None, None)), *threads.get("raytrain", (None, None)))
    )
    if len(plain) >= 2:
        rates = [t["per_worker"] for t in plain]
        summary["plain_spread"] = (max(rates) - min(rates)) / statistics.mean(rates)
        print(f"the plain-loop runs differ by {summary['plain_spread']:.1%} between themselves: the noise level")
    if summary.get("ray_train_1_vs_plain") is not None:
        overhead = 1 - summary["ray_train_1_vs_plain"]
        print(
            f"run_training (1 worker) = {summary['ray_train_1_vs_plain']:.1%} of the plain loop's images/s "
            f"({summary['ray_train_1_median_vs_plain']:.1%} by median windows): overhead {overhead:.1%}; "
            f"target <= {OVERHEAD_TARGET:.0%}: {'met' if overhead <= OVERHEAD_TARGET else 'NOT met'}"
        )
    for t in train:
        if t["kind"] == "raytrain" and t["workers"] > 1 and "error" not in t and reference:
            total = t["per_worker"] * t["workers"]
            print(
                f"run_training ({t['workers']} workers): {total:.2f} images/s in all, {total / reference:.2f}x "
                f"the plain loop's"
            )
    return summary


if __name__ == "__main__":
    main()
