"""Benchmark of ``vit shard`` against the bounds that frame it, measured in one run on one machine.

    .venv/bin/python bench/shard.py                       # 20,000 and 100,000 images (~5 min on 2 cores)
    .venv/bin/python bench/shard.py --sizes 20000 100000 500000 --repeats 3   # the figures in the notes
    .venv/bin/python bench/shard.py --sizes 2000 --quick  # smoke run

What is measured, on synthetic JFT-style corpora of real JPEGs (``vit corpus synth``, cached in --workdir):

* ``decode ceiling``: one process opens and fully decodes every file with PIL, times the cores (checking an
  image needs a decode): the reference the targets are set against.
* ``check ceiling``: the same loop running the sharder's own per-image check (``normalize_image``), which
  reads plain RGB JPEGs with libjpeg-turbo directly: what ``vit shard`` would reach if listing, planning,
  writing and Ray cost nothing.
* ``tar``: plain ``tar cf`` of the same files: the I/O bound, for reference.
* ``minimal Ray``: ``read_binary_files`` -> ``write_webdataset(encoder=None)``: checks nothing and writes
  one small tar per block; the floor any Ray Data job starts from.
* ``vit shard``: the real job (validate, normalise, global shuffle, shards of 5,000, manifest, rejects).
  Its steady-state rate is the marginal one between the smallest and largest corpus, (N2 - N1) / (t2 - t1),
  which cancels the fixed start-up cost (Ray Data's executors, the plan's first tasks). Both Ray jobs start
  their clock on a local Ray whose worker processes are already running.

Each job runs in a fresh subprocess with its own local Ray (its object store capped at --object-store-mb,
spilling to disk beyond, as a cluster node's store does). Memory, sampled every second (the driver's RSS
every 100 ms), from the kernel's per-process totals:

* driver: peak RSS, what would grow with a corpus held on the driver;
* worker: the largest peak private memory (heap, stacks, libraries) of one Ray process, what would grow
  with a corpus held by a task;
* store: peak shared-memory pages over all processes, i.e. Ray's object store, which the index passes
  through while it is planned; bounded by its cap whatever the corpus size;
* all: peak PSS summed over every process, with the process count (Ray starts more worker processes,
  and spill workers once the store is full, for a bigger job: a few per CPU, not per image).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from harness import emit, run_worker


def corpus_bytes(corpus: Path) -> int:
    """Total size of the corpus's images (from ``labels.parquet`` paths, streamed, so nothing is held)."""
    import pyarrow.parquet as pq

    total = 0
    for batch in pq.ParquetFile(corpus / "labels.parquet").iter_batches(columns=["path"], batch_size=65_536):
        total += sum(os.path.getsize(corpus / p) for p in batch.column(0).to_pylist())
    return total


def image_files(corpus: Path) -> list[Path]:
    return sorted(p for p in (corpus / "images").rglob("*.jpg"))


# ---------------------------------------------------------------------------------------------- workers


def _per_file(corpus: Path, check) -> dict:
    """One process reading every file of the corpus and calling ``check(path, data)`` on it."""
    files = image_files(corpus)
    start = time.perf_counter()
    total = 0
    for path in files:
        data = path.read_bytes()
        total += len(data)
        check(path, data)
    return {"images": len(files), "bytes": total, "seconds": time.perf_counter() - start}


def worker_decode(corpus: Path) -> dict:
    from PIL import Image

    def decode(path: Path, _data: bytes) -> None:
        with Image.open(path) as image:
            image.load()

    return _per_file(corpus, decode)


def worker_check(corpus: Path) -> dict:
    from pipelines.data.images import normalize_image

    return _per_file(corpus, lambda _path, data: normalize_image(data))


def worker_tar(corpus: Path, out: Path) -> dict:
    files = image_files(corpus)
    total = sum(p.stat().st_size for p in files)
    start = time.perf_counter()
    subprocess.run(["tar", "cf", str(out / "all.tar"), "-C", str(corpus), "images"], check=True)
    return {"images": len(files), "bytes": total, "seconds": time.perf_counter() - start}


