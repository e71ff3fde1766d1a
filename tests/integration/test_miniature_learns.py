"""On the miniature's images, a short fine-tune of the warm-started tiny captioner beats the baselines."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import run_cli


def test_short_fine_tune_beats_the_constant_caption_on_held_out_prompts(tmp_path: Path):
    args = ["--config", "tiny", f"--run.dir={tmp_path / 'run'}", "--prompts.limit=600", "--prompts.test_fraction=0.2",
            "--train.max_steps=400", "--train.val_every=0", "--train.val_captions=0", "--train.save_every=1000",
            "--evaluate.regenerate=false"]
    for stage in ("generate", "train", "evaluate"):
        run_cli(stage, *args, threads=2, timeout=900)
    summary = json.loads((tmp_path / "run" / "eval" / "summary.json").read_text())
    sim = {name: summary["similarity"][name]["mean"] for name in ("zero_shot", "finetuned", "constant")}
    # measured here: zero-shot 0.123, fine-tuned 0.513, constant caption 0.412 on 137 held-out prompts; base colour
    # recovered 0.599 against chance 0.255, gender 0.898 against 0.474
    assert summary["samples"] >= 100
    assert sim["finetuned"] > sim["constant"] + 0.05, sim
    assert sim["finetuned"] > sim["zero_shot"] + 0.25, sim
    chance = summary["attribute_chance"]
    recovered = {a: summary["attributes"]["finetuned"][a]["rate"] for a in chance}
    assert recovered["baseColour"] > 2 * chance["baseColour"] and recovered["gender"] > chance["gender"], recovered
