"""TrainOptions: every knob of ``lorakit train``; CLI flags and config-file keys are the same names.

A config file (JSON, or YAML if PyYAML is installed) holds any subset of the fields below; flags given on
the command line override it. Validation names the option, the bad value and what is allowed.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..quant import QUANT_TYPES

SCHEDULES = ("linear", "cosine", "constant")
DTYPES = ("float32", "bfloat16", "float16")
EXAMPLES = ("chat",)


@dataclass
class TrainOptions:
    """Options of one training run (defaults: the embedded SmolLM2 sentiment example, < 10 min on 2 cores)."""

    model: str | None = None
    """Local Hugging Face causal-LM directory; None: the embedded SmolLM2-135M-Instruct (set up on first use)."""
    data: str | None = None
    """Training data file (JSONL/JSON/CSV/TXT: text, prompt/completion or instruction/input/output records;
    JSONL/JSON: also chat messages or ShareGPT conversations); None: the embedded Rotten Tomatoes sentiment task."""
    eval_data: str | None = None
    """Held-out file; None: the default task's held-out split, or the last eval_fraction of --data."""
    eval_fraction: float = 0.1
    """Share of --data held out when no --eval-data is given."""
    train_size: int | None = 640
    """Use at most this many training examples (None: all)."""
    eval_size: int | None = 500
    """Evaluate on at most this many held-out examples (None: all)."""
    target_modules: list[str] | None = None
    """Modules to adapt, comma-separated, or all-linear; None: q_proj+v_proj (Llama-style), c_attn (GPT-2),
    else all-linear — and all-linear with --quantize (QLoRA's recipe)."""
    r: int = 8
    """LoRA rank."""
    lora_alpha: float = 16
    """LoRA alpha (scaling α/r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA branch input."""
    lr: float = 2e-3
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    schedule: str = "linear"
    """Learning-rate schedule after warm-up: linear, cosine or constant."""
    warmup_steps: int = 5
    """Linear warm-up steps from 0 to lr."""
    epochs: float = 1.0
    """Passes over the training data (ignored when max_steps is set)."""
    max_steps: int | None = None
    """Optimizer steps to run; overrides epochs."""
    batch_size: int = 8
    """Examples per micro-batch (per process)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_length: int = 128
    """Longest tokenized example (prompts are cut on the left to keep the completion)."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0: off)."""
    seed: int = 0
    """Seeds adapter init, data order and dropout."""
    dtype: str = "float32"
    """Base model dtype: float32, bfloat16 or float16 (adapters stay float32)."""
    eval_every: int = 0
    """Evaluate every N optimizer steps (0: only before and after training)."""
    save_every: int = 0
    """Write a resumable checkpoint every N optimizer steps (0: none until the end)."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep."""
    log_every: int = 5
    """Write a metrics line every N optimizer steps."""
    output_dir: str = "runs/lorakit"
    """Where adapter/, metrics.jsonl, loss.png and checkpoints/ go."""
    resume: str | None = None
    """Checkpoint directory to continue from, or "latest" for the newest in output_dir/checkpoints."""
    samples: int = 3
    """Held-out prompts whose generations are printed at the end."""
    fsdp: bool = False
    """Under torchrun, shard the model across processes with FSDP2 (for bases too large for one device)
    instead of replicating it (DDP); ignored with one process."""
    threads: int | None = None
    """torch.set_num_threads (None: torch's default)."""
    progress: bool = True
    """Show progress bars."""
    use_dora: bool = False
    """Train DoRA adapters (a trainable magnitude per output feature, Liu et al. 2024; Linear/Conv1D targets)."""
    quantize: str | None = None
    """Quantize the frozen base's linear layers (QLoRA): nf4 or int8 (needs pip install 'lorakit[quant]');
    None: full precision."""
    loraplus_lr_ratio: float | None = None
    """LoRA+: train the B factors at lr × this ratio (16 is typical); None: one lr for all."""
    # -- runtime: device, precision, memory, evaluation during training, logging backends
    device: str = "auto"
    """auto (CUDA if available, else MPS, else CPU), cpu, cuda, cuda:N or mps; under torchrun each rank
    takes cuda:LOCAL_RANK."""
    autocast: bool = False
    """Run the forward under torch.autocast: bfloat16 (float16 with a GradScaler, CUDA only, when --dtype is
    float16); adapters and optimizer state stay float32."""
    gradient_checkpointing: bool = False
    """Recompute each transformer block's activations in backward instead of keeping them (less memory,
    about one more forward of compute)."""
    early_stopping_patience: int = 0
    """Stop after this many --eval-every evaluations without improvement and keep the best adapter as
    adapter/ (the last as last/); 0: off."""
    early_stopping_metric: str | None = None
    """accuracy, loss or perplexity; None: accuracy for labelled tasks, else loss."""
    report_to: list[str] | None = None
    """Extra logging backends, comma-separated: tensorboard (metrics.jsonl is always written)."""
    eval_cache: bool = True
    """Reuse the before-training evaluation of the same base model files, held-out data and settings from
    the lorakit cache instead of computing it again."""
    chat_template: str | None = None
    """Jinja chat template file for chat (messages/ShareGPT) records; None: the tokenizer's own template."""
    train_on_inputs: bool = False
    """Chat data: train on every token, not only the assistant turns (prompt/completion: on the prompt too)."""
    train_on_last_turn: bool = False
    """Chat data: train only on each conversation's final assistant turn."""
    packing: bool = False
    """Pack each micro-batch's examples into rows of max_length (positions and attention restart per example)."""
    group_by_length: bool = True
    """Put examples of similar length in the same step (less padding: each epoch still visits every example
    once, the steps in random order; with --packing the same steps are packed). --no-group-by-length: plain
    random batches."""
    token_cache: bool = True
    """Cache tokenized --data under the lorakit cache (a rerun or resume reuses it)."""
    example: str | None = None
    """A built-in example instead of the default sentiment task: chat (SmolLM2 + ChatML on TREC questions)."""
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        positive = ("r", "batch_size", "grad_accum", "max_length", "keep_checkpoints", "log_every")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"--{_flag(name)}={value!r} is invalid: use a positive integer.")
        for name in ("eval_every", "save_every", "warmup_steps", "seed", "samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"--{_flag(name)}={value!r} is invalid: use an integer ≥ 0.")
        for name in ("max_steps", "train_size", "eval_size", "threads"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"--{_flag(name)}={value!r} is invalid: use a positive integer (or leave it unset).")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr={self.lr!r} is invalid: use a positive learning rate such as 1e-3.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"--lora-dropout={self.lora_dropout!r} is invalid: use a probability in [0, 1).")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"--eval-fraction={self.eval_fraction!r} is invalid: use a fraction in (0, 1).")
        if not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise ValueError(f"--epochs={self.epochs!r} is invalid: use a positive number.")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ValueError("--weight-decay and --max-grad-norm must be ≥ 0.")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--schedule={self.schedule!r} is invalid: use one of {', '.join(SCHEDULES)}.")
        if not isinstance(self.use_dora, bool):
            raise ValueError(f"--use-dora={self.use_dora!r} is invalid: use true or false.")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype={self.dtype!r} is invalid: use one of {', '.join(DTYPES)}.")
        if self.quantize is not None and self.quantize not in QUANT_TYPES:
            raise ValueError(f"--quantize={self.quantize!r} is invalid: use one of {', '.join(QUANT_TYPES)} "
                             "(or leave it unset for a full-precision base).")
        if self.quantize is not None and self.fsdp:
            raise ValueError(f"--quantize {self.quantize} with --fsdp is not supported (FSDP would shard the "
                             "quantized codes without their scales); drop --fsdp: DDP replicates the quantized base.")
        ratio = self.loraplus_lr_ratio
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))
                                  or not (math.isfinite(ratio) and ratio > 0)):
            raise ValueError(f"--loraplus-lr-ratio={ratio!r} is invalid: use a positive number such as 16 "
                             "(the B factors' learning rate is lr × ratio), or leave it unset.")
        self._check_runtime()
        if self.train_on_inputs and self.train_on_last_turn:
            raise ValueError("--train-on-inputs and --train-on-last-turn exclude each other: pick one.")
        if self.example is not None and self.example not in EXAMPLES:
            raise ValueError(f"--example={self.example!r} is invalid: use one of {', '.join(EXAMPLES)}.")
        if isinstance(self.target_modules, str):
            self.target_modules = [t for t in self.target_modules.split(",") if t]
        if self.target_modules is not None and not self.target_modules:
            raise ValueError("--target-modules is empty: name modules (e.g. q_proj,v_proj) or use all-linear.")

    def _check_runtime(self) -> None:
        from .early_stopping import METRICS

        if not isinstance(self.device, str) or not self.device.strip():
            raise ValueError(f"--device={self.device!r} is invalid: use auto, cpu, cuda, cuda:N or mps.")
        value = self.early_stopping_patience
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"--early-stopping-patience={value!r} is invalid: use an integer ≥ 0.")
        if value > 0 and self.eval_every == 0:
            raise ValueError(f"--early-stopping-patience {value} needs evaluations to compare: add --eval-every N "
                             "(evaluate every N optimizer steps).")
        if self.early_stopping_metric is not None and self.early_stopping_metric not in METRICS:
            raise ValueError(f"--early-stopping-metric={self.early_stopping_metric!r} is invalid: use one of "
                             f"{', '.join(METRICS)}.")
        if isinstance(self.report_to, str):
            self.report_to = [t for t in self.report_to.split(",") if t]
        if self.report_to is not None and not all(isinstance(t, str) for t in self.report_to):
            raise ValueError(f"--report-to={self.report_to!r} is invalid: name backends, e.g. tensorboard.")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name != "extra"]

    @classmethod
    def from_file(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> TrainOptions:
        """Options from a JSON/YAML file whose keys are the flag names (dashes or underscores)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist; pass the path of a JSON or YAML file of options.")
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ValueError(f"{path} is YAML but PyYAML is not installed; pip install pyyaml or use JSON.") from None
            try:
                data = yaml.safe_load(text) or {}
            except yaml.YAMLError as exc:
                raise ValueError(f"{path} is not valid YAML: {exc}") from None
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a mapping of option names to values.")
        data = {str(k).replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(data) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"{path} has unknown option(s) {unknown}; allowed: {', '.join(cls.field_names())}.")
        data.update(overrides or {})
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("extra")
        return data


def _flag(name: str) -> str:
    return name.replace("_", "-")
