"""Diagnostics for bad specs: each names file:line:col, shows the line with a caret,
says what was expected, and never leaks parser or Python internals."""
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import attnc.specs
from attnc.dsl import SpecError, parse

VALID = """attention gla
  dims K, V
  inputs q[K], k[K], v[V], g[K]
  param scale = K ** -0.5
  feature q = q * scale
  gate a = exp(g)
  state S[K, V]
  decay S = diag(a) @ S
  update S = S + outer(k, v)
  readout o = q @ S
end
"""
INTERNALS = ("lark", "Traceback", "__ANON", "Token(", "site-packages", '.py"', "RPAR", "_NL", "$END")


def error_of(text: str) -> SpecError:
    with pytest.raises(SpecError) as caught:
        parse(text, "bad.attn")
    error = caught.value
    assert error.__suppress_context__ or error.__context__ is None
    message = str(error)
    for internal in INTERNALS:
        assert internal not in message, f"{internal!r} leaked into:\n{message}"
    return error


def variant(old: str, new: str) -> str:
    assert old in VALID
    return VALID.replace(old, new, 1)


def assert_reports(error: SpecError, line: int, col: int, phrase: str, width: int | None = None):
    """One of `error`'s diagnostics is at line:col, shows its source line with a caret
    under that column, and contains `phrase`."""
    rendered = [diagnostic.render() for diagnostic in error.diagnostics]
    matching = [text for text in rendered if text.startswith(f"bad.attn:{line}:{col}: error: ")]
    assert matching, f"nothing reported at {line}:{col}; got:\n" + "\n".join(rendered)
    text = matching[0]
    assert phrase in text, text
    head, source_line, caret = text.split("\n")
    assert source_line.strip(), "the offending line is shown"
    assert caret.index("^") == len("    ") + col - 1, text
    if width is not None:
        assert caret.count("^") == width, text


def test_the_base_spec_is_valid():
    assert parse(VALID).name == "gla"


# ---------------------------------------------------------------- syntax errors
def test_missing_end():
    error = error_of(VALID.replace("end\n", ""))
    assert_reports(error, 10, 20, "expected `end` to close `attention gla` (opened at 1:1)")


def test_missing_end_without_final_newline():
    error = error_of(VALID.replace("end\n", "").rstrip())
    assert_reports(error, 10, 20, "expected `end` to close `attention gla` (opened at 1:1)")


def test_stray_character():
    error = error_of(variant("q * scale", "q $ scale"))
    assert_reports(error, 5, 17, "unexpected character `$`; expected an operator or end of line", 1)


def test_unterminated_paren():
    error = error_of(variant("exp(g)", "exp((g + 1)"))
    assert_reports(error, 6, 23, "expected `)` to close `(` opened at 6:15, found end of line")


def test_unmatched_close_paren():
    error = error_of(variant("q * scale", "q * scale)"))
    assert_reports(error, 5, 24, "unmatched `)`")


def test_statement_keyword_typo():
    error = error_of(variant("update S", "updaet S"))
    assert_reports(error, 9, 3, "`updaet` is not a statement keyword (did you mean `update`?)", 6)
    assert "feature, gate, decay, update, readout" in str(error)


def test_keyword_prefix_is_not_a_keyword():
    error = error_of(variant("feature q", "features q"))
    assert_reports(error, 5, 3, "`features` is not a statement keyword (did you mean `feature`?)")


def test_missing_equals():
    error = error_of(variant("feature q = q", "feature q q"))
    assert_reports(error, 5, 13, "expected `=`, found `q`")


def test_missing_expression():
    error = error_of(variant("q * scale", ""))
    assert_reports(error, 5, 15, "expected an expression, found end of line")


def test_dangling_operator():
    error = error_of(variant("q * scale", "q *"))
    assert_reports(error, 5, 18, "expected an expression, found end of line")


