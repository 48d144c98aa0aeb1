"""`lorakit data preview`: what the trainer will see — rendered examples with the trained tokens marked, and
the statistics printed at the start of `lorakit train` (records, format, tokens per record, share trained,
truncated, nothing to train). Loads only the tokenizer, never the weights."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

GREEN, RESET = "\033[1;32m", "\033[0m"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "data", help="preview training data as the trainer sees it (trained tokens marked, statistics)",
        description="Inspect a training file before training on it.")
    verbs = parser.add_subparsers(dest="data_verb", metavar="<action>")
    preview = verbs.add_parser(
        "preview", help="print rendered examples with the trained tokens marked, and the data statistics",
        description="Render the first N examples exactly as `lorakit train` tokenizes them (chat records with the "
        "model's template or --chat-template), marking the tokens the loss covers: in colour on a terminal, "
        "between [[ and ]] otherwise. Then the statistics `lorakit train` prints at its start.")
    preview.add_argument("--data", required=True, help="JSONL/JSON/CSV/TSV/TXT training file")
    preview.add_argument("--model", help="local Hugging Face model directory whose tokenizer (and chat template) "
                         "to use (default: the embedded SmolLM2)")
    preview.add_argument("-n", type=int, default=3, help="examples to print (default 3)")
    preview.add_argument("--max-length", type=int, default=128, help="longest example in tokens (default 128, "
                         "as lorakit train)")
    preview.add_argument("--chat-template", help="Jinja chat template file (default: the tokenizer's own)")
    preview.add_argument("--train-on-inputs", action="store_true", help="train on every token")
    preview.add_argument("--train-on-last-turn", action="store_true", help="train only on the last assistant turn")
    preview.add_argument("--color", action=argparse.BooleanOptionalAction, default=None,
                         help="colour the trained tokens (default: when stdout is a terminal)")
    preview.set_defaults(func=run)
    parser.set_defaults(func=lambda args: _no_action(parser))


def _no_action(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def load_tokenizer(model: str | None) -> Any:
    """The tokenizer of a local model directory (or the embedded SmolLM2), without its weights."""
    from transformers import AutoTokenizer

    from ._common import model_dir

    path = model_dir(model)
    if not Path(path).is_dir():
        raise FileNotFoundError(f"--model {path}: no such directory; pass a local Hugging Face model directory")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"--model {path}: no usable tokenizer there ({str(exc).splitlines()[0]}); save the "
                                "tokenizer next to the model with tokenizer.save_pretrained(dir).") from None


def mark_trained(tokenizer: Any, input_ids: list[int], labels: list[int], color: bool) -> str:
    """The decoded example with each run of trained tokens coloured or wrapped in ``[[…]]``."""
    from ..train.data import IGNORE_INDEX

    parts: list[str] = []
    start = 0
    for end in range(1, len(input_ids) + 1):
        if end == len(input_ids) or (labels[end] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
            text = tokenizer.decode(input_ids[start:end])
            if labels[start] != IGNORE_INDEX:
                text = f"{GREEN}{text}{RESET}" if color else f"[[{text}]]"
            parts.append(text)
            start = end
    return "".join(parts)


def run(args: argparse.Namespace) -> int:
    from ..train.data import load_records_with_format
    from ..train.examples import tokenize_examples
    from ..train.options import TrainOptions

    if args.n < 0:
        raise ValueError(f"-n {args.n} is invalid: give the number of examples to print (0 or more)")
    opts = TrainOptions(max_length=args.max_length, chat_template=args.chat_template,
                        train_on_inputs=args.train_on_inputs, train_on_last_turn=args.train_on_last_turn)
    records, fmt = load_records_with_format(args.data)
    tokenizer = load_tokenizer(args.model)
    examples, stats = tokenize_examples(records, tokenizer, opts, fmt)
    color = sys.stdout.isatty() if args.color is None else args.color
    for number, example in enumerate(examples[: args.n]):
        trained = sum(label != -100 for label in example["labels"][1:])
        print(f"--- example {number}: {len(example['input_ids'])} tokens, {trained} trained ---")
        print(mark_trained(tokenizer, example["input_ids"], example["labels"], color))
    for line in stats.lines():
        print(line)
    return 0
