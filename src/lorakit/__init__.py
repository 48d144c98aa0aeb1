"""lorakit: LoRA (Hu et al. 2021) for PyTorch with PEFT's API and file format.

    from lorakit import LoraConfig, TaskType, get_peft_model
    model = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=16,
                                             target_modules=["c_attn"]))
"""

from .config import LoraConfig, TaskType
from .errors import LorakitWarning
from .io import load_adapter_weights, save_adapter_weights
from .layers.base import BASE_ROW
from .model import PeftModel, get_peft_model
from .optim import create_loraplus_optimizer
from .state_dict import get_peft_model_state_dict, set_peft_model_state_dict

__version__ = "0.1.0"

__all__ = [
    "BASE_ROW",
    "LoraConfig",
    "LorakitWarning",
    "PeftModel",
    "TaskType",
    "get_peft_model",
    "load_adapter_weights",
    "save_adapter_weights",
    "__version__",
    "get_peft_model_state_dict",
    "set_peft_model_state_dict",
    "create_loraplus_optimizer",
]
