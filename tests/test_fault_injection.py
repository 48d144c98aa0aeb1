"""Fault injection: processes killed with SIGKILL at random moments never lose work or leave torn files.

- Checkpoint writes (``lorakit.train.checkpoint.save_checkpoint``): a writer forked per trial saves, re-saves
  and prunes checkpoints until it is killed; afterwards every visible ``step-*`` directory must be complete
  and load (values exact), and the newest must resume.
- Named adapters in subdirectories (``save_pretrained`` of several adapters): each adapter directory holds
  its old or its new version, never a mix (extends tests/test_atomic_save.py, which kills single-adapter
  saves 60 times).
- Training: ``python -m lorakit train`` killed at a random step (mid-step, mid-checkpoint, during the final
  save …), then ``--resume latest``; the final adapter must equal an unbroken run's (up to float rounding
  between processes, as in tests/train/test_loop.py, whose single trial this generalises; the test reports
  how many were bit-identical).

Trials per run: ``LORAKIT_KILL_TRIALS`` training kills (default 3, several processes in parallel), and
10 × that many (at least 30) checkpoint and adapter-save kills. For the long run:

    LORAKIT_KILL_TRIALS=20 .venv/bin/python -m pytest tests/test_fault_injection.py -q -s
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_model_dir
from forking_writer import ForkingWriter
from safetensors.torch import load_file
from test_atomic_save import MODEL_SOURCE

from lorakit import LorakitWarning, PeftModel
from lorakit.cli import main
from lorakit.io import get_adapter_state_dict

TRAIN_TRIALS = int(os.environ.get("LORAKIT_KILL_TRIALS", "3"))
WRITE_TRIALS = max(30, 10 * TRAIN_TRIALS)
SRC = Path(__file__).resolve().parents[1] / "src"
pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="writers are forked, killed with SIGKILL (POSIX)")


# ------------------------------------------------------------------------------------------------ checkpoints
CHECKPOINT_SOURCE = '''
import json, sys, time, torch
from pathlib import Path
from torch import nn
from lorakit.train.checkpoint import list_checkpoints, save_checkpoint
from lorakit.train.loop import make_schedule

torch.set_num_threads(1)

def build():
    """A model with ~1.5 MB of trainable tensors, its AdamW (with state) and schedule."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.Linear(512, 256))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 256)).sum().backward()
    optimizer.step()
    return model, optimizer, make_schedule(optimizer, "linear", 0, 1000)

def set_step(model, step):
    """Every trainable tensor of checkpoint `step` is filled with a value that only that step has."""
    with torch.no_grad():
        for i, param in enumerate(model.parameters()):
            param.fill_(step + i / 10)

def write(root, model, optimizer, scheduler, step):
    set_step(model, step)
    save_checkpoint(root, step, model, optimizer, scheduler, {"written_at": time.time()}, keep=2)
'''

CHECKPOINT_WRITER = CHECKPOINT_SOURCE + '''
root = Path(sys.argv[1])
model, optimizer, scheduler = build()
start = time.perf_counter()
write(root, model, optimizer, scheduler, 1)
print("ready", time.perf_counter() - start, flush=True)

def child_loop():
    # New steps, with every third save re-saving the newest step (the replace-in-place path).
    i = 0
    while True:
        found = list_checkpoints(root)
        newest = int(found[-1].name.split("-")[1]) if found else 0
        write(root, model, optimizer, scheduler, newest if i % 3 == 2 and newest else newest + 1)
        i += 1
