"""Helpers the CPU benchmarks share: thread settings, idle-wait, disturbance accounting, medians.

The benchmarks run on small machines whose cores other people's processes also use. Another process
on the cores slows a torch run several-fold (its OpenMP threads wait for each other), so:

- `wait_for_quiet` waits, before a run, until the other processes are idle (or a time limit passes);
- `run_interleaved` runs the sides of a comparison by turns, one at a time, a second or so each (the
  others stopped with SIGSTOP): a small shared machine's speed drifts by +-10 % over tens of seconds,
  and sides that take turns every second see the same drift, where sides run one after the other do
  not. Each side's time is its own turns (`active_s`), so a rate over a window is the side's work over
  the time it was let run. It also reports `other_cpu_s`: the CPU-seconds the rest of the machine used
  meanwhile (/proc/stat busy time minus the children's rusage and its own);
- `CpuMonitor` samples the machine's busy time and a process tree's CPU time twice a second, so that a
  benchmark can ask how much other processes used during one window of a run (e.g. its steady part,
  whose start-up does not count);
- `measure` reruns a run whose `other_cpu_s` says it was disturbed (`is_disturbed`), and keeps the
  discarded runs for the JSON.

Import from a benchmark script (scripts run as `python benchmarks/x.py` have benchmarks/ on sys.path):
    from _common import run_interleaved, measure, ...
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
# a run during which other processes used more than this share of one core is rerun
DISTURBED_CORES = 0.05
# ... but never for less than this many CPU-seconds (a stray `ls` is not a disturbance)
DISTURBED_MIN_S = 0.5


# the generate job's last log line on where its generating thread's time went
LOOP_CLOCK = re.compile(r"generating thread: ([\d.]+) s in the model, ([\d.]+) s elsewhere \(([\d.]+)% of the loop\)")


def loop_clock(log_text: str) -> dict[str, float | None]:
    """The generate job's own split of its loop: seconds in the model call, elsewhere, and that share in %."""
    match = LOOP_CLOCK.search(log_text)
    if match is None:
        return {"loop_model_s": None, "loop_host_s": None, "loop_host_percent": None}
    return {"loop_model_s": float(match.group(1)), "loop_host_s": float(match.group(2)),
            "loop_host_percent": float(match.group(3))}


def resume_collection_as_the_cli() -> None:
    """In a bare worker, where `run_stage` resumes the cycle collector (before the stage's work): first import what a
    revprompt stage's start-up imports before that point (accelerate for the process group; huggingface_hub's and
    transformers' progress-bar switches, as `dist.setup_logging` sets them), so that the bare loop freezes the same
    libraries' objects the job does and its later full collections walk no more than the job's; then
    `process.resume_collection()`. TensorBoard, which only the job uses, is the job's own cost and stays out."""
    import accelerate  # noqa: F401  (dist.init builds accelerate's PartialState)

    from revprompt.launch import process
    from revprompt.launch.dist import quiet_library_progress_bars

    quiet_library_progress_bars()
    process.resume_collection()


# glibc's tunable (2.35 and later) that has malloc ask the kernel for transparent huge pages on the memory it takes
# (madvise MADV_HUGEPAGE), where the kernel's THP setting is "madvise"; an older glibc ignores it
HUGE_PAGE_TUNABLE = "glibc.malloc.hugetlb=1"


def subprocess_env(threads: int, huge_pages: bool = False) -> dict[str, str]:
    """The same thread settings for every side; no network. `huge_pages`: every side's malloc on transparent huge
    pages (HUGE_PAGE_TUNABLE, added to any GLIBC_TUNABLES already set)."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    if huge_pages:
        env["GLIBC_TUNABLES"] = ":".join(t for t in (env.get("GLIBC_TUNABLES", ""), HUGE_PAGE_TUNABLE) if t)
    return env


def revprompt_command() -> list[str]:
    """The installed `revprompt` console script next to this interpreter (module fallback)."""
    script = Path(sys.executable).parent / "revprompt"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "revprompt.launch.cli"]


def system_busy_s() -> float | None:
    """CPU-seconds all cores have spent busy since boot (Linux /proc/stat; None elsewhere)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def wait_for_quiet(max_wait_s: float, threshold_cores: float = 0.25) -> float:
    """Wait (at most `max_wait_s`) until other processes use under `threshold_cores`; return the wait."""
    start = time.perf_counter()
    while time.perf_counter() - start < max_wait_s:
        before = system_busy_s()
        time.sleep(1.0)
        after = system_busy_s()
        if before is None or after is None or after - before < threshold_cores:
            break
    return time.perf_counter() - start


