"""Quantized frozen bases (QLoRA, Dettmers et al. 2023): the base weights in 4 or 8 bits, LoRA in fp32.

    model = quantize_model(model, "nf4")          # before or after get_peft_model
    model = get_peft_model(model, LoraConfig(target_modules="all-linear"))

Every frozen ``nn.Linear`` of the model (the output head excepted) is replaced by a ``QuantizedLinear``
that stores W0 quantized and computes

    y = x·deq(Q)ᵀ + b,      ∂L/∂x = ∂L/∂y · deq(Q),      no gradient for Q

dequantizing in forward and again in backward (the dequantized weight is never kept between them: that
is the memory QLoRA saves). LoRA layers wrap it as they wrap an ``nn.Linear``; gradients reach only the
LoRA factors (and biases the config unfreezes).

Formats (bitsandbytes, the maintained library PEFT and transformers use for the same job):

* ``nf4``: 4-bit NormalFloat in blocks of 64 with double quantization (the block scales are themselves
  quantized to 8 bits in blocks of 256), ~4.13 bits per weight (QLoRA §3);
* ``int8``: per-output-row absmax int8 (LLM.int8()'s vector-wise quantization without the outlier split),
  8 bits per weight plus one fp32 scale per row.

Why bitsandbytes and not torchao: measured on this machine (2 threads, 576×1536 fp32 layer), dequantizing
the weight takes 0.47 ms with bitsandbytes' CPU kernel against 31.8 ms for torchao 0.18's pure-PyTorch
``NF4Tensor`` (68×), which made a torchao NF4 forward+backward 1.9–5× an fp32 one against 1.1–1.6× for
bitsandbytes; int8 was a tie. One library for both formats then.

Merging (decided here, documented in docs/qlora.md): ``merge_adapter`` onto a quantized base is refused
(W0 + ΔW rounded back to 4 bits would lose most of ΔW, and unmerge could not restore Q).
``merge_and_unload`` dequantizes every quantized layer first and returns a *full-precision* model,
W = deq(Q) + s·B·A in the compute dtype. To get a quantized model again call ``quantize_model`` on the
result, which rounds W anew (generations may then differ slightly, as PEFT warns for its requantizing merge).

Base fingerprint: quantizing changes W0 by ~10 % per element, far beyond the fingerprint's tolerance, so
``QuantizedLinear`` keeps the *original* values at the positions the fingerprint samples (at most 130 per
layer). An adapter trained on the NF4 base therefore carries the fp32 base's fingerprint and loads onto it
(and the other way round) without ``allow_base_mismatch``.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .fingerprint import PER_MODULE_SAMPLES, sample_positions

QUANT_TYPES = ("nf4", "int8")
PIP_EXTRA = "pip install 'lorakit[quant]'"
NF4_BLOCK = 64
"""Weights per NF4 block (one absmax scale each), as in QLoRA and bitsandbytes' default."""


class QuantLibraryMissing(ImportError, ValueError):
    """bitsandbytes is not installed. An ImportError for library users and a ValueError so that the CLI
    reports it as one line, like any other unusable option."""


def quantization_library(quant_type: str) -> ModuleType:
    """``bitsandbytes.functional``, after checking ``quant_type``.

    bitsandbytes on CPUs with AVX512-BF16 (this one has it) tries, at import, to fetch a faster kernel from
    the Hugging Face hub through the optional ``kernels`` package; lorakit never downloads, so ``kernels``
    is hidden for the import (bitsandbytes falls back to its bundled kernel) and the fallback's log line
    is muted.

    Raises:
        ValueError: ``quant_type`` is not one of ``QUANT_TYPES``.
        QuantLibraryMissing: bitsandbytes is not installed (the message names the pip extra).
    """
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quantize={quant_type!r} is not a known format: use one of {', '.join(QUANT_TYPES)}.")
    loaded = sys.modules.get("bitsandbytes.functional")
    if loaded is not None:
        return loaded
    with _no_hub_kernels():
        try:
            import bitsandbytes.functional as bnb_functional
        except ImportError as exc:
            raise QuantLibraryMissing(
                f"quantize={quant_type!r} needs bitsandbytes, which cannot be imported ({exc}); install it with "
                f"{PIP_EXTRA}."
            ) from None
    return bnb_functional


