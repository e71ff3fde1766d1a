"""The training loader's fast paths change no batch: the decoded-sample cache (train.cache_mb) reads from memory what
a fresh read gives, sample for sample and count for count, whatever the shards, damage, shuffle buffer, partial reads
and budget, within its memory budget; remembered token ids give the tokenizer's own tensors; batches a worker sends
through the pipe arrive equal to the training process's own."""

from __future__ import annotations

import io
import itertools
import random
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from revprompt.shards.cache import SampleCache, sample_bytes
from revprompt.shards.reader import ReadStats, build_reader
from revprompt.shards.writer import ShardWriter, encode_image
from revprompt.training.data import TrainStream, build_loader

# samples per shard; shard 2 holds an undecodable image, shard 4 is cut off inside its tar, shard 6 has a sample
# without its text, shard 7 is empty
COUNTS = [5, 9, 4, 12, 7, 1, 6, 0, 10]
CORRUPT, TRUNCATED, INCOMPLETE = 2, 4, 6


def write_shards(root: Path) -> list[str]:
    paths = []
    rng = np.random.default_rng(0)
    for index, count in enumerate(COUNTS):
        path = root / f"{index:06d}.tar"
        writer = ShardWriter(path)
        for i in range(count):
            pixels = rng.integers(0, 256, (8 + index, 8, 3), dtype=np.uint8)
            members = {"jpg": encode_image(pixels, "jpg"), "txt": f"prompt {index} {i}".encode()}
            if index == CORRUPT and i == 2:
                members["jpg"] = b"\xff\xd8 not a jpeg"
            if index == INCOMPLETE and i == 3:
                del members["txt"]
            writer.write(f"s{index:02d}_{i:04d}", members)
        writer.close()
        if index == TRUNCATED:
            data = path.read_bytes()
            path.write_bytes(data[: len(data) * 3 // 5])
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    return write_shards(tmp_path_factory.mktemp("cache-shards"))


def as_tuples(samples: list[dict]) -> list[tuple]:
    return [(s["__key__"], s["__url__"], s["txt"], s["image"].size, s["image"].tobytes()) for s in samples]


def counts(stats: ReadStats) -> tuple:
    return stats.samples, stats.corrupt, stats.rejected, stats.incomplete


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), passes=st.integers(1, 5), buffer=st.integers(0, 20), budget_share=st.floats(0.0, 1.3),
       seed=st.integers(0, 1000))
def test_cached_reads_equal_fresh_reads_within_the_budget(shards, data, passes, buffer, budget_share, seed):
    chosen = data.draw(st.lists(st.sampled_from(shards), min_size=1, max_size=len(shards), unique=True))
    total = sum(sample_bytes(s) for s in build_reader(chosen, split_workers=False, fields=("image", "txt")))
    cache = SampleCache(int(total * budget_share))
    cached_stats, fresh_stats = ReadStats(), ReadStats()
    rng = random.Random(seed)
    for number in range(passes):
        order = rng.sample(chosen, len(chosen))
        # a pass may stop early, as a worker's quota does inside a shard
        stop = data.draw(st.one_of(st.none(), st.integers(0, 60)), label=f"stop of pass {number}")
        common = dict(split_workers=False, fields=("image", "txt"), buffer=buffer, buffer_seed=f"{seed}:{number}")
        cached = list(itertools.islice(build_reader(order, stats=cached_stats, cache=cache, **common), stop))
        fresh = list(itertools.islice(build_reader(order, stats=fresh_stats, **common), stop))
        assert as_tuples(cached) == as_tuples(fresh)
        assert counts(cached_stats) == counts(fresh_stats)
        assert 0 <= cache.used <= cache.budget
    # what the cache holds is each shard whole, as a fresh read of it alone gives it
    for url in chosen:
        held = cache.get(url)
        if held is not None:
            assert int(Path(url).stem) not in (CORRUPT, TRUNCATED, INCOMPLETE)
            assert as_tuples(held) == as_tuples(list(build_reader([url], split_workers=False, fields=("image", "txt"))))
    cache.new_pass()  # what a pass stopped early left pending goes when the next begins
    assert cache.used == sum(sample_bytes(s) for url in chosen for s in (cache.get(url) or []))


