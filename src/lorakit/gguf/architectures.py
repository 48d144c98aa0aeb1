"""How llama.cpp names and lays out a Hugging Face base model's weights, per architecture.

llama.cpp's converters (``convert_hf_to_gguf.py`` for a base, ``convert_lora_to_gguf.py`` for an adapter;
REFERENCE.md "llama.cpp LoRA adapters (GGUF)") rename each weight to llama.cpp's tensor names and, for some
architectures, reorder rows. The names come from the ``gguf`` package's ``TensorNameMap`` (the table the
converters use), so lorakit carries no copy of it. The one row reordering that touches LoRA factors is
Llama's: HF stores q/k with the rotary halves of each head split ``[x0..x31 | x32..x63]``, llama.cpp
interleaves them back (``convert_hf_to_gguf`` "undo permute"); it acts on the output rows, so on ``lora_B``::

    B (out, r) → B.reshape(n_head, 2, out / n_head / 2, r).swapaxes(1, 2).reshape(out, r)

(k uses the number of KV heads.) Only architectures whose adapter conversion has been checked against
llama.cpp's own converter are listed in ``ARCHITECTURES``; any other base is refused by name.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import gguf
import torch


@dataclass(frozen=True)
class Architecture:
    """One supported Hugging Face architecture and what llama.cpp does to its weights."""

    hf_name: str
    """``config.json`` ``architectures[0]``, e.g. ``"LlamaForCausalLM"``."""
    gguf_arch: gguf.MODEL_ARCH
    """llama.cpp's architecture (``general.architecture`` is its name, e.g. ``"llama"``)."""
    permute_qk: bool
    """Whether llama.cpp interleaves the rotary halves of q/k rows (Llama's "undo permute")."""


ARCHITECTURES: dict[str, Architecture] = {
    a.hf_name: a
    for a in (
        Architecture("LlamaForCausalLM", gguf.MODEL_ARCH.LLAMA, True),
        Architecture("MistralForCausalLM", gguf.MODEL_ARCH.LLAMA, True),
        Architecture("Qwen2ForCausalLM", gguf.MODEL_ARCH.QWEN2, False),
    )
}
"""Bases whose GGUF adapters lorakit writes and reads (each checked against ``convert_lora_to_gguf.py``)."""


@dataclass(frozen=True)
class BaseLayout:
    """A base model's config as far as the GGUF layout depends on it."""

    architecture: Architecture
    n_layers: int
    n_head: int
    n_kv_head: int
    tied_embeddings: bool
    config_path: Path

    @property
    def arch_name(self) -> str:
        """``general.architecture``, e.g. ``"llama"``."""
        return gguf.MODEL_ARCH_NAMES[self.architecture.gguf_arch]

    @cached_property
    def name_map(self) -> gguf.TensorNameMap:
        """The ``gguf`` package's HF → llama.cpp tensor-name table for this architecture and depth."""
        return gguf.get_tensor_name_map(self.architecture.gguf_arch, self.n_layers)

    def tensor_name(self, module_name: str) -> str | None:
        """llama.cpp's name of the weight of module ``module_name`` (``model.layers.0.self_attn.q_proj`` →
        ``blk.0.attn_q.weight``), or None if llama.cpp has no such tensor."""
        return self.name_map.get_name(f"{module_name}.weight", try_suffixes=(".weight",))

    def module_names_by_tensor(self, module_names: Iterable[str]) -> dict[str, str]:
        """The inverse of ``tensor_name`` over the given modules: ``blk.0.attn_q.weight`` → module name."""
        name_map = self.name_map
        found: dict[str, str] = {}
        for module in module_names:
            tensor = name_map.get_name(f"{module}.weight", try_suffixes=(".weight",))
            if tensor is not None:
                found.setdefault(tensor, module)
        return found

    def _qk_heads(self, module_name: str) -> int | None:
        if not self.architecture.permute_qk:
            return None
        if module_name.endswith("q_proj"):
            return self.n_head
        if module_name.endswith("k_proj"):
            return self.n_kv_head
        return None

    def to_gguf_rows(self, module_name: str, rows: torch.Tensor) -> torch.Tensor:
        """Reorder the output rows of a weight (or its ``lora_B``, (out, r)) the way llama.cpp stores them."""
        heads = self._qk_heads(module_name)
        if heads is None:
            return rows
        out = rows.shape[0]
        return rows.reshape(heads, 2, out // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)

    def from_gguf_rows(self, module_name: str, rows: torch.Tensor) -> torch.Tensor:
        """The inverse of ``to_gguf_rows`` (back to Hugging Face's row order)."""
        heads = self._qk_heads(module_name)
        if heads is None:
            return rows
        out = rows.shape[0]
        return rows.reshape(heads, out // heads // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _config_int(config: dict[str, Any], keys: tuple[str, ...], path: Path) -> int:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    raise ValueError(f"{path} has no positive integer {' / '.join(keys)}; it is not a usable model config.json.")


def read_base_layout(model_dir: str | Path) -> BaseLayout:
    """The GGUF layout of the base model in ``model_dir`` (its ``config.json``).

    Raises:
        FileNotFoundError: no config.json in ``model_dir``.
        ValueError: the architecture has no GGUF mapping in lorakit, or the config lacks layer/head counts.
    """
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"--model {model_dir}: no config.json there; pass the Hugging Face model directory "
                                "of the base the adapter was trained on.")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); re-save the base model.") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object; re-save the base model.")
    names = config.get("architectures") or []
    hf_name = names[0] if isinstance(names, list) and names and isinstance(names[0], str) else None
    if hf_name not in ARCHITECTURES:
        raise ValueError(
            f"base architecture {hf_name!r} ({path}) has no llama.cpp GGUF mapping in lorakit; supported: "
            f"{', '.join(ARCHITECTURES)}. For another base, merge the adapter (`lorakit merge`) and convert the "
            "merged model with llama.cpp's convert_hf_to_gguf.py."
        )
    n_head = _config_int(config, ("num_attention_heads", "n_heads"), path)
    n_kv = config.get("num_key_value_heads") or n_head
    return BaseLayout(
        architecture=ARCHITECTURES[hf_name],
        n_layers=_config_int(config, ("num_hidden_layers", "n_layers"), path),
        n_head=n_head,
        n_kv_head=int(n_kv),
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        config_path=path,
    )