def test_two_operands_without_operator():
    error = error_of(variant("q * scale", "q scale"))
    assert_reports(error, 5, 17, "expected an operator or end of line, found `scale`", 5)


def test_unclosed_shape():
    error = error_of(variant("q[K]", "q[K"))
    assert_reports(error, 3, 16, "expected `,` or `]`, found `[`")


def test_missing_attention_header():
    error = error_of("  dims K\n" + VALID)
    assert_reports(error, 1, 3, "a spec starts with `attention NAME`; found `dims`")


def test_missing_spec_name():
    error = error_of(variant("attention gla", "attention"))
    assert_reports(error, 1, 10, "expected a name, found end of line")


def test_text_after_end():
    error = error_of(VALID + "readout p = q @ S\n")
    assert_reports(error, 12, 1, "unexpected `readout` after `end`")


def test_stray_character_at_line_start():
    error = error_of(variant("  update S", "  .update S"))
    assert_reports(error, 9, 3, "unexpected character `.`; expected a declaration, a statement or `end`")


def test_empty_file():
    error = error_of("")
    assert str(error).startswith("bad.attn:1:1: error: a spec starts with `attention NAME`")


# ---------------------------------------------------------------- declaration errors
def test_duplicate_name_across_declarations():
    error = error_of(variant("state S[K, V]", "state S[K, V], q[K]"))
    assert_reports(error, 7, 18, "`q` is already declared as an input at 3:10")
    assert len(error.diagnostics) == 1  # no echoes at the uses of `q`


def test_duplicate_dim():
    error = error_of(variant("dims K, V", "dims K, V, K"))
    assert_reports(error, 2, 14, "`K` is already declared as a dim at 2:8")


def test_undeclared_dim_in_shape():
    error = error_of(variant("g[K]", "g[N]"))
    assert_reports(error, 3, 28, "dim `N` in input `g[N]` is not declared; add it to `dims`")


def test_dim_never_bound_by_an_input():
    error = error_of(variant("dims K, V", "dims K, V, N"))
    assert_reports(error, 2, 14, "dim `N` is never bound: no input has shape [..N..]")


def test_reserved_word_as_name():
    error = error_of(variant("inputs q[K]", "inputs q[K], state"))
    assert_reports(error, 3, 16, "`state` is a reserved word and cannot name an input")


def test_function_name_as_name():
    error = error_of(variant("feature q = q * scale", "feature exp = q * scale"))
    assert_reports(error, 5, 11, "`exp` is a function name and cannot name a feature")


def test_param_default_uses_an_input():
    error = error_of(variant("K ** -0.5", "1 / q"))
    assert_reports(error, 4, 21, "param `scale` uses input `q`; a param default may use only dims")


def test_param_default_uses_a_later_param():
    error = error_of(variant("param scale = K ** -0.5", "param scale = K ** power\n  param power = -0.5"))
    assert_reports(error, 4, 22, "param `scale` uses param `power`, which is declared after it (at 5:9)")


# ---------------------------------------------------------------- statement errors
def test_undeclared_name():
    error = error_of(variant("q * scale", "qq * scale"))
    assert_reports(error, 5, 15, "name `qq` is not declared; declare it in `inputs` or define it with "
                                 "`feature` (did you mean `q`?)", 2)


def test_name_used_before_its_feature():
    error = error_of(variant("exp(g)", "exp(h)").replace("  state S", "  feature h = g\n  state S"))
    assert_reports(error, 6, 16, "`h` is used before the feature that defines it (at 7:3)")


def test_dim_used_in_a_statement():
    error = error_of(variant("q * scale", "q * K"))
    assert_reports(error, 5, 19, "`K` is a dim, usable only inside param defaults")


def test_decay_target_is_not_a_state():
    error = error_of(variant("decay S = diag(a) @ S", "decay T = diag(a) @ S"))
    assert_reports(error, 8, 9, "decay target `T` is not declared; `decay` rewrites a state", 1)


