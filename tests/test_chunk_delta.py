"""chunk_delta (delta-rule family), both backends, against an fp64 per-token loop.

The golden model below is written independently of the chunk code: it runs the recurrence
one token at a time in fp64 and gets its gradients from autograd. Errors are relative RMS,
||a - b|| / ||b||. Triton runs in its interpreter here (conftest.py), with outputs and
intermediate buffers NaN-poisoned so that any element no kernel wrote shows up.
"""
from __future__ import annotations

import dataclasses
import re
import zlib

import pytest
import torch
import torch.nn.functional as F

from attnc.codegen.chunk_delta import DeltaKernelSpec, chunk_delta_torch, render
from attnc.runtime.chunk_delta_op import ChunkDeltaFunction, chunk_delta

FP32_TOLERANCE = 1e-4
BF16_TOLERANCE = 2e-2
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def naive_recurrence(q, k, v, beta, g, h0, cu_seqlens):
    """fp64 per-token loop: S_t = (I - beta_t k_t k_t^T) D_t S_{t-1} + beta_t k_t v_t^T,
    o_t = q_t^T S_t, D_t = exp(g_t) (scalar or per key channel). Returns (o, final states)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    if cu_seqlens is None:
        spans = [(b, 0, T) for b in range(B)]
    else:
        bounds = cu_seqlens.tolist()
        spans = [(0, bos, eos) for bos, eos in zip(bounds[:-1], bounds[1:])]
    pieces, finals = [], []
    for n, (b, bos, eos) in enumerate(spans):
        state = h0[n].double() if h0 is not None else torch.zeros(H, K, V, dtype=torch.float64)
        rows = [torch.zeros(0, H, V, dtype=torch.float64)]
        for t in range(bos, eos):
            if g is not None:
                decay = g[b, t].double().exp()
                state = state * (decay[:, :, None] if g.dim() == 4 else decay[:, None, None])
            key, value, rate = k[b, t].double(), v[b, t].double(), beta[b, t].double()
            erase = torch.eye(K, dtype=torch.float64) - rate[:, None, None] * key[:, :, None] * key[:, None, :]
            state = erase @ state + rate[:, None, None] * key[:, :, None] * value[:, None, :]
            rows.append(torch.einsum("hk,hkv->hv", q[b, t].double(), state)[None])
        pieces.append(torch.cat(rows))
        finals.append(state)
    outputs = torch.stack(pieces) if cu_seqlens is None else torch.cat(pieces)[None]
    return outputs, torch.stack(finals)


def rel_rms(actual, expected):
    """||a - b|| / ||b||; the absolute ||a|| when b is exactly zero (e.g. the gate gradient
    of a single token read from a zero state)."""
    actual, expected = actual.double(), expected.double()
    if expected.norm() == 0:
        return actual.norm().item()
    return ((actual - expected).norm() / expected.norm()).item()


@dataclasses.dataclass(frozen=True)
class Case:
    gate: str = "none"            # none | scalar | channel
    T: int = 64
    K: int = 16
    V: int = 32
    B: int = 1
    H: int = 2
    h0: bool = True
    final: bool = True
    dtype: torch.dtype = torch.float32
    seqlens: tuple[int, ...] | None = None   # varlen: sequence lengths packed along T
    beta: tuple[float, float] = (0.0, 1.0)   # beta drawn uniformly from this range
    gates: str = "mixed"          # mixed: mostly mild decays | strong: -20 on half the entries
    chunk_size: int = 64

    def __str__(self):
        parts = [self.gate, f"T{self.T}", f"K{self.K}V{self.V}", f"B{self.B}H{self.H}",
                 "h0" if self.h0 else "", "ht" if self.final else "",
                 "bf16" if self.dtype == torch.bfloat16 else "",
                 f"varlen{list(self.seqlens)}" if self.seqlens else "",
                 f"beta{self.beta[0]:g}-{self.beta[1]:g}" if self.beta != (0.0, 1.0) else "",
                 self.gates if self.gates != "mixed" else "", f"C{self.chunk_size}" if self.chunk_size != 64 else ""]
        return "-".join(p for p in parts if p)


CASES = [
    Case("none", T=1, K=16, V=32),
    Case("none", T=17, K=32, V=16, h0=False),
    Case("none", T=200, K=64, V=64, final=False, beta=(0.99, 1.0)),
    Case("scalar", T=64, K=64, V=64, B=2, H=1, final=False),
    Case("scalar", T=100, K=16, V=32, beta=(0.0, 0.01)),
    Case("scalar", T=17, K=32, V=16, h0=False, beta=(0.0, 2.0)),
    Case("channel", T=100, K=32, V=16),
    Case("channel", T=1, K=32, V=16, h0=False, final=False),
    Case("channel", T=40, K=16, V=32, B=2, H=1, beta=(0.99, 1.0)),
    Case("channel", T=17, K=64, V=64, H=1, beta=(0.0, 0.01)),
    # sizes that are not powers of two, and a smaller chunk
    Case("channel", T=40, K=48, V=24, H=1),
    Case("scalar", T=100, K=48, V=16, chunk_size=32),
    # varlen: three sequences of unequal lengths, chunks never crossing a boundary
    Case("none", T=104, H=1, seqlens=(23, 1, 80)),
    Case("scalar", T=104, H=1, seqlens=(80, 23, 1), final=False),
    Case("channel", T=104, H=1, seqlens=(1, 80, 23), h0=False),
    # bf16 inputs
    Case("scalar", T=100, K=32, V=16, dtype=torch.bfloat16),
    Case("channel", T=64, K=16, V=32, dtype=torch.bfloat16),
    # long sequences: strong gates (no inf/NaN, still accurate) and moderate ones
    Case("scalar", T=512, K=16, V=16, H=1, gates="strong"),
    Case("channel", T=512, K=16, V=16, H=1, gates="strong"),
    Case("scalar", T=512, K=16, V=16, H=1, gates="moderate", final=False),
    # wider than WIDE_K: the reverse state pass keeps its tiles in the dots' dtype
    Case("scalar", T=70, K=256, V=16, H=1),
]


def make_inputs(case: Case):
    B, T, H, K, V = case.B, case.T, case.H, case.K, case.V
    if case.seqlens:
        B = 1
        assert sum(case.seqlens) == T
    N = len(case.seqlens) if case.seqlens else B

    def log_gate(*shape):
        if case.gates == "moderate":
            # slow decays: states keep hundreds of tokens
            return -0.05 * torch.rand(*shape)
        # log-sigmoid of shifted normals: decays mostly mild, some strong
        gate = F.logsigmoid(torch.randn(*shape) + 1.5)
        if case.gates == "strong":
            gate = torch.where(torch.rand(*shape) < 0.5, torch.full_like(gate, -20.0), gate)
        return gate

    q = (torch.randn(B, T, H, K) / K ** 0.5).to(case.dtype)
    k = F.normalize(torch.randn(B, T, H, K), dim=-1).to(case.dtype)
    v = torch.randn(B, T, H, V).to(case.dtype)
    low, high = case.beta
    beta = (low + (high - low) * torch.rand(B, T, H)).to(case.dtype)
    g = {"none": None, "scalar": log_gate(B, T, H), "channel": log_gate(B, T, H, K)}[case.gate]
    h0 = torch.randn(N, H, K, V) if case.h0 else None
    cu_seqlens = None
    if case.seqlens:
        cu_seqlens = torch.tensor([0, *torch.tensor(case.seqlens).cumsum(0).tolist()], dtype=torch.int32)
    return tuple(None if x is None else x.to(DEVICE) for x in (q, k, v, beta, g, h0, cu_seqlens))


def run_and_differentiate(fn, inputs, do, dht):
    """(o, ht, grads of q, k, v, beta, g, h0) for a random cotangent on o and on ht."""
    leaves = [None if x is None else x.detach().clone().requires_grad_() for x in inputs[:6]]
    o, ht = fn(*leaves, inputs[6])
    loss = (o.double() * do).sum()
    if dht is not None:
        loss = loss + (ht.double() * dht).sum()
    wrt = [x for x in leaves if x is not None]
    grads = iter(torch.autograd.grad(loss, wrt))
    return o, ht, [None if x is None else next(grads) for x in leaves]


@pytest.fixture(scope="module")
def golden_results():
    """fp64 results per case, shared by both backends (the loop is the slow part)."""
    return {}


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_naive_recurrence(case: Case, backend: str, golden_results):
    torch.manual_seed(zlib.crc32(str(case).encode()))  # same inputs for both backends
    inputs = make_inputs(case)
    if case not in golden_results:
        ref_o, ref_ht = naive_recurrence(*[None if x is None else x.double() for x in inputs[:6]], inputs[6])
        do = torch.randn_like(ref_o)
        dht = torch.randn_like(ref_ht) if case.final else None
        golden_results[case] = (do, dht, run_and_differentiate(naive_recurrence, inputs, do, dht))
    do, dht, (ref_o, ref_ht, ref_grads) = golden_results[case]

    def under_test(q, k, v, beta, g, h0, cu_seqlens):
        return chunk_delta(q, k, v, beta, g, h0, cu_seqlens, output_final_state=case.final,
                           chunk_size=case.chunk_size, backend=backend, input_precision="ieee", poison=True)

    o, ht, grads = run_and_differentiate(under_test, inputs, do, dht)

    tolerance = BF16_TOLERANCE if case.dtype == torch.bfloat16 else FP32_TOLERANCE
    assert o.dtype == torch.float32 and o.shape == ref_o.shape
    assert torch.isfinite(o).all(), "o has NaN/inf (unwritten or overflowed elements)"
    assert rel_rms(o, ref_o) <= tolerance, f"o: rel RMS {rel_rms(o, ref_o):.2e}"
    if case.final:
        assert ht is not None and ht.dtype == torch.float32 and torch.isfinite(ht).all()
        assert rel_rms(ht, ref_ht) <= tolerance, f"ht: rel RMS {rel_rms(ht, ref_ht):.2e}"
    else:
        assert ht is None
    for label, grad, ref, x in zip(("q", "k", "v", "beta", "g", "h0"), grads, ref_grads, inputs):
        if x is None:
            assert grad is None
            continue
        assert grad.shape == x.shape and grad.dtype == x.dtype, label
        assert torch.isfinite(grad).all(), f"d{label} has NaN/inf"
        err = rel_rms(grad, ref)
        assert err <= tolerance, f"d{label}: rel RMS {err:.2e} > {tolerance}"


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU bf16 inputs take bf16 dots: no fp32 run gives the same values")
@pytest.mark.parametrize("gate", ["channel", "scalar"])
def test_launchers_return_grads_in_the_inputs_dtypes(gate):
    """The launchers themselves (not through autograd): shapes, Nones, no dht, and each
    gradient in its input's dtype, with the values autograd's conversion of the fp32 result
    would give (the interpreter computes bf16 inputs in fp32, as fp32 copies of them)."""
    case = Case(gate, T=33, K=16, V=16, h0=False, dtype=torch.bfloat16)
    q, k, v, beta, g, h0, cu_seqlens = make_inputs(case)
    module = ChunkDeltaFunction.module_for(DeltaKernelSpec("delta", gate))
    o, ht = module.forward(q, k, v, beta, g, None, None, False, poison=True)
    assert o.dtype == torch.float32 and o.shape == v.shape and ht is None
    do = torch.randn_like(o)
    grads = module.backward(q, k, v, beta, g, None, None, do, None, poison=True)
    fp32_grads = module.backward(q.float(), k.float(), v.float(), beta.float(), g, None, None, do, None,
                                 poison=True)
    for label, grad, fp32_grad, x in zip("q k v beta g".split(), grads[:5], fp32_grads, (q, k, v, beta, g)):
        assert grad.shape == x.shape and grad.dtype == x.dtype, label
        assert torch.isfinite(grad).all(), label
        assert torch.equal(grad, fp32_grad.to(x.dtype)), f"d{label} is not the fp32 result, converted"
    assert grads[5] is None


def test_gradient_of_final_state_alone():
    """Only ht is used: the op's backward gets no gradient for o."""
    case = Case("scalar", T=40, K=16, V=16, H=1)
    inputs = make_inputs(case)
    leaves = [x.detach().clone().requires_grad_() for x in inputs[:6]]
    _, ht = chunk_delta(*leaves, output_final_state=True, input_precision="ieee", poison=True)
    grads = torch.autograd.grad(ht.square().sum(), leaves)
    ref_leaves = [x.detach().double().requires_grad_() for x in inputs[:6]]
    _, ref_ht = naive_recurrence(*ref_leaves, None)
    # q does not reach the final state: its gradient is zero
    ref_grads = torch.autograd.grad(ref_ht.square().sum(), ref_leaves, allow_unused=True, materialize_grads=True)
    for label, grad, ref in zip(("q", "k", "v", "beta", "g", "h0"), grads, ref_grads):
        assert rel_rms(grad, ref) <= FP32_TOLERANCE, label


