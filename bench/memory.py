"""A rank's peak memory while it sets up a ViT under FSDP2 on CPU ranks: the whole model built on every rank,
then sharded (how the training loop did it), against built on the meta device, sharded, then materialised shard
by shard (``pipelines.training.parallel``, how it does it now).

How to run
----------
    .venv/bin/python bench/memory.py                     # ViT-B/16 at 224, 1000 classes, 2 ranks: ~1 min on 2 cores
    .venv/bin/python bench/memory.py --model L/16 --ranks 4 --repeats 2

What is measured
----------------
For each way and repeat, a fresh group of ``--ranks`` processes (``torch.multiprocessing`` spawn, a gloo process
group, one thread each). Each rank imports everything, joins the group and sets up a tiny model the same way (what
FSDP and DTensor import and build on first use), then zeroes the kernel's high-water mark of its resident set
(``/proc/self/clear_refs``) and reads its RSS: the baseline. It then sets the model up:

* ``whole``: ``torch.manual_seed``, ``VisionTransformer(config)`` on the CPU, then ``parallel.shard``;
* ``meta``: ``VisionTransformer(config, device="meta")``, ``parallel.shard``, then ``parallel.materialise``.

Both end with the same weights (``tests/pipelines/test_parallel.py`` checks it bit for bit). Each rank then
reports its peak RSS (``VmHWM``: the high-water mark since the reset; ``ru_maxrss`` would be the same figure
but for the parent's peak, which it inherits at ``exec``), its RSS after setup, and the bytes of the parameter
shards it holds. glibc's mmap threshold is fixed (``harness.memory_worker_env``) so that freed tensors leave
the resident set and peaks repeat to within a MiB.

The table gives each rank's figures for each repeat; the ratios are meta / whole of the peak RSS and of the
peak above the baseline (what setting the model up costs), over the median of the repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

from harness import MIB, REPO, memory_worker_env, print_table, reset_rss_high_water

WAYS = ("whole", "meta")


def _rss_figures() -> tuple[int, int]:
    """(current, high-water) resident set size of this process in bytes."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    return values["VmRSS"], values["VmHWM"]


def _set_up(way: str, config, world: int):
    import torch

    import vit
    from pipelines.training.parallel import materialise, shard

    device = torch.device("cpu")
    torch.manual_seed(0)
    if way == "whole":
        model = vit.VisionTransformer(config)
        shard(model, world=world, device=device, bf16=False)
    else:
        model = vit.VisionTransformer(config, device="meta")
        shard(model, world=world, device=device, bf16=False)
        materialise(model, device)
    return model


def _rank_main(rank: int, world: int, port: int, way: str, model_name: str, out: str) -> None:
    import gc
    import warnings

    import torch
    import torch.distributed as dist

    import vit

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    # A tiny model first, the same way: what FSDP and DTensor import and set up on first use stays out of the figures.
    _set_up(way, vit.model_config("Mu/8", img_size=32), world)
    gc.collect()
    dist.barrier()
    reset = reset_rss_high_water()
    baseline, _ = _rss_figures()
    started = time.perf_counter()
    model = _set_up(way, vit.model_config(model_name), world)
    seconds = time.perf_counter() - started
    after, peak = _rss_figures()
    held = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    dist.barrier()
    dist.destroy_process_group()
    figures = {"baseline": baseline, "peak": peak, "after": after, "held": held, "full": full, "seconds": seconds}
    Path(out, f"{way}-{rank}.json").write_text(json.dumps({**figures, "reset": reset}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _measure(way: str, model_name: str, ranks: int) -> list[dict]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="vit-bench-memory-") as out:
        mp.spawn(_rank_main, args=(ranks, _free_port(), way, model_name, out), nprocs=ranks)
        return [json.loads(Path(out, f"{way}-{rank}.json").read_text()) for rank in range(ranks)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="B/16", help="a name from vit.list_models()")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    # The ranks inherit these: one thread each, RSS that follows the live tensors, this checkout's packages.
    os.environ.update(memory_worker_env(), OMP_NUM_THREADS="1")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    results: dict[str, list[list[dict]]] = {way: [] for way in WAYS}
    for _ in range(args.repeats):
        for way in WAYS:  # alternated, so that a busy spell of the machine weighs on both ways alike
            results[way].append(_measure(way, args.model, args.ranks))

    first = results["whole"][0][0]
    print(
        f"ViT-{args.model}: {first['full'] / MIB:.0f} MiB of fp32 parameters; FSDP2 over {args.ranks} gloo ranks "
        f"on CPU; {args.repeats} repeat(s)"
    )
    rows = []
    for way in WAYS:
        for repeat, ranks in enumerate(results[way]):
            for rank, r in enumerate(ranks):
                rows.append(
                    [
                        way,
                        str(repeat),
                        str(rank),
                        f"{r['seconds']:.1f}",
                        f"{r['baseline'] / MIB:.0f}",
                        f"{r['peak'] / MIB:.0f}",
                        f"{(r['peak'] - r['baseline']) / MIB:.0f}",
                        f"{r['after'] / MIB:.0f}",
                        f"{r['held'] / MIB:.1f}",
                    ]
                )
    header = ["way", "repeat", "rank", "setup s", "baseline MiB", "peak MiB", "peak-baseline MiB", "after MiB"]
    print_table([*header, "params held MiB"], rows, left=1)
    if not all(r["reset"] for ranks in results["whole"] + results["meta"] for r in ranks):
        print("note: the high-water mark could not be reset: peaks include what the imports took")

    def median(way: str, key) -> float:
        return statistics.median(key(r) for ranks in results[way] for r in ranks)

    print()
    for label, key in (("peak RSS", lambda r: r["peak"]), ("peak above baseline", lambda r: r["peak"] - r["baseline"])):
        whole, meta = median("whole", key), median("meta", key)
        print(f"{label}: meta / whole = {meta / MIB:.0f} / {whole / MIB:.0f} MiB = {meta / whole:.2f}")


if __name__ == "__main__":
    sys.exit(main())
