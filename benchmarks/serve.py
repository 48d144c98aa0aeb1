"""`lorakit serve` throughput: P11.

    python -m benchmarks.serve [--quick] [--threads N] [--pairs N]

Requests go straight into the serving engine (``lorakit.serve.engine``, built by the same
``lorakit.serve.options.build`` the CLI uses) — no HTTP, which would cost both servers alike. Each
workload is 32 concurrent greedy requests (a 16-token prompt each, ``max_tokens`` generated, EOS ignored
so every request generates exactly that many) submitted at once:

- ``32 adapters``: each request on its own adapter (uniform); ``Zipf``: adapters drawn Zipf(1.1)-skewed;
- ``1 adapter``: every request on the same adapter; ``base``: no adapter;
- ``naive PEFT``: the server a PEFT user writes — one request at a time, ``set_adapter`` + ``generate``
  (PEFT 0.21, batch of one, KV cache on), over the same 32 adapters (8 requests per round; tokens/s).

Adapters: r=8 on q, k, v, o, B ≠ 0, saved in PEFT format and loaded by both. Full mode: the embedded
SmolLM2-135M; ``--quick``: a 4-layer random Llama with SmolLM2's tokenizer. Ratios are of generated
tokens/s, per interleaved round, median of the rounds. TTFT (submission → first token) p50/p99 is
reported for the 32-adapter workload and for the naive server (whose later requests wait for earlier ones).
Companion: the attention of one decode step with per-sequence caches vs one padded batch (the KV-cache
design measurement of docs/serving.md).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

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

N_ADAPTERS = 32
CONCURRENCY = 32
PROMPT_TOKENS = 16
NAIVE_REQUESTS = 8


def _model_dir(setup: Setup, root: Path) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lorakit.train.defaults import ensure_default_model

    smol = ensure_default_model()
    if not setup.quick:
        return smol
    tokenizer = AutoTokenizer.from_pretrained(smol)
    config = LlamaConfig(num_hidden_layers=4, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    path = root / "quick-llama"
    LlamaForCausalLM(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def _save_adapters(model_dir: Path, root: Path) -> Path:
    from lorakit import LoraConfig, get_peft_model
    from lorakit.train.loop import load_causal_lm

    adapters = root / "adapters"
    base, _ = load_causal_lm(model_dir)
    peft = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
                          "a0")
    for i in range(N_ADAPTERS):
        name = f"a{i}"
        if i:
            peft.add_adapter(name, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        with torch.no_grad():
            for module in peft.modules():
                if hasattr(module, "lora_B") and name in getattr(module, "lora_B", {}):
                    module.lora_B[name].weight.normal_(std=0.02)
        peft.save_pretrained(str(adapters / "tmp"), selected_adapters=[name], verify=False)
        source = adapters / "tmp" / name if name != "default" else adapters / "tmp"
        source.rename(adapters / name)
    return adapters


class _Workload:
    """32 requests into the engine at once; returns when all have finished. Records TTFTs."""

    def __init__(self, engine: Any, prompts: list[list[int]], max_tokens: int) -> None:
        self.engine = engine
        self.prompts = prompts
        self.max_tokens = max_tokens
        self.ttft: list[float] = []
        self.calls = 0

    def __call__(self, names: list[str | None]) -> None:
        from lorakit.serve.engine import Request
        from lorakit.serve.sampling import SamplingParams

        done = threading.Semaphore(0)
        submitted = time.perf_counter()
        firsts: list[float] = []

        def make_sink() -> Any:
            state = {"first": True}

            def on_output(out: Any) -> None:  # on the engine's worker thread
                if state["first"]:
                    state["first"] = False
                    firsts.append(time.perf_counter() - submitted)
                if out.finish_reason is not None:
                    assert out.finish_reason == "length", out
                    done.release()
            return on_output

        for prompt, name in zip(self.prompts, names, strict=True):
            self.engine.submit(Request(prompt, name, SamplingParams(max_tokens=self.max_tokens, temperature=0)),
                               make_sink())
        for _ in names:
            done.acquire()
        self.calls += 1
        if self.calls > 1:  # the first call is interleave's warm-up
            self.ttft.extend(firsts)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _prefill_seconds(model: Any, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    model(input_ids=ids)
    return time.perf_counter() - start


def _attention_companion(engine: Any) -> None:
    """One decode step's attention for 32 sequences of lengths 32…95: per-sequence SDPA over own caches vs a
    padded (32, heads, 95, d) batch with a mask (what a padded shared cache would run)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from lorakit.serve.kv_cache import RowCache, Segment, SequenceCache, rows_attention

    config = engine.registry.base.config
    heads, kv, dim = config.num_attention_heads, config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    module = engine.registry.base.get_decoder().layers[0].self_attn
    lengths = [32 + (i * 7) % 64 for i in range(CONCURRENCY)]
    caches = []
    for length in lengths:
        cache = SequenceCache(capacity=length + 1, keys=[torch.randn(kv, length + 1, dim)],
                              values=[torch.randn(kv, length + 1, dim)], length=length)
        caches.append(cache)
    query = torch.randn(CONCURRENCY, heads, 1, dim)
    rows = RowCache([Segment(c, i, i + 1) for i, c in enumerate(caches)])
    longest = max(lengths) + 1
    keys = torch.stack([torch.nn.functional.pad(c.keys[0], (0, 0, 0, longest - c.capacity)) for c in caches])
    values = torch.stack([torch.nn.functional.pad(c.values[0], (0, 0, 0, longest - c.capacity)) for c in caches])
    mask = torch.full((CONCURRENCY, 1, 1, longest), float("-inf"))
    for i, length in enumerate(lengths):
        mask[i, :, :, :length + 1] = 0

    times = interleave({
        "rows": lambda: rows_attention(module, query, None, None, None, scaling=dim ** -0.5, row_cache=rows),
        "padded": lambda: sdpa_attention_forward(module, query, keys, values, mask, scaling=dim ** -0.5),
    }, rounds=5)
    rows_ms, padded_ms = statistics.median(times["rows"]) * 1e3, statistics.median(times["padded"]) * 1e3
    note(f"KV design, one layer's decode attention for 32 sequences (lengths 33–96): per-sequence caches "
         f"{rows_ms:.2f} ms, one padded batch {padded_ms:.2f} ms (+ re-padding whenever a request joins or leaves)")


