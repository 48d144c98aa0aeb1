"""Adapter arithmetic: combine adapters, resize them, and extract one from a full fine-tune.

Everything works on the update each adapter makes to a layer, written in *factor orientation*:
the d×k matrix M = s·B·A with A (r×k) and B (d×r) flattened from their stored shapes (a Conv's A is
(r, C_in, kh, kw) → (r, C_in·kh·kw); an Embedding's ΔW is Mᵀ). Every new adapter is written as
B = U_k·diag(σ_k), A = V_kᵀ with scaling 1 (lora_alpha = r, PEFT's convention), so its A has orthonormal
rows. When layers get different ranks, the config carries ``rank_pattern``/``alpha_pattern``.

All three operations validate and compute everything first, then add one new adapter: a failed call
leaves the model as it was.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import LoraConfig
from .inject import plan_injection
from .layers import LoraLayer, is_gpt2_conv1d, layer_class_for
from .layers.conv import Conv
from .layers.embedding import Embedding
from .layers.modules_to_save import ModulesToSaveWrapper
from .model import PeftModel, get_peft_model, validate_adapter_name

COMBINATION_TYPES = (
    "svd", "linear", "cat", "ties", "ties_svd", "dare_linear", "dare_linear_svd", "dare_ties", "dare_ties_svd",
    "magnitude_prune", "magnitude_prune_svd",
)
"""Values of ``combination_type`` (PEFT's names and meanings)."""

_SAME_RANK_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_NEEDS_DENSITY = ("ties", "ties_svd", "dare_linear", "dare_linear_svd", "dare_ties", "dare_ties_svd",
                  "magnitude_prune", "magnitude_prune_svd")

Factors = tuple[torch.Tensor, torch.Tensor]  # (A (k, K), B (d, k)) in factor orientation, scaling 1


@dataclass
class LayerRankReport:
    """How well a re-factored layer keeps its update ΔW (resize and extract report one per layer)."""

    module: str
    """Module path inside the wrapped model, e.g. ``transformer.h.0.attn.c_attn``."""
    original_rank: int
    """Rank of the source: the adapter's r (resize) or min(d, k) of the dense ΔW (extract)."""
    new_rank: int
    """Rank kept in the new adapter."""
    retained_energy: float
    """Σ kept σᵢ² / Σ σᵢ² (1.0 when ΔW = 0)."""
    relative_error: float
    """‖ΔW − ΔW_new‖_F / ‖ΔW‖_F, measured on the new factors (0.0 when ΔW = 0)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Extraction:
    """Result of ``extract_adapter``: the wrapped base model, the per-layer report, and what LoRA missed."""

    model: PeftModel
    layers: list[LayerRankReport]
    uncaptured: list[str]
    """Parameters that differ between the two models but are not adapted (biases, norms, other modules)."""


# ---------------------------------------------------------------------------------------- factor helpers
def _flat_factors(layer: LoraLayer, name: str) -> Factors:
    """(A (r, K), B (d, r)) of an adapter, flattened, in float64, without the scaling."""
    a, b = layer.factors(name)
    return a.detach().reshape(a.shape[0], -1).double(), b.detach().reshape(b.shape[0], -1).double()


def _to_factor_orientation(kind: type[LoraLayer] | None, module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like ``module.weight`` as the d×K matrix that B·A represents."""
    if kind is not None and issubclass(kind, Embedding):
        return weight.t()                       # (vocab, dim) → (dim, vocab)
    if kind is not None and issubclass(kind, Conv):
        return weight.flatten(1)                # (C_out, C_in, k…) → (C_out, C_in·k…)
    if is_gpt2_conv1d(module):
        return weight.t()                       # Conv1D stores (in, out)
    return weight


def lowrank_svd(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of B·A (d×K) without forming it: QR both factors, SVD the small core.

    B = Q_B·R_B and Aᵀ = Q_A·R_A give B·A = Q_B·(R_B·R_Aᵀ)·Q_Aᵀ; the core is at most r×r.
    Returns U (d, m), σ (m,) descending, Vᵀ (m, K) with m = min(d, K, r).
    """
    q_b, r_b = torch.linalg.qr(b)
    q_a, r_a = torch.linalg.qr(a.t())
    u, s, vh = torch.linalg.svd(r_b @ r_a.t(), full_matrices=False)
    return q_b @ u, s, vh @ q_a.t()


def _truncate(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int) -> Factors:
    """Best rank-k factors (A = V_kᵀ, B = U_k·diag(σ_k)); zero-padded when k exceeds len(σ)."""
    a, b = vh[:k], u[:, :k] * s[:k]
    if k > s.numel():
        a = torch.cat([a, a.new_zeros(k - a.shape[0], a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], k - b.shape[1])], dim=1)
    return a, b


def choose_rank(singular_values: torch.Tensor, rank: int | None, energy: float | None, max_rank: int) -> int:
    """Rank to keep: ``rank`` (capped at ``max_rank``), or the smallest k with Σ_{i≤k} σᵢ²/Σ σᵢ² ≥ ``energy``
    (at least 1; capped at ``rank`` when both are given)."""
    k = max_rank if rank is None else min(rank, max_rank)
    if energy is not None:
        power = singular_values.double() ** 2
        total = float(power.sum())
        if total > 0:
            cumulative = (power.cumsum(0) / total).tolist()
            needed = next((i + 1 for i, c in enumerate(cumulative) if c >= energy - 1e-12), len(cumulative))
            k = min(k, needed)
        else:
            k = 1
    return max(k, 1)


def _energy(s: torch.Tensor, k: int) -> float:
    total = float((s**2).sum())
    return float((s[:k] ** 2).sum()) / total if total > 0 else 1.0


def _relative_error(b: torch.Tensor, a: torch.Tensor, b_new: torch.Tensor, a_new: torch.Tensor) -> float:
    """‖B·A − B'·A'‖_F / ‖B·A‖_F from the factors: ‖X−Y‖² = ‖X‖² + ‖Y‖² − 2⟨X, Y⟩, ⟨BA, B'A'⟩ = tr(BᵀB'·A'Aᵀ)."""
    x2 = float(((b.t() @ b) * (a @ a.t())).sum())
    y2 = float(((b_new.t() @ b_new) * (a_new @ a_new.t())).sum())
    xy = float(((b.t() @ b_new) * (a @ a_new.t())).sum())
    if x2 <= 0:
        return 0.0 if y2 <= 0 else math.inf
    return math.sqrt(max(x2 + y2 - 2 * xy, 0.0) / x2)


def _check_rank_args(rank: int | None, energy: float | None) -> None:
    if rank is None and energy is None:
        raise ValueError("give a target rank (rank=8) or an energy fraction (energy=0.9), or both (energy capped "
                         "at rank).")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise ValueError(f"rank={rank!r} is invalid: use a positive integer.")
    if energy is not None and (isinstance(energy, bool) or not isinstance(energy, (int, float))
                               or not 0 < energy <= 1):
        raise ValueError(f"energy={energy!r} is invalid: use a fraction in (0, 1], e.g. 0.9.")


def _lora_layers(model: PeftModel, adapter_name: str | None = None) -> list[tuple[str, LoraLayer]]:
    return [(n, m) for n, m in model.get_base_model().named_modules()
            if isinstance(m, LoraLayer) and (adapter_name is None or adapter_name in m.r)]


# ---------------------------------------------------------------------------------------- new adapters
def _config_for_ranks(template: LoraConfig, ranks: dict[str, int], **overrides: Any) -> LoraConfig:
    """A config adapting exactly ``ranks``' modules, scaling 1 everywhere (lora_alpha = r per layer)."""
    counts = Counter(ranks.values())
    r = max(counts, key=lambda v: (counts[v], v))  # the most common rank; the rest go to rank_pattern
    pattern = {name: k for name, k in sorted(ranks.items()) if k != r}
    fields: dict[str, Any] = dict(r=r, lora_alpha=r, target_modules=sorted(ranks), rank_pattern=pattern, alpha_pattern=dict(pattern),
                  use_rslora=False, exclude_modules=None, layers_to_transform=None, layers_pattern=None,
                  init_lora_weights=True, lora_dropout=template.lora_dropout)
    fields.update(overrides)
    return dataclasses.replace(template, **fields)


def _write_factors(model: nn.Module, adapter_name: str, factors: dict[str, Factors]) -> None:
    with torch.no_grad():
        for name, (a_new, b_new) in factors.items():
            layer = model.get_submodule(name)
            assert isinstance(layer, LoraLayer)  # factors were computed from this very layer
            a, b = layer.factors(adapter_name)
            a.copy_(a_new.reshape(a.shape))
            b.copy_(b_new.reshape(b.shape))


def _plan_modules_to_save(model: PeftModel, sources: Sequence[str]) -> dict[str, str]:
    """Wrapper path → the one source adapter whose trained copy the new adapter takes over."""
    plan: dict[str, str] = {}
    for path, module in model.get_base_model().named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            owners = [s for s in sources if s in module.modules_to_save]
            if len(owners) > 1:
                raise ValueError(f"adapters {owners} each train their own copy of {path!r} (modules_to_save); "
                                 "full modules cannot be combined — combine adapters without modules_to_save.")
            if owners:
                plan[path] = owners[0]
    return plan


def _add_adapter_with_factors(model: PeftModel, adapter_name: str, config: LoraConfig,
                              factors: dict[str, Factors], copies: dict[str, str]) -> None:
    model.add_adapter(adapter_name, config)
    base = model.get_base_model()
    _write_factors(base, adapter_name, factors)
    with torch.no_grad():
        for path, source in copies.items():
            wrapper = base.get_submodule(path)
            assert isinstance(wrapper, ModulesToSaveWrapper)  # found as one by _plan_modules_to_save
            wrapper.modules_to_save[adapter_name].load_state_dict(wrapper.modules_to_save[source].state_dict())


# ---------------------------------------------------------------------------------------- merge rules
def _magnitude_prune(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density·numel) entries of largest |value|, zero the rest."""
    keep = int(density * t.numel())
    mask = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    mask[torch.topk(t.abs().flatten(), k=keep).indices] = 1
    return t * mask.view_as(t)


def _random_prune(t: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` and rescale the survivors by 1/density."""
    mask = torch.bernoulli(torch.full(t.shape, density, dtype=torch.float64), generator=generator)
    return t * mask.to(t) / density if density > 0 else t * 0


def _disjoint_merge(stacked: torch.Tensor, weights: torch.Tensor, method: str) -> torch.Tensor:
    """TIES: elect a sign per entry (from Σ values, or Σ signs for "frequency"), then average the weighted
    entries that agree with it (entries pruned to 0 never agree)."""
    signs = stacked.sign()
    votes = stacked.sum(0) if method == "total" else signs.sum(0)
    agree = signs == torch.where(votes >= 0, 1.0, -1.0).to(stacked)
    weighted = stacked * weights.view(-1, *[1] * (stacked.dim() - 1))
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def _merge_rule(kind: str, density: float | None, majority_sign_method: str,
                generator: torch.Generator | None) -> Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor]:
    """The task-arithmetic rule f(tensors, weights) named by ``kind`` (``_svd`` suffix stripped)."""
    base = kind.removesuffix("_svd")
    d = 1.0 if density is None else density

    def rule(tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
        w = weights.view(-1, *[1] * tensors[0].dim())
        if base in ("linear", "svd"):
            return (torch.stack(tensors) * w).sum(0)
        if base == "magnitude_prune":
            return (torch.stack([_magnitude_prune(t, d) for t in tensors]) * w).sum(0)
        if base == "ties":
            return _disjoint_merge(torch.stack([_magnitude_prune(t, d) for t in tensors]), weights,
                                   majority_sign_method)
        pruned = torch.stack([_random_prune(t, d, generator) for t in tensors])
        if base == "dare_linear":
            return (pruned * w).sum(0)
        return _disjoint_merge(pruned, weights, majority_sign_method)  # dare_ties

    return rule


# ---------------------------------------------------------------------------------------- combine
def add_weighted_adapter(
    model: PeftModel,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    seed: int | None = None,
) -> None:
    """Add adapter ``adapter_name`` combining ``adapters`` with ``weights`` (PEFT's method and semantics).

    With ΔWᵢ = sᵢ·Bᵢ·Aᵢ per layer (only the adapters present in that layer take part):

    - ``cat``: A = [w₁s₁A₁; …], B = [B₁ … Bₙ] — exactly Σ wᵢ·ΔWᵢ, rank Σ rᵢ.
    - ``svd``: Σ wᵢ·ΔWᵢ truncated to ``svd_rank`` (default: the largest source rank) by SVD — the best
      approximation of that rank (Eckart–Young); at rank Σ rᵢ it equals ``cat``.
    - ``linear``: A = Σ ±√|wᵢsᵢ|·Aᵢ, B = Σ √|wᵢsᵢ|·Bᵢ (sign on A only); needs equal ranks. Cheap but not
      Σ wᵢΔWᵢ: the cross terms Bᵢ·Aⱼ remain.
    - ``ties``/``dare_linear``/``dare_ties``/``magnitude_prune``: the same factor-wise weights, with A's and
      B's stacked separately pruned (by magnitude, or at random with 1/density rescaling for DARE) and, for
      TIES, sign-elected and averaged over agreeing entries. ``<type>_svd`` applies the rule to the dense
      ΔWᵢ (weights wᵢ) and re-factors the result at ``svd_rank``.

    The new adapter has scaling 1 (lora_alpha = r), is inactive (call ``set_adapter``), and targets exactly
    the union of the sources' modules, with ``rank_pattern`` where layer ranks differ.

    Args:
        model: the PeftModel holding the adapters.
        adapters: names of the adapters to combine (at least one).
        weights: one finite weight per adapter; negative weights subtract.
        adapter_name: name of the new adapter (must not exist).
        combination_type: one of ``COMBINATION_TYPES``.
        svd_rank: rank of the ``*svd`` results (capped per layer at min(d, k)).
        svd_clamp: if set, clamp the new factors' entries to the ±``svd_clamp`` quantile (PEFT's option).
        density: fraction of entries kept by the pruning rules, in [0, 1]; required for them.
        majority_sign_method: "total" (sign of Σ values) or "frequency" (sign of Σ signs), for TIES rules.
        seed: seeds DARE's random masks (None: torch's global generator).

    Raises:
        ValueError: unknown adapter or type, existing/invalid ``adapter_name``, mismatched weights, missing
            density, unequal ranks for the factor-wise rules, or modules_to_save claimed by two adapters.
    """
    validate_adapter_name(adapter_name)
    if adapter_name in model.peft_config:
        raise ValueError(f"an adapter named {adapter_name!r} already exists; choose a new name for the result.")
    adapters = list(adapters)
    if not adapters:
        raise ValueError("adapters is empty; name at least one adapter to combine.")
    for name in adapters:
        model._require_adapter(name)
    if len(set(adapters)) != len(adapters):
        raise ValueError(f"adapters={adapters} names an adapter twice; give each once with its total weight.")
    _refuse_dora(model, adapters, "combined")
    weights = [float(w) for w in weights]
    if len(weights) != len(adapters) or not all(math.isfinite(w) for w in weights):
        raise ValueError(f"weights={weights} must be {len(adapters)} finite numbers, one per adapter in {adapters}.")
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"combination_type={combination_type!r} is invalid; use one of {', '.join(COMBINATION_TYPES)}.")
    if combination_type in _NEEDS_DENSITY and (density is None or not 0 <= density <= 1):
        raise ValueError(f"combination_type={combination_type!r} needs density in [0, 1] (fraction of entries "
                         f"kept), got density={density!r}.")
    if majority_sign_method not in ("total", "frequency"):
        raise ValueError(f"majority_sign_method={majority_sign_method!r} is invalid; use 'total' or 'frequency'.")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank <= 0):
        raise ValueError(f"svd_rank={svd_rank!r} is invalid: use a positive integer or None.")
    if svd_clamp is not None and not 0 < svd_clamp <= 1:
        raise ValueError(f"svd_clamp={svd_clamp!r} is invalid: use a quantile in (0, 1].")

    layers = [(n, m) for n, m in _lora_layers(model) if any(a in m.r for a in adapters)]
    default_svd_rank = max(m.r[a] for _, m in layers for a in adapters if a in m.r)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    rule = _merge_rule(combination_type, density, majority_sign_method, generator)
    factors: dict[str, Factors] = {}
    for path, layer in layers:
        present = [(a, w) for a, w in zip(adapters, weights, strict=True) if a in layer.r]
        flat = [_flat_factors(layer, a) for a, _ in present]
        scaled = [w * layer.scaling[a] for a, w in present]
        if combination_type == "cat":
            factors[path] = (torch.cat([ws * a for ws, (a, _) in zip(scaled, flat, strict=True)]),
                             torch.cat([b for _, b in flat], dim=1))
        elif combination_type in _SAME_RANK_TYPES:
            ranks = {a: layer.r[a] for a, _ in present}
            if len(set(ranks.values())) > 1:
                raise ValueError(f"combination_type={combination_type!r} needs equal ranks, but {path!r} has "
                                 f"{ranks}; use 'cat' or 'svd' for adapters of different ranks.")
            root = torch.tensor([math.sqrt(abs(x)) for x in scaled], dtype=torch.float64)
            sign = torch.tensor([1.0 if x >= 0 else -1.0 for x in scaled], dtype=torch.float64)
            factors[path] = (rule([a for a, _ in flat], root * sign), rule([b for _, b in flat], root))
        else:
            b_all = torch.cat([ws * b for ws, (_, b) in zip(scaled, flat, strict=True)], dim=1)
            a_all = torch.cat([a for a, _ in flat])
            if combination_type == "svd":
                u, s, vh = lowrank_svd(b_all, a_all)  # Σ wᵢsᵢBᵢAᵢ = [w₁s₁B₁ …]·[A₁; …]
            else:
                deltas = [layer.scaling[name] * (b @ a) for (name, _), (a, b) in zip(present, flat, strict=True)]
                merged = rule(deltas, torch.tensor([w for _, w in present], dtype=torch.float64))
                u, s, vh = torch.linalg.svd(merged, full_matrices=False)
            k = min(svd_rank or default_svd_rank, b_all.shape[0], a_all.shape[1])
            a_new, b_new = _truncate(u, s, vh, k)
            if svd_clamp is not None:
                high = torch.quantile(torch.cat([b_new.flatten(), a_new.flatten()]).float(), svd_clamp).item()
                a_new, b_new = a_new.clamp(-high, high), b_new.clamp(-high, high)
            factors[path] = (a_new, b_new)

    copies = _plan_modules_to_save(model, adapters)
    template = model.peft_config[adapters[0]]
    saved = sorted({m for a in adapters for m in (model.peft_config[a].modules_to_save or [])}) or None
    config = _config_for_ranks(template, {p: f[0].shape[0] for p, f in factors.items()}, modules_to_save=saved)
    _add_adapter_with_factors(model, adapter_name, config, factors, copies)


