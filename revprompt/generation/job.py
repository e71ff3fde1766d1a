"""`revprompt generate`: Stable Diffusion over the prepared prompts, whole shards per rank, resumable."""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..launch import dist
from ..launch.layout import (generation_fingerprint, owned_files, prepared_fingerprint, remove_if_empty,
                              remove_owned)
from ..launch.metrics import captioned_grid
from ..launch.runner import StageContext, StageError, build_parser, on_main_first, run_stage
from ..models.text_to_image import build_pipeline, family_of, generate_images, sampler_name, to_pixels
from ..prompts.prepared import load_range, split_size
from ..prompts.sources import Prompt
from ..shards import storage
from ..shards.keys import sample_key, sample_seed
from ..shards.manifest import (MANIFEST, ManifestError, complete_markers, read_manifest, scan_manifest,
                               write_manifest)
from ..shards.schema import SPLITS, SampleMeta, owner
from ..shards.writer import (FINISHED_PATTERNS, PARTIAL_PATTERNS, SHARD_PATTERNS, BackgroundWorker, ShardWriter,
                             encode_image, encode_json, shard_name, write_json_atomic)
from .prepare import prepare

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """One image to generate: a prompt, its image index, and the key and seed derived from them."""

    prompt: Prompt
    image_index: int
    key: str
    seed: int
    split: str


@dataclass(frozen=True)
class ShardTask:
    """One shard of the plan: samples start..stop-1 of its split; `index` (global position) decides its rank.

    Sample t of a split is image t % images_per_prompt of prompt t // images_per_prompt, so a task
    needs only its own prompts, read through the split's index when the shard is written.
    """

    split: str
    shard: int
    index: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        """Samples in the shard."""
        return self.stop - self.start


def plan_shards(counts: dict[str, int], images_per_prompt: int, shard_size: int) -> list[ShardTask]:
    """Cut each split's (prompt, image) pairs into shards; depends only on the prompt counts and the config."""
    tasks: list[ShardTask] = []
    for split, n_prompts in counts.items():
        total = n_prompts * images_per_prompt
        for shard in range(math.ceil(total / shard_size)):
            tasks.append(ShardTask(split, shard, len(tasks), shard * shard_size, min(total, (shard + 1) * shard_size)))
    return tasks


# a batch group holds at most this many shards, so that groups stay small enough to spread over ranks
MAX_GROUP_SHARDS = 4


@dataclass(frozen=True)
class BatchGroup:
    """Consecutive shards of the plan generated together, their samples cut into batches from the group's start.

    Batches may cross the shard (and split) boundaries inside a group, never the group's edges, and
    a whole group belongs to one rank: so a batch holds the same samples at any rank count, and the
    images (which depend a few ulps on what else is in the batch) come out the same bytes.
    """

    index: int
    tasks: tuple[ShardTask, ...]

    @property
    def size(self) -> int:
        """Samples in the group."""
        return sum(t.size for t in self.tasks)

    def batches(self, batch_size: int) -> list[tuple[int, int]]:
        """(start, stop) of each batch, as offsets into the group's samples; only the last may be short."""
        return [(a, min(a + batch_size, self.size)) for a in range(0, self.size, batch_size)]


def group_tasks(tasks: list[ShardTask], batch_size: int, max_shards: int = MAX_GROUP_SHARDS) -> list[BatchGroup]:
    """Cut the plan's shards, in order, into batch groups: a group closes once its samples fill whole batches or it
    holds `max_shards` shards. Shards whose size is a multiple of the batch stay alone; a split's short last shard
    joins the next shards, so the job makes (nearly) as few pipeline calls as a loop over all prompts at once."""
    groups: list[BatchGroup] = []
    current: list[ShardTask] = []
    for task in tasks:
        current.append(task)
        if sum(t.size for t in current) % batch_size == 0 or len(current) == max_shards:
            groups.append(BatchGroup(len(groups), tuple(current)))
            current = []
    if current:
        groups.append(BatchGroup(len(groups), tuple(current)))
    return groups