def test_damaged_shards_are_never_held_and_clean_ones_are_after_one_read(shards, tmp_path):
    cache = SampleCache(1 << 30)
    list(build_reader(shards, split_workers=False, fields=("image", "txt"), cache=cache))
    held = {int(Path(url).stem) for url in shards if cache.get(url) is not None}
    assert held == set(range(len(COUNTS))) - {CORRUPT, TRUNCATED, INCOMPLETE}
    assert cache.get(shards[7]) == []  # an empty shard is held as empty: it is not opened again
    # a held shard is not opened again: its file can be gone
    copy = tmp_path / "000000.tar"
    copy.write_bytes(Path(shards[0]).read_bytes())
    list(build_reader([str(copy)], split_workers=False, fields=("image", "txt"), cache=cache))
    copy.unlink()
    stats = ReadStats()
    again = list(build_reader([str(copy), shards[CORRUPT]], stats=stats, split_workers=False, fields=("image", "txt"),
                              cache=cache))
    assert [s["__key__"] for s in again][:5] == [f"s00_{i:04d}" for i in range(5)]
    assert counts(stats) == (5 + 3, 1, 0, 0)


def test_a_budget_holds_whole_shards_only_and_stops_at_the_first_that_does_not_fit(shards):
    one = sum(sample_bytes(s) for s in build_reader([shards[0]], split_workers=False, fields=("image", "txt")))
    cache = SampleCache(one + 10)
    list(build_reader([shards[0], shards[1], shards[3]], split_workers=False, fields=("image", "txt"), cache=cache))
    assert len(cache) == 1 and cache.get(shards[0]) is not None and cache.full
    assert cache.used == one
    assert SampleCache(0).budget == 0
    nothing = SampleCache(0)
    list(build_reader([shards[0]], split_workers=False, fields=("image", "txt"), cache=nothing))
    assert len(nothing) == 0 and nothing.used == 0


def test_a_pass_stopped_inside_a_shard_leaves_nothing_pending(shards):
    cache = SampleCache(1 << 30)
    reader = iter(build_reader([shards[3]], split_workers=False, fields=("image", "txt"), cache=cache))
    next(reader)
    assert cache.used > 0 and len(cache) == 0
    list(build_reader([shards[0]], split_workers=False, fields=("image", "txt"), cache=cache))  # the next pass
    assert len(cache) == 1 and cache.used == sum(sample_bytes(s) for s in cache.get(shards[0]))


def pixels_of(images, prompts):
    return {"pixel_values": torch.from_numpy(np.stack([np.asarray(i.resize((8, 8))) for i in images]))}


@pytest.mark.parametrize("workers, batch, buffer", [(1, 4, 0), (1, 3, 16), (2, 2, 7)])
def test_the_training_stream_gives_the_same_batches_with_the_cache(shards, workers, batch, buffer):
    listed = [(url, n) for url, n in zip(shards, COUNTS) if n]
    streams = [TrainStream(listed, seed=3, rank=0, world_size=1, num_workers=workers, batch_size=batch,
                           shuffle_buffer=buffer, encode=pixels_of, cache_bytes=cache) for cache in (0, 1 << 30)]
    fresh, cached = (list(itertools.islice(iter(s), 6 * s.plan(0).batches_per_worker)) for s in streams)
    assert len(fresh) == len(cached) > 0
    for a, b in zip(fresh, cached):
        assert a["keys"] == b["keys"] and a["prompts"] == b["prompts"]
        assert (a["epoch"], a["position"]) == (b["epoch"], b["position"])
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["read_stats"], b["read_stats"])
    assert fresh[-1]["read_stats"][1:4].sum() > 0  # the damaged shards were read, and counted the same both ways


@pytest.fixture(scope="module")
def tokenizer():
    from revprompt.models.captioner import build_captioner

    return build_captioner("random-tiny")[1].tokenizer


PROMPTS = ["", "a", "nike men black tshirt", "puma women red dress " * 12, "crème brûlée ✓ 東京 🙂", "  spaced  out  ",
           "UPPER lower 123 !?", "adidas unisex white casual shoes for summer with laces and a rubber sole"]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(st.lists(st.one_of(st.sampled_from(PROMPTS), st.text(max_size=60)), min_size=1, max_size=9),
                        min_size=1, max_size=4),
       max_length=st.integers(2, 48), static=st.booleans(), left=st.booleans())
