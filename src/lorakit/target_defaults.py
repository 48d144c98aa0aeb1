"""PEFT's default ``target_modules`` per architecture, used when a config leaves ``target_modules=None``.

The table is PEFT 0.21.2's ``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`` for the architectures in
common use, copied (lorakit never imports PEFT at runtime). The key is ``model.config.model_type``.
"""

from __future__ import annotations

from torch import nn

DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "llama": ["q_proj", "v_proj"],
    "gpt_bigcode": ["c_attn"],
    "falcon": ["query_key_value"],
    "codegen": ["qkv_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
}


def model_type(model: nn.Module) -> str | None:
    """``model.config.model_type`` of a transformers model, None for any other module."""
    config = getattr(model, "config", None)
    value = getattr(config, "model_type", None)
    return value if isinstance(value, str) else None


def default_target_modules(model: nn.Module) -> list[str]:
    """PEFT's default targets for ``model``'s architecture (e.g. llama → q_proj, v_proj; gpt2 → c_attn).

    Raises:
        ValueError: the architecture has no default (or ``model`` is not a transformers model); the message
            is PEFT's, "Please specify `target_modules` in `peft_config`", plus what lorakit knows.
    """
    kind = model_type(model)
    targets = DEFAULT_TARGET_MODULES.get(kind) if kind is not None else None
    if targets is None:
        shown = f"model_type {kind!r}" if kind is not None else f"{type(model).__name__} (no config.model_type)"
        raise ValueError(
            f"Please specify `target_modules` in `peft_config`: target_modules=None has no default for {shown}; "
            f"defaults exist for {', '.join(sorted(DEFAULT_TARGET_MODULES))}. Pass e.g. "
            "target_modules=['q_proj', 'v_proj'] or 'all-linear'."
        )
    return list(targets)
