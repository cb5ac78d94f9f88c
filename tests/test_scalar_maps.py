"""Scalar gates the diagonal chunk kernels compute themselves: a log gate (and a per-token
key factor beside it) made of per-token scalar inputs and per-head weights, mamba2's
-exp(A_log) softplus(dt + dt_bias) and softplus(dt + dt_bias), goes to the chunk call as
the raw tensors dt, A_log, dt_bias with a ScalarMap. Its cumsum kernel computes the gate
and the factor as it loads them, and its gate-gradient kernel applies the chain rule (a
weight's gradient summed per program, then over programs), so no prologue pass writes
them or reads their gradients.

Values, final states and every gradient against the fp64 recurrence: both forward forms,
a readout of the previous state, varlen batches, bf16, the torch backend; which specs get
a map; the launches a call makes; bad arguments.
"""
import json

import pytest
import torch

import attnc
from attnc.codegen.chunk_diag import DiagKernelSpec, ScalarMapCode
from attnc.codegen.emit_torch import elementwise_parts
from attnc.codegen.plan import plan_chunks
from attnc.runtime.chunk_diag_op import ScalarMap, chunk_diag
from attnc.runtime.launches import record
from attnc.runtime.verify import verify

# two per-token inputs, a per-head weight in the gate and another in the key factor; the
# readout before the update
EXCLUSIVE = """
attention scalar_exclusive
  dims    K, V
  inputs  q[K], k[K], v[V], dt, z
  weight  w, b

  feature delta = softplus(dt + b)
  gate    a = exp(-exp(w) * delta * sigmoid(z))
  state   S[K, V]
  readout o = q @ S
  decay   S = a * S
  update  S = S + outer(k, delta * v)
end
"""

# a param in the gate: not a map's (the prologue computes the gate)
WITH_PARAM = """
attention scalar_param
  dims    K, V
  inputs  q[K], k[K], v[V], g
  param   c = 0.5

  gate    a = exp(-c * softplus(g))
  state   S[K, V]
  decay   S = a * S
  update  S = S + outer(k, v)
  readout o = q @ S
end
"""

# the log gate an input as it is: nothing to compute
AS_GIVEN = """
attention scalar_as_given
  dims    K, V
  inputs  q[K], k[K], v[V], g

  gate    a = exp(g)
  state   S[K, V]
  decay   S = a * S
  update  S = S + outer(k, v)
  readout o = q @ S
end
"""

SPECS = {"exclusive": EXCLUSIVE, "with_param": WITH_PARAM, "as_given": AS_GIVEN}


def _op(name):
    return attnc.compile(SPECS[name]) if name in SPECS else attnc.load(name)


@pytest.mark.parametrize("name, inputs, key_scale", [
    ("mamba2", ("dt", "A_log", "dt_bias"), True),
    ("retnet", ("log_gamma",), False),          # a gate of one weight: constant over time
    ("exclusive", ("dt", "z", "w", "b"), True),
    ("with_param", None, False),
    ("as_given", None, False),
])
def test_which_scalar_gates_the_kernels_compute(name, inputs, key_scale):
    """A map where the gate (or the key factor) is made of per-token scalar inputs and
    per-head weights and is not an input as it is; the plan then passes the raw tensors,
    its prologue computes neither, and the kernels hold the gate, the factor and the
    gradients."""
    op = _op(name)
    (call,) = plan_chunks(op.analysis).calls
    assert call.scalar_inputs == inputs
    computed = elementwise_parts(plan_chunks(op.analysis)).prologue.output_names
    sources = op.sources()
    kernels = sources[f"{op.name}_S_kernels.py"]
    if inputs is None:
        assert "scalar_map=" not in sources[f"{op.name}_plan.py"] and "SCALAR_MAP = False" in kernels
        return
    assert "S_log_gate" not in computed and "S_key_scale" not in computed
    assert f"scalar_map={op.name.upper()}_S_SCALAR_MAP" in sources[f"{op.name}_plan.py"]
    code, _ = call.scalar_map(op.analysis)
    assert bool(code.key_scale) == key_scale
    assert "SCALAR_MAP = True" in kernels and f"logs = tl.where(row_ok, {code.log_gate}, 0.0)" in kernels
    for name_, grad in zip(code.names, code.grads):
        assert f"grad_{name_}" in kernels and grad in kernels


def test_mamba2_runs_no_prologue():
    """mamba2's forward: the cumsum kernel and the chunk kernel, nothing else; its backward
    no prologue kernel (the raw tensors' gradients come from the gate-gradient kernel)."""
    trace = record(attnc.load("mamba2"), B=2, T=128, H=2, dims={"K": 32, "V": 32}, step=False)
    forward = [e.name for e in trace.launches("forward")]
    assert forward[0] == "mamba2_S_gate_cumsum" and all(n.startswith("mamba2_S_chunk_") for n in forward[1:])
    # (aten.full: the tests poison every output buffer before the kernels write it)
    assert [op.name for op in trace.torch_ops("forward") if op.name != "aten.full"] == []
    backward = [e.name for e in trace.launches("backward")]
    assert not [n for n in backward if "prologue" in n] and backward[-1] == "mamba2_S_gate_grad", backward


@pytest.mark.parametrize("name", ["mamba2", "retnet", "exclusive"])
@pytest.mark.parametrize("fused", [0, 1])
def test_scalar_maps_match_the_recurrence(name, fused):
    result = verify(_op(name), backend="triton", B=2, T=37, H=2, K=16, V=32, config={"fused_forward": fused})
    assert result.ok, result.errors


