"""What an adapter learned: spectra, effective rank, amplification, subspace similarity (paper §7).

Definitions used throughout (M = s·B·A is a layer's update in factor orientation, d×K; σ₁ ≥ σ₂ ≥ … its
singular values):

- **Effective rank (entropy)** (Roy & Vetterli 2007): exp(−Σ pᵢ log pᵢ) with pᵢ = σᵢ / Σ σⱼ; it is k for k
  equal non-zero σ and approaches 1 as one direction dominates.
- **90 %-energy rank**: the smallest k with Σ_{i≤k} σᵢ² ≥ 0.9 · Σ σᵢ².
- **Amplification factor** (§7.3, Table 7): ‖ΔW‖_F / ‖Uᵀ·W₀·V‖_F, where U (d×r) and V (K×r) are ΔW's top-r
  left/right singular vectors and W₀ is the base weight in the same orientation: how much ΔW amplifies the
  directions of W₀ it touches.
- **Subspace similarity** (§7.2, Fig. 3): φ(A₁, A₂, i, j) = ‖U₁,ᵢᵀ·U₂,ⱼ‖_F² / min(i, j) ∈ [0, 1], where U_·,ᵢ
  holds the top-i right-singular vectors of an adapter's A (r×K). φ(A, A, i, i) = 1 and φ(A₁, A₂, i, j) =
  φ(A₂, A₁, j, i). For independent uniformly random subspaces of R^K, E[‖U_iᵀU_j‖_F²] = i·j/K, so
  E[φ] = max(i, j)/K.
- **Layer similarity** between layer l of adapter 1 and layer m of adapter 2 (same K): φ at full ranks,
  φ(A₁ˡ, A₂ᵐ, r₁, r₂).

``analyze`` returns a JSON-ready report whose schema is ``REPORT_SCHEMA`` (checked by
``validate_report``); ``format_report`` renders it as a table and ``plot_report`` writes PNGs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from .arithmetic import lowrank_svd
from .layers import LoraLayer
from .layers.conv import Conv
from .layers.embedding import Embedding
from .model import PeftModel

SCHEMA_VERSION = 1

_NUMBER = {"type": "number"}
_NULLABLE_NUMBER = {"type": ["number", "null"]}
_MATRIX = {"type": "array", "items": {"type": "array", "items": _NUMBER}}

_LAYER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["module", "kind", "shape", "r", "scaling", "singular_values", "frobenius_norm",
                 "effective_rank_entropy", "energy_rank_90", "amplification", "w0_frobenius_norm",
                 "w0_projection_norm"],
    "additionalProperties": False,
    "properties": {
        "module": {"type": "string", "description": "module path inside the model"},
        "kind": {"type": "string", "description": "lorakit layer class: Linear, GPT2Conv1D, Embedding, Conv"},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 2, "maxItems": 2,
                  "description": "[d, K] of ΔW in factor orientation (out, in)"},
        "r": {"type": "integer", "minimum": 1},
        "scaling": _NUMBER,
        "singular_values": {"type": "array", "items": {"type": "number", "minimum": 0},
                            "description": "σ of ΔW = s·B·A, descending, min(r, d, K) values"},
        "frobenius_norm": {"type": "number", "minimum": 0, "description": "‖ΔW‖_F"},
        "effective_rank_entropy": {"type": "number", "minimum": 0},
        "energy_rank_90": {"type": "integer", "minimum": 0, "description": "0 only when ΔW = 0"},
        "amplification": {"type": ["number", "null"], "minimum": 0,
                          "description": "‖ΔW‖_F / ‖Uᵀ W0 V‖_F; null when W0 has no component there"},
        "w0_frobenius_norm": {"type": "number", "minimum": 0},
        "w0_projection_norm": {"type": "number", "minimum": 0, "description": "‖Uᵀ W0 V‖_F"},
    },
}

_PAIR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["module", "r1", "r2", "phi", "phi_full"],
    "additionalProperties": False,
    "properties": {
        "module": {"type": "string"},
        "r1": {"type": "integer", "minimum": 1},
        "r2": {"type": "integer", "minimum": 1},
        "phi": {**_MATRIX, "description": "phi[i-1][j-1] = φ(A1, A2, i, j), r1 rows × r2 columns, in [0, 1]"},
        "phi_full": {"type": "number", "minimum": 0, "maximum": 1, "description": "φ(A1, A2, r1, r2)"},
    },
}

REPORT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "lorakit adapter analysis report",
    "type": "object",
    "required": ["schema_version", "adapters", "comparison"],
    "additionalProperties": False,
    "properties": {
        "schema_version": {"type": "integer", "enum": [SCHEMA_VERSION]},
        "adapters": {
            "type": "array", "minItems": 1, "maxItems": 2,
            "items": {
                "type": "object",
                "required": ["name", "layers"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string"},
                    "source": {"type": ["string", "null"], "description": "where the adapter was loaded from"},
                    "layers": {"type": "array", "items": _LAYER_SCHEMA},
                },
            },
        },
        "comparison": {
            "type": ["object", "null"],
            "required": ["adapters", "layers", "layer_similarity"],
            "additionalProperties": False,
            "properties": {
                "adapters": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 2},
                "layers": {"type": "array", "items": _PAIR_SCHEMA,
                           "description": "one entry per module adapted by both"},
                "layer_similarity": {
                    "type": "object",
                    "required": ["modules_1", "modules_2", "values"],
                    "additionalProperties": False,
                    "properties": {
                        "modules_1": {"type": "array", "items": {"type": "string"}},
                        "modules_2": {"type": "array", "items": {"type": "string"}},
                        "values": {"type": "array", "items": {"type": "array", "items": _NULLABLE_NUMBER},
                                   "description": "values[l][m] = φ(A1ˡ, A2ᵐ, r1, r2); null if input dims differ"},
                    },
                },
            },
        },
        "plots": {"type": "array", "items": {"type": "string"}, "description": "PNG files written"},
    },
}
"""JSON Schema (draft 2020-12 subset) of the dict ``analyze`` returns; ``lorakit analyze --print-schema``."""


# ---------------------------------------------------------------------------------------- measures
def effective_rank(singular_values: torch.Tensor) -> float:
    """exp(entropy of σ/Σσ) (Roy & Vetterli 2007); 0.0 for an all-zero spectrum."""
    s = singular_values.double().clamp(min=0)
    total = float(s.sum())
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def energy_rank(singular_values: torch.Tensor, fraction: float = 0.9) -> int:
    """Smallest k with Σ_{i≤k} σᵢ² ≥ fraction·Σ σᵢ² (0 for an all-zero spectrum)."""
    power = singular_values.double() ** 2
    total = float(power.sum())
    if total <= 0:
        return 0
    cumulative = (power.cumsum(0) / total).tolist()
    return next(i + 1 for i, c in enumerate(cumulative) if c >= fraction - 1e-12 or i == len(cumulative) - 1)


def amplification_factor(delta: torch.Tensor, base_weight: torch.Tensor, r: int) -> tuple[float | None, float]:
    """(‖ΔW‖_F / ‖Uᵀ·W₀·V‖_F, ‖Uᵀ·W₀·V‖_F) with U, V the top-r singular vectors of ΔW (paper Table 7).

    Both matrices (d×K) in the same orientation. The factor is None when the projection is 0.
    """
    u, _, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    projection = float(torch.linalg.matrix_norm(u[:, :r].t() @ base_weight.double() @ vh[:r].t()))
    norm = float(torch.linalg.matrix_norm(delta.double()))
    return (norm / projection if projection > 0 else None), projection


def right_singular_vectors(a: torch.Tensor) -> torch.Tensor:
    """Columns: the right-singular vectors of A (r×K), by descending σ — a K×min(r, K) orthonormal basis."""
    _, _, vh = torch.linalg.svd(a.detach().double().reshape(a.shape[0], -1), full_matrices=False)
    return vh.t()


def subspace_similarity(a1: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    """φ(A₁, A₂, i, j) = ‖U₁,ᵢᵀU₂,ⱼ‖_F² / min(i, j) for all i ≤ r₁, j ≤ r₂ (paper §7.2, Fig. 3).

    Args:
        a1: (r₁, K) and a2: (r₂, K) — LoRA A matrices of the same layer shape (Conv kernels are flattened).
    Returns:
        (r₁', r₂') float64 matrix, entry [i−1, j−1] = φ(i, j), with rₙ' = min(rₙ, K).
    """
    u1, u2 = right_singular_vectors(a1), right_singular_vectors(a2)
    if u1.shape[0] != u2.shape[0]:
        raise ValueError(f"A matrices of input size {u1.shape[0]} and {u2.shape[0]} have no common space; "
                         "compare adapters of the same layer shape.")
    overlap = (u1.t() @ u2) ** 2                   # [i, j] = (u1_i · u2_j)²
    cumulative = overlap.cumsum(0).cumsum(1)      # [i, j] = ‖U1_{i+1}ᵀ U2_{j+1}‖_F²
    i = torch.arange(1, overlap.shape[0] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, overlap.shape[1] + 1, dtype=torch.float64)[None, :]
    return (cumulative / torch.minimum(i, j)).clamp(0, 1)


# ---------------------------------------------------------------------------------------- report
def _factor_matrix(layer: LoraLayer, weight: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like the base weight, as the d×K matrix that B·A represents."""
    if isinstance(layer, Embedding) or getattr(layer, "fan_in_fan_out", False):
        return weight.t()
    if isinstance(layer, Conv):
        return weight.flatten(1)
    return weight


