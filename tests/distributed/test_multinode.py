"""Two torchrun "nodes" on this machine (c10d rendezvous on 127.0.0.1) write what one node writes."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import BIN, ROOT, cli_env, run_cli, shard_digests, tiny_args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_generate_the_same_shards_as_one(tmp_path: Path):
    one, two = tmp_path / "one", tmp_path / "two"
    run_cli("generate", *tiny_args(one, limit=36), nproc=2)
    port = free_port()
    nodes = []
    for node_rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node_rank}",
               "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
               "--rdzv_id=two-nodes", "--no-python", str(BIN / "revprompt"), "generate", *tiny_args(two, limit=36)]
        nodes.append(subprocess.Popen(cmd, env=cli_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    for rank in (0, 1):
        assert f"rank {rank} of 2" in (two / "logs" / f"rank-{rank}.log").read_text()
    assert shard_digests(two) == shard_digests(one) and len(shard_digests(one)) >= 4
    assert (two / "shards" / "manifest.json").read_bytes() == (one / "shards" / "manifest.json").read_bytes()