def _ray_init() -> None:
    import ray
    import ray.data

    ray.init(
        address="local",
        num_cpus=max(4, os.cpu_count() or 1),
        object_store_memory=int(os.environ["BENCH_OBJECT_STORE_MB"]) << 20,
        include_dashboard=False,
        log_to_driver=False,
    )
    # Start Ray's worker processes before the clock does: a bigger job would otherwise pay for more of
    # them (about a second each on 2 cores) and the marginal rate would charge that start-up to images.
    cpus = int(ray.cluster_resources()["CPU"])
    ray.data.range(cpus * 4, override_num_blocks=cpus * 4).map_batches(lambda b: b, batch_size=None).materialize()


def worker_minimal_ray(corpus: Path, out: Path) -> dict:
    import ray.data

    _ray_init()
    files = [str(p) for p in image_files(corpus)]
    total = sum(os.path.getsize(p) for p in files)
    start = time.perf_counter()
    ds = ray.data.read_binary_files(files, include_paths=True)
    ds = ds.map(lambda row: {"__key__": Path(row["path"]).stem.replace(".", "_"), "jpg": row["bytes"]})
    ds.write_webdataset(str(out), encoder=None)
    seconds = time.perf_counter() - start
    tars = list(out.glob("*.tar"))
    return {"images": len(files), "bytes": total, "seconds": seconds, "files": len(tars)}


def worker_vit_shard(corpus: Path, out: Path) -> dict:
    from pipelines.data.shards import ShardConfig, shard_corpus

    _ray_init()
    start = time.perf_counter()
    # 5,000 per shard: both corpus sizes then keep the same number of writers busy (4 on 2 cores)
    summary = shard_corpus(ShardConfig(src=str(corpus), dst=str(out), shard_samples=5_000), log=lambda *_: None)
    seconds = time.perf_counter() - start
    # bytes come from the summary: listing the corpus here would put ~500 B an image on the driver's peak
    return {
        "images": summary.read,
        "bytes": corpus_bytes(corpus),
        "seconds": seconds,
        "written": summary.written,
        "shards": summary.shards,
    }


# ---------------------------------------------------------------------------------------------- driver


