"""`lorakit serve`: one base model, many adapters, an OpenAI-compatible endpoint (see docs/serving.md)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve the base model and adapters over an OpenAI-compatible HTTP API",
        description="Serve one base model and many LoRA adapters (continuous batching across adapters) on "
        "/v1/completions, /v1/chat/completions and /v1/models; a playground at /. Needs the [serve] extra.")
    parser.add_argument("--model", help="local Hugging Face causal-LM directory (default: the embedded SmolLM2)")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                        help="serve the PEFT-format adapter in DIR as model NAME (repeatable)")
    parser.add_argument("--adapter-dir", action="append", default=[], metavar="DIR",
                        help="serve every adapter subdirectory of DIR, named after it; runtime loads may read "
                        "only from these directories (repeatable)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    key = parser.add_mutually_exclusive_group()
    key.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/*")
    key.add_argument("--api-key-file", help="read the API key from this file (first line)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="model dtype (default float32)")
    parser.add_argument("--max-batch-size", type=int, default=32, help="most sequences per step (default 32)")
    parser.add_argument("--max-queue", type=int, default=256, help="most waiting requests; more get 429 (default 256)")
    parser.add_argument("--max-model-len", type=int, help="most prompt + generated tokens per request "
                        "(default: the model's max_position_embeddings)")
    parser.add_argument("--max-loaded-adapters", type=int, help="most adapters in memory at once; the least "
                        "recently used is evicted and reloaded on demand (default: no limit)")
    parser.set_defaults(func=run)


def _parse_adapters(specs: list[str]) -> list[tuple[str, Path]]:
    parsed = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter {spec!r}: write NAME=DIR, e.g. --adapter sentiment=runs/sentiment/adapter.")
        parsed.append((name, Path(path)))
    return parsed


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..serve.options import ServeOptions, build
    except ModuleNotFoundError as exc:
        raise ValueError(f"lorakit serve needs the serve extra ({exc.name} is missing): "
                         "pip install 'lorakit[serve]'.") from None
    api_key = args.api_key
    if args.api_key_file:
        lines = Path(args.api_key_file).read_text(encoding="utf-8").splitlines()
        api_key = lines[0].strip() if lines else ""
    options = ServeOptions(model=Path(args.model) if args.model else None, adapters=_parse_adapters(args.adapter),
                           adapter_dirs=[Path(d) for d in args.adapter_dir], host=args.host, port=args.port,
                           api_key=api_key, device=args.device, dtype=args.dtype,
                           max_batch_size=args.max_batch_size, max_queue=args.max_queue,
                           max_model_len=args.max_model_len, max_loaded_adapters=args.max_loaded_adapters)
    app, engine = build(options)
    names = engine.registry.names()
    print(f"lorakit serve: http://{options.host}:{options.port} — adapters: {', '.join(names) or 'none'}")
    uvicorn.run(app, host=options.host, port=options.port, log_level="warning")
    return 0
