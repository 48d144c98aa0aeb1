"""LoraConfig: what to adapt and how, plus the adapter_config.json round trip (PEFT's format).

The field names, defaults and JSON keys follow PEFT's ``LoraConfig`` so that a file written by either
library loads in the other. Validation happens in ``__post_init__``: a bad value raises ``ValueError``
naming the field, the value and what is allowed, before any model is touched.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, Union

# Keys of PEFT's adapter_config.json that lorakit reads and writes with the same meaning.
# Keys PEFT writes that change nothing for plain LoRA (e.g. "revision", "megatron_core") are
# accepted and dropped by ``LoraConfig.from_dict``; keys that would change the math are refused.
_MATH_CHANGING_KEYS_UNSUPPORTED: dict[str, Any] = {
    "lora_bias": False,
    "layer_replication": None,
    "use_qalora": False,
    "target_parameters": None,
    "trainable_token_indices": None,
    "alora_invocation_tokens": None,
    "use_bdlora": None,
    "loftq_config": {},
}

MAX_RANK = 1 << 20
"""Largest rank accepted (far above any weight dimension in use; bounds what a config can make lorakit allocate)."""

InitLoraWeights = Union[bool, Literal["gaussian", "pissa", "olora"]]  # noqa: UP007 (runtime alias)


class TaskType(str, enum.Enum):
    """The task a model is adapted for, as PEFT names it (only recorded; lorakit wraps any model)."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


