"""Per-request decoding: sampling parameters, the next-token choice, and incremental text with stop strings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class SamplingParams:
    """What one request asks for (OpenAI's names). Validated here; the routes only parse JSON."""

    max_tokens: int = 16
    """Most tokens to generate (>= 1)."""
    temperature: float = 1.0
    """0 picks the most likely token (greedy); > 0 samples from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Sample only from the smallest set of tokens whose probability reaches top_p (0 < top_p <= 1)."""
    seed: int | None = None
    """Seed of this request's own generator (same seed, same prompt → same output); None: random."""
    stop: list[str] = field(default_factory=list)
    """Generation ends before the first occurrence of any of these strings (at most 4, non-empty)."""

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens!r} must be a positive integer.")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature <= 2:
            raise ValueError(f"temperature={self.temperature!r} must be a number in [0, 2].")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} must be a number in (0, 1].")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed={self.seed!r} must be an integer.")
        if len(self.stop) > 4 or any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop={self.stop!r} must be at most 4 non-empty strings.")


class Sampler:
    """Chooses each next token of one request from its (vocab,) fp32 logits."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.generator: torch.Generator | None = None
        if params.temperature > 0:
            self.generator = torch.Generator()
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(params.seed)

    def next_token(self, logits: torch.Tensor) -> int:
        """argmax (greedy), or a draw from softmax(logits / T) restricted to the top-p nucleus."""
        if self.generator is None:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / self.params.temperature, dim=-1)
        if self.params.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            # keep tokens while the mass before them is < top_p (the first token is always kept)
            keep = sorted_probs.cumsum(0) - sorted_probs < self.params.top_p
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs.cpu(), 1, generator=self.generator))


class TextStream:
    """Turns generated token ids into text deltas, never emitting text a stop string may still claim.

    ``push(token) -> (delta, stopped)``: the concatenation of all deltas is always the final text, so a
    streamed response equals the non-streamed one. Held back: a trailing incomplete UTF-8 sequence
    (decoded as U+FFFD) and any tail that is a prefix of a stop string.
    """

    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.emitted = 0  # characters of the text already handed out

    def push(self, token: int) -> tuple[str, bool]:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            return self._emit(text[:cut]), True
        safe = len(text)
        if text.endswith("\ufffd"):
            safe -= 1
        for s in self.stop:
            for k in range(min(len(s) - 1, safe), 0, -1):
                if text[:safe].endswith(s[:k]):
                    safe -= k
                    break
        return self._emit(text[:max(safe, self.emitted)]), False

    def finish(self) -> str:
        """The rest of the text at the end (no more tokens: nothing is held back any longer)."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self._emit(text)

    def _emit(self, text: str) -> str:
        delta = text[self.emitted:]
        self.emitted = max(self.emitted, len(text))
        return delta
