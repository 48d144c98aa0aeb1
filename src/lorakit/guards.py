"""Silent-failure guards: turn the ways a LoRA run quietly goes wrong into a clear error or warning.

``lorakit train`` runs all of them by default; the functions are public so that other training loops
(Hugging Face ``Trainer``, your own) can call them too:

- ``check_lora_gradients(model)`` after the first backward: a trainable LoRA factor with no gradient
  (``.grad is None``) would never change — typically gradient checkpointing with ``use_reentrant=True``
  on a frozen base, whose checkpointed blocks then see inputs that do not require grad. Raises.
- ``nonfinite_parameters(model)`` before a checkpoint or adapter is written: NaN/inf in a trainable
  tensor must never reach disk, or the "last good checkpoint" is not good.
- ``warn_if_lora_B_zero(model, steps)`` at the end of training: with the standard init B = 0, a B that is
  still exactly zero after optimizer steps means the adapter is the identity — it learned nothing
  (learning rate 0, gradients that never arrive, or the adapter was not the active one).
- ``trainer_callback()``: ``check_lora_gradients`` as a ``transformers.TrainerCallback``.

Deleting a merged adapter is refused by ``PeftModel.delete_adapter`` and ``save_pretrained`` verifies
what it wrote by default (``verify=True``); both live with the code they protect.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .errors import LorakitWarning
from .layers.base import LoraLayer

__all__ = [
    "check_lora_gradients",
    "lora_B_zero",
    "lora_parameters",
    "nonfinite_parameters",
    "trainer_callback",
    "warn_if_lora_B_zero",
]

_SHOWN = 5


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor (a DTensor's local shard under FSDP; the tensor itself otherwise)."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def _names(names: list[str]) -> str:
    return ", ".join(names[:_SHOWN]) + (f" … ({len(names) - _SHOWN} more)" if len(names) > _SHOWN else "")


def lora_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(name, parameter) of every LoRA factor (A and B of every adapter) in ``model``."""
    factor_ids = {
        id(factor)
        for module in model.modules()
        if isinstance(module, LoraLayer)
        for adapter in module.r
        for factor in module.factors(adapter)
    }
    for name, param in model.named_parameters():
        if id(param) in factor_ids:
            yield name, param


def check_lora_gradients(model: nn.Module) -> None:
    """Raise if a trainable LoRA factor received no gradient; call it after the first ``backward()``.

    A factor whose ``.grad`` is still ``None`` after a backward pass is not connected to the loss, and the
    optimizer would silently skip it for the whole run. (A zero gradient is fine: B = 0 at init makes
    A's first gradient exactly zero.)

    Use with the Hugging Face Trainer through ``trainer_callback()``, or in your own loop::

        loss.backward()
        if step == 0:
            lorakit.guards.check_lora_gradients(model)

    Raises:
        ValueError: naming the parameters without gradient and the likely cause and fix.
    """
    trainable = [(n, p) for n, p in lora_parameters(model) if p.requires_grad]
    missing = [n for n, p in trainable if p.grad is None]
    if not missing:
        return
    # transformers marks checkpointed modules with a plain `gradient_checkpointing = True` attribute.
    checkpointing = any(vars(m).get("gradient_checkpointing") is True for m in model.modules())
    if checkpointing or len(missing) == len(trainable):
        cause = ("gradient checkpointing with use_reentrant=True on a frozen base: the checkpointed blocks' inputs "
                 "do not require grad, so nothing inside them gets a gradient. Call "
                 "model.enable_input_require_grads() before training, or enable checkpointing with use_reentrant=False "
                 "(transformers' default since 5.0)")
        if not checkpointing:
            cause = ("the loss does not depend on the adapter: it was computed under torch.no_grad(), inside "
                     "disable_adapter(), with another adapter active, or — most often — with gradient "
                     "checkpointing (use_reentrant=True) on a frozen base; then call "
                     "model.enable_input_require_grads() or checkpoint with use_reentrant=False")
    else:
        cause = ("these modules are not on the forward path of this batch (unused layers, MoE experts no token "
                 "was routed to, tied weights): exclude them from target_modules")
    raise ValueError(
        f"{len(missing)} of {len(trainable)} trainable LoRA parameters received no gradient in the first "
        f"backward pass, so they would never train: {_names(missing)}. Likely cause: {cause}."
    )


def nonfinite_parameters(model: nn.Module) -> list[str]:
    """Names of trainable parameters holding NaN or infinity (checked on this process's shard)."""
    return [n for n, p in model.named_parameters()
            if p.requires_grad and not bool(torch.isfinite(_local(p.detach())).all())]


def lora_B_zero(model: nn.Module) -> list[str]:
    """LoRA layers (``<module name in the user's model>.<adapter>``) whose B factor is exactly zero everywhere."""
    zero: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.r:
                b = _local(module.factors(adapter)[1].detach())
                if b.numel() and not bool(b.any()):
                    name = name.removeprefix("base_model.model.")  # the user's module name
                    zero.append(f"{name}.{adapter}" if name else adapter)
    return zero


def warn_if_lora_B_zero(model: nn.Module, steps: int) -> list[str]:
    """After ``steps`` ≥ 1 optimizer steps, warn (LorakitWarning) about LoRA layers whose B is still 0.

    Returns the names warned about (empty if none or ``steps`` < 1).
    """
    zero = lora_B_zero(model) if steps >= 1 else []
    if zero:
        warnings.warn(
            f"after {steps} training step(s), B is still exactly zero in {len(zero)} LoRA layer(s): "
            f"{_names(zero)}. These layers learned nothing and the adapter leaves them unchanged; check the "
            "learning rate (and warm-up), that the loss reaches the adapter, and that it was the active adapter.",
            LorakitWarning,
            stacklevel=2,
        )
    return zero


def trainer_callback() -> Any:
    """A ``transformers.TrainerCallback`` that runs ``check_lora_gradients`` once, before the first
    optimizer step (gradients are there, not yet cleared)::

        trainer = Trainer(model=peft_model, ..., callbacks=[lorakit.guards.trainer_callback()])
    """
    from transformers import TrainerCallback

    class LoraGradientGuard(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.checked = False

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None,
                                  **kwargs: Any) -> None:
            if not self.checked and model is not None:
                self.checked = True
                check_lora_gradients(model)

    return LoraGradientGuard()
