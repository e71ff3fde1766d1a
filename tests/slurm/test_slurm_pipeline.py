"""The pipeline's sbatch script on a real one-node Slurm cluster started on this machine.

Needs Debian's slurmctld, slurmd, munge and slurm-client (`make test` installs them when run as
root; by hand: `apt-get install slurmctld slurmd munge slurm-client`) and root, to run munged as
the munge user. Without them this test is skipped with the reason.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, tiny_args
from tests.slurm.harness import OneNodeCluster, missing

pytestmark = pytest.mark.skipif(bool(missing()) or os.geteuid() != 0,
                                reason=f"needs Slurm and munge installed and root (missing: {missing()})")


@pytest.fixture
def cluster(tmp_path: Path):
    c = OneNodeCluster(tmp_path / "slurm")
    try:
        c.start()
        yield c
    finally:
        c.stop()


def test_pipeline_sbatch_on_one_node(cluster: OneNodeCluster, tmp_path: Path):
    run_dir = tmp_path / "run"
    bin_dir = Path(sys.executable).parent
    args = tiny_args(run_dir, limit=60, generate__height=64, generate__width=64, train__max_steps=4,
                     train__micro_batch_size=8, train__val_every=0, train__val_captions=0, train__num_workers=0,
                     drift__iterations=1)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "GPUS_PER_NODE": "2", "OMP_NUM_THREADS": "1",
           "REVPROMPT": str(bin_dir / "revprompt"), "TORCHRUN": str(bin_dir / "torchrun"), "HF_HUB_OFFLINE": "1",
           "DS_ACCELERATOR": "cpu", "PWD": str(tmp_path)}
    script = ROOT / "revprompt" / "launch" / "slurm" / "pipeline.sbatch"
    (tmp_path / "logs").mkdir()  # Slurm opens --output there and does not create folders
    job, code = cluster.sbatch(script, *args, env=env, extra=["--nodes=1", f"--chdir={tmp_path}"])
    out = tmp_path / "logs" / f"slurm-revprompt-pipeline-{job}.out"
    assert code == 0, f"job {job} exited {code}\n{out.read_text() if out.exists() else ''}\n{cluster.logs()}"
    text = out.read_text()
    assert f"revprompt pipeline: job {job} restart 0, 1 node(s) x 2 rank(s)" in text

    # both ranks ran every stage, and every stage's output is there
    for rank in (0, 1):
        log = (run_dir / "logs" / f"rank-{rank}.log").read_text()
        assert f"revprompt pipeline: rank {rank} of 2" in log
    assert json.loads((run_dir / "shards" / "manifest.json").read_text())["complete"]
    assert json.loads((run_dir / "captioner" / "revprompt.json").read_text())["step"] == 4
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    n_test = sum(1 for line in (run_dir / "prompts" / "test.jsonl").read_text().splitlines() if line.strip())
    assert summary["samples"] == n_test > 0
    assert len(json.loads((run_dir / "drift" / "summary.json").read_text())["iterations"]) == 2
    stages = json.loads((run_dir / "pipeline.json").read_text())["stages"]
    assert all(s["outcome"] == "ran" for s in stages.values())

    # requeued (or resubmitted), the job finds every stage done and changes nothing
    before = (run_dir / "eval" / "results.jsonl").read_bytes()
    job2, code2 = cluster.sbatch(script, *args, env=env, extra=["--nodes=1", f"--chdir={tmp_path}"])
    assert code2 == 0, (tmp_path / "logs" / f"slurm-revprompt-pipeline-{job2}.out").read_text()
    stages = json.loads((run_dir / "pipeline.json").read_text())["stages"]
    assert [stages[s]["outcome"] for s in ("train", "evaluate", "drift")] == ["skipped"] * 3
    assert (run_dir / "eval" / "results.jsonl").read_bytes() == before
