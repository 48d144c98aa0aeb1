"""llama.cpp itself runs lorakit's GGUF files (opt-in: ``make test-llamacpp``; needs a built llama-cpp-python).

The embedded SmolLM2-135M-Instruct as llama.cpp ships it (the original Q4_1 GGUF) with a sentiment adapter
that ``lorakit train`` trained (the default run, one epoch of 640 reviews, with LoRA on all seven linear
projections so that every tensor name llama.cpp maps is exercised) on the dequantized fp32 copy of the same
weights, exported by ``lorakit export``:

1. Adapter. For 200 reviews the adapter was not trained on, the change the adapter makes to the next-token logits,
   Δ = logits(with adapter) − logits(without), in llama.cpp (``Llama(model_path=Q4_1, lora_path=…)``)
   against lorakit on the dequantized base. Bar: Pearson correlation ≥ 0.99 (pooled over all reviews and
   the whole vocabulary, and the median per review), and the same greedy label (" positive" vs
   " negative") on ≥ 98 % of the reviews. Why not equality: llama.cpp multiplies Q4_1 weights by
   activations it rounds to 8 bits (ggml's Q8_1 dot products), lorakit by fp32 activations, so even the
   base logits differ by that rounding; a wrong name, orientation, permutation or scale would instead
   drop the correlation far below 0.9 (a q/k permutation mistake alone does).
2. Merged model. ``lorakit export --merged`` (f32) in llama.cpp gives the same greedy tokens as lorakit's
   ``merge_and_unload`` model on 20 prompts (10 reviews, 10 open prompts; 12 new tokens each): both are the
   same fp32 matrices, so only summation order differs. f16 is reported too.

Both engines get the same token ids (tokenized once by the Hugging Face tokenizer), so tokenization
cannot differ. The numbers are printed (``-s``) for the issue note.
"""

from __future__ import annotations

import os
import shutil
import statistics
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = [
    pytest.mark.llamacpp,
    pytest.mark.skipif(os.environ.get("LORAKIT_TEST_LLAMACPP") != "1",
                       reason="opt-in: `make test-llamacpp` builds llama-cpp-python and runs this"),
]

TARGETS = "all-linear"  # q, k, v, o, gate, up, down: each llama.cpp tensor name, and the q/k permutation
TRAINED_ON = 640  # `lorakit train`'s default --train-size: the first 640 records of the task's training split
HELDOUT = int(os.environ.get("LORAKIT_LLAMACPP_REVIEWS", "200"))  # fewer only to fit an overloaded machine
PROMPTS = int(os.environ.get("LORAKIT_LLAMACPP_PROMPTS", "20"))
NEW_TOKENS = 12
OPEN_PROMPTS = ["The capital of France is", "Once upon a time", "The best way to learn a language is",
                "def fibonacci(n):", "Water boils at", "My favourite film is", "The three primary colours are",
                "In 1969, the first", "A good breakfast includes", "The movie was"]


def _trained_adapter() -> Path:
    """A sentiment adapter from `lorakit train` (default task and schedule, all-linear), trained once into the
    cache."""
    from llamacpp_tools import cache

    from lorakit.cli import main

    final = cache() / f"sentiment-{TARGETS}"
    if not (final / "adapter" / "adapter_model.safetensors").is_file():
        staging = cache() / f".sentiment-{TARGETS}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        code = main(["train", "--target-modules", TARGETS, "--eval-size", "2", "--samples", "0",
                     "--no-progress", "--threads", "2", "--output-dir", str(staging)])
        assert code == 0
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
    return final / "adapter"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from lorakit.cli import main
    from lorakit.gguf.default_gguf import ensure_default_gguf
    from lorakit.train.data import load_default_task
    from lorakit.train.defaults import ensure_default_model

    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("llamacpp")
    model_dir, base_gguf, adapter = ensure_default_model(), ensure_default_gguf(), _trained_adapter()
    files = {"adapter": out / "adapter.gguf", "merged_f32": out / "merged-f32.gguf",
             "merged_f16": out / "merged-f16.gguf"}
    assert main(["export", str(adapter), "--model", str(model_dir), "-o", str(files["adapter"])]) == 0
    for outtype in ("f32", "f16"):
        assert main(["export", "--merged", str(adapter), "--model", str(model_dir), "-o",
                     str(files[f"merged_{outtype}"]), "--outtype", outtype]) == 0
    # --eval-size 2 holds out 2 reviews; the training split's records after the 640 trained on are unseen too
    train, _ = load_default_task(seed=0, heldout_size=2)
    heldout = train[TRAINED_ON:TRAINED_ON + HELDOUT]
    return {"model_dir": model_dir, "base_gguf": base_gguf, "adapter": adapter, "files": files,
            "heldout": heldout, "tokenizer": AutoTokenizer.from_pretrained(model_dir)}


def _llama(path: Path, lora: Path | None = None) -> Any:
    from llama_cpp import Llama

    kwargs = {"lora_path": str(lora)} if lora is not None else {}
    return Llama(model_path=str(path), n_ctx=512, n_batch=512, n_threads=2, logits_all=True, verbose=False,
                 seed=0, **kwargs)


def _llama_last_logits(llm: Any, ids: list[int]) -> torch.Tensor:
    llm.reset()
    llm.eval(ids)
    return torch.tensor(llm.scores[llm.n_tokens - 1], dtype=torch.float64)  # without logits_all: zeros