@contextlib.contextmanager
def _no_hub_kernels() -> Iterator[None]:
    hidden = sys.modules.get("kernels")
    sys.modules["kernels"] = None  # type: ignore[assignment]  # `from kernels import …` raises ImportError
    logger = logging.getLogger("bitsandbytes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
        if hidden is None:
            del sys.modules["kernels"]
        else:
            sys.modules["kernels"] = hidden


class _DequantizedMatmul(torch.autograd.Function):
    """y = x·deq(Q)ᵀ with ∂L/∂x = ∂L/∂y·deq(Q), dequantizing again in backward; Q gets no gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantize(x.dtype))  # (..., in) · (in, out) → (..., out)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad_output @ ctx.layer.dequantize(grad_output.dtype), None  # (..., out) · (out, in)


class QuantizedLinear(nn.Linear):
    """A frozen ``nn.Linear(k, d)`` whose weight is stored quantized (``QUANT_TYPES``).

    It subclasses ``nn.Linear`` (as bitsandbytes' ``Linear4bit`` does) so that everything that recognises
    a linear layer — LoRA injection, ``target_modules="all-linear"``, transformers — keeps doing so; it has
    no ``weight`` parameter. ``weight`` is a fresh dequantized (d, k) copy in the compute dtype, for code
    that reads shapes or values: writing to it changes nothing. The bias stays a full-precision parameter.

    Buffers: ``qweight`` (NF4: uint8 (d·k/2, 1), two 4-bit codes per byte; int8: int8 (d, k)). The scales
    (bitsandbytes' ``QuantState`` for NF4, a (d,) fp32 tensor for int8) follow ``qweight`` across ``.to()``.
    """

    is_quantized = True
    qweight: torch.Tensor

    def __init__(self, linear: nn.Linear, quant_type: str) -> None:
        bnb = quantization_library(quant_type)
        nn.Module.__init__(self)  # not nn.Linear.__init__: no full-precision weight is ever allocated
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.quant_type = quant_type
        weight = linear.weight.detach()
        self.compute_dtype = weight.dtype
        flat = weight.reshape(-1)
        positions = torch.unique(torch.cat([sample_positions(flat.numel(), k) for k in PER_MODULE_SAMPLES]))
        self._fingerprint_positions = positions
        self._fingerprint_values = flat[positions.to(flat.device)].to("cpu", torch.float32)
        source = weight if weight.dtype in (torch.float32, torch.float16, torch.bfloat16) else weight.float()
        self._state: Any
        if quant_type == "nf4":
            packed, self._state = bnb.quantize_4bit(source.contiguous(), blocksize=NF4_BLOCK, quant_type="nf4",
                                                    compress_statistics=True)
        else:
            packed, self._state, _ = bnb.int8_vectorwise_quant(source.float().contiguous())
        self.register_buffer("qweight", packed)
        self.bias = linear.bias

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        """deq(Q), (out, in), in the compute dtype: a new tensor on every read."""
        return self.dequantize(self.compute_dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """deq(Q) as a (out, in) tensor of ``dtype`` (default: the dtype the weight had)."""
        bnb = quantization_library(self.quant_type)
        if self.quant_type == "nf4":
            weight = bnb.dequantize_4bit(self.qweight, self._state)
        else:
            weight = bnb.int8_vectorwise_dequant(self.qweight, self._state)
        return weight.to(dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _DequantizedMatmul.apply(x, self)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def storage_bytes(self) -> int:
        """Bytes of the quantized weight: codes plus every scale and lookup table (the bias not included)."""
        tensors = [self.qweight]
        state = self._state
        if isinstance(state, torch.Tensor):
            tensors.append(state)
        else:
            tensors += [state.absmax, state.code]
            if state.nested:
                tensors += [state.offset, state.state2.absmax, state.state2.code]
        return sum(t.numel() * t.element_size() for t in tensors)

    def fingerprint_weight(self) -> torch.Tensor:
        """deq(Q) with the original weight's values at the positions the base fingerprint samples (see
        ``lorakit.fingerprint``), so a quantized base fingerprints as the base it was quantized from."""
        weight = self.dequantize(torch.float32)
        weight.view(-1)[self._fingerprint_positions.to(weight.device)] = self._fingerprint_values.to(weight.device)
        return weight

    def _apply(self, fn: Any, recurse: bool = True) -> QuantizedLinear:
        super()._apply(fn, recurse)
        device = self.qweight.device
        if isinstance(self._state, torch.Tensor):
            self._state = self._state.to(device)
        else:
            self._state.to(device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, quant_type={self.quant_type}")


def quantize_model(model: nn.Module, quant_type: str) -> nn.Module:
    """Quantize, in place, every frozen linear layer of ``model``; returns ``model``.

    Quantized: each ``nn.Linear`` (exactly that type) that is the base of a LoRA layer or is a plain module
    of the model. Left in full precision: the output head (``get_output_embeddings``, often tied to the
    input embedding), LoRA factors, ``modules_to_save`` copies, GPT-2's ``Conv1D`` (lorakit quantizes
    ``nn.Linear`` only), embeddings and norms. Works before ``get_peft_model`` (PEFT's order) or after it.

    Args:
        model: a transformers model, a lorakit ``PeftModel`` or any ``nn.Module``.
        quant_type: ``"nf4"`` or ``"int8"``.

    Raises:
        ValueError: unknown ``quant_type``, a merged adapter (unmerge first) or no layer to quantize.
        QuantLibraryMissing: bitsandbytes is not installed.
    """
    quantization_library(quant_type)
    targets = _quantizable(model)
    if not targets:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer lorakit can quantize (the output head "
                         "stays full precision; GPT-2's Conv1D is not quantized).")
    for owner, attr, linear in targets:
        _replace(owner, attr, QuantizedLinear(linear, quant_type))
    return model


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every ``QuantizedLinear`` in ``model`` by an ``nn.Linear`` holding deq(Q); returns ``model``."""
    for owner, attr, layer in _children_of_type(model, QuantizedLinear):
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                           device=layer.qweight.device, dtype=layer.compute_dtype)
        linear.weight = nn.Parameter(layer.dequantize(), requires_grad=False)
        linear.bias = layer.bias
        _replace(owner, attr, linear)
    return model


def _replace(owner: nn.Module, attr: str, layer: nn.Module) -> None:
    setattr(owner, attr, layer)
    if hasattr(owner, "_fusable_base"):  # a LoRA Linear decides once whether its base can take the fused op
        owner._fusable_base = owner._is_fusable_base(layer)  # type: ignore[operator]


def quantized_weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the quantized storage, bytes the same weights take in fp32) over ``model``'s
    ``QuantizedLinear`` layers: a deterministic count of weight memory, not a measurement of RSS."""
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    return (sum(m.storage_bytes() for m in layers), sum(4 * m.in_features * m.out_features for m in layers))


def is_quantized(model: nn.Module) -> bool:
    """True if any layer of ``model`` is a ``QuantizedLinear``."""
    return any(isinstance(m, QuantizedLinear) for m in model.modules())


def require_full_precision(model: nn.Module, action: str) -> None:
    """Refuse ``action`` (e.g. "merge_adapter") on a quantized base, naming what to do instead."""
    if is_quantized(model):
        raise TypeError(f"{action} is not supported on a quantized base (rounding W0 + ΔW back to 4/8 bits would "
                        "lose most of ΔW, and unmerge could not restore the quantized weight); use "
                        "merge_and_unload(), which dequantizes and returns a full-precision model.")


def _quantizable(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    from .inject import iter_base_modules
    from .layers import LoraLayer

    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None and hasattr(model, "get_base_model"):
        inner = model.get_base_model()  # type: ignore[operator]
        get_head = getattr(inner, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
    modules = dict(model.named_modules())
    # A weight shared with another module (tied embeddings) stays as it is: quantizing one user of it
    # would untie the pair.
    seen: set[int] = set()
    shared: set[int] = set()
    for _, param in model.named_parameters(remove_duplicate=False):
        (shared if id(param) in seen else seen).add(id(param))
    found: list[tuple[nn.Module, str, nn.Linear]] = []
    for name, module in iter_base_modules(model):
        if isinstance(module, LoraLayer):
            if module.merged:
                raise ValueError(f"{name} has merged adapters {module.merged_adapters}; unmerge_adapter() before "
                                 "quantizing the base.")
            base = module.base_layer
            if type(base) is nn.Linear and base is not head and id(base.weight) not in shared:
                found.append((module, "base_layer", base))
        elif type(module) is nn.Linear and module is not head and name and id(module.weight) not in shared:
            parent, _, attr = name.rpartition(".")
            found.append((modules[parent], attr, module))
    return found


def _children_of_type(model: nn.Module, kind: type[nn.Module]) -> list[tuple[nn.Module, str, Any]]:
    return [(parent, attr, child) for parent in model.modules() for attr, child in parent.named_children()
            if isinstance(child, kind)]
