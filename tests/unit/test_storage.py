"""The shard storage layer against moto's S3 server on 127.0.0.1: URLs, retries with a bound, a reader that
survives a restart in the middle of an object, completion on an object store, and deleting only our names."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path

import pytest

from revprompt.launch.config import ConfigError, load_config
from revprompt.launch.layout import remove_owned
from revprompt.shards import storage
from revprompt.shards.manifest import complete_markers, read_manifest, write_manifest
from revprompt.shards.reader import build_reader, list_shards
from revprompt.shards.writer import SHARD_PATTERNS, ShardWriter, encode_json, is_complete
from tests.objectstore import serving

BUCKET = "revprompt-unit"


@pytest.fixture(scope="module")
def s3():
    with serving(BUCKET, in_environ=True) as server:
        yield server


@pytest.fixture
def retry_s():
    """Restore the module's retry bound after a test changes it."""
    before = storage.retry_seconds()
    yield storage.configure
    storage.configure(before)


def test_roots_urls_and_names():
    assert storage.as_root("runs/x/shards") == Path("runs/x/shards")
    assert storage.as_root("file:///data/shards") == Path("/data/shards")
    assert storage.as_root("s3://bucket/prefix/") == "s3://bucket/prefix"
    assert storage.join("s3://bucket/p", "train", "000001.tar") == "s3://bucket/p/train/000001.tar"
    assert storage.join(Path("/d"), "train/000001.tar") == Path("/d/train/000001.tar")
    assert storage.parent_of("s3://b/p/train/000001.tar") == "s3://b/p/train"
    assert storage.name_of("s3://b/p/train/000001.tar") == "000001.tar"
    for bad, said in (("s3://key:secret@bucket/p", "must not carry credentials"), ("s3:///p", "names no bucket"),
                      ("s3://bucket/p?versionId=3", r"no \?query")):
        with pytest.raises(ValueError, match=said) as info:
            storage.as_root(bad)
        assert "secret" not in str(info.value) and "versionId" not in str(info.value)
    # Azure names a container container@account: not a credential
    assert storage.as_root("abfs://data@acct.dfs.core.windows.net/p") == "abfs://data@acct.dfs.core.windows.net/p"
    with pytest.raises(ConfigError, match=r"shards.url: .*must not carry credentials"):
        load_config("tiny", ["--shards.url=s3://AKIAXX:secret@bucket/p"])
    with pytest.raises(ConfigError, match=r"shards.url: nosuchscheme:// is not usable here"):
        load_config("tiny", ["--shards.url=nosuchscheme://bucket/p"])
    assert load_config("tiny", ["--shards.url=s3://bucket/p"]).shards.url == "s3://bucket/p"


def test_a_shard_is_complete_exactly_when_its_marker_matches_and_readers_see_only_those(s3, tmp_path):
    root = f"s3://{BUCKET}/complete"
    for index, count in ((0, 3), (1, 2)):
        writer = ShardWriter(storage.join(root, f"train/{index:06d}.tar"), staging=tmp_path / "staging")
        for i in range(count):
            writer.write(f"k{index}-{i}", {"txt": f"prompt {index} {i}".encode(), "json": encode_json({"i": i})})
        stats = writer.close()
        assert stats["count"] == count
    assert list((tmp_path / "staging" / "train").iterdir()) == []  # each local copy went once uploaded
    # a tar without a marker (a writer killed between the upload and the marker), and one replaced since
    s3.client().put_object(Bucket=BUCKET, Key="complete/train/000002.tar", Body=b"\0" * 1024)
    s3.client().put_object(Bucket=BUCKET, Key="complete/train/000001.tar", Body=b"\0" * 512)
    assert is_complete(f"{root}/train/000000.tar") and not is_complete(f"{root}/train/000001.tar")
    assert not is_complete(f"{root}/train/000002.tar")
    names = ["train/000000.tar", "train/000001.tar", "train/000002.tar", "train/000003.tar"]
    assert list(complete_markers(root, names)) == ["train/000000.tar"]
    assert list_shards(root, "train") == [f"{root}/train/000000.tar"]
    samples = list(build_reader([f"{root}/train/000000.tar"], require=("txt",), split_workers=False))
    assert [s["txt"] for s in samples] == ["prompt 0 0", "prompt 0 1", "prompt 0 2"]

    manifest = {"splits": {"train": {"planned_shards": 4, "shards": [{"name": "train/000000.tar", "count": 3}]}}}
    write_manifest(root, manifest)
    assert read_manifest(root) == manifest and read_manifest(f"s3://{BUCKET}/nothing-here") is None

    # --overwrite's clean-up deletes revprompt's names only: a user's object beside them stays
    s3.client().put_object(Bucket=BUCKET, Key="complete/train/notes.txt", Body=b"mine")
    removed = remove_owned(f"{root}/train", SHARD_PATTERNS)
    assert sorted(storage.name_of(r) for r in removed) == ["000000.stats.json", "000000.tar", "000001.stats.json",
                                                           "000001.tar", "000002.tar"]
    assert list(s3.objects(BUCKET, "complete/train")) == ["notes.txt"]


