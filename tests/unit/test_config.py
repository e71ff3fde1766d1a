"""Config: presets, overrides, validation messages that name the field, saving."""

from __future__ import annotations

import pytest

from revprompt.launch.config import Config, ConfigError, load_config, save_config
from revprompt.launch.runner import build_parser, parse_args


def test_presets_have_the_keys_others_rely_on():
    for preset in ("tiny", "sd2-blip"):
        cfg = load_config(preset)
        for key in ("run.dir", "prompts.path", "prompts.limit", "generate.images_per_prompt",
                    "generate.shard_size", "train.max_steps", "drift.iterations"):
            sec, name = key.split(".")
            assert getattr(getattr(cfg, sec), name) is not None
    assert load_config("sd2-blip").generate.model == "stabilityai/stable-diffusion-2-base"
    assert load_config("sd2-blip").generate.dtype == "bf16"
    assert load_config("tiny").generate.model == "miniature"


def test_overrides_are_typed():
    cfg = load_config("tiny", ["--generate.steps=3", "generate.guidance_scale=2", "--generate.compile=true",
                               "--generate.splits=train,test", "--run.dir=/tmp/x"])
    assert cfg.generate.steps == 3 and isinstance(cfg.generate.steps, int)
    assert cfg.generate.guidance_scale == 2.0 and isinstance(cfg.generate.guidance_scale, float)
    assert cfg.generate.compile is True
    assert cfg.generate.splits == ["train", "test"]
    assert cfg.run.dir == "/tmp/x"


def test_cli_overrides_with_space_and_equals():
    cfg, _ = parse_args(build_parser("generate", ""), ["--config", "tiny", "--generate.steps", "4",
                                                       "--prompts.limit=7"])
    assert (cfg.generate.steps, cfg.prompts.limit) == (4, 7)


@pytest.mark.parametrize("override, message", [
    ("--generate.steps=0", "generate.steps: must be >= 1, got 0"),
    ("--generate.steps=ten", "generate.steps: expected an integer, got 'ten'"),
    ("--generate.height=100", "generate.height: must be a multiple of 8, got 100"),
    ("--generate.scheduler=plms", "generate.scheduler: 'plms' is not one of dpmsolver++, euler, ddim"),
    ("--generate.nope=1", "generate.nope: unknown key in [generate]"),
    ("--bogus.steps=1", "bogus.steps: unknown section [bogus]"),
    ("--prompts.val_fraction=0.95", "prompts.val_fraction + prompts.test_fraction: must be <= 1"),
    ("--generate.splits=train,holdout", "generate.splits: expected a non-empty subset"),
    ("--generate.compile=maybe", "generate.compile: expected true or false, got 'maybe'"),
    ("--prompts.split=random", "prompts.split: 'random' is not one of group, hash"),
    ("--prompts.near_duplicate_threshold=0.3", "prompts.near_duplicate_threshold: must be >= 0.5, got 0.3"),
    ("--prompts.near_duplicate_threshold=1", "prompts.near_duplicate_threshold: must be <= 0.95, got 1.0"),
    ("--prompts.minhash_permutations=8", "prompts.minhash_permutations: must be >= 16, got 8"),
    ("--train.attention=flash", "train.attention: 'flash' is not one of sdpa, eager"),
    ("--evaluate.attention=SDPA", "evaluate.attention: 'SDPA' is not one of sdpa, eager"),
])
def test_errors_name_the_field(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    assert message in str(err.value)


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[generate]\nsteps = 'x'\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: generate\.steps: expected an integer"):
        load_config(bad)
    broken = tmp_path / "broken.toml"
    broken.write_text("[generate\n")
    with pytest.raises(ConfigError, match=r"broken\.toml: invalid TOML"):
        load_config(broken)
    with pytest.raises(ConfigError, match="missing.toml: config file not found"):
        load_config(tmp_path / "missing.toml")


def test_saved_config_loads_back_equal(tmp_path):
    cfg = load_config("tiny", ["--generate.steps=3", "--generate.negative_prompt=blurry, text"])
    save_config(cfg, tmp_path / "config.toml")
    assert load_config(tmp_path / "config.toml") == cfg


def test_fingerprint_follows_only_the_named_sections():
    from revprompt.launch.layout import section_hash

    a, b = Config(), Config()
    b.train.max_steps += 1
    assert section_hash(a, "generate", "run.seed") == section_hash(b, "generate", "run.seed")
    b.generate.steps += 1
    assert section_hash(a, "generate", "run.seed") != section_hash(b, "generate", "run.seed")
