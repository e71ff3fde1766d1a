"""Export a consolidated Hugging Face captioner: from the live engine, or on demand from any checkpoint."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

log = logging.getLogger(__name__)

HF_SUBDIR = "hf"  # inside each checkpoint: the processor and model config, so export needs nothing else


def save_hf_dir(model, processor, state: dict[str, torch.Tensor] | None, out_dir: Path, info: dict) -> Path:
    """Load `state` into `model` (when given) and write model + processor to `out_dir` atomically."""
    out_dir = Path(out_dir)
    if state is not None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = set(getattr(model, "_tied_weights_keys", None) or [])
        missing = [k for k in missing if k not in tied and not _is_tied(model, k)]
        if missing or unexpected:
            raise RuntimeError(f"export: state does not match the captioner (missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]})")
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    (tmp / "revprompt.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def _is_tied(model, key: str) -> bool:
    # BLIP ties the decoder's output projection to its word embeddings
    return key.endswith("cls.predictions.decoder.weight") or key.endswith("cls.predictions.decoder.bias")


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Consolidate a DeepSpeed checkpoint folder (any ZeRO stage, any world size) into an HF directory.

    Runs in one process. Every file is read with weights-only unpickling.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipProcessor

    from .engine import allow_deepspeed_checkpoint_types, force_weights_only_loads

    checkpoint = Path(checkpoint)
    hf = checkpoint / HF_SUBDIR
    if not (hf / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint}: not a revprompt checkpoint (no {HF_SUBDIR}/config.json)")
    force_weights_only_loads()
    allow_deepspeed_checkpoint_types()
    if list(checkpoint.glob("*optim_states.pt")):
        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    else:  # ZeRO-0 (what a one-rank job runs): the whole model is in the model-states file
        files = sorted(checkpoint.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise FileNotFoundError(f"{checkpoint}: no DeepSpeed model states (mp_rank_*_model_states.pt)")
        module = torch.load(files[0], map_location="cpu", weights_only=True)["module"]
        state = {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
    model = BlipForConditionalGeneration(BlipConfig.from_pretrained(hf))
    processor = BlipProcessor.from_pretrained(hf)
    client = json.loads((hf / "position.json").read_text()) if (hf / "position.json").is_file() else {}
    return save_hf_dir(model, processor, state, Path(out_dir), {"from_checkpoint": str(checkpoint), **client})


def main(argv: list[str] | None = None) -> int:
    """Entry point of `revprompt export --checkpoint DIR --out DIR`."""
    import argparse

    parser = argparse.ArgumentParser(prog="revprompt export",
                                     description="Consolidate a training checkpoint into a Hugging Face captioner.")
    parser.add_argument("--checkpoint", required=True, help="a checkpoints/step-N folder")
    parser.add_argument("--out", required=True, help="output directory (replaced atomically)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        path = export_checkpoint(args.checkpoint, args.out)
    except (FileNotFoundError, RuntimeError, ValueError) as exc:
        log.error("export failed: %s", exc)
        return 1
    log.info("exported %s to %s", args.checkpoint, path)
    return 0
