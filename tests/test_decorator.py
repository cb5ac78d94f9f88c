"""The Python decorator front end (dsl/tracer.py).

Every shipped spec has a decorator twin below; a twin must give the identical IR, the
identical analysis and the same reference outputs as the `.attn` file. Errors are
located at the user's file:line: each error test marks the expected line with a
`# <- name` comment and asserts the diagnostic points there.
"""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import attnc
from attnc import (
    K, V, Dim, Param, Scalar, State, Vec, Weight, decay, diag, elu, exp, gate, l2norm,
    logsigmoid, outer, relu, sigmoid, softplus,
)
from attnc.dsl.parser import parse
from attnc.dsl.printer import pretty, pretty_expr
from attnc.runtime.compiler import shipped_specs
from attnc.runtime.sampling import random_arguments

THIS_FILE = str(Path(__file__).resolve())
N = Dim("N")  # module level: under `from __future__ import annotations` annotations are
              # evaluated in the module's namespace
TWINS = {}


def twin(fn):
    TWINS[fn.__name__] = fn
    return fn


# ---------------------------------------------------------------- the shipped specs as Python
@twin
def linear_attn(q: Vec[K], k: Vec[K], v: Vec[V], S: State[K, V], scale: Param = K ** -0.5):
    q = (elu(q) + 1) * scale
    k = elu(k) + 1
    S = S + outer(k, v)
    return q @ S


@twin
def retnet(q: Vec[K], k: Vec[K], v: Vec[V], log_gamma: Weight, S: State[K, V],
           scale: Param = K ** -0.5):
    q = q * scale
    gamma = gate(exp(log_gamma))
    S = decay(gamma * S)
    S = S + outer(k, v)
    return q @ S


@twin
def mamba2(C: Vec[K], B: Vec[K], x: Vec[V], dt: Scalar, A_log: Weight, dt_bias: Weight,
           D: Weight, S: State[K, V]):
    delta = softplus(dt + dt_bias)
    a = gate(exp(-exp(A_log) * delta))
    S = decay(a * S)
    S = S + outer(B, delta * x)
    return {"y": C @ S + D * x}


@twin
def gla(q: Vec[K], k: Vec[K], v: Vec[V], g: Vec[K], S: State[K, V], scale: Param = K ** -0.5):
    q = q * scale
    a = gate(exp(logsigmoid(g) / 16))
    S = decay(diag(a) @ S)
    S = S + outer(k, v)
    return q @ S


@twin
def hgrn2(q: Vec[K], f: Vec[K], v: Vec[V], S: State[K, V]):
    a = gate(sigmoid(f))
    S = decay(diag(a) @ S)
    S += outer(1 - a, v)
    return q @ S


@twin
def rwkv6(r: Vec[K], k: Vec[K], v: Vec[V], w: Vec[K], u: Weight[K], S: State[K, V]):
    a = gate(exp(-exp(w)))
    o = r @ (S + diag(u) @ outer(k, v))  # computed before S changes: reads the previous state
    S = decay(diag(a) @ S)
    S = S + outer(k, v)
    return o


@twin
def deltanet(q: Vec[K], k: Vec[K], v: Vec[V], beta: Scalar, S: State[K, V],
             scale: Param = K ** -0.5):
    q = l2norm(q) * scale
    k = l2norm(k)
    S = S + beta * outer(k, v - k @ S)
    return q @ S


@twin
def gated_deltanet(q: Vec[K], k: Vec[K], v: Vec[V], alpha: Scalar, beta: Scalar,
                   S: State[K, V], scale: Param = K ** -0.5):
    q = l2norm(q) * scale
    k = l2norm(k)
    a = gate(exp(alpha))
    S = decay(a * S)
    S = S + beta * outer(k, v - k @ S)
    return q @ S


@twin
def kda(q: Vec[K], k: Vec[K], v: Vec[V], g: Vec[K], beta: Scalar, S: State[K, V],
        scale: Param = K ** -0.5):
    q = l2norm(q) * scale
    k = l2norm(k)
    a = gate(exp(g))
    S = decay(diag(a) @ S)
    S = S + beta * outer(k, v - k @ S)
    return q @ S


