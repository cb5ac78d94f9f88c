"""The delta rule's triangular solve runs its fp32 products as three tf32 tensor-core
products ("tf32x3") on a GPU. The interpreter's dots are fp32 whatever they are asked;
under ATTNC_EMULATE_GPU_DOTS=1 the kernels emulate tf32x3 (`_dot_fp32` with PRECISION
"rounded"). These tests check that emulation and the accuracy it gives: fp32's, where one
tf32 product gives about 1e-3. The backward's products with the inverse are one tf32
product (`_dot_grad`), emulated as one."""
import pytest
import torch
import triton
import triton.language as tl

from attnc.codegen.chunk_delta import DeltaKernelSpec
from attnc.runtime.chunk_delta_op import ChunkDeltaFunction

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cuda", reason="checks the interpreter's emulation of tf32")

MODULE = ChunkDeltaFunction.module_for(DeltaKernelSpec("delta", "none"))
_dot_fp32, _dot_grad, _tf32 = MODULE._dot_fp32, MODULE._dot_grad, MODULE._tf32


@triton.jit
def _product(a, b, c, N: tl.constexpr, PRECISION: tl.constexpr, GRAD: tl.constexpr = False):
    # the solve's product (_dot_fp32), or with GRAD the backward's (_dot_grad)
    i = tl.arange(0, N)
    x = tl.load(a + i[:, None] * N + i[None, :])
    y = tl.load(b + i[:, None] * N + i[None, :])
    if GRAD:
        tl.store(c + i[:, None] * N + i[None, :], _dot_grad(x, y, PRECISION))
    else:
        tl.store(c + i[:, None] * N + i[None, :], _dot_fp32(x, y, PRECISION))


@triton.jit
def _round(x, y, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(y + i, _tf32(tl.load(x + i)))


def test_tf32_rounds_to_ten_mantissa_bits_to_nearest():
    x = torch.randn(1024) * torch.logspace(-20, 20, 1024)
    y = torch.empty_like(x)
    _round[(1,)](x, y, N=1024)
    bits = x.view(torch.int32)
    expected = ((bits + 0x1000) & ~0x1FFF).view(torch.float32)
    assert torch.equal(y, expected)
    assert ((y - x).abs() <= x.abs() * 2.0 ** -11).all()  # half a tf32 unit at most
    assert not torch.equal(y, x)


def _solve_like_operands(seed, N=64):
    """A unit lower triangular inverse and a gradient-like tile, as the solve's products
    take them, and their exact product."""
    torch.manual_seed(seed)
    a = torch.linalg.inv(torch.eye(N) + torch.tril(torch.rand(N, N) * 0.3, -1)).contiguous()
    b = torch.randn(N, N)
    return a, b, a.double() @ b.double()


def _run_product(a, b, precision, grad=False):
    c = torch.full(a.shape, float("nan"))
    _product[(1,)](a, b, c, N=a.shape[0], PRECISION=precision, GRAD=grad)
    return c.double()


def _error(c, exact):
    return ((c - exact).norm() / exact.norm()).item()


def test_emulated_tf32x3_products_have_fp32_accuracy():
    a, b, exact = _solve_like_operands(0)
    one_tf32 = _error(_round_all(a).double() @ _round_all(b).double(), exact)
    assert one_tf32 > 1e-4                                        # what a single tf32 product loses
    assert _error(_run_product(a, b, "rounded"), exact) < 1e-6    # tf32x3, emulated
    assert _error(_run_product(a, b, "ieee"), exact) < 1e-6


def test_backward_products_with_the_inverse_are_one_tf32_product():
    a, b, exact = _solve_like_operands(1)
    one_tf32 = _round_all(a).double() @ _round_all(b).double()
    rounded = _run_product(a, b, "rounded", grad=True)
    # the emulation is one tf32 product summed in fp32: one_tf32 up to fp32 sums
    assert _error(rounded, exact) > 1e-4 and _error(rounded, one_tf32) < 1e-6
    assert _error(rounded, exact) < 2e-3
    assert _error(_run_product(a, b, "ieee", grad=True), exact) < 1e-6


def _round_all(x):
    y = torch.empty_like(x).reshape(-1)
    _round[(1,)](x.reshape(-1).contiguous(), y, N=x.numel())
    return y.reshape(x.shape)


def test_delta_rule_under_emulated_gpu_dots(monkeypatch):
    """gated_deltanet in bf16 with every dot rounded as on a GPU, the solve's in tf32x3 and
    the backward's products with the inverse in tf32:
    values and gradients within bf16's error of the fp64 recurrence. (Measured at T = 200,
    K = V = 32: the same errors to three digits as with the solve in plain fp32, 5e-3 to
    9e-3; deltanet and kda likewise.)"""
    import attnc
    from attnc.runtime.verify import verify

    monkeypatch.setenv("ATTNC_EMULATE_GPU_DOTS", "1")
    result = verify(attnc.load("gated_deltanet"), backend="triton", T=100, K=32, V=32, H=2,
                    dtype=torch.bfloat16)
    assert result.ok, result.errors
    assert max(result.errors.values()) < 1.5e-2, result.errors