def test_remembered_token_ids_give_the_tokenizers_own_batches(tokenizer, batches, max_length, static, left):
    from revprompt.models.captioner import encode_prompts

    tokenizer.padding_side = "left" if left else "right"
    try:
        memo: dict = {}
        for prompts in batches + batches:  # the second time round every prompt comes from the memo
            want = encode_prompts(tokenizer, prompts, max_length, static=static)
            got = encode_prompts(tokenizer, prompts, max_length, static=static, memo=memo)
            for name in ("input_ids", "attention_mask", "labels"):
                assert torch.equal(getattr(got, name), getattr(want, name)), name
                assert getattr(got, name).dtype == getattr(want, name).dtype
        assert set(memo) == {p for b in batches for p in b}
    finally:
        tokenizer.padding_side = "right"


def test_a_member_named_like_the_cache_marker_is_only_data(tmp_path):
    path = tmp_path / "000000.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in (("k0.jpg", encode_image(np.zeros((8, 8, 3), np.uint8), "jpg")), ("k0.txt", b"hello"),
                           ("k0.__cached__", b"not a sample"), ("k0.cached sample", b"nor this")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    for cache in (None, SampleCache(1 << 20)):
        for _ in range(2):
            got = list(build_reader([str(path)], split_workers=False, fields=("image", "txt"), cache=cache))
            assert [(s["__key__"], s["txt"]) for s in got] == [("k0", "hello")]


def mixed_inputs(images, prompts):
    n = len(images)
    return {"pixel_values": torch.from_numpy(np.stack([np.asarray(i.resize((8, 8))) for i in images])).float() / 255,
            "input_ids": torch.arange(n * 3).view(n, 3), "mask": torch.ones(n, 3, dtype=torch.bool),
            "small": torch.arange(n, dtype=torch.uint8), "brain": torch.linspace(0, 1, n).to(torch.bfloat16),
            "empty": torch.zeros(0, 4)}


def test_batches_from_a_worker_equal_the_training_process_own(shards):
    listed = [(url, n) for url, n in zip(shards, COUNTS) if n]

    def batches(workers):
        stream = TrainStream(listed, seed=1, rank=0, world_size=1, num_workers=1, batch_size=3, shuffle_buffer=5,
                             encode=mixed_inputs, cache_bytes=1 << 20)
        loader = build_loader(stream, workers, pin_memory=False)  # a CPU device: workers pipe numpy arrays
        return list(itertools.islice(iter(loader), 25))

    here, piped = batches(0), batches(1)
    assert len(here) == len(piped) == 25
    # the loader hands on the stream's own batches (no default_convert pass): read straight from the stream they are
    # the same, and so through a worker on torch's own transport (what a CUDA device's pinned path uses; without an
    # accelerator torch does not pin)
    direct = list(itertools.islice(iter(TrainStream(listed, seed=1, rank=0, world_size=1, num_workers=1, batch_size=3,
                                                    shuffle_buffer=5, encode=mixed_inputs, cache_bytes=1 << 20)), 25))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pin_memory without an accelerator: torch says so and does not pin
        stream = TrainStream(listed, seed=1, rank=0, world_size=1, num_workers=1, batch_size=3, shuffle_buffer=5,
                             encode=mixed_inputs, cache_bytes=1 << 20)
        default_transport = list(itertools.islice(iter(build_loader(stream, 1, pin_memory=True)), 25))
    for a, b in itertools.chain(zip(here, piped), zip(here, direct), zip(here, default_transport)):
        assert set(a) == set(b)
        for key, value in a.items():
            if isinstance(value, torch.Tensor):
                assert isinstance(b[key], torch.Tensor) and b[key].dtype == value.dtype, key
                assert torch.equal(b[key], value), key
            else:
                assert b[key] == value, key
    piped[0]["pixel_values"].add_(1)  # a received batch is the trainer's own, writable memory


@pytest.mark.skipif(not hasattr(__import__("fcntl"), "F_GETPIPE_SZ"), reason="pipe sizes are a Linux setting")
def test_the_workers_result_pipe_holds_a_whole_batch():
    import fcntl

    from revprompt.training.data import PIPE_BYTES, _wide_pipe_context

    queue = _wide_pipe_context().Queue()
    size = fcntl.fcntl(queue._reader.fileno(), fcntl.F_GETPIPE_SZ)
    if int(Path("/proc/sys/fs/pipe-max-size").read_text()) >= PIPE_BYTES:
        assert size == PIPE_BYTES
    else:  # the system allows less: the default pipe, and batches still arrive whole
        assert size >= 4096
    queue.put({"x": np.arange(200_000)})  # 1.6 MB: more than the pipe holds still arrives whole
    assert np.array_equal(queue.get(timeout=30)["x"], np.arange(200_000))


