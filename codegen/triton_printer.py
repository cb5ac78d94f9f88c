"""Print sympy expressions (symbols.py vocabulary) as Triton code on per-token row tiles.

Conventions of the generated kernels (templates/elementwise.py.jinja): a program owns
BLOCK_T tokens of one head. A per-token scalar is a [BLOCK_T, 1] tile, a vector over dim
d a [BLOCK_T, BLOCK_d] tile (d padded to a power of two; `mask_d` marks the real lanes),
so scalars broadcast against vectors exactly as in the spec language and as the [B, T,
H, 1] tensors of the PyTorch plan do. Weights are loaded with zero token strides, so
they are full tiles too; params are kernel scalars.

Padded lanes may hold anything (exp(0) = 1, 1 / 0 = inf): every reduction over a dim
selects the real lanes (`_row_sum(x, mask_d)`), and every store is masked. The stable
elementwise helpers (`_sigmoid`, `_softplus`, ...) are the ones of the recurrent kernels,
shared through templates/triton_functions.py.jinja.
"""
from __future__ import annotations

from typing import Callable, Mapping

import sympy as sp

from .symbols import (
    dot, elu, l2norm, logsigmoid, relu, rsqrt, sigmoid, silu, softplus, vsum,
)
from .torch_printer import PREC_ATOM, PREC_MUL, PREC_POW, PREC_UNARY, CodePrinter, wrap

Dim = str | None  # a vector dim's name, or None for a per-token scalar


def dim_of(expr: sp.Expr, dims: Mapping[str, Dim]) -> Dim:
    """The dim a per-token value runs over (None: a scalar). The spec checker guarantees
    that an elementwise expression never mixes two dims."""
    if isinstance(expr, sp.Symbol):
        return dims.get(expr.name)
    if isinstance(expr, (dot, vsum)):
        return None
    found = {dim_of(a, dims) for a in expr.args} - {None}
    if len(found) > 1:
        raise ValueError(f"{expr} mixes the dims {sorted(found)}")
    return found.pop() if found else None


class TritonPrinter(CodePrinter):
    """`names` maps a symbol to its variable in the kernel (b_q for the input q, a
    param's own name); `dims` maps symbol names to their dim, for the reductions."""

    target = "Triton"
    functions = {
        sp.exp: "tl.exp({x})",
        sp.log: "tl.log({x})",
        sp.tanh: "_tanh({x})",
        sp.Abs: "tl.abs({x})",
        sp.sign: "_sign({x})",
        sigmoid: "_sigmoid({x})",
        logsigmoid: "_logsigmoid({x})",
        softplus: "_softplus({x})",
        relu: "tl.maximum({x}, 0.0)",
        elu: "_elu({x})",
        silu: "_silu({x})",
        rsqrt: "tl.rsqrt({x})",
    }

    def __init__(self, names: Callable[[sp.Symbol], str], dims: Mapping[str, Dim]):
        self.names = names
        self.dims = dims

    def symbol(self, s: sp.Symbol) -> str:
        return self.names(s)

    def integer(self, n: int) -> str:
        return f"{float(n)!r}"  # fp32 arithmetic throughout, never integer division

    def rational(self, e: sp.Rational) -> tuple[str, int]:
        value = float(e)
        return repr(value), (PREC_ATOM if value >= 0 else PREC_UNARY)

    def pow(self, e: sp.Pow) -> tuple[str, int]:
        """Exact products for small integer powers, sqrt / rsqrt for halves, else
        exp(p * log(x)) (a non-integer power needs a positive base anyway)."""
        base, exponent = e.args
        x = wrap(self.print(base), PREC_POW)
        if exponent.is_Rational and exponent.q in (1, 2) and abs(exponent) <= 4:
            whole = int(abs(exponent))
            factors = [x] * whole + ([f"tl.sqrt({self.code(base)})"] if exponent.q == 2 else [])
            product = " * ".join(factors)
            if exponent < 0:
                if len(factors) == 1 and exponent.q == 2:
                    return f"tl.rsqrt({self.code(base)})", PREC_ATOM
                return f"1.0 / {product if len(factors) == 1 else f'({product})'}", PREC_MUL
            return product, (PREC_ATOM if len(factors) == 1 else PREC_MUL)
        power = f"{wrap(self.print(exponent), PREC_MUL)} * tl.log({self.code(base)})"
        return f"tl.exp({power})", PREC_ATOM

    def heaviside(self, x: str) -> str:
        return f"tl.where({x} > 0.0, 1.0, 0.0)"  # Heaviside(0) = 0, as relu'(0) in torch

    def where(self, cond: str, value: str, otherwise: str) -> str:
        return f"tl.where({cond}, {value}, {otherwise})"

    def reduction(self, e) -> str:
        mask = self.mask(e.args[0])
        if isinstance(e, l2norm):
            x = self.code(e.args[0])
            return f"_l2norm({x}, {mask})" if mask else f"{x} * tl.rsqrt({x} * {x} + L2NORM_EPS)"
        if isinstance(e, dot):
            a, b = (wrap(self.print(x), PREC_MUL) for x in e.args)
            return f"_row_sum({a} * {b}, {mask})" if mask else f"{a} * {b}"
        x = self.code(e.args[0])
        return f"_row_sum({x}, {mask})" if mask else x

    def mask(self, expr: sp.Expr) -> str | None:
        dim = dim_of(expr, self.dims)
        return None if dim is None else f"mask_{dim}"