def test_reads_retry_through_a_restart_and_fail_within_the_bound_naming_the_url(s3, retry_s, monkeypatch, caplog):
    data = os.urandom(3 << 20)
    url = f"s3://{BUCKET}/retry/blob.bin"
    storage.write_bytes(url, data)
    monkeypatch.setattr(storage, "READ_BLOCK", 256 << 10)  # many ranged reads, so the outage falls mid-object
    retry_s(60)
    with storage.open_read(url) as handle:
        head = handle.read(1 << 20)
        s3.stop()
        threading.Timer(4.0, s3.start).start()  # longer than s3fs's own few retries
        tail = handle.read()
    assert head + tail == data
    assert re.search(rf"{url}: read at byte [0-9]+ failed \(EndpointConnectionError.*\); retrying for up to 60 s",
                     caplog.text)

    retry_s(2)
    storage.write_bytes(f"s3://{BUCKET}/retry/train/000000.stats.json", b"{}")
    s3.stop()
    try:
        started = time.monotonic()
        with pytest.raises(storage.StorageError, match=rf"^{url}: read failed after \d+ tries over 2 s"):
            storage.read_bytes(url)
        assert time.monotonic() - started < 15
        # a batched read of markers that fails is an error, never "no marker" (the shards would vanish)
        with pytest.raises(storage.StorageError, match=rf"^s3://{BUCKET}/retry/train: read 2 objects failed after"):
            storage.read_many([f"s3://{BUCKET}/retry/train/{i:06d}.stats.json" for i in range(2)])
    finally:
        s3.start()
    storage.remove(url)
    assert storage.read_bytes(url) is None  # a missing object reads as None, not as an error
    with pytest.raises(storage.StorageError, match=rf"^{url}: read at byte 0 failed: no such object or bucket$"):
        storage.open_read(url).read(1)  # but a shard that vanished while listed is named, not retried


def test_start_up_check_names_the_bucket_and_the_operation(s3):
    storage.check_access(f"s3://{BUCKET}/fresh-prefix", write=True)
    assert s3.objects(BUCKET, "fresh-prefix") == {}  # the probe object is gone again
    with pytest.raises(storage.StorageError, match=r"^s3://missing-bucket/p: open the bucket missing-bucket failed: "
                                                   r"no such object or bucket$"):
        storage.check_access("s3://missing-bucket/p", write=False)


def test_many_markers_are_read_in_one_batch(s3):
    root = f"s3://{BUCKET}/many"
    for i in range(40):
        storage.write_bytes(f"{root}/val/{i:06d}.stats.json", json.dumps({"count": i}).encode())
    got = storage.read_many([f"{root}/val/{i:06d}.stats.json" for i in range(45)])
    assert sorted(got) == [f"{root}/val/{i:06d}.stats.json" for i in range(40)]
    assert json.loads(got[f"{root}/val/000007.stats.json"]) == {"count": 7}
    assert storage.sizes(f"{root}/val")["000039.stats.json"] == len(json.dumps({"count": 39}))


def test_answers_that_no_retry_changes_fail_at_once(retry_s):
    from botocore.exceptions import NoCredentialsError

    retry_s(60)
    for exc in (NoCredentialsError(), OSError(22, "InvalidBucketName"), PermissionError("AccessDenied")):
        started = time.monotonic()

        def fail(exc=exc):
            raise exc

        with pytest.raises(storage.StorageError, match=rf"^s3://b/p: list failed: {type(exc).__name__}"):
            storage.retrying("s3://b/p", "list", fail)
        assert time.monotonic() - started < 1
