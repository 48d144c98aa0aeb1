"""The hot path: a fused autograd function for LoRA on Linear-like layers, and the mixed-batch kernels.

Fused LoRA (``lora_linear``), for y = x·W0ᵀ + b + Σ_j s_j·B_j·A_j·dropout_j(x) with x flattened to (N, k):

    forward   out = addmm(b, x, W0ᵀ)                      (N, d)   the base layer's own matmul
              h_j = (x ⊙ m_j)·A_jᵀ                         (N, r)   m_j: dropout mask / keep, or 1
              out.addmm_(h_j, B_jᵀ, alpha=s_j)            in place: no (N, d) temporary, no B·A
    backward  gB_j = g·B_j                                 (N, r)
              ∂A_j = s_j·gB_jᵀ·(x ⊙ m_j),  ∂B_j = s_j·gᵀ·h_j
              ∂x = g·W0 + Σ_j s_j·(gB_j·A_j) ⊙ m_j

Saved for backward: x itself (the input tensor object, so q/k/v siblings reading the same x share one
saved copy), the (N, r) products h_j, and an integer seed per dropout adapter. The dropout mask is not
saved: it is drawn from a private generator seeded with that integer and drawn again in backward (same
shape, device and seed give the same mask), so dropout adds no saved activation at all, where the
straightforward version saves a dropped copy of x and a mask per adapter (REFERENCE.md's cost model).
The 1/keep of inverted dropout is folded into s_j.

Mixed batches (``gathered_lora_linear``, ``gathered_lora_embedding``): with every adapter of a layer
stacked once into A (S, r_max, k) and Bᵀ (S, r_max, d) (scale folded in, zero-padded to the largest rank;
the last slot all zeros for rows without an adapter), row i uses slot idx[i]: one ``index_select`` per
factor and one ``bmm``/``baddbmm_`` each (BGMV, punica/S-LoRA), whatever the number of adapters.

Where the fused function is not used (the layer falls back to the plain autograd ``lora_output`` path,
see ``fused_applies``): under autocast; when x's dtype differs from the base weight's; when the base
layer has hooks or is not a plain ``nn.Linear``/GPT-2 ``Conv1D``; with extra forward arguments; and while
``torch.compile`` traces a layer whose dropout is active (the compiler handles dropout itself). Inputs
in bf16/fp16 with fp32 adapters *are* fused: the LoRA branch runs in the adapters' dtype and is added
into the base output with one promoting ``add_``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module_globals

_FUSED_ENABLED = True


def fused_enabled() -> bool:
    """Whether LoRA layers use the fused function where it applies (default True)."""
    return _FUSED_ENABLED


@contextlib.contextmanager
def use_fused(enabled: bool) -> Iterator[None]:
    """Turn the fused path on or off inside a block (tests compare both; benchmarks time both)."""
    global _FUSED_ENABLED
    previous, _FUSED_ENABLED = _FUSED_ENABLED, bool(enabled)
    try:
        yield
    finally:
        _FUSED_ENABLED = previous


def has_hooks(module: nn.Module) -> bool:
    """True if calling ``module`` would run hooks (its own or global) or a patched ``forward``, which the
    fused path, computing the base matmul itself, would skip."""
    return bool(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
        or module._backward_pre_hooks or "forward" in module.__dict__
        or _module_globals._global_forward_hooks or _module_globals._global_forward_pre_hooks
        or _module_globals._global_backward_hooks or _module_globals._global_backward_pre_hooks
    )


def draw_seed() -> int:
    """A dropout seed drawn from torch's global CPU generator (so ``torch.manual_seed`` reproduces it)."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64).item())


