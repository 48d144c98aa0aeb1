"""The serving engine: a continuous-batching scheduler over one base model and many LoRA adapters.

One worker thread owns the model, the running batch and every KV cache. Each iteration (a *step*):

1. run queued commands (adapter load/unload) — the model only changes between steps;
2. drop cancelled sequences (their cache is freed at once);
3. admit waiting requests while fewer than ``max_batch_size`` run (loading an evicted adapter if needed);
4. one forward over every token to compute now — the prompts of the admitted requests (prefill, batched)
   and the last token of every running sequence (decode) — each row with its own adapter through
   lorakit's mixed-batch path (``adapter_names``), attention per sequence over its own cache
   (``lorakit.serve.kv_cache``);
5. choose each sequence's next token, hand text deltas to its sink, retire finished sequences.

So requests join and leave at step boundaries, never waiting for others to finish. The engine knows
nothing of HTTP: ``submit`` takes token ids and a sink callable, called on the worker thread with
``Output`` objects (the routes forward them to the event loop). No lock is held across a step; the
lock only guards the queue.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from ..layers.base import BASE_ROW
from .kv_cache import ATTENTION_NAME, RowCache, Segment, SequenceCache, register_attention
from .registry import AdapterRegistry, UnknownAdapterError
from .sampling import Sampler, SamplingParams, TextStream


class QueueFullError(RuntimeError):
    """``--max-queue`` requests are already waiting (HTTP 429)."""


@dataclass
class Output:
    """One event of a request: new text and tokens; ``finish_reason`` set on the last one."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" (EOS or a stop string) | "length" | "cancelled" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    error_status: int = 0  # with finish_reason "error": 400 (the request's adapter failed to load) or 500


Sink = Callable[[Output], None]


@dataclass
class Request:
    """A generation request as the engine sees it: token ids, an adapter (None: the base), sampling."""

    prompt_ids: list[int]
    adapter: str | None
    params: SamplingParams
    request_id: str = ""


@dataclass
class _Sequence:
    request: Request
    sink: Sink
    sampler: Sampler
    stream: TextStream
    cache: SequenceCache
    pending: list[int]  # tokens to feed at the next step (the prompt, then the last sampled token)
    generated: int = 0
    cancelled: bool = False
    admitted_at: float = 0.0
    submitted_at: float = field(default_factory=time.perf_counter)
    last_token_at: float = 0.0


@dataclass(frozen=True)
class StepRecord:
    """What one forward computed: (request_id, "prefill" | "decode", tokens) per sequence."""

    step: int
    rows: tuple[tuple[str, str, int], ...]


class RequestHandle:
    """Returned by ``submit``: ``cancel()`` frees the request's slot at the next step boundary."""

    def __init__(self, engine: Engine, seq: _Sequence) -> None:
        self._engine = engine
        self._seq = seq

    def cancel(self) -> None:
        self._seq.cancelled = True
        self._engine._wake()


