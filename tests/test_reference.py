"""The fp64 reference against per-token loops written from the papers' equations.

The loops below share no code with codegen/reference.py: they use each paper's own
orientation (e.g. DeltaNet's S is [V, K] and reads o = S q), build the transition
matrices explicitly, and pick GQA heads by index arithmetic. They are compared with
the reference by relative RMS error in float64.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from attnc.codegen.reference import reference
from attnc.dsl.parser import parse, parse_file
from attnc.runtime.binding import bind

SPEC_DIR = Path(__file__).resolve().parent.parent / "specs"
F64 = torch.float64


def load(name: str):
    return parse_file(SPEC_DIR / f"{name}.attn")


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def shared(x: torch.Tensor, H: int) -> torch.Tensor:
    """GQA: head h of the result is head h // (H // H_x) of x."""
    group = H // x.shape[2]
    return x[:, :, torch.arange(H) // group]


def l2norm(x: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)


# ---------------------------------------------------------------- the papers' recurrences
# Each loop takes float64 arguments as the spec names them, the param values and an
# optional initial state in the spec's [N, H, K, V] layout; it returns the output
# [B, T, H, V] and the final state in the same layout.


def gla_loop(args, params, S0):
    """GLA (Yang et al. 2023): S_t = (alpha_t 1^T) * S_{t-1} + k_t^T v_t, o_t = q_t S_t,
    alpha_t = sigmoid(g_t) ** (1 / 16)."""
    v = args["v"]
    B, T, H, V = v.shape
    q, k, g = (shared(args[n], H) for n in ("q", "k", "g"))
    K = q.shape[-1]
    alpha = torch.sigmoid(g) ** (1 / 16)
    S = torch.zeros(B, H, K, V, dtype=F64) if S0 is None else S0.clone()
    o = torch.empty(B, T, H, V, dtype=F64)
    for t in range(T):
        gate = alpha[:, t].unsqueeze(-1).expand(B, H, K, V)
        S = gate * S + torch.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        o[:, t] = torch.einsum("bhk,bhkv->bhv", q[:, t] * params["scale"], S)
    return o, S


def gated_deltanet_loop(args, params, S0):
    """Gated DeltaNet (Yang et al. 2024), S in [V, K]:
    S_t = S_{t-1} (alpha_t (I - beta_t k_t k_t^T)) + beta_t v_t k_t^T, o_t = S_t q_t."""
    v = args["v"]
    B, T, H, V = v.shape
    q, k, alpha, beta = (shared(args[n], H) for n in ("q", "k", "alpha", "beta"))
    K = q.shape[-1]
    q = l2norm(q) * params["scale"]
    k = l2norm(k)
    eye = torch.eye(K, dtype=F64)
    S = torch.zeros(B, H, V, K, dtype=F64) if S0 is None else S0.transpose(-1, -2).clone()
    o = torch.empty(B, T, H, V, dtype=F64)
    for t in range(T):
        a, b = torch.exp(alpha[:, t])[..., None, None], beta[:, t][..., None, None]
        kt, vt = k[:, t].unsqueeze(-1), v[:, t].unsqueeze(-1)  # column vectors
        transition = a * (eye - b * kt @ kt.transpose(-1, -2))
        S = S @ transition + b * vt @ kt.transpose(-1, -2)
        o[:, t] = (S @ q[:, t].unsqueeze(-1)).squeeze(-1)
    return o, S.transpose(-1, -2)


def mamba2_loop(args, params, S0):
    """Mamba-2 SSD (Dao, Gu 2024), h in [P, N] (P = x channels, N = state size):
    dt' = softplus(dt + dt_bias), h_t = exp(dt' A) h_{t-1} + dt' x_t B_t^T,
    y_t = h_t C_t + D x_t, A = -exp(A_log)."""
    x = args["x"]
    B, T, H, P = x.shape
    C, Bk, dt = (shared(args[n], H) for n in ("C", "B", "dt"))
    N = C.shape[-1]
    A = -torch.exp(args["A_log"])
    step = F.softplus(dt + args["dt_bias"])  # [B, T, H]
    h = torch.zeros(B, H, P, N, dtype=F64) if S0 is None else S0.transpose(-1, -2).clone()
    y = torch.empty(B, T, H, P, dtype=F64)
    for t in range(T):
        dA = torch.exp(step[:, t] * A)[..., None, None]
        h = dA * h + step[:, t][..., None, None] * torch.einsum("bhp,bhn->bhpn", x[:, t], Bk[:, t])
        y[:, t] = torch.einsum("bhpn,bhn->bhp", h, C[:, t]) + args["D"][:, None] * x[:, t]
    return y, h.transpose(-1, -2)


def rwkv6_loop(args, params, S0):
    """RWKV-6 (Peng et al. 2024), wkv in [K, V]:
    o_t = r_t (S_{t-1} + diag(u) k_t^T v_t), S_t = diag(w_t) S_{t-1} + k_t^T v_t,
    w_t = exp(-exp(w_raw_t)). The output reads the state before this token's update."""
    v = args["v"]
    B, T, H, V = v.shape
    r, k, w = (shared(args[n], H) for n in ("r", "k", "w"))
    K = r.shape[-1]
    decay = torch.exp(-torch.exp(w))
    S = torch.zeros(B, H, K, V, dtype=F64) if S0 is None else S0.clone()
    o = torch.empty(B, T, H, V, dtype=F64)
    for t in range(T):
        kv = k[:, t].unsqueeze(-1) * v[:, t].unsqueeze(-2)
        bonus = torch.diag_embed(args["u"]) @ kv
        o[:, t] = (r[:, t].unsqueeze(-2) @ (S + bonus)).squeeze(-2)
        S = torch.diag_embed(decay[:, t]) @ S + kv
    return o, S


# ---------------------------------------------------------------- inputs
def gla_args(B, T, H, H_shared, K, V):
    return {
        "q": torch.randn(B, T, H_shared, K, dtype=F64),
        "k": torch.randn(B, T, H_shared, K, dtype=F64),
        "v": torch.randn(B, T, H, V, dtype=F64),
        "g": torch.randn(B, T, H, K, dtype=F64) * 2,
    }


def gated_deltanet_args(B, T, H, H_shared, K, V):
    return {
        "q": torch.randn(B, T, H_shared, K, dtype=F64),
        "k": torch.randn(B, T, H_shared, K, dtype=F64),
        "v": torch.randn(B, T, H, V, dtype=F64),
        "alpha": F.logsigmoid(torch.randn(B, T, H, dtype=F64) + 3),
        "beta": torch.sigmoid(torch.randn(B, T, H, dtype=F64)),
    }


def mamba2_args(B, T, H, H_shared, K, V):
    return {
        "C": torch.randn(B, T, H_shared, K, dtype=F64),
        "B": torch.randn(B, T, H_shared, K, dtype=F64),
        "x": torch.randn(B, T, H, V, dtype=F64),
        "dt": torch.randn(B, T, H, dtype=F64),
        "A_log": torch.log(torch.empty(H, dtype=F64).uniform_(1, 16)),
        # softplus^-1 of dt in [1e-3, 1e-1], as Mamba initialises it
        "dt_bias": torch.expm1(torch.empty(H, dtype=F64).uniform_(1e-3, 1e-1)).log(),
        "D": torch.randn(H, dtype=F64),
    }


def rwkv6_args(B, T, H, H_shared, K, V):
    return {
        "r": torch.randn(B, T, H_shared, K, dtype=F64),
        "k": torch.randn(B, T, H_shared, K, dtype=F64) * K**-0.5,
        "v": torch.randn(B, T, H, V, dtype=F64),
        "w": torch.randn(B, T, H, K, dtype=F64) - 1,
        "u": torch.randn(H, K, dtype=F64),
    }


PAPERS: dict[str, tuple[Callable, Callable]] = {
    "gla": (gla_args, gla_loop),
    "gated_deltanet": (gated_deltanet_args, gated_deltanet_loop),
    "mamba2": (mamba2_args, mamba2_loop),
    "rwkv6": (rwkv6_args, rwkv6_loop),
}


def run_reference(spec, args, **call):
    bound = bind(spec, args, initial_state=call.get("initial_state"), cu_seqlens=call.get("cu_seqlens"))
    (out,), finals = reference(spec, bound, output_final_state=True)
    return out, finals[0], bound


# ---------------------------------------------------------------- against the papers
@pytest.mark.parametrize("name", list(PAPERS))
def test_matches_paper_with_initial_and_final_state(name):
    make_args, loop = PAPERS[name]
    spec = load(name)
    B, T, H, K, V = 2, 23, 3, 8, 12
    args = make_args(B, T, H, H, K, V)
    S0 = torch.randn(B, H, K, V, dtype=F64)
    out, final, bound = run_reference(spec, args, initial_state=S0)
    expected_out, expected_final = loop(args, bound.params, S0)
    assert out.shape == (B, T, H, V) and out.dtype == F64
    assert final.shape == (B, H, K, V)
    assert rel_rms(out, expected_out) < 1e-12
    assert rel_rms(final, expected_final) < 1e-12


@pytest.mark.parametrize("name", list(PAPERS))
def test_matches_paper_from_zero_state(name):
    make_args, loop = PAPERS[name]
    spec = load(name)
    args = make_args(1, 17, 2, 2, 16, 16)
    out, final, bound = run_reference(spec, args)
    expected_out, expected_final = loop(args, bound.params, None)
    assert rel_rms(out, expected_out) < 1e-12
    assert rel_rms(final, expected_final) < 1e-12


@pytest.mark.parametrize("name", list(PAPERS))
def test_matches_paper_with_shared_heads(name):
    make_args, loop = PAPERS[name]
    spec = load(name)
    B, T, H, K, V = 2, 19, 6, 8, 4
    args = make_args(B, T, H, 2, K, V)  # q/k-like inputs: 2 heads, each serving 3 heads
    S0 = torch.randn(B, H, K, V, dtype=F64)
    out, final, bound = run_reference(spec, args, initial_state=S0)
    assert bound.H == H
    expected_out, expected_final = loop(args, bound.params, S0)
    assert rel_rms(out, expected_out) < 1e-12
    assert rel_rms(final, expected_final) < 1e-12


@pytest.mark.parametrize("name", list(PAPERS))
def test_varlen_equals_separate_sequences(name):
    make_args, loop = PAPERS[name]
    spec = load(name)
    lengths = [7, 1, 13]
    T, H, K, V = sum(lengths), 4, 8, 12
    args = make_args(1, T, H, 2, K, V)
    cu_seqlens = torch.tensor([0, 7, 8, 21])
    S0 = torch.randn(len(lengths), H, K, V, dtype=F64)
    out, final, bound = run_reference(spec, args, initial_state=S0, cu_seqlens=cu_seqlens)
    assert bound.N == 3 and final.shape == (3, H, K, V)

    pieces, finals = [], []
    for index, (bos, eos) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        piece = {n: x[:, bos:eos] if x.dim() >= 3 else x for n, x in args.items()}
        piece_out, piece_final = loop(piece, bound.params, S0[index : index + 1])
        pieces.append(piece_out)
        finals.append(piece_final)
    assert rel_rms(out, torch.cat(pieces, dim=1)) < 1e-12
    assert rel_rms(final, torch.cat(finals, dim=0)) < 1e-12


def test_param_override_reaches_the_recurrence():
    spec = load("gated_deltanet")
    args = gated_deltanet_args(1, 9, 2, 2, 8, 8)
    out, _, bound = run_reference(spec, {**args, "scale": 0.3})
    assert bound.params["scale"] == 0.3
    expected, _ = gated_deltanet_loop(args, {"scale": 0.3}, None)
    assert rel_rms(out, expected) < 1e-12


NORMALIZED = """
attention normalized
  dims    K, V
  inputs  q[K], k[K], v[V], b[V]
  weight  mix[K, V]
  state   S[K, V], z[K]
  decay   S = S @ diag(sigmoid(b))
  update  S = S + outer(k, v) * mix
  update  z = z + k
  readout o = (q @ S) / (q @ z + sum(abs(q)))
end
"""


def test_two_states_column_decay_and_scalar_readout():
    """A normalised linear attention with a value-side gate: S_t = S_{t-1} diag(sigmoid(b_t))
    + (k_t v_t^T) * M, z_t = z_{t-1} + k_t, o_t = q_t S_t / (q_t . z_t + |q_t|_1)."""
    spec = parse(NORMALIZED)
    Bsz, T, H, K, V = 2, 15, 3, 5, 7
    q, k = torch.randn(Bsz, T, H, K, dtype=F64), torch.randn(Bsz, T, H, K, dtype=F64)
    v, b = torch.randn(Bsz, T, H, V, dtype=F64), torch.randn(Bsz, T, H, V, dtype=F64)
    mix = torch.rand(H, K, V, dtype=F64)
    S0, z0 = torch.randn(Bsz, H, K, V, dtype=F64), torch.rand(Bsz, H, K, dtype=F64) + 5
    bound = bind(spec, {"q": q, "k": k, "v": v, "b": b, "mix": mix}, initial_state=(S0, z0))
    (out,), (S_final, z_final) = reference(spec, bound, output_final_state=True)

    S, z = S0.clone(), z0.clone()
    expected = torch.empty(Bsz, T, H, V, dtype=F64)
    for t in range(T):
        for batch in range(Bsz):
            for head in range(H):
                gate = torch.diag(torch.sigmoid(b[batch, t, head]))
                kv = torch.outer(k[batch, t, head], v[batch, t, head]) * mix[head]
                S[batch, head] = S[batch, head] @ gate + kv
                z[batch, head] = z[batch, head] + k[batch, t, head]
                qt = q[batch, t, head]
                expected[batch, t, head] = (qt @ S[batch, head]) / (qt @ z[batch, head] + qt.abs().sum())
    assert rel_rms(out, expected) < 1e-12
    assert rel_rms(S_final, S) < 1e-12
    assert rel_rms(z_final, z) < 1e-12


def test_low_precision_inputs_run_in_float64():
    spec = load("gla")
    args = {n: x.to(torch.bfloat16) for n, x in gla_args(2, 11, 2, 2, 8, 8).items()}
    out, _, bound = run_reference(spec, args)
    expected, _ = gla_loop({n: x.double() for n, x in args.items()}, bound.params, None)
    assert out.dtype == F64
    assert rel_rms(out, expected) < 1e-12


def test_final_state_only_on_request():
    spec = load("gla")
    bound = bind(spec, gla_args(1, 5, 2, 2, 8, 8))
    outputs, finals = reference(spec, bound)
    assert finals is None and len(outputs) == 1


# ---------------------------------------------------------------- every shipped spec
# realistic ranges where a spec expects one (log gates <= 0, rates in (0, 1))
INPUT_RANGES = {
    ("gated_deltanet", "alpha"): F.logsigmoid,
    ("kda", "g"): F.logsigmoid,
    ("rwkv7", "a"): torch.sigmoid,
}


def random_args(spec, B, T, H, dims):
    args = {}
    for item in spec.inputs:
        x = torch.randn(B, T, H, *(dims[d] for d in item.shape))
        if item.name == "beta":
            x = torch.sigmoid(x)
        args[item.name] = INPUT_RANGES.get((spec.name, item.name), lambda y: y)(x)
    for weight in spec.weights:
        args[weight.name] = torch.randn(H, *(dims[d] for d in weight.shape))
    if spec.name == "retnet":
        args["log_gamma"] = torch.log(1 - 2.0 ** (-5 - torch.arange(H, dtype=torch.float32)))
    return args


ALL_SPECS = sorted(p.stem for p in SPEC_DIR.glob("*.attn"))


def test_every_shipped_spec_is_covered():
    assert {"gla", "gated_deltanet", "mamba2"} <= set(ALL_SPECS)
    assert len(ALL_SPECS) >= 10


@pytest.mark.parametrize("name", ALL_SPECS)
def test_every_spec_runs(name):
    spec = load(name)
    B, T, H, dims = 2, 33, 3, {"K": 8, "V": 12}
    args = random_args(spec, B, T, H, dims)
    initial = tuple(torch.randn(B, H, *(dims[d] for d in s.shape)) for s in spec.states)
    bound = bind(spec, args, initial_state=initial)
    outputs, finals = reference(spec, bound, output_final_state=True)
    assert len(outputs) == len(spec.outputs)
    for out in outputs:
        assert out.shape == (B, T, H, dims["V"]) and out.dtype == F64
        assert torch.isfinite(out).all()
        assert out.abs().max() > 0  # not silently zero
    for state, final in zip(spec.states, finals):
        assert final.shape == (B, H, *(dims[d] for d in state.shape))
        assert torch.isfinite(final).all()


@pytest.mark.parametrize("name", ALL_SPECS)
def test_every_spec_varlen_equals_separate_sequences(name):
    spec = load(name)
    H, dims = 2, {"K": 8, "V": 4}
    args = random_args(spec, 1, 12, H, dims)
    initial = tuple(torch.randn(2, H, *(dims[d] for d in s.shape)) for s in spec.states)
    cu_seqlens = torch.tensor([0, 5, 12], dtype=torch.int32)
    bound = bind(spec, args, initial_state=initial, cu_seqlens=cu_seqlens)
    packed, packed_finals = reference(spec, bound, output_final_state=True)
    for index, (bos, eos) in enumerate([(0, 5), (5, 12)]):
        piece = {n: x[:, bos:eos] if n in {i.name for i in spec.inputs} else x for n, x in args.items()}
        piece_initial = tuple(s[index : index + 1] for s in initial)
        piece_bound = bind(spec, piece, initial_state=piece_initial)
        outs, finals = reference(spec, piece_bound, output_final_state=True)
        for whole, part in zip(packed, outs):
            assert rel_rms(whole[:, bos:eos], part) < 1e-12
        for whole, part in zip(packed_finals, finals):
            assert rel_rms(whole[index : index + 1], part) < 1e-12


def test_reference_is_fast_enough():
    """The oracle runs in every kernel test: T = 200 with K = V = 64 must take well under a
    second. CPU time of this process, so other processes on the machine do not count."""
    spec = load("gated_deltanet")
    bound = bind(spec, gated_deltanet_args(2, 200, 4, 4, 64, 64))
    reference(spec, bind(spec, gated_deltanet_args(1, 2, 1, 1, 8, 8)))  # warm-up
    start = time.process_time()
    reference(spec, bound, output_final_state=True)
    assert time.process_time() - start < 1.0
