"""PeftModel: the wrapper ``get_peft_model`` returns — adapters by name, merge, disable, mixed batches.

Module tree (as PEFT's, so state-dict keys and files match): ``PeftModel.base_model`` is a ``LoraModel``
whose ``.model`` is the user's model with its targeted modules wrapped in LoRA layers. Every key therefore
starts with ``base_model.model.``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .config import LoraConfig
from .inject import (
    adapter_layers,
    inject_adapter,
    mark_trainable,
    replace_with_base,
    structure_version,
    with_task_heads,
)
from .layers.base import BASE_ROW, LoraLayer
from .layers.modules_to_save import ModulesToSaveWrapper
from .mixed import BatchPlan

_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_\-]+")


def validate_adapter_name(name: object) -> str:
    """Adapter names become dict keys and directory names: letters, digits, '_' and '-' only."""
    if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name) or name == BASE_ROW:
        raise ValueError(
            f"adapter name {name!r} is invalid: use letters, digits, '_' or '-' (no dots, slashes or '..'), "
            f"and not {BASE_ROW!r}, e.g. 'default' or 'sentiment_v2'."
        )
    return name


class LoraModel(nn.Module):
    """Holds the adapted model as ``.model`` (the middle of the ``base_model.model.`` key prefix)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)


class PeftModel(nn.Module):
    """A model with LoRA adapters: h = W0·x + Σ_active (α/r)·B·A·x in every adapted layer.

    Build one with ``get_peft_model(model, config)``. Only the active adapters' factors (plus
    ``modules_to_save`` copies and biases per ``config.bias``) require grad; everything else is frozen.
    """

    def __init__(self, model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default") -> None:
        super().__init__()
        validate_adapter_name(adapter_name)
        if isinstance(model, PeftModel) or any(True for _ in adapter_layers(model)):
            raise ValueError(
                "the model already holds LoRA adapters; call add_adapter(name, config) on its PeftModel "
                "instead of wrapping it again."
            )
        peft_config = with_task_heads(peft_config)  # SEQ_CLS: the classification head is saved too (PEFT)
        inject_adapter(model, peft_config, adapter_name)  # validates first: on error the model is unchanged
        self.base_model = LoraModel(model)
        self.peft_config: dict[str, LoraConfig] = {adapter_name: peft_config}
        self._active: list[str] = []
        self.set_adapter(adapter_name)
        # HF Trainer keeps only the dataset columns named in forward's signature: expose the base
        # model's parameters (plus adapter_names) instead of (*args, **kwargs).
        self.forward = functools.partial(PeftModel._forward, self)  # type: ignore[method-assign]
        self.forward.__signature__ = _signature_with_adapter_names(model.forward)  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ forward
    def _forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        with self._mixed_batch(adapter_names, args, kwargs):
            return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """``generate`` of the base model; ``adapter_names`` (one per row) holds for every step."""
        with self._mixed_batch(adapter_names, args, kwargs):
            generate: Any = self.get_base_model().generate
            return generate(*args, **kwargs)

    @contextlib.contextmanager
    def _mixed_batch(self, adapter_names: list[str] | None, args: tuple, kwargs: dict) -> Iterator[None]:
        if adapter_names is None:
            yield
            return
        plan = self._plan_mixed_batch(adapter_names, args, kwargs)
        layers = self._adapter_layers()
        for layer in layers:
            layer.batch_plan = plan
        try:
            yield
        finally:
            for layer in layers:
                layer.batch_plan = None

    def _plan_mixed_batch(self, adapter_names: list[str], args: tuple, kwargs: dict) -> BatchPlan:
        if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
            raise TypeError(f"adapter_names must be a list with one adapter name per row, got {adapter_names!r}.")
        unknown = sorted({n for n in adapter_names if n != BASE_ROW and n not in self.peft_config})
        if unknown:
            raise ValueError(
                f"adapter_names contains unknown adapter(s) {unknown}; known: {sorted(self.peft_config)} "
                f"or {BASE_ROW!r} for no adapter."
            )
        if self.merged_adapters:
            raise ValueError(
                f"a mixed batch needs unmerged adapters, but {self.merged_adapters} are merged into the base "
                "weights; call unmerge_adapter() first."
            )
        batch = _batch_size(args, kwargs)
        if batch is not None and batch != len(adapter_names):
            raise ValueError(
                f"adapter_names has {len(adapter_names)} entries but the batch has {batch} rows; "
                "give exactly one adapter name per row."
            )
        device = next(self.parameters()).device
        return BatchPlan.build(list(adapter_names), device)

    # ------------------------------------------------------------------ parameters
    def get_base_model(self) -> nn.Module:
        """The user's model (with LoRA layers inside it)."""
        return self.base_model.model

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters), each counted once even if shared (tied weights)."""
        seen: set[int] = set()
        trainable = total = 0
        for param in self.parameters():
            if id(param) in seen:
                continue
            seen.add(id(param))
            total += param.numel()
            trainable += param.numel() if param.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # ------------------------------------------------------------------ adapters
    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_adapter(self) -> str:
        """The active adapter's name (the first one when several are active)."""
        return self._active[0]

    @property
    def merged_adapters(self) -> list[str]:
        names: list[str] = []
        for layer in self._lora_layers():
            names.extend(n for n in layer.merged_adapters if n not in names)
        return names

    def _adapter_layers(self) -> list[LoraLayer | ModulesToSaveWrapper]:
        """Every LoRA layer and modules_to_save wrapper, cached until lorakit swaps a module (a mixed-batch
        decode step would otherwise spend milliseconds walking ``model.modules()``)."""
        version = (structure_version(), id(self.base_model.model))
        cached = self.__dict__.get("_layer_cache")
        if cached is None or cached[0] != version:
            cached = (version, list(adapter_layers(self.base_model.model)))
            self.__dict__["_layer_cache"] = cached
        return cached[1]

    def _lora_layers(self) -> Iterator[LoraLayer]:
        return (m for m in self._adapter_layers() if isinstance(m, LoraLayer))

    def _require_adapter(self, name: str) -> None:
        if name not in self.peft_config:
            raise ValueError(f"no adapter named {name!r}; this model has {sorted(self.peft_config)}.")

    def add_adapter(self, adapter_name: str, peft_config: LoraConfig) -> None:
        """Add a new adapter (inactive until ``set_adapter``). Fails, changing nothing, if the name exists."""
        validate_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} already exists; choose another name or "
                             "delete_adapter() it first.")
        if not isinstance(peft_config, LoraConfig):
            raise TypeError(f"peft_config must be a lorakit LoraConfig, got {type(peft_config).__name__}.")
        peft_config = with_task_heads(peft_config)
        inject_adapter(self.base_model.model, peft_config, adapter_name)
        self.peft_config[adapter_name] = peft_config
        self._apply_active(self._active)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make these adapters the active ones (their outputs add up); only they are trainable."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name in names:
            self._require_adapter(name)
        if self.merged_adapters and set(names) != set(self.merged_adapters):
            raise ValueError(
                f"adapters {self.merged_adapters} are merged into the base weights; call unmerge_adapter() "
                f"before activating {names}."
            )
        self._apply_active(names)

    def _apply_active(self, names: list[str]) -> None:
        self._active = list(names)
        for layer in self._adapter_layers():
            layer.active_adapters = [n for n in names if n in layer.adapter_names]
        trainable = not any(self.peft_config[n].inference_mode for n in names)
        bias = self.peft_config[names[0]].bias if names else "none"
        mark_trainable(self.base_model.model, names, bias, trainable=trainable)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter. Refused while it is merged (its ΔW would silently stay in the base)."""
        self._require_adapter(adapter_name)
        if adapter_name in self.merged_adapters:
            raise ValueError(
                f"adapter {adapter_name!r} is merged into the base weights; call unmerge_adapter() before "
                "deleting it, or its update would stay in the model with nothing left to remove it."
            )
        if len(self.peft_config) == 1:
            raise ValueError(f"{adapter_name!r} is the only adapter; use unload() to get the base model back.")
        for layer in self._adapter_layers():
            layer.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        remaining = [n for n in self._active if n != adapter_name] or [next(iter(self.peft_config))]
        self._apply_active(remaining)

    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: int | None = None,
        svd_clamp: float | None = None,
        density: float | None = None,
        majority_sign_method: str = "total",
        seed: int | None = None,
    ) -> None:
        """Add ``adapter_name`` combining ``adapters`` with ``weights``; see ``lorakit.arithmetic.add_weighted_adapter``."""
        from .arithmetic import add_weighted_adapter

        add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, svd_rank=svd_rank,
                             svd_clamp=svd_clamp, density=density, majority_sign_method=majority_sign_method,
                             seed=seed)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model inside this block; the prior state returns on exit, even after an exception.

        Merged adapters are unmerged on entry and merged again on exit (bit-exact both ways).
        """
        merged = self.merged_adapters
        if merged:
            self.unmerge_adapter()
        layers = self._adapter_layers()
        previous = [layer.disable_adapters for layer in layers]
        for layer in layers:
            layer.disable_adapters = True
        try:
            yield
        finally:
            for layer, state in zip(layers, previous, strict=True):
                layer.disable_adapters = state
            if merged:
                self.merge_adapter(merged)

    # ------------------------------------------------------------------ files (PEFT's format; see lorakit.io)
    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        selected_adapters: list[str] | None = None,
        safe_serialization: bool = True,
        verify: bool = True,
    ) -> None:
        """Write adapters as PEFT does: ``adapter_config.json`` + ``adapter_model.safetensors`` in
        ``save_directory`` for "default", in ``save_directory/<name>/`` for the others.

        Each file is replaced atomically (weights first, then config), so an interrupted save leaves the
        old or the new adapter, never a torn one. The safetensors metadata also records a fingerprint of the
        base weights, checked on load (see ``lorakit.fingerprint``).

        Args:
            save_directory: created if needed.
            selected_adapters: adapter names to save (default: all).
            safe_serialization: safetensors (default) or a legacy pickle ``adapter_model.bin``.
            verify: read the files back and compare them with what was meant to be written.

        Raises:
            ValueError: unknown adapter, or a target path that is a file or a symbolic link.
            OSError: writing failed, or ``verify`` found the files differ.
        """
        from .io import save_pretrained

        save_pretrained(self, save_directory, selected_adapters, safe_serialization, verify)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike[str],
        adapter_name: str = "default",
        is_trainable: bool = False,
        allow_base_mismatch: bool = False,
        use_safetensors: bool = True,
    ) -> PeftModel:
        """Wrap ``model`` with the adapter saved in directory ``model_id`` (by lorakit or by PEFT).

        Everything (files, config, base fingerprint, every key and shape) is checked before the model is
        touched: on error it is left exactly as it was.

        Args:
            model: the base model the adapter was trained on (no adapters yet).
            model_id: the adapter's directory (``save_directory/<name>`` for a non-default adapter).
            adapter_name: the name it gets in this model.
            is_trainable: False (default) loads it frozen, in inference mode.
            allow_base_mismatch: load even if the stored base fingerprint differs from ``model``'s.
            use_safetensors: if False, a legacy ``adapter_model.bin`` may be read (weights only).

        Raises:
            FileNotFoundError: missing directory, config or weights.
            ValueError: malformed or unsupported config, corrupt weights, missing/unexpected keys, shape
                mismatches, a different base model, an invalid adapter name.
        """
        from .io import from_pretrained

        return from_pretrained(cls, model, model_id, adapter_name, is_trainable, allow_base_mismatch,
                               use_safetensors)

    def load_adapter(
        self,
        model_id: str | os.PathLike[str],
        adapter_name: str,
        is_trainable: bool = False,
        allow_base_mismatch: bool = False,
        use_safetensors: bool = True,
    ) -> None:
        """Add the adapter saved in ``model_id`` as ``adapter_name`` (inactive until ``set_adapter``).

        Same checks and errors as ``from_pretrained``; on error the model is unchanged.
        """
        from .io import load_adapter

        load_adapter(self, model_id, adapter_name, is_trainable, allow_base_mismatch, use_safetensors)

    # ------------------------------------------------------------------ merge
    def merge_adapter(self, adapter_names: list[str] | None = None) -> None:
        """W ← W + s·B·A for each adapter (default: the active ones) in every layer; idempotent.

        While merged, forward costs exactly the base forward. ``unmerge_adapter`` restores W0 bit-exactly
        (see ``lorakit.layers.base`` for the mechanism and its memory cost: 1 byte per merged weight element).
        """
        from .quant import require_full_precision

        names = self._active if adapter_names is None else list(adapter_names)
        for name in names:
            self._require_adapter(name)
        require_full_precision(self.base_model.model, "merge_adapter")
        for layer in self._lora_layers():
            layer.merge([n for n in names if n in layer.r])

    def unmerge_adapter(self) -> None:
        """Subtract every merged adapter from the base weights, restoring W0 bit for bit."""
        for layer in self._lora_layers():
            layer.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """Merge the active adapters and return the plain base model with no lorakit module left.

        A quantized base (``lorakit.quant``) is dequantized first: the result is a full-precision model.
        """
        from .quant import dequantize_model

        return replace_with_base(dequantize_model(self.base_model.model), merge=True)

    def unload(self) -> nn.Module:
        """Return the plain base model, weights untouched (merged adapters are unmerged first)."""
        self.unmerge_adapter()
        return replace_with_base(self.base_model.model, merge=False)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)


def get_peft_model(model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default") -> PeftModel:
    """Wrap ``model`` with a LoRA adapter per ``peft_config`` (PEFT's entry point, same arguments).

    Args:
        model: any ``nn.Module``; the targeted modules are replaced in place by LoRA layers.
        peft_config: which modules and how (see ``LoraConfig``).
        adapter_name: name of this first adapter.

    Raises:
        ValueError / TypeError: bad config or targets; the model is left exactly as it was.
    """
    if not isinstance(peft_config, LoraConfig):
        raise TypeError(f"peft_config must be a lorakit LoraConfig, got {type(peft_config).__name__}; "
                        "build it with lorakit.LoraConfig(...).")
    return PeftModel(model, peft_config, adapter_name)


def _signature_with_adapter_names(forward: Any) -> inspect.Signature:
    try:
        signature = inspect.signature(forward)
    except (TypeError, ValueError):
        signature = inspect.Signature([inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL)])
    params = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    extra = inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None)
    if not any(p.name == "adapter_names" for p in params):
        insert_at = len(params)
        params.insert(insert_at, extra)
    params += [p for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
    return signature.replace(parameters=params)


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    for value in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *args):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return None
