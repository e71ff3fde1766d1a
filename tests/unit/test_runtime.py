"""launch/dist: the single-process runtime helpers, Slurm variables, torchrun restarts."""

from __future__ import annotations

import torch

from revprompt.launch import dist


def test_helpers_work_without_a_process_group():
    assert not torch.distributed.is_initialized()
    dist.barrier()
    assert dist.all_gather_object({"a": 1}) == [{"a": 1}]
    assert dist.broadcast_object(5) == 5


def test_slurm_variables_map_to_torchrun_ones():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "4(x2)",
           "SLURM_JOB_NODELIST": "gpu-[07-08]", "SLURM_JOB_ID": "1234", "PATH": ""}
    assert dist.map_slurm_env(env)
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT")} == \
        {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "MASTER_PORT": "29734"}
    assert env["MASTER_ADDR"] in ("gpu-07",)  # from scontrol when present, else parsed
    torchrun_env = {"RANK": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    assert not dist.map_slurm_env(torchrun_env)  # torchrun already set the ranks
    assert dist.first_slurm_host("node1,node2") == "node1"
    assert dist.first_slurm_host("a[3,5-9]") == "a3"


def test_restarts_over_a_shared_rendezvous_store_are_warned_about():
    shared = {"TORCHELASTIC_MAX_RESTARTS": "2", "TORCHELASTIC_USE_AGENT_STORE": "True"}
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in dist.restart_store_warning(shared)
    assert dist.restart_store_warning({**shared, "TORCHELASTIC_USE_AGENT_STORE": "False"}) is None
    assert dist.restart_store_warning({**shared, "TORCHELASTIC_MAX_RESTARTS": "0"}) is None
    assert dist.restart_store_warning({}) is None  # not under torchrun


def test_slurm_script_gives_each_restart_its_own_store():
    from pathlib import Path

    import revprompt.launch

    script = (Path(revprompt.launch.__file__).parent / "slurm" / "stage.sbatch").read_text()
    export = script.index("export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}")
    assert export < script.index("srun ")
