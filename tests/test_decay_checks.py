"""The decay check inside the cumsum kernels. The chunk forms assume decaying states (every
log gate <= 0, CHUNKFORMS.md); a log gate the analysis cannot prove <= 0 (gated_deltanet's
alpha, kda's g, retnet's log_gamma) is checked on each chunked call. On the "triton"
backend the kernel that cumulates the gate checks it as it loads it and clears a flag,
which one assert reads after it (runtime/kernels.py DecayCheck): no reduction over the
gate (kda's is [B, T, H, K] fp32) and no comparison pass. Off the GPU the assert fails at
once, and the op then finds where the gate grows (tests/test_binding.py checks the message).
"""
import pytest
import torch

import attnc
from attnc.runtime.chunk_delta_op import chunk_delta
from attnc.runtime.chunk_diag_op import chunk_diag
from attnc.runtime.kernels import DecayError, decay_check
from attnc.runtime.launches import record
from attnc.runtime.sampling import random_arguments
from test_scalar_maps import MAP

CHANNEL = """
attention channel_log_gate
  dims    K, V
  inputs  q[K], k[K], v[V], g[K]

  gate    a = exp(g)
  state   S[K, V]
  decay   S = diag(a) @ S
  update  S = S + outer(k, v)
  readout o = q @ S
end
"""


@pytest.mark.parametrize("name", ["gated_deltanet", "kda", "retnet"])
def test_the_cumsum_kernels_check_the_gates(name, monkeypatch):
    """The forward makes no PyTorch pass over the gate; its cumsum kernel takes the flag."""
    monkeypatch.setenv("ATTNC_POISON", "0")
    op = attnc.load(name)
    in_kernels, in_torch = op._decays_by_checker
    assert [state for state, _ in in_kernels] == ["S"] and in_torch == ()
    trace = record(op, B=1, T=64, H=2, dims={"K": 32, "V": 32}, backward=False, step=False)
    assert not [t.name for t in trace.torch_ops("forward") if t.name in ("aten.amax", "aten.le")]
    (cumsum,) = [k for k in trace.launches("forward") if k.name.endswith("_gate_cumsum")]
    assert cumsum.arguments["CHECK_DECAYS"] and cumsum.arguments["decay_flag"].shape == (1,)
    monkeypatch.setenv("ATTNC_CHECK_DECAYS", "0")
    trace = record(op, B=1, T=64, H=2, dims={"K": 32, "V": 32}, backward=False, step=False)
    (cumsum,) = [k for k in trace.launches("forward") if k.name.endswith("_gate_cumsum")]
    assert not cumsum.arguments["CHECK_DECAYS"] and cumsum.arguments["decay_flag"] is None


def test_a_per_channel_diagonal_gate_is_checked_by_pytorch():
    """A diagonal per-channel gate is cumulated inside the scores kernel, which does not
    check: the op reduces it, and finds a growing one by name and place."""
    op = attnc.compile(CHANNEL)
    assert op._decays_by_checker[0] == () and [d[1].name for d in op._decays_by_checker[1]] == ["g"]
    args = random_arguments(op.analysis, B=1, T=20, H=2, dims={"K": 16, "V": 16})
    args["g"] = -args["g"].abs()
    op(**args, backend="triton")
    args["g"][0, 7, 1, 3] = 0.25
    with pytest.raises(ValueError, match=r"g = 0\.25 at index \[0, 7, 1, 3\]"):
        op(**args, backend="triton")


def _flag_ready():
    return int(decay_check(torch.device("cpu"), "m").flag) == 1


