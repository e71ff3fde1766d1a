"""Training loader samples/s per worker with shards on S3 (moto's server on 127.0.0.1) against a local path.

What is measured
    The loader of benchmarks/loader_throughput.py (`TrainStream` + `build_loader`, exactly as `revprompt
    train` builds it for one rank; BLIP-base's input: 512 px JPEGs resized to 384, micro batch 32, the
    offline BLIP tokenizer, max_length 40, a 256-sample shuffle buffer) over the same shards in two places:

    local  the shards as files under a temp dir (what `--shards.url` unset gives: run.dir/shards);
    s3     the same bytes, uploaded untimed with `revprompt.shards.storage.upload` (+ their markers) to a
           bucket of moto's S3 server (`moto_server`, a child process of this script on 127.0.0.1), read
           through fsspec/s3fs as `--shards.url=s3://...` reads them: ranged GETs of 8 MiB through
           `storage.RetryingReader`, nothing copied to local disk.

    Rounds alternate local, s3, local, s3, ... (`--repeats` each). Per measurement: a fresh loader, `--warmup`
    batches per worker excluded, then `--batches` batches per worker; steady samples/s per worker. The
    headline is the ratio s3 / local per round (same round, same worker count) and its median.

    The server runs on the same 2 cores as the loader, so its CPU time (moto parses every request in Python)
    is part of the s3 side's cost: a real object store serves from other machines, so on a cluster the s3
    side can only be closer to local than here. The server is in this script's process tree, so the
    disturbance check (other processes' CPU in the timed window) does not count it as a disturbance.

Reproduce (from the repository root; about 2 minutes on 2 idle cores):
    .venv/bin/python benchmarks/loader_s3.py
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, fmt, is_disturbed, measure, median_of, ratio, write_results  # noqa: E402
from loader_throughput import describe_run, measure_loader, parse_args as loader_args, write_shards  # noqa: E402

DEFAULT_OUT = RESULTS / "loader_s3.json"
BUCKET = "revprompt-bench"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers on both sides")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (each: local, then s3)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    args, rest = parser.parse_known_args(argv)
    args.loader = loader_args(rest + ["--workers", str(args.workers)])
    return args


def start_server() -> tuple[subprocess.Popen, str]:
    """moto's S3 server as a child process on a free local port; returns it and its endpoint."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return server, endpoint
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise RuntimeError(f"moto_server did not listen on {endpoint} within 60 s")


def upload(shards: list[tuple[str, int]], url: str) -> list[tuple[str, int]]:
    """The local shards and their markers copied under `url` (untimed); their (url, count) list."""
    from revprompt.shards import storage
    from revprompt.shards.writer import stats_path

    out = []
    for path, count in shards:
        target = storage.join(url, "train", Path(path).name)
        storage.upload(Path(path), target)
        storage.write_bytes(stats_path(target), Path(stats_path(Path(path))).read_bytes())
        out.append((target, count))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    la = args.loader
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(la.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from revprompt.models.captioner import offline_blip_tokenizer

    torch.set_num_threads(la.threads)
    server, endpoint = start_server()
    os.environ.update(CREDENTIALS, AWS_ENDPOINT_URL=endpoint)
    workdir = Path(tempfile.mkdtemp(prefix="revprompt-loader-s3-"))
    runs: dict[str, list[dict[str, Any]]] = {"local": [], "s3": []}
    discarded: list[dict[str, Any]] = []
    try:
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        local, data_info = write_shards(la, workdir / "shards")
        remote = upload(local, f"s3://{BUCKET}/shards")
        print(f"uploaded {len(remote)} shards to s3://{BUCKET}/shards on {endpoint} (untimed)", flush=True)
        tokenizer = offline_blip_tokenizer()
        for i in range(args.repeats):
            for side, shards in (("local", local), ("s3", remote)):
                run = measure(f"round {i + 1}/{args.repeats} {side}", la.retries, discarded,
                              lambda n: measure_loader(la, shards, args.workers, tokenizer), describe_run,
                              lambda r: is_disturbed(r, "window_other_cpu_s", "window_s"), side=side)
                runs[side].append(run)
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(workdir, ignore_errors=True)
    per_round = [ratio(s["samples_per_s_per_worker"], loc["samples_per_s_per_worker"])
                 for loc, s in zip(runs["local"], runs["s3"])]
    summary = {side: {k: median_of(rs, k) for k in ("samples_per_s_per_worker", "cpu_s_per_sample",
                                                     "to_first_batch_s")} for side, rs in runs.items()}
    result = {
        "benchmark": "loader_s3",
        "command": " ".join([Path(sys.executable).name, "benchmarks/loader_s3.py"] + sys.argv[1:]),
        "metric": "steady samples/s per DataLoader worker after the warm-up batches; ratio s3 / local per round",
        "settings": {"workers": args.workers, "repeats": args.repeats,
                     **{k: v for k, v in vars(la).items() if k not in ("out", "workdir", "workers", "repeats")}},
        "data": data_info,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "cpu_count": os.cpu_count(), "machine": platform.machine()},
        "median": summary,
        "ratio_s3_over_local_per_round": per_round,
        "ratio_s3_over_local_median": median_of([{"r": r} for r in per_round], "r"),
        "disturbed_runs_kept": sum(r["disturbed"] for rs in runs.values() for r in rs),
        "runs": runs,
        "discarded_runs": discarded,
    }
    print(f"\n{'side':<8}{'per worker (median)':>21}{'CPU-ms/sample':>15}{'first batch s':>15}")
    for side, m in summary.items():
        cpu_ms = m["cpu_s_per_sample"] * 1000 if m["cpu_s_per_sample"] is not None else None
        print(f"{side:<8}{fmt(m['samples_per_s_per_worker'], '.2f'):>21}{fmt(cpu_ms, '.1f'):>15}"
              f"{fmt(m['to_first_batch_s'], '.1f'):>15}")
    print("s3 / local per round: " + ", ".join(fmt(r, ".3f") for r in per_round) +
          f"; median {fmt(result['ratio_s3_over_local_median'], '.3f')}")
    print(f"disturbed by other processes: {result['disturbed_runs_kept']} kept, {len(discarded)} discarded and rerun")
    write_results(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
