"""Records → training examples for ``lorakit train`` and ``lorakit data``: one entry point for every format.

Chat records go through :mod:`lorakit.train.chat` (template, assistant-only loss, turn-wise truncation),
text and prompt/completion records through :func:`lorakit.train.data.tokenize_records`; either way the
result is a list of ``{"input_ids", "labels"}`` and the :class:`~lorakit.train.chat.DataStats` printed
before training. :func:`training_examples` adds the tokenization cache (:mod:`lorakit.train.token_cache`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .chat import DataStats, data_stats, load_chat_template, tokenize_chat
from .data import IGNORE_INDEX, tokenize_records

__all__ = ["record_format", "tokenize_examples", "train_on", "training_examples"]


def train_on(opts: Any) -> str:
    """``"all"`` (--train-on-inputs), ``"last"`` (--train-on-last-turn) or ``"assistant"`` (default)."""
    if getattr(opts, "train_on_inputs", False):
        return "all"
    return "last" if getattr(opts, "train_on_last_turn", False) else "assistant"


def record_format(records: Sequence[Mapping[str, Any]]) -> str:
    """The format name of already-loaded records (the first record decides; files hold one format)."""
    if not records:
        return "none"
    first = records[0]
    if "messages" in first:
        return "chat (messages)"
    return "prompt/completion" if "completion" in first else "text"


def tokenize_examples(records: Sequence[Mapping[str, Any]], tokenizer: Any, opts: Any,
                      fmt: str | None = None) -> tuple[list[dict[str, list[int]]], DataStats]:
    """Tokenize ``records`` per ``opts`` (max_length, chat_template, train_on_inputs, train_on_last_turn).

    Raises:
        ValueError: see :func:`lorakit.train.chat.tokenize_chat`; ``--train-on-last-turn`` on non-chat data.
        FileNotFoundError: ``--chat-template`` names no file.
    """
    fmt = fmt or record_format(records)
    mode = train_on(opts)
    if records and "messages" in records[0]:
        template = load_chat_template(opts.chat_template) if getattr(opts, "chat_template", None) else None
        return tokenize_chat(records, tokenizer, opts.max_length, template, mode, fmt)
    if mode == "last":
        raise ValueError(f"--train-on-last-turn applies to chat records, but the data is {fmt}; drop the flag or "
                         "give messages/conversations records")
    examples = tokenize_records(records, tokenizer, opts.max_length)
    if mode == "all":  # prompt tokens too (text is trained on every token already)
        examples = [{"input_ids": e["input_ids"], "labels": list(e["input_ids"])} for e in examples]
    stats = data_stats(examples, len(records), fmt, opts.max_length)
    if records and not any(label != IGNORE_INDEX for e in examples for label in e["labels"][1:]):
        stats.nothing_to_train = list(range(len(records)))
    return examples, stats


def training_examples(records: Sequence[Mapping[str, Any]], tokenizer: Any, opts: Any, fmt: str | None,
                      say: Callable[[str], None], use_cache: bool) -> list[dict[str, list[int]]]:
    """:func:`tokenize_examples`, through the tokenization cache when ``use_cache``; prints the statistics."""
    def build() -> tuple[list[dict[str, list[int]]], dict[str, Any]]:
        examples, stats = tokenize_examples(records, tokenizer, opts, fmt)
        return examples, dataclasses.asdict(stats)

    fingerprint = None
    if use_cache:
        from .token_cache import tokenizer_fingerprint

        fingerprint = tokenizer_fingerprint(tokenizer)
    if fingerprint is None:
        examples, stats = build()
    else:
        from .defaults import cache_dir
        from .token_cache import cache_key, cached

        template = None
        if getattr(opts, "chat_template", None):
            template = load_chat_template(opts.chat_template)
        elif records and "messages" in records[0]:
            template = str(getattr(tokenizer, "chat_template", None) or "")
        key = cache_key(records, fingerprint, template, {"max_length": opts.max_length, "train_on": train_on(opts)})
        examples, stats = cached(cache_dir() / "tokenized", key, build, say)
    for line in DataStats(**stats).lines():
        say(line)
    return examples