def _llama_greedy(llm: Any, ids: list[int]) -> list[int]:
    tokens = list(ids)
    llm.reset()
    llm.eval(tokens)
    for _ in range(NEW_TOKENS):
        token = int(torch.tensor(llm.scores[llm.n_tokens - 1]).argmax())
        tokens.append(token)
        llm.eval([token])
    return tokens[len(ids):]


def _torch_greedy(model: Any, ids: list[int]) -> list[int]:
    """Greedy tokens with the KV cache (argmax each step, no stopping, as ``_llama_greedy``)."""
    tokens: list[int] = []
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), use_cache=True)
        for _ in range(NEW_TOKENS):
            token = int(out.logits[0, -1].argmax())
            tokens.append(token)
            out = model(input_ids=torch.tensor([[token]]), cache=out.cache, use_cache=True)  # transformers 5 names it cache
    return tokens


def _torch_last_logits(model: Any, id_lists: list[list[int]], pad: int, batch: int = 16) -> list[torch.Tensor]:
    """Next-token logits after each prompt, batched with right padding (read at each last real token)."""
    found: list[torch.Tensor] = []
    with torch.no_grad():
        for start in range(0, len(id_lists), batch):
            chunk = id_lists[start:start + batch]
            width = max(len(i) for i in chunk)
            ids = torch.tensor([i + [pad] * (width - len(i)) for i in chunk])
            mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in chunk])
            logits = model(input_ids=ids, attention_mask=mask).logits
            found.extend(logits[row, len(i) - 1].double() for row, i in enumerate(chunk))
    return found


def _pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x - x.mean(), y - y.mean()
    return float((x @ y) / (x.norm() * y.norm()))


def test_adapter_changes_llama_cpp_logits_as_it_changes_lorakits(setup: dict[str, Any]) -> None:
    from lorakit import PeftModel
    from lorakit.commands._adapter_tools import load_base_model
    from lorakit.train.data import LABEL_WORDS

    tokenizer = setup["tokenizer"]
    label_ids = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in LABEL_WORDS]
    peft = PeftModel.from_pretrained(load_base_model(setup["model_dir"], "float32"), setup["adapter"])
    ids = [tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in setup["heldout"]]
    # lorakit first, then llama.cpp: their thread pools never compete for the cores
    lorakit_with = _torch_last_logits(peft, ids, tokenizer.pad_token_id)
    with peft.disable_adapter():
        lorakit_without = _torch_last_logits(peft, ids, tokenizer.pad_token_id)
    del peft
    plain, adapted = _llama(setup["base_gguf"]), _llama(setup["base_gguf"], setup["files"]["adapter"])
    ours_all, theirs_all, per_review, base_corr = [], [], [], []
    same_label = correct_ours = correct_theirs = 0
    for record, prompt, with_adapter, without in zip(setup["heldout"], ids, lorakit_with, lorakit_without,
                                                     strict=True):
        cpp_without, cpp_with = _llama_last_logits(plain, prompt), _llama_last_logits(adapted, prompt)
        ours, theirs = with_adapter - without, cpp_with - cpp_without
        ours_all.append(ours)
        theirs_all.append(theirs)
        per_review.append(_pearson(ours, theirs))
        base_corr.append(_pearson(without, cpp_without))
        label_ours = int(with_adapter[label_ids].argmax())
        label_theirs = int(cpp_with[label_ids].argmax())
        gold = LABEL_WORDS.index(record["completion"])
        same_label += label_ours == label_theirs
        correct_ours += label_ours == gold
        correct_theirs += label_theirs == gold
    pooled = _pearson(torch.cat(ours_all), torch.cat(theirs_all))
    n = len(setup["heldout"])
    print(f"\nllama.cpp vs lorakit, adapter logit change on {n} held-out reviews: pooled correlation "
          f"{pooled:.4f}, per review median {statistics.median(per_review):.4f} / min {min(per_review):.4f}; "
          f"base logits correlation median {statistics.median(base_corr):.4f}; same greedy label "
          f"{same_label}/{n}; accuracy lorakit {correct_ours / n:.3f}, llama.cpp {correct_theirs / n:.3f}")
    assert n == HELDOUT
    assert pooled >= 0.99 and statistics.median(per_review) >= 0.99
    assert same_label >= 0.98 * n


def test_merged_gguf_greedy_tokens_equal_lorakits_merged_model(setup: dict[str, Any]) -> None:
    from lorakit import PeftModel
    from lorakit.commands._adapter_tools import load_base_model

    tokenizer = setup["tokenizer"]
    merged = PeftModel.from_pretrained(load_base_model(setup["model_dir"], "float32"),
                                       setup["adapter"]).merge_and_unload()
    half = PROMPTS // 2  # 10 reviews + 10 open prompts
    prompts = [r["prompt"] for r in setup["heldout"][:half]] + OPEN_PROMPTS[: PROMPTS - half]
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    expected = [_torch_greedy(merged, i) for i in ids]
    agree = {}
    for outtype in ("f32", "f16"):
        llm = _llama(setup["files"][f"merged_{outtype}"])
        agree[outtype] = sum(_llama_greedy(llm, i) == e for i, e in zip(ids, expected, strict=True))
    print(f"\nmerged GGUF in llama.cpp vs lorakit merge_and_unload, greedy {NEW_TOKENS} tokens on {len(ids)} "
          f"prompts: identical f32 {agree['f32']}/{len(ids)}, f16 {agree['f16']}/{len(ids)}; e.g. "
          f"{prompts[-1]!r} → {tokenizer.decode(expected[-1])!r}")
    assert agree["f32"] == len(ids)
