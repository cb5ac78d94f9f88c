"""The symbolic vocabulary shared by the analysis and the emitters.

Per-token values are sympy expressions over real symbols. A vector value is an
*elementwise* expression: the symbol `k` stands for every channel `k[i]` at once, so
products of vectors are Hadamard products and commute, as in the spec language. Which
symbols are vectors (and over which dim) is kept beside the expression, in a `Shapes`
table; sympy never needs to know.

Functions sympy lacks are declared here once, with their derivatives, so the same
expression can be printed (canonical forms), differentiated (backward kernels) and
emitted as code.
"""
from __future__ import annotations

import sympy as sp


# Signs of real arguments' values, so that sympy can prove a log gate <= 0 (a decay): the
# runtime checks the values of gates it cannot prove (runtime/op.py).
class sigmoid(sp.Function):
    def fdiff(self, argindex=1):
        s = sigmoid(self.args[0])
        return s * (1 - s)

    def _eval_is_extended_positive(self):
        return self.args[0].is_extended_real or None

    def _eval_is_real(self):
        return self.args[0].is_real or None


class logsigmoid(sp.Function):
    def fdiff(self, argindex=1):
        return sigmoid(-self.args[0])

    def _eval_is_extended_negative(self):
        return self.args[0].is_extended_real or None

    def _eval_is_real(self):
        return self.args[0].is_real or None


class softplus(sp.Function):
    def fdiff(self, argindex=1):
        return sigmoid(self.args[0])

    def _eval_is_extended_positive(self):
        return self.args[0].is_extended_real or None

    def _eval_is_real(self):
        return self.args[0].is_real or None


class relu(sp.Function):
    def _eval_is_real(self):
        return self.args[0].is_real or None

    def fdiff(self, argindex=1):
        return sp.Heaviside(self.args[0], 0)


class elu(sp.Function):
    def _eval_is_real(self):
        return self.args[0].is_real or None

    def fdiff(self, argindex=1):
        x = self.args[0]
        return sp.Piecewise((1, x > 0), (sp.exp(x), True))


class silu(sp.Function):
    def _eval_is_real(self):
        return self.args[0].is_real or None

    def fdiff(self, argindex=1):
        x = self.args[0]
        s = sigmoid(x)
        return s * (1 + x * (1 - s))


class rsqrt(sp.Function):
    def fdiff(self, argindex=1):
        return -rsqrt(self.args[0]) ** 3 / 2


# Vector-to-vector and vector-to-scalar functions. Their arguments are vector expressions;
# they are opaque to sympy (derivatives are structural and handled by the emitters).
class l2norm(sp.Function):
    """x / sqrt(sum(x*x) + eps): a vector of the same dim."""


class dot(sp.Function):
    """sum_i x[i] * y[i]: a scalar."""


class vsum(sp.Function):
    """sum_i x[i]: a scalar."""


ELEMENTWISE_SYMPY = {
    "exp": sp.exp,
    "log": sp.log,
    "sqrt": sp.sqrt,
    "abs": sp.Abs,
    "tanh": sp.tanh,
    "sigmoid": sigmoid,
    "logsigmoid": logsigmoid,
    "softplus": softplus,
    "relu": relu,
    "elu": elu,
    "silu": silu,
    "rsqrt": rsqrt,
}

SCALAR_REDUCTIONS = (dot, vsum)


def symbol(name: str) -> sp.Symbol:
    return sp.Symbol(name, real=True)


# Powers of sums above this degree stay unexpanded in normal forms: (1 + q) ** 3 ** 3 ** 3
# (degree 7.6e12) kept sympy's multinomial expansion busy for good, and degree 50 of a
# four-term sum is already 23,426 terms. Such a power of a state is not linear in it either
# way, and the analysis still sees the state inside it.
EXPAND_MAX_DEGREE = 8


def normalize(expr: sp.Expr) -> sp.Expr:
    """One canonical representative of an algebraic value: expand products over sums,
    then merge exponentials (`exp(a) * exp(b)` -> `exp(a + b)`). Powers of sums of a degree
    over EXPAND_MAX_DEGREE are kept as they are."""
    high = {p: sp.Dummy() for p in expr.atoms(sp.Pow)
            if p.base.is_Add and p.exp.is_Integer and abs(p.exp) > EXPAND_MAX_DEGREE}
    if not high:
        return sp.powsimp(sp.expand(expr), combine="exp")
    kept = sp.powsimp(sp.expand(expr.xreplace(high)), combine="exp")
    return kept.xreplace({d: p for p, d in high.items()})


def nesting(expr: sp.Expr) -> int:
    """How deep function applications nest in `expr`: 0 for a polynomial, 2 for exp(exp(x))."""
    deepest, stack = 0, [(expr, 0)]
    while stack:
        e, depth = stack.pop()
        if isinstance(e, sp.Function):
            depth += 1
            deepest = max(deepest, depth)
        stack.extend((a, depth) for a in e.args)
    return deepest


def take_log(expr: sp.Expr) -> sp.Expr:
    """log(expr), pushed through products, powers, exp and sigmoid so that gates land
    in log space in their stable form (`log(sigmoid(f))` -> `logsigmoid(f)`)."""
    if isinstance(expr, sp.Mul):
        return sp.Add(*(take_log(f) for f in expr.args))
    if isinstance(expr, sp.Pow):
        return expr.exp * take_log(expr.base)
    if isinstance(expr, sp.exp):
        return expr.args[0]
    if isinstance(expr, sigmoid):
        return logsigmoid(expr.args[0])
    return sp.log(expr)
