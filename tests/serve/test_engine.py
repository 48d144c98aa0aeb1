"""The engine without HTTP: continuous batching gives each request exactly what it gets alone in PEFT."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from lorakit.serve.engine import Output, QueueFullError, Request
from lorakit.serve.registry import UnknownAdapterError
from lorakit.serve.sampling import SamplingParams

from .conftest import N_ADAPTERS, PeftReference, make_engine


class Collector:
    """A sink that gathers one request's outputs and signals when it has k tokens / has finished."""

    def __init__(self) -> None:
        self.outputs: list[Output] = []
        self.done = threading.Event()
        self.lock = threading.Condition()

    def __call__(self, out: Output) -> None:
        with self.lock:
            self.outputs.append(out)
            self.lock.notify_all()
        if out.finish_reason is not None:
            self.done.set()

    @property
    def tokens(self) -> list[int]:
        return [t for o in self.outputs for t in o.token_ids]

    @property
    def text(self) -> str:
        return "".join(o.text for o in self.outputs)

    def wait_tokens(self, count: int, timeout: float = 60) -> None:
        with self.lock:
            assert self.lock.wait_for(lambda: len(self.tokens) >= count or self.done.is_set(), timeout)

    def result(self, timeout: float = 120) -> Output:
        assert self.done.wait(timeout), "request did not finish"
        return self.outputs[-1]


