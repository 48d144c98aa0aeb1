"""Base-model fingerprint: which base weights an adapter was trained on (lorakit's addition to PEFT's format).

An adapter only means something on top of the base weights W0 it was trained with. lorakit stores, in the
safetensors metadata of every adapter it writes, a fingerprint of the *targeted* modules' base weights:

* ``structure``: sha256 over the sorted (module name, weight shape) pairs — different architecture or size;
* ``values``: sha256 over a deterministic sample of weight values — same architecture, other weights;
* ``sample``: those sampled values themselves (float32), so that the comparison can tolerate a dtype cast
  of the same base (fp32 → bf16/fp16 changes the bytes, not the weights).

Sample: for each targeted module (in sorted name order), ``k`` values at evenly spaced positions of the
flattened weight, k = clamp(512 // n_modules, 4, 16). Two bases match when the structures are equal and the
samples agree within rtol=1e-2, atol=1e-5 (bf16 rounds at 2^-9 relative; unrelated weights differ by O(1)).

What "the base weights" are: the weights under the LoRA layers with every merged adapter subtracted again
(exactly as ``unmerge`` would), so merging never changes the fingerprint. PiSSA/OLoRA initialisation
*rewrites* W0 into a residual W0 - s·B0·A0: such an adapter is fingerprinted against that residual base,
which is the base it needs — loading it onto the original base is refused unless ``allow_base_mismatch``.
Biases are not included (``bias="all"``/``"lora_only"`` adapters carry trained biases that loading writes
into the base). Only the sampled positions enter the hash; a merged layer's weight is unmerged into a
temporary copy first, the layer itself is not touched.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import torch

FINGERPRINT_KEY = "lorakit.base_fingerprint"
SAMPLE_KEY = "lorakit.base_sample"
_SCHEME = "lkfp1"
_RTOL, _ATOL = 1e-2, 1e-5


@dataclass(frozen=True)
class BaseFingerprint:
    """Fingerprint of the base weights under an adapter's targeted modules (see the module docstring)."""

    structure: str
    """First 16 hex digits of sha256 over the sorted "name:shape" lines."""
    values: str
    """First 16 hex digits of sha256 over the float32 bytes of ``sample``."""
    sample: torch.Tensor
    """The sampled weight values, float32, 1-d."""

    def __str__(self) -> str:
        return f"{_SCHEME}-{self.structure}-{self.values}"

    def to_metadata(self) -> dict[str, str]:
        """Entries for the safetensors metadata (strings only)."""
        raw = self.sample.to(torch.float32).contiguous().numpy().tobytes()
        return {FINGERPRINT_KEY: str(self), SAMPLE_KEY: base64.b64encode(raw).decode("ascii")}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str], source: str) -> BaseFingerprint | None:
        """The fingerprint stored in ``metadata``, or None if there is none (e.g. a file written by PEFT).

        Raises:
            ValueError: the entries exist but are malformed (``source`` names the file).
        """
        text = metadata.get(FINGERPRINT_KEY)
        if text is None:
            return None
        parts = text.split("-")
        try:
            if len(parts) != 3 or parts[0] != _SCHEME:
                raise ValueError(f"unknown fingerprint {text!r}")
            raw = base64.b64decode(metadata[SAMPLE_KEY], validate=True)
            sample = torch.frombuffer(bytearray(raw), dtype=torch.float32) if raw else torch.empty(0)
        except (KeyError, ValueError) as exc:
            raise ValueError(
                f"{source}: the base-model fingerprint in its metadata is malformed ({exc}); the file is corrupt "
                "or was edited — re-save the adapter, or load it with allow_base_mismatch=True."
            ) from None
        return cls(parts[1], parts[2], sample)

    def matches(self, other: BaseFingerprint) -> bool:
        """Same modules and shapes, and sampled values equal up to a dtype cast."""
        if self.structure != other.structure:
            return False
        if self.values == other.values:
            return True
        return self.sample.shape == other.sample.shape and torch.allclose(
            self.sample, other.sample, rtol=_RTOL, atol=_ATOL, equal_nan=True
        )

    def mismatch_reason(self, other: BaseFingerprint) -> str:
        if self.structure != other.structure:
            return "the targeted modules' names or weight shapes differ"
        return "same modules and shapes, but different weight values"


PER_MODULE_SAMPLES = range(4, 17)
"""The values k sampled per module can take (k = clamp(512 // n_modules, 4, 16))."""


def sample_positions(numel: int, per_module: int) -> torch.Tensor:
    """Flat positions (int64, CPU) of the ``per_module`` values sampled from a weight of ``numel`` elements."""
    positions = torch.linspace(0, numel - 1, min(per_module, numel), dtype=torch.float64)
    return positions.round().long()


def fingerprint_weights(named_weights: Iterable[tuple[str, torch.Tensor]]) -> BaseFingerprint:
    """Fingerprint of base weights given as (module name, weight) pairs (any order, any dtype/device)."""
    items = sorted(named_weights, key=lambda item: item[0])
    per_module = max(PER_MODULE_SAMPLES[0], min(PER_MODULE_SAMPLES[-1], 512 // max(len(items), 1)))
    structure = hashlib.sha256()
    samples: list[torch.Tensor] = []
    for name, weight in items:
        structure.update(f"{name}:{tuple(weight.shape)}\n".encode())
        flat = weight.detach().reshape(-1)
        if flat.numel() == 0:
            continue
        samples.append(flat[sample_positions(flat.numel(), per_module).to(flat.device)].to("cpu", torch.float32))
    sample = torch.cat(samples) if samples else torch.empty(0)
    values = hashlib.sha256(sample.numpy().tobytes()).hexdigest()[:16]
    return BaseFingerprint(structure.hexdigest()[:16], values, sample)
