"""Resumable training checkpoints: trainable tensors + optimizer + scheduler + RNG + data position.

Layout: ``<output_dir>/checkpoints/step-000050/{trainable.safetensors, state.pt}``. A checkpoint is built in
a hidden temporary directory, every file fsync-ed, then renamed into place in one ``os.replace``. A
checkpoint that goes away (replaced by a re-save of its step, or pruned by ``keep``) is first renamed to a
hidden ``.tmp-*`` name, atomically, and only then deleted. So a crash at any moment leaves every visible
``step-*`` directory complete, the previous checkpoints intact, and at most stray ``.tmp-*`` directories,
which the next save removes. ``state.pt`` is read with ``torch.load(weights_only=True)``: loading never
runs code.
"""

from __future__ import annotations

import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
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
    # Re-saving the same step (e.g. after a resume): move the old one aside, put the new one in place at once,
    # then delete the old one.
    replaced = _hide(final) if final.exists() else None
    os.replace(staging, final)
    _fsync_dir(root)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(_hide(old), ignore_errors=True)
    return final


def _hide(checkpoint: Path) -> Path:
    """Rename a checkpoint directory to a hidden name (atomic), so that deleting it — which a crash can
    interrupt — never leaves a half-deleted directory under a visible step-* name."""
    hidden = checkpoint.parent / f".tmp-retired-{checkpoint.name}-{os.getpid()}"
    os.replace(checkpoint, hidden)
    _fsync_dir(checkpoint.parent)
    return hidden


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and (p / STATE_FILE).is_file()
             and (p / TRAINABLE_FILE).is_file()]
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
    """Restore trainable tensors, optimizer, scheduler and RNG from ``path``; returns the state dict.

    Both files are read and checked before anything is restored.

    Raises:
        ValueError: a file is unreadable or corrupt, or the checkpoint does not fit ``model``.
    """
    from ..io import _check_safetensors_layout

    try:
        _check_safetensors_layout(path / TRAINABLE_FILE)
        tensors = load_file(str(path / TRAINABLE_FILE))
    except (SafetensorError, ValueError, OSError) as exc:
        raise ValueError(f"checkpoint {path}: {TRAINABLE_FILE} cannot be read ({' '.join(str(exc).split())}); "
                         "resume from an older checkpoint (its step-* directory) instead.") from None
    try:
        with warnings.catch_warnings():  # torch warns about a foreign file's pickle protocol: noise here
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not {"step", "optimizer", "scheduler", "torch_rng", "python_rng"} <= set(state):
            raise ValueError("it lacks the step, optimizer, scheduler or RNG state")
    except Exception as exc:  # unpickling fails in many types; all mean "not a usable state file"
        raise ValueError(f"checkpoint {path}: {STATE_FILE} cannot be read as a weights-only lorakit state "
                         f"({type(exc).__name__}: {' '.join(str(exc).split())[:300]}); lorakit does not unpickle "
                         "anything else — resume from an older checkpoint instead.") from None
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not fit this model/config: missing {missing[:5]}{' …' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{' …' if len(unexpected) > 5 else ''}; resume with the options of the original run."
        )
    for name, value in tensors.items():
        if params[name].shape != value.shape:
            raise ValueError(f"checkpoint {path}: {name} has shape {tuple(value.shape)}, model has "
                             f"{tuple(params[name].shape)}; resume with the options of the original run.")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(_as_python_rng_state(state["python_rng"]))
    return state


def _as_python_rng_state(state: Any) -> tuple:
    # torch.load returns the tuple's inner tuple as a list in some versions; random.setstate needs tuples.
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
