"""A checkpoint counts only once every rank has written it: resume skips half-written ones and says why."""

from __future__ import annotations

import shutil
from pathlib import Path

from revprompt.training.checkpoints import COMMIT
from tests.conftest import copy_run, run_cli, train_args


def checkpoints(root: Path) -> list[str]:
    """The step folders and `latest` (DeepSpeed also leaves its zero_to_fp32 scripts there)."""
    return sorted(p.name for p in root.iterdir() if p.name == "latest" or p.name.startswith("step-"))


def test_resume_falls_back_past_half_written_checkpoints(generated_run: Path, tmp_path: Path):
    run_dir = copy_run(generated_run, tmp_path / "run")
    root = run_dir / "checkpoints"
    common = dict(train__save_every=4, train__val_captions=0, train__log_every=4)
    run_cli("train", *train_args(run_dir, train__max_steps=8, train__keep_checkpoints=2, **common), nproc=2)
    assert checkpoints(root) == ["latest", "step-4", "step-8"]
    assert all((root / s / COMMIT).is_file() for s in ("step-4", "step-8"))
    # step-8: rank 1's optimizer partition cut short; step-20: a killed run's save that never committed
    partition = root / "step-8" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    partition.write_bytes(partition.read_bytes()[:1000])
    shutil.copytree(root / "step-4", root / "step-20")
    (root / "step-20" / COMMIT).unlink()
    (root / "latest").write_text("")  # DeepSpeed's own pointer, empty: no longer read

    run_cli("train", *train_args(run_dir, train__max_steps=12, train__keep_checkpoints=1, **common), nproc=2)
    log = (run_dir / "logs" / "rank-0.log").read_text()
    assert f"not resuming from {root / 'step-20'}: not committed" in log
    assert f"not resuming from {root / 'step-8'}: zero_pp_rank_1_mp_rank_00_optim_states.pt has 1000 bytes" in log
    assert f"resumed from {root / 'step-4'}" in log and "training done at step 12" in log
    # keep_checkpoints=1 kept the new checkpoint; the leftover newer folder is not counted, nor resumed from
    assert checkpoints(root) == ["latest", "step-12", "step-20"]
    assert (root / "latest").read_text() == "step-12"
    run_cli("train", *train_args(run_dir, train__max_steps=16, train__keep_checkpoints=1, **common), nproc=2)
    log = (run_dir / "logs" / "rank-0.log").read_text()
    assert f"resumed from {root / 'step-12'}" in log and "training done at step 16" in log