def test_scalar_maps_with_varlen_in_bf16():
    """Sequences that end inside a chunk (and one of a single token): the weights' gradients
    are summed over every program's real tokens only."""
    for name in ("mamba2", "exclusive"):
        result = verify(_op(name), backend="triton", H=2, K=16, V=16, seqlens=[19, 1, 45],
                        dtype=torch.bfloat16)
        assert result.ok, (name, result.errors)


@pytest.mark.parametrize("name", ["mamba2", "exclusive"])
def test_the_torch_backend_applies_the_scalar_maps(name):
    result = verify(_op(name), backend="torch", B=1, T=40, H=2, K=16, V=16)
    assert result.ok, result.errors


def test_the_kernel_spec_survives_the_cache_manifest():
    """A warm start rebuilds each kernel spec from the cache's manifest.json (JSON: the
    map's tuples come back as lists)."""
    from attnc.runtime import chunk_diag_op
    from attnc.runtime.op import register_kernels

    op = attnc.load("mamba2")
    (_, kernel), = op.chunk_kernels()
    manifest = json.loads(op.sources()["manifest.json"])
    fields = manifest["kernels"]["diag"]["mamba2_S_kernels.py"]
    assert isinstance(fields["scalar_map"]["tokens"], list)
    registered = {}

    class Modules:
        def register(self, spec, module):
            registered[spec] = module

    saved, chunk_diag_op.MODULES = chunk_diag_op.MODULES, Modules()
    try:
        register_kernels("diag", fields, "module")
    finally:
        chunk_diag_op.MODULES = saved
    assert registered == {kernel: "module"}


CODE = ScalarMapCode(tokens=("u",), heads=("w",), log_gate="-tl.exp(w_w) * _softplus(b_u)", key_scale="",
                     grads=("-cot_gate * tl.exp(w_w) * _sigmoid(b_u)", "-cot_gate * tl.exp(w_w) * _softplus(b_u)"))
MAP = ScalarMap(CODE, lambda u, w: (-torch.exp(w) * torch.nn.functional.softplus(u), None))


def test_a_scalar_map_through_the_chunk_op():
    """chunk_diag with a hand-made map against the same call with the gate computed first."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 40, 2, 16) for _ in range(3))
    u = torch.randn(1, 40, 2, requires_grad=True)
    w = torch.randn(2, requires_grad=True)
    o = chunk_diag(q, k, v, exclusive=False, output_final_state=False, name="scalar_map_test",
                   scalar_map=MAP, scalar_inputs=(u, w))[0]
    du, dw = torch.autograd.grad(o.square().sum(), (u, w))
    u2, w2 = (x.detach().double().requires_grad_() for x in (u, w))
    g = -torch.exp(w2) * torch.nn.functional.softplus(u2)
    expected = chunk_diag(q.double(), k.double(), v.double(), g, exclusive=False, output_final_state=False,
                          backend="torch")[0]
    du2, dw2 = torch.autograd.grad(expected.square().sum(), (u2, w2))
    for got, want in ((o, expected), (du, du2), (dw, dw2)):
        assert torch.allclose(got.double(), want.double(), rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_scalar_maps_refuse_bad_arguments():
    q, k, v = (torch.randn(1, 16, 2, 16) for _ in range(3))
    u, w = torch.randn(1, 16, 2), torch.randn(2)
    call = dict(exclusive=False, output_final_state=False, name="scalar_map_test", scalar_map=MAP)
    with pytest.raises(ValueError, match="pass g=None"):
        chunk_diag(q, k, v, g=torch.zeros(1, 16, 2), scalar_inputs=(u, w), **call)
    with pytest.raises(ValueError, match=r"expected 2 tensors \(u, w\), got 1"):
        chunk_diag(q, k, v, scalar_inputs=(u,), **call)
    with pytest.raises(ValueError, match="scalar_inputs are taken only with a scalar_map"):
        chunk_diag(q, k, v, scalar_inputs=(u,), exclusive=False, output_final_state=False)
    with pytest.raises(ValueError, match=r"u must be a float tensor of shape \[B, T, H\] = \(1, 16, 2\)"):
        chunk_diag(q, k, v, scalar_inputs=(u[:, :8], w), **call)
    with pytest.raises(ValueError, match=r"w must be a float tensor .*holding H = 2 values"):
        chunk_diag(q, k, v, scalar_inputs=(u, torch.randn(3)), **call)
    keyed = ScalarMap(ScalarMapCode(tokens=("u",), heads=(), log_gate="-b_u", key_scale="b_u",
                                    grads=("cot_scale - cot_gate",)), lambda u: (-u, u))
    with pytest.raises(ValueError, match="the scalar map computes the keys' factor; pass None"):
        chunk_diag(q, k, v, scalar_inputs=(u,), key_scale=u, **{**call, "scalar_map": keyed})
    with pytest.raises(ValueError, match="for a scalar gate without a V-side gate"):
        DiagKernelSpec("f", gate="channel", scalar_map=CODE)
    with pytest.raises(ValueError, match="one gradient per raw tensor"):
        ScalarMapCode(tokens=("u",), heads=("w",), log_gate="b_u", key_scale="", grads=("cot_gate",)).check()
