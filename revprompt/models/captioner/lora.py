"""LoRA adapters on any captioner, through peft: added for training, merged or kept alone at export."""

from __future__ import annotations

from pathlib import Path

ADAPTER_CONFIG = "adapter_config.json"
# where the adapters go by default: every projection of the text side but the output head, which is often tied to
# the word embeddings (an adapter there would change both when merged)
_LANGUAGE = (r".*language_model\..*\.(q_proj|k_proj|v_proj|o_proj|out_proj|gate_proj|up_proj|down_proj|fc1|fc2"
             r"|q|k|v|o|wi|wi_0|wi_1|wo)")  # Llama/Qwen/Gemma, OPT, T5
DEFAULT_TARGETS = {"blip": r".*text_decoder\..*\.(query|key|value|dense)", "blip-2": _LANGUAGE,
                   "image-text-to-text": _LANGUAGE}


class LoraError(ValueError):
    """train.lora_* settings that cannot be applied to this captioner."""


def base_model(model):
    """The transformers model inside a peft wrapper (the model itself otherwise)."""
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def add_lora(model, kind: str, rank: int, alpha: float, targets: list[str], base_name: str):
    """`model` with LoRA adapters of `rank` and `alpha` in `targets` (module names, or one regex; [] = the kind's
    default); only the adapters train. `base_name` is recorded as the adapter's base model."""
    from peft import LoraConfig, get_peft_model

    if len(targets) == 1 and any(c in targets[0] for c in ".*()|[]\\"):
        target = targets[0]  # peft reads a single string as a regex over the full module names
    else:
        target = list(targets) or DEFAULT_TARGETS[kind]
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=target, lora_dropout=0.0, bias="none")
    try:
        wrapped = get_peft_model(model, config)
    except ValueError as exc:
        raise LoraError(f"train.lora_targets = {targets!r} (adapters in {target!r}): "
                        f"{str(exc).splitlines()[0][:200]}") from None
    wrapped.peft_config["default"].base_model_name_or_path = base_name  # what an adapter-only export names
    return wrapped


def merged(model):
    """The plain transformers model with the adapters folded into its weights."""
    from peft import PeftModel

    return model.merge_and_unload() if isinstance(model, PeftModel) else model


def is_adapter_dir(path) -> bool:
    """Whether `path` is a folder holding a peft adapter (an export with train.lora_merge = false)."""
    return Path(path).is_dir() and (Path(path) / ADAPTER_CONFIG).is_file()


def load_adapter(model, path):
    """`model` with the adapter saved in `path`, for inference."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(path), is_trainable=False)
