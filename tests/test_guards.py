"""Silent-failure guards (lorakit.guards and the trainer): each quiet way a run goes wrong becomes loud.

Also covered elsewhere: the refusal message of deleting a merged adapter (tests/test_bad_config.py
``test_delete_merged_adapter_refused``) and verify catching tampered tensors on read
(tests/test_atomic_save.py ``test_verify_catches_a_file_that_differs``).
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_gpt2, make_llama, save_tiny_model_dir
from torch import nn

import lorakit.io as lorakit_io
import lorakit.train.loop as loop
from lorakit import LoraConfig, LorakitWarning, PeftModel, get_peft_model
from lorakit.cli import main
from lorakit.guards import check_lora_gradients, lora_B_zero, nonfinite_parameters, warn_if_lora_B_zero
from lorakit.train.checkpoint import list_checkpoints

WORDS = ["cat", "dog", "sun", "bird", "sky", "lamp", "pen", "rose", "cup", "moon", "fig", "jam"]


def _reentrant_checkpointed_llama() -> nn.Module:
    """The gradient-checkpointing trap: reentrant checkpointing on a frozen base whose inputs do not require
    grad (transformers < 5 did not call enable_input_require_grads; custom models never do)."""
    model = make_llama()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    model.disable_input_require_grads()
    return model.train()


def _backward(peft: nn.Module) -> None:
    ids = torch.randint(0, 64, (2, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: "None of the inputs have requires_grad=True"
        peft(input_ids=ids, labels=ids).loss.backward()


# ------------------------------------------------------------------------------------------------ (a) gradients
def test_missing_gradients_from_reentrant_checkpointing_are_caught() -> None:
    peft = get_peft_model(_reentrant_checkpointed_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj",
                                                                                            "lm_head"]))
    peft.train()
    _backward(peft)  # lm_head (outside the checkpointed blocks) gets gradients, q/v inside them do not
    assert peft.base_model.model.lm_head.lora_B["default"].weight.grad is not None
    with pytest.raises(ValueError, match=r"8 of 10 trainable LoRA parameters received no gradient") as info:
        check_lora_gradients(peft)
    message = str(info.value)
    assert "layers.0.self_attn.q_proj.lora_A.default.weight" in message
    assert "use_reentrant=True" in message and "enable_input_require_grads()" in message

    peft.zero_grad(set_to_none=True)
    peft.get_base_model().enable_input_require_grads()  # the fix the message names
    _backward(peft)
    check_lora_gradients(peft)


def test_a_module_off_the_forward_path_is_named() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(4, 4)
            self.unused = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    peft = get_peft_model(Net(), LoraConfig(r=2, target_modules=["used", "unused"]))
    peft(torch.randn(3, 4)).sum().backward()
    with pytest.raises(ValueError, match=r"2 of 4 .*unused\.lora_A\.default\.weight.*not on the forward path"):
        check_lora_gradients(peft)


def test_zero_gradients_are_not_missing_gradients() -> None:
    """With B = 0 at init, A's first gradient is exactly zero — a gradient all the same."""
    peft = get_peft_model(make_gpt2(), LoraConfig(r=2, target_modules=["c_attn"]))
    ids = torch.randint(0, 64, (2, 8))
    peft(input_ids=ids, labels=ids).loss.backward()
    a = peft.base_model.model.transformer.h[0].attn.c_attn.lora_A["default"].weight
    assert a.grad is not None and not a.grad.any()
    check_lora_gradients(peft)


@pytest.fixture(scope="module")
def run_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("guards")
    torch.manual_seed(0)
    model_dir = Path(str(save_tiny_model_dir(root / "model", "llama")))
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"is {w} short ->", "completion": " Y" if len(w) < 4 else " N"})
                            + "\n" for w in WORDS * 2))
    return model_dir, data


def _argv(run_files: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    model_dir, data = run_files
    return ["train", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out), "--max-steps", "5",
            "--batch-size", "4", "--lr", "1e-2", "--warmup-steps", "0", "--no-progress", "--samples", "0",
            "--log-every", "1", *extra]


