"""Throughput and memory of our ViT against Hugging Face's ``ViTForImageClassification``.

How to run
----------
    .venv/bin/python bench/model.py                  # CPU defaults: Ti/16, S/16 at 224; ~3 min on 2 cores
    .venv/bin/python bench/model.py --quick          # smoke test (Mu/16 at 64 px): ~20 s on an idle 2-core box
    .venv/bin/python bench/model.py --models B/16 --batch 64 --train-batch 32 --json out/bench.json
    .venv/bin/python bench/model.py --device cuda --compile   # GPU: bf16 autocast, adds a B/16 MFU table

Options: ``--models`` (comma-separated names from ``vit.list_models()``, plain ViTs only), ``--img-size``,
``--batch`` (inference), ``--train-batch``, ``--modes infer,train``, ``--device auto|cpu|cuda``, ``--dtype
float32|bfloat16`` (bfloat16 means ``torch.autocast`` with fp32 master weights, for both implementations;
default float32 on CPU, bfloat16 on CUDA), ``--compile`` (``torch.compile`` both models), ``--warmup`` /
``--repeats`` (steps per implementation), ``--threads`` (default: the usable cores), ``--mem-iters``,
``--mem-jobs``, ``--skip-memory``, ``--peak-tflops`` / ``--mfu-batch`` / ``--no-mfu`` (CUDA MFU table),
``--json PATH``. GPU defaults: Ti/16, S/16 and B/16, batch 256 for inference and 128 for training,
10 warmup and 30 timed steps.

What is measured
----------------
For each size the two implementations are built with the same architecture: width, depth, heads, MLP size,
patch, image size, classes, qkv bias, LayerNorm eps 1e-6, exact-erf GELU, no dropout, class-token pooling,
and Hugging Face's ``attn_implementation="sdpa"``. Both therefore call the same
``scaled_dot_product_attention`` kernel. The only structural difference is that ours computes q, k and v with
one fused ``qkv`` Linear, while HF uses three Linears. The script asserts equal parameter counts. Weights are
random: their values do not change the arithmetic.

* ``infer``: ``model.eval()`` under ``torch.inference_mode()``, forward only.
* ``train``: forward, ``F.cross_entropy`` on the logits, backward, ``torch.optim.AdamW.step()``
  (``zero_grad(set_to_none=True)`` first). Both use the same optimizer settings.

Timing. One fresh worker process per size holds both models. For each mode it alternates them one step at a
time in ABBA order (ours, HF, HF, ours, ...), after ``--warmup`` untimed steps each. Each step is timed on its
own, synchronising on CUDA. ``img/s`` is the batch divided by the median step time. ``ours/HF`` is the median
over pairs of back-to-back steps of t_HF / t_ours, so it can differ slightly from the quotient of the two
img/s columns. The ``IQR`` column is the interquartile range of those per-pair ratios. Alternating step by
step matters on shared or virtualised CPUs, whose speed can drift several-fold within seconds.

Peak memory ("peak MB"): what running the step costs on top of holding the model, in MiB.

* CPU: each (implementation, mode) runs in its own fresh process. The baseline is the resident set size
  (``/proc/self/statm``) after the model, the input batch and the (still empty) optimizer exist, just before
  the first step. The first step absorbs one-off caches and, with ``--compile``, compilation; whatever
  compilation leaves resident still counts. After it, the kernel's RSS high-water mark is reset
  (``/proc/self/clear_refs``), ``--mem-iters`` - 1 more steps run, and
  ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` minus the baseline is reported. The number covers
  activations, gradients, the AdamW moments (2x the parameters) and whatever the allocator (glibc, oneDNN)
  keeps resident. It does not cover the weights, the input, the interpreter or the libraries. These
  processes run with ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=131072`` unless you set GLIBC_TUNABLES
  yourself. A fixed threshold gives every block of 128 KiB or more its own mapping, returned on free, so
  RSS tracks the live tensors and repeats to < 1 MB. With glibc's default dynamic threshold, the same
  measurement wandered by up to 70 MB between runs.
* CUDA: in the timing worker, ``torch.cuda.max_memory_allocated()`` over steps 2..N (peak stats reset after
  step 1) minus ``torch.cuda.memory_allocated()`` just before step 1, measured one implementation at a time.
  This counts PyTorch tensors only, not caching-allocator slack or the CUDA context.

MFU (CUDA only): B/16 training under bf16 autocast. MFU = 3 x ``flops_per_image()`` x img/s / peak dense
bf16 FLOP/s. ``flops_per_image`` is our model's matmul FLOP count; HF's architecture is identical, so the same
count is used for both. The peak comes from the GPU name (H100 SXM 989, H100 PCIe 756, H100 NVL 835, H200 989,
A100 312 TFLOP/s) or from ``--peak-tflops``.

How to read it
--------------
``ours/HF`` > 1 means ours is faster. When the IQR straddles 1.0, the two are tied at this noise level.
Compare ratios, not absolute img/s, across runs: on a shared or virtualised machine the absolute numbers
drift together (a 2-vCPU VM measured 40 to 200 GFLOP/s on the same matmul within a minute) while the ratio
stays put. The ``CPU`` column (CPU only) shows how much CPU time the timing worker got per wall second per
thread. Below about 85% another process was using the cores, and the script prints a warning: rerun.
Peak memory (CPU) repeats to within 1 MB, so differences of a few MB are real but small. One example is
our fused qkv output: one (B, T, 3D) tensor where HF has three (B, T, D) tensors.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import harness
from harness import MIB, cpu_name, current_rss, emit, max_rss, memory_worker_env, reset_rss_high_water

IMPLS = ("ours", "hf")
MODES = ("infer", "train")
# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s; the first substring found in the device name wins.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIE", 756e12),
    ("H100", 989e12),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("A100", 312e12),
)
MFU_MODEL = "B/16"


# ---------------------------------------------------------------------------------------------- worker side
def _import_torch(threads: int):
    import torch

    torch.set_num_threads(threads)
    return torch


def build_model(impl: str, name: str, img_size: int, num_classes: int, device: str):
    """Our ViT, or HF's ViTForImageClassification of the same architecture wrapped to return logits."""
    import torch
    from torch import nn

    from vit.variants import create_model, model_config

    cfg = model_config(name, num_classes=num_classes, img_size=img_size)
    if cfg.resnet_layers is not None or cfg.pool != "cls" or cfg.representation_size:
        raise ValueError(f"{name}: only plain class-token ViTs have a Hugging Face ViTForImageClassification twin")
    if impl == "ours":
        return create_model(name, num_classes=num_classes, img_size=img_size, device=device)

    from transformers import ViTConfig, ViTForImageClassification

    hf_cfg = ViTConfig(
        hidden_size=cfg.width,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.mlp_dim,
        image_size=cfg.img_size,
        patch_size=cfg.patch_size,
        num_channels=cfg.in_chans,
        num_labels=num_classes,
        qkv_bias=cfg.qkv_bias,
        layer_norm_eps=cfg.layer_norm_eps,
        hidden_act="gelu",  # exact erf GELU, as nn.GELU()
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="sdpa",
    )
    hf = ViTForImageClassification(hf_cfg)
    if hf.config._attn_implementation != "sdpa":
        raise RuntimeError(f"transformers picked attention {hf.config._attn_implementation!r}, not 'sdpa'")

    class HFLogits(nn.Module):
        """Returns the logits tensor, so both models look the same to the benchmark (and to torch.compile)."""

        def __init__(self, model: nn.Module):
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(pixel_values=x).logits

    return HFLogits(hf).to(device)


