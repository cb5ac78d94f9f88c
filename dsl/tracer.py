"""The Python front end: trace a decorated function into the IR the `.attn` parser builds.

    import attnc
    from attnc import K, V, Vec, State, Param, exp, logsigmoid, diag, outer

    @attnc.recurrence
    def gla(q: Vec[K], k: Vec[K], v: Vec[V], g: Vec[K], S: State[K, V],
            scale: Param = K ** -0.5):
        q = q * scale                                 # feature q
        a = attnc.gate(exp(logsigmoid(g) / 16))      # gate    a
        S = attnc.decay(diag(a) @ S)                  # decay   S
        S = S + outer(k, v)                           # update  S
        return q @ S                                  # readout o

The function runs once, on proxies (`Traced`) instead of tensors: every operator and
attnc function applied to a proxy records an IR expression. The signature declares,
the body states:

  parameters   `Vec[K]` an input vector, `Scalar` a per-token scalar input, `Weight`,
               `Weight[K]`, `Weight[K, V]` learnable per-head tensors, `State[K, V]`,
               `State[K]` states. A parameter with a default is a `param`; its default,
               a number or an expression of dims such as `K ** -0.5`, becomes the IR
               default. Annotating it `Param` is optional.
  assignments  assigning a traced value to a local is a statement named after the local.
               To a state's local: an `update`, or a `decay` if the value is
               `attnc.decay(...)`. To any other local (a new one, or an input being
               rebound as in `q = l2norm(q)`): a `feature`, or a `gate` if the value is
               `attnc.gate(...)`. A value that reads a state is never a feature (features
               are per-token): it stays inline in whatever uses it. Another name for an
               existing value (`raw = q`) records nothing until `q` is bound again; then
               it becomes `feature raw = q`, so `raw` keeps meaning the earlier value.
  return       the outputs: one value (output `o`), a tuple (`o1`, `o2`, ...) or a dict
               name -> value. A returned local that reads a state keeps the local's name.
               Each readout is placed where its expression was computed, so a value
               computed before a state is rewritten reads the previous state (RWKV6's
               bonus term). Outputs come back in readout order.

Assignments are seen by comparing the traced function's local variables (its frame's
`f_locals`) before each recorded operation and after the return; the Python names become
the statement targets. The function's source (via `ast`) is read only for spans, which
point at the user's file and line. Every problem is a `SpecError` at that line.
"""
from __future__ import annotations

import ast
import inspect
import linecache
import math
import numbers
from dataclasses import dataclass, replace
from types import CodeType, FrameType
from typing import Any, Callable, Iterable, Mapping, Sequence

from . import ir
from .check import check
from .errors import SpecError, diagnostic
from .printer import pretty, pretty_expr

_LANGUAGE_FUNCTIONS = ", ".join(ir.FUNCTIONS)
_MARK_EXAMPLES = {"gate": "a = attnc.gate(exp(g))", "decay": "S = attnc.decay(a * S)"}
_CONTROL_FLOW_HINT = "write it as an expression (e.g. relu(x), or sigmoid(x) as a soft switch)"


# ---------------------------------------------------------------- dims and param defaults
def _operator_pair(op: str):
    """`__op__` and `__rop__` methods that both delegate to `self._combine`."""
    def forward(self, other):
        return self._combine(op, other, reflected=False)

    def reflected(self, other):
        return self._combine(op, other, reflected=True)

    return forward, reflected


class DimExpr:
    """An expression of dims and numbers, e.g. `K ** -0.5`: what a param default may be.

    Built by arithmetic on `Dim`s (and by attnc functions applied to them), outside any
    traced function; inside one it may appear in a traced expression as a constant.
    """

    __slots__ = ("expr",)

    def __init__(self, expr: ir.Expr):
        self.expr = expr

    def __repr__(self) -> str:
        return f"DimExpr({pretty_expr(self.expr)})"

    def _combine(self, op: str, other: Any, reflected: bool):
        operand = _constant_expr(other)
        if operand is None:
            return NotImplemented
        left, right = (operand, self.expr) if reflected else (self.expr, operand)
        return DimExpr(ir.Binary(op, left, right))

    __add__, __radd__ = _operator_pair("+")
    __sub__, __rsub__ = _operator_pair("-")
    __mul__, __rmul__ = _operator_pair("*")
    __truediv__, __rtruediv__ = _operator_pair("/")
    __pow__, __rpow__ = _operator_pair("**")

    def __neg__(self) -> DimExpr:
        return DimExpr(ir.Unary("-", self.expr))

    def __pos__(self) -> DimExpr:
        return self