def dropout_mask(like: torch.Tensor, keep: float, seed: int | None) -> torch.Tensor:
    """Boolean mask shaped like ``like``, each element True with probability ``keep``; deterministic given
    ``seed`` (``None``: torch's global generator, for inference where nothing is redrawn).

    Drawn as 31 random bits per element compared with round(keep·2³¹): ``random_`` on int64 words is
    several times faster on the CPU than ``bernoulli_``, which matters because backward draws it again.
    """
    numel = like.numel()
    words = torch.empty((numel + 1) // 2, dtype=torch.int64, device=like.device)
    if seed is None:
        words.random_()
    else:
        generator = torch.Generator(device=like.device)
        generator.manual_seed(seed)
        words.random_(generator=generator)
    bits = words.view(torch.int32)[:numel].view(like.shape) & 0x7FFFFFFF  # uniform on [0, 2³¹)
    return bits < round(keep * 2**31)


def _lora_forward(
    x2d: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    fan_in_fan_out: bool,
    factors: Sequence[torch.Tensor],
    scales: Sequence[float],
    keeps: Sequence[float],
    seeds: Sequence[int | None],
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """out (N, d) = base(x2d) + Σ_j s_j/keep_j·((x2d ⊙ m_j)·A_jᵀ)·B_jᵀ, and the h_j (N, r) for backward."""
    w = weight if fan_in_fan_out else weight.t()  # (k, d) either way
    out = torch.mm(x2d, w) if bias is None else torch.addmm(bias, x2d, w)
    hs: list[torch.Tensor] = []
    cast: dict[torch.dtype, torch.Tensor] = {}
    for j in range(len(scales)):
        a, b = factors[2 * j], factors[2 * j + 1]
        xc = x2d if x2d.dtype == a.dtype else _cast(cast, x2d, a.dtype)
        if keeps[j] < 1.0:
            xc = torch.where(dropout_mask(xc, keeps[j], seeds[j]), xc, 0.0)
        h = torch.mm(a, xc.t()).t()  # (N, r), computed as (A·xᵀ)ᵀ: see _SKINNY
        scale = scales[j] / keeps[j]
        if out.dtype == b.dtype:
            out.addmm_(h, b.t(), alpha=scale)
        else:  # bf16/fp16 base, fp32 adapter: compute in fp32, one promoting in-place add
            out.add_(torch.mm(h, b.t()), alpha=scale)
        hs.append(h)
    return out, hs


# _SKINNY: the LoRA matmuls have one dimension r (≈ 8). MKL's CPU kernels are several times slower for
# some operand layouts of such skinny products than for their transposes (measured on 1024×2304 by 2304×8:
# g·B 3.6–4.3 ms vs (Bᵀ·gᵀ)ᵀ 1.5–2.2 ms; gᵀ·h 11 ms vs (hᵀ·g)ᵀ 1.8 ms), so each product below is
# written in the orientation that keeps the long dimension contiguous. PEFT's nn.Linear backward takes
# the slow ones.


def _cast(cache: dict[torch.dtype, torch.Tensor], t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, computed once per dtype (several adapters may share a cast)."""
    if dtype not in cache:
        cache[dtype] = t.to(dtype)
    return cache[dtype]


class FusedLoraLinear(torch.autograd.Function):
    """Autograd of ``_lora_forward``; see the module docstring for the math and what is saved."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        fan_in_fan_out: bool,
        scales: tuple[float, ...],
        keeps: tuple[float, ...],
        seeds: tuple[int | None, ...],
        *factors: torch.Tensor,
    ) -> torch.Tensor:
        out, hs = _lora_forward(x.reshape(-1, x.shape[-1]), weight, bias, fan_in_fan_out, factors, scales,
                                keeps, seeds)
        # x is saved as the input object itself (never a reshaped or cast copy): siblings share it.
        ctx.save_for_backward(x, weight, bias, *factors, *hs)
        ctx.lora = (fan_in_fan_out, scales, keeps, seeds)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        fan_in_fan_out, scales, keeps, seeds = ctx.lora
        x, weight, bias, *rest = ctx.saved_tensors
        n = len(scales)
        factors, hs = rest[: 2 * n], rest[2 * n:]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_factor = ctx.needs_input_grad[7:]
        x2d = x.reshape(-1, x.shape[-1])
        g = grad_out

        grad_x = grad_w = grad_b = None
        if need_x:
            grad_x = torch.mm(g, weight.t() if fan_in_fan_out else weight)  # (N, k)
        if need_w:
            grad_w = torch.mm(x2d.t(), g) if fan_in_fan_out else torch.mm(g.t(), x2d)
        if need_b and bias is not None:
            grad_b = g.sum(0)

        grad_factors: list[torch.Tensor | None] = []
        cast_x: dict[torch.dtype, torch.Tensor] = {}
        cast_g: dict[torch.dtype, torch.Tensor] = {}
        for j in range(n):
            a, b, h = factors[2 * j], factors[2 * j + 1], hs[j]
            need_a, need_bb = need_factor[2 * j], need_factor[2 * j + 1]
            scale = scales[j] / keeps[j]
            gc = g if g.dtype == b.dtype else _cast(cast_g, g, b.dtype)
            g_h = torch.mm(b.t(), gc.t()).t()  # (N, r) = g·B, the gradient w.r.t. h_j before the scale
            mask = None
            if keeps[j] < 1.0 and (need_a or need_x):
                mask = dropout_mask(x2d, keeps[j], seeds[j])  # the forward's mask, drawn again
            grad_a = grad_b_j = None
            if need_a:
                xc = x2d if x2d.dtype == a.dtype else _cast(cast_x, x2d, a.dtype)
                dropped = xc if mask is None else torch.where(mask, xc, 0.0)
                grad_a = torch.mm(g_h.t(), dropped).mul_(scale)  # (r, k)
            if need_bb:
                grad_b_j = torch.mm(h.t(), gc).t().mul_(scale)  # (d, r) = gᵀ·h
            if grad_x is not None:
                if mask is None and grad_x.dtype == a.dtype:
                    grad_x.addmm_(g_h, a, alpha=scale)
                elif mask is None:
                    grad_x.add_(torch.mm(g_h, a), alpha=scale)
                else:
                    grad_x.add_(torch.mm(g_h, a).mul_(mask), alpha=scale)
            grad_factors += [grad_a, grad_b_j]

        if grad_x is not None:
            grad_x = grad_x.view(x.shape)
        return (grad_x, grad_w, grad_b, None, None, None, None, *grad_factors)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    fan_in_fan_out: bool,
    adapters: Sequence[tuple[torch.Tensor, torch.Tensor, float, float]],
) -> torch.Tensor:
    """y = base(x) + Σ s·B·A·dropout(x) for a Linear-like base, fused (see the module docstring).

    Args:
        x: input (..., k).
        weight: base weight, (d, k) for ``nn.Linear`` or (k, d) for GPT-2 ``Conv1D`` (``fan_in_fan_out``).
        bias: base bias (d,) or None.
        adapters: per active adapter (A (r, k), B (d, r), scale s, dropout probability p in force now:
            0 outside training).

    Returns:
        y (..., d) in x's dtype.
    """
    scales = tuple(s for _, _, s, _ in adapters)
    keeps = tuple(1.0 - p for _, _, _, p in adapters)
    factors = [t for a, b, _, _ in adapters for t in (a, b)]
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
        or any(t.requires_grad for t in factors)
    )
    if needs_grad:
        seeds = tuple(draw_seed() if keep < 1.0 else None for keep in keeps)
        out = FusedLoraLinear.apply(x, weight, bias, fan_in_fan_out, scales, keeps, seeds, *factors)
    else:  # inference: no autograd node, nothing saved, masks (if any) from the global generator
        out, _ = _lora_forward(x.reshape(-1, x.shape[-1]), weight, bias, fan_in_fan_out, factors, scales,
                               keeps, (None,) * len(keeps))
    return out.view(*x.shape[:-1], out.shape[-1])


