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


def test_freed_host_memory_is_kept_for_reuse_only_when_asked():
    """A 256 MiB tensor is its own mmap by default (mallinfo2's hblkhd counts it); after reuse_freed_host_memory the
    heap serves it, and it stays there for the next one once freed."""
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT, cli_env

    script = r"""
import ctypes, json, sys
import torch
from revprompt.launch import dist

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "reuse":
    assert dist.reuse_freed_host_memory()
before = libc.mallinfo2().hblkhd
x = torch.ones(64 << 20)  # 256 MiB
mapped = libc.mallinfo2().hblkhd - before
del x
arena_after_free = libc.mallinfo2().arena
print(json.dumps({"mapped": mapped, "arena": arena_after_free}))
"""
    out = {}
    for mode in ("default", "reuse"):
        proc = subprocess.run([sys.executable, "-c", script, mode], env=cli_env(), cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["default"]["mapped"] >= 256 << 20  # its own mapping, unmapped on free
    assert out["reuse"]["mapped"] == 0  # from the heap ...
    assert out["reuse"]["arena"] >= 256 << 20  # ... which keeps it after the free


def test_library_bars_are_off_without_importing_diffusers_until_something_does():
    """A stage that never draws an image does not pay diffusers' import (1.5 s); once anything imports it, its
    bars are off as transformers' are."""
    import subprocess
    import sys

    script = """
import sys
from revprompt.launch import dist
dist.quiet_library_progress_bars()
dist.quiet_library_progress_bars()  # twice: one hook
assert "diffusers" not in sys.modules, "imported early"
import transformers.utils.logging as t
assert not t.is_progress_bar_enabled()
from diffusers import DiffusionPipeline
import diffusers.utils.logging as d
print(d.is_progress_bar_enabled(), d.__loader__.get_filename("diffusers.utils.logging").endswith("logging.py"))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "True"]