@settings(max_examples=300, deadline=None)
@given(width=st.integers(1, 40), height=st.integers(1, 40), size=st.integers(1, 24),
       mode=st.sampled_from(["RGB", "L", "RGBA", "P", "CMYK"]), seed=st.integers(0, 2**16))
def test_a_prepared_image_gives_the_pixels_of_the_image_itself(width, height, size, mode, seed):
    from PIL import Image

    from revprompt.models.captioner import image_array, planar_image, preprocess_images

    rgb = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(rgb).convert(mode)
    prepared = image_array(image, size)
    assert prepared.shape == (size, size, 3) and prepared.dtype == np.uint8
    assert image_array(prepared, size) is prepared  # prepared once, never again
    expected = preprocess_images([image, image], size)
    assert torch.equal(preprocess_images([prepared, image], size), expected)
    planar = planar_image(image, size)  # what a training reader caches: channels first, contiguous, the same bytes
    assert planar.shape == (3, size, size) and planar.dtype == torch.uint8 and planar.is_contiguous()
    assert torch.equal(planar, torch.from_numpy(prepared.copy()).permute(2, 0, 1))
    assert torch.equal(preprocess_images([planar, planar], size), expected)  # the stacked path: bit-equal
    assert torch.equal(preprocess_images([planar, prepared], size), expected)  # mixed: the general path
    other = planar_image(image, size + 1)  # of another size: resized as its array would be
    assert torch.equal(preprocess_images([other, image], size),
                       preprocess_images([other.permute(1, 2, 0).numpy(), image], size))


@pytest.fixture(scope="module")
def blip_inputs():
    from revprompt.models.captioner import TrainingInputs, build_captioner

    model, processor = build_captioner("random-tiny", 0)
    return TrainingInputs(model, processor, 20)


class CountingInputs:
    """TrainingInputs with its prepare calls counted."""

    def __init__(self, inputs):
        self.inputs, self.prepared = inputs, 0

    def prepare(self, sample):
        self.prepared += 1
        return self.inputs.prepare(sample)

    def __call__(self, images, prompts):
        return self.inputs(images, prompts)


@pytest.mark.parametrize("cache_bytes", [0, 1 << 30])
def test_samples_prepared_before_the_cache_give_the_same_batches(shards, blip_inputs, cache_bytes):
    listed = [(url, n) for url, n in zip(shards, COUNTS) if n]
    counting = CountingInputs(blip_inputs)
    common = dict(seed=5, rank=0, world_size=1, num_workers=1, batch_size=3, shuffle_buffer=8, cache_bytes=cache_bytes)
    prepared = TrainStream(listed, encode=counting, **common)
    plain = TrainStream(listed, encode=lambda images, prompts: blip_inputs(images, prompts), **common)
    n = 4 * prepared.plan(0).batches_per_worker
    a, b = (list(itertools.islice(iter(s), n)) for s in (prepared, plain))
    for x, y in zip(a, b, strict=True):
        assert x["keys"] == y["keys"] and torch.equal(x["read_stats"], y["read_stats"])
        for key in ("pixel_values", "input_ids", "attention_mask", "labels"):
            assert torch.equal(x[key], y[key]), key
    assert a[0]["pixel_values"].shape[-1] == blip_inputs.image_size != 8  # resized from the shards' 8 px
    yielded = 3 * n
    if cache_bytes:  # later epochs came from the cache, already prepared; the damaged shards were prepared again
        assert 0 < counting.prepared < yielded / 2
    else:
        assert counting.prepared >= yielded


def test_a_sample_prepare_refuses_is_counted_corrupt_and_its_shard_not_kept(shards):
    def prepare(sample):
        if sample["__key__"] == "s00_0003":
            raise ValueError("cannot prepare")
        return sample

    stats, cache = ReadStats(), SampleCache(1 << 30)
    read = list(build_reader(shards[:2], stats=stats, split_workers=False, fields=("image", "txt"), cache=cache,
                             prepare=prepare))
    assert len(read) == COUNTS[0] + COUNTS[1] - 1 and stats.corrupt == 1
    assert cache.get(shards[0]) is None and len(cache.get(shards[1])) == COUNTS[1]