'''


def test_killed_checkpoint_writer_leaves_only_complete_checkpoints(tmp_path: Path) -> None:
    namespace: dict[str, object] = {}
    exec(CHECKPOINT_SOURCE, namespace)
    from lorakit.train.checkpoint import load_checkpoint

    root = tmp_path / "checkpoints"
    writer = ForkingWriter(CHECKPOINT_WRITER, root)
    rng = random.Random(0)
    outcomes = {"kills": 0, "stray temporaries": 0, "checkpoints checked": 0, "most checkpoints visible": 0}
    newest_seen = 1
    try:
        for _ in range(WRITE_TRIALS):
            writer.kill_after(rng.uniform(0.0, 3.0 * writer.seconds_per_write))
            outcomes["kills"] += 1
            outcomes["stray temporaries"] += any(p.name.startswith(".tmp-") for p in root.iterdir())
            visible = sorted(p for p in root.iterdir() if p.name.startswith("step-"))
            # keep=2, but a kill between installing a checkpoint and pruning leaves one more (complete) each time
            assert visible, "no checkpoint left"
            outcomes["most checkpoints visible"] = max(outcomes["most checkpoints visible"], len(visible))
            for path in visible:
                assert sorted(p.name for p in path.iterdir()) == ["state.pt", "trainable.safetensors"], path
                step = int(path.name.split("-")[1])
                model, optimizer, scheduler = namespace["build"]()  # type: ignore[operator]
                state = load_checkpoint(path, model, optimizer, scheduler)
                assert state["step"] == step
                expected = [torch.full_like(p, step + i / 10) for i, p in enumerate(model.parameters())]
                assert all(torch.equal(p, e) for p, e in zip(model.parameters(), expected, strict=True)), path
                outcomes["checkpoints checked"] += 1
            newest = int(visible[-1].name.split("-")[1])
            assert newest >= newest_seen  # a kill never loses the newest complete checkpoint
            newest_seen = newest
    finally:
        writer.close()
    print(f"\ncheckpoint writer: {outcomes}, newest step {newest_seen}")
    assert newest_seen > 1  # the writer made progress between kills


class Crash(BaseException):
    """Stands for the process dying at this point (nothing catches it)."""


@pytest.mark.parametrize("resave", [False, True], ids=["prune", "replace"])
def test_dying_while_a_checkpoint_is_deleted_leaves_no_partial_checkpoint(tmp_path: Path, resave: bool,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Deterministic version of the window the random kills rarely hit: the process dies after deleting one
    file of a checkpoint that is being pruned (or replaced by a re-save of its step). The directory being
    deleted was renamed to a hidden name first, so no visible step-* directory is ever incomplete."""
    import lorakit.train.checkpoint as checkpoint

    namespace: dict[str, object] = {}
    exec(CHECKPOINT_SOURCE, namespace)
    model, optimizer, scheduler = namespace["build"]()  # type: ignore[operator]
    root = tmp_path / "checkpoints"
    for step in (1, 2):
        namespace["write"](root, model, optimizer, scheduler, step)  # type: ignore[operator]

    def dies_halfway(path: str | os.PathLike[str], *args: object, **kwargs: object) -> None:
        sorted(Path(path).iterdir())[0].unlink()
        raise Crash

    monkeypatch.setattr(checkpoint.shutil, "rmtree", dies_halfway)
    with pytest.raises(Crash):
        namespace["write"](root, model, optimizer, scheduler, 2 if resave else 3)  # type: ignore[operator]
    monkeypatch.undo()
    visible = sorted(p for p in root.iterdir() if p.name.startswith("step-"))
    assert [p.name for p in visible] == (["step-000001", "step-000002"] if resave else ["step-000002", "step-000003"])
    for path in visible:
        assert sorted(p.name for p in path.iterdir()) == ["state.pt", "trainable.safetensors"], path
        checkpoint.load_checkpoint(path, *namespace["build"]())  # type: ignore[operator]
    namespace["write"](root, model, optimizer, scheduler, 4)  # type: ignore[operator]
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]  # the next save cleans up


# ------------------------------------------------------------------------------------------------ named adapters
NAMED_SOURCE = MODEL_SOURCE + '''
def pair(tag):
    """Adapters "default" and "extra" of version `tag` (they differ in rank, targets and values)."""
    model = version(tag)
    model.add_adapter("extra", LoraConfig(r=2 if tag == "A" else 6, target_modules=["out"]))
    torch.manual_seed(10 if tag == "A" else 20)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".extra" in name:
                param.add_(torch.randn_like(param))
    return model
'''

NAMED_WRITER = NAMED_SOURCE + '''
import sys, time
torch.set_num_threads(1)
directory = sys.argv[1]
versions = [pair("A"), pair("B")]
start = time.perf_counter()
versions[0].save_pretrained(directory)
print("ready", time.perf_counter() - start, flush=True)

def child_loop():
    i = 1
    while True:
        versions[i % 2].save_pretrained(directory)
        i += 1
