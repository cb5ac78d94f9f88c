"""Compiled ops of the diagonal family against the fp64 reference, through the whole
pipeline (analysis -> plan -> generated PyTorch glue -> chunk kernels): outputs, final
states and the gradients of every input, weight and initial state.

The Triton backend runs the generated kernels in Triton's interpreter on this machine.
Each value the issue lists (T, (K, V), initial/final state, varlen, GQA, bf16) is
covered on every spec for the PyTorch chunk path and on a rotating subset for Triton,
so the suite stays fast; gla (per-channel gate) and mamba2 (scalar gate) get all cases.
"""
import pytest
import torch

import attnc
from attnc.runtime.verify import verify

DIAGONAL_SPECS = ["linear_attn", "retnet", "mamba2", "gla", "hgrn2", "rwkv6"]

CASES = {
    "T1": dict(T=1, K=16, V=32),
    "T17-noinit-nofinal": dict(T=17, K=32, V=16, initial_state=False, final_state=False),
    "T64": dict(T=64, K=64, V=64, H=1),
    "T100-varlen": dict(K=16, V=32, seqlens=[37, 5, 58]),
    "T200-gqa": dict(T=200, K=32, V=16, gqa=True, B=1),
    "bf16": dict(T=100, K=64, V=64, H=1, dtype=torch.bfloat16),
}
FULL_TRITON = {"gla", "mamba2"}
# the other specs take two cases each under the interpreter, rotating through CASES
ROTATION = {name: [list(CASES)[(2 * i + j) % len(CASES)] for j in range(2)]
            for i, name in enumerate(sorted(set(DIAGONAL_SPECS) - FULL_TRITON))}


def _run(name, case, backend):
    op = attnc.load(name)
    kwargs = dict(CASES[case])
    if kwargs.pop("gqa", False):
        kwargs["H"] = 4
        kwargs["heads"] = {i.name: 2 for i in op.spec.inputs if i.shape == ("K",)}
    result = verify(op, backend=backend, **kwargs)
    assert result.ok, f"{name} [{case}, {backend}]: {result.errors}"
    return result


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", DIAGONAL_SPECS)
def test_torch_chunk_path(name, case):
    _run(name, case, "torch")


TRITON_CASES = [(n, c) for n in sorted(FULL_TRITON) for c in CASES] + [
    (n, c) for n, cs in ROTATION.items() for c in cs]


@pytest.mark.parametrize("name,case", TRITON_CASES)
def test_triton_kernels(name, case):
    _run(name, case, "triton")


STRONG = """
attention strong
  dims    K, V
  inputs  q[K], k[K], v[V], alpha, g[K]
  state   S[K, V], Z[K, V]
  decay   S = exp(alpha) * S
  update  S = S + outer(k, v)
  decay   Z = diag(exp(g)) @ Z
  update  Z = Z + outer(k, v)
  readout o = q @ S
  readout p = q @ Z
end
"""


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_strong_decays_stay_finite_and_accurate(backend):
    op = attnc.compile(STRONG)
    T = 160
    gen = torch.Generator().manual_seed(3)
    alpha = -20 * torch.rand(1, T, 2, generator=gen)          # down to -20 per step
    g = -20 * torch.rand(1, T, 2, 16, generator=gen)
    result = verify(op, B=1, T=T, H=2, K=16, V=16, backend=backend,
                    arguments={"alpha": alpha, "g": g})
    assert all(torch.isfinite(torch.tensor(e)) for e in result.errors.values()), result.errors
    assert result.ok, result.errors


def test_forward_saves_no_per_token_state():
    """The kernels save activations O(T (K + V + C)) (inputs, cumulated gates, the intra-chunk
    scores of a per-channel gate: C = 64 per token): nothing of size T*K*V or T^2 (the
    PyTorch chunk path is an oracle and may)."""
    op = attnc.load("gla")
    B, T, H, K, V = 1, 512, 1, 32, 32
    gen = torch.Generator().manual_seed(0)
    args = {n: torch.randn(B, T, H, K if n != "v" else V, generator=gen).requires_grad_()
            for n in ("q", "k", "v", "g")}
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        o, _ = op(**args, backend="triton")
    assert sizes and max(sizes) <= B * T * H * max(K, V, 64), sorted(sizes)[-5:]
    assert max(sizes) < B * T * H * K * V / 8 and max(sizes) < T * T / 4