def _refuse_dora(model: PeftModel, adapters: list[str], verb: str) -> None:
    """DoRA adapters are not s·B·A alone (their magnitudes rescale W0 too): the rules here would drop m."""
    dora = [name for name in adapters if model.peft_config[name].use_dora]
    if dora:
        raise ValueError(f"adapter(s) {dora} are DoRA adapters (use_dora=True), which cannot be {verb}: the rules "
                         "act on ΔW = s·B·A and would drop the magnitudes. Use plain LoRA adapters, or "
                         "merge_and_unload() the DoRA adapter into the base first.")


# ---------------------------------------------------------------------------------------- resize
def resize_adapter(model: PeftModel, adapter_name: str, new_adapter_name: str, *, rank: int | None = None,
                   energy: float | None = None) -> list[LayerRankReport]:
    """Add ``new_adapter_name``: ``adapter_name`` re-factored per layer by SVD to a lower (or any) rank.

    Each layer keeps its best rank-k approximation of ΔW (Eckart–Young: error² = Σ dropped σᵢ²), with
    k = ``rank`` (capped at min(d, K)) or the smallest k keeping ``energy`` of Σ σᵢ² (capped at ``rank`` if
    both are given). The SVD runs on the r×r core of the factors, never on the dense d×K matrix.

    Returns:
        One ``LayerRankReport`` per adapted layer (retained energy and measured relative Frobenius error).

    Raises:
        ValueError: unknown adapter, taken/invalid new name, neither/invalid rank and energy.
    """
    model._require_adapter(adapter_name)
    _refuse_dora(model, [adapter_name], "resized")
    validate_adapter_name(new_adapter_name)
    if new_adapter_name in model.peft_config:
        raise ValueError(f"an adapter named {new_adapter_name!r} already exists; choose a new name.")
    _check_rank_args(rank, energy)
    factors: dict[str, Factors] = {}
    reports: list[LayerRankReport] = []
    for path, layer in _lora_layers(model, adapter_name):
        a, b = _flat_factors(layer, adapter_name)
        b = b * layer.scaling[adapter_name]
        u, s, vh = lowrank_svd(b, a)
        k = choose_rank(s, rank, energy, min(b.shape[0], a.shape[1]))
        a_new, b_new = _truncate(u, s, vh, k)
        factors[path] = (a_new, b_new)
        reports.append(LayerRankReport(path, layer.r[adapter_name], k, _energy(s, k),
                                       _relative_error(b, a, b_new, a_new)))
    copies = _plan_modules_to_save(model, [adapter_name])
    config = _config_for_ranks(model.peft_config[adapter_name], {p: f[0].shape[0] for p, f in factors.items()})
    _add_adapter_with_factors(model, new_adapter_name, config, factors, copies)
    return reports


