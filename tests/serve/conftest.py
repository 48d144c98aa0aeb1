"""Serving fixtures: a tiny random Llama with a byte tokenizer on disk, nine random adapters saved in PEFT
format (B ≠ 0, different ranks and targets), and PEFT 0.21's own ``generate`` as the reference."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import BYTE_VOCAB, make_byte_tokenizer, randomize_lora

from lorakit import LoraConfig, get_peft_model

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
ADAPTER_TARGETS = [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "down_proj"],
                   "all-linear", ["v_proj"], ["up_proj", "o_proj"], ["q_proj", "v_proj"], ["k_proj", "gate_proj"],
                   ["q_proj", "down_proj"]]
N_ADAPTERS = len(ADAPTER_TARGETS)


def make_serve_llama() -> Any:
    """2 layers, hidden 64, GQA (4 heads / 2 KV heads), 256 positions, the byte vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=BYTE_VOCAB, max_position_embeddings=256,
                         bos_token_id=None, eos_token_id=1, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharper logits: a near-tie between two tokens becomes vanishingly unlikely
        model.get_output_embeddings().weight.mul_(8)
    return model


@pytest.fixture(scope="session")
def serve_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model directory, adapter root with a0 … a8), made once per session."""
    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(1234)
    model_dir = root / "tiny-llama"
    base = make_serve_llama()
    base.save_pretrained(str(model_dir))
    tokenizer = make_byte_tokenizer()
    tokenizer.chat_template = CHATML  # type: ignore[attr-defined]
    tokenizer.save_pretrained(str(model_dir))  # type: ignore[attr-defined]
    adapters = root / "adapters"
    for i, targets in enumerate(ADAPTER_TARGETS):
        model = make_serve_llama()
        model.load_state_dict(base.state_dict())
        config = LoraConfig(r=[2, 4, 8][i % 3], lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM")
        peft_model = get_peft_model(model, config)
        randomize_lora(peft_model, std=0.3)
        peft_model.save_pretrained(str(adapters / f"a{i}"))
    return model_dir, adapters


class PeftReference:
    """Each request run alone through PEFT's ``PeftModel.generate`` (greedy, fp32, batch of one)."""

    def __init__(self, model_dir: Path, adapters: Path) -> None:
        from peft import PeftModel as HFPeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.model = HFPeftModel.from_pretrained(base, str(adapters / "a0"), adapter_name="a0")
        for i in range(1, N_ADAPTERS):
            self.model.load_adapter(str(adapters / f"a{i}"), adapter_name=f"a{i}")
        self.model.eval()

    def generate(self, prompt_ids: list[int], adapter: str | None, max_new_tokens: int) -> list[int]:
        ids = torch.tensor([prompt_ids])
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, eos_token_id=1,
                      attention_mask=torch.ones_like(ids))
        with torch.no_grad():
            if adapter is None:
                with self.model.disable_adapter():
                    out = self.model.generate(input_ids=ids, **kwargs)
            else:
                self.model.set_adapter(adapter)
                out = self.model.generate(input_ids=ids, **kwargs)
        tokens = out[0, len(prompt_ids):].tolist()
        return tokens[:-1] if tokens and tokens[-1] == 1 else tokens  # the engine does not return the EOS


@pytest.fixture(scope="session")
def peft_reference(serve_dirs: tuple[Path, Path]) -> PeftReference:
    return PeftReference(*serve_dirs)


def make_engine(model_dir: Path, adapters: Path | None, names: list[str], **kwargs: Any) -> Any:
    from lorakit.serve.engine import Engine
    from lorakit.serve.registry import AdapterRegistry
    from lorakit.train.loop import load_causal_lm

    model, tokenizer = load_causal_lm(model_dir)
    registry = AdapterRegistry(model, roots=[adapters] if adapters else [], max_loaded=kwargs.pop("max_loaded", None))
    for name in names:
        assert adapters is not None
        registry.load(name, registry.check_path(adapters / name))
    return Engine(registry, tokenizer, **kwargs)


@pytest.fixture
def engine(serve_dirs: tuple[Path, Path]) -> Iterator[Any]:
    model_dir, adapters = serve_dirs
    eng = make_engine(model_dir, adapters, [f"a{i}" for i in range(N_ADAPTERS)], max_batch_size=64)
    eng.start()
    yield eng
    eng.stop()


API_KEY = "test-key-123"


def copy_adapter(adapters: Path, name: str, target: Path) -> Path:
    import shutil

    shutil.copytree(adapters / name, target)
    return target


@pytest.fixture(scope="session")
def http_root(serve_dirs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter root: a0, a1, a2 served at start; spare/ (no config, so not discovered) holds a3, a4 and
    bad adapters: one trained on another base (fingerprint), one with truncated weights, one non-adapter."""
    model_dir, adapters = serve_dirs
    root = tmp_path_factory.mktemp("http_root")
    for name in ("a0", "a1", "a2"):
        copy_adapter(adapters, name, root / name)
    spare = root / "spare"
    spare.mkdir()
    for name in ("a3", "a4"):
        copy_adapter(adapters, name, spare / name)
    torch.manual_seed(99)
    other = get_peft_model(make_serve_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_lora(other)
    other.save_pretrained(str(spare / "fingerprint"))
    corrupt = copy_adapter(adapters, "a0", spare / "corrupt")
    weights = corrupt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    (spare / "notadapter").mkdir()
    (spare / "notadapter" / "readme.txt").write_text("not an adapter")
    return root


@pytest.fixture(scope="module")
def server(serve_dirs: tuple[Path, Path], http_root: Path) -> Iterator[Any]:
    """A real server on a free loopback port: the tiny model, a0–a2, an API key, max_model_len 128."""
    from lorakit.serve.options import ServeOptions, build
    from lorakit.serve.server import ServerThread

    app, engine = build(ServeOptions(model=serve_dirs[0], adapter_dirs=[http_root], api_key=API_KEY,
                                     max_model_len=128, port=0))
    with ServerThread(app) as thread:
        thread.engine = engine  # type: ignore[attr-defined]
        yield thread
