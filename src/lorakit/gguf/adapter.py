"""LoRA adapters as llama.cpp's GGUF adapter files, both ways: PEFT directory → ``.gguf`` → PEFT directory.

llama.cpp applies an adapter unmerged, per adapted weight W (REFERENCE.md "llama.cpp LoRA adapters"):

    h = W·x + s·B(A·x),   s = user_scale · α / r_t

with α the file's one ``adapter.lora.alpha`` and r_t the rank of that tensor pair (``lora_b``'s columns).
PEFT's scale is per module: s_m = α_m / r_m (``alpha_pattern``/``rank_pattern``), or α_m / √r_m with rsLoRA.
Export therefore writes B_m·(s_m / (α / r_m)) so that llama.cpp's α/r_t gives ΔW_m = s_m·B_m·A_m exactly as
lorakit does; a plain adapter (one α, no rsLoRA) is written unscaled, bit for bit. Import reads α and each
pair's rank back as ``lora_alpha``/``rank_pattern``, which reproduces llama.cpp's scales.

File layout (what ``convert_lora_to_gguf.py`` writes; the test checks it against that script):

- KV: ``general.architecture`` (the base's, e.g. "llama"), ``general.type = adapter``, ``adapter.type =
  lora``, ``general.name`` (from the adapter directory, by the ``gguf`` package's ``Metadata``),
  ``adapter.lora.alpha`` (float32), ``general.quantization_version``.
- Tensors, in numpy order (GGUF lists dims reversed): ``<base tensor>.lora_a`` = A (r, in) and
  ``.lora_b`` = B (out, r), with Llama's q/k row permutation on B (``architectures``). The token embedding
  is the exception: PEFT's ``lora_embedding_A`` (r, vocab) is written transposed, ``lora_a`` = Aᵀ (vocab, r),
  ``lora_b`` = B (dim, r) (llama.cpp's ``llm_build_inp_embd`` reads it so).

What llama.cpp cannot represent is refused with a message that says to merge instead: DoRA (a
per-row magnitude, not a low-rank sum), trained biases, ``modules_to_save``, LoRA on a tied output head.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import gguf
import torch
from torch import nn

from ..config import LoraConfig, TaskType
from ..layers import Embedding, GPT2Conv1D, Linear, LoraLayer
from .architectures import BaseLayout, read_base_layout
from .storage import decode, encode, export_paths, write_atomically

ADAPTER_NAME = "default"
_MERGE_INSTEAD = ("merge it instead: `lorakit export --merged ADAPTER_DIR --model DIR -o model.gguf` writes the "
                  "merged model as a GGUF llama.cpp runs")


@dataclass(frozen=True)
class AdapterTensor:
    """One LoRA pair as it goes into (or came out of) a GGUF adapter file."""

    module: str
    """Module path in the base model, e.g. ``model.layers.0.self_attn.q_proj``."""
    tensor: str
    """llama.cpp's base tensor name, e.g. ``blk.0.attn_q.weight`` (``.lora_a``/``.lora_b`` appended)."""
    lora_a: torch.Tensor
    lora_b: torch.Tensor


# ---------------------------------------------------------------------------------------------- export
def _refuse_unrepresentable_config(adapter_dir: Path) -> None:
    """DoRA and friends, checked on the raw config before lorakit reads the adapter (so the message is
    about llama.cpp, whatever lorakit itself thinks of the config)."""
    path = adapter_dir / "adapter_config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return  # read_adapter reports these with its own clear errors
    if not isinstance(raw, dict):
        return
    if raw.get("use_dora"):
        raise ValueError(f"{adapter_dir} is a DoRA adapter (use_dora: true); llama.cpp applies only plain LoRA "
                         f"(W + s·B·A), not DoRA's per-row magnitude, so it cannot be a GGUF adapter — {_MERGE_INSTEAD}.")
    if raw.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{adapter_dir} is a {raw.get('peft_type')} adapter; a GGUF adapter holds only LoRA — "
                         f"{_MERGE_INSTEAD}.")


def _refuse_unrepresentable_model(adapter_dir: Path, config: LoraConfig) -> None:
    if config.bias != "none":
        raise ValueError(f"{adapter_dir} trains biases (bias={config.bias!r}); a GGUF adapter holds only the "
                         f"A/B factors — {_MERGE_INSTEAD}.")
    if config.modules_to_save:
        raise ValueError(f"{adapter_dir} saves whole modules ({', '.join(config.modules_to_save)}); a GGUF adapter "
                         f"holds only the A/B factors — {_MERGE_INSTEAD}.")