class Dim(DimExpr):
    """A dim marker: `Dim("N")` names a size bound from the inputs at call time.

    `attnc.K` and `attnc.V` are predefined. Dims index declarations (`Vec[K]`,
    `State[K, V]`) and may appear in param defaults (`scale: Param = K ** -0.5`).
    """

    __slots__ = ("name",)

    def __init__(self, name: str):
        if not (isinstance(name, str) and name.isidentifier()):
            raise ValueError(f"a dim name is an identifier such as 'N', got {name!r}")
        super().__init__(ir.Name(name))
        self.name = name

    def __repr__(self) -> str:
        return f"Dim({self.name!r})"


K = Dim("K")
V = Dim("V")


def _number_expr(value: Any) -> ir.Expr | None:
    """A Python number as the IR the parser builds for its literal: a negative number is
    `Unary("-", Num(|value|))`, since the grammar has no negative literals."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    value = int(value) if isinstance(value, numbers.Integral) else float(value)
    negative = value < 0 or (isinstance(value, float) and math.copysign(1.0, value) < 0)
    magnitude = ir.Num(abs(value))
    return ir.Unary("-", magnitude) if negative else magnitude


def _constant_expr(value: Any) -> ir.Expr | None:
    """The IR of a number or dim expression; None for anything else."""
    if isinstance(value, DimExpr):
        return value.expr
    return _number_expr(value)


def _with_span(expr: ir.Expr, span: ir.Span) -> ir.Expr:
    """`expr` with `span` on every node (constants are built before their place is known)."""
    if isinstance(expr, ir.Unary):
        return replace(expr, operand=_with_span(expr.operand, span), span=span)
    if isinstance(expr, ir.Binary):
        return replace(expr, left=_with_span(expr.left, span), right=_with_span(expr.right, span),
                       span=span)
    if isinstance(expr, ir.Call):
        return replace(expr, args=tuple(_with_span(arg, span) for arg in expr.args), span=span)
    return replace(expr, span=span)


# ---------------------------------------------------------------- declaration annotations
@dataclass(frozen=True)
class _Declaration:
    """An annotation such as `Vec[K]`; its dims are checked when the function is traced,
    so that a mistake is reported at the parameter it annotates."""
    kind: "_DeclarationKind"
    dims: tuple


class _DeclarationKind:
    """`Vec`, `Scalar`, `Weight`, `State`, `Param`: used bare or subscripted with dims."""

    def __init__(self, name: str, kind: str, dim_counts: tuple[int, ...], meaning: str):
        self.name = name
        self.kind = kind  # input, weight, state or param
        self.dim_counts = dim_counts
        self.meaning = meaning

    def __getitem__(self, dims) -> _Declaration:
        return _Declaration(self, dims if isinstance(dims, tuple) else (dims,))

    def __repr__(self) -> str:
        return f"attnc.{self.name}"

    def usage(self) -> str:
        forms = {0: self.name, 1: f"{self.name}[K]", 2: f"{self.name}[K, V]"}
        return " or ".join(f"`{forms[count]}`" for count in self.dim_counts)


Vec = _DeclarationKind("Vec", "input", (1,), "a per-token input vector, [B, T, H, K] at call time")
Scalar = _DeclarationKind("Scalar", "input", (0,), "a per-token scalar input, [B, T, H] at call time")
Weight = _DeclarationKind("Weight", "weight", (0, 1, 2), "a learnable per-head tensor, [H, *dims]")
State = _DeclarationKind("State", "state", (1, 2), "a recurrent per-head state")
Param = _DeclarationKind("Param", "param", (0,), "a call-time scalar with a default")


# ---------------------------------------------------------------- traced values
class Traced:
    """A symbolic value inside a traced function: an IR expression and the names it reads.

    Each name read is recorded with its version (how often it had been bound when read),
    so a value that mixes a name's old and new meaning is caught. When a traced value is
    assigned to a local it becomes that statement's name: its expression turns into
    `Name(local)`, and every later use reads the name.
    """

    __slots__ = ("_tracer", "_expr", "_reads", "_position", "_line", "_order", "_mark",
                 "_local", "_named")

    def __init__(self, tracer: "_Tracer", expr: ir.Expr, reads: frozenset, line: int,
                 named: bool = False, mark: str | None = None):
        self._tracer = tracer
        self._expr = expr
        self._reads = reads          # {(IR name, version)}
        self._line = line            # where the value was computed
        self._position = len(tracer.statements)  # statements recorded before it
        self._order = tracer.next_order()
        self._mark = mark            # "gate" or "decay" until assigned
        self._local = None           # the local last holding it, for a state-reading value
        self._named = named          # a declared parameter or an assigned statement

    def __repr__(self) -> str:
        return f"<traced {pretty_expr(self._expr)}>"

    def _text(self) -> str:
        return pretty_expr(self._expr)

    def _combine(self, op: str, other: Any, reflected: bool) -> Traced:
        operands = (other, self) if reflected else (self, other)
        return self._tracer.apply(lambda left, right, span: ir.Binary(op, left, right, span),
                                  operands)

    __add__, __radd__ = _operator_pair("+")
    __sub__, __rsub__ = _operator_pair("-")
    __mul__, __rmul__ = _operator_pair("*")
    __truediv__, __rtruediv__ = _operator_pair("/")
    __pow__, __rpow__ = _operator_pair("**")
    __matmul__, __rmatmul__ = _operator_pair("@")

    def __neg__(self) -> Traced:
        return self._tracer.apply(lambda operand, span: ir.Unary("-", operand, span), (self,))

    def __pos__(self) -> Traced:
        return self

    def __abs__(self) -> Traced:
        return _call("abs", (self,))

    # ------------------------------------------------------------ what tracing cannot see
    def __bool__(self):
        raise self._tracer.error(
            f"Python control flow on traced value `{self._text()}`; {_CONTROL_FLOW_HINT}")

    def _compare(self, op: str, other: Any):
        other_text = pretty_expr(other._expr) if isinstance(other, Traced) else repr(other)
        raise self._tracer.error(
            f"Python control flow on traced value `{self._text()}` (`{self._text()} {op} "
            f"{other_text}`): it cannot be traced, and the language has no comparisons; "
            f"{_CONTROL_FLOW_HINT}")

    def __lt__(self, other):
        self._compare("<", other)

    def __le__(self, other):
        self._compare("<=", other)

    def __gt__(self, other):
        self._compare(">", other)

    def __ge__(self, other):
        self._compare(">=", other)

    def __eq__(self, other):
        self._compare("==", other)

    def __ne__(self, other):
        self._compare("!=", other)

    __hash__ = object.__hash__

    def _not_an_operator(self, op: str):
        raise self._tracer.error(f"`{op}` is not an operator of the language; traced values "
                                 "take + - * / ** @ and attnc's functions")

    def __floordiv__(self, other):
        self._not_an_operator("//")

    __rfloordiv__ = __floordiv__

    def __mod__(self, other):
        self._not_an_operator("%")

    __rmod__ = __mod__

    def __getitem__(self, index):
        raise self._tracer.error(f"indexing traced value `{self._text()}`: values are whole "
                                 "vectors and matrices; use sum, outer, diag or `@`")

    def __iter__(self):
        raise self._tracer.error(f"iterating over traced value `{self._text()}`: values are whole "
                                 "vectors and matrices; use attnc.sum for a reduction")

    def __len__(self):
        raise self._tracer.error(f"len() of traced value `{self._text()}`: sizes are bound at "
                                 "call time; use a dim in a param default, e.g. `K ** -0.5`")

    def _as_number(self):
        raise self._tracer.error(
            f"traced value `{self._text()}` used as a Python number (by float(), int() or a math "
            f"function); use attnc's functions on traced values: {_LANGUAGE_FUNCTIONS}")

    __float__ = __int__ = __index__ = __complex__ = _as_number

    def __getattr__(self, name: str):
        if name.startswith("_"):  # protocol probes by other libraries: plain absence
            raise AttributeError(name)
        hint = (f"write `attnc.{name}({self._text()})`" if name in ir.FUNCTIONS
                else f"traced values take + - * / ** @ and attnc's functions: {_LANGUAGE_FUNCTIONS}")
        raise self._tracer.error(f"traced value `{self._text()}` has no attribute `{name}`; {hint}")

    # Foreign functions: torch and numpy hand a traced argument back through these hooks.
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        _foreign_function(f"{getattr(func, '__module__', None) or 'torch'}.",
                          getattr(func, "__name__", repr(func)), (*args, *(kwargs or {}).values()))

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        _foreign_function("numpy.", ufunc.__name__, inputs)

    def __array_function__(self, func, types, args, kwargs):
        _foreign_function("numpy.", func.__name__, (*args, *kwargs.values()))


def _foreign_function(module: str, name: str, arguments: Iterable[Any]) -> None:
    traced = next((arg for arg in _flatten(arguments) if isinstance(arg, Traced)), None)
    if traced is None:  # pragma: no cover -- the hooks run only with a traced argument
        raise TypeError(f"{module}{name} got no traced argument")
    if name.startswith("__"):  # an operator between a tensor and a traced value
        raise traced._tracer.error(
            f"a tensor cannot enter traced expression `{traced._text()}`; traced values combine "
            "with numbers and dims only: pass a tensor as an input or a weight")
    fix = (f"use `attnc.{name}`" if name in ir.FUNCTIONS else
           f"traced values take + - * / ** @ and attnc's functions: {_LANGUAGE_FUNCTIONS}")
    raise traced._tracer.error(f"unknown function `{module}{name}` applied to traced value "
                               f"`{traced._text()}`; {fix}")


def _flatten(values: Iterable[Any]):
    for value in values:
        if isinstance(value, (tuple, list)):
            yield from _flatten(value)
        else:
            yield value


# ---------------------------------------------------------------- the language's functions
def _call(func: str, args: Sequence[Any]):
    """`func(*args)` as a traced value, or as a `DimExpr` when no argument is traced."""
    tracers = {arg._tracer for arg in args if isinstance(arg, Traced)}
    if len(tracers) > 1:
        raise next(iter(tracers)).error(f"`{func}` combines values of two different traced functions")
    if tracers:
        return tracers.pop().apply(lambda *operands, span: ir.Call(func, operands, span), args)
    constants = [_constant_expr(arg) for arg in args]
    if any(constant is None for constant in constants):
        kinds = ", ".join(type(arg).__name__ for arg in args)
        raise TypeError(f"attnc.{func} takes traced values (inside an @attnc.recurrence function) "
                        f"or dims and numbers, got {kinds}")
    return DimExpr(ir.Call(func, tuple(constants)))


def _function(name: str):
    arity = ir.FUNCTIONS[name]
    kind = "elementwise" if name in ir.ELEMENTWISE else "structural"

    def apply(*args):
        return _call(name, args)

    apply.__name__ = apply.__qualname__ = name
    apply.__module__ = __name__
    apply.__doc__ = (f"`{name}` of the attnc language ({kind}, {arity} argument"
                     f"{'s' if arity > 1 else ''}), recorded on traced values.")
    return apply


exp = _function("exp")
log = _function("log")
sigmoid = _function("sigmoid")
logsigmoid = _function("logsigmoid")
softplus = _function("softplus")
tanh = _function("tanh")
relu = _function("relu")
elu = _function("elu")
silu = _function("silu")
sqrt = _function("sqrt")
rsqrt = _function("rsqrt")
abs_ = _function("abs")  # attnc exports it as `abs`; builtin abs() works on traced values too
l2norm = _function("l2norm")
outer = _function("outer")
diag = _function("diag")
sum_ = _function("sum")  # attnc exports it as `sum`; named apart so this module keeps the builtin


def gate(value: Traced) -> Traced:
    """Mark `a = attnc.gate(expr)` as a gate statement: a per-token decay factor, which the
    analysis takes to log space. Only the whole right-hand side of an assignment."""
    return _marked(value, "gate")


def decay(value: Traced) -> Traced:
    """Mark `S = attnc.decay(expr)` as the decay of state `S` (a rescaling such as
    `a * S` or `diag(a) @ S`); a plain reassignment of a state is an update."""
    return _marked(value, "decay")


def _marked(value: Any, mark: str) -> Traced:
    if not isinstance(value, Traced):
        raise TypeError(f"attnc.{mark} takes a traced value, as in `{_MARK_EXAMPLES[mark]}`; "
                        f"got {type(value).__name__}")
    tracer = value._tracer
    line = tracer.sync()
    expr, reads = tracer.operand(value, line)
    return Traced(tracer, expr, reads, line, mark=mark)


# ---------------------------------------------------------------- source locations
class _Source:
    """The traced function's file, its text, and its syntax tree, read only for spans."""

    def __init__(self, fn: Callable):
        code = fn.__code__
        self.filename = code.co_filename
        self.text = "".join(linecache.getlines(self.filename, fn.__globals__))
        self.lines = self.text.splitlines()
        self.first_line = code.co_firstlineno
        self.function = _function_node(self.text, code)
        self._statement_spans = _statement_spans(self.function, self.filename)

    def statement_span(self, line: int) -> ir.Span:
        """The innermost statement of the function covering `line`."""
        return self._statement_spans.get(line) or self._line_span(line)

    def parameter_span(self, name: str) -> ir.Span:
        if self.function is not None:
            arguments = self.function.args
            for arg in (*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs):
                if arg.arg == name:
                    return _node_span(arg, self.filename)
        return self.header_span()

    def header_span(self) -> ir.Span:
        """`def NAME` of the traced function."""
        node = self.function
        if node is None:
            return self._line_span(self.first_line)
        width = len(f"def {node.name}")
        return ir.Span(self.filename, node.lineno, node.col_offset + 1, node.lineno,
                       node.col_offset + 1 + width)

    def _line_span(self, line: int) -> ir.Span:
        text = self.lines[line - 1] if 1 <= line <= len(self.lines) else ""
        start = len(text) - len(text.lstrip()) + 1
        return ir.Span(self.filename, line, start, line, max(start + 1, len(text.rstrip()) + 1))


