"""pretty() and parse() are inverses: `parse(pretty(spec)) == spec` for every valid spec."""
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import attnc.specs
from attnc.dsl import (
    ELEMENTWISE, Binary, Call, Dim, Input, Name, Num, Param, Spec, SpecError, State, Statement, Unary,
    Weight, check, parse, parse_file, pretty,
)

SPEC_FILES = sorted(Path(attnc.specs.__file__).parent.glob("*.attn"))
PROPERTY_SETTINGS = settings(max_examples=50, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.parametrize("path", SPEC_FILES, ids=lambda path: path.stem)
def test_shipped_specs_round_trip(path):
    spec = parse_file(path)
    text = pretty(spec)
    again = parse(text)
    assert again == spec
    assert again.doc == spec.doc
    assert pretty(again) == text, "pretty output is canonical"


# ---------------------------------------------------------------- random valid specs
# Protected names keep a vector of every dim available to the expression generator.
VALUE_NAMES = ("a", "b", "c", "g", "h", "r", "w", "x", "y", "z", "kk", "beta", "gamma", "u2")
EXTRA_DIMS = ("M", "N")
numbers = st.one_of(
    st.integers(min_value=0, max_value=10**6),
    st.floats(min_value=0, max_value=1e12, allow_nan=False, allow_infinity=False),
).map(Num)


@st.composite
def expressions(draw, shape, env, depth=3):
    """A well-shaped expression of `shape` over the names in `env` (name -> shape)."""
    names = sorted(name for name, name_shape in env.items() if name_shape == shape)
    leaves = [st.sampled_from(names).map(Name)] if names else []
    if shape == ():
        leaves.append(numbers)
    if leaves and (depth == 0 or draw(st.integers(0, 2)) == 0):
        return draw(st.one_of(leaves))

    def sub(sub_shape):
        return draw(expressions(sub_shape, env, depth - 1 if depth else 0))

    vector_dims = sorted({name_shape[0] for name_shape in env.values() if len(name_shape) == 1})
    kinds = ["unary", "same", "power", "elementwise"]
    kinds += ["dot", "sum"] if shape == () and vector_dims else []
    kinds += ["scaled", "diag", "l2norm"] if shape != () else []
    kind = draw(st.sampled_from(kinds))
    if kind == "unary":
        return Unary("-", sub(shape))
    if kind == "same":
        return Binary(draw(st.sampled_from("+-*/")), sub(shape), sub(shape))
    if kind == "power":
        return Binary("**", sub(shape), sub(()))
    if kind == "elementwise":
        return Call(draw(st.sampled_from(ELEMENTWISE)), (sub(shape),))
    if kind == "dot":
        dim = draw(st.sampled_from(vector_dims))
        return Binary("@", sub((dim,)), sub((dim,)))
    if kind == "sum":
        return Call("sum", (sub((draw(st.sampled_from(vector_dims)),)),))
    if kind == "scaled":
        scalar, vector = sub(()), sub(shape)
        operands = (scalar, vector) if draw(st.booleans()) else (vector, scalar)
        return Binary(draw(st.sampled_from("+-*/")), *operands)
    if kind == "diag":
        diagonal = Call("diag", (sub(shape),))
        operands = (diagonal, sub(shape)) if draw(st.booleans()) else (sub(shape), diagonal)
        return Binary("@", *operands)
    return Call("l2norm", (sub(shape),))


@st.composite
def valid_specs(draw):
    extra_dims = draw(st.lists(st.sampled_from(EXTRA_DIMS), unique=True, max_size=2))
    dim_names = ["K", "V", *extra_dims]
    free_names = list(draw(st.permutations(VALUE_NAMES)))
    shapes = st.sampled_from([(), *[(dim,) for dim in dim_names]])

    inputs = [Input("k", ("K",)), Input("v", ("V",))]
    inputs += [Input(f"{dim.lower()}_in", (dim,)) for dim in extra_dims]
    protected = {node.name for node in inputs}
    inputs += [Input(free_names.pop(), draw(shapes)) for _ in range(draw(st.integers(0, 3)))]
    weights = [Weight(free_names.pop(), draw(shapes)) for _ in range(draw(st.integers(0, 2)))]

    params: list[Param] = []
    for _ in range(draw(st.integers(0, 2))):
        param_env = {**{dim: () for dim in dim_names}, **{param.name: () for param in params}}
        params.append(Param(free_names.pop(), draw(expressions((), param_env, depth=2))))

    env = {node.name: node.shape for node in (*inputs, *weights)}
    env.update({param.name: () for param in params})
    statements: list[Statement] = []
    rebindable = [node.name for node in inputs if node.name not in protected]
    for _ in range(draw(st.integers(0, 4))):
        target = draw(st.sampled_from([free_names[-1], *rebindable]))
        if target == free_names[-1]:
            rebindable.append(free_names.pop())
        shape = draw(shapes)
        statements.append(Statement(draw(st.sampled_from(["feature", "gate"])), target,
                                    draw(expressions(shape, env))))
        env[target] = shape

    state = Name("S")
    if draw(st.booleans()):
        decay = Binary("@", Call("diag", (draw(expressions(("K",), env)),)), state)
        statements.append(Statement("decay", "S", decay))
    update = Binary("+", Binary("*", draw(expressions((), env)), state),
                    Call("outer", (draw(expressions(("K",), env)), draw(expressions(("V",), env)))))
    statements.append(Statement("update", "S", update))
    statements.append(Statement("readout", "o", Binary("@", draw(expressions(("K",), env)), state)))
    return Spec(
        name=draw(st.sampled_from(["gla", "random_spec", "t2"])),
        dims=tuple(Dim(dim) for dim in dim_names), inputs=tuple(inputs), params=tuple(params),
        weights=tuple(weights), states=(State("S", ("K", "V")),), statements=tuple(statements),
        doc=draw(st.sampled_from(["", "A random spec.", "Two lines\nof doc."])),
    )


# What `check` says of a part made of numbers only that has no finite value (`2 ** 1024`,
# `0 / 0`) or of a constant exponent over 2 ** 24: the generator draws numbers freely, and
# such a spec is invalid.
CONSTANT_FAULTS = ("divides by zero", "overflows a 64-bit float", "has no finite real value",
                   "fp32 kernels hold no larger integer exactly")


def _has_constant_fault(spec) -> bool:
    try:
        check(spec)
    except SpecError as error:
        return all(any(fault in d.message for fault in CONSTANT_FAULTS) for d in error.diagnostics)
    return False


@PROPERTY_SETTINGS
@given(valid_specs())
def test_random_valid_specs_round_trip(spec):
    assume(not _has_constant_fault(spec))
    assert check(spec) is spec, "the generator makes valid specs"
    text = pretty(spec)
    again = parse(text, "random.attn")
    assert again == spec
    assert again.doc == spec.doc
    assert pretty(again) == text


@PROPERTY_SETTINGS
@given(st.data())
def test_random_expressions_keep_their_tree(data):
    env = {"a": (), "b": (), "k": ("K",), "q": ("K",), "v": ("V",)}
    shape = data.draw(st.sampled_from([(), ("K",), ("V",)]))
    expr = data.draw(expressions(shape, env, depth=4))
    spec = Spec(
        name="t", dims=(Dim("K"), Dim("V")),
        inputs=tuple(Input(name, input_shape) for name, input_shape in env.items()),
        params=(), weights=(), states=(State("S", ("K", "V")),),
        statements=(
            Statement("feature", "x", expr),
            Statement("update", "S", Binary("+", Name("S"), Call("outer", (Name("k"), Name("v"))))),
            Statement("readout", "o", Binary("@", Name("q"), Name("S"))),
        ),
    )
    assume(not _has_constant_fault(spec))
    assert parse(pretty(spec)).statements[0].expr == expr
