"""The DeepSpeed engine: ZeRO config from training/deepspeed/, AdamW, warm-up + cosine, weights-only loading."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import math
import os
import re
import sys
import time
from importlib import resources
from pathlib import Path

import torch

from ..launch import dist
from ..launch.config import TrainConfig

log = logging.getLogger(__name__)


class DeepSpeedConfigError(ValueError):
    """A DeepSpeed JSON that cannot be used; the message names the file."""


class OpBuildLockError(RuntimeError):
    """A lock file of torch's extension builds that is older than any build takes; the message names it."""


# how old a lock of torch's extension builds may get before it is taken for one a killed build left: DeepSpeed's CPU
# op (its shared-memory collectives) builds in about a minute on 2 cores
OP_BUILD_WAIT_S = 900.0


def op_build_lock(name: str = "deepspeed_shm_comm") -> Path:
    """The lock file torch holds while it builds extension `name`: in torch.utils.cpp_extension's build directory
    (torch makes that folder if it is not there yet)."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(name, verbose=False)) / "lock"


def wait_for_lock(lock: Path, max_age_s: float = OP_BUILD_WAIT_S, poll_s: float = 0.5) -> float:
    """Wait while another process's extension build holds `lock`, until the lock is `max_age_s` old; returns the
    seconds waited. Raises OpBuildLockError naming the file once it is older (at once for a lock left long ago): a
    build killed half-way (a job or `make` stopped during its first minute) leaves its lock behind, and torch itself
    would wait on it for ever. The file is not ours to remove."""
    start = time.monotonic()
    announced = False
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return time.monotonic() - start
        if age > max_age_s:
            raise OpBuildLockError(
                f"{lock} is {age:.0f} s old (more than {max_age_s:.0f} s): a build of torch's extensions (DeepSpeed's "
                f"CPU op takes about a minute) holds it. If no other job or `make` is building now, a build killed "
                f"half-way left it: remove it and start again")
        if not announced:
            log.warning("another process is building a torch extension: waiting for %s (at most until it is %.0f s "
                        "old, now %.0f s)", lock, max_age_s, max(age, 0.0))
            announced = True
        time.sleep(min(poll_s, max(max_age_s - age, 0.01)))


@contextlib.contextmanager
def bounded_extension_builds(max_age_s: float = OP_BUILD_WAIT_S):
    """Within the block, a process that finds another's build lock of a torch extension waits as `wait_for_lock` does,
    with a bound, instead of in torch's FileBaton.wait, which sleeps until the file is gone, for ever. DeepSpeed loads
    its ops (on a CPU its comm op, at every deepspeed.initialize) through torch's cpp_extension, which takes that lock
    around every load, built or not."""
    from torch.utils.file_baton import FileBaton

    unbounded = FileBaton.wait
    FileBaton.wait = lambda baton: wait_for_lock(Path(baton.lock_file_path), max_age_s, baton.wait_seconds)
    try:
        yield
    finally:
        FileBaton.wait = unbounded


def build_cpu_op(max_age_s: float = OP_BUILD_WAIT_S) -> bool:
    """Build (or load) DeepSpeed's CPU comm op ahead of any job, as `make install` does, through DeepSpeed's own
    build_shm_op; False where this machine's DeepSpeed has no such op (a CUDA machine, a platform it does not build
    for)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    from deepspeed.comm.torch import build_shm_op

    with bounded_extension_builds(max_age_s):
        return build_shm_op() is not None


def read_stage_json(stage: int, path: str = "") -> dict:
    """The ZeRO JSON of `stage`: the file `path` when given (train.deepspeed_config), else the shipped
    training/deepspeed/zero{stage}.json. Its batch, clipping and precision fields are filled from [train]."""
    if path:
        try:
            config = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DeepSpeedConfigError(f"train.deepspeed_config {path}: cannot read it as JSON: {exc}") from None
        found = config.get("zero_optimization", {}).get("stage", 0) if isinstance(config, dict) else None
        if found != stage:
            raise DeepSpeedConfigError(f"train.deepspeed_config {path}: zero_optimization.stage is {found}, "
                                       f"train.zero_stage is {stage}; set them equal")
    else:
        config = json.loads((resources.files("revprompt.training") / "deepspeed" / f"zero{stage}.json").read_text())
    config.pop("_comment", None)
    return config


def effective_stage(requested: int, world_size: int, path: str = "") -> int:
    """The ZeRO stage a job of `world_size` ranks runs.

    Stages 1 and 2 partition optimizer state and gradients across ranks. On one rank there is
    nothing to partition and they only add flat-buffer copies of every gradient and weight per step
    (measured: 12 % of a tiny-model step on the CPU; 131 against 148 samples/s for BLIP-base on one
    H100), so a one-rank job runs them as stage 0, which does the same arithmetic. A stage JSON that
    offloads to the CPU, and stage 3, keep their stage: there the layout is the point.
    """
    if world_size > 1 or requested not in (1, 2):
        return requested
    zero = read_stage_json(requested, path).get("zero_optimization", {})
    if "offload_optimizer" in zero or "offload_param" in zero:
        return requested
    return 0