def _function_node(text: str, code: CodeType) -> ast.FunctionDef | None:
    """The `def` of `code` in its file: same name, first line (decorators included) equal."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return None
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == code.co_name:
            first_line = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            if first_line == code.co_firstlineno:
                return node
    return None


def _node_span(node: ast.AST, filename: str) -> ir.Span:
    return ir.Span(filename, node.lineno, node.col_offset + 1, node.end_lineno, node.end_col_offset + 1)


def _statement_spans(function: ast.FunctionDef | None, filename: str) -> dict[int, ir.Span]:
    """Line -> span of the innermost statement of the function's body covering it."""
    if function is None:
        return {}
    best: dict[int, tuple[int, ir.Span]] = {}
    for node in ast.walk(function):
        if not isinstance(node, ast.stmt) or node is function:
            continue
        extent = node.end_lineno - node.lineno
        for line in range(node.lineno, node.end_lineno + 1):
            if line not in best or extent < best[line][0]:
                best[line] = (extent, _node_span(node, filename))
    return {line: span for line, (_, span) in best.items()}


# ---------------------------------------------------------------- the tracer
class _Tracer:
    """Records the statements of one traced call of one function."""

    def __init__(self, code: CodeType, source: _Source, states: frozenset[str]):
        self.code = code
        self.source = source
        self.states = states
        self.statements: list[ir.Statement] = []
        self.versions: dict[str, int] = {}   # IR name -> how many times it has been bound
        self.bound_at: dict[str, int] = {}   # IR name -> line of its latest binding
        self.locals: dict[str, Any] = {}     # local -> the value it held at the last look
        self.frame: FrameType | None = None  # the traced call, once an operation has run
        self.return_line: int | None = None
        self._created = 0

    def next_order(self) -> int:
        self._created += 1
        return self._created

    def error(self, message: str, line: int | None = None) -> SpecError:
        """A located error at `line` of the traced function (default: the line running now)."""
        if line is None:
            line = self.current_line()
        span = self.source.statement_span(line) if line else self.source.header_span()
        return SpecError(diagnostic(message, span, self.source.text))

    # ------------------------------------------------------------ the traced call
    def parameter(self, name: str, line: int) -> Traced:
        value = Traced(self, ir.Name(name, self.source.parameter_span(name)),
                       frozenset({(name, 0)}), line, named=True)
        self.versions[name] = 0
        self.locals[name] = value
        return value

    def current_line(self) -> int | None:
        frame = self._traced_frame()
        return frame.f_lineno if frame is not None else None

    def sync(self) -> int:
        """Record the assignments made since the last look; return the line running now."""
        frame = self._traced_frame()
        if frame is None:
            raise self.error("a traced value was used outside the @attnc.recurrence function "
                             "that made it", self.return_line or self.source.first_line)
        self.frame = frame
        self._see_assignments(frame.f_locals)
        return frame.f_lineno

    def finish(self) -> None:
        """After the traced function returned: record its last assignments."""
        if self.frame is not None:
            self.return_line = self.frame.f_lineno
            self._see_assignments(self.frame.f_locals)
        self.frame = None  # a frame keeps every traced value alive; drop it

    def _traced_frame(self) -> FrameType | None:
        frame = inspect.currentframe()
        while frame is not None and frame.f_code is not self.code:
            frame = frame.f_back
        return frame

    # ------------------------------------------------------------ building values
    def apply(self, build: Callable[..., ir.Expr], operands: Sequence[Any]) -> Traced:
        """A new value `build(*operand expressions, span=...)` at the line running now."""
        line = self.sync()
        exprs, reads = [], frozenset()
        for operand in operands:
            expr, operand_reads = self.operand(operand, line)
            exprs.append(expr)
            reads |= operand_reads
        return Traced(self, build(*exprs, span=self.source.statement_span(line)), reads, line)

    def operand(self, value: Any, line: int) -> tuple[ir.Expr, frozenset]:
        """The expression and reads of one operand used at `line`."""
        span = self.source.statement_span(line)
        if isinstance(value, Traced):
            if value._tracer is not self:
                raise self.error("this combines values of two different traced functions", line)
            if value._mark is not None:
                raise self.error(
                    f"attnc.{value._mark}(...) marks the whole value of an assignment, as in "
                    f"`{_MARK_EXAMPLES[value._mark]}`; it cannot be part of a larger expression", line)
            self._require_current(value, line)
            expr = value._expr
            # A name is re-located at its use, so a diagnostic about it points here.
            return (ir.Name(expr.id, span) if isinstance(expr, ir.Name) else expr), value._reads
        constant = _constant_expr(value)
        if constant is None:
            raise self.error(f"a traced expression combines traced values, numbers and dims; got "
                             f"{type(value).__name__} `{value!r}`", line)
        dims = sorted({node.id for node in _walk(constant) if isinstance(node, ir.Name)})
        if dims:
            raise self.error(f"dim `{dims[0]}` used in the body; a dim's value enters through a "
                             f"param, e.g. a parameter `{dims[0].lower()}_size: Param = {dims[0]}`",
                             line)
        if isinstance(value, numbers.Real) and not math.isfinite(value):
            raise self.error(f"the number {value!r} has no literal in the language; use a finite "
                             "number", line)
        return _with_span(constant, span), frozenset()

    def _require_current(self, value: Traced, line: int) -> None:
        """Refuse a value that reads a name bound again since it was computed: the IR reads
        the latest binding of every name, so it could not say which one was meant."""
        for name, version in sorted(value._reads):
            if self.versions.get(name, 0) == version:
                continue
            where = self.bound_at[name]
            if name in self.states:
                raise self.error(
                    f"this uses state `{name}` as it was before line {where}, where it is "
                    f"rewritten, together with values computed after it; an expression reads each "
                    f"state at one point, so compute it entirely before or after line {where}", line)
            raise self.error(
                f"this uses `{name}` as it was before line {where}, where `{name}` is bound again; "
                f"a statement reads the latest `{name}`, so keep the earlier value in a local of "
                f"another name (e.g. `{name}0 = {name}` before line {where}) or use the new one",
                line)

    def _reads_state(self, value: Traced) -> bool:
        return any(name in self.states for name, _ in value._reads)

    # ------------------------------------------------------------ assignments -> statements
    def _see_assignments(self, local_values: Mapping[str, Any]) -> None:
        fresh = []
        for name, value in local_values.items():
            if self.locals.get(name) is not value:
                self.locals[name] = value
                if isinstance(value, Traced) and value._tracer is self:
                    fresh.append((name, value))
        for name, value in sorted(fresh, key=lambda item: item[1]._order):
            self._assign(name, value)

    def _assign(self, name: str, value: Traced) -> None:
        if name in self.states:
            self._rewrite_state(name, value)
        elif value._mark == "decay":
            raise self.error(f"attnc.decay(...) rewrites a state, but `{name}` is not a state; "
                             f"assign it to a state parameter, as in `S = attnc.decay(a * S)`",
                             value._line)
        elif value._named:
            pass  # another Python name for a declared or already-defined value
        elif self._reads_state(value):
            if value._mark == "gate":
                raise self.error(f"gate `{name}` reads a state; a gate is a per-token value "
                                 "computed from inputs, weights and params", value._line)
            value._local = name  # inline wherever used; a readout named `name` if returned
        else:
            self._define("gate" if value._mark == "gate" else "feature", name, value)

    def _rewrite_state(self, name: str, value: Traced) -> None:
        if value._mark == "gate":
            raise self.error(f"attnc.gate(...) defines a gate, but `{name}` is a state; give the gate "
                             f"its own name and rewrite the state with it, as in "
                             f"`a = attnc.gate(exp(g))` then `{name} = attnc.decay(a * {name})`",
                             value._line)
        if value._named:
            line = self.current_line() or value._line
            raise self.error(f"state `{name}` is assigned `{value._text()}` itself; a state is "
                             f"rewritten by an expression, e.g. `{name} = {name} + outer(k, v)`", line)
        self._define("decay" if value._mark == "decay" else "update", name, value)

    def _define(self, kind: str, target: str, value: Traced) -> None:
        """Record `kind target = value` and make `value` stand for `target` from now on."""
        self._require_current(value, value._line)
        if target not in self.states:
            self._keep_earlier_value(target, value._line)
        span = self.source.statement_span(value._line)
        self.statements.append(ir.Statement(kind, target, value._expr, span))
        version = self.versions.get(target, 0) + 1
        self.versions[target] = version
        self.bound_at[target] = value._line
        value._expr = ir.Name(target, span)
        value._reads = frozenset({(target, version)})
        value._position = len(self.statements)
        value._mark = None
        value._named = True

    def _keep_earlier_value(self, name: str, line: int) -> None:
        """Before `name` is bound again, turn each other local still holding its current
        value into a feature of its own (`raw = q` then `q = l2norm(q)`: `feature raw = q`),
        so that the local keeps meaning the earlier value. A state's earlier value has no
        such name: reading it after the rewrite is refused by `_require_current`."""
        current = frozenset({(name, self.versions.get(name, 0))})
        for local, held in list(self.locals.items()):
            if (local != name and local not in self.states and isinstance(held, Traced)
                    and held._tracer is self and held._named and held._reads == current):
                held._line = line  # the feature is recorded where `name` is bound again
                self._define("feature", local, held)

    # ------------------------------------------------------------ outputs
    def statements_with_readouts(self, result: Any) -> tuple[ir.Statement, ...]:
        """The recorded statements with a readout for each output, each placed where its
        value was computed."""
        readouts = self._readouts(result)
        ordered: list[ir.Statement] = []
        for position in range(len(self.statements) + 1):
            ordered += [statement for at, statement in readouts if at == position]
            if position < len(self.statements):
                ordered.append(self.statements[position])
        return tuple(ordered)

    def _readouts(self, result: Any) -> list[tuple[int, ir.Statement]]:
        line = self.return_line or self.source.first_line
        if isinstance(result, dict):
            outputs = list(result.items())
        elif isinstance(result, (tuple, list)):
            outputs = [(None, value) for value in result]
        else:
            outputs = [(None, result)]
        if result is None or not outputs:
            raise self.error("the function returns no output; return one, e.g. `return q @ S`, "
                             "a tuple, or a dict name -> value", line)
        readouts = []
        for index, (key, value) in enumerate(outputs):
            if key is not None and not (isinstance(key, str) and key.isidentifier()):
                raise self.error(f"output name {key!r} is not an identifier; a returned dict maps "
                                 "output names to values", line)
            if not isinstance(value, Traced) or value._tracer is not self:
                raise self.error(f"output {key or index} is {type(value).__name__} `{value!r}`, not a "
                                 "traced value; return expressions of the function's parameters", line)
            if value._mark is not None:
                raise self.error(f"attnc.{value._mark}(...) marks an assignment, as in "
                                 f"`{_MARK_EXAMPLES[value._mark]}`; it cannot be returned", line)
            default = "o" if len(outputs) == 1 else f"o{index + 1}"
            local = value._local if self._reads_state(value) else None
            span = self.source.statement_span(line if value._named else value._line)
            statement = ir.Statement("readout", key or local or default, value._expr, span)
            readouts.append((value._position, statement))
        return readouts


