"""Train the miniature text-to-image model that the tiny preset ships: renders of the bundled prompts.

A real diffusers latent-diffusion model (AutoencoderKL, UNet2DConditionModel, CLIP text encoder on
the offline BERT vocabulary), small enough for a CPU, trained from scratch on `render.render` of
the bundled styles.csv rows whose prompts fall in the train and val splits (the test split stays
held out), then saved with StableDiffusionPipeline.save_pretrained in float16 safetensors.

    python -m revprompt.models.miniature.train --out revprompt/models/miniature/weights --seed 0

reproduces the shipped weights' recipe (the numbers in the weights' revprompt-miniature.json).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..builtin import MINIATURE_WEIGHTS as WEIGHTS

log = logging.getLogger(__name__)



def build_components(seed: int = 0) -> dict:
    """The miniature's architecture, randomly initialised from `seed`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..text_to_image import TEXT_MAX_TOKENS, offline_tokenizer

    tokenizer = offline_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=TEXT_MAX_TOKENS, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id))
    # 64 px images, 8 x 8 latents: what a 2-core CPU trains in minutes
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(64, 96), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(16, 32, 32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4, norm_num_groups=8, sample_size=64)
    return dict(text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, vae=vae)


def training_rows(val_fraction: float = 0.1, test_fraction: float = 0.1) -> tuple[list, list]:
    """(rows to train on, held-out rows) of the bundled prompt set, split as the tiny preset splits it."""
    from ...prompts.prepared import split_of
    from ...prompts.sources import read_prompts

    train, held_out = [], []
    for prompt in read_prompts("bundled"):
        row = dict(prompt.attributes, productDisplayName=prompt.text)
        (held_out if split_of(prompt.text, val_fraction, test_fraction) == "test" else train).append((prompt.text, row))
    return train, held_out


def to_tensor(images) -> torch.Tensor:
    """PIL images -> NCHW float in [-1, 1]."""
    arr = np.stack([np.asarray(i, dtype=np.float32) for i in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def encoder_means(vae, pixels: torch.Tensor) -> torch.Tensor:
    """The VAE encoder's latent means of `pixels`, in chunks of 256."""
    with torch.no_grad():
        return torch.cat([vae.encode(pixels[i:i + 256]).latent_dist.mean for i in range(0, len(pixels), 256)])


def optimise(name: str, steps: int, batch_loss: Callable[[], torch.Tensor], opt, params: list | None = None,
             sched=None, log_every: int = 200, window: int = 50) -> list[float]:
    """The loop every stage shares: a batch's loss, a step (gradients clipped to norm 1 when `params` are
    given, then the schedule), the loss kept, and the mean of the last `window` losses logged now and then."""
    losses = []
    for step in range(steps):
        loss = batch_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if params is not None:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
        if step % log_every == 0 or step == steps - 1:
            log.info("%s step %d/%d: loss %.4f", name, step + 1, steps, np.mean(losses[-window:]))
    return losses


def train_vae(vae, pixels: torch.Tensor, steps: int, batch: int, seed: int) -> list[float]:
    """Reconstruction (MSE) with a light KL term."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)

    def batch_loss() -> torch.Tensor:
        x = pixels[torch.randint(0, len(pixels), (batch,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        return F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()

    vae.train()
    losses = optimise("vae", steps, batch_loss, opt)
    vae.eval()
    return losses


def train_decoder(vae, pixels: torch.Tensor, steps: int, batch: int, seed: int, jitter: float = 0.1) -> list[float]:
    """Sharpen the decoder on the frozen encoder's latents (so a trained UNet's latent space stays valid).

    The latents get a little noise, as the UNet's samples never land exactly on the encoder's means.
    """
    gen = torch.Generator().manual_seed(seed + 1)
    means = encoder_means(vae, pixels)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)

    def batch_loss() -> torch.Tensor:
        idx = torch.randint(0, len(pixels), (batch,), generator=gen)
        z = means[idx] + jitter * means.std() * torch.randn(means[idx].shape, generator=gen)
        return F.mse_loss(vae.decode(z).sample, pixels[idx])

    vae.train()
    losses = optimise("decoder", steps, batch_loss, opt, sched=torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps))
    vae.eval()
    return losses


def encode_texts(tokenizer, text_encoder, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention-free hidden states, as StableDiffusionPipeline encodes prompts."""
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return ids, text_encoder(ids)[0]


def train_unet(components: dict, latents: torch.Tensor, texts: list[str], steps: int, batch: int, seed: int,
               drop: float = 0.1, lr: float = 5e-4) -> list[float]:
    """Epsilon prediction under SD's noise schedule; the text encoder learns with the UNet; 10% empty prompts."""
    from diffusers import DDPMScheduler

    unet, text_encoder, tokenizer = components["unet"], components["text_encoder"], components["tokenizer"]
    noise_schedule = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                   beta_schedule="scaled_linear")
    gen = torch.Generator().manual_seed(seed)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    all_ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                      return_tensors="pt").input_ids[0]

    def batch_loss() -> torch.Tensor:
        idx = torch.randint(0, len(latents), (batch,), generator=gen)
        z0 = latents[idx]
        ids = all_ids[idx].clone()
        ids[torch.rand(batch, generator=gen) < drop] = empty
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, 1000, (batch,), generator=gen)
        pred = unet(noise_schedule.add_noise(z0, noise, t), t, encoder_hidden_states=text_encoder(ids)[0]).sample
        return F.mse_loss(pred, noise)

    unet.train()
    text_encoder.train()
    losses = optimise("unet", steps, batch_loss, opt, params=params, sched=sched, log_every=250, window=100)
    unet.eval()
    text_encoder.eval()
    return losses


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The recipe's options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=500)
    parser.add_argument("--unet-steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--decoder-steps", type=int, default=1500)
    parser.add_argument("--unet-lr", type=float, default=5e-4, help="peak learning rate of the UNet stage")
    parser.add_argument("--stages", default="vae,unet,decoder",
                        help="comma-separated: vae, unet, decoder (each continues from the previous)")
    parser.add_argument("--init", type=Path, default=None, help="start from a saved miniature instead of random")
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args(argv)


