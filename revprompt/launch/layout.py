"""The run directory's owner: every path under run.dir, what its files say, and who may write or delete there.

- `RunLayout` names every path under run.dir (config, prompts, shards, checkpoints, captioner, eval,
  drift, logs, TensorBoard); no other module joins a run-dir path by hand.
- The stage fingerprints (`prepared_fingerprint`, `generation_fingerprint`, `evaluation_fingerprint`,
  `drift_fingerprint`) say what a stage's outputs were made from; `is_done(stage)` answers whether
  they are complete for a config (the pipeline asks it); `RunLayout.exported()` reads what the
  exported captioner was made from.

Three rules keep a user's files safe:

- a run directory is claimed with a marker (`.revprompt-run.json`) the first time revprompt writes in
  it; a folder that already holds files under the names the stage would write (config.toml, logs/,
  shards/ for generate, ...) but no marker is someone else's, and is refused;
- one launch per stage at a time: the launch's rank 0 holds an exclusive lock (`.locks/{stage}.lock`,
  `flock`, released by the kernel when the process dies, so a killed job never leaves a stale lock);
  a second launch stops with a message naming the holder;
- revprompt deletes only what it wrote: `remove_owned` removes the files of a folder whose names match
  the patterns of revprompt's own outputs and leaves everything else where it is.
"""

from __future__ import annotations

import datetime
import errno
import fnmatch
import hashlib
import json
import logging
import os
import re
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..shards import storage
from ..shards.manifest import MANIFEST

if TYPE_CHECKING:
    from .config import Config

log = logging.getLogger(__name__)

RUN_MARKER = ".revprompt-run.json"
RUN_FORMAT = "revprompt-run/1"
# what every launch writes at the top of a run directory, and what each stage writes besides
COMMON_NAMES = ("config.toml", "logs", "tb", ".locks")
STAGE_NAMES = {
    "prepare": ("prompts",),
    "generate": ("prompts", "shards"),
    "train": ("checkpoints", "captioner"),
    "evaluate": ("eval",),
    "drift": ("drift",),
    "pipeline": ("prompts", "shards", "checkpoints", "captioner", "eval", "drift", "pipeline.json"),
}
LOCKS = ".locks"
# the locks a stage takes: its own, and those of the stages whose outputs it rewrites
STAGE_LOCKS = {
    "prepare": ("prepare",),
    "generate": ("prepare", "generate"),
    "train": ("train",),
    "evaluate": ("evaluate",),
    "drift": ("drift",),
    "pipeline": ("prepare", "generate", "train", "evaluate", "drift"),
}


class RunDirError(RuntimeError):
    """The run directory cannot be used by this launch; the message says why and what to do."""


def _is_legacy_run(run_dir: Path) -> bool:
    """A run written before the marker existed: its config.toml is a resolved revprompt config."""
    config = run_dir / "config.toml"
    try:
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        data = tomllib.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data.get("run"), dict) and "dir" in data["run"] and isinstance(data.get("generate"), dict)