@pytest.mark.parametrize("gate", ["none", "scalar", "channel"])
def test_render_names_kernels_and_reads_like_code(gate):
    spec = DeltaKernelSpec("kda" if gate == "channel" else "gdn", gate)
    source = render(spec)
    compile(source, f"<{spec.name}>", "exec")
    kernels = re.findall(r"^def (\w+)\(", source, flags=re.M)
    for suffix in ("wy_solve", "chunk_state_fwd", "chunk_output_fwd",
                   "chunk_state_bwd", "chunk_bwd_wy", "chunk_bwd_intra"):
        assert f"{spec.name}_{suffix}" in kernels
    # a scores kernel of its own only where the decay sits inside the channel sum
    assert (f"{spec.name}_intra_scores" in kernels) == (gate == "channel")
    assert (f"{spec.name}_gate_cumsum" in kernels) == (gate != "none")
    assert "{{" not in source and "{%" not in source
    assert "\n\n\n\n" not in source, "template whitespace leaks into the generated code"
    assert not re.search(r"^ +$", source, flags=re.M), "blank lines with trailing spaces"


def test_spec_and_input_errors_name_the_culprit():
    with pytest.raises(ValueError, match="gate='per_head'"):
        DeltaKernelSpec("x", gate="per_head")
    with pytest.raises(ValueError, match="not a Python identifier"):
        DeltaKernelSpec("my kernel")
    q = torch.randn(1, 8, 2, 16)
    beta = torch.rand(1, 8, 2)
    with pytest.raises(ValueError, match=r"g has shape \(1, 8, 3\)"):
        chunk_delta(q, q, q, beta, torch.zeros(1, 8, 3), output_final_state=False)
    with pytest.raises(ValueError, match=r"beta has shape \(1, 8\)"):
        chunk_delta(q, q, q, beta[..., 0], output_final_state=False)
    with pytest.raises(ValueError, match="backend='cuda'"):
        chunk_delta(q, q, q, beta, output_final_state=False, backend="cuda")


