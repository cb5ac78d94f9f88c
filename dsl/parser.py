"""Text to IR: parse a `.attn` spec, build the frozen IR with spans, then check it.

This module owns syntax only. The grammar lives beside it in `grammar.lark`; every
lark error is re-raised as a located `SpecError` in the words of the language, so no
parser internals (terminal names, frames) ever reach a user. Meaning (names, shapes,
statement rules) is `check.py`'s job.
"""
from __future__ import annotations

import difflib
import functools
import re
import unicodedata
from pathlib import Path

from lark import Lark, Token, Transformer_NonRecursive, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from . import ir
from .check import check
from .errors import SpecError, diagnostic

_LINE_BREAK = "_NL"
_END_OF_INPUT = "$END"
_CLOSE_PAREN = "RPAR"  # lark's name for the `)` terminal
_WORDS_FOR_PATTERN_TERMINALS = {"NAME": "a name", "NUMBER": "a number", _LINE_BREAK: "end of line"}
_EXPRESSION_STARTS = frozenset({"a name", "a number", "`(`", "`-`", "`+`"})
_BINARY_OPERATORS = frozenset(f"`{op}`" for op in ir.BINARY_OPS)
_LINE_KEYWORDS = ("dims", "inputs", "param", "weight", "state", *ir.STATEMENT_KINDS)


def parse(text: str, filename: str = "<spec>") -> ir.Spec:
    """Parse spec source into a checked `Spec`; raise `SpecError` if it is malformed."""
    try:
        tree = _spec_parser().parse(text)
    except UnexpectedInput as error:
        raise _syntax_error(error, text, filename) from None
    return check(_IRBuilder(text, filename).transform(tree))


def parse_file(path: str | Path) -> ir.Spec:
    """Parse the spec in the file at `path`; diagnostics name the path as given."""
    return parse(Path(path).read_text(encoding="utf-8"), filename=str(path))


@functools.cache
def _spec_parser() -> Lark:
    # Built once and never mutated: every parse passes its own file name to a fresh builder.
    return Lark.open(
        "grammar.lark", rel_to=__file__, parser="lalr",
        propagate_positions=True, maybe_placeholders=False,
    )


def _doc_comment(text: str) -> str:
    """The comment lines before `attention`, without their `# ` markers."""
    doc_lines: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if not stripped.startswith("#"):
            break
        body = stripped[1:]
        doc_lines.append((body[1:] if body.startswith(" ") else body).rstrip())
    return "\n".join(doc_lines)


# ---------------------------------------------------------------- tree -> IR
def _span_of_token(token: Token, filename: str) -> ir.Span:
    return ir.Span(filename, token.line, token.column, token.end_line, token.end_column)


def _binary_builder(op: str):
    """A tree-builder method for the grammar rule of binary operator `op`."""
    @v_args(meta=True)
    def build(builder: "_IRBuilder", meta, children) -> ir.Binary:
        left, right = children
        return ir.Binary(op, left, right, builder._span(meta))
    return build


class _IRBuilder(Transformer_NonRecursive):
    """Turns the lark tree of one file into IR nodes, each with its source span.

    Non-recursive, so an expression nested too deeply reaches `check`, which says so at its
    line, rather than overflowing Python's stack here."""

    def __init__(self, text: str, filename: str):
        super().__init__()
        self.text = text
        self.filename = filename

    def _span(self, meta) -> ir.Span:
        return ir.Span(self.filename, meta.line, meta.column, meta.end_line, meta.end_column)

    def start(self, children):
        return children[0]

    @v_args(meta=True)
    def spec(self, meta, children):
        name_token, *lines = children
        declaration_kinds = (ir.Dim, ir.Input, ir.Param, ir.Weight, ir.State)
        declarations: dict[type, list] = {kind: [] for kind in declaration_kinds}
        statements: list[ir.Statement] = []
        for line in lines:
            for node in line if isinstance(line, list) else [line]:
                if isinstance(node, ir.Statement):
                    statements.append(node)
                else:
                    declarations[type(node)].append(node)
        header = ir.Span(self.filename, meta.line, meta.column,
                         name_token.end_line, name_token.end_column)  # `attention NAME`
        return ir.Spec(
            name=str(name_token),
            dims=tuple(declarations[ir.Dim]),
            inputs=tuple(declarations[ir.Input]),
            params=tuple(declarations[ir.Param]),
            weights=tuple(declarations[ir.Weight]),
            states=tuple(declarations[ir.State]),
            statements=tuple(statements),
            doc=_doc_comment(self.text),
            source=self.text,
            filename=self.filename,
            span=header,
        )

    # ------------------------------------------------------------ declarations
    def dims(self, names):
        return [ir.Dim(str(name), _span_of_token(name, self.filename)) for name in names]

    def inputs(self, declared):
        return [ir.Input(name, shape, span) for name, shape, span in declared]

    def weights(self, declared):
        return [ir.Weight(name, shape, span) for name, shape, span in declared]

    def states(self, declared):
        return [ir.State(name, shape, span) for name, shape, span in declared]

    @v_args(meta=True)
    def declared(self, meta, children):
        name, *shape = children
        return str(name), (shape[0] if shape else ()), self._span(meta)

    def shape(self, dims):
        return tuple(str(dim) for dim in dims)

    @v_args(meta=True)
    def param(self, meta, children):
        name, default = children
        span = ir.Span(self.filename, name.line, name.column, meta.end_line, meta.end_column)
        return ir.Param(str(name), default, span)

    @v_args(meta=True)
    def statement(self, meta, children):
        kind, target, expr = children
        return ir.Statement(str(kind), str(target), expr, self._span(meta))

    # ------------------------------------------------------------ expressions
    @v_args(meta=True)
    def number(self, meta, children):
        text = str(children[0])
        is_integer = text.isdigit()
        return ir.Num(int(text) if is_integer else float(text), self._span(meta))

    @v_args(meta=True)
    def name(self, meta, children):
        return ir.Name(str(children[0]), self._span(meta))

    @v_args(meta=True)
    def call(self, meta, children):
        func, *args = children
        return ir.Call(str(func), tuple(args), self._span(meta))

    @v_args(meta=True)
    def negate(self, meta, children):
        return ir.Unary("-", children[0], self._span(meta))

    def unary_plus(self, children):
        return children[0]

    add = _binary_builder("+")
    subtract = _binary_builder("-")
    multiply = _binary_builder("*")
    divide = _binary_builder("/")
    matmul = _binary_builder("@")
    power = _binary_builder("**")


