"""Hugging Face ``Trainer`` for lorakit models: checkpoints and ``save_model`` hold the adapter, not the model.

``transformers.Trainer`` only knows how to save PreTrainedModel and PEFT's own PeftModel; for any other
module it writes the full state dict. This subclass (a drop-in: ``from lorakit.trainer import Trainer``)
saves a lorakit ``PeftModel`` with ``save_pretrained`` — PEFT format, a few MB — and resumes from such
checkpoints. Everything else is the upstream Trainer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer as _HFTrainer
from transformers.trainer import TRAINING_ARGS_NAME

from .io import SAFETENSORS_NAME, file_key, load_adapter_weights
from .model import PeftModel

__all__ = ["Trainer"]


class Trainer(_HFTrainer):
    """``transformers.Trainer`` that saves lorakit adapters in PEFT format (checkpoints and save_model)."""

    def _lorakit_model(self, model: Any = None) -> PeftModel | None:
        candidate = model if model is not None else self.model
        unwrapped = self.accelerator.unwrap_model(candidate, keep_torch_compile=False)
        return unwrapped if isinstance(unwrapped, PeftModel) else None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        peft = self._lorakit_model()
        if peft is None:
            super()._save(output_dir, state_dict)
            return
        output_dir = str(output_dir if output_dir is not None else self.args.output_dir)
        os.makedirs(output_dir, exist_ok=True)
        peft.save_pretrained(output_dir, selected_adapters=list(peft.peft_config))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        peft = self._lorakit_model(model)
        if peft is None:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        for name in peft.peft_config:
            directory = Path(resume_from_checkpoint) / ("" if name == "default" else name)
            if not (directory / SAFETENSORS_NAME).is_file():
                raise FileNotFoundError(f"checkpoint {resume_from_checkpoint} has no adapter {name!r} "
                                        f"({directory / SAFETENSORS_NAME} missing).")
            load_into_adapter(peft, directory, name)


def load_into_adapter(model: PeftModel, directory: str | Path, adapter_name: str) -> None:
    """Overwrite adapter ``adapter_name``'s tensors with those saved in ``directory`` (same config).

    Raises:
        ValueError: the file lacks tensors the adapter has, or a shape differs (nothing is changed then).
    """
    tensors = load_adapter_weights(directory)
    params = {k: v for k, v in model.named_parameters() if _belongs(k, adapter_name)}
    wanted = {file_key(k, adapter_name): k for k in params}
    missing = sorted(set(wanted) - set(tensors))
    bad = [(k, tuple(tensors[k].shape), tuple(params[wanted[k]].shape)) for k in wanted
           if k in tensors and tensors[k].shape != params[wanted[k]].shape]
    if missing or bad:
        raise ValueError(f"{directory} does not fit adapter {adapter_name!r}: missing {missing[:5]}, "
                         f"shape mismatches {bad[:5]}.")
    with torch.no_grad():
        for key, model_key in wanted.items():
            params[model_key].copy_(tensors[key])


def _belongs(key: str, adapter_name: str) -> bool:
    parts = key.split(".")
    return any(parts[i] in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "modules_to_save")
               and i + 1 < len(parts) and parts[i + 1] == adapter_name for i in range(len(parts)))
