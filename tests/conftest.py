"""Shared helpers: offline environment, tiny-preset overrides, running the real CLI."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def tiny_args(run_dir: Path, limit: int = 24, **overrides: object) -> list[str]:
    """CLI arguments for a small, fast tiny-preset run in `run_dir`."""
    values = {"run.dir": run_dir, "prompts.limit": limit, "generate.steps": 2, "generate.batch_size": 4,
              "generate.shard_size": 6, "generate.height": 32, "generate.width": 32, "generate.grid_images": 4,
              # as in train_args: the tests of the embedding head (and of evaluate's use of it) turn it on
              "train.embedding_head": "false"}
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return ["--config", "tiny"] + [f"--{k}={v}" for k, v in values.items()]


def cli_env(threads: int = 1) -> dict[str, str]:
    """The environment the CLI runs in: offline, a fixed thread count so runs are comparable."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    return env


def run_cli(*args: str, nproc: int = 0, timeout: int = 600, check: bool = True, threads: int = 1,
            extra: list[str] | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`revprompt ARGS` directly (nproc=0) or under `torchrun --nproc_per_node nproc`; `env` adds variables."""
    script = BIN / "revprompt"
    if nproc:  # torchrun; the installed console script, or the module where revprompt is only on PYTHONPATH
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               *(extra or []), *(["--no-python", str(script)] if script.exists() else ["-m", "revprompt.launch.cli"])]
    else:
        cmd = [str(script)] if script.exists() else [sys.executable, "-m", "revprompt.launch.cli"]
    cmd += list(args)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**cli_env(threads), **(env or {})},
                          cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def shard_digests(run_dir: Path) -> dict[str, str]:
    """sha256 of every shard tar under run_dir/shards, by relative path."""
    root = Path(run_dir) / "shards"
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.tar"))}


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A fresh run directory."""
    return tmp_path / "run"


@pytest.fixture(scope="session")
def generated_run(tmp_path_factory) -> Path:
    """One tiny generation shared by the training tests (copy it before writing into it)."""
    run_dir = tmp_path_factory.mktemp("generated") / "run"
    run_cli("generate", *tiny_args(run_dir, limit=120, generate__shard_size=12, generate__height=64,
                                   generate__width=64), threads=2)
    return run_dir


# the pipeline test's run: 60 prompts at 64 px, 6 steps of training with the embedding head (one DataLoader worker:
# the object-store test's outage then falls in a forked worker), 2 drift rounds
PIPELINE_OVERRIDES = dict(limit=60, generate__height=64, generate__width=64, train__max_steps=6,
                          train__embedding_head="true", train__micro_batch_size=8, train__val_every=0,
                          train__val_captions=2, train__num_workers=1, drift__iterations=2)


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory) -> tuple[Path, list[str], subprocess.CompletedProcess]:
    """One `revprompt pipeline` on the tiny preset with shards under run.dir (PIPELINE_OVERRIDES): its run
    directory, arguments and process. The pipeline test checks it; the object-store test compares a run on s3://
    with it. Nothing may write into it but the pipeline test's relaunch."""
    run_dir = tmp_path_factory.mktemp("pipeline") / "run"
    args = tiny_args(run_dir, **PIPELINE_OVERRIDES)
    return run_dir, args, run_cli("pipeline", *args, threads=2)


def copy_run(src: Path, dst: Path) -> Path:
    """A private copy of a generated run (prompts, shards, config) to train in."""
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("logs", "tb"))
    return dst


def train_args(run_dir: Path, **overrides: object) -> list[str]:
    """CLI arguments for a short tiny-preset training run on shards made by `generated_run`."""
    values = {"run.dir": run_dir, "prompts.limit": 120, "generate.shard_size": 12, "generate.height": 64,
              "generate.width": 64, "generate.steps": 2, "generate.batch_size": 4, "train.micro_batch_size": 8,
              "train.max_steps": 12, "train.log_every": 2, "train.val_every": 0, "train.val_batches": 1,
              "train.val_captions": 4, "train.save_every": 100, "train.num_workers": 1,
              # the tiny preset trains an embedding head; the tests that check it turn it back on (each launch
              # with it loads the sentence model on every rank: seconds the others need not spend)
              "train.embedding_head": "false"}
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return ["--config", "tiny"] + [f"--{k}={v}" for k, v in values.items()]


def scalars(tb_dir: Path, tag: str) -> dict[int, float]:
    """step -> value of a TensorBoard scalar over every event file in `tb_dir` (later files win)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[int, float] = {}
    for events_file in sorted(Path(tb_dir).glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(events_file))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            out.update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def kill_tree(pid: int) -> int:
    """SIGKILL a process and every descendant (torchrun starts its ranks in sessions of their own)."""
    import psutil

    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return 0
    procs = parent.children(recursive=True) + [parent]
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)
    return len(procs)