def _flat_a(layer: LoraLayer, name: str) -> torch.Tensor:
    a = layer.factors(name)[0].detach()
    return a.reshape(a.shape[0], -1)


def layer_report(layer: LoraLayer, adapter_name: str, module: str) -> dict[str, Any]:
    """One layer's entry of the report (see ``REPORT_SCHEMA``); never forms the dense d×K update."""
    a, b = (f.detach().double() for f in layer.factors(adapter_name))
    r, scale = layer.r[adapter_name], layer.scaling[adapter_name]
    u, s, vh = lowrank_svd(scale * b.reshape(b.shape[0], -1), a.reshape(a.shape[0], -1))
    w0 = _factor_matrix(layer, layer.base_layer.weight.detach().double())
    norm = float(s.norm())
    projection = float(torch.linalg.matrix_norm(u[:, :r].t() @ w0 @ vh[:r].t()))
    return {
        "module": module,
        "kind": type(layer).__name__,
        "shape": [int(u.shape[0]), int(vh.shape[1])],
        "r": r,
        "scaling": float(scale),
        "singular_values": s.tolist(),
        "frobenius_norm": norm,
        "effective_rank_entropy": effective_rank(s),
        "energy_rank_90": energy_rank(s, 0.9),
        "amplification": norm / projection if projection > 0 else None,
        "w0_frobenius_norm": float(torch.linalg.matrix_norm(w0)),
        "w0_projection_norm": projection,
    }