def test_update_shape_differs_from_state():
    error = error_of(variant("S + outer(k, v)", "outer(v, k)"))
    assert_reports(error, 9, 3, "update of `S[K, V]` has shape [V, K], but the state has shape [K, V]")
    assert "did you mean `outer(k, v)`?" in str(error)


def test_transposed_outer_inside_a_sum():
    error = error_of(variant("outer(k, v)", "outer(v, k)"))
    assert_reports(error, 9, 14, "combines a matrix [K, V] with a matrix [V, K]", 15)
    assert "did you mean `outer(k, v)`?" in str(error)


def test_state_used_before_its_declaration():
    text = VALID.replace("  state S[K, V]\n", "").replace("  readout o = q @ S\n", "")
    text = text.replace("  decay S", "  readout o = q @ S\n  decay S").replace("end\n", "  state S[K, V]\nend\n")
    error = error_of(text)
    assert_reports(error, 7, 19, "readout `o` uses state `S` before it is declared (at 10:9); "
                                 "move `state S[K, V]` above it")
    assert len(error.diagnostics) == 1  # one report per state, not one per use


def test_feature_reads_a_state():
    error = error_of(variant("q * scale", "q @ S"))
    assert_reports(error, 5, 19, "feature `q` reads state `S`; features and gates are per-token values")


def test_feature_rebinds_a_param():
    error = error_of(variant("feature q = q * scale", "feature scale = 2 * scale"))
    assert_reports(error, 5, 11, "feature `scale` would rebind param `scale` (declared at 4:9)")


def test_gate_rebinds_a_state():
    error = error_of(variant("gate a = exp(g)", "gate S = exp(g)"))
    assert_reports(error, 6, 8, "gate `S` would rebind state `S`")


def test_readout_reads_an_output():
    error = error_of(variant("readout o = q @ S", "readout o = q @ S\n  readout p = o * 2"))
    assert_reports(error, 11, 15, "readout `p` reads output `o`; statements may not read outputs")


def test_two_readouts_of_one_output():
    error = error_of(variant("readout o = q @ S", "readout o = q @ S\n  readout o = k @ S"))
    assert_reports(error, 11, 11, "output `o` already has a readout at 10:3; one readout per output")


def test_readout_target_must_be_fresh():
    error = error_of(variant("readout o = q @ S", "readout v = q @ S"))
    assert_reports(error, 10, 11, "readout target `v` is already an input (at 3:22)")


def test_spec_without_readout():
    error = error_of(variant("  readout o = q @ S\n", ""))
    assert_reports(error, 1, 1, "spec `gla` has no readout", len("attention gla"))


def test_state_never_rewritten():
    error = error_of(variant("state S[K, V]", "state S[K, V], z[K]"))
    assert_reports(error, 7, 18, "state `z` is never rewritten; add `update z = ...`", 4)


# ---------------------------------------------------------------- shape errors
def test_vector_never_broadcasts_against_a_matrix():
    error = error_of(variant("diag(a) @ S", "a * S"))
    assert_reports(error, 8, 13, "a vector never broadcasts against a matrix: write `diag(a) @ S`", 5)


def test_vectors_of_different_dims():
    error = error_of(variant("q * scale", "q + v"))
    assert_reports(error, 5, 15, "`q + v` combines a vector [K] with a vector [V]")


def test_exponent_must_be_scalar():
    error = error_of(variant("q * scale", "q ** q"))
    assert_reports(error, 5, 15, "the exponent of `**` must be a scalar, but `q` is a vector [K]")


def test_matmul_of_a_scalar():
    error = error_of(variant("q * scale", "scale @ q"))
    assert_reports(error, 5, 15, "`@` contracts vectors and matrices, but `scale` is a scalar")


def test_matmul_dims_differ():
    error = error_of(variant("readout o = q @ S", "readout o = v @ S"))
    assert_reports(error, 10, 15, "`v @ S` contracts a vector [V] with a matrix [K, V]: dims V and K differ")


