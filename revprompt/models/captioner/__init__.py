"""Captioners, one interface over three kinds of model.

- `blip` (blip.py): BlipForConditionalGeneration, base or large; the built-in `miniature` and
  `random-tiny` are BLIP-shaped. Fed as before: pixels and the prompt after [DEC].
- `blip-2` and `image-text-to-text` (prompted.py): Blip2ForConditionalGeneration and the models of
  transformers' AutoModelForImageTextToText (Llava, PaliGemma, Qwen2-VL, ...), fed through their
  processor with the image in the text, trained on the prompt's tokens only, after a fixed
  instruction where the model needs one. BLIP-2's vision tower is always frozen.
- LoRA adapters (peft) for every kind (lora.py); an export merges them, or keeps the adapter alone.
- Attention: the others load with transformers' SDPA; BLIP, which transformers runs only eager, is switched to
  SDPA after loading (attention.py) unless `attention = "eager"` (train.attention, evaluate.attention).

The kind comes from the model's config (`model_type`), for a hub id, a folder or an export alike.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from PIL import Image

from ..builtin import MINIATURE, MINIATURE_CAPTIONER, RANDOM_TINY, ModelLoadError, builtin_name, load_failure
from . import prompted
from .blip import (BOS, IMAGE_MEAN, IMAGE_STD, TextBatch, build_tiny_captioner, caption_dtype, check_special_tokens,
                   decode_captions, decoder_positions, encode_prompts, generate_captions, image_array,
                   image_size_of, offline_blip_tokenizer, planar_image, preprocess_images)
from .blip import caption_budget as blip_caption_budget
from .blip import limit_generation as blip_limit_generation
from .lora import ADAPTER_CONFIG, add_lora, base_model, is_adapter_dir, load_adapter

__all__ = ["BOS", "IMAGE_MEAN", "IMAGE_STD", "TextBatch", "build_tiny_captioner", "caption_dtype",
           "check_special_tokens", "decode_captions", "decoder_positions", "encode_prompts", "generate_captions",
           "image_array", "image_size_of", "offline_blip_tokenizer", "planar_image", "preprocess_images", "BLIP",
           "BLIP2", "IMAGE_TEXT_TO_TEXT",
           "KINDS", "add_lora", "base_model", "is_adapter_dir", "kind_of", "kind_for_type", "build_captioner",
           "load_exported", "Captioner", "TrainingInputs", "freeze_vision", "caption_budget", "limit_generation",
           "caption_batch", "instruction_of", "set_instruction", "base_name", "ATTENTIONS", "set_attention"]

log = logging.getLogger(__name__)

BLIP, BLIP2, IMAGE_TEXT_TO_TEXT = "blip", "blip-2", "image-text-to-text"
KINDS = (BLIP, BLIP2, IMAGE_TEXT_TO_TEXT)
WHAT = "captioner (BLIP, BLIP-2 or an image-text-to-text model of transformers)"
SDPA, EAGER = "sdpa", "eager"
ATTENTIONS = (SDPA, EAGER)


def kind_for_type(model_type: str, key: str, value: str) -> str:
    """The kind of a model_type: BLIP, BLIP-2, or one AutoModelForImageTextToText knows; else a clear error."""
    if model_type == "blip":
        return BLIP
    if model_type == "blip-2":
        return BLIP2
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return IMAGE_TEXT_TO_TEXT
    raise ModelLoadError(f"{key} = {value!r}: a {model_type or 'model of unknown type'}, not a captioner revprompt "
                         "trains (BLIP, BLIP-2, or a model of transformers' AutoModelForImageTextToText)")


def kind_of(model) -> str:
    """The kind of a loaded captioner (a peft wrapper counts as its base model)."""
    return kind_for_type(base_model(model).config.model_type, "captioner", type(base_model(model)).__name__)


def _classes(kind: str):
    import transformers

    if kind == BLIP:
        return transformers.BlipForConditionalGeneration, transformers.BlipProcessor
    if kind == BLIP2:
        return transformers.Blip2ForConditionalGeneration, transformers.AutoProcessor
    return transformers.AutoModelForImageTextToText, transformers.AutoProcessor


def _from_pretrained(name: str, key: str, dtype: torch.dtype | None = None):
    """(model, processor, kind) of a folder or hub id, SDPA attention where the kind has it."""
    from transformers import AutoConfig

    try:
        kind = kind_for_type(AutoConfig.from_pretrained(name).model_type, key, name)
    except (OSError, ValueError) as exc:
        raise load_failure(key, name, WHAT, exc) from None
    model_class, processor_class = _classes(kind)
    options = {} if dtype is None else {"dtype": dtype}
    if kind != BLIP:  # transformers runs BLIP's attention eager only: set_attention switches it afterwards
        options["attn_implementation"] = "sdpa"
    try:
        model = model_class.from_pretrained(name, **options)
        processor = processor_class.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise load_failure(key, name, f"{kind} captioner", exc) from None
    if kind != BLIP:
        prompted.prepare(model, processor)
    return model, processor


def set_attention(model, attention: str, key: str = "train.attention") -> int:
    """Run a BLIP captioner's attention as `attention` says ('sdpa': torch's fused kernel, the same numbers;
    'eager': transformers' matmul + softmax, as loaded); other kinds load with SDPA and keep it. Returns the
    number of attention modules switched to SDPA; `key` is the setting that asked, for errors."""
    if attention not in ATTENTIONS:
        raise ValueError(f"{key}: {attention!r} is not one of {', '.join(ATTENTIONS)}")
    if attention == EAGER or kind_of(model) != BLIP:
        return 0
    from .attention import use_sdpa

    switched = use_sdpa(model)
    log.info("BLIP attention: %d modules run SDPA (%s = %r)", switched, key, attention)
    return switched


def build_captioner(name: str = MINIATURE, seed: int = 0, attention: str = SDPA,
                    key: str = "train.attention"):
    """(model, processor) from a hub id, a local directory, `random-tiny` (a random BLIP from `seed`) or
    `miniature` (models/miniature/captioner: the same model, its vision tower trained on product renders);
    BLIP's attention as `attention` (the setting `key`) says."""
    name = builtin_name("captioner", name)
    if name == MINIATURE:
        name = str(MINIATURE_CAPTIONER)
    if name == RANDOM_TINY:
        model, processor = build_tiny_captioner(seed)
    else:
        model, processor = _from_pretrained(name, "train.captioner")
    if kind_of(model) == BLIP:
        check_special_tokens(model, processor.tokenizer)
    set_attention(model, attention, key)
    return model, processor


