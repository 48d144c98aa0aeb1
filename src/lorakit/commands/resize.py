"""`lorakit resize`: re-factor an adapter by SVD to a target rank or energy fraction per layer."""

from __future__ import annotations

import argparse
from typing import Any

from ..arithmetic import resize_adapter
from ._adapter_tools import (
    add_base_args,
    add_output_args,
    check_output,
    load_adapters,
    print_rank_report,
    save_default_adapter,
    write_rank_report,
)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "resize", help="shrink (or re-factor) an adapter to a rank or energy fraction per layer",
        description="Re-factor each layer's ΔW = s·B·A by SVD, keeping its best rank-k approximation "
        "(Eckart–Young): k = --rank, or the smallest k keeping --energy of Σσ² (ranks then differ per layer "
        "and are written as rank_pattern). Prints, per layer, the retained energy Σ kept σ²/Σσ² and the "
        "relative Frobenius error ‖ΔW − ΔW_k‖/‖ΔW‖.",
        epilog="example: lorakit resize --model base/ --adapter big/ --energy 0.9 --rank 16 --output small/")
    add_base_args(parser)
    parser.add_argument("--adapter", action="append", default=[], metavar="DIR", required=True,
                        help="PEFT-format adapter directory to resize")
    parser.add_argument("--rank", type=int, help="target rank per layer (with --energy: the maximum rank)")
    parser.add_argument("--energy", type=float, help="keep the smallest rank reaching this fraction of Σσ² (0–1]")
    add_output_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if len(args.adapter) != 1:
        raise ValueError(f"lorakit resize takes exactly one --adapter (got {len(args.adapter)}).")
    if args.rank is None and args.energy is None:
        raise ValueError("give --rank N, --energy F, or both (energy capped at rank).")
    output = check_output(args)
    model = load_adapters(args, ["source"])
    layers = resize_adapter(model, "source", "default", rank=args.rank, energy=args.energy)
    save_default_adapter(model, output)
    print_rank_report(layers)
    write_rank_report(args.report, layers, adapter=args.adapter[0], rank=args.rank, energy=args.energy)
    print(f"resized adapter written to {output}")
    return 0
