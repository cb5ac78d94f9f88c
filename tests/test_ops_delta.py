"""Compiled ops of the delta family (DeltaNet, Gated DeltaNet, KDA) against the fp64
reference through the whole pipeline: outputs, final states, all gradients."""
import pytest
import torch

import attnc
from attnc.runtime.verify import verify

DELTA_SPECS = ["deltanet", "gated_deltanet", "kda"]

CASES = {
    "T1": dict(T=1, K=16, V=32),
    "T17-noinit-nofinal": dict(T=17, K=32, V=16, initial_state=False, final_state=False),
    "T64": dict(T=64, K=64, V=64, H=1),
    "T100-varlen": dict(K=16, V=32, seqlens=[37, 5, 58]),
    "T200-gqa": dict(T=200, K=32, V=16, gqa=True, B=1),
    "bf16": dict(T=100, K=64, V=64, H=1, dtype=torch.bfloat16),
}
# under the interpreter each spec takes three cases, rotating so every case runs
TRITON_CASES = [(n, list(CASES)[(3 * i + j) % len(CASES)])
                for i, n in enumerate(DELTA_SPECS) for j in range(3)]
TRITON_CASES += [("kda", "T100-varlen"), ("gated_deltanet", "bf16")]


def _run(name, case, backend, **extra):
    op = attnc.load(name)
    kwargs = {**CASES[case], **extra}
    if kwargs.pop("gqa", False):
        kwargs["H"] = 4
        kwargs["heads"] = {"q": 2, "k": 2}
    result = verify(op, backend=backend, **kwargs)
    assert result.ok, f"{name} [{case}, {backend}]: {result.errors}"


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", DELTA_SPECS)
def test_torch_chunk_path(name, case):
    _run(name, case, "torch")


@pytest.mark.parametrize("name,case", sorted(set(TRITON_CASES)))
def test_triton_kernels(name, case):
    _run(name, case, "triton")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("beta", [1e-3, 0.999])
def test_beta_near_zero_and_one(backend, beta):
    op = attnc.load("gated_deltanet")
    T = 80
    gen = torch.Generator().manual_seed(1)
    betas = beta + (torch.rand(1, T, 2, generator=gen) - 0.5) * min(beta, 1 - beta)
    result = verify(op, B=1, T=T, H=2, K=32, V=32, backend=backend, arguments={"beta": betas})
    assert result.ok, result.errors


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name,gate", [("gated_deltanet", "alpha"), ("kda", "g")])
def test_long_sequence_strong_gates(backend, name, gate):
    op = attnc.load(name)
    T, H, K = 512, 1, 16
    gen = torch.Generator().manual_seed(2)
    shape = (1, T, H) if gate == "alpha" else (1, T, H, K)
    strong = -20 * torch.rand(shape, generator=gen) * (torch.rand(shape, generator=gen) < 0.5)
    result = verify(op, B=1, T=T, H=H, K=K, V=16, backend=backend, arguments={gate: strong})
    assert result.ok, result.errors


ALTERNATIVES = {
    "deltanet": """
attention deltanet_alt
  dims    K, V
  inputs  q[K], k[K], v[V], beta
  param   scale = K ** -0.5
  feature kn = l2norm(k)
  state   S[K, V]
  update  S = S - beta * outer(kn, kn @ S) + outer(beta * kn, v)
  readout o = scale * (l2norm(q) @ S)
end
""",
    "gated_deltanet": """
attention gated_deltanet_alt
  dims    K, V
  inputs  q[K], k[K], v[V], alpha, beta
  param   scale = K ** -0.5
  feature q = l2norm(q) * scale
  feature k = l2norm(k)
  state   S[K, V]
  update  S = exp(alpha) * S - beta * outer(k, k @ (exp(alpha) * S)) + beta * outer(k, v)
  readout o = q @ S
end
""",
    "kda": """
attention kda_alt
  dims    K, V
  inputs  q[K], k[K], v[V], g[K], beta
  param   scale = K ** -0.5
  feature q = l2norm(q) * scale
  feature k = l2norm(k)
  state   S[K, V]
  update  S = diag(exp(g)) @ S + beta * outer(k, v - k @ (diag(exp(g)) @ S))
  readout o = q @ S
end
""",
}


@pytest.mark.parametrize("name", DELTA_SPECS)
def test_alternative_formulation_compiles_to_the_same_kernels(name):
    shipped, alt = attnc.load(name), attnc.compile(ALTERNATIVES[name])
    assert alt.cls == "delta"
    assert alt.analysis.canonical == shipped.analysis.canonical
    gen = torch.Generator().manual_seed(4)
    from attnc.runtime.sampling import random_arguments
    args = random_arguments(shipped.analysis, B=1, T=40, H=2, dims={"K": 16, "V": 16},
                            generator=gen)
    out, ht = shipped(**args, output_final_state=True, backend="torch")
    out_alt, ht_alt = alt(**args, output_final_state=True, backend="torch")
    torch.testing.assert_close(out_alt, out)
    torch.testing.assert_close(ht_alt, ht)


TWO_READOUTS = """
attention two_readouts
  dims    K, V
  inputs  q[K], k[K], v[V], beta
  feature k = l2norm(k)
  feature beta = sigmoid(beta)
  state   S[K, V]
  update  S = S - beta * outer(k, k @ S) + beta * outer(k, v)
  readout o = q @ S
  readout r = k @ S
end
"""


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_every_readout_of_a_state_sees_its_initial_state(backend):
    """Each readout of a state is its own chunk call; each recomputes the state from the
    initial state (the second readout once ran from zero: r off by 0.37)."""
    op = attnc.compile(TWO_READOUTS)
    result = verify(op, backend=backend, T=40, K=16, V=32, H=2)
    assert result.ok, result.errors
