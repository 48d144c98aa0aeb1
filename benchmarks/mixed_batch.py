"""Mixed-adapter batches: P5.

    python -m benchmarks.mixed_batch [--quick] [--threads N] [--pairs N]

Thirty-two all-linear r=8 adapters are loaded into one model (ours and PEFT alike); each row of a batch
names its own adapter (``adapter_names=[…]``, in shuffled order so that no row happens to sit at its
adapter's stack index).

P5a: one decode step at B32 T1 on a 64-token KV cache, 32 distinct adapters, against the plain model's
     decode step (no LoRA modules).
P5b: the same step, ours / PEFT.
P5c: a B8 T128 forward with 8 distinct adapters against the same forward with one adapter for all rows.
"""

from __future__ import annotations

import argparse
import random
import sys

from .common import (
    HEADER,
    Result,
    Setup,
    add_arguments,
    aten_ops,
    base_model,
    configure,
    interleave,
    median,
    median_ratio,
    note,
    ours,
    peft_available,
    peft_config,
    print_result,
    reference_peft,
    token_batch,
)
from .forward import DECODE_PREFIX, decode_fns, forward_fn

N_ADAPTERS = 32


def run(setup: Setup, only: set[str] | None = None) -> list[Result]:
    from lorakit import LoraConfig

    if only is not None and "P5" not in only:
        return []
    results: list[Result] = []
    plain = base_model(setup).eval()
    names = [f"a{i}" for i in range(N_ADAPTERS)]
    mine = ours(plain, setup, "all-linear", name=names[0])
    for name in names[1:]:
        mine.add_adapter(name, LoraConfig(r=setup.r, lora_alpha=setup.alpha, target_modules="all-linear"))
    mine.eval()
    theirs = None
    if peft_available():
        theirs = reference_peft(plain, setup, "all-linear", name=names[0])
        for name in names[1:]:
            theirs.add_adapter(name, peft_config(setup, "all-linear"))
        theirs.eval()

    rows = names[:]
    random.Random(0).shuffle(rows)
    steps, resets = {}, {}
    steps["ours"], resets["ours"] = decode_fns(mine, setup, N_ADAPTERS, adapter_names=rows)
    steps["base"], resets["base"] = decode_fns(plain, setup, N_ADAPTERS)
    if theirs is not None:
        steps["peft"], resets["peft"] = decode_fns(theirs, setup, N_ADAPTERS, adapter_names=rows)
    times = interleave(steps, setup.pairs, after=resets)
    results.append(print_result(Result(
        "P5", f"{N_ADAPTERS} adapters, decode B{N_ADAPTERS} T1 ({DECODE_PREFIX}-token cache) / base",
        median(times["ours"]), median(times["base"]), median_ratio(times, "ours", "base"), "<= 1.25")))
    if theirs is not None:
        results.append(print_result(Result(
            "P5", f"{N_ADAPTERS} adapters, decode B{N_ADAPTERS} T1: ours / PEFT", median(times["ours"]),
            median(times["peft"]), median_ratio(times, "ours", "peft"), "<= 0.6")))
        note(f"PEFT/base = {median_ratio(times, 'peft', 'base'):.3f}; ATen ops per step: ours "
             f"{aten_ops(steps['ours'])}, PEFT {aten_ops(steps['peft'])}, base {aten_ops(steps['base'])}")
    else:
        note("P5 ours / PEFT skipped: PEFT is not installed")

    ids = token_batch(setup)
    eight = rows[: setup.batch]
    times = interleave({"mixed": forward_fn(mine, ids, adapter_names=eight), "single": forward_fn(mine, ids)},
                       setup.pairs)
    results.append(print_result(Result(
        "P5", f"{len(set(eight))} adapters at B{setup.batch} T{setup.seq} / one adapter", median(times["mixed"]),
        median(times["single"]), median_ratio(times, "mixed", "single"), "<= 1.05")))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    setup = configure(args)
    print(setup.describe())
    print(HEADER)
    run(setup)
    return 0


if __name__ == "__main__":
    sys.exit(main())
