"""Incremental sharding: a re-run with the same settings confirms an unchanged corpus, adds new images as a new
generation of shards (the old ones untouched), and replaces the output when an image changed or went away.
Real image bytes, the session's local Ray, moto's S3 server, a real kill."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.data.shards import ShardConfig, shard_corpus, verify_shards
from pipelines.data.shards.format import dataset_fingerprint, iter_tar_samples
from pipelines.data.stream import open_shards, read_classes, read_info

pytestmark = pytest.mark.usefixtures("ray_local")

COLOURS = {"circle": (220, 40, 40), "square": (40, 200, 60), "stripes": (40, 60, 220), "triangle": (200, 200, 40)}


def jpeg(cls: str, seed: int) -> bytes:
    """A small photo-like JPEG whose colour depends on the class (distinct bytes and pHashes per seed)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:40, 0:48]
    wave = np.sin(x / (3 + seed % 7) + rng.uniform(0, 6)) * np.cos(y / (2 + seed % 5)) * 60
    pixels = np.clip(np.array(COLOURS[cls], float) + wave[..., None] + rng.normal(0, 8, (40, 48, 3)), 0, 255)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), "RGB").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def add_images(root: Path, classes, start: int, count: int) -> list[str]:
    """``count`` images per class, numbered from ``start``; returns their paths relative to ``root``."""
    added = []
    for c, cls in enumerate(classes):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(start, start + count):
            (root / cls / f"img{i:03d}.jpg").write_bytes(jpeg(cls, 1000 * c + i))
            added.append(f"{cls}/img{i:03d}.jpg")
    return added


class Log(list):
    def __call__(self, message: str) -> None:
        self.append(message)


def manifest(dst: Path) -> list[dict]:
    return pq.read_table(dst / "manifest.parquet").to_pylist()


def rejects(dst: Path) -> list[dict]:
    return pq.read_table(dst / "rejects.parquet").to_pylist()


def sha256_on_disk(dst: Path, name: str) -> str:
    return hashlib.sha256((dst / name).read_bytes()).hexdigest()


def stamps(dst: Path) -> dict[str, int]:
    return {str(p.relative_to(dst)): p.stat().st_mtime_ns for p in dst.rglob("*")}


def samples_read_by_training(dst: str, storage_options: dict | None = None) -> list[dict]:
    """Every sample the training reader finds, through _info.json (open_shards) and its tar reader."""
    import fsspec

    samples = []
    for split in read_info(dst, storage_options)["splits"]:
        shards = open_shards(dst, split, storage_options)
        for url, length in zip(shards.urls, shards.lengths):
            with fsspec.open(url, "rb", **(storage_options or {})) as f:
                found = list(iter_tar_samples(f))
            assert len(found) == length
            samples += found
    return samples


def keys_read_by_training(dst: str, storage_options: dict | None = None) -> Counter:
    return Counter(s["__key__"] for s in samples_read_by_training(dst, storage_options))


def check_balance(dst: Path, summary) -> None:
    """read = written + rejected, over the whole output and within each generation."""
    assert summary.read == summary.written + summary.rejected
    rows, bad = manifest(dst), rejects(dst)
    assert sum(r["samples"] for r in rows) == summary.written and len(bad) == summary.rejected
    recorded = json.loads((dst / "summary.json").read_text())["sources"]["generations"]
    assert [g["generation"] for g in recorded] == list(range(summary.generation + 1))
    for g in recorded:
        written = sum(r["samples"] for r in rows if r["generation"] == g["generation"])
        rejected = sum(1 for r in bad if r["generation"] == g["generation"])
        assert (g["written"], g["rejected"], g["read"]) == (written, rejected, written + rejected)


# --------------------------------------------------------------------------------------------- a folder corpus


