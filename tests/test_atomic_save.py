"""Crash safety of save_pretrained: a writer killed (SIGKILL) at random moments never leaves a torn adapter."""

from __future__ import annotations

import os
import random
import warnings
from pathlib import Path

import pytest
import torch
from forking_writer import ForkingWriter
from torch import nn

import lorakit.io as lorakit_io
from lorakit import LorakitWarning, PeftModel, load_adapter_weights
from lorakit.io import atomic_write, get_adapter_state_dict

# A tiny model, defined once as source so that the writer process builds the very same one.
MODEL_SOURCE = '''
import torch
from torch import nn
from lorakit import LoraConfig, get_peft_model

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.proj = nn.Linear(32, 32)
        self.out = nn.Linear(32, 50)

    def forward(self, ids):
        return self.out(torch.relu(self.proj(self.emb(ids))))

def base():
    torch.manual_seed(0)
    return Tiny().eval()

def version(tag):
    """Two adapters that differ in every way a torn save could mix up: rank, alpha, targets, values."""
    if tag == "A":
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["proj", "out"])
    else:
        config = LoraConfig(r=8, lora_alpha=32, target_modules=["emb", "proj", "out"], bias="lora_only")
    model = get_peft_model(base(), config)
    torch.manual_seed(1 if tag == "A" else 2)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    return model
'''

# Builds both versions once; each forked writer (``ForkingWriter``) saves A, B, A, B … into the directory
# until it is killed.
WRITER_SOURCE = MODEL_SOURCE + '''
import os, sys, time
torch.set_num_threads(1)
directory = sys.argv[1]
versions = [version("A"), version("B")]
versions[0].save_pretrained(directory)
start = time.perf_counter()
versions[1].save_pretrained(directory + "-timing")
print("ready", time.perf_counter() - start, flush=True)

def child_loop():
    i = 1
    while True:
        versions[i % 2].save_pretrained(directory)
        i += 1
'''


def _namespace() -> dict[str, object]:
    namespace: dict[str, object] = {}
    exec(MODEL_SOURCE, namespace)
    return namespace


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return sorted(a) == sorted(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the writer is forked (POSIX only)")
def test_killed_writer_always_leaves_old_or_new_adapter(tmp_path: Path) -> None:
    trials = 60
    directory = tmp_path / "adapter"
    namespace = _namespace()
    references = {tag: get_adapter_state_dict(namespace["version"](tag)) for tag in "AB"}  # type: ignore[operator]
    writer = ForkingWriter(WRITER_SOURCE, directory)
    outcomes = {"A": 0, "B": 0, "interrupted between renames": 0, "temporaries left": 0}
    rng = random.Random(0)
    try:
        for _ in range(trials):
            writer.kill_after(rng.uniform(0.0, 4.0 * writer.seconds_per_write))  # dead before we look
            outcomes["temporaries left"] += any(p.name.endswith(".lorakit-tmp") for p in directory.iterdir())
            with warnings.catch_warnings(record=True) as record:
                warnings.simplefilter("always", LorakitWarning)
                loaded = PeftModel.from_pretrained(namespace["base"](), directory)  # type: ignore[operator]
            outcomes["interrupted between renames"] += any(issubclass(w.category, LorakitWarning) for w in record)
            state = get_adapter_state_dict(loaded)
            matches = [tag for tag, reference in references.items() if _same(state, reference)]
            assert len(matches) == 1, f"the directory holds neither the old nor the new adapter: {sorted(state)}"
            outcomes[matches[0]] += 1
    finally:
        writer.close()
    print(f"\n{trials} kills: {outcomes}")
    assert outcomes["A"] + outcomes["B"] == trials
    assert outcomes["A"] > 0 and outcomes["B"] > 0  # kills landed before and after saves completed

    # The next save cleans up what the killed writers left behind.
    namespace["version"]("A").save_pretrained(directory)  # type: ignore[operator]
    assert not [p for p in directory.iterdir() if p.name.endswith(".lorakit-tmp")]


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "file.bin"
    atomic_write(target, b"old")

    def failing_replace(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(lorakit_io.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]  # no temporary left behind


def test_failed_save_leaves_the_previous_adapter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    namespace = _namespace()
    old = namespace["version"]("A")  # type: ignore[operator]
    new = namespace["version"]("B")  # type: ignore[operator]
    old.save_pretrained(tmp_path)
    real_replace = os.replace
    calls: list[str] = []

    def replace_once(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        calls.append(str(dst))
        if len(calls) == 2:  # the weights went through, the config rename fails
            raise OSError("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(lorakit_io.os, "replace", replace_once)
    with pytest.raises(OSError, match="simulated crash"):
        new.save_pretrained(tmp_path)
    monkeypatch.undo()
    with pytest.warns(LorakitWarning, match="interrupted"):
        loaded = PeftModel.from_pretrained(namespace["base"](), tmp_path)  # type: ignore[operator]
    assert _same(get_adapter_state_dict(loaded), get_adapter_state_dict(new))


def test_verify_catches_a_file_that_differs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    namespace = _namespace()
    model = namespace["version"]("A")  # type: ignore[operator]
    real_read = lorakit_io._read_safetensors

    def tampered(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        tensors, metadata = real_read(path)
        key = sorted(tensors)[0]
        tensors[key] = tensors[key] + 1
        return tensors, metadata

    monkeypatch.setattr(lorakit_io, "_read_safetensors", tampered)
    with pytest.raises(OSError, match="verification failed"):
        model.save_pretrained(tmp_path)


def test_weights_are_renamed_into_place_before_the_config(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    model: nn.Module = _namespace()["version"]("A")  # type: ignore[operator]
    renamed: list[str] = []
    real_replace = os.replace

    def recording(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        renamed.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(lorakit_io.os, "replace", recording)
    model.save_pretrained(tmp_path)  # type: ignore[operator]
    # The README.md model card comes last, once the adapter itself is complete.
    assert renamed == ["adapter_model.safetensors", "adapter_config.json", "README.md"]
    assert sorted(load_adapter_weights(tmp_path)) == sorted(get_adapter_state_dict(model))  # type: ignore[arg-type]


def test_an_unchanged_config_is_not_rewritten(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Re-saving a checkpoint with the same config is one rename: atomic for every reader, PEFT included."""
    model: nn.Module = _namespace()["version"]("A")  # type: ignore[operator]
    model.save_pretrained(tmp_path)  # type: ignore[operator]
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).add_(1.0)
    renamed: list[str] = []
    real_replace = os.replace

    def recording(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        renamed.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(lorakit_io.os, "replace", recording)
    model.save_pretrained(tmp_path)  # type: ignore[operator]
    assert renamed == ["adapter_model.safetensors"]
    assert _same(load_adapter_weights(tmp_path), get_adapter_state_dict(model))  # type: ignore[arg-type]