def make_step(model, mode: str, x, y, autocast_dtype, compile_model: bool):
    """A closure running one inference forward or one training step of ``model`` on the fixed batch."""
    import torch
    import torch.nn.functional as F

    device_type = x.device.type

    def autocast():
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=autocast_dtype)

    if mode == "infer":
        model.eval()
        fwd = torch.compile(model) if compile_model else model

        def step():
            with torch.inference_mode(), autocast():
                fwd(x)

        return step

    model.train()
    fwd = torch.compile(model) if compile_model else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast():
            logits = fwd(x)
        loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        opt.step()

    return step


def _inputs(spec: dict, torch):
    gen = torch.Generator().manual_seed(spec["seed"])
    batch = spec["batch"]
    x = torch.randn(batch, 3, spec["img_size"], spec["img_size"], generator=gen).to(spec["device"])
    y = torch.randint(0, spec["num_classes"], (batch,), generator=gen).to(spec["device"])
    return x, y


def _autocast_dtype(spec: dict, torch):
    return torch.bfloat16 if spec["dtype"] == "bfloat16" else None


def worker_time(spec: dict) -> dict:
    """Both models in one process, stepped alternately, for each run (mode, batch) of ``spec["runs"]``."""
    torch = _import_torch(spec["threads"])
    cuda = spec["device"] == "cuda"
    torch.manual_seed(spec["seed"])
    shape = (spec["model"], spec["img_size"], spec["num_classes"], spec["device"])
    models = {impl: build_model(impl, *shape) for impl in IMPLS}
    params = {impl: sum(p.numel() for p in m.parameters()) for impl, m in models.items()}
    if params["ours"] != params["hf"]:
        raise RuntimeError(f"{spec['model']}: parameter counts differ, ours {params['ours']:,} vs HF {params['hf']:,}")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def timed(step) -> float:
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        return time.perf_counter() - t0

    results = []
    for run in spec["runs"]:
        x, y = _inputs({**spec, **run}, torch)
        steps = {
            impl: make_step(m, run["mode"], x, y, _autocast_dtype(spec, torch), spec["compile"])
            for impl, m in models.items()
        }
        peak_mb: dict[str, float | None] = dict.fromkeys(IMPLS)
        peak_abs_mb: dict[str, float | None] = dict.fromkeys(IMPLS)
        warmup_left = dict.fromkeys(IMPLS, spec["warmup"])
        if cuda:  # memory, one implementation at a time; these steps count as warmup
            for impl in IMPLS:
                gc.collect()
                torch.cuda.empty_cache()
                sync()
                base = torch.cuda.memory_allocated()
                steps[impl]()  # first step: AdamW state, cuBLAS/cuDNN workspaces, compilation
                sync()
                torch.cuda.reset_peak_memory_stats()
                for _ in range(spec["mem_iters"] - 1):
                    steps[impl]()
                sync()
                peak = torch.cuda.max_memory_allocated()
                peak_mb[impl] = (peak - base) / MIB
                peak_abs_mb[impl] = peak / MIB
                warmup_left[impl] -= spec["mem_iters"]
        for i in range(max(warmup_left.values())):
            for impl in IMPLS if i % 2 == 0 else IMPLS[::-1]:
                if i < warmup_left[impl]:
                    steps[impl]()

        times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for i in range(spec["repeats"]):
            for impl in IMPLS if i % 2 == 0 else IMPLS[::-1]:  # ABBA: neither always goes first
                times[impl].append(timed(steps[impl]))
        # CPU seconds this process got per wall second per thread: well below 1 on CPU means the cores were
        # shared with another process during timing (a hypervisor's own throttling does not show here).
        cpu_share = (time.process_time() - cpu0) / (time.perf_counter() - wall0) / spec["threads"]
        results.append(
            {**run, "times_s": times, "peak_mb": peak_mb, "peak_abs_mb": peak_abs_mb, "cpu_share": cpu_share}
        )
        del steps, x, y
    return {
        "params": params,
        "flops_per_image": models["ours"].flops_per_image(),
        "device_name": torch.cuda.get_device_name() if cuda else cpu_name(),
        "runs": results,
    }


