"""`lorakit extract`: a LoRA adapter from a base model and a fully fine-tuned one, by truncated SVD."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..arithmetic import extract_adapter
from ._adapter_tools import (
    add_base_args,
    add_output_args,
    check_output,
    load_base_model,
    print_rank_report,
    resolve_model_dir,
    save_default_adapter,
    write_rank_report,
)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "extract", help="turn a full fine-tune into a LoRA adapter (truncated SVD of W_ft − W_0)",
        description="For every target module, ΔW = W_finetuned − W_base is factored by SVD and its best rank-r "
        "approximation written as a PEFT-format LoRA adapter for --model. Parameters that changed but "
        "LoRA does not adapt (biases, norms, untargeted modules) are listed.",
        epilog="example: lorakit extract --model base/ --finetuned tuned/ --rank 16 --output adapter/")
    add_base_args(parser)
    parser.add_argument("--finetuned", required=True, metavar="DIR",
                        help="local Hugging Face directory of the fully fine-tuned model (same architecture)")
    parser.add_argument("--target-modules", nargs="+", default=["all-linear"], metavar="NAME",
                        help="modules to extract: names or dotted suffixes, one regex, or all-linear (default)")
    parser.add_argument("--rank", type=int, default=None, help="rank per layer (default 8; with --energy: the cap)")
    parser.add_argument("--energy", type=float, help="keep the smallest rank reaching this fraction of Σσ² (0–1]")
    add_output_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    output = check_output(args)
    rank = args.rank if args.rank is not None or args.energy is not None else 8
    targets: list[str] | str = args.target_modules
    if len(targets) == 1 and (targets[0] == "all-linear" or any(c in targets[0] for c in "*()[]|\\^$+?")):
        targets = targets[0]  # all-linear, or a regex: a string in LoraConfig's terms
    base_dir = resolve_model_dir(args.model, [])
    base = load_base_model(base_dir, args.dtype)
    finetuned = load_base_model(Path(args.finetuned), args.dtype, "--finetuned")
    result = extract_adapter(base, finetuned, targets, rank=rank, energy=args.energy, task_type="CAUSAL_LM")
    result.model.peft_config["default"].base_model_name_or_path = str(base_dir)
    save_default_adapter(result.model, output)
    print_rank_report(result.layers)
    if result.uncaptured:
        shown = ", ".join(result.uncaptured[:6]) + (" …" if len(result.uncaptured) > 6 else "")
        print(f"note: {len(result.uncaptured)} changed parameter(s) are not captured by the adapter: {shown}")
    write_rank_report(args.report, result.layers, base=str(base_dir), finetuned=args.finetuned, rank=rank,
                      energy=args.energy, uncaptured=result.uncaptured)
    print(f"extracted adapter written to {output}")
    return 0