'''


def test_killed_save_of_named_adapters_leaves_each_old_or_new(tmp_path: Path) -> None:
    namespace: dict[str, object] = {}
    exec(NAMED_SOURCE, namespace)
    references = {tag: namespace["pair"](tag) for tag in "AB"}  # type: ignore[operator]
    expected = {(name, tag): get_adapter_state_dict(model, name) for tag, model in references.items()
                for name in ("default", "extra")}
    directory = tmp_path / "adapters"
    writer = ForkingWriter(NAMED_WRITER, directory)
    rng = random.Random(1)
    seen: dict[tuple[str, str], int] = {}
    between_renames = 0
    try:
        for _ in range(WRITE_TRIALS):
            writer.kill_after(rng.uniform(0.0, 3.0 * writer.seconds_per_write))
            with warnings.catch_warnings(record=True) as record:
                warnings.simplefilter("always", LorakitWarning)  # the state between a save's two renames
                loaded = PeftModel.from_pretrained(namespace["base"](), directory)  # type: ignore[operator]
                loaded.load_adapter(directory / "extra", "extra")
            between_renames += any(issubclass(w.category, LorakitWarning) for w in record)
            for name in ("default", "extra"):
                state = get_adapter_state_dict(loaded, name)
                tags = [tag for tag in "AB" if _same(state, expected[(name, tag)])]
                assert len(tags) == 1, f"adapter {name!r} is neither the old nor the new version"
                seen[(name, tags[0])] = seen.get((name, tags[0]), 0) + 1
    finally:
        writer.close()
    print(f"\nnamed adapters after {WRITE_TRIALS} kills: {seen}, {between_renames} between a save's renames")
    assert len(seen) == 4  # kills landed before and after each adapter's save


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return sorted(a) == sorted(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------ training
WORDS = ["cat", "dog", "sun", "bird", "sky", "lamp", "pen", "rose", "cup", "moon", "fig", "jam"]
STEPS, SAVE_EVERY = 24, 2


def _common(model_dir: Path, data: Path) -> list[str]:
    return ["--model", str(model_dir), "--data", str(data), "--max-steps", str(STEPS), "--save-every",
            str(SAVE_EVERY), "--keep-checkpoints", "2", "--lr", "5e-3", "--batch-size", "4", "--lora-dropout", "0.1",
            "--r", "4", "--samples", "0", "--no-progress", "--log-every", "1", "--threads", "1"]


def _steps_logged(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return sum(1 for line in lines if '"loss"' in line and '"split"' not in line)


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def test_training_killed_at_random_points_resumes_to_the_same_adapter(tmp_path: Path) -> None:
    model_dir = Path(str(save_tiny_model_dir(tmp_path / "model", "llama")))
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"is {w} short ->", "completion": " Y" if len(w) < 4 else " N"})
                            + "\n" for w in WORDS * 4))
    common = _common(model_dir, data)
    started = time.perf_counter()
    assert main(["train", *common, "--output-dir", str(tmp_path / "unbroken")]) == 0
    step_seconds = (time.perf_counter() - started) / STEPS  # an upper bound (includes loading and evaluation)
    expected = _adapter(tmp_path / "unbroken")

    rng = random.Random(int(os.environ.get("LORAKIT_KILL_SEED", "0")))
    env = dict(os.environ, PYTHONPATH=str(SRC), TOKENIZERS_PARALLELISM="false")
    outcomes: dict[str, int] = {"killed": 0, "finished before the kill": 0, "resumed from a checkpoint": 0,
                                "restarted (no checkpoint yet)": 0}
    kill_points = []
    largest_gap = 0.0
    parallel = 3  # start several runs at once: imports dominate, and the kill points spread further
    for batch_start in range(0, TRAIN_TRIALS, parallel):
        trials = range(batch_start, min(TRAIN_TRIALS, batch_start + parallel))
        runs = {}
        for trial in trials:
            out = tmp_path / f"broken{trial}"
            target = rng.randint(SAVE_EVERY, STEPS)  # steps logged before the kill (STEPS: during the final save)
            delay = rng.uniform(0.0, 1.5 * step_seconds)  # then a moment into the next step or save
            process = subprocess.Popen([sys.executable, "-m", "lorakit", "train", *common, "--output-dir", str(out)],
                                       env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            runs[trial] = (out, target, delay, process)
        pending = dict(runs)
        deadline = time.time() + 600
        while pending and time.time() < deadline:
            for trial, (out, target, delay, process) in list(pending.items()):
                if process.poll() is not None:
                    outcomes["finished before the kill"] += 1
                    del pending[trial]
                elif _steps_logged(out) >= target:
                    time.sleep(delay)
                    os.kill(process.pid, signal.SIGKILL)
                    process.wait()
                    outcomes["killed"] += 1
                    kill_points.append(f"{target}+{delay:.3f}s")
                    del pending[trial]
            time.sleep(0.002)
        assert not pending, "a training run neither finished nor reached its kill point in 10 minutes"
        for out, _, _, process in runs.values():
            if process.returncode == 0:
                continue
            checkpoints = sorted(p for p in (out / "checkpoints").glob("step-*")) if (out / "checkpoints").exists() else []
            for path in checkpoints:  # every visible checkpoint is complete
                assert sorted(p.name for p in path.iterdir()) == ["state.pt", "trainable.safetensors"], path
            resume = ["--resume", "latest"] if checkpoints else []
            outcomes["resumed from a checkpoint" if checkpoints else "restarted (no checkpoint yet)"] += 1
            assert main(["train", *common, "--output-dir", str(out), *resume]) == 0
        for trial, (out, _, _, _) in runs.items():
            got = _adapter(out)
            assert got.keys() == expected.keys()
            for key in expected:
                # Equal up to float rounding: BLAS kernels may round differently in another process (memory
                # alignment), as in tests/train/test_loop.py; in practice the adapters are usually bit-identical.
                torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=1e-5, msg=f"trial {trial}: {key}")
            gap = max(float((got[k] - expected[k]).abs().max()) for k in expected)
            outcomes["bit-identical"] = outcomes.get("bit-identical", 0) + (gap == 0.0)
            largest_gap = max(largest_gap, gap)
    print(f"\ntraining: {TRAIN_TRIALS} trials, kill points (steps+delay) {kill_points}, {outcomes}, largest "
          f"difference from the unbroken adapter {largest_gap:.2e}, 0 failures")
    assert outcomes["killed"] >= 1
