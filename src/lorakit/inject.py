"""Injection: which modules a config targets, wrapping them in LoRA layers, freezing, and unloading.

Everything is validated before anything is changed: ``plan_injection`` computes the full list of
replacements (raising ``ValueError`` naming the bad value and the fix), then ``inject_adapter`` applies it.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .config import LoraConfig, TaskType
from .errors import LorakitWarning
from .layers import SUPPORTED_LAYER_TYPES, LoraLayer, dora, is_gpt2_conv1d, layer_class_for
from .layers.modules_to_save import ModulesToSaveWrapper
from .target_defaults import default_target_modules, model_type

ALL_LINEAR = "all-linear"
ADAPTER_CONTAINERS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_dropout")


@dataclass
class TargetPlan:
    """One module to adapt: its full name, the module (plain or already a LoraLayer), rank and alpha."""

    name: str
    module: nn.Module
    r: int
    lora_alpha: float


def iter_base_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) over the model as the user sees it: a LoraLayer stands for the module it wraps and
    lorakit's internals (``base_layer``, ``lora_A`` …, ``original_module``) are skipped."""
    skip_prefixes: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in skip_prefixes):
            continue
        if isinstance(module, (LoraLayer, ModulesToSaveWrapper)):
            skip_prefixes.append(name + ".")
        yield name, module


def name_matches(name: str, targets: list[str] | str) -> bool:
    """List: exact name or dotted suffix. String: ``re.fullmatch`` on the full name (PEFT's rules)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def pattern_key_matches(name: str, key: str) -> bool:
    """rank_pattern/alpha_pattern keys: regex fullmatch on the name, or on a dotted suffix of it."""
    try:
        return re.fullmatch(rf"(.*\.)?(?:{key})", name) is not None
    except re.error as exc:
        raise ValueError(f"pattern key {key!r} is not a valid regular expression: {exc}") from None


def layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    """The index after ``layers_pattern`` in a module name ("transformer.h.3.attn" → 3), else None."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
    group = "|".join(re.escape(p) for p in patterns) if patterns else r"[^.]+"
    match = re.match(rf".*(?:^|\.)(?:{group})\.(\d+)(?:\.|$)", name)
    return int(match.group(1)) if match else None


def adaptable_module_names(model: nn.Module) -> list[str]:
    """Short names (last dotted component) of every module lorakit could adapt, for error messages."""
    names = {n.rsplit(".", 1)[-1] for n, m in iter_base_modules(model) if n and _adaptable(m)}
    return sorted(names)


def _adaptable(module: nn.Module) -> bool:
    return isinstance(module, LoraLayer) or layer_class_for(module) is not None


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return None


