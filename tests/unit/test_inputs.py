"""Every input a user or a file can give: a right result or one clear line, never a silent wrong answer."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from revprompt.launch.config import ConfigError, load_config
from revprompt.shards.images import KEEP_SIDE, ImageRefused, ImageTooLarge, open_image
from revprompt.shards.reader import ReadStats
from revprompt.shards.writer import ShardWriter, encode_image, encode_json


# ------------------------------------------------------------------ images as they look
def test_a_16_bit_png_keeps_its_picture(tmp_path: Path):
    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").convert("RGB").getextrema()[0] == (0, 255)  # Pillow alone: clipped
    pixels = np.asarray(open_image(tmp_path / "deep.png"))
    assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
    np.testing.assert_allclose(pixels[..., 0], ramp / 65535 * 255, atol=0.51)  # scaled, not clipped to white
    floats = Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8))
    floats.save(tmp_path / "float.tif")
    assert np.asarray(open_image(tmp_path / "float.tif"))[..., 0].max() == 255


def test_transparency_is_composited_on_white(tmp_path: Path):
    rgba = np.zeros((4, 4, 4), np.uint8)  # black where fully transparent...
    rgba[0, 0] = (200, 10, 10, 255)  # ... and one opaque red pixel
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    pixels = np.asarray(open_image(tmp_path / "t.png"))
    assert tuple(pixels[0, 0]) == (200, 10, 10) and tuple(pixels[2, 2]) == (255, 255, 255)


def test_large_images_are_refused_or_reduced_before_they_cost_memory(tmp_path: Path):
    buf = io.BytesIO()
    Image.new("L", (5000, 5000)).save(buf, format="PNG")  # a few KB that would decode to 25 MP
    assert len(buf.getvalue()) < 100_000
    with pytest.raises(ImageTooLarge, match="5000 x 5000 pixels"):
        open_image(buf.getvalue(), "bomb.png")
    big = tmp_path / "big.jpg"
    Image.new("RGB", (3000, 1500), "blue").save(big, quality=80)
    assert max(open_image(big).size) == KEEP_SIDE
    with pytest.raises(ImageRefused, match="not an image Pillow can read"):
        open_image(b"not an image", "x.png")


def test_caption_reads_every_format_pillow_opens_and_names_what_it_skips(tmp_path: Path, caplog):
    from revprompt.evaluation.caption import iter_inputs

    for name, fmt in (("a.tif", "TIFF"), ("b.bmp", "BMP"), ("c.png", "PNG"), ("d.gif", "GIF")):
        Image.new("RGB", (8, 8), "green").save(tmp_path / name, format=fmt)
    (tmp_path / "notes.txt").write_text("not an image")
    stats = ReadStats()
    with caplog.at_level(logging.INFO):
        found = [Path(value).name for _, value, _ in iter_inputs([str(tmp_path)], stats)]
    assert found == ["a.tif", "b.bmp", "c.png", "d.gif"]
    assert stats.skipped == 1 and f"skipping {tmp_path / 'notes.txt'}: not a format Pillow reads" in caplog.text


# ------------------------------------------------------------------ config values
@pytest.mark.parametrize("override", ["--generate.guidance_scale=nan", "--prompts.val_fraction=nan",
                                      "--train.label_smoothing=nan", "--train.grad_clip=inf", "--train.lr=nan",
                                      "--train.lr=-inf"])
def test_non_finite_numbers_are_refused_with_the_key(override: str):
    key = override[2:].split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key}: expected a finite number"):
        load_config("tiny", [override])


def test_non_finite_toml_literals_are_refused_too(tmp_path: Path):
    (tmp_path / "c.toml").write_text("[generate]\nguidance_scale = nan\n")
    with pytest.raises(ConfigError, match="generate.guidance_scale: expected a finite number"):
        load_config(tmp_path / "c.toml")


def test_a_lone_surrogate_is_named_with_file_and_line(tmp_path: Path):
    from revprompt.prompts.sources import PromptSourceError, read_prompts

    (tmp_path / "p.jsonl").write_text('{"prompt": "red shirt"}\n{"prompt": "red \\ud800 shirt"}\n')
    with pytest.raises(PromptSourceError, match=r"p\.jsonl:2: invalid text: a lone surrogate"):
        list(read_prompts(str(tmp_path / "p.jsonl")))


# ------------------------------------------------------------------ what a shard's metadata may hold
HOSTILE = {"inf_seed": b'{"seed": 1e999}', "text_seed": b'{"seed": "abc"}', "huge_seed": b'{"seed": 1180591620717411303424}',
           "array": b'[1, 2, 3]', "attr_list": b'{"attributes": ["Men"]}', "attr_dict": b'{"attributes": {"gender": {"x": 1}}}',
           "other_key": b'{"key": "someone_else"}'}


def test_hostile_metadata_is_skipped_and_counted_not_a_crash(tmp_path: Path):
    from revprompt.evaluation.items import read_items

    shard = tmp_path / "test" / "000000.tar"
    writer = ShardWriter(shard)
    jpg = encode_image(np.zeros((8, 8, 3), np.uint8))
    for name, meta in HOSTILE.items():
        writer.write(f"{name.replace('_', '-')}_0000", {"jpg": jpg, "txt": b"a prompt", "json": meta})
    writer.write("good_0000", {"jpg": jpg, "txt": b"red shirt", "json": encode_json(
        {"key": "good_0000", "seed": 7, "attributes": {"gender": "Men"}})})
    writer.close()
    stats = ReadStats()
    items = read_items([(str(shard), len(HOSTILE) + 1)], 0, 0, stats)
    assert [(it.key, it.seed, it.attributes) for it in items] == [("good_0000", 7, {"gender": "Men"})]
    assert items[0].order == 0 and stats.corrupt == len(HOSTILE) and stats.samples == 1


# ------------------------------------------------------------------ the export in plain transformers
def test_the_export_keeps_plain_transformers_inside_the_decoders_positions(tmp_path: Path):
    from transformers import pipeline

    from revprompt.models.captioner import build_captioner
    from revprompt.training.export import save_hf_dir

    model, processor = build_captioner("random-tiny")  # never emits its end token: generation runs on
    save_hf_dir(model, processor, None, tmp_path / "captioner", {"step": 1})
    config = json.loads((tmp_path / "captioner" / "generation_config.json").read_text())
    assert config["max_new_tokens"] == 40  # train.max_length's default, well inside 128 positions
    captioner = pipeline("image-text-to-text", model=str(tmp_path / "captioner"))
    out = captioner(Image.new("RGB", (64, 64), "red"), text="")  # an IndexError past 128 positions before
    assert len(processor.tokenizer(out[0]["generated_text"]).input_ids) <= 42


# ------------------------------------------------------------------ model paths
def test_every_model_key_says_what_it_looked_for_and_how_to_fix_it(tmp_path: Path, monkeypatch):
    from revprompt.models.builtin import ModelLoadError
    from revprompt.models.captioner import build_captioner, load_exported
    from revprompt.models.image_embedder import load_image_encoder
    from revprompt.models.text_embedder import load_text_encoder
    from revprompt.models.text_to_image import build_pipeline, load_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [(build_pipeline, "stabilityai/stable-diffusion-2-base", "generate.model", "HF_HUB_OFFLINE=1"),
             (load_tokenizer, "stabilityai/stable-diffusion-2-base", "generate.model", "huggingface-cli download"),
             (build_pipeline, str(tmp_path / "missing"), "generate.model", "no such folder"),
             (build_captioner, str(empty), "train.captioner", "holds no captioner (BLIP, BLIP-2 or an image-text-to-text model of transformers) that loads"),
             (lambda v: load_exported(v, __import__("torch").device("cpu")), str(empty), "caption.captioner",
              "holds no captioner (BLIP"),
             (load_text_encoder, str(tmp_path / "missing"), "evaluate.text_model", "no such folder"),
             (load_image_encoder, "openai/clip-vit-base-patch32", "evaluate.image_model", "set evaluate.image_model=DIR")]
    for load, value, key, hint in cases:
        with pytest.raises(ModelLoadError) as caught:
            load(value)
        message = str(caught.value)
        assert message.startswith(f"{key} = {value!r}: ") and hint in message, message
