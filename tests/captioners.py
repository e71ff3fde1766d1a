"""Small random captioners of each kind revprompt trains beyond BLIP, built offline and saved in the hub's layout.

Tokenizer: a byte-level BPE (the kind OPT, Llama and Qwen use) trained in code on the bundled fashion prompts,
with <s> as the start token that the template puts first, </s> as the end, <pad>, and <image>.
"""

from __future__ import annotations

from pathlib import Path

import torch

SIZE = 32  # vision input, in pixels (patches of 8)
LLAVA_TEMPLATE = ("{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
                  "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
                  "{% if add_generation_prompt %} ASSISTANT: {% endif %}")


def bpe_tokenizer():
    """A byte-level BPE of 600 tokens trained on the bundled prompts: <s> first, </s> ends, <pad>, <image>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from revprompt.prompts.sources import read_prompts

    texts = [p.text for p in read_prompts("bundled")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<pad>", "<s>", "</s>", "<image>"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=special, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   model_max_length=512)
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast


def _seeded(build, seed: int):
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return build()
    finally:
        torch.random.set_rng_state(state)


def _blip2(tok, text, seed: int):
    """A BLIP-2 of width 32 around the language model config `text`, with 4 query tokens, and its processor."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    config = Blip2Config(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, image_size=SIZE, patch_size=8),
                         qformer_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=64, encoder_hidden_size=32, vocab_size=len(tok)),
                         text_config=text.to_dict(), num_query_tokens=4,
                         image_token_index=tok.convert_tokens_to_ids("<image>"))
    model = _seeded(lambda: Blip2ForConditionalGeneration(config), seed)
    processor = Blip2Processor(image_processor=BlipImageProcessorPil(size={"height": SIZE, "width": SIZE}),
                               tokenizer=tok, num_query_tokens=4)
    return model, processor


def blip2(seed: int = 0):
    """(Blip2ForConditionalGeneration with an OPT decoder, Blip2Processor): 4 query tokens, 32 px."""
    from transformers import OPTConfig

    tok = bpe_tokenizer()
    text = OPTConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                     max_position_embeddings=128, word_embed_proj_dim=32, bos_token_id=tok.bos_token_id,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return _blip2(tok, text, seed)


def blip2_t5(seed: int = 0):
    """(Blip2ForConditionalGeneration with a T5 encoder-decoder, as blip2-flan-t5 has, Blip2Processor): the
    Unigram T5 tokenizer of tests/families.py with <image> added."""
    from transformers import T5Config

    from tests.families import t5_tokenizer

    tok = t5_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    text = T5Config(vocab_size=len(tok), d_model=32, d_ff=64, d_kv=8, num_layers=2, num_decoder_layers=2,
                    num_heads=4, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                    decoder_start_token_id=tok.pad_token_id)
    return _blip2(tok, text, seed)


def llava(seed: int = 0):
    """(LlavaForConditionalGeneration with a CLIP vision tower and a Llama decoder, LlavaProcessor with a chat
    template): an AutoModelForImageTextToText model, 16 image tokens, 32 px."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = bpe_tokenizer()
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=SIZE, patch_size=8, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    model = _seeded(lambda: LlavaForConditionalGeneration(config), seed)
    processor = LlavaProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": SIZE},
                                                                     crop_size={"height": SIZE, "width": SIZE}),
                               tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE)
    return model, processor


def paligemma(seed: int = 0):
    """(PaliGemmaForConditionalGeneration with a SigLIP vision tower and a Gemma decoder, PaliGemmaProcessor): an
    AutoModelForImageTextToText model that attends to its prefix both ways (token_type_ids), 16 image tokens."""
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tok = bpe_tokenizer()
    image_processor = SiglipImageProcessorPil(size={"height": SIZE, "width": SIZE})
    image_processor.image_seq_length = (SIZE // 8) ** 2
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=SIZE,
                  patch_size=8, projection_dim=32)
    config = PaliGemmaConfig(vision_config=vision,
                             text_config=dict(model_type="gemma", vocab_size=len(tok), hidden_size=32,
                                              intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                              num_key_value_heads=1, head_dim=8, max_position_embeddings=256,
                                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                              pad_token_id=tok.pad_token_id),
                             image_token_index=tok.convert_tokens_to_ids("<image>"), projection_dim=32)
    return _seeded(lambda: PaliGemmaForConditionalGeneration(config), seed), processor


BUILDERS = {"blip-2": blip2, "blip-2-t5": blip2_t5, "llava": llava, "paligemma": paligemma}


def save_captioner(kind: str, out_dir: Path, seed: int = 0) -> Path:
    """A random captioner of `kind` written by save_pretrained (model and processor), as a download would be."""
    model, processor = BUILDERS[kind](seed)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return out_dir
