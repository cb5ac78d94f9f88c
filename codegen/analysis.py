"""From a checked spec to the algebraic facts the templates need.

For every state, the decay and update statements are composed (by substitution, in the
order written) into the affine form

    S_t = A_t(S_{t-1}) + B_t,

where `A_t` is a sum of terms `P @ S @ diag(r)` (P a diagonal `diag(l)`, a rank-1
`outer(x, y)` or an elementwise mask) and `B_t` a sum of rank-1 terms `outer(x, y)`.
`A_t` is then classified from the algebra alone:

    identity   A = I
    constant   A = gamma I, gamma free of per-token values (weights/params only)
    scalar     A = a_t I
    diagonal   A = diag(l_t) . diag(r_t) (K side and/or V side)
    delta      A = (I - beta_t k_t k_t^T) D_t with D_t scalar or diagonal
    dplr       A = D_t + a_t b_t^T
    other      anything else (elementwise [K, V] decay, rank > 1, cross-state terms, ...)

Readouts are split into linear readouts `w^T S` (the part a chunk kernel computes) and
an elementwise combinator over them (e.g. `o = r0 + D * x` for Mamba2's skip term).

Values are symbolic: sympy expressions for scalars and vectors (see symbols.py), and
the small structures below for matrices. Nothing here looks at a spec's name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

import sympy as sp

from ..dsl import ir
from .symbols import (
    ELEMENTWISE_SYMPY,
    SCALAR_REDUCTIONS,
    dot,
    l2norm,
    normalize,
    symbol,
    take_log,
    vsum,
)

CLASSES = ("identity", "constant", "scalar", "diagonal", "delta", "dplr", "other")
# the template family each class uses
FAMILY = {
    "identity": "diagonal", "constant": "diagonal", "scalar": "diagonal",
    "diagonal": "diagonal", "delta": "delta", "dplr": "recurrent", "other": "recurrent",
}


class NotAffine(Exception):
    """The spec leaves the affine-in-state world; the reason says which term did."""


# ------------------------------------------------------------------ symbolic values
@dataclass(frozen=True)
class StateRef:
    """A state as seen by one statement: `S` at step t-1 or at step t."""
    name: str
    version: str  # "t-1" or "t"


@dataclass(frozen=True)
class LinTerm:
    """left @ S @ diag(right) for one state reference.

    kind "diag":  left = (l,) means diag(l)
    kind "outer": left = (x, y) means outer(x, y) = x y^T
    kind "mask":  left = (M,) an elementwise [rows, cols] mask M (tagged sympy, see _row/_col)
    """
    state: StateRef
    kind: str
    left: tuple
    right: sp.Expr  # V-side vector (or scalar 1)


@dataclass(frozen=True)
class MatVal:
    """A matrix value: sum of state terms plus a state-free part."""
    terms: tuple[LinTerm, ...] = ()
    rank1: tuple[tuple[sp.Expr, sp.Expr], ...] = ()  # sum of outer(x, y)
    mask: sp.Expr | None = None  # state-free elementwise part, tagged sympy
    shape: ir.Shape = ()


@dataclass(frozen=True)
class DiagVal:
    """diag(l): only meaningful as an operand of `@`."""
    l: sp.Expr
    dim: str


@dataclass(frozen=True)
class LinVec:
    """A vector linear in states: sum_i c_i * (w_i^T S_i) + const (elementwise c_i)."""
    reads: tuple[tuple[sp.Expr, sp.Expr, StateRef], ...]  # (c, w, state)
    const: sp.Expr
    dim: str


@dataclass(frozen=True)
class Unanalysed:
    """A feature or gate the interpreter cannot express (a matrix summed to a scalar)."""
    reason: str


Value = Union[sp.Expr, MatVal, DiagVal, LinVec, Unanalysed]


# ------------------------------------------------------------------ results
@dataclass(frozen=True)
class Rank1:
    x: sp.Expr  # row (K-side) vector, absorbs all scalar factors
    y: sp.Expr  # column (V-side) vector


@dataclass(frozen=True)
class StateForm:
    name: str
    shape: ir.Shape
    cls: str
    transition: str            # A_t in canonical text
    inputs: tuple[Rank1, ...]  # the rank-1 terms of B_t
    log_gate: sp.Expr | None = None     # log of the K-side (or scalar) decay
    log_gate_v: sp.Expr | None = None   # log of the V-side decay
    gate_per_channel: bool = False      # K-side gate is a vector
    delta_key: sp.Expr | None = None    # delta: the k in (I - beta k k^T)
    delta_beta: sp.Expr | None = None
    dplr: tuple[sp.Expr, sp.Expr] | None = None  # (a, b) in D + a b^T
    reason: str = ""                   # why the class is `other`

    @property
    def canonical(self) -> str:
        b = " + ".join(f"outer({_s(r.x)}, {_s(r.y)})" for r in self.inputs) or "0"
        return f"{self.name}_t = {self.transition} + {b}"


@dataclass(frozen=True)
class LinearReadout:
    placeholder: sp.Symbol
    query: sp.Expr       # w in w^T S
    state: str
    version: str         # "t" (after this step's update) or "t-1"

    @property
    def text(self) -> str:
        s = self.state if self.version == "t" else f"{self.state}_prev"
        query = _s(self.query)
        if isinstance(self.query, sp.Add):
            query = f"({query})"
        return f"({query} @ {s})"


@dataclass(frozen=True)
class ReadoutForm:
    name: str
    shape: ir.Shape
    combinator: sp.Expr                  # elementwise over placeholders and per-token values
    linear: tuple[LinearReadout, ...]
    reason: str = ""                     # why the analysis could not split it, if it could not

    @property
    def canonical(self) -> str:
        text = _s(self.combinator)
        for lr in self.linear:
            text = text.replace(lr.placeholder.name, lr.text)
        return f"{self.name} = {text}"


@dataclass(frozen=True)
class Analysis:
    spec: ir.Spec
    states: tuple[StateForm, ...]
    readouts: tuple[ReadoutForm, ...]
    shapes: dict = field(compare=False, hash=False, repr=False)  # symbol name -> Shape

    @property
    def cls(self) -> str:
        """The spec's class: the least structured of its states' classes."""
        return max((s.cls for s in self.states), key=CLASSES.index)

    @property
    def family(self) -> str:
        return FAMILY[self.cls]

    @property
    def canonical(self) -> str:
        lines = [s.canonical for s in self.states] + [r.canonical for r in self.readouts]
        return "\n".join(lines)


def _s(expr) -> str:
    text = sp.sstr(expr, order="lex")
    return text.replace(_ROW, "[row]").replace(_COL, "[col]")


def _number(value: int | float) -> sp.Expr:
    """Exact where the literal is a simple fraction (0.5, 1/16), else the float as written."""
    if isinstance(value, int) or float(value).is_integer():
        return sp.Integer(int(value))
    exact = sp.Rational(repr(value))
    return exact if exact.q <= 1024 else sp.Float(repr(value))


# ------------------------------------------------------------------ the interpreter
class _Interpreter:
    """Evaluates IR expressions to symbolic values."""

    def __init__(self, spec: ir.Spec):
        self.spec = spec
        self.shapes: dict[str, ir.Shape] = {}
        self.env: dict[str, Value] = {}
        self.per_token: set[str] = set()
        for inp in spec.inputs:
            self._bind_symbol(inp.name, inp.shape, per_token=True)
        for w in spec.weights:
            self._bind_symbol(w.name, w.shape, per_token=False)
        for p in spec.params:
            self._bind_symbol(p.name, (), per_token=False)

    def _bind_symbol(self, name: str, shape: ir.Shape, per_token: bool) -> None:
        if len(shape) == 2:
            value: Value = MatVal(mask=_tag(symbol(name), shape), shape=shape)
        else:
            value = symbol(name)
        self.shapes[name] = shape
        if per_token:
            self.per_token.add(name)
        self.env[name] = value

    # -------------------------------------------------------------- shape helpers
    def dim_of(self, e: sp.Expr) -> str | None:
        """The dim of a vector expression, or None for a scalar one."""
        if isinstance(e, SCALAR_REDUCTIONS):
            return None
        if isinstance(e, sp.Symbol):
            shape = self.shapes.get(e.name, ())
            return shape[0] if len(shape) == 1 else None
        if isinstance(e, l2norm):
            return self.dim_of(e.args[0])
        for arg in e.args:
            d = self.dim_of(arg)
            if d is not None:
                return d
        return None

    def split_scalar(self, e: sp.Expr) -> tuple[sp.Expr, sp.Expr]:
        """e = scalar_part * vector_part, factoring out every scalar factor."""
        e = sp.factor_terms(normalize(e))
        scalar, vector = [], []
        for f in sp.Mul.make_args(e):
            (vector if self.dim_of(f) is not None else scalar).append(f)
        return sp.Mul(*scalar), sp.Mul(*vector)

    # -------------------------------------------------------------- evaluation
    def eval(self, e: ir.Expr) -> Value:
        if isinstance(e, ir.Num):
            return _number(e.value)
        if isinstance(e, ir.Name):
            value = self.env[e.id]
            if isinstance(value, Unanalysed):
                raise NotAffine(f"it reads {value.reason}")
            return value
        if isinstance(e, ir.Unary):
            return self.mul(sp.Integer(-1), self.eval(e.operand))
        if isinstance(e, ir.Binary):
            a, b = self.eval(e.left), self.eval(e.right)
            if e.op == "+":
                return self.add(a, b)
            if e.op == "-":
                return self.add(a, self.mul(sp.Integer(-1), b))
            if e.op == "*":
                return self.mul(a, b)
            if e.op == "/":
                return self.mul(a, self.elementwise(lambda x: 1 / x, b))
            if e.op == "**":
                if not isinstance(b, sp.Expr):
                    raise NotAffine("a matrix exponent")
                return self.elementwise(lambda x: x ** b, a)
            if e.op == "@":
                return self.matmul(a, b)
        if isinstance(e, ir.Call):
            args = [self.eval(a) for a in e.args]
            if e.func in ELEMENTWISE_SYMPY:
                return self.elementwise(ELEMENTWISE_SYMPY[e.func], args[0])
            if e.func == "outer":
                return self.outer(*args)
            if e.func == "diag":
                return DiagVal(args[0], self.dim_of(args[0]))
            if e.func == "sum":
                if isinstance(args[0], sp.Expr):
                    return vsum(args[0]) if self.dim_of(args[0]) else args[0]
                raise NotAffine("sum() over a matrix or a state")
            if e.func == "l2norm":
                return self.elementwise(l2norm, args[0], vector_fn=True)
        raise NotAffine(f"cannot analyse {type(e).__name__}")

    def elementwise(self, fn, a: Value, vector_fn: bool = False) -> Value:
        if isinstance(a, sp.Expr):
            return fn(a)
        if isinstance(a, LinVec):
            return fn(self.to_sympy(a))
        if isinstance(a, MatVal) and not a.terms and not vector_fn:
            return MatVal(mask=fn(self.mat_mask(a)), shape=a.shape)
        raise NotAffine("a nonlinear function of a state")

    def add(self, a: Value, b: Value) -> Value:
        if isinstance(a, sp.Expr) and isinstance(b, sp.Expr):
            return a + b
        if isinstance(a, MatVal) and isinstance(b, MatVal):
            mask = None
            if a.mask is not None or b.mask is not None:
                mask = (a.mask or 0) + (b.mask or 0)
            return MatVal(a.terms + b.terms, a.rank1 + b.rank1, mask, a.shape or b.shape)
        if isinstance(a, (LinVec, sp.Expr)) and isinstance(b, (LinVec, sp.Expr)):
            la, lb = self.as_linvec(a), self.as_linvec(b)
            return LinVec(la.reads + lb.reads, la.const + lb.const, la.dim or lb.dim)
        raise NotAffine("adding values of different kinds")

    def as_linvec(self, a) -> LinVec:
        if isinstance(a, LinVec):
            return a
        return LinVec((), a, self.dim_of(a))

    def mul(self, a: Value, b: Value) -> Value:
        if isinstance(a, sp.Expr) and isinstance(b, sp.Expr):
            return a * b
        if isinstance(b, sp.Expr) and not isinstance(a, sp.Expr):
            a, b = b, a
        if isinstance(a, sp.Expr):  # scalar or vector times a structured value
            if isinstance(b, LinVec):
                return LinVec(tuple((a * c, w, s) for c, w, s in b.reads), a * b.const, b.dim)
            if isinstance(b, MatVal):
                if self.dim_of(a) is not None:
                    raise NotAffine("a vector times a matrix")
                return self.scale_mat(b, a)
            raise NotAffine("scalar times diag()")
        if isinstance(a, LinVec) or isinstance(b, LinVec):
            return self.to_sympy(a) * self.to_sympy(b)
        if isinstance(a, MatVal) and isinstance(b, MatVal):
            if a.terms and b.terms:
                raise NotAffine("a product of two state terms")
            if b.terms:
                a, b = b, a
            if a.terms:  # an elementwise mask times (state terms + state-free part)
                mask = self.mat_mask(b)
                rest = self.mat_mask(MatVal(rank1=a.rank1, mask=a.mask))
                return MatVal(tuple(self.mask_term(t, mask) for t in a.terms),
                              mask=None if rest == 0 else mask * rest, shape=a.shape)
            return MatVal(mask=self.mat_mask(a) * self.mat_mask(b), shape=a.shape)
        raise NotAffine("an unsupported product")

    def term(self, state: StateRef, kind: str, left: tuple, right) -> LinTerm:
        """The one constructor of state terms: scalar factors of the V-side vector (and,
        for rank-1 terms, of the y factor) move into the first left factor, so equal
        terms look equal."""
        c, right = self.split_scalar(sp.sympify(right))
        if kind == "outer":
            cy, y = self.split_scalar(left[1])
            return LinTerm(state, kind, (normalize(c * cy * left[0]), y), right)
        return LinTerm(state, kind, (normalize(c * left[0]),), right)

    def scale_mat(self, m: MatVal, c: sp.Expr) -> MatVal:
        terms = [self.term(t.state, t.kind, (c * t.left[0],) + t.left[1:], t.right) for t in m.terms]
        rank1 = tuple((c * x, y) for x, y in m.rank1)
        mask = None if m.mask is None else c * m.mask
        return MatVal(tuple(terms), rank1, mask, m.shape)

    def mask_term(self, t: LinTerm, mask: sp.Expr) -> LinTerm:
        if t.kind == "diag":
            return LinTerm(t.state, "mask", (mask * _row(t.left[0]) * _col(t.right),), sp.Integer(1))
        if t.kind == "mask":
            return LinTerm(t.state, "mask", (mask * t.left[0] * _col(t.right),), sp.Integer(1))
        raise NotAffine("an elementwise mask times a rank-1 state term")

    def mat_mask(self, m: MatVal) -> sp.Expr:
        """A state-free matrix as one tagged elementwise expression."""
        e = sum((_row(x) * _col(y) for x, y in m.rank1), sp.Integer(0))
        return e + (m.mask if m.mask is not None else 0)

    def outer(self, x: Value, y: Value) -> MatVal:
        shape = (None, None)
        if isinstance(x, LinVec):
            raise NotAffine("outer() with a state read on the left")
        if isinstance(y, LinVec):
            terms = tuple(self.term(s, "outer", (x, w), c) for c, w, s in y.reads)
            rank1 = ((x, y.const),) if y.const != 0 else ()
            return MatVal(terms, rank1, shape=(self.dim_of(x), y.dim))
        return MatVal(rank1=((x, y),), shape=(self.dim_of(x), self.dim_of(y)) or shape)

    def matmul(self, a: Value, b: Value) -> Value:
        if isinstance(a, DiagVal) and isinstance(b, MatVal):
            terms = []
            for t in b.terms:
                if t.kind in ("outer", "diag"):
                    terms.append(self.term(t.state, t.kind, (a.l * t.left[0],) + t.left[1:], t.right))
                else:
                    terms.append(LinTerm(t.state, "mask", (_row(a.l) * t.left[0],), t.right))
            rank1 = tuple((a.l * x, y) for x, y in b.rank1)
            mask = None if b.mask is None else _row(a.l) * b.mask
            return MatVal(tuple(terms), rank1, mask, b.shape)
        if isinstance(a, MatVal) and isinstance(b, DiagVal):
            terms = tuple(self.term(t.state, t.kind, t.left, t.right * b.l) for t in a.terms)
            rank1 = tuple((x, y * b.l) for x, y in a.rank1)
            mask = None if a.mask is None else a.mask * _col(b.l)
            return MatVal(terms, rank1, mask, a.shape)
        if isinstance(a, DiagVal) and isinstance(b, DiagVal):
            return DiagVal(a.l * b.l, a.dim)
        if isinstance(a, DiagVal) and isinstance(b, (sp.Expr, LinVec)):
            return self.mul(a.l, b)
        if isinstance(b, DiagVal) and isinstance(a, (sp.Expr, LinVec)):
            return self.mul(a, b.l)
        if isinstance(a, sp.Expr) and isinstance(b, sp.Expr):
            return dot(*sorted((a, b), key=sp.default_sort_key))
        if isinstance(a, sp.Expr) and isinstance(b, MatVal):
            return self.vec_mat(a, b)
        if isinstance(a, LinVec):
            raise NotAffine("a product of two state reads")
        raise NotAffine("this matrix product")

    def vec_mat(self, x: sp.Expr, m: MatVal) -> LinVec:
        """x^T M for a row vector x."""
        reads, const = [], sp.Integer(0)
        for t in m.terms:
            if t.kind == "diag":
                reads.append((t.right, x * t.left[0], t.state))
            elif t.kind == "outer":
                u, w = t.left
                reads.append((self.dot(x, u) * t.right, w, t.state))
            else:
                raise NotAffine("a vector times an elementwise-masked state")
        for u, y in m.rank1:
            const += self.dot(x, u) * y
        if m.mask is not None:
            raise NotAffine("a vector times a general matrix")
        return LinVec(tuple(reads), const, m.shape[1] if len(m.shape) == 2 else None)

    def dot(self, x: sp.Expr, y: sp.Expr) -> sp.Expr:
        return dot(*sorted((x, y), key=sp.default_sort_key))

    def to_sympy(self, v: Value) -> sp.Expr:
        """Collapse a LinVec into sympy with one placeholder per linear readout."""
        if isinstance(v, sp.Expr):
            return v
        if isinstance(v, LinVec):
            out = v.const
            for c, w, s in v.reads:
                out += c * self.placeholder(w, s)
            return out
        raise NotAffine("a matrix where a vector is expected")

    # placeholders for linear readouts, shared across the spec
    def placeholder(self, w: sp.Expr, s: StateRef) -> sp.Expr:
        scale, wv = self.split_scalar(w)
        key = (sp.srepr(wv), s)
        table = self.__dict__.setdefault("_placeholders", {})
        if key not in table:
            name = f"_read{len(table)}"
            sym = symbol(name)
            state_shape = self.spec.state(s.name).shape
            self.shapes[name] = state_shape[-1:] if len(state_shape) == 2 else ()
            table[key] = LinearReadout(sym, wv, s.name, s.version)
        return scale * table[key].placeholder


_ROW = "__row"
_COL = "__col"


def _tag(e: sp.Expr, suffix_or_shape) -> sp.Expr:
    if isinstance(suffix_or_shape, tuple):  # a declared matrix symbol stays as it is
        return e
    return e.xreplace({s: symbol(s.name + suffix_or_shape) for s in e.free_symbols})


def _row(e: sp.Expr) -> sp.Expr:
    return _tag(sp.sympify(e), _ROW)


def _col(e: sp.Expr) -> sp.Expr:
    return _tag(sp.sympify(e), _COL)


# ------------------------------------------------------------------ the analysis
def analyse(spec: ir.Spec) -> Analysis:
    """Compose, classify and record the chunk-form facts of every state and readout."""
    interp = _Interpreter(spec)
    last_write = {st.name: -1 for st in spec.states}
    for i, stmt in enumerate(spec.statements):
        if stmt.kind in ("decay", "update"):
            last_write[stmt.target] = i
    for st in spec.states:
        interp.env[st.name] = MatVal(
            (LinTerm(StateRef(st.name, "t-1"), "diag", (sp.Integer(1),), sp.Integer(1)),),
            shape=st.shape,
        )

    broken: dict[str, str] = {}
    readouts: list[ReadoutForm] = []
    for i, stmt in enumerate(spec.statements):
        if stmt.kind in ("feature", "gate"):
            try:
                interp.env[stmt.target] = interp.eval(stmt.expr)
            except NotAffine as why:  # (`sum` of a matrix): what reads it cannot be analysed either
                line = stmt.span.line if stmt.span else "?"
                interp.env[stmt.target] = Unanalysed(f"{stmt.kind} `{stmt.target}`: {why} (line {line})")
            interp.shapes.setdefault(stmt.target, ())
        elif stmt.kind in ("decay", "update"):
            if stmt.target in broken:
                continue
            try:
                interp.env[stmt.target] = _as_matval(interp.eval(stmt.expr), stmt.target)
            except NotAffine as why:
                broken[stmt.target] = f"{why} (line {stmt.span.line if stmt.span else '?'})"
        else:  # readout
            saved = dict(interp.env)
            for st in spec.states:  # a finished state is read as S_t
                if last_write[st.name] < i:
                    interp.env[st.name] = MatVal(
                        (LinTerm(StateRef(st.name, "t"), "diag", (sp.Integer(1),), sp.Integer(1)),),
                        shape=st.shape,
                    )
            try:
                value = interp.eval(stmt.expr)
                readouts.append(_readout_form(interp, stmt, value))
            except NotAffine as why:
                readouts.append(ReadoutForm(stmt.target, (), sp.Symbol(f"<{why}>"), (),
                                            reason=f"{why} (line {stmt.span.line if stmt.span else '?'})"))
            interp.env = saved

    states = tuple(
        _classify(interp, st, interp.env[st.name], broken.get(st.name))
        for st in spec.states
    )
    return Analysis(spec, states, tuple(readouts), interp.shapes)


def _as_matval(value: Value, target: str) -> MatVal:
    if not isinstance(value, MatVal):
        raise NotAffine(f"the new value of `{target}` is not a matrix expression")
    return value


def _readout_form(interp: _Interpreter, stmt: ir.Statement, value: Value) -> ReadoutForm:
    combinator = normalize(interp.to_sympy(value))
    table = getattr(interp, "_placeholders", {})
    used = tuple(lr for lr in table.values() if lr.placeholder in combinator.free_symbols)
    dim = interp.dim_of(combinator)
    return ReadoutForm(stmt.target, (dim,) if dim else (), combinator, used)


def _classify(interp: _Interpreter, st: ir.State, value: MatVal, broken: str | None) -> StateForm:
    if len(st.shape) == 1:
        return StateForm(st.name, st.shape, "other", "?", (),
                         reason="it is a vector state; those run on the recurrent kernel for "
                                "now (a normaliser could ride in a chunk kernel as a column "
                                "of ones: not implemented yet)")
    if broken:
        return StateForm(st.name, st.shape, "other", "?", (),
                         reason=f"not affine in its state: {broken}")
    rank1 = _merge_rank1(interp, tuple(_rank1(interp, x, y) for x, y in value.rank1))

    def other(reason: str, transition: str = "?") -> StateForm:
        return StateForm(st.name, st.shape, "other", transition, rank1, reason=reason)

    if value.mask is not None:
        return other("its update adds a general (not rank-1) matrix")

    foreign = [t for t in value.terms if t.state.name != st.name]
    if foreign:
        return other(f"its transition reads state `{foreign[0].state.name}` (coupled states)")

    # merge diagonal terms with the same V-side factor
    diag: dict[str, tuple[sp.Expr, sp.Expr]] = {}
    lowrank, masks = [], []
    for t in value.terms:
        if t.kind == "diag":
            scale, right = interp.split_scalar(t.right)
            key = sp.srepr(right)
            l_prev = diag.get(key, (sp.Integer(0), right))[0]
            diag[key] = (normalize(l_prev + scale * t.left[0]), right)
        elif t.kind == "outer":
            lowrank.append(t)
        else:
            masks.append(t)
    diag = {k: (_canonical_gate(l), r) for k, (l, r) in diag.items() if l != 0}
    transition = _transition_text(interp, st.name, diag.values(), lowrank, masks)

    if masks:
        return other("its decay is elementwise over the whole [K, V] state "
                     "(not diagonal on either side)", transition)
    if len(diag) > 1:
        return other("its transition has several diagonal terms with different V-side gates",
                     transition)
    l, r = next(iter(diag.values())) if diag else (sp.Integer(0), sp.Integer(1))
    common = dict(name=st.name, shape=st.shape, transition=transition, inputs=rank1)

    if not lowrank:
        if l == 0:
            return other("its transition is zero (the state forgets everything each step)",
                         transition)
        gate_v = None if r == 1 else normalize(take_log(r))
        if interp.dim_of(l) is None and r == 1:
            if l == 1:
                return StateForm(cls="identity", **common)
            log_gate = normalize(take_log(l))
            per_token = {s.name for s in l.free_symbols} & interp.per_token
            cls = "scalar" if per_token else "constant"
            return StateForm(cls=cls, log_gate=log_gate, **common)
        return StateForm(cls="diagonal", log_gate=None if l == 1 else normalize(take_log(l)),
                         log_gate_v=gate_v, gate_per_channel=interp.dim_of(l) is not None,
                         **common)

    if len(lowrank) > 1:
        return other("its transition has a low-rank part of rank > 1", transition)
    t = lowrank[0]
    if t.right != 1 or r != 1:
        return other("a low-rank transition combined with a V-side gate", transition)
    x, y = t.left
    # delta: x y^T = -beta kappa kappa^T D  <=>  y / (l * x) is a scalar s
    ratio = normalize(y / (l * x)) if l != 0 else None
    if ratio is not None and interp.dim_of(ratio) is None:
        c, kappa = interp.split_scalar(x)
        beta = normalize(-ratio * c * c)
        log_gate = normalize(take_log(l))
        householder = f"(I - {_s(beta)} * outer({_s(kappa)}, {_s(kappa)}))"
        if l == 1:
            common["transition"] = f"{householder} @ {st.name}"
        elif interp.dim_of(l):
            common["transition"] = f"{householder} @ diag({_s(l)}) @ {st.name}"
        else:
            common["transition"] = f"{_s(l)} * {householder} @ {st.name}"
        return StateForm(cls="delta", log_gate=log_gate,
                         gate_per_channel=interp.dim_of(l) is not None,
                         delta_key=kappa, delta_beta=beta, **common)
    return StateForm(cls="dplr", log_gate=None if l == 0 else normalize(take_log(l)),
                     gate_per_channel=interp.dim_of(l) is not None, dplr=(x, y),
                     reason=f"its transition adds the rank-1 term outer({_s(x)}, ({_s(y)}) @ "
                            f"{st.name}), which is not a delta-rule erase of the decayed state "
                            "(diagonal plus low rank: no chunk kernels for dplr yet)",
                     **common)


def _canonical_gate(l: sp.Expr) -> sp.Expr:
    """One form per decay: exp of its normalised log (`sigmoid(g) ** (1/16)` and
    `exp(logsigmoid(g) / 16)` are the same gate), where the log is real."""
    log = normalize(take_log(l))
    if log.has(sp.I, sp.zoo, sp.nan) or log.has(sp.log):
        return normalize(l)
    return sp.exp(log)


def _rank1(interp: _Interpreter, x: sp.Expr, y: sp.Expr) -> Rank1:
    cy, vy = interp.split_scalar(y)
    return Rank1(normalize(cy * x), vy)


def _merge_rank1(interp: _Interpreter, terms: tuple[Rank1, ...]) -> tuple[Rank1, ...]:
    """outer(a, v) + outer(b, v) -> outer(a + b, v); terms sorted for a canonical order."""
    merged: dict[str, Rank1] = {}
    for t in terms:
        key = sp.srepr(t.y)
        if key in merged:
            merged[key] = Rank1(normalize(merged[key].x + t.x), t.y)
        else:
            merged[key] = t
    return tuple(sorted((t for t in merged.values() if t.x != 0), key=lambda t: _s(t.y)))


def _transition_text(interp, name, diags, lowrank, masks) -> str:
    parts = []
    for l, r in sorted(diags, key=lambda lr: _s(lr)):
        text = name if l == 1 else f"diag({_s(l)}) @ {name}" if interp.dim_of(l) else f"{_s(l)} * {name}"
        parts.append(text if r == 1 else f"{text} @ diag({_s(r)})")
    for t in lowrank:
        c, x = interp.split_scalar(t.left[0])
        text = f"outer({_s(normalize(c * x))}, ({_s(t.left[1])}) @ {name})"
        parts.append(text if t.right == 1 else f"{text} @ diag({_s(t.right)})")
    for t in masks:
        parts.append(f"({_s(t.left[0])}) * {name}")
    return " + ".join(parts) if parts else "0"
