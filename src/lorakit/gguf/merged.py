"""Base + adapter merged into one GGUF model file that llama.cpp (and ollama, LM Studio) runs as is.

A full GGUF model needs more than weights: llama.cpp's hyperparameter keys and the tokenizer (vocabulary,
merges, token types, pre-tokenizer, chat template). lorakit does not re-derive those from a Hugging Face
directory (that is ``convert_hf_to_gguf.py``'s job, with its table of known pre-tokenizers); it takes them
from a GGUF of the same base — for the embedded SmolLM2 the original Q4_1 file it was built from — and
replaces every weight by the merged one, W′ = W0 + s·B·A (``PeftModel.merge_and_unload``):

- each KV pair of the base file is copied with its type, except ``general.file_type`` (the new outtype)
  and ``general.quantization_version`` (re-added);
- each tensor of the base file is replaced by the merged model's weight of the same llama.cpp name
  (names and Llama's q/k row order from ``architectures``), stored at the outtype by ``storage.encode``
  (norms stay F32); a tensor with no Hugging Face counterpart (e.g. ``rope_freqs``) is copied unchanged.

Before anything is written the base file is checked against ``--model``: same architecture, every tensor's
shape, and the token embedding's values (the dequantized GGUF equals the Hugging Face weights it was
converted to, within 1e-4 of the largest value), so a GGUF of another model is refused.

Output types: f32 and f16 (what llama.cpp's converters write by default), bf16, and q8_0 — quantized by
the ``gguf`` package (ggml-org's maintained Python quantizer, the one convert_hf_to_gguf.py uses).
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import torch
from torch import nn

from .architectures import BaseLayout, read_base_layout
from .storage import FILE_TYPES, decode, encode, export_paths, write_atomically

_SKIPPED_KEYS = (gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.FILE_TYPE, gguf.Keys.General.QUANTIZATION_VERSION)
_VALUE_TOLERANCE = 1e-4


def _hf_names_by_tensor(layout: BaseLayout, model: nn.Module) -> dict[str, str]:
    """llama.cpp tensor name → the merged model's state-dict key."""
    found: dict[str, str] = {}
    for key in model.state_dict():
        tensor = layout.name_map.get_name(key, try_suffixes=(".weight", ".bias"))
        if tensor is not None:
            found.setdefault(tensor, key)
    return found


def _open_base(path: Path, layout: BaseLayout) -> gguf.GGUFReader:
    if not path.is_file():
        raise FileNotFoundError(f"--base-gguf {path} does not exist; pass a GGUF file of the base model.")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as exc:
        raise ValueError(f"--base-gguf {path} is not a readable GGUF file ({type(exc).__name__}: {exc}).") from None
    field = reader.get_field(gguf.Keys.General.TYPE)
    kind = field.contents() if field is not None else "model"
    arch_field = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    arch = arch_field.contents() if arch_field is not None else None
    if kind != "model":
        raise ValueError(f"--base-gguf {path} is a GGUF {kind!r} file, not a model; pass the base model's GGUF.")
    if arch != layout.arch_name:
        raise ValueError(f"--base-gguf {path} is a {arch!r} model but --model is {layout.arch_name!r} "
                         f"({layout.config_path}); pass the GGUF of the same base.")
    return reader


