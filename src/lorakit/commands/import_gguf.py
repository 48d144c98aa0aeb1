"""`lorakit import-gguf`: a llama.cpp GGUF LoRA adapter back to a PEFT-format adapter directory."""

from __future__ import annotations

import argparse
from typing import Any

from ._common import model_dir


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "import-gguf", help="turn a llama.cpp GGUF LoRA adapter into a PEFT-format adapter directory",
        description="Read llama.cpp's GGUF LoRA adapter FILE (written by lorakit export or llama.cpp's "
        "convert_lora_to_gguf.py) and write the same adapter in PEFT's format: names mapped back, Llama's q/k "
        "row permutation undone, α and each pair's rank kept as lora_alpha / rank_pattern (so ΔW = (α/r)·B·A "
        "is what llama.cpp applies).",
        epilog="example: lorakit import-gguf adapter.gguf --model base/ -o adapter_dir/")
    parser.add_argument("gguf", metavar="FILE", help="GGUF LoRA adapter file")
    parser.add_argument("--model", metavar="DIR",
                        help="Hugging Face directory of the base model (default: the embedded SmolLM2)")
    parser.add_argument("-o", "--output", required=True, metavar="DIR", help="adapter directory to write")
    parser.add_argument("--force", "--overwrite", dest="force", action="store_true",
                        help="replace the output directory if it exists")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..gguf import import_adapter

    config = import_adapter(args.gguf, model_dir(args.model), args.output, args.force)
    ranks = f"r={config.r}" + (f", {len(config.rank_pattern)} other ranks" if config.rank_pattern else "")
    print(f"PEFT adapter written to {args.output} ({ranks}, lora_alpha={config.lora_alpha})")
    return 0
