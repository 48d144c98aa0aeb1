"""lorakit.train.chat: record shapes, templates, assistant-only masks (hand-derived), truncation, statistics.

The expectations are written piece by piece: each test lists the text the template must produce as
(piece, trained) pairs, tokenizes the pieces one by one, and compares the concatenation with what
``tokenize_chat`` produced — ids *and* which positions carry a label.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lorakit.train.chat import DataStats, tokenize_chat
from lorakit.train.data import IGNORE_INDEX, load_records, load_records_with_format

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "Look it up."},
    {"role": "tool", "content": "calculator: 4"},
    {"role": "assistant", "content": "Still 4."},
]

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('Mistral templates know only user and assistant roles') }}{% endif %}"
    "{% endfor %}"
)

CHATML_WITH_GENERATION = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def smollm2_tokenizer(extra_special: list[str] | None = None) -> Any:
    """SmolLM2-135M-Instruct's tokenizer (ChatML template), a fresh copy so tests may add tokens."""
    from transformers import AutoTokenizer

    from lorakit.train.defaults import ensure_default_model

    tokenizer = AutoTokenizer.from_pretrained(ensure_default_model(), local_files_only=True)
    if extra_special:
        tokenizer.add_special_tokens({"additional_special_tokens": extra_special})
    return tokenizer


