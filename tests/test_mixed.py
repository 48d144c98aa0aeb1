"""Mixed-adapter batches (lorakit.mixed): each row equals a single-adapter run of that row."""

from __future__ import annotations

import pytest
import torch

from lorakit import BASE_ROW, LoraConfig, get_peft_model
from lorakit.mixed import BatchPlan, build_stacks, stacked_factors

transformers = pytest.importorskip("transformers")

VOCAB = 100


def tiny_gpt2_with_adapters():
    """2-layer GPT-2 with three adapters of different ranks and targets (so some layers lack some)."""
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0,
                                     bos_token_id=1, eos_token_id=2)
    model = get_peft_model(
        transformers.GPT2LMHeadModel(config),
        LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc", "wte"], init_lora_weights=False),
        "a",
    )
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], init_lora_weights=False))
    model.add_adapter("c", LoraConfig(r=6, lora_alpha=3, target_modules=["c_fc", "wte"], init_lora_weights=False))
    for name, param in model.named_parameters():  # B large enough that every adapter changes the logits
        if "lora_B" in name or "lora_embedding_A" in name:
            torch.nn.init.normal_(param, std=0.5)
    return model.eval()


def single_adapter_run(model, name: str, fn):
    if name == BASE_ROW:
        with model.disable_adapter():
            return fn()
    model.set_adapter(name)
    try:
        return fn()
    finally:
        model.set_adapter("a")


@pytest.fixture
def model():
    torch.manual_seed(0)
    return tiny_gpt2_with_adapters()


NAMES = ["a", BASE_ROW, "c", "b", "a", "c"]


@pytest.mark.parametrize("grad", [False, True])
def test_rows_equal_single_adapter_runs(model, grad: bool) -> None:
    ids = torch.randint(3, VOCAB, (len(NAMES), 7))
    with torch.set_grad_enabled(grad):
        mixed = model(input_ids=ids, adapter_names=NAMES).logits
        outputs = {n: single_adapter_run(model, n, lambda: model(input_ids=ids).logits) for n in set(NAMES)}
    for i, name in enumerate(NAMES):
        torch.testing.assert_close(mixed[i], outputs[name][i], atol=1e-5, rtol=1e-5, msg=f"row {i} ({name})")
    assert not torch.allclose(outputs["a"], outputs[BASE_ROW], atol=1e-3)
    assert not torch.allclose(outputs["b"], outputs["c"], atol=1e-3)


def test_padding_rows_equal_single_row_runs(model) -> None:
    ids = torch.randint(3, VOCAB, (4, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[3, :5] = 0
    ids[mask == 0] = 0
    names = ["c", "a", BASE_ROW, "b"]
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        for i, name in enumerate(names):
            row = single_adapter_run(
                model, name, lambda i=i: model(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1]).logits
            )
            keep = mask[i].bool()
            torch.testing.assert_close(mixed[i][keep], row[0][keep], atol=1e-5, rtol=1e-5, msg=f"row {i}")


def test_generate_with_kv_cache_equals_single_adapter_generate(model) -> None:
    ids = torch.randint(3, VOCAB, (4, 6))
    mask = torch.ones_like(ids)
    mask[2, :2] = 0
    ids[mask == 0] = 0
    names = ["b", "a", "c", BASE_ROW]
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    mixed = model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **kwargs)
    for i, name in enumerate(names):
        single = single_adapter_run(
            model, name, lambda i=i: model.generate(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1], **kwargs)
        )
        assert mixed[i].tolist() == single[0].tolist(), (i, name)
    # and the step logits agree, not only the argmax: one cached step by hand
    with torch.no_grad():
        first = model(input_ids=ids, attention_mask=mask, adapter_names=names, use_cache=True)
        step = model(input_ids=ids[:, -1:], attention_mask=torch.cat([mask, mask[:, -1:]], 1),
                     cache=first.past_key_values, adapter_names=names).logits
        full_ids = torch.cat([ids, ids[:, -1:]], 1)
        full_mask = torch.cat([mask, mask[:, -1:]], 1)
        full = model(input_ids=full_ids, attention_mask=full_mask, adapter_names=names).logits
    torch.testing.assert_close(step[:, -1], full[:, -1], atol=1e-4, rtol=1e-4)


