"""How tensors are stored in a GGUF file (the ``--outtype``s) and how a GGUF file is written atomically.

The storage rule is llama.cpp's converters' (``conversion/base.py`` ``prepare_tensors``): 1-D tensors,
``*_norm.weight`` and anything not named ``.weight`` / ``.lora_a`` / ``.lora_b`` stay F32; the rest take the
outtype; a tensor whose rows do not split into the quantization's blocks (Q8_0: 32 values — e.g. a
``lora_b`` of rank 8) falls back to F16, as there. Quantization is the ``gguf`` package's own (numpy,
maintained by ggml-org with llama.cpp), so the bytes equal what the converters write.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import torch

OUTTYPES: dict[str, gguf.GGMLQuantizationType] = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "bf16": gguf.GGMLQuantizationType.BF16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
}
"""``--outtype`` → GGML storage type (the choices of llama.cpp's ``convert_lora_to_gguf.py``)."""

FILE_TYPES: dict[str, gguf.LlamaFileType] = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}
"""``--outtype`` → ``general.file_type`` of a full model file."""

READABLE_TYPES = frozenset({*OUTTYPES.values(), gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1,
                            gguf.GGMLQuantizationType.Q5_0, gguf.GGMLQuantizationType.Q5_1})
"""Storage types lorakit dequantizes when reading (all the ``gguf`` package can quantize, too)."""


def check_outtype(outtype: str) -> gguf.GGMLQuantizationType:
    """The storage type of ``outtype``; ValueError naming the allowed ones otherwise."""
    if outtype not in OUTTYPES:
        raise ValueError(f"--outtype {outtype!r} is not a GGUF output type lorakit writes; choose one of "
                         f"{', '.join(OUTTYPES)}.")
    return OUTTYPES[outtype]


def encode(name: str, tensor: torch.Tensor, outtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """``tensor`` as the array and storage type a GGUF file holds for tensor ``name`` at ``outtype``.

    float16 stays float16 and every other dtype becomes float32 before quantizing (as the converters do).
    """
    qtype = check_outtype(outtype)
    data = tensor.detach().to("cpu")
    data = data if data.dtype in (torch.float16, torch.float32) else data.to(torch.float32)
    array = data.contiguous().numpy()
    if array.ndim <= 1 or name.endswith("_norm.weight") or not name.endswith((".weight", ".lora_a", ".lora_b")):
        qtype = gguf.GGMLQuantizationType.F32
    try:
        return gguf.quants.quantize(array, qtype), qtype
    except gguf.QuantError:  # rows not a multiple of the block size: F16, as llama.cpp's converter does
        return gguf.quants.quantize(array, gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16


def decode(tensor: gguf.ReaderTensor) -> torch.Tensor:
    """A tensor of a GGUF file as float32, in numpy (= PyTorch) order: shape reversed from GGUF's."""
    if tensor.tensor_type not in READABLE_TYPES:
        raise ValueError(f"tensor {tensor.name!r} is stored as {tensor.tensor_type.name}, which lorakit cannot read; "
                         f"it reads {', '.join(sorted(t.name for t in READABLE_TYPES))}.")
    shape = tuple(int(d) for d in reversed(tensor.shape))
    raw = np.asarray(tensor.data)
    values = gguf.quants.dequantize(raw, tensor.tensor_type) if raw.dtype == np.uint8 else raw
    return torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))  # a copy: the file is mapped read-only


def check_output(path: Path, force: bool) -> None:
    """Refuse to replace an existing file unless ``force``, before any work is done."""
    if path.exists() and not force:
        raise FileExistsError(f"-o {path} exists; choose a new file name or pass --force to replace it.")
    if path.is_dir():
        raise IsADirectoryError(f"-o {path} is a directory; give the path of the .gguf file to write.")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"-o {path}: directory {path.parent} does not exist; create it first.")


def export_paths(adapter_dir: str | os.PathLike[str], model_dir: str | os.PathLike[str],
                 output: str | os.PathLike[str], outtype: str, force: bool) -> tuple[Path, Path, Path]:
    """Check an export's inputs before any work (outtype, output path, adapter directory); returns the
    (adapter, model, output) paths."""
    adapter_path, model_path, output_path = Path(adapter_dir), Path(model_dir), Path(output)
    check_outtype(outtype)
    check_output(output_path, force)
    if not adapter_path.is_dir():
        raise FileNotFoundError(f"adapter directory {adapter_path} does not exist; pass the directory lorakit "
                                "train / save_pretrained wrote (it holds adapter_config.json).")
    return adapter_path, model_path, output_path


def write_atomically(path: Path, arch: str, fill: Callable[[gguf.GGUFWriter], None]) -> None:
    """Write a GGUF file to ``path``: a temporary file beside it, fsync'ed, then renamed over ``path``.

    ``fill(writer)`` adds the metadata and tensors; the header, KV data and tensors are written after it.
    A failure at any point removes the temporary file and leaves ``path`` as it was.
    """
    from ..io import _fsync_directory

    temp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.lorakit-tmp"
    writer = gguf.GGUFWriter(temp, arch)
    try:
        fill(writer)
        writer.write_header_to_file(path=temp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        writer.close()
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    _fsync_directory(path.parent)