def _llama_cpp_scale(alpha: float, rank: int) -> float:
    """The scale llama.cpp applies to a pair of rank ``rank`` (``llama_adapter_lora_weight::get_scale``,
    user scale 1): α/r, or 1 when the file has α = 0."""
    return alpha / rank if alpha else 1.0


def adapter_tensors(model: nn.Module, layout: BaseLayout, alpha: float, adapter_dir: Path) -> list[AdapterTensor]:
    """The GGUF pairs of adapter ``default`` in ``model`` (a PeftModel's base), scales folded into B.

    Raises:
        ValueError: an adapted module has no llama.cpp tensor (named, with the fix).
    """
    pairs: list[AdapterTensor] = []
    unmapped: list[str] = []
    for module_name, layer in sorted(model.named_modules(), key=lambda item: item[0]):
        if not isinstance(layer, LoraLayer) or ADAPTER_NAME not in layer.r:
            continue
        if isinstance(layer, GPT2Conv1D) or not isinstance(layer, (Linear, Embedding)):
            unmapped.append(f"{module_name} ({type(layer.base_layer).__name__})")
            continue
        tensor = layout.tensor_name(module_name)
        if tensor is None:
            unmapped.append(module_name)
            continue
        if tensor.startswith("output.") and layout.tied_embeddings:
            raise ValueError(f"{adapter_dir} adapts {module_name}, the output head, which this base ties to the "
                             "token embedding; llama.cpp has no separate output tensor to apply it to — "
                             f"{_MERGE_INSTEAD}.")
        a, b = (factor.detach().to("cpu") for factor in layer.factors(ADAPTER_NAME))
        rank = layer.r[ADAPTER_NAME]
        ratio = layer.scaling[ADAPTER_NAME] / _llama_cpp_scale(alpha, rank)
        if ratio != 1.0:  # rsLoRA / alpha_pattern: fold s_m / (α/r) into B, in float64 then back
            b = (b.to(torch.float64) * ratio).to(b.dtype)
        if isinstance(layer, Embedding):
            lora_a, lora_b = a.T, b  # A (r, vocab) → (vocab, r): how llama.cpp reads token_embd's pair
        else:
            lora_a, lora_b = a, layout.to_gguf_rows(module_name, b)
        pairs.append(AdapterTensor(module_name, tensor, lora_a.contiguous(), lora_b.contiguous()))
    if unmapped:
        raise ValueError(f"{adapter_dir} adapts modules llama.cpp has no tensor for in a {layout.arch_name} model: "
                         f"{', '.join(unmapped)}; train the adapter on attention/MLP projections or embeddings, "
                         f"or {_MERGE_INSTEAD}.")
    if not pairs:
        raise ValueError(f"{adapter_dir} adapts no module of the base; nothing to export.")
    return pairs


def _add_adapter_metadata(writer: gguf.GGUFWriter, adapter_dir: Path, model_dir: Path, alpha: float) -> None:
    """KV pairs in the order and with the values ``convert_lora_to_gguf.py`` writes (after the tensors:
    the name heuristics need the parameter count)."""
    total, shared, expert, experts = writer.get_total_parameter_count()
    metadata = gguf.Metadata.load(None, adapter_dir, None, total)
    if metadata.name is None:
        metadata.name = model_dir.name
    if metadata.size_label is None and total > 0:
        metadata.size_label = gguf.size_label(total, shared, expert, experts)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    metadata.set_gguf_meta_model(writer)
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def export_adapter(adapter_dir: str | os.PathLike[str], model_dir: str | os.PathLike[str],
                   output: str | os.PathLike[str], outtype: str = "f32", force: bool = False) -> list[AdapterTensor]:
    """Write the PEFT adapter in ``adapter_dir`` as llama.cpp's GGUF LoRA adapter ``output``.

    Args:
        adapter_dir: a PEFT-format adapter directory (adapter_config.json + adapter_model.safetensors).
        model_dir: the Hugging Face directory of its base (config.json for the layout, the weights for the
            fingerprint check).
        output: the ``.gguf`` file to write (atomically: temporary file, fsync, rename).
        outtype: ``f32`` (exact), ``f16``, ``bf16`` or ``q8_0`` (pairs whose rows do not split into 32-value
            blocks fall back to f16, as in llama.cpp's converter).
        force: replace ``output`` if it exists.

    Returns:
        The pairs written (in file order), before storage rounding.

    Raises:
        ValueError: unknown outtype; unsupported base architecture; DoRA or other state llama.cpp cannot
            apply; adapter saved for a different base (fingerprint); adapted modules llama.cpp lacks.
        FileExistsError: ``output`` exists and not ``force``.
        FileNotFoundError: a directory or file is missing.
    """
    from ..commands._adapter_tools import load_base_model
    from ..model import PeftModel

    adapter_path, model_path, output_path = export_paths(adapter_dir, model_dir, output, outtype, force)
    layout = read_base_layout(model_path)
    _refuse_unrepresentable_config(adapter_path)
    base = load_base_model(model_path, "float32")
    peft = PeftModel.from_pretrained(base, adapter_path)  # validates keys/shapes and the base fingerprint
    config = peft.peft_config[ADAPTER_NAME]
    _refuse_unrepresentable_model(adapter_path, config)
    alpha = float(config.lora_alpha)
    pairs = adapter_tensors(peft.get_base_model(), layout, alpha, adapter_path)

    def fill(writer: gguf.GGUFWriter) -> None:
        for pair in pairs:
            for suffix, value in (("lora_a", pair.lora_a), ("lora_b", pair.lora_b)):
                name = f"{pair.tensor}.{suffix}"
                data, qtype = encode(name, value, outtype)
                writer.add_tensor(name, data, raw_dtype=qtype)
        _add_adapter_metadata(writer, adapter_path, model_path, alpha)

    write_atomically(output_path, layout.arch_name, fill)
    return pairs


