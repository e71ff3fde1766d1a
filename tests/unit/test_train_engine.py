"""training/engine: the one-rank fast path (no all-reduce over one rank, the trainer's foreach clip) takes exactly the
steps DeepSpeed's own path takes, and bf16-autocast the steps of a bare torch.autocast loop."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import ROOT, cli_env

SCRIPT = r'''
import json, os, sys
os.environ["DS_ACCELERATOR"] = "cpu"
import torch
from revprompt.launch import dist
from revprompt.launch.config import load_config
from revprompt.training.engine import (build_optimizer, clip_gradients, forward_entry, initialize, load_ds_config,
                                      lr_lambda)

dist.ensure_group(dist.DistInfo(0, 1, 0, torch.device("cpu")))
t = load_config("tiny", ["--train.grad_clip=0.05", "--train.precision=fp32", "--train.zero_stage=2",
                         "--train.micro_batch_size=4", "--train.grad_accum=2"]).train


def run(ours):
    import deepspeed
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
    if ours:
        engine, _, _ = initialize(model, t, 1, torch.device("cpu"))
        facts = {"allreduce": engine.enable_backward_allreduce, "ds_clip": engine.config["gradient_clipping"],
                 "stage": engine.zero_optimization_stage(),
                 # after a step the optimizer clears the gradients, not DeepSpeed's walk over the module
                 "zero_grad": type(engine.zero_grad).__name__,
                 "throughput_timer": engine.tput_timer.config.enabled}
    else:  # DeepSpeed clipping and reducing itself, as before
        config = load_ds_config(t, 1, torch.device("cpu"))
        config["gradient_clipping"] = t.grad_clip
        optimizer = build_optimizer(model, t, torch.device("cpu"))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t))
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config,
                                               dist_init_required=False)
        facts = {"allreduce": engine.enable_backward_allreduce, "ds_clip": engine.config["gradient_clipping"]}
    params = [p for p in model.parameters() if p.requires_grad]
    data = torch.Generator().manual_seed(1)
    norms = []
    for micro in range(8):
        x = torch.randn(4, 32, generator=data) * 10
        engine.backward(model(x).pow(2).mean())
        if engine.is_gradient_accumulation_boundary():
            before = float(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params])))
            if ours:
                norms.append((before, clip_gradients(params, t.grad_clip, want_norm=True)))
            else:
                norms.append((before, before))
        engine.step()
        if engine.is_gradient_accumulation_boundary() is False and micro % 2 == 1:
            facts.setdefault("cleared", []).append(all(p.grad is None for p in params))
    return facts, [p.detach().flatten().tolist() for p in params], norms


ours, theirs = run(True), run(False)

# bf16-autocast: DeepSpeed's torch_autocast against a bare torch loop under torch.autocast, same weights after 4 steps
auto = load_config("tiny", ["--train.grad_clip=0.05", "--train.precision=bf16-autocast", "--train.zero_stage=0",
                            "--train.micro_batch_size=4"]).train


def autocast_run(engine_side):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
    params = [p for p in model.parameters()]
    data = torch.Generator().manual_seed(2)
    if engine_side:
        engine, _, _ = initialize(model, auto, 1, torch.device("cpu"))
        facts = {"autocast": engine.torch_autocast_enabled(), "bf16": engine.bfloat16_enabled(),
                 "ds_clip": engine.config["gradient_clipping"]}
    else:
        optimizer = build_optimizer(model, auto, torch.device("cpu"))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(auto))
        facts = {}
    for step in range(4):
        x = torch.randn(4, 32, generator=data) * 10
        if engine_side:
            loss = engine(x).pow(2).mean()
            engine.backward(loss)
            clip_gradients(params, auto.grad_clip, want_norm=False)
            engine.step()
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(x).pow(2).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, auto.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    return facts, str(loss.dtype), [p.dtype == torch.float32 for p in params], \
        [p.detach().flatten().tolist() for p in params]


# bf16 weights at stage 0: DeepSpeed wraps the optimizer in its own, and its engine.zero_grad stays DeepSpeed's
bf16 = load_config("tiny", ["--train.precision=bf16", "--train.zero_stage=0", "--train.micro_batch_size=4"]).train
wrapped = initialize(torch.nn.Linear(8, 8), bf16, 1, torch.device("cpu"))[0]
bf16_facts = {"optimizer": type(wrapped.optimizer).__name__, "zero_grad": type(wrapped.zero_grad).__name__}



# the forward through the module (forward_entry on one rank, ZeRO-0, fp32) against the engine's own, on the tiny BLIP
# captioner in training mode (dropout on): the same losses and weights, bit for bit, over three steps
def blip_run(direct):
    from revprompt.models.captioner import TrainingInputs, build_captioner

    tb = load_config("tiny", ["--train.precision=fp32", "--train.zero_stage=2", "--train.micro_batch_size=4",
                              "--train.grad_accum=2"]).train
    model, processor = build_captioner("random-tiny", 0)
    model.train()
    engine, _, _ = initialize(model, tb, 1, torch.device("cpu"))
    entry = forward_entry(engine, 1)
    facts = {"entry": "module" if entry is engine.module else "engine",
             "two_ranks": "module" if forward_entry(engine, 2) is engine.module else "engine"}
    inputs = TrainingInputs(model, processor, tb.max_length)
    pics = torch.Generator().manual_seed(3)
    params = [p for p in model.parameters() if p.requires_grad]
    losses = []
    torch.manual_seed(4)  # dropout's masks: the same draws on both sides
    for texts in (["Nike Men Red T-shirt", "Titan Watch", "Jeans", "Red Cap"], ["Bag", "Socks", "Adidas Cap", "Belt"],
                  ["Puma Women Black Running Shoes", "Lotto Shoes", "Fossil Watch", "Navy Blue Shirt"],
                  ["Wrist Band", "Peter England Men Party Blue Jeans", "Kurta", "Sandals"]):
        images = [torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=pics) for _ in texts]
        batch = inputs(images, texts)
        loss = (entry if direct else engine)(**batch).loss
        engine.backward(loss)
        if engine.is_gradient_accumulation_boundary():  # as Trainer._micro_step: clip at the boundary
            clip_gradients(params, tb.grad_clip, want_norm=False)
        engine.step()
        losses.append(loss.item())
    return facts, losses, [p.detach().flatten().tolist() for p in params], [engine.global_steps, engine.micro_steps]


# a user's DeepSpeed JSON asking for the wall-clock breakdown: its backward timers are started by the engine's forward
import tempfile
timed_json = os.path.join(tempfile.mkdtemp(), "zero0-timed.json")
with open(timed_json, "w") as f:
    json.dump({"zero_optimization": {"stage": 0}, "wall_clock_breakdown": True}, f)
timed = load_config("tiny", ["--train.precision=fp32", "--train.zero_stage=0", f"--train.deepspeed_config={timed_json}",
                             "--train.micro_batch_size=4"]).train
entries = {name: "module" if forward_entry(initialize(torch.nn.Linear(8, 8), cfg, 1, torch.device("cpu"))[0], 1)
           .__class__ is torch.nn.Linear else "engine"
           for name, cfg in (("bf16", bf16), ("autocast", auto), ("timers", timed), ("fp32", t))}


# after initialize on one rank: every gloo transport thread (the default group's and DeepSpeed's clone's) at idle
# priority, no other thread; collectives over both groups still give one rank's answers
def policies():
    seen = {}
    for task in os.listdir("/proc/self/task"):
        name = open(f"/proc/self/task/{task}/comm").read().strip()
        seen.setdefault(name, []).append(os.sched_getscheduler(int(task)))
    return seen


lone = initialize(torch.nn.Linear(8, 8), t, 1, torch.device("cpu"))[0]
found = policies()
collected = []
for group in (None, lone.data_parallel_group):
    value = torch.tensor([3.0, -1.5])
    torch.distributed.all_reduce(value, group=group)
    gathered = [None]
    torch.distributed.all_gather_object(gathered, {"rank": 0, "x": 7}, group=group)
    torch.distributed.barrier(group=group)
    collected.append([value.tolist(), gathered])
threads = {"loop": sorted(set(found.get("gloo_tcp_loop", []))),
           "others": sorted({p for name, ps in found.items() if name != "gloo_tcp_loop" for p in ps}),
           "loops": len(found.get("gloo_tcp_loop", [])),
           "idle": os.SCHED_IDLE, "other": os.SCHED_OTHER, "collected": collected,
           "again": dist.idle_lone_group_threads()}

print(json.dumps({"ours": ours, "theirs": theirs, "autocast": autocast_run(True), "bare_autocast": autocast_run(False),
                  "bf16": bf16_facts, "direct": blip_run(True), "through_engine": blip_run(False),
                  "entries": entries, "threads": threads}))
'''


@pytest.fixture(scope="module")
def out():
    """Both comparisons, in one fresh process (DeepSpeed's process group stays out of the test process)."""
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=cli_env(threads=1), cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_one_rank_fast_path_steps_as_deepspeed_does(out):
    (facts, ours, norms), (their_facts, theirs, _) = out["ours"], out["theirs"]
    # one rank: stage 0, no all-reduce, DeepSpeed's clipping off (the trainer's instead); DeepSpeed's own path reduces
    assert facts == {"allreduce": False, "ds_clip": 0.0, "stage": 0, "zero_grad": "partial", "cleared": [True] * 4,
                     "throughput_timer": False}
    assert their_facts == {"allreduce": True, "ds_clip": 0.05, "cleared": [True] * 4}
    # clipping bound on every step (norms far above 0.05), and the norm handed back is the one before clipping
    assert len(norms) == 4 and all(before > 1.0 and abs(got - before) <= 1e-5 * before for before, got in norms)
    flat_ours = [v for p in ours for v in p]
    flat_theirs = [v for p in theirs for v in p]
    assert len(flat_ours) == len(flat_theirs) == 32 * 64 + 64 + 64 * 8 + 8
    assert max(abs(a - b) for a, b in zip(flat_ours, flat_theirs)) < 1e-6


def test_on_one_rank_the_groups_transport_threads_idle_and_their_collectives_still_answer(out):
    threads = out["threads"]
    # the default group and DeepSpeed's clone of it: a transport thread each, both idle, every other thread as it was
    assert threads["loops"] >= 2 and threads["loop"] == [threads["idle"]]
    assert threads["others"] == [threads["other"]]
    assert threads["collected"] == [[[3.0, -1.5], [{"rank": 0, "x": 7}]]] * 2
    assert threads["again"] == threads["loops"]  # asking again finds the same threads (idle already) and no others


def test_without_a_one_rank_gloo_group_no_thread_changes_priority():
    # this test process has no process group: nothing to idle, nothing touched
    from revprompt.launch import dist

    assert not torch.distributed.is_initialized()
    assert dist.idle_lone_group_threads() == 0


def test_a_wrapped_optimizer_keeps_deepspeeds_own_zero_grad(out):
    assert out["bf16"]["optimizer"] != "AdamW" and out["bf16"]["zero_grad"] == "method"


def test_on_one_rank_at_zero_0_the_forward_through_the_module_trains_as_the_engines_forward_does(out):
    (facts, losses, weights, steps), (_, engine_losses, engine_weights, engine_steps) = \
        out["direct"], out["through_engine"]
    assert facts == {"entry": "module", "two_ranks": "engine"}
    assert losses == engine_losses and len(set(losses)) == 4  # four batches, the weights moving between them
    # bit for bit, with two micro-batches accumulated per step: the loss scaled once, as through the engine's forward
    assert weights == engine_weights
    assert steps == engine_steps == [2, 4]  # the engine counted 2 optimizer steps of 4 micro-batches (checkpoints)
    # bf16 weights (DeepSpeed's own optimizer), autocast and a JSON's timers keep the engine's forward; the ZeRO-2
    # config of the comparison above runs on one rank as stage 0 in fp32: the module
    assert out["entries"] == {"bf16": "engine", "autocast": "engine", "timers": "engine", "fp32": "module"}


def test_bf16_autocast_steps_as_a_bare_torch_autocast_loop_does(out):
    (facts, loss_dtype, fp32, ours), (_, bare_dtype, _, bare) = out["autocast"], out["bare_autocast"]
    # DeepSpeed runs torch_autocast, not its bf16 optimizer; the weights stay fp32 and the trainer clips
    assert facts == {"autocast": True, "bf16": False, "ds_clip": 0.0} and all(fp32)
    assert loss_dtype == bare_dtype == "torch.bfloat16"  # both forwards ran under bf16 autocast
    flat_ours, flat_bare = [v for p in ours for v in p], [v for p in bare for v in p]
    assert max(abs(a - b) for a, b in zip(flat_ours, flat_bare)) < 1e-6


COMPILE_SCRIPT = r'''
import contextlib, json, os
os.environ["DS_ACCELERATOR"] = "cpu"
import numpy as np
import torch
from PIL import Image
from revprompt.launch import dist
from revprompt.launch.config import load_config
from revprompt.models.captioner import TrainingInputs, build_captioner
from revprompt.training.engine import clip_gradients, forward_entry, initialize

dist.ensure_group(dist.DistInfo(0, 1, 0, torch.device("cpu")))
t = load_config("tiny", ["--train.captioner=random-tiny", "--train.precision=fp32", "--train.micro_batch_size=4"]).train
prompts = [["Nike Men Red T-shirt", "Puma Women Black Running Shoes With A Long Name", "Titan Watch", "Jeans"],
           ["Peter England Men Party Blue Jeans", "Socks", "Fossil Women Brown Leather Strap Watch", "Red Cap"],
           ["Bag", "Adidas Unisex White Cap", "Turtle Check Men Navy Blue Shirt With Pocket", "Lotto Sports Shoes"]]
rng = np.random.default_rng(0)
images = [[Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(4)] for _ in prompts]


def run(compiled):
    torch.manual_seed(0)
    model, processor = build_captioner("random-tiny", 0)
    model.eval()  # no dropout: eager and compiled draw their random masks differently
    inputs = TrainingInputs(model, processor, t.max_length, static=True)
    engine, _, _ = initialize(model, t, 1, torch.device("cpu"))
    if compiled:  # what Trainer does with train.compile on CUDA; aot_eager: inductor's code generation for the whole
        # BLIP forward and backward takes 70 s on 2 cores (the UNet test covers inductor's numbers); graph capture,
        # AOT autograd and the recompile guard are the same
        engine.compile(backend="aot_eager")
        assert forward_entry(engine, 1) is engine  # a compiled engine keeps its own forward
    params = [p for p in model.parameters() if p.requires_grad]
    losses, shapes = [], []
    for i, (pics, texts) in enumerate(zip(images, prompts)):
        batch = inputs(pics, texts)
        shapes.append(list(batch["input_ids"].shape))
        # after the first step a recompile raises: prompts of other lengths give the same padded shape
        guard = torch._dynamo.config.patch(error_on_recompile=True) if compiled and i else contextlib.nullcontext()
        with guard:
            loss = engine(**batch).loss
            engine.backward(loss)
        clip_gradients(params, t.grad_clip, want_norm=False)
        engine.step()
        losses.append(loss.item())
    return losses, shapes


print(json.dumps({"eager": run(False), "compiled": run(True)}))
'''


def test_compiled_engine_trains_as_eager_does_and_compiles_once():
    proc = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=cli_env(threads=2), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    (eager, shapes), (compiled, compiled_shapes) = out["eager"], out["compiled"]
    assert shapes == compiled_shapes == [[4, 40]] * 3  # train.max_length: one shape whatever the prompts' lengths
    assert len(compiled) == 3 and all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(compiled, eager))
    assert eager[2] != eager[0]  # three different batches, the weights moving between them