def test_layer_cost_does_not_grow_with_adapters(model) -> None:
    """Vectorised: 3 distinct adapters instead of 1 cost no op per layer (only the plan's two extra row
    index tensors, built once per forward)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            Count.n += 1
            return func(*args, **(kwargs or {}))

    ids = torch.randint(3, VOCAB, (6, 5))
    counts = []
    for names in (["a"] * 6, ["a", "b", "c", "a", "b", "c"]):
        with torch.no_grad():
            model(input_ids=ids, adapter_names=names)  # warm the stacks
            Count.n = 0
            with Count():
                model(input_ids=ids, adapter_names=names)
        counts.append(Count.n)
    assert counts[1] - counts[0] == 2


def test_stacks_follow_weight_changes_and_new_adapters(model) -> None:
    ids = torch.randint(3, VOCAB, (3, 5))
    names = ["a", "b", "c"]
    with torch.no_grad():
        model(input_ids=ids, adapter_names=names)
        layer = model.base_model.model.transformer.h[0].attn.c_attn
        before = stacked_factors(layer)
        layer.lora_B["b"].weight.mul_(3.0)  # an optimizer step does the same: in place
        assert stacked_factors(layer) is not before
        model.add_adapter("d", LoraConfig(r=3, lora_alpha=3, target_modules=["c_attn"], init_lora_weights=False))
        torch.nn.init.normal_(layer.lora_B["d"].weight)
        names = ["a", "b", "d"]
        mixed = model(input_ids=ids, adapter_names=names).logits
        for i, name in enumerate(names):
            row = single_adapter_run(model, name, lambda i=i: model(input_ids=ids[i:i + 1]).logits)
            torch.testing.assert_close(mixed[i], row[0], atol=1e-5, rtol=1e-5)
        model.to(torch.float64)  # .to() swaps param.data without a version bump: caught by the storage check
        assert model(input_ids=ids, adapter_names=names).logits.dtype == torch.float64
        assert stacked_factors(layer).a.dtype == torch.float64


def test_training_through_a_mixed_batch_reaches_each_adapter() -> None:
    torch.manual_seed(0)
    model = tiny_gpt2_with_adapters().train()
    model.set_adapter(["a", "b"])  # trainable: a and b
    ids = torch.randint(3, VOCAB, (3, 5))
    names = ["a", "b", BASE_ROW]
    model(input_ids=ids, adapter_names=names).logits.square().mean().backward()
    mixed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    total = torch.zeros(())
    for i, name in enumerate(names):
        if name == BASE_ROW:
            continue
        model.set_adapter(name)
        total = total + model(input_ids=ids[i:i + 1]).logits.square().sum() / model.config.vocab_size / 15
    model.set_adapter(["a", "b"])
    total.backward()
    single = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert mixed.keys() == single.keys() and any(".b." in n for n in mixed)
    for n in mixed:
        torch.testing.assert_close(mixed[n], single[n], atol=1e-5, rtol=1e-4, msg=n)


def test_dropout_in_training_takes_the_per_adapter_loop() -> None:
    torch.manual_seed(0)
    model = tiny_gpt2_with_adapters()
    model.add_adapter("drop", LoraConfig(r=2, target_modules=["c_attn"], lora_dropout=0.5))
    model.train()
    ids = torch.randint(3, VOCAB, (2, 5))
    out = model(input_ids=ids, adapter_names=["drop", "a"]).logits
    assert out.shape == (2, 5, VOCAB)


def test_plan_checks_row_count_and_builds_stacks_per_layer(model) -> None:
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    stacks = build_stacks(layer)
    assert stacks.names == ("a", "b") and stacks.a.shape == (3, 4, 32) and stacks.bt.shape == (3, 4, 96)
    assert torch.count_nonzero(stacks.a[2]) == 0 and torch.count_nonzero(stacks.a[1, 2:]) == 0
    plan = BatchPlan.build(["c", "a", BASE_ROW])
    assert plan.slot_rows(stacks.names, torch.device("cpu")).tolist() == [2, 0, 2]
    with pytest.raises(ValueError, match="2 rows"):
        plan.apply(layer, torch.randn(2, 4, 32), torch.randn(2, 4, 96))


@pytest.mark.parametrize("names", [["b", "a", "b", "a"], ["a", BASE_ROW], ["c", "a", "b", BASE_ROW]])
def test_decode_rows_in_slot_segments_equal_single_adapter_runs(model, monkeypatch, names) -> None:
    """Decode (1 token per row < rank): layers whose rows fill the stack's slots equally permute the rows
    instead of gathering weights (ops.segmented_lora_linear); the result is the same as per-row runs."""
    from lorakit import ops

    calls = []
    segmented = ops.segmented_lora_linear
    monkeypatch.setattr(ops, "segmented_lora_linear", lambda *a: calls.append(1) or segmented(*a))
    ids = torch.randint(3, VOCAB, (len(names), 6))
    with torch.no_grad():
        first = model(input_ids=ids, adapter_names=names, use_cache=True)
        step = model(input_ids=ids[:, -1:], cache=first.past_key_values, adapter_names=names).logits
    # c_attn holds a, b (+ the zero slot), c_proj a (+ zero), c_fc a, c (+ zero): the first two name lists fill
    # some layer's slots equally, the last fills none (those layers gather, as in prefill)
    assert bool(calls) == (names != ["c", "a", "b", BASE_ROW])
    for name in set(names):
        def run(name=name):
            with torch.no_grad():
                out = model(input_ids=ids, use_cache=True)
                return model(input_ids=ids[:, -1:], cache=out.past_key_values).logits
        single = single_adapter_run(model, name, run)
        for row in [j for j, n in enumerate(names) if n == name]:
            torch.testing.assert_close(step[row], single[row], atol=1e-5, rtol=1e-5, msg=f"row {row} ({name})")
