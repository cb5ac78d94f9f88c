"""Property tests for the algebra: random specs of the chunkable classes, built from the
grammar's pieces, compile to chunk plans whose results equal the naive fp64 recurrence
(values, final states and every gradient)."""
import warnings

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnc
from attnc.runtime.verify import verify

KEYS = ["k", "elu(k) + 1", "sigmoid(k) * 2", "k * c", "relu(k) + 0.1 * k", "k / (1 + abs(k))"]
QUERIES = ["q", "q * scale", "silu(q)", "tanh(q) * c", "l2norm(q)"]
VALUES = ["v", "v * sigmoid(b)", "softplus(v) - 1", "v * 0.5 + 1"]
# (gate statements, decay statement) by kind
GATES = {
    "none": ("", ""),
    "constant": ("  gate    a = exp(-exp(w0))\n", "  decay   S = a * S\n"),
    "scalar": ("  gate    a = sigmoid(b + 2)\n", "  decay   S = a * S\n"),
    "channel": ("  gate    a = exp(logsigmoid(g) / 4)\n", "  decay   S = diag(a) @ S\n"),
    "vside": ("  gate    a = exp(-softplus(-h))\n", "  decay   S = S @ diag(a)\n"),
    "both": ("  gate    a = sigmoid(g + 1)\n  gate    av = exp(-softplus(-h))\n",
             "  decay   S = diag(a) @ S @ diag(av)\n"),
}
COMBINATORS = ["r", "r * sigmoid(b)", "r + v * c", "r * (1 + (q @ k) ** 2)", "r - v * sum(q * k)"]


@st.composite
def diagonal_specs(draw):
    gate = draw(st.sampled_from(sorted(GATES)))
    gate_lines, decay = GATES[gate]
    key, query, value = (draw(st.sampled_from(x)) for x in (KEYS, QUERIES, VALUES))
    before = draw(st.booleans())
    combinator = draw(st.sampled_from(COMBINATORS)).replace("r", "(qq @ S)", 1)
    readout = f"  readout o = {combinator}\n"
    body = (f"  feature qq = {query}\n  feature kk = {key}\n  feature vv = {value}\n"
            + gate_lines + (readout if before else "")
            + decay + "  update  S = S + outer(kk, vv)\n" + ("" if before else readout))
    return ("attention random_diag\n  dims    K, V\n"
            "  inputs  q[K], k[K], v[V], g[K], h[V], b\n  weight  w0, c\n"
            "  param   scale = K ** -0.5\n  state   S[K, V]\n" + body + "end\n")


@st.composite
def delta_specs(draw):
    gate = draw(st.sampled_from(["none", "scalar", "channel"]))
    decay = {"none": "", "scalar": "  decay   S = exp(-softplus(-b)) * S\n",
             "channel": "  decay   S = diag(exp(logsigmoid(g) / 8)) @ S\n"}[gate]
    query = draw(st.sampled_from(["l2norm(q) * scale", "l2norm(silu(q))"]))
    key = draw(st.sampled_from(["l2norm(k)", "l2norm(elu(k) + 1)"]))
    beta = draw(st.sampled_from(["sigmoid(bb)", "sigmoid(bb) * 0.5"]))
    form = draw(st.sampled_from([
        "  update  S = S + {beta} * outer(kk, v - kk @ S)\n",
        "  update  S = S - {beta} * outer(kk, kk @ S) + outer({beta} * kk, v)\n",
    ])).format(beta=beta)
    combinator = draw(st.sampled_from(["(qq @ S)", "(qq @ S) * sigmoid(b)", "(qq @ S) + v * c"]))
    return ("attention random_delta\n  dims    K, V\n"
            "  inputs  q[K], k[K], v[V], g[K], b, bb\n  weight  c\n"
            "  param   scale = K ** -0.5\n  state   S[K, V]\n"
            f"  feature qq = {query}\n  feature kk = {key}\n" + decay + form
            + f"  readout o = {combinator}\nend\n")


def _check(text, backend, **shape):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a chunkable spec must not fall back to recurrent
        op = attnc.compile(text)
    result = verify(op, backend=backend, **shape)
    assert result.ok, f"{text}\n{result.errors}"


# Derandomized: the same examples every run, so a CI result can be reproduced. A random run
# once drew a weight-driven gate exp(-exp(w0)) with every token decaying by about e^-8, where
# the Triton backward's gate gradient, then the log-cumsum identity, lost accuracy to
# cancellation (dw0 rel. RMS 1.3e-4 to 1.9e-3). A scalar gate's gradient now comes in the
# straddling form (`verify` on that spec with w0 = 2, T = 300, chunks of 16: dw0 4.7e-3 ->
# 5.2e-5; tests/test_chunk_diag.py checks the form); per-channel gates keep the identity
# (README, "Known limits").
FAST = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=6, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(diagonal_specs(), st.sampled_from([1, 23, 70]))
def test_random_diagonal_specs_match_the_recurrence(text, T):
    _check(text, "torch", B=1, T=T, H=2, K=16, V=16, chunk_size=16)


@FAST
@given(delta_specs(), st.sampled_from([1, 23, 70]))
def test_random_delta_specs_match_the_recurrence(text, T):
    _check(text, "torch", B=1, T=T, H=2, K=16, V=16, chunk_size=16)


@FEW
@given(st.one_of(diagonal_specs(), delta_specs()))
def test_random_specs_through_the_triton_kernels(text):
    _check(text, "triton", B=1, T=40, H=1, K=16, V=16, chunk_size=16)