# ---------------------------------------------------------------- signature -> declarations
@dataclass(frozen=True)
class _Declarations:
    dims: tuple[ir.Dim, ...]
    inputs: tuple[ir.Input, ...]
    params: tuple[ir.Param, ...]
    weights: tuple[ir.Weight, ...]
    states: tuple[ir.State, ...]


def _declarations(parameters: Iterable[inspect.Parameter], source: _Source) -> _Declarations:
    dims: dict[str, ir.Dim] = {}
    declared: dict[str, list] = {"input": [], "param": [], "weight": [], "state": []}

    def note_dims(expr: ir.Expr, span: ir.Span) -> None:
        for node in _walk(expr):
            if isinstance(node, ir.Name):
                dims.setdefault(node.id, ir.Dim(node.id, span))

    for parameter in parameters:
        span = source.parameter_span(parameter.name)

        def fail(message: str) -> SpecError:
            return SpecError(diagnostic(message, span, source.text))

        annotation = parameter.annotation
        if isinstance(annotation, _DeclarationKind):
            annotation = annotation[()]
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            raise fail(f"`{parameter}` cannot be traced; declare each input as its own parameter")
        if parameter.default is not parameter.empty:
            if isinstance(annotation, _Declaration) and annotation.kind.kind != "param":
                raise fail(f"`{parameter.name}` is annotated {annotation.kind!r} but has a default; "
                           f"a parameter with a default is a param (a call-time scalar)")
            default = _constant_expr(parameter.default)
            if default is None:
                raise fail(f"the default of param `{parameter.name}` must be a number or an "
                           f"expression of dims such as `K ** -0.5`, got "
                           f"{type(parameter.default).__name__}")
            note_dims(default, span)
            declared["param"].append(ir.Param(parameter.name, _with_span(default, span), span))
            continue
        if annotation is parameter.empty:
            raise fail(f"parameter `{parameter.name}` needs an annotation: `Vec[K]`, `Scalar`, "
                       f"`Weight[...]` or `State[K, V]` (or a default, for a param)")
        if not isinstance(annotation, _Declaration):
            raise fail(f"annotation `{annotation!r}` of `{parameter.name}` is not an attnc "
                       f"declaration; use `Vec[K]`, `Scalar`, `Weight[...]` or `State[K, V]`")
        kind = annotation.kind
        if kind.kind == "param":
            raise fail(f"param `{parameter.name}` needs a default, e.g. "
                       f"`{parameter.name}: attnc.Param = K ** -0.5`")
        for dim in annotation.dims:
            if not isinstance(dim, Dim):
                raise fail(f"{kind!r} takes dims such as attnc.K or attnc.Dim('N'), got {dim!r}")
        if len(annotation.dims) not in kind.dim_counts:
            raise fail(f"`{parameter.name}`: {kind!r} is {kind.meaning}; write {kind.usage()}")
        for dim in annotation.dims:
            dims.setdefault(dim.name, ir.Dim(dim.name, span))
        shape = tuple(dim.name for dim in annotation.dims)
        node_type = {"input": ir.Input, "weight": ir.Weight, "state": ir.State}[kind.kind]
        declared[kind.kind].append(node_type(parameter.name, shape, span))
    return _Declarations(tuple(dims.values()), *(tuple(declared[kind]) for kind in declared))


