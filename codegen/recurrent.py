"""The fused recurrent kernels: any spec, run token by token, emitted from its IR.

`render_recurrent(spec)` gives the source of a Python module with two Triton kernels and
their launchers (templates/recurrent.py.jinja):

    <spec>_recurrent_fwd   every statement of the spec, once per token, sequential in t,
                           one program per (split block, sequence x head); all states live
                           in registers as fp32 tiles; optionally stores the states every
                           CHECKPOINT tokens for the backward.
    <spec>_recurrent_bwd   reverse time, segment by segment: recompute the segment's
                           per-step states from its checkpoint into a scratch buffer, then
                           sweep backward through the vector-Jacobian product of every
                           statement in reverse order.

This is the training path of the classes with no chunk form (dplr, other) and the
decode (`step`) path of every class. Nothing here looks at a spec's name or class: the
statements are lowered to a straight-line program of tile operations (`_Lowering`), each
node printed as Triton code (`_forward_code`) and differentiated by one rule per node
kind (`_Backward`), elementwise functions by one derivative each (`DERIVATIVES`).

Tiles. Every dim d of the spec has a block `BLOCK_d` (its size rounded up to a power of
two) with offsets `offs_d` and a mask `mask_d`; a scalar is a 0-d value, a vector over d
a [BLOCK_d] tile, a matrix over (d, e) a [BLOCK_d, BLOCK_e] tile, and `diag(x)` stays the
vector x until something needs the dense matrix. Padded lanes may hold anything (exp(0)
= 1, log(0) = -inf): every reduction selects the valid lanes with `tl.where`, and every
store is masked, so they never reach a result.

Splitting. One dim (`split_dim`, V for S[K, V]) may be split over programs when no
statement reduces over it and no dense value carries it twice: each program then owns a
block of it and recomputes the values that do not depend on it. In the backward, the
cotangents of those split-free values are partial (this block's share); the VJP is
linear in cotangents, so the launcher sums the per-block partial gradients.
"""
from __future__ import annotations

import keyword
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..dsl import ir
from ..dsl.check import output_shapes
from ..dsl.printer import pretty_expr
from ..dsl.evaluate import evaluate_scalar
from .reference import L2NORM_EPS
from .templating import TEMPLATES, environment

TEMPLATE = TEMPLATES / "recurrent.py.jinja"

# elementwise function -> Triton code of f(x); helpers are defined in the template
FUNCTION_CODE = {
    "exp": "tl.exp({x})",
    "log": "tl.log({x})",
    "sigmoid": "_sigmoid({x})",
    "logsigmoid": "_logsigmoid({x})",
    "softplus": "_softplus({x})",
    "tanh": "_tanh({x})",
    "relu": "tl.maximum({x}, 0.0)",
    "elu": "_elu({x})",
    "silu": "_silu({x})",
    "sqrt": "tl.sqrt({x})",
    "rsqrt": "tl.rsqrt({x})",
    "abs": "tl.abs({x})",
}

# elementwise function -> f'(x), in terms of its argument x and its value y = f(x)
# (torch's conventions at the kinks: relu'(0) = 0, abs'(0) = 0)
DERIVATIVES = {
    "exp": "{y}",
    "log": "1.0 / {x}",
    "sigmoid": "{y} * (1.0 - {y})",
    "logsigmoid": "_sigmoid(-{x})",
    "softplus": "_sigmoid({x})",
    "tanh": "1.0 - {y} * {y}",
    "relu": "tl.where({x} > 0.0, 1.0, 0.0)",
    "elu": "tl.where({x} > 0.0, 1.0, {y} + 1.0)",
    "silu": "_silu_grad({x})",
    "sqrt": "0.5 / {y}",
    "rsqrt": "-0.5 * {y} * {y} * {y}",
    "abs": "tl.where({x} > 0.0, 1.0, tl.where({x} < 0.0, -1.0, 0.0))",
}

# Names the template itself uses inside the kernels; spec-derived names avoid them.
_TEMPLATE_NAMES = (
    "tl", "triton", "torch", "math", "range", "min", "max", "float", "int", "len",
    "i_split", "i_nh", "i_n", "i_h", "bos", "seq_len", "state_row", "first_segment",
    "n_segments", "segment", "seg_start", "seg_end", "t", "i", "j", "row", "program",
    "scratch_step", "T", "N", "ROWS", "H", "CHECKPOINT", "IS_VARLEN", "HAS_STATE_INDICES",
    "STORE_FINAL", "STORE_CHECKPOINTS", "cu_seqlens", "segment_offsets", "state_indices",
    "L2NORM_EPS", "_sigmoid", "_logsigmoid", "_softplus", "_tanh", "_elu", "_silu",
    "_silu_grad", "_expm1", "_log1p", "_first_split_only", "_sequence_bounds",
    "_first_segment",
)


class RecurrentRenderError(ValueError):
    """The spec uses something the recurrent template cannot express."""


# ---------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Kind:
    """How a value is held in registers.

    dims: () a scalar, (d,) a [BLOCK_d] vector, (d, e) a [BLOCK_d, BLOCK_e] tile.
    diag: the vector over dims[0] stands for the diagonal matrix diag(x)."""

    dims: tuple[str, ...]
    diag: bool = False

    @property
    def rank(self) -> int:
        return 2 if self.diag else len(self.dims)

    @property
    def shape(self) -> tuple[str, ...]:
        """The spec-level shape of the value."""
        return self.dims * 2 if self.diag else self.dims


SCALAR = Kind(())


@dataclass(frozen=True)
class Operand:
    """One argument of a node: a variable (`var` set: it has a cotangent) or a constant
    (a literal, with its `value`, or a param: `var` None)."""

    code: str
    kind: Kind
    var: str | None
    value: float | None = None


