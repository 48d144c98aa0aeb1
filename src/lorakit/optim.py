"""LoRA+ (Hayou et al. 2024): the B factors learn faster than the A factors, η_B = λ·η_A.

The paper (§3) shows that with one learning rate for A and B the update of B·A is inefficient for wide
models; it sets η_B/η_A = λ ≫ 1 (16–20 in its experiments). ``create_loraplus_optimizer`` builds the
parameter groups exactly as PEFT 0.21's function of the same name does, so a run moves over from PEFT
unchanged:

=================  ==========================================================  ==================  ============
group              trainable parameters                                        lr                  weight decay
=================  ==========================================================  ==================  ============
A                  every other trainable parameter (lora_A, 2-D weights)       lr                  wd
embedding          factors of LoRA Embedding layers (lora_embedding_A and _B)  lr_embedding        wd
B                  ``lora_B`` factors and 1-D parameters, outside LayerNorms   lr·λ                wd
B, no decay        the same inside an ``nn.LayerNorm`` or named ``…bias``      lr·λ                0
=================  ==========================================================  ==================  ============

wd is ``loraplus_weight_decay``. "1-D parameters" are trainable biases, DoRA magnitudes
(``lora_magnitude_vector``) and the weights of norm layers in ``modules_to_save``. The four groups are always
passed, in this order (empty ones too), as PEFT passes them.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn
from torch.optim import Optimizer

from .layers.embedding import Embedding

_NO_DECAY_LAYERS = (nn.LayerNorm,)
"""Parameters under these modules get no weight decay in the B group (transformers' ALL_LAYERNORM_LAYERS,
which PEFT uses)."""


def create_loraplus_optimizer(
    model: nn.Module,
    optimizer_cls: type[Optimizer],
    *,
    lr: float,
    loraplus_lr_ratio: float,
    loraplus_weight_decay: float = 0.0,
    loraplus_lr_embedding: float = 1e-6,
    **kwargs: Any,
) -> Optimizer:
    """An ``optimizer_cls`` over ``model``'s trainable parameters with LoRA+ learning rates.

    Args:
        model: a lorakit ``PeftModel`` (any ``nn.Module`` works: only ``requires_grad`` parameters are taken).
        optimizer_cls: e.g. ``torch.optim.AdamW``.
        lr: η_A, the learning rate of the A factors.
        loraplus_lr_ratio: λ = η_B/η_A > 0 (the paper uses 16–20; < 1 is allowed, as in PEFT).
        loraplus_weight_decay: weight decay of every group except "B, no decay".
        loraplus_lr_embedding: learning rate of LoRA Embedding factors.
        **kwargs: passed to ``optimizer_cls`` (e.g. ``betas``, ``eps``); a ``weight_decay`` here is
            overridden per group, as in PEFT.

    Returns:
        The optimizer, with four parameter groups in the order of the table in the module docstring.

    Raises:
        ValueError: ``lr``, ``loraplus_lr_ratio`` or ``loraplus_lr_embedding`` not a positive finite number,
            ``loraplus_weight_decay`` negative, or no trainable parameter.
    """
    for name, value in (("lr", lr), ("loraplus_lr_ratio", loraplus_lr_ratio),
                        ("loraplus_lr_embedding", loraplus_lr_embedding)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name}={value!r} is invalid: use a positive number "
                             f"(LoRA+ sets the B factors' learning rate to lr × loraplus_lr_ratio, e.g. 16).")
    if not (isinstance(loraplus_weight_decay, (int, float)) and loraplus_weight_decay >= 0):
        raise ValueError(f"loraplus_weight_decay={loraplus_weight_decay!r} is invalid: use a number ≥ 0.")
    decaying = _decaying_parameter_names(model)
    groups: dict[str, list[nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    modules = dict(model.named_modules())
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # A factor lives in a ModuleDict/ParameterDict under its LoRA layer ("….lora_embedding_A.default"),
        # so the layer is two dotted parts up (PEFT's rule, including for names that are not factors).
        owner = modules.get(".".join(name.split(".")[:-2]))
        if isinstance(owner, Embedding):
            groups["embedding"].append(param)
        elif "lora_B" in name or param.ndim == 1:
            groups["B" if name in decaying else "B_no_decay"].append(param)
        else:
            groups["A"].append(param)
    if not any(groups.values()):
        raise ValueError("the model has no trainable parameter: create the optimizer after get_peft_model().")
    return optimizer_cls([
        {"params": groups["A"], "weight_decay": loraplus_weight_decay, "lr": lr},
        {"params": groups["embedding"], "weight_decay": loraplus_weight_decay, "lr": loraplus_lr_embedding},
        {"params": groups["B"], "weight_decay": loraplus_weight_decay, "lr": lr * loraplus_lr_ratio},
        {"params": groups["B_no_decay"], "weight_decay": 0.0, "lr": lr * loraplus_lr_ratio},
    ], **{**kwargs, "lr": lr})


def _decaying_parameter_names(model: nn.Module) -> set[str]:
    """Names of parameters that are neither inside an ``nn.LayerNorm`` nor named with "bias"."""
    no_decay_prefixes = [name + "." for name, module in model.named_modules()
                         if name and isinstance(module, _NO_DECAY_LAYERS)]
    names = set()
    for name, _ in model.named_parameters(remove_duplicate=False):
        if "bias" in name or any(name.startswith(p) for p in no_decay_prefixes):
            continue
        names.add(name)
    return names
