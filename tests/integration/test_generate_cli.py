"""`revprompt generate` end to end on the tiny preset, read back with no project code."""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from tests.conftest import run_cli, shard_digests, tiny_args


def check_shards_read_with_plain_webdataset(run_dir: Path, manifest: dict) -> None:
    """Every sample of every shard, read with webdataset alone, matches the prepared prompt it came from."""
    prepared = {}
    for split in ("train", "val", "test"):
        for line in (run_dir / "prompts" / f"{split}.jsonl").read_text().splitlines():
            obj = json.loads(line)
            prepared[obj["id"]] = (split, obj["text"])
    seen = {}
    for split, info in manifest["splits"].items():
        for shard in info["shards"]:
            path = run_dir / "shards" / shard["name"]
            with tarfile.open(path) as tar:
                names = tar.getnames()
            assert len(names) == 3 * shard["count"]
            for sample in wds.WebDataset(str(path), shardshuffle=False).decode("pil"):
                meta = sample["json"]
                assert sample["jpg"].size == (32, 32)
                assert (split, sample["txt"]) == prepared[meta["prompt_id"]]
                assert meta["split"] == split and meta["steps"] == 2 and meta["model"] == "miniature"
                assert meta["key"] == sample["__key__"]
                seen[sample["__key__"]] = meta["seed"]
    assert len(seen) == 30 and len(set(seen.values())) == 30


def check_loop_clock_and_tensorboard(run_dir: Path, manifest: dict) -> None:
    """The log says where the generating thread's time went; TensorBoard has the same figures and the grid."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_text = (run_dir / "logs" / "rank-0.log").read_text()
    assert "generated 30 images" in log_text
    clock = re.search(r"generating thread: ([\d.]+) s in the model, ([\d.]+) s elsewhere \(([\d.]+)% of the loop\) "
                      r"over (\d+) batches", log_text)
    assert clock is not None
    # batches cross shard boundaries inside a batch group (generation.job.group_tasks), never its edges
    from revprompt.generation.job import ShardTask, group_tasks

    # the plan's order: the splits as configured (the manifest lists them sorted), shards in order
    sizes = [shard["count"] for split in manifest["config"]["splits"] for shard in manifest["splits"][split]["shards"]]
    tasks = [ShardTask("train", i, i, sum(sizes[:i]), sum(sizes[:i + 1])) for i in range(len(sizes))]
    batches = sum(-(-group.size // 4) for group in group_tasks(tasks, 4))
    assert batches < sum(-(-size // 4) for size in sizes)  # fewer calls than batching each shard alone
    assert int(clock.group(4)) == batches
    model_s, host_s = float(clock.group(1)), float(clock.group(2))
    assert model_s > 0 and host_s >= 0
    events = EventAccumulator(str(run_dir / "tb" / "generate"), size_guidance={"images": 0})
    events.Reload()
    assert "perf/images_per_s" in events.Tags()["scalars"]
    assert events.Scalars("perf/images_per_s")[-1].value > 0
    assert "generate/samples" in events.Tags()["images"]
    # on a CPU the grid is drawn once the model is done, not on the writer thread while it runs
    (grid,) = events.Images("generate/samples")
    assert grid.wall_time >= events.Scalars("perf/images_per_s")[-1].wall_time
    assert (grid.width, grid.height) == (4 * 200, 32 + 3 * (13 + 4) + 6)  # grid_images=4: one row of 4 cells
    assert len(events.Scalars("perf/model_s_per_batch")) == batches
    assert sum(e.value for e in events.Scalars("perf/model_s_per_batch")) == pytest.approx(model_s, abs=0.01)
    (fraction,) = [e.value for e in events.Scalars("perf/host_fraction")]
    assert 100 * fraction == pytest.approx(float(clock.group(3)), abs=0.06)
    assert "generate/prompts/text_summary" in events.Tags()["tensors"]


def test_cli_writes_shards_that_plain_readers_read(run_dir: Path):
    first = run_cli("generate", *tiny_args(run_dir, limit=30), threads=2)
    # the console carries the run, not library noise: no deprecation (torch_dtype) or backend warnings
    assert "FutureWarning" not in first.stderr and "torchvision" not in first.stderr
    manifest = json.loads((run_dir / "shards" / "manifest.json").read_text())
    assert manifest["complete"] is True
    report = json.loads((run_dir / "prompts" / "report.json").read_text())
    assert report["kept"] == 30
    assert sum(s["count"] for s in manifest["splits"].values()) == 30
    assert {k: v["count"] for k, v in manifest["splits"].items()} == report["splits"]
    check_shards_read_with_plain_webdataset(run_dir, manifest)
    assert (run_dir / "config.toml").is_file()
    check_loop_clock_and_tensorboard(run_dir, manifest)

    # rerun: every shard is complete, nothing is rewritten
    before = {p: (run_dir / "shards" / p).stat().st_mtime_ns for p in shard_digests(run_dir)}
    run_cli("generate", *tiny_args(run_dir, limit=30), threads=2)
    assert before == {p: (run_dir / "shards" / p).stat().st_mtime_ns for p in shard_digests(run_dir)}

    # a changed generation config is refused, and nothing written is lost
    digests = shard_digests(run_dir)
    refused = run_cli("generate", *tiny_args(run_dir, limit=30, generate__steps=3), check=False)
    assert refused.returncode == 1
    assert "different generation config" in refused.stderr and "--overwrite" in refused.stderr
    assert shard_digests(run_dir) == digests

    # --overwrite replaces them
    run_cli("generate", *tiny_args(run_dir, limit=30, generate__steps=3), "--overwrite", threads=2)
    assert shard_digests(run_dir).keys() == digests.keys()
    assert shard_digests(run_dir) != digests


def test_bad_prompt_file_stops_with_file_and_line(tmp_path: Path):
    bad = tmp_path / "prompts.txt"
    bad.write_bytes(b"red shirt\nblue \xff jeans\n")
    proc = run_cli("generate", *tiny_args(tmp_path / "run", prompts__path=bad), check=False)
    assert proc.returncode == 1
    assert f"{bad}:2: invalid UTF-8" in proc.stderr


def test_bad_override_names_the_field(tmp_path: Path):
    proc = run_cli("generate", *tiny_args(tmp_path / "run", generate__steps=0), check=False)
    assert proc.returncode == 2
    assert "generate.steps: must be >= 1, got 0" in proc.stderr
