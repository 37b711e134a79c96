"""Training throughput on GPUs: ViT-B/16 at 224 px in bf16, eager against ``torch.compile``d blocks, DDP against
FSDP2, as the training workers run it (``pipelines.training.parallel`` and ``vit.train.train_step``); images/s, MFU
and memory per image.

How to run
----------
    .venv/bin/python bench/gpu.py                   # B/16, 224 px, batch 128 per GPU, every GPU torch sees
    .venv/bin/python bench/gpu.py --model L/16 --batch 64 --steps 50 --json out/bench-gpu.json
    .venv/bin/python bench/gpu.py --cpu-smoke       # Mu/8 at 32 px on CPU for a few steps: checks the script (~10 s)

Not yet run on a GPU here: no figures to quote. Expect minutes per GPU run, most of them Inductor compiling B/16's
block (forward and backward) in each compiled way's warm-up.

Without CUDA (and without ``--cpu-smoke``) it says so and exits with status 2.

What is measured
----------------
Four ways, each in a fresh process (``harness.run_worker``), one after the other: DDP and FSDP2, each eager and
compiled. A way runs one rank per GPU (``--gpus``, default all: ranks spawned by ``torch.multiprocessing``, NCCL; a
single GPU is a process group of one, so the wrapper's own cost still counts). Each rank builds the model as
``spread_model`` does for that strategy, whatever the number of ranks:

* ``ddp``: the whole model on the GPU, ``scale.compile``'s compiled blocks, ``DistributedDataParallel``;
* ``fsdp``: built on the meta device, blocks compiled, ``parallel.shard`` (one unit per block, the policy of
  ``scale.precision=bf16``: bf16 weights and compute, fp32 master weights and gradient reduction), then
  ``parallel.materialise``.

Every step is ``vit.train.train_step`` as a worker runs it: bf16 autocast, AdamW (the pretrain recipe's), global
gradient-norm clipping at 1, the loss read back (one host sync a step, as in training), on a fixed random batch of
``--batch`` images per GPU already on the GPU (no data loading: ``bench/train.py`` measures that). ``--warmup``
steps first (they include compilation, reported as ``warm-up s``), then ``--steps`` timed steps between two CUDA
synchronisations.

* ``images/s``: all GPUs together; ``images/s/GPU``: per rank (rank 0's, the ranks run in lockstep).
* ``MFU``: 3 x the model's forward FLOPs (``VisionTransformer.flops_per_image``, the matmuls: 35.1 GFLOP for B/16 at
  224, so 105.4 GFLOP per trained image) x images/s/GPU / the GPU's dense bf16 peak
  (``pipelines.training.loop.PEAK_BF16_FLOPS`` by device name, or ``--peak-tflops``). Attention's softmax, norms and
  the optimizer are not counted, as usual for MFU.
* ``MiB/image``: ``torch.cuda.max_memory_allocated()`` over the timed steps (peak statistics reset after warm-up)
  / the batch: weights, gradients, AdamW moments and activations, per image of the batch; ``peak GiB`` the same
  peak. PyTorch tensors only: not the caching allocator's slack, not the CUDA context.

The ratios compare ways measured in the same run: compiled / eager for each strategy, FSDP2 / DDP for each mode.
``--cpu-smoke`` runs the same code on CPU (gloo, bf16 autocast) with a tiny model, the ``aot_eager`` backend and a
few steps, compiled by Dynamo alone (backend ``eager``), so that a test can run the script in seconds; its figures
mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from harness import MIB, emit, print_table, run_worker

WAYS = (("ddp", False), ("ddp", True), ("fsdp", False), ("fsdp", True))
SMOKE = {"model": "Mu/8", "image_size": 32, "classes": 10, "batch": 8, "warmup": 1, "steps": 2, "backend": "eager"}


# ---------------------------------------------------------------------------------------------- worker side


def _build(args: argparse.Namespace, device, world: int):
    """The model of one way on this rank, as ``spread_model`` builds it for that strategy with
    ``scale.precision=bf16`` and ``scale.compile`` (which wraps a lone rank in nothing: here it is wrapped)."""
    import torch

    import vit
    from pipelines.training.config import ScaleConfig
    from pipelines.training.parallel import ParallelModel, _prepare, materialise, shard

    config = vit.model_config(args.model, img_size=args.image_size, num_classes=args.classes)
    scale = ScaleConfig(strategy=args.strategy, precision="bf16", compile=args.compiled)
    torch.manual_seed(0)
    if args.strategy == "fsdp":
        model = vit.VisionTransformer(config, device="meta")
        _prepare(model, scale)
        shard(model, world=world, device=device, bf16=True)
        materialise(model, device)
        return ParallelModel(model, model, "fsdp", True, device)
    from torch.nn.parallel import DistributedDataParallel

    model = vit.VisionTransformer(config, device=device)
    _prepare(model, scale)
    wrapped = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    return ParallelModel(model, wrapped, "ddp", True, device)


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    import warnings

    import torch
    import torch.distributed as dist

    from vit.train import OptimConfig, build_optimizer, train_step

    warnings.simplefilter("ignore")
    cuda = not args.cpu_smoke
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    if args.backend != "inductor":  # what scale.compile does (Module.compile), with another backend
        compile_module = torch.nn.Module.compile
        torch.nn.Module.compile = lambda self, *a, **kw: compile_module(self, *a, **{"backend": args.backend, **kw})
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # device_id: NCCL binds the group to this rank's GPU now, rather than guessing at the first collective.
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world, device_id=device if cuda else None)
    try:
        parallel = _build(args, device, world)
        optimizer = build_optimizer(parallel.model, OptimConfig(lr=1e-4, weight_decay=0.1))
        generator = torch.Generator(device).manual_seed(rank)
        images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device, generator=generator)
        targets = torch.randint(0, args.classes, (args.batch,), device=device, generator=generator)

        def step() -> dict:
            return train_step(parallel.wrapped, optimizer, images, targets, lr=1e-4, autocast=parallel.autocast)

        started = time.perf_counter()
        for _ in range(args.warmup):
            metrics = step()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        warmup = time.perf_counter() - started
        dist.barrier()
        started = time.perf_counter()
        for _ in range(args.steps):
            metrics = step()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated() if cuda else None
        figures = {
            "seconds": seconds,
            "warmup_seconds": warmup,
            "images_per_s_per_gpu": args.batch * args.steps / seconds,
            "peak_bytes": peak,
            "loss": metrics["train/loss"],
            "flops_per_image": parallel.model.flops_per_image(),
            "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
            "compiled_blocks": sum(block._compiled_call_impl is not None for block in parallel.model.blocks),
        }
        dist.barrier()
    finally:
        dist.destroy_process_group()
    Path(out, f"rank-{rank}.json").write_text(json.dumps(figures))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(args: argparse.Namespace) -> None:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="vit-bench-gpu-") as out:
        if args.gpus == 1:  # a group of one in this process: no spawn, one CUDA context fewer
            _rank(0, 1, _free_port(), args, out)
        else:
            mp.spawn(_rank, args=(args.gpus, _free_port(), args, out), nprocs=args.gpus)
        ranks = [json.loads(Path(out, f"rank-{r}.json").read_text()) for r in range(args.gpus)]
    first = ranks[0]
    emit(
        {
            **first,
            "gpus": args.gpus,
            "images_per_s": sum(r["images_per_s_per_gpu"] for r in ranks),
            "peak_bytes": max(r["peak_bytes"] for r in ranks) if first["peak_bytes"] is not None else None,
        }
    )


# ---------------------------------------------------------------------------------------------- parent side


def _peak_flops(device_name: str, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    from pipelines.training.loop import PEAK_BF16_FLOPS

    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in device_name), None)


def _ratio(results: dict, a: tuple, b: tuple, key: str) -> str:
    x, y = results.get(a, {}).get(key), results.get(b, {}).get(key)
    return f"{x / y:.2f}" if x and y else "n/a"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="B/16", help="a name from vit.list_models()")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=128, help="images per GPU and step")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation happens in these)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--gpus", type=int, help="ranks, one per GPU (default: every GPU torch sees)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend of the compiled ways")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak for MFU (default: by GPU name)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per way before it is ended")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "vit-bench-gpu")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="a tiny model on CPU for a few steps: tests the script"
    )
    parser.add_argument("--worker", choices=("ddp", "fsdp"), help=argparse.SUPPRESS)
    parser.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cpu_smoke:
        for name, value in SMOKE.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
        args.gpus = 1
    if args.worker:
        args.strategy = args.worker
        _worker(args)
        return 0

    if not args.cpu_smoke:
        import torch

        if not torch.cuda.is_available():
            print(
                f"bench/gpu.py measures training on CUDA GPUs, and torch {torch.__version__} sees none here "
                f"(CUDA build: {torch.version.cuda or 'none'}). Run it on a GPU machine, or with --cpu-smoke to "
                "check the script on CPU.",
                file=sys.stderr,
            )
            return 2
        args.gpus = args.gpus or torch.cuda.device_count()
    where = "CPU (smoke run: the figures mean nothing)" if args.cpu_smoke else f"{args.gpus} x GPU"
    print(
        f"ViT-{args.model} at {args.image_size} px, {args.classes} classes, bf16, batch {args.batch} per rank, {where}"
    )
    print(f"{args.warmup} warm-up and {args.steps} timed steps per way; compile backend {args.backend}", flush=True)

    def measure(way: tuple[str, bool]) -> dict:
        strategy, compiled = way
        label = f"{strategy}-{'compiled' if compiled else 'eager'}"
        argv = [__file__, "--worker", strategy, *(["--compiled"] if compiled else [])]
        for name in ("model", "image_size", "classes", "batch", "warmup", "steps", "gpus", "backend"):
            argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        argv += ["--cpu-smoke"] if args.cpu_smoke else []
        print(f"  {label} ...", flush=True)
        log = args.workdir / "logs" / f"{label}.log"
        return run_worker(argv, log=log, timeout=args.timeout, raise_on_error=False)

    # One way at a time on the GPUs; a smoke run measures nothing and runs two at a time, to end sooner.
    with ThreadPoolExecutor(2 if args.cpu_smoke else 1) as pool:
        results: dict[tuple[str, bool], dict] = dict(zip(WAYS, pool.map(measure, WAYS)))

    rows = []
    for (strategy, compiled), r in results.items():
        mode = "compiled" if compiled else "eager"
        if "error" in r:
            rows.append([strategy, mode, f"failed: {r['error']}", *[""] * 6])
            continue
        peak = None if args.cpu_smoke else _peak_flops(r["device_name"], args.peak_tflops)
        r["mfu"] = 3 * r["flops_per_image"] * r["images_per_s_per_gpu"] / peak if peak else None
        r["mib_per_image"] = r["peak_bytes"] / MIB / args.batch if r["peak_bytes"] is not None else None
        rows.append(
            [
                strategy,
                mode,
                f"{r['images_per_s']:.1f}",
                f"{r['images_per_s_per_gpu']:.1f}",
                f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a",
                f"{r['mib_per_image']:.1f}" if r["mib_per_image"] is not None else "n/a",
                f"{r['peak_bytes'] / 2**30:.1f}" if r["peak_bytes"] is not None else "n/a",
                f"{r['warmup_seconds']:.0f}",
                f"{r['loss']:.3f}",
            ]
        )
    first = next((r for r in results.values() if "error" not in r), {})
    if first:
        print(f"\n{first['device_name']}; {3 * first['flops_per_image'] / 1e9:.4g} GFLOP per trained image")
    header = ["strategy", "mode", "images/s", "images/s/GPU", "MFU", "MiB/image", "peak GiB", "warm-up s", "loss"]
    print_table(header, rows, left=2)

    print()
    ratios = []
    for strategy in ("ddp", "fsdp"):
        ways = ((strategy, True), (strategy, False))
        ratios.append(
            [f"compiled / eager, {strategy}", *(_ratio(results, *ways, k) for k in ("images_per_s", "peak_bytes"))]
        )
    for compiled in (False, True):
        ways = (("fsdp", compiled), ("ddp", compiled))
        mode = "compiled" if compiled else "eager"
        ratios.append([f"fsdp / ddp, {mode}", *(_ratio(results, *ways, k) for k in ("images_per_s", "peak_bytes"))])
    print_table(["ratio", "images/s", "peak memory"], ratios, left=1)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        table = [{"strategy": s, "compiled": c, **r} for (s, c), r in results.items()]
        args.json.write_text(
            json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "results": table}, indent=1)
        )
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
