"""`lorakit generate`: continue a prompt with the base model, an adapter, several adapters, or merged."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from ._common import add_model_args, load_model_with_adapters


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "generate", help="generate text from a prompt with the base model and/or adapters",
        description="Generate a continuation of --prompt. With several --adapter flags each adapter answers "
        "in turn (or all at once in one mixed batch with --mixed); --merged merges the adapter first.")
    add_model_args(parser)
    parser.add_argument("--prompt", required=True, action="append", help="prompt text (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 for greedy decoding (default)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--base", action="store_true", help="also show the base model's continuation")
    parser.add_argument("--merged", action="store_true", help="merge the (first) adapter into the weights first")
    parser.add_argument("--mixed", action="store_true", help="run every adapter in one mixed batch")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens={args.max_new_tokens} must be positive.")
    model, tokenizer, peft = load_model_with_adapters(args)
    kwargs: dict[str, Any] = dict(max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    if args.temperature > 0:
        kwargs.update(do_sample=True, temperature=args.temperature)
    else:
        kwargs.update(do_sample=False)

    def complete(prompt: str, names: list[str] | None = None) -> list[str]:
        torch.manual_seed(args.seed)
        count = len(names) if names else 1
        batch = tokenizer([prompt] * count, return_tensors="pt").to(next(model.parameters()).device)
        with torch.no_grad():
            output = model.generate(**batch, **({"adapter_names": names} if names else {}), **kwargs)
        return [tokenizer.decode(row[batch["input_ids"].shape[1]:], skip_special_tokens=True) for row in output]

    for prompt in args.prompt:
        print(f"prompt: {prompt!r}")
        if peft is None:
            print(f"  base: {complete(prompt)[0]!r}")
            continue
        names = list(peft.peft_config)
        if args.base:
            with peft.disable_adapter():
                print(f"  base: {complete(prompt)[0]!r}")
        if args.mixed:
            for name, text in zip(names, complete(prompt, names), strict=True):
                print(f"  {name}: {text!r}")
        elif args.merged:
            peft.set_adapter(names[0])
            peft.merge_adapter()
            print(f"  {names[0]} (merged): {complete(prompt)[0]!r}")
            peft.unmerge_adapter()
        else:
            for name in names:
                peft.set_adapter(name)
                print(f"  {name}: {complete(prompt)[0]!r}")
    return 0
