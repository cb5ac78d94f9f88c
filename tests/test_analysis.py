"""The analysis classifies transitions from the algebra, and algebraically equal specs
land on the same canonical form."""
import json
import subprocess
import sys
import time

import pytest
import sympy as sp

import attnc
from attnc.dsl.parser import parse
from attnc.codegen.analysis import analyse

EXPECTED_CLASS = {
    "linear_attn": "identity",
    "retnet": "constant",
    "mamba2": "scalar",
    "gla": "diagonal",
    "hgrn2": "diagonal",
    "rwkv6": "diagonal",
    "deltanet": "delta",
    "gated_deltanet": "delta",
    "kda": "delta",
    "rwkv7": "dplr",
    "mamba1": "other",
}


def _analyse(text):
    return analyse(parse(text))


def _spec(header, body, name="variant"):
    return f"attention {name}\n{header}\n{body}\nend\n"


@pytest.mark.parametrize("name", sorted(EXPECTED_CLASS))
def test_shipped_spec_class(name):
    assert attnc.load(name).cls == EXPECTED_CLASS[name]


def test_every_shipped_spec_is_covered():
    assert sorted(attnc.shipped_specs()) == sorted(EXPECTED_CLASS)


QKV = "  dims K, V\n  inputs q[K], k[K], v[V]"

REWRITES = {
    "identity": (QKV, [
        "  state S[K, V]\n  update S = S + outer(k, v)\n  readout o = q @ S",
        "  state S[K, V]\n  update S = outer(k, v) + S\n  readout o = q @ S",
        "  state S[K, V]\n  update S = S + outer(2 * k, v / 2)\n  readout o = q @ S",
        "  state S[K, V]\n  decay S = 1 * S\n  update S = S + diag(k) @ outer(1 + 0 * k, v)\n  readout o = q @ S",
    ]),
    "constant": ("  dims K, V\n  inputs q[K], k[K], v[V]\n  weight lg", [
        "  state S[K, V]\n  gate a = exp(lg)\n  decay S = a * S\n  update S = S + outer(k, v)\n  readout o = q @ S",
        "  state S[K, V]\n  decay S = S * exp(lg)\n  update S = outer(k, v) + S\n  readout o = q @ S",
        "  state S[K, V]\n  update S = exp(lg / 2) * (exp(lg / 2) * S) + outer(k, v)\n  readout o = q @ S",
    ]),
    "scalar": ("  dims K, V\n  inputs C[K], B[K], x[V], dt\n  weight A_log, dt_bias, D", [
        "  feature delta = softplus(dt + dt_bias)\n  gate a = exp(-exp(A_log) * delta)\n  state S[K, V]\n"
        "  decay S = a * S\n  update S = S + outer(B, delta * x)\n  readout y = C @ S + D * x",
        "  state S[K, V]\n  update S = exp(-exp(A_log) * softplus(dt + dt_bias)) * S"
        " + softplus(dt + dt_bias) * outer(B, x)\n  readout y = D * x + C @ S",
        "  feature delta = softplus(dt_bias + dt)\n  state S[K, V]\n"
        "  decay S = S * exp(-delta * exp(A_log))\n  update S = S + outer(delta * B, x)\n  readout y = x * D + C @ S",
    ]),
    "diagonal": ("  dims K, V\n  inputs q[K], k[K], v[V], g[K]", [
        "  gate a = exp(logsigmoid(g) / 16)\n  state S[K, V]\n  decay S = diag(a) @ S\n"
        "  update S = S + outer(k, v)\n  readout o = q @ S",
        "  state S[K, V]\n  update S = diag(exp(logsigmoid(g) / 16)) @ S + outer(k, v)\n  readout o = q @ S",
        "  gate a = exp(logsigmoid(g)) ** 0.0625\n  state S[K, V]\n  decay S = diag(a) @ S\n"
        "  update S = outer(k, v) + S\n  readout o = q @ S",
        "  gate a = sigmoid(g) ** (1 / 16)\n  state S[K, V]\n  decay S = diag(a) @ S\n"
        "  update S = S + outer(k, v)\n  readout o = q @ S",
    ]),
    "delta": ("  dims K, V\n  inputs q[K], k[K], v[V], alpha, beta", [
        "  feature k = l2norm(k)\n  gate a = exp(alpha)\n  state S[K, V]\n  decay S = a * S\n"
        "  update S = S + beta * outer(k, v - k @ S)\n  readout o = q @ S",
        "  feature k = l2norm(k)\n  gate a = exp(alpha)\n  state S[K, V]\n"
        "  update S = a * S - beta * outer(k, k @ (a * S)) + beta * outer(k, v)\n  readout o = q @ S",
        "  feature k = l2norm(k)\n  gate a = exp(alpha)\n  state S[K, V]\n"
        "  update S = a * (S - beta * outer(k, k @ S)) + outer(beta * k, v)\n  readout o = q @ S",
        "  feature kn = l2norm(k)\n  state S[K, V]\n  decay S = S * exp(alpha)\n"
        "  update S = S - outer(kn, beta * (kn @ S)) + beta * outer(kn, v)\n  readout o = q @ S",
    ]),
    "dplr": ("  dims K, V\n  inputs r[K], w[K], k[K], v[V], kk[K], a[K]", [
        "  gate d = exp(-exp(w))\n  state S[K, V]\n"
        "  update S = diag(d) @ S - outer(kk * a, kk @ S) + outer(k, v)\n  readout o = r @ S",
        "  state S[K, V]\n"
        "  update S = outer(k, v) + diag(exp(-exp(w))) @ S - diag(a) @ outer(kk, kk @ S)\n  readout o = r @ S",
    ]),
    "other": ("  dims K, V\n  inputs C[K], B[K], x[V], dt[V]\n  weight A_log[K, V]", [
        "  gate a = exp(-exp(A_log) @ diag(dt))\n  state S[K, V]\n  decay S = a * S\n"
        "  update S = S + outer(B, dt * x)\n  readout y = C @ S",
        "  state S[K, V]\n  decay S = S * exp(-(exp(A_log) @ diag(dt)))\n"
        "  update S = S + outer(B, x * dt)\n  readout y = C @ S",
    ]),
}


