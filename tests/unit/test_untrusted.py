"""Untrusted shards and inputs: no unpickling, no key that leaves a folder, no out-of-range config."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from revprompt.launch.config import ConfigError, load_config
from revprompt.shards.reader import ReadStats, build_reader
from revprompt.shards.writer import ShardWriter, encode_image, encode_json, write_json_atomic
from revprompt.models.captioner import build_captioner
from revprompt.training.data import TrainStream


class CreatesAFile:
    """Unpickling this calls open(path, "w"): the file appearing would prove a shard got unpickled."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def image() -> bytes:
    return encode_image(np.full((64, 64, 3), 120, np.uint8), "jpg")


def planted_shard(tmp_path: Path, marker: Path) -> Path:
    """A shard with one good sample, then one whose .pyd and .pickle members would create `marker`."""
    path = tmp_path / "train" / "000000.tar"
    writer = ShardWriter(path)
    writer.write("good_0000", {"jpg": image(), "txt": b"nike men black tshirt", "json": encode_json({"seed": 1})})
    writer.write("evil_0000", {"jpg": image(), "txt": b"evil", "pyd": pickle.dumps(CreatesAFile(marker)),
                               "pickle": pickle.dumps(CreatesAFile(marker))})
    writer.write("later_0000", {"jpg": image(), "txt": b"puma women red dress", "json": encode_json({"seed": 2})})
    writer.close()
    return path


def test_pickle_members_are_never_unpickled(tmp_path: Path):
    marker = tmp_path / "unpickled"
    assert not marker.exists()
    pickle.loads(pickle.dumps(CreatesAFile(tmp_path / "proof")))  # the payload works when unpickled
    assert (tmp_path / "proof").exists()

    shard = planted_shard(tmp_path, marker)
    stats = ReadStats()
    keys = [s["__key__"] for s in build_reader([str(shard)], stats=stats, split_workers=False)]
    assert keys == ["good_0000", "later_0000"]
    assert stats.rejected == 1 and stats.samples == 2
    assert not marker.exists()

    # the training data path too, in a DataLoader worker process
    _, processor = build_captioner("random-tiny")
    stream = TrainStream([(str(shard), 3)], seed=0, rank=0, world_size=1, num_workers=1, batch_size=2,
                         image_size=64, tokenizer=processor.tokenizer, max_length=16, shuffle_buffer=0)
    batch = next(iter(stream))
    assert sorted(batch["keys"]) == ["good_0000", "later_0000"]
    assert batch["read_stats"].tolist()[2] == 1  # rejected
    assert not marker.exists()


def test_keys_that_would_leave_a_folder_are_rejected(tmp_path: Path):
    path = tmp_path / "hostile.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in (("ok_0000.jpg", image()), ("ok_0000.txt", b"fine"),
                           ("../../escape_0000.jpg", image()), ("../../escape_0000.txt", b"x"),
                           (".hidden_0000.jpg", image()), (".hidden_0000.txt", b"y")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    stats = ReadStats()
    keys = [s["__key__"] for s in build_reader([str(path)], stats=stats, split_workers=False)]
    assert keys == ["ok_0000"]
    assert stats.rejected == 1  # the "../../" one; webdataset itself never groups the dot-file into a sample
    with pytest.raises(ValueError, match="unsafe sample key"):
        ShardWriter(tmp_path / "out" / "000000.tar").write("../x", {"txt": b"x"})


def test_checkpoint_reads_are_weights_only(tmp_path: Path):
    import torch

    from revprompt.training.engine import force_weights_only_loads

    marker = tmp_path / "loaded"
    torch.save({"payload": CreatesAFile(marker)}, tmp_path / "ckpt.pt")  # saving pickles the object, not calls it
    assert not marker.exists()
    force_weights_only_loads()
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "ckpt.pt")  # no weights_only argument: the process-wide setting applies
    assert not marker.exists()


@pytest.mark.parametrize("override, field", [
    ("--generate.steps=0", "generate.steps"),
    ("--train.lr=5", "train.lr"),
    ("--train.zero_stage=4", "train.zero_stage"),
    ("--evaluate.num_beams=0", "evaluate.num_beams"),
    ("--drift.iterations=-1", "drift.iterations"),
])
def test_out_of_range_config_is_refused_with_the_field_named(override: str, field: str):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config("tiny", [override])


def test_write_json_atomic_leaves_no_partial_on_failure(tmp_path: Path):
    target = tmp_path / "stats.json"
    write_json_atomic(target, {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(target, {"a": object()})
    assert target.read_text().strip().startswith("{") and "1" in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["stats.json"]
