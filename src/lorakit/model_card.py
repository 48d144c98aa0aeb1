"""The README.md model card ``save_pretrained`` writes next to the adapter, as PEFT does.

Its YAML front matter carries what a model hub reads: ``base_model``, ``library_name: peft`` (the files are
PEFT's format, so PEFT and the hub's PEFT integration load them), ``tags`` (``base_model:adapter:<base>``,
``lora``, ``lorakit``, ``transformers`` for transformers models) and, for causal LMs, ``pipeline_tag``.

A card the user wrote is kept: lorakit only rewrites a README.md that carries its own marker line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .config import TaskType

if TYPE_CHECKING:
    from .model import PeftModel

CARD_NAME = "README.md"
MARKER = "<!-- written by lorakit's save_pretrained: edit this card and lorakit will keep it -->"
"""Marks a card lorakit may rewrite; any README.md without it is the user's and is left alone."""


def base_model_name(model: PeftModel, adapter_names: list[str]) -> str:
    """The base model's name: the adapters' ``base_model_name_or_path``, else the transformers config's
    ``_name_or_path`` (what PEFT records), else ""."""
    for name in adapter_names:
        recorded = model.peft_config[name].base_model_name_or_path
        if recorded:
            return recorded
    config = getattr(model.get_base_model(), "config", None)
    value = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    return value if isinstance(value, str) else ""


def model_card_text(model: PeftModel, adapter_names: list[str]) -> str:
    """The card: front matter (base_model, library_name, tags, pipeline_tag) and a short description."""
    from . import __version__
    from .io import PEFT_FORMAT_VERSION

    base = base_model_name(model, adapter_names)
    tags = [f"base_model:adapter:{base}", "lora", "lorakit"]
    if type(model.get_base_model()).__module__.startswith("transformers"):
        tags.append("transformers")
    causal = any(model.peft_config[n].task_type == TaskType.CAUSAL_LM for n in adapter_names)
    lines = ["---", f"base_model: {_yaml_string(base)}", "library_name: peft"]
    if causal:
        lines.append("pipeline_tag: text-generation")
    lines += ["tags:"] + [f"- {_yaml_string(t)}" for t in sorted(tags)] + ["---", "", MARKER, ""]
    lines += ["# LoRA adapter" + (f" for {base}" if base else ""), ""]
    for name in adapter_names:
        config = model.peft_config[name]
        where = "this directory" if name == "default" else f"`{name}/`"
        lines.append(f"- `{name}` ({where}): r={config.r}, lora_alpha={config.lora_alpha}, "
                     f"target_modules={config.target_modules!r}")
    lines += ["", "Load it with PEFT or lorakit (`PeftModel.from_pretrained(base_model, path)`).", "",
              "### Framework versions", "", f"- PEFT {PEFT_FORMAT_VERSION} (file format)", f"- lorakit {__version__}", ""]
    return "\n".join(lines)


def write_model_card(model: PeftModel, save_directory: str | os.PathLike[str],
                     adapter_names: list[str] | None = None) -> Path | None:
    """Write ``save_directory/README.md`` unless the user's own card is there; returns the path written
    (None when a user card was kept or there is no adapter to describe)."""
    from .io import atomic_write

    names = list(model.peft_config) if adapter_names is None else adapter_names
    path = Path(os.fspath(save_directory)) / CARD_NAME
    if not names or path.is_symlink():
        return None
    existing = _read_text(path) if path.exists() else None
    if existing is not None and MARKER not in existing:
        return None
    text = model_card_text(model, names)
    if text != existing:  # an unchanged card is not rewritten: re-saving a checkpoint stays one rename
        atomic_write(path, text.encode("utf-8"))
    return path


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:  # e.g. README.md is a directory: not ours to replace
        return ""


def _yaml_string(value: str) -> str:
    """A YAML scalar that reads back as ``value`` (quoted: names may hold ':' or be empty)."""
    return "'" + value.replace("'", "''") + "'"