def test_new_images_in_a_folder_become_a_new_generation(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "shards"
    add_images(src, ["circle", "square", "stripes"], 0, 10)
    cfg = ShardConfig(src=str(src), dst=str(dst), shard_samples=4, val_fraction=0.25, seed=2)
    first = shard_corpus(cfg, log=Log())
    assert (first.mode, first.generation, first.new) == ("full", 0, 30)
    before = manifest(dst)
    old_keys = set(keys_read_by_training(str(dst)))
    fingerprint = dataset_fingerprint(str(dst))

    log, stamped = Log(), stamps(dst)
    same = shard_corpus(cfg, log=log)
    assert (same.mode, same.shards_written_now, same.written) == ("confirmed", 0, 30)
    assert "nothing to do" in log[-1] and stamps(dst) == stamped  # nothing rewritten

    # new images: two per old class, a new class, a bad file, and a file sharing an old file's stem
    added = add_images(src, ["circle", "square", "stripes", "triangle"], 10, 2)
    (src / "square" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (src / "circle" / "img000.png").write_bytes((src / "circle" / "img011.jpg").read_bytes())
    log = Log()
    second = shard_corpus(cfg, log=log)
    new_shards = second.shards - first.shards
    assert (second.mode, second.generation, second.new) == ("incremental", 1, 10)
    assert f"10 new images: generation 1, {new_shards} new shards" in log
    assert second.shards_written_now == new_shards > 0
    assert second.written == 39 and second.rejected_by_reason == {"not-an-image": 1}
    check_balance(dst, second)

    # the old shards are byte for byte what they were; the new ones continue each split's numbering
    after = manifest(dst)
    assert [r for r in after if r["generation"] == 0] == before
    assert all(sha256_on_disk(dst, r["filename"]) == r["sha256"] for r in after)
    for split in ("train", "val"):
        indices = [r["shard"] for r in after if r["split"] == split]
        assert indices == list(range(len(indices)))
    assert {r["generation"] for r in after if r not in before} == {1}
    new_keys = keys_read_by_training(str(dst))
    assert max(new_keys.values()) == 1  # exactly once
    assert set(new_keys) - old_keys == {p.removesuffix(".jpg").replace("/", "__") for p in added} | {
        "circle__img000~png"  # the old file keeps its key; the new one of its stem gets its own
    }

    # classes: the old ids kept, the new class appended; its samples carry its id
    assert read_classes(str(dst)) == ["circle", "square", "stripes", "triangle"]
    info = json.loads((dst / "_info.json").read_text())
    assert info["generation"] == 1 and info["num_classes"] == 4
    assert dataset_fingerprint(str(dst)) != fingerprint
    assert verify_shards(str(dst)) == []

    third = shard_corpus(cfg, log=Log())
    assert (third.mode, third.generation, third.written) == ("confirmed", 1, 39)


def test_a_changed_or_deleted_image_reshards_in_full(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "shards"
    add_images(src, ["circle", "square"], 0, 8)
    cfg = ShardConfig(src=str(src), dst=str(dst), shard_samples=5)
    shard_corpus(cfg, log=Log())
    add_images(src, ["stripes"], 0, 3)
    assert shard_corpus(cfg, log=Log()).generation == 1

    (src / "circle" / "img003.jpg").unlink()
    log = Log()
    redone = shard_corpus(cfg, log=log)
    assert any("1 deleted: full re-shard" in line for line in log)
    assert (redone.mode, redone.generation, redone.written) == ("full", 0, 18)
    assert {r["generation"] for r in manifest(dst)} == {0} and not (dst / "_keys" / "keys-000001.parquet").exists()
    assert "circle__img003" not in keys_read_by_training(str(dst))
    check_balance(dst, redone)
    assert verify_shards(str(dst)) == []

    (src / "square" / "img002.jpg").write_bytes(jpeg("square", 777))  # replaced in place, same name
    add_images(src, ["stripes"], 3, 1)
    log = Log()
    again = shard_corpus(cfg, log=log)
    assert any("1 changed, 1 new: full re-shard" in line for line in log)
    assert (again.mode, again.generation, again.written) == ("full", 0, 19)
    sample = next(s for s in samples_read_by_training(str(dst)) if s["__key__"] == "square__img002")
    assert sample["jpg"] == (src / "square" / "img002.jpg").read_bytes()  # the new bytes, not the old


def test_a_full_reshard_killed_while_clearing_the_old_output_starts_again(tmp_path, monkeypatch):
    from pipelines.data.shards import job

    src, dst = tmp_path / "src", tmp_path / "shards"
    add_images(src, ["circle", "square"], 0, 6)
    cfg = ShardConfig(src=str(src), dst=str(dst), shard_samples=4)
    shard_corpus(cfg, log=Log())
    (src / "square" / "img000.jpg").unlink()
    real_clear = job._clear_destination

    def clear_then_die(fs, path, cfg, keep=None):
        (dst / "summary.json").unlink()
        next(dst.glob("*.tar")).unlink()
        raise KeyboardInterrupt("killed while clearing")

    monkeypatch.setattr(job, "_clear_destination", clear_then_die)
    with pytest.raises(KeyboardInterrupt):
        shard_corpus(cfg, log=Log())
    monkeypatch.setattr(job, "_clear_destination", real_clear)
    redone = shard_corpus(cfg, log=Log())
    assert (redone.mode, redone.generation, redone.written) == ("full", 0, 11)
    assert sum(keys_read_by_training(str(dst)).values()) == 11 and verify_shards(str(dst)) == []


def test_an_output_made_before_generations_is_read_verified_and_resharded(tmp_path):
    """Outputs of the code before incremental sharding: no sources.parquet, no _keys/, no generation columns."""
    src, dst = tmp_path / "src", tmp_path / "shards"
    add_images(src, ["circle", "square"], 0, 6)
    cfg = ShardConfig(src=str(src), dst=str(dst), shard_samples=4)
    shard_corpus(cfg, log=Log())
    (dst / "sources.parquet").unlink()
    for path in (dst / "_keys").iterdir():
        path.unlink()
    (dst / "_keys").rmdir()
    for name in ("manifest.parquet", "rejects.parquet"):
        table = pq.read_table(dst / name)
        pq.write_table(table.drop_columns(["generation"]), dst / name)
    summary = json.loads((dst / "summary.json").read_text())
    for name in ("generation", "mode", "new"):
        del summary["summary"][name]
    (dst / "summary.json").write_text(
        json.dumps({"fingerprint": summary["fingerprint"], "summary": summary["summary"]})
    )

    assert verify_shards(str(dst)) == []
    assert sum(keys_read_by_training(str(dst)).values()) == 12
    add_images(src, ["circle"], 6, 2)
    log = Log()
    redone = shard_corpus(cfg, log=log)
    assert any("no record of what" in line and "full re-shard" in line for line in log)
    assert (redone.mode, redone.generation, redone.written) == ("full", 0, 14)
    assert (dst / "sources.parquet").exists() and verify_shards(str(dst)) == []


# --------------------------------------------------------------------------------------------- S3


def test_s3_corpus_gains_images(tmp_path, s3_bucket, s3_storage_options):
    import s3fs

    local = tmp_path / "src"
    add_images(local, ["circle", "square"], 0, 6)
    fs = s3fs.S3FileSystem(**s3_storage_options)
    fs.put(str(local), f"{s3_bucket}/corpus", recursive=True)
    cfg = ShardConfig(
        src=f"{s3_bucket}/corpus", dst=f"{s3_bucket}/shards", shard_samples=4, storage_options=s3_storage_options
    )
    first = shard_corpus(cfg, log=Log())
    before = {r["filename"]: r["sha256"] for r in pq.read_table(fs.open(f"{cfg.dst}/manifest.parquet")).to_pylist()}
    versions = pq.read_table(fs.open(f"{cfg.dst}/sources.parquet")).column("version").to_pylist()
    assert all(v.startswith("ETag=") for v in versions)  # S3 objects are known by their ETags
    assert shard_corpus(cfg, log=Log()).mode == "confirmed"

    for rel in add_images(tmp_path / "more", ["square", "stripes"], 6, 3):
        fs.put(str(tmp_path / "more" / rel), f"{s3_bucket}/corpus/{rel}")
    log = Log()
    second = shard_corpus(cfg, log=log)
    assert (second.mode, second.generation, second.new, second.written) == ("incremental", 1, 6, 18)
    assert any(line.startswith("6 new images: generation 1") for line in log)
    fs.invalidate_cache()
    after = pq.read_table(fs.open(f"{cfg.dst}/manifest.parquet")).to_pylist()
    assert {r["filename"]: r["sha256"] for r in after if r["generation"] == 0} == before
    for name, sha in before.items():
        assert hashlib.sha256(fs.cat_file(f"{cfg.dst}/{name}")).hexdigest() == sha
    keys = keys_read_by_training(cfg.dst, s3_storage_options)
    assert sum(keys.values()) == len(keys) == 18 == first.written + 6
    assert verify_shards(cfg.dst, s3_storage_options) == []

    fs.pipe(f"{s3_bucket}/corpus/circle/img001.jpg", jpeg("circle", 4242))  # the same name, other bytes
    log = Log()
    redone = shard_corpus(cfg, log=log)
    assert any("1 changed: full re-shard" in line for line in log)
    assert (redone.mode, redone.generation, redone.written) == ("full", 0, 18)
    assert verify_shards(cfg.dst, s3_storage_options) == []


# --------------------------------------------------------------------------------------------- a label table


def test_label_table_rows_appended(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "shards"
    (src / "img").mkdir(parents=True)
    rows = []

    def add_row(i: int, cls: str, extra: list[str] = ()) -> None:
        (src / "img" / f"{i:04d}.jpg").write_bytes(jpeg(cls, i))
        rows.append({"path": f"img/{i:04d}.jpg", "labels": [cls, *extra], "split": "val" if i % 5 == 0 else "train"})

    for i in range(12):
        add_row(i, ["circle", "square"][i % 2], ["stripes"] if i % 3 == 0 else [])
    pq.write_table(pa.Table.from_pylist(rows), src / "labels.parquet")
    cfg = ShardConfig(src=str(src), dst=str(dst), shard_samples=4)
    first = shard_corpus(cfg, log=Log())
    before = manifest(dst)
    assert shard_corpus(cfg, log=Log()).mode == "confirmed"
    inside = ShardConfig(src=str(src), dst=str(src / "shards"), shard_samples=4)  # a table's folder may hold DST
    assert [shard_corpus(inside, log=Log()).mode for _ in range(2)] == ["full", "confirmed"]
    shutil.rmtree(src / "shards")
    (src / "img" / "unlisted.jpg").write_bytes(jpeg("circle", 99))  # a file no row names: not an input
    assert shard_corpus(cfg, log=Log()).mode == "confirmed"

    for i in range(12, 17):
        add_row(i, "triangle")
    rows.append({"path": "img/0003.jpg", "labels": ["circle"], "split": "train"})  # names a file sharded already
    pq.write_table(pa.Table.from_pylist(rows), src / "labels.parquet")
    log = Log()
    second = shard_corpus(cfg, log=log)
    assert (second.mode, second.generation, second.new) == ("incremental", 1, 6)
    assert second.written == first.written + 5 and second.rejected_by_reason == {"duplicate-key": 1}
    duplicate = next(r for r in rejects(dst) if r["reason"] == "duplicate-key")
    assert duplicate["generation"] == 1 and "sharded earlier" in duplicate["detail"]
    assert [r for r in manifest(dst) if r["generation"] == 0] == before
    assert all(sha256_on_disk(dst, r["filename"]) == r["sha256"] for r in manifest(dst))
    assert read_classes(str(dst)) == ["circle", "square", "stripes", "triangle"]
    keys = keys_read_by_training(str(dst))
    assert max(keys.values()) == 1 and {f"img__{i:04d}" for i in range(12, 17)} <= set(keys)
    check_balance(dst, second)
    assert verify_shards(str(dst)) == []

    rows[1]["labels"] = ["circle"]  # a row changed: its sample's labels in the shards would be stale
    pq.write_table(pa.Table.from_pylist(rows), src / "labels.parquet")
    log = Log()
    redone = shard_corpus(cfg, log=log)
    assert any("1 label-table rows changed or removed" in line and "full re-shard" in line for line in log)
    assert (redone.mode, redone.generation) == ("full", 0)


def test_a_new_tar_in_a_tar_corpus_becomes_a_new_generation(tmp_path):
    tars = tmp_path / "tars"
    tars.mkdir()
    for name, classes in (("a", ["circle", "square"]), ("b", ["stripes"])):
        add_images(tmp_path / name, classes, 0, 4)
        shard_corpus(ShardConfig(src=str(tmp_path / name), dst=str(tmp_path / f"{name}-shards")), log=Log())
    (tars / "a.tar").write_bytes((tmp_path / "a-shards" / "train-000000.tar").read_bytes())
    cfg = ShardConfig(src=str(tars), dst=str(tmp_path / "out"), source="tars", shard_samples=5)
    assert shard_corpus(cfg, log=Log()).written == 8
    (tars / "b.tar").write_bytes((tmp_path / "b-shards" / "train-000000.tar").read_bytes())
    second = shard_corpus(cfg, log=Log())
    assert (second.mode, second.generation, second.new, second.written) == ("incremental", 1, 4, 12)
    keys = keys_read_by_training(cfg.dst)
    assert max(keys.values()) == 1 and {f"stripes__img00{i}" for i in range(4)} <= set(keys)
    assert read_classes(cfg.dst) == ["circle", "square", "stripes"]
    assert verify_shards(cfg.dst) == []


def test_multi_label_rows_added_to_a_single_label_output_reshard_in_full(tmp_path):
    """The earlier shards give every sample a .cls member, which a sample of several labels cannot have."""
    src, dst = tmp_path / "src", tmp_path / "shards"
    (src / "img").mkdir(parents=True)
    for i in range(8):
        (src / "img" / f"{i}.jpg").write_bytes(jpeg(["circle", "square"][i % 2], i))
    rows = [{"path": f"img/{i}.jpg", "labels": [["circle", "square"][i % 2]]} for i in range(6)]
    pq.write_table(pa.Table.from_pylist(rows), src / "labels.parquet")
    cfg = ShardConfig(src=str(src), dst=str(dst), shard_samples=4)
    shard_corpus(cfg, log=Log())
    assert all("cls" in s for s in samples_read_by_training(str(dst)))
    rows += [{"path": f"img/{i}.jpg", "labels": ["circle", "square"]} for i in (6, 7)]
    pq.write_table(pa.Table.from_pylist(rows), src / "labels.parquet")
    log = Log()
    redone = shard_corpus(cfg, log=log)
    assert any("several labels" in line and "full re-shard" in line for line in log)
    assert (redone.mode, redone.generation, redone.written) == ("full", 0, 8)
    assert not any("cls" in s for s in samples_read_by_training(str(dst)))
    assert json.loads((dst / "_info.json").read_text())["multi_label"] is True
    assert verify_shards(str(dst)) == [] and shard_corpus(cfg, log=Log()).mode == "confirmed"


# --------------------------------------------------------------------------------------------- crashes


def test_an_incremental_run_stopped_while_committing_finishes_exactly_once(tmp_path, monkeypatch):
    """Killed after some of the new outputs were moved into place: the next run merges again to the same result."""
    from pipelines.data.shards import finish

    src, dst = tmp_path / "src", tmp_path / "shards"
    add_images(src, ["circle", "square"], 0, 6)
    cfg = ShardConfig(src=str(src), dst=str(dst), shard_samples=4)
    shard_corpus(cfg, log=Log())
    add_images(src, ["circle", "stripes"], 6, 3)
    (src / "circle" / "empty.jpg").write_bytes(b"")
    real_move, moved = finish._move, []

    def move_then_die(fs, source, target):
        if len(moved) == 3:  # keys, sources and rejects are in place, the manifest not yet
            raise KeyboardInterrupt("killed while committing")
        moved.append(target)
        real_move(fs, source, target)

    monkeypatch.setattr(finish, "_move", move_then_die)
    with pytest.raises(KeyboardInterrupt):
        shard_corpus(cfg, log=Log())
    assert moved[-1].endswith("rejects.parquet") and (dst / "_work").exists()
    assert len(rejects(dst)) == 1 and not any(r["generation"] == 1 for r in manifest(dst))  # half committed
    assert verify_shards(str(dst)) == []  # the manifest names only shards that are there
    monkeypatch.setattr(finish, "_move", real_move)

    resumed = shard_corpus(cfg, log=Log())
    assert (resumed.mode, resumed.generation, resumed.shards_written_now) == ("incremental", 1, 0)
    assert resumed.written == 18 and resumed.rejected_by_reason == {"empty": 1}  # the reject counted once
    check_balance(dst, resumed)
    assert max(keys_read_by_training(str(dst)).values()) == 1 and verify_shards(str(dst)) == []
    assert not (dst / "_work").exists() and shard_corpus(cfg, log=Log()).mode == "confirmed"


def test_a_killed_incremental_run_resumes_exactly_once(tmp_path, kill_session):
    src, killed, reference = tmp_path / "src", tmp_path / "killed", tmp_path / "reference"
    add_images(src, ["circle", "square"], 0, 5)
    settings = dict(src=str(src), shard_samples=10, seed=4)
    for dst in (killed, reference):
        shard_corpus(ShardConfig(dst=str(dst), **settings), log=Log())
    add_images(src, ["circle", "square", "stripes"], 5, 100)
    reference_summary = shard_corpus(ShardConfig(dst=str(reference), **settings), log=Log())
    assert reference_summary.mode == "incremental" and reference_summary.shards == 1 + 30

    script = (
        "import ray; from pipelines.data.shards import ShardConfig, shard_corpus; "
        "ray.init(address='local', num_cpus=2, include_dashboard=False, log_to_driver=False); "
        f"shard_corpus(ShardConfig(dst={str(killed)!r}, **{settings!r}))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    done_dir = killed / "_work" / "done"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (done_dir.exists() and any(done_dir.iterdir())):
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    kill_session(proc)  # the job and its Ray processes, mid-write
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["summary"]["generation"] == 0, "the run finished before the kill: make the corpus bigger"
    markers_at_kill = len(list(done_dir.iterdir()))
    assert 0 < markers_at_kill < 30

    resumed = shard_corpus(ShardConfig(dst=str(killed), **settings), log=Log())
    assert (resumed.mode, resumed.generation) == ("incremental", 1)
    assert resumed.shards_written_now == 30 - markers_at_kill
    assert manifest(killed) == manifest(reference)  # the same bytes: nothing written twice, nothing lost
    assert sorted(p.name for p in killed.iterdir()) == sorted(p.name for p in reference.iterdir())
    assert max(keys_read_by_training(str(killed)).values()) == 1
    check_balance(killed, resumed)
    assert verify_shards(str(killed)) == []
