"""Adapter files on disk, in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Layout (PEFT 0.21, see REFERENCE.md "PEFT on-disk format"): the adapter called "default" is written to
``save_directory/``, any other adapter to ``save_directory/<name>/``. Tensor keys are the in-memory keys
with the adapter name removed — ``file_key`` is the one mapping, applied to the model's keys on save and
inverted (by applying it to the keys the model *will* have) on load, so both directions agree by
construction:

    base_model.model.h.0.attn.c_attn.lora_A.<name>.weight  →  base_model.model.h.0.attn.c_attn.lora_A.weight
    base_model.model.wte.lora_embedding_A.<name>           →  base_model.model.wte.lora_embedding_A
    base_model.model.ln_f.modules_to_save.<name>.weight    →  base_model.model.ln_f.weight
    base_model.model.h.0.attn.c_attn.base_layer.bias       →  unchanged (bias="lora_only"/"all")

lorakit adds, in the safetensors metadata (PEFT ignores it): the format version, a checksum of the tensor
data, the base-model fingerprint (``lorakit.fingerprint``), a copy of the config JSON and the hash of the
config file that save replaced.

Crash safety: both files are written to temporary files in the same directory and fsync'ed; then the
weights are renamed over the old weights and, immediately after, the config over the old config; then
the directory is fsync'ed. A crash between the two renames leaves new weights next to the old config;
the loader recognises that state (the config file is exactly the one the weights' save was replacing)
and uses the config stored with the weights. So at every instant the directory holds a loadable adapter:
the old one or the new one. An unchanged config is not rewritten, so re-saving a checkpoint is a single
rename and even PEFT, which does not read the metadata, always sees the old or the new adapter; PEFT can
see the mixed state only when a save that changes the config dies between its two renames.

Safety: loading never runs code. A directory's ``adapter_model.safetensors`` is read; a directory holding only
a legacy ``adapter_model.bin`` (PEFT's ``safe_serialization=False``) is read with
``torch.load(weights_only=True)``, with a warning unless ``use_safetensors=False`` asked for it; a raw
``.bin`` path needs ``use_safetensors=False``. Adapter names cannot contain
path separators or dots, a subdirectory that is a symbolic link is never written through, and a file that
is a link to somewhere outside the adapter directory is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import secrets
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from .config import LoraConfig
from .errors import LorakitWarning
from .fingerprint import BaseFingerprint, fingerprint_weights
from .inject import (
    TargetPlan,
    adapter_layers,
    drop_unmatched_pattern_keys,
    iter_base_modules,
    plan_injection,
    plan_modules_to_save,
)
from .layers import GPT2Conv1D, LoraLayer, dora, layer_class_for
from .layers.modules_to_save import ModulesToSaveWrapper
from .model import validate_adapter_name

if TYPE_CHECKING:
    from .model import PeftModel

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
"""Every key starts with this: ``PeftModel.base_model`` (a LoraModel) holds the user's model as ``.model``."""
FORMAT_VERSION = 1
"""lorakit's metadata version; bumped only if a future lorakit writes something older ones misread."""
PEFT_FORMAT_VERSION = "0.21.2"
"""The PEFT release whose file format lorakit writes (recorded as ``peft_version``)."""
ADAPTER_CONTAINERS = frozenset({"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"})
"""Per-adapter containers: in memory ``<container>.<adapter name>[.<param>]``, on disk without the name."""

_META_FORMAT_VERSION = "lorakit.format_version"
_META_VERSION = "lorakit.version"
_META_CONFIG = "lorakit.adapter_config"
_META_REPLACES = "lorakit.replaces_config_sha256"
_META_CHECKSUM = "lorakit.tensors_sha256"
_TEMP_SUFFIX = ".lorakit-tmp"

# Keys PEFT 0.21 writes that LoraConfig.to_dict does not produce, with the values PEFT writes for plain LoRA.
_PEFT_ONLY_KEYS: dict[str, Any] = {
    "auto_mapping": None,
    "revision": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "qalora_group_size": 16,
    "eva_config": None,
    "corda_config": None,
    "arrow_config": None,
    "kasa_config": None,
    "monteclora_config": None,
    "lora_ga_config": None,
    "velora_config": None,
    "ensure_weight_tying": False,
}

# ---------------------------------------------------------------------------------------------- key mapping
def file_key(model_key: str, adapter_name: str) -> str:
    """The on-disk key of an in-memory (``PeftModel.state_dict``) key of adapter ``adapter_name``.

    Removes the adapter name after a per-adapter container (``lora_A.<name>.weight`` → ``lora_A.weight``,
    ``lora_embedding_A.<name>`` → ``lora_embedding_A``) and the ``modules_to_save.<name>`` pair (a saved
    module's copy is stored under the module's plain path). Every other key is unchanged. Used both to
    save (model keys → file keys) and to load (the inverse, built from the keys the model will have).
    """
    parts = model_key.split(".")
    out: list[str] = []
    i = 0
    while i < len(parts):
        part = parts[i]
        named_next = i + 1 < len(parts) and parts[i + 1] == adapter_name
        if part == "modules_to_save" and named_next:
            i += 2
            continue
        out.append(part)
        i += 2 if part in ADAPTER_CONTAINERS and named_next else 1
    return ".".join(out)


def _is_base_bias(key: str) -> bool:
    """A bias of the base model (what bias="all" saves), not one inside an adapter's own tensors."""
    parts = key.split(".")
    return parts[-1] == "bias" and not any(p in ADAPTER_CONTAINERS or p == "modules_to_save" for p in parts)


