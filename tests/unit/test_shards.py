"""The shard contract: writer -> reader round trip, byte determinism, atomicity, safe decoding."""

from __future__ import annotations

import io
import json
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from revprompt.shards.reader import ReadStats, build_reader, list_shards
from revprompt.shards.writer import (BackgroundWorker, ShardWriter, encode_image, encode_json, partial_path,
                                     stats_path)


def pixels(seed: int, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def write_shard(path, n: int, start: int = 0, fmt: str = "png") -> list[dict]:
    writer = ShardWriter(path)
    samples = []
    for i in range(start, start + n):
        sample = {"key": f"p{i}_0000", "pixels": pixels(i), "txt": f"prompt number {i} — ünïcode",
                  "json": {"prompt_id": f"p{i}", "seed": i}}
        writer.write(sample["key"], {fmt: encode_image(sample["pixels"], fmt), "txt": sample["txt"].encode(),
                                     "json": encode_json(sample["json"])})
        samples.append(sample)
    writer.close()
    return samples


def test_round_trip(tmp_path):
    samples = write_shard(tmp_path / "train" / "000000.tar", 5) + write_shard(tmp_path / "train" / "000001.tar", 4, 5)
    shards = list_shards(tmp_path, "train")
    assert [s.rsplit("/", 1)[1] for s in shards] == ["000000.tar", "000001.tar"]
    stats = ReadStats()
    got = list(build_reader(shards, stats=stats))
    assert [g["__key__"] for g in got] == [s["key"] for s in samples]
    for g, s in zip(got, samples):
        assert np.array_equal(np.asarray(g["image"]), s["pixels"])  # png: lossless
        assert g["txt"] == s["txt"] and g["json"] == s["json"]
    assert stats.as_dict() == {"samples": 9, "corrupt": 0, "rejected": 0, "incomplete": 0, "skipped": 0}
    marker = json.loads(stats_path(tmp_path / "train" / "000000.tar").read_text())
    assert marker["count"] == 5 and marker["failures"] == 0
    assert marker["bytes"] == (tmp_path / "train" / "000000.tar").stat().st_size


def test_same_samples_same_bytes(tmp_path):
    write_shard(tmp_path / "a" / "000000.tar", 6, fmt="jpg")
    write_shard(tmp_path / "b" / "000000.tar", 6, fmt="jpg")
    assert (tmp_path / "a" / "000000.tar").read_bytes() == (tmp_path / "b" / "000000.tar").read_bytes()
    with tarfile.open(tmp_path / "a" / "000000.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:3]] == ["p0_0000.jpg", "p0_0000.json", "p0_0000.txt"]
    assert {(m.mtime, m.uid, m.gid, m.uname) for m in members} == {(1_700_000_000, 0, 0, "")}


def test_unfinished_shard_is_invisible(tmp_path):
    path = tmp_path / "train" / "000000.tar"
    writer = ShardWriter(path)
    writer.write("k_0000", {"txt": b"x"})
    assert partial_path(path).exists() and not path.exists()
    assert list_shards(tmp_path, "train") == []
    writer.abort()
    assert list(tmp_path.joinpath("train").iterdir()) == []
    # a tar without its marker (killed between rename and marker) does not exist for readers either
    write_shard(path, 2)
    stats_path(path).unlink()
    assert list_shards(tmp_path, "train") == []


def test_rank_and_worker_split_partition_the_shards(tmp_path):
    for s in range(5):
        write_shard(tmp_path / "train" / f"{s:06d}.tar", 2, start=10 * s)
    shards = list_shards(tmp_path, "train")
    per_rank = [[g["__key__"] for g in build_reader(shards, rank=r, world_size=2)] for r in range(2)]
    assert per_rank[0] == ["p0_0000", "p1_0000", "p20_0000", "p21_0000", "p40_0000", "p41_0000"]
    assert per_rank[1] == ["p10_0000", "p11_0000", "p30_0000", "p31_0000"]
    loader = torch.utils.data.DataLoader(build_reader(shards, rank=0, world_size=1), batch_size=None,
                                         num_workers=2, collate_fn=lambda x: x["__key__"])
    assert sorted(loader) == sorted(k for r in per_rank for k in r)


def test_corrupt_and_unsafe_samples_are_skipped_and_counted(tmp_path):
    good = write_shard(tmp_path / "train" / "000000.tar", 3)
    # shard 1: an undecodable image, a sample without .txt, a pickle member, then a good sample
    evil = {"boom": True}
    bad = tmp_path / "train" / "000001.tar"
    writer = ShardWriter(bad)
    writer.write("bad_0000", {"png": b"not an image", "txt": b"x"})
    writer.write("notxt_0000", {"png": encode_image(pixels(1), "png")})
    writer.write("pkl_0000", {"png": encode_image(pixels(2), "png"), "txt": b"y", "pyd": pickle.dumps(evil)})
    writer.write("ok_0000", {"png": encode_image(pixels(3), "png"), "txt": b"fine"})
    writer.close()
    # shard 2: truncated in the middle of a member
    truncated = tmp_path / "train" / "000002.tar"
    write_shard(truncated, 3, start=100)
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2 + 100])
    # the truncated tar no longer matches its marker: listing the split leaves it out ...
    assert [p.rsplit("/", 1)[1] for p in list_shards(tmp_path, "train")] == ["000000.tar", "000001.tar"]
    # ... and a reader given it anyway skips what it cannot read, and counts it
    stats = ReadStats()
    tars = [str(tmp_path / "train" / f"{i:06d}.tar") for i in range(3)]
    got = [g["__key__"] for g in build_reader(tars, stats=stats)]
    assert got[:3] == [s["key"] for s in good]
    assert "ok_0000" in got and "pkl_0000" not in got and "bad_0000" not in got and "notxt_0000" not in got
    assert stats.rejected == 1
    assert stats.incomplete >= 1 and stats.corrupt >= 2
    assert stats.samples == len(got)


def test_background_worker_surfaces_errors():
    worker = BackgroundWorker(max_pending=2)
    done = []
    worker.submit(lambda: done.append(1))
    worker.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        worker.join()
    worker.submit(lambda: done.append(2))
    worker.close()
    assert done == [1, 2]


def test_jpeg_encoding_is_deterministic():
    img = pixels(5, 64)
    assert encode_image(img, "jpg", 95) == encode_image(img.copy(), "jpg", 95)
    decoded = np.asarray(Image.open(io.BytesIO(encode_image(img, "jpg", 95))))
    assert decoded.shape == (64, 64, 3)