def test_train_stops_at_the_first_step_when_gradients_are_missing(run_files: tuple[Path, Path],
                                                                    tmp_path: Path) -> None:
    from lorakit.train.options import TrainOptions

    model_dir, data = run_files
    model, tokenizer = loop.load_causal_lm(model_dir)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    model.disable_input_require_grads()
    opts = TrainOptions(data=str(data), output_dir=str(tmp_path / "run"), max_steps=5, save_every=1,
                        target_modules=["q_proj", "v_proj", "lm_head"], progress=False, samples=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(ValueError, match=r"received no gradient .*enable_input_require_grads"):
            loop.train(opts, model=model, tokenizer=tokenizer)
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "adapter").exists()


def test_trainer_callback_catches_missing_gradients_in_hf_trainer(tmp_path: Path) -> None:
    from transformers import Trainer, TrainingArguments

    from lorakit.guards import trainer_callback

    peft = get_peft_model(_reentrant_checkpointed_llama(), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    data = [{"input_ids": torch.randint(0, 64, (8,)).tolist()} for _ in range(4)]
    data = [dict(d, labels=d["input_ids"]) for d in data]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=2,
                             report_to=[], use_cpu=True, save_strategy="no")
    trainer = Trainer(model=peft, args=args, train_dataset=data, callbacks=[trainer_callback()])
    before = peft.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(ValueError, match=r"q_proj\.lora_A\.default\.weight.*enable_input_require_grads"):
            trainer.train()
    after = peft.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert torch.equal(before, after)  # stopped before the first optimizer step


