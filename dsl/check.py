"""Meaning: the semantic checks every spec passes, and the shape rules of expressions.

`check(spec)` guards the IR whichever front end built it: it collects every problem
(declarations, names, statement rules, shapes) and raises one `SpecError` holding all
of them, each located at the offending node.

The shape rules are public because the analysis and the reference interpreter reuse
them: `shape_of(expr, env)` gives the shape of one expression, `infer(spec)` the shapes
of every name each statement can read, `output_shapes(spec)` the shape of each output.
A shape is a tuple of dim names: () scalar, ("K",) vector, ("K", "V") matrix.
"""
from __future__ import annotations

import difflib
import functools
import math
import re
from dataclasses import dataclass
from typing import Callable, Mapping

from . import ir
from .errors import Diagnostic, SpecError, diagnostic
from .evaluate import SCALAR_FUNCTIONS, evaluate_scalar
from .ir import Shape
from .printer import pretty_expr

# The language's keywords (grammar.lark); no declaration or statement target may use one.
RESERVED_WORDS = frozenset(
    {"attention", "end", "dims", "inputs", "param", "weight", "state", *ir.STATEMENT_KINDS}
)
_ELEMENTWISE_BINARY_OPS = ("+", "-", "*", "/")
# Operators and calls nested inside one another, at most. The checks, the analysis (sympy)
# and the emitters walk expressions recursively; shipped specs nest fewer than 10 deep.
MAX_EXPRESSION_DEPTH = 64
# Integer literals beyond int64 overflow torch's scalar arguments.
_LARGEST_INTEGER = 2**63 - 1
# Constant exponents beyond 2 ** 24: fp32 kernels hold no such integer exactly, so an odd
# one could turn even (`f ** 3 ** 3 ** 3` gave sigmoid(-inf) in fp64 and sigmoid(+inf) in
# fp32, where f < -1), and no recurrence raises to such a power.
MAX_EXPONENT = 2**24
_VALUE_KINDS_A_FEATURE_MAY_REBIND = ("input", "feature", "gate")


def check(spec: ir.Spec) -> ir.Spec:
    """Return `spec` unchanged if it is valid; otherwise raise one `SpecError` listing
    every problem found."""
    problems = _SpecChecker(spec).problems()
    if problems:
        raise SpecError(problems)
    return spec


# ---------------------------------------------------------------- shape rules
def describe_shape(shape: Shape) -> str:
    """`a scalar`, `a vector [K]` or `a matrix [K, V]`, for messages."""
    if not shape:
        return "a scalar"
    kind = "a vector" if len(shape) == 1 else "a matrix" if len(shape) == 2 else "a tensor"
    return f"{kind} [{', '.join(shape)}]"


def shape_of(expr: ir.Expr, env: Mapping[str, Shape]) -> Shape:
    """The shape of `expr` when each name has the shape `env` gives it.

    `env` maps every name the expression may read (inputs, weights, params, states,
    earlier features and gates) to its shape; `infer(spec)` builds it per statement.
    Raises `SpecError` for a name missing from `env` or an ill-shaped expression,
    which never happens for a checked spec and an environment from `infer`.
    """
    problems: list[tuple[str, ir.Span | None]] = []

    def lookup(name: ir.Name) -> Shape | None:
        if name.id not in env:
            problems.append((f"name `{name.id}` has no shape in this environment", name.span))
            return None
        return env[name.id]

    shape = _ShapeRules(lookup, lambda message, span: problems.append((message, span))).shape(expr)
    if problems:
        raise SpecError([diagnostic(message, span) for message, span in problems])
    return shape


