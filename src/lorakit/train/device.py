"""Where and in which precision a run computes: ``--device`` and ``--dtype``/``--autocast`` resolved once,
checked before anything is loaded or written.

Device (``resolve_device``): ``auto`` is CUDA if available (``cuda:LOCAL_RANK`` under torchrun), else MPS,
else the CPU; ``cuda`` is the current CUDA device (``cuda:LOCAL_RANK`` under torchrun, so each rank takes
its own GPU); ``cuda:N`` must exist on this machine; ``mps`` needs Apple's Metal backend.

Precision (``Precision``): the frozen base is stored in ``--dtype``; the LoRA factors and the AdamW state
always stay float32. ``--autocast`` runs the forward under ``torch.autocast``: bfloat16, unless the base is
float16, in which case float16 with a ``GradScaler`` (the loss is scaled so that float16 gradients do not
underflow; steps whose gradients overflow are skipped and the scale lowered). float16 autocast is only
offered on CUDA: its GradScaler exists for CUDA, and on the CPU bfloat16 (same range as float32) needs none.

Peak memory (``peak_memory_bytes``): ``torch.cuda.max_memory_allocated`` on CUDA; on the CPU (and MPS) the
process's resident-set high-water mark (``resource.getrusage``: ru_maxrss, KiB on Linux, bytes on macOS).
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import sys
from dataclasses import dataclass
from typing import Any

import torch

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
_CUDA = re.compile(r"cuda(?::(\d+))?")


def resolve_device(spec: str, local_rank: int | None = None, flag: str = "--device") -> torch.device:
    """The ``torch.device`` that ``spec`` names on this machine.

    Args:
        spec: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        local_rank: this process's LOCAL_RANK under torchrun (None: a single process); ``auto`` and ``cuda``
            then mean ``cuda:local_rank``.
        flag: the option named in error messages.

    Raises:
        ValueError: an unknown spec, CUDA/MPS asked for where it is not available, a CUDA index this
            machine does not have, or an explicit ``cuda:N`` under torchrun (each rank takes its own GPU).
    """
    spec = spec.strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank or 0)
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not _mps_available():
            raise ValueError(f"{flag} mps: the MPS (Apple Metal) backend is not available on this machine; "
                             "use --device cpu (or auto).")
        return torch.device("mps")
    match = _CUDA.fullmatch(spec)
    if match is None:
        raise ValueError(f"{flag} {spec!r} is not a device: use {DEVICE_CHOICES}.")
    if not torch.cuda.is_available():
        raise ValueError(f"{flag} {spec}: CUDA is not available here (torch {torch.__version__}, "
                         f"{'a CPU-only build' if torch.version.cuda is None else 'no GPU visible'}); "
                         "use --device cpu (or auto), or install a CUDA build of torch on a GPU machine.")
    count = torch.cuda.device_count()
    if match.group(1) is None:
        index = local_rank if local_rank is not None else torch.cuda.current_device()
    else:
        index = int(match.group(1))
        if local_rank is not None:
            raise ValueError(f"{flag} {spec}: under torchrun each process takes the GPU of its LOCAL_RANK; "
                             "pass --device cuda (or auto) instead of naming one GPU.")
    if index >= count:
        raise ValueError(f"{flag} {spec}: this machine has {count} CUDA device(s) (cuda:0 … cuda:{count - 1}); "
                         f"use an index below {count}, or --device cuda.")
    return torch.device("cuda", index)


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def local_rank() -> int | None:
    """LOCAL_RANK under torchrun/accelerate with several processes; None for a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    return int(os.environ.get("LOCAL_RANK", "0"))


@dataclass(frozen=True)
class Precision:
    """The base dtype and the autocast regime of a run.

    ``autocast_dtype`` is None without ``--autocast``; else bfloat16 (float32 or bfloat16 base) or float16
    (float16 base, with a GradScaler).
    """

    base_dtype: torch.dtype
    autocast_dtype: torch.dtype | None
    device: torch.device

    @classmethod
    def resolve(cls, dtype: str, autocast: bool, device: torch.device) -> Precision:
        """Check that ``dtype``/``autocast`` work on ``device``.

        Raises:
            ValueError: float16 autocast away from CUDA, or autocast on a device type torch cannot autocast.
        """
        base = getattr(torch, dtype)
        if not autocast:
            return cls(base, None, device)
        wanted = torch.float16 if base == torch.float16 else torch.bfloat16
        if wanted == torch.float16 and device.type != "cuda":
            raise ValueError(f"--autocast with --dtype float16 on {device}: float16 autocast needs a GradScaler, "
                             "which lorakit runs on CUDA only; on this device use --dtype float32 --autocast "
                             "(bfloat16 autocast) or --dtype bfloat16.")
        if not torch.amp.is_autocast_available(device.type):
            raise ValueError(f"--autocast on {device}: torch {torch.__version__} cannot autocast on "
                             f"{device.type}; drop --autocast (and use --dtype to pick the base precision).")
        return cls(base, wanted, device)

    @property
    def uses_scaler(self) -> bool:
        return self.autocast_dtype == torch.float16

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The context the forward runs in: ``torch.autocast`` with this regime, or nothing."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A GradScaler that is active only for float16 autocast (a disabled one passes everything through)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.uses_scaler)

    def describe(self) -> str:
        base = str(self.base_dtype).removeprefix("torch.")
        if self.autocast_dtype is None:
            return f"{base} base, float32 adapters"
        amp = str(self.autocast_dtype).removeprefix("torch.")
        return f"{base} base, {amp} autocast{' + GradScaler' if self.uses_scaler else ''}, float32 adapters"


def peak_memory_bytes(device: torch.device) -> int:
    """High-water mark of this process's memory on ``device``: allocated CUDA bytes, else the peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)