def test_torch_backend_varlen_equals_batched():
    """Varlen with equal lengths equals the batched path (the torch path loops only for varlen)."""
    case = Case("channel", T=40, B=3)
    q, k, v, beta, g, h0, _ = make_inputs(case)
    o, ht = chunk_delta_torch(q, k, v, beta, g, h0, None, True)
    flat = [x.flatten(0, 1)[None] for x in (q, k, v, beta, g)]
    cu = torch.tensor([0, 40, 80, 120], dtype=torch.int32)
    o2, ht2 = chunk_delta_torch(*flat, h0, cu, True)
    assert torch.allclose(o.flatten(0, 1)[None], o2, atol=1e-5) and torch.allclose(ht, ht2, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_scale_and_output_dtype_are_applied_by_the_kernel(backend):
    """o = scale * q^T S stored in out_dtype: values and every gradient as if the caller
    had scaled and cast the fp32 output itself."""
    torch.manual_seed(3)
    case = Case("scalar", T=40, K=16, V=32, H=2)
    inputs = make_inputs(case)
    scale = 0.37
    # a bf16 output's cotangent arrives in bf16: draw one that bf16 holds exactly
    do = torch.randn(case.B, case.T, case.H, case.V).to(torch.bfloat16).double()
    dht = torch.randn(case.B, case.H, case.K, case.V, dtype=torch.float64)

    def scaled(q, k, v, beta, g, h0, cu_seqlens):
        return chunk_delta(q, k, v, beta, g, h0, cu_seqlens, output_final_state=True,
                           backend=backend, input_precision="ieee", poison=True,
                           scale=scale, out_dtype=torch.bfloat16)

    def reference(q, k, v, beta, g, h0, cu_seqlens):
        o, ht = naive_recurrence(q, k, v, beta, g, h0, cu_seqlens)
        return o * scale, ht

    o, ht, grads = run_and_differentiate(scaled, inputs, do, dht)
    double = [None if x is None else x.double() for x in inputs[:6]] + [inputs[6]]
    ref_o, ref_ht, ref_grads = run_and_differentiate(reference, double, do, dht)
    assert o.dtype == torch.bfloat16
    assert rel_rms(o.float(), ref_o) <= BF16_TOLERANCE / 4   # one bf16 rounding
    assert rel_rms(ht, ref_ht) <= FP32_TOLERANCE
    for label, grad, ref in zip(("q", "k", "v", "beta", "g", "h0"), grads, ref_grads):
        assert rel_rms(grad, ref) <= FP32_TOLERANCE, label


# On a GPU, W, U', the chunk states, U and their gradients are stored in the dtype the
# kernels' dots round them to (bf16 here); the interpreter's dots are fp32, so it keeps them
# fp32. This test forces bf16 storage to run the kernels that write and read such buffers on
# the CPU. Expected error: a bf16 rounding (2^-9 relative) of those operands, a few e-3 on
# o and the input gradients; more on the gate gradient (a difference of nearly cancelling
# products, as on a GPU, where the dots round them whatever they are stored in).
BF16_OPERANDS_TOLERANCE = 1e-2
BF16_OPERANDS_GATE_TOLERANCE = 5e-2


# The forward comes in two forms (`fused_forward` in the launchers' config): chunk states
# and new values through memory, then chunk_output_fwd; or one pass whose state pass writes
# the outputs itself. Both against the recurrence and each other.
FORWARD_CASES = [CASES[i] for i in (0, 2, 3, 6, 10, 11, 13, 14, 15, 17)]


def test_state_passes_spread_few_sequences_over_the_gpu():
    """The sequential passes hold all K rows and split V: with few sequences the V block
    narrows (to 16 at the least) until sequences x heads x V blocks fill an H100's 132 SMs
    twice; a config's state_block_v stands, and the interpreter keeps the default."""
    module = ChunkDeltaFunction.module_for(DeltaKernelSpec("delta", "scalar"))

    def plan(B, interpret=False, **config):
        q = torch.empty(B, 1, 16, 128, dtype=torch.bfloat16, device="meta")
        return module._Plan(q, q, None, 64, interpret, "tf32", False, config or None)

    assert plan(16).state_block_v == 32     # 256 x 4 = 1024 programs
    assert plan(1).state_block_v == 16      # 16 x 8 = 128: as many as 16-wide blocks give
    assert plan(4).state_block_v == 16      # 64 x 8 = 512 (64 x 4 = 256 < 264)
    assert plan(8).state_block_v == 32
    assert plan(1, state_block_v=32).state_block_v == 32
    assert plan(1, interpret=True).state_block_v == 32


# The state passes in groups of chunks (`state_group`): each group's map of the state,
# S -> M_g S + L_g (phase 1; M_g from programs that take the identity's columns), then each
# group from its entering state (phase 2); the reverse pass the same way with M_g^T from
# the end. Every gate, the last group
# and the last chunk partial, a per-channel gate's decayed keys (the forward) and its
# cumulated gate (the backward's recompute), l2-normalised inputs, bf16.
GROUPED_CASES = [Case("none", T=75, K=32, V=16, H=1, chunk_size=16),
                 Case("scalar", T=75, K=16, V=32, B=2, H=1, chunk_size=16),
                 Case("channel", T=75, K=48, V=16, H=1, chunk_size=16),
                 Case("scalar", T=75, K=16, V=16, H=1, chunk_size=16, dtype=torch.bfloat16)]


@pytest.mark.parametrize("one_pass", [0, 1], ids=["two_pass", "one_pass"])
@pytest.mark.parametrize("case", GROUPED_CASES, ids=str)
def test_state_pass_in_groups_matches_the_recurrence(case, one_pass, record_launches):
    """state_group=2 over 5 chunks (groups of 2, 2 and 1): outputs, final state and every
    gradient against the recurrence of the l2-normalised inputs, and the forward against
    the ungrouped pass; chunk_state_fwd runs in two launches in the forward (in one pass,
    its phase 2 writes the outputs: no chunk_output_fwd) and in one, phase 2 from the
    forward's maps, in the backward's recompute; the reverse pass, chunk_state_bwd, in two."""
    torch.manual_seed(zlib.crc32(str(case).encode()))
    q, k, v, beta, g, h0, cu_seqlens = make_inputs(case)
    q = (3 * torch.randn(q.shape)).to(case.dtype)
    k = (2 * torch.randn(k.shape)).to(case.dtype)
    inputs = (q, k, v, beta, g, h0, cu_seqlens)

    def reference(q, k, v, beta, g, h0, cu_seqlens):
        return naive_recurrence(_l2norm_fp64(q), _l2norm_fp64(k), *[None if x is None else x.double()
                                                                   for x in (v, beta, g, h0)], cu_seqlens)

    def under_test(group):
        def call(q, k, v, beta, g, h0, cu_seqlens):
            return chunk_delta(q, k, v, beta, g, h0, cu_seqlens, output_final_state=True,
                               chunk_size=case.chunk_size, input_precision="ieee", poison=True,
                               config={"fused_forward": one_pass, "state_group": group}, l2norm_q=True,
                               l2norm_k=True)
        return call

    ref_o, ref_ht = reference(*inputs)
    do, dht = torch.randn_like(ref_o), torch.randn_like(ref_ht)
    ref_o, ref_ht, ref_grads = run_and_differentiate(reference, inputs, do, dht)
    with record_launches() as launched:
        o, ht, grads = run_and_differentiate(under_test(2), inputs, do, dht)
    assert sum(name.endswith("chunk_state_fwd") for name in launched) == 3, launched
    assert sum(name.endswith("chunk_output_fwd") for name in launched) == 1 - one_pass, launched
    assert sum(name.endswith("chunk_state_bwd") for name in launched) == 2, launched
    tolerance = BF16_TOLERANCE if case.dtype == torch.bfloat16 else FP32_TOLERANCE
    assert rel_rms(o, ref_o) <= tolerance, f"o {rel_rms(o, ref_o):.2e}"
    assert rel_rms(ht, ref_ht) <= tolerance, f"ht {rel_rms(ht, ref_ht):.2e}"
    for name, grad, ref in zip(("q", "k", "v", "beta", "g", "h0"), grads, ref_grads):
        if ref is not None:
            assert rel_rms(grad, ref) <= tolerance, f"d{name}: {rel_rms(grad, ref):.2e}"
    whole_o, whole_ht = under_test(0)(*inputs)
    assert rel_rms(o, whole_o) <= (2e-3 if case.dtype == torch.bfloat16 else FP32_TOLERANCE / 10)
    assert rel_rms(ht, whole_ht) <= FP32_TOLERANCE / 10


def test_state_pass_groups_long_sequences_on_a_gpu():
    """On a GPU the state passes take groups of STATE_GROUP (64) chunks where a sequence has
    at least twice as many (T = 32768 at chunk size 64: 8 groups), not for shorter ones,
    varlen calls or in the interpreter; a config's state_group stands (0: none) and is
    checked."""
    module = ChunkDeltaFunction.module_for(DeltaKernelSpec("delta", "scalar"))

    def plan(B, T, interpret=False, **config):
        q = torch.empty(B, T, 16, 128, dtype=torch.bfloat16, device="meta")
        return module._Plan(q, q, None, 64, interpret, "tf32", False, config or None)

    assert module.STATE_GROUP == 64
    assert plan(1, 32768).state_group_size() == 64
    assert plan(16, 2048).state_group_size() == 0
    assert plan(1, 32768, interpret=True).state_group_size() == 0
    assert plan(1, 32768, state_group=0).state_group_size() == 0
    assert plan(1, 32768, interpret=True, state_group=8).state_group_size() == 8
    with pytest.raises(ValueError, match="state_group=6: expected 0 or a power of two"):
        plan(1, 32768, state_group=6)
    # groups are programs of the one pass: at T = 32768 16 heads x 8 groups x 8 V blocks (16
    # wide, as the state passes' narrowing leaves them) fill an H100 twice; over whole
    # sequences 16 x 8 programs are too few for the one pass
    assert (plan(1, 32768).state_block_v, plan(1, 32768).fused_forward) == (16, 1)
    assert (plan(1, 32768, state_group=0).state_block_v, plan(1, 32768, state_group=0).fused_forward) == (16, 0)


def test_state_passes_pipeline_by_default():
    """The sequential passes that write states (chunk_state_fwd through chunk states) or their
    gradients (chunk_state_bwd) prefetch the next chunk's tiles: (2, 3) stages at K <= 128,
    (2, 2) with a per-channel gate, one at K = 256, capped by an H100's shared memory;
    a config's state_stages sets both, and is checked."""
    def plan(gate="scalar", K=128, chunk_size=64, **config):
        module = ChunkDeltaFunction.module_for(DeltaKernelSpec("delta", gate))
        q = torch.empty(16, 1, 16, K, dtype=torch.bfloat16, device="meta")
        made = module._Plan(q, q, None, chunk_size, False, "tf32", False, config or None)
        return made.state_pass_stages(backward=False), made.state_pass_stages(backward=True)

    assert plan() == (2, 3)
    assert plan(K=64) == (2, 3)
    assert plan("channel") == (2, 2)
    assert plan(K=256) == (1, 1)
    assert plan(chunk_size=128) == (2, 2)      # 3 stages of [128, 128] tiles would not fit
    assert plan(state_stages=1) == (1, 1)
    assert plan(K=256, state_stages=3) == (3, 3)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="state_stages"):
            plan(state_stages=bad)


