"""The compiled CPU decoding kernels (`chatglm_sft.models.cpu_kernels`): products equal to float64 ones for int8,
int4 and bf16 weights at odd shapes and row counts, each row independent of the others in a batch, the quantized and
bf16 layers routed through them for decoding-sized inputs, and PyTorch's kernels when they cannot be built."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from chatglm_sft.models import cpu_kernels
from chatglm_sft.models.matvec import MatVecLinear, use_matvec_kernels
from chatglm_sft.models.quantize import Int4Linear, Int8Linear, int4_codes, int8_codes, portable_int4


@pytest.fixture(scope="module")
def kernels():
    lib = cpu_kernels.library()
    if lib is None:
        pytest.skip("no C++ compiler here: the CPU kernels cannot be built (PyTorch's kernels are used instead)")
    return lib


def dequantized_int4(q: torch.Tensor, scales_zeros: torch.Tensor, group: int) -> torch.Tensor:
    out_f, in_f = q.shape
    scale = scales_zeros[..., 0].double().t()[..., None]
    zero = scales_zeros[..., 1].double().t()[..., None]
    return ((q.double() - 8).view(out_f, in_f // group, group) * scale + zero).view(out_f, in_f)


def quantized_x(x: torch.Tensor, group: int) -> torch.Tensor:
    """x as the int8 and int4 kernels quantize it: to int16 per group of `group` columns (the last may be shorter),
    each the group's largest magnitude over 32767 a step (float32 arithmetic, rounding half to even, as the C code
    does)."""
    padded = torch.nn.functional.pad(x, (0, -x.shape[-1] % group))
    groups = padded.view(x.shape[0], -1, group)
    largest = groups.abs().amax(-1, keepdim=True)
    inverse = torch.where(largest > 0, torch.tensor(32767.0) / largest, torch.zeros(()))
    quantized = (groups * inverse).round().double() * (largest / 32767).double()
    return quantized.view(x.shape[0], -1)[:, : x.shape[-1]]


# (24, 1100) and (40, 2080): several rows of x are taken in chunks of columns (16 KiB of x at a time), the last one
# shorter; 50, 200 and 1100 end with a shorter group of int8's 128 columns, and with columns past the last 16 or 32.
@pytest.mark.parametrize("rows", [1, 2, 3, 8, 11])
@pytest.mark.parametrize("out_f,in_f", [(48, 64), (37, 50), (24, 200), (24, 1100), (40, 2080)])
def test_int8_and_bf16_equal_float64(kernels, rows, out_f, in_f):
    torch.manual_seed(rows * out_f + in_f)
    w = torch.randn(out_f, in_f)
    x = torch.randn(2 * rows, in_f)
    q, scale = int8_codes(w)
    # What the int8 kernel computes: the codes times x as quantized to int16 per 128 columns.
    exact = quantized_x(x, 128) @ (q.double() * scale.double()[:, None]).T
    got = cpu_kernels.int8_matmul(kernels, x.view(2, rows, in_f), q, scale.float()).view(2 * rows, out_f)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5 * exact.abs().max().item())
    # And close to the product with x unquantized: x's int16 steps move it far less than w's int8 steps do.
    dequantized = q.double() * scale.double()[:, None]
    true = x.double() @ dequantized.T
    weights_error = (x.double() @ (dequantized - w.double()).T).abs().max()
    assert (got.double() - true).abs().max() < min(1e-3 * true.abs().max(), 0.01 * weights_error)
    wb = w.bfloat16()
    exact = x.double() @ wb.double().T
    got = cpu_kernels.bf16_matmul(kernels, x.view(2, rows, in_f), wb).view(2 * rows, out_f)
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5 * exact.abs().max().item())


# Several rows of x are taken 8 groups of columns at a time or more (16 KiB of x): (32, 1056) and (128, 2432) end
# with a shorter chunk, (128, 2432) with a chunk of fewer than 8 groups.
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 11])
@pytest.mark.parametrize("group,in_f", [(32, 96), (64, 256), (128, 256), (128, 1408), (32, 1056), (128, 2432)])
def test_int4_equals_float64(kernels, rows, group, in_f):
    torch.manual_seed(rows + group)
    w = torch.randn(40, in_f)
    q, scales_zeros = int4_codes(w, group)
    x = torch.randn(rows, in_f)
    got = cpu_kernels.int4_matmul(kernels, x, portable_int4(q), scales_zeros.transpose(0, 1).contiguous(), group)
    # What the kernel computes: the codes times x as quantized to int16, the zero points times x itself.
    x_hat = quantized_x(x, group)
    scale = scales_zeros[..., 0].double().t().repeat_interleave(group, dim=1)
    offset = (scales_zeros[..., 1].double() - 8 * scales_zeros[..., 0].double()).t()
    exact = x_hat @ (q.double() * scale).T + x.double().view(rows, -1, group).sum(-1) @ offset.T
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5 * exact.abs().max().item())
    # And close to the product with x unquantized: x's int16 steps move it far less than w's int4 steps do.
    dequantized = dequantized_int4(q, scales_zeros, group)
    true = x.double() @ dequantized.T
    weights_error = (x.double() @ (dequantized - w.double()).T).abs().max()
    assert (got.double() - true).abs().max() < min(1e-3 * true.abs().max(), 0.01 * weights_error)


@pytest.mark.parametrize("in_f", [256, 3072])
def test_a_row_gets_the_same_bits_alone_and_in_a_batch(kernels, in_f):
    """3072: a batch's x is taken in chunks of columns, a row alone whole."""
    torch.manual_seed(0)
    w = torch.randn(64, in_f)
    x = torch.randn(7, in_f)
    q, scale = int8_codes(w)
    q4, scales_zeros = int4_codes(w, 64)
    products = {
        "int8": lambda rows: cpu_kernels.int8_matmul(kernels, rows, q, scale.float()),
        "int4": lambda rows: cpu_kernels.int4_matmul(
            kernels, rows, portable_int4(q4), scales_zeros.transpose(0, 1).contiguous(), 64
        ),
        "bf16": lambda rows: cpu_kernels.bf16_matmul(kernels, rows, w.bfloat16()),
    }
    for name, product in products.items():
        batch = product(x)
        for i in range(len(x)):
            assert torch.equal(batch[i], product(x[i : i + 1])[0]), name


