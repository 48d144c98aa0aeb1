"""Training figures: P1 (LoRA step / frozen floor), P2 (ours / PEFT), P6 (saved activations), P7 (vs full FT).

    python -m benchmarks.train_step [--quick] [--only P1,P2,P6,P7] [--threads N] [--pairs N]

P1: forward + backward of the LoRA model (all-linear, r=8, dropout 0.05) against the same model with every
    parameter frozen and the embedding output requiring grad (same loss): what LoRA costs beyond
    running the frozen model.
P2: forward + backward + AdamW step, ours / PEFT: all-linear r=8 dropout 0.05, and c_attn r=8 dropout 0.
P6: bytes autograd saves for backward (each storage once, parameters excluded), ours / PEFT, all-linear
    r=8 dropout 0.1: deterministic.
P7: LoRA step (c_attn r=8, AdamW) / full fine-tuning step (every parameter, AdamW): REFERENCE.md's cost
    model puts the FLOP floor at 0.671; the FLOP ratio is printed as a companion.
"""

from __future__ import annotations

import argparse
import sys

import torch

from .common import (
    HEADER,
    Result,
    Setup,
    add_arguments,
    base_model,
    configure,
    flops,
    frozen_floor,
    interleave,
    median,
    median_ratio,
    note,
    ours,
    peft_available,
    print_result,
    reference_peft,
    saved_activation_bytes,
    token_batch,
    train_step,
)


def _adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def run(setup: Setup, only: set[str] | None = None) -> list[Result]:
    results: list[Result] = []
    base = base_model(setup).train()
    ids = token_batch(setup)
    have_peft = peft_available()

    def want(figure: str) -> bool:
        return only is None or figure in only

    if want("P1") or want("P2"):
        lora = ours(base, setup, "all-linear", dropout=0.05).train()
        if want("P1"):
            floor = frozen_floor(base).train()
            # Single full runs with 5 rounds read 0.91–1.27 on this host (per-round ratios 0.8–1.4; FLOPs
            # differ by 0.7 %): 3× the usual rounds.
            times = interleave({"lora": lambda: train_step(lora, ids), "floor": lambda: train_step(floor, ids)},
                               setup.pairs * 3)
            results.append(print_result(Result(
                "P1", "LoRA fwd+bwd / frozen floor (all-linear, p=0.05)", median(times["lora"]),
                median(times["floor"]), median_ratio(times, "lora", "floor"), "<= 1.03")))
            note(f"FLOPs LoRA/floor = {flops(lambda: train_step(lora, ids)) / flops(lambda: train_step(floor, ids)):.4f}")
            del floor
        if want("P2") and have_peft:
            for targets, dropout, goal in (("all-linear", 0.05, "<= 0.93"), (["c_attn"], 0.0, "<= 1.00")):
                mine = lora if targets == "all-linear" else ours(base, setup, targets, dropout).train()
                theirs = reference_peft(base, setup, targets, dropout).train()
                opt_mine, opt_theirs = _adamw(mine), _adamw(theirs)
                times = interleave({"ours": lambda m=mine, o=opt_mine: train_step(m, ids, o),
                                    "peft": lambda m=theirs, o=opt_theirs: train_step(m, ids, o)}, setup.pairs)
                label = "all-linear, p=0.05" if targets == "all-linear" else "c_attn, p=0"
                results.append(print_result(Result(
                    "P2", f"train step ours / PEFT ({label})", median(times["ours"]), median(times["peft"]),
                    median_ratio(times, "ours", "peft"), goal)))
                del theirs
        elif want("P2"):
            note("P2 skipped: PEFT is not installed")
        del lora

    if want("P6") and have_peft:
        mine = ours(base, setup, "all-linear", dropout=0.1).train()
        theirs = reference_peft(base, setup, "all-linear", dropout=0.1).train()
        floor = frozen_floor(base).train()

        def forward_loss(model: torch.nn.Module) -> None:
            loss = model(input_ids=ids, labels=ids).loss
            del loss  # the graph (and what it saved) is freed here; only the hook's tally remains

        saved_mine = saved_activation_bytes(mine, lambda: forward_loss(mine))
        saved_theirs = saved_activation_bytes(theirs, lambda: forward_loss(theirs))
        saved_floor = saved_activation_bytes(floor, lambda: forward_loss(floor))
        results.append(print_result(Result(
            "P6", "saved activations ours / PEFT (all-linear, p=0.1)", saved_mine / 2**20, saved_theirs / 2**20,
            saved_mine / saved_theirs, "<= 0.85", unit="MiB")))
        note(f"frozen floor saves {saved_floor / 2**20:.1f} MiB: ours adds {(saved_mine - saved_floor) / 2**20:.1f}, "
             f"PEFT {(saved_theirs - saved_floor) / 2**20:.1f}")
        del mine, theirs, floor
    elif want("P6"):
        note("P6 skipped: PEFT is not installed")

    if want("P7"):
        lora = ours(base, setup, ["c_attn"], dropout=0.0).train()
        full = base_model(setup).train()
        full.load_state_dict(base.state_dict())
        opt_lora, opt_full = _adamw(lora), _adamw(full)
        times = interleave({"lora": lambda: train_step(lora, ids, opt_lora),
                            "full": lambda: train_step(full, ids, opt_full)}, setup.pairs)
        results.append(print_result(Result(
            "P7", "LoRA step (c_attn r=8) / full fine-tune step, AdamW", median(times["lora"]),
            median(times["full"]), median_ratio(times, "lora", "full"), "<= 0.70")))
        note(f"FLOPs LoRA/full = {flops(lambda: train_step(lora, ids)) / flops(lambda: train_step(full, ids)):.4f} "
             "(fwd+bwd; REFERENCE.md's floor for GPT-2 small: 0.671)")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--only", default=None, help="comma-separated figure ids, e.g. P1,P6")
    args = parser.parse_args(argv)
    setup = configure(args)
    print(setup.describe())
    print(HEADER)
    run(setup, set(args.only.split(",")) if args.only else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