def _number(value: float) -> Operand:
    return Operand(_literal(value), SCALAR, None, float(value))


@dataclass(frozen=True)
class Node:
    """`var = op(args)`: one tile operation of a step.

    op: "add" "sub" "mul" "div" "pow" "neg" "matmul" "outer" "sum" "l2norm" "func"
        (elementwise `func`), "dense" (diag -> matrix), "fill" (scalar -> tile)."""

    var: str
    op: str
    args: tuple[Operand, ...]
    kind: Kind
    func: str = ""
    statement: int = -1


@dataclass
class StepProgram:
    """The statements of one step as tile operations, in order."""

    nodes: list[Node]
    inputs: dict[str, str]            # input name -> variable loaded each step
    weights: dict[str, str]           # weight name -> variable loaded once per program
    state_entry: dict[str, str]       # state name -> variable holding S_{t-1}
    state_exit: dict[str, str]        # state name -> variable holding S_t
    outputs: dict[str, Operand]       # output name -> its value
    statement_nodes: dict[int, list[Node]]
    reduced_dims: set[str]            # dims some node reduces over (or densifies twice)
    kinds: dict[str, Kind] = field(default_factory=dict)  # every variable's kind

    def producer(self) -> dict[str, Node]:
        return {node.var: node for node in self.nodes}

    def live(self, roots) -> set[str]:
        """Variables the values `roots` depend on (nodes and leaves)."""
        producers = self.producer()
        seen: set[str] = set()
        stack = [r for r in roots if r is not None]
        while stack:
            var = stack.pop()
            if var in seen:
                continue
            seen.add(var)
            node = producers.get(var)
            if node is not None:
                stack.extend(a.var for a in node.args if a.var is not None)
        return seen


class Names:
    """Unique Python identifiers for one rendered module."""

    def __init__(self, reserved=()):
        self.taken: set[str] = set(reserved)

    def take(self, preferred: str) -> str:
        name = preferred
        while name in self.taken or keyword.iskeyword(name):
            name += "_"
        self.taken.add(name)
        return name


def _literal(value: float) -> str:
    value = float(value)
    if math.isnan(value):
        return 'float("nan")'
    if math.isinf(value):
        return 'float("inf")' if value > 0 else '(-float("inf"))'
    text = repr(value)
    return f"({text})" if value < 0 else text


def _fold(expr: ir.Expr) -> ir.Expr:
    """Evaluate the pure-number subtrees, so every node has a tensor operand."""
    if isinstance(expr, (ir.Num, ir.Name)):
        return expr
    if isinstance(expr, ir.Unary):
        operand = _fold(expr.operand)
        if isinstance(operand, ir.Num):
            return ir.Num(-operand.value)
        return ir.Unary(expr.op, operand)
    if isinstance(expr, ir.Binary):
        left, right = _fold(expr.left), _fold(expr.right)
        if isinstance(left, ir.Num) and isinstance(right, ir.Num) and expr.op != "@":
            return ir.Num(evaluate_scalar(ir.Binary(expr.op, left, right), {}))
        return ir.Binary(expr.op, left, right)
    if isinstance(expr, ir.Call):
        args = tuple(_fold(a) for a in expr.args)
        if len(args) == 1 and isinstance(args[0], ir.Num) and expr.func in FUNCTION_CODE:
            return ir.Num(evaluate_scalar(ir.Call(expr.func, args), {}))
        return ir.Call(expr.func, args)
    raise TypeError(f"not an expression node: {expr!r}")


# ---------------------------------------------------------------------------------------
# Tile helpers (code strings)
# ---------------------------------------------------------------------------------------

class Tiles:
    """Code for offsets, masks, zeros and reductions of tiles of each kind."""

    def __init__(self, dim_names: dict[str, str]):
        self.size = dim_names                                  # dim -> its size constexpr
        self.block = {d: f"BLOCK_{n}" for d, n in dim_names.items()}
        self.offs = {d: f"offs_{n}" for d, n in dim_names.items()}
        self.mask_of = {d: f"mask_{n}" for d, n in dim_names.items()}

    def mask(self, dims) -> str | None:
        if not dims:
            return None
        if len(dims) == 1:
            return self.mask_of[dims[0]]
        return f"{self.mask_of[dims[0]]}[:, None] & {self.mask_of[dims[1]]}[None, :]"

    def offsets(self, dims) -> str | None:
        """Element offsets of a tile in a contiguous tensor of the full dims."""
        if not dims:
            return None
        if len(dims) == 1:
            return self.offs[dims[0]]
        return f"{self.offs[dims[0]]}[:, None] * {self.size[dims[1]]} + {self.offs[dims[1]]}[None, :]"

    def block_offsets(self, dims) -> str | None:
        """Offsets in a buffer laid out as the padded tile itself (scratch)."""
        if not dims:
            return None
        if len(dims) == 1:
            return f"tl.arange(0, {self.block[dims[0]]})"
        return (f"tl.arange(0, {self.block[dims[0]]})[:, None] * {self.block[dims[1]]} "
                f"+ tl.arange(0, {self.block[dims[1]]})[None, :]")

    def numel(self, dims) -> str:
        return " * ".join(self.size[d] for d in dims) if dims else "1"

    def block_numel(self, dims) -> str:
        return " * ".join(self.block[d] for d in dims) if dims else "1"

    def zeros(self, kind: Kind) -> str:
        return f"tl.zeros([{', '.join(self.block[d] for d in kind.dims)}], dtype=tl.float32)"

    def total(self, code: str, kind: Kind) -> str:
        """Sum over every valid lane: a scalar."""
        if not kind.dims:
            return code
        masked = f"tl.where({self.mask(kind.dims)}, {code}, 0.0)"
        if len(kind.dims) == 1:
            return f"tl.sum({masked}, 0)"
        return f"tl.sum(tl.sum({masked}, 1), 0)"

    def eye(self, dim: str) -> str:
        offs = self.offs[dim]
        return f"{offs}[:, None] == {offs}[None, :]"


