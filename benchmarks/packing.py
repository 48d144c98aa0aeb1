"""Packing: P10, packed / padded training throughput in trained tokens per second.

    python -m benchmarks.packing [--quick] [--threads N] [--pairs N]

Data: length-skewed chat conversations (most short, a few long: user and assistant turns whose word counts
are drawn log-normally, seeded), rendered with SmolLM2's ChatML template and masked to the assistant tokens
by :func:`lorakit.train.chat.tokenize_chat`, cut at T. ``--quick`` changes only the model (2 layers, d=128).
Model: the setup's GPT-2 shape (its vocabulary widened to SmolLM2's 49,152 ids where smaller) with c_attn
r=8 LoRA, AdamW.

Both variants run the same 4 optimizer steps over the same 64 examples in the same order (micro-batches of
16 examples, one per step, T = 128 as the trainer's default --max-length; packing packs within a
micro-batch, so its gain grows with the batch size — the token slots each variant runs are printed): ``padded`` is the trainer's default path (``collate`` → ``forward_for_loss`` →
``sequence_mean_loss``), ``packed`` is ``--packing`` (``packed_collate`` → ``packed_loss``: the B examples
laid out in rows of T with a block-diagonal mask). The trained tokens are the same, so the ratio of trained
tokens per second is padded time / packed time. Companions: the rows and padded tokens each variant runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
from typing import Any

import torch

from .common import (
    HEADER,
    Result,
    Setup,
    add_arguments,
    base_model,
    configure,
    interleave,
    median,
    note,
    ours,
    print_result,
)

WORDS = ("the model learns to answer questions about data with short and sometimes long replies that explain "
         "each step in detail so the reader can follow").split()


def skewed_conversations(count: int, seed: int = 0) -> list[dict[str, Any]]:
    """Chat records whose lengths are log-normal: most questions and answers short, a long tail of answers
    (median ~5 words per question and ~7 per answer; one answer in ten over ~40 words)."""
    rng = random.Random(seed)

    def text(mu: float, sigma: float) -> str:
        n = max(1, min(300, int(rng.lognormvariate(mu, sigma))))
        return " ".join(rng.choice(WORDS) for _ in range(n))

    return [{"messages": [{"role": "system", "content": "Be helpful."}, {"role": "user", "content": text(1.6, 0.5)},
                          {"role": "assistant", "content": text(2.0, 1.3)}]} for _ in range(count)]


def run(setup: Setup) -> list[Result]:
    from transformers import AutoTokenizer

    from lorakit.train.chat import tokenize_chat
    from lorakit.train.data import collate
    from lorakit.train.defaults import ensure_default_model
    from lorakit.train.loop import accepts_logits_to_keep, forward_for_loss, sequence_mean_loss
    from lorakit.train.packing import packed_collate, packed_loss

    tokenizer = AutoTokenizer.from_pretrained(ensure_default_model(), local_files_only=True)
    steps, batch_size, max_length = 4, 16, 128
    examples, _ = tokenize_chat(skewed_conversations(steps * batch_size), tokenizer, max_length)
    batches = [examples[s * batch_size:(s + 1) * batch_size] for s in range(steps)]
    pad_id = tokenizer.pad_token_id or 0
    padded_batches = [collate(batch, pad_id) for batch in batches]
    packed_batches = [packed_collate(batch, max_length, pad_id) for batch in batches]

    shape = dataclasses.replace(setup, vocab=max(setup.vocab, len(tokenizer)))  # SmolLM2's ids must fit
    model = ours(base_model(shape), shape, ["c_attn"], dropout=0.0).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    keep_logits = accepts_logits_to_keep(model.get_base_model())

    def padded() -> None:
        for batch in padded_batches:
            logits, labels = forward_for_loss(model, batch, keep_logits)
            sequence_mean_loss(logits, labels).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def packed() -> None:
        for batch in packed_batches:
            packed_loss(model, batch, keep_logits).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    trained = sum(sum(label != -100 for label in e["labels"][1:]) for e in examples)
    times = interleave({"packed": packed, "padded": padded}, setup.pairs)
    ratio = median([b / a for a, b in zip(times["packed"], times["padded"], strict=True)])
    result = print_result(Result("P10", f"packed / padded trained tokens/s (skewed chat, T{max_length})",
                                 trained / median(times["packed"]), trained / median(times["padded"]), ratio,
                                 ">= 1.8", unit="tok/s"))
    lengths = [len(e["input_ids"]) for e in examples]
    rows_padded = sum(b["input_ids"].numel() for b in padded_batches)
    rows_packed = sum(b["input_ids"].numel() for b in packed_batches)
    note(f"{len(examples)} examples in {steps} steps of B{batch_size}: lengths min {min(lengths)} / median "
         f"{sorted(lengths)[len(lengths) // 2]} / max {max(lengths)}, {trained} trained tokens")
    note(f"token slots run: padded {rows_padded} ({sum(b['input_ids'].shape[0] for b in padded_batches)} rows), "
         f"packed {rows_packed} ({sum(b['input_ids'].shape[0] for b in packed_batches)} rows); "
         f"slots ratio {rows_padded / rows_packed:.2f}")
    return [result]


def main(argv: list[str] | None = None) -> int:
    import datetime
    import os

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    setup = configure(args)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"lorakit packing benchmark {datetime.datetime.now():%Y-%m-%d %H:%M}, load {load:.2f}")
    print(f"{'quick' if setup.quick else 'full'}: GPT-2 {setup.n_layer} layers d={setup.n_embd} "
          f"vocab={max(setup.vocab, 49152)} (≥ SmolLM2's ids), 4 steps of B16 T128 skewed ChatML conversations, c_attn r={setup.r} α={setup.alpha}, "
          f"AdamW, {setup.threads} thread(s), {setup.clock} clock, median of {setup.pairs} interleaved rounds")
    print(HEADER)
    run(setup)
    return 0


if __name__ == "__main__":
    sys.exit(main())