def claim_run_dir(run_dir: str | Path, stage: str = "pipeline") -> Path:
    """Create `run_dir` or adopt it as a revprompt run; RunDirError when files of another owner stand where
    `stage` writes (its outputs, config.toml, logs/, tb/). Other files (a prompt file, shards made by another
    tool for `train`) are no obstacle."""
    run_dir = Path(run_dir)
    marker = run_dir / RUN_MARKER
    if marker.is_file():
        return run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run.dir {run_dir}: exists and is not a folder")
    names = (*COMMON_NAMES, *STAGE_NAMES.get(stage, STAGE_NAMES["pipeline"]))
    foreign = [name for name in names if (run_dir / name).exists()]
    if foreign and not _is_legacy_run(run_dir):
        raise RunDirError(f"run.dir {run_dir}: holds {', '.join(foreign)} that revprompt did not write (no "
                          f"{RUN_MARKER}); `{stage}` would overwrite them: choose a new or empty folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_name(f"{marker.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps({"format": RUN_FORMAT, "created": _now()}) + "\n", encoding="utf-8")
    os.replace(tmp, marker)
    return run_dir


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class StageLock:
    """Exclusive locks on `.locks/{name}.lock` for one launch; `release()` (or process death) frees them."""

    def __init__(self, run_dir: str | Path, stage: str):
        self.run_dir = Path(run_dir)
        self.stage = stage
        self.names = STAGE_LOCKS.get(stage, (stage,))
        self._handles: list = []

    def acquire(self) -> "StageLock":
        """Take every lock of the stage or none; RunDirError names the launch that holds one."""
        import fcntl

        folder = self.run_dir / LOCKS
        folder.mkdir(parents=True, exist_ok=True)
        try:
            for name in self.names:
                handle = open(folder / f"{name}.lock", "a+", encoding="utf-8")
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    handle.seek(0)
                    holder = handle.read().strip() or "unknown (it has not written its name yet)"
                    handle.close()
                    raise RunDirError(f"run.dir {self.run_dir}: another launch is running `{name}` here "
                                      f"({holder}); wait for it to end, or use another run.dir") from None
                except OSError as exc:
                    if exc.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                        handle.close()
                        raise
                    # some network file systems (Lustre without -o flock) have no locks at all
                    log.warning("%s: the file system does not support locks (%s): nothing stops a second "
                                "launch on this run directory", folder, exc.strerror)
                self._handles.append(handle)
                handle.seek(0)
                handle.truncate()
                handle.write(f"{self.stage} launch, pid {os.getpid()} on {socket.gethostname()}, "
                             f"since {_now()}: {' '.join(sys.argv)}\n")
                handle.flush()
        except BaseException:
            self.release()
            raise
        return self

    def release(self) -> None:
        """Free the locks (the files stay: deleting a lock file races with a launch opening it)."""
        for handle in self._handles:
            try:
                handle.close()
            except OSError:
                pass
        self._handles = []


def owned_files(folder: str | Path, patterns: tuple[str, ...]) -> list[Path | str]:
    """The files of `folder` (or the objects directly under a URL prefix) whose names match `patterns` (fnmatch,
    e.g. '[0-9]*.tar'): the names of revprompt's own outputs; sorted, [] for a folder that does not exist."""
    return [storage.join(folder, name) for name in sorted(storage.sizes(folder))
            if any(fnmatch.fnmatchcase(name, p) for p in patterns)]


def remove_owned(folder: str | Path, patterns: tuple[str, ...]) -> list[Path | str]:
    """Delete `owned_files(folder, patterns)`. Anything else, folders included, stays. Returns what was removed."""
    removed = owned_files(folder, patterns)
    for location in removed:
        if storage.is_url(location):
            storage.remove(location)
        else:
            Path(location).unlink()
    return removed


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]+", "-", socket.gethostname())[:32]