def adapter_model_keys(model: PeftModel, adapter_name: str) -> list[str]:
    """The ``model.state_dict()`` keys that make up adapter ``adapter_name``: its LoRA factors, its
    modules_to_save copies, and the biases its ``bias`` mode trains."""
    bias = model.peft_config[adapter_name].bias
    state = model.state_dict(keep_vars=True)
    keys: list[str] = []
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.r:
            for container in module.adapter_param_names:
                stem = f"{PREFIX}{name}.{container}.{adapter_name}"
                keys.extend(k for k in state if k == stem or k.startswith(stem + "."))
            if bias == "lora_only" and f"{PREFIX}{name}.base_layer.bias" in state:
                keys.append(f"{PREFIX}{name}.base_layer.bias")
        elif isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            stem = f"{PREFIX}{name}.modules_to_save.{adapter_name}."
            keys.extend(k for k in state if k.startswith(stem))
    if bias == "all":
        keys.extend(k for k in state if _is_base_bias(k))
    return list(dict.fromkeys(keys))


def get_adapter_state_dict(model: PeftModel, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter ``adapter_name`` as it is stored on disk: file keys → detached, contiguous CPU tensors."""
    model._require_adapter(adapter_name)
    state = model.state_dict(keep_vars=True)
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for key in adapter_model_keys(model, adapter_name):
        tensor = state[key].detach().to("cpu").contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in storages:  # tied or overlapping tensors: safetensors refuses shared memory
            tensor = tensor.clone()
        storages.add(storage)
        target = file_key(key, adapter_name)
        if target in tensors:
            raise RuntimeError(f"two tensors of adapter {adapter_name!r} map to the same file key {target!r}")
        tensors[target] = tensor
    return tensors


# ---------------------------------------------------------------------------------------------- atomic files
def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms that cannot open a directory (Windows): rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_temporary(path: Path, data: bytes) -> Path:
    """Write ``data`` to a new ``.<name>.<pid>.<random>.lorakit-tmp`` next to ``path``, fsync'ed; return it."""
    temp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{_TEMP_SUFFIX}"
    # O_EXCL: never follow or reuse an existing name; 0o666 & ~umask gives the usual file permissions.
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    return temp


def atomic_write_many(files: list[tuple[Path, bytes]]) -> None:
    """Replace each path by a file holding its data; readers (and a crash) see each file old or new.

    All temporary files are written and fsync'ed first; then they are renamed over their targets in the
    given order (each rename is atomic on POSIX and Windows) back to back, so the moment in which some
    files are new and others old lasts microseconds; finally the directories are fsync'ed so the renames
    are durable.
    """
    temps: list[Path] = []
    try:
        for path, data in files:
            temps.append(_write_temporary(path, data))
        for temp, (path, _) in zip(temps, files, strict=True):
            os.replace(temp, path)
    except BaseException:
        for temp in temps:
            with contextlib.suppress(OSError):
                os.unlink(temp)
        raise
    for directory in dict.fromkeys(path.parent for path, _ in files):
        _fsync_directory(directory)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` by a file holding ``data`` (temporary file, fsync, rename, fsync the directory)."""
    atomic_write_many([(path, data)])


def _remove_stale_temporaries(directory: Path) -> None:
    """Delete temporary files left by writers that were killed (their process no longer exists)."""
    for temp in directory.glob(f".*{_TEMP_SUFFIX}"):
        fields = temp.name.split(".")
        pid = int(fields[-3]) if len(fields) >= 4 and fields[-3].isdigit() else None
        if pid is None or pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                temp.unlink()
        except OSError:  # alive but owned by someone else, or no signal support
            continue


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over (key, dtype, shape, bytes) of every tensor in key order."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _safetensors_payload(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> bytes:
    meta = {"format": "pt", _META_FORMAT_VERSION: str(FORMAT_VERSION)}
    meta.update(metadata or {})
    meta[_META_CHECKSUM] = _tensors_digest(tensors)
    return safetensors_bytes(dict(tensors), metadata=meta)


# ---------------------------------------------------------------------------------------------- raw weights
def save_adapter_weights(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write a raw adapter state dict (file keys → tensors) as a safetensors file, atomically.

    Args:
        tensors: e.g. ``lorakit.io.get_adapter_state_dict(model, "default")``.
        path: the file to write, or a directory (then ``<path>/adapter_model.safetensors``).
        metadata: extra string metadata; ``{"format": "pt"}`` and a data checksum are always added.

    Returns:
        The path written.

    Raises:
        TypeError: a key is not a string or a value is not a tensor.
    """
    bad = [k for k, v in tensors.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f"tensors must map str keys to torch.Tensor values; bad entries: {bad[:5]}")
    target = Path(os.fspath(path))
    if target.is_dir():
        target = target / SAFETENSORS_NAME
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(target, _safetensors_payload(cpu, metadata))
    return target


# Bits per element of every dtype the safetensors format defines.
_SAFETENSORS_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64,
    "I64": 64, "U64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
ADAPTER_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""The dtypes adapter tensors may have (what PEFT and lorakit write)."""
_ADAPTER_SAFETENSORS_DTYPES = ("F16", "BF16", "F32", "F64")
MAX_HEADER_BYTES = 16 << 20
"""Largest safetensors header (and adapter_config.json) lorakit reads; real adapters' are a few hundred KB."""


def _check_safetensors_layout(path: Path, allowed_dtypes: tuple[str, ...] = _ADAPTER_SAFETENSORS_DTYPES) -> None:
    """Refuse a safetensors file whose header does not describe exactly the bytes the file holds.

    Runs before safetensors sees the file, reading only the 8-byte length and the header (at most
    ``MAX_HEADER_BYTES``): every tensor's dtype must be known, its shape non-negative integers, its byte
    range inside the file and exactly ``numel × element size`` long, and the ranges must tile the data
    without gaps or overlaps. So a header that declares a 1 TB tensor in a small file is refused here,
    before anything is mapped or allocated. Only ``allowed_dtypes`` are accepted (adapters: floating point).

    Raises:
        ValueError: the message names the file and the first inconsistency found.
    """

    def refuse(problem: str) -> ValueError:
        return ValueError(f"{path} is not a readable safetensors file ({problem}); it is truncated or corrupt — "
                          "re-save or re-download the adapter.")

    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise refuse(f"it has {size} bytes, fewer than the 8-byte header length")
        header_size = int.from_bytes(prefix, "little")
        if header_size > size - 8:
            raise refuse(f"its header length says {header_size} bytes but only {size - 8} bytes follow")
        if header_size > MAX_HEADER_BYTES:
            raise refuse(f"its header is {header_size} bytes, more than the {MAX_HEADER_BYTES} lorakit reads")
        raw = handle.read(header_size)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise refuse(f"its header is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise refuse(f"its header is a JSON {type(header).__name__}, not an object")
    data_size = size - 8 - header_size
    spans: list[tuple[int, int, str]] = []
    for key, entry in header.items():
        if key == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise refuse("its __metadata__ is not an object of strings")
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise refuse(f"the entry of tensor {key!r} is not {{dtype, shape, data_offsets}}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _SAFETENSORS_DTYPE_BITS:
            raise refuse(f"tensor {key!r} has unknown dtype {dtype!r}")
        if dtype not in allowed_dtypes:
            raise ValueError(f"{path}: tensor {key!r} has dtype {dtype}, but adapter tensors are floating point "
                             f"({', '.join(allowed_dtypes)}); re-save the adapter with floating-point weights.")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise refuse(f"tensor {key!r} has shape {shape!r}, not a list of non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets) \
                or offsets[0] > offsets[1]:
            raise refuse(f"tensor {key!r} has data_offsets {offsets!r}, not [begin, end] with 0 ≤ begin ≤ end")
        begin, end = offsets
        if end > data_size:
            raise refuse(f"tensor {key!r} claims bytes {begin}..{end} of the data, but the file holds only "
                         f"{data_size} bytes of data")
        bits = _SAFETENSORS_DTYPE_BITS[dtype]
        numel = 0 if 0 in shape else 1
        for dim in shape if numel else ():
            numel *= dim
            if numel * bits > 8 * data_size:  # stop early: the declared size already exceeds the file
                break
        if numel * bits != 8 * (end - begin):
            shown = "more than the whole file" if numel * bits > 8 * data_size else f"{numel * bits / 8:g} bytes"
            raise refuse(f"tensor {key!r} is declared {dtype} of shape {shape} ({shown}) but its data takes "
                         f"{end - begin} bytes")
        spans.append((begin, end, key))
    position = 0
    for begin, end, key in sorted(spans):
        if begin != position:
            raise refuse(f"the tensors' data ranges leave a gap or overlap at byte {position} (tensor {key!r})")
        position = end
    if position != data_size:
        raise refuse(f"the tensors describe {position} bytes of data but the file holds {data_size}")


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    _check_safetensors_layout(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, ValueError) as exc:
        raise ValueError(
            f"{path} is not a readable safetensors file ({exc}); it is truncated or corrupt — re-save or "
            "re-download the adapter."
        ) from None
    version = metadata.get(_META_FORMAT_VERSION)
    if version is not None and (not version.isdigit() or int(version) > FORMAT_VERSION):
        raise ValueError(
            f"{path} was written with lorakit format version {version!r}, newer than this lorakit reads "
            f"({FORMAT_VERSION}); upgrade lorakit."
        )
    stored = metadata.get(_META_CHECKSUM)
    if stored is not None and stored != _tensors_digest(tensors):
        raise ValueError(
            f"{path} is corrupt: its tensor data does not match the checksum stored when it was written; "
            "re-save or re-download the adapter."
        )
    return tensors, metadata


def _read_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        with warnings.catch_warnings():  # torch warns about a foreign file's pickle protocol: noise here
            warnings.simplefilter("ignore", UserWarning)
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types; all mean "not a usable file"
        raise ValueError(
            f"{path} could not be read as a weights-only PyTorch file ({type(exc).__name__}: {exc}); it is "
            "corrupt or holds more than tensors, which lorakit will not unpickle."
        ) from None
    if not isinstance(loaded, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise ValueError(f"{path} does not hold a dict of str → tensor, so it is not an adapter state dict.")
    return loaded


def _checked_file(root: Path, path: Path) -> Path:
    """``path`` (inside ``root``) if it is safe to read: not a link leading outside ``root``, not a device."""
    if path.is_symlink():
        resolved = path.resolve()
        if not resolved.is_relative_to(root.resolve()):
            raise ValueError(
                f"{path} is a symbolic link to {resolved}, outside the adapter directory {root}; lorakit does "
                "not follow links out of an adapter directory — copy the file in instead."
            )
    if path.exists() and not path.is_file():
        raise ValueError(f"{path} is not a regular file; an adapter directory holds plain files.")
    return path


def _weights_path(root: Path, use_safetensors: bool) -> Path:
    safetensors_path = _checked_file(root, root / SAFETENSORS_NAME)
    bin_path = _checked_file(root, root / BIN_NAME)
    if safetensors_path.exists():
        return safetensors_path
    if bin_path.exists():
        if use_safetensors:  # PEFT's fallback: no safetensors file, so the legacy file is read (weights only)
            warnings.warn(
                f"{root} has no {SAFETENSORS_NAME}; reading the legacy {BIN_NAME} with "
                "torch.load(weights_only=True) (no code runs). Re-save with safe_serialization=True to convert it.",
                LorakitWarning,
                stacklevel=5,
            )
        return bin_path
    raise FileNotFoundError(f"{safetensors_path} not found: the adapter's weights are missing from {root}.")


def load_adapter_weights(
    path: str | os.PathLike[str], use_safetensors: bool = True
) -> dict[str, torch.Tensor]:
    """Read a raw adapter state dict (file keys → CPU tensors) without running any code.

    Args:
        path: an adapter directory or a weights file (``.safetensors``, or ``.bin`` if allowed).
        use_safetensors: if False, a ``.bin`` file path is accepted and a directory's legacy
            ``adapter_model.bin`` is read without a warning; either way a .bin is read with
            ``torch.load(weights_only=True)``.

    Raises:
        FileNotFoundError: nothing to read at ``path``.
        ValueError: the file is truncated, corrupt, or (for .bin) not a plain dict of tensors.
    """
    target = Path(os.fspath(path))
    if not target.exists():
        raise FileNotFoundError(f"{target} does not exist; pass an adapter directory or its weights file.")
    if target.is_dir():
        target = _weights_path(target, use_safetensors)
    elif target.suffix == ".bin" and use_safetensors:
        raise ValueError(f"{target} is a pickle-based .bin file; pass use_safetensors=False to read it "
                         "with torch.load(weights_only=True).")
    if target.suffix == ".bin":
        return _read_bin(target)
    return _read_safetensors(target)[0]


# ---------------------------------------------------------------------------------------------- save
@dataclass
class _Payload:
    directory: Path
    weights_name: str
    weights: bytes
    config_text: str
    tensors: dict[str, torch.Tensor]
    previous_config: bytes | None


def adapter_fingerprint(model: PeftModel, adapter_name: str) -> BaseFingerprint:
    """Fingerprint of the (unmerged) base weights under the modules adapter ``adapter_name`` adapts."""
    return fingerprint_weights(
        (name, _unmerged_weight(module))
        for name, module in model.base_model.model.named_modules()
        if isinstance(module, LoraLayer) and adapter_name in module.r
    )


def adapter_config_dict(model: PeftModel, adapter_name: str) -> dict[str, Any]:
    """adapter_config.json content, with PEFT 0.21's full key set."""
    from . import __version__

    config = model.peft_config[adapter_name]
    data = config.to_dict()
    for key, value in _PEFT_ONLY_KEYS.items():
        data.setdefault(key, value)
    data["inference_mode"] = True
    data["peft_version"] = f"{PEFT_FORMAT_VERSION}@lorakit-{__version__}"
    layers = [m for m in adapter_layers(model.base_model.model) if isinstance(m, LoraLayer) and adapter_name in m.r]
    if any(isinstance(m, GPT2Conv1D) for m in layers):
        data["fan_in_fan_out"] = True  # what PEFT writes for GPT-2 Conv1D targets (it matters when merging)
    if config.task_type is None:  # as PEFT: lets AutoPeftModel find the base class
        base = model.get_base_model()
        data["auto_mapping"] = {"base_model_class": type(base).__name__, "parent_library": type(base).__module__}
    return data


def _adapter_directory(root: Path, adapter_name: str) -> Path:
    validate_adapter_name(adapter_name)
    if adapter_name == "default":
        return root
    directory = root / adapter_name
    if directory.is_symlink():
        raise ValueError(
            f"{directory} is a symbolic link; lorakit does not write adapter {adapter_name!r} through it (it "
            f"could lead outside {root}). Remove the link or choose another save_directory."
        )
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} exists and is not a directory; cannot save adapter {adapter_name!r} there.")
    return directory


def _payload(model: PeftModel, adapter_name: str, directory: Path, safe_serialization: bool) -> _Payload:
    from . import __version__

    tensors = get_adapter_state_dict(model, adapter_name)
    config_text = json.dumps(adapter_config_dict(model, adapter_name), indent=2, sort_keys=True)
    config_path = directory / CONFIG_NAME
    previous = config_path.read_bytes() if config_path.is_file() and not config_path.is_symlink() else None
    if safe_serialization:
        # The config these weights belong to, and (the hash of) the config file they are about to replace:
        # on load, finding that old file next to these weights means the save stopped between its renames.
        metadata = {_META_VERSION: __version__, _META_CONFIG: config_text,
                    _META_REPLACES: _sha256(previous) if previous is not None else ""}
        metadata.update(adapter_fingerprint(model, adapter_name).to_metadata())
        weights = _safetensors_payload(tensors, metadata)
        return _Payload(directory, SAFETENSORS_NAME, weights, config_text, tensors, previous)
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    return _Payload(directory, BIN_NAME, buffer.getvalue(), config_text, tensors, previous)


def _verify(payload: _Payload) -> None:
    weights_path = payload.directory / payload.weights_name
    config_path = payload.directory / CONFIG_NAME
    try:
        written = _read_bin(weights_path) if weights_path.suffix == ".bin" else _read_safetensors(weights_path)[0]
    except ValueError as exc:  # e.g. the checksum does not match: the bytes on disk are not the ones written
        raise OSError(f"verification failed: {exc}") from None
    differ = sorted(set(written) ^ set(payload.tensors)) or [
        k for k in payload.tensors
        if written[k].dtype != payload.tensors[k].dtype or not torch.equal(written[k], payload.tensors[k])
    ]
    if differ:
        raise OSError(f"verification failed: {weights_path} does not hold what was written (keys {differ[:5]}).")
    if config_path.read_text(encoding="utf-8") != payload.config_text:
        raise OSError(f"verification failed: {config_path} does not hold what was written.")


def save_pretrained(
    model: PeftModel,
    save_directory: str | os.PathLike[str],
    selected_adapters: list[str] | str | None = None,
    safe_serialization: bool = True,
    verify: bool = True,
) -> None:
    """Write adapters in PEFT's format (see the module docstring); see ``PeftModel.save_pretrained``."""
    if isinstance(selected_adapters, bool):
        raise TypeError("selected_adapters must be a list of adapter names; pass safe_serialization=… by keyword "
                        "(PEFT's positional order differs).")
    names = list(model.peft_config) if selected_adapters is None else (
        [selected_adapters] if isinstance(selected_adapters, str) else list(selected_adapters)
    )
    unknown = [n for n in names if n not in model.peft_config]
    if unknown:
        raise ValueError(f"selected_adapters {unknown} are not adapters of this model; it has {sorted(model.peft_config)}.")
    root = Path(os.fspath(save_directory))
    if root.exists() and not root.is_dir():
        raise ValueError(f"save_directory {root} exists and is not a directory.")
    # Everything is computed before the first byte is written.
    payloads = [_payload(model, n, _adapter_directory(root, n), safe_serialization) for n in names]
    for payload in payloads:
        payload.directory.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(payload.directory)
        # Weights first: if a crash falls between the two renames, the loader recognises the state. An
        # unchanged config (re-saving a checkpoint) is not rewritten: then the save is one atomic rename.
        files = [(payload.directory / payload.weights_name, payload.weights)]
        config_bytes = payload.config_text.encode("utf-8")
        if payload.previous_config != config_bytes:
            files.append((payload.directory / CONFIG_NAME, config_bytes))
        atomic_write_many(files)
        other = payload.directory / (BIN_NAME if payload.weights_name == SAFETENSORS_NAME else SAFETENSORS_NAME)
        if other.exists() and not other.is_symlink():
            other.unlink()  # a stale file of the other format would shadow (or be shadowed by) the new one
            _fsync_directory(payload.directory)
        if verify:
            _verify(payload)


# ---------------------------------------------------------------------------------------------- read
@dataclass
class AdapterFiles:
    """What an adapter directory holds, read and parsed but not yet matched against a model."""

    directory: Path
    config_path: Path
    weights_path: Path
    config: LoraConfig
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]


def _parse_json(text: str, source: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}).") from None
    except RecursionError:
        raise ValueError(f"{source} nests JSON arrays/objects too deeply to be an adapter config; re-save or "
                         "re-download the adapter.") from None
    if not isinstance(data, dict):
        raise ValueError(f"{source} must hold a JSON object, not {type(data).__name__}.")
    return data


def _choose_config(text: str, metadata: dict[str, str], config_path: Path, weights_path: Path) -> str:
    """The config text that belongs to the weights.

    adapter_config.json, except in the one state an interrupted save leaves behind: the weights already
    replaced, the config not yet — recognised because the file still holds exactly the config that the
    weights' save was replacing. Then the config stored with the weights is used (with a warning). A config
    edited by hand after a save is honoured as it is.
    """
    embedded = metadata.get(_META_CONFIG)
    file_hash = _sha256(text.encode("utf-8"))
    if embedded is None or file_hash == _sha256(embedded.encode("utf-8")) or file_hash != metadata.get(_META_REPLACES):
        return text
    warnings.warn(
        f"{config_path} is the config of the save before the one that wrote {weights_path.name} (that save was "
        "interrupted between writing the weights and the config); using the config saved with the weights.",
        LorakitWarning,
        stacklevel=4,
    )
    return embedded


def _config_from_dict(data: dict[str, Any], source: Path) -> LoraConfig:
    data = dict(data)
    notes: list[str] = []
    init = data.get("init_lora_weights", True)
    if init not in (True, False, "gaussian", "pissa", "olora"):
        # Other PEFT initialisations (corda, eva, loftq, pissa_niter_N …) only matter before training.
        data["init_lora_weights"] = "pissa" if isinstance(init, str) and init.startswith("pissa") else True
        notes.append(f"init_lora_weights={init!r}")
    try:
        config, ignored = LoraConfig.from_dict(data)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{source}: {exc}") from None
    if ignored or notes:
        warnings.warn(
            f"{source}: ignoring config entries lorakit does not use: {', '.join(notes + ignored)}.",
            LorakitWarning,
            stacklevel=4,
        )
    return config


def read_adapter(model_id: str | os.PathLike[str], use_safetensors: bool = True) -> AdapterFiles:
    """Read and parse an adapter directory, with one clear error per problem; touches no model.

    Raises:
        FileNotFoundError: the directory, its config or its weights do not exist.
        ValueError: malformed JSON, an unusable config, a truncated/corrupt weights file, unsafe links.
    """
    root = Path(os.fspath(model_id))
    if not root.exists():
        raise FileNotFoundError(
            f"adapter directory {root} does not exist; pass the directory save_pretrained wrote "
            f"(it holds {CONFIG_NAME} and {SAFETENSORS_NAME})."
        )
    if not root.is_dir():
        raise ValueError(f"{root} is a file; pass the adapter directory that holds {CONFIG_NAME} ({root.parent}?).")
    config_path = _checked_file(root, root / CONFIG_NAME)
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} not found: {root} is not an adapter directory (no {CONFIG_NAME}).")
    if config_path.stat().st_size > MAX_HEADER_BYTES:
        raise ValueError(f"{config_path} is {config_path.stat().st_size} bytes, far larger than an adapter config "
                         f"(lorakit reads at most {MAX_HEADER_BYTES}); it is not an adapter_config.json.")
    try:
        text = config_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{config_path} is not UTF-8 text ({exc.reason}); re-save it as UTF-8 JSON.") from None
    from_file = _parse_json(text, str(config_path))
    weights_path = _weights_path(root, use_safetensors)
    metadata: dict[str, str] = {}
    if weights_path.suffix == ".bin":
        tensors = _read_bin(weights_path)
    else:
        tensors, metadata = _read_safetensors(weights_path)
    chosen = _choose_config(text, metadata, config_path, weights_path)
    config_dict = from_file if chosen is text else _parse_json(chosen, f"the config stored in {weights_path}")
    return AdapterFiles(root, config_path, weights_path, _config_from_dict(config_dict, config_path), tensors,
                        metadata)


# ---------------------------------------------------------------------------------------------- match
@dataclass
class _Expected:
    shape: tuple[int, ...]
    required: bool
    blocked: str | None = None  # why this tensor may not be written now (e.g. its weight is merged)


@dataclass
class LoadPlan:
    """Validated result of matching adapter files against a model: what to inject and what to copy."""

    config: LoraConfig
    """The adapter's config as saved (kept in ``peft_config``, written back on save)."""
    inject_config: LoraConfig
    """The same with ``init_lora_weights=True`` (loading must not run PiSSA/OLoRA, which rewrite W0) and
    ``fan_in_fan_out=None`` (detected per layer)."""
    assignments: dict[str, torch.Tensor]
    """``PeftModel.state_dict`` key → tensor to copy into it."""


def _base_of(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, LoraLayer) else module


def _unmerged_weight(module: nn.Module) -> torch.Tensor:
    fingerprint_weight = getattr(_base_of(module), "fingerprint_weight", None)
    if fingerprint_weight is not None:  # a quantized base: the values it was quantized from (lorakit.quant)
        return fingerprint_weight()
    if isinstance(module, LoraLayer):
        return module.unmerged_weight()
    weight = module.weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(module).__name__}.weight is not a tensor")
    return weight


def _direct_parameter(module: nn.Module, name: str) -> torch.Tensor | None:
    return dict(module.named_parameters(recurse=False)).get(name)


def _factor_shapes(plan: TargetPlan, adapter_name: str, use_dora: bool = False) -> dict[str, tuple[int, ...]]:
    """State-dict keys and shapes the LoRA layer for ``plan`` will have, from a probe on the meta device
    (nothing is allocated and the model is not touched)."""
    base = _base_of(plan.module)
    kind = layer_class_for(base)
    if kind is None:  # plan_injection already refuses these
        raise ValueError(f"module {plan.name!r} ({type(base).__name__}) cannot be adapted")
    probe = kind(base)
    with torch.device("meta"):
        probe._create_factors(adapter_name, plan.r)
        if use_dora:
            dora.create_magnitude(probe, adapter_name)
    return {
        f"{PREFIX}{plan.name}.{key}": tuple(value.shape)
        for key, value in probe.state_dict(keep_vars=True).items()
        if not key.startswith("base_layer.")
    }


def _post_injection_key(key: str, wrapped: set[str], saved: set[str]) -> str:
    """A key of the user's model as it will read once the new LoRA layers / saved-module wrappers exist."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        owner = ".".join(parts[:i])
        rest = ".".join(parts[i:])
        if owner in wrapped:
            return f"{owner}.base_layer.{rest}"
        if owner in saved:
            return f"{owner}.original_module.{rest}"
    return key


def _embedding_module_names(model: nn.Module) -> list[str]:
    """Names of the input/output embedding modules of a transformers model (PEFT may save their weights)."""
    wanted: list[nn.Module] = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        method = getattr(model, getter, None)
        with contextlib.suppress(NotImplementedError, AttributeError, TypeError):
            module = method() if callable(method) else None
            if isinstance(module, nn.Module):
                wanted.append(module)
    return [n for n, m in iter_base_modules(model) if n and any(_base_of(m) is w or m is w for w in wanted)]


def _expected_tensors(model: nn.Module, targets: list[TargetPlan], saves: list[tuple[str, nn.Module]],
                      adapter_name: str, bias: str, use_dora: bool = False) -> dict[str, _Expected]:
    """Every ``PeftModel.state_dict`` key the adapter's file may fill, once injected, with its shape."""
    expected: dict[str, _Expected] = {}
    target_names = {p.name for p in targets}
    wrapped = {p.name for p in targets if not isinstance(p.module, LoraLayer)}
    saved = {n for n, m in saves if not isinstance(m, ModulesToSaveWrapper)}
    for plan in targets:
        for key, shape in _factor_shapes(plan, adapter_name, use_dora).items():
            expected[key] = _Expected(shape, True)
        base = _base_of(plan.module)
        bias_param = _direct_parameter(base, "bias")
        if bias == "lora_only" and bias_param is not None:
            expected[f"{PREFIX}{plan.name}.base_layer.bias"] = _Expected(tuple(bias_param.shape), True)
        if isinstance(base, nn.Embedding):
            # PEFT saves a targeted embedding's full base weight (save_embedding_layers); accept, not require.
            merged = isinstance(plan.module, LoraLayer) and plan.module.merged_adapters
            expected[f"{PREFIX}{plan.name}.base_layer.weight"] = _Expected(
                tuple(base.weight.shape), False, "its layer has merged adapters" if merged else None
            )
    for name, module in saves:
        original = module.original_module if isinstance(module, ModulesToSaveWrapper) else module
        for key, value in original.state_dict(keep_vars=True).items():
            expected[f"{PREFIX}{name}.modules_to_save.{adapter_name}.{key}"] = _Expected(tuple(value.shape), True)
    if bias == "all":
        for key, value in model.state_dict(keep_vars=True).items():
            if _is_base_bias(key):
                post = _post_injection_key(key, wrapped, saved)
                expected.setdefault(PREFIX + post, _Expected(tuple(value.shape), ".original_module." not in post))
    for name in _embedding_module_names(model):
        if name in target_names:
            continue
        weight = _direct_parameter(_base_of(model.get_submodule(name)), "weight")
        if weight is not None:  # PEFT saves resized embeddings under their plain names
            key = PREFIX + _post_injection_key(f"{name}.weight", wrapped, saved)
            expected.setdefault(key, _Expected(tuple(weight.shape), False))
    return expected


def _normalise_file_keys(tensors: dict[str, torch.Tensor], bias: str,
                         expected_file: dict[str, tuple[str, _Expected]]) -> dict[str, torch.Tensor]:
    """Accept the key variants other PEFT versions and integrations write."""
    if tensors and not any(k.startswith(PREFIX) for k in tensors):
        tensors = {PREFIX + k: v for k, v in tensors.items()}  # written without the PeftModel prefix
    tensors = dict(tensors)
    if bias == "all":  # PEFT's bias="all" also writes `<module>.modules_to_save.bias`, a duplicate
        for key in [k for k in tensors if k.endswith(".modules_to_save.bias")]:
            del tensors[key]
    for key, (_, exp) in expected_file.items():
        legacy = key.replace(".base_layer.", ".")  # PEFT < 0.7 had no base_layer in bias keys
        if exp.required and key not in tensors and ".base_layer." in key and legacy in tensors:
            tensors[key] = tensors.pop(legacy)
    return tensors


def _format_keys(keys: Iterable[str]) -> str:
    return ", ".join(keys)


def plan_load(model: nn.Module, files: AdapterFiles, adapter_name: str, is_trainable: bool = False,
              allow_base_mismatch: bool = False) -> LoadPlan:
    """Match ``files`` against ``model`` (the user's model, possibly already holding other adapters).

    Checks, in order: the config's targets exist, the base fingerprint (unless ``allow_base_mismatch``),
    then every tensor key and shape — reporting every missing, unexpected and mis-shaped key at once.
    Nothing is changed.
    """
    config = dataclasses.replace(files.config, inference_mode=not is_trainable)
    # fan_in_fan_out=None: lorakit detects each weight's orientation itself (the file's value stays in config).
    # modules_to_save: PEFT lists both "classifier" and "score" for SEQ_CLS whichever exists; an entry that
    # names no module is skipped here (had the file tensors for it, they show up as unexpected keys below).
    module_names = [n for n, _ in iter_base_modules(model) if n]
    present = [e for e in config.modules_to_save or [] if any(n == e or n.endswith("." + e) for n in module_names)]
    inject_config = dataclasses.replace(config, init_lora_weights=True, fan_in_fan_out=None,
                                        modules_to_save=present or None)
    try:
        targets = plan_injection(model, inject_config, adapter_name, check_pattern_keys=False)
        saves = plan_modules_to_save(model, inject_config)
    except ValueError as exc:
        raise ValueError(f"{files.config_path} does not fit this model: {exc} Is this the base model the "
                         "adapter was trained on?") from None
    inject_config, dropped = drop_unmatched_pattern_keys(inject_config, targets)
    if dropped:  # PEFT ignores such keys when it loads; a config written through LoraConfig still refuses them
        config = dataclasses.replace(config, rank_pattern=inject_config.rank_pattern,
                                     alpha_pattern=inject_config.alpha_pattern)
        warnings.warn(f"{files.config_path}: ignoring {', '.join(dropped)}: no targeted module matches "
                      f"{'it' if len(dropped) == 1 else 'them'} (PEFT ignores such keys too).",
                      LorakitWarning, stacklevel=4)
    stored = BaseFingerprint.from_metadata(files.metadata, str(files.weights_path))
    if stored is not None and not allow_base_mismatch:
        current = fingerprint_weights((p.name, _unmerged_weight(p.module)) for p in targets)
        if not stored.matches(current):
            raise ValueError(
                f"{files.weights_path} was saved for a different base model: base fingerprint {stored} in the "
                f"file, {current} for this model ({stored.mismatch_reason(current)}). Load it into the base it "
                "was trained on, or pass allow_base_mismatch=True to load it anyway."
            )
    expected = _expected_tensors(model, targets, saves, adapter_name, config.bias, config.use_dora)
    expected_file = {file_key(k, adapter_name): (k, e) for k, e in expected.items()}
    tensors = _normalise_file_keys(files.tensors, config.bias, expected_file)
    missing = sorted(k for k, (_, e) in expected_file.items() if e.required and k not in tensors)
    unexpected = sorted(k for k in tensors if k not in expected_file)
    mismatched = [
        f"{k}: {tuple(t.shape)} in the file, {expected_file[k][1].shape} in the model"
        for k, t in sorted(tensors.items()) if k in expected_file and tuple(t.shape) != expected_file[k][1].shape
    ]
    not_float = [f"{k} ({t.dtype})" for k, t in sorted(tensors.items()) if t.dtype not in ADAPTER_DTYPES]
    not_finite = [k for k, t in sorted(tensors.items()) if t.dtype in ADAPTER_DTYPES and not bool(torch.isfinite(t).all())]
    blocked = [f"{k} ({expected_file[k][1].blocked})" for k in sorted(tensors)
               if k in expected_file and expected_file[k][1].blocked]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_format_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_format_keys(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {'; '.join(mismatched)}")
    if not_float:
        problems.append(f"tensors that are not float16/bfloat16/float32/float64 ({len(not_float)}): "
                        f"{_format_keys(not_float)}")
    if not_finite:
        problems.append(f"tensors holding NaN or infinity ({len(not_finite)}): {_format_keys(not_finite)}")
    if blocked:
        problems.append(f"base tensors that cannot be written now, unmerge first: {_format_keys(blocked)}")
    if problems:
        raise ValueError(
            f"{files.weights_path} does not match the adapter that {files.config_path.name} describes on this "
            "model — " + "; ".join(problems) + ". Check that the weights, the config and the base model belong "
            "together."
        )
    assignments = {expected_file[k][0]: t for k, t in tensors.items()}
    return LoadPlan(config, inject_config, assignments)


def _copy_into(model: PeftModel, plan: LoadPlan) -> None:
    state = model.state_dict(keep_vars=True)
    absent = [k for k in plan.assignments if k not in state]
    if absent:  # plan_load and injection disagree: a lorakit bug, not a user error
        raise RuntimeError(f"lorakit bug: injected adapter lacks keys {absent[:5]}")
    with torch.no_grad():
        for key, tensor in plan.assignments.items():
            state[key].copy_(tensor)


# ---------------------------------------------------------------------------------------------- load
def _on_device(files: AdapterFiles, device: torch.device | None) -> AdapterFiles:
    """``files`` with its tensors moved to ``device`` (PEFT's ``torch_device``); unchanged for None."""
    if device is None:
        return files
    return dataclasses.replace(files, tensors={k: v.to(device) for k, v in files.tensors.items()})


PeftModelT = TypeVar("PeftModelT", bound="PeftModel")


def from_pretrained(cls: type[PeftModelT], model: nn.Module, model_id: str | os.PathLike[str],
                    adapter_name: str = "default", is_trainable: bool = False, allow_base_mismatch: bool = False,
                    use_safetensors: bool = True, config: LoraConfig | None = None,
                    torch_device: torch.device | None = None) -> PeftModelT:
    """See ``PeftModel.from_pretrained``; ``config`` replaces the directory's adapter_config.json, and the
    file's tensors are read onto ``torch_device`` (default: the CPU)."""
    validate_adapter_name(adapter_name)
    if isinstance(model, cls) or any(True for _ in adapter_layers(model)):
        raise ValueError("the model already holds LoRA adapters; call load_adapter(model_id, adapter_name) on "
                         "its PeftModel instead.")
    if config is not None and not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a lorakit LoraConfig, got {type(config).__name__}.")
    files = _on_device(read_adapter(model_id, use_safetensors), torch_device)
    if config is not None:
        files = dataclasses.replace(files, config=config)
    plan = plan_load(model, files, adapter_name, is_trainable, allow_base_mismatch)
    peft = cls(model, plan.inject_config, adapter_name)
    try:
        peft.peft_config[adapter_name] = plan.config
        _copy_into(peft, plan)
    except BaseException:
        peft.unload()
        raise
    return peft


def load_adapter(model: PeftModel, model_id: str | os.PathLike[str], adapter_name: str,
                 is_trainable: bool = False, allow_base_mismatch: bool = False, use_safetensors: bool = True,
                 torch_device: torch.device | None = None) -> None:
    """See ``PeftModel.load_adapter``."""
    validate_adapter_name(adapter_name)
    if adapter_name in model.peft_config:
        raise ValueError(f"an adapter named {adapter_name!r} already exists; load under another name or "
                         "delete_adapter() it first.")
    files = _on_device(read_adapter(model_id, use_safetensors), torch_device)
    plan = plan_load(model.base_model.model, files, adapter_name, is_trainable, allow_base_mismatch)
    model.add_adapter(adapter_name, plan.inject_config)
    try:
        model.peft_config[adapter_name] = plan.config
        _copy_into(model, plan)
    except BaseException:
        model.delete_adapter(adapter_name)
        raise
