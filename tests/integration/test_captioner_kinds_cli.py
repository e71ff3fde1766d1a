"""`revprompt train`, `export` and `caption` on BLIP-2 and an image-text-to-text model (Llava), through DeepSpeed:
checkpoints, resume, LoRA merged or kept as an adapter, ZeRO-3 on 2 ranks, the embedding head, evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.captioners import save_captioner
from tests.conftest import copy_run, run_cli, scalars, train_args


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """The captioner's weights in an export (the embedding head's file aside)."""
    return {k: v for f in sorted(folder.glob("*.safetensors")) if f.name != HEAD for k, v in load_file(f).items()}


HEAD = "embedding_head.safetensors"


@pytest.fixture(scope="module")
def captioners(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("captioners")
    return {kind: save_captioner(kind, root / kind) for kind in ("blip-2", "llava")}


def test_blip2_with_lora_checkpoints_resumes_exports_and_captions(generated_run, captioners, tmp_path: Path):
    run = copy_run(generated_run, tmp_path / "run")
    lora = ["--train.lora_rank=4", f"--train.captioner={captioners['blip-2']}", "--train.lr=0.01",
            "--train.save_every=2", "--train.val_captions=2", "--train.embedding_head=true"]
    run_cli("train", *train_args(run, train__max_steps=2), *lora, threads=2)
    assert (run / "checkpoints" / "step-2" / "revprompt-commit.json").is_file()
    first = weights(run / "captioner")
    proc = run_cli("train", *train_args(run, train__max_steps=4), *lora, threads=2)
    assert "resumed from" in proc.stderr and "step-2" in proc.stderr
    losses = scalars(run / "tb" / "train", "train/loss")
    assert sorted(losses) == [2, 4] and losses[4] < losses[2]

    # merged: plain transformers reads it, no adapter files; the BLIP-2 vision tower did not move
    from transformers import Blip2ForConditionalGeneration

    export = run / "captioner"
    assert not (export / "adapter_config.json").exists()
    merged = weights(export)
    base = weights(captioners["blip-2"])
    vision = [k for k in base if k.startswith("vision_model.")]
    assert vision and all(torch.equal(merged[k], base[k]) for k in vision)
    assert any(not torch.equal(merged[k], first[k]) for k in merged if "language_model" in k)
    Blip2ForConditionalGeneration.from_pretrained(export)

    # `revprompt export` of the step-4 checkpoint writes the same weights as the live export
    run_cli("export", "--checkpoint", str(run / "checkpoints" / "step-4"), "--out", str(tmp_path / "again"))
    again = weights(tmp_path / "again")
    assert again.keys() == merged.keys() and all(torch.equal(again[k], merged[k]) for k in merged)
    # the embedding head on BLIP-2's frozen vision tower (its pooler output), beside the merged adapters, the same
    # from the live engine and from the checkpoint
    head, head_again = load_file(export / HEAD), load_file(tmp_path / "again" / HEAD)
    assert head.keys() == head_again.keys() and all(torch.equal(head[k], head_again[k]) for k in head)
    assert json.loads((export / "embedding_head.json").read_text())["pooling"] == "pooler"

    # `revprompt caption` over the test shards: one caption per sample, in the exported instruction's format
    out = tmp_path / "captions.jsonl"
    run_cli("caption", "--config", "tiny", f"--run.dir={run}", "--out", str(out), "--max-new-tokens", "6",
            str(run / "shards" / "test"), threads=2)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    listed = json.loads((run / "shards" / "manifest.json").read_text())["splits"]["test"]
    assert len(rows) == listed["count"] and all(isinstance(r["caption"], str) for r in rows)

    # `revprompt evaluate` scores the BLIP-2 captioner before and after fine-tuning on every test sample
    run_cli("evaluate", *train_args(run, train__max_steps=4), *lora, "--evaluate.regenerate=false",
            "--evaluate.max_new_tokens=6", threads=2)
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert summary["samples"] == listed["count"]
    assert all(-1 <= summary["similarity"][name]["mean"] <= 1 for name in ("zero_shot", "finetuned", "constant"))


def test_blip2_lora_on_two_ranks_with_zero1_exports_the_frozen_weights_too(generated_run, captioners,
                                                                           tmp_path: Path):
    """ZeRO-1 keeps frozen weights (the vision tower, the base under the adapters) out of its optimizer partitions:
    `revprompt export` of such a checkpoint takes them from the model states and equals the live export."""
    run = copy_run(generated_run, tmp_path / "run")
    run_cli("train", *train_args(run, train__max_steps=2, train__micro_batch_size=4), "--train.zero_stage=1",
            "--train.lora_rank=4", f"--train.captioner={captioners['blip-2']}", "--train.lr=0.01",
            "--train.val_captions=0", nproc=2, threads=1)
    run_cli("export", "--checkpoint", str(run / "checkpoints" / "step-2"), "--out", str(tmp_path / "again"))
    live, again = weights(run / "captioner"), weights(tmp_path / "again")
    assert again.keys() == live.keys() and all(torch.equal(again[k], live[k]) for k in live)
    assert json.loads((run / "checkpoints" / "deepspeed.json").read_text())["zero_optimization"]["stage"] == 1


def test_llava_full_fine_tuning_on_two_ranks_with_zero3_checkpoints_and_resumes(generated_run, captioners,
                                                                                tmp_path: Path):
    run = copy_run(generated_run, tmp_path / "run")
    llava = [f"--train.captioner={captioners['llava']}", "--train.lr=0.003", "--train.val_captions=2",
             "--train.zero_stage=3", "--train.save_every=2", "--train.embedding_head=true"]
    run_cli("train", *train_args(run, train__max_steps=2, train__micro_batch_size=4), *llava, nproc=2, threads=1)
    assert (run / "checkpoints" / "step-2" / "revprompt-commit.json").is_file()
    proc = run_cli("train", *train_args(run, train__max_steps=3, train__micro_batch_size=4), *llava, nproc=2,
                   threads=1)
    assert "resumed from" in proc.stderr and "step-2" in proc.stderr
    from transformers import AutoModelForImageTextToText

    export = run / "captioner"
    info = json.loads((export / "revprompt.json").read_text())
    assert info["step"] == 3 and info["made_from"]["train"]["captioner"] == str(captioners["llava"])
    assert info["instruction"] == json.loads((export / "config.json").read_text())["revprompt_instruction"]
    trained, base = weights(export), weights(captioners["llava"])
    assert trained.keys() == base.keys() and any(not torch.equal(trained[k], base[k]) for k in base)
    AutoModelForImageTextToText.from_pretrained(export)
    assert json.loads((run / "checkpoints" / "deepspeed.json").read_text())["zero_optimization"]["stage"] == 3
    # the embedding head reads the mean of the CLIP tower's last hidden states; it trained through the resume
    record = json.loads((export / "embedding_head.json").read_text())
    assert (record["pooling"], record["vision_module"], record["in_dim"], record["step"]) == \
        ("mean", "model.vision_tower", 32, 3)
    assert sorted(scalars(run / "tb" / "train", "train/loss_embedding")) == [2, 3]


def test_lora_on_two_ranks_with_zero3_exports_an_adapter_and_settings_that_cannot_apply_are_refused(generated_run, captioners,
                                                                                     tmp_path: Path):
    run = copy_run(generated_run, tmp_path / "run")
    run_cli("train", *train_args(run, train__max_steps=2, train__micro_batch_size=4), "--train.lora_rank=4",
            "--train.lora_merge=false", "--train.zero_stage=3", f"--train.captioner={captioners['llava']}",
            "--train.val_captions=0", "--train.embedding_head=true", nproc=2, threads=1)
    export = run / "captioner"
    adapter = json.loads((export / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(captioners["llava"]) and adapter["r"] == 4
    assert not (export / "model.safetensors").exists()
    trained = weights(export)  # the adapters only, gathered from both ranks' partitions, and trained
    assert trained and all("lora_" in k for k in trained)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in trained.items())
    out = tmp_path / "captions.jsonl"
    run_cli("caption", "--config", "tiny", f"--run.dir={run}", "--out", str(out), "--max-new-tokens", "4",
            str(run / "shards" / "test"), threads=2)
    assert out.read_text().count("\n") >= 1
    # evaluate puts the adapter on its base too
    lora = ["--train.lora_rank=4", "--train.lora_merge=false", f"--train.captioner={captioners['llava']}"]
    run_cli("evaluate", *train_args(run, train__max_steps=2, train__micro_batch_size=4), *lora,
            "--evaluate.regenerate=false", "--evaluate.max_new_tokens=4", threads=2)
    listed = json.loads((run / "shards" / "manifest.json").read_text())["splits"]["test"]["count"]
    assert json.loads((run / "eval" / "summary.json").read_text())["samples"] == listed
    # `revprompt export` of the ZeRO-3 checkpoint, adapter alone: the same adapter weights as the live export
    run_cli("export", "--checkpoint", str(run / "checkpoints" / "step-2"), "--out", str(tmp_path / "again"),
            "--export.lora_merge=false")
    again = weights(tmp_path / "again")
    assert again.keys() == trained.keys() and all(torch.equal(again[k], trained[k]) for k in trained)
    # the embedding head beside the adapter: gathered from the ZeRO-3 partitions live, consolidated by `export`
    head, head_again = load_file(export / HEAD), load_file(tmp_path / "again" / HEAD)
    assert head.keys() == head_again.keys() and all(torch.equal(head[k], head_again[k]) for k in head)
    assert HEAD in json.loads((tmp_path / "again" / "revprompt.json").read_text())["files"]

    # a setting that cannot apply stops train in one line, before a step (the others: tests/unit/test_captioner_kinds)
    refused = copy_run(generated_run, tmp_path / "refused")
    proc = run_cli("train", *train_args(refused, train__max_steps=1), "--train.label_smoothing=0.1",
                   f"--train.captioner={captioners['blip-2']}", check=False)
    assert proc.returncode != 0 and "only a BLIP captioner smooths its labels" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not list(refused.glob("checkpoints/step-*"))