def ensure_corpus(workdir: Path, images: int, image_size: int) -> Path:
    from pipelines.data.corpus import synth_corpus

    corpus = workdir / f"corpus-{images}-{image_size}px"
    if not (corpus / "labels.parquet").exists():
        print(f"generating a {images:,}-image corpus of {image_size} px JPEGs in {corpus} ...", flush=True)
        synth_corpus(
            str(corpus), images=images, classes=100, seed=0, image_size=image_size, workers=os.cpu_count() or 1
        )
    return corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 100_000])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "vit-bench-shard")
    parser.add_argument("--image-size", type=int, default=64, help="side of the generated JPEGs in pixels")
    parser.add_argument("--quick", action="store_true", help="smallest size only, for a smoke run")
    parser.add_argument("--object-store-mb", type=int, default=512, help="Ray object store of each job")
    parser.add_argument(
        "--kinds", nargs="+", default=["decode", "check", "tar", "minimal", "shard"], help="what to run"
    )
    parser.add_argument("--repeats", type=int, default=1, help="rounds; each figure is the median run")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", nargs=3, metavar=("KIND", "CORPUS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    os.environ.setdefault("BENCH_OBJECT_STORE_MB", str(args.object_store_mb))  # the workers inherit it
    if args.worker:
        kind, corpus, out = args.worker
        fn = {
            "decode": worker_decode,
            "check": worker_check,
            "tar": worker_tar,
            "minimal": worker_minimal_ray,
            "shard": worker_vit_shard,
        }
        out_path = Path(out)
        out_path.mkdir(parents=True, exist_ok=True)
        result = fn[kind](Path(corpus)) if kind in ("decode", "check") else fn[kind](Path(corpus), out_path)
        emit(result)
        return

    import shutil

    cores = os.cpu_count() or 1
    sizes = sorted(args.sizes)[:1] if args.quick else sorted(args.sizes)
    args.workdir.mkdir(parents=True, exist_ok=True)
    corpora = {n: ensure_corpus(args.workdir, n, args.image_size) for n in sizes}
    runs: dict[tuple[str, int], list[dict]] = {}
    # Rounds of every (size, kind) in turn: a slow spell of a shared machine then touches all of them alike.
    for round_ in range(args.repeats):
        for n in sizes:
            for kind in args.kinds:
                out = args.workdir / f"out-{kind}-{n}"
                shutil.rmtree(out, ignore_errors=True)
                print(f"round {round_ + 1}/{args.repeats}: {kind:>8} on {n:,} images ...", flush=True)
                job = [__file__, "--worker", kind, str(corpora[n]), str(out)]
                result = run_worker(job, log=args.workdir / "logs" / f"{kind}-{n}.log", sample_memory=True)
                runs.setdefault((kind, n), []).append(result | {"kind": kind, "size": n})
                shutil.rmtree(out, ignore_errors=True)
    rows = []
    for measured in runs.values():  # the median time; the highest memory of any round
        row = sorted(measured, key=lambda r: r["seconds"])[len(measured) // 2]
        for peak in ("peak_pss_mb", "driver_peak_rss_mb", "worker_peak_private_mb", "store_peak_mb", "processes"):
            row[peak] = max(r[peak] for r in measured)
        rows.append(row)

    def rate(row: dict) -> float:
        per_s = row["images"] / row["seconds"]
        return per_s * cores if row["kind"] in ("decode", "check") else per_s

    names = {
        "decode": f"decode ceiling (1 proc x {cores})",
        "check": f"check ceiling (1 proc x {cores})",
        "tar": "tar cf (I/O bound)",
        "minimal": "minimal Ray path",
        "shard": "vit shard",
    }
    print(f"\n{args.image_size} px JPEGs, {cores} cores, median of {args.repeats} round(s)")
    print(
        f"{'method':<30}{'images':>9}{'seconds':>9}{'images/s':>10}{'MB/s':>8}"
        f"{'all MB':>9}{'procs':>7}{'driver MB':>11}{'worker MB':>11}{'store MB':>10}"
    )
    for row in rows:
        mbs = row["bytes"] / 1e6 / row["seconds"] * (cores if row["kind"] in ("decode", "check") else 1)
        print(
            f"{names[row['kind']]:<30}{row['size']:>9,}{row['seconds']:>9.1f}{rate(row):>10,.0f}{mbs:>8.1f}"
            f"{row['peak_pss_mb']:>9,.0f}{row['processes']:>7}{row['driver_peak_rss_mb']:>11,.0f}"
            f"{row['worker_peak_private_mb']:>11,.0f}{row['store_peak_mb']:>10,.0f}"
        )
    print()
    compared = {"decode", "minimal", "shard"} <= set(args.kinds)
    for n in sizes if compared else []:
        by = {r["kind"]: r for r in rows if r["size"] == n}
        print(
            f"{n:,} images: vit shard = {rate(by['shard']) / rate(by['decode']):.0%} of the decode ceiling, "
            f"{rate(by['shard']) / rate(by['minimal']):.2f}x the minimal Ray path (end to end, start-up included)"
        )
    if len(sizes) >= 2:
        small, big = sizes[0], sizes[-1]
        s = {r["size"]: r for r in rows if r["kind"] == "shard"}
        m = {r["size"]: r for r in rows if r["kind"] == "minimal"}
        d = {r["size"]: r for r in rows if r["kind"] == "decode"}
        if compared:
            steady = (big - small) / (s[big]["seconds"] - s[small]["seconds"])
            steady_min = (big - small) / (m[big]["seconds"] - m[small]["seconds"])
            c = {r["size"]: r for r in rows if r["kind"] == "check"}
            own = f" and {steady / rate(c[big]):.0%} of its own check's ceiling" if big in c else ""
            print(
                f"steady state ({small:,} -> {big:,}): vit shard {steady:,.0f} images/s = "
                f"{steady / rate(d[big]):.0%} of the decode ceiling{own}, {steady / steady_min:.2f}x the minimal Ray "
                f"path ({steady_min:,.0f} images/s)"
            )
        if s:
            a, b = s[small], s[big]
            print(
                f"peak memory of vit shard, {small:,} -> {big:,} images: "
                f"driver {a['driver_peak_rss_mb']:,.0f} -> {b['driver_peak_rss_mb']:,.0f} MB, "
                f"largest worker (private) {a['worker_peak_private_mb']:,.0f} -> "
                f"{b['worker_peak_private_mb']:,.0f} MB, "
                f"object store {a['store_peak_mb']:,.0f} -> {b['store_peak_mb']:,.0f} MB "
                f"(capped at {args.object_store_mb} MB), "
                f"all {a['peak_pss_mb']:,.0f} -> {b['peak_pss_mb']:,.0f} MB "
                f"in {a['processes']} -> {b['processes']} processes"
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