# ---------------------------------------------------------------------------------------- extract
def extract_adapter(
    base_model: nn.Module,
    finetuned_model: nn.Module,
    target_modules: list[str] | str = "all-linear",
    *,
    rank: int | None = 8,
    energy: float | None = None,
    adapter_name: str = "default",
    task_type: str | None = None,
) -> Extraction:
    """Turn a full fine-tune into a LoRA adapter: per target module, ΔW = W_ft − W_0, truncated by SVD.

    The rank-k truncation is the best rank-k approximation of ΔW, so when ΔW has rank ≤ k the adapter
    reproduces the fine-tuned weights exactly. ``base_model`` is wrapped in place (as ``get_peft_model``
    does) and returned inside the result; ``finetuned_model`` is only read.

    Args:
        base_model, finetuned_model: the same architecture; weights of targeted modules must match in shape.
        target_modules: which modules to extract, matched like ``LoraConfig.target_modules``.
        rank: rank per layer (capped at min(d, K)); with ``energy``, the cap on the energy-chosen rank.
        energy: keep the smallest rank reaching this fraction of Σ σᵢ² per layer.
        adapter_name: name of the extracted adapter.
        task_type: recorded in the adapter's config.

    Raises:
        ValueError: no/invalid rank and energy, targets matching nothing, or a module missing or shaped
            differently in ``finetuned_model``.
    """
    _check_rank_args(rank, energy)
    validate_adapter_name(adapter_name)
    plans = plan_injection(base_model, LoraConfig(r=1, target_modules=target_modules), adapter_name)
    finetuned = dict(finetuned_model.named_modules())
    problems = [p.name for p in plans if p.name not in finetuned
                or getattr(finetuned[p.name], "weight", None) is None
                or finetuned[p.name].weight.shape != p.module.weight.shape]
    if problems:
        raise ValueError(f"the fine-tuned model lacks, or has differently shaped weights for, {problems[:5]}"
                         f"{' …' if len(problems) > 5 else ''}; both models must share the architecture.")
    factors: dict[str, Factors] = {}
    reports: list[LayerRankReport] = []
    changed: set[str] = set()
    for p in plans:
        kind = layer_class_for(p.module)
        w_ft: torch.Tensor = finetuned[p.name].weight  # type: ignore[assignment]
        w_0: torch.Tensor = p.module.weight  # type: ignore[assignment]
        delta = w_ft.detach().double().to(w_0.device) - w_0.detach().double()
        matrix = _to_factor_orientation(kind, p.module, delta)
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        k = choose_rank(s, rank, energy, s.numel())
        a_new, b_new = _truncate(u, s, vh, k)
        factors[p.name] = (a_new, b_new)
        kept = matrix - b_new @ a_new
        norm = float(torch.linalg.matrix_norm(matrix))
        if norm > 0:
            changed.add(p.name)
        reports.append(LayerRankReport(p.name, s.numel(), k, _energy(s, k),
                                       float(torch.linalg.matrix_norm(kept)) / norm if norm > 0 else 0.0))
    targeted = {p.name for p in plans}
    base_params = dict(base_model.named_parameters())
    uncaptured = [n for n, param in finetuned_model.named_parameters()
                  if n.rsplit(".", 1)[0] not in targeted or not n.endswith("weight")
                  if n in base_params and not torch.equal(param.detach().cpu(), base_params[n].detach().cpu())]
    # A tied weight (GPT-2's wte is also lm_head) changed for both users; the adapter changes only one.
    users: dict[int, list[str]] = {}
    for name, module in base_model.named_modules(remove_duplicate=False):
        if isinstance(getattr(module, "weight", None), torch.Tensor):
            users.setdefault(id(module.weight), []).append(name)
    uncaptured += [f"{other}.weight (tied to {p.name}.weight)" for p in plans if p.name in changed
                   for other in users.get(id(p.module.weight), []) if other not in targeted]
    config = _config_for_ranks(LoraConfig(target_modules=["_"], task_type=task_type),
                               {p: f[0].shape[0] for p, f in factors.items()})
    model = get_peft_model(base_model, config, adapter_name)
    _write_factors(model.get_base_model(), adapter_name, factors)
    return Extraction(model, reports, uncaptured)
