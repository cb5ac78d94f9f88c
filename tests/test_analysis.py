"""The analysis classifies transitions from the algebra, and algebraically equal specs
land on the same canonical form."""
import json
import subprocess
import sys
import time

import pytest

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
