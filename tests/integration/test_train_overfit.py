"""A tiny captioner fine-tuned through `revprompt train` on a handful of pairs writes each prompt back exactly, and its
embedding head (on in the tiny preset) puts each image next to its own prompt's MiniLM embedding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from revprompt.shards.manifest import scan_manifest, write_manifest
from revprompt.shards.writer import ShardWriter, encode_image
from tests.conftest import run_cli, scalars

PROMPTS = ["Turtle Check Men Navy Blue Shirt", "Peter England Men Party Blue Jeans", "Titan Women Silver Watch",
           "Puma Men Pack of 3 Socks"]


def pattern(i: int) -> np.ndarray:
    """Four clearly different 64 px images."""
    y, x = np.mgrid[0:64, 0:64]
    colours = [(20, 30, 120), (60, 90, 200), (190, 190, 200), (30, 30, 30)]
    img = np.zeros((64, 64, 3), np.uint8) + np.array(colours[i], np.uint8)
    if i == 0:
        img[(x // 8 + y // 8) % 2 == 0] = (240, 240, 240)
    if i == 3:
        img[(y // 6) % 2 == 0] = (250, 20, 20)
    return img


def test_few_pairs_are_reproduced_exactly(tmp_path: Path):
    root = tmp_path / "run" / "shards"
    writer = ShardWriter(root / "train" / "000000.tar")
    for i, prompt in enumerate(PROMPTS):
        writer.write(f"p{i}_0000", {"png": encode_image(pattern(i), "png"), "txt": prompt.encode()})
    writer.close()
    write_manifest(root, scan_manifest(root, "handmade", {"train": 1}))

    run_cli("train", "--config", "tiny", f"--run.dir={tmp_path / 'run'}", "--generate.splits=train",
            "--train.max_steps=150", "--train.micro_batch_size=4", "--train.num_workers=0", "--train.lr=0.002",
            "--train.warmup_steps=5", "--train.val_captions=0", "--train.save_every=1000", "--train.log_every=10",
            "--train.zero_stage=0", "--train.shuffle_buffer=0", threads=2)

    from transformers import BlipForConditionalGeneration, BlipProcessor

    export = tmp_path / "run" / "captioner"
    model = BlipForConditionalGeneration.from_pretrained(export).eval()
    processor = BlipProcessor.from_pretrained(export)
    images = [Image.fromarray(pattern(i)) for i in range(4)]
    inputs = processor(images=images, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(pixel_values=inputs["pixel_values"], max_new_tokens=20)
    captions = processor.batch_decode(ids, skip_special_tokens=True)
    tok = processor.tokenizer
    # the uncased WordPiece vocabulary's own spelling of each prompt ("navy blue shirt", "pack of 3")
    expected = [tok.decode(tok(p).input_ids, skip_special_tokens=True) for p in PROMPTS]
    assert [c.strip() for c in captions] == expected

    # `revprompt caption` recovers the same prompts from the shard and from a folder of image files
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(pattern(i)).save(folder / f"img{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "captions.jsonl"
    proc = run_cli("caption", "--captioner", str(export), str(root / "train" / "000000.tar"), str(folder),
                   "--out", str(out), "--batch-size", "3")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[:4] == [{"key": f"p{i}_0000", "caption": expected[i]} for i in range(4)]
    assert rows[4:] == [{"path": str(folder / f"img{i}.png"), "caption": expected[i]} for i in range(4)]
    assert "'corrupt': 1" in proc.stderr

    # the embedding head learnt with the captioner: each image's embedding is nearest its own prompt's
    from revprompt.models.captioner import load_exported
    from revprompt.models.captioner.head import load_embedding_head, predict_embeddings
    from revprompt.models.text_embedder import embed

    loaded, loaded_processor = load_exported(export, torch.device("cpu"))
    head = load_embedding_head(export)
    cosines = predict_embeddings(loaded, loaded_processor, head, images, "cpu") @ embed(PROMPTS).T
    # measured: 1.000 to its own prompt, and to the others the prompts' own cosines to each other (at most 0.36): the
    # head gives the prompts' embeddings back; its loss fell from 0.44 at step 10 to 0.0006 at 50 and 0.0000 at 150
    assert cosines.argmax(axis=1).tolist() == [0, 1, 2, 3] and cosines.diagonal().min() > 0.95, cosines
    loss = scalars(tmp_path / "run" / "tb" / "train", "train/loss_embedding")
    assert loss[150] < 0.05 < loss[10], loss
