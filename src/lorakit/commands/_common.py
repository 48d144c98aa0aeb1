"""Pieces the model-using verbs share: --model/--adapter flags and loading base + adapters."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_model_args(parser: argparse.ArgumentParser, adapters: str = "*") -> None:
    parser.add_argument("--model", help="local Hugging Face causal-LM directory (default: the embedded SmolLM2, "
                        "set up on first use)")
    parser.add_argument("--adapter", action="append", default=[], metavar="DIR[=NAME]",
                        help="PEFT-format adapter directory, optionally named (repeat for several adapters)"
                        + ("" if adapters == "*" else "; required"))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="base model dtype (default: float32)")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA if available, else MPS, else CPU), cpu, cuda, cuda:N or mps (default: auto)")


def model_dir(arg: str | None) -> Path:
    if arg is not None:
        return Path(arg)
    from ..train.defaults import ensure_default_model

    return ensure_default_model()


def parse_adapter_specs(specs: list[str]) -> list[tuple[str, str]]:
    """["dir", "dir2=name"] → [(dir, "default"), (dir2, "name")]; names must be unique."""
    parsed: list[tuple[str, str]] = []
    for i, spec in enumerate(specs):
        path, _, name = spec.partition("=")
        parsed.append((path, name or ("default" if i == 0 else f"adapter{i}")))
    names = [n for _, n in parsed]
    if len(set(names)) != len(names):
        raise ValueError(f"--adapter names {names} repeat; give each adapter its own name with DIR=NAME.")
    return parsed


def load_model_with_adapters(args: argparse.Namespace, require_adapter: bool = False) -> tuple[Any, Any, Any]:
    """(base or PeftModel, tokenizer, PeftModel | None) from --model, --adapter and --device flags, on that device."""
    from ..model import PeftModel
    from ..train.device import resolve_device
    from ..train.loop import load_causal_lm

    device = resolve_device(args.device)
    specs = parse_adapter_specs(args.adapter)
    if require_adapter and not specs:
        raise ValueError("no --adapter given; pass the adapter directory written by lorakit train (…/adapter).")
    for path, _ in specs:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"--adapter {path}: no such directory; pass an adapter directory (it holds "
                                    "adapter_config.json and adapter_model.safetensors).")
    model, tokenizer = load_causal_lm(model_dir(args.model), args.dtype)
    if not specs:
        return model.to(device), tokenizer, None
    peft = PeftModel.from_pretrained(model, specs[0][0], adapter_name=specs[0][1])
    for path, name in specs[1:]:
        peft.load_adapter(path, adapter_name=name)
    return peft.to(device), tokenizer, peft
