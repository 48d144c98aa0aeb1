"""`lorakit analyze`: spectra, effective rank, amplification and subspace similarity of adapters (§7)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..analysis import REPORT_SCHEMA, analyze, format_report, plot_report, validate_report
from ._adapter_tools import add_base_args, load_adapters


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "analyze", help="explain adapters: spectra, effective rank, amplification, subspace similarity φ",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Per layer of one adapter: singular values of ΔW, effective rank (entropy and 90%-energy),\n"
        "‖ΔW‖_F and the amplification factor ‖ΔW‖_F/‖Uᵀ·W0·V‖_F (LoRA paper §7.3). With two adapters, also\n"
        "φ(i, j) = ‖U1_iᵀ·U2_j‖²_F / min(i, j) over the right-singular vectors of their A matrices per layer\n"
        "(§7.2, Fig. 3) and φ between every pair of layers. Prints a table; with --output-dir also writes\n"
        "analysis.json (schema: --print-schema) and PNG plots.",
        epilog="example: lorakit analyze --model base/ --adapter r8/ --adapter r64/ --output-dir report/")
    add_base_args(parser)
    parser.add_argument("--adapter", action="append", default=[], metavar="DIR[=NAME]",
                        help="PEFT-format adapter directory, optionally named (once or twice)")
    parser.add_argument("--output-dir", metavar="DIR", help="write analysis.json and PNG plots here")
    parser.add_argument("--no-plots", action="store_true", help="with --output-dir, write only the JSON")
    parser.add_argument("--print-schema", action="store_true", help="print the JSON schema of the report and exit")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.print_schema:
        print(json.dumps(REPORT_SCHEMA, indent=2, ensure_ascii=False))
        return 0
    if not 1 <= len(args.adapter) <= 2:
        raise ValueError(f"lorakit analyze takes one or two --adapter directories (got {len(args.adapter)}).")
    specs = [spec.partition("=") for spec in args.adapter]
    names = [name or ("adapter1" if i == 0 else "adapter2") for i, (_, _, name) in enumerate(specs)]
    if len(set(names)) != len(names):
        raise ValueError(f"--adapter names {names} repeat; name them DIR=NAME.")
    args.adapter = [path for path, _, _ in specs]
    model = load_adapters(args, names)
    report = analyze(model, names, sources=dict(zip(names, args.adapter, strict=True)))
    print(format_report(report), end="")
    if args.output_dir:
        out = Path(args.output_dir)
        if not args.no_plots:
            report["plots"] = [path.name for path in plot_report(report, out)]
        else:
            out.mkdir(parents=True, exist_ok=True)
        validate_report(report)
        (out / "analysis.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"report written to {out / 'analysis.json'}" + (f" with {len(report['plots'])} plot(s)"
                                                               if "plots" in report else ""))
    return 0