# ---------------------------------------------------------------------------------------
# Lowering: statements -> nodes
# ---------------------------------------------------------------------------------------

class _Lowering:
    """Lowers each statement, in order, to nodes over variables. Inputs, weights and the
    states entering the step are leaves; a name rebound by a later statement (a feature
    rebinding an input, a decay then an update of S) gets a fresh variable, so that every
    version stays available to the backward."""

    def __init__(self, spec: ir.Spec, names: Names, params: dict[str, str]):
        self.spec = spec
        self.names = names
        self.nodes: list[Node] = []
        self.reduced: set[str] = set()
        self.kinds: dict[str, Kind] = {}
        self.values: dict[str, Operand] = {}
        self.inputs: dict[str, str] = {}
        self.weights: dict[str, str] = {}
        self.state_entry: dict[str, str] = {}
        self.statement = -1
        self.temp_count = 0
        for inp in spec.inputs:
            self.inputs[inp.name] = self._leaf(inp.name, Kind(inp.shape))
        for weight in spec.weights:
            self.weights[weight.name] = self._leaf(weight.name, Kind(weight.shape))
        for state in spec.states:
            self.state_entry[state.name] = self._leaf(state.name, Kind(state.shape))
        for param in spec.params:
            self.values[param.name] = Operand(params[param.name], SCALAR, None)

    def _leaf(self, name: str, kind: Kind) -> str:
        var = self.names.take(f"b_{name}")
        self.kinds[var] = kind
        self.values[name] = Operand(var, kind, var)
        return var

    def _temp(self) -> str:
        while True:
            name = f"e{self.temp_count}"
            self.temp_count += 1
            if name not in self.names.taken:
                return self.names.take(name)

    def _emit(self, op, args, kind, func="", var=None) -> Operand:
        var = var or self._temp()
        self.kinds[var] = kind
        self.nodes.append(Node(var, op, tuple(args), kind, func, self.statement))
        return Operand(var, kind, var)

    def run(self) -> StepProgram:
        statement_nodes: dict[int, list[Node]] = {}
        outputs: dict[str, Operand] = {}
        out_shapes = output_shapes(self.spec)
        for index, st in enumerate(self.spec.statements):
            self.statement = index
            first = len(self.nodes)
            expr = _fold(st.expr)
            if st.kind in ("feature", "gate"):
                value = self.lower(expr, name=f"b_{st.target}")
                self.values[st.target] = value
            elif st.kind in ("decay", "update"):
                # each version of a state gets a variable of its own (never an alias)
                kind = Kind(self.spec.state(st.target).shape)
                value = self.lower(expr, name=f"b_{st.target}")
                fresh = len(self.nodes) > first and self.nodes[-1].var == value.var
                value = self.fit(value, kind, f"b_{st.target}", fresh)
                self.values[st.target] = value
            else:  # readout
                kind = Kind(out_shapes[st.target])
                value = self.fit(self.lower(expr, name=f"b_{st.target}"), kind, f"b_{st.target}", True)
                outputs[st.target] = value
                self.values[st.target] = value
            statement_nodes[index] = self.nodes[first:]
        state_exit = {s.name: self.values[s.name].var for s in self.spec.states}
        return StepProgram(self.nodes, self.inputs, self.weights, self.state_entry, state_exit,
                           outputs, statement_nodes, self.reduced, self.kinds)

    def fit(self, value: Operand, kind: Kind, name: str, may_alias: bool) -> Operand:
        """`value` as a tile of exactly `kind` (a dense matrix, a scalar broadcast); a copy
        unless `may_alias`."""
        if value.kind.diag and kind.rank == 2:
            return self._emit("dense", [value], kind, var=self.names.take(name))
        if value.kind.rank == 0 and kind.rank > 0:
            return self._emit("fill", [value], kind, var=self.names.take(name))
        if value.kind != kind:
            raise RecurrentRenderError(f"a value of shape {list(value.kind.shape)} does not fit "
                                       f"shape {list(kind.shape)}")
        if may_alias and value.var is not None:
            return value
        return self._emit("add", [value, _number(0.0)], kind, var=self.names.take(name))

    def lower(self, expr: ir.Expr, name: str | None = None) -> Operand:
        """Lower `expr`; the top node takes the variable `name` (a fresh version)."""
        def top():
            return self.names.take(name) if name else None

        if isinstance(expr, ir.Num):
            if name is None:
                return _number(expr.value)
            return self._emit("fill", [_number(expr.value)], SCALAR, var=top())
        if isinstance(expr, ir.Name):
            return self.values[expr.id]  # an alias: no copy
        if isinstance(expr, ir.Unary):
            operand = self.lower(expr.operand)
            kind = operand.kind
            return self._emit("neg", [operand], kind, var=top())
        if isinstance(expr, ir.Binary):
            left, right = self.lower(expr.left), self.lower(expr.right)
            if expr.op == "@":
                return self._matmul(left, right, top())
            return self._elementwise(expr.op, left, right, top())
        if isinstance(expr, ir.Call):
            args = [self.lower(a) for a in expr.args]
            return self._call(expr.func, args, top())
        raise TypeError(f"not an expression node: {expr!r}")

    def _dense(self, value: Operand) -> Operand:
        if not value.kind.diag:
            return value
        return self._emit("dense", [value], Kind(value.kind.dims * 2))

    def _elementwise(self, op, left, right, var):
        name = {"+": "add", "-": "sub", "*": "mul", "/": "div", "**": "pow"}[op]
        lk, rk = left.kind, right.kind
        if op == "**":
            left = self._dense(left)
            return self._emit("pow", [left, right], left.kind, var=var)
        # diag stays diag where the dense result would be diagonal too
        if lk.diag and rk.diag and op in "+-*":
            return self._emit(name, [left, right], lk, var=var)
        if lk.diag and rk.rank == 0 and op in "*/":
            return self._emit(name, [left, right], lk, var=var)
        if rk.diag and lk.rank == 0 and op == "*":
            return self._emit(name, [left, right], rk, var=var)
        left, right = self._dense(left), self._dense(right)
        kind = left.kind if left.kind.rank else right.kind
        if left.kind.rank and right.kind.rank and left.kind != right.kind:
            raise RecurrentRenderError(f"`{op}` between shapes {list(left.kind.shape)} and {list(right.kind.shape)}")
        return self._emit(name, [left, right], kind, var=var)

    def _matmul(self, left, right, var):
        lk, rk = left.kind, right.kind
        if lk.diag and rk.diag:
            return self._emit("matmul", [left, right], lk, var=var)
        if lk.diag:
            return self._emit("matmul", [left, right], rk, var=var)
        if rk.diag:
            return self._emit("matmul", [left, right], lk, var=var)
        contracted = lk.dims[-1]
        self.reduced.add(contracted)
        kind = Kind(lk.dims[:-1] + rk.dims[1:])
        return self._emit("matmul", [left, right], kind, var=var)

    def _call(self, func, args, var):
        if func in FUNCTION_CODE:
            (x,) = args
            return self._emit("func", [self._dense(x)], self._dense(x).kind, func=func, var=var)
        if func == "outer":
            x, y = (self._dense(a) for a in args)
            return self._emit("outer", [x, y], Kind(x.kind.dims + y.kind.dims), var=var)
        if func == "diag":
            (x,) = args
            if var is None:
                return Operand(x.code, Kind(x.kind.dims, diag=True), x.var)
            # a named diag (feature d = diag(x)): a copy, still diagonal
            return self._emit("mul", [x, _number(1.0)], Kind(x.kind.dims, diag=True), var=var)
        if func == "sum":
            (x,) = args
            self.reduced.update(x.kind.dims)
            return self._emit("sum", [x], SCALAR, var=var)
        if func == "l2norm":
            (x,) = args
            self.reduced.update(x.kind.dims)
            return self._emit("l2norm", [x], x.kind, var=var)
        raise RecurrentRenderError(f"unknown function `{func}`")


