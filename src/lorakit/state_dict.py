"""PEFT's functions for moving adapter weights around: ``get_peft_model_state_dict`` and
``set_peft_model_state_dict``, with the on-disk keys (``lorakit.io.file_key``, the one key mapping).

    base_model.model.h.0.attn.c_attn.lora_A.weight  ↔  (in memory) …c_attn.lora_A.<adapter_name>.weight
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch.nn.modules.module import _IncompatibleKeys

from .io import PREFIX, adapter_model_keys, file_key

if TYPE_CHECKING:
    from .model import PeftModel


def get_peft_model_state_dict(model: PeftModel, state_dict: Mapping[str, torch.Tensor] | None = None,
                              adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter ``adapter_name``'s tensors under the keys ``save_pretrained`` writes (PEFT's function).

    Args:
        model: a lorakit ``PeftModel``.
        state_dict: take the values from this ``model.state_dict()``-keyed dict (e.g. one gathered by a
            distributed trainer) instead of from the model.
        adapter_name: which adapter.

    Returns:
        file key → tensor (the model's own detached tensors, on their device; not copies).

    Raises:
        ValueError: unknown adapter; ``state_dict`` lacks some of the adapter's keys.
    """
    model._require_adapter(adapter_name)
    source = model.state_dict() if state_dict is None else state_dict
    keys = adapter_model_keys(model, adapter_name)
    absent = [k for k in keys if k not in source]
    if absent:
        raise ValueError(f"state_dict lacks {len(absent)} key(s) of adapter {adapter_name!r}: {', '.join(absent[:5])}"
                         f"{' …' if len(absent) > 5 else ''}; pass the full model.state_dict().")
    return {file_key(k, adapter_name): source[k] for k in keys}


def set_peft_model_state_dict(model: PeftModel, peft_model_state_dict: Mapping[str, torch.Tensor],
                              adapter_name: str = "default") -> _IncompatibleKeys:
    """Copy file-keyed tensors (as ``get_peft_model_state_dict`` returns them) into adapter ``adapter_name``.

    Every key, shape and dtype is checked before anything is written: on error the model is unchanged.
    Keys may also come without the ``base_model.model.`` prefix.

    Returns:
        PEFT's ``(missing_keys, unexpected_keys)``: the adapter's in-memory keys the dict did not hold (left
        as they were) and, always empty, unexpected keys (lorakit refuses them, see Raises).

    Raises:
        ValueError: unknown adapter; keys that are not this adapter's; shape mismatches; non-float or
            non-finite values; the adapter is merged (its factors cannot change under the merged weight).
        TypeError: a key is not a string or a value is not a tensor.
    """
    model._require_adapter(adapter_name)
    bad = [k for k, v in peft_model_state_dict.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f"peft_model_state_dict must map str keys to tensors; bad entries: {bad[:5]}")
    given = dict(peft_model_state_dict)
    if given and not any(k.startswith(PREFIX) for k in given):
        given = {PREFIX + k: v for k, v in given.items()}
    by_file = {file_key(k, adapter_name): k for k in adapter_model_keys(model, adapter_name)}
    state = model.state_dict(keep_vars=True)
    unexpected = sorted(k for k in given if k not in by_file)
    mismatched = [f"{k}: {tuple(v.shape)} given, {tuple(state[by_file[k]].shape)} in the model"
                  for k, v in sorted(given.items()) if k in by_file and v.shape != state[by_file[k]].shape]
    unusable = [k for k, v in sorted(given.items()) if not v.is_floating_point() or not bool(torch.isfinite(v).all())]
    problems = []
    if unexpected:
        problems.append(f"keys that are not adapter {adapter_name!r}'s ({len(unexpected)}): {', '.join(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {'; '.join(mismatched)}")
    if unusable:
        problems.append(f"tensors that are not finite floating point ({len(unusable)}): {', '.join(unusable)}")
    if problems:
        raise ValueError("set_peft_model_state_dict changed nothing: " + "; ".join(problems) + ". Pass what "
                         "get_peft_model_state_dict (or save_pretrained) gives for this adapter and model.")
    if adapter_name in model.merged_adapters:
        raise ValueError(f"adapter {adapter_name!r} is merged into the base weights; call unmerge_adapter() before "
                         "setting its weights.")
    with torch.no_grad():
        for key, tensor in given.items():
            state[by_file[key]].copy_(tensor)
    return _IncompatibleKeys(sorted(v for k, v in by_file.items() if k not in given), [])
