"""`revprompt download --config CONFIG --to DIR`: every model a config names, on disk, for nodes without a network.

For each model key (generate.model, train.captioner, evaluate.text_model, evaluate.image_model) that names
a hub id, only the files the pipeline loads are fetched (`select_files`: configs, tokenizers, processors and
safetensors weights; no .bin duplicates, no EMA or single-file checkpoints, the fp16 variant where the config
runs in bf16 or fp16 and the repository has one) into `DIR/{owner}--{name}/`, which then carries a marker
listing what it holds. `DIR/config.toml` is the given config with each such key pointing at its folder:
`revprompt pipeline --config DIR/config.toml` runs on a compute node with no network. Built-in names and local
folders are left as they are. Unreachable models are all named at once, before anything is fetched; a
folder already complete is not fetched again.
"""

from __future__ import annotations

import fnmatch
import json
import logging
from pathlib import Path

from ..launch.config import Config, save_config
from .builtin import EARLIER_NAMES, MINIATURE, RANDOM_TINY

log = logging.getLogger(__name__)

MODEL_KEYS = {"generate.model": "text_to_image", "train.captioner": "captioner", "evaluate.text_model": "text",
              "evaluate.image_model": "image"}
MARKER = ".revprompt-download.json"
# what from_pretrained reads besides weights, in any repository kind (chat templates are .jinja files)
SMALL_FILES = ("*.json", "*.txt", "*.model", "*.jinja", "tokenizer*/**", "*/tokenizer*", "*/special_tokens_map.json",
               "*/vocab*", "*/merges.txt", "*/spiece.model")
NEVER = ("*.bin", "*.bin.index.json", "*.ckpt", "*.pt", "*.pth", "*.msgpack", "*.h5", "*.onnx", "*.onnx_data",
         "*.ot", "*.tflite", "*ema*", "safety_checker/*", "feature_extractor/*", "*.png", "*.jpg", "*.gif", "*.md",
         ".gitattributes")


class DownloadError(RuntimeError):
    """Models that could not be fetched; the message names each key, model and reason."""


def folder_name(repo_id: str) -> str:
    """The folder a hub repository goes to under DIR: 'owner--name'."""
    return repo_id.replace("/", "--")


def _weights(files: list[str], dtype: str) -> list[str]:
    """The safetensors to fetch: per folder, the fp16 variant when the config runs in 16 bits and it exists,
    else the plain files (and their shard index). A diffusers repository's top-level single-file checkpoints
    (what other tools load) are left out."""
    diffusers_repo = "model_index.json" in files
    chosen = []
    for folder in sorted({f.rpartition("/")[0] for f in files if f.endswith(".safetensors")}):
        if diffusers_repo and not folder:
            continue
        inside = [f for f in files if f.rpartition("/")[0] == folder and ".safetensors" in f]
        variant = [f for f in inside if ".fp16." in f]
        plain = [f for f in inside if ".fp16." not in f]
        chosen += variant if dtype in ("bf16", "fp16") and variant else plain
    return chosen


def select_files(files: list[str], dtype: str = "fp32") -> list[str]:
    """The files of a repository the pipeline needs, from the repository's file list."""
    def matches(name: str, patterns: tuple[str, ...]) -> bool:
        return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name.rpartition("/")[2], p) for p in patterns)

    small = [f for f in files if matches(f, SMALL_FILES) and not matches(f, NEVER) and ".safetensors" not in f]
    weights = [f for f in _weights(files, dtype) if not matches(f, NEVER)]
    return sorted(set(small + weights))