# ---------------------------------------------------------------- syntax errors
def _syntax_error(error: UnexpectedInput, text: str, filename: str) -> SpecError:
    if isinstance(error, UnexpectedCharacters):
        message, span = _unexpected_character(error, text, filename)
    elif isinstance(error, UnexpectedToken):
        message, span = _unexpected_token(error, text, filename)
    elif isinstance(error, UnexpectedEOF):
        token = Token(_END_OF_INPUT, "")
        message, span = _unexpected_token_message(token, set(error.expected), text, filename)
    else:  # pragma: no cover -- lark raises only the three kinds above
        message, span = "malformed spec", ir.Span(filename, 1, 1, 1, 2)
    return SpecError(diagnostic(message, span, text))


def _unexpected_character(error: UnexpectedCharacters, text: str, filename: str):
    span = ir.Span(filename, error.line, error.column, error.line, error.column + 1)
    expected = _readable_expected(_acceptable_terminals(error, error.allowed))
    return f"unexpected character {_describe_character(error.char)}; expected {expected}", span


def _describe_character(char: str) -> str:
    """`$`; or, for a character that does not show as itself (a control character, a
    no-break space, a byte-order mark, a combining accent), its code point and name."""
    if char.isprintable() and not char.isspace() and not unicodedata.category(char).startswith("M"):
        return f"`{char}`"
    name = unicodedata.name(char, "").lower() or _CONTROL_CHARACTERS.get(char, "a control character")
    return f"U+{ord(char):04X} ({name})"


_CONTROL_CHARACTERS = {"\t": "tab", "\r": "carriage return", "\v": "vertical tab", "\x00": "a NUL byte"}


def _unexpected_token(error: UnexpectedToken, text: str, filename: str):
    expected = _acceptable_terminals(error, error.expected)
    return _unexpected_token_message(error.token, expected, text, filename)


def _acceptable_terminals(error: UnexpectedInput, fallback: set[str] | None) -> set[str]:
    """The terminals the parser could take where it stopped.

    Asking the parser itself beats the error's own set, which for the contextual lexer
    lists what that lexer state knows, including terminals the parser would reject.
    """
    parser = getattr(error, "interactive_parser", None)
    expected = set(parser.accepts()) if parser is not None else set(fallback or ())
    return expected - set(_spec_parser().ignore_tokens)


def _unexpected_token_message(token: Token, expected: set[str], text: str, filename: str):
    span = _token_span(token, text, filename)
    found = _describe_token(token)
    keywords = {_terminal_words().get(name, "").strip("`") for name in expected}

    if "attention" in keywords:
        return f"a spec starts with `attention NAME`; found {found}", span
    if "end" in keywords and "feature" in keywords:
        return _line_start_message(token, text), span
    if token.type == _END_OF_INPUT and _LINE_BREAK in expected:
        return _missing_end_message(text), span
    if token.type == _CLOSE_PAREN and _unclosed_paren(text, span.line, span.col) is None:
        return "unmatched `)`: no `(` is open before it on this line", span
    if _CLOSE_PAREN in expected and token.type in (_LINE_BREAK, _END_OF_INPUT):
        opened = _unclosed_paren(text, span.line, span.col)
        where = f" opened at {span.line}:{opened}" if opened else ""
        return f"expected `)` to close `(`{where}, found {found}", span
    if expected == {_END_OF_INPUT}:
        return f"unexpected {found} after `end`; a file holds one spec, closed by `end`", span
    return f"expected {_readable_expected(expected)}, found {found}", span