def _check_same_base(reader: gguf.GGUFReader, path: Path, state: dict[str, torch.Tensor],
                     names: dict[str, str], layout: BaseLayout) -> None:
    """Refuse a base GGUF whose tensors do not have --model's shapes (or whose embedding differs)."""
    problems: list[str] = []
    for tensor in reader.tensors:
        key = names.get(tensor.name)
        if key is None:
            continue
        want = tuple(state[key].shape)
        have = tuple(int(d) for d in reversed(tensor.shape))
        if have != want:
            problems.append(f"{tensor.name} {have} vs {key} {want}")
    if problems:
        raise ValueError(f"--base-gguf {path} does not have the shapes of --model {layout.config_path.parent}: "
                         f"{'; '.join(problems[:5])}; pass the GGUF this model was converted from.")
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embedding is not None and "token_embd.weight" in names:
        theirs = decode(embedding)
        ours = state[names["token_embd.weight"]].to(torch.float32)
        difference = float((theirs - ours).abs().max())
        if difference > _VALUE_TOLERANCE * float(ours.abs().max()):
            raise ValueError(f"--base-gguf {path} is not the GGUF of --model {layout.config_path.parent}: their "
                             f"token embeddings differ by up to {difference:.3g}; pass the GGUF this model was "
                             "converted from (the merged file takes the tokenizer and hyperparameters from it).")


def _copy_metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter) -> None:
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in _SKIPPED_KEYS:
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY and len(field.types) > 1 else None
        writer.add_key_value(key, field.contents(), value_type, sub_type=sub_type)


def base_gguf_for(model_dir: Path, base_gguf: str | os.PathLike[str] | None) -> Path:
    """``--base-gguf`` if given; the embedded model's own GGUF for the embedded model; else refuse."""
    from .default_gguf import ensure_default_gguf, is_default_model

    if base_gguf is not None:
        return Path(base_gguf)
    if is_default_model(model_dir):
        return ensure_default_gguf()
    raise ValueError(f"--model {model_dir} is not the embedded SmolLM2, so lorakit has no GGUF of it to take the "
                     "tokenizer and hyperparameters from; pass --base-gguf FILE (a GGUF of the same base), or "
                     "write the merged model with `lorakit merge` and convert it with llama.cpp's "
                     "convert_hf_to_gguf.py.")


def export_merged(adapter_dir: str | os.PathLike[str], model_dir: str | os.PathLike[str],
                  output: str | os.PathLike[str], outtype: str = "f16",
                  base_gguf: str | os.PathLike[str] | None = None, force: bool = False) -> Path:
    """Merge the adapter into its base and write the result as a GGUF model file ``output``.

    Args:
        adapter_dir: a PEFT-format adapter directory.
        model_dir: the Hugging Face directory of its base.
        output: the ``.gguf`` file to write (atomically).
        outtype: f32, f16, bf16 or q8_0 for the merged matrices (norms stay f32).
        base_gguf: a GGUF of the same base (tokenizer, hyperparameters); default: the embedded model's own.
        force: replace ``output`` if it exists.

    Returns:
        The GGUF file the tokenizer and hyperparameters came from.

    Raises:
        ValueError: unknown outtype or architecture, a base GGUF of another model, an adapter that does not
            fit the base. FileExistsError: ``output`` exists and not ``force``.
    """
    from ..commands._adapter_tools import load_base_model
    from ..model import PeftModel

    adapter_path, model_path, output_path = export_paths(adapter_dir, model_dir, output, outtype, force)
    layout = read_base_layout(model_path)
    source = base_gguf_for(model_path, base_gguf)
    reader = _open_base(source, layout)
    base = load_base_model(model_path, "float32")
    names = _hf_names_by_tensor(layout, base)
    _check_same_base(reader, source, base.state_dict(), names, layout)
    merged = PeftModel.from_pretrained(base, adapter_path).merge_and_unload()
    state = merged.state_dict()

    def fill(writer: gguf.GGUFWriter) -> None:
        _copy_metadata(reader, writer)
        writer.add_file_type(FILE_TYPES[outtype])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for tensor in reader.tensors:
            key = names.get(tensor.name)
            if key is None:  # no Hugging Face counterpart (e.g. rope_freqs): keep the base's bytes
                writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
                continue
            weight = layout.to_gguf_rows(key.rsplit(".", 1)[0], state[key].detach())
            data, qtype = encode(tensor.name, weight, outtype)
            writer.add_tensor(tensor.name, data, raw_dtype=qtype)

    write_atomically(output_path, layout.arch_name, fill)
    return source