class Engine:
    """Continuous batching over one causal LM with per-row adapters (see the module docstring).

    Args:
        registry: the adapters (and, through it, the model).
        tokenizer: a Hugging Face tokenizer (for text deltas and stop strings).
        max_batch_size: most sequences in the running batch.
        max_queue: most requests waiting to join it; one more → ``QueueFullError``.
        max_model_len: most prompt + generated tokens per request (default: the model's
            ``max_position_embeddings``).
        metrics: optional ``lorakit.serve.metrics.ServeMetrics`` to report to.
        trace_steps: how many recent ``StepRecord`` to keep (``trace``).
    """

    def __init__(self, registry: AdapterRegistry, tokenizer: Any, max_batch_size: int = 32, max_queue: int = 256,
                 max_model_len: int | None = None, metrics: Any = None, trace_steps: int = 4096) -> None:
        if max_batch_size < 1:
            raise ValueError(f"--max-batch-size={max_batch_size} must be at least 1.")
        if max_queue < 1:
            raise ValueError(f"--max-queue={max_queue} must be at least 1.")
        config = registry.base.config
        limit = getattr(config, "max_position_embeddings", None)
        if max_model_len is None:
            max_model_len = limit or 2048
        if max_model_len < 2 or (limit is not None and max_model_len > limit):
            raise ValueError(f"--max-model-len={max_model_len} must be in [2, {limit}] (the model's "
                             "max_position_embeddings).")
        self.registry = registry
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_model_len = max_model_len
        self.metrics = metrics
        eos = getattr(getattr(registry.base, "generation_config", None), "eos_token_id", None)
        eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        self.eos_ids = eos_ids
        self.trace: collections.deque[StepRecord] = collections.deque(maxlen=trace_steps)
        self.steps = 0
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._running: list[_Sequence] = []
        self._commands: queue.SimpleQueue[tuple[Callable[[], Any], Future]] = queue.SimpleQueue()
        self._cond = threading.Condition()
        self._stopping = False
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        register_attention()
        self._device = next(registry.base.parameters()).device

    # ------------------------------------------------------------------ public (any thread)
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="lorakit-serve-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Finish the current step, fail what is left ("cancelled"), stop the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None

    def submit(self, request: Request, sink: Sink) -> RequestHandle:
        """Queue ``request``; ``sink`` receives its ``Output`` events on the worker thread.

        Raises:
            UnknownAdapterError: ``request.adapter`` is not a known adapter.
            ValueError: empty prompt, or prompt + max_tokens over ``max_model_len``.
            QueueFullError: ``max_queue`` requests already wait.
        """
        total = len(request.prompt_ids) + request.params.max_tokens
        if not request.prompt_ids:
            raise ValueError("the prompt is empty; give at least one token of text.")
        if total > self.max_model_len:
            raise ValueError(f"this model's maximum context length is {self.max_model_len} tokens, but the request "
                             f"has {len(request.prompt_ids)} prompt tokens + max_tokens={request.params.max_tokens} "
                             f"= {total}; shorten the prompt or lower max_tokens.")
        if not request.request_id:
            request.request_id = f"req-{next(self._ids)}"
        seq = _Sequence(request, sink, Sampler(request.params), TextStream(self.tokenizer, request.params.stop),
                        SequenceCache(capacity=total), list(request.prompt_ids))
        with self._cond:
            if self._stopping:
                raise QueueFullError("the server is shutting down.")
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"{len(self._waiting)} requests are already waiting (--max-queue="
                                     f"{self.max_queue}); retry later.")
            if request.adapter is not None:
                self.registry.acquire(request.adapter)  # raises UnknownAdapterError
            self._waiting.append(seq)
            self._report_queue()
            self._cond.notify()
        return RequestHandle(self, seq)

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the worker thread between two steps (adapter changes); its result in the future."""
        future: Future = Future()
        self._commands.put((fn, future))
        self._wake()
        return future

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"running": len(self._running), "waiting": len(self._waiting),
                    "free_slots": self.max_batch_size - len(self._running),
                    "cache_bytes": sum(s.cache.nbytes() for s in self._running)}

    def check_model(self) -> None:
        """Run a 4-token prompt through the engine's path and the model's own forward; refuse the model if
        the logits differ (an architecture whose attention does not go through ``Cache.update`` and
        transformers' attention interface). Call before ``start``.

        Raises:
            ValueError: the architecture is not supported (names ``model_type``).
        """
        lm = self.registry.base
        ids = [1, 2, 3, 4]
        cache = SequenceCache(capacity=len(ids))
        try:
            with torch.no_grad():
                ours = self._forward(ids, list(range(len(ids))), [BASE_ROW] * len(ids),
                                     [Segment(cache, 0, len(ids))])[0]
                if self.registry.peft is not None:
                    with self.registry.peft.disable_adapter():
                        reference = lm(input_ids=torch.tensor([ids], device=self._device)).logits[0, -1].float()
                else:
                    reference = lm(input_ids=torch.tensor([ids], device=self._device)).logits[0, -1].float()
            same = torch.allclose(ours, reference, rtol=1e-3, atol=1e-3 * float(reference.abs().max()))
        except Exception as exc:  # the row layout broke the model's forward
            same, reason = False, f"{type(exc).__name__}: {exc}"
        else:
            reason = "its logits through per-sequence caches differ from its own forward"
        if not same:
            model_type = getattr(lm.config, "model_type", type(lm).__name__)
            raise ValueError(f"lorakit serve does not support model_type={model_type!r} ({reason}); it needs a "
                             "decoder whose attention calls Cache.update and transformers' attention interface "
                             "(Llama-style).")

    # ------------------------------------------------------------------ worker thread
    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._waiting or self._running or not self._commands.empty()
                           or any(s.cancelled for s in self._running)):
                    self._cond.wait()
                if self._stopping:
                    break
            self._run_commands()
            self._drop_cancelled()
            self._admit()
            if self._running:
                try:
                    self._step()
                except Exception as exc:  # a bug or an out-of-memory: fail this batch, keep serving
                    for seq in list(self._running):
                        self._finish(seq, "error", error=f"{type(exc).__name__}: {exc}", error_status=500)
            self.registry.collect()
        with self._cond:
            left = list(self._running) + list(self._waiting)
            self._waiting.clear()
        for seq in left:
            self._finish(seq, "cancelled")
        self._run_commands()

    def _run_commands(self) -> None:
        while True:
            try:
                fn, future = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

    def _drop_cancelled(self) -> None:
        with self._cond:
            waiting = [s for s in self._waiting if s.cancelled]
            for seq in waiting:
                self._waiting.remove(seq)
        for seq in waiting + [s for s in self._running if s.cancelled]:
            self._finish(seq, "cancelled")

    def _admit(self) -> None:
        with self._cond:
            candidates = list(self._waiting)
        needed = {s.request.adapter for s in self._running if s.request.adapter is not None}
        admitted: list[_Sequence] = []
        for seq in candidates:
            if len(self._running) + len(admitted) >= self.max_batch_size:
                break
            name = seq.request.adapter
            if name is not None:
                try:
                    if not self.registry.ensure_loaded(name, keep=needed):
                        continue  # every loaded adapter is in use: wait for a sequence to finish
                except (UnknownAdapterError, ValueError, OSError) as exc:
                    with self._cond:
                        self._waiting.remove(seq)
                    self._finish(seq, "error", error=str(exc), error_status=400)
                    continue
                needed.add(name)
                self.registry.start_running(name)
            seq.admitted_at = time.perf_counter()
            admitted.append(seq)
        with self._cond:
            for seq in admitted:
                self._waiting.remove(seq)
            self._running.extend(admitted)
            self._report_queue()

    def _step(self) -> None:
        ids: list[int] = []
        positions: list[int] = []
        names: list[str] = []
        segments: list[Segment] = []
        rows = []
        for seq in self._running:
            start = len(ids)
            ids.extend(seq.pending)
            positions.extend(range(seq.cache.length, seq.cache.length + len(seq.pending)))
            names.extend([seq.request.adapter or BASE_ROW] * len(seq.pending))
            segments.append(Segment(seq.cache, start, len(ids)))
            rows.append((seq.request.request_id, "decode" if seq.generated else "prefill", len(seq.pending)))
        self.trace.append(StepRecord(self.steps, tuple(rows)))
        self.steps += 1
        if self.metrics is not None:
            self.metrics.observe_step(len(self._running), len(ids))
        logits = self._forward(ids, positions, names, segments)
        now = time.perf_counter()
        for i, seq in enumerate(list(self._running)):
            seq.pending = []
            token = seq.sampler.next_token(logits[i])
            seq.generated += 1
            if self.metrics is not None:
                if seq.generated == 1:
                    self.metrics.observe_first_token(now - seq.submitted_at)
                else:
                    self.metrics.observe_inter_token(now - seq.last_token_at)
            seq.last_token_at = now
            if token in self.eos_ids:
                self._finish(seq, "stop", text=seq.stream.finish())
                continue
            delta, stopped = seq.stream.push(token)
            if stopped:
                self._finish(seq, "stop", text=delta, token=token)
            elif seq.generated >= seq.request.params.max_tokens:
                self._finish(seq, "length", text=delta + seq.stream.finish(), token=token)
            else:
                seq.sink(Output(delta, [token]))
                seq.pending = [token]

    @torch.no_grad()
    def _forward(self, ids: list[int], positions: list[int], names: list[str], segments: list[Segment]) -> torch.Tensor:
        """One forward over the flattened tokens → (sequences, vocab) fp32 logits at each one's last token."""
        peft = self.registry.peft
        lm = self.registry.base
        cache = RowCache(segments)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self._device)[:, None]  # (N, 1): a token per row
        position_ids = torch.tensor(positions, dtype=torch.long, device=self._device)[:, None]
        placeholder_mask = torch.zeros(1, 1, 1, 1, device=self._device)  # 4-D: transformers passes it through
        last = [seg.stop - 1 for seg in segments]
        last_names = [names[i] for i in last]
        config = lm.config
        previous = config._attn_implementation
        config._attn_implementation = ATTENTION_NAME
        try:
            # PeftModel._mixed_batch puts one adapter name per row on every LoRA layer for this block (also
            # when every row is the base: without a plan a LoRA layer would apply its active adapter)
            with peft._mixed_batch(names, (), {}) if peft is not None else contextlib.nullcontext():
                hidden = lm.get_decoder()(input_ids=input_ids, position_ids=position_ids,
                                          attention_mask=placeholder_mask, cache=cache, use_cache=True,
                                          row_cache=cache).last_hidden_state
            selected = hidden[last, 0]  # (sequences, hidden)
            with peft._mixed_batch(last_names, (), {}) if peft is not None else contextlib.nullcontext():
                logits = lm.get_output_embeddings()(selected)
        finally:
            config._attn_implementation = previous
        cache.advance()
        return logits.float()

    def _finish(self, seq: _Sequence, reason: str, text: str = "", token: int | None = None,
                error: str | None = None, error_status: int = 0) -> None:
        if seq in self._running:
            with self._cond:
                self._running.remove(seq)
            if seq.request.adapter is not None:
                self.registry.stop_running(seq.request.adapter)
        seq.cache.keys.clear()  # free the cache now, not when the last reference goes
        seq.cache.values.clear()
        if seq.request.adapter is not None:
            self.registry.release(seq.request.adapter)
        if self.metrics is not None:
            self.metrics.observe_finish(seq.request.adapter, reason, len(seq.request.prompt_ids), seq.generated)
        seq.sink(Output(text, [] if token is None else [token], reason, len(seq.request.prompt_ids),
                        seq.generated, error, error_status))

    def _report_queue(self) -> None:
        if self.metrics is not None:
            self.metrics.set_queue(len(self._waiting), len(self._running))

