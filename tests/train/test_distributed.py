"""lorakit train under torchrun (2 CPU processes, gloo): DDP and FSDP equal one process, resume after a kill
with the same or another world size, and one failing rank ends the job with a message naming it."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_model_dir
from safetensors.torch import load_file

from lorakit import PeftModel
from lorakit.cli import main
from lorakit.train.distributed import adapter_digest, shard_rows
from lorakit.train.loop import data_order, load_causal_lm

WORDS = ["cat", "dog", "sun", "red", "sky", "box", "pen", "map", "cup", "owl", "fig", "jam"]
STEPS, SAVE_EVERY = 24, 4
LAUNCH_TIMEOUT_S = 400


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("distributed")
    torch.manual_seed(0)
    save_tiny_model_dir(root / "model", "llama")
    pairs = [(w, w.upper()) for w in WORDS] * 4
    (root / "data.jsonl").write_text(
        "".join(json.dumps({"prompt": f"up {a} ->", "completion": f" {b}"}) + "\n" for a, b in pairs))
    return root


def _options(workdir: Path, out: Path, batch_size: int, grad_accum: int, *extra: str,
             save_every: int = SAVE_EVERY) -> list[str]:
    """Same seed, data and steps for every run; dropout 0 so one process and two draw the same numbers."""
    return ["--model", str(workdir / "model"), "--data", str(workdir / "data.jsonl"), "--output-dir", str(out),
            "--max-steps", str(STEPS), "--batch-size", str(batch_size), "--grad-accum", str(grad_accum), "--lr", "5e-3", "--warmup-steps", "2",
            "--lora-dropout", "0", "--r", "4", "--seed", "3", "--eval-size", "4", "--samples", "0",
            "--no-progress", "--threads", "1", "--save-every", str(save_every), *extra]


def _torchrun(train_args: list[str], env: dict[str, str] | None = None, console_script: bool = False,
              **popen: object) -> subprocess.Popen:
    """``torchrun --standalone --nproc-per-node 2 -m lorakit -- train …`` (or the ``lorakit`` console script).

    ``--`` keeps torchrun's own parser off lorakit's flags (it would read ``--r`` as an abbreviation of its
    ``--rdzv-*`` options). ``--standalone`` picks a free rendezvous port.
    """
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    entry = ["--no-python", str(Path(sys.executable).with_name("lorakit"))] if console_script else ["-m", "lorakit"]
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                                "MASTER_PORT")}
    clean.update(OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"), **(env or {}))
    return subprocess.Popen([*launcher, *entry, "--", "train", *train_args], env=clean, text=True, **popen)  # type: ignore[call-overload]


def _run_torchrun(train_args: list[str], **kwargs: object) -> str:
    proc = _torchrun(train_args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs)  # type: ignore[arg-type]
    output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 0, output[-4000:]
    return output


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _assert_same_adapter(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], atol: float) -> None:
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=atol, rtol=0, msg=key)


@pytest.fixture(scope="module")
def ddp_run(workdir: Path) -> Path:
    """2 processes × batch 1 × 2 micro-batches (global batch 4), checkpoints every SAVE_EVERY steps: the
    reference for several tests."""
    out = workdir / "ddp"
    _run_torchrun(_options(workdir, out, 1, 2))
    return out


# ------------------------------------------------------------------------------------------- data
@pytest.mark.parametrize(("world", "batch", "accum"), [(1, 4, 1), (2, 2, 1), (4, 1, 1), (2, 1, 2), (3, 2, 2)])
def test_ranks_together_see_exactly_the_single_process_rows(world: int, batch: int, accum: int) -> None:
    n = 30
    global_batch = world * batch * accum
    steps = math.ceil(2 * n / global_batch)  # two epochs
    order = data_order(n, seed=5, steps=steps, global_batch=global_batch)
    assert sorted(order[:n]) == list(range(n)) and sorted(order[n:2 * n]) == list(range(n))  # epoch coverage
    for step in range(steps):
        indices = order[step * global_batch:(step + 1) * global_batch]
        per_rank = [shard_rows(indices, batch, accum, rank, world) for rank in range(world)]
        single = shard_rows(indices, batch * world, accum, 0, 1)  # one process, batch × world, same accum
        for k in range(accum):
            assert [i for rank in range(world) for i in per_rank[rank][k]] == single[k]
        assert sorted(i for rows in per_rank for micro in rows for i in micro) == sorted(indices)


# ------------------------------------------------------------------------------------------- DDP
@pytest.mark.slow  # torchrun + 2 training runs: > 30 s on 2 shared cores
def test_ddp_equals_one_process_with_the_same_global_batch(workdir: Path, ddp_run: Path) -> None:
    expected = _adapter(ddp_run)
    for batch_size, grad_accum in ((4, 1), (2, 2)):
        out = workdir / f"single_{batch_size}x{grad_accum}"
        assert main(["train", *_options(workdir, out, batch_size, grad_accum)]) == 0
        _assert_same_adapter(_adapter(out), expected, atol=1e-5)

    # Both ranks held the same adapter (the trainer all-gathers their digests and raises otherwise), and it
    # is the one saved.
    summary = json.loads((ddp_run / "summary.json").read_text())
    assert summary["world_size"] == 2
    base, _ = load_causal_lm(workdir / "model")
    assert adapter_digest(PeftModel.from_pretrained(base, str(ddp_run / "adapter"))) == summary["adapter_digest"]
    b = [v for k, v in expected.items() if "lora_B" in k]
    assert b and all(torch.count_nonzero(v) > 0 for v in b)


AGREEMENT_SCRIPT = """
import sys
import torch
from torch import nn
from lorakit import LoraConfig, get_peft_model
from lorakit.train.distributed import Runtime

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

