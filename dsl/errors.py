"""Located diagnostics. Every user-facing problem with a spec is a SpecError."""
from __future__ import annotations

from dataclasses import dataclass

from .ir import Span


@dataclass(frozen=True)
class Diagnostic:
    message: str          # what is wrong and, where useful, how to fix it
    span: Span | None
    source_line: str = ""  # the offending line of source, for the caret display

    def render(self) -> str:
        if self.span is None:
            return f"error: {self.message}"
        head = f"{self.span}: error: {self.message}"
        if not self.source_line:
            return head
        width = max(1, (self.span.end_col - self.span.col) if self.span.end_line == self.span.line else 1)
        caret = " " * (self.span.col - 1) + "^" * width
        return f"{head}\n    {self.source_line}\n    {caret}"


class SpecError(Exception):
    """A malformed or invalid spec. Carries one or more located diagnostics."""

    def __init__(self, diagnostics: list[Diagnostic] | Diagnostic):
        if isinstance(diagnostics, Diagnostic):
            diagnostics = [diagnostics]
        self.diagnostics = list(diagnostics)
        super().__init__("\n".join(d.render() for d in self.diagnostics))

    @classmethod
    def at(cls, message: str, span: Span | None, source: str = "") -> "SpecError":
        return cls(diagnostic(message, span, source))


def diagnostic(message: str, span: Span | None, source: str = "") -> Diagnostic:
    line = ""
    if span is not None and source:
        lines = source.split("\n")  # as the parser counts lines: not at \r, \f or U+2028
        if 1 <= span.line <= len(lines):
            # control characters would garble a terminal: one visible mark each keeps the caret
            line = "".join(c if c.isprintable() or c == "\t" else "\ufffd"
                           for c in lines[span.line - 1].rstrip("\r"))
    return Diagnostic(message, span, line)