def test_unknown_function():
    error = error_of(variant("exp(g)", "sofplus(g)"))
    assert_reports(error, 6, 12, "unknown function `sofplus` (did you mean `softplus`?)", len("sofplus(g)"))
    assert "known functions: exp, log" in str(error)


def test_wrong_argument_count():
    error = error_of(variant("outer(k, v)", "outer(k)"))
    assert_reports(error, 9, 18, "`outer` takes 2 arguments, but got 1")


@pytest.mark.parametrize("call, phrase", [
    ("outer(k, scale)", "`outer` takes two vectors, but got a vector [K] and a scalar"),
    ("diag(S)", "`diag` takes a vector, but `S` is a matrix [K, V]"),
    ("l2norm(scale)", "`l2norm` takes a vector, but `scale` is a scalar"),
    ("sum(scale)", "`sum` takes a vector or a matrix, but `scale` is a scalar"),
])
def test_structural_function_argument_shapes(call, phrase):
    error = error_of(variant("readout o = q @ S", f"readout o = q @ S\n  readout p = {call}"))
    assert_reports(error, 11, 15, phrase)


# ---------------------------------------------------------------- numbers and nesting (found by tests/fuzz_specs.py)
def test_number_beyond_a_float():
    # was a sympy TypeError ("invalid input: inf") in the analysis
    error = error_of(variant("q * scale", "q * 1e400"))
    assert_reports(error, 5, 19, "number `1e400` is out of range: a 64-bit float holds finite values", 5)


def test_integer_beyond_64_bits():
    # was an OverflowError ("int too big to convert") from torch at the first call
    error = error_of(variant("q * scale", "q * 99999999999999999999999"))
    assert_reports(error, 5, 19, "integer `99999999999999999999999` does not fit in 64 bits; "
                                 "write it as a float (`1e+23`)", 23)


@pytest.mark.parametrize("constant, phrase", [
    ("(1 / 0)", "`1 / 0` divides by zero"),       # was a ZeroDivisionError rendering the recurrent kernel
    ("exp(1000)", "`exp(1000)` overflows a 64-bit float"),
    ("sqrt(-1)", "`sqrt(-1)` has no finite real value"),
    ("9 ** 9 ** 9", "`9 ** 9 ** 9` overflows a 64-bit float"),
])
def test_constant_without_a_finite_value(constant, phrase):
    error = error_of(variant("q * scale", f"q * {constant}"))
    assert_reports(error, 5, 19 + constant.startswith("("), phrase)


@pytest.mark.parametrize("exponent", ["3 ** 3 ** 3", "1e38", "-(2 ** 25)"])
def test_constant_exponent_beyond_fp32_integers(exponent):
    # `f ** 3 ** 3 ** 3`: the exponent 7625597484987 turned even in fp32, so the kernels took
    # sigmoid(+inf) where the fp64 reference took sigmoid(-inf) (the spec fuzzer, hgrn2: o off 0.82)
    error = error_of(variant("q * scale", f"q * scale ** {exponent}"))
    assert_reports(error, 5, 28, "at most 2 ** 24 = 16777216 in magnitude (fp32 kernels hold no larger integer exactly)",
                   len(exponent))


def test_division_by_a_constant_zero():
    error = error_of(variant("q * scale", "q / (2 - 2)"))
    assert_reports(error, 5, 15, "`q / (2 - 2)` divides by zero")


@pytest.mark.parametrize("nested", ["-" * 3000 + "q", "exp(" * 3000 + "q" + ")" * 3000,
                                    " + ".join(["q"] * 65)])
def test_expression_nested_too_deeply(nested):
    # was a RecursionError in lark's tree transformer, or in sympy during the analysis
    error = error_of(variant("q * scale", nested))
    assert_reports(error, 5, 15, "this expression nests operators and calls")
    assert "at most 64 are supported: split it over several `feature` lines" in str(error)