# ---------------------------------------------------------------------------------------------- mixed
def gathered_lora_linear(
    x: torch.Tensor, result: torch.Tensor, a_stack: torch.Tensor, bt_stack: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """result (N, ..., d) + per row i: ((x_i·A[rows_i]ᵀ)·Bᵀ[rows_i]) (BGMV), scale already in ``bt_stack``.

    Args:
        x: (N, ..., k) input; a_stack: (S, r, k); bt_stack: (S, r, d) = s·Bᵀ; rows: (N,) slot per row.
    Returns:
        ``result`` with the LoRA branch added: in place when no gradient is needed and dtypes match.
    """
    n, k, d = x.shape[0], x.shape[-1], result.shape[-1]
    xs = x.reshape(n, -1, k)
    if xs.dtype != a_stack.dtype:
        xs = xs.to(a_stack.dtype)
    h = torch.bmm(xs, a_stack.index_select(0, rows).transpose(1, 2))  # (N, T, r)
    bt_rows = bt_stack.index_select(0, rows)  # (N, r, d)
    return _add_batched(result, h, bt_rows, n, d)


def gathered_lora_embedding(
    ids: torch.Tensor, result: torch.Tensor, a_table: torch.Tensor, bt_stack: torch.Tensor,
    rows: torch.Tensor, vocab: int,
) -> torch.Tensor:
    """result (N, ..., d) + per row i: Aᵀ[rows_i][ids_i]·Bᵀ[rows_i], one lookup in the stacked table.

    Args:
        ids: (N, ...) token ids; a_table: (S·vocab, r), slot s's Aᵀ at rows [s·vocab, (s+1)·vocab);
        bt_stack: (S, r, d) = s·Bᵀ; rows: (N,) slot per row.
    """
    n, d = ids.shape[0], result.shape[-1]
    flat = ids.reshape(n, -1) + (rows * vocab).unsqueeze(1)
    h = F.embedding(flat, a_table)  # (N, T, r)
    return _add_batched(result, h, bt_stack.index_select(0, rows), n, d)


def _add_batched(result: torch.Tensor, h: torch.Tensor, bt_rows: torch.Tensor, n: int, d: int) -> torch.Tensor:
    if (not torch.is_grad_enabled() and result.dtype == h.dtype and result.is_contiguous()):
        result.view(n, -1, d).baddbmm_(h, bt_rows)
        return result
    return result + torch.bmm(h, bt_rows).view(result.shape).to(result.dtype)
