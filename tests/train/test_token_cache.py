"""lorakit.train.token_cache: a rerun reuses the tokenized data; a damaged entry is rebuilt, never trusted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_byte_tokenizer, save_tiny_model_dir

from lorakit.cli import main
from lorakit.train.token_cache import cache_key, cached, load_entry, save_entry, tokenizer_fingerprint

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
EXAMPLES = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [9, 10], "labels": [-100, 10]}]
STATS = {"records": 2, "format": "text"}


def test_entry_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "entry.safetensors"
    save_entry(path, EXAMPLES, STATS)
    assert load_entry(path) == (EXAMPLES, STATS)
    assert [p.name for p in tmp_path.iterdir()] == ["entry.safetensors"]  # no temporary file left


@pytest.mark.parametrize("damage", ["truncate", "edit-a-token", "garbage"])
def test_a_damaged_entry_is_rebuilt_not_trusted(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "k.safetensors"
    save_entry(path, EXAMPLES, STATS)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 5]
    elif damage == "edit-a-token":
        data[-9] ^= 0x01  # a byte inside the offsets/labels/ids payload, header intact
    else:
        data = bytearray(b"not a safetensors file")
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="is corrupt"):
        load_entry(path)
    said: list[str] = []
    rebuilt = {"input_ids": [1, 2], "labels": [1, 2]}
    examples, _ = cached(tmp_path, "k", lambda: ([rebuilt], STATS), said.append)
    assert examples == [rebuilt]
    assert "is corrupt" in said[0] and "rebuilding" in said[0] and "cached in" in said[1]
    assert load_entry(path) == ([rebuilt], STATS)  # the rebuilt entry replaced the damaged one


def test_the_key_changes_with_records_tokenizer_template_and_options() -> None:
    tokenizer = make_byte_tokenizer()
    fingerprint = tokenizer_fingerprint(tokenizer)
    assert fingerprint is not None and fingerprint == tokenizer_fingerprint(make_byte_tokenizer())
    records = [{"text": "a"}]
    key = cache_key(records, fingerprint, None, {"max_length": 8})
    assert key == cache_key([{"text": "a"}], fingerprint, None, {"max_length": 8})
    others = {cache_key([{"text": "b"}], fingerprint, None, {"max_length": 8}),
              cache_key(records, "other-tokenizer", None, {"max_length": 8}),
              cache_key(records, fingerprint, CHATML, {"max_length": 8}),
              cache_key(records, fingerprint, None, {"max_length": 9})}
    assert key not in others and len(others) == 4


@pytest.mark.slow
def test_a_second_run_reuses_the_tokenized_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Two identical `lorakit train` runs on chat data: the first tokenizes and caches, the second says it
    reused the cache (and trains on the same examples: same adapter digest); an edited entry is rebuilt."""
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    model = save_tiny_model_dir(tmp_path / "model", "llama")
    (tmp_path / "chatml.jinja").write_text(CHATML)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"say {w}"},
                                                     {"role": "assistant", "content": w}]}) + "\n"
                            for w in ["cat", "dog", "sun", "sky", "pen", "cup"] * 2))

    def run(name: str) -> tuple[str, dict[str, object]]:
        argv = ["train", "--model", str(model), "--data", str(data), "--chat-template", str(tmp_path / "chatml.jinja"),
                "--output-dir", str(tmp_path / name), "--max-steps", "1", "--samples", "0", "--no-progress",
                "--lora-dropout", "0"]
        assert main(argv) == 0
        return capsys.readouterr().out, json.loads((tmp_path / name / "summary.json").read_text())

    first, summary1 = run("one")
    assert "tokenized data: cached in" in first and "reused" not in first
    second, summary2 = run("two")
    assert "tokenized data: reused the tokenized data from the cache" in second
    assert summary1["adapter_digest"] == summary2["adapter_digest"]
    [entry] = (tmp_path / "cache" / "tokenized").iterdir()
    raw = bytearray(entry.read_bytes())
    raw[-3] ^= 0x01
    entry.write_bytes(bytes(raw))
    third, summary3 = run("three")
    assert "is corrupt" in third and "rebuilding" in third and "reused" not in third
    assert summary3["adapter_digest"] == summary1["adapter_digest"]