def test_bad_arguments_raise_value_errors():
    op = attnc.load("gla")
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="v: expected shape"):
        op(q=q, k=q, v=torch.randn(1, 8, 2), g=q)
    with pytest.raises(ValueError, match="chunk_size"):
        op(q=q, k=q, v=q, g=q, chunk_size=48)
    with pytest.raises(ValueError, match="cu_seqlens"):
        op(q=q[:1], k=q, v=q, g=q, cu_seqlens=torch.tensor([0, 5, 3, 8]))


ZOO = """
attention zoo
  dims    K, V
  inputs  q[K], k[K], v[V], g[K], b
  weight  w[K], c
  param   eps = 0.5

  feature q = l2norm(silu(q)) * tanh(b) + abs(q) * c
  feature k = softplus(k) / sqrt(sum(k * k) + 1) + relu(k) - elu(-k)
  feature v = v * rsqrt(exp(b) + eps)
  gate    a = exp(logsigmoid(g) * sigmoid(b) + log(sigmoid(w)))
  state   S[K, V]
  decay   S = diag(a) @ S
  update  S = S + outer(k, v)
  readout o = (q @ S) * sigmoid(b) + v * (q @ k) ** 2
end
"""


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_every_elementwise_function_differentiates(backend):
    """The prologue/epilogue backward is generated from sympy derivatives: every
    function of the language, reductions included, must give the reference's grads."""
    op = attnc.compile(ZOO)
    source = op.plan_source()
    assert "def prologue_backward" in source and "torch.sigmoid(-g)" in source
    result = verify(op, B=1, T=40, H=2, K=16, V=16, backend=backend)
    assert result.ok, result.errors
    assert {"dq", "dk", "dv", "dg", "db", "dw", "dc"} <= set(result.errors)


@pytest.mark.parametrize("name", ["gla", "gated_deltanet", "mamba1"])
def test_varlen_calls_read_cu_seqlens_once_per_tensor(name, monkeypatch):
    """Reading cu_seqlens is a host sync: bind's checks and each kernel module's chunk
    layout read a given tensor once, so a training step's later calls (backward, other
    layers) read nothing. An in-place change is seen: new boundaries are read, used, and
    checked."""
    import warnings

    from attnc.runtime.sampling import random_arguments
    from attnc.runtime.verify import rel_rms

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # mamba1 has no chunk form
        op = attnc.load(name)
    gen = torch.Generator().manual_seed(0)
    args = random_arguments(op.analysis, B=1, T=40, H=2, dims={"K": 16, "V": 16}, generator=gen)
    cu = torch.tensor([0, 15, 40], dtype=torch.int32)
    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(self.shape) or tolist(self))

    def run():
        leaves = {n: x.detach().clone().requires_grad_() for n, x in args.items()}
        out, _ = op(**leaves, cu_seqlens=cu, backend="triton")
        out.float().sum().backward()
        return out.detach(), [leaves[n].grad for n in args]

    first_out, first_grads = run()
    first_reads = len(reads)
    assert first_reads >= 2, reads   # bind's check and the kernels' layout
    second_out, second_grads = run()
    assert len(reads) == first_reads, f"cu_seqlens read again: {reads[first_reads:]}"
    assert torch.equal(first_out, second_out)
    assert all(torch.equal(a, b) for a, b in zip(first_grads, second_grads))

    cu[1] = 25   # in place: the next call reads and uses the new boundaries
    out, _ = op(**args, cu_seqlens=cu, backend="triton")
    assert len(reads) > first_reads
    want, _ = op.reference(**{n: x.double() for n, x in args.items()}, cu_seqlens=cu)
    assert rel_rms(out.double(), want) < 1e-4
    cu[1] = 50   # and checks them
    with pytest.raises(ValueError, match="cu_seqlens"):
        op(**args, cu_seqlens=cu, backend="triton")