def test_the_launches_take_the_state_stages():
    """Recorded as on a GPU: the one pass runs one stage (pipelined it spilled registers on
    sm_90), the state passes through chunk states the plan's stages."""
    import attnc
    from attnc.runtime.launches import record

    op = attnc.load("deltanet")
    stages = {}
    for fused in (0, 1):
        trace = record(op, B=16, T=128, H=16, dims={"K": 128, "V": 128}, dtype=torch.bfloat16, step=False,
                       config={"fused_forward": fused})
        for launch in trace.launches():
            if "chunk_state" in launch.name:
                stages[launch.phase, launch.name, fused] = launch.options["num_stages"]
    assert stages == {("forward", "deltanet_S_chunk_state_fwd", 1): 1,
                      ("forward", "deltanet_S_chunk_state_fwd", 0): 2,
                      ("backward", "deltanet_S_chunk_state_fwd", 0): 2,
                      ("backward", "deltanet_S_chunk_state_fwd", 1): 2,
                      ("backward", "deltanet_S_chunk_state_bwd", 0): 3,
                      ("backward", "deltanet_S_chunk_state_bwd", 1): 3}


@pytest.mark.parametrize("case", FORWARD_CASES, ids=str)
def test_one_pass_and_chunked_forwards_match_the_recurrence(case):
    inputs = make_inputs(case)
    q, k, v, beta, g, h0, cu_seqlens = inputs
    ref_o, ref_ht = naive_recurrence(*[None if x is None else x.double() for x in inputs[:6]], cu_seqlens)
    bf16 = case.dtype == torch.bfloat16
    results = {}
    for fused in (0, 1):
        o, ht = chunk_delta(q, k, v, beta, g, h0, cu_seqlens, output_final_state=True, chunk_size=case.chunk_size,
                            input_precision="ieee", poison=True, scale=0.5, out_dtype=case.dtype,
                            config={"fused_forward": fused})
        assert o.dtype == case.dtype and torch.isfinite(o).all() and torch.isfinite(ht).all()
        tolerance = BF16_TOLERANCE if bf16 else FP32_TOLERANCE
        err = rel_rms(o, ref_o * 0.5)
        assert err <= tolerance, f"fused_forward={fused}: o {err:.2e}"
        assert rel_rms(ht, ref_ht) <= tolerance, f"fused_forward={fused}: ht {rel_rms(ht, ref_ht):.2e}"
        results[fused] = (o.double(), ht.double())
    for chunked, one_pass in zip(results[0], results[1]):
        assert rel_rms(one_pass, chunked) <= (2e-3 if bf16 else FP32_TOLERANCE / 10)


