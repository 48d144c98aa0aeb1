"""The fused LoRA function (lorakit.ops): gradients equal plain autograd, what it saves, what it dispatches."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lorakit import ops
from lorakit.layers import GPT2Conv1D, Linear

K, D, N_ROWS, T = 16, 12, 3, 5


class AtenOps(TorchDispatchMode):
    """Records the name of every ATen op dispatched inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def make_layer(kind: str, bias: str, n_adapters: int, dropout: float, dtype: torch.dtype = torch.float32):
    """A LoRA layer with non-zero B; bias: "none" (frozen), "trainable", or "absent"."""
    if kind == "linear":
        layer: Linear = Linear(nn.Linear(K, D, bias=bias != "absent"))
    else:
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(D, K)
        nn.init.normal_(base.weight, std=0.2)
        nn.init.normal_(base.bias, std=0.2)
        layer = GPT2Conv1D(base)
    names = [f"a{i}" for i in range(n_adapters)]
    for i, name in enumerate(names):
        layer.update_layer(name, r=4 + 2 * i, lora_alpha=8 + i, lora_dropout=dropout, init_lora_weights=False,
                           use_rslora=False)
        with torch.no_grad():
            layer.factors(name)[1].normal_(std=0.3)
    layer.active_adapters = names
    layer.base_layer.to(dtype)
    layer.base_layer.weight.requires_grad_(False)
    if layer.base_layer.bias is not None:
        layer.base_layer.bias.requires_grad_(bias == "trainable")
    return layer.train()


def reference_forward(layer: Linear, x: torch.Tensor, seed: int) -> torch.Tensor:
    """h = base(x) + Σ s·B·A·(x ⊙ mask / keep) with plain autograd and the fused op's masks."""
    torch.manual_seed(seed)
    result = layer.base_layer(x)
    for name in layer.active_adapters:
        a, b = layer.factors(name)
        xc = x.to(a.dtype)
        p = layer.lora_dropout[name].p if isinstance(layer.lora_dropout[name], nn.Dropout) else 0.0
        if p > 0:
            flat = xc.reshape(-1, xc.shape[-1])
            xc = xc * ops.dropout_mask(flat, p, ops.draw_seed()).view_as(xc) / (1 - p)
        result = result + ((xc @ a.t()) @ b.t() * layer.scaling[name]).to(result.dtype)
    return result


def grads(layer: Linear, x: torch.Tensor, y: torch.Tensor, grad_out: torch.Tensor) -> dict[str, torch.Tensor]:
    params = {n: p for n, p in layer.named_parameters() if p.requires_grad}
    inputs = [x, *params.values()]
    values = torch.autograd.grad(y, inputs, grad_out)
    return dict(zip(["x", *params], values, strict=True))


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("bias", ["none", "trainable", "absent"])
@pytest.mark.parametrize("n_adapters", [1, 2])
@pytest.mark.parametrize("dropout", [0.0, 0.1, "0.1-dense", 0.5])
def test_fused_matches_plain_autograd(kind: str, bias: str, n_adapters: int, dropout: float | str,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """p = 0.1 takes the sparse (CSR) dropout form, "0.1-dense" and 0.5 the dense mask."""
    if kind == "conv1d" and bias == "absent":
        pytest.skip("GPT-2's Conv1D always has a bias")
    if dropout == "0.1-dense":
        dropout = 0.1
    else:
        monkeypatch.setattr(ops, "SPARSE_DROPOUT_MIN_NUMEL", 0)  # these inputs are tiny
    layer = make_layer(kind, bias, n_adapters, float(dropout))
    x = torch.randn(N_ROWS, T, K, requires_grad=True)
    grad_out = torch.randn(N_ROWS, T, D)

    torch.manual_seed(7)
    fused = layer(x)
    assert type(fused.grad_fn).__name__ == "ViewBackward0"
    assert type(fused.grad_fn.next_functions[0][0]).__name__ == "FusedLoraLinearBackward"
    expected = reference_forward(layer, x, seed=7)

    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-5)
    got, want = grads(layer, x, fused, grad_out), grads(layer, x, expected, grad_out)
    assert got.keys() == want.keys()
    assert any("lora_A" in k for k in got) and ("base_layer.bias" in got) == (bias == "trainable")
    for name in got:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-5, msg=name)


def test_dropout_is_applied_and_mask_redrawn_identically() -> None:
    layer = make_layer("linear", "none", 1, dropout=0.5)
    x = torch.randn(4, K, requires_grad=True)
    torch.manual_seed(3)
    first = layer(x)
    torch.manual_seed(3)
    again = layer(x)
    layer.eval()
    no_dropout = layer(x)
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    assert not torch.allclose(first, no_dropout)
    for p in (0.05, 0.5):  # sparse (1000×1000) and dense draws: deterministic given the seed, ~p dropped
        torch.testing.assert_close(ops.dropout_mask(x, p, 123), ops.dropout_mask(x, p, 123), atol=0, rtol=0)
        dropped = 1 - ops.dropout_mask(torch.empty(1000, 1000), p, 5).float().mean().item()
        assert abs(dropped - p) < 3e-3, (p, dropped)


