"""The sharding job against real parts: a local Ray, real image bytes, moto's S3 server, a real kill."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.data.shards import ShardConfig, ShardError, shard_corpus, verify_shards

pytestmark = pytest.mark.usefixtures("ray_local")

CLASSES = ("circle", "square", "stripes")
COLOURS = {"circle": (220, 40, 40), "square": (40, 200, 60), "stripes": (40, 60, 220)}


def picture(cls: str, seed: int, size=(48, 40)) -> Image.Image:
    """A small photo-like image whose colour depends on the class (distinct pHashes per seed)."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    base = np.array(COLOURS[cls], dtype=np.float64)
    wave = np.sin(x / (3 + seed % 7) + rng.uniform(0, 6)) * np.cos(y / (2 + seed % 5)) * 60
    pixels = np.clip(base[None, None] + wave[..., None] + rng.normal(0, 8, (h, w, 3)), 0, 255)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def jpeg(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, **kwargs)
    return buffer.getvalue()


def write_folder_corpus(root: Path, per_class: int = 12) -> int:
    """An ImageFolder tree; returns how many files it holds."""
    count = 0
    for c, cls in enumerate(CLASSES):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / cls / f"img{i:03d}.jpg").write_bytes(jpeg(picture(cls, seed=100 * c + i)))
            count += 1
    return count


def add_awkward_files(root: Path) -> dict[str, str | None]:
    """One file of every awkward kind; maps its path (relative) to the expected reject reason or None."""
    red = picture("circle", 999)
    expected: dict[str, str | None] = {}

    def put(rel: str, data: bytes, reason: str | None) -> None:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        expected[rel] = reason

    png = io.BytesIO()
    red.save(png, format="PNG")
    put("circle/zero.jpg", b"", "empty")
    put("circle/truncated.jpg", jpeg(picture("circle", 501, (200, 160)))[:900], "truncated")
    put("circle/garbage.jpg", bytes(np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8)), "not-an-image")
    put("circle/readme.txt", b"not an image at all\n", "not-an-image")
    put("square/bomb.png", _png_claiming(60_000, 60_000), "decompression-bomb")
    put("square/cmyk.jpg", jpeg(picture("square", 502).convert("CMYK")), None)
    put("square/gray.jpg", jpeg(picture("square", 503).convert("L")), None)
    sixteen = io.BytesIO()
    Image.fromarray(np.asarray(picture("square", 504).convert("L"), np.uint16) * 257).save(sixteen, format="PNG")
    put("square/sixteen.png", sixteen.getvalue(), None)
    rgba = picture("stripes", 505).convert("RGBA")
    rgba.putalpha(128)
    pal = io.BytesIO()
    rgba.convert("P", palette=Image.Palette.ADAPTIVE).save(pal, format="PNG", transparency=0)
    put("stripes/palette.png", pal.getvalue(), None)
    exif = Image.Exif()
    exif[0x0112] = 6
    put("stripes/rotated.jpg", jpeg(picture("stripes", 506, (60, 30)), exif=exif.tobytes()), None)
    put("stripes/huge.jpg", jpeg(picture("stripes", 507, (1600, 900))), None)
    put("unlabelled.jpg", jpeg(picture("circle", 508)), "no-labels")
    return expected


def _png_claiming(width: int, height: int) -> bytes:
    import struct
    import zlib

    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def read_tars(dst: Path) -> dict[str, dict]:
    """Every sample of every shard, read with the webdataset library."""
    import webdataset as wds

    urls = sorted(str(p) for p in dst.glob("*.tar"))
    samples = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        assert sample["__key__"] not in samples, "duplicate key across shards"
        samples[sample["__key__"]] = sample
    return samples


def manifest(dst) -> list[dict]:
    return pq.read_table(Path(dst) / "manifest.parquet").to_pylist()


# --------------------------------------------------------------------------------------------- folder


