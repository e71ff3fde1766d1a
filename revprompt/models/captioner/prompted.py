"""Prompted captioners: BLIP-2 and transformers' image-text-to-text models (Llava, PaliGemma, Qwen2-VL, ...).

Their processor puts the image into the text as placeholder tokens, so an image and its text are
encoded together: the model reads `prefix` (the image, and a fixed instruction where the model
needs one, through its chat template when it has one) and is trained to continue it with the
prompt and the end token. Only the prompt's tokens and the end token carry a label: the prefix and
the padding are -100. Captioning feeds the prefix alone (padded on the left) and keeps the new
tokens.
"""

from __future__ import annotations

import logging

import torch
from PIL import Image

log = logging.getLogger(__name__)

# the config attribute an exported prompted captioner keeps its instruction in (plain transformers keeps unknown
# config keys), so that captioning later feeds the prefix it was trained after
INSTRUCTION_KEY = "revprompt_instruction"
DEFAULT_INSTRUCTION = {"blip-2": "", "image-text-to-text": "Write the text prompt that made this image."}


class PromptedEncodingError(ValueError):
    """A tokenizer a prompted captioner cannot be trained with (no end token)."""


def rgb(images: list[Image.Image]) -> list[Image.Image]:
    return [im if im.mode == "RGB" else im.convert("RGB") for im in images]


# the per-token input that marks the learnt part with 1, and whose processor (others, such as Gemma 3's, mark image
# tokens with it, and a 1 on the prompt would let each of its tokens see the ones it must predict)
LEARNT_MARK = ("token_type_ids", "PaliGemmaProcessor")
# the prefix of processors that place parts of it themselves: BLIP-2's puts the image's query tokens before the
# text; PaliGemma's puts its start token after the image token and a newline after the text
PREFIX_FORMS = {"Blip2Processor": "{instruction}", "PaliGemmaProcessor": "{image}{instruction}"}


def prefix_text(processor, instruction: str) -> str:
    """What precedes the prompt: the chat template's user turn (image, instruction) and its generation prompt; else
    the instruction after the image token where the processor wants one in the text (see PREFIX_FORMS for
    processors that place parts of it themselves)."""
    template = getattr(processor, "chat_template", None)
    if template:
        content = [{"type": "image"}] + ([{"type": "text", "text": instruction}] if instruction else [])
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
    image_token = getattr(image_token := getattr(processor, "image_token", None), "content", image_token) or ""
    form = PREFIX_FORMS.get(type(processor).__name__, "{image}{instruction}\n" if instruction else "{image}")
    return form.format(image=image_token, instruction=instruction)


def prepare(model, processor) -> None:
    """Make the processor and the model agree: a pad token, BLIP-2's query-token count, the image token's id."""
    tokenizer = processor.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token is None:
        raise PromptedEncodingError(f"{type(tokenizer).__name__}: the tokenizer has no end token; the captioner "
                                    "could not learn where a prompt stops")
    if type(processor).__name__ == "Blip2Processor" and getattr(processor, "num_query_tokens", None) is None:
        processor.num_query_tokens = model.config.num_query_tokens
    gen = model.generation_config
    gen.pad_token_id = tokenizer.pad_token_id
    # the model's own end tokens (a chat model's end of turn) stay; the tokenizer's end token, which training
    # appends to every prompt, joins them
    ends = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [] if gen.eos_token_id is None \
        else [gen.eos_token_id]
    gen.eos_token_id = ends + [tokenizer.eos_token_id] if tokenizer.eos_token_id not in ends else ends


def _encode(processor, images, texts, side: str) -> dict:
    """The processor's inputs, padded on `side` (asked of the call too: some processors pin their own side), without
    a second start token where the text (a rendered chat template) already begins with one."""
    tokenizer = processor.tokenizer
    options = {"padding": "longest", "return_tensors": "pt", "padding_side": side}
    if tokenizer.bos_token and texts and all(t.startswith(tokenizer.bos_token) for t in texts):
        options["add_special_tokens"] = False
    old, tokenizer.padding_side = tokenizer.padding_side, side
    try:
        return dict(processor(images=rgb(images), text=texts, **options))
    finally:
        tokenizer.padding_side = old


