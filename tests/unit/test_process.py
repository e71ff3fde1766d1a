"""launch/process: the cycle collector held during a stage's start-up, start-up frozen, the heap frozen at exit.

The collector's state belongs to the whole interpreter, so each case runs in a fresh `python -c` of its own.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT, cli_env

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def run_python(code: str) -> dict:
    """`code` in a fresh interpreter; the JSON object it prints last."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=cli_env(),
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_start_up_is_frozen_and_the_stage_collects_its_own_cycles():
    out = run_python("""
import gc, json, weakref
from revprompt.launch import process

class Node:
    pass

process.hold_collection()
held = not gc.isenabled()
import torch  # start-up: a large import under the hold
loop = Node(); loop.me = loop; start_up_cycle = weakref.ref(loop); del loop
full_during_start_up = gc.get_stats()[2]["collections"]
resumed = process.resume_collection()
frozen, enabled = gc.get_freeze_count(), gc.isenabled()
loop = Node(); loop.me = loop; stage_cycle = weakref.ref(loop); del loop
gc.collect()
print(json.dumps({"held": held, "full_during_start_up": full_during_start_up, "resumed": resumed, "frozen": frozen,
                  "enabled": enabled, "stage_cycle_collected": stage_cycle() is None,
                  "start_up_cycle_kept": start_up_cycle() is not None,
                  "resumed_again": process.resume_collection(), "frozen_after": gc.get_freeze_count()}))
""")
    assert out["held"] and out["full_during_start_up"] == 0  # torch's import walked nothing
    assert out["resumed"] and out["enabled"]
    assert out["frozen"] > 100_000  # torch's objects: never walked again
    assert out["stage_cycle_collected"]  # what the stage leaves in a cycle is collected as before
    assert out["start_up_cycle_kept"]  # the price: a cycle start-up dropped stays until exit
    assert out["resumed_again"] is False and out["frozen_after"] == out["frozen"]


def test_a_process_that_did_not_hold_collection_is_left_as_it_was():
    out = run_python("""
import gc, json
from revprompt.launch import process
print(json.dumps({"resumed": process.resume_collection(), "frozen": gc.get_freeze_count(),
                  "enabled": gc.isenabled()}))
""")
    assert out == {"resumed": False, "frozen": 0, "enabled": True}


def test_the_console_script_holds_start_up_resumes_for_the_stage_and_leaves_nothing_for_shutdown():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"revprompt": "revprompt.launch.cli:run"}  # torchrun --no-python revprompt and sbatch use it
    # a stage of this script's own ("probe") dispatched by cli.run like any other, through run_stage
    out = run_python("""
import gc, json, sys
from revprompt.launch import cli  # as the console script: the stage's module (and torch) comes later

seen = {}

def body(ctx):
    seen["model"] = [[i] for i in range(10_000)]  # what a stage builds and keeps to the end
    seen.update(enabled=gc.isenabled(), frozen=gc.get_freeze_count(),
                full_during_start_up=gc.get_stats()[2]["collections"])

def main(argv):
    from revprompt.launch import runner

    return runner.run_stage("probe", argv, runner.build_parser("probe", "a probe"), body, uses_run_dir=False)

cli.STAGES["probe"] = "__main__"
sys.argv = ["revprompt", "probe", "--config", "tiny"]
code = cli.run()
left = len(gc.get_objects())  # what shutdown's collection would walk
model = seen.pop("model")  # alive until exit, as a stage's model is
print(json.dumps({**seen, "code": code, "left_for_shutdown": left, "frozen_at_exit": gc.get_freeze_count()}))
""")
    assert out["code"] == 0
    assert out["enabled"] and out["full_during_start_up"] == 0 and out["frozen"] > 100_000
    assert out["frozen_at_exit"] > 100_000 and out["left_for_shutdown"] < 100


def test_a_stage_runs_in_a_frame_stack_chunk_of_its_own():
    # CPython 3.11 returns a 16 KiB chunk of its frame stack as soon as the call that opened it returns: calls in a loop
    # that land on a chunk's start map a fresh chunk (and fault its first page in) each time. At some depth of a scan
    # over 300 levels (about 4,000 slots, two chunks' worth) every one of 1,000 calls does; called through
    # with_frame_room, at no depth, and neither when one room is entered inside another (a stage under the CLI)
    out = run_python("""
import json, resource, sys
from revprompt.launch import process

def leaf(a=0, b=0, c=0, d=0, e=0, f=0, g=0):  # a frame no smaller than calls_at's, so some depth puts it on a boundary
    return None

def calls_at(depth, n):
    if depth:
        return calls_at(depth - 1, n)
    for _ in range(n):
        leaf()

def faults(*call):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    call[0](*call[1:])
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

CALLS, DEPTHS = 1000, range(300)
room = process.with_frame_room
room(leaf)  # the first call through it (later ones fault in a few pages of their fresh chunk: about 11)
plain = max(faults(calls_at, d, CALLS) for d in DEPTHS)
roomy = max(faults(room, calls_at, d, CALLS) for d in DEPTHS)
nested = max(faults(room, room, calls_at, d, CALLS) for d in DEPTHS)
try:
    room(lambda: 1 / 0)
    raised = None
except ZeroDivisionError as exc:
    raised = type(exc).__name__
print(json.dumps({"plain": plain, "roomy": roomy, "nested": nested, "applies": process.frame_room_applies(),
                  "value": room(lambda a, b=0: a + b, 1, b=2), "raised": raised,
                  "named": room(lambda fn=0, args=0, kwargs=0: [fn, args, kwargs], fn=1, args=2, kwargs=3),
                  "version": list(sys.version_info[:2])}))
""")
    assert out["value"] == 3 and out["raised"] == "ZeroDivisionError" and out["named"] == [1, 2, 3]
    assert out["applies"] == (out["version"] >= [3, 11])
    if [3, 11] <= out["version"] < [3, 13]:  # no release of these keeps a chunk (python/cpython#142183)
        assert out["plain"] >= 1000
    assert out["roomy"] < 100 and out["nested"] < 100
