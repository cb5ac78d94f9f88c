"""Print sympy expressions (symbols.py vocabulary) as PyTorch code.

Conventions of the generated code: every per-token value is a tensor [B, T, H, D] where
D is the vector dim or 1 for a scalar, so scalars broadcast against vectors exactly as
in the spec language; weights are [1, 1, H, D] views; params are Python floats.

`CodePrinter` holds what every target language shares (operators, precedence, minimal
parentheses, powers); a target overrides how symbols, numbers, functions and the
reductions read. codegen/triton_printer.py is the other target.
"""
from __future__ import annotations

import sympy as sp

from .reference import L2NORM_EPS  # noqa: F401  (re-exported: the plan module's epsilon)
from .symbols import (
    dot, elu, l2norm, logsigmoid, relu, rsqrt, sigmoid, silu, softplus, vsum,
)

# binding strength, for minimal parentheses
PREC_ADD, PREC_MUL, PREC_UNARY, PREC_POW, PREC_ATOM = 1, 2, 3, 4, 5

_RELATIONS = {sp.StrictGreaterThan: ">", sp.GreaterThan: ">=", sp.StrictLessThan: "<",
              sp.LessThan: "<="}


_EXACT_INTEGERS = 2**53  # the integers a float64 holds exactly


def wrap(pair: tuple[str, int], need: int) -> str:
    text, prec = pair
    return f"({text})" if prec < need else text


class CodePrinter:
    """Sympy -> code in a Python-syntax target. `print(e)` returns (text, precedence)."""

    target = "PyTorch"
    functions: dict = {}

    def code(self, expr: sp.Expr) -> str:
        return self.print(sp.sympify(expr))[0]

    def factor(self, expr: sp.Expr) -> str:
        """Code for `expr` as the right operand of `*` (parenthesised only when needed)."""
        return wrap(self.print(sp.sympify(expr)), PREC_POW)

    def print(self, e: sp.Expr) -> tuple[str, int]:
        if isinstance(e, sp.Symbol):
            return self.symbol(e), PREC_ATOM
        if isinstance(e, sp.Integer):
            return self.integer(int(e)), (PREC_ATOM if e >= 0 else PREC_UNARY)
        if isinstance(e, sp.Rational):
            return self.rational(e)
        if isinstance(e, sp.Float):
            v = float(e)
            return repr(v), (PREC_ATOM if v >= 0 else PREC_UNARY)
        if isinstance(e, sp.Add):
            return self.add(e)
        if isinstance(e, sp.Mul):
            return self.mul(e)
        if isinstance(e, sp.Pow):
            return self.pow(e)
        if isinstance(e, sp.Heaviside):
            return self.heaviside(self.code(e.args[0])), PREC_ATOM
        if isinstance(e, sp.Piecewise):
            *cases, (otherwise, _) = e.args
            text = self.code(otherwise)
            for value, cond in reversed(cases):
                text = self.where(self.relation(cond), self.code(value), text)
            return text, PREC_ATOM
        if isinstance(e, (l2norm, dot, vsum)):
            return self.reduction(e), PREC_ATOM
        for fn, name in self.functions.items():
            if isinstance(e, fn):
                return name.format(x=self.argument(e.args[0])), PREC_ATOM
        raise NotImplementedError(f"no {self.target} printing for {type(e).__name__}: {e}")

    # ------------------------------------------------------------------ shared structure
    def add(self, e: sp.Add) -> tuple[str, int]:
        terms = sorted(e.args, key=lambda a: (a.could_extract_minus_sign(), sp.default_sort_key(a)))
        out = wrap(self.print(terms[0]), PREC_ADD)
        for t in terms[1:]:
            if t.could_extract_minus_sign():
                out += " - " + wrap(self.print(-t), PREC_MUL)
            else:
                out += " + " + wrap(self.print(t), PREC_ADD)
        return out, PREC_ADD

    def mul(self, e: sp.Mul) -> tuple[str, int]:
        if e.could_extract_minus_sign():
            return "-" + wrap(self.print(-e), PREC_POW), PREC_UNARY
        num, den = [], []
        for f in e.args:
            if isinstance(f, sp.Pow) and f.exp.is_number and f.exp < 0:
                den.append(f.base ** -f.exp)
            elif isinstance(f, sp.Rational) and f.p == 1 and f.q != 1:
                den.append(sp.Integer(f.q))
            else:
                num.append(f)
        text = " * ".join(wrap(self.print(f), PREC_MUL) for f in num) if num else self.integer(1)
        for d in den:
            text += " / " + wrap(self.print(d), PREC_POW)
        return text, PREC_MUL

    def relation(self, cond) -> str:
        for kind, op in _RELATIONS.items():
            if isinstance(cond, kind):
                return (f"{wrap(self.print(cond.lhs), PREC_ADD)} {op} "
                        f"{wrap(self.print(cond.rhs), PREC_ADD)}")
        raise NotImplementedError(f"no {self.target} printing for the condition {cond}")

    # ------------------------------------------------------------------ target hooks
    def symbol(self, s: sp.Symbol) -> str:
        return s.name

    def integer(self, n: int) -> str:
        # beyond 2 ** 53 a float is as exact, and torch takes no Python int beyond int64
        return str(n) if abs(n) <= _EXACT_INTEGERS else f"{float(n)!r}"

    def rational(self, e: sp.Rational) -> tuple[str, int]:
        decimal = e.q in (2, 4, 8, 16, 32, 64, 5, 10, 20, 100) or max(abs(e.p), e.q) > _EXACT_INTEGERS
        value = f"{float(e)!r}" if decimal else f"{int(e.p)} / {int(e.q)}"
        return value, (PREC_ATOM if "/" not in value and e >= 0 else PREC_MUL)

    def pow(self, e: sp.Pow) -> tuple[str, int]:
        base, exp = e.args
        if exp == sp.Rational(1, 2):
            return f"torch.sqrt({self.code(base)})", PREC_ATOM
        if exp == -sp.Rational(1, 2):
            return f"torch.rsqrt({self.code(base)})", PREC_ATOM
        if exp == -1:
            return f"1 / {wrap(self.print(base), PREC_POW)}", PREC_MUL
        text = f"{wrap(self.print(base), PREC_ATOM)} ** {wrap(self.print(exp), PREC_ATOM)}"
        return text, PREC_POW

    def argument(self, e: sp.Expr) -> str:
        """Code for the argument of an elementwise function."""
        return self.code(e)

    def heaviside(self, x: str) -> str:
        return f"torch.heaviside({x}, torch.zeros_like({x}))"

    def where(self, cond: str, value: str, otherwise: str) -> str:
        return f"torch.where({cond}, {value}, {otherwise})"

    def reduction(self, e) -> str:
        if isinstance(e, l2norm):
            return f"l2norm({self.code(e.args[0])})"
        if isinstance(e, dot):
            a, b = (wrap(self.print(x), PREC_MUL) for x in e.args)
            return f"({a} * {b}).sum(-1, keepdim=True)"
        return f"{wrap(self.print(e.args[0]), PREC_ATOM)}.sum(-1, keepdim=True)"


