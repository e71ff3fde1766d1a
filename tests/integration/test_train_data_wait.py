"""`revprompt train` logs the share of each logging window it spent waiting for the data loader
(`perf/data_wait_fraction`), the figure that says whether train.num_workers keep up with the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from revprompt.shards.manifest import scan_manifest, write_manifest
from revprompt.shards.writer import ShardWriter, encode_image
from tests.conftest import run_cli, scalars


def test_trainer_logs_the_share_of_time_spent_waiting_for_data(tmp_path: Path):
    root = tmp_path / "run" / "shards"
    writer = ShardWriter(root / "train" / "000000.tar")
    rng = np.random.default_rng(0)
    for i in range(8):
        pixels = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
        writer.write(f"p{i}_0000", {"jpg": encode_image(pixels, "jpg"), "txt": f"Navy Blue Shirt {i}".encode()})
    writer.close()
    write_manifest(root, scan_manifest(root, "handmade", {"train": 1}))

    # no DataLoader workers: the decoding and tokenising happen inside next(), so some wait is certain
    run_cli("train", "--config", "tiny", f"--run.dir={tmp_path / 'run'}", "--generate.splits=train",
            "--train.max_steps=4", "--train.log_every=2", "--train.micro_batch_size=4", "--train.num_workers=0",
            "--train.val_captions=0", "--train.save_every=1000", "--train.zero_stage=0",
            "--train.embedding_head=false", threads=2)

    wait = scalars(tmp_path / "run" / "tb" / "train", "perf/data_wait_fraction")
    assert sorted(wait) == [2, 4], wait  # one value per logging window, as perf/samples_per_s
    assert all(0.0 < v < 1.0 for v in wait.values()), wait