# ------------------------------------------------------------------------------------------------ (b) NaN / inf
def _checkpoints_are_finite(out: Path) -> list[int]:
    steps = []
    for path in list_checkpoints(out / "checkpoints"):
        from safetensors.torch import load_file

        tensors = load_file(str(path / "trainable.safetensors"))
        assert all(bool(torch.isfinite(t).all()) for t in tensors.values()), path
        steps.append(int(path.name.split("-")[1]))
    return steps


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(run_files: tuple[Path, Path], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    calls = {"n": 0}
    real = loop.sequence_mean_loss

    def nan_at_step_4(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        loss = real(logits, labels)
        return loss * math.nan if calls["n"] == 4 else loss

    monkeypatch.setattr(loop, "sequence_mean_loss", nan_at_step_4)
    out = tmp_path / "run"
    assert main(_argv(run_files, out, "--save-every", "1", "--keep-checkpoints", "2")) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("lorakit train: error: loss is nan at step 4")
    assert f"the last good checkpoint is {out / 'checkpoints' / 'step-000003'}" in err[0]
    assert "--resume latest" in err[0]
    assert _checkpoints_are_finite(out) == [2, 3]  # nothing written for step 4
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()


def test_nan_parameters_never_reach_a_checkpoint(run_files: tuple[Path, Path], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """An infinite gradient makes AdamW write NaN into the parameters while the step's loss was finite: the
    checkpoint of that step is refused, the previous one stays the newest."""
    calls = {"n": 0}
    real = torch.nn.utils.clip_grad_norm_

    def inf_gradient_at_step_3(params: Any, max_norm: float, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls["n"] += 1
        params = list(params)
        if calls["n"] == 3:
            params[0].grad.fill_(math.inf)
            return torch.tensor(math.inf)
        return real(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", inf_gradient_at_step_3)
    out = tmp_path / "run"
    assert main(_argv(run_files, out, "--save-every", "1")) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "hold NaN or infinity after step 3" in err[0]
    assert f"the last good checkpoint is {out / 'checkpoints' / 'step-000002'}" in err[0]
    assert _checkpoints_are_finite(out) == [1, 2]
    assert not (out / "adapter").exists()


def test_nonfinite_parameters_names_them() -> None:
    peft = get_peft_model(make_gpt2(), LoraConfig(r=2, target_modules=["c_attn"]))
    assert nonfinite_parameters(peft) == []
    with torch.no_grad():
        peft.base_model.model.transformer.h[1].attn.c_attn.lora_B["default"].weight[0, 0] = -math.inf
    assert nonfinite_parameters(peft) == ["base_model.model.transformer.h.1.attn.c_attn.lora_B.default.weight"]


# ------------------------------------------------------------------------------------------------ (c) B stays 0
class _FrozenAdamW(torch.optim.AdamW):
    """An optimizer whose steps change nothing (as with a learning rate that is effectively zero)."""

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        return None


def test_train_warns_when_B_never_left_zero(run_files: tuple[Path, Path], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(torch.optim, "AdamW", _FrozenAdamW)
    with warnings.catch_warnings():
        warnings.simplefilter("default", LorakitWarning)  # pytest turns it into an error otherwise
        assert main(_argv(run_files, tmp_path / "run")) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(err) == 1, err  # one line, as the CLI prints every warning
    assert err[0].startswith("lorakit train: warning: after 5 training step(s), B is still exactly zero in 4 LoRA")
    assert "q_proj.default" in err[0] and "learning rate" in err[0]
    assert (tmp_path / "run" / "adapter").is_dir()  # a warning, not an error: the run's files are written


def test_trained_adapters_do_not_warn(run_files: tuple[Path, Path], tmp_path: Path) -> None:
    assert main(_argv(run_files, tmp_path / "run")) == 0  # LorakitWarning is an error under pytest


def test_lora_B_zero_lists_exactly_the_untrained_layers() -> None:
    peft = get_peft_model(make_gpt2(), LoraConfig(r=2, target_modules=["c_attn", "c_proj"]))
    assert len(lora_B_zero(peft)) == 6  # 2 blocks × (attn.c_attn, attn.c_proj, mlp.c_proj)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name and "c_attn" in name:
                param.fill_(0.5)
    assert lora_B_zero(peft) == [f"transformer.h.{i}.{m}.default" for i in (0, 1) for m in ("attn.c_proj", "mlp.c_proj")]
    assert warn_if_lora_B_zero(peft, steps=0) == []  # before any step, B = 0 is the init, not a problem
    with pytest.warns(LorakitWarning, match=r"after 3 training step\(s\), B is still exactly zero in 4"):
        warn_if_lora_B_zero(peft, steps=3)


# ------------------------------------------------------------------------------------------------ (d) merged delete
def test_deleting_a_merged_adapter_is_refused_and_the_base_comes_back_exactly() -> None:
    """PEFT bug #3498: deleting a merged adapter leaves its ΔW in the base with nothing left to remove it."""
    base = make_gpt2()
    original = {k: v.clone() for k, v in base.state_dict().items()}
    peft = get_peft_model(base, LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))
    peft.add_adapter("b", LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))
    peft.set_adapter("b")
    peft.merge_adapter()
    merged = {k: v.clone() for k, v in peft.state_dict().items()}
    with pytest.raises(ValueError, match=r"adapter 'b' is merged .*call unmerge_adapter\(\) before deleting"):
        peft.delete_adapter("b")
    assert peft.merged_adapters == ["b"] and list(peft.peft_config) == ["default", "b"]
    assert all(torch.equal(v, merged[k]) for k, v in peft.state_dict().items())  # refused = untouched
    peft.unmerge_adapter()
    peft.delete_adapter("b")
    restored = peft.unload().state_dict()
    assert all(torch.equal(restored[k], original[k]) for k in original)  # bit-exact W0


# ------------------------------------------------------------------------------------------------ (e) verify
def test_verify_is_on_by_default() -> None:
    assert inspect.signature(PeftModel.save_pretrained).parameters["verify"].default is True
    assert inspect.signature(lorakit_io.save_pretrained).parameters["verify"].default is True


@pytest.mark.parametrize("damaged", ["adapter_model.safetensors", "adapter_config.json"])
def test_verify_catches_bytes_the_disk_did_not_keep(damaged: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A storage layer that silently corrupts a write (a flipped bit, a lost last byte) is caught by the
    read-back; without verify the same save "succeeds"."""
    base = make_llama()
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    real = lorakit_io._write_temporary

    def lossy(path: Path, data: bytes) -> Path:
        if path.name == damaged:
            data = data[:-1] + bytes([data[-1] ^ 0x01]) if damaged.endswith(".safetensors") else data[:-1]
        return real(path, data)

    monkeypatch.setattr(lorakit_io, "_write_temporary", lossy)
    with pytest.raises(OSError, match=rf"verification failed: .*{damaged.replace('.', '[.]')}"):
        peft.save_pretrained(tmp_path / "checked")
    peft.save_pretrained(tmp_path / "unchecked", verify=False)  # what verify=True protects against
