"""A training run killed after a checkpoint resumes exactly; damaged shards are skipped on every rank."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
import time
from collections import Counter
from pathlib import Path

from tests.conftest import BIN, ROOT, cli_env, kill_tree, copy_run, run_cli, scalars, train_args

STEPS = 60


def recorded(run_dir: Path, rank: int) -> dict[int, list[str]]:
    """step -> that step's sample keys; a resumed run's rows replace what the killed run wrote after its checkpoint."""
    by_step: dict[int, list[str]] = {}
    for line in (run_dir / "logs" / f"samples-rank-{rank}.jsonl").read_text().splitlines():
        row = json.loads(line)
        by_step[row["step"]] = row["keys"]  # grad_accum is 1: one micro-batch per step
    return by_step


def test_killed_after_checkpoint_resumes_step_lr_and_data(generated_run: Path, tmp_path: Path):
    overrides = dict(train__max_steps=STEPS, train__save_every=6, train__log_every=1, train__record_samples="true",
                     train__shuffle_buffer=16, train__val_captions=0)
    reference = copy_run(generated_run, tmp_path / "reference")
    run_cli("train", *train_args(reference, **overrides), nproc=2)

    killed = copy_run(generated_run, tmp_path / "killed")
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "--no-python", str(BIN / "revprompt"),
           "train", *train_args(killed, **overrides)]
    proc = subprocess.Popen(cmd, env=cli_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    latest = killed / "checkpoints" / "latest"
    try:
        deadline = time.monotonic() + 300
        # any checkpoint well before the end will do; the run is fast, so poll tightly
        while not (latest.exists() and latest.read_text().strip() in {f"step-{s}" for s in range(6, STEPS - 6)}):
            assert proc.poll() is None, "training ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.02)
    finally:
        assert kill_tree(proc.pid) >= 3  # torchrun and both ranks
        proc.wait()
    resumed_from = int(latest.read_text().strip().removeprefix("step-"))
    assert resumed_from < STEPS

    run_cli("train", *train_args(killed, **overrides), nproc=2)
    log = (killed / "logs" / "rank-0.log").read_text()
    assert f"resumed from {killed / 'checkpoints' / f'step-{resumed_from}'}" in log
    assert f"training from step {resumed_from} to {STEPS}" in log

    # the step count and the learning-rate schedule continue where they stopped
    ref_lr, got_lr = scalars(reference / "tb" / "train", "train/lr"), scalars(killed / "tb" / "train", "train/lr")
    assert sorted(got_lr) == list(range(1, STEPS + 1))
    assert all(abs(got_lr[s] - ref_lr[s]) < 1e-12 for s in ref_lr)
    ref_loss, got_loss = scalars(reference / "tb" / "train", "train/loss"), scalars(killed / "tb" / "train", "train/loss")
    assert abs(got_loss[STEPS] - ref_loss[STEPS]) < 1e-4

    # the data: every step after the resume sees exactly the uninterrupted run's samples, and within an
    # epoch no sample is seen twice
    for rank in (0, 1):
        ref, got = recorded(reference, rank), recorded(killed, rank)
        assert [got[s] for s in range(STEPS)] == [ref[s] for s in range(STEPS)]
        epochs: dict[int, Counter] = {}
        for line in (reference / "logs" / f"samples-rank-{rank}.jsonl").read_text().splitlines():
            row = json.loads(line)
            epochs.setdefault(row["epoch"], Counter()).update(row["keys"])
        assert len(epochs) >= 2 and all(max(c.values()) == 1 for c in epochs.values())


def damage(run_dir: Path) -> None:
    """Truncate one train shard, make one image undecodable and drop one sample's .txt in another."""
    shards = sorted((run_dir / "shards" / "train").glob("*.tar"))
    data = shards[0].read_bytes()
    shards[0].write_bytes(data[: len(data) // 2])
    with tarfile.open(shards[1]) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    keys = sorted({m.name.split(".")[0] for m, _ in members})
    with tarfile.open(shards[1], "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, payload in members:
            if member.name == f"{keys[0]}.jpg":
                payload = b"\xff\xd8 this is not a jpeg"
            if member.name == f"{keys[1]}.txt":
                continue
            member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))


def test_damaged_shards_are_skipped_and_counted_on_every_rank(generated_run: Path, tmp_path: Path):
    run_dir = copy_run(generated_run, tmp_path / "damaged")
    damage(run_dir)
    run_cli("train", *train_args(run_dir, train__max_steps=24, train__log_every=24), nproc=2, timeout=600)
    for rank in (0, 1):
        assert "training done at step 24" in (run_dir / "logs" / f"rank-{rank}.log").read_text()
    corrupt = scalars(run_dir / "tb" / "train", "data/corrupt")[24]
    incomplete = scalars(run_dir / "tb" / "train", "data/incomplete")[24]
    assert corrupt >= 2 and incomplete >= 1  # the truncated tar, the bad JPEG; the sample without text
    assert scalars(run_dir / "tb" / "train", "data/resampled")[24] >= 1
    log = (run_dir / "logs" / "rank-0.log").read_text() + (run_dir / "logs" / "rank-1.log").read_text()
    assert "corrupt sample" in log and "incomplete sample" in log


def keep_first_sample(tar_path: Path) -> None:
    """Rewrite a shard with its first sample only: the rest of what its marker counts is gone."""
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    first = members[0][0].name.split(".")[0]
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, payload in members:
            if member.name.split(".")[0] == first:
                tar.addfile(member, io.BytesIO(payload))


def test_shares_too_damaged_for_one_batch_end_the_job_with_a_message(generated_run: Path, tmp_path: Path):
    # issue 11.8: each worker's share reads fewer samples than one micro-batch; refilling used to loop for ever
    run_dir = copy_run(generated_run, tmp_path / "gutted")
    for shard in sorted((run_dir / "shards" / "train").glob("*.tar")):
        keep_first_sample(shard)
    start = time.monotonic()
    proc = run_cli("train", *train_args(run_dir, train__max_steps=24), nproc=2, check=False, timeout=240)
    assert proc.returncode != 0 and time.monotonic() - start < 240
    logs = (run_dir / "logs" / "rank-0.log").read_text() + (run_dir / "logs" / "rank-1.log").read_text()
    assert "readable samples of the" in logs and "fewer than one micro-batch (8)" in logs
    assert "rerun `revprompt generate` to write them again" in logs
