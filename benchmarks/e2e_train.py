"""P9: ``lorakit train`` against PEFT + transformers ``Trainer``, end to end, as whole processes.

    python -m benchmarks.e2e_train [--quick] [--pairs 3] [--threads 2] [--steps 30] [--eval-size N] [--packing]

Both sides fine-tune the embedded SmolLM2-135M-Instruct on the default sentiment task with the same LoRA
config (q_proj+v_proj, r=8, α=16, dropout 0.05), batch (8), steps (30), learning rate and schedule
(2e-3, 5 warm-up steps, linear), max length (128) and threads, and then score the same held-out records
(accuracy). Each run is a fresh ``python`` process (imports, model load, training, evaluation, saving),
lorakit's exactly as a user runs it (``python -m lorakit train …`` with its defaults: it evaluates before
and after, prints samples); the reference is ``benchmarks/e2e_peft_trainer.py``, the script a PEFT user
writes. ``--packing`` adds a third side, ``lorakit train --packing`` (the same examples per step, packed into
rows of 128 tokens instead of padded), to the same rounds. Runs alternate (A B, B A, …; with packing A B C,
C B A, …); ratios are taken per round against that round's PEFT + Trainer run and the median reported:

- wall time of the process (``perf_counter`` around it), and its CPU time (user + sys from ``os.wait4``,
  which a loaded machine inflates less), trained tokens per second (non-padding tokens / wall);
- peak RSS of the process (``ru_maxrss`` of that child, from ``os.wait4``);
- final training loss (mean of the last 5 steps) and held-out accuracy, beside (not ratios).

lorakit's before-training evaluation is cached (``train/eval_cache.py``) like a user's second run of a
sweep: the first lorakit run computes it (a cold companion line shows that run on its own), later runs
read it. ``--cold`` clears the cache before every lorakit run instead. lorakit's own phase times
(``summary.json`` ``phase_seconds``) are printed as a companion profile.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import HEADER, Result, note, print_result

ROOT = Path(__file__).resolve().parents[1]


def _run(argv: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run ``argv`` as a child process: wall and CPU seconds, peak RSS bytes, stdout."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:5])} … exited {proc.returncode}:\n{stderr[-3000:]}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss": usage.ru_maxrss * 1024, "stdout": stdout}


def lorakit_run(args: argparse.Namespace, out: Path, env: dict[str, str], packing: bool = False) -> dict[str, Any]:
    argv = [sys.executable, "-m", "lorakit", "train", "--output-dir", str(out), "--max-steps", str(args.steps),
            "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--train-size",
            str(args.train_size), "--eval-size", str(args.eval_size), "--log-every", "1", "--no-progress"]
    if packing:
        argv.append("--packing")
    if args.model:
        argv += ["--model", args.model]
    result = _run(argv, env)
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r and "split" not in r]
    result.update(loss=statistics.fmean(losses[-5:]), accuracy=summary["after"]["accuracy"],
                  tokens=summary["tokens_seen"], phases=summary.get("phase_seconds", {}))
    return result


def peft_run(args: argparse.Namespace, out: Path, env: dict[str, str], model_dir: str) -> dict[str, Any]:
    argv = [sys.executable, "-m", "benchmarks.e2e_peft_trainer", "--model", model_dir, "--output-dir", str(out),
            "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--threads", str(args.threads),
            "--train-size", str(args.train_size), "--eval-size", str(args.eval_size)]
    result = _run(argv, env)
    report = json.loads(result["stdout"].strip().splitlines()[-1])
    result.update(loss=report["final_loss"], accuracy=report["accuracy"], tokens=report["trained_tokens"])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 steps of batch 4, 32 held-out records, 1 pair unless --pairs")
    parser.add_argument("--pairs", type=int, default=None, help="interleaved pairs (full: ≥ 3, default 3; quick: 1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 30; quick 4)")
    parser.add_argument("--batch-size", type=int, default=None, help="examples per step (default 8; quick 4)")
    parser.add_argument("--train-size", type=int, default=640)
    parser.add_argument("--eval-size", type=int, default=None, help="held-out records (default 500; quick 32)")
    parser.add_argument("--model", default=None, help="model directory (default: the embedded SmolLM2)")
    parser.add_argument("--cold", action="store_true", help="clear lorakit's evaluation cache before each run")
    parser.add_argument("--packing", action="store_true", help="also run `lorakit train --packing` in every round")
    parser.add_argument("--precision", action="store_true",
                        help="instead: one training step of lorakit on SmolLM2 (B8 T64) in fp32, fp32 base + bf16 "
                             "autocast, and bf16 base, interleaved (the README's CPU precision advice)")
    args = parser.parse_args(argv)
    if args.precision:
        return precision_steps(args)
    args.steps = args.steps or (4 if args.quick else 30)
    args.batch_size = args.batch_size or (4 if args.quick else 8)
    args.eval_size = args.eval_size or (32 if args.quick else 500)
    pairs = (args.pairs or 1) if args.quick else max(3, args.pairs or 3)

    sys.path.insert(0, str(ROOT / "src"))
    from lorakit.train.defaults import cache_dir, ensure_default_model

    model_dir = args.model or str(ensure_default_model())
    work = Path(tempfile.mkdtemp(prefix="lorakit-e2e-"))
    cache = work / "cache"
    # The children use a private lorakit cache holding links to the shared model and data (so that the
    # evaluation cache starts empty and is removed with the rest).
    cache.mkdir()
    for name in ("models", "data"):
        if (cache_dir() / name).exists():
            (cache / name).symlink_to(cache_dir() / name)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
               LORAKIT_CACHE=str(cache), TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=str(args.threads))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"P9 e2e train {datetime.datetime.now():%Y-%m-%d %H:%M}, {os.cpu_count()} CPUs, load {load:.2f}; "
          f"{'quick' if args.quick else 'full'}: SmolLM2-135M, default task, {args.steps} steps of batch "
          f"{args.batch_size}, {args.eval_size} held-out, {args.threads} threads, {pairs} interleaved pair(s), "
          f"whole processes{', cold eval cache' if args.cold else ''}", flush=True)
    sides = ["lorakit", "peft"] + (["packing"] if args.packing else [])
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    try:
        for i in range(pairs):
            for side in (sides if i % 2 == 0 else sides[::-1]):
                out = work / f"{side}-{i}"
                if side == "peft":
                    runs[side].append(peft_run(args, out, env, model_dir))
                else:
                    if args.cold:
                        shutil.rmtree(cache / "evaluations", ignore_errors=True)
                    runs[side].append(lorakit_run(args, out, env, packing=side == "packing"))
                shutil.rmtree(out, ignore_errors=True)
                last = runs[side][-1]
                note(f"pair {i + 1} {side:<7}: wall {last['wall']:.1f} s, cpu {last['cpu']:.1f} s, peak RSS "
                     f"{last['rss'] / 2**20:.0f} MiB, loss {last['loss']:.4f}, accuracy {100 * last['accuracy']:.1f} %"
                     + (f", phases {_phases(last['phases'])}" if "phases" in last else ""))
            report(args, runs["lorakit"], runs["peft"])  # after every round: a run cut short still has its table
            if args.packing:
                report(args, runs["packing"], runs["peft"], "lorakit train --packing")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def report(args: argparse.Namespace, ours: list[dict[str, Any]], theirs: list[dict[str, Any]],
           name: str = "lorakit train") -> None:
    """The P9 lines over the pairs measured so far (printed after every pair, so a cut-short run still reports)."""
    pairs = min(len(ours), len(theirs))
    ours, theirs = ours[:pairs], theirs[:pairs]
    print(f"{name}, after {pairs} pair(s), load {os.getloadavg()[0]:.2f}:")
    print(HEADER)
    ratio = lambda key: statistics.median(a[key] / b[key] for a, b in zip(ours, theirs, strict=True))  # noqa: E731
    mid = lambda runs, key: statistics.median(r[key] for r in runs)  # noqa: E731
    tag = "" if name == "lorakit train" else " (--packing)"
    print_result(Result("P9", f"e2e wall, {name} / PEFT + Trainer", mid(ours, "wall"), mid(theirs, "wall"),
                        ratio("wall"), "<= 0.67", unit="s"))
    print_result(Result("P9", f"e2e peak RSS, {name} / PEFT + Trainer", mid(ours, "rss") / 2**20,
                        mid(theirs, "rss") / 2**20, ratio("rss"), "<= 0.85", unit="MiB"))
    print_result(Result("P9", f"e2e CPU time (user+sys), lorakit{tag} / PEFT + Trainer", mid(ours, "cpu"),
                        mid(theirs, "cpu"), ratio("cpu"), "<= 0.67", unit="s"))
    rate = [o["tokens"] / o["wall"] for o in ours], [t["tokens"] / t["wall"] for t in theirs]
    note(f"trained tokens/s: lorakit {statistics.median(rate[0]):.0f}, PEFT + Trainer {statistics.median(rate[1]):.0f} "
         f"(tokens: {ours[0]['tokens']} / {theirs[0]['tokens']})")
    note(f"final training loss (mean of the last 5 steps): lorakit {mid(ours, 'loss'):.4f}, PEFT + Trainer "
         f"{mid(theirs, 'loss'):.4f}")
    se = (0.25 / args.eval_size) ** 0.5
    note(f"held-out accuracy (n={args.eval_size}, one standard error ≈ {100 * se:.1f} points): lorakit "
         f"{100 * mid(ours, 'accuracy'):.1f} %, PEFT + Trainer {100 * mid(theirs, 'accuracy'):.1f} %")
    if name != "lorakit train":
        return  # its first run already finds the evaluation cache warm
    note(f"lorakit's first run (cold evaluation cache): wall {ours[0]['wall']:.1f} s = "
         f"{ours[0]['wall'] / theirs[0]['wall']:.3f}× its pair's PEFT + Trainer run")


def precision_steps(args: argparse.Namespace) -> int:
    """Step time of lorakit's training step on this device in three precision regimes, as ratios to fp32."""
    import torch

    from lorakit import LoraConfig, get_peft_model
    from lorakit.train.defaults import ensure_default_model
    from lorakit.train.device import Precision
    from lorakit.train.loop import load_causal_lm, sequence_mean_loss

    from .common import interleave, median, median_ratio

    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    ids = torch.randint(100, 20000, (8, 32 if args.quick else 64), generator=torch.Generator().manual_seed(0))
    steps = {}
    for name, dtype, autocast in (("fp32", "float32", False), ("fp32 base + bf16 autocast", "float32", True),
                                  ("bf16 base", "bfloat16", False)):
        model, _ = load_causal_lm(args.model or ensure_default_model(), dtype)
        peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                target_modules=["q_proj", "v_proj"])).train()
        optimizer = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-4)
        precision = Precision.resolve(dtype, autocast, cpu)

        def step(peft=peft, optimizer=optimizer, precision=precision) -> None:  # type: ignore[no-untyped-def]
            with precision.autocast():
                logits = peft(input_ids=ids).logits
            sequence_mean_loss(logits, ids).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        steps[name] = step
    times = interleave(steps, 2 if args.quick else 5)
    load = os.getloadavg()[0]
    print(f"P9 precision companion, {os.cpu_count()} CPUs, load {load:.2f}: lorakit train step, SmolLM2-135M "
          f"q_proj+v_proj r=8, B8 T{ids.shape[1]}, {args.threads} threads, median of interleaved rounds")
    print(HEADER)
    for name in list(steps)[1:]:
        print_result(Result("P9", f"step {name} / fp32", median(times[name]), median(times["fp32"]),
                            median_ratio(times, name, "fp32"), "<= 1.00"))
    return 0


def _phases(phases: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f} s" for k, v in phases.items())


if __name__ == "__main__":
    sys.exit(main())
