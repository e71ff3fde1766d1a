"""The trainer's micro-steps run the captioner in training mode, and validation in eval mode without gradients.

A captioner comes out of `from_pretrained` in eval mode: without a switch, training ran with dropout off (and
transformers' gradient checkpointing skipped) until the first validation put it back into training mode."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from revprompt.shards.manifest import scan_manifest, write_manifest
from revprompt.shards.writer import ShardWriter, encode_image
from tests.conftest import ROOT, cli_env

# the trainer as `revprompt train` builds it (run_stage), with a hook that records the mode of every forward
SCRIPT = r'''
import json, sys
import torch
from revprompt.launch.runner import build_parser, run_stage
from revprompt.training.loop import Trainer

seen = []

def body(ctx):
    trainer = Trainer(ctx)
    trainer.engine.module.register_forward_pre_hook(
        lambda module, args: seen.append([module.training, torch.is_grad_enabled()]))
    trainer.train()

code = run_stage("train", sys.argv[1:], build_parser("train", "train"), body)
print(json.dumps({"code": code, "seen": seen}))
'''


def write_split(root: Path, split: str, count: int, rng: np.random.Generator) -> None:
    writer = ShardWriter(root / split / "000000.tar")
    for i in range(count):
        pixels = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
        writer.write(f"{split}{i}_0000", {"jpg": encode_image(pixels, "jpg"), "txt": f"Navy Blue Shirt {i}".encode()})
    writer.close()


def test_micro_steps_train_in_training_mode_and_validation_in_eval_mode(tmp_path: Path):
    root = tmp_path / "run" / "shards"
    rng = np.random.default_rng(0)
    write_split(root, "train", 8, rng)
    write_split(root, "val", 4, rng)
    write_manifest(root, scan_manifest(root, "handmade", {"train": 1, "val": 1}))

    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, "--config", "tiny", f"--run.dir={tmp_path / 'run'}",
         "--generate.splits=train,val", "--train.max_steps=4", "--train.val_every=2", "--train.val_batches=1",
         "--train.val_captions=0", "--train.save_every=1000", "--train.micro_batch_size=4", "--train.log_every=2",
         "--train.embedding_head=false"],
        env=cli_env(threads=1), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["code"] == 0
    # steps 1-2 in training with gradients, the validation at step 2 (one batch) in eval without, steps 3-4 in
    # training again, the final validation in eval
    assert result["seen"] == [[True, True]] * 2 + [[False, False]] + [[True, True]] * 2 + [[False, False]]