# ---------------------------------------------------------------------------------------
# Forward code of one node
# ---------------------------------------------------------------------------------------

def _pow_code(x: str, exponent: Operand) -> str:
    """x ** exponent: exact products for small integer literals, sqrt / rsqrt for +-1/2,
    else exp(exponent * log(x)) (positive bases, as for any non-integer power)."""
    if exponent.value is not None:
        value = exponent.value
        if value == 0.5:
            return f"tl.sqrt({x})"
        if value == -0.5:
            return f"tl.rsqrt({x})"
        if value.is_integer() and abs(value) <= 4:
            n = int(abs(value))
            product = " * ".join([x] * n) if n else f"({x} * 0.0 + 1.0)"
            return f"(1.0 / ({product}))" if value < 0 else f"({product})"
    # general powers of positive bases
    return f"tl.exp({exponent.code} * tl.log({x}))"


def _forward_code(node: Node, tiles: Tiles) -> str:
    a = node.args
    op = node.op
    if op in ("add", "sub", "mul", "div"):
        symbol = {"add": "+", "sub": "-", "mul": "*", "div": "/"}[op]
        return f"{a[0].code} {symbol} {a[1].code}"
    if op == "neg":
        return f"-{a[0].code}"
    if op == "pow":
        return _pow_code(a[0].code, a[1])
    if op == "func":
        return FUNCTION_CODE[node.func].format(x=a[0].code)
    if op == "outer":
        return f"{a[0].code}[:, None] * {a[1].code}[None, :]"
    if op == "dense":
        return f"tl.where({tiles.eye(a[0].kind.dims[0])}, {a[0].code}[:, None], 0.0)"
    if op == "fill":
        return f"{a[0].code} + {tiles.zeros(node.kind)}"
    if op == "sum":
        return tiles.total(a[0].code, a[0].kind)
    if op == "l2norm":
        x = a[0].code
        return f"{x} * tl.rsqrt({tiles.total(f'{x} * {x}', a[0].kind)} + L2NORM_EPS)"
    if op == "matmul":
        return _matmul_code(a[0], a[1], tiles)
    raise RecurrentRenderError(f"no Triton code for node {op}")


def _matmul_code(x: Operand, y: Operand, tiles: Tiles) -> str:
    xk, yk = x.kind, y.kind
    if xk.diag and yk.diag:
        return f"{x.code} * {y.code}"
    if xk.diag:
        return f"{x.code} * {y.code}" if yk.rank == 1 else f"{x.code}[:, None] * {y.code}"
    if yk.diag:
        return f"{x.code} * {y.code}" if xk.rank == 1 else f"{x.code} * {y.code}[None, :]"
    d = xk.dims[-1]
    mask = tiles.mask_of[d]
    if xk.rank == 1 and yk.rank == 1:
        return f"tl.sum(tl.where({mask}, {x.code} * {y.code}, 0.0), 0)"
    if xk.rank == 1:
        return f"tl.sum(tl.where({mask}[:, None], {x.code}[:, None] * {y.code}, 0.0), 0)"
    if yk.rank == 1:
        return f"tl.sum(tl.where({mask}[None, :], {x.code} * {y.code}[None, :], 0.0), 1)"
    return f"tl.sum(tl.where({mask}[None, :, None], {x.code}[:, :, None] * {y.code}[None, :, :], 0.0), 1)"