@dataclass
class LoraConfig:
    """Configuration of one LoRA adapter: h = W0·x + (α/r)·B·A·x on every targeted module.

    Matching rules for ``target_modules`` (and ``exclude_modules``): a list matches a module whose full
    name equals an entry or ends with ``"." + entry``; a string is ``re.fullmatch``-ed against the full
    name; ``"all-linear"`` selects every Linear / GPT-2 Conv1D except the output head.
    """

    r: int = 8
    """Rank of the update (A is r×k, B is d×r)."""
    lora_alpha: float = 8
    """Numerator of the scaling α/r (α/√r with ``use_rslora``)."""
    lora_dropout: float = 0.0
    """Dropout probability applied to the LoRA branch's input, in [0, 1)."""
    target_modules: list[str] | str | None = None
    """Which modules to adapt (see the class docstring). None: PEFT's defaults for the model's architecture
    (``lorakit.target_defaults``, e.g. llama → q_proj, v_proj), chosen by ``get_peft_model``."""
    exclude_modules: list[str] | str | None = None
    """Modules never adapted, matched like ``target_modules``."""
    layers_to_transform: list[int] | int | None = None
    """Only adapt modules inside these layer indices (the number after ``layers_pattern`` in the name)."""
    layers_pattern: list[str] | str | None = None
    """Name of the ModuleList holding the layers (e.g. "h" for GPT-2, "layers" for Llama); guessed if None."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank overrides: key matched like a target (regex fullmatch or dotted suffix)."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alpha overrides, matched like ``rank_pattern``."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases train: none, all biases of the model, or only those of adapted modules."""
    use_rslora: bool = False
    """Use the rank-stabilised scaling α/√r instead of α/r."""
    use_dora: bool = False
    """DoRA (Liu et al. 2024): W′ = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖ per output feature, m trainable
    (``lorakit.layers.dora``). Linear and GPT-2 Conv1D targets only."""
    init_lora_weights: InitLoraWeights = True
    """True: Kaiming-uniform A, B=0 (PEFT default); "gaussian": A ~ N(0, 1/r), B=0 (the paper);
    False: random non-zero B (tests only); "pissa"/"olora": SVD/QR init with W0 adjusted."""
    modules_to_save: list[str] | None = None
    """Modules (matched by exact name or dotted suffix) trained in full and saved with the adapter."""
    fan_in_fan_out: bool | None = None
    """True if the targeted weights are stored (in, out) like GPT-2's Conv1D. None: detect per layer."""
    task_type: TaskType | str | None = None
    """Recorded in adapter_config.json; lorakit wraps any model whatever the task."""
    base_model_name_or_path: str | None = None
    """Recorded in adapter_config.json so the adapter can name its base."""
    inference_mode: bool = False
    """Written as true on save, as PEFT does; loading with is_trainable=False sets it."""
    peft_type: str = "LORA"
    """Always "LORA"."""

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or not 0 < self.r <= MAX_RANK:
            raise ValueError(
                f"LoraConfig.r={self.r!r} is invalid: r must be a positive integer up to {MAX_RANK} (e.g. r=8)."
            )
        if not _is_finite_number(self.lora_alpha):
            raise ValueError(f"LoraConfig.lora_alpha={self.lora_alpha!r} is invalid: use a finite number (e.g. 16).")
        if (isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float))
                or not 0.0 <= self.lora_dropout < 1.0):
            raise ValueError(
                f"LoraConfig.lora_dropout={self.lora_dropout!r} is invalid: use a probability in [0, 1), e.g. 0.05."
            )
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"LoraConfig.bias={self.bias!r} is invalid: use one of 'none', 'all', 'lora_only'.")
        if not (isinstance(self.init_lora_weights, bool) or self.init_lora_weights in ("gaussian", "pissa", "olora")):
            raise ValueError(
                f"LoraConfig.init_lora_weights={self.init_lora_weights!r} is invalid: use True (Kaiming-uniform A), "
                "'gaussian', False (non-zero B, tests only), 'pissa' or 'olora'."
            )
        if self.peft_type != "LORA":
            raise ValueError(f"LoraConfig.peft_type={self.peft_type!r} is invalid: lorakit only handles 'LORA'.")
        for name in ("use_rslora", "use_dora", "inference_mode"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LoraConfig.{name}={getattr(self, name)!r} is invalid: use true or false.")
        if self.fan_in_fan_out is not None and not isinstance(self.fan_in_fan_out, bool):
            raise ValueError(f"LoraConfig.fan_in_fan_out={self.fan_in_fan_out!r} is invalid: use true, false or null.")
        if self.base_model_name_or_path is not None and not isinstance(self.base_model_name_or_path, str):
            raise ValueError(f"LoraConfig.base_model_name_or_path={self.base_model_name_or_path!r} is invalid: "
                             "use a string (a model id or directory) or null.")
        if self.modules_to_save is not None and not isinstance(self.modules_to_save, (list, tuple, set, frozenset)):
            raise ValueError(f"LoraConfig.modules_to_save={self.modules_to_save!r} is invalid: use a list of module "
                             "names (e.g. ['lm_head']) or null.")
        self.target_modules = _normalise_names("target_modules", self.target_modules)
        self.layers_pattern = _normalise_names("layers_pattern", self.layers_pattern)
        self.exclude_modules = _normalise_names("exclude_modules", self.exclude_modules)
        if self.modules_to_save is not None:
            self.modules_to_save = _normalise_names("modules_to_save", list(self.modules_to_save))  # type: ignore[assignment]
        if isinstance(self.layers_to_transform, int) and not isinstance(self.layers_to_transform, bool):
            self.layers_to_transform = [self.layers_to_transform]
        if self.layers_to_transform is not None and (
            not isinstance(self.layers_to_transform, list)
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers_to_transform)
        ):
            raise ValueError(
                f"LoraConfig.layers_to_transform={self.layers_to_transform!r} is invalid: "
                "use a non-negative int or a list of them."
            )
        for name, pattern in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            if not isinstance(pattern, dict):
                raise ValueError(f"LoraConfig.{name}={pattern!r} is invalid: use a dict of module pattern -> value.")
        for key, value in self.rank_pattern.items():
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_RANK:
                raise ValueError(f"LoraConfig.rank_pattern[{key!r}]={value!r} is invalid: ranks are positive ints "
                                 f"up to {MAX_RANK}.")
        for key, alpha in self.alpha_pattern.items():
            if not _is_finite_number(alpha):
                raise ValueError(f"LoraConfig.alpha_pattern[{key!r}]={alpha!r} is invalid: alphas are finite numbers.")
        for name, pattern in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            for key in pattern:
                _check_regex(f"{name} key", key, rf"(.*\.)?(?:{key})" if isinstance(key, str) else key)
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, str):
                _check_regex(name, value, value)
        if self.task_type is not None and not isinstance(self.task_type, str):
            allowed = ", ".join(t.value for t in TaskType)
            raise ValueError(f"LoraConfig.task_type={self.task_type!r} is invalid: use one of {allowed}, or null.")
        if isinstance(self.task_type, str) and not isinstance(self.task_type, TaskType):
            try:
                self.task_type = TaskType(self.task_type)
            except ValueError:
                allowed = ", ".join(t.value for t in TaskType)
                raise ValueError(f"LoraConfig.task_type={self.task_type!r} is invalid: use one of {allowed}.") from None

    def scaling_for(self, r: int, alpha: float) -> float:
        """The factor multiplying B·A: α/r, or α/√r with rsLoRA."""
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with PEFT's key names (sets become sorted lists, enums their values)."""
        data = asdict(self)
        if isinstance(self.task_type, TaskType):
            data["task_type"] = self.task_type.value
        data["fan_in_fan_out"] = bool(self.fan_in_fan_out)
        # PEFT readers expect these keys to exist; their defaults mean "off".
        data.update({k: v for k, v in _MATH_CHANGING_KEYS_UNSUPPORTED.items()})
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> tuple[LoraConfig, list[str]]:
        """Build a config from an adapter_config.json dict.

        Returns the config and the sorted list of keys that were ignored (unknown or inert here).

        Raises:
            ValueError: if peft_type is not LORA, target_modules is missing, or a key that changes the math
                and that lorakit does not implement is set (e.g. lora_bias=true).
        """
        if not isinstance(data, dict):
            raise ValueError(f"adapter config must be a JSON object, got {type(data).__name__}.")
        peft_type = data.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise ValueError(f"adapter config has peft_type={peft_type!r}; lorakit only loads 'LORA' adapters.")
        for key, inert in _MATH_CHANGING_KEYS_UNSUPPORTED.items():
            value = data.get(key, inert)
            if value not in (inert, None, False, {}, []):
                raise ValueError(
                    f"adapter config sets {key}={value!r}, which changes the adapter's math and is not supported "
                    f"by lorakit; re-save the adapter without it (or use PEFT for {key})."
                )
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        if kwargs.get("target_modules") is None and not kwargs.get("rank_pattern"):
            raise ValueError("adapter config has no 'target_modules'; it cannot say which modules to adapt.")
        ignored = sorted(set(data) - known - set(_MATH_CHANGING_KEYS_UNSUPPORTED) - _INERT_PEFT_KEYS)
        return cls(**kwargs), ignored


