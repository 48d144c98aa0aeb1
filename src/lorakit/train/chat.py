"""Chat records: the two record shapes, rendering with the model's template, and which tokens the loss sees.

Record shapes (one JSON object per line, detected from the key, see :func:`lorakit.train.data.load_records`):

- OpenAI ``{"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": "..."}, ...]}``;
- ShareGPT ``{"conversations": [{"from": "human" | "gpt" | "system" | "tool", "value": "..."}, ...]}``,
  mapped onto the same roles (:data:`SHAREGPT_ROLES`), so both shapes of a conversation give the same ids.

A conversation is rendered with the tokenizer's ``chat_template`` (``tokenizer.apply_chat_template``), or
with a Jinja template given by ``--chat-template FILE``, and tokenized without adding special tokens (the
template writes them).

Which tokens are trained (``train_on``):

- ``"assistant"`` (default): every assistant turn's content **and its end-of-turn token(s)**, so the model
  learns to stop; not the system, user or tool turns, nor the assistant header the template writes before
  the content.
- ``"all"`` (``--train-on-inputs``): every token.
- ``"last"`` (``--train-on-last-turn``): only the final assistant turn (the conversation must end with one).

How the assistant spans are found, for any template (no template's marker strings are written here): the
conversation is rendered prefix by prefix. For assistant message i, the render of messages[:i] with the
generation prompt ends where its content starts, and the render of messages[:i+1] ends after its end of
turn. With a fast tokenizer these two character positions are mapped to tokens through the offsets of the
full conversation's tokenization; otherwise the prefixes' token sequences are compared with the full one
(longest common prefix). Either gives the span's first and last token. Templates that mark assistant text with
``{% generation %}`` get transformers' assistant mask instead. Whitespace the template writes *after* a
special end-of-turn token (ChatML's newline after ``<|im_end|>``) is not trained: it is layout between
turns, never generated (generation stops at the end-of-turn token).

Truncation (conversations longer than ``max_length`` tokens): whole leading turns are dropped, oldest first,
keeping a leading system message, until the rest fits; what is kept always starts at a user turn. When even
the last exchange does not fit, its tokens are cut on the right (counted as truncated too); if that leaves no
trained token the record is reported as having nothing to train and left out.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data import IGNORE_INDEX

__all__ = [
    "ROLES",
    "SHAREGPT_ROLES",
    "TRAIN_ON",
    "ChatExample",
    "DataStats",
    "data_stats",
    "load_chat_template",
    "normalize_conversation",
    "render_prompt",
    "resolve_template",
    "tokenize_chat",
    "tokenize_conversation",
]

ROLES = ("system", "user", "assistant", "tool")
"""Roles of ``messages`` records."""

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "tool": "tool", "observation": "tool", "function": "tool"}
"""ShareGPT ``from`` values and the role each becomes."""

TRAIN_ON = ("assistant", "all", "last")
"""What the loss covers: every assistant turn, every token, or only the last assistant turn."""

# record key -> (name of the format, key of a message's role, key of its text, role mapping)
CHAT_KEYS: dict[str, tuple[str, str, str, Mapping[str, str]]] = {
    "messages": ("chat (messages)", "role", "content", {role: role for role in ROLES}),
    "conversations": ("chat (ShareGPT)", "from", "value", SHAREGPT_ROLES),
}


# ------------------------------------------------------------------------------------------- records
def normalize_conversation(key: str, turns: Any, where: str) -> list[dict[str, str]]:
    """Validate one conversation and return it as ``messages`` (``[{"role", "content"}, ...]``).

    Args:
        key: ``"messages"`` or ``"conversations"`` (the record's key, see :data:`CHAT_KEYS`).
        turns: the value under that key.
        where: names the record in errors (``"data.jsonl line 3"``).

    Raises:
        ValueError: not a non-empty list of objects, an unknown role, or a message without text.
    """
    name, role_key, text_key, roles = CHAT_KEYS[key]
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: {key!r} must be a non-empty list of messages, got "
                         f"{turns!r:.60}; give at least one {{{role_key!r}: ..., {text_key!r}: ...}}")
    messages = []
    for number, turn in enumerate(turns):
        here = f"{where} message {number}"
        if not isinstance(turn, dict):
            raise ValueError(f"{here} is a JSON {type(turn).__name__}; each message is an object with "
                             f"{role_key!r} and {text_key!r}")
        role = turn.get(role_key)
        if role not in roles:
            raise ValueError(f"{here} has {role_key}={role!r}, an unknown role; {name} accepts "
                             f"{', '.join(sorted(roles))}")
        text = turn.get(text_key)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{here} ({role}) has no {text_key!r} text (got {text!r:.40}); every message needs "
                             f"a non-empty string under {text_key!r}")
        messages.append({"role": roles[str(role)], "content": text})
    return messages


# ------------------------------------------------------------------------------------------- templates
def load_chat_template(path: str | Path) -> str:
    """The Jinja text of a ``--chat-template`` file.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: it is empty.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--chat-template {path} does not exist; give a Jinja chat template file")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"--chat-template {path} is empty; give a Jinja chat template")
    return text


def resolve_template(tokenizer: Any, template: str | None) -> str:
    """``template`` if given, else the tokenizer's own chat template.

    Raises:
        ValueError: neither exists.
    """
    if template is not None:
        return template
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one
        own = own.get("default")
    if not own:
        raise ValueError(f"the tokenizer ({getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__}) "
                         "has no chat template, so chat records cannot be rendered; pass --chat-template FILE "
                         "(a Jinja template) or use a model whose tokenizer_config.json has a chat_template")
    return str(own)


def _render(tokenizer: Any, messages: list[dict[str, str]], template: str, generation_prompt: bool,
            where: str) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as exc:  # jinja2's TemplateError family, raise_exception(), or a template bug
        first = (str(exc).splitlines() or [""])[0]
        raise ValueError(f"{where}: the chat template failed to render ({type(exc).__name__}: {first}); fix the "
                         "template (or pass another with --chat-template FILE) or the conversation") from None
    return str(text)


def render_prompt(tokenizer: Any, messages: list[dict[str, str]], template: str | None = None) -> str:
    """The text a model is given to answer ``messages``: the render with the generation prompt."""
    return _render(tokenizer, messages, resolve_template(tokenizer, template), True, "conversation")


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


# ------------------------------------------------------------------------------------------- masking
@dataclass
class ChatExample:
    """One tokenized conversation: ``input_ids``/``labels`` (lists of equal length) and what happened."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def trained(self) -> int:
        """Tokens the loss sees (the first token never is: nothing predicts it)."""
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


def _assistant_spans(tokenizer: Any, messages: list[dict[str, str]], template: str, text: str, ids: list[int],
                     offsets: list[tuple[int, int]] | None, where: str) -> list[tuple[int, int]]:
    """(start, end) token ranges of each assistant turn in ``ids`` (the full render ``text``), prefix by prefix.

    With character offsets (fast tokenizers) a prefix's end is a character position and the span holds the
    tokens that start at or after the content's first character and end by the turn's last one, so a
    tokenization that merges differently at the boundary ("\n\n" alone vs "\n" + "\nIt") cannot shift it.
    Without offsets the prefixes' token sequences are compared with the full one (longest common prefix).
    """
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], template, True, where) if i else ""
        through = _render(tokenizer, messages[: i + 1], template, False, where)
        if offsets is not None and text.startswith(before) and text.startswith(through):
            start = next((t for t, (a, _) in enumerate(offsets) if a >= len(before)), len(ids))
            end = next((t for t, (_, b) in enumerate(offsets) if b > len(through)), len(ids))
        else:
            start = _common_prefix(_ids(tokenizer, before), ids) if before else 0
            end = _common_prefix(_ids(tokenizer, through), ids)
        # Whitespace after a special end-of-turn token is layout between turns, not part of the answer.
        last = end
        while last > start and not tokenizer.decode([ids[last - 1]]).strip():
            last -= 1
        if last < end and last > start and ids[last - 1] in special:
            end = last
        if end > start:
            spans.append((start, end))
    return spans


def _generation_spans(tokenizer: Any, messages: list[dict[str, str]], template: str, ids: list[int],
                      where: str) -> list[tuple[int, int]]:
    """Assistant spans from a template's ``{% generation %}`` markers (transformers' assistant mask)."""
    try:
        out = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
    except Exception as exc:
        first = (str(exc).splitlines() or [""])[0]
        raise ValueError(f"{where}: the chat template failed to render ({type(exc).__name__}: {first}); fix the "
                         "template (or pass another with --chat-template FILE)") from None
    if list(out["input_ids"]) != ids:
        raise ValueError(f"{where}: the chat template renders differently with and without tokenization; "
                         "remove its {% generation %} markers to use prefix-by-prefix masking")
    mask = list(out["assistant_masks"])
    spans, start = [], None
    for position, flag in enumerate(mask + [0]):
        if flag and start is None:
            start = position
        elif not flag and start is not None:
            spans.append((start, position))
            start = None
    return spans


def _encode(tokenizer: Any, messages: list[dict[str, str]], template: str, train_on: str,
            where: str) -> tuple[list[int], list[int]]:
    """Full-conversation ids and labels (untruncated)."""
    text = _render(tokenizer, messages, template, False, where)
    offsets = None
    if train_on != "all" and getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(encoded["input_ids"]), [tuple(pair) for pair in encoded["offset_mapping"]]
    else:
        ids = _ids(tokenizer, text)
    if train_on == "all":
        return ids, list(ids)
    if "generation" in template and "endgeneration" in template:
        spans = _generation_spans(tokenizer, messages, template, ids, where)
    else:
        spans = _assistant_spans(tokenizer, messages, template, text, ids, offsets, where)
    if train_on == "last":
        spans = spans[-1:]
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        labels[start:end] = ids[start:end]
    return ids, labels


def tokenize_conversation(messages: list[dict[str, str]], tokenizer: Any, max_length: int, template: str,
                          train_on: str = "assistant", where: str = "conversation") -> ChatExample:
    """Render, tokenize and mask one conversation, dropping whole leading turns to fit ``max_length``.

    Returns:
        A :class:`ChatExample` with ``len(input_ids) <= max_length``; ``labels`` hold the token id where
        the loss applies and :data:`IGNORE_INDEX` elsewhere (aligned with ``input_ids``; the model shifts).

    Raises:
        ValueError: ``train_on`` is unknown, ``"last"`` on a conversation not ending with an assistant
            turn, or the template fails to render.
    """
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on={train_on!r} is invalid: use one of {', '.join(TRAIN_ON)}")
    if train_on == "last" and messages[-1]["role"] != "assistant":
        raise ValueError(f"{where} ends with a {messages[-1]['role']} turn, so --train-on-last-turn has no "
                         "assistant turn to train on; end each conversation with an assistant message or drop "
                         "--train-on-last-turn")
    system = messages[:1] if messages[0]["role"] == "system" else []
    rest = messages[len(system):]
    truncated = False
    while True:
        ids, labels = _encode(tokenizer, system + rest, template, train_on, where)
        if len(ids) <= max_length:
            return ChatExample(ids, labels, truncated)
        # drop the oldest turn and whatever follows it up to the next user turn
        drop = 1
        while drop < len(rest) and rest[drop]["role"] != "user":
            drop += 1
        if drop >= len(rest):  # only the last exchange is left: cut its tokens on the right
            return ChatExample(ids[:max_length], labels[:max_length], True)
        rest = rest[drop:]
        truncated = True


# ------------------------------------------------------------------------------------------- datasets
@dataclass
class DataStats:
    """What a user should know about a tokenized dataset before training on it."""

    records: int
    format: str
    lengths: list[int] = field(repr=False)
    trained_tokens: int
    truncated: int
    nothing_to_train: list[int]
    """Indices of the records left out because no token of theirs is trained."""

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    def lines(self) -> list[str]:
        """The statistics as printable lines."""
        if self.lengths:
            shape = (f"tokens/record min {min(self.lengths)} / median {statistics.median(self.lengths):g} / "
                     f"max {max(self.lengths)}")
        else:
            shape = "tokens/record: none"
        share = self.trained_tokens / max(self.tokens, 1)
        out = [f"data: {self.records} records, format {self.format}; {shape}",
               f"data: {100 * share:.1f} % of {self.tokens} tokens trained; {self.truncated} record(s) truncated; "
               f"{len(self.nothing_to_train)} with nothing to train"]
        if self.nothing_to_train:
            shown = ", ".join(str(i) for i in self.nothing_to_train[:10])
            more = " …" if len(self.nothing_to_train) > 10 else ""
            out.append(f"data: left out (0 trained tokens): record(s) {shown}{more}")
        return out


def tokenize_chat(records: Sequence[Mapping[str, Any]], tokenizer: Any, max_length: int,
                  template: str | None = None, train_on: str = "assistant",
                  record_format: str = "chat (messages)") -> tuple[list[dict[str, list[int]]], DataStats]:
    """Tokenize ``{"messages": [...]}`` records; return the trainable examples and their statistics.

    Records with no trained token (after truncation) are left out and listed in the statistics.

    Raises:
        ValueError: ``max_length`` < 2, no template (see :func:`resolve_template`), a record that fails
            (see :func:`tokenize_conversation`), or every record has nothing to train.
    """
    if max_length < 2:
        raise ValueError(f"max_length={max_length} must be at least 2 (one input and one target token)")
    jinja = resolve_template(tokenizer, template)
    examples, lengths, nothing, trained, truncated = [], [], [], 0, 0
    for index, record in enumerate(records):
        example = tokenize_conversation(list(record["messages"]), tokenizer, max_length, jinja, train_on,
                                        where=f"record {index}")
        lengths.append(len(example.input_ids))
        truncated += example.truncated
        if example.trained == 0:
            nothing.append(index)
            continue
        trained += example.trained
        examples.append({"input_ids": example.input_ids, "labels": example.labels})
    stats = DataStats(len(records), record_format, lengths, trained, truncated, nothing)
    if records and not examples:
        raise ValueError(f"all {len(records)} records have 0 trained tokens after truncation to --max-length "
                         f"{max_length} (no assistant turn left to learn from); raise --max-length, shorten the "
                         "conversations, or pass --train-on-inputs to train on every token")
    return examples, stats


def data_stats(examples: Sequence[Mapping[str, Sequence[int]]], records: int, record_format: str,
               max_length: int) -> DataStats:
    """:class:`DataStats` for non-chat examples (from :func:`lorakit.train.data.tokenize_records`).

    "truncated" counts the examples that fill ``max_length`` (cut if they were longer, or split for text).
    """
    lengths = [len(example["input_ids"]) for example in examples]
    trained = sum(sum(label != IGNORE_INDEX for label in example["labels"][1:]) for example in examples)
    full = sum(length >= max_length for length in lengths)
    return DataStats(records, record_format, lengths, trained, full, [])