# ---------------------------------------------------------------------------------------
# Backward: one vector-Jacobian product per node kind
# ---------------------------------------------------------------------------------------

class _Backward:
    """Reverse-mode code over a StepProgram: `cot[var]` names the cotangent of `var`."""

    def __init__(self, tiles: Tiles, names: Names):
        self.tiles = tiles
        self.names = names
        self.cot: dict[str, str] = {}
        self.lines: list[str] = []

    def accumulate(self, var: str, kind: Kind, code: str, code_kind: Kind) -> None:
        name = self.cot.get(var)
        if name is None:
            name = self.names.take(f"d_{var}")
            self.cot[var] = name
            if code_kind.rank == 0 and kind.dims:
                self.lines.append(f"{name} = {code} + {self.tiles.zeros(kind)}")
            else:
                self.lines.append(f"{name} = {code}")
        else:
            self.lines.append(f"{name} += {code}")

    def _unbroadcast(self, code: str, node_kind: Kind, operand: Operand) -> tuple[str, Kind]:
        if operand.kind.rank == 0 and node_kind.dims:
            return self.tiles.total(code, node_kind), SCALAR
        return code, node_kind

    def node(self, node: Node) -> None:
        g = self.cot.get(node.var)
        if g is None:
            return  # nothing downstream depends on it
        for index, code, kind in self._vjp(node, g):
            operand = node.args[index]
            if operand.var is None:
                continue
            self.accumulate(operand.var, operand.kind, code, kind)

    def _vjp(self, node: Node, g: str):
        t = self.tiles
        a = node.args
        op = node.op
        k = node.kind
        if op in ("add", "sub"):
            sign = "" if op == "add" else "-"
            yield (0, *self._unbroadcast(g, k, a[0]))
            yield (1, *self._unbroadcast(f"{sign}{g}", k, a[1]))
        elif op == "mul":
            yield (0, *self._unbroadcast(f"{g} * {a[1].code}", k, a[0]))
            yield (1, *self._unbroadcast(f"{g} * {a[0].code}", k, a[1]))
        elif op == "div":
            yield (0, *self._unbroadcast(f"{g} / {a[1].code}", k, a[0]))
            yield (1, *self._unbroadcast(f"-{g} * {node.var} / {a[1].code}", k, a[1]))
        elif op == "neg":
            yield 0, f"-{g}", k
        elif op == "pow":
            base, exponent = a
            if exponent.value is not None:
                derivative = f"{exponent.code} * {_pow_code(base.code, _number(exponent.value - 1.0))}"
            else:
                derivative = f"{exponent.code} * tl.exp(({exponent.code} - 1.0) * tl.log({base.code}))"
            yield 0, f"{g} * {derivative}", k
            yield (1, *self._unbroadcast(f"{g} * {node.var} * tl.log({base.code})", k, a[1]))
        elif op == "func":
            derivative = DERIVATIVES[node.func].format(x=a[0].code, y=node.var)
            yield 0, f"{g} * ({derivative})", k
        elif op == "outer":
            x, y = a
            mx, my = t.mask_of[x.kind.dims[0]], t.mask_of[y.kind.dims[0]]
            yield 0, f"tl.sum(tl.where({my}[None, :], {g} * {y.code}[None, :], 0.0), 1)", x.kind
            yield 1, f"tl.sum(tl.where({mx}[:, None], {g} * {x.code}[:, None], 0.0), 0)", y.kind
        elif op == "dense":
            yield 0, f"tl.sum(tl.where({t.eye(a[0].kind.dims[0])}, {g}, 0.0), 1)", a[0].kind
        elif op == "fill":
            yield 0, t.total(g, k), SCALAR
        elif op == "sum":
            yield 0, g, SCALAR  # broadcast by accumulate()
        elif op == "l2norm":
            x, y = a[0].code, node.var
            norm = f"tl.rsqrt({t.total(f'{x} * {x}', k)} + L2NORM_EPS)"
            yield 0, f"{norm} * ({g} - {y} * {t.total(f'{g} * {y}', k)})", k
        elif op == "matmul":
            yield from self._matmul_vjp(a[0], a[1], g)
        else:
            raise RecurrentRenderError(f"no vector-Jacobian product for node {op}")

    def _matmul_vjp(self, x: Operand, y: Operand, g: str):
        t = self.tiles
        xk, yk = x.kind, y.kind
        if xk.diag and yk.diag:
            yield 0, f"{g} * {y.code}", xk
            yield 1, f"{g} * {x.code}", yk
            return
        if xk.diag:
            if yk.rank == 1:
                yield 0, f"{g} * {y.code}", xk
                yield 1, f"{g} * {x.code}", yk
            else:
                me = t.mask_of[yk.dims[1]]
                yield 0, f"tl.sum(tl.where({me}[None, :], {g} * {y.code}, 0.0), 1)", xk
                yield 1, f"{x.code}[:, None] * {g}", yk
            return
        if yk.diag:
            if xk.rank == 1:
                yield 0, f"{g} * {y.code}", xk
                yield 1, f"{g} * {x.code}", yk
            else:
                mc = t.mask_of[xk.dims[0]]
                yield 0, f"{g} * {y.code}[None, :]", xk
                yield 1, f"tl.sum(tl.where({mc}[:, None], {g} * {x.code}, 0.0), 0)", yk
            return
        if xk.rank == 1 and yk.rank == 1:
            yield 0, f"{g} * {y.code}", xk
            yield 1, f"{g} * {x.code}", yk
        elif xk.rank == 1:  # x[d] @ y[d, e] -> [e]
            me = t.mask_of[yk.dims[1]]
            yield 0, f"tl.sum(tl.where({me}[None, :], {y.code} * {g}[None, :], 0.0), 1)", xk
            yield 1, f"{x.code}[:, None] * {g}[None, :]", yk
        elif yk.rank == 1:  # x[c, d] @ y[d] -> [c]
            mc = t.mask_of[xk.dims[0]]
            yield 0, f"{g}[:, None] * {y.code}[None, :]", xk
            yield 1, f"tl.sum(tl.where({mc}[:, None], {x.code} * {g}[:, None], 0.0), 0)", yk
        else:  # x[c, d] @ y[d, e] -> [c, e]
            mc, me = t.mask_of[xk.dims[0]], t.mask_of[yk.dims[1]]
            yield 0, f"tl.sum(tl.where({me}[None, None, :], {g}[:, None, :] * {y.code}[None, :, :], 0.0), 2)", xk
            yield 1, f"tl.sum(tl.where({mc}[:, None, None], {x.code}[:, :, None] * {g}[:, None, :], 0.0), 0)", yk