def test_nesting_up_to_the_limit_is_fine():
    assert parse(variant("q * scale", " + ".join(["q"] * 64)))


def test_readout_that_reads_no_token_value():
    # was an AttributeError ('int' object has no attribute 'squeeze') at the first call
    error = error_of(variant("readout o = q @ S", "readout o = q @ S\n  readout p = 2 * scale"))
    assert_reports(error, 11, 3, "readout `p` reads no input, feature, gate or state, so it is the "
                                 "same at every token")


# ---------------------------------------------------------------- characters and line breaks
def test_line_separators_other_than_newline_keep_the_shown_line():
    # a form feed or U+2028 in a comment is no line break to the parser; the caret display
    # used to count it as one and show the wrong line (or none)
    text = variant("dims K, V", "dims K, V  # a\fb\u2028c").replace("q * scale", "q $ scale")
    error = error_of(text)
    assert_reports(error, 5, 17, "unexpected character `$`")
    assert error.diagnostics[0].source_line == "  feature q = q $ scale"


@pytest.mark.parametrize("character, words", [
    ("\u00a0", "U+00A0 (no-break space)"),
    ("\r", "U+000D (carriage return)"),
    ("\x00", "U+0000 (a NUL byte)"),
    ("\ufeff", "U+FEFF (zero width no-break space)"),
])
def test_invisible_character_is_named(character, words):
    error = error_of(variant("q * scale", f"q *{character}scale"))
    assert_reports(error, 5, 18, f"unexpected character {words}; expected an expression", 1)
    assert character not in str(error), "a control character would garble the terminal"


def test_spec_text_with_carriage_returns_only_is_read_as_a_spec():
    # text without "\n" was taken for a file name: OSError "File name too long"
    import attnc

    with pytest.raises(SpecError) as caught:
        attnc.compile(VALID.replace("\n", "\r"))
    assert str(caught.value).startswith("<spec>:1:14: error: unexpected character U+000D (carriage return)")


# ---------------------------------------------------------------- several at once
def test_all_semantic_errors_are_reported_together():
    text = variant("q * scale", "qq * scale")
    text = text.replace("outer(k, v)", "outer(v, k)").replace("  readout o = q @ S\n", "")
    text = text.replace("dims K, V", "dims K, V, N")
    error = error_of(text)
    assert len(error.diagnostics) == 4
    assert_reports(error, 1, 1, "has no readout")
    assert_reports(error, 2, 14, "dim `N` is never bound")
    assert_reports(error, 5, 15, "name `qq` is not declared")
    assert_reports(error, 9, 14, "did you mean `outer(k, v)`?")
    lines = [diagnostic.span.line for diagnostic in error.diagnostics]
    assert lines == sorted(lines), "diagnostics come in source order"


# ---------------------------------------------------------------- robustness
SHIPPED_TEXTS = [path.read_text() for path in sorted(Path(attnc.specs.__file__).parent.glob("*.attn"))]
DAMAGE = ["(", ")", "[", "]", ",", "=", "*", "**", "-", "@", "$", ".", "\n", "#", "end", "feature",
          "attention", "S", "K", "1e", "exp(", ""]


@settings(max_examples=50, deadline=None)
@given(st.data())
def test_damaged_specs_fail_only_with_located_spec_errors(data):
    text = data.draw(st.sampled_from(SHIPPED_TEXTS))
    start = data.draw(st.integers(0, len(text)))
    cut = data.draw(st.integers(0, 3))
    damaged = text[:start] + data.draw(st.sampled_from(DAMAGE)) + text[start + cut:]
    try:
        parse(damaged, "bad.attn")
    except SpecError as error:
        message = str(error)
        assert not any(internal in message for internal in INTERNALS), message
        assert all(diagnostic.span is not None for diagnostic in error.diagnostics), message
        assert message.startswith("bad.attn:")
