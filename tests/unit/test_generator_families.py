"""Every diffusers text-to-image family revprompt draws with, on small random models: loaded through the same
from_pretrained path as the real ones, seeded per sample, with each family's own options."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from revprompt.models.text_to_image import build_pipeline, family_of, generate_images, load_tokenizer, sampler_name
from tests.families import FAMILIES, save_family

SETTINGS = SimpleNamespace(negative_prompt="", steps=2, guidance_scale=3.0, height=32, width=32, batch_size=2)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {name: save_family(name, root / name) for name in FAMILIES}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_draws_by_seed_through_from_pretrained(saved, family: str):
    pipe = build_pipeline(str(saved[family]), scheduler="euler")
    assert family_of(pipe) == family
    texts, seeds = ["red shirt", "blue jeans", "black watch"], [11, 12, 13]
    images = generate_images(pipe, texts, seeds, SETTINGS)
    assert images.shape == (3, 3, 32, 32) and torch.isfinite(images).all()
    reversed_ = generate_images(pipe, texts[::-1], seeds[::-1], SETTINGS).flip(0)
    torch.testing.assert_close(images, reversed_, atol=1e-4, rtol=0)  # the seed decides, not the batch position
    assert load_tokenizer(str(saved[family])).model_max_length == 77  # prepare counts with the CLIP tokenizer
    alone = generate_images(pipe, texts[:1], seeds[:1], SETTINGS)
    negative = generate_images(pipe, texts[:1], seeds[:1], SimpleNamespace(**{**vars(SETTINGS),
                                                                              "negative_prompt": "blurry"}))
    assert torch.equal(negative, alone) is (family == "FluxPipeline")  # FLUX takes no negative prompt


def test_ddpm_families_keep_the_models_prediction_type_and_flow_families_their_sampler(saved):
    for sampler in ("dpmsolver++", "euler", "ddim"):
        pipe = build_pipeline(str(saved["StableDiffusionPipeline"]), scheduler=sampler)
        assert pipe.scheduler.config.prediction_type == "v_prediction"  # SD 2.1-768's kind of training
        assert sampler_name(pipe, sampler) == sampler
    flux = build_pipeline(str(saved["FluxPipeline"]), scheduler="dpmsolver++")
    assert type(flux.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert sampler_name(flux, "dpmsolver++") == "FlowMatchEulerDiscreteScheduler"


def test_a_pipeline_of_another_kind_is_refused_with_the_key(tmp_path: Path):
    from revprompt.models.builtin import ModelLoadError

    (tmp_path / "model_index.json").write_text('{"_class_name": "StableVideoDiffusionPipeline"}')
    with pytest.raises(ModelLoadError, match="generate.model = .*: a StableVideoDiffusionPipeline, not a "
                                             "text-to-image pipeline revprompt draws with"):
        build_pipeline(str(tmp_path))
