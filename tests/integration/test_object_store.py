"""Shards on an object store (shards.url = s3://...), against moto's real S3 server on 127.0.0.1.

The whole tiny pipeline on s3:// gives what it gives on a local path; a generation killed in the middle of an
upload and rerun leaves the objects an uninterrupted run leaves; a store that goes away in the middle of
training is waited for (and the weights come out as without the outage), or, when it stays away, the job fails
in bounded time with one line naming the URL.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import BIN, PIPELINE_OVERRIDES, ROOT, cli_env, kill_tree, run_cli, tiny_args
from tests.objectstore import S3Server, serving

BUCKET = "revprompt-shards"


@pytest.fixture(scope="module")
def s3():
    with serving(BUCKET) as server:
        yield server


def local_objects(shards: Path) -> dict[str, bytes]:
    """{relative path: bytes} of the manifest and every shard tar and marker under a local shard root."""
    return {str(p.relative_to(shards)): p.read_bytes() for p in sorted(shards.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(shards).parts)}


def same_objects(remote: dict[str, bytes], local: dict[str, bytes]) -> None:
    """The same names and the same bytes: tars, markers and the manifest."""
    assert sorted(remote) == sorted(local)
    for name in local:
        assert remote[name] == local[name], name


def test_the_pipeline_on_s3_gives_what_it_gives_on_a_local_path(s3, pipeline_run, tmp_path):
    """... even though the store goes away for 4 s as training reads its first shard: the job waits for it."""
    local_dir, _, _ = pipeline_run
    run_dir = tmp_path / "run"
    url = f"s3://{BUCKET}/pipeline"
    watcher = restart_when(s3, TRAIN_SHARD_READ, down_s=4.0)
    try:
        proc = run_cli("pipeline", *tiny_args(run_dir, shards__url=url, **PIPELINE_OVERRIDES), threads=2,
                       env=s3.env())
    finally:
        watcher.join(30)
        s3.start()
    log = (run_dir / "logs" / "rank-0.log").read_text()
    assert f"shards at {url}" in log and "revprompt-test-secret" not in log + proc.stderr + proc.stdout
    assert re.search(rf"{url}/train/[0-9]+\.tar: read at byte 0 failed .*; retrying for up to 120 s", log)
    assert "revprompt-test-secret" not in (run_dir / "config.toml").read_text()

    same_objects(s3.objects(BUCKET, "pipeline"), local_objects(local_dir / "shards"))
    assert not (run_dir / "shards" / "manifest.json").exists()  # nothing of the shards was kept locally
    assert not (run_dir / "shards" / ".uploads").exists()
    for record in ("eval/summary.json", "eval/results.jsonl", "drift/summary.json"):
        assert (run_dir / record).read_bytes() == (local_dir / record).read_bytes(), record
    # the exported weights are the same bytes: training streamed the same samples in the same order
    assert (run_dir / "captioner" / "model.safetensors").read_bytes() == \
        (local_dir / "captioner" / "model.safetensors").read_bytes()

    # `revprompt caption` reads the test split straight from the bucket
    out = tmp_path / "captions.jsonl"
    run_cli("caption", "--config", "tiny", f"--run.dir={run_dir}", f"{url}/test", f"--out={out}", "--no-rerank",
            env=s3.env())
    finetuned = {json.loads(line)["key"]: json.loads(line)["captions"]["finetuned"]
                 for line in (local_dir / "eval" / "results.jsonl").read_text().splitlines()}
    captions = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(captions) == len(finetuned) and all(finetuned[c["key"]] == c["caption"] for c in captions)


def generate_cmd(run_dir: Path, url: str) -> list[str]:
    script = BIN / "revprompt"
    head = [str(script)] if script.exists() else [__import__("sys").executable, "-m", "revprompt.launch.cli"]
    return [*head, "generate", *tiny_args(run_dir, shards__url=url, **PIPELINE_OVERRIDES)]


def test_sigkill_during_an_upload_then_rerun_gives_the_uninterrupted_objects(s3, pipeline_run, tmp_path):
    local_dir, _, _ = pipeline_run
    run_dir, url = tmp_path / "run", f"s3://{BUCKET}/killed"
    # the upload of the second train shard reaches the server, which holds its answer: the writer is mid-upload
    s3.hold(rf"^PUT /{BUCKET}/killed/train/000001\.tar")
    proc = subprocess.Popen(generate_cmd(run_dir, url), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env={**cli_env(2), **s3.env()}, cwd=ROOT, start_new_session=True)
    try:
        assert s3.held.wait(240), proc.stderr.read() if proc.poll() is not None else "no upload was held"
        kill_tree(proc.pid)
        proc.wait(60)
    finally:
        s3.hold(None)
    killed = s3.objects(BUCKET, "killed")
    assert "train/000000.stats.json" in killed  # the first shard was complete before the kill
    assert "train/000001.tar" not in killed and "train/000001.stats.json" not in killed
    shards = local_objects(local_dir / "shards")
    for name in [n for n in killed if n.endswith(".stats.json")]:  # every marked shard is whole
        tar = name.replace(".stats.json", ".tar")
        assert killed[tar] == shards[tar] and len(killed[tar]) == json.loads(killed[name])["bytes"]
    partials = list((run_dir / "shards" / ".uploads").rglob("*.partial"))
    assert partials  # the dead writer's local copy, which the rerun clears

    # the rerun on 2 ranks: the objects are the 1-rank local run's bytes
    run_cli("generate", *tiny_args(run_dir, shards__url=url, **PIPELINE_OVERRIDES), nproc=2, threads=2,
            env=s3.env())
    same_objects(s3.objects(BUCKET, "killed"), shards)
    assert not (run_dir / "shards" / ".uploads").exists()


TRAIN_SHARD_READ = rf"^GET /{BUCKET}/pipeline/train/[0-9]+\.tar"


def restart_when(server: S3Server, pattern: str, down_s: float | None) -> threading.Thread:
    """A thread that stops `server` when a request matching `pattern` arrives, and starts it again `down_s` later
    (None: never)."""
    def watch():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if any(re.search(pattern, f"{m} {p}") for m, p in list(server.requests)):
                server.stop()
                if down_s is not None:
                    time.sleep(down_s)
                    server.start()
                return
            time.sleep(0.02)

    server.requests.clear()
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_a_store_that_stays_away_mid_training_fails_in_bounded_time_naming_the_url(s3, tmp_path):
    url = f"s3://{BUCKET}/pipeline"
    if not s3.objects(BUCKET, "pipeline"):  # this test alone: the shards the pipeline test writes there
        run_cli("generate", *tiny_args(tmp_path / "gen", shards__url=url, **PIPELINE_OVERRIDES), threads=2,
                env=s3.env())
    # down for good after training's first shard read: the job fails within shards.retry_s (+ one try) with one
    # line naming the shard's URL
    run_dir = tmp_path / "failed"
    watcher = restart_when(s3, TRAIN_SHARD_READ, down_s=None)
    started = time.monotonic()
    try:
        # and the read that fails is a DataLoader worker's: its error reaches the console as one line too
        overrides = {**PIPELINE_OVERRIDES, "train__num_workers": 1}
        proc = run_cli("train", *tiny_args(run_dir, shards__url=url, shards__retry_s=3, **overrides),
                       threads=2, env=s3.env(), check=False, timeout=300)
    finally:
        watcher.join(30)
        s3.start()
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert errors and f"{url}/train/" in errors[0] and "failed after" in errors[0] and "shards.retry_s" in errors[0]
    assert time.monotonic() - started < 120
    assert not (run_dir / "captioner").exists()


def test_a_missing_bucket_or_a_foreign_prefix_fails_at_start_up(s3, tmp_path):
    """(A URL with credentials in it is a config error: tests/unit/test_storage.py.)"""
    proc = run_cli("train", *tiny_args(tmp_path / "run", shards__url="s3://no-such-bucket/x"), env=s3.env(),
                   check=False)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "s3://no-such-bucket/x: open the bucket no-such-bucket failed: no such" in errors[0]
    assert "Traceback" not in proc.stderr


    # a prefix holding files under the names revprompt writes, but no revprompt manifest: someone else's
    s3.client().put_object(Bucket=BUCKET, Key="theirs/train/000000.tar", Body=b"their bytes")
    proc = run_cli("generate", *tiny_args(tmp_path / "run3", shards__url=f"s3://{BUCKET}/theirs"), env=s3.env(),
                   check=False)
    assert proc.returncode == 1
    assert f"shards.url s3://{BUCKET}/theirs: holds s3://{BUCKET}/theirs/train/000000.tar but no revprompt " \
           "manifest" in proc.stderr
    assert s3.objects(BUCKET, "theirs") == {"train/000000.tar": b"their bytes"}