@twin
def rwkv7(r: Vec[K], w: Vec[K], k: Vec[K], v: Vec[V], kk: Vec[K], a: Vec[K], S: State[K, V]):
    kk = l2norm(kk)
    d = gate(exp(-0.606531 * sigmoid(w)))
    S = diag(d) @ S - outer(kk * a, kk @ S) + outer(k, v)
    return r @ S


@twin
def mamba1(C: Vec[K], B: Vec[K], x: Vec[V], dt: Vec[V], A_log: Weight[K, V], dt_bias: Weight[V],
           D: Weight[V], S: State[K, V]):
    delta = softplus(dt + dt_bias)
    a = gate(exp(-exp(A_log) @ diag(delta)))
    S = decay(a * S)
    S = S + outer(B, delta * x)
    y = C @ S + D * x
    return y


def test_every_shipped_spec_has_a_twin():
    assert sorted(TWINS) == shipped_specs()


@pytest.mark.parametrize("name", sorted(TWINS))
def test_twin_is_the_shipped_spec(name):
    op = attnc.recurrence(TWINS[name])
    shipped = attnc.load(name)
    assert isinstance(op, type(shipped))
    assert op.spec == shipped.spec
    assert op.analysis.canonical == shipped.analysis.canonical
    assert op.cls == shipped.cls
    assert op.cache_key() == shipped.cache_key()  # hashes the canonical text, not the doc


@pytest.mark.parametrize("name", sorted(TWINS))
def test_twin_reference_matches(name):
    op, shipped = attnc.recurrence(TWINS[name]), attnc.load(name)
    generator = torch.Generator().manual_seed(1)
    arguments = random_arguments(op.analysis, B=2, T=13, H=2, dims={"K": 8, "V": 6},
                                 generator=generator)
    initial = tuple(torch.randn(2, 2, *(8 if d == "K" else 6 for d in s.shape), generator=generator)
                    for s in op.spec.states)
    initial = initial[0] if len(initial) == 1 else initial
    outputs, state = op.reference(**arguments, initial_state=initial, output_final_state=True)
    expected, expected_state = shipped.reference(**arguments, initial_state=initial,
                                                 output_final_state=True)
    torch.testing.assert_close(outputs, expected, rtol=0, atol=0)
    torch.testing.assert_close(state, expected_state, rtol=0, atol=0)
    assert outputs.abs().max() > 0


@pytest.mark.parametrize("name", sorted(TWINS))
def test_to_spec_round_trip(name):
    op = attnc.recurrence(TWINS[name])
    text = attnc.to_spec(op)
    assert parse(text) == op.spec
    assert text == pretty(replace(attnc.load(name).spec, doc=""))


def test_spans_point_at_the_python_source():
    op = attnc.recurrence(TWINS["rwkv6"])
    readout = next(st for st in op.spec.statements if st.kind == "readout")
    assert (readout.span.file, readout.span.line) == (THIS_FILE, _line_of("reads the previous state"))
    assert op.spec.span.line == rwkv6.__code__.co_firstlineno + 1  # `def rwkv6` under `@twin`
    assert op.spec.filename == THIS_FILE


# ---------------------------------------------------------------- the front end's own forms
def test_issue_example_is_one_update():
    @attnc.recurrence
    def gla_update(q: attnc.Vec[K], k: attnc.Vec[K], v: attnc.Vec[V], g: attnc.Vec[K],
                   S: attnc.State[K, V]):
        S = diag(exp(g)) @ S + outer(k, v)
        return q @ S

    assert gla_update.spec == parse(
        "attention gla_update\n  dims K, V\n  inputs q[K], k[K], v[V], g[K]\n  state S[K, V]\n"
        "  update S = diag(exp(g)) @ S + outer(k, v)\n  readout o = q @ S\nend\n")
    assert gla_update.cls == "diagonal"


