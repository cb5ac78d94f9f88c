"""Argument binding: what a call binds, and every way a call can be wrong.

Each error must name the argument, the expected shape spelled with dim names and
numbers, and what was passed.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from attnc.dsl.parser import parse, parse_file
from attnc.runtime.binding import bind, expand_heads

SPEC_DIR = Path(__file__).resolve().parent.parent / "specs"
B, T, H, K, V = 2, 17, 4, 32, 64

NORMALIZED = """
attention normalized
  dims    K, V
  inputs  q[K], k[K], v[V]
  state   S[K, V], z[K]
  update  S = S + outer(k, v)
  update  z = z + k
  readout o = (q @ S) / (q @ z + 1)
end
"""


def load(name: str):
    return parse_file(SPEC_DIR / f"{name}.attn")


@pytest.fixture
def gdn():
    return load("gated_deltanet")


def gdn_args(batch=B, length=T, heads=H, **overrides):
    args = {
        "q": torch.randn(batch, length, heads, K),
        "k": torch.randn(batch, length, heads, K),
        "v": torch.randn(batch, length, heads, V),
        "alpha": torch.randn(batch, length, heads),
        "beta": torch.rand(batch, length, heads),
    }
    args.update(overrides)
    return args


def mamba2_args(heads=H, **overrides):
    args = {
        "C": torch.randn(B, T, heads, K),
        "B": torch.randn(B, T, heads, K),
        "x": torch.randn(B, T, heads, V),
        "dt": torch.randn(B, T, heads),
        "A_log": torch.randn(heads),
        "dt_bias": torch.randn(heads),
        "D": torch.randn(heads),
    }
    args.update(overrides)
    return args


def raises(*fragments: str):
    """pytest.raises(ValueError) whose message contains every fragment, verbatim."""
    return pytest.raises(ValueError, match="(?s)" + "".join(f"(?=.*{re.escape(f)})" for f in fragments))


# ---------------------------------------------------------------- what gets bound
def test_binds_dims_heads_and_param_defaults(gdn):
    args = gdn_args()
    bound = bind(gdn, args)
    assert dict(bound.dims) == {"K": K, "V": V}
    assert (bound.B, bound.T, bound.H, bound.N) == (B, T, H, B)
    assert bound.params["scale"] == pytest.approx(K**-0.5)
    assert bound.inputs["q"] is args["q"]
    assert list(bound.inputs) == ["q", "k", "v", "alpha", "beta"]
    assert bound.initial_states is None and bound.cu_seqlens is None


def test_param_override(gdn):
    assert bind(gdn, gdn_args(scale=0.5)).params["scale"] == 0.5
    assert bind(gdn, gdn_args(scale=torch.tensor(0.25))).params["scale"] == 0.25


def test_param_must_be_a_number(gdn):
    with raises("scale", "number", "[4]"):
        bind(gdn, gdn_args(scale=torch.ones(4)))


def test_weights_are_bound_per_head():
    spec = load("mamba2")
    bound = bind(spec, mamba2_args())
    assert set(bound.weights) == {"A_log", "dt_bias", "D"}
    assert bound.H == H


def test_shared_heads(gdn):
    args = gdn_args(q=torch.randn(B, T, 2, K), k=torch.randn(B, T, 1, K))
    bound = bind(gdn, args)
    assert bound.H == H
    assert bound.heads("q") == 2 and bound.heads("k") == 1
    expanded = expand_heads(args["q"], H)
    assert expanded.shape == (B, T, H, K)
    for head in range(H):
        assert torch.equal(expanded[:, :, head], args["q"][:, :, head // 2])


def test_expand_heads_rejects_uneven_groups():
    with raises("3", "H = 4"):
        expand_heads(torch.randn(1, 2, 3, 5), 4)


def test_varlen_binds_sequence_count(gdn):
    cu = torch.tensor([0, 4, 9, T], dtype=torch.int32)
    bound = bind(gdn, gdn_args(batch=1), cu_seqlens=cu, initial_state=torch.randn(3, H, K, V))
    assert bound.N == 3
    assert bound.cu_seqlens.dtype == torch.int64
    assert bound.cu_seqlens.tolist() == [0, 4, 9, T]


# ---------------------------------------------------------------- names
def test_missing_argument(gdn):
    args = gdn_args()
    del args["beta"]
    with raises("missing", "beta", "q[K], k[K], v[V], alpha, beta", "scale"):
        bind(gdn, args)


def test_missing_weight():
    args = mamba2_args()
    del args["D"]
    with raises("missing", "D", "weights A_log, dt_bias, D"):
        bind(load("mamba2"), args)


def test_unknown_argument(gdn):
    with raises("unknown", "gamma", "q[K], k[K], v[V], alpha, beta"):
        bind(gdn, gdn_args(gamma=torch.randn(B, T, H)))


# ---------------------------------------------------------------- shapes
def test_dim_bound_inconsistently(gdn):
    args = gdn_args(k=torch.randn(B, T, H, 16))
    with raises("k: expected shape [B, T, H, K] = [2, 17, 4, 32] (K bound by q), got [2, 17, 4, 16]"):
        bind(gdn, args)


def test_length_bound_inconsistently(gdn):
    with raises("v: expected shape [B, T, H, V] = [2, 17, 4, 64] (T bound by q), got [2, 16, 4, 64]"):
        bind(gdn, gdn_args(v=torch.randn(B, 16, H, V)))


def test_batch_bound_inconsistently(gdn):
    with raises("alpha: expected shape [B, T, H] = [2, 17, 4] (B bound by q), got [3, 17, 4]"):
        bind(gdn, gdn_args(alpha=torch.randn(3, T, H)))


def test_wrong_rank(gdn):
    with raises("q: expected shape [B, T, H, K]", "got [2, 17, 4]"):
        bind(gdn, gdn_args(q=torch.randn(B, T, H)))
    with raises("beta: expected shape [B, T, H]", "got [2, 17, 4, 1]"):
        bind(gdn, gdn_args(beta=torch.rand(B, T, H, 1)))


def test_head_count_must_divide(gdn):
    with raises("k: expected shape [B, T, H, K] = [2, 17, 4, 32]", "got [2, 17, 3, 32]", "divide"):
        bind(gdn, gdn_args(k=torch.randn(B, T, 3, K)))


def test_empty_batch_or_length(gdn):
    with raises("q: expected shape [B, T, H, K]", "T >= 1", "got [2, 0, 4, 32]"):
        bind(gdn, gdn_args(length=0))


def test_weight_head_count():
    with raises("A_log: expected shape [H] = [4] (H bound by C), got [5]"):
        bind(load("mamba2"), mamba2_args(A_log=torch.randn(5)))


def test_weight_dim_bound_inconsistently():
    spec = load("rwkv6")
    args = {
        "r": torch.randn(B, T, H, K),
        "k": torch.randn(B, T, H, K),
        "v": torch.randn(B, T, H, V),
        "w": torch.randn(B, T, H, K),
        "u": torch.randn(H, 16),
    }
    with raises("u: expected shape [H, K] = [4, 32] (K bound by r), got [4, 16]"):
        bind(spec, args)


SQUARE_WEIGHT = """
attention square
  dims    K, V
  inputs  q[K], k[K], v[V]
  weight  W[K, K]
  state   S[K, V]
  update  S = S + outer(W @ k, v)
  readout o = q @ S
