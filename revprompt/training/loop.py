"""`revprompt train`: DeepSpeed ZeRO fine-tuning of the captioner (BLIP, BLIP-2 or an image-text-to-text model,
whole or through LoRA adapters), streaming from the shards."""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..launch import dist
from ..launch.layout import changes, made_from
from ..launch.metrics import captioned_grid
from ..launch.runner import StageContext, StageError, build_parser, on_main_first, run_stage
from ..models.captioner import (BLIP, BLIP2, TrainingInputs, add_lora, base_model, base_name, build_captioner,
                                caption_batch, caption_budget, freeze_vision, is_adapter_dir, kind_of, set_instruction)
from ..models.captioner.head import HeadError, attach_head, captioner_of, embedding_loss, write_head_info
from ..models.captioner.lora import LoraError
from ..models.builtin import RANDOM_TINY, builtin_name
from ..models.text_embedder import embedding_width as text_embedding_width
from ..models.text_embedder import pairwise_cosine
from ..shards.manifest import read_manifest, split_shards
from ..shards.reader import build_reader
from ..shards.writer import write_error, write_json_atomic
from .data import TrainStream, build_loader, check_deal, smallest_share
from .checkpoints import (HF_SUBDIR, POSITION, checkpoint_dirs, commit_checkpoint, fsync_files, prune_checkpoints,
                          read_position, resume_point, write_latest)
from .engine import (allow_deepspeed_checkpoint_types, force_weights_only_loads, forward_entry, gathered_state_dict,
                     initialize, clip_gradients, trainer_clips)
from .export import check_export_target, save_hf_dir
from .targets import PromptEmbeddings

log = logging.getLogger(__name__)


@dataclass
class Position:
    """Where training stands; saved in every checkpoint."""

    step: int = 0
    samples_seen: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed

    def as_dict(self) -> dict:
        """Plain dict for checkpoints and logs."""
        return dict(step=self.step, samples_seen=self.samples_seen, epoch=self.epoch,
                    batch_in_epoch=self.batch_in_epoch)


@dataclass
class Losses:
    """One micro-batch's loss (what backward runs on) and its parts, detached: read only after the step, so that
    the device is not waited for between forward and backward."""

    total: torch.Tensor
    lm: torch.Tensor  # the captioner's language-modelling loss
    embedding: torch.Tensor | None = None  # the embedding head's mean(1 - cosine to the prompt's embedding)

    def parts(self) -> torch.Tensor:
        """(total, lm, embedding) as one float64 tensor on the loss's device (embedding 0 without a head): summed
        there over a logging window, so the host waits for the device once per window, not once per step."""
        embedding = self.embedding if self.embedding is not None else torch.zeros_like(self.lm)
        return torch.stack([p.to(torch.float64) for p in (self.total.detach(), self.lm, embedding)])

    def values(self) -> tuple[float, float, float]:
        """(total, lm, embedding) as numbers (embedding 0 without a head), in one device sync."""
        total, lm, embedding = self.parts().tolist()
        return total, lm, embedding


class LossWindow:
    """The losses of a logging window's micro-batches, kept detached on the device and read when the window is logged:
    one device sync per window, as with sums kept on the device, without the stack, casts and add that summing there
    costs every step (0.12 ms of a 62 ms tiny-preset step on the CPU). Every FOLD micro-batches the kept losses are
    read and added into the sums (one more sync), so that a long window (train.log_every times train.grad_accum)
    keeps at most FOLD of them."""

    FOLD = 1024

    def __init__(self):
        self.steps: list[Losses] = []
        self._sums = [0.0, 0.0, 0.0]

    def add(self, losses: Losses) -> None:
        """One micro-batch's losses; its total is kept detached, so that no graph outlives the step."""
        self.steps.append(Losses(losses.total.detach(), losses.lm, losses.embedding))
        if len(self.steps) >= self.FOLD:
            self._fold()

    def sums(self) -> tuple[float, float, float]:
        """(total, lm, embedding) summed over the window in float64, step by step in order (embedding 0 without a
        head): the same numbers as adding each step's `Losses.parts()`."""
        self._fold()
        return self._sums[0], self._sums[1], self._sums[2]

    def _fold(self) -> None:
        if not self.steps:
            return
        columns = [torch.stack([s.total for s in self.steps]), torch.stack([s.lm for s in self.steps])]
        if any(s.embedding is not None for s in self.steps):  # a step without one adds 0, as in `Losses.parts()`
            columns.append(torch.stack([s.embedding if s.embedding is not None else torch.zeros_like(s.lm)
                                        for s in self.steps]))
        else:
            columns.append(torch.zeros_like(columns[1]))
        for row in torch.stack([c.to(torch.float64) for c in columns], dim=1).tolist():  # the device sync
            for i, value in enumerate(row):
                self._sums[i] += value
        self.steps = []


