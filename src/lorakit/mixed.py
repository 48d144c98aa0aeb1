"""Mixed-adapter batches: row i of a batch goes through adapter ``adapter_names[i]`` in every layer.

The wrapper builds one ``BatchPlan`` per forward (rows grouped by adapter once), and every LoRA layer
applies it: the base output is computed for the whole batch, then each adapter's LoRA branch is computed
on its rows only and added in place. Rows named ``"__base__"`` get no adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layers.base import BASE_ROW, LoraLayer


@dataclass
class BatchPlan:
    """Rows of a batch grouped by adapter name: ``groups[name]`` is a LongTensor of row indices."""

    adapter_names: list[str]
    groups: dict[str, torch.Tensor]

    @classmethod
    def build(cls, adapter_names: list[str], device: torch.device | None = None) -> BatchPlan:
        rows: dict[str, list[int]] = {}
        for i, name in enumerate(adapter_names):
            rows.setdefault(name, []).append(i)
        groups = {n: torch.tensor(r, dtype=torch.long, device=device) for n, r in rows.items() if n != BASE_ROW}
        return cls(list(adapter_names), groups)

    def __len__(self) -> int:
        return len(self.adapter_names)

    def apply(self, layer: LoraLayer, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """result (N, ...) from the base layer → result with each row's adapter added."""
        if x.shape[0] != len(self):
            raise ValueError(
                f"adapter_names has {len(self)} entries but the batch reaching {type(layer).__name__} has "
                f"{x.shape[0]} rows; give one adapter name per row (num_beams/num_return_sequences > 1 "
                "multiply rows: repeat the names accordingly)."
            )
        for name, rows in self.groups.items():
            if name not in layer.r:
                continue  # this layer is not adapted by that adapter
            rows = rows.to(x.device)
            delta = layer.lora_output(x.index_select(0, rows), name).to(result.dtype)
            result = result.index_add(0, rows, delta)
        return result
