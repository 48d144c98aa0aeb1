"""What ``lorakit serve`` is started with, checked in one place, and building the app from it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..io import CONFIG_NAME


@dataclass
class ServeOptions:
    """The server's configuration (the CLI flags of ``lorakit serve``)."""

    model: Path | None = None
    """Local Hugging Face causal-LM directory; None: the embedded SmolLM2."""
    adapters: list[tuple[str, Path]] = field(default_factory=list)
    """(name, directory) adapters to serve (``--adapter NAME=DIR``)."""
    adapter_dirs: list[Path] = field(default_factory=list)
    """Each subdirectory holding adapter_config.json is an adapter named after it; also the roots that
    ``/v1/load_lora_adapter`` may read from."""
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    max_batch_size: int = 32
    max_queue: int = 256
    max_model_len: int | None = None
    max_loaded_adapters: int | None = None

    def __post_init__(self) -> None:
        for value, flag in ((self.max_batch_size, "--max-batch-size"), (self.max_queue, "--max-queue"),
                            (self.max_model_len, "--max-model-len"),
                            (self.max_loaded_adapters, "--max-loaded-adapters")):
            if value is not None and value < 1:
                raise ValueError(f"{flag}={value} must be at least 1.")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port={self.port} must be in [0, 65535].")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype={self.dtype!r}: choose float32, bfloat16 or float16.")
        if self.api_key is not None and not self.api_key:
            raise ValueError("--api-key is empty; give a key or leave the flag out.")
        for directory in self.adapter_dirs:
            if not Path(directory).is_dir():
                raise FileNotFoundError(f"--adapter-dir {directory}: no such directory.")
        names = [n for n, _ in self.adapters]
        if len(set(names)) != len(names):
            raise ValueError(f"--adapter names {names} repeat; give each its own NAME=DIR.")

    def discovered_adapters(self) -> list[tuple[str, Path]]:
        """``adapters`` plus every adapter subdirectory of the ``adapter_dirs`` (sorted by name)."""
        found = list(self.adapters)
        for directory in self.adapter_dirs:
            for sub in sorted(Path(directory).iterdir()):
                if sub.is_dir() and (sub / CONFIG_NAME).is_file():
                    found.append((sub.name, sub))
        names = [n for n, _ in found]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"adapter names {repeated} occur twice among --adapter and --adapter-dir; rename one.")
        return found


def build(options: ServeOptions) -> tuple[Any, Any]:
    """(FastAPI app, Engine) for ``options``: loads the model, registers and loads the adapters (up to
    ``max_loaded_adapters``; the rest load on demand). Every adapter is checked by lorakit's loader now,
    so a bad one stops the start with its error rather than failing requests later."""
    import torch

    from ..train.loop import load_causal_lm
    from .app import create_app
    from .engine import Engine
    from .metrics import ServeMetrics
    from .registry import AdapterRegistry

    adapters = options.discovered_adapters()  # before the slow model load: fail fast on bad flags
    if options.model is not None:
        model_dir = Path(options.model)
    else:
        from ..train.defaults import ensure_default_model

        model_dir = ensure_default_model()
    model, tokenizer = load_causal_lm(model_dir, options.dtype)
    model.to(torch.device(options.device))
    base_name = Path(os.path.normpath(model_dir)).name
    roots = list(options.adapter_dirs) + [path for _, path in options.adapters]
    registry = AdapterRegistry(model, roots=roots, max_loaded=options.max_loaded_adapters)
    for i, (name, path) in enumerate(adapters):
        if name == base_name:
            raise ValueError(f"adapter name {name!r} is the base model's name; rename the adapter.")
        checked = registry.check_path(path, restrict=False)
        if options.max_loaded_adapters is None or i < options.max_loaded_adapters:
            registry.load(name, checked)
        else:
            registry.register(name, checked)
    metrics = ServeMetrics()
    engine = Engine(registry, tokenizer, max_batch_size=options.max_batch_size, max_queue=options.max_queue,
                    max_model_len=options.max_model_len, metrics=metrics)
    engine.check_model()
    return create_app(engine, base_name, metrics, options.api_key), engine