@pytest.mark.parametrize("cls", sorted(REWRITES))
def test_rewrites_share_class_and_canonical_form(cls):
    header, bodies = REWRITES[cls]
    results = [_analyse(_spec(header, body)) for body in bodies]
    for body, a in zip(bodies, results):
        assert a.cls == cls, f"{body!r} classified {a.cls}, expected {cls}"
    forms = {a.canonical for a in results}
    assert len(forms) == 1, "rewrites disagree:\n" + "\n---\n".join(sorted(forms))


def test_class_comes_from_algebra_not_name():
    header, bodies = REWRITES["diagonal"]
    assert _analyse(_spec(header, bodies[0], name="deltanet")).cls == "diagonal"


def test_delta_records_key_and_beta():
    a = attnc.load("gated_deltanet").analysis
    (s,) = a.states
    assert str(s.delta_key) == "l2norm(k)"
    assert str(s.delta_beta) == "beta"
    assert str(s.log_gate) == "alpha"


def test_delta_without_decay_uses_unit_gate():
    (s,) = attnc.load("deltanet").analysis.states
    assert s.cls == "delta" and s.log_gate == 0


def test_single_statement_delta_without_decayed_read_rescales_beta():
    # a*S - beta k k^T S = a (I - (beta/a) k k^T) S: still delta, with beta/a
    header = REWRITES["delta"][0]
    a = _analyse(_spec(header, "  gate a = exp(alpha)\n  state S[K, V]\n"
                       "  update S = a * S - beta * outer(k, k @ S) + beta * outer(k, v)\n"
                       "  readout o = q @ S"))
    (s,) = a.states
    assert s.cls == "delta"
    assert str(s.delta_beta) == "beta*exp(-alpha)"


