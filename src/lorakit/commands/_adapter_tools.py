"""Pieces the adapter-tool verbs (combine, resize, extract, analyze) share: loading a base model without a
tokenizer, loading adapters under chosen names, writing one adapter as a PEFT directory, rank reports."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ._common import model_dir

DTYPES = ("float32", "bfloat16", "float16")


def add_base_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="DIR",
                        help="local Hugging Face causal-LM directory of the base model (default: the adapter's "
                        "base_model_name_or_path when that is a local directory, else the embedded SmolLM2)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="base model dtype (default: float32)")


def add_output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", required=True, metavar="DIR",
                        help="directory to write the PEFT-format adapter to (adapter_config.json + "
                        "adapter_model.safetensors); must not exist unless --overwrite")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument("--report", metavar="FILE", help="also write the per-layer report as JSON to FILE")


def check_output(args: argparse.Namespace) -> Path:
    """Validate --output before any work is done."""
    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise ValueError(f"--output {output} exists; choose a new directory or pass --overwrite.")
    if output.exists() and not output.is_dir():
        raise NotADirectoryError(f"--output {output} is a file; give a directory.")
    return output


def resolve_model_dir(arg: str | None, adapter_dirs: Sequence[str]) -> Path:
    """--model, else the first adapter's base_model_name_or_path if it is a local model directory."""
    if arg is not None:
        return Path(arg)
    for directory in adapter_dirs:
        try:
            recorded = json.loads((Path(directory) / "adapter_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        base = recorded.get("base_model_name_or_path") if isinstance(recorded, dict) else None
        if isinstance(base, str) and (Path(base) / "config.json").is_file():
            return Path(base)
    return model_dir(None)


def load_base_model(directory: Path, dtype: str, flag: str = "--model") -> nn.Module:
    """A causal LM from a local directory (no tokenizer needed), in eval mode."""
    from ..train.loop import load_model_weights

    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{flag} {directory}: no config.json there; pass a local Hugging Face model "
                                "directory (one written by save_pretrained).")
    return load_model_weights(directory, dtype, flag)


def load_adapters(args: argparse.Namespace, names: Sequence[str]) -> Any:
    """A PeftModel over --model holding each --adapter directory under the matching name."""
    from ..model import PeftModel

    directories = list(args.adapter)
    for directory in directories:
        if not Path(directory).is_dir():
            raise FileNotFoundError(f"--adapter {directory}: no such directory; pass an adapter directory (it holds "
                                    "adapter_config.json and adapter_model.safetensors).")
    base = load_base_model(resolve_model_dir(args.model, directories), args.dtype)
    model = PeftModel.from_pretrained(base, directories[0], adapter_name=names[0])
    for directory, name in zip(directories[1:], names[1:], strict=True):
        model.load_adapter(directory, adapter_name=name)
    return model


def save_default_adapter(model: Any, output: Path) -> None:
    """Write the adapter named "default" alone to ``output`` (PEFT puts "default" at the top level).

    Written into a staging directory next to ``output`` first, so a failure leaves ``output`` as it was.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        model.save_pretrained(staging, selected_adapters=["default"])
        if output.exists():
            shutil.rmtree(output)
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def print_rank_report(layers: Sequence[Any]) -> None:
    """Per-layer table of a resize/extract: module, rank change, retained energy, relative error."""
    rows = [("module", "rank", "energy kept", "rel. error")]
    rows += [(r.module, f"{r.original_rank} → {r.new_rank}", f"{r.retained_energy:.4f}", f"{r.relative_error:.4f}")
             for r in layers]
    widths = [max(len(row[c]) for row in rows) for c in range(4)]
    for index, row in enumerate(rows):
        print("  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths,
                                                                                                    strict=True))))
        if index == 0:
            print("  ".join("-" * w for w in widths))


def write_rank_report(path: str | None, layers: Sequence[Any], **extra: Any) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({**extra, "layers": [r.to_dict() for r in layers]}, indent=2) + "\n",
                              encoding="utf-8")