# Keys PEFT 0.21 writes that carry no meaning for lorakit's LoRA (so are not reported as ignored).
_INERT_PEFT_KEYS = {
    "auto_mapping",
    "revision",
    "megatron_config",
    "megatron_core",
    "peft_version",
    "qalora_group_size",
    "eva_config",
    "corda_config",
    "arrow_config",
    "kasa_config",
    "monteclora_config",
    "lora_ga_config",
    "velora_config",
    "ensure_weight_tying",
}


def _is_finite_number(value: object) -> bool:
    """An int or float (not a bool) that is finite as a float (a 400-digit int is not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _check_regex(what: str, shown: object, pattern: object) -> None:
    """A ValueError naming ``what`` if ``pattern`` is not a string that compiles as a regular expression."""
    if not isinstance(pattern, str):
        raise ValueError(f"LoraConfig {what} {shown!r} is invalid: use a module name or a regular expression string.")
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise ValueError(f"LoraConfig {what} {shown!r} is not a valid regular expression ({exc}); escape special "
                         "characters or use a list of module names.") from None


def _normalise_names(field_name: str, value: Any) -> list[str] | str | None:
    """Sets/tuples become sorted lists (PEFT stores sets); strings stay regexes; anything else is an error."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    raise ValueError(
        f"LoraConfig.{field_name}={value!r} is invalid: use a list of module names (e.g. ['q_proj', 'v_proj']) "
        "or a regex string."
    )