def test_two_states_named_outputs_params_and_helpers():
    def feature_map(x):  # a helper's operations stay inline in the caller's statement
        return relu(x) + 1

    def normalised(q: Vec[N], k: Vec[N], v: Vec[V], S: State[N, V], z: State[N],
                   eps: Param = 1e-6, temperature=-2):
        """Normalised linear attention."""
        q = feature_map(q) / temperature
        k = feature_map(k)
        S = S + outer(k, v)
        z = z + k
        numerator = q @ S          # reads a state: inline, never a feature
        return {"o": numerator / (q @ z + eps), "mass": q @ z}

    spec = attnc.trace(normalised)
    assert spec == parse("""
attention normalised
  dims    N, V
  inputs  q[N], k[N], v[V]
  param   eps = 1e-06
  param   temperature = -2
  state   S[N, V], z[N]
  feature q = (relu(q) + 1) / temperature
  feature k = relu(k) + 1
  update  S = S + outer(k, v)
  update  z = z + k
  readout o = (q @ S) / (q @ z + eps)
  readout mass = q @ z
end
""")
    assert spec.doc == "Normalised linear attention."
    assert attnc.to_spec(spec).startswith("# Normalised linear attention.\nattention normalised\n")


def test_tuple_outputs_and_readout_placement():
    def two(q: Vec[K], v: Vec[V], S: State[K, V]):
        before = q @ S
        S = S + outer(q, v)
        return before, q @ S

    spec = attnc.trace(two)
    assert [(st.kind, st.target) for st in spec.statements] == [
        ("readout", "before"), ("update", "S"), ("readout", "o2")]


def test_dim_expression_defaults_and_constants():
    def scaled(q: Vec[K], k: Vec[K], v: Vec[V], S: State[K, V],
               scale: Param = attnc.rsqrt(K * 2), shift: float = 0.5):
        S = S + outer(k, v) * math.pi
        return (q @ S) * scale - shift

    spec = attnc.trace(scaled)
    assert [(p.name, pretty_default(p)) for p in spec.params] == [
        ("scale", "rsqrt(K * 2)"), ("shift", "0.5")]
    assert spec.statements[0] == parse(attnc.to_spec(spec)).statements[0]


def pretty_default(param):
    return pretty_expr(param.default)


# ---------------------------------------------------------------- located errors
def _line_of(marker: str) -> int:
    lines = Path(THIS_FILE).read_text().splitlines()
    matches = [number for number, line in enumerate(lines, 1) if line.rstrip().endswith(marker)]
    assert len(matches) == 1, marker
    return matches[0]


def _error_of(fn) -> attnc.SpecError:
    with pytest.raises(attnc.SpecError) as caught:
        attnc.recurrence(fn)
    return caught.value


def assert_located(error: attnc.SpecError, marker: str, *phrases: str) -> None:
    line = _line_of(marker)
    spans = [(d.span.file, d.span.line) for d in error.diagnostics]
    assert (THIS_FILE, line) in spans, (str(error), line)
    message = str(error)
    assert f"{THIS_FILE}:{line}:" in message
    assert Path(THIS_FILE).read_text().splitlines()[line - 1].strip() in message  # the source line
    for phrase in phrases:
        assert phrase in message, message
    assert "tracer.py" not in message and "Traceback" not in message


def test_control_flow_on_a_traced_value():
    def branchy(q: Vec[K], k: Vec[K], v: Vec[V], S: State[K, V]):
        if k > 0:  # <- compare
            k = -k
        S = S + outer(k, v)
        return q @ S

    assert_located(_error_of(branchy), "# <- compare", "Python control flow", "`k`", "relu")


def test_truth_value_of_a_traced_value():
    def truthy(q: Vec[K], v: Vec[V], S: State[K, V]):
        S = S + outer(q, v)
        return q @ S if q else v  # <- truth

    assert_located(_error_of(truthy), "# <- truth",
                   "Python control flow on traced value `q`", "expression")


def test_unknown_function_names_the_attnc_one():
    def uses_torch(q: Vec[K], k: Vec[K], v: Vec[V], S: State[K, V]):
        k = torch.exp(k)  # <- torch
        S = S + outer(k, v)
        return q @ S

    assert_located(_error_of(uses_torch), "# <- torch", "torch.exp", "attnc.exp")


def test_math_function_on_a_traced_value():
    def uses_math(q: Vec[K], v: Vec[V], beta: Scalar, S: State[K, V]):
        S = S + math.exp(beta) * outer(q, v)  # <- math
        return q @ S

    assert_located(_error_of(uses_math), "# <- math", "used as a Python number")


