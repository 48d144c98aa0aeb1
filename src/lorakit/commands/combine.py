"""`lorakit combine`: several adapters → one, by PEFT's add_weighted_adapter rules."""

from __future__ import annotations

import argparse
from typing import Any

from ..arithmetic import COMBINATION_TYPES, add_weighted_adapter
from ._adapter_tools import add_base_args, check_output, load_adapters, save_default_adapter


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "combine", help="combine adapters into one (cat, svd, linear, ties, dare, …)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Combine LoRA adapters with weights into one PEFT-format adapter.\n\n"
        "  cat     exact Σ wᵢ·ΔWᵢ, rank = Σ rᵢ\n"
        "  svd     Σ wᵢ·ΔWᵢ truncated to --svd-rank by SVD (the best approximation of that rank)\n"
        "  linear  A = Σ ±√|wᵢsᵢ|·Aᵢ, B = Σ √|wᵢsᵢ|·Bᵢ (equal ranks; approximate)\n"
        "  ties, dare_linear, dare_ties, magnitude_prune   the linear rule with pruning (--density) and,\n"
        "          for ties, sign election; *_svd variants apply the rule to the dense ΔWᵢ then re-factor\n",
        epilog="example: lorakit combine --model base/ --adapter a/ --adapter b/ --weights 1 0.5 "
        "--combination-type svd --svd-rank 16 --output mixed/")
    add_base_args(parser)
    parser.add_argument("--adapter", action="append", default=[], metavar="DIR", required=True,
                        help="PEFT-format adapter directory (repeat, at least once)")
    parser.add_argument("--weights", nargs="+", type=float, metavar="W",
                        help="one weight per --adapter, in order (default: 1 each); negative subtracts")
    parser.add_argument("--combination-type", default="svd", choices=COMBINATION_TYPES,
                        help="combination rule (default: svd)")
    parser.add_argument("--svd-rank", type=int, help="rank of the *svd results (default: the largest input rank)")
    parser.add_argument("--svd-clamp", type=float, help="clamp the new factors to this quantile (svd types)")
    parser.add_argument("--density", type=float, help="fraction of entries kept by ties/dare/magnitude_prune")
    parser.add_argument("--majority-sign-method", default="total", choices=("total", "frequency"),
                        help="how ties/dare_ties elect each entry's sign (default: total)")
    parser.add_argument("--seed", type=int, help="seed for DARE's random masks")
    parser.add_argument("--output", required=True, metavar="DIR", help="directory to write the combined adapter to")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    output = check_output(args)
    weights = args.weights if args.weights is not None else [1.0] * len(args.adapter)
    if len(weights) != len(args.adapter):
        raise ValueError(f"--weights has {len(weights)} values for {len(args.adapter)} --adapter(s); give one each.")
    names = [f"input{i}" for i in range(len(args.adapter))]
    model = load_adapters(args, names)
    add_weighted_adapter(model, names, weights, "default", args.combination_type, svd_rank=args.svd_rank,
                         svd_clamp=args.svd_clamp, density=args.density,
                         majority_sign_method=args.majority_sign_method, seed=args.seed)
    save_default_adapter(model, output)
    ranks = sorted({layer.r["default"] for layer in _lora_layers(model)})
    print(f"combined {len(names)} adapter(s) with {args.combination_type} (weights {weights}) → {output} "
          f"(rank {'/'.join(map(str, ranks))})")
    return 0


def _lora_layers(model: Any) -> list[Any]:
    from ..layers import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer) and "default" in m.r]
