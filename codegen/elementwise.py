"""Elementwise programs and their derivatives, from sympy, emitted as code.

The prologue (feature maps, gates in log space, kernel operands) and the epilogue (readout
combinators) of a plan are per-token expressions of the inputs. They become a straight-
line program of named steps, `t = expr(earlier names)`, where each step is either
elementwise or one of the vector reductions `l2norm`, `dot`, `sum`. The backward is the
same program run in reverse: for an elementwise step, `d arg += d t * diff(expr, arg)`
with the partial derivative computed by sympy and printed as code; for a reduction, its
known vector-Jacobian product. Nothing is differentiated by hand per variant, and no
autograd tape is built over the elementwise parts.

`gradient_terms` is that reverse pass as data (which term reaches which cotangent);
`backward_lines` prints it as PyTorch (the plan's Prologue / Epilogue) and
codegen/emit_elementwise.py as fused Triton kernels, so the two never diverge.
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
    scalars = frozenset(c.name for c in program.constants)
    return [f"{s.target.name} = {torch_code(s.expr, scalars)}" for s in program.steps]


@dataclass(frozen=True)
class Term:
    """One contribution to a cotangent, `d_<target> += <term>`, where the term is

        "chain"   d_<source> * factor     (factor: a partial derivative, from sympy)
        "sum"     d_<source> broadcast over the dim of <target>   (the VJP of vsum)
        "l2norm"  the VJP of <source> = l2norm(<target>) applied to d_<source>

    `source` is the step whose cotangent flows back. Every emitter of a backward prints
    these terms; none differentiates anything itself, so the PyTorch and the Triton
    backward of one program are the same derivation printed twice.
    """
    target: sp.Symbol
    source: sp.Symbol
    rule: str
    factor: sp.Expr = sp.Integer(1)


def gradient_terms(program: Program) -> list[tuple[Step, list[Term]]]:
    """The reverse pass: for each step, last first, the terms it adds to the cotangents
    of its arguments (steps or inputs). A step's cotangent is complete when its turn
    comes, since every step that reads it comes later in the program."""
    differentiable = set(program.inputs) | {s.target for s in program.steps}
    walk: list[tuple[Step, list[Term]]] = []
    for step in reversed(program.steps):
        expr, t = step.expr, step.target
        terms: list[Term] = []
        if isinstance(expr, l2norm):
            (x,) = expr.args
            terms.append(Term(x, t, "l2norm"))
        elif isinstance(expr, dot):
            x, y = expr.args
            for a, b in ((x, y), (y, x)):
                if a in differentiable:
                    terms.append(Term(a, t, "chain", b))
        elif isinstance(expr, vsum):
            (x,) = expr.args
            terms.append(Term(x, t, "sum"))
        else:
            for arg in sorted(expr.free_symbols & differentiable, key=lambda s: s.name):
                partial = sp.diff(expr, arg)
                if partial != 0:
                    terms.append(Term(arg, t, "chain", partial))
        walk.append((step, terms))
    return walk


def backward_lines(program: Program) -> list[str]:
    """PyTorch lines computing `d_<input>` from `d_<output step>` (all names in scope).

    Every gradient variable starts as None (no contribution yet); `unbroadcast(g, x)`
    sums `g` down to the shape of `x` (scalars are [..., 1], weights [1, 1, H, D]).
    """
    lines: list[str] = []
    scalars = frozenset(c.name for c in program.constants)
    for step, terms in gradient_terms(program):
        g = f"d_{step.target.name}"
        body = [f"d_{term.target.name} = accumulate(d_{term.target.name}, "
                f"{_torch_term(term, g, scalars)}, {term.target.name})" for term in terms]
        if body:
            lines.append(f"if {g} is not None:")
            lines.extend("    " + b for b in body)
    return lines


def _torch_term(term: Term, g: str, scalars: frozenset[str]) -> str:
    x = term.target.name
    if term.rule == "l2norm":
        y = term.source.name
        return (f"({g} - {y} * ({g} * {y}).sum(-1, keepdim=True))"
                f" * torch.rsqrt(({x} * {x}).sum(-1, keepdim=True) + L2NORM_EPS)")
    if term.rule == "sum":
        return f"{g}.expand_as({x})"
    return g if term.factor == 1 else f"{g} * {torch_factor(term.factor, scalars)}"