def worker_mem(spec: dict) -> dict:
    """One model, one mode, in a fresh process: peak RSS growth over the pre-step baseline (CPU)."""
    torch = _import_torch(spec["threads"])
    torch.manual_seed(spec["seed"])
    model = build_model(spec["impl"], spec["model"], spec["img_size"], spec["num_classes"], spec["device"])
    x, y = _inputs(spec, torch)
    step = make_step(model, spec["mode"], x, y, _autocast_dtype(spec, torch), spec["compile"])
    gc.collect()
    base = current_rss()
    step()  # first step: one-off caches, AdamW state, compilation
    reset = reset_rss_high_water()
    before = max_rss()
    for _ in range(spec["mem_iters"] - 1):
        step()
    peak = max_rss()
    return {
        "base_rss_mb": base / MIB,
        "peak_rss_mb": peak / MIB,
        "peak_growth_mb": (peak - base) / MIB,
        # Without the reset, ru_maxrss may still hold an older, higher peak (construction, first step).
        "hwm_reset": reset,
        "new_high": peak > before,
    }


def worker_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    result = worker_time(spec) if spec["kind"] == "time" else worker_mem(spec)
    emit(result)


# ---------------------------------------------------------------------------------------------- parent side
def run_worker(spec: dict, label: str, env: dict[str, str] | None = None) -> dict:
    """One worker process measuring ``spec``; its output in a log file kept for a failure's message."""
    print(f"  {label} ...", file=sys.stderr, flush=True)
    log = Path(tempfile.gettempdir()) / "vit-bench-model" / f"{label.replace('/', '_').replace(' ', '-')}.log"
    result = harness.run_worker([__file__, "--worker", json.dumps(spec)], log=log, env=env)
    print(f"  {label}: {result['job_seconds']:.1f} s", file=sys.stderr, flush=True)
    return result