def _walk(expr: ir.Expr):
    yield expr
    children = {ir.Unary: lambda e: (e.operand,), ir.Binary: lambda e: (e.left, e.right),
                ir.Call: lambda e: e.args}.get(type(expr), lambda e: ())
    for child in children(expr):
        yield from _walk(child)


def _signature(fn: Callable, source: _Source) -> inspect.Signature:
    try:
        return inspect.signature(fn, eval_str=True)
    except Exception as error:  # noqa: BLE001 - any failure of the user's annotations
        raise SpecError(diagnostic(
            f"cannot evaluate the annotations of `{fn.__name__}` ({type(error).__name__}: {error}); "
            "under `from __future__ import annotations` the dims they use must be module-level names",
            source.header_span(), source.text)) from None


# ---------------------------------------------------------------- entry points
def trace(fn: Callable) -> ir.Spec:
    """Run `fn` once on traced values and return the checked spec it describes.

    Raises `SpecError`, located at the user's file:line, if `fn` is not a recurrence the
    language can state.
    """
    fn = inspect.unwrap(fn)
    if not inspect.isfunction(fn):
        raise TypeError(f"attnc can trace a Python function, got {type(fn).__name__}")
    source = _Source(fn)
    if inspect.isgeneratorfunction(fn) or inspect.iscoroutinefunction(fn):
        raise SpecError(diagnostic(f"`{fn.__name__}` must be a plain function, not a generator or "
                                   "coroutine", source.header_span(), source.text))
    parameters = list(_signature(fn, source).parameters.values())
    declarations = _declarations(parameters, source)
    tracer = _Tracer(fn.__code__, source, frozenset(state.name for state in declarations.states))
    def_line = source.header_span().line
    arguments = {p.name: tracer.parameter(p.name, def_line) for p in parameters}
    positional = [arguments[p.name] for p in parameters if p.kind is p.POSITIONAL_ONLY]
    keywords = {p.name: arguments[p.name] for p in parameters if p.kind is not p.POSITIONAL_ONLY}
    try:
        result = fn(*positional, **keywords)
        tracer.finish()
        statements = tracer.statements_with_readouts(result)
    except SpecError as error:
        raise error.with_traceback(None) from None  # the user's line is in the message
    finally:
        tracer.frame = None

    never_rewritten = [
        diagnostic(f"state `{state.name}` is never reassigned; rewrite it in the body, e.g. "
                   f"`{state.name} = {state.name} + outer(k, v)` (an update) or "
                   f"`{state.name} = attnc.decay(a * {state.name})`", state.span, source.text)
        for state in declarations.states if tracer.versions[state.name] == 0
    ]
    if never_rewritten:
        raise SpecError(never_rewritten)
    return check(ir.Spec(
        name=fn.__name__,
        dims=declarations.dims,
        inputs=declarations.inputs,
        params=declarations.params,
        weights=declarations.weights,
        states=declarations.states,
        statements=statements,
        doc=inspect.getdoc(fn) or "",
        source=source.text,
        filename=source.filename,
        span=source.header_span(),
    ))


def to_spec(op_or_spec: Any) -> str:
    """The `.attn` text of a compiled op (or a spec); it parses back to an equal spec."""
    spec = op_or_spec if isinstance(op_or_spec, ir.Spec) else op_or_spec.spec
    return pretty(spec)