def load_ds_config(train: TrainConfig, world_size: int, device: torch.device) -> dict:
    """The DeepSpeed config this job runs: the JSON of its stage (see `effective_stage`; a one-rank job that
    falls back to stage 0 runs its JSON with the stage set to 0), the "auto" fields filled from [train]."""
    stage = effective_stage(train.zero_stage, world_size, train.deepspeed_config)
    if train.deepspeed_config:
        config = read_stage_json(train.zero_stage, train.deepspeed_config)
        if stage != train.zero_stage:
            config["zero_optimization"] = {"stage": 0}
    else:
        config = read_stage_json(stage)
    config["train_micro_batch_size_per_gpu"] = train.micro_batch_size
    config["gradient_accumulation_steps"] = train.grad_accum
    config["train_batch_size"] = train.micro_batch_size * train.grad_accum * world_size
    config["gradient_clipping"] = train.grad_clip
    config["bf16"] = {"enabled": resolve_precision(train.precision, device) == torch.bfloat16}
    if train.precision == "bf16-autocast":  # fp32 weights and optimizer, the forward under bf16 autocast
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    if trainer_clips(config):
        config["gradient_clipping"] = 0.0  # the trainer clips at train.grad_clip (see trainer_clips)
    # DeepSpeed's throughput timer is on unless a config says otherwise, and synchronizes the device at the start
    # of every forward and the end of every step, so the host cannot queue the next step while the GPU runs this
    # one; its figure is only printed every steps_per_print steps, and the trainer logs perf/samples_per_s itself.
    # A JSON of the user's own that sets "timers" keeps them.
    config.setdefault("timers", {"throughput": {"enabled": False}})
    return config


def trainer_clips(config: dict) -> bool:
    """Whether the trainer clips the gradients itself rather than DeepSpeed: fp32 weights without a ZeRO optimizer
    (stage 0), where every rank holds the full, reduced gradients after backward. There DeepSpeed clips with a loop
    of one norm per parameter plus an all-reduce of the total (1.8 % of a tiny-model step on the CPU); torch's
    foreach clip_grad_norm_ does the same arithmetic in a few kernels and hands back the norm the logs show."""
    reduced_precision = any(config.get(k, {}).get("enabled") is True for k in ("bf16", "fp16"))  # not autocast
    return config.get("zero_optimization", {}).get("stage", 0) == 0 and not reduced_precision