def base_name(name: str) -> str:
    """What an adapter records as its base model: a built-in name's folder, a local folder's absolute path, a hub id
    as it is."""
    name = builtin_name("captioner", name)
    if name == MINIATURE:
        return str(MINIATURE_CAPTIONER)
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def load_exported(path: str | Path, device: torch.device, key: str = "caption.captioner", attention: str = SDPA):
    """(model, processor) of an exported captioner (or any captioner folder or hub id; an adapter-only export is
    put on its base model), through plain from_pretrained, on `device` in its captioning dtype, BLIP's attention
    as `attention` (evaluate.attention) says; `key` is the setting that named it, for errors."""
    dtype = caption_dtype(device)
    if is_adapter_dir(path):
        base = json.loads((Path(path) / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
        model, _ = _from_pretrained(str(base), f"{key} (the base model its adapter names)", dtype)
        try:
            processor = _classes(kind_of(model))[1].from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise load_failure(key, str(path), "captioner processor", exc) from None
        model = load_adapter(model, path)
        if kind_of(model) != BLIP:
            prompted.prepare(model, processor)
            info = Path(path) / "revprompt.json"
            if info.is_file():
                set_instruction(model, json.loads(info.read_text(encoding="utf-8")).get("instruction", ""))
    else:
        model, processor = _from_pretrained(str(path), key, dtype)
    set_attention(model, attention, "evaluate.attention")
    return model.to(device).eval(), processor


# ------------------------------------------------------------------ training
class TrainingInputs:
    """Images and prompts to a micro-batch's model inputs (with labels) for one captioner; picklable, so DataLoader
    workers run it."""

    def __init__(self, model, processor, max_length: int, static: bool = False):
        """`static` pads BLIP's text to max_length rather than to the batch's longest prompt: every micro-batch has
        one shape, so a compiled model compiles once (train.compile)."""
        self.kind, self.processor, self.max_length, self.static = kind_of(model), processor, max_length, static
        self.image_size = image_size_of(base_model(model)) if self.kind == BLIP else None
        self.instruction = instruction_of(model)
        self.seq2seq = self.kind != BLIP and prompted.is_seq2seq(base_model(model))
        self.prompt_ids: dict[str, list[int]] = {}  # BLIP: each process remembers the prompts it tokenised

    def prepare(self, sample: dict) -> dict:
        """Once per decoded sample, before a training reader's cache keeps it: BLIP's image becomes the planar uint8
        tensor its batches are stacked from (RGB at the model's size, channels first), so later epochs neither convert,
        resize nor transpose it again. Other kinds' processors take the image as it is."""
        if self.kind == BLIP:
            sample["image"] = planar_image(sample["image"], self.image_size)
        return sample

    def __call__(self, images: list[Image.Image | torch.Tensor], prompts: list[str]) -> dict[str, torch.Tensor]:
        if self.kind == BLIP:
            text = encode_prompts(self.processor.tokenizer, prompts, self.max_length, static=self.static,
                                  memo=self.prompt_ids)
            return {"pixel_values": preprocess_images(images, self.image_size), "input_ids": text.input_ids,
                    "attention_mask": text.attention_mask, "labels": text.labels}
        return prompted.training_inputs(self.processor, images, prompts, self.max_length, self.instruction,
                                        self.seq2seq)


def freeze_vision(model) -> int:
    """Freeze the vision encoder; returns the number of parameters frozen."""
    base = base_model(model)
    module = base.vision_model if kind_of(base) == BLIP else prompted.vision_module(base)
    if module is None:
        raise ValueError(f"{type(base).__name__}: no vision tower found to freeze (train.freeze_vision)")
    frozen = 0
    for p in module.parameters():
        p.requires_grad_(False)
        frozen += p.numel()
    return frozen


def instruction_of(model) -> str:
    """The instruction a prompted captioner reads before its caption ('' for BLIP)."""
    base = base_model(model)
    if kind_of(base) == BLIP:
        return ""
    value = getattr(base.config, prompted.INSTRUCTION_KEY, None)
    return prompted.DEFAULT_INSTRUCTION[kind_of(base)] if value is None else value


def set_instruction(model, instruction: str) -> str:
    """Fix the instruction of a prompted captioner ('' = its kind's default) in its config (exported with it)."""
    base = base_model(model)
    kind = kind_of(base)
    if kind == BLIP:
        if instruction:
            raise ValueError("train.instruction: BLIP captions without one; leave it empty")
        return ""
    chosen = instruction or prompted.DEFAULT_INSTRUCTION[kind]
    setattr(base.config, prompted.INSTRUCTION_KEY, chosen)
    return chosen


# ------------------------------------------------------------------ captioning
def caption_budget(model, wanted: int) -> int:
    """New tokens a caption may take (BLIP: within its decoder's positions)."""
    return blip_caption_budget(base_model(model), wanted) if kind_of(model) == BLIP else wanted


def limit_generation(model, max_new_tokens: int) -> None:
    """Write the caption length into the model's generation config, for plain transformers."""
    base = base_model(model)
    if kind_of(base) == BLIP:
        blip_limit_generation(base, max_new_tokens)
    else:
        base.generation_config.max_new_tokens = max_new_tokens


def caption_batch(model, processor, images: list[Image.Image], max_new_tokens: int, num_beams: int = 1,
                  repetition_penalty: float = 1.0, candidates: int = 1) -> list[str]:
    """Captions of one batch of images, on the model's device and dtype; with `candidates` > 1, that many
    beams per image (num_beams at least as many), image by image."""
    num_beams = max(num_beams, candidates)
    if kind_of(model) == BLIP:
        param = next(model.parameters())
        pixels = preprocess_images(images, image_size_of(base_model(model))).to(param.device, param.dtype)
        return generate_captions(model, processor.tokenizer, pixels, max_new_tokens, num_beams, repetition_penalty,
                                 candidates)
    return prompted.caption_images(model, processor, images, instruction_of(model), max_new_tokens, num_beams,
                                   repetition_penalty, candidates)


class Captioner:
    """A captioner on a device with fixed decoding settings: images in, captions out, in batches."""

    def __init__(self, model, processor, device: torch.device, *, batch_size: int, max_new_tokens: int,
                 num_beams: int, repetition_penalty: float):
        self.dtype = caption_dtype(device)
        self.model = model.to(device, self.dtype).eval()
        self.processor, self.device = processor, device
        self.batch_size, self.max_new_tokens = batch_size, caption_budget(self.model, max_new_tokens)
        self.num_beams, self.repetition_penalty = num_beams, repetition_penalty

    def __call__(self, images: list[Image.Image]) -> list[str]:
        """Captions in chunks of `batch_size`."""
        out: list[str] = []
        for start in range(0, len(images), self.batch_size):
            out += caption_batch(self.model, self.processor, images[start:start + self.batch_size],
                                 self.max_new_tokens, self.num_beams, self.repetition_penalty)
        return out

    def candidates(self, images: list[Image.Image], k: int) -> list[list[str]]:
        """The `k` best beams of each image (beam search of max(num_beams, k) beams), in chunks of `batch_size`."""
        flat: list[str] = []
        for start in range(0, len(images), self.batch_size):
            flat += caption_batch(self.model, self.processor, images[start:start + self.batch_size],
                                  self.max_new_tokens, self.num_beams, self.repetition_penalty, candidates=k)
        return [flat[i * k:(i + 1) * k] for i in range(len(images))]