def _missing_end_message(text: str) -> str:
    opened = re.search(r"^([ \t\f]*)attention[ \t\f]+([A-Za-z_]\w*)", text, re.MULTILINE)
    if opened is None:
        return "expected `end` to close the spec"
    line = text.count("\n", 0, opened.start()) + 1
    column = len(opened.group(1)) + 1
    return f"expected `end` to close `attention {opened.group(2)}` (opened at {line}:{column})"


def _line_start_message(token: Token, text: str) -> str:
    if token.type == _END_OF_INPUT:
        return _missing_end_message(text)
    keyword_list = ", ".join(_LINE_KEYWORDS)
    if token.type == "NAME":
        guess = difflib.get_close_matches(str(token), (*_LINE_KEYWORDS, "end"), n=1)
        hint = f" (did you mean `{guess[0]}`?)" if guess else ""
        return (f"`{token}` is not a statement keyword{hint}; "
                f"a line starts with one of {keyword_list}, or `end`")
    return (f"expected a declaration, a statement or `end`, found {_describe_token(token)}; "
            f"a line starts with one of {keyword_list}")


def _token_span(token: Token, text: str, filename: str) -> ir.Span:
    if token.type == _END_OF_INPUT:
        line, column = _end_of_text(text)
    else:
        line, column = token.line, token.column
    if token.type in (_LINE_BREAK, _END_OF_INPUT) or token.end_line != line:
        return ir.Span(filename, line, column, line, column + 1)
    return ir.Span(filename, line, column, line, token.end_column)


def _end_of_text(text: str) -> tuple[int, int]:
    """Just past the last non-blank character: where a missing `end` belongs."""
    lines = text.split("\n")
    for number in range(len(lines), 0, -1):
        content = lines[number - 1].rstrip()
        if content:
            return number, len(content) + 1
    return 1, 1


def _unclosed_paren(text: str, line: int, column: int) -> int | None:
    """Column of the last `(` left open on `line` before `column`, if any."""
    source_line = text.split("\n")[line - 1][: column - 1]
    open_columns: list[int] = []
    for index, char in enumerate(source_line.split("#")[0]):
        if char == "(":
            open_columns.append(index + 1)
        elif char == ")" and open_columns:
            open_columns.pop()
    return open_columns[-1] if open_columns else None


def _describe_token(token: Token) -> str:
    if token.type == _LINE_BREAK:
        return "end of line"
    if token.type == _END_OF_INPUT:
        return "end of file"
    return f"`{token}`"


@functools.cache
def _terminal_words() -> dict[str, str]:
    """Terminal name -> how a user would say it: `=`, `end`, a name, end of line."""
    words = {_END_OF_INPUT: "end of file"}
    for terminal in _spec_parser().terminals:
        pattern = terminal.pattern.value
        keyword = re.fullmatch(r"([a-z]+)\\b", pattern)  # grammar keywords are /word\b/
        if terminal.pattern.type == "str":
            words[terminal.name] = f"`{pattern}`"
        elif keyword:
            words[terminal.name] = f"`{keyword.group(1)}`"
        elif terminal.name in _WORDS_FOR_PATTERN_TERMINALS:
            words[terminal.name] = _WORDS_FOR_PATTERN_TERMINALS[terminal.name]
    return words


def _readable_expected(terminal_names: set[str]) -> str:
    words = {_terminal_words()[name] for name in terminal_names if name in _terminal_words()}
    phrases: list[str] = []
    line_starts = {f"`{keyword}`" for keyword in (*_LINE_KEYWORDS, "end")}
    if words >= line_starts:
        phrases.append("a declaration, a statement or `end`")
        words -= line_starts
    if words >= {"a name", "a number", "`(`"}:
        phrases.append("an expression")
        words -= _EXPRESSION_STARTS
    if words >= _BINARY_OPERATORS:
        phrases.append("an operator")
        words -= _BINARY_OPERATORS | {"`(`"}  # `(` after a name would start a call
    phrases += sorted(words, key=_word_order)
    if not phrases:
        return "something else"
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " or " + phrases[-1]


def _word_order(word: str) -> tuple[int, str]:
    # Punctuation first, then names, then the line and file ends.
    rank = 2 if word in ("end of line", "end of file") else 1 if word.startswith("a ") else 0
    return rank, word
