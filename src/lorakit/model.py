"""PeftModel: the wrapper ``get_peft_model`` returns — adapters by name, merge, disable, mixed batches.

Module tree (as PEFT's, so state-dict keys and files match): ``PeftModel.base_model`` is a ``LoraModel``
whose ``.model`` is the user's model with its targeted modules wrapped in LoRA layers. Every key therefore
starts with ``base_model.model.``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import os
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from .config import LoraConfig
from .inject import (
    adapter_layers,
    bias_conflict,
    inject_adapter,
    mark_trainable,
    plan_injection,
    replace_with_base,
    structure_version,
    uninitialised_factors,
    with_default_targets,
    with_task_heads,
)
from .layers.base import BASE_ROW, LoraLayer
from .layers.modules_to_save import ModulesToSaveWrapper, NotATensorOutputError
from .lora_model import LoraModel
from .mixed import BatchPlan
from .safe_merge import check_merge_is_finite

_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_\-]+")


def validate_adapter_name(name: object) -> str:
    """Adapter names become dict keys and directory names: letters, digits, '_' and '-' only."""
    if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name) or name == BASE_ROW:
        raise ValueError(
            f"adapter name {name!r} is invalid: use letters, digits, '_' or '-' (no dots, slashes or '..'), "
            f"and not {BASE_ROW!r}, e.g. 'default' or 'sentiment_v2'."
        )
    return name


class PeftModel(nn.Module):
    """A model with LoRA adapters: h = W0·x + Σ_active (α/r)·B·A·x in every adapted layer.

    Build one with ``get_peft_model(model, config)``. Only the active adapters' factors (plus
    ``modules_to_save`` copies and biases per ``config.bias``) require grad; everything else is frozen.

    ``autocast_adapter_dtype`` (PEFT's option): True keeps the factors of a float16/bfloat16 base layer in
    float32 (stable training); False stores them in the base layer's dtype.
    """

    def __init__(self, model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True) -> None:
        super().__init__()
        validate_adapter_name(adapter_name)
        if isinstance(model, PeftModel) or any(True for _ in adapter_layers(model)):
            raise ValueError(
                "the model already holds LoRA adapters; call add_adapter(name, config) on its PeftModel "
                "instead of wrapping it again."
            )
        _check_flag("autocast_adapter_dtype", autocast_adapter_dtype)
        peft_config = with_default_targets(model, peft_config)  # target_modules=None: PEFT's defaults
        peft_config = with_task_heads(peft_config)  # SEQ_CLS: the classification head is saved too (PEFT)
        inject_adapter(model, peft_config, adapter_name)  # validates first: on error the model is unchanged
        self.base_model = LoraModel(model, self)
        self.peft_config: dict[str, LoraConfig] = {adapter_name: peft_config}
        self._active: list[str] = []
        if not autocast_adapter_dtype:
            self._cast_to_base_dtype(adapter_name)
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
        except NotATensorOutputError as exc:  # name the module by its path, which only the model knows
            path = next((n for n, m in self.base_model.model.named_modules() if m is exc.wrapper), "?")
            raise TypeError(f"modules_to_save module {path!r}: {exc}") from None
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
        """(trainable parameters, all parameters), each counted once even if shared (tied weights).

        A quantized base layer (``lorakit.quant.QuantizedLinear``) keeps its weight as packed codes in a
        buffer, not a parameter; it counts as the out × in weights it stands for, as PEFT counts 4-bit ones.
        """
        from .quant import QuantizedLinear

        seen: set[int] = set()
        trainable = total = 0
        for param in self.parameters():
            if id(param) in seen:
                continue
            seen.add(id(param))
            total += param.numel()
            trainable += param.numel() if param.requires_grad else 0
        total += sum(m.out_features * m.in_features for m in self.modules() if isinstance(m, QuantizedLinear))
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
        """The active adapter's name (the first one when several are active).

        Raises:
            ValueError: no adapter is active (the last one was deleted).
        """
        if not self._active:
            raise ValueError("no adapter is active (the model has none left); add_adapter() or load_adapter() one.")
        return self._active[0]

    @property
    def has_active_enabled_adapter(self) -> bool:
        """True when some adapter is active and adapters are not disabled (``disable_adapter()`` or
        ``disable_adapter_layers()``), i.e. the forward differs from the base model's."""
        return bool(self._active) and not any(layer.disable_adapters for layer in self._adapter_layers())

    @property
    def modules_to_save(self) -> set[str] | None:
        """Names in any adapter's ``modules_to_save`` (PEFT's attribute), None when there are none."""
        names: set[str] = set()
        for config in self.peft_config.values():
            names.update(config.modules_to_save or [])
        return names or None

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

    def add_adapter(self, adapter_name: str, peft_config: LoraConfig, autocast_adapter_dtype: bool = True) -> None:
        """Add a new adapter, inactive and frozen until ``set_adapter`` (or ``set_requires_grad``); every other
        ``requires_grad`` flag is left as it is (PEFT 0.21's rule). Fails, changing nothing, if the name
        exists or if the new adapter would train base biases that another adapter already trains."""
        validate_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} already exists; choose another name or "
                             "delete_adapter() it first.")
        if not isinstance(peft_config, LoraConfig):
            raise TypeError(f"peft_config must be a lorakit LoraConfig, got {type(peft_config).__name__}.")
        _check_flag("autocast_adapter_dtype", autocast_adapter_dtype)
        other = bias_conflict(self.peft_config, peft_config)
        if other is not None:
            raise ValueError(
                f"adapter {other!r} already trains the base model's biases (bias={self.peft_config[other].bias!r}); "
                f"only one adapter may use bias='all'/'lora_only', since both would train and save the same "
                f"tensors. Use bias='none' for {adapter_name!r}."
            )
        peft_config = with_default_targets(self.base_model.model, peft_config)
        peft_config = with_task_heads(peft_config)
        inject_adapter(self.base_model.model, peft_config, adapter_name)
        self.peft_config[adapter_name] = peft_config
        if not autocast_adapter_dtype:
            self._cast_to_base_dtype(adapter_name)
        for param in self._adapter_parameters([adapter_name]):
            param.requires_grad_(False)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Make these adapters the active ones (their outputs add up); only they are trainable, unless
        ``inference_mode=True`` (or their config's inference_mode) freezes them too.

        Raises:
            ValueError: an unknown name; other adapters are merged; or two of the adapters keep their own
                copy of the same ``modules_to_save`` module (only one copy can run; nothing changes).
        """
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name in names:
            self._require_adapter(name)
        _check_flag("inference_mode", inference_mode)
        if self.merged_adapters and set(names) != set(self.merged_adapters):
            raise ValueError(
                f"adapters {self.merged_adapters} are merged into the base weights; call unmerge_adapter() "
                f"before activating {names}."
            )
        for path, module in self.base_model.model.named_modules():
            if isinstance(module, ModulesToSaveWrapper):
                sharing = [n for n in names if n in module.modules_to_save]
                if len(sharing) > 1:
                    raise ValueError(
                        f"adapters {sharing} each keep their own trained copy of {path!r} (modules_to_save), and "
                        "only one copy can run, so they cannot be active together. Activate one of them, or "
                        "run each on its own rows of a mixed batch (adapter_names=[...])."
                    )
        self._apply_active(names, inference_mode)

    def _apply_active(self, names: list[str], inference_mode: bool = False) -> None:
        self._active = list(names)
        for layer in self._adapter_layers():
            layer.active_adapters = [n for n in names if n in layer.adapter_names]
        trainable = not inference_mode and not any(self.peft_config[n].inference_mode for n in names)
        bias = self.peft_config[names[0]].bias if names else "none"
        mark_trainable(self.base_model.model, names, bias, trainable=trainable)

    def _adapter_parameters(self, names: list[str]) -> list[nn.Parameter]:
        """The parameters that belong to adapters ``names``: LoRA factors and modules_to_save copies."""
        params: list[nn.Parameter] = []
        for layer in self._adapter_layers():
            if isinstance(layer, ModulesToSaveWrapper):
                params.extend(p for n in names if n in layer.modules_to_save
                              for p in layer.modules_to_save[n].parameters())
                continue
            for attr in layer.adapter_param_names:
                container = getattr(layer, attr)
                for n in names:
                    if n in container:
                        item = container[n]
                        params.extend(item.parameters() if isinstance(item, nn.Module) else [item])
        return params

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Turn gradients of these adapters' parameters (factors, modules_to_save copies) on or off, active
        or not; nothing else changes (PEFT's ``set_requires_grad``)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            self._require_adapter(name)
        _check_flag("requires_grad", requires_grad)
        for param in self._adapter_parameters(names):
            param.requires_grad_(requires_grad)

    def _cast_to_base_dtype(self, adapter_name: str) -> None:
        """``autocast_adapter_dtype=False``: store the adapter's factors in their base layer's dtype where
        that is float16/bfloat16 (lorakit otherwise keeps them in float32, as PEFT's default does)."""
        for layer in self._lora_layers():
            dtype = layer.base_layer.weight.dtype
            if adapter_name not in layer.r or dtype not in (torch.float16, torch.bfloat16):
                continue
            for attr in layer.adapter_param_names:
                container = getattr(layer, attr)
                if adapter_name not in container:  # e.g. no DoRA magnitude for a plain LoRA adapter
                    continue
                item = container[adapter_name]
                for param in item.parameters() if isinstance(item, nn.Module) else [item]:
                    param.data = param.data.to(dtype)

    def disable_adapter_layers(self) -> None:
        """Disable every adapter in place until ``enable_adapter_layers()``: the model computes the base
        output, and (as in PEFT) no adapter parameter requires grad meanwhile."""
        if self.merged_adapters:
            raise ValueError(f"adapters {self.merged_adapters} are merged into the base weights, so disabling "
                             "the layers would not remove them; call unmerge_adapter() first.")
        for layer in self._adapter_layers():
            layer.disable_adapters = True
        for param in self._adapter_parameters(list(self.peft_config)):
            param.requires_grad_(False)

    def enable_adapter_layers(self) -> None:
        """Undo ``disable_adapter_layers()``: the active adapters run again and (unless in inference mode)
        their parameters require grad, as PEFT does."""
        for layer in self._adapter_layers():
            layer.disable_adapters = False
        if self._active and not any(self.peft_config[n].inference_mode for n in self._active):
            self.set_requires_grad(self._active, True)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter. Refused while it is merged (its ΔW would silently stay in the base)."""
        self._require_adapter(adapter_name)
        if adapter_name in self.merged_adapters:
            raise ValueError(
                f"adapter {adapter_name!r} is merged into the base weights; call unmerge_adapter() before "
                "deleting it, or its update would stay in the model with nothing left to remove it."
            )
        for layer in self._adapter_layers():
            layer.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        # The last adapter may go too (as in PEFT): the layers stay, with nothing to add, so the model
        # computes the base model's output until another adapter is added.
        remaining = [n for n in self._active if n != adapter_name] or list(self.peft_config)[:1]
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

        Inside, no adapter parameter requires grad (as in PEFT); on exit every flag is what it was before.
        Merged adapters are unmerged on entry and merged again on exit (bit-exact both ways).
        """
        merged = self.merged_adapters
        if merged:
            self.unmerge_adapter()
        layers = self._adapter_layers()
        previous = [layer.disable_adapters for layer in layers]
        params = self._adapter_parameters(list(self.peft_config))
        flags = [param.requires_grad for param in params]
        for layer in layers:
            layer.disable_adapters = True
        for param in params:
            param.requires_grad_(False)
        try:
            yield
        finally:
            for layer, state in zip(layers, previous, strict=True):
                layer.disable_adapters = state
            for param, flag in zip(params, flags, strict=True):
                param.requires_grad_(flag)
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

        Also writes a ``README.md`` model card (base model, ``library_name: peft``, tags) as PEFT does; a
        README.md the user wrote is kept (see ``lorakit.model_card``).

        Raises:
            ValueError: unknown adapter, or a target path that is a file or a symbolic link.
            OSError: writing failed, or ``verify`` found the files differ.
        """
        from .io import save_pretrained
        from .model_card import write_model_card

        save_pretrained(self, save_directory, selected_adapters, safe_serialization, verify)
        names = [selected_adapters] if isinstance(selected_adapters, str) else selected_adapters
        write_model_card(self, save_directory, names)  # README.md, unless the user's own card is there

    def push_to_hub(self, *args: Any, **kwargs: Any) -> None:
        """Not available: lorakit never contacts a model hub (it runs offline).

        Raises:
            RuntimeError: always; use ``save_pretrained(directory)`` and upload that directory yourself.
        """
        raise RuntimeError(
            "push_to_hub is not available: lorakit never contacts a model hub. Call "
            "save_pretrained(directory) and upload that directory (README.md, adapter_config.json, "
            "adapter_model.safetensors) with your own tools, e.g. `huggingface-cli upload`."
        )

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike[str],
        adapter_name: str = "default",
        is_trainable: bool = False,
        allow_base_mismatch: bool = False,
        use_safetensors: bool = True,
        *,
        config: LoraConfig | None = None,
        autocast_adapter_dtype: bool = True,
        torch_device: str | torch.device | None = None,
        low_cpu_mem_usage: bool = False,
    ) -> PeftModel:
        """Wrap ``model`` with the adapter saved in directory ``model_id`` (by lorakit or by PEFT).

        Everything (files, config, base fingerprint, every key and shape) is checked before the model is
        touched: on error it is left exactly as it was.

        Args:
            model: the base model the adapter was trained on (no adapters yet).
            model_id: the adapter's directory (``save_directory/<name>`` for a non-default adapter).
            adapter_name: the name it gets in this model.
            is_trainable: False (default) loads it frozen and puts the model in eval mode (dropout off), as
                PEFT does; True leaves the training mode alone and the adapter trainable.
            allow_base_mismatch: load even if the stored base fingerprint differs from ``model``'s.
            use_safetensors: the directory's ``adapter_model.safetensors`` is read; when it has only a legacy
                ``adapter_model.bin``, that is read (weights only) with a warning, or silently if False.
            config: use this config instead of the directory's adapter_config.json (PEFT's ``config=``).
            autocast_adapter_dtype: False stores the factors in a float16/bfloat16 base layer's dtype.
            torch_device: the device the file's tensors are read onto before they are copied into the
                adapter, which (as in PEFT) lives on its base layer's device; None: the CPU.
            low_cpu_mem_usage: create the adapter's factors without initialising them (no random draws),
                since the file's values replace them (PEFT creates them on the meta device).

        Raises:
            FileNotFoundError: missing directory, config or weights.
            ValueError: malformed or unsupported config, corrupt weights, missing/unexpected keys, shape
                mismatches, a different base model, an invalid adapter name or torch_device.
        """
        from .io import from_pretrained

        device = _check_load_options(autocast_adapter_dtype, torch_device, low_cpu_mem_usage)
        if isinstance(config, LoraConfig) and (config.rank_pattern or config.alpha_pattern):
            # A config the user wrote: pattern keys matching nothing are errors, as in get_peft_model (only
            # a file's config, which PEFT may have written, gets them dropped with a warning).
            plan_injection(model, dataclasses.replace(config, fan_in_fan_out=None), adapter_name)
        with uninitialised_factors() if low_cpu_mem_usage else contextlib.nullcontext():
            peft = from_pretrained(cls, model, model_id, adapter_name, is_trainable, allow_base_mismatch,
                                   use_safetensors, config=config, torch_device=device)
        if not autocast_adapter_dtype:
            peft._cast_to_base_dtype(adapter_name)
        if not is_trainable:
            peft.eval()  # as PEFT: an adapter loaded for inference runs without dropout
        return peft

    def load_adapter(
        self,
        model_id: str | os.PathLike[str],
        adapter_name: str,
        is_trainable: bool = False,
        allow_base_mismatch: bool = False,
        use_safetensors: bool = True,
        *,
        autocast_adapter_dtype: bool = True,
        torch_device: str | torch.device | None = None,
        low_cpu_mem_usage: bool = False,
    ) -> _IncompatibleKeys:
        """Add the adapter saved in ``model_id`` as ``adapter_name`` (inactive until ``set_adapter``).

        The new adapter's parameters require grad iff ``is_trainable``, active or not; every other
        ``requires_grad`` flag, and the model's training mode, stay as they were. Same checks, options and
        errors as ``from_pretrained``; on error the model is unchanged.

        Returns:
            PEFT's ``(missing_keys, unexpected_keys)`` of the adapter; lorakit refuses a file with either, so
            both are empty lists.
        """
        from .io import load_adapter

        device = _check_load_options(autocast_adapter_dtype, torch_device, low_cpu_mem_usage)
        with uninitialised_factors() if low_cpu_mem_usage else contextlib.nullcontext():
            load_adapter(self, model_id, adapter_name, is_trainable, allow_base_mismatch, use_safetensors,
                         torch_device=device)
        if not autocast_adapter_dtype:
            self._cast_to_base_dtype(adapter_name)
        if is_trainable:
            self.set_requires_grad(adapter_name, True)
        return _IncompatibleKeys([], [])

    # ------------------------------------------------------------------ merge
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """W ← W + s·B·A for each adapter (default: the active ones) in every layer; idempotent.

        While merged, forward costs exactly the base forward. ``unmerge_adapter`` restores W0 bit-exactly
        (see ``lorakit.layers.base`` for the mechanism and its memory cost: 1 byte per merged weight element).

        ``safe_merge=True`` first computes every merged weight into a copy and refuses (ValueError, weights
        bit-identical) if any would hold NaN or infinity.
        """
        from .quant import require_full_precision

        names = self._active if adapter_names is None else list(adapter_names)
        for name in names:
            self._require_adapter(name)
        require_full_precision(self.base_model.model, "merge_adapter")
        _check_flag("safe_merge", safe_merge)
        if safe_merge:
            check_merge_is_finite(self.base_model.model, names)
        for layer in self._lora_layers():
            layer.merge([n for n in names if n in layer.r])

    def unmerge_adapter(self) -> None:
        """Subtract every merged adapter from the base weights, restoring W0 bit for bit."""
        for layer in self._lora_layers():
            layer.unmerge()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        """Merge ``adapter_names`` (default: the active adapters) and return the plain base model with no
        lorakit module left (a modules_to_save module becomes the active adapter's copy, as in PEFT).

        A quantized base (``lorakit.quant``) is dequantized first: the result is a full-precision model.

        Args:
            progressbar: show a tqdm progress bar over the layers.
            safe_merge: check first that no merged weight would hold NaN/inf (ValueError, nothing changed).
            adapter_names: which adapters to merge.
        """
        from .quant import dequantize_model

        names = self._active if adapter_names is None else list(adapter_names)
        for name in names:
            self._require_adapter(name)
        _check_flag("safe_merge", safe_merge)
        _check_flag("progressbar", progressbar)
        model = dequantize_model(self.base_model.model)
        if safe_merge:
            check_merge_is_finite(model, names)
        return replace_with_base(model, merge=True, adapter_names=adapter_names, progressbar=progressbar)

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


def get_peft_model(model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default", *,
                   autocast_adapter_dtype: bool = True) -> PeftModel:
    """Wrap ``model`` with a LoRA adapter per ``peft_config`` (PEFT's entry point, same arguments).

    Args:
        model: any ``nn.Module``; the targeted modules are replaced in place by LoRA layers.
        peft_config: which modules and how (see ``LoraConfig``); ``target_modules=None`` takes PEFT's
            defaults for the architecture (``lorakit.target_defaults``), with a LorakitWarning saying so.
        adapter_name: name of this first adapter.
        autocast_adapter_dtype: True (default) keeps factors of float16/bfloat16 layers in float32; False
            stores them in the layer's dtype.

    Raises:
        ValueError / TypeError: bad config or targets; the model is left exactly as it was.
    """
    if not isinstance(peft_config, LoraConfig):
        raise TypeError(f"peft_config must be a lorakit LoraConfig, got {type(peft_config).__name__}; "
                        "build it with lorakit.LoraConfig(...).")
    return PeftModel(model, peft_config, adapter_name, autocast_adapter_dtype)


def _check_flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name}={value!r} is invalid: use True or False.")


def _check_load_options(autocast_adapter_dtype: object, torch_device: object, low_cpu_mem_usage: object
                        ) -> torch.device | None:
    """Validate from_pretrained/load_adapter's PEFT options before anything is read; the device or None."""
    _check_flag("autocast_adapter_dtype", autocast_adapter_dtype)
    _check_flag("low_cpu_mem_usage", low_cpu_mem_usage)
    if torch_device is None:
        return None
    if not isinstance(torch_device, (str, torch.device)):
        raise TypeError(f"torch_device={torch_device!r} is invalid: use a device such as 'cpu' or 'cuda:0'.")
    try:
        return torch.device(torch_device)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"torch_device={torch_device!r} is not a device ({exc}); use e.g. 'cpu' or 'cuda:0'.") from None



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