def _layers(model: PeftModel, adapter_name: str) -> list[tuple[str, LoraLayer]]:
    return [(n, m) for n, m in model.get_base_model().named_modules()
            if isinstance(m, LoraLayer) and adapter_name in m.r]


def compare_adapters(model: PeftModel, first: str, second: str) -> dict[str, Any]:
    """The report's ``comparison`` section: φ per shared module, and φ at full ranks between all layers."""
    layers1, layers2 = _layers(model, first), _layers(model, second)
    a1 = {n: _flat_a(m, first) for n, m in layers1}
    a2 = {n: _flat_a(m, second) for n, m in layers2}
    pairs = []
    for name in (n for n in a1 if n in a2):
        phi = subspace_similarity(a1[name], a2[name])
        pairs.append({"module": name, "r1": int(phi.shape[0]), "r2": int(phi.shape[1]),
                      "phi": phi.tolist(), "phi_full": float(phi[-1, -1])})
    basis1 = {n: right_singular_vectors(a) for n, a in a1.items()}
    basis2 = {n: right_singular_vectors(a) for n, a in a2.items()}
    values: list[list[float | None]] = []
    for u1 in basis1.values():
        row: list[float | None] = []
        for u2 in basis2.values():
            same_space = u1.shape[0] == u2.shape[0]
            overlap = float(((u1.t() @ u2) ** 2).sum()) / min(u1.shape[1], u2.shape[1]) if same_space else None
            row.append(None if overlap is None else min(max(overlap, 0.0), 1.0))
        values.append(row)
    return {"adapters": [first, second], "layers": pairs,
            "layer_similarity": {"modules_1": list(a1), "modules_2": list(a2), "values": values}}


def analyze(model: PeftModel, adapters: list[str], sources: dict[str, str] | None = None) -> dict[str, Any]:
    """Report on one adapter, or two (adding their comparison), as a dict matching ``REPORT_SCHEMA``.

    Args:
        model: a PeftModel holding the adapters (and the base weights, for the amplification factor).
        adapters: one or two adapter names.
        sources: optional adapter name → where it came from (recorded in the report).

    Raises:
        ValueError: not one or two adapters, or an unknown name.
    """
    if not 1 <= len(adapters) <= 2:
        raise ValueError(f"analyze takes one or two adapters, got {adapters}.")
    for name in adapters:
        model._require_adapter(name)
    entries = [{"name": name, "source": (sources or {}).get(name),
                "layers": [layer_report(m, name, n) for n, m in _layers(model, name)]} for name in adapters]
    comparison = compare_adapters(model, adapters[0], adapters[1]) if len(adapters) == 2 else None
    return {"schema_version": SCHEMA_VERSION, "adapters": entries, "comparison": comparison}


