"""How a revprompt process runs on the interpreter: its start and end as Python's cycle collector sees them, and the
frame stack its stage runs on.

A stage's start-up imports torch and the libraries around it: about 350,000 objects the collector tracks by the
time the stage's work begins (torch alone 250,000), and the stage's own imports and models add more (diffusers'
pipeline another 400,000). The collector walks every tracked object each time the heap has grown by a quarter, and
once more while the interpreter shuts down, and finds next to nothing: about 100 objects in the full collections of
the tiny generate job, where they took 0.7 s (7 of them) and shutdown 1.1 s of a 9.4 s process.

- `hold_collection()`: the console script's first step. No cycle collection during start-up (imports, config,
  process group, logs).
- `resume_collection()`: `run_stage`, when the stage's own work starts. Everything start-up built (torch,
  accelerate, transformers' utilities, TensorBoard, the config) goes into the permanent generation (`gc.freeze`:
  never walked again; forked DataLoader workers then share those pages instead of copying them when the collector
  would touch them), and collection resumes for everything after. The stage's own imports and models are collected
  as before (the generate job's build still runs 5 full collections, 0.3 s): nothing is frozen after a model is
  built, because evaluate and drift load and drop models, and a frozen one would never be freed. A cycle that
  start-up itself dropped stays until exit (about 100 objects). A process that did not hold collection (the CLI
  called in-process, as the tests do) is left as it was.
- `skip_collection_at_exit()`: the console script, once the stage has returned its exit code: the whole heap into the
  permanent generation, so shutdown does not walk it. Frozen objects are never collected, so only right before exit;
  every file revprompt writes is closed by then (shard writers, logs, TensorBoard).
- `with_frame_room(fn, ...)`: the console script calls the CLI through it, and `run_stage` the stage's work (see
  there): CPython from 3.11 (until the fix in later 3.13 and 3.14 releases) maps and unmaps a piece of its frame
  stack on every call that lands on a chunk boundary.
"""

from __future__ import annotations

import gc
import sys
import types
from typing import Any, Callable, TypeVar

T = TypeVar("T")

_held = False


def hold_collection() -> None:
    """Pause cycle collection until `resume_collection` (start-up only)."""
    global _held
    if gc.isenabled():
        gc.disable()
        _held = True


def resume_collection() -> bool:
    """Freeze what start-up built and collect again; True when collection was held (else nothing changes)."""
    global _held
    if not _held:
        return False
    gc.freeze()
    gc.enable()
    _held = False
    return True


def skip_collection_at_exit() -> None:
    """Leave every object to the process's exit: shutdown does not walk the heap."""
    gc.freeze()


# unused slots of the entry frame (8 bytes each). CPython gives a frame that does not fit in the current chunk a
# new one: the smallest power of two from 16 KiB that holds the frame and 1,000 slots more, here 256 KiB (32,765
# slots after its header). The entry frame takes just over half of it, so about 16,300 slots stay free for `fn`'s
# calls, and an entry frame called inside them (a stage under the CLI's own) never fits in what is left: it always
# starts a chunk of its own
FRAME_ROOM_SLOTS = 16_400


def _call(fn, args, kwargs):
    return fn(*args, **kwargs)


def frame_room_applies() -> bool:
    """True on CPython 3.11 and later: frames live in chunks of the thread's data stack (earlier versions and other
    interpreters allocate frames otherwise, and `with_frame_room` calls `fn` directly)."""
    return sys.implementation.name == "cpython" and sys.version_info >= (3, 11)


# `_call` with FRAME_ROOM_SLOTS more slots of evaluation stack in its frame (never used, so never written: the chunk's
# pages behind them are not touched); None where the room does not apply
_ENTRY: Callable[..., Any] | None = None
if frame_room_applies():
    _ENTRY = types.FunctionType(_call.__code__.replace(co_stacksize=_call.__code__.co_stacksize + FRAME_ROOM_SLOTS,
                                                       co_name="call_with_frame_room",
                                                       co_qualname="call_with_frame_room"),
                                _call.__globals__, "call_with_frame_room")


def with_frame_room(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)`, its whole call tree inside one fresh chunk of the interpreter's frame stack.

    CPython (3.11 on) keeps the frames of Python calls in chunks of 16 KiB and returns a chunk to the kernel as soon
    as the call that opened it returns (python/cpython#142183; fixed in later 3.13 and 3.14 releases by keeping one
    chunk). A loop whose calls land on a chunk's start maps and unmaps 16 KiB, and faults its pages in again, on
    every call: building the tiny preset's text-to-image pipeline (thousands of nested module and parameter set-ups)
    did so 8,600 to 37,000 times, depending only on how many frames deep its caller was, and took 1.85 s at the
    best depth and 2.10 s at the worst; the generate job sat at a bad one (28,000 in its whole process). Called
    through an entry frame too large for the current chunk, `fn` starts a chunk of 256 KiB and its call tree has
    about 16,300 slots (128 KiB) of room in it: the generate job then maps 6 such chunks in its whole process.
    A call costs a few page faults; one call per process and one per stage. A generator or coroutine function gets
    the room only while it is created, not while it runs.
    """
    if _ENTRY is None:
        return fn(*args, **kwargs)
    return _ENTRY(fn, args, kwargs)