runtime = Runtime.from_env()
torch.manual_seed(0)
peft = get_peft_model(Net(), LoraConfig(r=2, target_modules=["proj"]))
lines = [f"agreed: {runtime.check_agreement(peft)}"]
with torch.no_grad():
    next(p for n, p in peft.named_parameters() if "lora_B" in n).fill_(runtime.rank)
try:
    runtime.check_agreement(peft)
except RuntimeError as exc:
    lines.append(f"disagreed: {exc}")
runtime.close()
with open(f"{sys.argv[1]}/rank{runtime.rank}.txt", "w") as handle:  # one file per rank: stdout interleaves
    handle.write("\\n".join(lines))
"""


def test_rank_agreement_check_detects_different_adapters(tmp_path: Path) -> None:
    script = tmp_path / "agree.py"
    script.write_text(AGREEMENT_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2] / "src")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(script), str(tmp_path)], env=env, capture_output=True, text=True,
                            timeout=LAUNCH_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [(tmp_path / f"rank{r}.txt").read_text().splitlines() for r in range(2)]
    assert ranks[0][0] == ranks[1][0] and ranks[0][0].startswith("agreed: ")  # identical adapters, one digest
    for lines in ranks:
        assert lines[1].startswith("disagreed: the ranks ended training with different adapters (rank 0: ")


# ------------------------------------------------------------------------------------------- FSDP
@pytest.mark.slow  # torchrun + 2 training runs: > 30 s on 2 shared cores
def test_fsdp_trains_saves_a_whole_adapter_that_loads_in_one_process(workdir: Path, ddp_run: Path) -> None:
    out = workdir / "fsdp"
    _run_torchrun(_options(workdir, out, 1, 2, "--fsdp", "--samples", "1", save_every=0), console_script=True)

    saved, reference = _adapter(out), _adapter(ddp_run)
    # Gathered, not sharded: every tensor whole (PEFT users get empty or half tensors from ZeRO-3 shards).
    assert saved and {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in reference.items()}
    assert all(torch.count_nonzero(v) > 0 for k, v in saved.items() if "lora_B" in k)
    _assert_same_adapter(reference, saved, atol=1e-5)  # FSDP's math equals DDP's (and so one process's)

    ids = torch.randint(0, 200, (2, 9))
    logits = {}
    for name, directory in (("fsdp", out), ("ddp", ddp_run)):
        base, _ = load_causal_lm(workdir / "model")
        with torch.no_grad():
            logits[name] = PeftModel.from_pretrained(base, str(directory / "adapter"))(input_ids=ids).logits
    with torch.no_grad():
        base_logits = load_causal_lm(workdir / "model")[0](input_ids=ids).logits
    assert not torch.allclose(logits["fsdp"], base_logits, atol=1e-4)  # the adapter changes the output
    torch.testing.assert_close(logits["fsdp"], logits["ddp"], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------- resume
@pytest.mark.slow  # torchrun + 2 training runs: > 30 s on 2 shared cores
def test_ddp_resume_after_kill_with_the_same_or_another_world_size(workdir: Path, ddp_run: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    broken = workdir / "broken"
    proc = _torchrun(_options(workdir, broken, 1, 2), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True)  # its own process group: the kill reaches torchrun and both ranks
    deadline = time.time() + LAUNCH_TIMEOUT_S
    while time.time() < deadline and not list((broken / "checkpoints").glob("step-*")):
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (broken / "summary.json").exists(), "the run finished before it could be killed"
    one_process = workdir / "broken_then_one_process"
    shutil.copytree(broken, one_process)

    # Same world size: bit-identical to the unbroken run.
    _run_torchrun(_options(workdir, broken, 1, 2, "--resume", "latest"))
    _assert_same_adapter(_adapter(ddp_run), _adapter(broken), atol=0)

    # One process with 4 × 1 instead of 2 × 1 × 2: the global batch, hence every step's data, is the same;
    # a global batch that differs is refused.
    assert main(["train", *_options(workdir, one_process, 3, 1, "--resume", "latest")]) == 2
    assert "global batch of 4 examples per step" in capsys.readouterr().err
    assert main(["train", *_options(workdir, one_process, 4, 1, "--resume", "latest")]) == 0
    _assert_same_adapter(_adapter(ddp_run), _adapter(one_process), atol=1e-5)


# ------------------------------------------------------------------------------------------- failure
@pytest.mark.slow  # torchrun with 2 ranks: about 30 s on 2 shared cores
def test_one_failing_rank_ends_the_job_with_a_message_naming_it(workdir: Path) -> None:
    timeout_s = 20
    proc = _torchrun(_options(workdir, workdir / "failing", 2, 1),
                     env={"LORAKIT_FAIL_ON_RANK": "1", "LORAKIT_FAIL_AT_STEP": "3",
                          "LORAKIT_DIST_TIMEOUT": str(timeout_s)},
                     console_script=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: list[str] = []
    failed_at: list[float] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "rank 1 of 2" in line and not failed_at:
                failed_at.append(time.time())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    proc.wait(timeout=LAUNCH_TIMEOUT_S)
    ended = time.time()
    reader.join(timeout=10)
    output = "".join(lines)
    assert proc.returncode != 0, output[-3000:]
    assert "lorakit train: error: rank 1 of 2: fault injected by LORAKIT_FAIL_ON_RANK=1 at step 3" in output
    assert failed_at and ended - failed_at[0] < timeout_s, output[-3000:]  # no rank waited out the timeout
    assert not (workdir / "failing" / "adapter").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ddp_on_one_gpu_process_trains_on_cuda_and_saves(workdir: Path, tmp_path: Path) -> None:
    """torchrun with one process on a GPU: the nccl path, the rank on cuda:LOCAL_RANK, an adapter saved."""
    out = tmp_path / "cuda_ddp"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2] / "src")
    result = subprocess.run([*launcher, "-m", "lorakit", "--", "train",
                             *_options(workdir, out, 4, 1, "--device", "cuda", save_every=0)],
                            env=env, text=True, capture_output=True, timeout=LAUNCH_TIMEOUT_S)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"] == "cuda:0" and summary["world_size"] == 1
    assert (out / "adapter" / "adapter_model.safetensors").exists()