# ---------------------------------------------------------------------------------------------- import
def _field_value(reader: gguf.GGUFReader, key: str) -> object:
    field = reader.get_field(key)
    return None if field is None else field.contents()


def _open_adapter(path: Path) -> gguf.GGUFReader:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass a GGUF LoRA adapter file (.gguf).")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as exc:
        raise ValueError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc}).") from None
    kind, adapter_type = _field_value(reader, gguf.Keys.General.TYPE), _field_value(reader, gguf.Keys.Adapter.TYPE)
    if kind != gguf.GGUFType.ADAPTER or adapter_type != "lora":
        raise ValueError(f"{path} is not a GGUF LoRA adapter (general.type={kind!r}, adapter.type={adapter_type!r}; "
                         "expected 'adapter' and 'lora'); a full model GGUF cannot be imported as an adapter.")
    return reader


def _target_modules(modules: list[str], candidates: list[str]) -> list[str]:
    """Short target names where they select exactly the adapted modules (``q_proj`` when every q_proj is
    adapted), full module names otherwise (PEFT matches both: equal, or a dotted suffix)."""
    targets: list[str] = []
    by_suffix: dict[str, list[str]] = {}
    for name in modules:
        by_suffix.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    for suffix, names in by_suffix.items():
        selected = {c for c in candidates if c == suffix or c.endswith("." + suffix)}
        targets.extend([suffix] if selected == set(names) else names)
    return targets