def test_method_call_on_a_traced_value():
    def method(q: Vec[K], v: Vec[V], S: State[K, V]):
        S = S + outer(q.exp(), v)  # <- method
        return q @ S

    assert_located(_error_of(method), "# <- method", "attnc.exp(q)")


def test_shape_mismatch_reuses_the_checks():
    def transposed(q: Vec[K], k: Vec[K], v: Vec[V], S: State[K, V]):
        S = S + outer(v, k)  # <- shape
        return q @ S

    assert_located(_error_of(transposed), "# <- shape", "matrix [V, K]", "did you mean `outer(k, v)`")


def test_vector_never_broadcasts_against_a_matrix():
    def broadcast(q: Vec[K], k: Vec[K], v: Vec[V], g: Vec[K], S: State[K, V]):
        S = exp(g) * S + outer(k, v)  # <- broadcast
        return q @ S

    assert_located(_error_of(broadcast), "# <- broadcast", "diag(exp(g)) @ S")


def test_state_never_reassigned():
    def frozen(q: Vec[K], v: Vec[V],
               S: State[K, V]):  # <- state
        return q @ S

    assert_located(_error_of(frozen), "# <- state", "state `S` is never reassigned")


def test_a_local_keeps_the_value_before_a_rebinding():
    def keeps(q: Vec[K], v: Vec[V], S: State[K, V]):
        raw = q
        q = l2norm(q)
        S = S + outer(raw, v)
        return q @ S

    assert [(st.kind, st.target, pretty_expr(st.expr)) for st in attnc.trace(keeps).statements] == [
        ("feature", "raw", "q"), ("feature", "q", "l2norm(q)"), ("update", "S", "S + outer(raw, v)"),
        ("readout", "o", "q @ S")]


def test_stale_value_after_rebinding():
    def stale(q: Vec[K], v: Vec[V], S: State[K, V]):
        kept = [q]  # a container is not a local: its value cannot be named
        q = l2norm(q)
        S = S + outer(kept[0], v)  # <- stale
        return q @ S

    assert_located(_error_of(stale), "# <- stale", "`q` as it was before line", "another name")


def test_state_read_before_and_after_its_update():
    def mixed(q: Vec[K], v: Vec[V], S: State[K, V]):
        old = q @ S
        S = S + outer(q, v)
        return old + q @ S  # <- mixed

    assert_located(_error_of(mixed), "# <- mixed", "state `S` as it was before line")


def test_gate_inside_an_expression():
    def nested(q: Vec[K], v: Vec[V], g: Vec[K], S: State[K, V]):
        S = diag(gate(exp(g))) @ S + outer(q, v)  # <- gate
        return q @ S

    assert_located(_error_of(nested), "# <- gate", "attnc.gate(...) marks the whole value")


def test_decay_of_a_non_state():
    def misplaced(q: Vec[K], v: Vec[V], S: State[K, V]):
        t = decay(q * 2)  # <- decay
        S = S + outer(t, v)
        return q @ S

    assert_located(_error_of(misplaced), "# <- decay", "`t` is not a state")


def test_feature_may_not_rebind_a_weight():
    def rebinds(q: Vec[K], v: Vec[V], u: Weight[K], S: State[K, V]):
        u = u * 2  # <- weight
        S = S + outer(q * u, v)
        return q @ S

    assert_located(_error_of(rebinds), "# <- weight", "would rebind weight `u`")


def test_parameter_without_annotation():
    def bare(q: Vec[K], v,  # <- bare
             S: State[K, V]):
        S = S + outer(q, v)
        return q @ S

    assert_located(_error_of(bare), "# <- bare", "`v` needs an annotation")


def test_bad_declaration():
    def wrong_dims(q: Vec[K, V],  # <- dims
                   v: Vec[V], S: State[K, V]):
        S = S + outer(q, v)
        return q @ S

    assert_located(_error_of(wrong_dims), "# <- dims", "`Vec[K]`")


def test_returns_nothing():
    def silent(q: Vec[K], v: Vec[V], S: State[K, V]):
        S = S + outer(q, v)  # <- silent

    assert_located(_error_of(silent), "# <- silent", "returns no output")