# ---------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------

def _statement_text(spec: ir.Spec, index: int) -> str:
    st = spec.statements[index]
    where = f"{Path(st.span.file).name}:{st.span.line}" if st.span else f"statement {index + 1}"
    return f"{where}  {st.kind} {st.target} = {pretty_expr(st.expr)}"


def choose_split_dim(spec: ir.Spec, program: StepProgram) -> str | None:
    """The dim whose blocks programs may own: the value side of the first matrix state that
    no statement reduces over (nor densifies as [d, d]), else any such dim, else None."""
    candidates = [s.shape[-1] for s in spec.states if len(s.shape) == 2]
    candidates += [s.shape[0] for s in spec.states if len(s.shape) == 2]
    candidates += [d.name for d in spec.dims]
    for dim in candidates:
        if dim in program.reduced_dims:
            continue
        if any(len(kind.dims) == 2 and kind.dims[0] == kind.dims[1] == dim for kind in program.kinds.values()):
            continue
        return dim
    return None


@dataclass
class _Context:
    """Everything the template needs, computed once per spec."""

    spec: ir.Spec
    name: str
    tiles: Tiles
    split_dim: str | None
    dims: list[tuple[str, str]]         # (dim, its identifier)
    args: dict                          # argument identifiers by role
    heads: dict[str, str]               # input -> head-count constexpr
    head_index: dict[str, str]          # input -> head-index variable
    program: StepProgram
    fwd: dict
    bwd: dict
    dim_args: list = field(default_factory=list)


def _block(lines, indent: int) -> str:
    """Code lines at an indentation (`pass` for none, so a block is never empty)."""
    lines = list(lines) or ["pass"]
    return "\n".join(" " * indent + line for line in lines)


def _arglist(names, indent: int, suffix: str = "") -> str:
    """Kernel arguments, several per line; empty for none."""
    names = [f"{n}{suffix}, " for n in names]
    rows, row = [], ""
    for name in names:
        if row and len(row) + len(name) > 92 - indent:
            rows.append(row.rstrip())
            row = ""
        row += name
    if row:
        rows.append(row.rstrip())
    return "\n".join(" " * indent + r for r in rows) if rows else " " * indent + "# (none)"


def render_recurrent(spec: ir.Spec) -> str:
    """Source of a module with `<spec>_recurrent_fwd` / `_bwd` and launchers for `spec`."""
    ctx = _build(spec)
    env = environment().overlay()
    env.filters.update(block=_block, arglist=_arglist)
    template = env.get_template(TEMPLATE.name)
    return template.render(
        ctx=ctx, spec=spec, eps=repr(L2NORM_EPS), pretty_expr=pretty_expr,
        input_shapes={i.name: list(i.shape) for i in spec.inputs},
        weight_shapes={w.name: list(w.shape) for w in spec.weights},
        state_shapes={s.name: list(s.shape) for s in spec.states},
        output_shapes={o: list(shape) for o, shape in output_shapes(spec).items()},
    )


def _build(spec: ir.Spec) -> _Context:
    names = Names(_TEMPLATE_NAMES)
    kernel_name = spec.name if spec.name.isidentifier() else "spec"
    dims = [(d.name, names.take(d.name)) for d in spec.dims]
    tiles = Tiles(dict(dims))
    for d, ident in dims:
        names.take(f"BLOCK_{ident}")
        names.take(f"offs_{ident}")
        names.take(f"mask_{ident}")
    args = {"input": {}, "weight": {}, "initial": {}, "final": {}, "checkpoints": {}, "output": {},
            "scratch": {}, "grad_output": {}, "grad_final": {}, "grad_input": {}, "grad_weight": {},
            "grad_initial": {}, "has_initial": {}, "has_grad_final": {}}
    for inp in spec.inputs:
        args["input"][inp.name] = names.take(inp.name)
    for w in spec.weights:
        args["weight"][w.name] = names.take(w.name)
    params = {p.name: names.take(p.name) for p in spec.params}
    for s in spec.states:
        args["initial"][s.name] = names.take(f"{s.name}_initial")
        args["final"][s.name] = names.take(f"{s.name}_final")
        args["checkpoints"][s.name] = names.take(f"{s.name}_checkpoints")
        args["scratch"][s.name] = names.take(f"{s.name}_scratch")
        args["grad_final"][s.name] = names.take(f"grad_{s.name}_final")
        args["grad_initial"][s.name] = names.take(f"grad_{s.name}_initial")
        args["has_initial"][s.name] = names.take(f"HAS_{s.name}_INITIAL")
        args["has_grad_final"][s.name] = names.take(f"HAS_GRAD_{s.name}_FINAL")
    for o in spec.outputs:
        args["output"][o] = names.take(o)
        args["grad_output"][o] = names.take(f"grad_{o}")
    for inp in spec.inputs:
        args["grad_input"][inp.name] = names.take(f"grad_{inp.name}")
    for w in spec.weights:
        args["grad_weight"][w.name] = names.take(f"grad_{w.name}")
    args["param"] = params
    heads = {inp.name: names.take(f"HEADS_{inp.name}") for inp in spec.inputs}
    head_index = {inp.name: names.take(f"head_{inp.name}") for inp in spec.inputs}

    program = _Lowering(spec, names, params).run()
    split_dim = choose_split_dim(spec, program)
    ctx = _Context(spec, kernel_name, tiles, split_dim, dims, args, heads, head_index, program, {}, {})
    ctx.dim_args = [name for _, ident in dims for name in (ident, f"BLOCK_{ident}")]
    ctx.fwd = _forward_parts(ctx)
    ctx.bwd = _backward_parts(ctx, names)
    return ctx


