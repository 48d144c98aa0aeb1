"""`lorakit eval`: held-out accuracy (labelled data) or perplexity, base and adapter side by side."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ._common import add_model_args, load_model_with_adapters


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "eval", help="evaluate base vs adapter(s) on held-out data (accuracy or perplexity)",
        description="Evaluate the base model and each --adapter on the same data, side by side. Labelled "
        "prompt/completion data (≤ 10 distinct completions) is scored by accuracy of the label's first token; "
        "other data by perplexity. Without --data: the default task's held-out split.")
    add_model_args(parser)
    parser.add_argument("--data", help="JSONL/CSV/TXT file (default: the embedded sentiment task's held-out split)")
    parser.add_argument("--eval-size", type=int, default=1000, help="evaluate at most this many examples (default 1000)")
    parser.add_argument("--max-length", type=int, default=128, help="longest example in tokens (default 128)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per forward pass (default 8)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..train.loop import Task, _label_words, evaluate, format_metric, load_task
    from ..train.options import TrainOptions

    opts = TrainOptions(data=None, eval_size=args.eval_size, max_length=args.max_length, batch_size=args.batch_size,
                        train_size=1)
    if args.data:
        from ..train.data import load_records

        records = load_records(args.data)[: args.eval_size]
        task = Task([], records, _label_words(records), args.data)
    else:
        task = load_task(opts)
    model, tokenizer, peft = load_model_with_adapters(args)
    results: dict[str, dict[str, float]] = {}
    if peft is None:
        results["base"] = evaluate(model, tokenizer, task, opts)
    else:
        with peft.disable_adapter():
            results["base"] = evaluate(peft, tokenizer, task, opts)
        for name in list(peft.peft_config):
            peft.set_adapter(name)
            results[name] = evaluate(peft, tokenizer, task, opts)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"data: {task.description}")
        for name, metrics in results.items():
            print(f"  {name:<12} {format_metric(metrics)}")
    return 0
