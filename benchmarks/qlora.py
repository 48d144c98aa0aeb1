"""P13, QLoRA: a quantized (NF4) base against the fp32 base, LoRA on all linear layers.

    python -m benchmarks.qlora [--quick] [--threads N] [--pairs N] [--accuracy [--accuracy-steps N]] [--base-accuracy N]

- base linear weight bytes NF4 / fp32: a deterministic count (``lorakit.quant.quantized_weight_bytes``:
  codes + scales + tables of every quantized layer), goal ≤ 0.3; int8 and the whole model beside it;
- train step (forward + backward + AdamW) on the NF4 base / on the fp32 base, interleaved, median of
  ≥ 5 rounds; reported, and profiled when above 2× (the top ops by self CPU time of one NF4 step);
- ``--accuracy``: the default ``lorakit train`` task (SmolLM2-135M-Instruct, Rotten Tomatoes) trained
  twice, ``lorakit train`` (fp32 base, q_proj+v_proj) and ``lorakit train --quantize nf4`` (NF4 base, and
  all-linear: ``--quantize``'s default targets, QLoRA's recipe), held-out accuracy difference in points,
  goal within 2;
- ``--base-accuracy N``: companion, the same task's accuracy of the untrained base, fp32 and NF4.

Model: a randomly initialised Llama with SmolLM2-135M's shapes (30 layers, d=576, MLP 1536, 9 heads,
3 KV heads, vocab 49152), B8 T128, r=8 α=16 (``--quick``: 2 layers d=256, B4 T32). The output head
(tied to the embedding) stays full precision, as in QLoRA.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from typing import Any

import torch
from torch import nn

from .common import (
    HEADER,
    Result,
    Setup,
    add_arguments,
    configure,
    interleave,
    median_ratio,
    note,
    print_result,
)

SMOLLM2 = dict(num_hidden_layers=30, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152)
QUICK = dict(num_hidden_layers=2, hidden_size=256, intermediate_size=768, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=2048)


def llama(setup: Setup) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**(QUICK if setup.quick else SMOLLM2), max_position_embeddings=max(256, setup.seq),
                         tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def with_lora(model: nn.Module, setup: Setup, quant_type: str | None) -> tuple[Any, torch.optim.Optimizer]:
    from lorakit import LoraConfig, get_peft_model
    from lorakit.quant import quantize_model

    peft = get_peft_model(copy.deepcopy(model), LoraConfig(r=setup.r, lora_alpha=setup.alpha,
                                                           target_modules="all-linear"))
    if quant_type is not None:
        quantize_model(peft, quant_type)
    peft.train()
    return peft, torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-4)


def _step(model: Any, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> None:
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def run(setup: Setup, accuracy: bool = False, accuracy_steps: int | None = None) -> list[Result]:
    from lorakit.quant import quantized_weight_bytes

    base = llama(setup)
    results: list[Result] = []
    nf4, nf4_opt = with_lora(base, setup, "nf4")
    int8, _ = with_lora(base, setup, "int8")
    stored, full = quantized_weight_bytes(nf4)
    results.append(print_result(Result("P13", "base linear weight bytes NF4 / fp32", stored, full, stored / full,
                                       "<= 0.3", unit="B")))
    stored8, full8 = quantized_weight_bytes(int8)
    note(f"int8: {stored8:,} B / {full8:,} B = {stored8 / full8:.4f}")
    frozen = [p for n, p in base.named_parameters()]
    whole_fp32 = 4 * sum(p.numel() for p in frozen)
    whole_nf4 = whole_fp32 - full + stored
    note(f"whole base incl. the full-precision embedding/head (tied) and norms: NF4 {whole_nf4:,} B / fp32 "
         f"{whole_fp32:,} B = {whole_nf4 / whole_fp32:.4f}")
    del int8

    fp32, fp32_opt = with_lora(base, setup, None)
    ids = torch.randint(1, base.config.vocab_size, (setup.batch, setup.seq), generator=torch.Generator().manual_seed(0))
    times = interleave({"nf4": lambda: _step(nf4, nf4_opt, ids), "fp32": lambda: _step(fp32, fp32_opt, ids)},
                       setup.pairs)
    ratio = median_ratio(times, "nf4", "fp32")
    results.append(print_result(Result("P13", "train step NF4 base / fp32 base (profile if > 2)",
                                       min(times["nf4"]), min(times["fp32"]), ratio, "<= 2")))
    layers = sum(1 for m in nf4.modules() if type(m).__name__ == "QuantizedLinear")
    note(f"{layers} quantized layers, each dequantized twice per step (forward, and backward for ∂L/∂x)")
    if ratio > 2:
        _profile(nf4, nf4_opt, ids)
    if accuracy:
        results.append(print_result(_accuracy(accuracy_steps, setup.threads)))
    return results


def _profile(model: Any, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _step(model, optimizer, ids)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    shares = ", ".join(f"{e.key} {100 * e.self_cpu_time_total / total:.0f} %" for e in events[:6])
    note(f"profile of one NF4 step, self CPU time: {shares}")


def _accuracy(steps: int | None, threads: int) -> Result:
    from lorakit.train.loop import train
    from lorakit.train.options import TrainOptions

    accuracies = {}
    for quantize in (None, "nf4"):
        out = f"runs/bench-qlora-{quantize or 'fp32'}"
        opts = TrainOptions(output_dir=out, quantize=quantize, max_steps=steps, threads=threads, progress=False,
                            samples=0)
        accuracies[quantize] = train(opts)["after"]["accuracy"] * 100
    nf4, fp32 = accuracies["nf4"], accuracies[None]
    return Result("P13", f"default-task accuracy NF4 - fp32 (points){'' if steps is None else f', {steps} steps'}",
                  nf4, fp32, nf4 - fp32, "0 +- 2", unit="%")


def base_accuracy(eval_size: int, threads: int) -> None:
    """Companion: the default task's held-out accuracy of the untrained base, fp32 and NF4 (same examples)."""
    from lorakit.quant import quantize_model
    from lorakit.train.defaults import ensure_default_model
    from lorakit.train.loop import evaluate, load_causal_lm, load_task
    from lorakit.train.options import TrainOptions

    opts = TrainOptions(eval_size=eval_size, threads=threads, progress=False)
    model, tokenizer = load_causal_lm(ensure_default_model())
    task = load_task(opts)
    fp32 = evaluate(model.eval(), tokenizer, task, opts)
    nf4 = evaluate(quantize_model(copy.deepcopy(model), "nf4"), tokenizer, task, opts)
    note(f"default task, base without LoRA, n={fp32['n']}: accuracy fp32 {100 * fp32['accuracy']:.1f} %, NF4 "
         f"{100 * nf4['accuracy']:.1f} % ({100 * (nf4['accuracy'] - fp32['accuracy']):+.1f} points)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--accuracy", action="store_true", help="also train the default task twice (fp32, nf4)")
    parser.add_argument("--accuracy-steps", type=int, default=None, help="optimizer steps of those runs (default: "
                        "the default task's one epoch)")
    parser.add_argument("--base-accuracy", type=int, default=0, metavar="N",
                        help="also score the untrained default-task base, fp32 and NF4, on N held-out examples")
    args = parser.parse_args(argv)
    setup = configure(args)
    load = os.getloadavg()
    print(f"P13 QLoRA, load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; Llama "
          f"{'quick' if setup.quick else 'SmolLM2-135M'} shapes, B{setup.batch} T{setup.seq}, r={setup.r}, "
          f"all-linear, {setup.threads} thread(s), median of {setup.pairs} interleaved rounds")
    print(HEADER)
    run(setup, args.accuracy, args.accuracy_steps)
    if args.base_accuracy:
        base_accuracy(args.base_accuracy, setup.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