@pytest.mark.parametrize("gate", ["scalar", "channel"])
def test_wide_reverse_state_pass_under_emulated_gpu_dots(monkeypatch, gate):
    """K = 256 > WIDE_K: chunk_state_bwd keeps its [BT, K] tiles in the dots' dtype (bf16 on
    a GPU), not fp32. With the interpreter rounding every dot as a GPU does, values and
    gradients stay within bf16's error of the fp64 recurrence."""
    monkeypatch.setenv("ATTNC_EMULATE_GPU_DOTS", "1")
    case = Case(gate, T=70, K=256, V=16, H=1, dtype=torch.bfloat16)
    torch.manual_seed(zlib.crc32(str(case).encode()))
    inputs = make_inputs(case)
    ref_o, ref_ht = naive_recurrence(*[None if x is None else x.double() for x in inputs[:6]], None)
    do, dht = torch.randn_like(ref_o), torch.randn_like(ref_ht)
    ref_o, ref_ht, ref_grads = run_and_differentiate(naive_recurrence, inputs, do, dht)

    def under_test(q, k, v, beta, g, h0, cu_seqlens):
        return chunk_delta(q, k, v, beta, g, h0, cu_seqlens, output_final_state=True, backend="triton",
                           input_precision="ieee", poison=True)

    o, ht, grads = run_and_differentiate(under_test, inputs, do, dht)
    assert rel_rms(o, ref_o) <= BF16_OPERANDS_TOLERANCE, f"o: rel RMS {rel_rms(o, ref_o):.2e}"
    assert rel_rms(ht, ref_ht) <= BF16_OPERANDS_TOLERANCE, f"ht: rel RMS {rel_rms(ht, ref_ht):.2e}"
    for label, grad, ref in zip(("q", "k", "v", "beta", "g", "h0"), grads, ref_grads):
        tolerance = BF16_OPERANDS_GATE_TOLERANCE if label == "g" else BF16_OPERANDS_TOLERANCE
        assert rel_rms(grad, ref) <= tolerance, f"d{label}: rel RMS {rel_rms(grad, ref):.2e}"


def test_fused_forward_config_is_checked():
    q, k, v, beta, g, h0, cu_seqlens = make_inputs(Case("scalar", T=20))
    for bad in (2, -1, 0.5, "1"):
        with pytest.raises(ValueError, match="fused_forward"):
            chunk_delta(q, k, v, beta, g, h0, cu_seqlens, output_final_state=False,
                        config={"fused_forward": bad})


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU every run stores bf16 operands")
@pytest.mark.parametrize("case", [Case("scalar", T=100, K=32, V=16, dtype=torch.bfloat16),
                                  Case("channel", T=64, K=16, V=32, dtype=torch.bfloat16)], ids=str)
