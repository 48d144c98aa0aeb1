"""Tokenization cache: tokenized training data kept on disk, so a rerun or a resume does not tokenize again.

An entry is one safetensors file ``<cache>/tokenized/<key>.safetensors`` (``cache_dir()`` is lorakit's
cache, ``$LORAKIT_CACHE`` or ``~/.cache/lorakit``) holding every example's ``input_ids`` and ``labels``
concatenated (int32) with their ``offsets`` (int64, ``[n + 1]``), and in its metadata the statistics and a
sha256 over those bytes. The key is a sha256 over

- the records (the data file's content as parsed, after the held-out split and ``--train-size``),
- the tokenizer (its full serialized definition: vocabulary, merges, normalizer, special tokens),
- the chat template text, and
- the options that change the result (``max_length``, what is trained, the format version below),

so any change to one of them is a different entry. Reading checks the checksum: a truncated or edited entry
is reported, deleted and rebuilt, never trusted. Entries are written next to their final place and renamed
(atomic), so an interrupted run never leaves a half-written entry behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["FORMAT_VERSION", "cache_key", "cached", "load_entry", "save_entry", "tokenizer_fingerprint"]

FORMAT_VERSION = 1
"""Bump when tokenization changes, so old entries stop matching."""

Examples = list[dict[str, list[int]]]


def tokenizer_fingerprint(tokenizer: Any) -> str | None:
    """sha256 of a tokenizer's full definition, or None if it cannot be serialized (then nothing is cached)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    to_str = getattr(backend, "to_str", None)
    if to_str is None:
        return None
    digest = hashlib.sha256(to_str().encode())
    digest.update(type(tokenizer).__name__.encode())
    special = {name: str(getattr(tokenizer, name, None)) for name in ("bos_token", "eos_token", "pad_token")}
    digest.update(json.dumps(special, sort_keys=True).encode())
    return digest.hexdigest()


def cache_key(records: Sequence[Mapping[str, Any]], tokenizer_id: str, template: str | None,
              options: Mapping[str, Any]) -> str:
    """sha256 over (records, tokenizer fingerprint, template, options, format version)."""
    digest = hashlib.sha256()
    for part in (json.dumps(list(records), sort_keys=True, ensure_ascii=False), tokenizer_id, template or "",
                 json.dumps(dict(options), sort_keys=True), str(FORMAT_VERSION)):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def _checksum(tensors: Mapping[str, torch.Tensor], stats: str) -> str:
    digest = hashlib.sha256(stats.encode())
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_entry(path: Path, examples: Examples, stats: Mapping[str, Any]) -> None:
    """Write ``examples`` and ``stats`` to ``path`` atomically (temporary file, then rename)."""
    from safetensors.torch import save_file

    ids = [token for example in examples for token in example["input_ids"]]
    labels = [token for example in examples for token in example["labels"]]
    offsets = [0]
    for example in examples:
        offsets.append(offsets[-1] + len(example["input_ids"]))
    tensors = {"input_ids": torch.tensor(ids, dtype=torch.int32), "labels": torch.tensor(labels, dtype=torch.int32),
               "offsets": torch.tensor(offsets, dtype=torch.int64)}
    stats_text = json.dumps(dict(stats), sort_keys=True)
    metadata = {"stats": stats_text, "sha256": _checksum(tensors, stats_text), "version": str(FORMAT_VERSION)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_entry(path: Path) -> tuple[Examples, dict[str, Any]]:
    """Read an entry written by :func:`save_entry`.

    Raises:
        ValueError: the file is unreadable, truncated, or its checksum does not match (edited).
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in ("input_ids", "labels", "offsets")}
        stats_text = metadata["stats"]
        if metadata.get("sha256") != _checksum(tensors, stats_text):
            raise ValueError("checksum mismatch")
        stats = json.loads(stats_text)
    except Exception as exc:  # safetensors' own errors, KeyError, JSON errors, our mismatch
        raise ValueError(f"cache entry {path} is corrupt ({type(exc).__name__}: {exc})") from None
    ids, labels, offsets = tensors["input_ids"].tolist(), tensors["labels"].tolist(), tensors["offsets"].tolist()
    if len(ids) != len(labels) or not offsets or offsets[-1] != len(ids):
        raise ValueError(f"cache entry {path} is corrupt (inconsistent lengths)")
    examples = [{"input_ids": ids[a:b], "labels": labels[a:b]} for a, b in zip(offsets, offsets[1:], strict=False)]
    return examples, stats


def cached(directory: Path, key: str, build: Callable[[], tuple[Examples, dict[str, Any]]],
           say: Callable[[str], None]) -> tuple[Examples, dict[str, Any]]:
    """The entry ``key`` under ``directory`` if it is intact, else ``build()`` (saved for next time).

    Says which happened: "reused the tokenized data …", "cache entry … is corrupt …; rebuilding" or
    "tokenized … (cached …)".
    """
    path = directory / f"{key}.safetensors"
    if path.is_file():
        try:
            examples, stats = load_entry(path)
        except ValueError as exc:
            say(f"tokenized data: {exc}; rebuilding it")
            path.unlink(missing_ok=True)
        else:
            say(f"tokenized data: reused the tokenized data from the cache ({path})")
            return examples, stats
    examples, stats = build()
    try:
        save_entry(path, examples, stats)
    except OSError as exc:  # a read-only or full cache costs the next run time, not this run
        say(f"tokenized data: not cached ({exc})")
    else:
        say(f"tokenized data: cached in {path}")
    return examples, stats
