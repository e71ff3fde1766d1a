"""models/text_to_image: the Stable Diffusion factory (tiny and the from_pretrained path), seeds, non-finite images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from revprompt.generation.job import generate_batch, plan_shards, task_samples
from revprompt.launch.config import load_config
from revprompt.models.text_to_image import build_pipeline, draw, to_pixels
from revprompt.prompts.sources import Prompt


def cfg_for(**overrides):
    return load_config("tiny", [f"--{k.replace('__', '.')}={v}" for k, v in
                                dict(generate__steps=2, generate__height=32, generate__width=32, **overrides).items()])


def samples(n: int, seed: int = 0):
    prompts = {"train": [Prompt(id=f"p{i}", text=f"Nike Men Red T-shirt number {i}") for i in range(n)]}
    task = plan_shards({"train": n}, 1, 100)[0]
    return task_samples(task, prompts["train"], 1, seed)


@pytest.fixture(scope="module")
def pipe():
    # runtime behaviour needs shapes only: the random-initialised model (the miniature has its own tests)
    return build_pipeline("random-tiny")


def test_tiny_pipeline_has_no_safety_checker_and_uses_sdpa(pipe):
    from diffusers.models.attention_processor import AttnProcessor2_0

    assert pipe.safety_checker is None
    assert all(isinstance(p, AttnProcessor2_0) for p in pipe.unet.attn_processors.values())
    assert pipe.tokenizer.model_max_length == 77


def test_saved_pipeline_loads_through_from_pretrained_and_draws_the_same(tmp_path, pipe):
    cfg = cfg_for()
    pipe.save_pretrained(tmp_path / "sd")
    loaded = build_pipeline(str(tmp_path / "sd"))
    batch = samples(2)
    assert np.array_equal(to_pixels(generate_batch(pipe, batch, cfg))[0], to_pixels(generate_batch(loaded, batch, cfg))[0])


def test_images_depend_on_seed_not_batch_position(pipe):
    cfg = cfg_for()
    batch = samples(3)
    together = generate_batch(pipe, batch, cfg)
    reversed_ = generate_batch(pipe, batch[::-1], cfg).flip(0)
    torch.testing.assert_close(together, reversed_, atol=1e-5, rtol=0)
    assert not torch.allclose(together[0], together[1])


@pytest.mark.parametrize("scheduler", ["dpmsolver++", "euler", "ddim"])
def test_every_scheduler_and_negative_prompt(scheduler):
    cfg = cfg_for(generate__scheduler=scheduler)
    pipe = build_pipeline("random-tiny", scheduler=scheduler)
    batch = samples(1)
    plain = generate_batch(pipe, batch, cfg)
    pixels, finite = to_pixels(plain)
    assert plain.shape == (1, 3, 32, 32) and pixels.shape == (1, 32, 32, 3) and pixels.dtype == np.uint8
    assert finite.tolist() == [True]
    negative = generate_batch(pipe, batch, cfg_for(generate__scheduler=scheduler, generate__negative_prompt="blurry"))
    assert not torch.allclose(plain, negative)


def test_bf16_dtype():
    pipe = build_pipeline("miniature", dtype="bf16")
    assert pipe.unet.dtype == torch.bfloat16


def test_non_finite_images_are_flagged():
    images = torch.rand(3, 3, 8, 8)
    images[1, 0, 2, 2] = float("nan")
    pixels, finite = to_pixels(images)
    assert finite.tolist() == [True, False, True]
    assert np.array_equal(pixels[0], (images[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def test_a_non_finite_image_is_drawn_as_none(pipe):
    import copy

    settings = cfg_for(generate__batch_size=2).generate
    broken = copy.deepcopy(pipe)
    with torch.no_grad():
        broken.vae.decoder.conv_out.bias.fill_(float("nan"))  # every decoded pixel NaN
    assert draw(broken, ["red shirt", "blue cap", "green bag"], [1, 2, 3], settings) == [None, None, None]
    drawn = draw(pipe, ["red shirt", "blue cap", "green bag"], [1, 2, 3], settings)
    assert [image.size for image in drawn] == [(32, 32)] * 3
    # the same pixels as the generate job's path for the same seeds, chunked or not
    pixels, _ = to_pixels(generate_batch(pipe, samples(1), cfg_for()))
    assert draw(pipe, [samples(1)[0].prompt.text], [samples(1)[0].seed], settings)[0].tobytes() == pixels[0].tobytes()


def test_fused_projections_draw_what_separate_ones_draw():
    cfg = cfg_for()
    batch = samples(3)
    plain = build_pipeline("random-tiny")
    fused = build_pipeline("random-tiny", fuse=True)
    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    assert all(isinstance(p, FusedAttnProcessor2_0) for p in fused.unet.attn_processors.values())
    torch.testing.assert_close(generate_batch(fused, batch, cfg), generate_batch(plain, batch, cfg), atol=1e-5, rtol=0)


def test_compiled_blocks_draw_what_eager_draws_and_a_short_batch_compiles_nothing_new():
    from revprompt.models.text_to_image import compile_denoiser, is_compiled

    cfg = cfg_for(generate__batch_size=4)
    pipe = build_pipeline("random-tiny")
    batch = samples(7)  # a full batch of 4, then a short one of 3
    eager = [generate_batch(pipe, batch[:4], cfg), generate_batch(pipe, batch[4:], cfg)]
    assert not is_compiled(pipe)
    # the CLI compiles on CUDA only; the same function runs here on the CPU
    assert compile_denoiser(pipe, "blocks") == "blocks" and is_compiled(pipe)
    full = generate_batch(pipe, batch[:4], cfg)
    with torch._dynamo.config.patch(error_on_recompile=True):  # a recompile would raise
        short = generate_batch(pipe, batch[4:], cfg)  # padded to 4 with copies of the last sample
    assert short.shape[0] == 3
    torch.testing.assert_close(full, eager[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(short, eager[1], atol=1e-4, rtol=0)