def test_bf16_operands_as_on_a_gpu(case, gpu_operand_storage):
    torch.manual_seed(zlib.crc32(str(case).encode()))
    inputs = make_inputs(case)
    module = ChunkDeltaFunction.module_for(DeltaKernelSpec("delta", case.gate))
    ref_o, ref_ht = naive_recurrence(*[None if x is None else x.double() for x in inputs[:6]], None)
    do, dht = torch.randn_like(ref_o), torch.randn_like(ref_ht)
    ref_o, ref_ht, ref_grads = run_and_differentiate(naive_recurrence, inputs, do, dht)

    def under_test(q, k, v, beta, g, h0, cu_seqlens):
        # the forward that stores chunk states (the one-pass forward keeps them in registers)
        return chunk_delta(q, k, v, beta, g, h0, cu_seqlens, output_final_state=True,
                           chunk_size=case.chunk_size, backend="triton", input_precision="ieee", poison=True,
                           config={"fused_forward": 0})

    fp32_operands = run_and_differentiate(under_test, inputs, do, dht)
    stored = []

    def record(shape, dtype):
        if tuple(shape[-2:]) == (case.K, case.V):
            stored.append(("state", dtype))
        elif dtype == torch.bfloat16:
            stored.append(dtype)

    gpu_operand_storage(module, record)
    o, ht, grads = run_and_differentiate(under_test, inputs, do, dht)
    # bf16 buffers, and every state-shaped one
    bf16, fp32 = torch.bfloat16, torch.float32
    # the forward stores A only for a per-channel gate (the others' output kernels compute it),
    # and, allocated before it, q and k with the decays inside for its state and output passes
    forward_scores = [bf16] if case.gate == "channel" else []
    decayed = [bf16, bf16] if case.gate == "channel" else []
    assert stored == [*decayed, *forward_scores,
                      bf16, bf16, ("state", bf16), bf16, ("state", fp32),  # forward: W, U', S, U, final
                      bf16, bf16, ("state", bf16), bf16,                  # the backward recomputes W, U', S, U
                      ("state", bf16), bf16, ("state", fp32),             # dS, dU, dh0
                      bf16, bf16, bf16, bf16], stored                     # dv, dbeta, dq, dk (in the inputs' dtype)
    assert not torch.equal(o, fp32_operands[0]), "the bf16 operands were not used"
    assert rel_rms(o, ref_o) <= BF16_OPERANDS_TOLERANCE, f"o: rel RMS {rel_rms(o, ref_o):.2e}"
    assert rel_rms(ht, ref_ht) <= BF16_OPERANDS_TOLERANCE, f"ht: rel RMS {rel_rms(ht, ref_ht):.2e}"
    for label, grad, ref in zip(("q", "k", "v", "beta", "g", "h0"), grads, ref_grads):
        if ref is None:
            continue
        assert torch.isfinite(grad).all(), f"d{label} has NaN/inf"
        tolerance = BF16_OPERANDS_GATE_TOLERANCE if label == "g" else BF16_OPERANDS_TOLERANCE
        assert rel_rms(grad, ref) <= tolerance, f"d{label}: rel RMS {rel_rms(grad, ref):.2e}"


def _l2norm_fp64(x):
    x = x.double()
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


# q and k drawn raw (not normalised) so that the kernels' own normalisation matters
L2NORM_CASES = [Case("none", T=100, K=32, V=16), Case("scalar", T=100, K=48, V=16, chunk_size=32),
                Case("scalar", T=104, H=1, seqlens=(80, 23, 1)), Case("channel", T=40, K=16, V=32),
                # a per-channel gate's kernels split K (two blocks, the second masked): its
                # backward turns the normalised inputs' gradients into the raw ones' in a pass
                Case("channel", T=64, K=48, V=16, H=1, seqlens=(40, 23, 1), chunk_size=32),
                Case("scalar", T=100, K=32, V=16, dtype=torch.bfloat16),
                # wider than RAW_GRADS_MAX_K: l2norm's backward in passes of its own
                Case("none", T=40, K=160, V=16, chunk_size=32)]


@pytest.mark.parametrize("case", L2NORM_CASES, ids=str)
def test_kernels_normalise_q_and_k_as_they_load_them(case):
    """l2norm_q / l2norm_k: the kernels read raw q and k and normalise each row as they load
    it; values and every gradient (to the raw q and k) against the fp64 recurrence of the
    normalised inputs, in both forward forms."""
    torch.manual_seed(zlib.crc32(str(case).encode()))
    q, k, v, beta, g, h0, cu_seqlens = make_inputs(case)
    q = (3 * torch.randn(q.shape, device=q.device)).to(case.dtype)
    k = (2 * torch.randn(k.shape, device=k.device)).to(case.dtype)
    inputs = (q, k, v, beta, g, h0, cu_seqlens)

    def reference(q, k, v, beta, g, h0, cu_seqlens):
        return naive_recurrence(_l2norm_fp64(q), _l2norm_fp64(k), *[None if x is None else x.double()
                                                                   for x in (v, beta, g, h0)], cu_seqlens)

    ref_o, ref_ht = reference(*inputs)
    do, dht = torch.randn_like(ref_o), torch.randn_like(ref_ht)
    ref_o, ref_ht, ref_grads = run_and_differentiate(reference, inputs, do, dht)
    tolerance = BF16_TOLERANCE if case.dtype == torch.bfloat16 else FP32_TOLERANCE
    for fused in (0, 1):
        def under_test(q, k, v, beta, g, h0, cu_seqlens):
            return chunk_delta(q, k, v, beta, g, h0, cu_seqlens, output_final_state=True,
                               chunk_size=case.chunk_size, input_precision="ieee", poison=True,
                               config={"fused_forward": fused}, l2norm_q=True, l2norm_k=True)

        o, ht, grads = run_and_differentiate(under_test, inputs, do, dht)
        assert rel_rms(o, ref_o) <= tolerance, f"fused_forward={fused}: o {rel_rms(o, ref_o):.2e}"
        assert rel_rms(ht, ref_ht) <= tolerance, f"fused_forward={fused}: ht"
        for name, grad, ref in zip(("q", "k", "v", "beta", "g", "h0"), grads, ref_grads):
            if ref is not None:
                err = rel_rms(grad, ref)
                assert err <= tolerance, f"fused_forward={fused}: d{name} {err:.2e}"


@pytest.mark.parametrize("case", [Case("none", T=100, K=32, V=16), Case("scalar", T=104, H=1, seqlens=(80, 23, 1)),
                                  Case("scalar", T=70, K=80, V=16, chunk_size=32),
                                  Case("channel", T=40, K=48, V=16, H=1, chunk_size=32)], ids=str)
