"""The one storage module: URLs to filesystems, atomic writes, and listings that tell content changes apart."""

from __future__ import annotations

import os

import pytest

from pipelines.common.storage import (
    filesystem,
    join,
    list_files,
    listing_fingerprint,
    read_json,
    write_atomically,
    write_json,
)


def test_urls_paths_and_joins(tmp_path):
    fs, path = filesystem(f"file://{tmp_path}/a/")
    assert path == f"{tmp_path}/a" and "file" in fs.protocol
    assert join("s3://bucket/prefix/", "x", "y.json") == "s3://bucket/prefix/x/y.json"
    assert join("/", "x") == "/x"


def test_atomic_writes_leave_no_temporary_files(tmp_path):
    fs, root = filesystem(str(tmp_path))
    write_json(fs, f"{root}/deep/state.json", {"a": 1})
    write_atomically(fs, f"{root}/deep/state.json", b'{"a": 2}')
    assert read_json(fs, f"{root}/deep/state.json") == {"a": 2}
    assert os.listdir(tmp_path / "deep") == ["state.json"]


def test_a_local_listing_changes_with_new_changed_or_removed_files_only(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "cat").mkdir(parents=True)
    (corpus / "cat" / "1.jpg").write_bytes(b"one")
    (corpus / "labels.csv").write_text("path,labels\n")
    first = list_files(str(corpus))
    assert [f.path for f in first] == ["cat/1.jpg", "labels.csv"] and first[0].size == 3
    assert listing_fingerprint(list_files(str(corpus))) == listing_fingerprint(first)
    (corpus / "cat" / "2.jpg").write_bytes(b"two")
    added = list_files(str(corpus))
    assert listing_fingerprint(added) != listing_fingerprint(first)
    os.utime(corpus / "cat" / "1.jpg", (1, 1))  # same size, touched: a rewrite in place
    assert listing_fingerprint(list_files(str(corpus))) != listing_fingerprint(added)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_files(str(tmp_path / "missing"))


def test_an_s3_listing_sees_an_overwrite_of_the_same_size(s3_bucket, s3_storage_options):
    fs, _ = filesystem(s3_bucket, s3_storage_options)
    fs.pipe(f"{s3_bucket}/corpus/a.jpg", b"aaaa")
    fs.pipe(f"{s3_bucket}/corpus/b/c.jpg", b"cc")
    before = list_files(f"{s3_bucket}/corpus", s3_storage_options)
    assert [(f.path, f.size) for f in before] == [("a.jpg", 4), ("b/c.jpg", 2)]
    assert all(f.version.startswith("ETag=") for f in before)
    fs.pipe(f"{s3_bucket}/corpus/a.jpg", b"AAAA")
    fs.invalidate_cache()
    after = list_files(f"{s3_bucket}/corpus", s3_storage_options)
    assert [f.size for f in after] == [4, 2] and listing_fingerprint(after) != listing_fingerprint(before)