@pytest.mark.parametrize("gate", ["scalar", "channel"])
def test_the_delta_kernels_find_a_growing_gate(gate):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 40, 2, 16) for _ in range(3))
    k = torch.nn.functional.normalize(k, dim=-1)
    beta = torch.rand(1, 40, 2)
    g = -torch.rand(1, 40, 2, *((16,) if gate == "channel" else ()))
    check = decay_check(torch.device("cpu"), "the gate grows")
    call = dict(output_final_state=False, name="decay_check_test", decay_check=check)
    chunk_delta(q, k, v, beta, g, **call)  # decays: fine
    for bad in (0.5, float("nan")):
        grown = g.clone()
        grown[0, 33, 1] = bad
        with pytest.raises(DecayError, match="the gate grows"):
            chunk_delta(q, k, v, beta, grown, **call)
        assert _flag_ready()  # set again for the next call
    with pytest.raises(DecayError, match="the gate grows"):
        chunk_delta(q, k, v, beta, g.abs(), **{**call, "backend": "torch"})
    with pytest.raises(ValueError, match="no log gate"):
        chunk_delta(q, k, v, beta, **call)


def test_the_diagonal_kernels_find_a_growing_scalar_gate():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 40, 2, 16) for _ in range(3))
    g = -torch.rand(1, 40, 2)
    check = decay_check(torch.device("cpu"), "the gate grows")
    call = dict(exclusive=False, output_final_state=False, decay_check=check)
    chunk_diag(q, k, v, g, **call)
    grown = g.clone()
    grown[0, 39, 0] = 1e-3   # the last token of the last chunk
    with pytest.raises(DecayError, match="the gate grows"):
        chunk_diag(q, k, v, grown, **call)
    assert _flag_ready()
    # a scalar map's gate, computed by the kernel: -exp(w) softplus(u) grows where exp(w) < 0
    # cannot happen, so make u NaN
    u, w = torch.randn(1, 40, 2), torch.randn(2)
    chunk_diag(q, k, v, name="scalar_map_test", scalar_map=MAP, scalar_inputs=(u, w), **call)
    u[0, 3, 1] = float("nan")
    with pytest.raises(DecayError, match="the gate grows"):
        chunk_diag(q, k, v, name="scalar_map_test", scalar_map=MAP, scalar_inputs=(u, w), **call)
    with pytest.raises(ValueError, match="only a scalar K-side gate"):
        chunk_diag(q, k, v, -torch.rand(1, 40, 2, 16), **call)


def test_a_growing_gate_under_padding_and_varlen_is_found_only_where_real():
    """Tokens past a sequence's end are masked: gates there are never read."""
    op = attnc.load("gated_deltanet")
    args = random_arguments(op.analysis, B=1, T=50, H=2, dims={"K": 16, "V": 16})
    cu = torch.tensor([0, 20, 50])
    op(**args, cu_seqlens=cu, backend="triton")
    args["alpha"][0, 20, 0] = 0.1  # the first token of the second sequence
    with pytest.raises(ValueError, match=r"alpha = 0\.1 at index \[0, 20, 0, 0\]"):
        op(**args, cu_seqlens=cu, backend="triton")
    assert _flag_ready()


HALVED = """
attention halved_gate
  dims    K, V
  inputs  q[K], k[K], v[V], alpha, beta

  gate    a = exp(alpha / 2)
  state   S[K, V]
  decay   S = a * S
  update  S = S + beta * outer(k, v - k @ S)
  readout o = q @ S
end
"""


def test_the_torch_function_of_a_kernel_checked_gate_is_made_only_for_an_error():
    """Where the kernels check a gate, its PyTorch function (a sympy lambdify, 1.4 s the
    first time in a process) is made only to say where a growing gate is; a NaN is named too."""
    from attnc.runtime.op import _torch_function

    op = attnc.compile(HALVED)
    args = random_arguments(op.analysis, B=1, T=30, H=2, dims={"K": 16, "V": 16})
    args["alpha"] = -args["alpha"].abs()
    made = _torch_function.cache_info().currsize
    op(**args, backend="triton")
    assert _torch_function.cache_info().currsize == made
    args["alpha"][0, 11, 0] = float("nan")
    with pytest.raises(ValueError, match=r"alpha/2 = nan at index \[0, 11, 0, 0\]"):
        op(**args, backend="triton")
    assert _torch_function.cache_info().currsize == made + 1