@pytest.fixture(scope="module")
def chatml() -> Any:
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def llama3() -> Any:
    return smollm2_tokenizer(["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])


def expected(tokenizer: Any, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Ids and labels of a rendering given as (text, trained) pieces: the text is the pieces joined, and a
    token is trained exactly when its characters lie inside a trained piece (fast-tokenizer offsets)."""
    text = "".join(piece for piece, _ in pieces)
    trained_chars: list[bool] = []
    for piece, trained in pieces:
        trained_chars += [trained] * len(piece)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    labels = [token if all(trained_chars[start:end]) and end > start else IGNORE_INDEX
              for token, (start, end) in zip(ids, encoded["offset_mapping"], strict=True)]
    return ids, labels


def one(tokenizer: Any, messages: list[dict[str, str]], template: str | None = None, train_on: str = "assistant",
        max_length: int = 512) -> tuple[list[int], list[int]]:
    [example], _ = tokenize_chat([{"messages": messages}], tokenizer, max_length, template, train_on)
    return example["input_ids"], example["labels"]


def as_trained(pieces: list[tuple[str, bool]], flag: bool | None = None, last_only: str | None = None
               ) -> list[tuple[str, bool]]:
    """The same pieces with every one trained (``flag=True``) or only those of the final turn (``last_only``
    names the first trained piece of that turn)."""
    if flag is not None:
        return [(text, flag) for text, _ in pieces]
    start = max(i for i, (text, _) in enumerate(pieces) if text == last_only)
    return [(text, trained and i >= start) for i, (text, trained) in enumerate(pieces)]


# ------------------------------------------------------------------------------------------ ChatML (SmolLM2)
CHATML_PIECES = [
    ("<|im_start|>system\nBe brief.<|im_end|>\n", False),
    ("<|im_start|>user\nWhat is 2+2?<|im_end|>\n", False),
    ("<|im_start|>assistant\n", False), ("It is 4.", True), ("<|im_end|>", True), ("\n", False),
    ("<|im_start|>user\nLook it up.<|im_end|>\n", False),
    ("<|im_start|>tool\ncalculator: 4<|im_end|>\n", False),
    ("<|im_start|>assistant\n", False), ("Still 4.", True), ("<|im_end|>", True), ("\n", False),
]


@pytest.mark.slow
def test_chatml_trains_assistant_content_and_im_end_only(chatml: Any) -> None:
    """SmolLM2's own template: assistant content + <|im_end|> trained; system, user, tool, the assistant
    header and the newline after <|im_end|> not."""
    assert one(chatml, CONVERSATION) == expected(chatml, CHATML_PIECES)


@pytest.mark.slow
def test_chatml_train_on_inputs_and_last_turn(chatml: Any) -> None:
    assert one(chatml, CONVERSATION, train_on="all") == expected(chatml, as_trained(CHATML_PIECES, flag=True))
    assert one(chatml, CONVERSATION, train_on="last") == expected(
        chatml, as_trained(CHATML_PIECES, last_only="Still 4."))


@pytest.mark.slow
def test_chatml_default_system_prompt_is_not_trained(chatml: Any) -> None:
    """SmolLM2's template adds its own system prompt when there is none: rendered, never trained."""
    ids, labels = one(chatml, CONVERSATION[1:3])
    assert (ids, labels) == expected(chatml, [
        ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n", False),
        ("<|im_start|>user\nWhat is 2+2?<|im_end|>\n", False),
        ("<|im_start|>assistant\n", False), ("It is 4.", True), ("<|im_end|>", True), ("\n", False)])


@pytest.mark.slow
def test_generation_markers_give_the_same_mask_as_prefix_rendering(chatml: Any) -> None:
    """A template with {% generation %} markers uses transformers' assistant mask; here the markers cover
    exactly what prefix-by-prefix rendering finds."""
    assert one(chatml, CONVERSATION, CHATML_WITH_GENERATION) == expected(chatml, CHATML_PIECES)


# ------------------------------------------------------------------------------------------ Llama-3 style
LLAMA3_PIECES = [
    ("<|im_start|>", False),  # SmolLM2's bos_token
    ("<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>", False),
    ("<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>", False),
    ("<|start_header_id|>assistant<|end_header_id|>\n\n", False), ("It is 4.", True), ("<|eot_id|>", True),
    ("<|start_header_id|>user<|end_header_id|>\n\nLook it up.<|eot_id|>", False),
    ("<|start_header_id|>tool<|end_header_id|>\n\ncalculator: 4<|eot_id|>", False),
    ("<|start_header_id|>assistant<|end_header_id|>\n\n", False), ("Still 4.", True), ("<|eot_id|>", True),
]


@pytest.mark.slow
def test_llama3_style_header_template(llama3: Any) -> None:
    """Header-id template (special header and <|eot_id|> tokens, BOS from the template): the header's
    "\\n\\n" is not trained, <|eot_id|> is."""
    assert one(llama3, CONVERSATION, LLAMA3_TEMPLATE) == expected(llama3, LLAMA3_PIECES)
    assert one(llama3, CONVERSATION, LLAMA3_TEMPLATE, "all") == expected(llama3, as_trained(LLAMA3_PIECES, True))
    assert one(llama3, CONVERSATION, LLAMA3_TEMPLATE, "last") == expected(
        llama3, as_trained(LLAMA3_PIECES, last_only="Still 4."))


# ------------------------------------------------------------------------------------------ Mistral [INST]
MISTRAL_CONVERSATION = [CONVERSATION[1], CONVERSATION[2], CONVERSATION[3], CONVERSATION[5]]
MISTRAL_PIECES = [
    ("<|im_start|>", False),
    ("[INST] What is 2+2? [/INST]", False), ("It is 4.", True), ("<|im_end|>", True),  # eos_token
    ("[INST] Look it up. [/INST]", False), ("Still 4.", True), ("<|im_end|>", True),
]


@pytest.mark.slow
def test_mistral_inst_template(chatml: Any) -> None:
    """[INST] … [/INST] template: no assistant header, end of turn = EOS; the [/INST] before an answer is the
    user's, not trained."""
    assert one(chatml, MISTRAL_CONVERSATION, MISTRAL_TEMPLATE) == expected(chatml, MISTRAL_PIECES)
    assert one(chatml, MISTRAL_CONVERSATION, MISTRAL_TEMPLATE, "all") == expected(
        chatml, as_trained(MISTRAL_PIECES, True))
    assert one(chatml, MISTRAL_CONVERSATION, MISTRAL_TEMPLATE, "last") == expected(
        chatml, as_trained(MISTRAL_PIECES, last_only="Still 4."))


# ------------------------------------------------------------------------------------------ record shapes
SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt", "tool": "tool"}


@pytest.mark.slow
def test_sharegpt_and_messages_give_identical_ids_and_labels(chatml: Any, tmp_path: Path) -> None:
    conversations = [CONVERSATION, CONVERSATION[1:3], MISTRAL_CONVERSATION]
    (tmp_path / "messages.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    (tmp_path / "sharegpt.json").write_text(json.dumps([
        {"conversations": [{"from": SHAREGPT_ROLE[m["role"]], "value": m["content"]} for m in c]}
        for c in conversations]))
    messages, fmt_messages = load_records_with_format(tmp_path / "messages.jsonl")
    sharegpt, fmt_sharegpt = load_records_with_format(tmp_path / "sharegpt.json")
    assert (fmt_messages, fmt_sharegpt) == ("chat (messages)", "chat (ShareGPT)")
    assert messages == sharegpt == [{"messages": c} for c in conversations]
    a, stats_a = tokenize_chat(messages, chatml, 512)
    b, stats_b = tokenize_chat(sharegpt, chatml, 512)
    assert a == b and len(a) == 3
    assert stats_a.lengths == stats_b.lengths and stats_a.trained_tokens == stats_b.trained_tokens


def test_chat_mixed_with_other_formats_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATION}) + "\n" + json.dumps({"text": "plain"}) + "\n")
    with pytest.raises(ValueError, match=r"mixes record formats: .*line 1 is chat \(messages\), .*line 2 is text"):
        load_records(path)
    path.write_text(json.dumps({"messages": CONVERSATION}) + "\n"
                    + json.dumps({"conversations": [{"from": "human", "value": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match=r"line 2 is chat \(ShareGPT\); put chat records in a file of their own"):
        load_records(path)
    # the older kinds may still share a file, as before
    path.write_text(json.dumps({"text": "plain"}) + "\n" + json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    assert load_records_with_format(path)[1] == "text + prompt/completion"


# ------------------------------------------------------------------------------------------ truncation
def _exchange(n: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Question number {n} is about the weather today?"},
            {"role": "assistant", "content": f"Answer number {n}: it will be sunny and warm."}]


@pytest.mark.slow
def test_truncation_drops_whole_leading_turns_and_keeps_the_system_prompt(chatml: Any) -> None:
    system = [CONVERSATION[0]]
    long = system + _exchange(1) + _exchange(2) + _exchange(3)
    kept = system + _exchange(3)
    kept_ids, kept_labels = one(chatml, kept)
    two_ids, _ = one(chatml, system + _exchange(2) + _exchange(3))
    # room for the system prompt and the last exchange, not for one more exchange
    examples, stats = tokenize_chat([{"messages": long}], chatml, len(kept_ids) + 1)
    assert len(kept_ids) + 1 < len(two_ids)
    assert examples == [{"input_ids": kept_ids, "labels": kept_labels}]
    assert stats.truncated == 1 and stats.nothing_to_train == []
    # with room for two exchanges, the oldest one goes
    examples, stats = tokenize_chat([{"messages": long}], chatml, len(two_ids))
    assert examples[0]["input_ids"] == two_ids and stats.truncated == 1


@pytest.mark.slow
def test_records_with_nothing_to_train_are_reported_and_all_of_them_is_an_error(chatml: Any) -> None:
    """A conversation whose only exchange does not fit is cut on the right; if that leaves no assistant
    token it is counted (and named), and a dataset of only such records is an error naming the fix."""
    fits = {"messages": _exchange(1)}
    too_long = {"messages": [{"role": "user", "content": "word " * 200}, _exchange(2)[1]]}
    fits_ids, _ = one(chatml, _exchange(1))
    examples, stats = tokenize_chat([fits, too_long, fits], chatml, len(fits_ids))
    assert len(examples) == 2 and stats.nothing_to_train == [1] and stats.truncated == 1 and stats.records == 3
    assert any("record(s) 1" in line for line in stats.lines())
    with pytest.raises(ValueError, match=r"all 1 records have 0 trained tokens .*raise --max-length.*--train-on-inputs"):
        tokenize_chat([too_long], chatml, len(fits_ids))


def test_stats_lines_name_every_statistic() -> None:
    stats = DataStats(records=4, format="chat (messages)", lengths=[10, 30, 20], trained_tokens=12, truncated=1,
                      nothing_to_train=[2])
    text = "\n".join(stats.lines())
    for part in ("4 records", "format chat (messages)", "min 10 / median 20 / max 30", "20.0 % of 60 tokens trained",
                 "1 record(s) truncated", "1 with nothing to train", "record(s) 2"):
        assert part in text, part


# ------------------------------------------------------------------------------------------ the chat example
def test_trec_file_becomes_chat_records(tmp_path: Path) -> None:
    from lorakit.train.chat_example import LABELS, SYSTEM, load_trec, trec_records

    path = tmp_path / "trec.txt"
    path.write_text("NUM:dist How far is it from Denver to Aspen ?\nLOC:city What city has the zip code 35824 ?\n"
                    "NUM:dist How far is it from Denver to Aspen ?\nHUM:ind Who was it ?\nDESC:def Who was it ?\n")
    pairs = load_trec(path)
    assert pairs == [("How far is it from Denver to Aspen ?", "number"), ("What city has the zip code 35824 ?",
                                                                          "location")]  # duplicates dropped
    assert trec_records(pairs[:1]) == [{"messages": [
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": "How far is it from Denver to Aspen ?"},
        {"role": "assistant", "content": "number"}]}]
    assert LABELS == ["abbreviation", "description", "entity", "human", "location", "number"]


def test_data_preview_marks_trained_tokens_and_prints_statistics(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import save_tiny_model_dir

    from lorakit.cli import main

    model = save_tiny_model_dir(tmp_path / "model", "llama")
    template = tmp_path / "chatml.jinja"
    template.write_text("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"say {w}"},
                                                     {"role": "assistant", "content": w}]}) + "\n"
                            for w in ["cat", "dog", "sun"]))
    argv = ["data", "preview", "--data", str(data), "--model", str(model), "--chat-template", str(template), "-n", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "<|im_start|>user\nsay cat<|im_end|>\n<|im_start|>assistant\n[[cat<|im_end|>\n]]" in out
    assert "--- example 1:" in out and "--- example 2:" not in out
    assert "data: 3 records, format chat (messages)" in out and "0 record(s) truncated; 0 with nothing to train" in out
    assert main([*argv, "--train-on-inputs"]) == 0
    assert "[[<|im_start|>user\nsay cat<|im_end|>" in capsys.readouterr().out  # the first token has no label
    assert main([*argv, "--color"]) == 0
    assert "\033[1;32mcat<|im_end|>\n\033[0m" in capsys.readouterr().out