def infer(spec: ir.Spec) -> dict[int, dict[str, Shape]]:
    """Shapes of the names each statement reads, for a checked spec.

    `infer(spec)[i]` maps every name statement `spec.statements[i]` may read to its
    shape when that statement runs: inputs, weights, params, states, and the features
    and gates defined before it (a rebinding such as `feature q = l2norm(q)` replaces
    the input's entry from the next statement on). The statement's own result has
    shape `shape_of(statement.expr, infer(spec)[i])`.
    """
    env: dict[str, Shape] = {}
    for declared in (*spec.inputs, *spec.weights, *spec.states):
        env[declared.name] = declared.shape
    env.update({param.name: () for param in spec.params})
    per_statement: dict[int, dict[str, Shape]] = {}
    for index, statement in enumerate(spec.statements):
        per_statement[index] = dict(env)
        if statement.kind in ("feature", "gate"):
            env[statement.target] = shape_of(statement.expr, env)
    return per_statement


def output_shapes(spec: ir.Spec) -> dict[str, Shape]:
    """Output name -> the shape of the value its readout defines, for a checked spec."""
    environments = infer(spec)
    return {
        statement.target: shape_of(statement.expr, environments[index])
        for index, statement in enumerate(spec.statements)
        if statement.kind == "readout"
    }


class _ShapeRules:
    """Shape inference over one expression.

    Name resolution is delegated to `lookup`, which returns None for a name it has
    already reported. Every problem goes to `report`; the shape of an ill-shaped
    subexpression is None, so one mistake is reported once, not again by each parent.
    """

    def __init__(self, lookup: Callable[[ir.Name], Shape | None],
                 report: Callable[[str, ir.Span | None], None]):
        self.lookup = lookup
        self.report = report

    def shape(self, expr: ir.Expr) -> Shape | None:
        if isinstance(expr, ir.Num):
            return ()
        if isinstance(expr, ir.Name):
            return self.lookup(expr)
        if isinstance(expr, ir.Unary):
            return self.shape(expr.operand)
        if isinstance(expr, ir.Binary):
            return self._binary(expr)
        if isinstance(expr, ir.Call):
            return self._call(expr)
        raise TypeError(f"not an expression node: {expr!r}")

    def _binary(self, expr: ir.Binary) -> Shape | None:
        left, right = self.shape(expr.left), self.shape(expr.right)
        if left is None or right is None:
            return None
        if expr.op == "@":
            return self._matmul(expr, left, right)
        if expr.op == "**":
            if right:
                self.report(f"the exponent of `**` must be a scalar, but `{pretty_expr(expr.right)}` "
                            f"is {describe_shape(right)}", expr.span)
                return None
            return left
        return self._elementwise(expr, left, right)

    def _elementwise(self, expr: ir.Binary, left: Shape, right: Shape) -> Shape | None:
        if not left or not right or left == right:
            return left or right
        text = f"`{pretty_expr(expr)}` combines {describe_shape(left)} with {describe_shape(right)}"
        if len(left) != len(right):
            self.report(f"{text}; a vector never broadcasts against a matrix: "
                        f"{_broadcast_fix(expr, left, right)}", expr.span)
            return None
        hint = ""
        if len(left) == 2 and left == right[::-1]:
            hint = _transpose_hint(expr.right) or _transpose_hint(expr.left)
        self.report(f"{text}; elementwise `{expr.op}` needs equal shapes{hint}", expr.span)
        return None

    def _matmul(self, expr: ir.Binary, left: Shape, right: Shape) -> Shape | None:
        for operand, shape in ((expr.left, left), (expr.right, right)):
            if not shape:
                self.report(f"`@` contracts vectors and matrices, but `{pretty_expr(operand)}` is "
                            f"a scalar; scale with `*` instead", expr.span)
                return None
        if left[-1] == right[0]:
            return left[:-1] + right[1:]
        self.report(f"`{pretty_expr(expr)}` contracts {describe_shape(left)} with "
                    f"{describe_shape(right)}: dims {left[-1]} and {right[0]} differ", expr.span)
        return None

    def _call(self, call: ir.Call) -> Shape | None:
        arguments = [self.shape(argument) for argument in call.args]
        if call.func not in ir.FUNCTIONS:
            guess = difflib.get_close_matches(call.func, list(ir.FUNCTIONS), n=1)
            hint = f" (did you mean `{guess[0]}`?)" if guess else ""
            self.report(f"unknown function `{call.func}`{hint}; known functions: "
                        f"{', '.join(ir.FUNCTIONS)}", call.span)
            return None
        wanted = ir.FUNCTIONS[call.func]
        if len(arguments) != wanted:
            plural = "argument" if wanted == 1 else "arguments"
            self.report(f"`{call.func}` takes {wanted} {plural}, but got {len(arguments)}", call.span)
            return None
        if any(shape is None for shape in arguments):
            return None
        return self._function_result(call, arguments)

    def _function_result(self, call: ir.Call, arguments: list[Shape]) -> Shape | None:
        func, first = call.func, arguments[0]
        if func == "outer":
            if all(len(shape) == 1 for shape in arguments):
                return first + arguments[1]
            self.report(f"`outer` takes two vectors, but got {describe_shape(first)} and "
                        f"{describe_shape(arguments[1])}", call.span)
            return None
        if func in ("diag", "l2norm") and len(first) != 1:
            self.report(f"`{func}` takes a vector, but `{pretty_expr(call.args[0])}` is "
                        f"{describe_shape(first)}", call.span)
            return None
        if func == "diag":
            return first + first
        if func == "sum":
            if not first:
                self.report(f"`sum` takes a vector or a matrix, but `{pretty_expr(call.args[0])}` is "
                            "a scalar", call.span)
                return None
            return ()
        return first  # l2norm and the elementwise functions keep the shape


