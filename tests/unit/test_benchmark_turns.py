"""The benchmarks' turn-taking runner (benchmarks/_common.run_interleaved): one side runs at a time, each side's
time is its own turns, every child ends within its limit, and a child's workers stop and go on with it."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from _common import close_exit_handle, exit_handle, run_interleaved, wait_for_exit  # noqa: E402

# a child that does pieces of 10 ms of CPU work and records the time after each, with a worker process doing the same
# (CPU time does not pass while a process is stopped, wall time does)
BUSY = """
import json, multiprocessing as mp, sys, time
def spin(pieces, out):
    stamps = []
    for _ in range(pieces):
        t = time.thread_time()
        while time.thread_time() - t < 0.01:
            pass
        stamps.append(time.time())
    out.put(stamps)
if __name__ == "__main__":
    q = mp.get_context("fork").Queue()
    worker = mp.get_context("fork").Process(target=spin, args=(int(sys.argv[1]), q))
    worker.start()
    spin(int(sys.argv[1]), q)
    stamps = q.get() + q.get()
    worker.join()
    print(json.dumps(stamps))
    sys.exit(int(sys.argv[2]))
"""


def test_sides_take_turns_and_are_timed_by_their_own_turns():
    import json

    cmds = [[sys.executable, "-c", BUSY, "60", str(code)] for code in (0, 3, 0)]
    results, group = run_interleaved(cmds, {}, 0.15, 60, 0)
    assert [proc.returncode for proc, _ in results] == [0, 3, 0]
    spans = []
    for proc, timing in results:
        stamps = json.loads(proc.stdout)
        turns = timing["turns"]
        assert len(stamps) == 120 and len(turns) >= 3
        assert timing["wall_s"] == pytest.approx(sum(b - a for a, b in turns))
        assert timing["cpu_s"] >= 1.2  # its worker's CPU time counts too
        # every piece of its work, its worker's included, ended inside one of its own turns
        assert all(any(a - 0.002 <= t <= b + 0.01 for a, b in turns) for t in stamps)
        spans += turns
    spans.sort()
    for (a0, b0), (a1, b1) in zip(spans, spans[1:]):
        assert a1 >= b0 - 0.001  # never two sides at once
    assert group["wall_s"] >= sum(b - a for a, b in spans) - 0.05


def test_a_turn_ends_when_its_side_exits_or_its_time_is_up():
    import os
    import subprocess

    start = time.monotonic()
    wait_for_exit(None, 30.0)  # without a pidfd: one nap of 5 ms, then the caller checks again
    assert 0.004 <= time.monotonic() - start < 0.1
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    fd = exit_handle(child.pid)
    if fd is None:  # no pidfd here (before Linux 5.3, or refused by a sandbox): the naps above are the whole wait
        child.kill()
        child.wait()
        pytest.skip("os.pidfd_open is not available here")
    try:
        start = time.monotonic()
        wait_for_exit(fd, 0.0)
        assert time.monotonic() - start < 0.01
        wait_for_exit(fd, 0.1)  # the side still runs: the turn's time is up first
        assert 0.09 <= time.monotonic() - start < 0.3
        assert os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is None
        wait_for_exit(fd, 30.0)  # the side exits long before the turn would end
        assert time.monotonic() - start < 5.0
        assert os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None
    finally:
        close_exit_handle(fd)
        child.kill()
        child.wait()


def test_no_file_descriptor_outlives_a_run():
    import os

    before = sorted(os.listdir("/proc/self/fd"))
    for _ in range(3):
        run_interleaved([[sys.executable, "-c", "pass"], [sys.executable, "-c", BUSY, "20", "0"]], {}, 0.05, 30, 0)
    assert sorted(os.listdir("/proc/self/fd")) == before


def test_a_side_past_its_time_limit_is_killed_with_its_workers():
    start = time.monotonic()
    results, _ = run_interleaved([[sys.executable, "-c", BUSY, "100000", "0"], [sys.executable, "-c", "pass"]], {},
                                 0.2, 1.0, 0)
    assert time.monotonic() - start < 20
    (slow, timing), (quick, _) = results
    assert slow.returncode == -9 and 1.0 <= timing["wall_s"] < 2.0
    assert quick.returncode == 0


HARNESS = """
import sys
sys.path.insert(0, sys.argv[1])
from _common import run_interleaved
cmds = [[sys.executable, "-c", "import time\\nwhile True: pass"] for _ in range(3)]
run_interleaved(cmds, {}, 0.2, 600, 0)
"""


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_a_killed_benchmark_leaves_no_side_behind(how):
    import signal
    import subprocess

    import psutil

    bench = str(Path(__file__).resolve().parents[2] / "benchmarks")
    harness = subprocess.Popen([sys.executable, "-c", HARNESS, bench])
    try:
        deadline = time.monotonic() + 30
        while len(psutil.Process(harness.pid).children()) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        sides = psutil.Process(harness.pid).children()
        assert len(sides) == 3  # every side started; two of them are stopped at any moment
        assert sum(side.status() == psutil.STATUS_STOPPED for side in sides) >= 2
        harness.send_signal(getattr(signal, how))
        harness.wait(timeout=30)
        gone, alive = psutil.wait_procs(sides, timeout=10)
        assert not alive, [(p.pid, p.status()) for p in alive]
    finally:
        harness.kill()
        harness.wait()


def test_the_training_benchmark_replaces_only_the_copies_it_made(tmp_path: Path):
    from train_overhead import OWN_MARKER, fresh_copy

    from revprompt.launch.layout import RUN_MARKER

    generated = tmp_path / "generated"
    for name in ("prompts", "shards"):
        (generated / name).mkdir(parents=True)
        (generated / name / "a.txt").write_text(name)
    (generated / "config.toml").write_text("[run]\n")
    (generated / RUN_MARKER).write_text("")
    workdir = tmp_path / "work"
    fresh_copy(generated, workdir / "warm-up")
    (workdir / "warm-up" / "checkpoints").mkdir()  # what the run it was made for wrote
    fresh_copy(generated, workdir / "warm-up")  # a rerun with the same --workdir: replaced
    assert sorted(p.name for p in (workdir / "warm-up").iterdir()) == sorted(
        [OWN_MARKER, RUN_MARKER, "config.toml", "prompts", "shards"])
    mine = workdir / "train-0-0-2-0"  # a user's own folder under that name
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(SystemExit, match="is not a copy this benchmark made"):
        fresh_copy(generated, mine)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep"


# a child that touches 64 MiB from malloc and prints the KiB of its memory the kernel backs with huge pages
HUGE = """
import re
buffer = bytearray(64 << 20)
for i in range(0, len(buffer), 4096):
    buffer[i] = 1
