"""The hot path: a fused autograd function for LoRA on Linear-like layers, and the mixed-batch kernels.

Fused LoRA (``lora_linear``), for y = x·W0ᵀ + b + Σ_j s_j·B_j·A_j·dropout_j(x) with x flattened to (N, k):

    forward   out = addmm(b, x, W0ᵀ)                      (N, d)   the base layer's own matmul
              h_j = (x ⊙ m_j)·A_jᵀ                         (N, r)   m_j: keep-mask of dropout p_j, or 1
              out.addmm_(h_j, B_jᵀ, alpha=s_j/(1-p_j))    in place: no (N, d) temporary, never B·A
    backward  g_h = g·B_j                                  (N, r)
              ∂A_j = s'_j·g_hᵀ·(x ⊙ m_j),  ∂B_j = s'_j·gᵀ·h_j
              ∂x = g·W0 + Σ_j s'_j·(g_h·A_j) ⊙ m_j         the LoRA terms are written first and the
                                                           base GEMM accumulates onto them (beta = 1)

Saved for backward: x itself (the input tensor object, so q/k/v siblings reading the same x share one
saved copy), the (N, r) products h_j, and an integer seed per dropout adapter. The dropout mask is not
saved: it is drawn from a private generator seeded with that integer and drawn again in backward, so
dropout adds no saved activation at all, where the straightforward version saves a dropped copy of x and
a mask per adapter (REFERENCE.md's cost model).

Dropout without (N, k) passes (``Dropout``): for p ≤ 0.25 (and N·k ≥ 65536) the dropped elements (about p·N·k of them) are
drawn directly as a Bernoulli process (geometric gaps) and x restricted to them is a sparse CSR matrix D:
h = x·Aᵀ - D·Aᵀ, ∂A = g_hᵀ·x - (Dᵀ·g_h)ᵀ, and ∂x's LoRA term g_h·A is zeroed at the dropped positions
(``index_fill_``; a second adapter's term, added to the first, has its values there subtracted with
``torch.sparse.sampled_addmm``). A dense mask would cost a Bernoulli draw, a multiply and a
masked accumulate over all of (N, k), twice; larger p uses that dense mask.

Mixed batches (``gathered_lora_linear``, ``gathered_lora_embedding``): with every adapter of a layer
stacked once into A (S, r_max, k) and Bᵀ (S, r_max, d) (scale folded in, zero-padded to the largest rank;
the last slot all zeros for rows without an adapter), row i uses slot idx[i]: one ``index_select`` per
factor and one ``bmm``/``baddbmm_`` each (BGMV, punica/S-LoRA), whatever the number of adapters.

Where the fused function is not used (``Linear._fused_forward`` returns None and the layer runs the plain
autograd ``lora_output`` path): under autocast; when x's dtype differs from the base weight's; when the
base layer has hooks or is not a plain ``nn.Linear``/GPT-2 ``Conv1D``; with extra forward arguments; with
a dropout module other than ``nn.Dropout``; and while ``torch.compile`` traces a layer whose dropout is
active (the compiler handles dropout itself). Inputs in bf16/fp16 with fp32 adapters *are* fused: the
LoRA branch runs in the adapters' dtype and is added into the base output with one promoting ``add_``.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

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


SPARSE_DROPOUT_MAX_P = 0.25
SPARSE_DROPOUT_MIN_NUMEL = 1 << 16
"""Up to dropout probability SPARSE_DROPOUT_MAX_P, and for inputs of at least SPARSE_DROPOUT_MIN_NUMEL
elements, the dropped elements are handled as a sparse correction (see ``Dropout``); otherwise as a dense
boolean mask (below that size the sparse form's extra kernel launches cost more than the passes it
saves)."""


class Dropout(NamedTuple):
    """One draw of inverted dropout over an (N, k) input, each element dropped independently with
    probability p.

    Sparse form (p ≤ SPARSE_DROPOUT_MAX_P, large inputs): the dropped elements' flat indices, rows and columns, in
    row-major order, plus the CSR row pointer, so that "x restricted to the dropped elements" is a sparse
    CSR matrix D and every dropout term becomes a sparse one: h = x·Aᵀ - D·Aᵀ, ∂A = g_hᵀ·x - g_hᵀ·D,
    ∂x = g_h·A with the dropped positions zeroed. O(p·N·k) work, where a dense mask costs several full
    passes over (N, k). Dense form: the boolean keep-mask.
    """

    flat: torch.Tensor  # (K,) sorted flat indices i·k + j of the dropped elements (empty in dense form)
    rows: torch.Tensor  # (K,) i
    cols: torch.Tensor  # (K,) j
    crow: torch.Tensor  # (N+1,) CSR row pointer
    keep_mask: torch.Tensor | None = None  # (N, k) bool, dense form only

    @classmethod
    def draw(cls, shape: tuple[int, int], p: float, seed: int | None, device: torch.device) -> Dropout:
        """Deterministic given ``seed`` (``None``: torch's global generator, for inference)."""
        generator = None
        if seed is not None:
            generator = torch.Generator(device=device)
            generator.manual_seed(seed)
        if p > SPARSE_DROPOUT_MAX_P or shape[0] * shape[1] < SPARSE_DROPOUT_MIN_NUMEL:
            none = torch.empty(0, dtype=torch.long, device=device)
            keep = torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(1.0 - p, generator=generator)
            return cls(none, none, none, none, keep)
        flat = _dropped_positions(shape[0] * shape[1], p, generator, device)
        rows = torch.div(flat, shape[1], rounding_mode="floor")
        crow = torch.searchsorted(rows, torch.arange(shape[0] + 1, device=device))
        return cls(flat, rows, flat - rows * shape[1], crow)

    def mask(self, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
        """The dense keep-mask (N, k) of this draw (tests and references; the fused op never needs it)."""
        if self.keep_mask is not None:
            return self.keep_mask
        mask = torch.ones(shape[0] * shape[1], dtype=torch.bool, device=device)
        mask[self.flat] = False
        return mask.view(shape)

    def dropped(self, x2d: torch.Tensor) -> torch.Tensor:
        """D: x's dropped elements as a sparse CSR (N, k) matrix."""
        values = torch.take(x2d, self.flat)  # measured 1.3–2.6× faster than index_select on a flat view
        return _csr(self.crow, self.cols, values, (x2d.shape[0], x2d.shape[1]))

    def transposed(self, d: torch.Tensor) -> torch.Tensor:
        """Dᵀ as a sparse CSR (k, N) matrix, from D (``dropped``): D's values reordered by a stable sort of
        the columns, done on the narrowest integer type that holds them (int16 sorts ~2.7× faster than
        int64), so x is not read again."""
        n, k = d.shape
        narrow = torch.int16 if k <= torch.iinfo(torch.int16).max else torch.int32
        cols, order = torch.sort(self.cols.to(narrow), stable=True)
        ccol = torch.searchsorted(cols, torch.arange(k + 1, dtype=narrow, device=cols.device)).to(self.rows.dtype)
        return _csr(ccol, self.rows.index_select(0, order), d.values().index_select(0, order), (k, n))


def _csr(crow: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": we use its stable core only
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols, values, size=size, check_invariants=False)


def _dropped_positions(numel: int, p: float, generator: torch.Generator | None, device: torch.device,
                       batch: int | None = None) -> torch.Tensor:
    """Sorted flat indices of the dropped elements of a Bernoulli(p) process over ``numel`` elements: the
    gaps between drops are geometric, ⌊log(1-u)/log(1-p)⌋ + 1 for uniform u, so only about p·numel
    numbers are drawn (``uniform_`` + ``log1p_`` are vectorised; ``geometric_``/``bernoulli_`` are not)."""
    if batch is None:  # gaps drawn at once: 8 standard deviations above the expected count
        expected = numel * p
        batch = int(expected + 8.0 * math.sqrt(expected * (1.0 - p)) + 16)
    log_keep = math.log1p(-p)
    chunks: list[torch.Tensor] = []
    last = -1
    while True:
        gaps = torch.empty(batch, device=device).uniform_(generator=generator).neg_().log1p_()
        positions = gaps.div_(log_keep).floor_().add_(1).long().cumsum_(0).add_(last)
        end = int(positions[-1])
        if end >= numel:
            chunks.append(positions[: int(torch.searchsorted(positions, numel))])
            return torch.cat(chunks) if len(chunks) > 1 else chunks[0]
        chunks.append(positions)
        last = end


def dropout_mask(like: torch.Tensor, p: float, seed: int | None) -> torch.Tensor:
    """The keep-mask (shaped like the 2-d ``like``) the fused op applies for dropout ``p`` and ``seed``."""
    shape = (like.shape[0], like.shape[1])
    return Dropout.draw(shape, p, seed, like.device).mask(shape, like.device)


def _lora_forward(
    x2d: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    fan_in_fan_out: bool,
    factors: Sequence[torch.Tensor],
    scales: Sequence[float],
    ps: Sequence[float],
    seeds: Sequence[int | None],
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """out (N, d) = base(x2d) + Σ_j s_j/(1-p_j)·((x2d ⊙ m_j)·A_jᵀ)·B_jᵀ, and the h_j (N, r) for backward."""
    w = weight if fan_in_fan_out else weight.t()  # (k, d) either way
    out = torch.mm(x2d, w) if bias is None else torch.addmm(bias, x2d, w)
    hs: list[torch.Tensor] = []
    cast: dict[torch.dtype, torch.Tensor] = {}
    for j in range(len(scales)):
        a, b = factors[2 * j], factors[2 * j + 1]
        xc = x2d if x2d.dtype == a.dtype else _cast(cast, x2d, a.dtype)
        drop = Dropout.draw((xc.shape[0], xc.shape[1]), ps[j], seeds[j], xc.device) if ps[j] > 0 else None
        if drop is not None and drop.keep_mask is not None:
            xc = xc * drop.keep_mask
        h = _x_at(xc, a)  # (N, r)
        if drop is not None and drop.keep_mask is None:  # sparse: h = x·Aᵀ - D·Aᵀ
            h = h - torch.mm(drop.dropped(xc), a.t().contiguous())
        scale = scales[j] / (1.0 - ps[j])
        if out.dtype == b.dtype:
            out.addmm_(h, b.t(), alpha=scale)
        else:  # bf16/fp16 base, fp32 adapter: compute in fp32, one promoting in-place add
            out.add_(torch.mm(h, b.t()), alpha=scale)
        hs.append(h)
    return out, hs


# _SKINNY: the LoRA matmuls have one dimension r (≈ 8), and MKL's CPU kernels for such skinny products run
# far below both the FLOP and the memory-bandwidth limits, with large differences between equivalent
# formulations. Measured on this project's machine (2 threads, N = 1024 rows): x·Aᵀ for k = 768 takes
# ~0.3 ms as (A·xᵀ)ᵀ and ~0.4 ms as written, but for k = 3072 ~1.8 ms as written and 2.1–3.1 ms transposed;
# g·B 3.6–4.3 ms vs (Bᵀ·gᵀ)ᵀ 1.5–2.2 ms (d = 2304); the reductions gᵀ·h and g_hᵀ·x (r × d outputs) take
# 2.6–6.4 ms as one mm (hᵀ·g)ᵀ, 1.2–3.5 ms as 8 row-chunk products summed (bmm), and 6.6–10.9 ms when
# gᵀ·h is taken directly as a (d, r) product.
# Each product below is written in the fastest of these. PEFT's nn.Linear backward takes the slow ones.


def _x_at(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """x·Aᵀ, (N, k)·(k, r) → (N, r), in the orientation MKL runs faster for the width k (see _SKINNY)."""
    return torch.mm(a, x.t()).t() if x.shape[1] < 2048 else torch.mm(x, a.t())


_ROW_CHUNKS = 8


def _at_b(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """aᵀ·b, (N, r)ᵀ·(N, k) → (r, k), a reduction over N rows: as a batch of _ROW_CHUNKS partial products
    summed (see _SKINNY) when N splits evenly into chunks of at least 64 rows, else one mm."""
    n = a.shape[0]
    if n % _ROW_CHUNKS or n < 64 * _ROW_CHUNKS:
        return torch.mm(a.t(), b)
    rows = n // _ROW_CHUNKS
    parts = torch.bmm(a.reshape(_ROW_CHUNKS, rows, a.shape[1]).transpose(1, 2),
                      b.reshape(_ROW_CHUNKS, rows, b.shape[1]))  # (chunks, r, k)
    return parts.sum(0)


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
        ps: tuple[float, ...],
        seeds: tuple[int | None, ...],
        *factors: torch.Tensor,
    ) -> torch.Tensor:
        out, hs = _lora_forward(x.reshape(-1, x.shape[-1]), weight, bias, fan_in_fan_out, factors, scales,
                                ps, seeds)
        # x is saved as the input object itself (never a reshaped or cast copy): siblings share it.
        ctx.save_for_backward(x, weight, bias, *factors, *hs)
        ctx.lora = (fan_in_fan_out, scales, ps, seeds)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        fan_in_fan_out, scales, ps, seeds = ctx.lora
        x, weight, bias, *rest = ctx.saved_tensors
        n = len(scales)
        factors, hs = rest[: 2 * n], rest[2 * n:]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_factor = ctx.needs_input_grad[7:]
        x2d = x.reshape(-1, x.shape[-1])
        shape = (x2d.shape[0], x2d.shape[1])
        g = grad_out

        grad_w = grad_b = None
        if need_w:
            grad_w = torch.mm(x2d.t(), g) if fan_in_fan_out else torch.mm(g.t(), x2d)
        if need_b and bias is not None:
            grad_b = g.sum(0)

        grad_factors: list[torch.Tensor | None] = []
        lora_grad_x: torch.Tensor | None = None  # Σ_j s_j·(g·B_j·A_j) ⊙ m_j, (N, k)
        cast_x: dict[torch.dtype, torch.Tensor] = {}
        cast_g: dict[torch.dtype, torch.Tensor] = {}
        for j in range(n):
            a, b, h = factors[2 * j], factors[2 * j + 1], hs[j]
            need_a, need_bb = need_factor[2 * j], need_factor[2 * j + 1]
            scale = scales[j] / (1.0 - ps[j])
            gc = g if g.dtype == b.dtype else _cast(cast_g, g, b.dtype)
            g_h = torch.mm(b.t(), gc.t()).t()  # (N, r) = g·B, the gradient w.r.t. h_j before the scale
            drop = None
            if ps[j] > 0 and (need_a or need_x):
                drop = Dropout.draw(shape, ps[j], seeds[j], x.device)  # the forward's draw, again
                g_h = g_h.contiguous()
            sparse = drop if drop is not None and drop.keep_mask is None else None  # the sparse draw
            grad_a = grad_b_j = None
            if need_a:
                xc = x2d if x2d.dtype == a.dtype else _cast(cast_x, x2d, a.dtype)
                if drop is not None and drop.keep_mask is not None:
                    xc = xc * drop.keep_mask
                grad_a = _at_b(g_h, xc)  # (r, k)
                if sparse is not None:  # ∂A = g_hᵀ·x - (Dᵀ·g_h)ᵀ
                    grad_a.sub_(torch.mm(sparse.transposed(sparse.dropped(xc)), g_h).t())
                grad_a.mul_(scale)
            if need_bb:
                grad_b_j = _at_b(h, gc).t().mul_(scale)  # (d, r) = gᵀ·h
            if need_x:
                if drop is not None and drop.keep_mask is not None:
                    part = torch.mm(g_h, a).mul_(drop.keep_mask)
                    lora_grad_x = part.mul_(scale) if lora_grad_x is None else lora_grad_x.add_(part, alpha=scale)
                elif lora_grad_x is None:  # written by this skinny product, so the base GEMM can accumulate
                    lora_grad_x = torch.addmm(g_h.new_empty(shape), g_h, a, beta=0, alpha=scale)
                    if sparse is not None:  # it holds only this adapter's term: its dropped elements are 0
                        lora_grad_x.view(-1).index_fill_(0, sparse.flat, 0.0)
                else:
                    lora_grad_x.addmm_(g_h, a, alpha=scale)
                    if sparse is not None:  # subtract this term at its dropped elements (D: the pattern)
                        pattern = sparse.dropped(x2d if x2d.dtype == a.dtype else _cast(cast_x, x2d, a.dtype))
                        at_dropped = torch.sparse.sampled_addmm(pattern, g_h, a, beta=0.0).values()
                        lora_grad_x.view(-1).index_add_(0, sparse.flat, at_dropped, alpha=-scale)
            grad_factors += [grad_a, grad_b_j]

        grad_x = None
        if need_x:
            w = weight.t() if fan_in_fan_out else weight  # g (N, d) · w (d, k)
            if lora_grad_x is None:
                grad_x = torch.mm(g, w)
            elif lora_grad_x.dtype == g.dtype:
                grad_x = lora_grad_x.addmm_(g, w)  # the base GEMM accumulates: no separate (N, k) pass
            else:
                grad_x = torch.mm(g, w).add_(lora_grad_x)
            grad_x = grad_x.view(x.shape)
        return (grad_x, grad_w, grad_b, None, None, None, None, *grad_factors)


_FEW_ROWS = 64
"""Up to this many rows the LoRA products are taken in the orientation with the fewest calls; above it, in
the one MKL runs fastest (see _SKINNY)."""


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
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
        or any(a.requires_grad or b.requires_grad for a, b, _, _ in adapters)
    )
    if not needs_grad and x.numel() <= _FEW_ROWS * x.shape[-1] and all(
            p == 0.0 and a.dtype == x.dtype for a, _, _, p in adapters):
        # A few rows at inference (decode), adapters in x's dtype, no dropout: each ATen call costs more than
        # its arithmetic here, so the fewest calls — the base matmul, then x·Aᵀ and one in-place accumulate
        # per adapter (matrix-vector products, B·(A·x), for a single token).
        x2d = x.reshape(-1, x.shape[-1])
        if fan_in_fan_out:
            out = torch.mm(x2d, weight) if bias is None else torch.addmm(bias, x2d, weight)
        else:
            out = F.linear(x2d, weight, bias)
        if x2d.shape[0] == 1:
            out1d, x1d = out.view(-1), x2d.view(-1)
            for a, b, scale, _ in adapters:
                out1d.addmv_(b, torch.mv(a, x1d), alpha=scale)
        else:
            for a, b, scale, _ in adapters:
                out.addmm_(F.linear(x2d, a), b.t(), alpha=scale)
        return out.view(*x.shape[:-1], out.shape[-1])
    scales = tuple(s for _, _, s, _ in adapters)
    ps = tuple(float(p) for _, _, _, p in adapters)
    factors = [t for a, b, _, _ in adapters for t in (a, b)]
    if needs_grad:
        seeds = tuple(draw_seed() if p > 0 else None for p in ps)
        out = FusedLoraLinear.apply(x, weight, bias, fan_in_fan_out, scales, ps, seeds, *factors)
    else:  # inference: no autograd node, nothing saved, dropout (if any) from the global generator
        out, _ = _lora_forward(x.reshape(-1, x.shape[-1]), weight, bias, fan_in_fan_out, factors, scales, ps,
                               (None,) * len(ps))
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


def segmented_lora_linear(
    x: torch.Tensor, result: torch.Tensor, a_stack: torch.Tensor, bt_stack: torch.Tensor, perm: torch.Tensor,
    lo: int, hi: int,
) -> torch.Tensor:
    """``gathered_lora_linear`` without gathering weights, for batches whose rows, taken in the order
    ``perm``, fill slots lo, lo+1, …, hi-1 with the same number of rows each (e.g. one row per adapter).

    The activations are permuted instead (x rows in slot order, the LoRA output added back at ``perm``), and
    the stacks' slice [lo, hi) is used in place: cheaper than the gather when a row has fewer tokens than the
    rank (decode), since a gather copies r·(k + d) numbers per row and this moves T·(k + d).
    """
    n, k, d = x.shape[0], x.shape[-1], result.shape[-1]
    groups = hi - lo
    xs = x.reshape(n, -1, k).index_select(0, perm).reshape(groups, -1, k)  # (G, c·T, k), slot order
    if xs.dtype != a_stack.dtype:
        xs = xs.to(a_stack.dtype)
    h = torch.bmm(xs, a_stack[lo:hi].transpose(1, 2))  # (G, c·T, r)
    delta = torch.bmm(h, bt_stack[lo:hi]).reshape(n, -1, d)  # (N, T, d), rows in slot order
    out = result.view(n, -1, d)
    if _can_add_in_place(result, delta):
        out.index_add_(0, perm, delta)
        return result
    return out.index_add(0, perm, delta.to(result.dtype)).view(result.shape)


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


def _can_add_in_place(result: torch.Tensor, delta: torch.Tensor) -> bool:
    """Whether the LoRA term may be added into the base output's memory: no graph to keep, same dtype."""
    return not torch.is_grad_enabled() and result.dtype == delta.dtype and result.is_contiguous()


def _add_batched(result: torch.Tensor, h: torch.Tensor, bt_rows: torch.Tensor, n: int, d: int) -> torch.Tensor:
    if _can_add_in_place(result, h):
        result.view(n, -1, d).baddbmm_(h, bt_rows)
        return result
    return result + torch.bmm(h, bt_rows).view(result.shape).to(result.dtype)


# ---------------------------------------------------------------------------------------------- dora
def _dora_forward(
    x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fan_in_fan_out: bool,
    a: torch.Tensor, b: torch.Tensor, scale: float, factor: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """out (N, d) = f ⊙ z + b with z = x·W0ᵀ + s·(x·Aᵀ)·Bᵀ; returns (out, z, h = x·Aᵀ (N, r))."""
    w = weight if fan_in_fan_out else weight.t()  # (k, d) either way
    z = torch.mm(x2d, w)
    h = _x_at(x2d, a)
    z.addmm_(h, b.t(), alpha=scale)  # in place: no (N, d) temporary, never B·A
    out = torch.mul(z, factor) if bias is None else torch.addcmul(bias, z, factor)
    return out, z, h


class FusedDoraLinear(torch.autograd.Function):
    """Autograd of ``_dora_forward`` with f = m/n, n = ‖W0 + s·B·A‖ a constant (DoRA §4.3):

        ∂m = Σ_rows (g ⊙ z) / n,   g_z = g ⊙ f,   then LoRA's backward with g_z:
        ∂A = s·(g_z·B)ᵀ·x,  ∂B = s·g_zᵀ·h,  ∂x = g_z·W0 + s·(g_z·B)·A,  ∂b = Σ_rows g

    Saved: x (the input object), h (N, r) and z (N, d): one (N, d) activation, where PEFT's DoRA keeps the
    base output, the LoRA output and their scaled copies.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fan_in_fan_out: bool,
        scale: float, a: torch.Tensor, b: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor,
    ) -> torch.Tensor:
        factor = magnitude / norm
        out, z, h = _dora_forward(x.reshape(-1, x.shape[-1]), weight, bias, fan_in_fan_out, a, b, scale, factor)
        ctx.save_for_backward(x, weight, a, b, h, z, factor, norm)
        ctx.lora = (fan_in_fan_out, scale, bias is not None)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, a, b, h, z, factor, norm = ctx.saved_tensors
        fan_in_fan_out, scale, has_bias = ctx.lora
        need_x, need_w, need_bias, _, _, need_a, need_b, need_m, _ = ctx.needs_input_grad
        x2d = x.reshape(-1, x.shape[-1])
        g = grad_out
        grad_m = torch.mul(g, z).sum(0).div_(norm) if need_m else None
        gz = g * factor  # (N, d): the gradient reaching z
        grad_bias = g.sum(0) if need_bias and has_bias else None
        grad_w = None
        if need_w:
            grad_w = torch.mm(x2d.t(), gz) if fan_in_fan_out else torch.mm(gz.t(), x2d)
        g_h = torch.mm(b.t(), gz.t()).t()  # (N, r) = g_z·B (see _SKINNY for the orientation)
        grad_a = _at_b(g_h, x2d).mul_(scale) if need_a else None
        grad_b = _at_b(h, gz).t().mul_(scale) if need_b else None
        grad_x = None
        if need_x:
            w = weight.t() if fan_in_fan_out else weight  # (d, k)
            grad_x = torch.addmm(g_h.new_empty(x2d.shape), g_h, a, beta=0, alpha=scale)
            grad_x = grad_x.addmm_(gz, w).view(x.shape)  # the base GEMM accumulates onto the LoRA term
        return grad_x, grad_w, grad_bias, None, None, grad_a, grad_b, grad_m, None


def dora_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fan_in_fan_out: bool,
    a: torch.Tensor, b: torch.Tensor, scale: float, magnitude: torch.Tensor, norm: torch.Tensor,
) -> torch.Tensor:
    """y = (m/n) ⊙ (x·W0ᵀ + s·B·A·x) + b for a Linear-like base, one DoRA adapter, fused (no dropout).

    Args:
        x: input (..., k), same dtype as ``weight`` and the factors.
        weight: base weight, (d, k) for ``nn.Linear`` or (k, d) for GPT-2 ``Conv1D`` (``fan_in_fan_out``).
        bias: base bias (d,) or None.
        a, b: A (r, k), B (d, r); scale: s; magnitude: m (d,); norm: n = ‖W0 + s·B·A‖ (d,), detached.

    Returns:
        y (..., d).
    """
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, a, b, magnitude))
    if needs_grad:
        out = FusedDoraLinear.apply(x, weight, bias, fan_in_fan_out, scale, a, b, magnitude, norm)
    else:
        out, _, _ = _dora_forward(x.reshape(-1, x.shape[-1]), weight, bias, fan_in_fan_out, a, b, scale,
                                  magnitude / norm)
    return out.view(*x.shape[:-1], out.shape[-1])
