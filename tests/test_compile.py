"""torch.compile through LoRA layers: no graph breaks from lorakit code, same numbers as eager."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit import LoraConfig, get_peft_model


def tiny_mlp(dropout: float = 0.0):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights=False, lora_dropout=dropout)
    return get_peft_model(mlp, config)


def graph_breaks(model, *args, **kwargs) -> list[str]:
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(*args, **kwargs)
    return [str(reason) for reason in explanation.break_reasons]


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_no_graph_breaks(dropout: float) -> None:
    model = tiny_mlp(dropout).train()
    x = torch.randn(4, 16, requires_grad=True)
    assert graph_breaks(model, x) == []
    with model.disable_adapter():
        assert graph_breaks(model, x) == []
    model.merge_adapter()
    assert graph_breaks(model, x) == []


def test_compiled_forward_and_backward_match_eager() -> None:
    """fullgraph=True: the fused autograd.Function is traced into one graph, forward and backward."""
    model = tiny_mlp()
    x = torch.randn(4, 16, requires_grad=True)
    params = [p for p in model.parameters() if p.requires_grad]
    eager = model(x)
    eager_grads = torch.autograd.grad(eager.square().sum(), [x, *params])
    torch._dynamo.reset()
    compiled_model = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled = compiled_model(x)
    compiled_grads = torch.autograd.grad(compiled.square().sum(), [x, *params])
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-6)
    for got, want in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_no_graph_breaks_in_adapted_gpt2() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    model = get_peft_model(transformers.GPT2LMHeadModel(config),
                           LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    breaks = graph_breaks(model, input_ids=torch.randint(0, 64, (2, 8)))
    assert not [b for b in breaks if "lorakit" in b], breaks


@pytest.mark.slow
def test_inductor_compiles_an_adapted_module() -> None:
    model = tiny_mlp().eval()
    x = torch.randn(4, 16, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(compiled, model(x), atol=1e-5, rtol=1e-5)
    compiled.sum().backward()