def test_plain_loops_equal_the_vector_ones(kernels, monkeypatch, tmp_path):
    """The same file compiled without AVX2 (the loops other CPUs run) gives the same products."""
    monkeypatch.setenv("CHATGLM_SFT_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_kernels, "FLAGS", [*cpu_kernels.FLAGS, "-mno-avx2", "-mno-fma"])
    cpu_kernels.library.cache_clear()
    try:
        plain = cpu_kernels.library()
    finally:
        cpu_kernels.library.cache_clear()
    assert plain is not None and plain is not kernels
    torch.manual_seed(3)
    w, x = torch.randn(24, 1120), torch.randn(9, 1120)  # 9 rows: x taken in chunks of columns
    q, scale = int8_codes(w)
    q4, scales_zeros = int4_codes(w, 32)
    by_row = scales_zeros.transpose(0, 1).contiguous()
    for product in (
        lambda lib: cpu_kernels.int8_matmul(lib, x, q, scale.float()),
        lambda lib: cpu_kernels.int4_matmul(lib, x, portable_int4(q4), by_row, 32),
        lambda lib: cpu_kernels.bf16_matmul(lib, x, w.bfloat16()),
    ):
        expected = product(kernels)
        torch.testing.assert_close(product(plain), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("native_bf16", [True, False])
def test_layers_route_decoding_rows_through_the_kernels(kernels, monkeypatch, native_bf16):
    monkeypatch.setattr(cpu_kernels, "bf16_arithmetic", lambda: native_bf16)
    torch.manual_seed(1)
    linear = nn.Linear(128, 96, bias=True)
    fast = nn.Sequential(copy.deepcopy(linear).to(torch.bfloat16))
    assert use_matvec_kernels(fast) == 1
    layers = {"int8": Int8Linear(linear), "int4": Int4Linear(linear, 64), "bf16": fast[0]}
    assert isinstance(layers["bf16"], MatVecLinear) and hasattr(layers["int4"], "weight_uint4")
    calls = []
    for name in ("int8_matmul", "int4_matmul", "bf16_matmul"):
        original = getattr(cpu_kernels, name)
        monkeypatch.setattr(cpu_kernels, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    for name, layer in layers.items():
        dtype = torch.bfloat16 if name == "bf16" else torch.float32
        decode, prefill = torch.randn(1, 3, 128, dtype=dtype), torch.randn(2, 9, 128, dtype=dtype)
        with torch.no_grad():
            calls.clear()
            layer(decode)
            assert calls == [f"{name}_matmul"], name
            calls.clear()
            layer(prefill)  # 18 rows: int8 and int4 keep the kernels, bf16 too unless the CPU has bf16 arithmetic
            assert calls == ([] if name == "bf16" and native_bf16 else [f"{name}_matmul"]), name


def test_without_a_compiler_pytorch_kernels_serve(monkeypatch, caplog, tmp_path):
    monkeypatch.setenv("CHATGLM_SFT_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    cpu_kernels.library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
            assert cpu_kernels.library() is None
        assert "no C++ compiler" in caplog.text
        torch.manual_seed(2)
        linear = nn.Linear(128, 64)
        layer = Int4Linear(linear, 64)
        assert not hasattr(layer, "weight_uint4") and hasattr(layer, "weight_int4")
        x = torch.randn(1, 128)
        q, scales_zeros = int4_codes(linear.weight, 64)
        exact = x.double() @ dequantized_int4(q, scales_zeros, 64).T + linear.bias.double()
        with torch.no_grad():
            got = layer(x)
        assert (got.double() - exact).abs().max() < 0.05 * exact.abs().max()  # bf16 activations in PyTorch's kernel
    finally:
        cpu_kernels.library.cache_clear()


def test_a_failed_build_is_reported_and_not_used(monkeypatch, caplog, tmp_path):
    compiler = tmp_path / "c++"
    compiler.write_text("#!/bin/sh\necho 'error: this compiler fails' >&2\nexit 1\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("CHATGLM_SFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(compiler))
    cpu_kernels.library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
            assert cpu_kernels.library() is None
        assert "this compiler fails" in caplog.text
        assert not list((tmp_path / "cache").rglob("*.so"))
    finally:
        cpu_kernels.library.cache_clear()
