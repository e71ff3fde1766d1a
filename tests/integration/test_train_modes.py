"""The trainer's micro-steps run the captioner in training mode, and validation in eval mode without gradients.

A captioner comes out of `from_pretrained` in eval mode: without a switch, training ran with dropout off (and
transformers' gradient checkpointing skipped) until the first validation put it back into training mode."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, cli_env, copy_run, train_args

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


def test_micro_steps_train_in_training_mode_and_validation_in_eval_mode(generated_run: Path, tmp_path: Path):
    run_dir = copy_run(generated_run, tmp_path / "run")  # its val split: one batch of validation
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, *train_args(run_dir, train__max_steps=4, train__val_every=2,
                                                   train__val_captions=0, train__num_workers=0)],
        env=cli_env(threads=1), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["code"] == 0
    # steps 1-2 in training with gradients, the validation at step 2 (one batch) in eval without, steps 3-4 in
    # training again, the final validation in eval
    assert result["seen"] == [[True, True]] * 2 + [[False, False]] + [[True, True]] * 2 + [[False, False]]
