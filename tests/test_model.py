"""PeftModel: identity at init, merge/unmerge, training, named adapters, mixed batches, bit-exact unmerge."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_gpt2, make_llama, randomize_lora
from torch import nn

from lorakit import LoraConfig, TaskType, get_peft_model
from lorakit.layers import LoraLayer


def _logits(model: nn.Module, ids: torch.Tensor, **kwargs: object) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids, **kwargs)
    return out.logits if hasattr(out, "logits") else out


CASES = {
    "gpt2": (make_gpt2, ["c_attn", "c_proj"], 64),
    "llama": (make_llama, ["q_proj", "v_proj", "embed_tokens"], 64),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_identity_at_init_then_change_then_merge(case: str) -> None:
    factory, targets, vocab = CASES[case]
    model = factory()
    ids = torch.randint(0, vocab, (2, 12))
    base = _logits(model, ids)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    assert torch.equal(_logits(peft, ids), base)  # B = 0 → exactly the base
    randomize_lora(peft)
    unmerged = _logits(peft, ids)
    assert (unmerged - base).abs().max() > 1e-3  # the adapter does change the output
    peft.merge_adapter()
    torch.testing.assert_close(_logits(peft, ids), unmerged, atol=1e-5, rtol=1e-5)
    peft.unmerge_adapter()
    plain = peft.merge_and_unload()
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    assert not any("lora" in name for name, _ in plain.named_parameters())
    torch.testing.assert_close(_logits(plain, ids), unmerged, atol=1e-5, rtol=1e-5)


def test_identity_at_init_toy(toy: nn.Module) -> None:
    ids = torch.randint(0, 20, (4, 8))
    base = _logits(toy, ids)
    peft = get_peft_model(toy, LoraConfig(r=2, target_modules=["emb", "conv1d", "conv2d", "mlp"]))
    assert torch.equal(_logits(peft, ids), base)
    randomize_lora(peft)
    changed = _logits(peft, ids)
    assert (changed - base).abs().max() > 1e-4
    plain = peft.merge_and_unload()
    assert type(plain.conv2d) is nn.Conv2d and type(plain.emb) is nn.Embedding
    torch.testing.assert_close(_logits(plain, ids), changed, atol=1e-5, rtol=1e-5)


def test_unload_returns_untouched_base(gpt2: nn.Module, ids: torch.Tensor) -> None:
    before = {k: v.clone() for k, v in gpt2.state_dict().items()}
    peft = get_peft_model(gpt2, LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False))
    peft.merge_adapter()
    plain = peft.unload()
    after = plain.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_trainable_count_gpt2_small_shapes() -> None:
    model = make_gpt2(n_layer=12, n_embd=768, vocab=16)  # c_attn 768 → 2304, GPT-2 small's shape
    assert model.transformer.h[0].attn.c_attn.weight.shape == (768, 2304)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"]))
    trainable, total = peft.get_nb_trainable_parameters()
    assert trainable == 294_912 == 12 * 8 * (768 + 2304)
    assert total == sum(p.numel() for p in model.parameters())


def test_gradients_reach_lora_only_and_loss_falls(gpt2: nn.Module) -> None:
    peft = get_peft_model(gpt2, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], bias="lora_only"))
    peft.train()
    ids = torch.randint(0, 64, (4, 16))
    trainable = {n for n, p in peft.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n) or n.endswith("c_attn.base_layer.bias") for n in trainable)
    assert any(n.endswith("c_attn.base_layer.bias") for n in trainable)
    optimizer = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(20):
        loss = peft(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        if step in (0, 1):
            for name, param in peft.named_parameters():
                if not param.requires_grad:
                    assert param.grad is None, name
                elif step == 1 or "lora_A" not in name:  # with B = 0 at step 0, ∂L/∂A is exactly 0
                    assert param.grad is not None and param.grad.abs().sum() > 0, name
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1


def test_gradient_matches_finite_differences() -> None:
    from lorakit.layers import Linear

    layer = Linear(nn.Linear(5, 4).double())
    layer.update_layer("default", r=2, lora_alpha=4, lora_dropout=0.0, init_lora_weights=False, use_rslora=False)
    layer.active_adapters = ["default"]
    a, b = layer.factors("default")
    x = torch.randn(3, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a_, b_: x @ layer.base_layer.weight.t() + (x @ a_.t()) @ b_.t() * 2, (a, b))
    out = layer(x).square().sum()
    out.backward()
    manual = torch.autograd.grad(((x @ layer.base_layer.weight.t() + layer.base_layer.bias + (x @ a.t()) @ b.t() * 2)
                                  .square().sum()), (a, b))
    torch.testing.assert_close(a.grad, manual[0])
    torch.testing.assert_close(b.grad, manual[1])


def test_two_adapters_switch_delete_disable(gpt2: nn.Module, ids: torch.Tensor) -> None:
    base = _logits(gpt2, ids)
    peft = get_peft_model(gpt2, LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False))
    peft.add_adapter("other", LoraConfig(r=2, target_modules=["c_proj"], init_lora_weights=False))
    assert peft.active_adapter == "default"
    out_default = _logits(peft, ids)
    peft.set_adapter("other")
    out_other = _logits(peft, ids)
    assert peft.active_adapters == ["other"]
    assert not torch.allclose(out_default, out_other) and not torch.allclose(out_other, base)
    trainable = [n for n, p in peft.named_parameters() if p.requires_grad]
    assert trainable and all(".other." in n for n in trainable)
    peft.set_adapter(["default", "other"])
    both = _logits(peft, ids)
    assert not torch.allclose(both, out_default) and not torch.allclose(both, out_other)
    with peft.disable_adapter():
        assert torch.equal(_logits(peft, ids), base)
    torch.testing.assert_close(_logits(peft, ids), both)
    with pytest.raises(RuntimeError), peft.disable_adapter():
        raise RuntimeError("boom")
    torch.testing.assert_close(_logits(peft, ids), both)  # restored after the exception
    peft.delete_adapter("other")
    assert list(peft.peft_config) == ["default"] and peft.active_adapters == ["default"]
    assert not any(".other." in n for n, _ in peft.named_parameters())
    torch.testing.assert_close(_logits(peft, ids), out_default)


def test_disable_adapter_while_merged_restores_merge(gpt2: nn.Module, ids: torch.Tensor) -> None:
    base = _logits(gpt2, ids)
    peft = get_peft_model(gpt2, LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False))
    peft.merge_adapter()
    merged_weight = peft.base_model.model.transformer.h[0].attn.c_attn.base_layer.weight.clone()
    with peft.disable_adapter():
        assert torch.equal(_logits(peft, ids), base)
    assert peft.merged_adapters == ["default"]
    assert torch.equal(peft.base_model.model.transformer.h[0].attn.c_attn.base_layer.weight, merged_weight)


@pytest.mark.parametrize("case", sorted(CASES))
def test_mixed_batch_equals_per_row(case: str) -> None:
    factory, targets, vocab = CASES[case]
    model = factory()
    ids = torch.randint(0, vocab, (5, 9))
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    peft.add_adapter("b", LoraConfig(r=2, target_modules=targets[:1], init_lora_weights=False))
    names = ["default", "b", "__base__", "b", "default"]
    mixed = _logits(peft, ids, adapter_names=names)
    for row, name in enumerate(names):
        if name == "__base__":
            with peft.disable_adapter():
                expected = _logits(peft, ids[row:row + 1])
        else:
            peft.set_adapter(name)
            expected = _logits(peft, ids[row:row + 1])
        torch.testing.assert_close(mixed[row:row + 1], expected, atol=1e-5, rtol=1e-5)


def test_mixed_batch_in_generate(gpt2: nn.Module) -> None:
    peft = get_peft_model(gpt2, LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False))
    randomize_lora(peft, std=0.5)
    peft.add_adapter("b", LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False))
    randomize_lora(peft, std=0.5)
    prompt = torch.randint(1, 64, (3, 5))
    names = ["b", "__base__", "default"]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    mixed = peft.generate(prompt, adapter_names=names, **kwargs)
    for row, name in enumerate(names):
        if name == "__base__":
            with peft.disable_adapter():
                single = peft.generate(prompt[row:row + 1], **kwargs)
        else:
            peft.set_adapter(name)
            single = peft.generate(prompt[row:row + 1], **kwargs)
        assert torch.equal(mixed[row:row + 1], single)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bit_exact_unmerge_100_cycles(dtype: torch.dtype) -> None:
    model = make_gpt2(n_embd=64).to(dtype)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_fc"],
                                            init_lora_weights=False))
    randomize_lora(peft, std=0.3)
    before = {k: v.clone() for k, v in peft.state_dict().items()}
    for _ in range(100):
        peft.merge_adapter()
        peft.unmerge_adapter()
    after = peft.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == []
    # A merge really changes the weights (so the test cannot pass by doing nothing).
    peft.merge_adapter()
    assert not torch.equal(peft.state_dict()[next(k for k in before if k.endswith("c_attn.base_layer.weight"))],
                           before[next(k for k in before if k.endswith("c_attn.base_layer.weight"))])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_and_unload_weights_equal_reversible_merge(dtype: torch.dtype) -> None:
    """merge_and_unload skips the unmerge record but writes bit-identical weights; without the record a
    layer refuses to unmerge instead of restoring something wrong."""
    model = make_gpt2(n_embd=64).to(dtype)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_fc", "wte"], init_lora_weights=False)
    reversible, one_way = get_peft_model(copy.deepcopy(model), config), get_peft_model(model, config)
    randomize_lora(reversible, std=0.3)
    one_way.load_state_dict(reversible.state_dict())
    reversible.merge_adapter()
    merged = {k.replace("base_model.model.", "").replace("base_layer.", ""): v
              for k, v in reversible.state_dict().items() if "lora_" not in k}
    layer = next(m for m in one_way.modules() if isinstance(m, LoraLayer))
    plain = one_way.merge_and_unload()
    assert merged.keys() == plain.state_dict().keys()
    assert all(torch.equal(merged[k], v) for k, v in plain.state_dict().items())
    assert not torch.equal(merged["transformer.h.0.attn.c_attn.weight"], original["transformer.h.0.attn.c_attn.weight"])
    assert layer.merged_adapters == ["default"]
    with pytest.raises(RuntimeError, match="merge_adapter"):
        layer.unmerge()


def test_seed_example_with_hf_trainer(tmp_path) -> None:
    """PEFT's README example with only the import changed: GPT-2, c_attn, Trainer, save_pretrained."""
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from lorakit import LoraConfig as Config  # was: from peft import LoraConfig, TaskType, get_peft_model

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    peft_config = Config(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=16, lora_dropout=0.05,
                         target_modules=["c_attn"])
    model = get_peft_model(model, peft_config)
    model.print_trainable_parameters()
    data = [{"input_ids": torch.randint(0, 64, (16,)).tolist()} for _ in range(16)]
    data = [dict(d, labels=d["input_ids"]) for d in data]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=4,
                             learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    result = trainer.train()
    assert result.training_loss > 0
    b = model.base_model.model.transformer.h[0].attn.c_attn.lora_B["default"].weight
    assert torch.count_nonzero(b) > 0  # the Trainer really trained the adapter
    model.save_pretrained(str(tmp_path / "adapter"))
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["README.md", "adapter_config.json",
                                                                      "adapter_model.safetensors"]


def test_inject_on_meta_device() -> None:
    """Adapters follow the base weights' device, including the meta device (sizing models without memory)."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4), nn.Embedding(10, 4))
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["0", "1"]))
    assert all(p.device.type == "meta" for p in peft.parameters())
    assert peft.get_nb_trainable_parameters()[0] == 2 * (4 + 4) + 2 * (10 + 4)


def test_seq_cls_trains_and_saves_the_head(tmp_path) -> None:
    """task_type=SEQ_CLS adds the classification head to modules_to_save, as PEFT does (it exists only as
    "score" here; the absent "classifier" is not an error)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_labels=3, pad_token_id=0))
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type=TaskType.SEQ_CLS)
    peft = get_peft_model(model, config)
    assert config.modules_to_save is None  # the user's config object is not changed
    assert peft.peft_config["default"].modules_to_save == ["classifier", "score"]
    trainable = {n for n, p in peft.named_parameters() if p.requires_grad}
    assert any(".score.modules_to_save.default." in n for n in trainable)
    peft.save_pretrained(str(tmp_path))
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.score.weight" in keys
