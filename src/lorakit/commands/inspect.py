"""`lorakit inspect`: what an adapter directory holds — targets, ranks, α, parameter count, size, base."""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

_LAYER = re.compile(r"\.(\d+)\.")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "inspect", help="describe an adapter directory (targets, ranks, alpha, size, base fingerprint)",
        description="Read a PEFT-format adapter directory (lorakit- or PEFT-made) without loading any model and "
        "print its config, adapted modules with their ranks and scaling, trainable parameter count, file size, "
        "and the base-model fingerprint lorakit stored (if any). Subdirectories holding named adapters are "
        "listed too.")
    parser.add_argument("adapter", help="adapter directory (holding adapter_config.json)")
    parser.add_argument("--json", action="store_true", help="print the description as JSON")
    parser.set_defaults(func=run)


def describe(directory: str | Path) -> dict[str, Any]:
    """A JSON-ready description of the adapter in ``directory`` (see ``lorakit inspect --help``)."""
    from ..fingerprint import FINGERPRINT_KEY
    from ..io import read_adapter

    files = read_adapter(directory)
    config = files.config
    modules: dict[str, dict[str, Any]] = defaultdict(dict)
    for key, tensor in files.tensors.items():
        path = key.removeprefix("base_model.model.")
        for suffix, field in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_embedding_A", "A"),
                              (".lora_embedding_B", "B")):
            if path.endswith(suffix):
                modules[path[: -len(suffix)]][field] = list(tensor.shape)
    rows = []
    for name in sorted(modules, key=_natural):
        shapes = modules[name]
        rank = shapes.get("A", [0])[0]
        alpha = _pattern_value(config.alpha_pattern, name, config.lora_alpha)
        rows.append({"module": name, "r": rank, "lora_alpha": alpha, "scaling": config.scaling_for(rank, alpha) if rank else None,
                     "A": shapes.get("A"), "B": shapes.get("B")})
    extra = sorted(k for k in files.tensors if not any(s in k for s in (".lora_A.", ".lora_B.", ".lora_embedding_")))
    size = files.weights_path.stat().st_size
    named = sorted(p.name for p in Path(directory).iterdir() if (p / "adapter_config.json").is_file())
    return {
        "directory": str(directory),
        "weights_file": files.weights_path.name,
        "file_bytes": size,
        "parameters": sum(t.numel() for t in files.tensors.values()),
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in files.tensors.values()}),
        "targets": config.target_modules,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "use_rslora": config.use_rslora,
        "bias": config.bias,
        "task_type": getattr(config.task_type, "value", config.task_type),
        "base_model_name_or_path": config.base_model_name_or_path,
        "base_fingerprint": files.metadata.get(FINGERPRINT_KEY),
        "written_by": (f"lorakit {files.metadata['lorakit.version']}" if "lorakit.version" in files.metadata
                   else "PEFT or another tool (no lorakit metadata)"),
        "modules": rows,
        "other_tensors": extra,
        "named_adapters": named,
        "config": config.to_dict(),
    }


def _natural(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _pattern_value(pattern: dict[str, Any], name: str, default: Any) -> Any:
    from ..inject import pattern_key_matches

    return next((v for k, v in pattern.items() if pattern_key_matches(name, k)), default)


def run(args: argparse.Namespace) -> int:
    info = describe(args.adapter)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"adapter:     {info['directory']}  ({info['weights_file']}, {info['file_bytes']:,} bytes, {', '.join(info['dtypes'])})")
    print(f"base model:  {info['base_model_name_or_path']}  fingerprint: {info['base_fingerprint'] or '—'}")
    print(f"written by:  {info['written_by']}")
    print(f"config:      r={info['r']} lora_alpha={info['lora_alpha']} dropout={info['lora_dropout']} "
          f"rslora={info['use_rslora']} bias={info['bias']} task={info['task_type']}")
    print(f"targets:     {info['targets']}")
    print(f"parameters:  {info['parameters']:,} in {len(info['modules'])} adapted modules")
    layers: dict[str, int] = defaultdict(int)
    for row in info["modules"]:
        layers[_LAYER.sub(".N.", row["module"])] += 1
    print(f"{'module (N = layer index)':<48} {'count':>5} {'r':>4} {'alpha':>6} {'scaling':>8}  A / B shapes")
    shown: set[str] = set()
    for row in info["modules"]:
        key = _LAYER.sub(".N.", row["module"])
        if key in shown:
            continue
        shown.add(key)
        scaling = f"{row['scaling']:.3g}" if row["scaling"] is not None else "—"
        print(f"{key:<48} {layers[key]:>5} {row['r']:>4} {row['lora_alpha']:>6} {scaling:>8}  {row['A']} / {row['B']}")
    if info["other_tensors"]:
        print(f"other tensors (modules_to_save / biases): {len(info['other_tensors'])}, e.g. {info['other_tensors'][0]}")
    if info["named_adapters"]:
        print(f"named adapters in subdirectories: {', '.join(info['named_adapters'])}")
    return 0