def _broadcast_fix(expr: ir.Binary, left: Shape, right: Shape) -> str:
    """Suggest the explicit form of a vector-times-matrix that the user probably meant."""
    if len(left) == 1:
        vector, vector_shape, matrix, matrix_shape = expr.left, left, expr.right, right
    else:
        vector, vector_shape, matrix, matrix_shape = expr.right, right, expr.left, left
    diagonal, other = f"diag({pretty_expr(vector)})", _operand_text(matrix)
    if vector_shape[0] == matrix_shape[0]:
        return f"write `{diagonal} @ {other}` to scale its rows, or use `outer(a, b)`"
    if vector_shape[0] == matrix_shape[1]:
        return f"write `{other} @ {diagonal}` to scale its columns, or use `outer(a, b)`"
    return "write `diag(a) @ S` or `outer(a, b)`"


def _operand_text(expr: ir.Expr) -> str:
    text = pretty_expr(expr)
    return text if isinstance(expr, (ir.Name, ir.Call)) else f"({text})"


def _transpose_hint(expr: ir.Expr) -> str:
    """For an expression whose matrix shape came out transposed: point at its first
    outer product and suggest swapping the arguments; empty if it has none."""
    for node in _walk(expr):
        if isinstance(node, ir.Call) and node.func == "outer" and len(node.args) == 2:
            swapped = ir.Call("outer", node.args[::-1])
            return f"; `{pretty_expr(node)}` is transposed: did you mean `{pretty_expr(swapped)}`?"
    return ""


def _walk(expr: ir.Expr):
    yield expr
    if isinstance(expr, ir.Unary):
        yield from _walk(expr.operand)
    elif isinstance(expr, ir.Binary):
        yield from _walk(expr.left)
        yield from _walk(expr.right)
    elif isinstance(expr, ir.Call):
        for argument in expr.args:
            yield from _walk(argument)