def plan_injection(model: nn.Module, config: LoraConfig, adapter_name: str,
                   check_pattern_keys: bool = True) -> list[TargetPlan]:
    """Resolve ``config`` against ``model`` into the list of modules to adapt, validating everything.

    ``check_pattern_keys=False`` skips the error for rank/alpha pattern keys that match no targeted module
    (a config PEFT wrote may hold such keys; the loader drops them with ``drop_unmatched_pattern_keys``).

    Raises:
        ValueError: nothing matched (the message lists adaptable names), a matched module has a type
            lorakit cannot adapt, a rank/alpha pattern key matched no targeted module, or a module already
            holds an adapter called ``adapter_name``.
    """
    targets = config.target_modules
    head = _output_head(model)
    plans: list[TargetPlan] = []
    unsupported: list[str] = []
    for name, module in iter_base_modules(model):
        if not name:
            continue
        if targets == ALL_LINEAR:
            inner = module.base_layer if isinstance(module, LoraLayer) else module
            if not (isinstance(inner, nn.Linear) or is_gpt2_conv1d(inner)) or inner is head:
                continue
        elif targets is None or not name_matches(name, targets):
            continue
        if config.exclude_modules and name_matches(name, config.exclude_modules):
            continue
        if config.layers_to_transform is not None:
            index = layer_index(name, config.layers_pattern)
            if index is None or index not in list(config.layers_to_transform):  # type: ignore[arg-type]
                continue
        if not _adaptable(module):
            unsupported.append(f"{name} ({type(module).__name__})")
            continue
        if isinstance(module, LoraLayer) and adapter_name in module.r:
            raise ValueError(f"module {name!r} already has an adapter named {adapter_name!r}; pick a new name.")
        r = next((v for k, v in config.rank_pattern.items() if pattern_key_matches(name, k)), config.r)
        alpha = next((v for k, v in config.alpha_pattern.items() if pattern_key_matches(name, k)), config.lora_alpha)
        plans.append(TargetPlan(name, module, r, alpha))

    if unsupported:
        raise ValueError(
            f"target_modules={targets!r} matched modules of a type lorakit cannot adapt: {', '.join(unsupported)}. "
            f"Supported: {', '.join(SUPPORTED_LAYER_TYPES)}; narrow target_modules to those."
        )
    if not plans:
        raise ValueError(
            f"target_modules={targets!r} matched no module"
            + (f" (with layers_to_transform={config.layers_to_transform!r})" if config.layers_to_transform else "")
            + f"; modules that could be adapted: {', '.join(adaptable_module_names(model)) or 'none'}."
        )
    for field_name, key in unmatched_pattern_keys(config, plans) if check_pattern_keys else ():
        raise ValueError(
            f"{field_name} key {key!r} matches no targeted module; targeted: "
            f"{', '.join(p.name for p in plans[:8])}{' …' if len(plans) > 8 else ''}."
        )
    for p in plans:
        if config.init_lora_weights in ("pissa", "olora"):
            kind = layer_class_for(p.module.base_layer if isinstance(p.module, LoraLayer) else p.module)
            if kind is None or kind.__name__ not in ("Linear", "GPT2Conv1D"):
                raise ValueError(
                    f"init_lora_weights={config.init_lora_weights!r} supports Linear/Conv1D targets only, but "
                    f"{p.name!r} is {type(p.module).__name__}; exclude it or use init_lora_weights=True."
                )
    if config.use_dora:
        refused = [f"{p.name} ({type(_inner(p.module)).__name__})" for p in plans
                   if not getattr(layer_class_for(_inner(p.module)), "supports_dora", False)]
        if refused:
            raise ValueError(
                f"use_dora=True is not supported for {', '.join(refused)}; DoRA supports "
                f"{', '.join(dora.SUPPORTED)}: exclude those modules (exclude_modules) or set use_dora=False."
            )
    if config.fan_in_fan_out is not None:
        linear_like = [p for p in plans if _is_linear_like(p.module)]
        mismatched = [p.name for p in linear_like if _is_fan_in_fan_out(p.module) != bool(config.fan_in_fan_out)]
        if mismatched:
            warnings.warn(
                f"fan_in_fan_out={config.fan_in_fan_out} does not describe {len(mismatched)} targeted module(s) "
                f"(e.g. {mismatched[0]!r}); lorakit detects each weight's orientation itself and uses that. "
                "Leave fan_in_fan_out=None to silence this.",
                LorakitWarning,
                stacklevel=3,
            )
    return plans


def unmatched_pattern_keys(config: LoraConfig, plans: list[TargetPlan]) -> list[tuple[str, str]]:
    """(field, key) of every ``rank_pattern``/``alpha_pattern`` key that matches none of ``plans``."""
    return [(field_name, key)
            for field_name, pattern in (("rank_pattern", config.rank_pattern), ("alpha_pattern", config.alpha_pattern))
            for key in pattern if not any(pattern_key_matches(p.name, key) for p in plans)]


def drop_unmatched_pattern_keys(config: LoraConfig, plans: list[TargetPlan]) -> tuple[LoraConfig, list[str]]:
    """``config`` without the pattern keys that match none of ``plans`` (they change nothing: PEFT ignores
    them), and those keys as ``"rank_pattern['k']"`` strings for a message."""
    unmatched = unmatched_pattern_keys(config, plans)
    if not unmatched:
        return config, []
    dropped = {(f, k) for f, k in unmatched}
    config = dataclasses.replace(
        config,
        rank_pattern={k: v for k, v in config.rank_pattern.items() if ("rank_pattern", k) not in dropped},
        alpha_pattern={k: v for k, v in config.alpha_pattern.items() if ("alpha_pattern", k) not in dropped},
    )
    return config, [f"{f}[{k!r}]" for f, k in unmatched]


