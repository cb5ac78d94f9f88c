"""The `.attn` parser: every shipped spec parses, and the trees it builds are the right ones."""
from pathlib import Path

import pytest

import attnc.specs
from attnc.dsl import (
    Binary, Call, Input, Name, Num, Span, SpecError, State, Statement, Unary, Weight, infer,
    output_shapes, parse, parse_file, pretty_expr, shape_of,
)
from attnc.dsl.check import RESERVED_WORDS
from attnc.dsl.parser import _spec_parser

SPEC_FILES = sorted(Path(attnc.specs.__file__).parent.glob("*.attn"))


def expr_of(text: str):
    """The IR of one expression, parsed inside a minimal valid spec."""
    spec = parse(f"""attention t
  dims K, V
  inputs a, b, c, d, k[K], v[V]
  feature x = {text}
  state S[K, V]
  update S = S + outer(k, v)
  readout o = k @ S
end
""")
    return spec.statements[0].expr


def test_shipped_specs_exist():
    assert len(SPEC_FILES) >= 10


@pytest.mark.parametrize("path", SPEC_FILES, ids=lambda path: path.stem)
def test_every_shipped_spec_parses(path):
    spec = parse_file(path)
    assert spec.name == path.stem
    assert spec.filename == str(path)
    assert spec.doc, "every shipped spec cites its paper in a doc comment"
    assert spec.outputs
    assert all(statement.span is not None for statement in spec.statements)


def test_gated_deltanet_structure():
    spec = parse_file(Path(attnc.specs.__file__).parent / "gated_deltanet.attn")
    assert [dim.name for dim in spec.dims] == ["K", "V"]
    assert spec.inputs == (Input("q", ("K",)), Input("k", ("K",)), Input("v", ("V",)),
                           Input("alpha", ()), Input("beta", ()))
    assert [param.name for param in spec.params] == ["scale"]
    assert pretty_expr(spec.params[0].default) == "K ** -0.5"
    assert spec.states == (State("S", ("K", "V")),)
    assert [(st.kind, st.target) for st in spec.statements] == [
        ("feature", "q"), ("feature", "k"), ("gate", "a"), ("decay", "S"), ("update", "S"),
        ("readout", "o"),
    ]
    assert spec.statements[2].expr == Call("exp", (Name("alpha"),))
    assert spec.doc.startswith("Gated DeltaNet: Yang, Kautz, Hatamizadeh 2024")


def test_weights_and_interleaved_declarations():
    spec = parse_file(Path(attnc.specs.__file__).parent / "mamba1.attn")
    assert spec.weights == (Weight("A_log", ("K", "V")), Weight("dt_bias", ("V",)), Weight("D", ("V",)))
    # rwkv6 declares its state between statements and reads it before the update
    rwkv6 = parse_file(Path(attnc.specs.__file__).parent / "rwkv6.attn")
    assert [st.kind for st in rwkv6.statements] == ["gate", "readout", "decay", "update"]


def test_spans_are_one_based_and_cover_the_node():
    text = "attention t\n  dims K, V\n  inputs k[K], v[V]\n  state S[K, V]\n" \
           "  update S = S + outer(k, v)\n  readout o = k @ S\nend\n"
    spec = parse(text, "t.attn")
    update = spec.statements[0]
    assert update.span == Span("t.attn", 5, 3, 5, 29)
    assert update.expr.span == Span("t.attn", 5, 14, 5, 29)
    assert update.expr.right.args[1].span == Span("t.attn", 5, 27, 5, 28)
    assert spec.inputs[1].span == Span("t.attn", 3, 16, 3, 20)
    assert spec.dims[1].span == Span("t.attn", 2, 11, 2, 12)
    assert spec.span.line == 1 and spec.span.col == 1
    assert spec.source == text