def task_samples(task: ShardTask, prompts: list[Prompt], images_per_prompt: int, seed: int) -> list[Sample]:
    """The samples of `task`, given prompts task.start // m .. (task.stop - 1) // m of its split."""
    first = task.start // images_per_prompt
    out = []
    for t in range(task.start, task.stop):
        prompt = prompts[t // images_per_prompt - first]
        key = sample_key(prompt.id, t % images_per_prompt)
        out.append(Sample(prompt, t % images_per_prompt, key, sample_seed(seed, key), task.split))
    return out


def load_task_samples(prompts_dir: str | Path, task: ShardTask, images_per_prompt: int, seed: int) -> list[Sample]:
    """Read only this task's prompts from the prepared split (the folder `prompts_dir`) and make its samples."""
    prompts = load_range(prompts_dir, task.split, task.start // images_per_prompt,
                         (task.stop - 1) // images_per_prompt + 1)
    return task_samples(task, prompts, images_per_prompt, seed)


def sample_metadata(sample: Sample, cfg, drawn_with: dict) -> dict:
    """The .json member of a sample (the shard schema's SampleMeta); `drawn_with` names the pipeline family and
    the sampler it used."""
    g = cfg.generate
    return SampleMeta(key=sample.key, prompt_id=sample.prompt.id, split=sample.split, image_index=sample.image_index,
                      seed=sample.seed, attributes=sample.prompt.attributes, model=g.model,
                      family=drawn_with["family"], scheduler=drawn_with["scheduler"], steps=g.steps,
                      guidance_scale=g.guidance_scale, negative_prompt=g.negative_prompt, height=g.height,
                      width=g.width).to_json()


def generate_batch(pipe, samples: list[Sample], cfg) -> torch.Tensor:
    """Images for `samples` (NCHW float in [0, 1], on the model's device); each from its own seed."""
    return generate_images(pipe, [s.prompt.text for s in samples], [s.seed for s in samples], cfg.generate)


class Progress:
    """Global progress without collectives: each rank writes its count to a file, rank 0 sums them.

    Files are written and read at most once a second, so a shared file system with many ranks
    costs the generating thread nothing per batch.
    """

    def __init__(self, folder: Path, info: dist.DistInfo, total: int, interval_s: float = 1.0):
        self.folder, self.info, self.total = folder, info, total
        self.interval_s = interval_s
        self.done = 0
        self.others = 0  # the other ranks' counts, as last read
        self.start = time.monotonic()
        self._last_write = self._last_read = float("-inf")
        self.bar = None
        if info.is_main:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", desc="generate", dynamic_ncols=True)

    def add(self, n: int, force: bool = False) -> int:
        """Count `n` more images on this rank; returns the global count as this rank last saw it."""
        self.done += n
        now = time.monotonic()
        if force or now - self._last_write >= self.interval_s:
            write_json_atomic(self.folder / f"rank-{self.info.rank}.json", {"done": self.done})
            self._last_write = now
        if self.bar is None:
            return self.done
        if force or now - self._last_read >= self.interval_s:
            self.others = self._read_others()
            self._last_read = now
        self.bar.update(self.global_done() - self.bar.n)
        return self.global_done()

    def _read_others(self) -> int:
        done = 0
        for path in self.folder.glob("rank-*.json"):
            if path.name != f"rank-{self.info.rank}.json":
                try:
                    done += json.loads(path.read_text())["done"]
                except (OSError, ValueError, KeyError):
                    pass  # being replaced right now; the next read sees it
        return done

    def global_done(self) -> int:
        """This rank's exact count plus the other ranks' last reported counts."""
        return self.done + self.others

    def rate(self) -> float:
        """Global images per second so far."""
        return self.global_done() / max(time.monotonic() - self.start, 1e-9)

    def close(self) -> None:
        """Close the bar."""
        if self.bar is not None:
            self.bar.close()


class LoopClock:
    """Where the generating thread's time goes: inside the model call, or anywhere else in the loop.

    `model` covers the pipeline call and the copy of its pixels to the host (which waits for the
    device); `host` is everything else from the clock's start to its stop: reading prompts, queueing
    writes, progress, metrics, and waiting for the writer at the end. A bare diffusers loop has
    (almost) no host time, so host / (model + host) is what the job adds, as long as its model calls
    run as fast as the bare loop's; a benchmark compares those calls too (benchmarks/gpu_generation.py).
    """

    def __init__(self) -> None:
        self.model_s = self.host_s = 0.0
        self.batches = 0
        self._mark = self._started = time.perf_counter()

    def model_starts(self) -> None:
        """Right before the pipeline call: the time since the last batch was host time."""
        self._started = time.perf_counter()
        self.host_s += self._started - self._mark

    def model_ends(self) -> float:
        """Once the pixels are on the host; returns this batch's model seconds."""
        self._mark = time.perf_counter()
        self.batches += 1
        self.model_s += self._mark - self._started
        return self._mark - self._started

    def stop(self) -> None:
        """After the loop (and the writer's drain): the tail is host time too."""
        self.model_starts()

    def summary(self) -> str:
        """One log line: seconds in the model, elsewhere, and the share of the loop spent elsewhere."""
        total = self.model_s + self.host_s
        return (f"generating thread: {self.model_s:.2f} s in the model, {self.host_s:.2f} s elsewhere "
                f"({100 * self.host_s / max(total, 1e-9):.1f}% of the loop) over {self.batches} batches")


def check_or_reset(root: Path | str, fingerprint: str, overwrite: bool, own_root: bool = True) -> None:
    """Refuse shards made under another config unless `overwrite`, which removes them (revprompt's shard
    files only: anything else in the shard folders stays). Runs before anything of this launch is written.
    A root that is not run.dir's own (shards.url) and has no manifest yet must not hold files under the names
    revprompt would write (run.dir's shards/ has the run marker for that)."""
    try:
        manifest = read_manifest(root)
        recorded = manifest.get("fingerprint") if manifest else None
    except ManifestError as exc:  # which config made the shards cannot be known
        if not overwrite:
            raise StageError(f"{exc}; the config that made the shards there cannot be checked: rerun with "
                             "--overwrite to write them again, or restore the manifest") from None
        manifest, recorded = {}, "a damaged manifest"
    if manifest is None:
        if own_root:
            return
        foreign = [str(f) for split in SPLITS for f in owned_files(storage.join(root, split), FINISHED_PATTERNS)]
        if foreign:
            raise StageError(f"shards.url {root}: holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''} "
                             "but no revprompt manifest: files revprompt did not write stand where it would write "
                             "shards; choose another shards.url")
        return
    if recorded == fingerprint:
        return
    if not overwrite:
        raise StageError(f"{root} holds shards from a different generation config (fingerprint {recorded}, now "
                         f"{fingerprint}): the prompt file, [prompts] or [generate] changed; rerun with --overwrite "
                         "to replace them, or choose another run.dir")
    log.warning("--overwrite: removing shards made under %s", recorded)
    for split in SPLITS:
        remove_owned(storage.join(root, split), SHARD_PATTERNS)
        remove_if_empty(storage.join(root, split))
    remove_owned(root, (MANIFEST,))


def write_samples(samples: list[Sample], pixels: np.ndarray, finite: np.ndarray, cfg, writer: ShardWriter,
                  drawn_with: dict) -> None:
    """Encode and append one batch's samples to the open shard (runs on the background thread)."""
    g = cfg.generate
    for sample, image, ok in zip(samples, pixels, finite):
        if not ok:
            writer.failures += 1
            log.warning("sample %s produced non-finite pixels; left out of %s", sample.key, writer.path)
            continue
        writer.write(sample.key, {
            g.image_format: encode_image(image, g.image_format, g.jpeg_quality),
            "txt": sample.prompt.text.encode("utf-8"),
            "json": encode_json(sample_metadata(sample, cfg, drawn_with)),
        })


@dataclass(frozen=True)
class GenerationPlan:
    """The whole job's shards, what they are made from, and what is on disk: the same on every rank."""

    tasks: list[ShardTask]
    planned: dict[str, int]
    fingerprint: str
    extra: dict

    def scan(self, root: Path | str) -> dict:
        """The manifest of what is on disk now."""
        return scan_manifest(root, self.fingerprint, self.planned, self.extra)


def prepare_for_generation(ctx: StageContext) -> dict:
    """On rank 0, before anything is written: refuse (or, with --overwrite, reset) shards of another config,
    then prepare the prompts; returns the prepared set's report."""
    cfg = ctx.cfg
    fingerprint = generation_fingerprint(prepared_fingerprint(cfg), cfg)
    check_or_reset(ctx.layout.shards, fingerprint, getattr(ctx.args, "overwrite", False),
                   own_root=not cfg.shards.url)
    return prepare(cfg)


def plan_generation(ctx: StageContext) -> GenerationPlan:
    """Check and prepare (rank 0), then cut every split into shards."""
    cfg, layout = ctx.cfg, ctx.layout
    report = on_main_first(ctx.info, lambda: prepare_for_generation(ctx))
    counts = {split: split_size(layout.prompts, split) for split in cfg.generate.splits}
    tasks = plan_shards(counts, cfg.generate.images_per_prompt, cfg.generate.shard_size)
    planned = {split: sum(t.split == split for t in tasks) for split in cfg.generate.splits}
    extra = {"config": cfg.to_dict()["generate"], "seed": cfg.run.seed, "prompts": report["splits"],
             "prepared": report["fingerprint"]}
    return GenerationPlan(tasks, planned, generation_fingerprint(report["fingerprint"], cfg), extra)


def determinism(info: dist.DistInfo) -> dict:
    """What equal bytes across runs assume besides the config: the device kind and the intra-op thread count
    per rank (on a CPU, 1 and 2 threads can round a few pixels differently)."""
    return {"device": info.device.type, "torch_threads": torch.get_num_threads()}


def start_generation(ctx: StageContext, plan: GenerationPlan) -> None:
    """On rank 0: drop dead writers' partial files, write the manifest of what is on disk, and say what equal
    bytes depend on besides the config (warning when shards already written were made otherwise)."""
    root = ctx.layout.shards
    now = determinism(ctx.info)
    log.info("equal shard bytes at any rank count hold for the same device kind and intra-op thread count per "
             "rank: this launch writes with %s", now)
    earlier = [m for m in (read_manifest(root) or {}).get("made_with", []) if m != now]
    if earlier:
        log.warning("shards already written were made with %s, this launch writes with %s: its shards may differ "
                    "by a few pixel levels from what those settings would write (the samples stay valid)",
                    earlier, now)
    # a killed writer leaves a hidden partial file: this launch holds the generate lock, so every
    # partial file is a dead writer's, and its shard starts again
    for split in ctx.cfg.generate.splits:
        remove_owned(ctx.layout.staging / split, PARTIAL_PATTERNS)
    shutil.rmtree(ctx.layout.progress, ignore_errors=True)
    ctx.layout.progress.mkdir(parents=True)
    write_manifest(root, plan.scan(root))


def run_generation(ctx: StageContext) -> dict:
    """Prepare (rank 0), plan, generate this rank's pending shards, then write the manifest (rank 0)."""
    info, root = ctx.info, ctx.layout.shards
    plan = plan_generation(ctx)
    on_main_first(info, lambda: start_generation(ctx, plan))
    groups = group_tasks(plan.tasks, ctx.cfg.generate.batch_size)
    my_groups = [g for g in groups if owner(g.index, info.world_size) == info.rank]
    mine = [t for g in my_groups for t in g.tasks]
    # rank 0 checks every shard for the progress bar's total, the other ranks only their own
    checked = plan.tasks if info.is_main else mine
    complete = complete_markers(root, [shard_name(t.split, t.shard) for t in checked])
    done = {t.index for t in checked if shard_name(t.split, t.shard) in complete}
    pending = [t for t in mine if t.index not in done]
    log.info("plan: %d shards (%s) in %d batch groups; this rank owns %d shards, %d still to write", len(plan.tasks),
             plan.planned, len(groups), len(mine), len(pending))
    if getattr(ctx.args, "plan_only", False):
        return _plan_only(ctx, pending)
    progress = Progress(ctx.layout.progress, info, sum(t.size for t in plan.tasks if t.index not in done))
    try:
        if pending:
            _generate_shards(ctx, [g for g in my_groups if any(t.index not in done for t in g.tasks)], done, root,
                             progress)
        progress.add(0, force=True)
    finally:
        progress.close()
    counts = dist.all_gather_object(progress.done)
    seconds = time.monotonic() - progress.start

    def finish() -> dict:
        manifest = plan.scan(root)
        write_manifest(root, manifest)
        shutil.rmtree(ctx.layout.progress, ignore_errors=True)
        if ctx.layout.shards_remote:  # the staging folders, once empty (a user's file keeps them)
            for split in ctx.cfg.generate.splits:
                remove_if_empty(ctx.layout.staging / split)
            remove_if_empty(ctx.layout.staging)
        return manifest

    manifest = on_main_first(info, finish)
    total = sum(counts)
    log.info("generated %d images in %.1f s (%.2f images/s over %d ranks); shards complete: %s", total, seconds,
             total / max(seconds, 1e-9), info.world_size, manifest["complete"])
    if not manifest["complete"]:
        raise StageError(f"{root}: some planned shards are missing after generation; see the rank logs")
    return manifest


def _plan_only(ctx: StageContext, pending: list[ShardTask]) -> dict:
    """Read each pending shard's samples as generation would, one shard at a time; report this rank's peak RSS."""
    import resource

    cfg = ctx.cfg
    samples = 0
    for task in pending:
        samples += len(load_task_samples(ctx.layout.prompts, task, cfg.generate.images_per_prompt, cfg.run.seed))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    log.info("plan only: rank %d would write %d shards, %d samples; peak RSS %.1f MB", ctx.info.rank, len(pending),
             samples, peak_mb)
    return {"shards": len(pending), "samples": samples, "peak_rss_mb": peak_mb}


def _generate_shards(ctx: StageContext, groups: list[BatchGroup], done: set[int], root: Path | str,
                     progress: Progress) -> None:
    """This rank's batch groups with shards still to write; the generating thread only runs the model, the writer
    thread the rest. A batch that holds samples of a complete shard only is skipped; one that mixes them with a
    pending shard's is drawn whole (so every image is what an uninterrupted run draws) and the complete shard's
    images are dropped."""
    cfg, info = ctx.cfg, ctx.info
    g = cfg.generate
    pipe = build_pipeline(g.model, scheduler=g.scheduler, dtype=g.dtype, device=info.device, seed=cfg.run.seed,
                          compile=g.compile, compile_scope=g.compile_scope,
                          compile_mode=g.compile_mode, fuse=g.fuse_qkv)
    drawn_with = {"family": family_of(pipe), "scheduler": sampler_name(pipe, g.scheduler)}
    worker = BackgroundWorker(max_pending=4)
    grid_pending = info.is_main and g.grid_images > 0
    # on a GPU the writer thread draws the sample grid on a spare core while the device works; on a CPU the model's
    # threads use every core, so the grid waits until the model is done (drawn while it runs, it cost the job 2-4 %)
    grid_later = info.device.type == "cpu"
    grid_batch: tuple[list[Sample], np.ndarray] | None = None
    writers: dict[int, ShardWriter] = {}
    clock = LoopClock()
    try:
        for group in groups:
            samples: list[Sample] = []
            spans: list[tuple[ShardTask, int, int]] = []  # each shard's samples as offsets into the group's
            for task in group.tasks:
                spans.append((task, len(samples), len(samples) + task.size))
                samples += load_task_samples(ctx.layout.prompts, task, g.images_per_prompt, cfg.run.seed)
            for start, stop in group.batches(g.batch_size):
                # (shard, its first and last+1 sample in this batch, whether the batch ends the shard)
                todo = [(t, max(a, start), min(b, stop), b <= stop) for t, a, b in spans
                        if t.index not in done and a < stop and b > start]
                if not todo:
                    continue
                batch = samples[start:stop]
                clock.model_starts()
                pixels, finite = to_pixels(generate_batch(pipe, batch, cfg))
                model_s = clock.model_ends()
                for task, a, b, last in todo:
                    if task.index not in writers:
                        writers[task.index] = ShardWriter(storage.join(root, shard_name(task.split, task.shard)),
                                                          made_with=determinism(info), staging=ctx.layout.staging)
                    worker.submit(lambda b_=samples[a:b], p=pixels[a - start:b - start],
                                  f=finite[a - start:b - start], w=writers[task.index]:
                                  write_samples(b_, p, f, cfg, w, drawn_with))
                    if last:
                        worker.submit(writers.pop(task.index).close)
                if grid_pending:  # a large PNG: encoded on the writer thread, not while the device waits
                    if grid_later:
                        grid_batch = (batch, pixels)
                    else:
                        worker.submit(lambda b_=batch, p=pixels: _log_grid(ctx, b_, p))
                    grid_pending = False
                done_now = progress.add(sum(b - a for _, a, b, _ in todo))
                ctx.metrics.log({"perf/images_per_s": progress.rate(), "perf/model_s_per_batch": model_s},
                                step=done_now)
    except BaseException:
        try:
            worker.close()  # let queued writes finish before the unfinished shards are dropped
        except BaseException:
            log.exception("shard writer thread failed too")
        for writer in writers.values():
            writer.abort()
        raise
    worker.close()
    clock.stop()
    if grid_batch is not None:
        _log_grid(ctx, *grid_batch)
    log.info("%s", clock.summary())
    ctx.metrics.log({"perf/host_fraction": clock.host_s / max(clock.host_s + clock.model_s, 1e-9)},
                    step=progress.done)


def _log_grid(ctx: StageContext, batch: list[Sample], pixels: np.ndarray) -> None:
    shown = min(len(batch), ctx.cfg.generate.grid_images)
    texts = [s.prompt.text for s in batch[:shown]]
    ctx.metrics.log_image("generate/samples", captioned_grid(pixels[:shown], texts), step=0)
    ctx.metrics.log_text("generate/prompts", "\n\n".join(
        f"{i}. `{s.key}`: {s.prompt.text}" for i, s in enumerate(batch[:shown])), step=0)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `revprompt generate`."""
    parser = build_parser("generate", "Generate images for the prompt set into WebDataset shards.")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace shards that a different generation config wrote")
    parser.add_argument("--plan-only", action="store_true",
                        help="prepare, plan and read this rank's prompts shard by shard, then stop (no images)")
    return run_stage("generate", argv if argv is not None else [], parser, run_generation)