def run_workers_parallel(jobs: list[tuple[dict, str]], max_parallel: int, env: dict[str, str]) -> list[dict]:
    """Several worker processes, at most ``max_parallel`` at a time (memory: speed does not matter)."""
    with ThreadPoolExecutor(max_parallel) as pool:
        return list(pool.map(lambda job: run_worker(*job, env=env), jobs))


def peak_flops_for(device_name: str) -> float | None:
    name = device_name.upper()
    for key, peak in PEAK_BF16_FLOPS:
        if key in name:
            return peak
    return None


def summarise(times: dict[str, list[float]], batch: int) -> dict:
    t_ours, t_hf = times["ours"], times["hf"]
    ratios = sorted(h / o for o, h in zip(t_ours, t_hf))  # img/s ratio ours/HF of each back-to-back pair
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
    return {
        "ours_img_s": batch / statistics.median(t_ours),
        "hf_img_s": batch / statistics.median(t_hf),
        "ratio": statistics.median(ratios),
        "ratio_q1": quartiles[0],
        "ratio_q3": quartiles[2],
    }


def fmt_mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def print_table(rows: list[dict], show_cpu: bool) -> None:
    header = ("size", "mode", "batch", "ours img/s", "HF img/s", "ours/HF", "IQR", "ours peak MB", "HF peak MB", "CPU")
    lines = [
        (
            r["model"],
            r["mode"],
            str(r["batch"]),
            f"{r['ours_img_s']:.1f}",
            f"{r['hf_img_s']:.1f}",
            f"{r['ratio']:.3f}",
            f"{r['ratio_q1']:.2f}-{r['ratio_q3']:.2f}",
            fmt_mb(r["peak_mb"]["ours"]),
            fmt_mb(r["peak_mb"]["hf"]),
            f"{100 * r['cpu_share']:.0f}%",
        )[: len(header) if show_cpu else len(header) - 1]
        for r in rows
    ]
    harness.print_table(header[: len(lines[0])], lines, left=2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", help="comma-separated sizes (default CPU: Ti/16,S/16; CUDA: Ti/16,S/16,B/16)")
    p.add_argument("--img-size", type=int, help="input side (default 224; --quick 64)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--batch", type=int, help="inference batch (default CPU 32, CUDA 256)")
    p.add_argument("--train-batch", type=int, help="training batch (default CPU 16, CUDA 128)")
    p.add_argument("--modes", default="infer,train", help="comma-separated subset of infer,train")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="default CPU float32, CUDA bfloat16 autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--warmup", type=int, help="untimed steps per implementation (default CPU 2, CUDA 10)")
    p.add_argument("--repeats", type=int, help="timed steps per implementation (default CPU 6, CUDA 30)")
    p.add_argument("--mem-iters", type=int, default=2, help="steps of each memory measurement (>= 2)")
    p.add_argument(
        "--mem-jobs", type=int, default=1, help="CPU memory workers at once (more oversubscribe the cores: slower)"
    )
    p.add_argument("--skip-memory", action="store_true", help="CPU: time only, no memory workers")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: usable CPU cores)")
    p.add_argument("--peak-tflops", type=float, help="peak dense bf16 TFLOP/s for MFU (default: by GPU name)")
    p.add_argument("--mfu-batch", type=int, help=f"{MFU_MODEL} training batch for the MFU table (default 128)")
    p.add_argument("--no-mfu", action="store_true", help=f"skip the CUDA {MFU_MODEL} MFU table")
    p.add_argument("--quick", action="store_true", help="smoke test: Mu/16 at 64 px, tiny batches, few steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the device-dependent defaults."""
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False")
    cuda = args.device == "cuda"
    quick = args.quick

    def pick(value, quick_value, cpu_value, cuda_value):
        if value is not None:
            return value
        if quick:
            return quick_value
        return cuda_value if cuda else cpu_value

    args.models = [m.strip() for m in pick(args.models, "Mu/16", "Ti/16,S/16", "Ti/16,S/16,B/16").split(",")]
    args.img_size = pick(args.img_size, 64, 224, 224)
    args.batch = pick(args.batch, 4, 32, 256)
    args.train_batch = pick(args.train_batch, 4, 16, 128)
    args.dtype = pick(args.dtype, "bfloat16" if cuda else "float32", "float32", "bfloat16")
    args.warmup = pick(args.warmup, 1, 2, 10)
    args.repeats = pick(args.repeats, 3, 6, 30)
    args.mfu_batch = pick(args.mfu_batch, 8, 128, 128)
    args.threads = args.threads or len(os.sched_getaffinity(0))
    args.modes = [m.strip() for m in args.modes.split(",")]
    if not set(args.modes) <= set(MODES) or not args.modes:
        raise SystemExit(f"--modes must be a subset of {','.join(MODES)}")
    if args.mem_iters < 2:
        raise SystemExit("--mem-iters must be at least 2")
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return
    args = resolve(args)
    import torch

    transformers_version = importlib.metadata.version("transformers")  # importing it here would cost seconds
    cuda = args.device == "cuda"
    base_spec = {
        "img_size": args.img_size,
        "num_classes": args.num_classes,
        "device": args.device,
        "dtype": args.dtype,
        "compile": args.compile,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "mem_iters": args.mem_iters,
        "threads": args.threads,
        "seed": args.seed,
    }
    print(
        f"torch {torch.__version__}, transformers {transformers_version}, python {platform.python_version()}; "
        f"device {args.device}, {args.threads} threads, dtype {args.dtype}"
        f"{' (autocast)' if args.dtype == 'bfloat16' else ''}, compile {args.compile}, "
        f"{args.warmup} warmup + {args.repeats} timed steps per implementation",
        flush=True,
    )
    t_start = time.perf_counter()
    runs = [{"mode": mode, "batch": args.batch if mode == "infer" else args.train_batch} for mode in args.modes]
    rows: list[dict] = []
    for name in args.models:  # timing: one worker per size, alone on the machine
        batches = ", ".join(f"{r['mode']} {r['batch']}" for r in runs)
        timing = run_worker({**base_spec, "kind": "time", "model": name, "runs": runs}, f"time {name} ({batches})")
        p = timing["params"]
        print(
            f"{name}: parameters ours {p['ours']:,} = HF {p['hf']:,}; "
            f"{timing['flops_per_image'] / 1e9:.2f} GFLOP per image forward",
            flush=True,
        )
        for run in timing["runs"]:
            extra = {"flops_per_image": timing["flops_per_image"], "device_name": timing["device_name"]}
            rows.append({"model": name, **run, **extra, **summarise(run["times_s"], run["batch"])})
    if not cuda and not args.skip_memory:  # memory: a fresh process per (size, implementation, mode)
        jobs = [
            (
                {**base_spec, "kind": "mem", "model": row["model"], "impl": impl, **run},
                f"memory {impl} {row['model']} {row['mode']}",
            )
            for impl in IMPLS[::-1]
            for row in rows
            for run in [{"mode": row["mode"], "batch": row["batch"]}]
        ]
        for (spec, _), mem in zip(jobs, run_workers_parallel(jobs, args.mem_jobs, memory_worker_env())):
            row = next(r for r in rows if r["model"] == spec["model"] and r["mode"] == spec["mode"])
            row.setdefault("memory", {})[spec["impl"]] = mem
            # Without a high-water reset an older, higher peak may hide this one: then we cannot tell.
            row["peak_mb"][spec["impl"]] = mem["peak_growth_mb"] if mem["hwm_reset"] or mem["new_high"] else None

    mfu_rows: list[dict] = []
    if cuda and not args.no_mfu:
        same = [
            r
            for r in rows
            if (r["model"], r["mode"], r["batch"], args.dtype) == (MFU_MODEL, "train", args.mfu_batch, "bfloat16")
        ]
        if same:  # the main table already timed exactly this
            mfu = same[0]
        else:
            spec = {**base_spec, "kind": "time", "model": MFU_MODEL, "dtype": "bfloat16"}
            spec["runs"] = [{"mode": "train", "batch": args.mfu_batch}]
            timing = run_worker(spec, f"time {MFU_MODEL} train bf16 batch {args.mfu_batch} (MFU)")
            run = timing["runs"][0]
            mfu = {**timing, **run, **summarise(run["times_s"], args.mfu_batch)}
        peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops_for(mfu["device_name"])
        for impl in IMPLS:
            img_s = mfu[f"{impl}_img_s"]
            achieved = 3 * mfu["flops_per_image"] * img_s
            mfu_rows.append(
                {
                    "impl": impl,
                    "img_s": img_s,
                    "achieved_tflops": achieved / 1e12,
                    "peak_tflops": peak / 1e12 if peak else None,
                    "mfu": achieved / peak if peak else None,
                    "device_name": mfu["device_name"],
                }
            )

    print(f"\nResults ({time.perf_counter() - t_start:.0f} s):")
    print_table(rows, show_cpu=not cuda)
    if not cuda:
        print(
            "peak MB: high-water RSS growth over the RSS just before the first step, fresh process per "
            "(implementation, mode); '-' = high-water mark could not be isolated."
        )
    else:
        print("peak MB: torch.cuda.max_memory_allocated() growth over memory_allocated() before the first step.")
    print("ours/HF: median over back-to-back step pairs of t_HF/t_ours (>1: ours faster); IQR of those ratios.")
    if not cuda:
        print("CPU: CPU time the timing worker got per wall second per thread (below ~85%: the cores were shared).")
        shared = [f"{r['model']} {r['mode']}" for r in rows if r["cpu_share"] < 0.85]
        if shared:
            print(f"WARNING: another process competed for the cores during {', '.join(shared)}: rerun when quiet.")
    if mfu_rows:
        print(f"\n{MFU_MODEL} training, bf16 autocast, batch {args.mfu_batch} on {mfu_rows[0]['device_name']}:")
        for r in mfu_rows:
            mfu_text = "n/a (unknown GPU: pass --peak-tflops)" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            print(f"  {r['impl']:4s}  {r['img_s']:8.1f} img/s  {r['achieved_tflops']:7.1f} TFLOP/s  MFU {mfu_text}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        out = {
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "worker"},
            "versions": {"torch": torch.__version__, "transformers": transformers_version},
            "rows": rows,
            "mfu": mfu_rows,
        }
        args.json.write_text(json.dumps(out, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
