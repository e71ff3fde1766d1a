"""Training under torchrun with 2 gloo ranks, ZeRO-2 and ZeRO-3: loss falls, exports load with plain transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import copy_run, run_cli, scalars, train_args


@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_train_and_export(stage: int, generated_run: Path, tmp_path: Path):
    run_dir = copy_run(generated_run, tmp_path / "run")
    run_cli("train", *train_args(run_dir, train__zero_stage=stage, train__max_steps=16, train__save_every=8),
            nproc=2)
    loss = scalars(run_dir / "tb" / "train", "train/loss")
    assert sorted(loss) == [2, 4, 6, 8, 10, 12, 14, 16]
    assert loss[16] < loss[2] - 0.5, loss
    assert set(scalars(run_dir / "tb" / "train", "train/lr")) == set(loss)
    for rank in (0, 1):
        log = (run_dir / "logs" / f"rank-{rank}.log").read_text()
        assert f"ZeRO-{stage}" in log and "training done at step 16" in log

    from PIL import Image
    from transformers import BlipForConditionalGeneration, pipeline

    export = run_dir / "captioner"
    assert json.loads((export / "revprompt.json").read_text())["step"] == 16
    model = BlipForConditionalGeneration.from_pretrained(export)
    captioner = pipeline("image-text-to-text", model=str(export))
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    caption = captioner(image, text="", max_new_tokens=8)[0]["generated_text"]
    assert isinstance(caption, str) and caption.strip()

    # the on-demand export of the last checkpoint, consolidated in one process, is the same model
    run_cli("export", "--checkpoint", str(run_dir / "checkpoints" / "step-16"), "--out", str(tmp_path / "again"))
    again = BlipForConditionalGeneration.from_pretrained(tmp_path / "again")
    ours, theirs = model.state_dict(), again.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir()) == ["step-16", "step-8"]