@pytest.mark.parametrize("text, tree", [
    ("a + b * c", Binary("+", Name("a"), Binary("*", Name("b"), Name("c")))),
    ("a - b - c", Binary("-", Binary("-", Name("a"), Name("b")), Name("c"))),
    ("a / b * c", Binary("*", Binary("/", Name("a"), Name("b")), Name("c"))),
    ("a ** b ** c", Binary("**", Name("a"), Binary("**", Name("b"), Name("c")))),
    ("-a ** 2", Unary("-", Binary("**", Name("a"), Num(2)))),
    ("a ** -0.5", Binary("**", Name("a"), Unary("-", Num(0.5)))),
    ("-a * b", Binary("*", Unary("-", Name("a")), Name("b"))),
    ("+a - -b", Binary("-", Name("a"), Unary("-", Name("b")))),
    ("(a + b) * c", Binary("*", Binary("+", Name("a"), Name("b")), Name("c"))),
    ("a * (b + c)", Binary("*", Name("a"), Binary("+", Name("b"), Name("c")))),
    ("(-a) ** 2", Binary("**", Unary("-", Name("a")), Num(2))),
    ("a * k @ diag(k) * b",
     Binary("*", Binary("@", Binary("*", Name("a"), Name("k")), Call("diag", (Name("k"),))), Name("b"))),
    ("exp(-a) + 1", Binary("+", Call("exp", (Unary("-", Name("a")),)), Num(1))),
])
def test_precedence_and_associativity(text, tree):
    assert expr_of(text) == tree


@pytest.mark.parametrize("text, value", [
    ("1", 1), ("0.5", 0.5), ("1e-6", 1e-6), (".5", 0.5), ("2.", 2.0), ("3E+2", 300.0),
])
def test_number_literals(text, value):
    number = expr_of(text)
    assert number == Num(value) and type(number.value) is type(value)


def test_doc_comment_and_comments_anywhere():
    text = """# First line of the doc.
#Second line, no space.

# Third, after a blank line.
attention t   # trailing comment on the header
  # a comment inside
  dims K, V

  inputs k[K], v[V]    # trailing
  state S[K, V]
  update S = S + outer(k, v)  # comment after an expression
  readout o = k @ S
end
# trailing comment after end
"""
    spec = parse(text)
    assert spec.doc == "First line of the doc.\nSecond line, no space.\nThird, after a blank line."
    assert spec.name == "t"


def test_keywords_are_names_elsewhere():
    spec = parse("attention t\n  dims K, V\n  inputs features[K], k[K], v[V]\n  state S[K, V]\n"
                 "  update S = S + outer(features, v)\n  readout o = k @ S\nend\n")
    assert spec.inputs[0].name == "features"


def test_windows_line_endings():
    text = "attention t\r\n  dims K, V\r\n  inputs k[K], v[V]\r\n  state S[K, V]\r\n" \
           "  update S = S + outer(k, v)\r\n  readout o = k @ S\r\nend\r\n"
    assert parse(text).name == "t"


def test_reserved_words_match_the_grammar_keywords():
    keywords = {terminal.pattern.value.removesuffix("\\b") for terminal in _spec_parser().terminals
                if terminal.pattern.value.endswith("\\b")}
    assert keywords == set(RESERVED_WORDS)


def test_infer_gives_shapes_per_statement():
    spec = parse_file(Path(attnc.specs.__file__).parent / "mamba1.attn")
    environments = infer(spec)
    assert "delta" not in environments[0]
    assert environments[1]["delta"] == ("V",)
    assert environments[1]["A_log"] == ("K", "V")
    assert shape_of(spec.statements[1].expr, environments[1]) == ("K", "V")
    assert output_shapes(spec) == {"y": ("V",)}


def test_shape_of_rejects_an_ill_shaped_expression():
    with pytest.raises(SpecError, match=r"combines a vector \[K\] with a vector \[V\]"):
        shape_of(Binary("+", Name("k"), Name("v")), {"k": ("K",), "v": ("V",)})
    with pytest.raises(SpecError, match="`x` has no shape"):
        shape_of(Name("x"), {})


def test_infer_follows_rebinding():
    spec = parse("attention t\n  dims K, V\n  inputs x, k[K], v[V]\n  feature x = k * x\n"
                 "  state S[K, V]\n  update S = S + outer(x, v)\n  readout o = k @ S\nend\n")
    assert infer(spec)[0]["x"] == ()
    assert infer(spec)[1]["x"] == ("K",)


def test_statement_is_frozen_ir():
    spec = parse_file(Path(attnc.specs.__file__).parent / "gla.attn")
    assert isinstance(spec.statements[0], Statement)
    with pytest.raises(AttributeError):
        spec.statements[0].kind = "gate"