def test_gates_land_in_log_space():
    logs = {n: str(attnc.load(n).analysis.states[0].log_gate)
            for n in ("gla", "hgrn2", "rwkv6", "mamba2", "retnet")}
    assert logs == {
        "gla": "logsigmoid(g)/16",
        "hgrn2": "logsigmoid(f)",
        "rwkv6": "-exp(w)",
        "mamba2": "-softplus(dt + dt_bias)*exp(A_log)",
        "retnet": "log_gamma",
    }


def test_per_channel_and_side_of_gates():
    gla = attnc.load("gla").analysis.states[0]
    assert gla.gate_per_channel and gla.log_gate_v is None
    vside = _analyse(_spec("  dims K, V\n  inputs q[K], k[K], v[V], g[V]",
                           "  state S[K, V]\n  decay S = S @ diag(exp(g))\n"
                           "  update S = S + outer(k, v)\n  readout o = q @ S"))
    (s,) = vside.states
    assert s.cls == "diagonal" and not s.gate_per_channel and str(s.log_gate_v) == "g"


def test_readout_parts():
    rwkv6 = attnc.load("rwkv6").analysis.readouts[0]
    (lin,) = rwkv6.linear
    assert lin.version == "t-1" and str(lin.query) == "r"
    assert "dot(r, k*u)" in str(rwkv6.combinator)
    mamba2 = attnc.load("mamba2").analysis.readouts[0]
    assert mamba2.linear[0].version == "t"
    assert "D*x" in str(mamba2.combinator)


def test_other_says_why():
    (s,) = attnc.load("mamba1").analysis.states
    assert "elementwise" in s.reason
    coupled = _analyse(_spec("  dims K, V\n  inputs q[K], k[K], v[V]",
                             "  state S[K, V], M[K, V]\n  update M = M + outer(k, v)\n"
                             "  update S = S + M\n  readout o = q @ S"))
    assert coupled.states[0].cls == "other" and "coupled" in coupled.states[0].reason
    nonlinear = _analyse(_spec("  dims K, V\n  inputs q[K], k[K], v[V]",
                               "  state S[K, V]\n  update S = tanh(S) + outer(k, v)\n"
                               "  readout o = q @ S"))
    assert nonlinear.cls == "other" and "not affine" in nonlinear.states[0].reason


def test_cli_check_all_shipped_specs_fast(tmp_path):
    specs = [f"specs/{n}.attn" for n in sorted(EXPECTED_CLASS)]
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "attnc.runtime.cli", "check", "--json", *specs],
                         capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    assert run.returncode == 0, run.stderr
    report = {r["name"]: r for r in json.loads(run.stdout)}
    assert {n: r["class"] for n, r in report.items()} == EXPECTED_CLASS
    assert report["gla"]["inputs"][0] == {"name": "q", "shape": ["K"]}
    assert report["gla"]["states"][0]["name"] == "S"
    assert elapsed < 2.0, f"attnc check took {elapsed:.2f} s"


# ---------------------------------------------------------------- found by tests/fuzz_specs.py
from attnc.runtime.compiler import NotChunkParallelWarning  # noqa: E402

GLA_HEADER = "  dims K, V\n  inputs q[K], k[K], v[V], g[K]"


def _compile_quietly(text):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotChunkParallelWarning)
        return attnc.compile(text)


def _torch_path_matches_reference(op):
    from attnc.runtime.verify import verify

    result = verify(op, B=1, T=20, H=2, K=8, V=8, backend="torch", chunk_size=16)
    assert result.ok, result.errors


def test_gate_summing_a_matrix_is_not_chunk_parallel():
    # was NotAffine ("sum() over a matrix or a state") escaping from the analysis at compile
    a = _analyse(_spec("  dims K, V\n  inputs C[K], B[K], x[V], dt[V]\n  weight A_log[K, V]",
                       "  gate a = sum(exp(-exp(A_log) @ diag(dt)))\n  state S[K, V]\n  decay S = a * S\n"
                       "  update S = S + outer(B, x)\n  readout y = C @ S"))
    (s,) = a.states
    assert s.cls == "other" and "it reads gate `a`: sum() over a matrix or a state (line 5)" in s.reason


