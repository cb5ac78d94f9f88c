"""IR to canonical text: the one pretty-printer, used by errors, cache keys and `attnc show`.

`parse(pretty(spec)) == spec` for every valid spec: expressions get exactly the
parentheses the grammar needs to rebuild the same tree, and floats print with `repr`
so they read back bit for bit.
"""
from __future__ import annotations

from . import ir

# Binding strength, low to high, as in grammar.lark.
_SUM, _PRODUCT, _UNARY, _POWER, _ATOM = range(5)
_BINARY_PRECEDENCE = {"+": _SUM, "-": _SUM, "*": _PRODUCT, "/": _PRODUCT, "@": _PRODUCT, "**": _POWER}
_KEYWORD_WIDTH = len("readout")


def pretty(spec: ir.Spec) -> str:
    """Canonical source for `spec`: doc comment, header, declarations, statements, `end`.

    All declarations come before the statements, so every state is declared before
    the first statement that uses it.
    """
    lines = [f"# {line}" if line else "#" for line in spec.doc.split("\n")] if spec.doc else []
    lines.append(f"attention {spec.name}")
    declaration_lines = [
        ("dims", [dim.name for dim in spec.dims]),
        ("inputs", [_declared(node.name, node.shape) for node in spec.inputs]),
        ("weight", [_declared(node.name, node.shape) for node in spec.weights]),
        ("state", [_declared(node.name, node.shape) for node in spec.states]),
    ]
    for keyword, items in declaration_lines[:2]:
        if items:
            lines.append(_line(keyword, ", ".join(items)))
    lines += [_line("param", f"{param.name} = {pretty_expr(param.default)}") for param in spec.params]
    for keyword, items in declaration_lines[2:]:
        if items:
            lines.append(_line(keyword, ", ".join(items)))
    if spec.statements:
        lines.append("")
    lines += [_line(st.kind, f"{st.target} = {pretty_expr(st.expr)}") for st in spec.statements]
    lines.append("end")
    return "\n".join(lines) + "\n"


def pretty_expr(expr: ir.Expr) -> str:
    """`expr` as source text with the fewest parentheses that keep its tree."""
    return _expr_text(expr)[0]


def _line(keyword: str, rest: str) -> str:
    return f"  {keyword:<{_KEYWORD_WIDTH}} {rest}"


def _declared(name: str, shape: ir.Shape) -> str:
    return f"{name}[{', '.join(shape)}]" if shape else name


def _expr_text(expr: ir.Expr) -> tuple[str, int]:
    """Source text of `expr` and how tightly it binds."""
    if isinstance(expr, ir.Num):
        text = repr(expr.value) if isinstance(expr.value, float) else str(expr.value)
        # A negative literal reads back as unary minus, so it binds like one.
        return text, (_UNARY if text.startswith("-") else _ATOM)
    if isinstance(expr, ir.Name):
        return expr.id, _ATOM
    if isinstance(expr, ir.Call):
        return f"{expr.func}({', '.join(pretty_expr(arg) for arg in expr.args)})", _ATOM
    if isinstance(expr, ir.Unary):
        return f"{expr.op}{_operand(expr.operand, _UNARY)}", _UNARY
    if isinstance(expr, ir.Binary):
        return _binary_text(expr), _BINARY_PRECEDENCE[expr.op]
    raise TypeError(f"not an expression node: {expr!r}")


def _binary_text(expr: ir.Binary) -> str:
    precedence = _BINARY_PRECEDENCE[expr.op]
    if expr.op == "**":
        # grammar: atom "**" unary -- right associative, unary exponent allowed
        left, right = _operand(expr.left, _ATOM), _operand(expr.right, _UNARY)
    else:
        # left associative: a right operand of equal strength needs parentheses
        left, right = _operand(expr.left, precedence), _operand(expr.right, precedence + 1)
    return f"{left} {expr.op} {right}"


def _operand(expr: ir.Expr, weakest_allowed: int) -> str:
    text, precedence = _expr_text(expr)
    return text if precedence >= weakest_allowed else f"({text})"