def test_dropped_positions_form_a_bernoulli_process() -> None:
    generator = torch.Generator().manual_seed(0)
    for batch in (None, 7):  # 7 gaps at a time exercises drawing more until the end is passed
        flat = ops._dropped_positions(20_000, 0.1, generator, torch.device("cpu"), batch=batch)
        assert flat.dtype == torch.long and bool((flat[1:] > flat[:-1]).all())
        assert int(flat[0]) >= 0 and int(flat[-1]) < 20_000
        assert abs(flat.numel() - 2_000) < 200
        counts = torch.bincount(flat % 4, minlength=4)  # no position class favoured
        assert int(counts.min()) > 400


def test_sparse_dropout_gives_dropped_inputs_exactly_zero_lora_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    """With W0 = 0, ∂x is the LoRA term alone: exactly 0 where the mask dropped x, non-zero elsewhere."""
    monkeypatch.setattr(ops, "SPARSE_DROPOUT_MIN_NUMEL", 0)
    layer = make_layer("linear", "absent", 1, dropout=0.3)
    nn.init.zeros_(layer.base_layer.weight)
    x = torch.randn(N_ROWS, T, K, requires_grad=True)
    torch.manual_seed(11)
    layer(x).backward(torch.randn(N_ROWS, T, D))
    torch.manual_seed(11)
    keep = ops.dropout_mask(x.detach().reshape(-1, K), 0.3, ops.draw_seed()).view_as(x)
    assert x.grad is not None and not bool(keep.all())
    assert bool((x.grad[~keep] == 0).all()) and bool((x.grad[keep] != 0).all())


