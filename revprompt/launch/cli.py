"""The `revprompt` command: `revprompt <stage> --config FILE [--section.key=value ...]`."""

from __future__ import annotations

import importlib
import sys

# stage -> module with a `main(argv) -> int`
STAGES = {
    "prepare": "revprompt.generation.prepare",
    "generate": "revprompt.generation.job",
    "train": "revprompt.training.loop",
    "export": "revprompt.training.export",
    "caption": "revprompt.evaluation.caption",
    "evaluate": "revprompt.evaluation.evaluate",
    "drift": "revprompt.evaluation.drift",
    "pipeline": "revprompt.pipeline",
    "download": "revprompt.models.download",
}

USAGE = """usage: revprompt <stage> [--config FILE|PRESET] [--section.key=value ...]
       revprompt caption --captioner DIR INPUT... --out FILE.jsonl

stages:
  prepare    read, clean, de-duplicate and split the prompt set
  generate   Stable Diffusion images into WebDataset shards (runs prepare first)
  train      fine-tune the captioner (BLIP, BLIP-2, image-text-to-text; LoRA) on the shards with DeepSpeed ZeRO
  export     consolidate a checkpoint into a Hugging Face captioner (--checkpoint DIR --out DIR)
  caption    recover prompts for images, folders or shards: --captioner DIR INPUT... --out FILE.jsonl
  evaluate   score recovered prompts on the test split (text, attributes, redrawn images) -> eval/
  drift      iterate prompt -> image -> caption -> image and measure the drift -> drift/
  pipeline   generate, train, evaluate and drift in one launch, each stage resuming where it stopped
  download   fetch every model a config names into a folder, with a config.toml that points at them
             (--config CONFIG --to DIR), for compute nodes without a network
  config     print the resolved config (--config FILE|PRESET, overrides) with each key's meaning

Under torchrun: torchrun --nproc_per_node N --no-python revprompt <stage> ...
"""


def show_config(argv: list[str]) -> int:
    """`revprompt config [--config FILE|PRESET] [--section.key=value ...]`: the resolved config with each key's doc."""
    import logging

    from .config import ConfigError, describe
    from .runner import build_parser, parse_args

    parser = build_parser("config", "Print the resolved config (preset or file, overrides applied) with each key's "
                                    "meaning.")
    try:
        cfg, args = parse_args(parser, argv)
    except ConfigError as exc:
        logging.basicConfig(level=logging.INFO)
        logging.getLogger(__name__).error("config error: %s", exc)
        return 2
    print(f"# revprompt config --config {args.config}" + "".join(f" {a}" for a in argv if a.startswith("--") and
                                                                  not a.startswith("--config")))
    print(describe(cfg))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a stage's `main`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if argv else 2
    stage, rest = argv[0], argv[1:]
    if stage == "config":
        return show_config(rest)
    if stage not in STAGES:
        print(f"revprompt: unknown stage {stage!r}\n\n{USAGE}", end="", file=sys.stderr)
        return 2
    try:
        return importlib.import_module(STAGES[stage]).main(rest)
    except KeyboardInterrupt:  # before a stage's own handler is in place (imports, config)
        print(f"revprompt {stage}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


def run() -> int:
    """The console script `revprompt` (and `python -m revprompt.launch.cli`): `main`, with the cycle collector held
    off during start-up and not run over the heap at exit, from a chunk of the frame stack of its own
    (launch/process.py)."""
    from . import process

    process.hold_collection()
    code = process.with_frame_room(main)
    process.skip_collection_at_exit()
    return code


if __name__ == "__main__":
    raise SystemExit(run())
