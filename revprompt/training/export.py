"""Export a consolidated Hugging Face captioner: from the live engine, or on demand from any checkpoint."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from ..launch.layout import EXPORT_INFO, private_sibling, remove_dead_siblings, swap_folder
from ..models.captioner import BLIP, add_lora, base_model, base_name, instruction_of, kind_of, limit_generation
from ..models.captioner.head import (CaptionerWithHead, HeadError, build_embedding_head, read_head_info,
                                     save_embedding_head)
from ..models.captioner.lora import merged
from ..shards.writer import write_error
from .checkpoints import HF_SUBDIR, checkpoint_problem, read_position

log = logging.getLogger(__name__)

DEFAULT_CAPTION_TOKENS = 40  # train.max_length's default: what a caption was trained to be at most


class ExportError(RuntimeError):
    """The export cannot go where it was asked to; nothing was written there."""


class StateMismatch(RuntimeError):
    """Weights that do not fit the captioner they are exported as."""


def check_export_target(out_dir: Path) -> None:
    """Refuse an `out_dir` that is a file, or a folder holding anything but a previous revprompt export."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir}: exists and is not a folder; give the export a folder of its own")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not (out_dir / EXPORT_INFO).is_file():
        shown = ", ".join(sorted(p.name for p in out_dir.iterdir())[:5])
        raise ExportError(f"{out_dir}: holds files that are not a revprompt export ({shown}); revprompt replaces "
                          "only a folder it exported before: choose a new or empty folder")
    try:
        listed = json.loads((out_dir / EXPORT_INFO).read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        listed = None
    if listed is not None:  # exports before the list existed are replaced as the marker says
        extra = sorted(p.name for p in out_dir.iterdir() if p.name not in set(listed))
        if extra:
            raise ExportError(f"{out_dir}: a revprompt export that now also holds {', '.join(extra[:5])}, which "
                              "the export did not write; move them, or choose another folder")


def save_hf_dir(model, processor, state: dict[str, torch.Tensor] | None, out_dir: Path, info: dict, *,
                merge: bool = True) -> Path:
    """Load `state` into `model` (when given) and write model + processor to `out_dir` atomically.

    A CaptionerWithHead is written as its captioner, with the head beside it (embedding_head.safetensors and
    embedding_head.json, listed in revprompt.json like every file the export writes). A model with LoRA
    adapters is written with the adapters merged into its weights (`merge`; the adapters are folded into
    `model` itself), or as the adapter alone, which peft puts on its base model.

    `out_dir` must be new, empty, or a previous revprompt export (its `revprompt.json` says so); anything
    else is refused before a byte is written. The export is written beside it under a hidden name and
    swapped in, so a failure or a kill never leaves half an export, and the temporary folder goes on
    every path (a killed process's is removed by the next export).
    """
    out_dir = Path(out_dir)
    check_export_target(out_dir)
    if state is not None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        # a tied weight (BLIP's decoder projection, a language model's head) is one parameter under two names:
        # loaded under the name named_parameters gives it
        own = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
        missing = [k for k in missing if k in own]
        if missing or unexpected:
            raise StateMismatch(f"the weights do not match the captioner (missing {missing[:5]}, "
                                f"unexpected {unexpected[:5]})")
    head = None
    if isinstance(model, CaptionerWithHead):
        head, site, model = model.head, model.site, model.captioner
    # plain transformers generates with the export's generation_config.json: keep it inside the decoder
    trained_tokens = ((info.get("made_from") or {}).get("train") or {}).get("max_length", DEFAULT_CAPTION_TOKENS)
    limit_generation(model, trained_tokens)
    adapter_only = base_model(model) is not model and not merge
    if not adapter_only:
        model = merged(model)
    if kind_of(model) != BLIP:
        info = {**info, "instruction": instruction_of(model)}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_siblings(out_dir)
    tmp = private_sibling(out_dir, "tmp")
    try:
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            processor.save_pretrained(tmp)
            if head is not None:
                # the vision module's name in the plain transformers model: what a reader calls for the feature
                save_embedding_head(head, tmp, {"captioner_class": type(base_model(model)).__name__,
                                                "vision_module": site.path, "step": info.get("step")})
            files = sorted(p.name for p in tmp.iterdir()) + [EXPORT_INFO]
            (tmp / EXPORT_INFO).write_text(json.dumps({**info, "files": files}, indent=2, sort_keys=True) + "\n")
        except Exception as exc:  # a full disk surfaces as OSError, or as safetensors' own error
            raise write_error(out_dir, "the exported captioner", exc) from None
        check_export_target(out_dir)  # still true after the minutes the weights took
        old = swap_folder(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out_dir


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, merge: bool = True) -> Path:
    """Consolidate a DeepSpeed checkpoint folder (any ZeRO stage, any world size) into an HF directory; LoRA adapters
    merged into the weights, or (`merge` false) saved alone.

    Runs in one process. Every file is read with weights-only unpickling.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from .engine import allow_deepspeed_checkpoint_types, force_weights_only_loads

    checkpoint = Path(checkpoint)
    hf = checkpoint / HF_SUBDIR
    if not (hf / "config.json").is_file():
        raise ExportError(f"{checkpoint}: not a revprompt checkpoint (no {HF_SUBDIR}/config.json)")
    problem = checkpoint_problem(checkpoint)
    if problem is not None:
        raise ExportError(f"{checkpoint}: {problem}; export a committed checkpoint (the newest one training "
                          "resumes from)")
    force_weights_only_loads()
    allow_deepspeed_checkpoint_types()
    # ZeRO-0 to 2 write mp_rank_00_model_states.pt, ZeRO-3 one zero_pp_rank_R_mp_rank_00_model_states.pt per rank
    files = sorted(checkpoint.glob("mp_rank_*_model_states.pt")) or \
        sorted(checkpoint.glob("*mp_rank_*_model_states.pt"))
    if not files:
        raise ExportError(f"{checkpoint}: no DeepSpeed model states (mp_rank_*_model_states.pt)")
    partitioned = any(checkpoint.glob("*optim_states.pt"))  # ZeRO 1-3: the optimizer holds the trained weights
    module = torch.load(files[0], map_location="cpu", weights_only=True).get("module") or {}
    # under ZeRO-3 the module's entries are empty placeholders: the optimizer's partitions below replace them
    module = {k: v for k, v in module.items() if v.numel() or not partitioned}
    state = {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
    if partitioned:
        # the optimizer's partitions hold the trained weights; ZeRO-1 leaves frozen ones (a frozen vision tower, the
        # base under LoRA adapters) out of them, and they are unchanged in the model states
        state.update(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name))
    model, processor = captioner_from_config(hf)
    client = read_position(checkpoint)
    train = (client.get("made_from") or {}).get("train") or {}
    if train.get("lora_rank"):  # the checkpoint holds an adapter-wrapped model: wrap this one the same way
        model = add_lora(model, kind_of(model), train["lora_rank"], train["lora_alpha"], train["lora_targets"],
                         base_name(train["captioner"]))
    try:
        record = read_head_info(hf)
        if record is not None:  # trained with an embedding head: its weights are the state's head.* entries
            model = CaptionerWithHead(model, build_embedding_head(record))
    except HeadError as exc:
        raise ExportError(f"{checkpoint}: {exc}") from None
    try:
        return save_hf_dir(model, processor, state, Path(out_dir), {"from_checkpoint": str(checkpoint), **client},
                           merge=merge)
    except StateMismatch as exc:
        raise ExportError(f"{checkpoint}: {exc}") from None


def captioner_from_config(folder: Path):
    """(model with its architecture, untrained; processor) from a checkpoint's config and processor files."""
    import transformers
    from transformers import AutoConfig

    from ..models.captioner import BLIP2, kind_for_type, prompted

    config = AutoConfig.from_pretrained(folder)
    kind = kind_for_type(config.model_type, "export.checkpoint", str(folder))
    if kind == BLIP:
        return (transformers.BlipForConditionalGeneration(config), transformers.BlipProcessor.from_pretrained(folder))
    model = (transformers.Blip2ForConditionalGeneration(config) if kind == BLIP2
             else transformers.AutoModelForImageTextToText.from_config(config))
    processor = transformers.AutoProcessor.from_pretrained(folder)
    prompted.prepare(model, processor)
    return model, processor


def export_stage(ctx) -> Path:
    """`revprompt export` with the [export] section: consolidate export.checkpoint into export.out."""
    e = ctx.cfg.export
    if not e.checkpoint or not e.out:
        raise ExportError("export.checkpoint and export.out are both needed (--checkpoint DIR --out DIR)")
    path = export_checkpoint(e.checkpoint, e.out, merge=e.lora_merge)
    log.info("exported %s to %s", e.checkpoint, path)
    return path


def main(argv: list[str] | None = None) -> int:
    """Entry point of `revprompt export --checkpoint DIR --out DIR`."""
    from ..launch.runner import build_parser, run_stage

    parser = build_parser("export", "Consolidate a training checkpoint into a Hugging Face captioner.")
    parser.add_argument("--checkpoint", dest="export.checkpoint", help="a committed checkpoints/step-N folder")
    parser.add_argument("--out", dest="export.out", help="output folder: new, empty, or an earlier export "
                                                         "(replaced atomically); anything else is refused")
    return run_stage("export", argv if argv is not None else [], parser, export_stage, uses_run_dir=False)