# ---------------------------------------------------------------------------------------- validation
_JSON_TYPES: dict[str, Any] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def validate_report(report: Any, schema: dict[str, Any] | None = None, path: str = "$") -> None:
    """Check ``report`` against ``REPORT_SCHEMA`` (the keywords it uses: type, enum, required, properties,
    additionalProperties, items, minItems/maxItems, minimum/maximum). Raises ValueError naming the path."""
    schema = REPORT_SCHEMA if schema is None else schema
    types = schema.get("type")
    if types is not None:
        allowed = [types] if isinstance(types, str) else types
        if not any(_JSON_TYPES[t](report) for t in allowed):
            raise ValueError(f"{path}: expected {' or '.join(allowed)}, got {report!r:.80}")
    if "enum" in schema and report not in schema["enum"]:
        raise ValueError(f"{path}: {report!r} is not one of {schema['enum']}")
    if isinstance(report, (int, float)) and not isinstance(report, bool):
        if "minimum" in schema and report < schema["minimum"]:
            raise ValueError(f"{path}: {report} < minimum {schema['minimum']}")
        if "maximum" in schema and report > schema["maximum"]:
            raise ValueError(f"{path}: {report} > maximum {schema['maximum']}")
    if isinstance(report, dict):
        missing = [k for k in schema.get("required", []) if k not in report]
        if missing:
            raise ValueError(f"{path}: missing {missing}")
        properties = schema.get("properties", {})
        extra = [k for k in report if k not in properties]
        if extra and schema.get("additionalProperties", True) is False:
            raise ValueError(f"{path}: unexpected keys {extra}")
        for key, value in report.items():
            if key in properties:
                validate_report(value, properties[key], f"{path}.{key}")
    if isinstance(report, list):
        if len(report) < schema.get("minItems", 0) or len(report) > schema.get("maxItems", len(report)):
            raise ValueError(f"{path}: {len(report)} items, outside [{schema.get('minItems', 0)}, "
                             f"{schema.get('maxItems', '∞')}]")
        if "items" in schema:
            for index, item in enumerate(report):
                validate_report(item, schema["items"], f"{path}[{index}]")


# ---------------------------------------------------------------------------------------- presentation
def _fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}g}"


def format_report(report: dict[str, Any]) -> str:
    """The report as plain-text tables: one per adapter, plus the comparison when there is one."""
    lines: list[str] = []
    for adapter in report["adapters"]:
        rows: list[tuple[str, ...]] = [("module", "r", "‖ΔW‖_F", "σ₁", "eff.rank", "rank@90%", "amplif.")]
        for layer in adapter["layers"]:
            s = layer["singular_values"]
            rows.append((layer["module"], str(layer["r"]), _fmt(layer["frobenius_norm"]), _fmt(s[0] if s else 0.0),
                         f"{layer['effective_rank_entropy']:.2f}", str(layer["energy_rank_90"]),
                         _fmt(layer["amplification"])))
        lines += [f"adapter {adapter['name']}" + (f" ({adapter['source']})" if adapter.get("source") else ""),
                  *_table(rows), ""]
    comparison = report.get("comparison")
    if comparison:
        first, second = comparison["adapters"]
        rows = [("module", "r1", "r2", "φ(1,1)", "mean φ(i,i)", "φ(r1,r2)")]
        for pair in comparison["layers"]:
            phi = pair["phi"]
            diagonal = [phi[i][i] for i in range(min(len(phi), len(phi[0])))]
            rows.append((str(pair["module"]), str(pair["r1"]), str(pair["r2"]), f"{phi[0][0]:.3f}",
                         f"{sum(diagonal) / len(diagonal):.3f}", f"{pair['phi_full']:.3f}"))
        lines += [f"subspace similarity φ: {first} vs {second}", *_table(rows)]
    return "\n".join(lines).rstrip() + "\n"


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    out = ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths,
                                                                                                  strict=True)))
           for row in rows]
    out.insert(1, "  ".join("-" * w for w in widths))
    return out


