"""lorakit models inside transformers.Trainer: checkpoints hold the adapter (PEFT format), resume works."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_gpt2
from safetensors.torch import load_file

from lorakit import LoraConfig, PeftModel, TaskType, get_peft_model
from lorakit.trainer import Trainer


def _data(n: int = 32) -> list[dict[str, list[int]]]:
    rows = [torch.randint(0, 64, (16,)).tolist() for _ in range(n)]
    return [{"input_ids": r, "labels": r} for r in rows]


def _trainer(model: torch.nn.Module, out: Path, steps: int) -> Trainer:
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, max_steps=steps, learning_rate=1e-2,
                             save_steps=2, save_strategy="steps", report_to=[], use_cpu=True, logging_steps=1,
                             seed=0, data_seed=0)
    return Trainer(model=model, args=args, train_dataset=_data())


def _peft() -> PeftModel:
    torch.manual_seed(0)
    return get_peft_model(make_gpt2(), LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8,
                                                  target_modules=["c_attn"]))


def test_trainer_checkpoints_hold_the_adapter(tmp_path: Path) -> None:
    model = _peft()
    trainer = _trainer(model, tmp_path / "out", steps=4)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    checkpoints = sorted((tmp_path / "out").glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == ["checkpoint-2", "checkpoint-4"]
    full_model_bytes = sum(p.numel() * 4 for p in model.parameters())
    for directory in [*checkpoints, tmp_path / "final"]:
        assert (directory / "adapter_config.json").is_file()
        weights = directory / "adapter_model.safetensors"
        assert not (directory / "model.safetensors").exists()
        assert weights.stat().st_size < full_model_bytes / 5
        assert set(load_file(str(weights))) == {k.replace(".default", "") for k, _ in model.named_parameters()
                                                if "lora_" in k}
    # The final checkpoint reloads into lorakit with the trained values.
    torch.manual_seed(0)  # the same base weights (the fingerprint check refuses any other base)
    reloaded = PeftModel.from_pretrained(make_gpt2(), str(checkpoints[-1]))
    trained = dict(model.named_parameters())
    for name, param in reloaded.named_parameters():
        if "lora_" in name:
            assert torch.equal(param, trained[name])
    assert torch.count_nonzero(trained[next(n for n in trained if "lora_B" in n)]) > 0


def test_trainer_checkpoint_loads_in_peft(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model = _peft()
    _trainer(model, tmp_path / "out", steps=2).train()
    ids = torch.randint(0, 64, (2, 8))
    model.eval()
    with torch.no_grad():
        ours = model(ids).logits
    torch.manual_seed(0)
    theirs = peft.PeftModel.from_pretrained(make_gpt2(), str(tmp_path / "out" / "checkpoint-2")).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours, atol=1e-5, rtol=1e-5)


def test_trainer_resume_from_adapter_checkpoint(tmp_path: Path) -> None:
    unbroken = _peft()
    _trainer(unbroken, tmp_path / "a", steps=4).train()
    resumed = _peft()
    _trainer(resumed, tmp_path / "b", steps=4).train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    expected = dict(unbroken.named_parameters())
    for name, param in resumed.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(param, expected[name], atol=1e-6, rtol=1e-6)