def is_seq2seq(model) -> bool:
    """Whether the text side is an encoder-decoder (BLIP-2 with Flan-T5, Florence-2): the prefix is then the
    encoder's input and the prompt the decoder's."""
    config = model.config
    text = getattr(config, "text_config", None)
    return bool(getattr(config, "is_encoder_decoder", False) or getattr(text, "is_encoder_decoder", False)
                or getattr(config, "use_decoder_only_language_model", True) is False)


def training_inputs(processor, images: list[Image.Image], prompts: list[str], max_length: int,
                    instruction: str, seq2seq: bool = False) -> dict:
    """Model inputs and labels: the prefix through the processor (images expanded into their tokens), then each
    prompt's own tokens (at most `max_length`) and the end token, padded on the right. Only the prompt and the end
    token carry labels; an encoder-decoder (`seq2seq`) reads the prefix and learns the prompt as its decoder's
    labels. The prompt is tokenized on its own, so the tokens learnt are the tokens generation
    continues the prefix with, whatever the tokenizer would merge across the boundary."""
    tokenizer = processor.tokenizer
    head = _encode(processor, images, [prefix_text(processor, instruction)] * len(images), "right")
    lengths = head["attention_mask"].sum(dim=1).tolist()
    tails = [ids + [tokenizer.eos_token_id] for ids in
             tokenizer(list(prompts), add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]]
    if seq2seq:  # the decoder learns the prompt from its start token; the model shifts the labels right itself
        labels = torch.full((len(images), max(len(t) for t in tails)), -100, dtype=torch.long)
        for row, tail in enumerate(tails):
            labels[row, :len(tail)] = torch.tensor(tail)
        return {**head, "labels": labels}
    width = max(n + len(t) for n, t in zip(lengths, tails))
    input_ids = torch.full((len(images), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(images), width), dtype=torch.long)
    labels = torch.full((len(images), width), -100, dtype=torch.long)
    per_token = {k: v for k, v in head.items() if k not in ("input_ids", "attention_mask")
                 and torch.is_tensor(v) and v.shape[:2] == head["input_ids"].shape}
    extended = {k: torch.zeros((len(images), width), dtype=v.dtype) for k, v in per_token.items()}
    for row, (n, tail) in enumerate(zip(lengths, tails)):
        end = n + len(tail)
        input_ids[row, :n] = head["input_ids"][row, :n]
        input_ids[row, n:end] = torch.tensor(tail)
        attention_mask[row, :end] = 1
        labels[row, n:end] = torch.tensor(tail)
        for k, v in per_token.items():  # PaliGemma's token_type_ids: 0 on the prefix, 1 on what it learns
            extended[k][row, :n] = v[row, :n]
            extended[k][row, n:end] = 1 if (k, type(processor).__name__) == LEARNT_MARK else 0
    return {**head, **extended, "input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def caption_images(model, processor, images: list[Image.Image], instruction: str, max_new_tokens: int,
                   num_beams: int = 1, repetition_penalty: float = 1.0, candidates: int = 1) -> list[str]:
    """Captions of `images`: the prefix padded on the left, greedy (or beam) decoding, the new tokens decoded;
    `candidates` > 1 returns that many beams per image, image by image."""
    inputs = _encode(processor, images, [prefix_text(processor, instruction)] * len(images), "left")
    device = next(model.parameters()).device
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    inputs = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=num_beams,
                             repetition_penalty=repetition_penalty, do_sample=False, num_return_sequences=candidates)
    prompt = inputs["input_ids"].repeat_interleave(candidates, dim=0)
    if ids.shape[1] >= prompt.shape[1] and torch.equal(ids[:, :prompt.shape[1]], prompt):
        ids = ids[:, prompt.shape[1]:]  # decoder-only models return the prompt with the new tokens
    return [t.strip() for t in processor.tokenizer.batch_decode(ids, skip_special_tokens=True)]


def vision_module(model) -> torch.nn.Module | None:
    """The vision tower of a prompted captioner (the first module named as transformers names them)."""
    for name in ("vision_model", "vision_tower", "visual", "vision_encoder"):
        for module_name, module in model.named_modules():
            if module_name.split(".")[-1] == name:
                return module
    return None
