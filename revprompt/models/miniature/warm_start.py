"""Warm-start the tiny captioner: its vision tower learns to read product renders; its text decoder stays random.

The vision tower of `build_tiny_captioner(seed)` is trained with four linear heads (articleType,
baseColour, gender, pattern) on renders of the bundled prompts' train and val splits; the heads are
then dropped and the whole captioner saved with save_pretrained. Captioning is not taught: before
fine-tuning the captioner still writes noise (the "zero-shot" of the tiny preset), but fine-tuning
starts from eyes that already see colour, shape and the gender mark.

    python -m revprompt.models.miniature.warm_start --out revprompt/models/miniature/captioner --steps 600 --seed 0
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..builtin import MINIATURE_CAPTIONER as CAPTIONER

log = logging.getLogger(__name__)



def main(argv: list[str] | None = None) -> int:
    """Train the vision tower on renders and save the warm-started captioner."""
    import sys

    from ..captioner import build_captioner, preprocess_images
    from .render import PALETTE, PATTERNS, SHAPES, pattern_of, render
    from .train import training_rows

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=CAPTIONER)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    start = time.monotonic()
    model, processor = build_captioner("random-tiny", args.seed, attention="eager")  # as the shipped weights were made
    rows = [row for _, row in training_rows()[0]]
    pixels = preprocess_images([render(row) for row in rows], 64)
    classes = [sorted(SHAPES), sorted(PALETTE), ["Boys", "Girls", "Men", "Unisex", "Women"], sorted(PATTERNS)]
    labels = torch.tensor([[classes[0].index(r["articleType"]), classes[1].index(r["baseColour"]),
                            classes[2].index(r["gender"]), classes[3].index(pattern_of(r["productDisplayName"]))]
                           for r in rows])
    vision = model.vision_model
    torch.manual_seed(args.seed)
    heads = nn.ModuleList([nn.Linear(vision.config.hidden_size, len(c)) for c in classes])
    opt = torch.optim.AdamW(list(vision.parameters()) + list(heads.parameters()), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    vision.train()
    for step in range(args.steps):
        idx = torch.randint(0, len(pixels), (args.batch,), generator=gen)
        features = vision(pixel_values=pixels[idx]).pooler_output
        loss = sum(F.cross_entropy(head(features), labels[idx, i]) for i, head in enumerate(heads))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == args.steps - 1:
            log.info("step %d/%d: loss %.3f", step + 1, args.steps, loss.item())
    vision.eval()
    with torch.no_grad():
        features = torch.cat([vision(pixel_values=pixels[i:i + 256]).pooler_output for i in range(0, len(pixels), 256)])
        accuracy = {name: float((head(features).argmax(1) == labels[:, i]).float().mean())
                    for i, (name, head) in enumerate(zip(("articleType", "baseColour", "gender", "pattern"), heads))}
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    record = {"command": "python -m revprompt.models.miniature.warm_start " + " ".join(sys.argv[1:] if argv is None else argv),
              "seed": args.seed, "steps": args.steps, "batch": args.batch, "lr": args.lr, "renders": len(rows),
              "head_accuracy_on_training_renders": accuracy, "seconds": round(time.monotonic() - start, 1),
              "torch": torch.__version__}
    (args.out / "revprompt-warm-start.json").write_text(json.dumps(record, indent=2) + "\n")
    log.info("saved the warm-started captioner to %s (head accuracy %s)", args.out, accuracy)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
