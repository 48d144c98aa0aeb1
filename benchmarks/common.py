"""Shared machinery of the benchmarks: the protocol of ../shared/BENCHMARKS.md in one place.

- ``Setup``: the reference model shape (GPT-2 small: 12 layers, d=768, B8 T128, r=8, α=16) or, with
  ``--quick``, a small one; the GPT-2 model's own dropouts are 0 so only LoRA dropout differs.
- ``interleave``: variants run round-robin (A B C, then C B A, …) after a warm-up, ratios taken per round
  and the median reported, so slow drifts of a shared machine cancel.
- deterministic companions: FLOPs (``torch.utils.flop_counter``), saved-activation bytes
  (``saved_tensors_hooks``, parameters excluded, each storage counted once), ATen op counts.
- ``Result``/``print_result``: one line per figure, ``id name ours reference ratio goal PASS/FAIL``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class Setup:
    quick: bool
    threads: int
    pairs: int
    n_layer: int
    n_embd: int
    n_head: int
    vocab: int
    batch: int
    seq: int
    clock: str = "wall"
    r: int = 8
    alpha: int = 16

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Setup:
        if args.quick:
            return cls(True, args.threads, max(args.pairs, 5), n_layer=2, n_embd=128, n_head=4, vocab=2048,
                       batch=4, seq=32, clock=args.clock)
        return cls(False, args.threads, max(args.pairs, 5), n_layer=12, n_embd=768, n_head=12, vocab=50257,
                   batch=8, seq=128, clock=args.clock)

    def describe(self) -> str:
        return (f"{'quick' if self.quick else 'full'}: GPT-2 {self.n_layer} layers d={self.n_embd} vocab={self.vocab}, "
                f"B{self.batch} T{self.seq}, r={self.r} α={self.alpha}, {self.threads} thread(s), "
                f"{self.clock} clock, median of {self.pairs} interleaved rounds (P1, P3 prefill 3×; P4 2×; P3 decode 4×)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small shapes, the whole suite in < 60 s")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--pairs", type=int, default=5, help="interleaved rounds (≥ 5; median reported)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall: perf_counter (default); cpu: this process's CPU time, which on a busy shared "
                             "machine leaves out the time other processes hold the cores (use with --threads 1)")


_CLOCK: Callable[[], float] = time.perf_counter


def configure(args: argparse.Namespace) -> Setup:
    global _CLOCK
    setup = Setup.from_args(args)
    _CLOCK = time.process_time if setup.clock == "cpu" else time.perf_counter
    torch.set_num_threads(setup.threads)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass
    return setup


# ---------------------------------------------------------------------------------------------- models
def base_model(setup: Setup) -> nn.Module:
    """A randomly initialised GPT-2-shaped LM (no GPT-2 weights are reachable here; see REFERENCE.md)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=setup.n_layer, n_embd=setup.n_embd, n_head=setup.n_head,
                        vocab_size=setup.vocab, n_positions=max(1024, setup.seq + 64), resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return GPT2LMHeadModel(config)


def ours(model: nn.Module, setup: Setup, targets: Any = "all-linear", dropout: float = 0.0,
         name: str = "default") -> Any:
    from lorakit import LoraConfig, get_peft_model

    config = LoraConfig(r=setup.r, lora_alpha=setup.alpha, target_modules=targets, lora_dropout=dropout)
    return get_peft_model(copy.deepcopy(model), config, name)


def peft_available() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def peft_config(setup: Setup, targets: Any = "all-linear", dropout: float = 0.0) -> Any:
    import peft

    return peft.LoraConfig(r=setup.r, lora_alpha=setup.alpha, target_modules=targets, lora_dropout=dropout,
                           fan_in_fan_out=True, task_type="CAUSAL_LM")


def reference_peft(model: nn.Module, setup: Setup, targets: Any = "all-linear", dropout: float = 0.0,
                   name: str = "default") -> Any:
    import peft

    return peft.get_peft_model(copy.deepcopy(model), peft_config(setup, targets, dropout), adapter_name=name)


def frozen_floor(model: nn.Module) -> nn.Module:
    """The P1 floor: every parameter frozen, the embedding output requiring grad (so backward runs)."""
    floor = copy.deepcopy(model)
    floor.requires_grad_(False)
    floor.transformer.wte.register_forward_hook(lambda module, inputs, out: out.detach().requires_grad_())
    return floor