def plot_report(report: dict[str, Any], out_dir: str | Path, dpi: int = 100) -> list[Path]:
    """Write PNGs: ``spectrum_<adapter>.png`` (σ per layer), ``amplification_<adapter>.png`` (bars), and
    for a comparison ``phi_<a>_vs_<b>.png`` (a φ heatmap per shared layer) and
    ``layer_similarity_<a>_vs_<b>.png``. Returns the paths written.

    matplotlib is imported here (it is an optional dependency) and drawn with the Agg canvas directly, so
    no GUI backend is touched and pyplot's global state is left alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def save(fig: Figure, name: str) -> None:
        FigureCanvasAgg(fig)
        path = out / name
        fig.savefig(path, dpi=dpi)
        written.append(path)

    for adapter in report["adapters"]:
        name, layers = adapter["name"], adapter["layers"]
        fig = Figure(figsize=(8, 5))
        ax = fig.add_subplot()
        colors = _colors(len(layers))
        for layer, color in zip(layers, colors, strict=True):
            s = [max(v, 1e-30) for v in layer["singular_values"]]
            ax.plot(range(1, len(s) + 1), s, marker=".", color=color,
                    label=layer["module"] if len(layers) <= 12 else None)
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("index i")
        ax.set_ylabel("σᵢ of ΔW")
        ax.set_title(f"{name}: singular values of ΔW per layer ({len(layers)} layers)")
        if 0 < len(layers) <= 12:
            ax.legend(fontsize=6)
        fig.tight_layout()
        save(fig, f"spectrum_{name}.png")

        fig = Figure(figsize=(8, max(3.0, 0.22 * len(layers) + 1.5)))
        ax = fig.add_subplot()
        values = [layer["amplification"] or 0.0 for layer in layers]
        ax.barh(range(len(layers)), values, color="tab:blue")
        ax.set_yticks(range(len(layers)), [layer["module"] for layer in layers], fontsize=6)
        ax.invert_yaxis()
        ax.set_xlabel("amplification ‖ΔW‖_F / ‖Uᵀ W₀ V‖_F")
        ax.set_title(f"{name}: amplification factor per layer (§7.3)")
        fig.tight_layout()
        save(fig, f"amplification_{name}.png")

    comparison = report.get("comparison")
    if comparison:
        first, second = comparison["adapters"]
        pairs = comparison["layers"]
        if pairs:
            cols = min(len(pairs), 6)
            rows = math.ceil(len(pairs) / cols)
            fig = Figure(figsize=(2.4 * cols + 1, 2.4 * rows + 0.6))
            image = None
            for index, pair in enumerate(pairs):
                ax = fig.add_subplot(rows, cols, index + 1)
                image = ax.imshow(pair["phi"], vmin=0, vmax=1, cmap="viridis", origin="upper", aspect="auto",
                                  extent=(0.5, pair["r2"] + 0.5, pair["r1"] + 0.5, 0.5))
                ax.set_title(pair["module"], fontsize=6)
                ax.set_xlabel(f"j ({second})", fontsize=6)
                ax.set_ylabel(f"i ({first})", fontsize=6)
                ax.tick_params(labelsize=5)
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            if image is not None:
                fig.colorbar(image, ax=fig.axes, shrink=0.8, label="φ(i, j)")
            fig.suptitle(f"subspace similarity φ: {first} vs {second}", fontsize=9)
            save(fig, f"phi_{first}_vs_{second}.png")
        similarity = comparison["layer_similarity"]
        if similarity["values"]:
            n1, n2 = len(similarity["modules_1"]), len(similarity["modules_2"])
            fig = Figure(figsize=(max(4.0, 0.25 * n2 + 3), max(3.5, 0.25 * n1 + 2)))
            ax = fig.add_subplot()
            grid = [[math.nan if v is None else v for v in row] for row in similarity["values"]]
            image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            ax.set_xticks(range(n2), similarity["modules_2"], rotation=90, fontsize=5)
            ax.set_yticks(range(n1), similarity["modules_1"], fontsize=5)
            ax.set_xlabel(second)
            ax.set_ylabel(first)
            fig.colorbar(image, ax=ax, label="φ at full ranks")
            ax.set_title("layer-to-layer subspace similarity", fontsize=9)
            fig.tight_layout()
            save(fig, f"layer_similarity_{first}_vs_{second}.png")
    return written


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(i / max(n - 1, 1)) for i in range(n)]