def _depth(expr: ir.Expr) -> int:
    """How many operators and calls nest in `expr`. Iterative: the expression may be too
    deep to recurse into."""
    deepest, stack = 0, [(expr, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        children = (node.operand,) if isinstance(node, ir.Unary) else (
            (node.left, node.right) if isinstance(node, ir.Binary) else
            node.args if isinstance(node, ir.Call) else ())
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _excerpt(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------- spec checks
@dataclass(frozen=True)
class _Binding:
    """What a name means at some point of the spec."""
    kind: str  # dim, input, param, weight, state, feature, gate, output
    shape: Shape | None  # None: unknown after a reported problem
    span: ir.Span | None
    declaration: object = None  # the IR node that introduced the name


def _at(span: ir.Span | None) -> str:
    return f"{span.line}:{span.col}" if span else "an earlier line"


def _shape_text(name: str, shape: Shape) -> str:
    return f"{name}[{', '.join(shape)}]" if shape else name


class _SpecChecker:
    """Collects every semantic problem of one spec, in source order."""

    def __init__(self, spec: ir.Spec):
        self.spec = spec
        self.found: list[Diagnostic] = []
        self.names: dict[str, _Binding] = {}
        # Names whose problem is already reported; their uses stay quiet to avoid echoes.
        self.duplicated: set[str] = set()
        self.states_used_too_early: set[str] = set()

    def problems(self) -> list[Diagnostic]:
        self._check_declarations()
        self._check_params()
        self._check_statements()
        self.found.sort(key=lambda problem: (problem.span.line, problem.span.col) if problem.span else (0, 0))
        return self.found

    def report(self, message: str, span: ir.Span | None) -> None:
        self.found.append(diagnostic(message, span, self.spec.source))

    # ------------------------------------------------------------ declarations
    def _check_declarations(self) -> None:
        spec = self.spec
        declared = [("dim", dim, ()) for dim in spec.dims]
        declared += [("input", node, node.shape) for node in spec.inputs]
        declared += [("param", node, ()) for node in spec.params]
        declared += [("weight", node, node.shape) for node in spec.weights]
        declared += [("state", node, node.shape) for node in spec.states]
        for kind, node, shape in declared:
            if not self._name_is_usable(node.name, kind, node.span):
                continue
            if node.name in self.names:
                self.duplicated.add(node.name)
                earlier = self.names[node.name]
                self.report(f"`{node.name}` is already declared as {_article(earlier.kind)} at "
                            f"{_at(earlier.span)}; pick another name for this {kind}", node.span)
                continue
            usable_shape = shape if self._shape_is_valid(kind, node, shape) else None
            self.names[node.name] = _Binding(kind, usable_shape, node.span, node)
        bound_dims = {dim for node in spec.inputs for dim in node.shape}
        for dim in spec.dims:
            if dim.name not in bound_dims:
                self.report(f"dim `{dim.name}` is never bound: no input has shape [..{dim.name}..]; "
                            f"dims take their sizes from inputs", dim.span)

    def _name_is_usable(self, name: str, kind: str, span: ir.Span | None) -> bool:
        if name in RESERVED_WORDS:
            self.report(f"`{name}` is a reserved word and cannot name {_article(kind)}", span)
            return False
        if name in ir.FUNCTIONS:
            self.report(f"`{name}` is a function name and cannot name {_article(kind)}", span)
            return False
        return True

    def _shape_is_valid(self, kind: str, node, shape: Shape) -> bool:
        valid = True
        declared_dims = {dim.name for dim in self.spec.dims}
        for dim in shape:
            if dim not in declared_dims:
                self.report(f"dim `{dim}` in {kind} `{_shape_text(node.name, shape)}` is not declared; "
                            f"add it to `dims`", node.span)
                valid = False
        if len(shape) > 2:
            self.report(f"{kind} `{_shape_text(node.name, shape)}` has {len(shape)} dims; "
                        "at most 2 (a matrix) are supported", node.span)
            valid = False
        return valid

    def _check_params(self) -> None:
        for position, param in enumerate(self.spec.params):
            earlier = frozenset(p.name for p in self.spec.params[:position])
            if not self._expression_is_sound(param.default):
                continue
            resolve = functools.partial(self._resolve_in_param, param=param, earlier_params=earlier)
            _ShapeRules(resolve, self.report).shape(param.default)

    def _resolve_in_param(self, name: ir.Name, param: ir.Param,
                          earlier_params: frozenset[str]) -> Shape | None:
        binding = self.names.get(name.id)
        if binding is None:
            self.report(f"name `{name.id}` is not declared; a param default may use dims, "
                        "numbers and earlier params", name.span)
        elif binding.kind == "dim" or name.id in earlier_params:
            return ()
        elif name.id == param.name:
            self.report(f"param `{param.name}` refers to itself in its default", name.span)
        elif binding.kind == "param":
            self.report(f"param `{param.name}` uses param `{name.id}`, which is declared after it "
                        f"(at {_at(binding.span)}); declare `{name.id}` first", name.span)
        else:
            self.report(f"param `{param.name}` uses {binding.kind} `{name.id}`; a param default "
                        "may use only dims, numbers and earlier params", name.span)
        return None

    # ------------------------------------------------------------ numbers and nesting
    def _expression_is_sound(self, expr: ir.Expr) -> bool:
        """Report an expression nested too deeply, a number out of range, or a part made of
        numbers only that has no finite value (`1 / 0`, `exp(1000)`); False if any was found,
        and then nothing else of the expression is checked."""
        depth = _depth(expr)
        if depth > MAX_EXPRESSION_DEPTH:
            self.report(f"this expression nests operators and calls {depth} levels deep; at most "
                        f"{MAX_EXPRESSION_DEPTH} are supported: split it over several `feature` lines",
                        expr.span)
            return False
        found = len(self.found)
        for node in _walk(expr):
            if isinstance(node, ir.Num):
                self._check_number(node)
        if len(self.found) == found:
            self._fold_numbers(expr)
        return len(self.found) == found

    def _check_number(self, number: ir.Num) -> None:
        value = number.value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.report(f"`{value!r}` is not a number", number.span)
        elif isinstance(value, int) and abs(value) > _LARGEST_INTEGER:
            self.report(f"integer `{_excerpt(str(value))}` does not fit in 64 bits; write it as a float "
                        f"(`{float(value):.6g}`)", number.span)
        elif isinstance(value, float) and not math.isfinite(value):
            self.report(f"number `{self._literal(number)}` is out of range: a 64-bit float holds "
                        "finite values up to about 1.8e308", number.span)

    def _literal(self, number: ir.Num) -> str:
        """The number as written, where its span points into this spec's source."""
        span = number.span
        lines = self.spec.source.split("\n")
        if span is not None and span.line == span.end_line and 1 <= span.line <= len(lines):
            text = lines[span.line - 1][span.col - 1: span.end_col - 1]
            if text:
                return text
        return repr(number.value)

    def _fold_numbers(self, expr: ir.Expr) -> float | None:
        """The value of `expr` if it is made of numbers only, else None; reports the
        innermost such part without a finite value, and a division by such a part that is
        zero. The recurrent kernels fold these parts at compile time."""
        if isinstance(expr, ir.Num):
            return float(expr.value)
        if isinstance(expr, ir.Unary):
            value = self._fold_numbers(expr.operand)
            return None if value is None else -value
        if isinstance(expr, ir.Binary):
            left, right = self._fold_numbers(expr.left), self._fold_numbers(expr.right)
            if expr.op == "/" and right == 0.0 and left is None:
                self.report(f"`{_excerpt(pretty_expr(expr))}` divides by zero", expr.span)
                return None
            if expr.op == "**" and left is None and right is not None and abs(right) > MAX_EXPONENT:
                self.report(f"the exponent of `{_excerpt(pretty_expr(expr))}` is {right:.6g}; at most "
                            f"2 ** 24 = {MAX_EXPONENT} in magnitude (fp32 kernels hold no larger integer exactly)",
                            expr.right.span)
                return None
            if left is None or right is None or expr.op == "@":
                return None
        elif isinstance(expr, ir.Call):
            values = [self._fold_numbers(argument) for argument in expr.args]
            if expr.func not in SCALAR_FUNCTIONS or len(values) != 1 or values[0] is None:
                return None
        else:
            return None
        try:
            value = evaluate_scalar(expr, {})
        except ZeroDivisionError:
            problem = "divides by zero"
        except OverflowError:
            problem = "overflows a 64-bit float"
        except ValueError:
            problem = "has no finite real value"
        else:
            if math.isfinite(value):
                return value
            problem = "has no finite value" if math.isnan(value) else "overflows a 64-bit float"
        self.report(f"`{_excerpt(pretty_expr(expr))}` {problem}", expr.span)
        return None

    # ------------------------------------------------------------ statements
    def _check_statements(self) -> None:
        rewritten_states: set[str] = set()
        for position, statement in enumerate(self.spec.statements):
            shape = None
            if self._expression_is_sound(statement.expr):
                resolve = functools.partial(self._resolve, statement=statement, position=position)
                shape = _ShapeRules(resolve, self.report).shape(statement.expr)
            if statement.kind in ("feature", "gate"):
                self._bind_value(statement, shape)
            elif statement.kind in ("decay", "update"):
                if self._check_state_rewrite(statement, shape):
                    rewritten_states.add(statement.target)
            elif statement.kind == "readout":
                self._bind_output(statement, shape)
                if shape is not None:
                    self._check_output_varies(statement)
            else:
                self.report(f"unknown statement kind `{statement.kind}`; expected one of "
                            f"{', '.join(ir.STATEMENT_KINDS)}", statement.span)
        if not any(statement.kind == "readout" for statement in self.spec.statements):
            self.report(f"spec `{self.spec.name}` has no readout; add a line such as "
                        "`readout o = q @ S` to define an output", self.spec.span)
        for state in self.spec.states:
            binding = self.names.get(state.name)
            if binding and binding.declaration is state and state.name not in rewritten_states:
                self.report(f"state `{state.name}` is never rewritten; add `update {state.name} = ...` "
                            "or `decay` for it", state.span)

    def _resolve(self, name: ir.Name, statement: ir.Statement, position: int) -> Shape | None:
        binding = self.names.get(name.id)
        user = f"{statement.kind} `{statement.target}`"
        if name.id in self.duplicated:
            return None
        if binding is None:
            self.report(self._undeclared_message(name.id, position), name.span)
            return None
        if binding.kind == "dim":
            self.report(f"`{name.id}` is a dim, usable only inside param defaults; declare a param "
                        f"such as `param {name.id.lower()}_size = {name.id}` to use its value", name.span)
            return None
        if binding.kind == "output":
            self.report(f"{user} reads output `{name.id}`; statements may not read outputs, so repeat "
                        "the readout's expression instead", name.span)
            return None
        if binding.kind == "state":
            if statement.kind in ("feature", "gate"):
                self.report(f"{user} reads state `{name.id}`; features and gates are per-token values "
                            "and may not read states (use a readout)", name.span)
                return None
            if not self._state_declared_before(binding, statement, name.span, user):
                return None
        return binding.shape

    def _undeclared_message(self, name: str, position: int) -> str:
        later = next((s for s in self.spec.statements[position + 1:]
                      if s.target == name and s.kind in ("feature", "gate")), None)
        if later is not None:
            return (f"`{name}` is used before the {later.kind} that defines it (at {_at(later.span)}); "
                    f"move that {later.kind} above this line")
        message = f"name `{name}` is not declared; declare it in `inputs` or define it with `feature`"
        known = [known_name for known_name, binding in self.names.items() if binding.kind != "output"]
        guess = difflib.get_close_matches(name, known, n=1)
        return message + (f" (did you mean `{guess[0]}`?)" if guess else "")

    def _state_declared_before(self, binding: _Binding, statement: ir.Statement,
                               use_span: ir.Span | None, user: str) -> bool:
        state_span, statement_span = binding.span, statement.span
        if state_span is None or statement_span is None or state_span.line < statement_span.line:
            return True
        state = binding.declaration.name
        if state in self.states_used_too_early:
            return False
        self.states_used_too_early.add(state)
        declaration = _shape_text(state, binding.declaration.shape)
        self.report(f"{user} uses state `{binding.declaration.name}` before it is declared "
                    f"(at {_at(state_span)}); move `state {declaration}` above it", use_span)
        return False

    def _bind_value(self, statement: ir.Statement, shape: Shape | None) -> None:
        target_span = self._target_span(statement)
        if not self._name_is_usable(statement.target, statement.kind, target_span):
            return
        existing = self.names.get(statement.target)
        if existing is not None and existing.kind not in _VALUE_KINDS_A_FEATURE_MAY_REBIND:
            self.report(f"{statement.kind} `{statement.target}` would rebind {existing.kind} "
                        f"`{statement.target}` (declared at {_at(existing.span)}); a feature or gate may "
                        "rebind only an input or an earlier feature or gate, so pick a new name",
                        target_span)
            return
        self.names[statement.target] = _Binding(statement.kind, shape, statement.span, statement)

    def _check_state_rewrite(self, statement: ir.Statement, shape: Shape | None) -> bool:
        target_span = self._target_span(statement)
        binding = self.names.get(statement.target)
        if statement.target in self.duplicated:
            return True
        if binding is None or binding.kind != "state":
            what = "is not declared" if binding is None else f"is {_article(binding.kind)}"
            self.report(f"{statement.kind} target `{statement.target}` {what}; `{statement.kind}` "
                        f"rewrites a state, declared like `state {statement.target}[K, V]`", target_span)
            return False
        user = f"{statement.kind} of `{statement.target}`"
        if not self._state_declared_before(binding, statement, target_span, user):
            return True  # reported; the state does get rewritten
        state_shape = binding.shape
        if shape is None or state_shape is None or shape == state_shape:
            return True
        state = _shape_text(statement.target, state_shape)
        hint = _transpose_hint(statement.expr) if shape == state_shape[::-1] else ""
        self.report(f"{statement.kind} of `{state}` has {_shape_words(shape)}, but the state has "
                    f"{_shape_words(state_shape)}{hint}", statement.span)
        return True

    def _bind_output(self, statement: ir.Statement, shape: Shape | None) -> None:
        target_span = self._target_span(statement)
        if not self._name_is_usable(statement.target, "output", target_span):
            return
        existing = self.names.get(statement.target)
        if existing is not None:
            if existing.kind == "output":
                message = (f"output `{statement.target}` already has a readout at {_at(existing.span)}; "
                           "one readout per output")
            else:
                message = (f"readout target `{statement.target}` is already {_article(existing.kind)} "
                           f"(at {_at(existing.span)}); an output needs a fresh name")
            self.report(message, target_span)
            return
        self.names[statement.target] = _Binding("output", shape, statement.span, statement)

    def _check_output_varies(self, statement: ir.Statement) -> None:
        """An output made of numbers, params and weights only is the same at every token."""
        kinds = [self.names[node.id].kind if node.id in self.names else None
                 for node in _walk(statement.expr) if isinstance(node, ir.Name)]
        if all(kind in ("param", "weight") for kind in kinds):
            self.report(f"readout `{statement.target}` reads no input, feature, gate or state, so it is "
                        "the same at every token; an output must depend on the inputs or a state",
                        statement.span)

    def _target_span(self, statement: ir.Statement) -> ir.Span | None:
        """The span of the target name in `kind target = expr`, found in the source."""
        span = statement.span
        lines = self.spec.source.split("\n")  # lines as the parser counts them
        if span is None or not 1 <= span.line <= len(lines):
            return span
        line = lines[span.line - 1]
        match = re.compile(r"\w+\s+(\w+)").match(line, span.col - 1)
        if match is None or match.group(1) != statement.target:
            return span
        return ir.Span(span.file, span.line, match.start(1) + 1, span.line, match.end(1) + 1)


def _article(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def _shape_words(shape: Shape) -> str:
    return f"shape [{', '.join(shape)}]" if shape else "a scalar shape"