@pytest.mark.parametrize("fused", [0, 1])
def test_forward_computes_the_norms_in_the_first_kernels_that_read_q_and_k(case, fused, record_launches):
    """l2norm_k / l2norm_q: 1 / ||k|| comes from wy_solve and 1 / ||q|| from the output
    kernel (the one pass, or chunk_output_fwd: fused_forward 1 / 0), or both from the
    scores kernel with a per-channel gate, which read k and q anyway, and not from passes
    of their own: the values inverse_norms computes (to rounding: summed over K blocks),
    for every token (poisoned buffers), handed to the backward in Saved; the op launches
    no inverse_norms."""
    torch.manual_seed(3)
    q, k, v, beta, g, h0, cu_seqlens = make_inputs(case)
    q = 3 * torch.randn(q.shape, device=q.device)
    k = 2 * torch.randn(k.shape, device=k.device)
    module = ChunkDeltaFunction.module_for(DeltaKernelSpec("kda" if case.gate == "channel" else "delta", case.gate))
    config = {"fused_forward": fused}
    o, _, saved = module.forward(q, k, v, beta, g, h0, cu_seqlens, False, chunk_size=case.chunk_size,
                                 poison=True, keep=True, l2norm_q=True, l2norm_k=True, config=config)
    for name, x, norm in (("k", k, saved.k_norm), ("q", q, saved.q_norm)):
        expected = module.inverse_norms(x)
        assert torch.isfinite(norm).all() and torch.allclose(norm, expected, rtol=1e-6), name
    given, _ = module.forward(q, k, v, beta, g, h0, cu_seqlens, False, chunk_size=case.chunk_size, poison=True,
                              q_norm=module.inverse_norms(q), k_norm=module.inverse_norms(k), config=config)
    assert rel_rms(o, given) <= 1e-6
    for name in "qk":
        with pytest.raises(ValueError, match=f"computes {name}_norm itself"):
            module.forward(q, k, v, beta, g, h0, cu_seqlens, False, **{f"{name}_norm": saved.k_norm,
                                                                     f"l2norm_{name}": True})

    leaves = [None if x is None else x.detach().clone().requires_grad_() for x in (q, k, v, beta, g, h0)]
    with record_launches() as launched:
        out, _ = chunk_delta(*leaves, cu_seqlens, output_final_state=False, chunk_size=case.chunk_size,
                             l2norm_q=True, l2norm_k=True, config=config)
        out.backward(torch.randn_like(out))
    assert launched and not any(n.endswith("inverse_norms") for n in launched), launched


