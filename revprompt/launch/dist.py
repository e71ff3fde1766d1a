"""Distributed runtime: process-group set-up on accelerate's PartialState, rank helpers, per-rank logs.

This is the only module that reads RANK, WORLD_SIZE, LOCAL_RANK and SLURM_*; everything else asks it.
Every helper also works in a single process without a process group.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job: its rank among `world_size`, its rank on this node, and the device
    it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on global rank 0, the rank that prints progress and writes TensorBoard."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group with more than one rank is up."""
        return self.world_size > 1


def first_slurm_host(nodelist: str) -> str:
    """First host name of a Slurm node list such as 'gpu-[07-09,12],cpu1' (no scontrol needed)."""
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ValueError(f"SLURM_JOB_NODELIST: cannot parse {nodelist!r}")
    prefix, _, ranges = match.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def map_slurm_env(env: dict[str, str] | None = None) -> bool:
    """When srun started one task per GPU (and no torchrun), fill the torchrun variables from SLURM_*."""
    env = os.environ if env is None else env
    if "RANK" in env or int(env.get("SLURM_NTASKS", "1")) <= 1 or "SLURM_PROCID" not in env:
        return False
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env["SLURM_NTASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env.setdefault("LOCAL_WORLD_SIZE", env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
    if "MASTER_ADDR" not in env:
        nodelist = env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1"))
        host = None
        if shutil.which("scontrol"):
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
            host = out.stdout.split()[0] if out.returncode == 0 and out.stdout.strip() else None
        env["MASTER_ADDR"] = host or first_slurm_host(nodelist)
    env.setdefault("MASTER_PORT", str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 1000))
    return True


def restart_store_warning(env: dict[str, str] | None = None) -> str | None:
    """Why torchrun restarts could hang in this launch, or None.

    Under `torchrun --max-restarts N` (N > 0) with the rendezvous store shared with the workers
    (torchrun's default), restarted workers can read keys of the failed attempt and fail or hang in
    `init_process_group` (pytorch/pytorch#135712). TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, set for
    torchrun, gives every attempt a store of its own; only torchrun reads it, so a worker can only warn.
    """
    env = os.environ if env is None else env
    if int(env.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0 and env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return ("torchrun --max-restarts is set but its workers share the rendezvous store: a restart can fail "
                "or hang while the ranks join (pytorch/pytorch#135712); launch torchrun with "
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (the Slurm scripts in revprompt/launch/slurm do)")
    return None


class DeviceError(RuntimeError):
    """The device asked for is not on this machine; the message says which key asked and what to set."""


def _want_cuda(device: str) -> bool:
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceError("run.device = 'cuda' (--device cuda for caption): CUDA is not available on this machine "
                          f"(torch {torch.__version__}); use run.device=auto or cpu")
    return device != "cpu" and torch.cuda.is_available()


def stop_with_launcher(env: dict[str, str] | None = None) -> bool:
    """Under torchrun, have the kernel kill this rank when its launcher dies; True when set up.

    torchrun starts each rank in a process session of its own, so killing torchrun's process group
    leaves the ranks running: they would finish the job beside the rerun that follows ("kill, then
    rerun" becoming two writers). PR_SET_PDEATHSIG (Linux) ties the rank to its parent; elsewhere a
    thread checks the parent once a second.
    """
    env = os.environ if env is None else env
    if "TORCHELASTIC_RUN_ID" not in env:
        return False
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    else:  # pragma: no cover - not Linux
        import threading
        import time

        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, name="launcher-watch", daemon=True).start()
    if os.getppid() != parent or parent == 1:  # the launcher died before the request was in place
        os._exit(1)
    return True


def init(device: str = "auto", timeout_s: int = 1800) -> DistInfo:
    """Join the job's process group (NCCL on CUDA, gloo on CPU) or run alone; return this rank's place."""
    from accelerate import PartialState

    stop_with_launcher()
    map_slurm_env()
    cuda = _want_cuda(device)
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported anywhere
    state = PartialState(cpu=not cuda, timeout=datetime.timedelta(seconds=timeout_s))
    dev = torch.device("cuda", state.local_process_index) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    return DistInfo(state.process_index, state.num_processes, state.local_process_index, dev)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
HOST_MEMORY_REUSE_BYTES = 1 << 30


def reuse_freed_host_memory(limit: int = HOST_MEMORY_REUSE_BYTES) -> bool:
    """Let glibc keep freed buffers of up to `limit` bytes for reuse instead of handing them back to the kernel.

    By default a buffer above 32 MiB is its own mmap, returned on free, so a model on the CPU whose step allocates
    large activations (the text decoder's vocabulary-wide logits) takes fresh zeroed pages, one fault per 4 KiB,
    every step: measured 20-25 % of the tiny preset's training step. Above both thresholds the heap serves and
    keeps them. Returns False where the C library has no mallopt (not glibc); nothing changes there.
    """
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, limit)) and bool(mallopt(_M_TRIM_THRESHOLD, limit))