finite32 = st.floats(-1e6, 1e6, allow_nan=False, width=32)
from revprompt.training.loop import LossWindow  # noqa: E402  (the strategy below reads its FOLD)


@settings(max_examples=500, deadline=None)
@given(steps=st.lists(st.tuples(finite32, finite32, st.one_of(st.none(), finite32)), min_size=0, max_size=40),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), head=st.booleans(),
       fold=st.sampled_from([1, 2, 3, 7, LossWindow.FOLD]))
def test_a_windows_loss_sums_equal_the_per_step_numbers_summed(steps, dtype, head, fold):
    from revprompt.training.loop import Losses

    window, want = LossWindow(), [0.0, 0.0, 0.0]
    window.FOLD = fold  # folded into the sums every `fold` micro-batches: the same numbers, in the same order
    for total, lm, embedding in steps:
        embedding = embedding if head else None  # a run has a head on every step or on none
        # the model's losses in its dtype (bf16 weights give bf16 losses); the head's in fp32
        weight = torch.tensor(total, dtype=dtype, requires_grad=True)  # backward runs on `total`: it has a graph
        losses = Losses(weight * 1.0, torch.tensor(lm, dtype=dtype),
                        None if embedding is None else torch.tensor(embedding))
        parts = losses.parts()
        assert parts.dtype == torch.float64 and not parts.requires_grad and parts.shape == (3,)
        window.add(losses)
        assert len(window.steps) < fold  # at most FOLD losses kept on the device
        assert all(not kept.total.requires_grad for kept in window.steps)  # the window keeps no graph alive
        # what the loop used to add step by step: each loss as a Python float, 0 for a missing head
        numbers = (float(weight.detach()), float(torch.tensor(lm, dtype=dtype)),
                   0.0 if embedding is None else embedding)
        assert losses.values() == numbers
        for i, value in enumerate(numbers):
            want[i] += value
    assert window.sums() == tuple(want)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeeds_synchronizing_throughput_timer_is_off_unless_a_users_json_sets_it(stage, tmp_path):
    from revprompt.launch.config import load_config
    from revprompt.training.engine import load_ds_config

    shipped = load_ds_config(load_config("tiny", [f"--train.zero_stage={stage}"]).train, 2, torch.device("cpu"))
    assert shipped["timers"] == {"throughput": {"enabled": False}}
    own = {"zero_optimization": {"stage": stage}, "timers": {"throughput": {"enabled": True, "synchronized": False}}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(own))
    train = load_config("tiny", [f"--train.zero_stage={stage}", f"--train.deepspeed_config={path}"]).train
    assert load_ds_config(train, 2, torch.device("cpu"))["timers"] == own["timers"]
    del own["timers"]
    path.write_text(json.dumps(own))
    assert load_ds_config(train, 2, torch.device("cpu"))["timers"] == {"throughput": {"enabled": False}}