def clip_gradients(params: list[torch.Tensor], max_norm: float, want_norm: bool) -> float | None:
    """Clip the gradients of `params` to `max_norm` (0: no clipping) with torch's foreach clip; returns the norm
    before clipping when `want_norm` (a device sync), else None."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or (max_norm <= 0 and not want_norm):
        return None
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if max_norm > 0 else torch.nn.utils.get_total_norm(grads)
    return float(norm) if want_norm else None


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """The dtype of the trained weights: `auto` is bf16 on CUDA and fp32 on CPU; `bf16-autocast` keeps them in fp32
    (only the forward's matmuls run in bf16)."""
    if name == "bf16-autocast":
        return torch.float32
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def lr_lambda(train: TrainConfig):
    """Linear warm-up to 1, then cosine to `min_lr_ratio` at `max_steps`."""

    def factor(step: int) -> float:
        if step < train.warmup_steps:
            return (step + 1) / max(1, train.warmup_steps)
        span = max(1, train.max_steps - train.warmup_steps)
        progress = min(1.0, (step - train.warmup_steps) / span)
        return train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_optimizer(model: torch.nn.Module, train: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over trainable parameters; no decay on biases and norms. A torch optimizer on purpose:
    DeepSpeed's FusedAdam JIT build fails for arch lists such as 9.0a, and on CPU it is not needed."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # an empty group (LoRA adapters have no biases or norms) is dropped by DeepSpeed, and the LR schedule, made
    # for every group, would then not match the optimizer's
    groups = [g for g in groups if g["params"]]
    kwargs = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=train.lr, betas=(0.9, 0.999), **kwargs)


def initialize(model: torch.nn.Module, train: TrainConfig, world_size: int, device: torch.device):
    """deepspeed.initialize on the job's process group; returns (engine, optimizer, scheduler). Its op loads wait for
    another process's build with a bound (see bounded_extension_builds)."""
    import deepspeed

    config = load_ds_config(train, world_size, device)
    torch_optimizer = build_optimizer(model, train, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(torch_optimizer, lr_lambda(train))
    printed = io.StringIO()
    # DeepSpeed prints its op builds ("... built successfully") to stdout
    with contextlib.redirect_stdout(printed), bounded_extension_builds():
        engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=torch_optimizer,
                                                               lr_scheduler=scheduler, config=config,
                                                               dist_init_required=False)
    for line in printed.getvalue().splitlines():
        log.debug("deepspeed: %s", line)
    # after deepspeed.initialize, which clones the one-rank group: both groups' transport threads (launch/dist.py)
    idled = dist.idle_lone_group_threads()
    if idled:
        log.debug("one rank: %d gloo transport threads at idle priority", idled)
    if world_size == 1 and engine.zero_optimization_stage() == 0:
        # one rank has nothing to reduce, but DeepSpeed would still flatten every gradient into buckets, "all-reduce"
        # them over the one rank and copy them back, each step (2.7 % of a tiny-model step on the CPU)
        engine.enable_backward_allreduce = False
    if engine.optimizer is torch_optimizer and engine.zero_optimization_stage() == 0:
        # DeepSpeed left the torch optimizer unwrapped (stage 0, no fp16/bf16 optimizer), so after each step its
        # engine.zero_grad() sets every gradient to None by walking the whole module's named_parameters(); the
        # optimizer's own zero_grad does the same over the list it holds, every trained parameter (0.23 ms of a
        # 58 ms tiny-model step on the CPU). Frozen parameters have no gradient to clear.
        engine.zero_grad = functools.partial(torch_optimizer.zero_grad, set_to_none=True)
    return engine, optimizer, scheduler


# the DeepSpeed whose engine forward `forward_entry` was read against (0.19.8); an older one did more in its forward
FORWARD_ENTRY_SINCE = (0, 19)


def forward_entry(engine, world_size: int):
    """What a micro-batch's forward calls: the engine, or its module where the engine's forward adds nothing to it.

    DeepSpeed's forward (0.19) runs the module under its autocast (train.precision = bf16-autocast), clears a ZeRO
    optimizer's backward flags, hands deepcompile and ZeRO-3 their forward, and hangs a backward hook on every output
    tensor (BLIP's loss, logits, image and text states) whose first call runs the backward's prologue: starting its
    timers and a memory report. Its module pre/post hooks (timers, flops profiler, random-LTD) sit on the module
    itself and run either way. On one rank at ZeRO-0 with a plain torch optimizer, fp32 weights, no autocast, no
    compile, and no timers, profiler, autotuning or memory report asked for in the DeepSpeed JSON, that forward does
    nothing for the step, so the module is called directly: engine.backward and engine.step still scale the loss for
    gradient accumulation, run the backward's epilogue, the optimizer and the schedule, and count the steps that
    checkpoints record; losses and weights are the same bit for bit (tests/unit). On 2 CPU cores the engine's forward
    adds 16 us of Python per call, and a bare loop through it trained the tiny preset 0.1-0.9 % slower than through
    the module (three paired rounds). Anywhere else the engine's forward runs."""
    import deepspeed
    from deepspeed.runtime.base_optimizer import DeepSpeedOptimizer

    version = tuple(int(part) for part in re.findall(r"\d+", deepspeed.__version__)[:2])
    plain = (version >= FORWARD_ENTRY_SINCE and world_size == 1 and engine.zero_optimization_stage() == 0
             and isinstance(engine.optimizer, torch.optim.Optimizer)
             and not isinstance(engine.optimizer, DeepSpeedOptimizer)  # not wrapped by one of DeepSpeed's
             and not engine.torch_autocast_enabled() and not engine.fp16_enabled() and not engine.bfloat16_enabled()
             and not engine.is_compiled and not engine.wall_clock_breakdown() and not engine.flops_profiler_enabled()
             and not engine.memory_breakdown() and not engine.autotuning_enabled())
    return engine.module if plain else engine


def allow_deepspeed_checkpoint_types() -> None:
    """Let weights-only loading accept the few plain DeepSpeed types its checkpoints carry (no code runs)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    torch.serialization.add_safe_globals([ZeroStageEnum, LossScaler, fragment_address])


def gathered_state_dict(engine, is_main: bool) -> dict[str, torch.Tensor] | None:
    """The full model state on rank 0 (ZeRO-3 partitions gathered, one parameter at a time); None elsewhere.

    Every rank must call this: under ZeRO-3 each gather is a collective.
    """
    module = engine.module
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        state: dict[str, torch.Tensor] = {}
        for name, param in module.named_parameters():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if is_main:
                    state[name] = param.detach().to("cpu", torch.float32).clone()
        if is_main:
            persistent = set(module.state_dict().keys())  # non-persistent buffers are not part of a model's state
            for name, buf in module.named_buffers():
                if name in persistent:
                    state[name] = buf.detach().to("cpu").clone()
        return state if is_main else None
    if not is_main:
        return None
    return {k: (v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu()).clone()
            for k, v in module.state_dict().items()}


def force_weights_only_loads() -> None:
    """Every torch.load in this process (DeepSpeed's included) refuses arbitrary pickles."""
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"


if __name__ == "__main__":  # `python -m revprompt.training.engine`: make's ahead-of-time build of the CPU op
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        build_cpu_op()
    except OpBuildLockError as exc:
        print(f"DeepSpeed's CPU op build: {exc}", file=sys.stderr)
        sys.exit(1)