def ensure_group(info: DistInfo) -> None:
    """A process group even for one process (DeepSpeed needs one): world size 1 on a free local port."""
    if torch.distributed.is_initialized():
        return
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    torch.distributed.init_process_group(backend="nccl" if info.device.type == "cuda" else "gloo",
                                         init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


# the name gloo gives the thread of each TCP transport device (one per process group) that runs its epoll loop
GLOO_LOOP_THREAD = "gloo_tcp_loop"


def idle_lone_group_threads() -> int:
    """In a one-rank job on gloo, put the transport threads of its process groups at idle priority (Linux
    SCHED_IDLE); returns how many were. Elsewhere (several ranks, NCCL, no group, no SCHED_IDLE) it changes nothing.

    DeepSpeed needs a process group even on one rank, and it clones the default one (two groups). Each gloo group
    has a thread that wakes from epoll every 10 ms whether or not there is anything to send, and on one rank there
    never is: no peer, no socket. At normal priority each wake-up preempts one of the model's threads; on 2 CPU cores
    the same bare training step ran 0.7-1.2 % faster in the trainer's process with these threads idle (in-process
    blocks, alternated). At idle priority they still run whenever a core is free, and get a small share otherwise.
    With several ranks they carry the collectives and keep their priority. Lowering a thread's priority needs no
    privilege.
    """
    if not (hasattr(os, "SCHED_IDLE") and torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 0
    if torch.distributed.get_world_size() != 1 or torch.distributed.get_backend() != "gloo":
        return 0
    idled = 0
    tasks = Path("/proc/self/task")
    for task in tasks.iterdir() if tasks.is_dir() else []:
        try:
            if (task / "comm").read_text().strip() != GLOO_LOOP_THREAD:
                continue
            os.sched_setscheduler(int(task.name), os.SCHED_IDLE, os.sched_param(0))
            idled += 1
        except (OSError, ValueError):  # the thread ended meanwhile, or this kernel refuses: leave it as it is
            continue
    return idled


def close() -> None:
    """Leave the process group, if one is up."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier() -> None:
    """Wait until every rank arrives; a no-op without a process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (objects are picklable values built here, not data)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


FILE_ONLY = "revprompt_file_only"  # a log record with this attribute set skips the console (a traceback, say)


def setup_logging(log_dir: str | Path | None, rank: int, level: str = "INFO") -> Path | None:
    """Log every rank to `log_dir/rank-N.log` (None: the console alone); only rank 0 echoes INFO to the
    console, others errors."""
    path = None
    if log_dir is not None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        path = Path(log_dir) / f"rank-{rank}.log"
    fmt = logging.Formatter(f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_revprompt", False):
            root.removeHandler(handler)
            handler.close()
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    console.setLevel(logging.INFO if rank == 0 else logging.ERROR)
    console.addFilter(lambda record: not getattr(record, FILE_ONLY, False))
    handlers: list[logging.Handler] = [console]
    if path is not None:
        file_handler = logging.FileHandler(path, encoding="utf-8")
        file_handler.setFormatter(fmt)
        handlers.append(file_handler)
    for handler in handlers:
        handler._revprompt = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(getattr(logging, level))
    # third-party libraries are chatty at INFO; their warnings still reach the log files
    # (the compiler probes DeepSpeed runs before building an op log at INFO under 'compilers')
    for noisy in ("diffusers", "transformers", "accelerate", "torch.distributed", "urllib3", "compilers",
                  "sentence_transformers", "DeepSpeed", "deepspeed", "huggingface_hub", "filelock",
                  "faiss"):  # faiss logs each CPU-feature build it tries before the one that loads
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quiet_library_progress_bars()
    # importing diffusers makes transformers warn, once per class, that its image processors fall back
    # to PIL without torchvision; revprompt's processors are PIL ones, so that is not news to the user
    import_log = logging.getLogger("transformers.utils.import_utils")
    if not any(f is _drop_torchvision_fallback for f in import_log.filters):
        import_log.addFilter(_drop_torchvision_fallback)
    return path


def quiet_library_progress_bars() -> None:
    """The libraries' own bars ("Loading weights", "Loading pipeline components", "Writing model shards") would
    interleave with revprompt's; revprompt shows one bar per stage. diffusers is switched off when something
    imports it: importing it here would cost every stage that never draws an image 1.5 s (torch._dynamo)."""
    import huggingface_hub.utils as hub_utils
    import transformers.utils.logging as transformers_logging

    transformers_logging.disable_progress_bar()
    hub_utils.disable_progress_bars()
    after_import("diffusers.utils.logging", lambda module: module.disable_progress_bar())


class _AfterImport:
    """A meta-path finder that runs `action(module)` once `name` has been imported (by whoever imports it)."""

    def __init__(self, name: str, action):
        self.name, self.action = name, action

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        import importlib.util

        sys.meta_path.remove(self)  # once; and the real finders give the spec
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader, action = spec.loader, self.action

        class Loader:
            def __getattr__(self, attr):  # everything else (get_code, is_package, resources) is the real loader's
                return getattr(loader, attr)

            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                loader.exec_module(module)
                action(module)

        spec.loader = Loader()
        return spec


def after_import(name: str, action) -> None:
    """`action(module)` now if `name` is imported already, else right after its import."""
    if name in sys.modules:
        action(sys.modules[name])
    elif not any(isinstance(f, _AfterImport) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(name, action))


def _drop_torchvision_fallback(record: logging.LogRecord) -> bool:
    return "requires torchvision (not installed)" not in record.getMessage()