def test_op_build_lock_is_the_file_torchs_extension_build_takes(tmp_path, monkeypatch):
    from torch.utils.cpp_extension import _get_build_directory

    from revprompt.training.engine import op_build_lock

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setattr("torch.utils.cpp_extension.get_default_build_root", lambda: str(tmp_path / "default"))
    name = "deepspeed_shm_comm"
    assert op_build_lock() == Path(_get_build_directory(name, False)) / "lock"  # (torch's makes the folder)
    assert op_build_lock().parent.parent.parent == tmp_path / "default"  # under a per-python, per-accelerator folder
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "mine"))
    assert op_build_lock("other") == Path(_get_build_directory("other", False)) / "lock"
    assert op_build_lock("other") == tmp_path / "mine" / "other" / "lock"


def test_a_lock_that_goes_is_waited_for_and_one_older_than_any_build_is_named_and_kept(tmp_path):
    import os
    import threading
    import time

    from revprompt.training.engine import OpBuildLockError, wait_for_lock

    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    assert wait_for_lock(lock, max_age_s=0.0) < 0.1  # no lock: no wait
    lock.parent.mkdir()
    lock.write_bytes(b"")
    threading.Timer(0.4, lock.unlink).start()  # another build finishing
    waited = wait_for_lock(lock, max_age_s=30.0, poll_s=0.05)
    assert 0.35 <= waited < 5.0 and not lock.exists()
    lock.write_bytes(b"")  # a build that stays: waited for until the lock is older than the bound
    start = time.monotonic()
    with pytest.raises(OpBuildLockError, match="more than 1 s"):
        wait_for_lock(lock, max_age_s=1.0, poll_s=0.05)
    assert 0.9 <= time.monotonic() - start < 5.0
    os.utime(lock, (time.time() - 3600, time.time() - 3600))  # left by a build killed an hour ago: at once
    start = time.monotonic()
    with pytest.raises(OpBuildLockError) as raised:
        wait_for_lock(lock, max_age_s=900.0)
    assert time.monotonic() - start < 1.0
    assert re.search(rf"^{re.escape(str(lock))} is 36\d\d s old \(more than 900 s\)", str(raised.value))
    assert "remove it and start again" in str(raised.value)
    assert lock.exists()  # not ours to remove