RESIDUALS = """
attention residuals
  dims    K, V
  inputs  q[K], k[K], v[V], u[V], z[K]
  weight  w[V], d
  param   p = 0.5
  state   S[K, V]
  update  S = S + outer(k, v)
  readout o = q @ S + (w * d * p) * u
  readout r = k @ S * 2 + sum(q * z) * v
end
"""


def test_a_readout_term_c_times_u_folds_into_the_kernel():
    """`o = q @ S + c * u`, c of weights and params: the chunk call adds it as it stores o and
    the epilogue only hands o through. A term whose factor varies per token (r's sum(q * z))
    stays in the epilogue, and r's own factor 2 with it. Both outputs verified."""
    from attnc.codegen.plan import plan_chunks

    op = attnc.compile(RESIDUALS)
    calls = {c.readout: c for c in plan_chunks(op.analysis).calls}
    folded = [c for c in calls.values() if c.residual]
    assert [(c.residual, str(c.residual_scale)) for c in folded] == [("u", "d*p*w")], calls
    combinators = dict(plan_chunks(op.analysis).combinators)
    assert str(combinators["o"]) == folded[0].readout
    assert not calls["_read1"].direct and calls["_read1"].residual is None
    assert str(combinators["r"]) == "2*_read1 + v*vsum(q*z)"
    for backend in ("torch", "triton"):
        result = verify(op, backend=backend, T=40, K=16, V=32, H=2)
        assert result.ok, (backend, result.errors)


KEY_FACTORS = """
attention key_factors
  dims    K, V
  inputs  q[K], k[K], v[V], b, g
  weight  w
  state   S[K, V]
  state   R[K, V]
  decay   S = exp(-softplus(g)) * S
  update  S = S + outer(k * sigmoid(b) * w, v)
  update  R = R + outer(k * w, v)
  readout o = q @ S + q @ R
end
"""


def test_a_per_token_factor_of_the_key_goes_to_the_kernels():
    """`outer(k * s, v)` with s a per-token scalar (made of scalar inputs, weights and
    params): the chunk call's key is k and the kernels multiply by s. A factor of weights
    alone is not per token and stays in the prologue's key. Values and all gradients
    verified on both backends."""
    from attnc.codegen.plan import plan_chunks

    op = attnc.compile(KEY_FACTORS)
    calls = {c.state: c for c in plan_chunks(op.analysis).calls}
    assert (str(calls["S"].key), str(calls["S"].key_scale)) == ("k", "w*sigmoid(b)")
    assert calls["R"].key_scale is None and str(calls["R"].key) == "k*w"
    # S's key factor is made of scalar inputs and a weight, like its log gate: the call passes
    # b, g and w, and the kernels compute both (tests/test_scalar_maps.py)
    assert calls["S"].scalar_inputs == ("b", "g", "w")
    source = op.plan_source()
    assert "scalar_map=KEY_FACTORS_S_0_SCALAR_MAP" in source and "key_scale=per_token" not in source
    for backend in ("torch", "triton"):
        result = verify(op, backend=backend, T=70, K=16, V=32, H=2)
        assert result.ok, (backend, result.errors)


def test_mamba2_adds_d_times_x_in_the_chunk_kernel():
    from attnc.codegen.plan import plan_chunks

    op = attnc.load("mamba2")
    (call,) = plan_chunks(op.analysis).calls
    assert (call.residual, str(call.residual_scale), call.direct) == ("x", "D", True)
    # and B * delta is the key B with the per-token factor delta, applied by the kernels
    assert (str(call.key), str(call.key_scale)) == ("B", "softplus(dt + dt_bias)")
    # x is the value operand too: the plan passes one tensor as both, and the dv kernel adds
    # D * do into dv (no pass of its own over the gradients)
    source = op.plan_source()
    assert "residual=value," in source and "value = per_token(values[\"x\"], shape)" in source
    for fused in (0, 1):  # both forward forms add it
        result = verify(op, backend="triton", T=70, K=32, V=32, dtype=torch.bfloat16,
                        config={"fused_forward": fused})
        assert result.ok, (fused, result.errors)