def token_batch(setup: Setup, batch: int | None = None, seq: int | None = None) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, setup.vocab, (batch or setup.batch, seq or setup.seq), generator=generator)


def train_step(model: nn.Module, ids: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
    model(input_ids=ids, labels=ids).loss.backward()
    if optimizer is not None:
        optimizer.step()
    model.zero_grad(set_to_none=True)


def cache_kwarg(model: nn.Module) -> str:
    """transformers 5 names the KV-cache argument ``cache``; older releases ``past_key_values``."""
    import inspect

    from transformers import GPT2LMHeadModel

    return "cache" if "cache" in inspect.signature(GPT2LMHeadModel.forward).parameters else "past_key_values"


# ---------------------------------------------------------------------------------------------- timing
def _time(fn: Callable[[], object], reps: int) -> float:
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = _CLOCK()
        for _ in range(reps):
            fn()
        return (_CLOCK() - start) / reps
    finally:
        if gc_was_enabled:
            gc.enable()


def interleave(variants: dict[str, Callable[[], object]], rounds: int, warmup: int = 1,
               after: dict[str, Callable[[], object]] | None = None, min_sample_s: float = 0.05
               ) -> dict[str, list[float]]:
    """Seconds per call of each variant, run round-robin (order reversed every other round).

    A sample repeats a call until it lasts ``min_sample_s`` (the same count for every variant, fixed
    during warm-up), so short calls are not lost in timer and scheduler noise. ``after[name]`` runs
    untimed after each sample of ``name`` (e.g. unmerge after a timed merge: pass ``min_sample_s=0``
    there so that a sample is one call).
    """
    after = after or {}
    names = list(variants)
    slowest = 0.0
    for _ in range(warmup):
        for name in names:
            slowest = max(slowest, _time(variants[name], 1))
            after.get(name, lambda: None)()
    reps = max(1, min(50, int(min_sample_s / max(slowest, 1e-6))))
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(rounds):
        for name in names if i % 2 == 0 else reversed(names):
            times[name].append(_time(variants[name], reps))
            after.get(name, lambda: None)()
    return times


def median_ratio(times: dict[str, list[float]], numerator: str, denominator: str) -> float:
    return statistics.median(a / b for a, b in zip(times[numerator], times[denominator], strict=True))


def median(values: list[float]) -> float:
    return statistics.median(values)


# ---------------------------------------------------------------------------------------------- companions
def flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def saved_activation_bytes(model: nn.Module, fn: Callable[[], object]) -> int:
    """Bytes of the tensors autograd saves for backward during ``fn``, each storage once, parameters and
    buffers excluded (they are kept anyway)."""
    kept = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in kept:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(storages.values())


class AtenOpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.count += 1
        return func(*args, **(kwargs or {}))


def aten_ops(fn: Callable[[], object]) -> int:
    with AtenOpCounter() as counter:
        fn()
    return counter.count


# ---------------------------------------------------------------------------------------------- output
@dataclass
class Result:
    id: str
    name: str
    ours: float
    reference: float
    ratio: float
    goal: str  # "<= 1.03", ">= …" or "1.00 +- 0.02"
    unit: str = "ms"

    @property
    def passed(self) -> bool:
        op, _, value = self.goal.partition(" ")
        if op == "<=":
            return self.ratio <= float(value)
        if op == ">=":
            return self.ratio >= float(value)
        if "+-" in self.goal:
            centre, tolerance = (float(v) for v in self.goal.split("+-"))
            return abs(self.ratio - centre) <= tolerance
        raise ValueError(f"unknown goal {self.goal!r}")

    def line(self) -> str:
        def fmt(v: float) -> str:
            return f"{v * 1e3:.1f}ms" if self.unit == "ms" else f"{v:.4g}{self.unit}"

        return (f"{self.id:<4} {self.name:<52} {fmt(self.ours):>11} {fmt(self.reference):>11} "
                f"{self.ratio:>7.3f} {self.goal:>12} {'PASS' if self.passed else 'FAIL'}")


HEADER = f"{'id':<4} {'name':<52} {'ours':>11} {'reference':>11} {'ratio':>7} {'goal':>12} result"


def print_result(result: Result) -> Result:
    print(result.line(), flush=True)
    return result


def note(text: str) -> None:
    """A companion line (deterministic counts, context): indented under the figures."""
    print(f"     · {text}", flush=True)