class TorchPrinter(CodePrinter):
    functions = {
        sp.exp: "torch.exp({x})",
        sp.log: "torch.log({x})",
        sp.tanh: "torch.tanh({x})",
        sp.Abs: "torch.abs({x})",
        sp.sign: "torch.sign({x})",
        sigmoid: "torch.sigmoid({x})",
        logsigmoid: "F.logsigmoid({x})",
        softplus: "F.softplus({x})",
        relu: "torch.relu({x})",
        elu: "F.elu({x})",
        silu: "F.silu({x})",
        rsqrt: "torch.rsqrt({x})",
    }

    def __init__(self, scalars: frozenset[str] = frozenset()):
        self.scalars = scalars  # names of symbols that are Python floats (params)

    def argument(self, e: sp.Expr) -> str:
        # torch's functions take tensors only: an argument made of numbers and params
        # (log(2) in log(sigmoid(g) / 2), exp(scale)) gets a scalar tensor, which leaves
        # the result's dtype alone
        code = self.code(e)
        if any(s.name not in self.scalars for s in e.free_symbols):
            return code
        return f"torch.as_tensor({code}, dtype=torch.float64)"


_TORCH = TorchPrinter()


def torch_code(expr: sp.Expr, scalars: frozenset[str] = frozenset()) -> str:
    """PyTorch code for `expr`; `scalars` names the symbols that are Python floats."""
    return (TorchPrinter(scalars) if scalars else _TORCH).code(expr)


def torch_factor(expr: sp.Expr, scalars: frozenset[str] = frozenset()) -> str:
    """Code for `expr` as the right operand of `*` (parenthesised only when needed)."""
    return (TorchPrinter(scalars) if scalars else _TORCH).factor(expr)