def test_torchs_own_wait_is_bounded_only_inside_the_block(tmp_path):
    from torch.utils.file_baton import FileBaton

    from revprompt.training.engine import OpBuildLockError, bounded_extension_builds

    unbounded = FileBaton.wait
    lock = tmp_path / "lock"
    lock.write_bytes(b"")
    baton = FileBaton(str(lock))
    assert not baton.try_acquire()  # taken: torch would now call wait()
    with pytest.raises(OpBuildLockError), bounded_extension_builds(max_age_s=0.2):
        baton.wait()
    assert FileBaton.wait is unbounded and lock.exists()


def test_the_real_op_build_stops_on_a_stale_lock_in_one_line(tmp_path):
    """`make`'s build, through DeepSpeed's builder and torch's load: without the bound, torch would wait on this lock
    for ever (its FileBaton.wait has none)."""
    import os
    import time

    env = cli_env()
    env.update(TORCH_EXTENSIONS_DIR=str(tmp_path), DS_ACCELERATOR="cpu")
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.write_bytes(b"")
    os.utime(lock, (time.time() - 7200, time.time() - 7200))
    proc = subprocess.run([sys.executable, "-m", "revprompt.training.engine"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    pattern = rf"DeepSpeed's CPU op build: {re.escape(str(lock))} is 72\d\d s old \(more than 900 s\)"
    assert re.search(pattern, proc.stderr), proc.stderr
    assert lock.exists() and sorted(p.name for p in lock.parent.iterdir()) == ["lock"]  # nothing built, nothing removed


TWO_RANKS = r'''
import json, os, sys
import torch
import torch.distributed as dist_
from revprompt.launch import dist
dist_.init_process_group("gloo")
dist_.new_group(ranks=[0, 1])  # as DeepSpeed clones the world group
idled = dist.idle_lone_group_threads()
loops = [os.sched_getscheduler(int(task)) for task in os.listdir("/proc/self/task")
         if open(f"/proc/self/task/{task}/comm").read().strip() == "gloo_tcp_loop"]
value = torch.tensor([float(dist_.get_rank() + 1)])
dist_.all_reduce(value)
with open(os.path.join(sys.argv[1], f"rank-{dist_.get_rank()}.json"), "w") as f:  # the ranks share one stdout
    json.dump({"idled": idled, "loops": loops, "other": os.SCHED_OTHER, "sum": value.item()}, f)
dist_.destroy_process_group()
'''


def test_with_two_ranks_the_transport_threads_keep_their_priority(tmp_path):
    # there the transport threads carry the collectives: nothing is idled
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tmp_path)], env=cli_env(threads=1), cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    assert len(ranks) == 2
    for rank in ranks:
        assert rank["idled"] == 0 and rank["sum"] == 3.0
        assert len(rank["loops"]) >= 2 and set(rank["loops"]) == {rank["other"]}