def run(setup: Setup, only: set[str] | None = None) -> list[Result]:
    if only is not None and "P11" not in only:
        return []
    from peft import PeftModel as HFPeftModel
    from transformers import AutoModelForCausalLM

    from lorakit.serve.options import ServeOptions, build

    max_tokens = 8 if setup.quick else 16
    tmp = tempfile.TemporaryDirectory()
    root = Path(tmp.name)
    model_dir = _model_dir(setup, root)
    adapters = _save_adapters(model_dir, root)
    _, engine = build(ServeOptions(model=model_dir, adapter_dirs=[adapters], max_batch_size=CONCURRENCY))
    engine.eos_ids.clear()  # every request generates exactly max_tokens
    engine.start()
    tokenizer = engine.tokenizer
    gen = torch.Generator().manual_seed(0)
    vocab = len(tokenizer)
    prompts = [torch.randint(100, vocab - 100, (PROMPT_TOKENS,), generator=gen).tolist() for _ in range(CONCURRENCY)]
    names = [f"a{i}" for i in range(N_ADAPTERS)]
    rng = random.Random(0)
    weights = [1 / (k + 1) ** 1.1 for k in range(N_ADAPTERS)]
    zipf = rng.choices(names, weights=weights, k=CONCURRENCY)
    uniform = _Workload(engine, prompts, max_tokens)
    workload = _Workload(engine, prompts, max_tokens)

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    naive = HFPeftModel.from_pretrained(base, str(adapters / "a0"), adapter_name="a0")
    for name in names[1:]:
        naive.load_adapter(str(adapters / name), adapter_name=name)
    naive.eval()
    naive_ttft: list[float] = []

    def naive_server(ttft: list[float] | None = None) -> None:
        start = time.perf_counter()
        for i in range(NAIVE_REQUESTS):
            naive.set_adapter(names[i])
            ids = torch.tensor([prompts[i]])
            with torch.no_grad():
                if ttft is not None:  # (untimed pass) its first token: after those queued before it + a prefill
                    ttft.append(time.perf_counter() - start + _prefill_seconds(naive, ids))
                naive.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                               min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)

    variants = {
        "32 adapters": lambda: uniform(list(names)),
        "zipf": lambda: workload(list(zipf)),
        "1 adapter": lambda: workload(["a0"] * CONCURRENCY),
        "base": lambda: workload([None] * CONCURRENCY),
        "naive": naive_server,
    }
    times = interleave(variants, rounds=setup.pairs, warmup=1, min_sample_s=0)
    naive_server(naive_ttft)
    ours_tokens, naive_tokens = CONCURRENCY * max_tokens, NAIVE_REQUESTS * max_tokens

    def rate(name: str) -> float:
        return (naive_tokens if name == "naive" else ours_tokens) / statistics.median(times[name])

    results = [
        Result("P11", "serve 32 adapters (uniform) / 1 adapter, tokens/s", rate("32 adapters"), rate("1 adapter"),
               1 / median_ratio(times, "32 adapters", "1 adapter"), ">= 0.8", unit="tok/s"),
        Result("P11", "serve 32 adapters (Zipf 1.1) / 1 adapter, tokens/s", rate("zipf"), rate("1 adapter"),
               1 / median_ratio(times, "zipf", "1 adapter"), ">= 0.8", unit="tok/s"),
        Result("P11", "serve 32 adapters (uniform) / naive PEFT server", rate("32 adapters"), rate("naive"),
               statistics.median((ours_tokens / a) / (naive_tokens / b)
                                 for a, b in zip(times["32 adapters"], times["naive"], strict=True)),
               ">= 4", unit="tok/s"),
    ]
    for result in results:
        print_result(result)
    note(f"1 adapter / base model alone: {1 / median_ratio(times, '1 adapter', 'base'):.3f} "
         f"({rate('1 adapter'):.1f} vs {rate('base'):.1f} tok/s) — the most merging one adapter could win")
    note(f"TTFT at concurrency 32 (32 adapters, all submitted at once): p50 {_percentile(uniform.ttft, 0.5) * 1e3:.0f} ms, "
         f"p99 {_percentile(uniform.ttft, 0.99) * 1e3:.0f} ms; naive server: p50 "
         f"{_percentile(naive_ttft, 0.5) * 1e3:.0f} ms, p99 {_percentile(naive_ttft, 0.99) * 1e3:.0f} ms "
         f"(over {NAIVE_REQUESTS} queued requests; a 32-deep queue waits 4× longer)")
    _attention_companion(engine)
    engine.stop()
    tmp.cleanup()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    setup = configure(args)
    load = os.getloadavg()
    print(f"P11 lorakit serve, {'quick: 4-layer random Llama' if setup.quick else 'full: SmolLM2-135M'}, "
          f"{CONCURRENCY} concurrent requests x {PROMPT_TOKENS}-token prompts, {setup.threads} thread(s), "
          f"median of {setup.pairs} interleaved rounds, load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(HEADER)
    run(setup)
    return 0


if __name__ == "__main__":
    sys.exit(main())