def process_tree_cpu_s(pid: int) -> float | None:
    """CPU-seconds of a live process, its live descendants and its reaped children (psutil; None if gone)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.Error:
        return None
    total = 0.0
    for i, proc in enumerate(procs):
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system + (t.children_user + t.children_system if i == 0 else 0.0)
    return total


class CpuMonitor:
    """Samples (wall time, machine busy CPU-s, process tree CPU-s) every `interval` s in a thread.

    `pid` is a child's (the tree of a subprocess) or `os.getpid()` (this process and its workers).

    `other_cpu_s(t0, t1)` is the CPU time processes outside the child's tree used between two
    `time.time()` instants, interpolated between samples: the disturbance of that window alone.
    """

    def __init__(self, pid: int, interval: float = 0.5):
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-monitor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            busy, tree = system_busy_s(), process_tree_cpu_s(self.pid)
            if busy is not None and tree is not None:
                self.samples.append((time.time(), busy, tree))
            self._stop.wait(self.interval)

    def stop(self) -> None:
        """Stop sampling."""
        self._stop.set()
        self._thread.join()

    def _at(self, t: float) -> tuple[float, float] | None:
        s = self.samples
        if len(s) < 2 or t < s[0][0] - self.interval or t > s[-1][0] + self.interval:
            return None
        for (ta, ba, ca), (tb, bb, cb) in zip(s, s[1:]):
            if ta <= t <= tb:
                f = (t - ta) / (tb - ta) if tb > ta else 0.0
                return ba + f * (bb - ba), ca + f * (cb - ca)
        return (s[0][1], s[0][2]) if t < s[0][0] else (s[-1][1], s[-1][2])

    def other_cpu_s(self, t0: float, t1: float) -> float | None:
        """CPU-seconds used outside the child's process tree between `t0` and `t1` (time.time())."""
        a, b = self._at(t0), self._at(t1)
        if a is None or b is None:
            return None
        return max(0.0, (b[0] - a[0]) - (b[1] - a[1]))

    def tree_cpu_s(self, t0: float, t1: float) -> float | None:
        """CPU-seconds the child's process tree used between `t0` and `t1` (time.time())."""
        a, b = self._at(t0), self._at(t1)
        return None if a is None or b is None else b[1] - a[1]


def stop_tree(pid: int, grace_s: float = 10.0) -> None:
    """Terminate a child this benchmark started and its descendants (by pid), then kill what is left."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = root.children(recursive=True) + [root]
    except psutil.Error:
        return
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()


class ChildTimeout(RuntimeError):
    """A child process ran past its time limit and was stopped (with its descendants)."""


def run_bounded(cmd: list[str], env: dict[str, str], timeout_s: float, what: str, stdout=None,
                stderr_path: Path | None = None) -> None:
    """Run `cmd` to completion within `timeout_s`; on timeout stop its whole process tree (DataLoader and compile
    workers included) and raise ChildTimeout naming `what`; on failure raise RuntimeError with its stderr's tail.

    stdout goes to `stdout` (None: this process's, so the child's progress shows live); stderr to `stderr_path`
    (None: captured), whose tail is quoted on failure."""
    errors = open(stderr_path, "w", encoding="utf-8") if stderr_path is not None else subprocess.PIPE
    try:
        with subprocess.Popen(cmd, env=env, stdout=stdout, stderr=errors, text=True) as popen:
            try:
                _, captured = popen.communicate(timeout=max(timeout_s, 1.0))
            except subprocess.TimeoutExpired:
                stop_tree(popen.pid, grace_s=5.0)
                popen.communicate()
                raise ChildTimeout(f"{what}: stopped after {timeout_s:.0f} s, its time limit (see --budget-s); "
                                   f"command: {' '.join(cmd)}") from None
    finally:
        if stderr_path is not None:
            errors.close()
    if popen.returncode != 0:
        tail = stderr_path.read_text(encoding="utf-8", errors="replace") if stderr_path is not None else captured
        raise RuntimeError(f"{what} failed (exit {popen.returncode}): {' '.join(cmd)}\n{(tail or '')[-4000:]}")


def active_s(turns: list[tuple[float, float]], t0: float, t1: float) -> float:
    """Seconds of `turns` ((start, end) pairs, time.time()) that fall between `t0` and `t1`."""
    return sum(max(0.0, min(b, t1) - max(a, t0)) for a, b in turns)


def _signal_group(pid: int, sig: int) -> None:
    """`sig` to the process group a child leads (start_new_session): the child and its workers."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _die_with_parent() -> None:
    """In a child before exec (Linux): SIGKILL when the benchmark dies, even by SIGKILL, rather than stay stopped."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def _stopping_signals_raise():
    """SIGTERM and SIGHUP raise KeyboardInterrupt in the main thread, so that `run_interleaved` kills and continues
    the sides it stopped before this process goes (a stopped process in its own session would never go on)."""
    def interrupt(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def exit_handle(pid: int) -> int | None:
    """A file descriptor that becomes readable when the child `pid` exits (a pidfd, Linux 5.3+), or None where there
    is none; see `wait_for_exit`."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def close_exit_handle(handle: int | None) -> None:
    """Close what `exit_handle` opened."""
    if handle is not None:
        os.close(handle)


