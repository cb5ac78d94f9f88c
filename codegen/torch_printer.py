"""Print sympy expressions (symbols.py vocabulary) as PyTorch code.

Conventions of the generated code: every per-token value is a tensor [B, T, H, D] where
D is the vector dim or 1 for a scalar, so scalars broadcast against vectors exactly as
in the spec language; weights are [1, 1, H, D] views; params are Python floats.
"""
from __future__ import annotations

import sympy as sp

from .symbols import (
    dot, elu, l2norm, logsigmoid, relu, rsqrt, sigmoid, silu, softplus, vsum,
)

L2NORM_EPS = 1e-6  # must match the reference: x * rsqrt(sum(x * x) + eps)

_FUNCS = {
    sp.exp: "torch.exp",
    sp.log: "torch.log",
    sp.tanh: "torch.tanh",
    sp.Abs: "torch.abs",
    sp.sign: "torch.sign",
    sigmoid: "torch.sigmoid",
    logsigmoid: "F.logsigmoid",
    softplus: "F.softplus",
    relu: "torch.relu",
    elu: "F.elu",
    silu: "F.silu",
    rsqrt: "torch.rsqrt",
}

# binding strength, for minimal parentheses
_PREC_ADD, _PREC_MUL, _PREC_UNARY, _PREC_POW, _PREC_ATOM = 1, 2, 3, 4, 5


def torch_code(expr: sp.Expr) -> str:
    return _print(sp.sympify(expr))[0]


def torch_factor(expr: sp.Expr) -> str:
    """Code for `expr` as the right operand of `*` (parenthesised only when needed)."""
    return _wrap(_print(sp.sympify(expr)), _PREC_POW)


def _wrap(pair: tuple[str, int], need: int) -> str:
    text, prec = pair
    return f"({text})" if prec < need else text


def _print(e: sp.Expr) -> tuple[str, int]:
    if isinstance(e, sp.Symbol):
        return e.name, _PREC_ATOM
    if isinstance(e, sp.Integer):
        return (str(int(e)), _PREC_ATOM) if e >= 0 else (str(int(e)), _PREC_UNARY)
    if isinstance(e, sp.Rational):
        value = f"{float(e)!r}" if e.q in (2, 4, 8, 16, 32, 64, 5, 10, 20, 100) else f"{int(e.p)} / {int(e.q)}"
        return value, (_PREC_ATOM if "/" not in value and e >= 0 else _PREC_MUL)
    if isinstance(e, sp.Float):
        v = float(e)
        return repr(v), (_PREC_ATOM if v >= 0 else _PREC_UNARY)
    if isinstance(e, sp.Add):
        terms = sorted(e.args, key=lambda a: (a.could_extract_minus_sign(), sp.default_sort_key(a)))
        out = _wrap(_print(terms[0]), _PREC_ADD)
        for t in terms[1:]:
            if t.could_extract_minus_sign():
                out += " - " + _wrap(_print(-t), _PREC_MUL)
            else:
                out += " + " + _wrap(_print(t), _PREC_ADD)
        return out, _PREC_ADD
    if isinstance(e, sp.Mul):
        if e.could_extract_minus_sign():
            return "-" + _wrap(_print(-e), _PREC_POW), _PREC_UNARY
        num, den = [], []
        for f in e.args:
            if isinstance(f, sp.Pow) and f.exp.is_number and f.exp < 0:
                den.append(f.base ** -f.exp)
            elif isinstance(f, sp.Rational) and f.p == 1 and f.q != 1:
                den.append(sp.Integer(f.q))
            else:
                num.append(f)
        text = " * ".join(_wrap(_print(f), _PREC_MUL) for f in num) if num else "1"
        for d in den:
            text += " / " + _wrap(_print(d), _PREC_POW)
        return text, _PREC_MUL
    if isinstance(e, sp.Pow):
        base, exp = e.args
        if exp == sp.Rational(1, 2):
            return f"torch.sqrt({_print(base)[0]})", _PREC_ATOM
        if exp == -sp.Rational(1, 2):
            return f"torch.rsqrt({_print(base)[0]})", _PREC_ATOM
        if exp == -1:
            return f"1 / {_wrap(_print(base), _PREC_POW)}", _PREC_MUL
        return f"{_wrap(_print(base), _PREC_ATOM)} ** {_wrap(_print(exp), _PREC_ATOM)}", _PREC_POW
    if isinstance(e, sp.Heaviside):
        x = _print(e.args[0])[0]
        return f"torch.heaviside({x}, torch.zeros_like({x}))", _PREC_ATOM
    if isinstance(e, sp.Piecewise):
        *cases, (otherwise, _) = e.args
        text = _print(otherwise)[0]
        for value, cond in reversed(cases):
            text = f"torch.where({_relation(cond)}, {_print(value)[0]}, {text})"
        return text, _PREC_ATOM
    if isinstance(e, l2norm):
        return f"l2norm({_print(e.args[0])[0]})", _PREC_ATOM
    if isinstance(e, dot):
        a, b = (_wrap(_print(x), _PREC_MUL) for x in e.args)
        return f"({a} * {b}).sum(-1, keepdim=True)", _PREC_ATOM
    if isinstance(e, vsum):
        return f"{_wrap(_print(e.args[0]), _PREC_ATOM)}.sum(-1, keepdim=True)", _PREC_ATOM
    for fn, name in _FUNCS.items():
        if isinstance(e, fn):
            return f"{name}({_print(e.args[0])[0]})", _PREC_ATOM
    raise NotImplementedError(f"no PyTorch printing for {type(e).__name__}: {e}")


def _relation(cond) -> str:
    ops = {sp.StrictGreaterThan: ">", sp.GreaterThan: ">=", sp.StrictLessThan: "<",
           sp.LessThan: "<="}
    for kind, op in ops.items():
        if isinstance(cond, kind):
            return f"{_wrap(_print(cond.lhs), _PREC_ADD)} {op} {_wrap(_print(cond.rhs), _PREC_ADD)}"
    raise NotImplementedError(f"no PyTorch printing for the condition {cond}")