def test_base_weight_gradient_when_unfrozen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops, "SPARSE_DROPOUT_MIN_NUMEL", 0)
    for kind in ("linear", "conv1d"):
        layer = make_layer(kind, "trainable", 2, dropout=0.2)
        layer.base_layer.weight.requires_grad_(True)
        x = torch.randn(N_ROWS, T, K, requires_grad=True)
        grad_out = torch.randn(N_ROWS, T, D)
        torch.manual_seed(1)
        got = grads(layer, x, layer(x), grad_out)
        want = grads(layer, x, reference_forward(layer, x, seed=1), grad_out)
        for name in want:
            torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_low_precision_input_with_fp32_adapters(dtype: torch.dtype, dropout: float,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops, "SPARSE_DROPOUT_MIN_NUMEL", 0)
    layer = make_layer("linear", "trainable", 2, dropout, dtype=dtype)
    a, b = layer.factors("a0")
    assert a.dtype == b.dtype == torch.float32 and layer.base_layer.weight.dtype == dtype
    x = torch.randn(N_ROWS, T, K, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(N_ROWS, T, D, dtype=dtype)
    torch.manual_seed(5)
    fused = layer(x)
    assert fused.dtype == dtype
    assert type(fused.grad_fn.next_functions[0][0]).__name__ == "FusedLoraLinearBackward"
    expected = reference_forward(layer, x, seed=5)
    tol = {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(fused, expected, **tol)
    got, want = grads(layer, x, fused, grad_out), grads(layer, x, expected, grad_out)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        torch.testing.assert_close(got[name], want[name], **tol, msg=name)
    if dropout == 0.0:  # the no-grad path casts the same way
        with torch.no_grad():
            for rows in (x[:1, :1], x):
                inference = layer(rows)
                assert inference.dtype == dtype
                torch.testing.assert_close(inference, reference_forward(layer, rows, seed=5), **tol)


def test_siblings_save_one_copy_of_their_input() -> None:
    """q, k, v reading the same x (dropout on): what autograd keeps is x once plus the (N, r) products."""
    layers = [make_layer("linear", "none", 1, dropout=0.1) for _ in range(3)]
    x = torch.randn(64, K, requires_grad=True)
    params = {p.data_ptr() for layer in layers for p in layer.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outs = [layer(x) for layer in layers]
    r = layers[0].r["a0"]
    assert x.untyped_storage().data_ptr() in saved
    assert sum(saved.values()) == x.numel() * 4 + 3 * 64 * r * 4
    sum(o.sum() for o in outs).backward()


def test_forward_aten_ops_are_pinned() -> None:
    """The hot path's op lists: a regression (an extra copy, cast or elementwise pass) fails here."""
    layer = make_layer("linear", "none", 1, dropout=0.0)
    x = torch.randn(N_ROWS, T, K)
    training = ["view", "t", "addmm", "t", "mm", "t", "t", "addmm_", "view"]  # t: free views
    inference = ["view", "t", "addmm", "t", "mm", "t", "addmm_", "view"]  # no autograd node, one view fewer
    decode = ["view", "t", "addmm", "view", "view", "mv", "addmv_", "view"]  # one token: matrix-vector products
    for grad, inputs, expected in ((True, x, training), (False, x, inference), (False, x[:1, :1], decode)):
        with torch.set_grad_enabled(grad), AtenOps() as recorder:
            layer(inputs)
        assert recorder.ops == expected, (grad, recorder.ops)
    layer.active_adapters = ["a0", "a0"]  # a second adapter costs exactly two free views, one mm and one addmm_
    with torch.no_grad(), AtenOps() as recorder:
        layer(x)
    assert len(recorder.ops) == len(inference) + 4


def test_skinny_products_equal_plain_matmuls() -> None:
    """The reoriented LoRA products (ops._x_at, ops._at_b) on shapes that take their non-default forms."""
    torch.manual_seed(0)
    for n, k in ((512, 2048), (1024, 96), (100, 3000), (8, 8)):
        x, a, h = torch.randn(n, k), torch.randn(8, k), torch.randn(n, 8)
        torch.testing.assert_close(ops._x_at(x, a), x @ a.t(), atol=1e-4, rtol=1e-5)
        for lhs in (h, h.t().contiguous().t()):  # (N, r) contiguous, or a transposed view as the forward makes
            torch.testing.assert_close(ops._at_b(lhs, x), lhs.t() @ x, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_matches_plain_autograd_at_chunked_sizes(dropout: float) -> None:
    """512 rows and width 2048: the row-chunked reductions, the wide x·Aᵀ and (p = 0.1) sparse dropout."""
    torch.manual_seed(1)
    layer = Linear(nn.Linear(2048, 96))
    layer.update_layer("a", r=8, lora_alpha=16, lora_dropout=dropout, init_lora_weights=False, use_rslora=False)
    layer.active_adapters = ["a"]
    layer.base_layer.requires_grad_(False)
    layer.train()
    x = torch.randn(4, 128, 2048, requires_grad=True)
    grad_out = torch.randn(4, 128, 96)
    torch.manual_seed(3)
    fused = layer(x)
    assert type(fused.grad_fn.next_functions[0][0]).__name__ == "FusedLoraLinearBackward"
    expected = reference_forward(layer, x, seed=3)
    torch.testing.assert_close(fused, expected, atol=1e-4, rtol=1e-5)
    got, want = grads(layer, x, fused, grad_out), grads(layer, x, expected, grad_out)
    for name in got:
        torch.testing.assert_close(got[name], want[name], atol=1e-4, rtol=1e-4, msg=name)


def test_disabled_or_merged_forward_is_the_base_forward() -> None:
    for kind in ("linear", "conv1d"):
        layer = make_layer(kind, "none", 2, dropout=0.1)
        x = torch.randn(N_ROWS, T, K)
        with AtenOps() as base_ops:
            base_out = layer.base_layer(x)
        layer.disable_adapters = True
        with AtenOps() as disabled:
            out = layer(x)
        assert disabled.ops == base_ops.ops
        torch.testing.assert_close(out, base_out, atol=0, rtol=0)
        layer.disable_adapters = False
        layer.merge()
        with AtenOps() as merged:
            layer(x)
        assert merged.ops == base_ops.ops


def test_falls_back_under_autocast_and_hooks() -> None:
    layer = make_layer("linear", "none", 1, dropout=0.0)
    x = torch.randn(N_ROWS, T, K, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert "Fused" not in type(out.grad_fn).__name__ and out.dtype == torch.bfloat16

    calls = []
    handle = layer.base_layer.register_forward_hook(lambda *args: calls.append(1))
    out = layer(x)
    handle.remove()
    assert calls == [1]
    with ops.use_fused(False):
        plain = layer(x)
    assert type(plain.grad_fn).__name__ == "AddBackward0"
    torch.testing.assert_close(out, plain, atol=1e-6, rtol=1e-6)


def test_fused_matches_lora_output_on_1d_and_noncontiguous_inputs() -> None:
    layer = make_layer("linear", "none", 1, dropout=0.0)  # (GPT-2's Conv1D itself rejects strided x)
    for x in (torch.randn(K), torch.randn(T, N_ROWS, K).transpose(0, 1), torch.randn(1, 1, K)):
        with ops.use_fused(False):
            expected = layer(x)
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,bias", [("linear", "none"), ("linear", "absent"), ("conv1d", "none")])
@pytest.mark.parametrize("n_adapters", [1, 2])
@pytest.mark.parametrize("rows", [1, 5, 100])
def test_inference_path_matches_plain_forward(kind: str, bias: str, n_adapters: int, rows: int) -> None:
    """No-grad forwards (one token: mv/addmv_; a few rows: F.linear/addmm_; many rows: the training
    kernels without a node) against the plain autograd path."""
    layer = make_layer(kind, bias, n_adapters, dropout=0.0).eval()
    x = torch.randn(rows, 1, K)
    with ops.use_fused(False):
        expected = layer(x)
    with torch.no_grad():
        got = layer(x)
    assert got.grad_fn is None
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
