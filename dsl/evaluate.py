"""Evaluating scalar IR expressions to Python floats: param defaults (`K ** -0.5`) and
constant folding. Float twins of the language's elementwise functions, with torch's
semantics."""
from __future__ import annotations

import math
from typing import Callable, Mapping

from .ir import Binary, Call, Expr, Name, Num, Unary


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _softplus(x: float) -> float:
    # torch.nn.functional.softplus: identity above its threshold 20
    return x if x > 20 else math.log1p(math.exp(x))


# Python-float twins of the IR's elementwise functions (torch semantics), for param defaults.
SCALAR_FUNCTIONS: dict[str, Callable[[float], float]] = {
    "exp": math.exp,
    "log": math.log,
    "sigmoid": _sigmoid,
    "logsigmoid": lambda x: -_softplus(-x),
    "softplus": _softplus,
    "tanh": math.tanh,
    "relu": lambda x: max(x, 0.0),
    "elu": lambda x: x if x > 0 else math.expm1(x),
    "silu": lambda x: x * _sigmoid(x),
    "sqrt": math.sqrt,
    "rsqrt": lambda x: 1.0 / math.sqrt(x),
    "abs": abs,
}

_SCALAR_OPS: dict[str, Callable[[float, float], float]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: a / b,
    "**": lambda a, b: a ** b,
}


def evaluate_scalar(expr: Expr, env: Mapping[str, float]) -> float:
    """Evaluate a param default: numbers, dims, earlier params and scalar functions."""
    if isinstance(expr, Num):
        return float(expr.value)
    if isinstance(expr, Name):
        if expr.id not in env:
            raise ValueError(f"`{expr.id}` is not a dim or an earlier param")
        return float(env[expr.id])
    if isinstance(expr, Unary):
        return -evaluate_scalar(expr.operand, env)
    if isinstance(expr, Binary):
        if expr.op not in _SCALAR_OPS:
            raise ValueError(f"`{expr.op}` needs vectors or matrices, not scalars")
        left = evaluate_scalar(expr.left, env)
        right = evaluate_scalar(expr.right, env)
        result = _SCALAR_OPS[expr.op](left, right)
        if isinstance(result, complex):
            raise ValueError(f"{left} ** {right} is not a real number")
        return float(result)
    if isinstance(expr, Call):
        if expr.func not in SCALAR_FUNCTIONS:
            raise ValueError(f"`{expr.func}` is not a scalar function")
        return float(SCALAR_FUNCTIONS[expr.func](evaluate_scalar(expr.args[0], env)))
    raise ValueError(f"cannot evaluate {type(expr).__name__} as a number")
