"""Shared fixtures: tiny GPT-2 / Llama configs, a toy MLP/CNN with every supported layer kind, a seed."""

from __future__ import annotations

import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def make_gpt2(n_layer: int = 2, n_embd: int = 32, vocab: int = 64, **kwargs: object) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=2, vocab_size=vocab, n_positions=64,
                        bos_token_id=0, eos_token_id=0, **kwargs)
    return GPT2LMHeadModel(config).eval()


def make_llama(n_layer: int = 2, hidden: int = 32, vocab: int = 64) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=n_layer, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                         max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


class ToyNet(nn.Module):
    """Embedding → Conv1d → Conv2d → Linear → Linear head; input token ids (N, 8)."""

    def __init__(self, vocab: int = 20, dim: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.conv1d = nn.Conv1d(dim, dim, kernel_size=3, padding=1)
        self.conv2d = nn.Conv2d(1, 2, kernel_size=(3, 3), padding=1)
        self.mlp = nn.Linear(2 * dim, 16)
        self.act = nn.ReLU()
        self.head = nn.Linear(16 * 8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)                                   # (N, 8, dim)
        h = self.conv1d(h.transpose(1, 2)).transpose(1, 2)  # (N, 8, dim)
        h = self.conv2d(h.unsqueeze(1))                     # (N, 2, 8, dim)
        h = h.permute(0, 2, 1, 3).flatten(2)                # (N, 8, 2·dim)
        h = self.act(self.mlp(h))                           # (N, 8, 16)
        return self.head(h.flatten(1))                      # (N, 3)


@pytest.fixture
def gpt2() -> nn.Module:
    return make_gpt2()


@pytest.fixture
def llama() -> nn.Module:
    return make_llama()


@pytest.fixture
def toy() -> nn.Module:
    return ToyNet().eval()


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 64, (3, 10))


def randomize_lora(model: nn.Module, std: float = 0.1) -> None:
    """Give every LoRA factor random values, so B ≠ 0 and the adapter changes the output."""
    from lorakit.layers import LoraLayer

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLayer):
                for name in module.adapter_names:
                    for factor in module.factors(name):
                        factor.normal_(std=std)


def make_byte_tokenizer() -> object:
    """A byte-level tokenizer (256 byte tokens + <pad>, <eos>), built offline: any text encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<eos>": 1} | {ch: i + 2 for i, ch in enumerate(sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")


BYTE_VOCAB = 258


def save_tiny_model_dir(path: object, arch: str = "llama") -> object:
    """Write a tiny random-init causal LM + byte tokenizer to ``path`` (a HF model directory)."""
    model = make_llama(vocab=BYTE_VOCAB) if arch == "llama" else make_gpt2(vocab=BYTE_VOCAB)
    model.config.pad_token_id = 0
    model.config.eos_token_id = 1
    with torch.no_grad():  # a head strong enough that a few LoRA steps can sharpen the logits
        model.get_output_embeddings().weight.mul_(10)
    model.save_pretrained(str(path))
    make_byte_tokenizer().save_pretrained(str(path))  # type: ignore[attr-defined]
    return path