def _load(pointer: str, base: str, dims, tiles: Tiles, mask_extra: str | None = None) -> str:
    offs, mask = tiles.offsets(dims), tiles.mask(dims)
    address = f"{pointer} + {base}" + (f" * ({tiles.numel(dims)}) + {offs}" if dims else "")
    if mask_extra is not None:
        mask = f"_first_split_only({mask}, i_split)" if mask else "i_split == 0"
    if mask:
        return f"tl.load({address}, mask={mask}, other=0.0).to(tl.float32)"
    return f"tl.load({address}).to(tl.float32)"


def _store(pointer: str, base: str, dims, tiles: Tiles, value: str, first_split: bool = False) -> str:
    offs, mask = tiles.offsets(dims), tiles.mask(dims)
    address = f"{pointer} + {base}" + (f" * ({tiles.numel(dims)}) + {offs}" if dims else "")
    if first_split:
        mask = f"_first_split_only({mask}, i_split)" if mask else "i_split == 0"
    if mask:
        return f"tl.store({address}, _stored({value}, {pointer}), mask={mask})"
    return f"tl.store({address}, _stored({value}, {pointer}))"


def _input_loads(ctx: _Context, which) -> list[str]:
    lines = []
    for inp in ctx.spec.inputs:
        var = ctx.program.inputs[inp.name]
        if var not in which:
            continue
        pointer = ctx.args["input"][inp.name]
        base = f"(row * {ctx.heads[inp.name]} + {ctx.head_index[inp.name]})"
        lines.append(f"{var} = {_load(pointer, base, inp.shape, ctx.tiles)}")
    return lines


def _statement_lines(ctx: _Context, live: set[str]) -> list[str]:
    lines = []
    for index, nodes in ctx.program.statement_nodes.items():
        chosen = [n for n in nodes if n.var in live]
        if not chosen:
            continue
        lines.append(f"# {_statement_text(ctx.spec, index)}")
        lines.extend(f"{n.var} = {_forward_code(n, ctx.tiles)}" for n in chosen)
    return lines


def _first_split(ctx: _Context, dims) -> bool:
    """Whether a value of these dims is the same in every split program, so that only the
    first one writes it (or takes in its cotangent)."""
    return ctx.split_dim is not None and ctx.split_dim not in dims


def _forward_parts(ctx: _Context) -> dict:
    spec, tiles, program = ctx.spec, ctx.tiles, ctx.program
    roots = [o.var for o in program.outputs.values()] + list(program.state_exit.values())
    live = program.live(roots)
    parts: dict[str, list[str]] = {}
    parts["setup"] = _setup_lines(ctx)
    parts["weights"] = [f"{program.weights[w.name]} = "
                        f"{_load(ctx.args['weight'][w.name], 'i_h', w.shape, tiles)}" for w in spec.weights]
    init = []
    for s in spec.states:
        var = program.state_entry[s.name]
        init.append(f"if {ctx.args['has_initial'][s.name]}:")
        init.append(f"    {var} = {_load(ctx.args['initial'][s.name], '(state_row * H + i_h)', s.shape, tiles)}")
        init.append("else:")
        init.append(f"    {var} = {tiles.zeros(Kind(s.shape))}")
    parts["init"] = init
    parts["checkpoint"] = [
        _store(ctx.args["checkpoints"][s.name], "((first_segment + segment) * H + i_h)", s.shape, tiles,
               program.state_entry[s.name], _first_split(ctx, s.shape))
        for s in spec.states]
    parts["loads"] = _input_loads(ctx, live)
    parts["statements"] = _statement_lines(ctx, live)
    parts["stores"] = [
        _store(ctx.args["output"][o], "(row * H + i_h)", program.outputs[o].kind.shape, tiles,
               program.outputs[o].code, _first_split(ctx, program.outputs[o].kind.shape))
        for o in spec.outputs]
    parts["carry"] = [f"{program.state_entry[s.name]} = {program.state_exit[s.name]}"
                      for s in spec.states if program.state_entry[s.name] != program.state_exit[s.name]]
    parts["final"] = [
        _store(ctx.args["final"][s.name], "(state_row * H + i_h)", s.shape, tiles,
               program.state_entry[s.name], _first_split(ctx, s.shape))
        for s in spec.states]
    return parts


def _setup_lines(ctx: _Context) -> list[str]:
    lines = []
    for dim, ident in ctx.dims:
        block = ctx.tiles.block[dim]
        if dim == ctx.split_dim:
            lines.append(f"offs_{ident} = i_split * {block} + tl.arange(0, {block})")
        else:
            lines.append(f"offs_{ident} = tl.arange(0, {block})")
        lines.append(f"mask_{ident} = offs_{ident} < {ident}")
    for inp in ctx.spec.inputs:
        heads = ctx.heads[inp.name]
        lines.append(f"{ctx.head_index[inp.name]} = i_h // (H // {heads})")
    return lines


