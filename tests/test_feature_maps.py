"""Feature maps the diagonal chunk kernels apply themselves: a query or key f(u), f
elementwise and u one vector input (linear_attn's elu(q) + 1), goes to the chunk call as
u with an InputMap; the kernels compute f(u) as they load u and multiply dq / dk by f'(u)
as they store them, so no prologue pass writes f(u) or reads its gradient.

Values, final states and every gradient against the fp64 recurrence, on both forward
forms, with a scalar gate (the straddling gate gradient reads q . dq and k . dk of the
mapped operands), a readout of the previous state, varlen batches, and a K that is not a
power of two (f(0) = 1 for elu + 1: padded channels must stay zero).

Beside a per-channel gate the maps reach every form its kernels load q and k in: the
scores kernel's whole chunks and sub-chunks (factored and exact diagonal sub-blocks, both
loops), the decayed copies it stores for the forward's later kernels, the dq / dk
kernel's sub-chunk helpers. hgrn2's key 1 - sigmoid(f) and log gate logsigmoid(f) map one
input: its gate-gradient kernel adds the key's gradient, so no pass adds the two.
"""
import pytest
import torch

import attnc
from attnc.codegen.chunk_diag import DiagKernelSpec
from attnc.codegen.emit_torch import elementwise_parts
from attnc.codegen.plan import plan_chunks
from attnc.runtime.chunk_diag_op import InputMap, chunk_diag
from attnc.runtime.verify import verify

GATED = """
attention feature_gated
  dims    K, V
  inputs  q[K], k[K], v[V], g
  param   scale = K ** -0.5

  feature q = sigmoid(q) * scale
  feature k = softplus(k)
  gate    a = sigmoid(g)
  state   S[K, V]
  decay   S = a * S
  update  S = S + outer(k, v)
  readout o = q @ S
end
"""

# only the query is mapped; the readout reads the state before the update
EXCLUSIVE = """
attention feature_exclusive
  dims    K, V
  inputs  q[K], k[K], v[V]

  feature q = elu(q) + 1
  state   S[K, V]
  readout o = q @ S
  update  S = S + outer(k, v)
end
"""

# a per-channel gate beside a mapped query and key, each of its own input
CHANNEL = """
attention feature_channel
  dims    K, V
  inputs  q[K], k[K], v[V], g[K]

  feature q = elu(q) + 1
  feature k = softplus(k)
  gate    a = sigmoid(g)
  state   S[K, V]
  decay   S = diag(a) @ S
  update  S = S + outer(k, v)
  readout o = q @ S
end
"""

# a per-channel gate, the query mapped, the readout before the update
CHANNEL_EXCLUSIVE = """
attention feature_channel_exclusive
  dims    K, V
  inputs  q[K], k[K], v[V], w[K]

  feature q = sigmoid(q)
  gate    a = exp(-exp(w))
  state   S[K, V]
  readout o = q @ S
  decay   S = diag(a) @ S
  update  S = S + outer(k, v)
end
"""

SPECS = {"gated": GATED, "exclusive": EXCLUSIVE, "channel": CHANNEL, "channel_exclusive": CHANNEL_EXCLUSIVE}


def _op(name):
    return attnc.compile(SPECS[name]) if name in SPECS else attnc.load(name)


@pytest.mark.parametrize("name, query, key, scale, computed", [
    ("linear_attn", "q", "k", "scale", []),
    ("gated", "q", "k", "scale", []),   # logsigmoid(g): the cumsum kernel's (tests/test_scalar_maps.py)
    ("exclusive", "q", None, "1", []),
    ("hgrn2", None, "f", "1", []),      # key 1 - sigmoid(f), beside the gate logsigmoid(f)
    ("channel", "q", "k", "1", []),
    ("channel_exclusive", "q", None, "1", []),
])
def test_feature_maps_go_to_the_chunk_kernels(name, query, key, scale, computed):
    """The plan passes the raw inputs with their maps (a param factor of the query joins the
    output's scale), its prologue computes neither (none is generated where nothing else
    needs one), and the kernels hold f and f'."""
    op = _op(name)
    (call,) = plan_chunks(op.analysis).calls
    assert (call.query_input, call.key_input, str(call.scale)) == (query, key, scale)
    assert elementwise_parts(plan_chunks(op.analysis)).prologue.output_names == computed
    sources = op.sources()
    plan, kernels = sources[f"{op.name}_plan.py"], sources[f"{op.name}_S_kernels.py"]
    assert (f"{op.name}_prologue.py" in sources) == bool(computed)
    assert (f"query_map={op.name.upper()}_S_QUERY_MAP" in plan) == (query is not None)
    assert ("key_map=" in plan) == (key is not None)
    for role, mapped in (("query", call.query_map()), ("key", call.key_map())):
        assert (f"def _{role}_feature(x):" in kernels) == (mapped is not None)
        if mapped is not None:
            code, derivative, _ = mapped
            assert f"return {code}\n" in kernels and f"return {derivative}\n" in kernels


@pytest.mark.parametrize("name, reason", [
    ("mamba2", "key B * delta: a per-token key scale"),
    ("retnet", "q and k are inputs as they are"),
])
def test_operands_that_stay_with_the_prologue_or_as_given(name, reason):
    (call,) = plan_chunks(attnc.load(name).analysis).calls
    assert call.query_map() is None and call.key_map() is None, reason


@pytest.mark.parametrize("name", ["linear_attn", "gated", "exclusive"])
@pytest.mark.parametrize("fused", [0, 1])
def test_mapped_operands_match_the_recurrence(name, fused):
    result = verify(_op(name), backend="triton", B=2, T=37, H=2, K=16, V=32,
                    config={"fused_forward": fused})
    assert result.ok, result.errors


