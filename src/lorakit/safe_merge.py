"""``safe_merge=True``: prove a merge gives finite weights before any weight is touched (PEFT's option).

PEFT merges into a copy and checks it for NaN; lorakit does the same for every layer first, so a refused
merge leaves all weights bit-identical (not only the failing layer's).
"""

from __future__ import annotations

import torch
from torch import nn

from .layers.base import LoraLayer


def check_merge_is_finite(model: nn.Module, names: list[str]) -> None:
    """Raise, before any weight changes, if merging adapters ``names`` would put NaN/inf in a layer's weight.

    Per layer, W′ = round(round(W0 + ΔW_1) + ΔW_2 …) is computed in a copy, in the weight's dtype, as the
    merge rounds it — so a float16 weight pushed past 65504 is caught even though ΔW is finite in fp32.
    Costs one weight-sized copy at a time.

    Raises:
        ValueError: naming the layer and the adapters; nothing was merged.
    """
    for path, layer in model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        todo = [n for n in names if n in layer.r and n not in layer.merged_adapters]
        if not todo:
            continue
        weight = layer.base_layer.weight.detach()
        merged = weight.clone()
        with torch.no_grad():
            for name in todo:
                delta = layer.delta_weight(name).to(weight.device).reshape(weight.shape)
                merged = (merged.to(delta.dtype) + delta).to(weight.dtype)
        if not bool(torch.isfinite(merged).all()):
            raise ValueError(
                f"safe_merge: merging adapter(s) {todo} into {path!r} would give NaN or infinity in its weight; "
                "nothing was merged. Check the adapter's factors (or keep it unmerged)."
            )