def wanted_models(cfg: Config) -> list[tuple[str, str]]:
    """(key, hub id) for every model key of `cfg` that names a hub repository (not a built-in name, not a folder)."""
    builtin = {MINIATURE, RANDOM_TINY, "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}
    builtin |= {name for names in EARLIER_NAMES.values() for name in names}
    out = []
    for key in MODEL_KEYS:
        section, _, name = key.partition(".")
        value = getattr(getattr(cfg, section), name)
        if value and value not in builtin and not Path(value).expanduser().exists() and value.count("/") == 1:
            out.append((key, value))
    return out


def is_complete(folder: Path) -> bool:
    """A folder an earlier download (or a prepared copy) finished: its marker lists files that all exist."""
    try:
        listed = json.loads((folder / MARKER).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all((folder / name).is_file() for name in listed)


def mark_complete(folder: Path, repo_id: str, files: list[str]) -> None:
    """Record what `folder` holds of `repo_id` (written last, after every file)."""
    total = sum((folder / f).stat().st_size for f in files)
    (folder / MARKER).write_text(json.dumps({"repo": repo_id, "files": sorted(files), "bytes": total}, indent=2)
                                 + "\n", encoding="utf-8")


def _plan(wanted: list[tuple[str, str]], dtype_of: dict[str, str]) -> dict[str, tuple[list[str], int]]:
    """repo id -> (files, bytes) from the hub, or DownloadError naming every model it could not reach."""
    from huggingface_hub import HfApi

    api, plans, failures = HfApi(), {}, []
    for key, repo in wanted:
        try:
            info = api.model_info(repo, files_metadata=True)
        except Exception as exc:  # offline mode, no network, no such repository, no access
            failures.append(f"{key} = {repo!r}: {str(exc).strip().splitlines()[0][:200]}")
            continue
        sizes = {s.rfilename: s.size or 0 for s in info.siblings}
        files = select_files(list(sizes), dtype_of[key])
        plans[repo] = (files, sum(sizes[f] for f in files))
    if failures:
        raise DownloadError("cannot reach these models on the hub (set HF_ENDPOINT or HF_TOKEN if you use a mirror "
                            "or a gated model; run where there is a network):\n  " + "\n  ".join(failures))
    return plans


def download(cfg: Config, to: Path) -> Path:
    """Fetch what `cfg` needs into `to`, then write `to/config.toml` pointing at it; returns that config's path."""
    to.mkdir(parents=True, exist_ok=True)
    wanted = wanted_models(cfg)
    # bf16-autocast trains fp32 weights: it fetches the fp32 files
    captioner_dtype = "fp32" if cfg.train.precision == "bf16-autocast" else cfg.train.precision
    dtype_of = {"generate.model": cfg.generate.dtype, "train.captioner": captioner_dtype,
                "evaluate.text_model": "fp32", "evaluate.image_model": "fp32"}
    missing = [(key, repo) for key, repo in wanted if not is_complete(to / folder_name(repo))]
    for key, repo in wanted:
        if (key, repo) not in missing:
            log.info("%s = %s: already in %s", key, repo, to / folder_name(repo))
    if missing:
        from huggingface_hub import snapshot_download

        plans = _plan(missing, dtype_of)
        for repo, (files, size) in plans.items():
            log.info("%s: %d files, %.2f GB", repo, len(files), size / 1e9)
        for repo, (files, _) in plans.items():
            folder = to / folder_name(repo)
            snapshot_download(repo, local_dir=folder, allow_patterns=files)
            mark_complete(folder, repo, files)
            log.info("%s -> %s", repo, folder)
    for key, repo in wanted:
        section, _, name = key.partition(".")
        setattr(getattr(cfg, section), name, str((to / folder_name(repo)).resolve()))
    save_config(cfg, to / "config.toml")
    log.info("wrote %s: run `revprompt pipeline --config %s` on a node without a network", to / "config.toml",
             to / "config.toml")
    return to / "config.toml"


def download_stage(ctx) -> Path:
    """`revprompt download` with its --to folder."""
    if not ctx.args.to:
        raise DownloadError("--to DIR is needed: the folder the models and the rewritten config.toml go to")
    return download(ctx.cfg, Path(ctx.args.to))


def main(argv: list[str] | None = None) -> int:
    """Entry point of `revprompt download --config CONFIG --to DIR`."""
    from ..launch.runner import build_parser, run_stage

    parser = build_parser("download", "Fetch every model a config names, for compute nodes without a network.")
    parser.add_argument("--to", help="folder for the models and the rewritten config.toml")
    return run_stage("download", argv if argv is not None else [], parser, download_stage, uses_run_dir=False)