def wait_for_exit(handle: int | None, timeout_s: float) -> None:
    """Sleep until the child behind `handle` exits or `timeout_s` pass, whichever is first. With a pidfd the benchmark
    does not wake while a side runs on the cores it measures; without one (None) it naps 5 ms at a time."""
    if timeout_s <= 0:
        return
    if handle is None:
        time.sleep(min(0.005, timeout_s))
        return
    waiter = select.poll()  # not select.select: that refuses descriptors from 1024 up
    waiter.register(handle, select.POLLIN)
    waiter.poll(max(1, int(timeout_s * 1000)))


def run_interleaved(cmds: list[list[str]], env: dict[str, str], slice_s: float, timeout_s: float,
                    quiet_wait_s: float) -> tuple[list[tuple[subprocess.CompletedProcess, dict[str, Any]]],
                                                  dict[str, Any]]:
    """Run `cmds` by turns, one process at a time, each for `slice_s` seconds per turn, until all have exited.

    Each command starts at its first turn, in its own process group; at the end of a turn its whole group
    (DataLoader workers included) is stopped with SIGSTOP and continued with SIGCONT at its next turn. The
    machine's speed drifts on a shared host, over tens of seconds and within one; sides that take turns every
    `slice_s` seconds see the same drift (the shorter the turns, the closer: see the benchmarks' --slice-s).
    During a turn this process sleeps until the side exits or the turn ends (`wait_for_exit`). Returns, per
    command, its CompletedProcess and a timing dict: `turns` (the (start, end) time.time() pairs it was let run),
    `wall_s` (their sum: the process's time from spawn to exit
    with the other sides' turns taken out), `cpu_s` (its rusage, reaped workers included); and for the group
    `wall_s`, `cpu_s` and `other_cpu_s` (the machine's busy time minus the children's and this process's own).
    A command whose turns add up to `timeout_s` is killed with its group and gets returncode -9.
    """
    waited = wait_for_quiet(quiet_wait_s) if quiet_wait_s > 0 else 0.0
    self0, busy0, start = resource.getrusage(resource.RUSAGE_SELF), system_busy_s(), time.perf_counter()
    slots = [{"cmd": cmd, "proc": None, "turns": [], "rc": None, "cpu_s": 0.0,
              "out": tempfile.TemporaryFile("w+", encoding="utf-8"),
              "err": tempfile.TemporaryFile("w+", encoding="utf-8")} for cmd in cmds]

    def reap(slot: dict, block: bool) -> bool:
        pid = slot["proc"].pid
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | (0 if block else os.WNOHANG)) is None:
            return False
        # a worker the child left behind; killed while the exited child is not yet reaped, so that its id cannot
        # have passed to another process group
        _signal_group(pid, signal.SIGKILL)
        _, status, usage = os.wait4(pid, 0)
        close_exit_handle(slot.pop("exited", None))
        slot["rc"] = os.waitstatus_to_exitcode(status)
        slot["proc"].returncode = slot["rc"]  # reaped here: Popen must not wait for it again
        slot["cpu_s"] = usage.ru_utime + usage.ru_stime
        return True

    with _stopping_signals_raise():  # a kill of the benchmark leaves no side stopped for ever
        try:
            while any(slot["rc"] is None for slot in slots):
                for slot in slots:
                    if slot["rc"] is not None:
                        continue
                    began = time.time()
                    if slot["proc"] is None:
                        slot["proc"] = subprocess.Popen(slot["cmd"], env=env, stdout=slot["out"], stderr=slot["err"],
                                                        text=True, start_new_session=True, preexec_fn=_die_with_parent)
                        slot["exited"] = exit_handle(slot["proc"].pid)
                    else:
                        _signal_group(slot["proc"].pid, signal.SIGCONT)
                    finished = reap(slot, block=False)
                    while not finished and time.time() - began < slice_s:
                        wait_for_exit(slot["exited"], slice_s - (time.time() - began))
                        finished = reap(slot, block=False)
                    if not finished:
                        _signal_group(slot["proc"].pid, signal.SIGSTOP)
                    slot["turns"].append((began, time.time()))
                    if not finished and sum(b - a for a, b in slot["turns"]) > timeout_s:
                        _signal_group(slot["proc"].pid, signal.SIGKILL)
                        reap(slot, block=True)
                        slot["rc"] = slot["proc"].returncode = -9
        finally:
            try:
                for slot in slots:
                    if slot["proc"] is not None and slot["rc"] is None:
                        _signal_group(slot["proc"].pid, signal.SIGKILL)
                        _signal_group(slot["proc"].pid, signal.SIGCONT)
                        with contextlib.suppress(ChildProcessError):
                            reap(slot, block=True)
            finally:
                for slot in slots:
                    close_exit_handle(slot.pop("exited", None))
    wall = time.perf_counter() - start
    self1, busy1 = resource.getrusage(resource.RUSAGE_SELF), system_busy_s()
    own = (self1.ru_utime - self0.ru_utime) + (self1.ru_stime - self0.ru_stime)
    children = sum(slot["cpu_s"] for slot in slots)
    other = busy1 - busy0 - children - own if busy0 is not None and busy1 is not None else None
    results = []
    for slot in slots:
        texts = []
        for name in ("out", "err"):
            slot[name].seek(0)
            texts.append(slot[name].read())
            slot[name].close()
        results.append((subprocess.CompletedProcess(slot["cmd"], slot["rc"], *texts),
                        {"wall_s": sum(b - a for a, b in slot["turns"]), "cpu_s": slot["cpu_s"],
                         "turns": slot["turns"]}))
    group = {"wall_s": wall, "cpu_s": children, "other_cpu_s": max(other, 0.0) if other is not None else None,
             "quiet_wait_s": waited, "slice_s": slice_s}
    return results, group


