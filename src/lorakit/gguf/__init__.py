"""llama.cpp interop: LoRA adapters and merged models as GGUF files (``lorakit export`` / ``import-gguf``).

- ``architectures``: llama.cpp's tensor names and row layout per supported base architecture.
- ``storage``: output types (f32/f16/bf16/q8_0), dequantizing on read, atomic file writes.
- ``adapter``: PEFT adapter directory ⇄ GGUF LoRA adapter.
- ``merged``: base + adapter merged into one GGUF model file.

Named ``lorakit.gguf``; inside it ``import gguf`` is the ``gguf`` package (absolute imports).
"""

from __future__ import annotations

from .adapter import export_adapter, import_adapter
from .architectures import ARCHITECTURES
from .storage import OUTTYPES

__all__ = ["ARCHITECTURES", "OUTTYPES", "export_adapter", "import_adapter"]
