"""LoRA for ``nn.Embedding``: e(i) = W0[i] + s·(B·A)[:, i], looked up as s·A[:, i]ᵀ·Bᵀ.

PEFT stores these factors as bare parameters ``lora_embedding_A`` (r × vocab) and ``lora_embedding_B``
(dim × r); we keep those names so files interchange.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import LoraLayer


class Embedding(LoraLayer):
    """LoRA around ``nn.Embedding(vocab, dim)``; ids (...) → vectors (..., dim). Dropout is not applied
    to ids (as in PEFT)."""

    adapter_param_names = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    @property
    def in_features(self) -> int:
        """The vocabulary size (PEFT's ``in_features`` for an embedding)."""
        return int(self.base_layer.num_embeddings)

    @property
    def out_features(self) -> int:
        """The embedding dimension (PEFT's ``out_features`` for an embedding)."""
        return int(self.base_layer.embedding_dim)

    def _create_factors(self, adapter_name: str, r: int) -> None:
        vocab, dim = self.base_layer.weight.shape
        self.lora_embedding_A[adapter_name] = nn.Parameter(torch.empty(r, vocab))
        self.lora_embedding_B[adapter_name] = nn.Parameter(torch.empty(dim, r))

    def factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]

    def _init_factors(self, adapter_name: str, init: bool | str) -> None:
        a, b = self.factors(adapter_name)
        with torch.no_grad():
            # PEFT's embedding init: A = 0, B ~ N(0, 1); the product is 0 either way. init=False: both random.
            if init is False:
                nn.init.normal_(a)
                nn.init.normal_(b, std=0.02)
            else:
                nn.init.zeros_(a)
                nn.init.normal_(b)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        a, b = self.factors(adapter_name)
        return (b.float() @ a.float()).t() * self.scaling[adapter_name]  # (vocab, dim) like W0

    def delta_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """ΔW (vocab, dim) = Aᵀ·(s·B)ᵀ, A (r, vocab), B (dim, r)."""
        a, b = self.factors(adapter_name)
        dtype = torch.promote_types(a.dtype, torch.float32)
        return a.to(dtype).t(), (b.to(dtype) * self.scaling[adapter_name]).t()

    def lora_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        a, b = self.factors(adapter_name)
        base = self.base_layer
        rows = F.embedding(
            x, a.t(), padding_idx=base.padding_idx, max_norm=base.max_norm, norm_type=base.norm_type,
            scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse,
        )  # (..., r)
        return (rows @ b.t()) * self.scaling[adapter_name]