def private_sibling(path: Path, what: str) -> Path:
    """A hidden path beside `path` that only this process uses: `.{name}.{what}-{host}-{pid}`."""
    return path.with_name(f".{path.name}.{what}-{_host()}-{os.getpid()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_dead_siblings(path: Path) -> None:
    """Remove the private temporary folders beside `path` (`tmp`, `old`) that processes of this host left when
    they died mid-write; a live process's stay."""
    import shutil

    pattern = re.compile(rf"\.{re.escape(path.name)}\.(tmp|old)-{re.escape(_host())}-(\d+)")
    if not path.parent.is_dir():
        return
    for entry in path.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and entry.is_dir() and not _alive(int(match.group(2))):
            log.info("removing %s, left by a process that did not finish", entry)
            shutil.rmtree(entry, ignore_errors=True)


def swap_folder(new: Path, final: Path) -> Path | None:
    """Put the complete folder `new` in place of `final` by renames; returns where the previous `final` went
    (a private sibling the caller disposes of), or None. A kill leaves `final` either old or new, whole."""
    old = None
    if final.exists():
        old = private_sibling(final, "old")
        os.replace(final, old)
    os.replace(new, final)
    return old


def remove_if_empty(folder: str | Path) -> None:
    """Remove `folder` when nothing is left in it (a user's file keeps it); an object store has no folders."""
    if storage.is_url(folder):
        return
    try:
        Path(folder).rmdir()
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------- paths
class RunLayout:
    """Every path under run.dir, and what the files there say about the stages' state.

    No other module joins a path under the run directory by hand: they ask this one.
    """

    def __init__(self, root: str | Path, shards: str = ""):
        """`shards`: shards.url ('' = run.dir/shards)."""
        self.root = Path(root)
        self._shards = storage.as_root(shards) if shards else self.root / "shards"

    @classmethod
    def of(cls, cfg: "Config") -> "RunLayout":
        """The layout of a config's run: run.dir and shards.url."""
        return cls(cfg.run.dir, cfg.shards.url)

    # files of the whole run
    @property
    def config(self) -> Path:
        """The resolved config of the last launch."""
        return self.root / "config.toml"

    @property
    def logs(self) -> Path:
        """logs/: rank-N.log per rank."""
        return self.root / "logs"

    def tb(self, stage: str) -> Path:
        """tb/<stage>/: TensorBoard events of one stage."""
        return self.root / "tb" / stage

    @property
    def pipeline_record(self) -> Path:
        """pipeline.json: each stage's time and outcome."""
        return self.root / "pipeline.json"

    def samples_log(self, rank: int) -> Path:
        """The keys each training step read on `rank` (train.record_samples)."""
        return self.logs / f"samples-rank-{rank}.jsonl"

    # prepare and generate
    @property
    def prompts(self) -> Path:
        """prompts/: the prepared prompt set ({split}.jsonl + .idx, report.json, stats.json)."""
        return self.root / "prompts"

    @property
    def prompts_report(self) -> Path:
        """prompts/report.json: what prepare read, kept and dropped, and its fingerprint."""
        return self.prompts / "report.json"

    @property
    def prompts_stats(self) -> Path:
        """prompts/stats.json: how the prompts were split, their near-duplicate groups and the leakage under each
        split method."""
        return self.prompts / "stats.json"

    @property
    def shards(self) -> Path | str:
        """The shard root (manifest.json, {split}/{shard:06d}.tar): shards/, or shards.url (a folder, or a URL
        string such as s3://bucket/prefix)."""
        return self._shards

    @property
    def shards_remote(self) -> bool:
        """Whether the shard root is an object store URL (not a local folder)."""
        return storage.is_url(self._shards)

    @property
    def manifest(self) -> Path | str:
        """The shard root's manifest.json: what generation planned and wrote, and its fingerprint."""
        return storage.join(self.shards, MANIFEST)

    @property
    def progress(self) -> Path:
        """shards/.progress/ under run.dir (local even when the shards are not): each generating rank's count
        while generate runs."""
        return self.root / "shards" / ".progress"

    @property
    def staging(self) -> Path:
        """Where generation writes a shard's partial file ({split}/ below): the shard root itself for a local one
        (the finished tar is renamed into place), shards/.uploads/ under run.dir for a shard URL (it is uploaded
        from there)."""
        return self.root / "shards" / ".uploads" if self.shards_remote else Path(self.shards)

    # train
    @property
    def checkpoints(self) -> Path:
        """checkpoints/: step-N folders, DeepSpeed's `latest`, the DeepSpeed config in use."""
        return self.root / "checkpoints"

    @property
    def deepspeed_config(self) -> Path:
        """The DeepSpeed config the last training launch ran with, as it passed it to DeepSpeed."""
        return self.checkpoints / "deepspeed.json"

    @property
    def captioner(self) -> Path:
        """captioner/: the exported Hugging Face captioner."""
        return self.root / "captioner"

    # evaluate
    @property
    def eval(self) -> Path:
        """eval/: results.jsonl, summary.json, report.md and plots."""
        return self.root / "eval"

    @property
    def eval_parts(self) -> Path:
        """eval/parts/: one finished test shard's rows each ({shard:06d}.jsonl)."""
        return self.eval / "parts"

    def eval_part(self, shard: int) -> Path:
        """The rows of test shard `shard`."""
        return self.eval_parts / f"{shard:06d}.jsonl"

    def eval_part_reads(self, shard: int) -> Path:
        """What reading test shard `shard` counted (samples, corrupt, ...), kept for resumed runs' summaries."""
        return self.eval_parts / f"{shard:06d}.read.json"

    @property
    def eval_regenerated(self) -> Path:
        """eval/regenerated/: the images redrawn from recovered prompts, one shard per test shard."""
        return self.eval / "regenerated"

    def eval_images(self, shard: int) -> Path:
        """The redrawn images of test shard `shard`."""
        return self.eval_regenerated / f"{shard:06d}.tar"

    @property
    def eval_retrieval(self) -> Path:
        """eval/retrieval/: the train images' embeddings (per shard) and the retrieval baseline's index over them."""
        return self.eval / "retrieval"

    @property
    def eval_summary(self) -> Path:
        """eval/summary.json."""
        return self.eval / "summary.json"

    # drift
    @property
    def drift(self) -> Path:
        """drift/: results.jsonl, summary.json, report.md, curves and strips."""
        return self.root / "drift"

    def drift_iteration(self, k: int) -> Path:
        """drift/iter_{k:02d}/: iteration k's images and rows, one shard each per test shard."""
        return self.drift / f"iter_{k:02d}"

    def drift_iterations(self) -> list[Path]:
        """The iteration folders on disk, in order."""
        return sorted(p for p in self.drift.glob("iter_[0-9]*") if p.is_dir())

    def drift_part(self, k: int, shard: int) -> Path:
        """Iteration k's rows of test shard `shard` (written last: its completion mark)."""
        return self.drift_iteration(k) / f"{shard:06d}.jsonl"

    def drift_features(self, k: int, shard: int) -> Path:
        """The image embeddings (float32 rows, in the shard's order) of iteration k's images of test shard `shard`;
        k = 0: the test images themselves. Written before the iteration's rows."""
        return self.drift_iteration(k) / f"{shard:06d}.features.npy"

    def drift_real_features(self, shard: int) -> Path:
        """The image embeddings of the real photos of test shard `shard`'s samples that have one
        (`evaluate.real_images`), for the population measures against real photos."""
        return self.drift / "real" / f"{shard:06d}.features.npy"

    def drift_images(self, k: int, shard: int) -> Path:
        """Iteration k's images of test shard `shard`."""
        return self.drift_iteration(k) / f"{shard:06d}.tar"

    @property
    def drift_summary(self) -> Path:
        """drift/summary.json."""
        return self.drift / "summary.json"

    # what the files say
    def exported(self) -> dict | None:
        """What the exported captioner was made from (its step and position), or None before an export."""
        return read_export_info(self.captioner)

    def exported_step(self) -> int | None:
        """The training step of the exported captioner, or None."""
        info = self.exported()
        return info.get("step") if info else None


EXPORT_INFO = "revprompt.json"  # an export's marker: what it was made from, and the list of its files


def read_export_info(folder: str | Path) -> dict | None:
    """What the export in `folder` was made from, or None when it is not a revprompt export. The list of
    the export's own files is left out: it says nothing of the model."""
    try:
        info = json.loads((Path(folder) / EXPORT_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict):
        return None
    info.pop("files", None)
    return info


def _read_json(path: Path | str) -> dict | None:
    try:
        data = storage.read_json(path)
    except storage.StorageError:
        raise  # an unreachable store is not a missing record: it fails naming the URL
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# ---------------------------------------------------------------------------------------------- fingerprints
def short_hash(obj: Any, **dumps: Any) -> str:
    """The first 16 hex digits of the sha256 of `obj` as sorted JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, **dumps).encode()).hexdigest()[:16]


def section_hash(cfg: "Config", *names: str) -> str:
    """Hash of config sections or keys ('prompts', 'run.seed')."""
    full = cfg.to_dict()
    picked = {}
    for name in names:
        sec, _, key = name.partition(".")
        picked[name] = full[sec][key] if key else full[sec]
    return short_hash(picked, separators=(",", ":"))


def file_sha256(path: Path) -> str:
    """Content hash of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# the [prompts] keys of near-duplicate grouping: hash splits do not depend on them
GROUP_KEYS = ("split", "near_duplicate_threshold", "minhash_permutations")


def prepared_fingerprint(cfg: "Config") -> str:
    """What the prepared split files depend on: the [prompts] section and the prompt file's bytes. Under hash
    splits the grouping keys are left out, so a set prepared before they existed keeps its fingerprint (and its
    shards), and a new threshold only recomputes prompts/stats.json."""
    from ..prompts.sources import PromptSourceError, prompt_file

    source = prompt_file(cfg.prompts.path)
    try:
        content = file_sha256(source)
    except OSError as exc:
        raise PromptSourceError(f"{source}: cannot read prompt file: {exc.strerror or exc}") from None
    prompts = cfg.to_dict()["prompts"]
    if prompts["split"] == "hash":
        prompts = {k: v for k, v in prompts.items() if k not in GROUP_KEYS}
    return hashlib.sha256((short_hash({"prompts": prompts}, separators=(",", ":")) + content).encode()).hexdigest()[:16]


# keys of [generate] that change speed or presentation, never a sample
GENERATE_SPEED_KEYS = ("batch_size", "compile", "compile_scope", "compile_mode", "fuse_qkv",
                       "grid_images")


def generation_fingerprint(prepared: str, cfg: "Config") -> str:
    """What the shards depend on: the prepared prompts, the [generate] section and the run seed."""
    g = {k: v for k, v in cfg.to_dict()["generate"].items() if k not in GENERATE_SPEED_KEYS}
    return short_hash({"prepared": prepared, "generate": g, "seed": cfg.run.seed})


def evaluation_fingerprint(layout: RunLayout, cfg: "Config") -> str:
    """What the evaluation depends on: the shards, the fine-tuned captioner, and the settings that score."""
    full = cfg.to_dict()
    # evaluate.attention changes the speed, not the numbers (SDPA equals eager): an evaluation done before the key
    # existed, or under the other choice, stays done
    e = {k: v for k, v in full["evaluate"].items() if k not in ("examples", "attention")}
    manifest = _read_json(layout.manifest) or {}
    zero_shot = {"zero_shot": cfg.train.captioner}
    if cfg.train.instruction:  # the zero-shot captions read it (recorded only when set: older fingerprints hold)
        zero_shot["zero_shot_instruction"] = cfg.train.instruction
    return short_hash({"shards": manifest.get("fingerprint"), "evaluate": e, "seed": cfg.run.seed, **zero_shot,
                       "generate": full["generate"], "captioner": layout.exported()}, default=str)


# the [evaluate] keys drift captions and scores with
DRIFT_EVALUATE_KEYS = ("text_model", "image_model", "max_new_tokens", "num_beams", "repetition_penalty", "batch_size",
                       "real_images")


def drift_fingerprint(layout: RunLayout, cfg: "Config") -> str:
    """What every drift iteration depends on (not their number: more iterations continue a run)."""
    full = cfg.to_dict()
    manifest = _read_json(layout.manifest) or {}
    return short_hash({"shards": manifest.get("fingerprint"), "generate": full["generate"],
                       "evaluate": {k: full["evaluate"][k] for k in DRIFT_EVALUATE_KEYS},
                       "seed": cfg.run.seed, "max_samples": cfg.drift.max_samples,
                       "captioner": layout.exported()}, default=str)


# the [train] keys that shape what training computes: changing one under a checkpoint mixes two runs
TRAJECTORY_KEYS = ("captioner", "precision", "micro_batch_size", "grad_accum", "lr", "weight_decay", "warmup_steps",
                   "min_lr_ratio", "grad_clip", "label_smoothing", "max_length", "freeze_vision", "shuffle_buffer")
# recorded only where used, so that the records of runs without them stay as they were (train.lora_merge is not
# one: it changes how the end is exported, not what is trained)
LORA_KEYS = ("lora_rank", "lora_alpha", "lora_targets")
# likewise for the embedding head; its targets are the embeddings of evaluate.text_model, recorded under that name
HEAD_KEYS = ("embedding_head", "embedding_loss_weight", "embedding_head_hidden")


def made_from(cfg: "Config", data: str | None) -> dict:
    """What a training run's checkpoints and export are made from: the shards' fingerprint, the run seed and the
    [train] keys that shape the trajectory."""
    keys = TRAJECTORY_KEYS + (("instruction",) if cfg.train.instruction else ()) + \
        (LORA_KEYS if cfg.train.lora_rank else ()) + (HEAD_KEYS if cfg.train.embedding_head else ())
    train = {k: getattr(cfg.train, k) for k in keys}
    if cfg.train.embedding_head:
        train["evaluate.text_model"] = cfg.evaluate.text_model
    return {"data": data, "seed": cfg.run.seed, "train": train}


def changes(recorded: dict, now: dict) -> list[str]:
    """'key: old -> new' for every trajectory key (and the seed) that differs between two made_from records."""
    was, will = recorded.get("train", {}), now["train"]
    # a key one record lacks is one that run did not use (LoRA, the instruction): it differs when the other has it
    unset = "(not used)"
    # a dotted key (evaluate.text_model, the head's targets) names its own section
    out = [f"{k if '.' in k else f'train.{k}'}: {was.get(k, unset)!r} -> {will.get(k, unset)!r}"
           for k in sorted(set(was) | set(will))
           if was.get(k, unset) != will.get(k, unset) and (k in was or k not in TRAJECTORY_KEYS)]
    if recorded.get("seed") != now["seed"]:
        out.append(f"run.seed: {recorded.get('seed')!r} -> {now['seed']!r}")
    return out


def is_done(stage: str, layout: RunLayout, cfg: "Config") -> bool:
    """Whether `stage`'s outputs in `layout` are complete for `cfg` (then a pipeline skips it)."""
    if stage == "generate":
        report = _read_json(layout.prompts_report) or {}
        manifest = _read_json(layout.manifest) or {}
        if not manifest.get("complete") or report.get("fingerprint") != prepared_fingerprint(cfg):
            return False
        return manifest.get("fingerprint") == generation_fingerprint(report["fingerprint"], cfg)
    if stage == "train":
        exported = layout.exported() or {}
        data = (_read_json(layout.manifest) or {}).get("fingerprint")
        recorded = exported.get("made_from")
        current = recorded is None or (recorded.get("data") == data and not changes(recorded, made_from(cfg, data)))
        return exported.get("step") == cfg.train.max_steps and current
    if stage == "evaluate":
        summary = _read_json(layout.eval_summary) or {}
        return summary.get("fingerprint") == evaluation_fingerprint(layout, cfg)
    if stage == "drift":
        summary = _read_json(layout.drift_summary) or {}
        return (summary.get("fingerprint") == drift_fingerprint(layout, cfg)
                and len(summary.get("iterations", [])) == cfg.drift.iterations + 1)
    raise ValueError(f"unknown stage {stage!r}")
