"""A revprompt process's start and end, as Python's cycle collector sees them.

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
"""

from __future__ import annotations

import gc

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
