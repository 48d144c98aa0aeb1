"""lorakit.train.data: file loaders and their errors, the default task split, label masking, batching."""

from __future__ import annotations

import bz2
import csv
import io
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lorakit.train.data import (
    IGNORE_INDEX,
    INSTRUCTION_TEMPLATE,
    INSTRUCTION_WITH_INPUT_TEMPLATE,
    PROMPT_TEMPLATE,
    classification_accuracy,
    collate,
    load_default_task,
    load_records,
    tokenize_records,
)

WORDS = "review sentiment : good bad movie the a plot was is it positive negative hello world long".split()


def make_tokenizer(add_bos: bool = False):
    """A word-level tokenizer over WORDS (ids: <pad>=0 <unk>=1 <s>=2 </s>=3, then the words)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<pad>", "<unk>", "<s>", "</s>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture
def tokenizer():
    return make_tokenizer()


def write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ loaders


def test_jsonl_all_record_kinds(tmp_path: Path) -> None:
    lines = [
        {"text": "hello world"},
        {"prompt": "Review: good\nSentiment:", "completion": " positive"},
        {"instruction": "Say hi", "output": "hi"},
        {"instruction": "Translate", "input": "bonjour", "output": "hello"},
        {"instruction": "Say bye", "input": "", "output": "bye"},
    ]
    path = write(tmp_path / "d.jsonl", "\n".join(json.dumps(line) for line in lines) + "\n\n")
    records = load_records(path)
    assert records == [
        {"text": "hello world"},
        {"prompt": "Review: good\nSentiment:", "completion": " positive"},
        {"prompt": INSTRUCTION_TEMPLATE.format(instruction="Say hi"), "completion": "hi"},
        {
            "prompt": INSTRUCTION_WITH_INPUT_TEMPLATE.format(instruction="Translate", input="bonjour"),
            "completion": "hello",
        },
        {"prompt": INSTRUCTION_TEMPLATE.format(instruction="Say bye"), "completion": "bye"},
    ]


def test_json_list_and_jsonl_named_json(tmp_path: Path) -> None:
    as_list = write(tmp_path / "list.json", json.dumps([{"text": "a"}, {"text": "b"}]))
    as_lines = write(tmp_path / "lines.json", '{"text": "a"}\n{"text": "b"}\n')
    assert load_records(as_list) == load_records(as_lines) == [{"text": "a"}, {"text": "b"}]


def test_csv_and_tsv(tmp_path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["prompt", "completion"])
    writer.writerow(["Review: a, b\nand c\nSentiment:", " negative"])
    writer.writerow(["", ""])  # a blank row is skipped
    writer.writerow(["Review: good\nSentiment:", " positive"])
    path = write(tmp_path / "d.csv", "\ufeff" + buffer.getvalue())  # with a BOM, as Excel writes it
    assert load_records(path) == [
        {"prompt": "Review: a, b\nand c\nSentiment:", "completion": " negative"},
        {"prompt": "Review: good\nSentiment:", "completion": " positive"},
    ]
    tsv = write(tmp_path / "d.tsv", "instruction\tinput\toutput\nAdd\t1 2\t3\n")
    assert load_records(tsv) == [
        {"prompt": INSTRUCTION_WITH_INPUT_TEMPLATE.format(instruction="Add", input="1 2"), "completion": "3"}
    ]


def test_txt_paragraphs_or_lines(tmp_path: Path) -> None:
    paragraphs = write(tmp_path / "p.txt", "\nfirst line\nsecond line\n\n\nthird\n")
    assert load_records(paragraphs) == [{"text": "first line\nsecond line"}, {"text": "third"}]
    lines = write(tmp_path / "l.txt", "one\ntwo\nthree")
    assert load_records(lines) == [{"text": "one"}, {"text": "two"}, {"text": "three"}]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl does not exist"):
        load_records(tmp_path / "nope.jsonl")


@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [
        ("empty.jsonl", "", r"empty\.jsonl is empty"),
        ("blank.txt", "\n  \n\n", r"blank\.txt is empty"),
        ("data.parquet", "x", r"unsupported suffix '\.parquet'"),
        ("bad.jsonl", '{"text": "a"}\n{"text": \n', r"bad\.jsonl line 2 is not valid JSON"),
        ("list.jsonl", '["a", "b"]\n', r"line 1 is a JSON list, expected an object"),
        ("num.jsonl", '{"text": 3}\n', r"line 1: column 'text' must be a string, got int"),
        ("none.jsonl", '{"prompt": "p", "completion": ""}\n', r"line 1: column 'completion' is empty"),
        ("header.csv", "text\n", r"header\.csv has a header \['text'\] but no data rows"),
        ("cells.csv", "text\na,b\n", r"cells\.csv line 2 has more cells than the 1 header columns"),
        ("dup.csv", "text,text\na,b\n", r"header repeats a column"),
        ("blankrows.csv", "text\n\n\n", r"has a header \['text'\] but no data rows"),
    ],
)
def test_malformed_files(tmp_path: Path, name: str, content: str, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        load_records(write(tmp_path / name, content))


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is a directory"):
        load_records(tmp_path)


@pytest.mark.parametrize(
    ("content", "found"),
    [
        ('{"question": "q", "answer": "a"}\n', "['answer', 'question']"),
        ('{"text": "a", "label": "pos"}\n', "['label', 'text']"),  # an extra column is not ignored
        ('{"prompt": "p", "completon": "c"}\n', "['completon', 'prompt']"),  # a typo
        ('{"instruction": "i", "input": "x"}\n', "['input', 'instruction']"),  # no output
    ],
)
def test_unknown_columns_list_found_and_accepted(tmp_path: Path, content: str, found: str) -> None:
    with pytest.raises(ValueError) as raised:
        load_records(write(tmp_path / "d.jsonl", content))
    message = str(raised.value)
    assert "d.jsonl line 1" in message
    assert f"has columns {found}" in message
    assert "text | prompt, completion | instruction, output (+ optional input)" in message


def test_csv_unknown_columns(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"line 2 has columns \['label', 'sentence'\]; accepted"):
        load_records(write(tmp_path / "d.csv", "sentence,label\ngreat,1\n"))


def test_undecodable_bytes_name_the_line(tmp_path: Path) -> None:
    path = write(tmp_path / "latin1.txt", "caf\u00e9 ok\n".encode() + b"second\nna\xefve\n")
    with pytest.raises(ValueError, match=r"latin1\.txt is not valid UTF-8: line 3 has the byte\(s\) b'\\xef"):
        load_records(path)


# ------------------------------------------------------------------------------------------ default task


def write_corpus(directory: Path) -> Path:
    rows = [("plot", "a synopsis of the plot")]
    rows += [("fresh", f"good movie number {i}") for i in range(30)]
    rows += [("rotten", f"bad movie number {i}") for i in range(20)]
    rows += [("fresh", "good movie number 0"), ("fresh", "good   movie number 1 ")]  # duplicates
    rows += [("fresh", "it was a movie"), ("rotten", "it was a movie")]  # both labels: dropped
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
    writer.writerows([category, text, "m", "False"] for category, text in rows)
    (directory / "rotten_tomatoes_corpus_full.csv.bz2").write_bytes(bz2.compress(buffer.getvalue().encode()))
    return directory


def test_default_task_split(tmp_path: Path) -> None:
    train, heldout = load_default_task(seed=0, heldout_size=10, data_dir=write_corpus(tmp_path))
    assert len(heldout) == 10 and len(train) == 30  # 20 per label after balancing
    for split in (train, heldout):
        completions = [record["completion"] for record in split]
        assert completions.count(" positive") == completions.count(" negative")
    prompts = [record["prompt"] for record in train + heldout]
    assert len(set(prompts)) == len(prompts)
    assert all(prompt.startswith("Review: ") and prompt.endswith("\nSentiment:") for prompt in prompts)
    assert PROMPT_TEMPLATE.format(text="it was a movie") not in prompts
    assert not any("synopsis" in prompt for prompt in prompts)
    for record in train + heldout:
        assert record["completion"] == (" positive" if "good" in record["prompt"] else " negative")


def test_default_task_is_deterministic_per_seed(tmp_path: Path) -> None:
    write_corpus(tmp_path)
    first = load_default_task(seed=3, heldout_size=10, data_dir=tmp_path)
    assert load_default_task(seed=3, heldout_size=10, data_dir=tmp_path) == first
    assert load_default_task(seed=4, heldout_size=10, data_dir=tmp_path) != first


@pytest.mark.parametrize(
    ("size", "pattern"), [(7, "must be an even number"), (40, "leaves no training data")]
)
def test_default_task_bad_heldout_size(tmp_path: Path, size: int, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        load_default_task(heldout_size=size, data_dir=write_corpus(tmp_path))


def test_default_task_missing_corpus(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="rotten_tomatoes_corpus_full.csv.bz2"):
        load_default_task(data_dir=tmp_path)


# ------------------------------------------------------------------------------------------ tokenization


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_prompt_tokens_are_masked(tokenizer) -> None:
    [example] = tokenize_records(
        [{"prompt": "review : good movie", "completion": " positive"}], tokenizer, 32
    )
    prompt, completion, eos = (
        ids(tokenizer, "review : good movie"),
        ids(tokenizer, "positive"),
        tokenizer.eos_token_id,
    )
    assert example["input_ids"] == prompt + completion + [eos]
    assert example["labels"] == [IGNORE_INDEX] * len(prompt) + completion + [eos]


def test_no_eos_when_asked(tokenizer) -> None:
    [example] = tokenize_records([{"prompt": "good", "completion": " bad"}], tokenizer, 8, add_eos=False)
    assert example["input_ids"] == ids(tokenizer, "good bad")
    assert example["labels"] == [IGNORE_INDEX] + ids(tokenizer, "bad")


def test_truncation_cuts_the_prompt_from_the_left(tokenizer) -> None:
    record = {"prompt": "the a plot was the movie is good", "completion": " positive negative"}
    [example] = tokenize_records([record], tokenizer, 5)
    # 3 completion tokens (2 words + EOS) survive; the prompt keeps its last 2 tokens
    assert example["input_ids"] == ids(tokenizer, "is good positive negative") + [tokenizer.eos_token_id]
    assert example["labels"][:2] == [IGNORE_INDEX] * 2
    assert len(example["input_ids"]) == len(example["labels"]) == 5


def test_truncation_keeps_bos() -> None:
    tokenizer = make_tokenizer(add_bos=True)
    [example] = tokenize_records([{"prompt": "the a plot was good", "completion": " bad"}], tokenizer, 4)
    assert example["input_ids"] == [
        tokenizer.bos_token_id,
        *ids(tokenizer, "good bad"),
        tokenizer.eos_token_id,
    ]
    assert example["labels"] == [IGNORE_INDEX, IGNORE_INDEX, *ids(tokenizer, "bad"), tokenizer.eos_token_id]


def test_overlong_completion_keeps_one_prompt_token(tokenizer) -> None:
    record = {"prompt": "the plot", "completion": " good bad good bad good"}
    [example] = tokenize_records([record], tokenizer, 4)
    assert example["input_ids"] == ids(tokenizer, "plot good bad good")
    assert example["labels"] == [IGNORE_INDEX, *ids(tokenizer, "good bad good")]


def test_text_is_chunked_not_dropped(tokenizer) -> None:
    text = " ".join(["hello", "world"] * 5)  # 10 tokens + EOS = 11
    examples = tokenize_records([{"text": text}], tokenizer, 4)
    assert [len(example["input_ids"]) for example in examples] == [4, 4, 3]
    assert sum((example["input_ids"] for example in examples), []) == ids(tokenizer, text) + [3]
    assert all(example["labels"] == example["input_ids"] for example in examples)
    # a final chunk of one token has nothing to predict and is dropped
    assert len(tokenize_records([{"text": text}], tokenizer, 5)) == 2


def test_tokenize_rejects_bad_input(tokenizer) -> None:
    with pytest.raises(ValueError, match="max_length=1"):
        tokenize_records([{"text": "a"}], tokenizer, 1)
    with pytest.raises(ValueError, match=r"record 1 has keys \['prompt'\]"):
        tokenize_records([{"text": "a"}, {"prompt": "a"}], tokenizer, 8)


def test_collate_pads_right() -> None:
    batch = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    out = collate(batch, pad_id=0)
    torch.testing.assert_close(out["input_ids"], torch.tensor([[5, 6, 7], [8, 0, 0]]))
    torch.testing.assert_close(out["labels"], torch.tensor([[-100, 6, 7], [8, -100, -100]]))
    torch.testing.assert_close(out["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0]]))
    assert all(tensor.dtype == torch.long for tensor in out.values())
    assert set(collate([{"input_ids": [1]}], pad_id=0)) == {"input_ids", "attention_mask"}
    with pytest.raises(ValueError, match="empty batch"):
        collate([], pad_id=0)


# ------------------------------------------------------------------------------------------ accuracy


class LastTokenVoter(nn.Module):
    """Logits that favour "positive" after the token "good", "negative" after "bad", and — to catch a
    read at the wrong position — "negative" after padding (id 0) or EOS."""

    def __init__(self, tokenizer) -> None:
        super().__init__()
        self.vocab = len(tokenizer)
        self.good, self.bad = tokenizer.convert_tokens_to_ids(["good", "bad"])
        self.positive, self.negative = tokenizer.convert_tokens_to_ids(["positive", "negative"])
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.negative] = 1.0
        logits[..., self.positive] = torch.where(input_ids == self.good, 2.0, 0.0)
        return logits


def test_classification_accuracy_reads_the_last_real_token(tokenizer) -> None:
    model = LastTokenVoter(tokenizer).train()
    records = [
        {"prompt": "the movie was good", "completion": " positive"},
        {"prompt": "good", "completion": " positive"},
        {"prompt": "the long plot was bad", "completion": " negative"},
        {"prompt": "bad bad good", "completion": " negative"},  # the model is wrong here
    ]
    for batch_size in (1, 2, 4):  # right padding in batches must not change any prediction
        assert classification_accuracy(model, tokenizer, records, batch_size=batch_size) == (0.75, 4)
    assert model.training  # mode restored


def test_classification_accuracy_with_a_real_model_is_padding_invariant(tokenizer) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=len(tokenizer), max_position_embeddings=32, pad_token_id=0,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    words = WORDS[:12]
    records = [
        {
            "prompt": " ".join(words[i % 12 : i % 12 + 1 + i % 5]),
            "completion": (" positive", " negative")[i % 2],
        }
        for i in range(24)
    ]
    results = {classification_accuracy(model, tokenizer, records, batch_size=b) for b in (1, 5, 24)}
    assert len(results) == 1
    assert results.pop()[1] == 24


def test_classification_accuracy_errors(tokenizer) -> None:
    model = LastTokenVoter(tokenizer)
    with pytest.raises(ValueError, match="completion ' maybe'"):
        classification_accuracy(model, tokenizer, [{"prompt": "good", "completion": " maybe"}])
    with pytest.raises(ValueError, match="share a first token"):
        classification_accuracy(
            model, tokenizer, [{"prompt": "a", "completion": "good"}], labels=("good", "good")
        )
    with pytest.raises(ValueError, match="no records"):
        classification_accuracy(model, tokenizer, [])