def is_disturbed(run: dict[str, Any], key: str = "other_cpu_s", seconds_key: str = "wall_s") -> bool:
    """True when other processes took more than DISTURBED_CORES of a core (at least DISTURBED_MIN_S CPU-s)
    during the run (or the window that `key` / `seconds_key` describe)."""
    other, seconds = run.get(key), run.get(seconds_key)
    if other is None or seconds is None:
        return False
    return other > max(DISTURBED_MIN_S, DISTURBED_CORES * seconds)


def measure(label: str, retries: int, discarded: list[dict[str, Any]], attempt: Callable[[int], dict[str, Any]],
            describe: Callable[[dict[str, Any]], str], disturbed: Callable[[dict[str, Any]], bool] = is_disturbed,
            side: str | None = None) -> dict[str, Any]:
    """`attempt(n)` until a run is undisturbed or `retries` reruns are spent; disturbed ones go to `discarded`."""
    for n in range(retries + 1):
        run = attempt(n)
        run["side"], run["disturbed"] = side or label.split()[-1], disturbed(run)
        print(f"{label} {describe(run)}{'  [disturbed]' if run['disturbed'] else ''}", flush=True)
        if not run["disturbed"] or n == retries:
            return run
        discarded.append(run)
    raise AssertionError("unreachable")


def median_of(runs: list[dict[str, Any]], key: str) -> float | None:
    """Median of `key` over runs that have it."""
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing."""
    return a / b if a is not None and b else None


def fmt(value: float | None, spec: str = ".2f") -> str:
    """`format(value, spec)`, or n/a."""
    return format(value, spec) if value is not None else "n/a"


def steady_rate(stamps: list[tuple[int, float]], turns: list[tuple[float, float]] | None = None) -> float | None:
    """Images/s from (images done, time) pairs, one per batch, leaving out the first batch; with `turns` (see
    `run_interleaved`; time.time() stamps), over the time the process was let run between them."""
    if len(stamps) < 2:
        return None
    (n0, t0), (n1, t1) = stamps[0], stamps[-1]
    seconds = t1 - t0 if turns is None else active_s(turns, t0, t1)
    return (n1 - n0) / seconds if seconds > 0 else None


def read_job_scalars(run_dir: Path, tag: str, stage: str = "generate") -> list[tuple[int, float, float]]:
    """(step, wall time, value) of each event of one of a stage's TensorBoard scalars (the generate job's)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb" / stage), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags().get("scalars", []):
        return []
    return [(e.step, e.wall_time, e.value) for e in acc.Scalars(tag)]


def job_batches(run_dir: Path) -> list[tuple[int, float]]:
    """(images done, wall time) of each batch: the job logs `perf/images_per_s` once a batch."""
    return [(step, wall) for step, wall, _ in read_job_scalars(run_dir, "perf/images_per_s")]


def write_results(result: dict[str, Any], out: Path) -> None:
    """Write a benchmark's JSON results and say where."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"results: {out}")
