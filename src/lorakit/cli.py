"""`lorakit <verb>`: thin dispatch to the library. Each verb lives in ``lorakit/commands/<verb>.py`` and
exposes ``register(subparsers)`` (adds its parser, sets ``func``). User errors print one line, exit 2."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Verb modules, in the order `lorakit --help` lists them. A module missing here is simply not offered.
VERBS = ("train", "eval", "generate", "merge", "inspect", "resize", "extract", "combine", "analyze")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorakit",
        description="LoRA fine-tuning, inspection and adapter tools (PEFT-compatible files).",
    )
    sub = parser.add_subparsers(dest="verb", metavar="<verb>")
    for verb in VERBS:
        try:
            module = importlib.import_module(f"lorakit.commands.{verb}")
        except ModuleNotFoundError as exc:
            if exc.name == f"lorakit.commands.{verb}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
            PermissionError, FloatingPointError) as exc:
        print(f"lorakit {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lorakit {args.verb}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
