"""On a CUDA machine: the tiny preset generates in bf16 on the GPU, deterministically."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli, shard_digests, tiny_args

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_generate_on_cuda_bf16_is_repeatable(tmp_path: Path):
    args = dict(run__device="cuda", generate__dtype="bf16", generate__height=64, generate__width=64)
    run_cli("generate", *tiny_args(tmp_path / "a", limit=16, **args))
    run_cli("generate", *tiny_args(tmp_path / "b", limit=16, **args))
    manifest = json.loads((tmp_path / "a" / "shards" / "manifest.json").read_text())
    assert manifest["complete"] and sum(s["count"] for s in manifest["splits"].values()) == 16
    assert shard_digests(tmp_path / "a") == shard_digests(tmp_path / "b")
