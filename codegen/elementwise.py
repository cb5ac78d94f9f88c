"""Elementwise programs and their derivatives, from sympy, emitted as code.

The prologue (feature maps, gates in log space, kernel operands) and the epilogue (readout
combinators) of a plan are per-token expressions of the inputs. They become a straight-
line program of named steps, `t = expr(earlier names)`, where each step is either
elementwise or one of the vector reductions `l2norm`, `dot`, `sum`. The backward is the
same program run in reverse: for an elementwise step, `d arg += d t * diff(expr, arg)`
with the partial derivative computed by sympy and printed as code; for a reduction, its
known vector-Jacobian product. Nothing is differentiated by hand per variant, and no
autograd tape is built over the elementwise parts.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from .symbols import dot, l2norm, symbol, vsum
from .torch_printer import torch_code, torch_factor

_REDUCTIONS = (l2norm, dot, vsum)


@dataclass(frozen=True)
class Step:
    target: sp.Symbol
    expr: sp.Expr

    @property
    def is_reduction(self) -> bool:
        return isinstance(self.expr, _REDUCTIONS)


@dataclass(frozen=True)
class Program:
    inputs: tuple[sp.Symbol, ...]        # differentiable tensor inputs
    constants: tuple[sp.Symbol, ...]     # Python floats (params): no gradient
    steps: tuple[Step, ...]
    outputs: tuple[tuple[str, sp.Symbol], ...]   # (output name, the step or input holding it)


def build_program(outputs: list[tuple[str, sp.Expr]], inputs: list[sp.Symbol],
                  constants: list[sp.Symbol], prefix: str = "t") -> Program:
    """Straight-line program computing `outputs` from `inputs` (and float `constants`)."""
    steps: list[Step] = []
    counter = iter(range(10**9))
    known: dict[sp.Expr, sp.Symbol] = {}

    def new(expr: sp.Expr) -> sp.Symbol:
        if expr in known:
            return known[expr]
        sym = symbol(f"{prefix}{next(counter)}")
        steps.append(Step(sym, expr))
        known[expr] = sym
        return sym

    def lift(expr: sp.Expr) -> sp.Expr:
        """Rewrite with every reduction computed by its own step over symbol arguments."""
        if isinstance(expr, sp.Symbol) or not expr.args:
            return expr
        args = [lift(a) for a in expr.args]
        if isinstance(expr, _REDUCTIONS):
            args = [a if isinstance(a, sp.Symbol) else new(a) for a in args]
            return new(expr.func(*args))
        return expr.func(*args)

    lifted = [(name, lift(e)) for name, e in outputs]
    # common elementwise subexpressions become steps too, so forward and backward share them
    temps, reduced = sp.cse([e for _, e in lifted], symbols=sp.numbered_symbols(f"{prefix}c"),
                            optimizations="basic")
    for sym, expr in temps:
        sym = symbol(sym.name)
        steps.append(Step(sym, expr))
    result = []
    for (name, _), expr in zip(lifted, reduced):
        target = expr if isinstance(expr, sp.Symbol) else new(expr)
        result.append((name, symbol(target.name)))
    steps = [Step(symbol(s.target.name), s.expr.xreplace(
        {x: symbol(x.name) for x in s.expr.free_symbols})) for s in steps]
    return Program(tuple(inputs), tuple(constants), tuple(steps), tuple(result))


def forward_lines(program: Program) -> list[str]:
    return [f"{s.target.name} = {torch_code(s.expr)}" for s in program.steps]


def backward_lines(program: Program) -> list[str]:
    """Lines computing `d_<input>` from `d_<output step>` (all names in scope).

    Every gradient variable starts as None (no contribution yet); `unbroadcast(g, x)`
    sums `g` down to the shape of `x` (scalars are [..., 1], weights [1, 1, H, D]).
    """
    lines: list[str] = []
    differentiable = set(program.inputs) | {s.target for s in program.steps}
    for step in reversed(program.steps):
        g = f"d_{step.target.name}"
        body: list[str] = []
        expr = step.expr
        if isinstance(expr, l2norm):
            (x,) = expr.args
            y = step.target.name
            body.append(f"{_acc(x)}({g} - {y} * ({g} * {y}).sum(-1, keepdim=True))"
                        f" * torch.rsqrt(({x.name} * {x.name}).sum(-1, keepdim=True)"
                        f" + L2NORM_EPS), {x.name})")
        elif isinstance(expr, dot):
            x, y = expr.args
            for a, b in ((x, y), (y, x)):
                if a in differentiable:
                    body.append(f"{_acc(a)}{g} * {b.name}, {a.name})")
        elif isinstance(expr, vsum):
            (x,) = expr.args
            body.append(f"{_acc(x)}{g}.expand_as({x.name}), {x.name})")
        else:
            for arg in sorted(expr.free_symbols & differentiable, key=lambda s: s.name):
                partial = sp.diff(expr, arg)
                if partial == 0:
                    continue
                factor = "" if partial == 1 else f" * {torch_factor(partial)}"
                body.append(f"{_acc(arg)}{g}{factor}, {arg.name})")
        if body:
            lines.append(f"if {g} is not None:")
            lines.extend("    " + b for b in body)
    return lines


def _acc(sym: sp.Symbol) -> str:
    return f"d_{sym.name} = accumulate(d_{sym.name}, "