def _backward_parts(ctx: _Context, names: Names) -> dict:
    spec, tiles, program = ctx.spec, ctx.tiles, ctx.program
    parts: dict = {}
    # recompute: only what the states need
    state_live = program.live(program.state_exit.values())
    parts["recompute_loads"] = _input_loads(ctx, state_live)
    parts["recompute_statements"] = _statement_lines(ctx, state_live)
    parts["scratch_store"] = [
        f"tl.store({ctx.args['scratch'][s.name]} + scratch_step * ({tiles.block_numel(s.shape)})"
        + (f" + {tiles.block_offsets(s.shape)}" if s.shape else "") + f", {program.state_entry[s.name]})"
        for s in spec.states]
    parts["scratch_load"] = [
        f"{program.state_entry[s.name]} = tl.load({ctx.args['scratch'][s.name]} + scratch_step * "
        f"({tiles.block_numel(s.shape)})" + (f" + {tiles.block_offsets(s.shape)}" if s.shape else "") + ")"
        for s in spec.states]
    parts["checkpoint_load"] = [
        f"{program.state_entry[s.name]} = "
        f"{_load(ctx.args['checkpoints'][s.name], '((first_segment + segment) * H + i_h)', s.shape, tiles)}"
        for s in spec.states]

    # the full step, then its reverse
    roots = [o.var for o in program.outputs.values()] + list(program.state_exit.values())
    live = program.live(roots)
    parts["loads"] = _input_loads(ctx, live)
    parts["statements"] = _statement_lines(ctx, live)

    carry = {s.name: names.take(f"d_{s.name}_carry") for s in spec.states}
    accumulators = {w.name: names.take(f"d_{w.name}_total") for w in spec.weights}
    parts["carry_names"] = carry
    parts["carry_init"] = []
    for s in spec.states:
        pointer = ctx.args["grad_final"][s.name]
        parts["carry_init"].append(f"if {ctx.args['has_grad_final'][s.name]}:")
        first = _first_split(ctx, s.shape)
        load = _load(pointer, "(i_n * H + i_h)", s.shape, tiles, mask_extra="first" if first else None)
        parts["carry_init"].append(f"    {carry[s.name]} = {load}")
        parts["carry_init"].append("else:")
        parts["carry_init"].append(f"    {carry[s.name]} = {tiles.zeros(Kind(s.shape))}")
    parts["accumulator_init"] = [f"{accumulators[w.name]} = {tiles.zeros(Kind(w.shape))}" for w in spec.weights]

    backward = _Backward(tiles, names)
    for s in spec.states:
        backward.cot[program.state_exit[s.name]] = carry[s.name]
    # output cotangents enter first: nothing reads an output
    grad_loads = []
    for o in spec.outputs:
        value = program.outputs[o]
        kind = value.kind
        first = _first_split(ctx, kind.shape)
        load = _load(ctx.args["grad_output"][o], "(row * H + i_h)", kind.shape, tiles,
                     mask_extra="first" if first else None)
        if value.var is None:
            continue  # a constant output: no gradient flows
        backward.accumulate(value.var, program.kinds[value.var], load, Kind(kind.shape))
    grad_loads = backward.lines
    backward.lines = []
    reverse_lines: list[str] = []
    for index in sorted(program.statement_nodes, reverse=True):
        nodes = [n for n in program.statement_nodes[index] if n.var in live]
        before = len(backward.lines)
        for node in reversed(nodes):
            backward.node(node)
        if len(backward.lines) > before:
            reverse_lines.append(f"# d({_statement_text(spec, index)})")
            reverse_lines.extend(backward.lines[before:])
    parts["grad_loads"] = grad_loads
    parts["reverse"] = reverse_lines

    # per-token input gradients, weight accumulation, state carry
    stores = []
    for inp in spec.inputs:
        var = program.inputs[inp.name]
        value = backward.cot.get(var, tiles.zeros(Kind(inp.shape)))
        split_free = _first_split(ctx, inp.shape)
        base = "((i_split * ROWS + row) * H + i_h)" if split_free else "(row * H + i_h)"
        stores.append(_store(ctx.args["grad_input"][inp.name], base, inp.shape, tiles, value))
    parts["grad_stores"] = stores
    parts["accumulate"] = [f"{accumulators[w.name]} += {backward.cot[program.weights[w.name]]}"
                           for w in spec.weights if program.weights[w.name] in backward.cot]
    carry_lines = []
    for s in spec.states:
        entry = program.state_entry[s.name]
        if entry == program.state_exit[s.name]:
            continue  # never rewritten: the carry accumulated in place
        if entry in backward.cot:
            carry_lines.append(f"{carry[s.name]} = {backward.cot[entry]}")
        else:
            carry_lines.append(f"{carry[s.name]} = {tiles.zeros(Kind(s.shape))}")
    parts["carry"] = carry_lines
    parts["grad_initial"] = []
    for s in spec.states:
        split_free = _first_split(ctx, s.shape)
        base = "((i_split * N + i_n) * H + i_h)" if split_free else "(i_n * H + i_h)"
        parts["grad_initial"].append(f"if {ctx.args['has_initial'][s.name]}:")
        parts["grad_initial"].append(
            "    " + _store(ctx.args["grad_initial"][s.name], base, s.shape, tiles, carry[s.name]))
    parts["grad_weights"] = []
    for w in spec.weights:
        split_free = _first_split(ctx, w.shape)
        base = "((i_split * N + i_n) * H + i_h)" if split_free else "(i_n * H + i_h)"
        parts["grad_weights"].append(_store(ctx.args["grad_weight"][w.name], base, w.shape, tiles,
                                            accumulators[w.name]))
    return parts
