"""`lorakit export`: an adapter (or base + adapter merged) as a GGUF file for llama.cpp / ollama."""

from __future__ import annotations

import argparse
from typing import Any

from ..gguf.storage import OUTTYPES
from ._adapter_tools import resolve_model_dir


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "export", help="write an adapter (or the merged model) as a GGUF file for llama.cpp / ollama",
        description="Write the PEFT adapter in ADAPTER_DIR as llama.cpp's GGUF LoRA adapter (use it with "
        "`llama-cli -m base.gguf --lora adapter.gguf` or an ollama Modelfile's ADAPTER line), or with --merged "
        "the base with the adapter merged in, W = W0 + (α/r)·B·A, as a GGUF model file. rsLoRA, rank_pattern "
        "and alpha_pattern are folded into the factors so llama.cpp's α/r gives the same ΔW.",
        epilog="example: lorakit export --format gguf runs/adapter --model base/ -o adapter.gguf --outtype f16")
    parser.add_argument("adapter", metavar="ADAPTER_DIR", help="PEFT-format adapter directory")
    parser.add_argument("--format", default="gguf", choices=["gguf"], help="file format (default: gguf)")
    parser.add_argument("--model", metavar="DIR",
                        help="Hugging Face directory of the base model (default: the adapter's "
                        "base_model_name_or_path when that is a local directory, else the embedded SmolLM2)")
    parser.add_argument("-o", "--output", required=True, metavar="FILE", help="the .gguf file to write")
    parser.add_argument("--outtype", default=None, choices=list(OUTTYPES), type=_outtype,
                        help="storage type of the matrices (default: f32 for an adapter, f16 for --merged; "
                        "norms stay f32; q8_0 rows that do not split into 32-value blocks are stored f16)")
    parser.add_argument("--merged", action="store_true",
                        help="write the base model with the adapter merged in (a full GGUF model) instead")
    parser.add_argument("--base-gguf", metavar="FILE",
                        help="with --merged: a GGUF of the base, for its tokenizer and hyperparameters "
                        "(default for the embedded SmolLM2: its original Q4_1 GGUF)")
    parser.add_argument("--force", "--overwrite", dest="force", action="store_true",
                        help="replace the output file if it exists")
    parser.set_defaults(func=run)


def _outtype(value: str) -> str:
    """Accept F16 as well as f16 (llama.cpp's tools spell them both ways)."""
    return value.lower()


def run(args: argparse.Namespace) -> int:
    from ..gguf import export_adapter
    from ..gguf.merged import export_merged

    if args.base_gguf is not None and not args.merged:
        raise ValueError("--base-gguf only applies with --merged (an adapter file needs no base GGUF).")
    model = resolve_model_dir(args.model, [args.adapter])
    if args.merged:
        source = export_merged(args.adapter, model, args.output, args.outtype or "f16", args.base_gguf, args.force)
        print(f"merged model written to {args.output} ({args.outtype or 'f16'}; tokenizer and hyperparameters "
              f"from {source})")
        return 0
    pairs = export_adapter(args.adapter, model, args.output, args.outtype or "f32", args.force)
    print(f"GGUF LoRA adapter written to {args.output} ({len(pairs)} adapted matrices, "
          f"{args.outtype or 'f32'}); use it with: llama-cli -m BASE.gguf --lora {args.output}")
    return 0