print(sum(int(k) for k in re.findall(r"AnonHugePages:\\s+(\\d+) kB", open("/proc/self/smaps").read())))
"""


def _glibc_takes_the_tunable() -> bool:
    """glibc 2.35 or later (GLIBC_TUNABLES glibc.malloc.hugetlb), on a kernel whose THP mode is not "never"."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except (ValueError, OSError, AttributeError):
        return False
    return name == "glibc" and tuple(int(x) for x in version.split(".")[:2]) >= (2, 35) and "[never]" not in mode


def test_huge_pages_reach_every_sides_malloc_and_keep_the_users_tunables(monkeypatch):
    import subprocess

    from _common import HUGE_PAGE_TUNABLE, subprocess_env

    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert "GLIBC_TUNABLES" not in subprocess_env(2)
    assert subprocess_env(2, huge_pages=True)["GLIBC_TUNABLES"] == HUGE_PAGE_TUNABLE
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    assert subprocess_env(2)["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"
    env = subprocess_env(2, huge_pages=True)
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{HUGE_PAGE_TUNABLE}"

    def huge_kib(environment: dict[str, str]) -> int:
        out = subprocess.run([sys.executable, "-c", HUGE], env=environment, capture_output=True, text=True, check=True)
        return int(out.stdout)

    if _glibc_takes_the_tunable():  # where the C library and kernel can: the pages are huge, and only with it
        assert huge_kib(env) >= 32 << 10
        assert huge_kib(subprocess_env(2)) == 0 or "[always]" in Path(
            "/sys/kernel/mm/transparent_hugepage/enabled").read_text()


def process_record(rate: float | None, window_s: float, loss: float = 2.0) -> dict:
    return {"steady_samples_per_s": rate, "window_s": window_s if rate is not None else None,
            "window_steps": round(rate * window_s / 16) if rate is not None else None,
            "window_turns": max(1, round(window_s)), "wall_s": window_s + 5.0, "cpu_s": 2 * window_s,
            "final_loss": loss}


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.tuples(st.floats(1.0, 1000.0), st.floats(0.5, 100.0)), min_size=1, max_size=8))
def test_a_sides_rate_is_its_processes_samples_over_their_own_time_together(runs):
    from train_overhead import combine

    side = combine("bare", [process_record(rate, seconds) for rate, seconds in runs])
    samples = sum(rate * seconds for rate, seconds in runs)
    seconds = sum(s for _, s in runs)
    assert side["steady_samples_per_s"] == pytest.approx(samples / seconds, rel=1e-12)
    # between its slowest and fastest process, each weighted by the time it ran
    slowest, fastest = min(r for r, _ in runs), max(r for r, _ in runs)
    assert slowest * (1 - 1e-12) <= side["steady_samples_per_s"] <= fastest * (1 + 1e-12)
    assert side["window_s"] == pytest.approx(seconds)
    assert side["process_samples_per_s"] == [r for r, _ in runs] and len(side["processes"]) == len(runs)
    assert side["wall_s"] == pytest.approx(sum(s + 5.0 for _, s in runs))


def test_a_side_with_a_process_that_has_no_window_has_no_rate():
    from train_overhead import combine

    side = combine("zero2/workers0", [process_record(300.0, 10.0), process_record(None, 10.0)])
    assert side["steady_samples_per_s"] is None and side["window_s"] is None
    assert side["process_samples_per_s"] == [300.0, None]


@settings(max_examples=2000, deadline=None)
@given(st.integers(1, 6), st.integers(1, 8))
def test_every_side_runs_its_processes_spread_over_the_cycle(sides, processes):
    from train_overhead import slots_of

    slots = slots_of(list(range(sides)), processes)
    assert len(slots) == sides * processes and len(set(slots)) == len(slots)
    # every side's k-th process takes its turn before any side's (k+1)-th, the sides in the round's order each time
    ks = [k for _, k in slots]
    assert ks == sorted(ks)
    for k in range(processes):
        assert [side for side, j in slots if j == k] == list(range(sides))
    for side in range(sides):
        assert [k for s, k in slots if s == side] == list(range(processes))


@settings(max_examples=2000, deadline=None)
@given(st.integers(1, 8), st.integers(0, 1000))
def test_over_as_many_rounds_as_sides_every_side_starts_once(sides, first_round):
    from train_overhead import rotated

    orders = [rotated(list(range(sides)), first_round + i) for i in range(sides)]
    assert all(sorted(order) == list(range(sides)) for order in orders)
    assert sorted(order[0] for order in orders) == list(range(sides))
    # the order itself is kept: a side always follows the same other side
    assert all(order[(order.index(0) + 1) % sides] == 1 % sides for order in orders)