def read_adapter_pairs(reader: gguf.GGUFReader, path: Path, layout: BaseLayout,
                       base: nn.Module) -> tuple[list[AdapterTensor], float]:
    """The pairs of a GGUF adapter mapped onto ``base``'s modules, in Hugging Face orientation
    (A (r, in) / B (out, r); embedding A (r, vocab) / B (dim, r)), and the file's α.

    Raises:
        ValueError: wrong architecture, a tensor without its partner or with no module in ``base``, or a
            shape that does not fit the module.
    """
    arch = _field_value(reader, gguf.Keys.General.ARCHITECTURE)
    if arch != layout.arch_name:
        raise ValueError(f"{path} is an adapter for a {arch!r} model but --model is {layout.arch_name!r} "
                         f"({layout.config_path}); pass the base it was made for.")
    alpha_value = _field_value(reader, gguf.Keys.Adapter.LORA_ALPHA)
    alpha = float(alpha_value) if isinstance(alpha_value, (int, float)) else 0.0
    modules = {n: m for n, m in base.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    by_tensor = layout.module_names_by_tensor(modules)
    halves: dict[str, dict[str, gguf.ReaderTensor]] = {}
    others: list[str] = []
    for tensor in reader.tensors:
        stem, _, suffix = tensor.name.rpartition(".")
        if suffix in ("lora_a", "lora_b"):
            halves.setdefault(stem, {})[suffix] = tensor
        else:
            others.append(tensor.name)
    unpaired = sorted(s for s, h in halves.items() if len(h) != 2)
    unknown = sorted(s for s in halves if s not in by_tensor)
    problems = []
    if others:
        problems.append(f"tensors that are not LoRA factors: {', '.join(others)}")
    if unpaired:
        problems.append(f"lora_a/lora_b without its partner: {', '.join(unpaired)}")
    if unknown:
        problems.append(f"tensors with no module in this base: {', '.join(unknown)}")
    if problems:
        raise ValueError(f"{path} cannot become a PEFT adapter of {layout.config_path.parent}: "
                         + "; ".join(problems) + ".")
    pairs: list[AdapterTensor] = []
    mismatched: list[str] = []
    for stem, half in halves.items():
        module_name = by_tensor[stem]
        module = modules[module_name]
        lora_a, lora_b = decode(half["lora_a"]), decode(half["lora_b"])
        if isinstance(module, nn.Embedding):
            a, b = lora_a.T.contiguous(), lora_b
            want_a, want_b = (lora_b.shape[-1], module.num_embeddings), (module.embedding_dim, lora_b.shape[-1])
        else:
            a, b = lora_a, layout.from_gguf_rows(module_name, lora_b) if lora_b.ndim == 2 else lora_b
            want_a, want_b = (lora_b.shape[-1], module.in_features), (module.out_features, lora_b.shape[-1])
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            mismatched.append(f"{stem}: A {tuple(a.shape)}, B {tuple(b.shape)} but {module_name} needs "
                              f"{want_a} and {want_b}")
            continue
        pairs.append(AdapterTensor(module_name, stem, a.contiguous(), b.contiguous()))
    if mismatched:
        raise ValueError(f"{path} does not fit --model {layout.config_path.parent}: {'; '.join(mismatched)}. "
                         "Pass the base the adapter was made for.")
    return pairs, alpha


def adapter_config(pairs: list[AdapterTensor], alpha: float, candidates: list[str], model_dir: Path) -> LoraConfig:
    """A LoraConfig giving each pair llama.cpp's scale α/r_t: the commonest rank as ``r``, the others in
    ``rank_pattern``; α = 0 (llama.cpp: scale 1) becomes α = r per module."""
    ranks = {p.module: int(p.lora_b.shape[-1]) for p in pairs}
    r = Counter(ranks.values()).most_common(1)[0][0]
    rank_pattern = {m: k for m, k in ranks.items() if k != r}
    lora_alpha = alpha if alpha else float(r)
    alpha_pattern = {} if alpha else {m: float(k) for m, k in rank_pattern.items()}
    if lora_alpha == int(lora_alpha):
        lora_alpha = int(lora_alpha)
    return LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=_target_modules(list(ranks), candidates),
                      rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, task_type=TaskType.CAUSAL_LM,
                      base_model_name_or_path=str(model_dir.resolve()))


def import_adapter(gguf_path: str | os.PathLike[str], model_dir: str | os.PathLike[str],
                   output_dir: str | os.PathLike[str], force: bool = False) -> LoraConfig:
    """Write llama.cpp's GGUF LoRA adapter ``gguf_path`` as a PEFT-format adapter directory ``output_dir``.

    The inverse of ``export_adapter``: names mapped back through the same table, Llama's q/k permutation
    undone, token_embd's A transposed back, factors dequantized to float32 (f32 files: bit-identical).
    The directory is written by ``PeftModel.save_pretrained`` (with the base fingerprint), staged beside
    ``output_dir`` and renamed into place.

    Returns:
        The adapter's config.

    Raises:
        FileNotFoundError: a missing file or directory. FileExistsError: ``output_dir`` exists, not ``force``.
        ValueError: not a GGUF LoRA adapter, another architecture, tensors that do not fit ``model_dir``.
    """
    from ..commands._adapter_tools import load_base_model, save_default_adapter
    from ..model import get_peft_model

    source, model_path, output = Path(gguf_path), Path(model_dir), Path(output_dir)
    if output.exists() and not force:
        raise FileExistsError(f"-o {output} exists; choose a new directory or pass --force to replace it.")
    if output.exists() and not output.is_dir():
        raise NotADirectoryError(f"-o {output} is a file; give the adapter directory to write.")
    reader = _open_adapter(source)
    layout = read_base_layout(model_path)
    base = load_base_model(model_path, "float32")
    pairs, alpha = read_adapter_pairs(reader, source, layout, base)
    candidates = [n for n, m in base.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    config = adapter_config(pairs, alpha, candidates, model_path)
    peft = get_peft_model(base, config)
    layers = dict(peft.get_base_model().named_modules())
    with torch.no_grad():
        for pair in pairs:
            layer = layers[pair.module]
            if not isinstance(layer, LoraLayer):  # target matching and the pairs disagree: a lorakit bug
                raise RuntimeError(f"lorakit bug: {pair.module} was not adapted by {config.target_modules}")
            a, b = layer.factors(ADAPTER_NAME)
            a.copy_(pair.lora_a)
            b.copy_(pair.lora_b)
    expected = {p.module for p in pairs}
    injected = {n for n, m in layers.items() if isinstance(m, LoraLayer)}
    if injected != expected:
        raise RuntimeError(f"lorakit bug: injected {sorted(injected ^ expected)} differently from the file")
    save_default_adapter(peft, output)
    return config

