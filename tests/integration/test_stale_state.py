"""What a stage was made from is recorded and checked: stale inputs are refused, refused runs change nothing,
full disks and odd thread counts are said plainly."""

from __future__ import annotations

import hashlib
import json
import re
import resource
import signal
import subprocess
from pathlib import Path

from tests.conftest import BIN, ROOT, cli_env, copy_run, run_cli, shard_digests, tiny_args, train_args

SMALL = dict(generate__shard_size=4, train__micro_batch_size=4, train__max_steps=4, train__save_every=2,
             train__val_captions=0, train__num_workers=0, train__log_every=2)


def args(run_dir: Path, **extra) -> list[str]:
    return tiny_args(run_dir, limit=40, **{**SMALL, **extra})


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_model_is_tied_to_its_data_and_settings(tmp_path: Path):
    run_dir = tmp_path / "run"
    run_cli("generate", *args(run_dir))
    run_cli("train", *args(run_dir))
    # a changed training key under existing checkpoints: refused, saying what changed
    changed = run_cli("train", *args(run_dir, train__lr=0.1, train__max_steps=6), check=False)
    assert changed.returncode == 1 and "train.lr: 0.001 -> 0.1" in changed.stderr and "--overwrite" in changed.stderr
    batch = run_cli("train", *args(run_dir, train__micro_batch_size=8, train__max_steps=6), check=False)
    assert batch.returncode == 1 and "train.micro_batch_size: 4 -> 8" in batch.stderr
    # evaluate redraws with [generate]: other settings than the shards were drawn with are refused
    redraw = run_cli("evaluate", *args(run_dir, generate__steps=3), check=False)
    assert redraw.returncode == 1 and "generate.steps: 2 (shards) vs 3 (now)" in redraw.stderr
    # new data: the captioner and its checkpoints are stale, for train, the pipeline and evaluate
    run_cli("generate", *args(run_dir, generate__guidance_scale=3.0), "--overwrite")
    stale = run_cli("train", *args(run_dir, generate__guidance_scale=3.0), check=False)
    assert stale.returncode == 1 and "was trained on the shards of fingerprint" in stale.stderr
    assert "revprompt train --overwrite" in stale.stderr
    evaluate = run_cli("evaluate", *args(run_dir, generate__guidance_scale=3.0), check=False)
    assert evaluate.returncode == 1 and "captioner was trained on the shards of fingerprint" in evaluate.stderr
    run_cli("train", *args(run_dir, generate__guidance_scale=3.0), "--overwrite")
    log = (run_dir / "logs" / "rank-0.log").read_text()
    assert "--overwrite: removing" in log and "training from step 0 to 4" in log.rsplit("--overwrite: removing", 1)[1]
    exported = json.loads((run_dir / "captioner" / "revprompt.json").read_text())
    manifest = json.loads((run_dir / "shards" / "manifest.json").read_text())
    assert exported["made_from"]["data"] == manifest["fingerprint"] and exported["step"] == 4


def test_a_refused_generate_changes_nothing(tmp_path: Path):
    run_dir = tmp_path / "run"
    run_cli("generate", *args(run_dir))
    before = digests(run_dir / "prompts"), shard_digests(run_dir)
    refused = run_cli("generate", *args(run_dir, prompts__limit=30), check=False)
    assert refused.returncode == 1 and "different generation config" in refused.stderr
    assert (digests(run_dir / "prompts"), shard_digests(run_dir)) == before
    # prepare alone must not put other prompts under shards made from these
    prepare = run_cli("prepare", *args(run_dir, prompts__limit=30), check=False)
    assert prepare.returncode == 1 and "generated from other prompts" in prepare.stderr
    assert digests(run_dir / "prompts") == before[0]
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".prompts")) == []


def test_the_thread_count_that_equal_bytes_assume_is_recorded_and_warned_about(tmp_path: Path):
    run_dir = tmp_path / "run"
    run_cli("generate", *args(run_dir), threads=1)
    manifest = json.loads((run_dir / "shards" / "manifest.json").read_text())
    assert manifest["made_with"] == [{"device": "cpu", "torch_threads": 1}]
    first = sorted((run_dir / "shards" / "train").glob("*.stats.json"))[0]
    assert json.loads(first.read_text())["made_with"] == {"device": "cpu", "torch_threads": 1}
    first.unlink()  # one shard to write again, with another thread count
    proc = run_cli("generate", *args(run_dir), threads=2)
    assert "shards already written were made with [{'device': 'cpu', 'torch_threads': 1}]" in proc.stderr
    manifest = json.loads((run_dir / "shards" / "manifest.json").read_text())
    assert {m["torch_threads"] for m in manifest["made_with"]} == {1, 2}


def _limited(limit_bytes: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return apply


def test_a_full_disk_is_one_line_and_the_rerun_recovers(tmp_path: Path):
    # RLIMIT_FSIZE makes the kernel refuse writes past a size, as a full disk refuses them (EFBIG, not ENOSPC)
    run_dir, reference = tmp_path / "run", tmp_path / "reference"
    run_cli("generate", *args(reference))
    cmd = [str(BIN / "revprompt"), "generate", *args(run_dir, generate__shard_size=40)]
    full = subprocess.run(cmd, env=cli_env(), cwd=ROOT, capture_output=True, text=True, timeout=300,
                          preexec_fn=_limited(30_000))
    assert full.returncode == 1 and "Traceback" not in full.stderr
    assert "cannot write shard sample" in full.stderr and "File too large" in full.stderr
    assert str(run_dir / "shards" / "train" / "000000.tar") in full.stderr
    assert not list((run_dir / "shards").rglob("*.partial"))  # no half shard left behind
    run_cli("generate", *args(run_dir, generate__shard_size=40))
    assert json.loads((run_dir / "shards" / "manifest.json").read_text())["complete"]
    # training: the checkpoint (26 MB of model states) does not fit
    cmd = [str(BIN / "revprompt"), "train", *args(run_dir, generate__shard_size=40)]
    full = subprocess.run(cmd, env=cli_env(), cwd=ROOT, capture_output=True, text=True, timeout=300,
                          preexec_fn=_limited(5_000_000))
    assert full.returncode == 1 and "Traceback" not in full.stderr
    assert f"{run_dir / 'checkpoints' / 'step-2'}: cannot write the checkpoint of step 2" in full.stderr
    run_cli("train", *args(run_dir, generate__shard_size=40))
    assert json.loads((run_dir / "captioner" / "revprompt.json").read_text())["step"] == 4


def test_a_stale_op_build_lock_stops_training_in_one_line_with_its_path(generated_run: Path, tmp_path: Path):
    # a DeepSpeed op build killed half-way leaves torch's lock file, and torch itself would wait on it for ever
    import os
    import time

    run_dir, extensions = copy_run(generated_run, tmp_path / "run"), tmp_path / "torch_extensions"
    lock = extensions / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_bytes(b"")
    os.utime(lock, (time.time() - 3600, time.time() - 3600))  # left an hour ago
    stuck = run_cli("train", *train_args(run_dir), check=False, timeout=120,
                    env={"TORCH_EXTENSIONS_DIR": str(extensions)})
    assert stuck.returncode == 1 and "Traceback" not in stuck.stderr
    said = rf"train failed on rank 0: {re.escape(str(lock))} is 36\d\d s old \(more than 900 s\)"
    assert re.search(said, stuck.stderr), stuck.stderr[-2000:]
    assert "remove it and start again" in stuck.stderr
    assert lock.exists() and not (run_dir / "checkpoints").exists()  # the lock is not ours; nothing trained