def with_default_targets(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """PEFT's rule for ``target_modules=None``: the architecture's default targets (``lorakit.target_defaults``),
    said once with a LorakitWarning. Returns a new config holding them, so they are also what gets saved.

    Raises:
        ValueError: the architecture has no default; the message names ``target_modules`` (as PEFT's does).
    """
    if config.target_modules is not None:
        return config
    targets = default_target_modules(model)
    warnings.warn(
        f"target_modules=None: using PEFT's default targets for model_type {model_type(model)!r}: {targets}. "
        "Pass target_modules explicitly to choose others (and to silence this).",
        LorakitWarning,
        stacklevel=4,
    )
    return dataclasses.replace(config, target_modules=targets)


def bias_conflict(configs: dict[str, LoraConfig], new: LoraConfig) -> str | None:
    """The existing adapter that already trains base biases (``bias`` != "none") if ``new`` would too.

    The biases of the base model are shared by every adapter, so two adapters training them would train
    and save the same tensors (PEFT refuses this as well: "supports only 1 adapter with bias")."""
    if new.bias == "none":
        return None
    return next((name for name, c in configs.items() if c.bias != "none"), None)


def _inner(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, LoraLayer) else module


def _is_linear_like(module: nn.Module) -> bool:
    inner = module.base_layer if isinstance(module, LoraLayer) else module
    return isinstance(inner, nn.Linear) or is_gpt2_conv1d(inner)


def _is_fan_in_fan_out(module: nn.Module) -> bool:
    return is_gpt2_conv1d(module.base_layer if isinstance(module, LoraLayer) else module)


SEQ_CLS_HEADS = ("classifier", "score")
"""Classification heads a SEQ_CLS adapter trains and saves, as PEFT does (transformers' names for them)."""


def with_task_heads(config: LoraConfig) -> LoraConfig:
    """PEFT's rule for ``task_type="SEQ_CLS"``: the classification head is trained and saved with the adapter,
    so ``"classifier"`` and ``"score"`` join ``modules_to_save`` (whichever the model has is used). Returns a
    new config; other task types come back unchanged."""
    if config.task_type != TaskType.SEQ_CLS:
        return config
    names = list(config.modules_to_save or [])
    return dataclasses.replace(config, modules_to_save=names + [h for h in SEQ_CLS_HEADS if h not in names])


def plan_modules_to_save(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    """Modules named in ``modules_to_save`` (exact name or dotted suffix); error if one matches nothing
    (except a SEQ_CLS head name the model does not use: PEFT lists both)."""
    if not config.modules_to_save:
        return []
    found: list[tuple[str, nn.Module]] = []
    for entry in config.modules_to_save:
        hits = [(n, m) for n, m in iter_base_modules(model) if n and (n == entry or n.endswith("." + entry))]
        if not hits and config.task_type == TaskType.SEQ_CLS and entry in SEQ_CLS_HEADS:
            continue
        if not hits:
            raise ValueError(f"modules_to_save entry {entry!r} matches no module in the model; check the name.")
        found.extend(hits)
    return found


_structure_version = 0
"""Bumped by every module swap lorakit makes (``set_submodule``): lists of adapter layers cached by a
``PeftModel`` stay valid while it is unchanged (walking ``model.modules()`` costs milliseconds per call)."""


def structure_version() -> int:
    """A number that changes whenever lorakit inserts or removes a LoRA layer or modules_to_save wrapper."""
    return _structure_version


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    global _structure_version
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
    _structure_version += 1


_UNINITIALISED = contextvars.ContextVar("lorakit_uninitialised_factors", default=False)


@contextlib.contextmanager
def uninitialised_factors() -> Iterator[None]:
    """Inside this block ``inject_adapter`` creates LoRA factors on the meta device and then allocates them,
    uninitialised, on their base weight's device: no initialisation runs and no random number is drawn.
    For loading only, where the file's values overwrite the factors at once (PEFT's ``low_cpu_mem_usage``)."""
    token = _UNINITIALISED.set(True)
    try:
        yield
    finally:
        _UNINITIALISED.reset(token)


def inject_adapter(model: nn.Module, config: LoraConfig, adapter_name: str) -> list[str]:
    """Add adapter ``adapter_name`` to every module ``config`` targets; returns the adapted names.

    Validates first (``plan_injection``), so a failure leaves the model unchanged. New LoRA factors are
    created on each base weight's device.
    """
    plans = plan_injection(model, config, adapter_name)
    saves = plan_modules_to_save(model, config)
    created: list[tuple[str, nn.Module]] = []
    try:
        for p in plans:
            layer = p.module
            if not isinstance(layer, LoraLayer):
                kind = layer_class_for(layer)
                assert kind is not None  # guaranteed by plan_injection
                layer = kind(p.module)
                created.append((p.name, p.module))
                set_submodule(model, p.name, layer)
            with torch.device("meta") if _UNINITIALISED.get() else contextlib.nullcontext():
                layer.update_layer(adapter_name, p.r, p.lora_alpha, config.lora_dropout, config.init_lora_weights,
                                   config.use_rslora, use_dora=config.use_dora)
        for name, module in saves:
            wrapper = module if isinstance(module, ModulesToSaveWrapper) else ModulesToSaveWrapper(module)
            if wrapper is not module:
                created.append((name, module))
                set_submodule(model, name, wrapper)
            wrapper.update(adapter_name)
    except Exception:
        # Roll back: remove the half-created adapter and put original modules back.
        for module in model.modules():
            if isinstance(module, (LoraLayer, ModulesToSaveWrapper)):
                module.delete_adapter(adapter_name)
        for name, original in created:
            set_submodule(model, name, original)
        raise
    return [p.name for p in plans]


def adapter_layers(model: nn.Module) -> Iterator[LoraLayer | ModulesToSaveWrapper]:
    for module in model.modules():
        if isinstance(module, (LoraLayer, ModulesToSaveWrapper)):
            yield module


def mark_trainable(model: nn.Module, active: list[str], bias: str, trainable: bool = True) -> None:
    """Freeze everything, then unfreeze the active adapters' factors, their modules_to_save copies and the
    biases the ``bias`` mode asks for. With ``trainable=False`` nothing requires grad (inference mode)."""
    for param in model.parameters():
        param.requires_grad_(False)
    if not trainable:
        return
    for module in adapter_layers(model):
        if isinstance(module, ModulesToSaveWrapper):
            for name in active:
                if name in module.modules_to_save:
                    module.modules_to_save[name].requires_grad_(True)
            continue
        for attr in module.adapter_param_names:
            container = getattr(module, attr)
            for name in active:
                if name in container:
                    target = container[name]
                    target.requires_grad_(True)
        if bias == "lora_only" and getattr(module.base_layer, "bias", None) is not None:
            module.base_layer.bias.requires_grad_(True)
    if bias == "all":
        for name, param in model.named_parameters():
            if name.endswith("bias") and "lora_" not in name:
                param.requires_grad_(True)


def replace_with_base(model: nn.Module, merge: bool, adapter_names: list[str] | None = None,
                      progressbar: bool = False) -> nn.Module:
    """Put every wrapped module's base back (merging ``adapter_names``, default the active adapters, first
    if ``merge``); returns model. ``progressbar``: show a tqdm bar over the layers (PEFT's option).

    A modules_to_save wrapper is replaced by the active adapter's trained copy when merging (as PEFT does,
    whatever ``adapter_names`` says), by the original module otherwise.
    """
    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, (LoraLayer, ModulesToSaveWrapper))]
    if progressbar:
        from tqdm import tqdm  # optional (lorakit[train]); only asked for with progressbar=True

        wrapped = tqdm(wrapped, desc="Unloading " + ("and merging " if merge else "") + "model")
    for name, module in wrapped:
        if isinstance(module, LoraLayer):
            if merge:
                module.merge(adapter_names, for_unload=True)
            module._unmerge_residual.clear()
            set_submodule(model, name, module.base_layer)
        else:
            set_submodule(model, name, module.active_module() if merge else module.original_module)
    return model
