"""`revprompt download`: which files it fetches, the config it writes, and what it says offline."""

from __future__ import annotations

from pathlib import Path

from revprompt.launch.config import load_config
from revprompt.models.download import folder_name, select_files, wanted_models
from tests.conftest import run_cli

SD2 = ["model_index.json", "README.md", ".gitattributes", "512-base-ema.ckpt", "512-base-ema.safetensors",
       "unet/config.json", "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.safetensors",
       "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.fp16.bin",
       "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
       "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
       "text_encoder/pytorch_model.bin", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
       "tokenizer/tokenizer_config.json", "tokenizer/vocab.json", "scheduler/scheduler_config.json",
       "feature_extractor/preprocessor_config.json", "safety_checker/config.json", "safety_checker/model.safetensors",
       "unet/diffusion_pytorch_model.non_ema.safetensors"]
BLIP = ["config.json", "preprocessor_config.json", "pytorch_model.bin", "model.safetensors", "tf_model.h5",
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "README.md"]
SHARDED = ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
           "model.safetensors.index.json", "pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json"]


def test_only_the_files_the_pipeline_loads_are_fetched():
    small = ["model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json", "tokenizer/merges.txt",
             "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
             "unet/config.json", "vae/config.json"]
    assert select_files(SD2, "bf16") == sorted(small + [  # the fp16 variant for a 16-bit config: half the bytes
        "text_encoder/model.fp16.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors"])
    assert select_files(SD2, "fp32") == sorted(small + [
        "text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors"])
    assert select_files(BLIP, "bf16") == ["config.json", "model.safetensors", "preprocessor_config.json",
                                          "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
                                          "vocab.txt"]
    assert select_files(SHARDED) == ["config.json", "model-00001-of-00002.safetensors",
                                     "model-00002-of-00002.safetensors", "model.safetensors.index.json"]


def test_built_in_names_and_local_folders_are_not_fetched(tmp_path: Path):
    cfg = load_config("sd2-blip")
    assert wanted_models(cfg) == [("generate.model", "stabilityai/stable-diffusion-2-base"),
                                  ("train.captioner", "Salesforce/blip-image-captioning-base"),
                                  ("evaluate.image_model", "openai/clip-vit-base-patch32")]  # MiniLM ships offline
    local = load_config("sd2-blip", [f"--generate.model={tmp_path}", "--train.captioner=miniature"])
    assert [key for key, _ in wanted_models(local)] == ["evaluate.image_model"]
    assert folder_name("openai/clip-vit-base-patch32") == "openai--clip-vit-base-patch32"


def test_offline_it_names_every_model_it_cannot_reach_and_fetches_nothing(tmp_path: Path):
    proc = run_cli("download", "--config", "sd2-blip", "--to", str(tmp_path / "models"), check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    for key, repo in (("generate.model", "stabilityai/stable-diffusion-2-base"),
                      ("train.captioner", "Salesforce/blip-image-captioning-base"),
                      ("evaluate.image_model", "openai/clip-vit-base-patch32")):
        assert f"{key} = {repo!r}: " in proc.stderr
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == []


def test_every_file_a_captioner_of_each_kind_loads_from_is_fetched(tmp_path: Path):
    """What save_pretrained writes for BLIP-2 and Llava (chat template included) is what download selects, without
    the duplicates a hub repository also holds; the selected files alone load."""
    from revprompt.models.captioner import build_captioner
    from tests.captioners import save_captioner

    for kind in ("blip-2", "llava"):
        folder = save_captioner(kind, tmp_path / kind)
        written = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        assert select_files(written + ["pytorch_model.bin", "README.md", "tf_model.h5"], "bf16") == written
        assert kind != "llava" or "chat_template.jinja" in written
        build_captioner(str(folder))