def test_inverse_norms_are_checked():
    module = ChunkDeltaFunction.module_for(DeltaKernelSpec("delta", "scalar"))
    q, k, v, beta, g, h0, cu = make_inputs(Case("scalar", T=20, K=16, V=16))
    with pytest.raises(ValueError, match=r"k_norm is torch.float64 \(1, 20, 2\)"):
        module.forward(q, k, v, beta, g, h0, cu, False, k_norm=torch.ones(1, 20, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"q_norm .* expected float32 \[B, T, H\]"):
        module.forward(q, k, v, beta, g, h0, cu, False, q_norm=torch.ones(1, 20, 3))
    channel = ChunkDeltaFunction.module_for(DeltaKernelSpec("kda", "channel"))
    q, k, v, beta, g, h0, cu = make_inputs(Case("channel", T=20, K=16, V=16))
    with pytest.raises(ValueError, match=r"k_norm is torch.float32 \(1, 20\)"):
        channel.forward(q, k, v, beta, g, h0, cu, False, k_norm=torch.ones(1, 20))


@pytest.mark.parametrize("case", [Case("channel", T=100, K=32, V=16, H=1), Case("channel", T=104, H=1, seqlens=(1, 80, 23)),
                                  Case("scalar", T=100, K=16, V=32), Case("none", T=40, K=16, V=16)], ids=str)
def test_backward_reuses_the_forwards_cumulated_gate_and_scores(case, record_launches):
    """forward(keep=True) hands the backward its cumulated gate, each chunk's inverse and
    (per-channel gate) its intra-chunk scores: the gradients are those of a backward that
    computes them again, bit for bit, the backward uses the inverse it is given, and the
    op's backward launches no cumsum and no scores kernel (a per-channel gate's scores are
    kept; the other kernels compute theirs from Q and K tiles)."""
    torch.manual_seed(0)
    q, k, v, beta, g, h0, cu_seqlens = make_inputs(case)
    module = ChunkDeltaFunction.module_for(DeltaKernelSpec("delta", case.gate))
    o, ht, saved = module.forward(q, k, v, beta, g, h0, cu_seqlens, True, poison=True, keep=True)
    channel = case.gate == "channel"
    assert (saved.gate is None) == (g is None)
    assert (saved.kk_scores is not None) == channel and (saved.qk_scores is not None) == channel
    if g is not None and cu_seqlens is None:
        chunks = [piece.cumsum(1) for piece in g.split(case.chunk_size, dim=1)]
        assert torch.allclose(saved.gate, torch.cat(chunks, 1), atol=1e-5), "not the chunk-local cumsum"
    assert saved.inverse is not None and torch.isfinite(saved.inverse).all()
    do, dht = torch.randn_like(o), torch.randn_like(ht)
    recomputed = module.backward(q, k, v, beta, g, h0, cu_seqlens, do, dht, poison=True)
    reused = module.backward(q, k, v, beta, saved.gate, h0, cu_seqlens, do, dht, poison=True, saved=saved)
    for label, a, b in zip("dq dk dv dbeta dg dh0".split(), recomputed, reused):
        assert (a is None) == (b is None), label
        if a is not None:
            assert torch.isfinite(b).all() and torch.equal(a, b), f"{label} differs with the saved tensors"
    # the backward takes the forward's inverse instead of solving again: another Z, other gradients
    other = saved._replace(inverse=saved.inverse * 0.5)
    changed = module.backward(q, k, v, beta, saved.gate, h0, cu_seqlens, do, dht, saved=other)
    assert not torch.allclose(changed[2], reused[2]), "the saved inverse was not used"

    leaves = [None if x is None else x.detach().clone().requires_grad_() for x in (q, k, v, beta, g, h0)]
    with record_launches() as launched:
        out, _ = chunk_delta(*leaves, cu_seqlens, output_final_state=True)
        forward = list(launched)
        launched.clear()
        out.backward(torch.randn_like(out))
    assert forward and launched, "no kernel launch was recorded"
    assert not any(n.endswith("gate_cumsum") for n in launched), launched
    assert not any(n.endswith("_intra_scores") for n in launched), launched


@pytest.mark.parametrize("case", [Case("none", T=75, K=32, V=16, H=1, chunk_size=16),
                                  Case("scalar", T=75, K=16, V=32, H=1, chunk_size=16),
                                  Case("channel", T=75, K=32, V=16, H=1, chunk_size=16)], ids=str)
def test_backward_starts_from_the_forwards_group_maps(case, record_launches):
    """In groups of chunks the forward keeps its phase 1 (each group's map of the state,
    L_g and M_g: `Saved.groups`), and the backward's recompute of the chunk states runs
    phase 2 through it: the gradients of one that runs phase 1 again (with a per-channel
    gate from k and the cumulated gate instead of the decayed keys: to rounding), one
    chunk_state_fwd launch fewer, and the kept maps are read (changed, the gradients
    change)."""
    q, k, v, beta, g, h0, cu_seqlens = make_inputs(case)
    module = ChunkDeltaFunction.module_for(DeltaKernelSpec("delta", case.gate))
    options = dict(chunk_size=case.chunk_size, input_precision="ieee", poison=True, config={"state_group": 2})
    o, ht, saved = module.forward(q, k, v, beta, g, h0, cu_seqlens, True, keep=True, **options)
    groups = saved.groups
    rows = case.B * case.H * 3  # 5 chunks: groups of 2, 2 and 1
    assert groups is not None and groups.size == 2
    assert groups.states.shape == (rows, case.K, case.V) and groups.transitions.shape == (rows, case.K, case.K)
    assert torch.isfinite(groups.states).all() and torch.isfinite(groups.transitions).all()
    do, dht = torch.randn_like(o), torch.randn_like(ht)

    def backward(saved):
        with record_launches() as launched:
            grads = module.backward(q, k, v, beta, saved.gate, h0, cu_seqlens, do, dht, saved=saved, **options)
        return grads, sum(name.endswith("chunk_state_fwd") for name in launched)

    (reused, launches), (recomputed, launches_again) = backward(saved), backward(saved._replace(groups=None))
    assert (launches, launches_again) == (1, 2)
    for label, a, b in zip("dq dk dv dbeta dg dh0".split(), reused, recomputed):
        assert (a is None) == (b is None), label
        if a is not None:
            assert torch.isfinite(a).all() and rel_rms(a, b) <= 1e-6, f"{label}: {rel_rms(a, b):.2e}"
    for changed in (groups._replace(states=groups.states + 1), groups._replace(transitions=groups.transitions + 1)):
        grads, _ = backward(saved._replace(groups=changed))
        assert rel_rms(grads[0], reused[0]) > 1e-2, "the backward did not read the kept group maps"

    # kept for a backward in other groups, they are refused
    with pytest.raises(ValueError, match="groups of 2 chunks, this backward's in groups of 1; pass the forward's"):
        module.backward(q, k, v, beta, saved.gate, h0, cu_seqlens, do, dht, saved=saved,
                        **{**options, "config": {"state_group": 1}})
    with pytest.raises(ValueError, match="this backward's in one program per sequence"):
        module.backward(q, k, v, beta, saved.gate, h0, cu_seqlens, do, dht, saved=saved,
                        **{**options, "config": {"state_group": 0}})
    with pytest.raises(ValueError, match=rf"saved.groups.transitions: expected shape \({rows}, {case.K}, {case.K}\)"):
        module.backward(q, k, v, beta, saved.gate, h0, cu_seqlens, do, dht, **options,
                        saved=saved._replace(groups=groups._replace(transitions=groups.states)))
    # without groups nothing is kept
    assert module.forward(q, k, v, beta, g, h0, cu_seqlens, True, keep=True,
                          **{**options, "config": {"state_group": 0}})[2].groups is None


def test_saved_tensors_must_fit_the_backward():
    case = Case("channel", T=64, K=16, V=16)
    q, k, v, beta, g, h0, _ = make_inputs(case)
    module = ChunkDeltaFunction.module_for(DeltaKernelSpec("delta", "channel"))
    o, _, saved = module.forward(q, k, v, beta, g, h0, None, False, keep=True, chunk_size=32)
    do = torch.randn_like(o)
    with pytest.raises(ValueError, match="chunk size 32, this backward runs with 64"):
        module.backward(q, k, v, beta, g, h0, None, do, None, saved=saved)
    with pytest.raises(ValueError, match=r"saved.gate: expected the cumulated g of shape \(1, 64, 2, 16\)"):
        module.backward(q, k, v, beta, g, h0, None, do, None, chunk_size=32, saved=saved._replace(gate=g[:, :32]))
    with pytest.raises(ValueError, match=r"saved.inverse: expected the forward's \[B, T, H, chunk_size\] = \(1, 64, 2, 32\)"):
        module.backward(q, k, v, beta, g, h0, None, do, None, chunk_size=32,
                        saved=saved._replace(inverse=saved.inverse[:, :32]))
    with pytest.raises(ValueError, match="saved.kk_scores, saved.qk_scores: expected the forward's"):
        module.backward(q, k, v, beta, g, h0, None, do, None, chunk_size=32, saved=saved._replace(kk_scores=None))
    with pytest.raises(ValueError, match="expected the Saved that forward"):
        module.backward(q, k, v, beta, g, h0, None, do, None, chunk_size=32, saved=tuple(saved))


@pytest.mark.parametrize("norms", [False, True], ids=["raw", "l2norm"])
@pytest.mark.parametrize("case", [Case("none", T=100, K=32, V=16), Case("scalar", T=104, K=48, V=16, H=1,
                                                                         seqlens=(80, 23, 1))], ids=str)
def test_chunk_bwd_wy_finishes_dq_and_dk(case, norms, record_launches):
    """With no per-channel gate and whole rows of K in one program, chunk_bwd_wy adds the
    intra-chunk score terms to dq and dk itself (and makes l2norm's input gradients): the
    gradients chunk_bwd_intra makes after it (fused_backward=0), to rounding, with one
    launch fewer and no score gradient dL through memory."""
    torch.manual_seed(5)
    q, k, v, beta, g, h0, cu_seqlens = make_inputs(case)
    module = ChunkDeltaFunction.module_for(DeltaKernelSpec("delta", case.gate))
    options = dict(input_precision="ieee", poison=True)
    if norms:  # (unnormalised keys this long would make the recurrence grow without bound)
        q, k = 3 * torch.randn(q.shape, device=q.device), 2 * torch.randn(k.shape, device=k.device)
        options.update(q_norm=module.inverse_norms(q), k_norm=module.inverse_norms(k))
    o, ht = module.forward(q, k, v, beta, g, h0, cu_seqlens, True, **options)
    do, dht = torch.randn_like(o), torch.randn_like(ht)

    def backward(fused):
        with record_launches() as launched:
            grads = module.backward(q, k, v, beta, g, h0, cu_seqlens, do, dht, config={"fused_backward": fused},
                                    **options)
        return grads, [name.split("_S_")[-1] if "_S_" in name else name for name in launched]

    (fused, launched), (apart, launched_apart) = backward(1), backward(0)
    assert "chunk_bwd_intra" not in " ".join(launched) and not any("l2norm" in n for n in launched), launched
    assert any(n.endswith("chunk_bwd_intra") for n in launched_apart), launched_apart
    assert len(launched) == len(launched_apart) - 1
    for label, a, b in zip("dq dk dv dbeta dg dh0".split(), fused, apart):
        assert (a is None) == (b is None), label
        if a is not None:
            assert torch.isfinite(a).all() and rel_rms(a, b) <= 1e-6, f"{label}: {rel_rms(a, b):.2e}"
    with pytest.raises(ValueError, match="fused_backward=2: expected 0 or 1"):
        module.backward(q, k, v, beta, g, h0, cu_seqlens, do, dht, config={"fused_backward": 2})
