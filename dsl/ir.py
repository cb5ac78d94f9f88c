"""The attnc IR: frozen dataclasses shared by every front end.

Both the `.attn` parser and the decorator tracer build these nodes; everything after
them (checks, analysis, reference, code generation) reads only these nodes.

Source spans ride along on every node but never take part in equality or hashing, so
`parse(pretty(spec)) == spec` holds although positions differ.

Semantics (per token t, per head):
  dims     names bound from input tensor sizes at call time (K, V, ...)
  inputs   per-token tensors: `q[K]` is [B, T, H, K] at call time, `alpha` (no shape)
           is a per-token scalar [B, T, H]
  params   call-time scalars with a default expression (may use dims): `scale = K ** -0.5`
  weights  learnable per-head tensors: `D` -> [H], `u[K]` -> [H, K], `A[K, V]` -> [H, K, V]
  states   per-head recurrent tensors: `S[K, V]` -> [B, H, K, V], `z[K]` -> [B, H, K]
  statements run in order once per step:
    feature x = e    per-token value (may rebind an input name, e.g. `feature q = l2norm(q)`)
    gate    a = e    per-token value used as a decay (the analysis takes its log)
    decay   S = e    rewrites state S (e is usually `a * S` or `diag(a) @ S`)
    update  S = e    rewrites state S
    readout o = e    defines output o from the current state values
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

Shape = tuple[str, ...]  # () scalar, ("K",) vector, ("K", "V") matrix


@dataclass(frozen=True)
class Span:
    file: str
    line: int
    col: int
    end_line: int
    end_col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


def _span() -> Span | None:
    return field(default=None, compare=False, hash=False, repr=False)


# ---------------------------------------------------------------- expressions
@dataclass(frozen=True)
class Num:
    value: Union[int, float]
    span: Span | None = _span()


@dataclass(frozen=True)
class Name:
    id: str
    span: Span | None = _span()


@dataclass(frozen=True)
class Unary:
    op: str  # "-" (unary plus is dropped by the parser)
    operand: "Expr"
    span: Span | None = _span()


@dataclass(frozen=True)
class Binary:
    op: str  # one of BINARY_OPS
    left: "Expr"
    right: "Expr"
    span: Span | None = _span()


@dataclass(frozen=True)
class Call:
    func: str  # one of FUNCTIONS
    args: tuple["Expr", ...]
    span: Span | None = _span()


Expr = Union[Num, Name, Unary, Binary, Call]

BINARY_OPS = ("+", "-", "*", "/", "**", "@")

# elementwise functions of one argument (scalar or vector; matrices too)
ELEMENTWISE = (
    "exp", "log", "sigmoid", "logsigmoid", "softplus", "tanh", "relu", "elu",
    "silu", "sqrt", "rsqrt", "abs",
)
# structural functions: name -> number of arguments
STRUCTURAL = {"outer": 2, "diag": 1, "sum": 1, "l2norm": 1}
FUNCTIONS = {**{f: 1 for f in ELEMENTWISE}, **STRUCTURAL}


# ---------------------------------------------------------------- declarations
@dataclass(frozen=True)
class Dim:
    name: str
    span: Span | None = _span()


@dataclass(frozen=True)
class Input:
    name: str
    shape: Shape
    span: Span | None = _span()


@dataclass(frozen=True)
class Param:
    name: str
    default: Expr
    span: Span | None = _span()


@dataclass(frozen=True)
class Weight:
    name: str
    shape: Shape
    span: Span | None = _span()


@dataclass(frozen=True)
class State:
    name: str
    shape: Shape
    span: Span | None = _span()


STATEMENT_KINDS = ("feature", "gate", "decay", "update", "readout")


@dataclass(frozen=True)
class Statement:
    kind: str  # one of STATEMENT_KINDS
    target: str
    expr: Expr
    span: Span | None = _span()


@dataclass(frozen=True)
class Spec:
    name: str
    dims: tuple[Dim, ...]
    inputs: tuple[Input, ...]
    params: tuple[Param, ...]
    weights: tuple[Weight, ...]
    states: tuple[State, ...]
    statements: tuple[Statement, ...]
    doc: str = field(default="", compare=False, hash=False)  # leading comment lines
    source: str = field(default="", compare=False, hash=False, repr=False)
    filename: str = field(default="<spec>", compare=False, hash=False, repr=False)
    span: Span | None = _span()

    def __hash__(self) -> int:
        """Hashed once (the compared fields), not on every call: the runtime's module
        tables are keyed by spec, and a decode step looks them up once per token."""
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash((self.name, self.dims, self.inputs, self.params, self.weights,
                           self.states, self.statements))
            object.__setattr__(self, "_hash", cached)
        return cached

    def __getstate__(self) -> dict:  # string hashes differ between processes
        return {k: v for k, v in self.__dict__.items() if k != "_hash"}

    # convenience lookups (derived, never stored)
    @property
    def outputs(self) -> tuple[str, ...]:
        seen: list[str] = []
        for st in self.statements:
            if st.kind == "readout" and st.target not in seen:
                seen.append(st.target)
        return tuple(seen)

    def state(self, name: str) -> State:
        return next(s for s in self.states if s.name == name)

    def input(self, name: str) -> Input:
        return next(i for i in self.inputs if i.name == name)