def starting_point(args: argparse.Namespace) -> tuple[dict, dict]:
    """(components, record so far): random from the seed, or a saved miniature with its record."""
    components = build_components(args.seed)  # seeds torch's generator either way, as the recorded recipes did
    if args.init is None:
        return components, {}
    from diffusers import StableDiffusionPipeline

    loaded = StableDiffusionPipeline.from_pretrained(args.init, dtype=torch.float32, safety_checker=None,
                                                     feature_extractor=None, requires_safety_checker=False)
    previous = args.init / "revprompt-miniature.json"
    return (dict(text_encoder=loaded.text_encoder, tokenizer=loaded.tokenizer, unet=loaded.unet, vae=loaded.vae),
            json.loads(previous.read_text()) if previous.is_file() else {})


def run_stages(args: argparse.Namespace, components: dict, record: dict, pixels: torch.Tensor,
               texts: list[str]) -> None:
    """The VAE, UNet and decoder stages asked for, in that order, noting their losses in `record`."""
    stages = set(args.stages.split(","))
    vae = components["vae"]
    if "vae" in stages:
        record["final_vae_loss"] = float(np.mean(train_vae(vae, pixels, args.vae_steps, args.batch, args.seed)[-50:]))
        record["vae_steps"] = args.vae_steps
        vae.register_to_config(scaling_factor=float(1.0 / encoder_means(vae, pixels).std()))
    if "unet" in stages:
        losses = train_unet(components, encoder_means(vae, pixels) * vae.config.scaling_factor, texts,
                            args.unet_steps, args.batch, args.seed + ("unet_steps" in record), lr=args.unet_lr)
        record["unet_steps"] = record.get("unet_steps", 0) + args.unet_steps
        record["final_unet_loss"] = float(np.mean(losses[-200:]))
    if "decoder" in stages:
        losses = train_decoder(vae, pixels, args.decoder_steps, args.batch, args.seed)
        record.update(decoder_steps=args.decoder_steps, final_decoder_loss=float(np.mean(losses[-50:])))


def main(argv: list[str] | None = None) -> int:
    """Train and save the miniature; prints where it went."""
    import sys

    from diffusers import StableDiffusionPipeline

    from ..text_to_image import make_scheduler
    from .render import render

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    start = time.monotonic()
    train, held_out = training_rows()
    pixels = to_tensor([render(row) for _, row in train])
    log.info("%d training renders, %d held-out prompts", len(train), len(held_out))
    components, record = starting_point(args)
    run_stages(args, components, record, pixels, [t for t, _ in train])
    pipe = StableDiffusionPipeline(**components, scheduler=make_scheduler("dpmsolver++"), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16)
    args.out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(args.out, safe_serialization=True)
    command = "python -m revprompt.models.miniature.train " + " ".join(sys.argv[1:] if argv is None else argv)
    record.setdefault("commands", []).append(command)
    record.pop("command", None)
    record.update(seed=args.seed, batch=args.batch, train_prompts=len(train), held_out_prompts=len(held_out),
                  latent_scaling_factor=components["vae"].config.scaling_factor, torch=torch.__version__)
    record["seconds"] = round(record.get("seconds", 0) + time.monotonic() - start, 1)
    (args.out / "revprompt-miniature.json").write_text(json.dumps(record, indent=2) + "\n")
    log.info("saved the miniature to %s in %.0f s", args.out, record["seconds"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