@pytest.mark.parametrize("name", ["linear_attn", "gated"])
def test_mapped_operands_with_padded_channels_and_varlen(name):
    """K = 24 runs in 32-channel blocks: the feature of a padded (zero) channel is 1 for
    elu + 1 and log 2 for softplus, and must not reach a dot. Varlen: sequences that end
    inside a chunk."""
    op = _op(name)
    assert verify(op, backend="triton", H=2, K=24, V=16, seqlens=[19, 45, 7]).ok
    result = verify(op, backend="triton", B=1, T=29, H=2, K=24, V=16)
    assert result.ok, result.errors


def test_mapped_operands_in_bf16():
    result = verify(attnc.load("linear_attn"), backend="triton", B=1, T=64, H=2, K=32, V=32,
                    dtype=torch.bfloat16)
    assert result.ok, result.errors


@pytest.mark.parametrize("name", ["linear_attn", "exclusive"])
def test_the_torch_backend_applies_the_maps(name):
    result = verify(_op(name), backend="torch", B=1, T=40, H=2, K=16, V=16)
    assert result.ok, result.errors


ELU1 = InputMap("1.0 + _elu(x)", "tl.where(x > 0.0, 1.0, tl.exp(x))", lambda x: torch.nn.functional.elu(x) + 1)


def test_maps_are_refused_where_the_kernels_do_not_apply_them():
    q, k, v = (torch.randn(1, 16, 1, 16) for _ in range(3))
    with pytest.raises(ValueError, match="query_map and key_map are not taken with a V-side gate"):
        chunk_diag(q, k, v, gv=-torch.rand(1, 16, 1, 16), exclusive=False, output_final_state=False,
                   query_map=ELU1)
    with pytest.raises(ValueError, match="key_map and key_scale together"):
        chunk_diag(q, k, v, exclusive=False, output_final_state=False, key_map=ELU1,
                   key_scale=torch.rand(1, 16, 1))
    with pytest.raises(ValueError, match="query_map and .query_map_grad"):
        DiagKernelSpec("f", query_map="_elu(x)")
    with pytest.raises(ValueError, match="key_map is not taken with a V-side gate"):
        DiagKernelSpec("f", gate="channel", vgate=True, key_map="_elu(x)", key_map_grad="1.0")
    # beside a per-channel gate they are taken
    assert DiagKernelSpec("f", gate="channel", key_map="_elu(x)", key_map_grad="1.0").key_map == "_elu(x)"


# the configs that send a per-channel gate's chunks through each path: whole chunks (the
# default where spans allow), sub-chunks with factored diagonal sub-blocks, exact ones 8
# columns at a time, and the two-pass forward; exact sub-blocks one column at a time (the
# interpreter's slowest path, ~9 s a spec) on the spec that maps both q and k
CHANNEL_PATHS = {"whole": {}, "factored": {"whole_chunk": 0}, "exact-columns": {"exact_diag": 1, "diag_loop": 0},
                 "two-pass": {"fused_forward": 0}}
CHANNEL_CASES = [pytest.param(name, config, id=f"{path}-{name}") for path, config in CHANNEL_PATHS.items()
                 for name in ("hgrn2", "channel", "channel_exclusive")]
CHANNEL_CASES.append(pytest.param("channel", {"exact_diag": 1, "diag_loop": 1}, id="exact-loop-channel"))


@pytest.mark.parametrize("name, config", CHANNEL_CASES)
def test_mapped_operands_beside_a_per_channel_gate(name, config):
    result = verify(_op(name), backend="triton", B=2, T=37, H=2, K=16, V=32, config=config)
    assert result.ok, result.errors


@pytest.mark.parametrize("name", ["hgrn2", "channel"])
def test_mapped_operands_beside_a_per_channel_gate_padded_and_varlen(name):
    """K = 24: sigmoid / softplus of a padded channel are 1/2 and log 2 (not 0), and must
    reach neither a dot nor the decayed copies."""
    op = _op(name)
    result = verify(op, backend="triton", H=2, K=24, V=16, seqlens=[19, 45, 7], config={"whole_chunk": 0})
    assert result.ok, result.errors
    result = verify(op, backend="triton", B=1, T=29, H=2, K=24, V=16)
    assert result.ok, result.errors


def test_mapped_key_and_gate_in_bf16():
    result = verify(attnc.load("hgrn2"), backend="triton", B=1, T=64, H=2, K=32, V=32, dtype=torch.bfloat16)
    assert result.ok, result.errors


def test_one_raw_input_for_key_and_gate_gets_one_gradient_pass():
    """hgrn2: no prologue, and the backward's gate-gradient kernel adds f's two gradients
    (a PyTorch add of two [B, T, H, K] tensors before)."""
    from attnc.runtime.launches import record

    op = attnc.load("hgrn2")
    trace = record(op, B=1, T=64, H=2, dims={"K": 32, "V": 32}, step=False)
    names = [launch.name for launch in trace.launches()]
    assert not [n for n in names if "prologue" in n], names
    assert [n for n in names if n.endswith("_gate_grad")] == ["hgrn2_S_gate_grad"]
    # (aten.full: the test run's NaN poisoning of fresh buffers)
    passes = [op.name for op in trace.torch_ops("backward") if op.name != "aten.full"]
    assert passes == [], passes


def test_key_into_gate_needs_one_mapped_input():
    from attnc.runtime.chunk_diag_op import MODULES, kernel_spec

    q, k, v = (torch.randn(1, 16, 1, 16) for _ in range(3))
    g = -torch.rand(1, 16, 1, 16)
    module = MODULES.get(kernel_spec(q, g, None, False))
    with pytest.raises(ValueError, match="key_into_gate"):
        module.backward(q, k, v, g, None, None, None, torch.randn(1, 16, 1, 16), None, key_into_gate=True)
