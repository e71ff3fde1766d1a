"""The `sd2-blip` preset, end to end on the real architectures (random weights), through `revprompt download`'s config.

Stable Diffusion 2-base (865M UNet, OpenCLIP-ViT-H text encoder, CLIP's BPE tokenizer with its 77-token
truncation), BLIP-base with its 384 px processor under DeepSpeed with bf16 autocast, CLIP ViT-B/32 and the real
all-MiniLM-L6-v2: nothing differs from what the preset runs on a GPU but the model paths and the sizes
(12 prompts, 64 px, 2 sampler steps, 2 training steps at micro-batch 2, 12-token captions, 1 drift iteration).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from revprompt.launch.config import load_config
from revprompt.models.download import folder_name
from tests.conftest import run_cli
from tests.reference import build_reference_dir

PROMPTS = ["Nike Men Black Running Shoes", "Puma Women Pink Sports Tshirt", "Titan Men Silver Analog Watch",
           "Fabindia Women Green Printed Kurta", "Roadster Men Navy Blue Slim Fit Jeans",
           "Lavie Women Brown Handbag", "Fastrack Unisex Black Sunglasses", "Adidas Men White Flip Flops",
           "Jealous 21 Women Red Dress", "Wrangler Men Blue Checked Shirt", "Baggit Women Beige Wallet",
           # longer than the text encoder's 77 tokens: the tokenizer truncates it, prepare counts it
           " ".join(["Embroidered"] * 50 + ["Women Maroon Silk Saree with Golden Zari Border"] * 3)]
SIZES = ["--prompts.val_fraction=0.25", "--prompts.test_fraction=0.25", "--generate.height=64",
         "--generate.width=64", "--generate.steps=2", "--generate.batch_size=4", "--generate.shard_size=2",
         "--train.max_steps=2", "--train.micro_batch_size=2", "--train.num_workers=1", "--train.save_every=1",
         "--train.val_every=0", "--train.val_captions=2", "--train.val_batches=1", "--evaluate.batch_size=4",
         "--evaluate.max_new_tokens=12", "--drift.iterations=1", "--run.device=cpu"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    return build_reference_dir(tmp_path_factory.mktemp("reference") / "models")


@pytest.mark.slow
def test_the_reference_preset_runs_end_to_end_on_the_real_architectures(models: Path, tmp_path: Path):
    # revprompt download finds every model already there (a node without a network) and writes the config
    run_cli("download", "--config", "sd2-blip", "--to", str(models))
    config = models / "config.toml"
    cfg = load_config(config)
    assert cfg.generate.model == str((models / folder_name("stabilityai/stable-diffusion-2-base")).resolve())
    assert cfg.train.captioner.endswith("Salesforce--blip-image-captioning-base")
    assert cfg.evaluate.image_model.endswith("openai--clip-vit-base-patch32")
    assert (cfg.generate.dtype, cfg.train.precision, cfg.train.zero_stage) == ("bf16", "bf16-autocast", 2)
    assert (cfg.generate.fuse_qkv, cfg.generate.compile, cfg.train.compile) == (True, True, True)  # CUDA: on

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    run_dir = tmp_path / "run"
    nproc = int(os.environ.get("REVPROMPT_REFERENCE_RANKS", "1"))  # 2 with --train.zero_stage=3: see the README
    extra = os.environ.get("REVPROMPT_REFERENCE_EXTRA", "").split()
    proc = run_cli("pipeline", "--config", str(config), f"--run.dir={run_dir}", f"--prompts.path={prompts}",
                   *SIZES, *extra, nproc=nproc if nproc > 1 else 0, threads=2, timeout=1800)
    assert "similarity to prompt (mean)" in proc.stderr

    report = json.loads((run_dir / "prompts" / "report.json").read_text())
    assert report["max_tokens"] == 77 and report["too_long"] == 1  # SD2's CLIP tokenizer counted it
    manifest = json.loads((run_dir / "shards" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["config"]["model"] == cfg.generate.model
    log = (run_dir / "logs" / "rank-0.log").read_text()
    stage = 3 if "--train.zero_stage=3" in extra else 0  # one rank runs ZeRO-2 as stage 0
    assert f"ZeRO-{stage}, fp32 under bf16 autocast" in log  # fp32 weights, the forward in bf16

    from transformers import BlipForConditionalGeneration, BlipProcessor

    exported = BlipForConditionalGeneration.from_pretrained(run_dir / "captioner")
    assert exported.config.vision_config.image_size == 384 and exported.config.text_config.hidden_size == 768
    assert BlipProcessor.from_pretrained(run_dir / "captioner").image_processor.size["height"] == 384
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    n_test = sum(1 for line in (run_dir / "prompts" / "test.jsonl").read_text().splitlines() if line.strip())
    assert summary["samples"] == n_test > 0 and summary["models"]["image"] == cfg.evaluate.image_model
    assert summary["image"]["clip_regen_vs_original"]["n"] == n_test
    drift = json.loads((run_dir / "drift" / "summary.json").read_text())
    assert [e["iteration"] for e in drift["iterations"]] == [0, 1]
