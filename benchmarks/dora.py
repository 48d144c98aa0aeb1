"""DoRA figure: P12 (DoRA train step ours / PEFT's; DoRA / LoRA step, ours).

    python -m benchmarks.dora [--quick] [--threads N] [--pairs N]

P12: forward + backward + AdamW step on the GPT-2-small-shaped model, all-linear r=8 α=16, LoRA dropout 0
     (with dropout active both libraries run the base product a second time on the dropped input, as
     PEFT defines DoRA there, so p = 0 is where the implementations differ). Three variants interleaved in
     one run: lorakit DoRA, PEFT 0.21 DoRA, lorakit plain LoRA. Companions: saved-activation bytes and
     FLOPs of the forward, ours / PEFT (deterministic), and the time of the per-output-feature norms
     ‖W0 + s·B·A‖ of all adapted layers, ours (small products, ‖W0‖² cached) / PEFT's (B·A formed through an
     identity matrix, added to W0, norm of the sum), interleaved.
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
    base_model,
    configure,
    flops,
    interleave,
    median,
    median_ratio,
    note,
    ours,
    peft_available,
    print_result,
    saved_activation_bytes,
    token_batch,
    train_step,
)


def ours_dora(model: nn.Module, setup: Setup) -> Any:
    from lorakit import LoraConfig, get_peft_model

    config = LoraConfig(r=setup.r, lora_alpha=setup.alpha, target_modules="all-linear", use_dora=True)
    return get_peft_model(copy.deepcopy(model), config)


def peft_dora(model: nn.Module, setup: Setup) -> Any:
    import peft

    config = peft.LoraConfig(r=setup.r, lora_alpha=setup.alpha, target_modules="all-linear", use_dora=True,
                             fan_in_fan_out=True, task_type="CAUSAL_LM")
    return peft.get_peft_model(copy.deepcopy(model), config)


def _adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def run(setup: Setup, only: set[str] | None = None) -> list[Result]:
    if only is not None and "P12" not in only:
        return []
    if not peft_available():
        note("P12 skipped: PEFT is not installed")
        return []
    base = base_model(setup).train()
    ids = token_batch(setup)
    mine, theirs, lora = ours_dora(base, setup).train(), peft_dora(base, setup).train(), ours(base, setup).train()
    optimizers = {name: _adamw(model) for name, model in (("ours", mine), ("peft", theirs), ("lora", lora))}
    models = {"ours": mine, "peft": theirs, "lora": lora}
    times = interleave({name: lambda m=models[name], o=optimizers[name]: train_step(m, ids, o) for name in models},
                       setup.pairs)
    results = [
        print_result(Result("P12", "DoRA train step ours / PEFT (all-linear, p=0)", median(times["ours"]),
                            median(times["peft"]), median_ratio(times, "ours", "peft"), "<= 0.80")),
        print_result(Result("P12", "DoRA step / LoRA step, ours (all-linear, p=0)", median(times["ours"]),
                            median(times["lora"]), median_ratio(times, "ours", "lora"), "reported")),
    ]

    def forward_loss(model: nn.Module) -> None:
        loss = model(input_ids=ids, labels=ids).loss
        del loss

    saved = {name: saved_activation_bytes(models[name], lambda m=models[name]: forward_loss(m)) for name in models}
    note(f"saved activations ours / PEFT = {saved['ours'] / saved['peft']:.3f} ({saved['ours'] / 2**20:.1f} / "
         f"{saved['peft'] / 2**20:.1f} MiB); DoRA / LoRA ours = {saved['ours'] / saved['lora']:.3f}")
    fl = {name: flops(lambda m=models[name]: forward_loss(m)) for name in ("ours", "peft")}
    note(f"forward FLOPs ours / PEFT = {fl['ours'] / fl['peft']:.4f}")
    norms = interleave({"ours": lambda: _our_norms(mine), "peft": lambda: _peft_norms(theirs)}, setup.pairs)
    note(f"norms ‖W0 + s·B·A‖ of all adapted layers: ours {median(norms['ours']) * 1e3:.1f} ms, PEFT's "
         f"{median(norms['peft']) * 1e3:.1f} ms, ratio {median_ratio(norms, 'ours', 'peft'):.3f}")
    return results


@torch.no_grad()
def _our_norms(model: nn.Module) -> None:
    for layer in model.modules():
        for name, variant in getattr(layer, "lora_variant", {}).items():
            variant.weight_norm(layer, name)


@torch.no_grad()
def _peft_norms(model: nn.Module) -> None:
    for layer in model.modules():
        dora_layers = getattr(layer, "lora_magnitude_vector", None)
        if not dora_layers or not hasattr(layer, "get_base_layer"):
            continue
        for name, dora_layer in dora_layers.items():  # what PEFT's DoraLinearLayer.forward does for the norm
            lora_weight = dora_layer.get_lora_weight(lora_A=layer.lora_A[name], lora_B=layer.lora_B[name])
            dora_layer.get_weight_norm(layer.get_base_layer().weight, lora_weight, layer.scaling[name])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    setup = configure(args)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{setup.describe()}; load {load:.2f}")
    print(HEADER)
    run(setup)
    return 0


if __name__ == "__main__":
    sys.exit(main())
