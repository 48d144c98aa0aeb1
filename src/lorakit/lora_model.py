"""LoraModel: ``PeftModel.base_model``, holding the user's model as ``.model`` (the middle of the
``base_model.model.`` key prefix), and answering PEFT's calls on the inner model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from .config import LoraConfig

if TYPE_CHECKING:
    from .model import PeftModel


class LoraModel(nn.Module):
    """Holds the adapted model as ``.model`` (the middle of the ``base_model.model.`` key prefix).

    PEFT users also drive adapters through it (``model.base_model.set_adapter(["a", "b"])`` is PEFT's idiom
    for several active adapters); those calls go to the owning ``PeftModel``, which keeps the state.
    """

    prefix = "lora_"
    """What every adapter parameter's name contains (PEFT's ``LoraModel.prefix``)."""
    _owner: PeftModel

    def __init__(self, model: nn.Module, owner: PeftModel) -> None:
        super().__init__()
        self.model = model
        # A plain attribute, not a submodule: registering the owner would make modules() cycle.
        self.__dict__["_owner"] = owner

    @property
    def peft_config(self) -> dict[str, LoraConfig]:
        return self._owner.peft_config

    @property
    def active_adapter(self) -> str | list[str]:
        """The active adapter's name, or the list of names when several (or none) are active (PEFT's rule)."""
        active = self._owner.active_adapters
        return active[0] if len(active) == 1 else active

    @property
    def active_adapters(self) -> list[str]:
        return self._owner.active_adapters

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """See ``PeftModel.set_adapter`` (which also takes a list)."""
        self._owner.set_adapter(adapter_name, inference_mode=inference_mode)

    def disable_adapter_layers(self) -> None:
        self._owner.disable_adapter_layers()

    def enable_adapter_layers(self) -> None:
        self._owner.enable_adapter_layers()

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        self._owner.set_requires_grad(adapter_names, requires_grad)

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        self._owner.merge_adapter(adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        self._owner.unmerge_adapter()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        return self._owner.merge_and_unload(progressbar, safe_merge, adapter_names)

    def unload(self) -> nn.Module:
        return self._owner.unload()

    def delete_adapter(self, adapter_name: str) -> None:
        self._owner.delete_adapter(adapter_name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)