end
"""


def test_a_dim_named_twice_in_one_shape_has_one_size():
    spec = parse(SQUARE_WEIGHT)
    args = {"q": torch.randn(B, T, H, K), "k": torch.randn(B, T, H, K), "v": torch.randn(B, T, H, V)}
    assert bind(spec, {**args, "W": torch.randn(H, K, K)}).dims["K"] == K
    with raises("W: expected shape [H, K, K] = [4, 32, 32] (K bound by q), got [4, 32, 16]"):
        bind(spec, {**args, "W": torch.randn(H, K, 16)})


def test_the_first_input_binds_a_dim_named_twice_in_its_shape():
    spec = parse(SQUARE_WEIGHT.replace("inputs  q[K], k[K], v[V]\n  weight  W[K, K]",
                                       "inputs  W[K, K], q[K], k[K], v[V]"))
    args = {"q": torch.randn(B, T, H, K), "k": torch.randn(B, T, H, K), "v": torch.randn(B, T, H, V)}
    with raises("W: expected shape [B, T, H, K, K] = [2, 17, 4, 32, 32] (K bound by W), got [2, 17, 4, 32, 16]"):
        bind(spec, {**args, "W": torch.randn(B, T, H, K, 16)})


# ---------------------------------------------------------------- repeated calls
def test_a_repeated_signature_binds_the_new_tensors(gdn):
    first, second = gdn_args(), gdn_args()
    bind(gdn, first)
    bound = bind(gdn, second)
    assert all(bound.inputs[n] is second[n] for n in second)
    assert (bound.B, bound.T, bound.H, dict(bound.dims)) == (B, T, H, {"K": K, "V": V})
    assert bound.params["scale"] == pytest.approx(K ** -0.5)


def test_a_repeated_signature_still_checks_what_changed(gdn):
    bind(gdn, gdn_args())
    with raises("k: expected shape [B, T, H, K] = [2, 17, 4, 32] (K bound by q), got [2, 17, 4, 16]"):
        bind(gdn, gdn_args(k=torch.randn(B, T, H, 16)))
    with raises("q", "floating", "torch.int64"):
        bind(gdn, gdn_args(q=torch.randint(0, 5, (B, T, H, K))))
    with raises("missing argument(s) beta"):
        bind(gdn, {n: t for n, t in gdn_args().items() if n != "beta"})


def test_param_values_are_never_taken_from_an_earlier_call(gdn):
    for scale in (0.5, 0.25, -0.0, 0.0, 2, torch.tensor(3.0), torch.tensor(4.0)):
        bound = bind(gdn, gdn_args(scale=scale))
        assert bound.params["scale"] == float(scale)
        assert str(bound.params["scale"]) == str(float(scale))  # -0.0 stays -0.0
    assert bind(gdn, gdn_args()).params["scale"] == pytest.approx(K ** -0.5)


def test_initial_states_are_rebound_each_call(gdn):
    for _ in range(2):
        h0 = torch.randn(B, H, K, V)
        assert bind(gdn, gdn_args(), initial_state=h0).initial_states[0] is h0
    with raises("initial_state: expected shape [N, H, K, V] = [2, 4, 32, 64] (V bound by v), got [2, 4, 32, 8]"):
        bind(gdn, gdn_args(), initial_state=torch.randn(B, H, K, 8))


# ---------------------------------------------------------------- dtypes and devices
def test_integer_tensor(gdn):
    with raises("q", "floating", "torch.int64", "[B, T, H, K]", "[2, 17, 4, 32]"):
        bind(gdn, gdn_args(q=torch.randint(0, 5, (B, T, H, K))))


def test_not_a_tensor(gdn):
    with raises("v", "torch.Tensor", "[B, T, H, V]", "list"):
        bind(gdn, gdn_args(v=[1.0, 2.0]))


def test_low_precision_dtypes_accepted(gdn):
    args = {n: x.to(dtype) for (n, x), dtype in zip(gdn_args().items(), (torch.bfloat16, torch.float16,
                                                                       torch.float32, torch.float64,
                                                                       torch.bfloat16))}
    assert bind(gdn, args).H == H


def test_tensors_on_different_devices(gdn):
    args = gdn_args(v=torch.randn(B, T, H, V, device="meta"))
    with raises("v", "cpu", "meta", "like q", "[2, 17, 4, 64]"):
        bind(gdn, args)


def test_initial_state_on_another_device(gdn):
    with raises("initial_state", "cpu", "meta"):
        bind(gdn, gdn_args(), initial_state=torch.randn(B, H, K, V, device="meta"))


# ---------------------------------------------------------------- cu_seqlens
def test_cu_seqlens_needs_batch_one(gdn):
    expected = "q: expected shape [B, T, H, K] = [1, 17, 4, 32], got [2, 17, 4, 32]"
    with raises("cu_seqlens", "B == 1", expected):
        bind(gdn, gdn_args(), cu_seqlens=torch.tensor([0, 5, T]))


@pytest.mark.parametrize(
    "bounds",
    [[0, 5, 3, T], [0, 5, 5, T], [1, 5, T], [0, 5, 16], [0, 5, 18], [0]],
    ids=["decreasing", "empty-sequence", "not-from-zero", "short-of-T", "past-T", "one-entry"],
)
def test_cu_seqlens_must_partition_the_sequence(gdn, bounds):
    with raises("cu_seqlens", "strictly increasing", "T = 17", f"[{len(bounds)}]"):
        bind(gdn, gdn_args(batch=1), cu_seqlens=torch.tensor(bounds))


def test_cu_seqlens_values_are_shown(gdn):
    with raises("got [0, 5, 3, 17]"):
        bind(gdn, gdn_args(batch=1), cu_seqlens=torch.tensor([0, 5, 3, T]))


def test_cu_seqlens_must_be_integer(gdn):
    with raises("cu_seqlens", "integer", "torch.float32", "[3]"):
        bind(gdn, gdn_args(batch=1), cu_seqlens=torch.tensor([0.0, 5.0, 17.0]))


def test_cu_seqlens_must_be_one_dimensional(gdn):
    with raises("cu_seqlens", "1-D", "[1, 3]"):
        bind(gdn, gdn_args(batch=1), cu_seqlens=torch.tensor([[0, 5, T]]))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_cu_seqlens_checked_once_and_not_kept_alive(gdn, dtype):
    """A cu_seqlens tensor's boundaries are read once (a host sync), the same int64 tensor is
    handed on each time, and what bind remembers leaves with the tensor."""
    import gc

    from attnc.runtime import binding

    cu = torch.tensor([0, 4, 9, T], dtype=dtype)
    first = bind(gdn, gdn_args(batch=1), cu_seqlens=cu).cu_seqlens
    again = bind(gdn, gdn_args(batch=1), cu_seqlens=cu).cu_seqlens
    assert again is first and first.dtype == torch.int64 and first.tolist() == [0, 4, 9, T]
    assert id(cu) in binding._CHECKED_BOUNDS
    key = id(cu)
    del cu, first, again
    gc.collect()
    assert key not in binding._CHECKED_BOUNDS


def test_cu_seqlens_changed_in_place_is_checked_again(gdn):
    cu = torch.tensor([0, 4, 9, T])
    bind(gdn, gdn_args(batch=1), cu_seqlens=cu)
    cu[2] = 3
    with raises("cu_seqlens", "strictly increasing", "[0, 4, 3, 17]"):
        bind(gdn, gdn_args(batch=1), cu_seqlens=cu)


def test_cu_seqlens_device(gdn):
    with raises("cu_seqlens", "cpu", "meta"):
        bind(gdn, gdn_args(batch=1), cu_seqlens=torch.tensor([0, 5, T], device="meta"))


# ---------------------------------------------------------------- initial states
def test_initial_state_shape(gdn):
    with raises("initial_state: expected shape [N, H, K, V] = [2, 4, 32, 64] (K bound by q), "
                "got [2, 4, 16, 64]"):
        bind(gdn, gdn_args(), initial_state=torch.randn(B, H, 16, V))


def test_initial_state_rank(gdn):
    with raises("initial_state: expected shape [N, H, K, V]", "got [4, 32, 64]"):
        bind(gdn, gdn_args(), initial_state=torch.randn(H, K, V))


def test_initial_state_count_follows_cu_seqlens(gdn):
    cu = torch.tensor([0, 4, 9, T])
    with raises("initial_state: expected shape [N, H, K, V] = [3, 4, 32, 64] (N bound by cu_seqlens), "
                "got [1, 4, 32, 64]"):
        bind(gdn, gdn_args(batch=1), initial_state=torch.randn(1, H, K, V), cu_seqlens=cu)


def test_initial_state_integer(gdn):
    with raises("initial_state", "floating", "torch.int32", "[N, H, K, V]"):
        bind(gdn, gdn_args(), initial_state=torch.zeros(B, H, K, V, dtype=torch.int32))


def test_initial_state_single_state_accepts_a_one_tuple(gdn):
    state = torch.randn(B, H, K, V)
    assert bind(gdn, gdn_args(), initial_state=(state,)).initial_states[0] is state


def test_several_states():
    spec = parse(NORMALIZED)
    args = {"q": torch.randn(B, T, H, K), "k": torch.randn(B, T, H, K), "v": torch.randn(B, T, H, V)}
    S, z = torch.randn(B, H, K, V), torch.randn(B, H, K)
    assert bind(spec, args, initial_state=(S, z)).initial_states == (S, z)
    assert bind(spec, args, initial_state=[None, z]).initial_states == (None, z)


def test_several_states_need_a_tuple():
    spec = parse(NORMALIZED)
    args = {"q": torch.randn(B, T, H, K), "k": torch.randn(B, T, H, K), "v": torch.randn(B, T, H, V)}
    with raises("initial_state", "2 tensors", "S[N, H, K, V], z[N, H, K]", "[2, 4, 32, 64]"):
        bind(spec, args, initial_state=torch.randn(B, H, K, V))
    with raises("initial_state", "2 tensor", "S[N, H, K, V], z[N, H, K]", "3 entries"):
        bind(spec, args, initial_state=(None, None, None))
    with raises("initial_state[z]: expected shape [N, H, K] = [2, 4, 32] (K bound by q), got [2, 4, 64]"):
        bind(spec, args, initial_state=(None, torch.randn(B, H, V)))


# The chunk forms assume decaying states (every log gate <= 0, CHUNKFORMS.md); a growing one
# made them return wrong values without a word (gated_deltanet with alpha > 0: 0.72 relative
# error). Decays sympy proves (logsigmoid, -softplus * exp, -exp) are not checked; raw
# log-gate inputs and params are, on each chunked call.
def test_decays_the_analysis_cannot_prove_are_the_ones_checked():
    import attnc

    unproven = {name: [str(gate) for _, gate, _ in attnc.load(name)._unproven_decays]
                for name in ("gla", "hgrn2", "mamba2", "rwkv6", "deltanet", "gated_deltanet", "kda", "retnet")}
    assert unproven == {"gla": [], "hgrn2": [], "mamba2": [], "rwkv6": [], "deltanet": [],
                        "gated_deltanet": ["alpha"], "kda": ["g"], "retnet": ["log_gamma"]}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_growing_decay_is_refused_by_name_and_place(backend, monkeypatch):
    import attnc
    from attnc.runtime.sampling import random_arguments

    op = attnc.load("gated_deltanet")
    args = random_arguments(op.analysis, B=1, T=40, H=2, dims={"K": 16, "V": 16})
    op(**args, backend=backend)  # log decays: fine
    args["alpha"][0, 5, 1] = 0.3
    with pytest.raises(ValueError, match=re.escape("state `S` decays by exp(alpha) per step, which the chunked "
                                                   "kernels need to be <= 1 (alpha <= 0, a log-space decay), but "
                                                   "alpha = 0.3 at index [0, 5, 1, 0]")):
        op(**args, backend=backend)
    monkeypatch.setenv("ATTNC_CHECK_DECAYS", "0")  # the caller's choice: unchecked
    out, _ = op(**args, backend=backend)
    assert out.shape == args["v"].shape


def test_a_growing_per_head_decay_is_refused():
    import attnc
    from attnc.runtime.sampling import random_arguments

    op = attnc.load("retnet")
    args = random_arguments(op.analysis, B=1, T=20, H=2, dims={"K": 16, "V": 16})
    args["log_gamma"][1] = 0.1  # a weight, per head
    with pytest.raises(ValueError, match=r"log_gamma = 0\.1 at index \[0, 0, 1, 0\]"):
        op(**args, backend="torch")


@pytest.mark.parametrize("backend", ["nope", "triton"])
def test_a_backend_that_cannot_run_is_named(backend, monkeypatch):
    # backend="triton" on CPU tensors without the interpreter failed inside Triton's first
    # launch ("0 active drivers"); the call now says what it needs first
    import attnc

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("ATTNC_INTERPRET", raising=False)
    op = attnc.load("gated_deltanet")
    q = torch.randn(1, 8, 1, 16)
    s = torch.rand(1, 8, 1)
    expected = "ATTNC_INTERPRET=1" if backend == "triton" else "backend must be 'triton' or 'torch'"
    with pytest.raises(ValueError, match=re.escape(expected)):
        op(q=q, k=q, v=q, alpha=-s, beta=s, backend=backend)
    with pytest.raises(ValueError, match=re.escape(expected)):
        op.step(q=q[:, :1], k=q[:, :1], v=q[:, :1], alpha=-s[:, :1], beta=s[:, :1],
                state=torch.zeros(1, 1, 16, 16), backend=backend)