def _requests(count: int, seed: int) -> list[tuple[list[int], str | None, int]]:
    """(prompt ids, adapter or None, max_tokens): prompt lengths 3…40, every 6th on the base."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        length = int(torch.randint(3, 41, (1,), generator=gen))
        prompt = torch.randint(2, 258, (length,), generator=gen).tolist()
        adapter = None if i % 6 == 5 else f"a{i % N_ADAPTERS}"
        out.append((prompt, adapter, int(torch.randint(6, 20, (1,), generator=gen))))
    return out


def test_concurrent_greedy_requests_match_peft_generate_alone(engine: Any, peft_reference: PeftReference) -> None:
    """36 greedy requests over 9 adapters and the base, 12 of them first and 24 joining while those run:
    every token sequence equals PEFT's generate for that request alone (fp32), and the scheduler trace
    shows prefills of late requests in the same forward as decodes of early ones."""
    specs = _requests(36, seed=7)
    sinks = [Collector() for _ in specs]

    def submit(i: int) -> None:
        prompt, adapter, max_tokens = specs[i]
        engine.submit(Request(prompt, adapter, SamplingParams(max_tokens=max_tokens, temperature=0), f"r{i}"),
                      sinks[i])

    for i in range(12):
        submit(i)
    for i in range(12):
        sinks[i].wait_tokens(2)  # every early request is mid-generation (or done) before the rest arrive
    for i in range(12, 36):
        submit(i)
    results = [s.result() for s in sinks]
    for i, (prompt, adapter, max_tokens) in enumerate(specs):
        expected = peft_reference.generate(prompt, adapter, max_tokens)
        assert sinks[i].tokens == expected, f"request {i} (adapter {adapter}) differs from PEFT alone"
        assert results[i].finish_reason == ("length" if len(expected) == max_tokens else "stop")
        assert results[i].completion_tokens in (len(expected), len(expected) + 1)
    joined = [step for step in engine.trace
              if any(kind == "prefill" and int(rid[1:]) >= 12 for rid, kind, _ in step.rows)
              and any(kind == "decode" and int(rid[1:]) < 12 for rid, kind, _ in step.rows)]
    assert joined, "no step mixed a late request's prefill with an early request's decode"
    assert max(len(step.rows) for step in engine.trace) > 12
    assert engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0


def test_sampling_with_a_seed_is_reproducible_and_independent_of_the_batch(engine: Any) -> None:
    prompt = list(b"Once upon a time")
    params = dict(max_tokens=12, temperature=0.9, top_p=0.9, seed=42)
    alone = Collector()
    engine.submit(Request(prompt, "a1", SamplingParams(**params)), alone)
    alone.result()
    crowd = [Collector() for _ in range(8)]
    for i, sink in enumerate(crowd):  # same request among others with other seeds
        engine.submit(Request(prompt, "a1", SamplingParams(**(params | {"seed": 42 if i == 3 else i}))), sink)
    for sink in crowd:
        sink.result()
    assert crowd[3].tokens == alone.tokens
    assert len({tuple(s.tokens) for s in crowd}) > 1  # the seed matters


def test_stop_string_ends_the_text_before_it(engine: Any) -> None:
    first = Collector()
    engine.submit(Request(list(b"abc"), "a2", SamplingParams(max_tokens=12, temperature=0)), first)
    first.result()
    full = first.text
    assert len(full) >= 6
    stop = full[3:5]
    second = Collector()
    engine.submit(Request(list(b"abc"), "a2", SamplingParams(max_tokens=12, temperature=0, stop=[stop])), second)
    out = second.result()
    assert out.finish_reason == "stop"
    assert second.text == full[:full.find(stop)]


def test_cancel_frees_the_slot_at_once(engine: Any) -> None:
    sink = Collector()
    handle = engine.submit(Request(list(b"hello"), "a0", SamplingParams(max_tokens=200, temperature=0)), sink)
    sink.wait_tokens(2)
    handle.cancel()
    assert sink.result().finish_reason == "cancelled"
    assert engine.stats() == {"running": 0, "waiting": 0, "free_slots": 64, "cache_bytes": 0}


def test_submit_refuses_unknown_adapter_too_long_and_full_queue(serve_dirs: tuple[Path, Path]) -> None:
    model_dir, adapters = serve_dirs
    eng = make_engine(model_dir, adapters, ["a0"], max_queue=2, max_model_len=64)  # not started: the queue stays
    with pytest.raises(UnknownAdapterError, match=r"'nope' does not exist; available: \['a0'\]"):
        eng.submit(Request([5, 6], "nope", SamplingParams()), Collector())
    with pytest.raises(ValueError, match="maximum context length is 64 tokens.*60 prompt tokens"):
        eng.submit(Request([5] * 60, None, SamplingParams(max_tokens=10)), Collector())
    eng.submit(Request([5], None, SamplingParams()), Collector())
    eng.submit(Request([5], "a0", SamplingParams()), Collector())
    with pytest.raises(QueueFullError, match="--max-queue=2"):
        eng.submit(Request([5], None, SamplingParams()), Collector())
    eng.stop()


def test_lru_eviction_reloads_on_demand_with_the_same_output(serve_dirs: tuple[Path, Path]) -> None:
    model_dir, adapters = serve_dirs
    eng = make_engine(model_dir, adapters, [], max_loaded=2, max_batch_size=8)
    for i in range(N_ADAPTERS):
        eng.registry.register(f"a{i}", eng.registry.check_path(adapters / f"a{i}"))
    eng.start()
    try:
        def run(names: list[str]) -> list[list[int]]:
            sinks = [Collector() for _ in names]
            for name, sink in zip(names, sinks, strict=True):
                eng.submit(Request(list(b"lru test"), name, SamplingParams(max_tokens=6, temperature=0)), sink)
            for sink in sinks:
                assert sink.result().finish_reason in ("stop", "length")
            return [s.tokens for s in sinks]

        first = run(["a0", "a1", "a2", "a3"])  # 4 adapters, 2 slots: they take turns
        assert len(eng.registry.loaded_names()) <= 2
        assert eng.registry.evictions >= 2
        loads = eng.registry.loads
        again = run(["a0", "a1", "a2", "a3"])
        assert again == first
        assert eng.registry.loads > loads  # evicted adapters came back from disk
    finally:
        eng.stop()


def test_unload_lets_running_requests_finish(engine: Any) -> None:
    sink = Collector()
    engine.submit(Request(list(b"drain"), "a4", SamplingParams(max_tokens=30, temperature=0)), sink)
    sink.wait_tokens(2)
    assert engine.call(lambda: engine.registry.unregister("a4")).result(timeout=30) == 1
    with pytest.raises(UnknownAdapterError):
        engine.submit(Request([5], "a4", SamplingParams()), Collector())
    assert sink.result().finish_reason in ("length", "stop")
    deadline = time.monotonic() + 30
    while "a4" in engine.registry.loaded_names() and time.monotonic() < deadline:
        engine.call(lambda: None).result(timeout=30)
    assert "a4" not in engine.registry.loaded_names()


def test_unloaded_while_queued_and_evicted_still_finishes(serve_dirs: tuple[Path, Path]) -> None:
    """max 1 loaded: a1's request waits while a0 runs; a1 is unloaded meanwhile — the accepted request is
    still served (a1 is loaded from its directory once a0 is idle), then a1 is gone."""
    model_dir, adapters = serve_dirs
    eng = make_engine(model_dir, adapters, ["a0"], max_loaded=1, max_batch_size=8)
    eng.registry.register("a1", eng.registry.check_path(adapters / "a1"))
    eng.eos_ids.clear()
    gate = threading.Event()
    eng.start()
    try:
        eng.call(gate.wait)
        first, second = Collector(), Collector()
        eng.submit(Request(list(b"first"), "a0", SamplingParams(max_tokens=20, temperature=0), "first"), first)
        eng.submit(Request(list(b"second"), "a1", SamplingParams(max_tokens=5, temperature=0), "second"), second)
        assert eng.registry.unregister("a1") == 1
        gate.set()
        assert first.result().finish_reason == "length"
        assert second.result().finish_reason == "length" and len(second.tokens) == 5
        eng.call(lambda: None).result(timeout=30)
        assert "a1" not in eng.registry.loaded_names() and eng.registry.names() == ["a0"]
        # a0 ran alone first: a1 could only load once a0's sequence had finished
        ran = [{rid for rid, _, _ in step.rows} for step in eng.trace]
        assert {"first"} in ran and {"second"} in ran and {"first", "second"} not in ran
    finally:
        eng.stop()
