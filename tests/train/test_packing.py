"""lorakit.train.packing: packed rows give the unpacked loss and gradients, and examples never see each other."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_gpt2, make_llama, randomize_lora, save_tiny_model_dir
from torch import nn

from lorakit import LoraConfig, get_peft_model
from lorakit.train.data import IGNORE_INDEX, collate
from lorakit.train.loop import micro_batches, sequence_mean_loss
from lorakit.train.options import TrainOptions
from lorakit.train.packing import block_causal_mask, pack_rows, packed_collate, packed_loss

LENGTHS = [5, 9, 3, 12, 7, 2]


def examples(lengths: list[int] = LENGTHS, vocab: int = 64) -> list[dict[str, list[int]]]:
    """Random examples whose second half is the target (like prompt → completion)."""
    out = []
    for n in lengths:
        ids = torch.randint(1, vocab, (n,)).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX if j < n // 2 else t for j, t in enumerate(ids)]})
    return out


def adapted(make: Any, targets: list[str]) -> nn.Module:
    model = get_peft_model(make(), LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    randomize_lora(model)  # B ≠ 0: the adapter changes the output and its A gradients are non-zero
    return model


MODELS = [pytest.param(make_llama, ["q_proj", "v_proj"], id="llama"), pytest.param(make_gpt2, ["c_attn"], id="gpt2")]


def test_pack_rows_first_fit_decreasing() -> None:
    # longest first into the first row with room: 12 → A; 9 → B; 7 → C; 5 → B (full); 3 → C; 2 → A (full)
    assert pack_rows(LENGTHS, 14) == [[3, 5], [0, 1], [2, 4]]
    assert pack_rows([4, 4, 4], 4) == [[0], [1], [2]]
    with pytest.raises(ValueError, match=r"examples \[0\] are longer than max_length=3"):
        pack_rows([4], 3)


def test_packed_rows_restart_positions_and_keep_every_token() -> None:
    batch = examples()
    packed = packed_collate(batch, 14, pad_id=0)
    assert packed["input_ids"].shape == (3, 14)
    assert packed["position_ids"][1].tolist() == list(range(5)) + list(range(9))  # examples 0 and 1
    assert packed["position_ids"][2].tolist() == list(range(3)) + list(range(7)) + list(range(4))  # 2, 4, padding
    assert packed["attention_mask"].sum().item() == sum(LENGTHS)
    assert packed["input_ids"][1].tolist() == batch[0]["input_ids"] + batch[1]["input_ids"]
    # each example's first token has no label: nothing of that example predicts it
    labels = packed["labels"][1].tolist()
    assert labels[0] == labels[5] == IGNORE_INDEX
    assert labels[1:5] == batch[0]["labels"][1:] and labels[6:] == batch[1]["labels"][1:]
    assert packed["labels"][2, 10:].tolist() == [IGNORE_INDEX] * 4 and packed["attention_mask"][2, 10:].sum() == 0


def test_block_causal_mask() -> None:
    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])
    allowed = block_causal_mask(positions, torch.float32)[0, 0] == 0
    expected = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                             [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(allowed, expected)


@pytest.mark.parametrize(("make", "targets"), MODELS)
def test_packed_loss_and_lora_gradients_equal_unpacked(make: Any, targets: list[str]) -> None:
    model = adapted(make, targets)
    batch = examples()
    padded = collate(batch, pad_id=0)
    out = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"])
    unpacked = sequence_mean_loss(out.logits, padded["labels"])
    unpacked.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    assert len(expected) > 0 and all(g.abs().sum() > 0 for g in expected.values())
    for keep_logits in (False, True):  # full logits, and the head run only where a target needs it
        model.zero_grad()
        packed = packed_loss(model, packed_collate(batch, 14, pad_id=0), keep_logits)
        packed.backward()
        torch.testing.assert_close(packed, unpacked, atol=1e-5, rtol=0)
        for name, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p.grad, expected[name], atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize(("make", "targets"), MODELS)
def test_an_example_cannot_attend_to_the_one_before_it(make: Any, targets: list[str]) -> None:
    """Change example 1 of a row: the logits of example 2 (same row, after it) do not move."""
    model = adapted(make, targets)
    first, second = examples([6, 5])
    changed = {"input_ids": [(t % 60) + 2 for t in first["input_ids"]], "labels": first["labels"]}
    logits = []
    for batch in ([first, second], [changed, second]):
        packed = packed_collate(batch, 11, pad_id=0)
        assert packed["input_ids"].shape[0] == 1  # one row: example 1 then example 2
        mask = block_causal_mask(packed["position_ids"], torch.float32)
        with torch.no_grad():
            logits.append(model(input_ids=packed["input_ids"], attention_mask=mask,
                                position_ids=packed["position_ids"]).logits[0])
    assert not torch.allclose(logits[0][:6], logits[1][:6])  # example 1 itself did change
    torch.testing.assert_close(logits[0][6:], logits[1][6:], atol=1e-6, rtol=0)
    # and example 2 alone, unpacked, gives the same logits
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([second["input_ids"]])).logits[0]
    torch.testing.assert_close(logits[0][6:], alone, atol=1e-5, rtol=0)


def test_packing_keeps_the_distributed_row_split() -> None:
    """Each rank packs exactly the rows shard_rows gives it, micro-batch by micro-batch."""
    batch = examples(LENGTHS * 4)
    opts = TrainOptions(batch_size=3, grad_accum=2, max_length=14, packing=True)
    indices = list(range(24))
    for rank in range(2):
        from lorakit.train.distributed import shard_rows

        for rows, packed in zip(shard_rows(indices, 3, 2, rank, 2),
                                micro_batches(batch, indices, opts, 0, rank, 2), strict=True):
            assert packed["attention_mask"].sum().item() == sum(len(batch[i]["input_ids"]) for i in rows)
            assert sorted(packed["input_ids"][packed["attention_mask"].bool()].tolist()) == sorted(
                t for i in rows for t in batch[i]["input_ids"])


@pytest.mark.slow
def test_training_with_packing_matches_training_without(tmp_path: Path) -> None:
    """lorakit train --packing (gradient accumulation, the fused LoRA op, no dropout) ends with the adapter
    the unpacked run ends with."""
    from lorakit.io import load_adapter_weights
    from lorakit.train.loop import train

    model_dir = save_tiny_model_dir(tmp_path / "model", "llama")
    words = ["short", "a much longer record than that one", "mid size", "x", "another long line of text here"]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{w} ->", "completion": f" {w[::-1]}"}) + "\n"
                            for w in words * 4))
    adapters = []
    for packing in (False, True):
        opts = TrainOptions(model=str(model_dir), data=str(data), output_dir=str(tmp_path / f"run-{packing}"),
                            max_steps=3, batch_size=4, grad_accum=2, lora_dropout=0.0, max_length=48, samples=0,
                            progress=False, packing=packing, token_cache=False, lr=1e-2)
        train(opts)
        adapters.append(load_adapter_weights(tmp_path / f"run-{packing}" / "adapter"))
    assert adapters[0].keys() == adapters[1].keys()
    for key in adapters[0]:
        torch.testing.assert_close(adapters[1][key], adapters[0][key], atol=1e-4, rtol=0, msg=key)
    assert any(t.abs().sum() > 0 for k, t in adapters[1].items() if "lora_B" in k)
