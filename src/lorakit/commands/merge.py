"""`lorakit merge`: write base + adapter as one plain model directory that transformers loads."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ._common import add_model_args, load_model_with_adapters


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "merge", help="merge an adapter into the base weights and save a plain transformers model",
        description="Merge W = W0 + (α/r)·B·A for the adapter and write a model directory (config, "
        "safetensors weights, tokenizer) that transformers' from_pretrained loads with no lorakit installed.")
    add_model_args(parser, adapters="1")
    parser.add_argument("--output", required=True, help="directory to write (must not exist, or use --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise FileExistsError(f"--output {output} exists; choose a new directory or pass --overwrite.")
    if len(args.adapter) != 1:
        raise ValueError(f"lorakit merge takes exactly one --adapter (got {len(args.adapter)}); "
                         "combine adapters first with lorakit combine.")
    _, tokenizer, peft = load_model_with_adapters(args, require_adapter=True)
    merged = peft.merge_and_unload()
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        merged.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        if output.exists():
            shutil.rmtree(output)
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"merged model written to {output}")
    return 0
