"""Resumable training checkpoints: trainable tensors + optimizer + scheduler + RNG + data position.

Layout: ``<output_dir>/checkpoints/step-000050/{trainable.safetensors, state.pt}``. A checkpoint is built in
a hidden temporary directory, every file fsync-ed, then renamed into place in one ``os.replace``; a crash
at any moment leaves the previous checkpoints intact and at most a stray ``.tmp-*`` directory, which the
next save removes. ``state.pt`` is read with ``torch.load(weights_only=True)``: loading never runs code.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

TRAINABLE_FILE = "trainable.safetensors"
STATE_FILE = "state.pt"
_PREFIX = "step-"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter that requires grad, by name (contiguous CPU copies)."""
    return {n: p.detach().to("cpu").contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    extra: dict[str, Any],
    keep: int,
) -> Path:
    """Atomically write checkpoint ``step`` under ``root`` and keep only the newest ``keep``."""
    root.mkdir(parents=True, exist_ok=True)
    for stray in root.glob(".tmp-*"):
        shutil.rmtree(stray, ignore_errors=True)
    final = root / f"{_PREFIX}{step:06d}"
    staging = root / f".tmp-{_PREFIX}{step:06d}-{os.getpid()}"
    staging.mkdir()
    save_file(trainable_state(model), str(staging / TRAINABLE_FILE), metadata={"format": "pt"})
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        **extra,
    }
    torch.save(state, staging / STATE_FILE)
    for name in (TRAINABLE_FILE, STATE_FILE):
        _fsync_file(staging / name)
    _fsync_dir(staging)
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
        shutil.rmtree(final)
    os.replace(staging, final)
    _fsync_dir(root)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def resolve_checkpoint(resume: str, output_dir: Path) -> Path:
    """``resume`` is a checkpoint dir, or "latest" (newest under output_dir/checkpoints)."""
    if resume == "latest":
        found = list_checkpoints(output_dir / "checkpoints")
        if not found:
            raise FileNotFoundError(
                f"--resume latest: no checkpoint under {output_dir / 'checkpoints'}; train with --save-every N first."
            )
        return found[-1]
    path = Path(resume)
    if not (path / STATE_FILE).is_file() or not (path / TRAINABLE_FILE).is_file():
        raise FileNotFoundError(
            f"--resume {resume}: not a lorakit checkpoint (expected {STATE_FILE} and {TRAINABLE_FILE} in it); "
            "pass a directory like runs/x/checkpoints/step-000050 or 'latest'."
        )
    return path


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """Restore trainable tensors, optimizer, scheduler and RNG from ``path``; returns the state dict."""
    tensors = load_file(str(path / TRAINABLE_FILE))
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not fit this model/config: missing {missing[:5]}{' …' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{' …' if len(unexpected) > 5 else ''}; resume with the options of the original run."
        )
    with torch.no_grad():
        for name, value in tensors.items():
            if params[name].shape != value.shape:
                raise ValueError(f"checkpoint {path}: {name} has shape {tuple(value.shape)}, model has "
                                 f"{tuple(params[name].shape)}; resume with the options of the original run.")
            params[name].copy_(value)
    state = torch.load(path / STATE_FILE, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(_as_python_rng_state(state["python_rng"]))
    return state


def _as_python_rng_state(state: Any) -> tuple:
    # torch.load returns the tuple's inner tuple as a list in some versions; random.setstate needs tuples.
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