def build_model(cfg, embedding_width: int | None = None):
    """The captioner to train and its processor, as `cfg`'s [train] asks: vision frozen (always for BLIP-2), label
    smoothing (BLIP), the instruction (prompted kinds), LoRA adapters, and with train.embedding_head the captioner
    and an embedding head as one module (CaptionerWithHead), `embedding_width` outputs wide (None: evaluate.text_model's
    width). A setting that cannot apply is a StageError naming its key."""
    t = cfg.train
    model, processor = build_captioner(t.captioner, cfg.run.seed, attention=t.attention)
    kind = kind_of(model)
    try:
        instruction = set_instruction(model, t.instruction)
    except ValueError as exc:
        raise StageError(str(exc)) from None
    if kind == BLIP:
        model.config.text_config.label_smoothing = t.label_smoothing
        model.text_decoder.label_smoothing = t.label_smoothing
    elif t.label_smoothing:
        raise StageError(f"train.label_smoothing = {t.label_smoothing}: only a BLIP captioner smooths its labels; "
                         f"{type(model).__name__} computes its own loss: set it to 0")
    if t.freeze_vision or kind == BLIP2:
        try:
            log.info("froze %d vision parameters", freeze_vision(model))
        except ValueError as exc:
            raise StageError(str(exc)) from None
    if t.lora_rank:
        if builtin_name("captioner", t.captioner) == RANDOM_TINY and not t.lora_merge:
            raise StageError("train.lora_merge = false keeps the adapter alone, for its base model; the base "
                             "'random-tiny' exists only in revprompt: merge (train.lora_merge = true)")
        try:
            model = add_lora(model, kind, t.lora_rank, t.lora_alpha, t.lora_targets, base_name(t.captioner))
        except LoraError as exc:
            raise StageError(str(exc)) from None
    elif t.lora_targets or not t.lora_merge:
        log.warning("train.lora_targets / train.lora_merge are set but train.lora_rank = 0: the whole model "
                    "trains, without adapters")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("captioner %s (%s%s): %d of %d parameters train", type(base_model(model)).__name__, kind,
             f", instruction {instruction!r}" if instruction else "", trainable, total)
    if t.embedding_head:
        try:
            width = embedding_width or text_embedding_width(cfg.evaluate.text_model)
            model = attach_head(model, width, t.embedding_head_hidden, cfg.evaluate.text_model, cfg.run.seed)
        except HeadError as exc:
            raise StageError(str(exc)) from None
        log.info("embedding head on %s (%s pooling): %d -> %s%d (%s), %d parameters, loss weight %g",
                 model.site.path, model.site.pooling, model.head.in_dim,
                 f"{model.head.hidden} -> " if model.head.hidden else "", model.head.out_dim,
                 cfg.evaluate.text_model, sum(p.numel() for p in model.head.parameters()), t.embedding_loss_weight)
    return model, processor


