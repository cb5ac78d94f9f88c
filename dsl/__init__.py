"""The attnc front end: `.attn` text <-> the frozen IR, and the checks that guard it."""
from .check import check, infer, output_shapes, shape_of
from .errors import Diagnostic, SpecError
from .ir import (
    BINARY_OPS, ELEMENTWISE, FUNCTIONS, STATEMENT_KINDS, STRUCTURAL,
    Binary, Call, Dim, Expr, Input, Name, Num, Param, Shape, Span, Spec, State, Statement, Unary,
    Weight,
)
from .parser import parse, parse_file
from .printer import pretty, pretty_expr

__all__ = [
    "parse", "parse_file", "check", "pretty", "pretty_expr", "shape_of", "infer", "output_shapes",
    "SpecError", "Diagnostic",
    "Spec", "Dim", "Input", "Param", "Weight", "State", "Statement",
    "Expr", "Num", "Name", "Unary", "Binary", "Call", "Span", "Shape",
    "BINARY_OPS", "ELEMENTWISE", "STRUCTURAL", "FUNCTIONS", "STATEMENT_KINDS",
]