@pytest.mark.parametrize("readout, reason", [
    # were a KeyError and a jinja2 UndefinedError writing the plan's epilogue at the first call
    ("readout p = outer(q, v) @ diag(v)", "readout `p` is not a combination of linear readouts"),
    ("readout p = (q @ S) - (q @ S)", "readout `p` comes out as the constant 0"),
])
def test_readouts_without_a_chunk_form_take_the_recurrent_path(readout, reason):
    text = _spec(GLA_HEADER, "  state S[K, V]\n  decay S = diag(exp(g)) @ S\n  update S = S + outer(k, v)\n"
                 f"  readout o = q @ S\n  {readout}")
    with pytest.warns(NotChunkParallelWarning, match="not chunk-parallel"):
        op = attnc.compile(text)
    assert reason in op.no_chunk_form
    _torch_path_matches_reference(op)


def test_gate_with_a_complex_log_takes_the_recurrent_path():
    # log of a negative value: sympy's I*pi reached the code printers (NotImplementedError)
    text = _spec("  dims K, V\n  inputs C[K], B[K], x[V], dt\n  weight A_log",
                 "  gate a = log(-exp(A_log) * softplus(dt))\n  state S[K, V]\n  decay S = a * S\n"
                 "  update S = S + outer(B, x)\n  readout y = C @ S")
    with pytest.warns(NotChunkParallelWarning):
        op = attnc.compile(text)
    assert "is not real (a log or a root of a negative value)" in op.no_chunk_form


def test_operand_simplified_to_a_constant_takes_the_recurrent_path():
    # the key 1 - sigmoid(f * 0) is a constant: the prologue had no input to size it by (jinja2 error)
    text = _spec("  dims K, V\n  inputs q[K], f[K], v[V]",
                 "  gate a = sigmoid(f * 0)\n  state S[K, V]\n  decay S = diag(a) @ S\n"
                 "  update S = S + outer(1 - a, v)\n  readout o = q @ S")
    with pytest.warns(NotChunkParallelWarning):
        op = attnc.compile(text)
    assert "its key comes out as `1 - sigmoid(0)`, which reads no vector" in op.no_chunk_form
    _torch_path_matches_reference(op)


@pytest.mark.parametrize("header, body", [
    # torch.log(2): a constant part of the log gate reached torch as a Python int (TypeError)
    (GLA_HEADER, "  gate a = exp(logsigmoid(g)) / 2\n  state S[K, V]\n  decay S = diag(a) @ S\n"
                 "  update S = S + outer(k, v)\n  readout o = q @ S"),
    # torch.exp(scale): a param is a Python float in the prologue (TypeError)
    ("  dims K, V\n  inputs q[K], k[K], v[V]\n  param scale = 0.5",
     "  feature q = elu(q) * exp(scale)\n  state S[K, V]\n  update S = S + outer(k, v)\n  readout o = q @ S"),
    # 1e20 became the integer 10**20 in the query map, which torch cannot convert (OverflowError)
    ("  dims K, V\n  inputs q[K], k[K], v[V]",
     "  feature q = (elu(q) + 1) * 1e20\n  state S[K, V]\n  update S = S + outer(k, v)\n  readout o = q @ S"),
])
def test_constants_in_generated_pytorch_code(header, body):
    _torch_path_matches_reference(_compile_quietly(_spec(header, body)))


def test_growing_decay_with_a_constant_factor_is_refused_by_the_decay_check():
    # the check's torch function of logsigmoid(g) + log(3) called torch.log(3) (TypeError)
    op = _compile_quietly(_spec(GLA_HEADER, "  gate a = 3 * exp(logsigmoid(g))\n  state S[K, V]\n"
                                "  decay S = diag(a) @ S\n  update S = S + outer(k, v)\n  readout o = q @ S"))
    with pytest.raises(ValueError, match=r"decays by exp\(logsigmoid\(g\) \+ log\(3\)\)"):
        _torch_path_matches_reference(op)


