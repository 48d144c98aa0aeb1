"""ModulesToSaveWrapper: a module trained in full (e.g. a classifier head) with one copy per adapter.

The frozen ``original_module`` stays; each adapter owns a trainable deep copy in ``modules_to_save``
(PEFT's names, so state-dict keys interchange). The active adapter's copy runs; with no adapter active,
adapters disabled, or for ``"__base__"`` rows of a mixed batch, the original does.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from ..mixed import BatchPlan


class NotATensorOutputError(TypeError):
    """A modules_to_save module returned something other than a tensor inside a mixed batch, whose rows
    must be split between adapters; ``wrapper`` is the wrapper (the model turns it into a module path)."""

    def __init__(self, wrapper: ModulesToSaveWrapper, output: object) -> None:
        self.wrapper = wrapper
        super().__init__(
            f"{type(wrapper.original_module).__name__} returns a {type(output).__name__}, not a tensor, so a "
            "mixed batch (adapter_names=...) cannot give each row its adapter's copy; run one adapter per "
            "batch (set_adapter) for this model, or drop the module from modules_to_save."
        )


class ModulesToSaveWrapper(nn.Module):
    """Holds ``original_module`` and per-adapter copies ``modules_to_save[name]``."""

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disable_adapters = False
        self.batch_plan: BatchPlan | None = None

    def update(self, adapter_name: str) -> None:
        self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]

    def active_module(self) -> nn.Module:
        if not self.disable_adapters:
            for name in self.active_adapters:
                if name in self.modules_to_save:
                    return self.modules_to_save[name]
        return self.original_module

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        plan = self.batch_plan
        if plan is None or self.disable_adapters:
            return self.active_module()(x, *args, **kwargs)
        result = self.original_module(x, *args, **kwargs)
        if not isinstance(result, torch.Tensor):  # e.g. nn.GRU's (output, h_n): rows cannot be spliced
            raise NotATensorOutputError(self, result)
        for name, rows in plan.groups.items():
            if name in self.modules_to_save:
                rows = rows.to(x.device)
                out = self.modules_to_save[name](x.index_select(0, rows), *args, **kwargs)
                result = result.index_copy(0, rows, out.to(result.dtype))
        return result