class Trainer:
    """Owns the engine, the data stream, validation, checkpoints and export for one run."""

    def __init__(self, ctx: StageContext):
        self.ctx, self.cfg, self.info = ctx, ctx.cfg, ctx.info
        self.t = ctx.cfg.train
        self.layout = ctx.layout
        self.ckpt_root = self.layout.checkpoints
        self.export_dir = self.layout.captioner
        force_weights_only_loads()
        allow_deepspeed_checkpoint_types()
        dist.ensure_group(self.info)
        # a captioner/ that is not an earlier export would be refused at the end: say so before training
        on_main_first(self.info, lambda: check_export_target(self.export_dir))
        self.train_shards = split_shards(self.layout.shards, "train")
        # every epoch's deal must feed every worker a micro-batch: say so now, not in epoch 3
        check_deal(self.train_shards, self.info.world_size, self.t.num_workers, self.t.micro_batch_size)
        manifest = read_manifest(self.layout.shards) or {}
        self.made_from = made_from(self.cfg, manifest.get("fingerprint"))
        # validate on the val shards the manifest lists, if generation wrote any
        self.val_shards = split_shards(self.layout.shards, "val") if "val" in manifest.get("splits", {}) else []
        if getattr(ctx.args, "overwrite", False):
            on_main_first(self.info, self.remove_checkpoints)
        # the head's targets: prompt embeddings under the metric's model, made in the step (see targets.py)
        self.targets = PromptEmbeddings(self.cfg.evaluate.text_model, self.info.device) \
            if self.t.embedding_head else None
        model, self.processor = build_model(self.cfg, self.targets.width if self.targets else None)
        # a compiled model sees one text shape, so that it compiles once (CUDA only: see train.compile)
        self.compiled = self.t.compile and self.info.device.type == "cuda"
        self.inputs = TrainingInputs(captioner_of(model), self.processor, self.t.max_length, static=self.compiled)
        # rank 0 keeps a plain copy for captioning during validation and for export (ZeRO-3 partitions the original);
        # with the embedding head, the copy holds it too
        self.twin = copy.deepcopy(model).eval() if self.info.is_main else None
        self.engine, self.optimizer, self.scheduler = initialize(model, self.t, self.info.world_size, self.info.device)
        self.clips = trainer_clips(self.engine.config)
        self.trained = [p for p in self.engine.module.parameters() if p.requires_grad]
        if self.info.is_main:  # the DeepSpeed config this run passed, as DeepSpeed got it
            self.layout.checkpoints.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.layout.deepspeed_config, self.engine.config)
        # the partition layout this engine writes its checkpoints in
        self.zero_layout = {"zero_stage": self.engine.zero_optimization_stage(), "world_size": self.info.world_size}
        if self.zero_layout["zero_stage"] != self.t.zero_stage:
            log.info("train.zero_stage=%d on one rank has nothing to partition: running as ZeRO-%d",
                     self.t.zero_stage, self.zero_layout["zero_stage"])
        if self.compiled:
            self.engine.compile()
        elif self.t.compile:  # on a CPU the compile costs minutes and buys nothing at these sizes
            log.info("train.compile is on, but the device is %s: training eagerly", self.info.device)
        # the engine, or its module where the engine's forward adds nothing (one rank, ZeRO-0, fp32: engine.py)
        self.model_forward = forward_entry(self.engine, self.info.world_size)
        self.pos = Position()
        self.grad_norm: float | None = None
        self.samples_log = None
        if self.t.record_samples:
            self.samples_log = open(self.layout.samples_log(self.info.rank), "a",
                                    buffering=1)  # line-buffered: a killed run keeps what it recorded

    # ---------------------------------------------------------------- checkpoints
    def resume(self) -> bool:
        """Load the latest checkpoint if there is one; True when resumed."""
        folder, skipped = resume_point(self.ckpt_root)
        for path, why in skipped:
            log.warning("not resuming from %s: %s", path, why)
        if folder is None:
            return False
        tag = folder.name
        self.check_made_from(folder)
        written = self.checkpoint_layout(tag)
        same_layout = written is None or written == self.zero_layout
        if not same_layout:
            # optimizer partitions of another ZeRO stage or rank count do not map onto this engine's:
            # keep the weights, the position and the schedule, restart the AdamW moments
            log.warning("%s was written by ZeRO-%d on %d rank(s), this job is ZeRO-%d on %d: loading the weights "
                        "only; the optimizer's moments start again", self.ckpt_root / tag, written["zero_stage"],
                        written["world_size"], self.zero_layout["zero_stage"], self.zero_layout["world_size"])
        _, client = self.engine.load_checkpoint(str(self.ckpt_root), tag=tag, load_module_only=not same_layout,
                                                load_optimizer_states=same_layout,
                                                load_lr_scheduler_states=same_layout)
        if client is None:
            raise StageError(f"{self.ckpt_root / tag}: checkpoint could not be loaded")
        self.pos = Position(**{k: client[k] for k in Position().as_dict()})
        if not same_layout:
            self.set_schedule(self.pos.step)
        old_workers = read_position(folder).get("num_workers", self.t.num_workers)
        if written is not None and (written["world_size"], old_workers) != (self.info.world_size, self.t.num_workers):
            self.convert_position(written["world_size"], old_workers)
        log.info("resumed from %s: %s, lr %.3g", self.ckpt_root / tag, self.pos.as_dict(),
                 self.scheduler.get_last_lr()[0])
        return True

    def logs_at(self, step: int) -> bool:
        """Whether the training scalars are logged after `step` (every log_every steps, and the last)."""
        return step % self.t.log_every == 0 or step == self.t.max_steps

    def clip(self, logs: bool) -> None:
        """Where the trainer clips (see engine.trainer_clips), before engine.step(); on logging steps keep the norm
        before clipping, which DeepSpeed does not record there."""
        norm = clip_gradients(self.trained, self.t.grad_clip, logs)
        if norm is not None:
            self.grad_norm = norm

    def remove_checkpoints(self) -> None:
        """--overwrite: train from scratch; the step folders and DeepSpeed's `latest` go (the export stays until the
        new one replaces it)."""
        import shutil

        for folder in checkpoint_dirs(self.ckpt_root):
            log.warning("--overwrite: removing %s", folder)
            shutil.rmtree(folder)
        (self.ckpt_root / "latest").unlink(missing_ok=True)

    def check_made_from(self, folder: Path) -> None:
        """Refuse to resume from a checkpoint of other shards or other trajectory settings, saying what changed."""
        recorded = read_position(folder).get("made_from")
        if recorded is None:
            log.warning("%s does not record what it was trained on (an older revprompt wrote it): resuming without "
                        "checking the shards and [train] against it", folder)
            return
        if recorded.get("data") != self.made_from["data"]:
            raise StageError(f"{folder} was trained on the shards of fingerprint {recorded.get('data')}, but "
                             f"{self.layout.shards} now holds {self.made_from['data']} (generated again since): train "
                             "from scratch with `revprompt train --overwrite`, or use another run.dir")
        diff = changes(recorded, self.made_from)
        if diff:
            raise StageError(f"{folder} was trained with other settings ({'; '.join(diff)}): resuming would mix two "
                             "runs; put them back, or train from scratch with `revprompt train --overwrite`")

    def checkpoint_layout(self, tag: str) -> dict | None:
        """The ZeRO stage and rank count a checkpoint was written with (None for checkpoints without the record)."""
        saved = read_position(self.ckpt_root / tag)
        return {k: saved[k] for k in self.zero_layout} if all(k in saved for k in self.zero_layout) else None

    def convert_position(self, old_world: int, old_workers: int) -> None:
        """Map the data position of a run with `old_world` ranks and `old_workers` DataLoader workers per rank onto
        this job's.

        The position counts micro-batches per rank; the samples of the epoch consumed by all ranks
        carry over, rounded down, and a position past this job's epoch moves to the next epoch.
        Across such a change the epoch's shard assignment changes too, so a few samples of this epoch
        may be seen twice or not at all; the log says so.
        """
        consumed = self.pos.batch_in_epoch * old_world
        batch = consumed // self.info.world_size
        epoch = self.pos.epoch
        if batch >= self.stream(self.train_shards, epoch=epoch, batch=0, train=True).plan(epoch).batches:
            epoch, batch = epoch + 1, 0
        workers = ("" if old_workers == self.t.num_workers
                   else f" (DataLoader workers per rank {old_workers} -> {self.t.num_workers})")
        log.warning("data position of epoch %d converted from %d ranks to %d%s: micro-batch %d -> epoch %d micro-batch "
                    "%d (within this epoch some samples may repeat or be skipped)", self.pos.epoch, old_world,
                    self.info.world_size, workers, self.pos.batch_in_epoch, epoch, batch)
        self.pos.epoch, self.pos.batch_in_epoch = epoch, batch

    def set_schedule(self, step: int) -> None:
        """Put the LR schedule at `step`, as if it had stepped that many times."""
        self.scheduler.last_epoch = step - 1
        self.scheduler.step()

    def save(self) -> None:
        """Checkpoint on every rank; once all have written and flushed, rank 0 adds the HF config, processor and
        position and commits it (only a committed checkpoint is resumed from); then prune old ones."""
        tag = f"step-{self.pos.step}"
        folder = self.ckpt_root / tag
        if self.info.is_main and folder.exists():
            # the uncommitted remains of a killed run that got this far: start the folder afresh
            log.info("replacing %s: %s", folder, "an earlier run's unfinished save")
            import shutil

            shutil.rmtree(folder)
        dist.barrier()
        try:
            self.engine.save_checkpoint(str(self.ckpt_root), tag=tag, client_state=self.pos.as_dict(),
                                        save_latest=False)
            fsync_files(folder)
        except (OSError, RuntimeError) as exc:  # torch.save on a full disk: "basic_ios::clear: iostream error"
            raise write_error(folder, f"the checkpoint of step {self.pos.step}", exc) from None
        dist.barrier()
        if self.info.is_main:
            hf = folder / HF_SUBDIR
            base_model(captioner_of(self.twin)).config.save_pretrained(hf)
            if self.targets is not None:  # the head's shape, so that `revprompt export` can rebuild it
                write_head_info(self.twin.head, hf)
            self.processor.save_pretrained(hf)
            write_json_atomic(hf / POSITION, {**self.pos.as_dict(), **self.zero_layout,
                                              "num_workers": self.t.num_workers, "made_from": self.made_from})
            commit_checkpoint(folder, self.pos.step)
            write_latest(self.ckpt_root, tag)
            for old in prune_checkpoints(self.ckpt_root, self.t.keep_checkpoints):
                log.info("deleted old checkpoint %s", old)
        dist.barrier()

    def export(self) -> None:
        """Consolidate the weights (a collective) and write captioner/ in Hugging Face format (rank 0)."""
        state = gathered_state_dict(self.engine, self.info.is_main)
        if self.info.is_main:
            save_hf_dir(self.twin, self.processor, state, self.export_dir,
                        {"made_from": self.made_from, "step": self.pos.step, **self.pos.as_dict()},
                        merge=self.t.lora_merge)
            log.info("exported the captioner at step %d to %s", self.pos.step, self.export_dir)
        dist.barrier()

    # ---------------------------------------------------------------- data
    def stream(self, shards, *, epoch: int, batch: int, train: bool) -> TrainStream:
        """A batch stream over `shards` from (epoch, batch); val streams read everything in order."""
        rank, world = self.info.rank, self.info.world_size
        if not train and len(shards) < world:
            rank, world = 0, 1  # too few val shards to split: every rank reads them all
        return TrainStream(shards, seed=self.cfg.run.seed, rank=rank, world_size=world,
                           num_workers=self.t.num_workers if train else 1, batch_size=self.t.micro_batch_size,
                           encode=self.inputs, shuffle_buffer=self.t.shuffle_buffer if train else 0,
                           start_epoch=epoch, start_batch=batch, cache_bytes=self.t.cache_mb << 20 if train else 0)

    def forward(self, batch: dict) -> Losses:
        """The loss of one micro-batch: the language-modelling loss, plus train.embedding_loss_weight times the
        embedding head's cosine loss when there is a head."""
        dev = self.engine.device
        dtype = next(p for p in self.engine.module.parameters()).dtype
        inputs = {k: batch[k].to(dev, dtype, non_blocking=True) if batch[k].is_floating_point()
                  else batch[k].to(dev, non_blocking=True) for k in batch["model_inputs"]}
        if self.targets is None:
            loss = self.model_forward(**inputs).loss
            return Losses(loss, loss.detach())
        outputs, embeddings = self.model_forward(**inputs)
        head_loss = embedding_loss(embeddings, self.targets(batch["prompts"]))
        total = outputs.loss + self.t.embedding_loss_weight * head_loss
        return Losses(total, outputs.loss.detach(), head_loss.detach())

    # ---------------------------------------------------------------- validation
    def validate(self) -> dict:
        """Val loss over equal batch counts on every rank, and MiniLM similarity of captions on a fixed subset."""
        metrics: dict[str, float] = {}
        if not self.val_shards:
            return metrics
        stream = self.stream(self.val_shards, epoch=0, batch=0, train=False)
        # val sets are small: shrink the batch so that every rank gets at least one, never a partial one
        stream.batch_size = min(self.t.micro_batch_size, smallest_share(self.val_shards, stream.world_size))
        if stream.batch_size == 0:
            log.warning("no val samples to validate on")
            return metrics
        n_batches = stream.plan(0).batches
        if self.t.val_batches:
            n_batches = min(n_batches, self.t.val_batches)
        total = torch.zeros(4, dtype=torch.float64)  # sums over samples: loss, count, its two parts
        self.engine.eval()
        with torch.no_grad():
            for _, batch in zip(range(n_batches), stream):
                (loss, lm, head), n = self.forward(batch).values(), len(batch["keys"])
                total += torch.tensor([loss * n, n, lm * n, head * n], dtype=torch.float64)
        self.engine.train()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(total)
        count = max(float(total[1]), 1.0)
        metrics["val/loss"] = float(total[0]) / count
        if self.targets is not None:
            metrics["val/loss_lm"] = float(total[2]) / count
            metrics["val/loss_embedding"] = float(total[3]) / count
            # the mean cosine of the head's embedding to the prompt's: the metric, scored on the embedding itself
            metrics["val/head_similarity"] = 1.0 - float(total[3]) / count
        if self.t.val_captions:
            state = gathered_state_dict(self.engine, self.info.is_main)
            if self.info.is_main:
                metrics.update(self._caption_similarity(state))
            dist.barrier()
        return metrics

    def _caption_similarity(self, state: dict) -> dict:
        self.twin.load_state_dict(state, strict=False)
        self.twin.to(self.info.device)
        captioner = captioner_of(self.twin)
        samples = []
        for sample in build_reader([p for p, _ in self.val_shards], split_workers=False):
            samples.append(sample)
            if len(samples) == self.t.val_captions:
                break
        e = self.cfg.evaluate
        captions = []
        for start in range(0, len(samples), 32):
            captions += caption_batch(captioner, self.processor, [s["image"] for s in samples[start:start + 32]],
                                      caption_budget(captioner, e.max_new_tokens), e.num_beams, e.repetition_penalty)
        self.twin.to("cpu")
        prompts = [s["txt"] for s in samples]
        sims = pairwise_cosine(captions, prompts, e.text_model)
        shown = min(8, len(samples))
        grid = captioned_grid(np.stack([np.asarray(s["image"].resize((96, 96))) for s in samples[:shown]]),
                              [f"P: {p} | C: {c}" for p, c in zip(prompts[:shown], captions[:shown])],
                              caption_lines=4)
        self.ctx.metrics.log_image("val/examples", grid, self.pos.step)
        self.ctx.metrics.log_text("val/captions", "\n\n".join(f"- **prompt** {p}  \n  **caption** {c}"
                                                              for p, c in zip(prompts, captions)), self.pos.step)
        return {"val/similarity": float(np.mean(sims))}

    # ---------------------------------------------------------------- training
    def train(self) -> Position:
        """Run until train.max_steps, checkpointing and validating on schedule; export at the end."""
        resumed = self.resume()
        if resumed and self.pos.step >= self.t.max_steps:
            log.info("training already reached step %d (train.max_steps=%d)", self.pos.step, self.t.max_steps)
            adapter_only = bool(self.t.lora_rank) and not self.t.lora_merge
            if self.layout.exported_step() != self.pos.step or is_adapter_dir(self.export_dir) != adapter_only:
                self.export()
            return self.pos
        stream = self.stream(self.train_shards, epoch=self.pos.epoch, batch=self.pos.batch_in_epoch, train=True)
        epoch_batches = {self.pos.epoch: stream.plan(self.pos.epoch).batches}
        loader = build_loader(stream, self.t.num_workers, pin_memory=self.info.device.type == "cuda")
        log.info("training from step %d to %d: %d train shards, %d micro-batches per epoch per rank, ZeRO-%d, %s",
                 self.pos.step, self.t.max_steps, len(self.train_shards), epoch_batches[self.pos.epoch],
                 self.engine.zero_optimization_stage(),
                 "bf16" if self.engine.bfloat16_enabled() else
                 "fp32 under bf16 autocast" if self.engine.torch_autocast_enabled() else "fp32")
        bar = None
        if self.info.is_main:
            from tqdm import tqdm

            # redrawn at most once a second: a redraw costs about 0.2 ms, which at tqdm's default 0.1 s is 0.2 % of a
            # tiny-preset step's time on the CPU
            bar = tqdm(total=self.t.max_steps, initial=self.pos.step, unit="step", desc="train", dynamic_ncols=True,
                       mininterval=1.0)
        window = self._new_window()
        read_stats: dict[int, torch.Tensor] = {}
        # training mode for the micro-steps: a captioner comes out of from_pretrained in eval mode (no dropout, and
        # transformers' gradient checkpointing only runs in training); validation goes to eval and back
        self.engine.train()
        try:
            data = iter(loader)
            while self.pos.step < self.t.max_steps:
                asked = time.monotonic()
                batch = next(data)
                window["data_wait"] += time.monotonic() - asked
                read_stats[batch["worker"]] = batch["read_stats"]
                losses, boundary = self._micro_step(batch)
                window["losses"].add(losses)
                window["micro"] += 1
                window["samples"] += len(batch["keys"])
                self._advance(batch, stream, epoch_batches)
                if not boundary:
                    continue
                self.pos.step += 1
                if bar is not None:
                    bar.update(1)
                if self.logs_at(self.pos.step):
                    self._log_window(window, read_stats)
                    window = self._new_window()
                self._on_schedule()
        finally:
            if bar is not None:
                bar.close()
            if self.samples_log is not None:
                self.samples_log.close()
        self._log(self.validate())
        self.save()
        self.export()
        return self.pos

    @staticmethod
    def _new_window() -> dict:
        """The sums one logging window collects, and its micro-batches' losses (`LossWindow`)."""
        return {"losses": LossWindow(), "micro": 0, "samples": 0, "data_wait": 0.0, "start": time.monotonic()}

    def _micro_step(self, batch: dict) -> tuple[Losses, bool]:
        """Forward and backward one micro-batch, step at an accumulation boundary; (its losses, boundary)."""
        if (batch["epoch"], batch["position"]) != (self.pos.epoch, self.pos.batch_in_epoch):
            raise RuntimeError(f"data stream out of step: got batch {batch['position']} of epoch "
                               f"{batch['epoch']}, expected {self.pos.batch_in_epoch} of {self.pos.epoch}")
        loss = self.forward(batch)
        self.engine.backward(loss.total)
        boundary = self.engine.is_gradient_accumulation_boundary()
        if boundary and self.clips:
            self.clip(self.logs_at(self.pos.step + 1))
        self.engine.step()
        return loss, boundary

    def _advance(self, batch: dict, stream: TrainStream, epoch_batches: dict[int, int]) -> None:
        """Count one consumed micro-batch in the position (the next epoch at the end of one); record its keys."""
        self.pos.samples_seen += len(batch["keys"]) * self.info.world_size
        self.pos.batch_in_epoch += 1
        if self.pos.batch_in_epoch == epoch_batches[self.pos.epoch]:
            self.pos.epoch += 1
            self.pos.batch_in_epoch = 0
            epoch_batches[self.pos.epoch] = stream.plan(self.pos.epoch).batches
        if self.samples_log is not None:
            self.samples_log.write(json.dumps({"step": self.pos.step, "epoch": batch["epoch"],
                                               "position": batch["position"], "keys": batch["keys"]}) + "\n")

    def _on_schedule(self) -> None:
        """Validate and checkpoint when the step says so (the end does both anyway)."""
        if self.t.val_every and self.pos.step % self.t.val_every == 0 and self.pos.step < self.t.max_steps:
            self._log(self.validate())
        if self.pos.step % self.t.save_every == 0 and self.pos.step < self.t.max_steps:
            self.save()

    def _log_window(self, window: dict, read_stats: dict[int, torch.Tensor]) -> None:
        loss, lm, head = window["losses"].sums()
        seconds = time.monotonic() - window["start"]
        # every rank reaches this step, so the all-reduce is matched everywhere
        stats = torch.tensor([loss, window["micro"], window["samples"]], dtype=torch.float64)
        reads = sum(read_stats.values()) if read_stats else torch.zeros(5, dtype=torch.long)
        parts = torch.tensor([lm, head, window["data_wait"]], dtype=torch.float64)
        stats = torch.cat([stats, reads.to(torch.float64), parts])
        ranks = 1
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(stats)
            ranks = torch.distributed.get_world_size()
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is None:
            grad_norm = self.grad_norm
        scalars = {
            "train/loss": float(stats[0] / max(stats[1], 1)),
            "train/lr": self.scheduler.get_last_lr()[0],
            "perf/samples_per_s": float(stats[2]) / max(seconds, 1e-9),
            # the share of the window spent in next() on the loader (mean over ranks): well above zero, the DataLoader
            # workers (train.num_workers) do not keep up with the model. The host may run ahead of a GPU by a few
            # steps (losses are read once per window), so the device waited at most this long for data
            "perf/data_wait_fraction": float(stats[10]) / ranks / max(seconds, 1e-9),
            "data/corrupt": float(stats[4]), "data/rejected": float(stats[5]), "data/incomplete": float(stats[6]),
            "data/resampled": float(stats[7]),
        }
        if grad_norm is not None:
            scalars["train/grad_norm"] = float(grad_norm)
        if self.targets is not None:
            scalars["train/loss_lm"] = float(stats[8] / max(stats[1], 1))
            scalars["train/loss_embedding"] = float(stats[9] / max(stats[1], 1))
        self._log(scalars)

    def _log(self, scalars: dict) -> None:
        if scalars:
            self.ctx.metrics.log(scalars, self.pos.step)
            log.info("step %d: %s", self.pos.step, ", ".join(f"{k} {v:.4g}" for k, v in sorted(scalars.items())))


def run_training(ctx: StageContext) -> None:
    """Build the trainer and run it."""
    trainer = Trainer(ctx)
    pos = trainer.train()
    log.info("training done at step %d (%d samples seen, epoch %d); captioner in %s", pos.step, pos.samples_seen,
             pos.epoch, trainer.export_dir)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `revprompt train`."""
    parser = build_parser("train", "Fine-tune the captioner on the generated shards with DeepSpeed ZeRO.")
    parser.add_argument("--overwrite", action="store_true",
                        help="train from scratch: remove the checkpoints of an earlier run (other shards or settings)")
    return run_stage("train", argv if argv is not None else [], parser, run_training)
