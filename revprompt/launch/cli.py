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
}

USAGE = """usage: revprompt <stage> [--config FILE|PRESET] [--section.key=value ...]
       revprompt caption --captioner DIR INPUT... --out FILE.jsonl

stages:
  prepare    read, clean, de-duplicate and split the prompt set
  generate   Stable Diffusion images into WebDataset shards (runs prepare first)
  train      fine-tune the BLIP captioner on the shards with DeepSpeed ZeRO
  export     consolidate a checkpoint into a Hugging Face captioner (--checkpoint DIR --out DIR)
  caption    recover prompts for images, folders or shards: --captioner DIR INPUT... --out FILE.jsonl
  evaluate   score recovered prompts on the test split (text, attributes, redrawn images) -> eval/
  drift      iterate prompt -> image -> caption -> image and measure the drift -> drift/
  pipeline   generate, train, evaluate and drift in one launch, each stage resuming where it stopped
  config     print every config key with its default and meaning

Under torchrun: torchrun --nproc_per_node N --no-python revprompt <stage> ...
"""


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a stage's `main`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if argv else 2
    stage, rest = argv[0], argv[1:]
    if stage == "config":
        from .config import describe

        print(describe())
        return 0
    if stage not in STAGES:
        print(f"revprompt: unknown stage {stage!r}\n\n{USAGE}", end="", file=sys.stderr)
        return 2
    return importlib.import_module(STAGES[stage]).main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