def test_folder_corpus_with_every_awkward_input(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "shards"
    good = write_folder_corpus(src)
    expected = add_awkward_files(src)
    cfg = ShardConfig(src=str(src), dst=str(dst), shard_samples=10, val_fraction=0.25, max_side=256, seed=3)
    summary = shard_corpus(cfg, log=lambda *_: None)

    rejected_expected = {k: v for k, v in expected.items() if v}
    assert summary.read == good + len(expected)
    assert summary.read == summary.written + summary.rejected
    assert summary.rejected == len(rejected_expected)
    rejects = pq.read_table(dst / "rejects.parquet").to_pylist()
    assert {r["source"]: r["reason"] for r in rejects} == rejected_expected

    samples = read_tars(dst)
    assert len(samples) == summary.written
    for key, sample in samples.items():
        meta = json.loads(sample["json"])
        image = Image.open(io.BytesIO(sample["jpg"]))
        image.load()
        assert image.format == "JPEG" and image.mode == "RGB" and max(image.size) <= 256
        assert meta["labels"][0] == meta["source"].split("/")[0]
        assert int(sample["cls"]) == meta["label_ids"][0] == CLASSES.index(meta["labels"][0])
        assert key == meta["source"].rsplit(".", 1)[0].replace("/", "__")
    by_source = {json.loads(s["json"])["source"]: s for s in samples.values()}
    assert Image.open(io.BytesIO(by_source["stripes/rotated.jpg"]["jpg"])).size == (30, 60)  # EXIF applied
    assert Image.open(io.BytesIO(by_source["stripes/huge.jpg"]["jpg"])).size == (256, 144)
    original = (src / "circle/img000.jpg").read_bytes()
    assert by_source["circle/img000.jpg"]["jpg"] == original  # valid JPEGs keep their bytes

    rows = manifest(dst)
    assert [r["filename"] for r in rows] == sorted(p.name for p in dst.glob("*.tar"))
    assert sum(r["samples"] for r in rows) == summary.written
    info = json.loads((dst / "_info.json").read_text())
    assert set(info["splits"]) == {"train", "val"}
    for split, entry in info["splits"].items():
        assert entry["filenames"] == [r["filename"] for r in rows if r["split"] == split]
        assert entry["num_samples"] == sum(entry["shard_lengths"])
        assert all(name.startswith(f"{split}-") for name in entry["filenames"])
    assert 0 < info["splits"]["val"]["num_samples"] < info["splits"]["train"]["num_samples"]
    assert json.loads((dst / "classes.json").read_text()) == [{"id": i, "name": n} for i, n in enumerate(CLASSES)]
    assert verify_shards(str(dst)) == []

    listing = subprocess.run(["tar", "tf", str(dst / rows[0]["filename"])], capture_output=True, text=True, check=True)
    assert len(listing.stdout.split()) == 3 * rows[0]["samples"]  # jpg, json, cls per sample


def test_ray_reads_the_shards_back(tmp_path, ray_local):
    src, dst = tmp_path / "src", tmp_path / "shards"
    count = write_folder_corpus(src, per_class=8)
    shard_corpus(ShardConfig(src=str(src), dst=str(dst), shard_samples=7), log=lambda *_: None)
    tars = sorted(str(p) for p in dst.glob("*.tar"))
    ds = ray_local.data.read_webdataset(tars, decoder=None, suffixes=["jpg", "json", "cls"])
    rows = ds.take_all()
    assert len(rows) == count
    keys = {r["__key__"] for r in rows}
    assert len(keys) == count
    for r in rows:
        assert json.loads(r["json"])["labels"][0] == r["__key__"].split("__")[0]


def test_shuffle_is_deterministic_and_random(tmp_path):
    src = tmp_path / "src"
    write_folder_corpus(src, per_class=30)
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        dst = tmp_path / name
        shard_corpus(ShardConfig(src=str(src), dst=str(dst), shard_samples=15, seed=seed), log=lambda *_: None)
        runs[name] = manifest(dst)
    assert [r["sha256"] for r in runs["a"]] == [r["sha256"] for r in runs["b"]]  # byte-identical
    assert [r["sha256"] for r in runs["a"]] != [r["sha256"] for r in runs["c"]]
    # every shard is a random sample: each holds several classes, not one sorted block
    for row in runs["a"]:
        assert len(json.loads(row["label_histogram"])) >= 2


def test_the_plan_does_not_depend_on_how_the_index_is_cut(tmp_path, monkeypatch):
    """Buckets and listing units are how the index scales out; the shards must not depend on them."""
    from pipelines.data.shards import index, plan

    src = tmp_path / "src"
    write_folder_corpus(src, per_class=30)
    (src / "circle" / "img000.png").write_bytes((src / "circle" / "img001.jpg").read_bytes())  # a shared stem
    quiet = {"log": lambda *_: None}
    shard_corpus(ShardConfig(src=str(src), dst=str(tmp_path / "one"), shard_samples=7, val_fraction=0.2), **quiet)
    monkeypatch.setattr(plan, "_BUCKET_ROWS", 4)  # 91 rows -> 32 buckets, so shards span several
    many = shard_corpus(
        ShardConfig(src=str(src), dst=str(tmp_path / "many"), shard_samples=7, val_fraction=0.2), **quiet
    )
    assert plan._bucket_bits(91) == 5
    assert many.rejected_by_reason == {} and many.written == 91
    assert manifest(tmp_path / "one") == manifest(tmp_path / "many")
    assert {"circle__img000", "circle__img000~png"} <= set(read_tars(tmp_path / "many"))

    # a label table indexed in parts of row groups, a task each, gives what one streamed CSV gives
    monkeypatch.setattr(index, "_TABLE_PART_ROWS", 4)  # row groups of 9 rows in parts of 4, 4 and 1
    import pyarrow as pa
    import pyarrow.csv as pcsv

    jpgs = sorted(src.rglob("*.jpg"))
    table = pa.table({"path": [f"img/{p.relative_to(src)}" for p in jpgs], "labels": [p.parent.name for p in jpgs]})
    for name, write in (
        ("parquet", lambda t, d: pq.write_table(t, d / "labels.parquet", row_group_size=9)),
        ("csv", lambda t, d: pcsv.write_csv(t, d / "labels.csv")),
    ):
        table_src = tmp_path / f"src-{name}"
        table_src.mkdir()
        (table_src / "img").symlink_to(src)
        write(table, table_src)
        shard_corpus(ShardConfig(src=str(table_src), dst=str(tmp_path / name), shard_samples=7), **quiet)
    assert pq.ParquetFile(tmp_path / "src-parquet" / "labels.parquet").metadata.num_row_groups == 10
    assert [r["sha256"] for r in manifest(tmp_path / "parquet")] == [r["sha256"] for r in manifest(tmp_path / "csv")]


def test_shard_bytes_target(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "shards"
    write_folder_corpus(src, per_class=20)
    mean = np.mean([p.stat().st_size for p in src.rglob("*.jpg")])
    target = int(12.5 * (mean + 1536))  # 12 whole samples per shard
    shard_corpus(ShardConfig(src=str(src), dst=str(dst), shard_samples=None, shard_bytes=target), log=lambda *_: None)
    rows = manifest(dst)
    assert len(rows) == -(-60 // 12)
    assert all(0.4 * target < r["bytes"] < 2.0 * target for r in rows)


# --------------------------------------------------------------------------------------------- table, tars


def test_label_table_multi_label_with_bad_rows(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "shards"
    (src / "img").mkdir(parents=True)
    rows = []
    for i in range(24):
        cls = CLASSES[i % 3]
        (src / "img" / f"{i:04d}.jpg").write_bytes(jpeg(picture(cls, i)))
        extra = [CLASSES[(i + 1) % 3]] if i % 4 == 0 else []
        rows.append({"path": f"img/{i:04d}.jpg", "labels": [cls, *extra], "split": "val" if i < 6 else "train"})
    rows.append({"path": "img/missing.jpg", "labels": ["circle"], "split": "train"})  # names a missing file
    rows.append({"path": "img/0001.jpg", "labels": ["square"], "split": "train"})  # the same file twice
    rows.append({"path": "img/0002.jpg", "labels": [], "split": "train"})  # no labels (and a duplicate)
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows), src / "labels.parquet")
    (src / "classes.json").write_text(json.dumps(list(CLASSES)))

    summary = shard_corpus(
        ShardConfig(src=str(src), dst=str(dst), shard_samples=8, split_column="split"), log=lambda *_: None
    )
    assert summary.read == 27 and summary.written == 24
    assert summary.rejected_by_reason == {"missing-file": 1, "duplicate-key": 2}
    assert summary.splits == {"train": 18, "val": 6}
    samples = read_tars(dst)
    multi = [json.loads(s["json"]) for s in samples.values() if len(json.loads(s["json"])["labels"]) > 1]
    assert len(multi) == 6
    assert all("cls" not in s for s in samples.values())  # multi-label corpora carry labels in the json only
    for meta in multi:
        assert meta["label_ids"] == [CLASSES.index(n) for n in meta["labels"]]


def test_label_table_rows_with_and_without_a_protocol(tmp_path):
    """Relative rows are read from the table's folder; rows that are URLs are read where they point."""
    src, dst = tmp_path / "src", tmp_path / "shards"
    (src / "img").mkdir(parents=True)
    rows = []
    for i in range(6):
        (src / "img" / f"{i:04d}.jpg").write_bytes(jpeg(picture(CLASSES[i % 3], i)))
        path = f"img/{i:04d}.jpg" if i < 3 else f"file://{src}/img/{i:04d}.jpg"
        rows.append({"path": path, "label": CLASSES[i % 3]})
    (src / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = shard_corpus(
        ShardConfig(src=str(src), dst=str(dst), shard_samples=4, label_column="label"), log=lambda *_: None
    )
    assert summary.written == 6 and summary.rejected_by_reason == {}
    sources = sorted(json.loads(s["json"])["source"] for s in read_tars(dst).values())
    assert sources == sorted(r["path"] for r in rows)


LABEL_COLUMNS = {
    "names": ["circle", None, "stripes"],
    "ids": [0, 5, None, -1, 2],
    "id-lists": [[0, 1], [], None, [7, None, 2]],
    "name-lists": [["circle", "square"], [], None, ["stripes", None]],
    "floats": [1.0, float("nan"), None],  # a CSV id column with a gap: row by row
    "small-ints": [0, 1, 2],
}


@pytest.mark.parametrize("values", LABEL_COLUMNS.values(), ids=LABEL_COLUMNS.keys())
@pytest.mark.parametrize("classes", [list(CLASSES), None], ids=["with-classes", "no-classes"])
def test_label_columns_are_read_in_arrow_as_row_by_row(values, classes):
    import pyarrow as pa

    from pipelines.data.shards.index import _as_label_names, _label_names

    kind = pa.int8() if values is LABEL_COLUMNS["small-ints"] else pa.array(values).type
    column = pa.chunked_array([pa.array(values[:2], kind), pa.array(values[2:], kind)])
    names = _label_names(column, classes)
    names = names.to_pylist() if isinstance(names, pa.Array) else names
    assert names == [_as_label_names(v, classes) for v in column.to_pylist()]


def test_keys_from_paths_in_arrow_as_one_by_one():
    import pyarrow as pa

    from pipelines.data.shards.format import _key_from_path, _keys_from_paths

    paths = [
        "a/b.jpg",
        "a.b/c",
        "x/.hidden",
        "a.b.c",
        "sub dir/ümlaut é.png",
        "noext",
        "",
        "a/b.",
        "n/日本.jpg",
        "q;x.JPEG",
    ]
    keys = _keys_from_paths(pa.array(paths))
    assert keys == [_key_from_path(p) for p in paths]
    assert "a__b" in keys and "sub_dir___mlaut__" in keys  # one "_" per character, not per byte


def test_reshard_existing_tars(tmp_path):
    src, first, second = tmp_path / "src", tmp_path / "first", tmp_path / "second"
    count = write_folder_corpus(src, per_class=10)
    shard_corpus(ShardConfig(src=str(src), dst=str(first), shard_samples=4), log=lambda *_: None)
    tars = tmp_path / "tars"
    tars.mkdir()
    for p in first.glob("*.tar"):
        (tars / p.name).write_bytes(p.read_bytes())
    (tars / "broken.tar").write_bytes(b"not a tar" * 100)
    summary = shard_corpus(
        ShardConfig(src=str(tars), dst=str(second), source="tars", shard_samples=25, seed=9), log=lambda *_: None
    )
    assert summary.written == count and summary.read == count + summary.rejected
    before = {k: (s["jpg"], json.loads(s["json"])["labels"]) for k, s in read_tars(first).items()}
    after = {k: (s["jpg"], json.loads(s["json"])["labels"]) for k, s in read_tars(second).items()}
    assert after == before


# --------------------------------------------------------------------------------------------- S3


def test_s3_to_s3(tmp_path, s3_bucket, s3_storage_options):
    import s3fs

    src = tmp_path / "src"
    count = write_folder_corpus(src, per_class=6)
    (src / "square" / "empty.jpg").write_bytes(b"")
    fs = s3fs.S3FileSystem(**s3_storage_options)
    fs.put(str(src), f"{s3_bucket}/corpus", recursive=True)
    cfg = ShardConfig(
        src=f"{s3_bucket}/corpus",
        dst=f"{s3_bucket}/shards",
        shard_samples=5,
        storage_options=s3_storage_options,
    )
    summary = shard_corpus(cfg, log=lambda *_: None)
    assert summary.written == count and summary.rejected_by_reason == {"empty": 1}
    fs.invalidate_cache()
    names = {p.rsplit("/", 1)[1] for p in fs.ls(f"{s3_bucket}/shards")}
    assert {"manifest.parquet", "rejects.parquet", "_info.json", "summary.json", "train-000000.tar"} <= names
    assert verify_shards(cfg.dst, s3_storage_options) == []
    local = tmp_path / "back"
    fs.get(f"{s3_bucket}/shards", str(local), recursive=True)
    assert len(read_tars(local)) == count
    again = shard_corpus(cfg, log=lambda *_: None)
    assert again.shards_written_now == 0


@pytest.mark.parametrize("direction", ["s3 corpus, local shards", "local corpus, s3 shards"])
def test_a_corpus_and_its_shards_on_different_filesystems(tmp_path, s3_bucket, s3_storage_options, direction):
    """Inputs are read from the corpus's filesystem, not the output's (every input was once 'missing')."""
    import s3fs

    src = tmp_path / "src"
    count = write_folder_corpus(src, per_class=4)
    fs = s3fs.S3FileSystem(**s3_storage_options)
    if direction.startswith("s3 corpus"):
        for path in sorted(p for p in src.rglob("*") if p.is_file()):
            fs.pipe(f"{s3_bucket}/corpus/{path.relative_to(src)}", path.read_bytes())
        source, dst = f"{s3_bucket}/corpus", str(tmp_path / "shards")
    else:
        source, dst = str(src), f"{s3_bucket}/shards"
    cfg = ShardConfig(src=source, dst=dst, shard_samples=5, storage_options=s3_storage_options)
    summary = shard_corpus(cfg, log=lambda *_: None)
    assert summary.written == count and summary.rejected == 0, summary.rejected_by_reason
    assert verify_shards(dst, s3_storage_options) == []


# --------------------------------------------------------------------------------------------- exactly once


def test_killed_run_resumes_to_identical_shards(tmp_path, kill_session):
    src = tmp_path / "src"
    write_folder_corpus(src, per_class=100)
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    cfg = dict(src=str(src), shard_samples=10, seed=5)
    shard_corpus(ShardConfig(dst=str(reference), **cfg), log=lambda *_: None)

    script = (
        "import ray; from pipelines.data.shards import ShardConfig, shard_corpus; "
        "ray.init(address='local', num_cpus=2, include_dashboard=False, log_to_driver=False); "
        f"shard_corpus(ShardConfig(dst={str(killed)!r}, **{cfg!r}))"
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
    assert not (killed / "summary.json").exists(), "the run finished before the kill: make the corpus bigger"
    markers_at_kill = len(list(done_dir.iterdir()))
    assert 0 < markers_at_kill < 30

    summary = shard_corpus(ShardConfig(dst=str(killed), **cfg), log=lambda *_: None)
    assert summary.shards == 30 and summary.shards_written_now == 30 - markers_at_kill
    assert manifest(killed) == manifest(reference)  # same bytes: nothing duplicated, nothing lost
    assert sorted(p.name for p in killed.iterdir()) == sorted(p.name for p in reference.iterdir())
    assert verify_shards(str(killed)) == []


def test_finished_run_does_nothing_and_other_settings_are_refused(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "shards"
    write_folder_corpus(src, per_class=5)
    cfg = ShardConfig(src=str(src), dst=str(dst), shard_samples=5)
    shard_corpus(cfg, log=lambda *_: None)
    stamp = {p.name: p.stat().st_mtime_ns for p in dst.iterdir()}
    again = shard_corpus(cfg, log=lambda *_: None)
    assert again.shards_written_now == 0 and again.written == 15
    assert {p.name: p.stat().st_mtime_ns for p in dst.iterdir()} == stamp
    with pytest.raises(ShardError, match="other settings"):
        shard_corpus(ShardConfig(src=str(src), dst=str(dst), shard_samples=7), log=lambda *_: None)
    redone = shard_corpus(ShardConfig(src=str(src), dst=str(dst), shard_samples=7), overwrite=True, log=lambda *_: None)
    assert redone.shards == 3
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "precious.txt").write_text("keep me")
    with pytest.raises(ShardError, match="not empty"):
        shard_corpus(ShardConfig(src=str(src), dst=str(tmp_path / "occupied")), log=lambda *_: None)
    assert (tmp_path / "occupied" / "precious.txt").read_text() == "keep me"
    with pytest.raises(ShardError, match="does not exist"):
        shard_corpus(ShardConfig(src=str(tmp_path / "nowhere"), dst=str(tmp_path / "x")), log=lambda *_: None)


def test_verify_finds_tampering(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "shards"
    write_folder_corpus(src, per_class=4)
    shard_corpus(ShardConfig(src=str(src), dst=str(dst), shard_samples=4), log=lambda *_: None)
    first, second = sorted(dst.glob("*.tar"))[:2]
    data = bytearray(first.read_bytes())
    data[700] ^= 0xFF
    first.write_bytes(bytes(data))
    second.unlink()
    problems = verify_shards(str(dst))
    assert any(first.name in p and "sha256" in p for p in problems)
    assert any(second.name in p and "missing" in p for p in problems)


# --------------------------------------------------------------------------------------------- evaluation sets


def test_near_duplicates_of_eval_images_are_removed(tmp_path):
    src, dst, evalset = tmp_path / "src", tmp_path / "shards", tmp_path / "eval"
    write_folder_corpus(src, per_class=10)
    evalset.mkdir()
    leaked = ["circle/img003.jpg", "square/img007.jpg", "stripes/img001.jpg"]
    for i, rel in enumerate(leaked):  # resized and recompressed copies, as a test set would hold them
        image = Image.open(src / rel).resize((64, 52))
        image.save(evalset / f"test{i}.jpg", quality=70)
    Image.new("RGB", (40, 40), (128, 128, 128)).save(evalset / "unrelated.png")
    summary = shard_corpus(
        ShardConfig(src=str(src), dst=str(dst), shard_samples=10, eval_sets=[str(evalset)]), log=lambda *_: None
    )
    rejects = pq.read_table(dst / "rejects.parquet").to_pylist()
    assert sorted(r["source"] for r in rejects) == sorted(leaked)
    assert {r["reason"] for r in rejects} == {"duplicate-of-eval"}
    assert all(r["detail"].startswith(str(evalset)) for r in rejects)
    assert summary.written == 27


# --------------------------------------------------------------------------------------------- destination safety


def test_overwrite_never_deletes_the_source_or_anything_it_did_not_write(tmp_path):
    from click.testing import CliRunner

    from pipelines.cli import main

    corpus = tmp_path / "data" / "corpus"
    count = write_folder_corpus(corpus, per_class=3)
    files = sorted(p for p in corpus.rglob("*"))
    quiet = {"log": lambda *_: None}

    def cfg(dst, src=corpus, **kw) -> ShardConfig:
        return ShardConfig(src=str(src), dst=str(dst), shard_samples=4, **kw)

    # the review's case, through the command: DST is the source's parent
    result = CliRunner().invoke(main, ["shard", str(corpus), str(corpus.parent), "--overwrite"])
    assert result.exit_code == 2 and "contains the source" in result.output
    with pytest.raises(ShardError, match="contains the source"):
        shard_corpus(cfg(tmp_path), overwrite=True, **quiet)
    with pytest.raises(ShardError, match="is the source"):
        shard_corpus(cfg(corpus), overwrite=True, **quiet)
    (tmp_path / "link").symlink_to(corpus)  # the same folder under another name
    with pytest.raises(ShardError, match="is the source"):
        shard_corpus(cfg(tmp_path / "link"), overwrite=True, **quiet)
    with pytest.raises(ShardError, match="inside the source"):  # its shards would be listed as input
        shard_corpus(cfg(corpus / "circle" / "shards"), **quiet)
    assert sorted(p for p in corpus.rglob("*")) == files

    # a folder of shards with something else in it is not replaced, nor anything in it deleted
    dst = tmp_path / "shards"
    shard_corpus(cfg(dst), **quiet)
    (dst / "notes.txt").write_text("mine")
    (dst / "keep").mkdir()
    (dst / "train-000000.tar.bak").write_bytes(b"mine too")
    before = sorted(p.name for p in dst.iterdir())
    with pytest.raises(ShardError, match=r"refusing to overwrite .*3 entries.*keep/, notes.txt, train-000000.tar.bak"):
        shard_corpus(cfg(dst, seed=1), overwrite=True, **quiet)
    assert sorted(p.name for p in dst.iterdir()) == before and (dst / "notes.txt").read_text() == "mine"
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    with pytest.raises(ShardError, match="not a folder"):
        shard_corpus(cfg(a_file), overwrite=True, **quiet)
    assert a_file.read_text() == "not a folder"

    # only our own outputs (and a killed run's _work/): replaced, the folder itself kept
    for name in ("notes.txt", "train-000000.tar.bak"):
        (dst / name).unlink()
    (dst / "keep").rmdir()
    (dst / "_work" / "tmp").mkdir(parents=True)
    (dst / "_work" / "tmp" / "train-000009.tar.0123").write_bytes(b"partial")
    (dst / "val-000003.tar").write_bytes(b"a shard of an earlier run")
    redone = shard_corpus(cfg(dst, seed=1), overwrite=True, **quiet)
    assert redone.written == count and not (dst / "_work").exists() and not (dst / "val-000003.tar").exists()
    assert verify_shards(str(dst)) == []


def test_split_names_cannot_leave_the_destination(tmp_path):
    import pyarrow as pa

    src = tmp_path / "src"
    (src / "img").mkdir(parents=True)
    for i in range(4):
        (src / "img" / f"{i}.jpg").write_bytes(jpeg(picture(CLASSES[i % 3], i)))
    splits = ["train", "train", "../../escaped", "val"]
    rows = [{"path": f"img/{i}.jpg", "labels": CLASSES[i % 3], "split": s} for i, s in enumerate(splits)]
    pq.write_table(pa.Table.from_pylist(rows), src / "labels.parquet")
    with pytest.raises(ShardError, match=r"split names .*\.\./\.\./escaped"):
        shard_corpus(ShardConfig(src=str(src), dst=str(tmp_path / "out" / "shards")), log=lambda *_: None)
    assert not list(tmp_path.rglob("escaped*"))


def test_s3_overwrite_refuses_a_prefix_or_bucket_holding_the_source(tmp_path, s3_bucket, s3_storage_options):
    import s3fs

    src = tmp_path / "src"
    write_folder_corpus(src, per_class=2)
    fs = s3fs.S3FileSystem(**s3_storage_options)
    fs.put(str(src), f"{s3_bucket}/data/corpus", recursive=True)
    objects = sorted(fs.find(s3_bucket))
    for dst in (f"{s3_bucket}/data", s3_bucket, f"{s3_bucket}/data/corpus"):
        cfg = ShardConfig(src=f"{s3_bucket}/data/corpus", dst=dst, storage_options=s3_storage_options)
        with pytest.raises(ShardError, match="the source"):
            shard_corpus(cfg, overwrite=True, log=lambda *_: None)
    fs.invalidate_cache()
    assert sorted(fs.find(s3_bucket)) == objects


# --------------------------------------------------------------------------------------------- what is read


@contextlib.contextmanager
def no_hang(seconds: float):
    """Fails the test instead of hanging it (a FIFO opened for reading waits for a writer forever)."""

    def alarm(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: something blocks on a special file")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(int(seconds))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def unix_socket(path: Path):
    import socket

    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    return sock


def test_special_files_links_and_oversized_files_are_rejected_unread(tmp_path):
    src, outside = tmp_path / "src", tmp_path / "outside"
    good = write_folder_corpus(src, per_class=4)
    outside.mkdir()
    (outside / "elsewhere.jpg").write_bytes(jpeg(picture("circle", 900)))
    os.mkfifo(src / "circle" / "pipe.jpg")
    sock = unix_socket(src / "square" / "socket.jpg")
    (src / "circle" / "inside.jpg").symlink_to(src / "square" / "img000.jpg")  # a link inside SRC: read
    (src / "circle" / "out.jpg").symlink_to(outside / "elsewhere.jpg")
    (src / "circle" / "dangling.jpg").symlink_to(tmp_path / "nothing.jpg")
    (src / "circle" / "folder.jpg").symlink_to(outside)
    (src / "linked-class").symlink_to(outside)  # a symlinked folder is not descended into
    big = jpeg(picture("stripes", 901, (400, 300)))
    (src / "stripes" / "big.jpg").write_bytes(big)
    with open(src / "stripes" / "sparse.jpg", "wb") as f:  # 1 TB claimed, nothing stored: must not be read
        f.truncate(1 << 40)
    evalset = tmp_path / "eval"
    evalset.mkdir()
    os.mkfifo(evalset / "pipe.png")
    Image.new("RGB", (40, 40), (128, 128, 128)).save(evalset / "grey.png")
    expected = {
        "circle/pipe.jpg": "not-a-regular-file",
        "square/socket.jpg": "not-a-regular-file",
        "circle/out.jpg": "symlink",
        "circle/dangling.jpg": "symlink",
        "circle/folder.jpg": "symlink",
        "linked-class": "symlink",
        "stripes/big.jpg": "file-too-large",
        "stripes/sparse.jpg": "file-too-large",
    }
    cap = len(big) - 1
    assert all(p.stat().st_size <= cap for p in src.glob("*/img*.jpg"))
    quiet = {"log": lambda *_: None}
    try:
        with no_hang(180):
            cfg = ShardConfig(src=str(src), dst=str(tmp_path / "a"), shard_samples=5, max_file_bytes=cap)
            summary = shard_corpus(ShardConfig(**{**cfg.__dict__, "eval_sets": [str(evalset)]}), **quiet)
            followed = shard_corpus(
                ShardConfig(**{**cfg.__dict__, "dst": str(tmp_path / "b"), "follow_symlinks": True}), **quiet
            )
    finally:
        sock.close()
    rejects = pq.read_table(tmp_path / "a" / "rejects.parquet").to_pylist()
    assert {r["source"]: r["reason"] for r in rejects} == expected
    details = {r["source"]: r["detail"] for r in rejects}
    assert details["circle/pipe.jpg"] == "a FIFO" and details["square/socket.jpg"] == "a socket"
    assert "outside the source" in details["circle/out.jpg"] and "a folder" in details["circle/folder.jpg"]
    assert details["stripes/sparse.jpg"] == f"{1 << 40} bytes > {cap}"
    assert summary.read == good + 1 + len(expected) == summary.written + summary.rejected
    assert summary.written == good + 1  # the link inside SRC
    sources = {json.loads(s["json"])["source"] for s in read_tars(tmp_path / "a").values()}
    assert "circle/inside.jpg" in sources and "circle/out.jpg" not in sources
    # follow_symlinks: a link to a regular file anywhere is read; links to folders and broken links are not
    assert followed.written == good + 2 and followed.read == summary.read
    assert set(followed.rejected_by_reason) == {"not-a-regular-file", "symlink", "file-too-large"}
    assert followed.rejected_by_reason["symlink"] == 3


def test_label_table_rows_naming_special_or_oversized_files_are_rejected_unread(tmp_path):
    src, outside = tmp_path / "src", tmp_path / "outside"
    (src / "img").mkdir(parents=True)
    outside.mkdir()
    rows = []
    for i in range(6):
        (src / "img" / f"{i}.jpg").write_bytes(jpeg(picture(CLASSES[i % 3], i)))
        rows.append({"path": f"img/{i}.jpg", "labels": CLASSES[i % 3]})
    (outside / "linked.jpg").write_bytes(jpeg(picture("circle", 50)))
    (src / "img" / "linked.jpg").symlink_to(outside / "linked.jpg")  # named by the table itself: read
    os.mkfifo(src / "img" / "pipe.jpg")
    sock = unix_socket(src / "img" / "socket.jpg")
    (src / "img" / "big.jpg").write_bytes(jpeg(picture("square", 51, (500, 400))))
    for name in ("linked.jpg", "pipe.jpg", "socket.jpg", "big.jpg"):
        rows.append({"path": f"img/{name}", "labels": "circle"})
    rows.append({"path": "img", "labels": "circle"})  # a folder
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows), src / "labels.parquet")
    cap = max(p.stat().st_size for p in (src / "img").glob("[0-9].jpg"))
    try:
        with no_hang(120):
            summary = shard_corpus(
                ShardConfig(src=str(src), dst=str(tmp_path / "shards"), shard_samples=4, max_file_bytes=cap),
                log=lambda *_: None,
            )
    finally:
        sock.close()
    rejects = {r["source"]: r["reason"] for r in pq.read_table(tmp_path / "shards" / "rejects.parquet").to_pylist()}
    assert rejects == {
        "img/pipe.jpg": "not-a-regular-file",
        "img/socket.jpg": "not-a-regular-file",
        "img": "not-a-regular-file",
        "img/big.jpg": "file-too-large",
    }
    assert summary.written == 7 and summary.read == summary.written + summary.rejected == 11


def test_tar_sources_refuse_special_files_and_oversized_members(tmp_path):
    src, first, tars = tmp_path / "src", tmp_path / "first", tmp_path / "tars"
    count = write_folder_corpus(src, per_class=4)
    (src / "stripes" / "big.jpg").write_bytes(jpeg(picture("stripes", 77, (400, 300))))
    shard_corpus(ShardConfig(src=str(src), dst=str(first), shard_samples=20), log=lambda *_: None)
    tars.mkdir()
    for p in first.glob("*.tar"):
        (tars / p.name).write_bytes(p.read_bytes())
    os.mkfifo(tars / "pipe.tar")
    (tars / "outside.tar").symlink_to(next(first.glob("*.tar")))
    cap = max(p.stat().st_size for p in src.glob("*/img*.jpg"))
    with no_hang(120):
        summary = shard_corpus(
            ShardConfig(
                src=str(tars), dst=str(tmp_path / "again"), source="tars", shard_samples=25, max_file_bytes=cap
            ),
            log=lambda *_: None,
        )
    rejects = {r["source"]: r["reason"] for r in pq.read_table(tmp_path / "again" / "rejects.parquet").to_pylist()}
    big = next(s for s in rejects if s.endswith(":stripes__big"))
    assert rejects == {"pipe.tar": "not-a-regular-file", "outside.tar": "symlink", big: "file-too-large"}
    assert summary.written == count and summary.read == count + 3


def test_s3_size_cap_from_the_listing_and_by_ranged_reads(tmp_path, s3_bucket, s3_storage_options):
    """A folder source's sizes come with its listing; a label table's files are read by ranged requests of at
    most the cap (an empty object, whose every range S3 refuses, is still just empty)."""
    import pyarrow as pa
    import s3fs

    src = tmp_path / "src"
    count = write_folder_corpus(src, per_class=3)
    cap = max(p.stat().st_size for p in src.rglob("*.jpg"))
    (src / "circle" / "big.jpg").write_bytes(jpeg(picture("circle", 60, (500, 400))))
    (src / "circle" / "empty.jpg").write_bytes(b"")
    fs = s3fs.S3FileSystem(**s3_storage_options)
    fs.put(str(src), f"{s3_bucket}/corpus", recursive=True)
    files = sorted(p.relative_to(src).as_posix() for p in src.rglob("*.jpg"))
    table = pa.table({"path": [f"{s3_bucket}/corpus/{f}" for f in files], "labels": [f.split("/")[0] for f in files]})
    pq.write_table(table, tmp_path / "labels.parquet")
    fs.put(str(tmp_path / "labels.parquet"), f"{s3_bucket}/table/labels.parquet")
    for name, labels in (("folder", None), ("table", f"{s3_bucket}/table/labels.parquet")):
        cfg = ShardConfig(
            src=f"{s3_bucket}/corpus",
            dst=f"{s3_bucket}/{name}-shards",
            labels=labels,
            shard_samples=5,
            max_file_bytes=cap,
            storage_options=s3_storage_options,
        )
        summary = shard_corpus(cfg, log=lambda *_: None)
        assert summary.written == count, name
        with fs.open(f"{cfg.dst}/rejects.parquet", "rb") as f:
            rejects = pq.read_table(f).to_pylist()
        assert summary.rejected_by_reason == {"file-too-large": 1, "empty": 1}, (name, rejects)


def test_new_settings_keep_the_fingerprints_of_earlier_outputs():
    """A finished run is recognised by its fingerprint: settings added since must not change the fingerprint
    of a run that leaves them at their defaults (64 MiB was already the size limit, applied after reading)."""
    base = ShardConfig(src="/data/corpus", dst="/data/shards")
    assert base.fingerprint() == "4df7c7794a724130"  # what the code before these settings computed
    assert (
        ShardConfig(src="/data/corpus", dst="/data/shards", max_file_bytes=1 << 20).fingerprint() != base.fingerprint()
    )
    assert ShardConfig(src="/data/corpus", dst="/data/shards", follow_symlinks=True).fingerprint() != base.fingerprint()
    assert base.image_policy().max_bytes == base.max_file_bytes == 64 * 2**20


# --------------------------------------------------------------------------------------------- keys


def test_files_sharing_a_stem_are_all_kept_with_unique_stable_keys(tmp_path, monkeypatch):
    import pyarrow as pa
    import ray.data

    from pipelines.data.shards import plan

    src = tmp_path / "src"
    count = write_folder_corpus(src, per_class=6)
    extra = {  # file -> its key: the first listed keeps the plain key, later ones get "~" and their extension
        "circle/img000.png": "circle__img000~png",
        "circle/img000.bmp": "circle__img000",  # listed (sorted) before img000.jpg, which becomes img000~jpg
        "square/a b.png": "square__a_b",  # "a b", "a_b" and "a+b" all sanitise to a_b
        "square/a+b.png": "square__a_b~png",
        "square/a_b.png": "square__a_b~png~2",
        "stripes/noext": "stripes__noext",
        "stripes/noext.jpg": "stripes__noext~jpg",
    }
    for i, name in enumerate(extra):
        image = picture(name.split("/")[0], 300 + i)
        buffer = io.BytesIO()
        image.save(buffer, format={"png": "PNG", "bmp": "BMP"}.get(name.rsplit(".", 1)[-1], "JPEG"))
        (src / name).write_bytes(buffer.getvalue())
    quiet = {"log": lambda *_: None}
    one = shard_corpus(ShardConfig(src=str(src), dst=str(tmp_path / "one"), shard_samples=8, val_fraction=0.2), **quiet)
    assert one.written == count + len(extra) and one.rejected == 0
    samples = read_tars(tmp_path / "one")  # the webdataset library: no key repeated, none split wrongly
    keys = {json.loads(s["json"])["source"]: k for k, s in samples.items()}
    assert {source: keys[source] for source in extra} == extra
    assert keys["circle/img000.jpg"] == "circle__img000~jpg"
    assert all(keys[f"{c}/img001.jpg"] == f"{c}__img001" for c in CLASSES)  # no collision: the key it always had
    # siblings share a split (their order and split come from the shared stem's hash): no leak across splits
    import tarfile

    split_of = {}
    for path in (tmp_path / "one").glob("*.tar"):
        with tarfile.open(path) as tar:
            split_of |= {m.name.split(".")[0]: path.name.split("-")[0] for m in tar}
    assert len({split_of[k] for k in ("circle__img000", "circle__img000~png", "circle__img000~jpg")}) == 1
    ray_keys = ray.data.read_webdataset(
        sorted(str(p) for p in (tmp_path / "one").glob("*.tar")), decoder=None
    ).to_pandas()["__key__"]
    assert sorted(ray_keys) == sorted(samples)  # Ray's reader splits keys the same way

    # the same inputs again, with the index cut into other buckets: byte-identical shards
    monkeypatch.setattr(plan, "_BUCKET_ROWS", 4)
    two = shard_corpus(ShardConfig(src=str(src), dst=str(tmp_path / "two"), shard_samples=8, val_fraction=0.2), **quiet)
    assert two.written == one.written and manifest(tmp_path / "one") == manifest(tmp_path / "two")

    # re-sharding the shards keeps every key, suffixes included
    tars = tmp_path / "tars"
    tars.mkdir()
    for p in (tmp_path / "one").glob("*.tar"):
        (tars / p.name).write_bytes(p.read_bytes())
    again = shard_corpus(ShardConfig(src=str(tars), dst=str(tmp_path / "again"), source="tars"), **quiet)
    assert again.written == one.written and set(read_tars(tmp_path / "again")) == set(samples)

    # a label table: a file listed twice is still a duplicate; two files of one stem are both kept
    rows = [
        {"path": "circle/img000.jpg", "labels": "circle"},
        {"path": "circle/img000.png", "labels": "circle"},
        {"path": "circle/img000.jpg", "labels": "square"},
    ]
    table_src = tmp_path / "table"
    table_src.mkdir()
    (table_src / "circle").symlink_to(src / "circle")
    pq.write_table(pa.Table.from_pylist(rows), table_src / "labels.parquet")
    table = shard_corpus(ShardConfig(src=str(table_src), dst=str(tmp_path / "table-shards")), **quiet)
    assert table.written == 2 and table.rejected_by_reason == {"duplicate-key": 1}
    assert set(read_tars(tmp_path / "table-shards")) == {"circle__img000", "circle__img000~png"}
    reject = pq.read_table(tmp_path / "table-shards" / "rejects.parquet").to_pylist()[0]
    assert (reject["source"], reject["detail"]) == ("circle/img000.jpg", "same key as circle/img000.jpg")
