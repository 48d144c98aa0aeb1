"""`lorakit <verb>`: thin dispatch to the library. Each verb lives in ``lorakit/commands/<verb>.py`` and
exposes ``register(subparsers)`` (adds its parser, sets ``func``).

Errors the user can fix — bad flags (argparse), ``ValueError``/``TypeError`` from validation, and any
``OSError`` (missing files, a default model that could not be set up, a full disk) — print ONE line,
``lorakit <verb>: error: …``, and exit 2; never a traceback. lorakit's own warnings print as one line too."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

from .errors import LorakitWarning

# Verb modules, in the order `lorakit --help` lists them. A module missing here is simply not offered.
VERBS = ("train", "eval", "generate", "merge", "inspect", "resize", "extract", "combine", "analyze", "data", "serve",
         "export", "import_gguf")


class UsageError(Exception):
    """A command line argparse refused; its message is the one line to print."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the verb (not the whole usage block) and no exit."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: error: {message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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


@contextlib.contextmanager
def _one_line_warnings(verb: str) -> Iterator[None]:
    """Show each warning as one line, ``lorakit <verb>: warning: …`` (the category named unless it is
    lorakit's own), instead of Python's two lines of file, line number and source."""
    shown = warnings.showwarning

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
             line: str | None = None) -> None:
        kind = "" if issubclass(category, LorakitWarning) else f"{category.__name__}: "
        print(f"lorakit {verb}: warning: {kind}{' '.join(str(message).split())}", file=file or sys.stderr)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `torchrun -m lorakit -- train …` needs the `--`; accept it everywhere
        argv = argv[1:]
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # name the verb whose flags were wrong, not just "lorakit"
            prog = f"lorakit {args.verb}" if getattr(args, "verb", None) else "lorakit"
            raise UsageError(f"{prog}: error: unrecognized arguments: {' '.join(extra)} (see `{prog} --help`)")
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        with _one_line_warnings(args.verb):
            result = args.func(args)
    except (ValueError, TypeError, OSError, FloatingPointError) as exc:
        # OSError covers FileNotFoundError, PermissionError, … and lorakit.train.defaults.DefaultsError.
        print(f"lorakit {args.verb}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lorakit {args.verb}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