def test_abs_of_a_feature_map_differentiates_to_printable_code():
    # d/dx abs(elu(x) + 1) was re(elu(x))... : no Triton printing for `re`
    op = _compile_quietly(_spec("  dims K, V\n  inputs q[K], k[K], v[V]",
                                "  feature k = abs(elu(k) + 1)\n  state S[K, V]\n"
                                "  update S = S + outer(k, v)\n  readout o = q @ S"))
    assert any("_sign(" in source or "sign" in source for source in op.sources().values())
    _torch_path_matches_reference(op)


@pytest.mark.parametrize("rewrite", [
    "  decay S = 0.5 * S\n  update S = S + outer(k, v)",            # jinja2 UndefinedError: a prologue with no input
    "  update S = S + scale * outer(k, v - k @ S)",                 # KeyError 'scale' in the fused prologue
])
def test_constant_gate_or_beta_takes_the_recurrent_path(rewrite):
    text = _spec("  dims K, V\n  inputs q[K], k[K], v[V]\n  param scale = 0.5",
                 f"  state S[K, V]\n{rewrite}\n  readout o = q @ S")
    with pytest.warns(NotChunkParallelWarning):
        op = attnc.compile(text)
    assert "is made of numbers and params only" in op.no_chunk_form
    _torch_path_matches_reference(op)


def test_readout_nested_in_functions_plans_quickly():
    # sympy simplified the derivative of exp(exp(...(q @ S))) for minutes (over 20 s per case)
    from attnc.codegen.plan import plan_chunks

    readout = "exp(" * 20 + "q @ S" + ")" * 20
    op = _compile_quietly(_spec("  dims K, V\n  inputs q[K], k[K], v[V]",
                                f"  state S[K, V]\n  update S = S + outer(k, v)\n  readout o = {readout}"))
    start = time.perf_counter()
    plan = plan_chunks(op.analysis)
    assert time.perf_counter() - start < 5.0
    assert not plan.calls[0].direct  # no factor to fold into the kernel


def test_key_factor_nested_in_functions_plans_quickly():
    # mamba2 with its delta inside 20 exps: sp.simplify of the key's factor took ~3x longer
    # per level (16 levels 4 s, 20 about a minute; the spec fuzzer's hang)
    from attnc.codegen.plan import SIMPLIFY_MAX_NESTING
    from attnc.runtime.compiler import shipped_spec_text

    delta = "exp(" * 20 + "softplus(dt + dt_bias)" + ")" * 20
    text = shipped_spec_text("mamba2").replace("delta = softplus(dt + dt_bias)", f"delta = {delta}")
    assert delta in text and 20 > SIMPLIFY_MAX_NESTING
    start = time.perf_counter()
    op = _compile_quietly(text)
    assert time.perf_counter() - start < 5.0
    assert op.cls == "scalar"


def test_nesting_counts_function_levels():
    from attnc.codegen.symbols import nesting, symbol

    x = symbol("x")
    assert nesting(x + 1) == 0 and nesting(sp.exp(x) * x) == 1 and nesting(sp.tanh(x + sp.exp(x))) == 2


def test_high_powers_of_sums_stay_unexpanded():
    # (1 + q) ** 3 ** 3 ** 3 kept sympy's multinomial expansion busy for good (that exponent
    # is now refused: see test_errors.py); a million is still a long time
    from attnc.codegen.symbols import EXPAND_MAX_DEGREE, normalize, symbol

    x, y = symbol("x"), symbol("y")
    assert normalize((1 + x) ** 2) == x ** 2 + 2 * x + 1
    high = (1 + x) ** (EXPAND_MAX_DEGREE + 1)
    assert normalize(y * (high + 1)) == y * high + y
    text = _spec("  dims K, V\n  inputs q[K], k[K], v[V]",
                 "  state S[K, V]\n  update S = S + outer(k * (1 + q) ** 1000000, v)\n  readout o = q @ S")
    start = time.perf_counter()
    op = _compile_quietly(text)
    assert time.perf_counter() - start < 5.0
    assert op.cls == "identity"
