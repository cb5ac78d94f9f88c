"""chunk_diag (diagonal-transition family), both backends, against an fp64 per-token loop.

The golden model below is written independently of the chunk code: it runs the recurrence
one token at a time in fp64 and gets its gradients from autograd. Errors are relative RMS,
||a - b|| / ||b||. Triton runs in its interpreter here (conftest.py), with outputs and
intermediate buffers NaN-poisoned so that any element no kernel wrote shows up.
"""
from __future__ import annotations

import dataclasses
import re

import pytest
import torch
import torch.nn.functional as F

from attnc.codegen.chunk_diag import DiagKernelSpec, chunk_diag_torch, render
from attnc.runtime.chunk_diag_op import InputMap, chunk_diag, kernel_spec
from attnc.runtime.loader import load_module

FP32_TOLERANCE = 1e-4
BF16_TOLERANCE = 2e-2

# On a GPU the kernels run compiled; without one, in the interpreter on CPU tensors.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def naive_recurrence(q, k, v, g, gv, h0, cu_seqlens, exclusive):
    """fp64 per-token loop: S_t = diag(e^g_t) S_{t-1} diag(e^gv_t) + k_t v_t^T,
    o_t = q_t^T S_t (or S_{t-1} when exclusive). Returns (o, final states)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    if cu_seqlens is None:
        spans = [(b, 0, T) for b in range(B)]
    else:
        bounds = cu_seqlens.tolist()
        spans = [(0, bos, eos) for bos, eos in zip(bounds[:-1], bounds[1:])]
    pieces, finals = [], []
    for n, (b, bos, eos) in enumerate(spans):
        state = h0[n].double() if h0 is not None else q.new_zeros(H, K, V, dtype=torch.float64)
        rows = [q.new_zeros(0, H, V, dtype=torch.float64)]
        for t in range(bos, eos):
            before = state
            if g is not None:
                decay = g[b, t].double().exp()
                state = state * (decay[:, :, None] if g.dim() == 4 else decay[:, None, None])
            if gv is not None:
                state = state * gv[b, t].double().exp()[:, None, :]
            state = state + k[b, t].double()[:, :, None] * v[b, t].double()[:, None, :]
            read = before if exclusive else state
            rows.append(torch.einsum("hk,hkv->hv", q[b, t].double(), read)[None])
        pieces.append(torch.cat(rows))
        finals.append(state)
    outputs = torch.stack(pieces) if cu_seqlens is None else torch.cat(pieces)[None]
    return outputs, torch.stack(finals)


def rel_rms(actual, expected):
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


@dataclasses.dataclass(frozen=True)
class Case:
    gate: str = "none"            # none | scalar | channel
    vgate: bool = False
    exclusive: bool = False
    T: int = 64
    K: int = 16
    V: int = 32
    B: int = 1
    H: int = 2
    h0: bool = True
    final: bool = True
    dtype: torch.dtype = torch.float32
    seqlens: tuple[int, ...] | None = None   # varlen: sequence lengths packed along T
    strong: bool = False          # log gates of -20 per step on about half the entries
    chunk_size: int = 64

    def __str__(self):
        parts = [self.gate, "vgate" if self.vgate else "", "excl" if self.exclusive else "",
                 f"T{self.T}", f"K{self.K}V{self.V}", "h0" if self.h0 else "", "ht" if self.final else "",
                 "bf16" if self.dtype == torch.bfloat16 else "", f"varlen{list(self.seqlens)}" if self.seqlens else "",
                 "strong" if self.strong else "", f"C{self.chunk_size}" if self.chunk_size != 64 else ""]
        return "-".join(p for p in parts if p)


CASES = [
    Case("none", T=1, K=16, V=32),
    Case("none", exclusive=True, T=17, K=32, V=16, h0=False),
    Case("none", vgate=True, T=100, K=32, V=16, final=False),
    Case("none", vgate=True, exclusive=True, T=1, K=64, V=64),
    Case("scalar", T=64, K=64, V=64, final=False, B=2, H=1),
    Case("scalar", exclusive=True, T=100, K=16, V=32),
    Case("scalar", vgate=True, T=17, K=32, V=16, h0=False),
    Case("scalar", vgate=True, exclusive=True, T=200, K=16, V=32, B=2, H=1),
    Case("channel", T=100, K=32, V=16),
    Case("channel", exclusive=True, T=200, K=16, V=32, final=False),
    Case("channel", vgate=True, T=64, K=16, V=32, h0=False, final=False),
    Case("channel", vgate=True, exclusive=True, T=100, K=32, V=16, B=2, H=1),
    Case("channel", vgate=True, T=17, K=64, V=64, H=1),
    # sizes that are not powers of two, and a smaller chunk
    Case("channel", vgate=True, T=40, K=48, V=96, H=1),
    Case("scalar", T=100, K=32, V=16, chunk_size=32),
    # varlen: three sequences of unequal lengths, chunks never crossing a boundary
    Case("none", T=104, seqlens=(23, 1, 80)),
    Case("scalar", exclusive=True, T=104, seqlens=(80, 23, 1), final=False),
    Case("channel", vgate=True, T=104, seqlens=(1, 80, 23)),
    Case("channel", vgate=True, exclusive=True, T=104, seqlens=(23, 80, 1), h0=False),
    # more than 32 chunks in a sequence: the gate gradient's carries scan several blocks
    Case("channel", T=600, K=16, V=16, H=1, chunk_size=16),
    Case("scalar", exclusive=True, T=620, K=80, V=16, H=1, seqlens=(17, 590, 13), chunk_size=16, h0=False),
    # bf16 inputs
    Case("scalar", vgate=True, T=100, K=32, V=16, dtype=torch.bfloat16),
    Case("channel", exclusive=True, T=100, K=16, V=32, dtype=torch.bfloat16),
    # strong gates: no inf/NaN, still accurate
    Case("scalar", T=512, K=16, V=16, H=1, strong=True),
    Case("channel", vgate=True, T=512, K=16, V=16, H=1, strong=True),
    Case("channel", exclusive=True, T=512, K=16, V=16, H=1, strong=True),
]


def make_inputs(case: Case):
    B, T, H, K, V = case.B, case.T, case.H, case.K, case.V
    if case.seqlens:
        B = 1
        assert sum(case.seqlens) == T
    N = len(case.seqlens) if case.seqlens else B

    def log_gate(*shape):
        # log-sigmoid of shifted normals: decays mostly mild, some strong
        gate = F.logsigmoid(torch.randn(*shape) + 1.5)
        if case.strong:
            gate = torch.where(torch.rand(*shape) < 0.5, torch.full_like(gate, -20.0), gate)
        return gate

    q = (torch.randn(B, T, H, K) / K ** 0.5).to(case.dtype)
    k = torch.randn(B, T, H, K).to(case.dtype)
    v = torch.randn(B, T, H, V).to(case.dtype)
    g = {"none": None, "scalar": log_gate(B, T, H), "channel": log_gate(B, T, H, K)}[case.gate]
    gv = log_gate(B, T, H, V) if case.vgate else None
    h0 = torch.randn(N, H, K, V) if case.h0 else None
    cu_seqlens = None
    if case.seqlens:
        cu_seqlens = torch.tensor([0, *torch.tensor(case.seqlens).cumsum(0).tolist()], dtype=torch.int32)
    return tuple(None if x is None else x.to(DEVICE) for x in (q, k, v, g, gv, h0, cu_seqlens))


def run_and_differentiate(fn, inputs, do, dht):
    """(o, ht, grads of q, k, v, g, gv, h0) for a random cotangent on o and on ht."""
    leaves = [None if x is None else x.detach().clone().requires_grad_() for x in inputs[:6]]
    o, ht = fn(*leaves, inputs[6])
    loss = (o.double() * do).sum()
    if dht is not None:
        loss = loss + (ht.double() * dht).sum()
    wrt = [x for x in leaves if x is not None]
    grads = iter(torch.autograd.grad(loss, wrt))
    return o, ht, [None if x is None else next(grads) for x in leaves]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_naive_recurrence(case: Case, backend: str):
    inputs = make_inputs(case)
    q, k, v, g, gv, h0, cu_seqlens = inputs

    def golden(q, k, v, g, gv, h0, cu_seqlens):
        return naive_recurrence(q, k, v, g, gv, h0, cu_seqlens, case.exclusive)

    def under_test(q, k, v, g, gv, h0, cu_seqlens):
        return chunk_diag(q, k, v, g, gv, h0, cu_seqlens, exclusive=case.exclusive,
                          output_final_state=case.final, chunk_size=case.chunk_size, backend=backend,
                          input_precision="ieee", poison=True)

    ref_o, ref_ht = golden(*[None if x is None else x.double() for x in inputs[:6]], cu_seqlens)
    do = torch.randn_like(ref_o)
    dht = torch.randn_like(ref_ht) if case.final else None
    ref_o, ref_ht, ref_grads = run_and_differentiate(golden, inputs, do, dht)
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
    for label, grad, ref, x in zip(("q", "k", "v", "g", "gv", "h0"), grads, ref_grads, inputs):
        if x is None:
            assert grad is None
            continue
        assert grad.shape == x.shape and grad.dtype == x.dtype, label
        assert torch.isfinite(grad).all(), f"d{label} has NaN/inf"
        err = rel_rms(grad, ref)
        assert err <= tolerance, f"d{label}: rel RMS {err:.2e} > {tolerance}"


# The forward comes in two forms (`fused_forward` in the launchers' config): chunk states
# through memory (chunk_state_fwd, then chunk_output_fwd), or one pass holding the state in
# registers (chunk_fused_fwd). Each structure, varlen, strong gates and K not a power of two,
# in both: outputs and final states against the recurrence, the two forms against each other.
FORWARD_CASES = [CASES[i] for i in (0, 1, 3, 5, 7, 8, 11, 13, 14, 16, 18, 20, 22, 23, 24, 25)]


@pytest.mark.parametrize("case", FORWARD_CASES, ids=str)
def test_one_pass_and_chunked_forwards_match_the_recurrence(case):
    inputs = make_inputs(case)
    q, k, v, g, gv, h0, cu_seqlens = inputs
    ref_o, ref_ht = naive_recurrence(*[None if x is None else x.double() for x in inputs[:6]], cu_seqlens,
                                     case.exclusive)
    scale = 1.0 if case.vgate else 0.5  # (a V-side gate takes no scale)
    bf16 = case.dtype == torch.bfloat16
    results = {}
    for fused in (0, 1):
        o, ht = chunk_diag(q, k, v, g, gv, h0, cu_seqlens, exclusive=case.exclusive, output_final_state=True,
                           chunk_size=case.chunk_size, input_precision="ieee", poison=True, scale=scale,
                           out_dtype=case.dtype, config={"fused_forward": fused})
        assert o.dtype == case.dtype and torch.isfinite(o).all() and torch.isfinite(ht).all()
        tolerance = BF16_TOLERANCE if bf16 else FP32_TOLERANCE
        err = rel_rms(o, ref_o * scale)
        assert err <= tolerance, f"fused_forward={fused}: o {err:.2e}"
        assert rel_rms(ht, ref_ht) <= tolerance, f"fused_forward={fused}: ht {rel_rms(ht, ref_ht):.2e}"
        results[fused] = (o.double(), ht.double())
    # the same sums in another order (o rounded to bf16 once more where it is stored in bf16)
    for chunked, one_pass in zip(results[0], results[1]):
        assert rel_rms(one_pass, chunked) <= (2e-3 if bf16 else FP32_TOLERANCE / 10)


def test_one_pass_forward_default_fills_the_gpu_and_fits_shared_memory():
    """On a GPU the one-pass forward is the default where programs (sequences x heads x V
    blocks) fill an H100's 132 SMs twice and K <= 128; its pipeline keeps to the stages that
    fit in shared memory (227 KiB on sm_90)."""
    from attnc.runtime.chunk_diag_op import ChunkDiagFunction

    def plan(gate, K=128, V=128, H=16, chunk_size=64, **config):
        q = torch.empty(1, 1, H, K, dtype=torch.bfloat16, device="meta")
        v = torch.empty(1, 1, H, V, dtype=torch.bfloat16, device="meta")
        module = ChunkDiagFunction.module_for(DiagKernelSpec("plan_" + gate, gate))
        return module._Plan(q, v, None, chunk_size, False, "tf32", False, config or None)

    scalar = plan("scalar")
    assert scalar.one_pass_by_default(sequences=16, multiprocessors=132)       # 1024 programs
    assert not scalar.one_pass_by_default(sequences=1, multiprocessors=132)    # T = 32768, B = 1
    assert not plan("scalar", K=256).one_pass_by_default(sequences=64, multiprocessors=132)
    sm90 = 232448
    assert scalar.one_pass_stages_fitting(2, sm90) >= 3            # 36 KiB a stage
    assert plan("channel").one_pass_stages_fitting(2, sm90) == 2    # 84 KiB a stage
    assert plan("channel").one_pass_stages_fitting(2, 101376) == 0  # sm_89: chunk states instead
    assert scalar.fused_forward_asked is None and plan("scalar", fused_forward=0).fused_forward_asked == 0


def test_state_passes_spread_few_sequences_over_the_gpu():
    """With few sequences the state passes' V block narrows (to 16 at the least) until their
    programs (sequences x heads x K blocks x V blocks) fill an H100's 132 SMs twice; a
    config's state_block_v stands, and the interpreter keeps the default."""
    from attnc.runtime.chunk_diag_op import ChunkDiagFunction

    module = ChunkDiagFunction.module_for(DiagKernelSpec("plan_scalar", "scalar"))

    def plan(B, interpret=False, **config):
        q = torch.empty(B, 1, 16, 128, dtype=torch.bfloat16, device="meta")
        return module._Plan(q, q, None, 64, interpret, "tf32", False, config or None)

    assert plan(16).state_block_v == 64      # 16 x 16 x 2 x 2 = 1024 programs
    assert plan(1).state_block_v == 16       # 16 x 2 x 8 = 256 programs (64 with 64-wide blocks)
    assert plan(4).state_block_v == 32       # 64 x 2 x 4 = 512 (256 with 64-wide blocks < 264)
    assert plan(8).state_block_v == 64       # 128 x 2 x 2 = 512
    assert plan(1, state_block_v=64).state_block_v == 64
    assert plan(1, interpret=True).state_block_v == 64


# The state passes in groups of chunks (`state_group`): each group from a zero state
# (phase 1), then each from h0 through the groups before it (phase 2); the backward's
# reverse pass the same way from the end. Every gate
# structure, the last group and the last chunk partial, a per-channel gate's decayed keys
# (the forward) and its cumulated gate (the backward's recompute), bf16.
GROUPED_CASES = [Case("none", T=150, K=16, V=32, chunk_size=16),
                 Case("scalar", exclusive=True, T=150, K=16, V=32, B=2, H=1, chunk_size=16),
                 Case("channel", vgate=True, T=150, K=32, V=16, H=1, chunk_size=16),
                 Case("channel", T=150, K=80, V=16, H=1, chunk_size=16),  # two K blocks, one padded
                 Case("none", vgate=True, T=150, K=16, V=16, H=1, h0=False, chunk_size=16),
                 Case("scalar", T=150, K=16, V=16, H=1, chunk_size=16, dtype=torch.bfloat16)]


@pytest.mark.parametrize("one_pass", [0, 1], ids=["two_pass", "one_pass"])
@pytest.mark.parametrize("case", GROUPED_CASES, ids=str)
def test_state_pass_in_groups_matches_the_recurrence(case, one_pass, record_launches):
    """state_group=4 over 10 chunks (groups of 4, 4 and 2): outputs, final state and every
    gradient against the recurrence, and the forward against the ungrouped pass; each state
    pass runs in two launches, the forward's and the backward's reverse pass, and the
    backward's recompute of the chunk states in one, phase 2 from the forward's phase 1.
    With the one pass (fused_forward=1) the forward's phase 2 is chunk_fused_fwd, one
    program per group."""
    inputs = make_inputs(case)

    def golden(q, k, v, g, gv, h0, cu_seqlens):
        return naive_recurrence(q, k, v, g, gv, h0, cu_seqlens, case.exclusive)

    def under_test(group):
        def call(q, k, v, g, gv, h0, cu_seqlens):
            return chunk_diag(q, k, v, g, gv, h0, cu_seqlens, exclusive=case.exclusive, output_final_state=True,
                              chunk_size=case.chunk_size, input_precision="ieee", poison=True,
                              config={"fused_forward": one_pass, "state_group": group})
        return call

    ref_o, ref_ht = golden(*[None if x is None else x.double() for x in inputs[:6]], inputs[6])
    do, dht = torch.randn_like(ref_o), torch.randn_like(ref_ht)
    ref_o, ref_ht, ref_grads = run_and_differentiate(golden, inputs, do, dht)
    with record_launches() as launched:
        o, ht, grads = run_and_differentiate(under_test(4), inputs, do, dht)
    assert sum(name.endswith("chunk_state_fwd") for name in launched) == 3 - one_pass, launched
    assert sum(name.endswith("chunk_fused_fwd") for name in launched) == one_pass, launched
    assert sum(name.endswith("chunk_state_bwd") for name in launched) == 2, launched
    tolerance = BF16_TOLERANCE if case.dtype == torch.bfloat16 else FP32_TOLERANCE
    assert rel_rms(o, ref_o) <= tolerance, f"o {rel_rms(o, ref_o):.2e}"
    assert rel_rms(ht, ref_ht) <= tolerance, f"ht {rel_rms(ht, ref_ht):.2e}"
    for label, grad, ref in zip(("q", "k", "v", "g", "gv", "h0"), grads, ref_grads):
        if ref is not None:
            assert rel_rms(grad, ref) <= tolerance, f"d{label}: {rel_rms(grad, ref):.2e}"
    whole_o, whole_ht = under_test(0)(*inputs)
    assert rel_rms(o, whole_o) <= (2e-3 if case.dtype == torch.bfloat16 else FP32_TOLERANCE / 10)
    assert rel_rms(ht, whole_ht) <= FP32_TOLERANCE / 10


def test_state_pass_groups_long_sequences_on_a_gpu():
    """On a GPU the state passes and the one pass take groups of STATE_GROUP (64) chunks where
    a sequence has at least twice as many (T = 32768 at chunk size 64: 8 groups), not for
    shorter ones, varlen calls or in the interpreter; a config's state_group stands (0: none)
    and is checked."""
    from attnc.runtime.chunk_diag_op import ChunkDiagFunction

    module = ChunkDiagFunction.module_for(DiagKernelSpec("plan_scalar", "scalar"))

    def plan(B, T, interpret=False, cu_seqlens=None, **config):
        q = torch.empty(B, T, 16, 128, dtype=torch.bfloat16, device="meta")
        return module._Plan(q, q, cu_seqlens, 64, interpret, "tf32", False, config or None)

    assert module.STATE_GROUP == 64
    assert plan(1, 32768).state_group_size() == 64
    assert plan(1, 8192).state_group_size() == 64      # 128 chunks: two groups
    assert plan(16, 2048).state_group_size() == 0      # 32 chunks
    assert plan(1, 32768, interpret=True).state_group_size() == 0
    assert plan(1, 32768, state_group=0).state_group_size() == 0
    assert plan(1, 32768, interpret=True, state_group=16).state_group_size() == 16
    with pytest.raises(ValueError, match="state_group=3: expected 0 or a power of two"):
        plan(1, 32768, state_group=3)
    # the forward in one pass where its programs, one per group, fill the GPU (16 heads x 8
    # groups x 4 V blocks at T = 32768); over whole sequences 16 x 4 programs do not
    assert plan(1, 32768).fused_forward == 1
    assert plan(1, 32768, state_group=0).fused_forward == 0
    assert plan(1, 4096).fused_forward == 0            # one group of 64 chunks: 64 programs


def test_forms_in_the_config_are_checked():
    case = Case("scalar", T=20)
    q, k, v, g, gv, h0, cu_seqlens = make_inputs(case)
    for key in ("fused_forward", "diag_loop", "exact_diag", "whole_chunk"):
        for bad in (2, -1, 0.5, "1"):
            with pytest.raises(ValueError, match=key):
                chunk_diag(q, k, v, g, gv, h0, cu_seqlens, exclusive=False, output_final_state=False,
                           config={key: bad})


def check_configs_against_the_recurrence(case, inputs, configs):
    """chunk_diag under each config against the fp64 recurrence (o, the final state if the
    case asks for it, every gradient), and the configs' results against each other: the
    same sums in another order."""
    ref_o, ref_ht = naive_recurrence(*[None if x is None else x.double() for x in inputs[:6]], inputs[6],
                                     case.exclusive)
    do = torch.randn_like(ref_o)
    dht = torch.randn_like(ref_ht) if case.final else None

    def golden(*xs):
        return naive_recurrence(*xs, case.exclusive)

    _, _, ref_grads = run_and_differentiate(golden, [None if x is None else x.double() for x in inputs[:6]]
                                            + [inputs[6]], do, dht)
    results = []
    for config in configs:
        def under_test(q, k, v, g, gv, h0, cu_seqlens):
            return chunk_diag(q, k, v, g, gv, h0, cu_seqlens, exclusive=case.exclusive,
                              output_final_state=case.final, chunk_size=case.chunk_size, input_precision="ieee",
                              poison=True, config=config)

        o, ht, grads = run_and_differentiate(under_test, inputs, do, dht)
        assert rel_rms(o, ref_o) <= FP32_TOLERANCE, f"{config}: o {rel_rms(o, ref_o):.2e}"
        if case.final:
            assert rel_rms(ht, ref_ht) <= FP32_TOLERANCE, f"{config}: ht {rel_rms(ht, ref_ht):.2e}"
        labelled = [(label, grad, ref) for label, grad, ref in zip(("q", "k", "v", "g", "gv", "h0"), grads, ref_grads)
                    if ref is not None]
        for label, grad, ref in labelled:
            err = rel_rms(grad, ref)
            assert torch.isfinite(grad).all() and err <= FP32_TOLERANCE, f"{config}: d{label} {err:.2e}"
        results.append([o] + [grad for _, grad, _ in labelled])
    for one_form, other in zip(results[0], results[1]):
        assert rel_rms(other.double(), one_form.double()) <= FP32_TOLERANCE / 10


# A per-channel gate's exact diagonal sub-blocks come in two forms (`diag_loop` in the
# config): DIAG_COLUMNS columns at a time as 3-d tensors (0, the interpreter's default), or
# one column at a time (1, a GPU's). Each against the recurrence, values and gradients, and
# against each other: the K-side gate (scores, dq, dk, the gate gradient's identity), the
# V-side gate (the output and dv kernels), exclusive readout, varlen, strong gates (exact
# sub-blocks: factored ones, where spans are small, use neither form), K not a power of two,
# both forward forms.
@pytest.mark.parametrize("case, fused", [
    (Case("channel", T=80, K=32, V=16, H=1), 1),
    (Case("channel", vgate=True, exclusive=True, T=56, seqlens=(9, 46, 1), H=1), 0),
    (Case("channel", vgate=True, T=40, K=48, V=96, H=1), 1),
    (Case("channel", exclusive=True, T=100, K=16, V=16, H=1, strong=True), 0),
    (Case("none", vgate=True, T=70, K=32, V=16, H=1, final=False), 1),
], ids=str)
def test_diagonal_sub_blocks_column_by_column_match_the_recurrence(case, fused):
    check_configs_against_the_recurrence(case, make_inputs(case), [
        {"diag_loop": diag_loop, "exact_diag": 1, "fused_forward": fused} for diag_loop in (0, 1)])


def span_gates(*shape, strong_channels_from=None, chunk_span=19.2):
    """Per-channel log gates that take every path of the diagonal sub-blocks, 64-token chunks
    in turn (the tests' chunk size):
    - even chunks span chunk_span as a whole (in half the channels; gla-like gates in the
      others): by default just under DIAG_SPAN_LIMIT, one matmul for the chunk with factors
      up to e^19.2; just over it (20.8), by sub-chunks of span 5.2;
    - odd chunks by 16-token sub-chunks in turn: mild (a span of a few units), just under
      the limit (-1.2 per token: 19.2), over it (-1.5 per token: 24, exact), mild. With
      strong_channels_from, the channels from there on are over the limit in the mild
      sub-chunks too, so that blocks of channels decide differently in one sub-chunk."""
    T, channels = shape[1], torch.arange(shape[-1])
    token = torch.arange(T).view(1, T, *([1] * (len(shape) - 2)))
    odd_chunk, turn = token // 64 % 2 == 1, token // 16 % 4
    whole = torch.where(channels < shape[-1] // 2, -chunk_span / 64, F.logsigmoid(torch.randn(*shape)) / 16)
    mild = F.logsigmoid(torch.randn(*shape) + 1.5)
    if strong_channels_from is not None:
        mild = torch.where(channels >= strong_channels_from, torch.full(shape, -2.0), mild)
    by_sub_chunks = torch.where(turn == 1, -1.2, torch.where(turn == 2, -1.5, mild))
    return torch.where(odd_chunk, by_sub_chunks, whole).to(DEVICE)


# A per-channel gate's diagonal sub-blocks join the matmul beside them where their span (the
# decay across the sub-chunk's tokens) is under DIAG_SPAN_LIMIT, and are exact elsewhere
# (`exact_diag=1`: everywhere); where a whole chunk spans under the limit the scores and
# dq / dk kernels take it in one matmul. Gates with chunks and sub-chunks on both sides of
# the limit, and just under it, in one call: both settings against the recurrence, values
# and gradients, and against each other; the K-side gate (scores, dq, dk, the gate
# gradient), the V-side gate (output and dv kernels), exclusive readout, varlen, both
# forward forms, both exact forms.
@pytest.mark.parametrize("case, fused, diag_loop, chunk_span", [
    (Case("channel", T=112, K=48, V=16, H=1), 1, 0, 19.2),
    (Case("channel", exclusive=True, T=112, K=48, V=16, H=1), 0, 0, 20.8),
    (Case("channel", vgate=True, T=104, seqlens=(9, 80, 15), K=16, V=32, H=1), 0, 0, 19.2),
    (Case("none", vgate=True, exclusive=True, T=100, K=16, V=32, H=1), 1, 1, 20.8),
], ids=str)
def test_diagonal_sub_blocks_factored_where_their_span_allows(case, fused, diag_loop, chunk_span):
    inputs = list(make_inputs(case))
    B = inputs[0].shape[0]
    if case.gate == "channel":
        inputs[3] = span_gates(B, case.T, case.H, case.K, strong_channels_from=32 if case.K > 32 else None,
                               chunk_span=chunk_span)
    if case.vgate:
        inputs[4] = span_gates(B, case.T, case.H, case.V, chunk_span=chunk_span)
    configs = [{"exact_diag": exact, "diag_loop": diag_loop, "fused_forward": fused} for exact in (0, 1)]
    if case.gate == "channel" and chunk_span < 20:  # and the chunks under the limit by sub-chunks too
        configs.append({"whole_chunk": 0, "diag_loop": diag_loop, "fused_forward": fused})
    check_configs_against_the_recurrence(case, inputs, configs)


# Chunks of 128 tokens (a tuning candidate): the dq / dk kernel goes over their eight
# sub-chunks in a runtime loop, the sub-chunk's position a runtime value (four or fewer stay
# unrolled). span_gates' 64-token halves make every chunk go by sub-chunks, factored and
# exact ones in turn, from the first.
def test_eight_sub_chunks_in_a_loop():
    case = Case("channel", T=200, K=32, V=16, H=1, chunk_size=128)
    inputs = list(make_inputs(case))
    inputs[3] = span_gates(inputs[0].shape[0], case.T, case.H, case.K, chunk_span=19.2)
    check_configs_against_the_recurrence(case, inputs, [{}, {"exact_diag": 1, "diag_loop": 1}])


# A forward keeps no cumulated per-channel gate, whether a backward follows or not: the
# scores kernel computes it in registers for the chunks it takes whole and stores only those
# it takes by sub-chunks, which read it back row by row; nothing after the scores kernel
# reads it, and the backward cumulates g again (a cumsum pass). Against the recurrence, values and gradients, both forward forms, with the
# chunks the gates make whole or not told apart.
@pytest.mark.parametrize("case", [Case("channel", T=112, K=48, V=16, H=1),
                                  Case("channel", exclusive=True, T=104, seqlens=(9, 80, 15), K=16, V=32, H=1)],
                         ids=str)
@pytest.mark.parametrize("fused", [0, 1])
def test_the_forward_keeps_no_cumulated_gate(case, fused, monkeypatch):
    from attnc.runtime.chunk_diag_op import ChunkDiagFunction

    inputs = list(make_inputs(case))
    q, k, v, _, gv, h0, cu_seqlens = inputs
    g = inputs[3] = span_gates(q.shape[0], case.T, case.H, case.K, chunk_span=19.2)
    module = ChunkDiagFunction.module_for(kernel_spec(q, g, gv, case.exclusive))
    cumulated, recumulated = [], []
    intra_scores, cumulate = module._intra_scores, module._cumulate

    def recording(kernel, x, y, gate, *args, **kwargs):
        if kwargs.get("raw_gate") is not None:
            cumulated.append(gate)
        return intra_scores(kernel, x, y, gate, *args, **kwargs)

    def recording_cumsum(*args, **kwargs):
        recumulated.append(cumulate(*args, **kwargs))
        return recumulated[-1]

    monkeypatch.setattr(module, "_intra_scores", recording)
    monkeypatch.setattr(module, "_cumulate", recording_cumsum)
    # which chunks the scores kernel takes whole: those whose write gates stay above -limit
    whole = torch.zeros(case.T, dtype=torch.bool)
    bounds = [0, case.T] if cu_seqlens is None else cu_seqlens.tolist()
    chunk_cumsum = torch.empty(case.T, case.K, dtype=torch.float64)
    for start, end in zip(bounds[:-1], bounds[1:]):
        for c0 in range(start, end, case.chunk_size):
            c1 = min(c0 + case.chunk_size, end)
            chunk_cumsum[c0:c1] = g[0, c0:c1, 0].double().cumsum(0)
            whole[c0:c1] = -chunk_cumsum[c0:c1].min() < module.DIAG_SPAN_LIMIT
    assert whole.any() and not whole.all()
    ref_inputs = [None if x is None else x.double() for x in inputs[:6]]
    ref_o, ref_ht = naive_recurrence(*ref_inputs, cu_seqlens, case.exclusive)
    do, dht = torch.randn_like(ref_o), torch.randn_like(ref_ht)
    for needs_grad in (True, False):
        cumulated.clear()
        recumulated.clear()
        args = [x.detach().requires_grad_(needs_grad) if x is not None and x.is_floating_point() else x
                for x in inputs]
        o, ht = chunk_diag(*args, exclusive=case.exclusive, output_final_state=True, input_precision="ieee",
                           poison=True, config={"fused_forward": fused})
        assert rel_rms(o, ref_o) <= FP32_TOLERANCE and rel_rms(ht, ref_ht) <= FP32_TOLERANCE, needs_grad
        (gate,) = cumulated
        stored = torch.isfinite(gate[0]).all(-1).all(-1)  # per token: poisoned where not written
        assert stored.tolist() == (~whole).tolist(), needs_grad
        if not needs_grad:
            assert not recumulated
            continue
        leaves = [x for x in args[:6] if x is not None]
        grads = torch.autograd.grad((o.double() * do).sum() + (ht.double() * dht).sum(), leaves)
        (gate,) = recumulated
        assert torch.allclose(gate[0, :, 0].double(), chunk_cumsum, atol=1e-5), "not the chunk-local cumsum"
        _, _, ref_grads = run_and_differentiate(
            lambda *x: naive_recurrence(*x, case.exclusive), ref_inputs + [cu_seqlens], do, dht)
        for label, grad, ref in zip("dq dk dv dg dh0".split(), grads, [x for x in ref_grads if x is not None]):
            assert rel_rms(grad, ref) <= FP32_TOLERANCE, (label, rel_rms(grad, ref))


def test_diagonal_factoring_follows_the_config_and_the_dtype():
    """Factored diagonal sub-blocks need an 8-bit exponent: bf16 and fp32 dots factor them
    (under DIAG_SPAN_LIMIT), fp16 ones never, nor does any dtype with exact_diag=1."""
    from attnc.runtime.chunk_diag_op import ChunkDiagFunction

    module = ChunkDiagFunction.module_for(DiagKernelSpec("plan_channel", "channel"))

    def plan(dtype, **config):
        q = torch.empty(1, 1, 16, 64, dtype=dtype, device="meta")
        return module._Plan(q, q, None, 64, True, "ieee", False, config or None)

    assert plan(torch.bfloat16).rows(True)["DIAG_SPAN"] == module.DIAG_SPAN_LIMIT > 0
    assert plan(torch.float32).rows(True)["DIAG_SPAN"] == module.DIAG_SPAN_LIMIT
    assert plan(torch.float16).rows(True)["DIAG_SPAN"] == 0.0
    assert plan(torch.bfloat16, exact_diag=1).rows(True)["DIAG_SPAN"] == 0.0
    # whole chunks at once where their span allows, unless the config says by sub-chunks
    assert plan(torch.bfloat16).whole_chunk_rows()["WHOLE_CHUNK"] == 1
    assert plan(torch.bfloat16, whole_chunk=0).whole_chunk_rows()["WHOLE_CHUNK"] == 0


# Under a GPU's bf16 rounding (emulated) the factored sub-blocks cost no accuracy: their
# matmul takes its decayed operands at ~16 bits (_dot_exact). Rounded to bf16 they cost
# 1.2-1.4x the exact sub-blocks' error in o, dq, dk, dv and dg (gla-like gates, T = 300).
# (Run at T = 200 here to save time; the two agree to within 1 %.)
@pytest.mark.skipif(DEVICE == "cuda", reason="emulates a GPU's rounding in the interpreter")
def test_bf16_factored_diagonal_is_as_accurate_as_the_exact_one(monkeypatch):
    monkeypatch.setenv("ATTNC_EMULATE_GPU_DOTS", "1")
    exclusive = True
    case = Case("channel", exclusive=exclusive, T=200, K=32, V=32, B=1, H=2, dtype=torch.bfloat16)
    torch.manual_seed(1)
    q, k, v, _, gv, h0, cu_seqlens = make_inputs(case)
    g = (F.logsigmoid(torch.randn(1, case.T, 2, case.K)) / 16).to(DEVICE)  # gla's gate
    inputs = (q, k, v, g, gv, h0, cu_seqlens)
    errors = {}
    for exact in (0, 1):
        torch.manual_seed(2)  # the same cotangents for both
        grads, ref_grads = _triton_and_reference_grads(inputs, exclusive, config={"exact_diag": exact})
        o, _ = chunk_diag(*inputs, exclusive=exclusive, output_final_state=False, poison=True,
                          config={"exact_diag": exact})
        ref_o, _ = naive_recurrence(*[None if x is None else x.double() for x in inputs[:6]], None, exclusive)
        errors[exact] = {"o": rel_rms(o, ref_o), **{label: rel_rms(grad, ref)
                                                     for label, grad, ref in zip("qkvg", grads, ref_grads)}}
    assert max(errors[0].values()) < 1e-2, errors  # bf16 rounding happened, nothing broke
    for label, exact_error in errors[1].items():
        assert errors[0][label] <= 1.05 * exact_error, (label, errors)


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU bf16 inputs take bf16 dots: no fp32 run gives the same values")
@pytest.mark.parametrize("case", [Case("channel", vgate=True, exclusive=True, T=33, K=16, V=16, dtype=torch.bfloat16),
                                  Case("scalar", T=33, K=16, V=16, dtype=torch.bfloat16),
                                  Case("none", T=33, K=16, V=16, dtype=torch.bfloat16)], ids=str)
def test_rendered_module_launchers_return_grads_in_the_inputs_dtypes(case):
    """The launchers themselves (not through autograd): shapes, Nones, and each gradient in
    its input's dtype, with the values autograd's conversion of the fp32 result would give
    (the interpreter computes bf16 inputs in fp32, so fp32 copies of them give that result)."""
    q, k, v, g, gv, h0, cu_seqlens = make_inputs(case)
    spec = kernel_spec(q, g, gv, case.exclusive)
    from attnc.runtime.chunk_diag_op import ChunkDiagFunction
    module = ChunkDiagFunction.module_for(spec)
    o, ht = module.forward(q, k, v, g, gv, None, None, False, poison=True)
    assert o.dtype == torch.float32 and ht is None
    do = torch.randn_like(o)
    grads = module.backward(q, k, v, g, gv, None, None, do, None, poison=True)
    fp32_grads = module.backward(q.float(), k.float(), v.float(), g, gv, None, None, do, None, poison=True)
    for label, grad, fp32_grad, x in zip("q k v g gv".split(), grads[:5], fp32_grads, (q, k, v, g, gv)):
        if x is None:
            assert grad is None
            continue
        assert grad.shape == x.shape and grad.dtype == x.dtype, label
        assert torch.isfinite(grad).all(), label
        assert torch.equal(grad, fp32_grad.to(x.dtype)), f"d{label} is not the fp32 result, converted"
    assert grads[5] is None


@pytest.mark.parametrize("spec", [DiagKernelSpec("gla", "channel", False, False),
                                  DiagKernelSpec("rwkv6", "channel", False, True),
                                  DiagKernelSpec("plain", "none", True, False)], ids=lambda s: s.name)
def test_render_names_kernels_and_reads_like_code(spec):
    source = render(spec)
    compile(source, f"<{spec.name}>", "exec")
    kernels = re.findall(r"^def (\w+)\(", source, flags=re.M)
    for suffix in ("chunk_state_fwd", "intra_scores", "chunk_output_fwd", "chunk_state_bwd",
                   "intra_scores_grad", "chunk_dqdk", "chunk_dv"):
        assert f"{spec.name}_{suffix}" in kernels
    assert (f"{spec.name}_gate_grad" in kernels) == (spec.gate != "none")
    assert (f"{spec.name}_vgate_grad" in kernels) == spec.vgate
    assert "{{" not in source and "{%" not in source
    assert "\n\n\n\n" not in source, "template whitespace leaks into the generated code"


def test_spec_and_input_errors_name_the_culprit():
    with pytest.raises(ValueError, match="gate='per_head'"):
        DiagKernelSpec("x", gate="per_head")
    with pytest.raises(ValueError, match="not a Python identifier"):
        DiagKernelSpec("my kernel")
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match=r"g has shape \(1, 8, 3\)"):
        chunk_diag(q, q, q, torch.zeros(1, 8, 3), exclusive=False, output_final_state=False)
    with pytest.raises(ValueError, match="backend='cuda'"):
        chunk_diag(q, q, q, exclusive=False, output_final_state=False, backend="cuda")


def test_torch_backend_is_vectorised_and_matches_without_varlen_loop():
    """Varlen with equal lengths equals the batched path (the torch path loops only for varlen)."""
    case = Case("channel", vgate=True, T=40, B=3)
    q, k, v, g, gv, h0, _ = make_inputs(case)
    o, ht = chunk_diag_torch(q, k, v, g, gv, h0, None, False, True)
    flat = [x.flatten(0, 1)[None] for x in (q, k, v, g, gv)]
    cu = torch.tensor([0, 40, 80, 120], dtype=torch.int32)
    o2, ht2 = chunk_diag_torch(*flat, h0, cu, False, True)
    assert torch.allclose(o.flatten(0, 1)[None], o2, atol=1e-5) and torch.allclose(ht, ht2, atol=1e-5)


def test_loader_writes_once_and_imports_under_unique_names(tmp_path):
    first = load_module("VALUE = 1\n", "generated_thing", tmp_path)
    mtime = (tmp_path / "generated_thing.py").stat().st_mtime_ns
    again = load_module("VALUE = 1\n", "generated_thing", tmp_path)
    assert again is first and (tmp_path / "generated_thing.py").stat().st_mtime_ns == mtime
    changed = load_module("VALUE = 2\n", "generated_thing", tmp_path)
    assert changed.VALUE == 2 and first.VALUE == 1 and changed.__name__ != first.__name__
    elsewhere = load_module("VALUE = 2\n", "generated_thing", tmp_path / "other")
    assert elsewhere is not changed
    assert not list(tmp_path.glob("*.tmp")), "temporary files left behind"


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_scale_and_output_dtype_are_applied_by_the_kernel(backend):
    """o = scale * q^T S stored in out_dtype: values and every gradient as if the caller
    had scaled and cast the fp32 output itself."""
    torch.manual_seed(4)
    case = Case("channel", T=40, K=16, V=32, H=2)
    inputs = make_inputs(case)
    scale = 0.37
    exclusive = False
    # a bf16 output's cotangent arrives in bf16: draw one that bf16 holds exactly
    do = torch.randn(case.B, case.T, case.H, case.V).to(torch.bfloat16).double()
    dht = torch.randn(case.B, case.H, case.K, case.V, dtype=torch.float64)

    def scaled(q, k, v, g, gv, h0, cu_seqlens):
        return chunk_diag(q, k, v, g, gv, h0, cu_seqlens, exclusive=exclusive,
                          output_final_state=True, backend=backend, input_precision="ieee",
                          poison=True, scale=scale, out_dtype=torch.bfloat16)

    def reference(q, k, v, g, gv, h0, cu_seqlens):
        o, ht = naive_recurrence(q, k, v, g, gv, h0, cu_seqlens, exclusive)
        return o * scale, ht

    o, ht, grads = run_and_differentiate(scaled, inputs, do, dht)
    double = [None if x is None else x.double() for x in inputs[:6]] + [inputs[6]]
    ref_o, ref_ht, ref_grads = run_and_differentiate(reference, double, do, dht)
    assert o.dtype == torch.bfloat16
    assert rel_rms(o.float(), ref_o) <= BF16_TOLERANCE / 4   # one bf16 rounding
    assert rel_rms(ht, ref_ht) <= FP32_TOLERANCE
    for label, grad, ref in zip(("q", "k", "v", "g", "gv", "h0"), grads, ref_grads):
        if ref is not None:
            assert rel_rms(grad, ref) <= FP32_TOLERANCE, label


@pytest.mark.parametrize("backend, fused, u_is_v, seqlens, c_shape", [
    ("triton", 0, False, None, "head"), ("triton", 1, False, None, "head"), ("torch", None, False, None, "head"),
    ("triton", None, True, None, "head"), ("triton", None, False, (23, 47), "head"),
    ("triton", None, True, (23, 47), "head"), ("triton", None, True, None, "head bf16"),
    ("triton", 0, False, None, "channel"), ("triton", 1, True, (23, 47), "channel"),
    ("torch", None, True, None, "channel")])
def test_residual_term_is_added_by_the_kernel(backend, fused, u_is_v, seqlens, c_shape):
    """o = scale * q^T S + c * u with c per head (mamba2's D * x; the kernels read a [H] view
    of it, in its own dtype) or per head and channel ([1, 1, H, V]), stored in bf16 as the
    kernel adds it: values and the gradients of every input, u and c included. The dv
    kernel computes u's and c's gradients (c's as per-chunk sums); where u is v itself
    (mamba2: the value operand is x), it adds u's gradient into dv."""
    torch.manual_seed(5)
    case = Case("scalar", T=70, K=32, V=16, H=2, B=1 if seqlens else 2, seqlens=seqlens)
    inputs = make_inputs(case)
    u = torch.randn(*inputs[2].shape)
    c = torch.randn(1, 1, case.H, case.V if c_shape == "channel" else 1)
    c_dtype = torch.bfloat16 if c_shape == "head bf16" else None
    if c_dtype is not None:
        c = c.to(c_dtype)   # the reference takes the same values in fp64
    scale = 0.7
    do = torch.randn(*inputs[2].shape).to(torch.bfloat16).double()
    N = len(seqlens) if seqlens else case.B
    dht = torch.randn(N, case.H, case.K, case.V, dtype=torch.float64)
    cu_seqlens = inputs[6]
    config = None if fused is None else {"fused_forward": fused}

    def grads_of(run, dtype):
        q, k, v, g, _, h0 = [None if x is None else x.to(dtype).detach().requires_grad_()
                             for x in inputs[:6]]
        c_dtype_ = c_dtype if dtype == torch.float32 and c_dtype is not None else dtype
        u_, c_ = (v if u_is_v else u.to(dtype).requires_grad_()), c.to(c_dtype_).requires_grad_()
        o, ht = run(q, k, v, g, h0, u_, c_)
        leaves = (q, k, v, g, h0) + ((c_,) if u_is_v else (u_, c_))
        loss = (o.double() * do).sum() + (ht.double() * dht).sum()
        return o, ht, torch.autograd.grad(loss, leaves)

    def kernels(q, k, v, g, h0, u, c):
        return chunk_diag(q, k, v, g, None, h0, cu_seqlens, exclusive=False, output_final_state=True,
                          backend=backend, input_precision="ieee", poison=True, scale=scale,
                          out_dtype=torch.bfloat16, residual=u, residual_scale=c, config=config)

    def reference(q, k, v, g, h0, u, c):
        o, ht = naive_recurrence(q, k, v, g, None, h0, cu_seqlens, False)
        return o * scale + c * u, ht

    o, ht, grads = grads_of(kernels, torch.float32)
    ref_o, ref_ht, ref_grads = grads_of(reference, torch.float64)
    assert o.dtype == torch.bfloat16
    assert rel_rms(o.float(), ref_o) <= BF16_TOLERANCE / 4   # one bf16 rounding
    assert rel_rms(ht, ref_ht) <= FP32_TOLERANCE
    labels = ("q", "k", "v", "g", "h0") + (("c",) if u_is_v else ("u", "c"))
    for label, grad, ref in zip(labels, grads, ref_grads):
        assert grad.shape == ref.shape, label
        if label == "c" and c_dtype is not None:   # autograd rounds c's gradient to its dtype
            assert grad.dtype == c_dtype and rel_rms(grad, ref) <= BF16_TOLERANCE / 4, rel_rms(grad, ref)
            continue
        assert rel_rms(grad, ref) <= FP32_TOLERANCE, f"d{label}: {rel_rms(grad, ref):.2e}"


@pytest.mark.parametrize("gate, fused, seqlens, exclusive", [
    ("scalar", 0, None, False), ("scalar", 1, None, False), ("none", None, None, False),
    ("scalar", None, (23, 47), False), ("scalar", None, None, True)])
def test_key_scale_is_applied_by_the_kernels(gate, fused, seqlens, exclusive):
    """k_t = s_t * k_t with s a per-token factor (mamba2's B * delta), applied as the
    kernels load k: values and the gradients of every input, s included, against the
    recurrence on the product; with a residual term beside it, as mamba2 has."""
    torch.manual_seed(7)
    case = Case(gate, T=70, K=32, V=16, H=2, B=1 if seqlens else 2, seqlens=seqlens, exclusive=exclusive)
    inputs = make_inputs(case)
    s = F.softplus(torch.randn(*inputs[0].shape[:3])) + 0.1
    c = torch.randn(1, 1, case.H, 1)
    do = torch.randn(*inputs[2].shape).double()
    N = len(seqlens) if seqlens else case.B
    dht = torch.randn(N, case.H, case.K, case.V, dtype=torch.float64)
    cu_seqlens = inputs[6]
    config = None if fused is None else {"fused_forward": fused}

    def grads_of(run, dtype):
        q, k, v, g, _, h0 = [None if x is None else x.to(dtype).detach().requires_grad_()
                             for x in inputs[:6]]
        s_, c_ = s.to(dtype).requires_grad_(), c.to(dtype).requires_grad_()
        o, ht = run(q, k, v, g, h0, s_, c_)
        leaves = [x for x in (q, k, v, g, h0, s_, c_) if x is not None]
        loss = (o.double() * do).sum() + (ht.double() * dht).sum()
        return o, ht, torch.autograd.grad(loss, leaves)

    def kernels(q, k, v, g, h0, s, c):
        return chunk_diag(q, k, v, g, None, h0, cu_seqlens, exclusive=exclusive, output_final_state=True,
                          input_precision="ieee", poison=True, residual=v, residual_scale=c,
                          key_scale=s, config=config)

    def reference(q, k, v, g, h0, s, c):
        o, ht = naive_recurrence(q, k * s[..., None], v, g, None, h0, cu_seqlens, exclusive)
        return o + c * v, ht

    o, ht, grads = grads_of(kernels, torch.float32)
    ref_o, ref_ht, ref_grads = grads_of(reference, torch.float64)
    assert rel_rms(o, ref_o) <= FP32_TOLERANCE and rel_rms(ht, ref_ht) <= FP32_TOLERANCE
    labels = [label for label, x in zip(("q", "k", "v", "g", "h0"), inputs[:6]) if x is not None]
    for label, grad, ref in zip(labels + ["s", "c"], grads, ref_grads):
        assert grad.shape == ref.shape, label
        assert rel_rms(grad, ref) <= FP32_TOLERANCE, f"d{label}: {rel_rms(grad, ref):.2e}"


def test_key_scale_is_checked():
    case = Case("channel", T=20, K=16, V=16)
    q, k, v, g, gv, h0, cu_seqlens = make_inputs(case)
    with pytest.raises(ValueError, match="per-channel"):
        chunk_diag(q, k, v, g, gv, h0, cu_seqlens, exclusive=False, output_final_state=False,
                   key_scale=torch.ones(q.shape[:3]))
    case = Case("scalar", T=20, K=16, V=16)
    q, k, v, g, gv, h0, cu_seqlens = make_inputs(case)
    with pytest.raises(ValueError, match=r"key_scale has shape \(1, 20\)"):
        chunk_diag(q, k, v, g, gv, h0, cu_seqlens, exclusive=False, output_final_state=False,
                   key_scale=torch.ones(q.shape[:2]))


def test_residual_shapes_are_checked():
    case = Case("scalar", T=20, K=16, V=32)
    q, k, v, g, gv, h0, cu_seqlens = make_inputs(case)
    with pytest.raises(ValueError, match=r"residual_scale of shape \(3,\) does not broadcast"):
        chunk_diag(q, k, v, g, gv, h0, cu_seqlens, exclusive=False, output_final_state=False,
                   residual=v, residual_scale=torch.ones(3))
    with pytest.raises(ValueError, match="residual"):
        chunk_diag(q, k, v, g, gv, h0, cu_seqlens, exclusive=False, output_final_state=False,
                   residual=q, residual_scale=1.0)


def test_scale_with_a_v_side_gate_is_refused():
    case = Case("scalar", T=20, K=16, V=16, vgate=True)
    q, k, v, g, gv, h0, cu = make_inputs(case)
    with pytest.raises(ValueError, match="V-side gate"):
        chunk_diag(q, k, v, g, gv, h0, cu, exclusive=False, output_final_state=False, scale=0.5)


LOGSIGMOID_16 = InputMap("_logsigmoid(x) / 16.0", "_sigmoid(-x) / 16.0", lambda x: F.logsigmoid(x) / 16)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("exclusive, seqlens, fused", [(False, None, 1), (True, (23, 1, 46), None),
                                                       (False, (23, 1, 46), 0)])
def test_gate_map_is_applied_by_the_kernels(backend, exclusive, seqlens, fused):
    """g a raw input x and the log gate f(x) (gla's logsigmoid(x) / 16): the cumsum kernel
    maps x as it loads it and the gate-gradient kernel multiplies by f'(x). Values and the
    gradients of every input, x's included, against the recurrence on f(x) in fp64."""
    torch.manual_seed(11)
    case = Case("channel", T=70, K=32, V=16, H=2, B=1 if seqlens else 2, seqlens=seqlens, exclusive=exclusive)
    q, k, v, _, _, h0, cu_seqlens = make_inputs(case)
    x = (torch.randn(*q.shape) * 3).to(DEVICE)
    do = torch.randn(*v.shape).double()
    dht = torch.randn(*h0.shape, dtype=torch.float64)
    config = None if fused is None else {"fused_forward": fused}

    def grads_of(run, dtype):
        leaves = [t.to(dtype).detach().requires_grad_() for t in (q, k, v, x, h0)]
        o, ht = run(*leaves)
        loss = (o.double() * do).sum() + (ht.double() * dht).sum()
        return o, ht, torch.autograd.grad(loss, leaves)

    def mapped(q, k, v, x, h0):
        return chunk_diag(q, k, v, x, None, h0, cu_seqlens, exclusive=exclusive, output_final_state=True,
                          input_precision="ieee", poison=True, config=config, backend=backend,
                          gate_map=LOGSIGMOID_16)

    def reference(q, k, v, x, h0):
        return naive_recurrence(q, k, v, F.logsigmoid(x) / 16, None, h0, cu_seqlens, exclusive)

    o, ht, grads = grads_of(mapped, torch.float32)
    ref_o, ref_ht, ref_grads = grads_of(reference, torch.float64)
    assert rel_rms(o, ref_o) <= FP32_TOLERANCE and rel_rms(ht, ref_ht) <= FP32_TOLERANCE
    for label, grad, ref in zip("qkvxh", grads, ref_grads):
        assert rel_rms(grad, ref) <= FP32_TOLERANCE, f"d{label}: {rel_rms(grad, ref):.2e}"


def test_gate_map_is_checked():
    q, k, v, g, gv, h0, cu_seqlens = make_inputs(Case("scalar", T=20, K=16, V=16))
    with pytest.raises(ValueError, match="gate_map is for per-channel gates"):
        chunk_diag(q, k, v, g, gv, h0, cu_seqlens, exclusive=False, output_final_state=False,
                   gate_map=LOGSIGMOID_16)
    with pytest.raises(ValueError, match="gate_map and .gate_map_grad"):
        DiagKernelSpec("gla", "channel", gate_map="_logsigmoid(x)")

# On a GPU the chunk states and their gradients are stored in the dtype the kernels' dots
# round them to (bf16 here). The interpreter's dots are fp32, so it keeps them fp32; this
# test forces bf16 storage to run the kernels that write and read such buffers on the CPU.
# Expected error: one bf16 rounding (2^-9 relative) of the states in every inter-chunk term,
# ~3e-3 on o, dq, dk, dv. The gate gradients are differences of products (q.dq - k.dk) whose
# terms nearly cancel, which multiplies that by about ten: the same happens on a GPU, whose
# dots round the states whatever they are stored in (and in fla, which stores them in bf16).
BF16_STATES_TOLERANCE = 1e-2
BF16_STATES_GATE_TOLERANCE = 5e-2


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU every run stores bf16 states")
@pytest.mark.parametrize("case", [Case("scalar", vgate=True, T=100, K=32, V=16, dtype=torch.bfloat16),
                                  Case("channel", exclusive=True, T=100, K=16, V=32, dtype=torch.bfloat16)],
                         ids=str)
def test_bf16_chunk_states_as_on_a_gpu(case, gpu_operand_storage, monkeypatch):
    from attnc.runtime.chunk_diag_op import ChunkDiagFunction
    torch.manual_seed(0)
    inputs = make_inputs(case)
    module = ChunkDiagFunction.module_for(kernel_spec(inputs[0], inputs[3], inputs[4], case.exclusive))

    def under_test(q, k, v, g, gv, h0, cu_seqlens):
        # the forward that stores chunk states (the one-pass forward keeps them in registers)
        return chunk_diag(q, k, v, g, gv, h0, cu_seqlens, exclusive=case.exclusive, output_final_state=True,
                          chunk_size=case.chunk_size, backend="triton", input_precision="ieee", poison=True,
                          config={"fused_forward": 0})

    def golden(q, k, v, g, gv, h0, cu_seqlens):
        return naive_recurrence(q, k, v, g, gv, h0, cu_seqlens, case.exclusive)

    ref_o, ref_ht = golden(*[None if x is None else x.double() for x in inputs[:6]], None)
    do, dht = torch.randn_like(ref_o), torch.randn_like(ref_ht)
    ref_o, ref_ht, ref_grads = run_and_differentiate(golden, inputs, do, dht)
    fp32_states = run_and_differentiate(under_test, inputs, do, dht)

    stored = []

    def record(shape, dtype):
        stored.append((tuple(shape), dtype))

    gpu_operand_storage(module, record)
    decayed = []
    decayed_buffers = module._decayed_buffers

    def record_decayed(q, k, plan):
        buffers = decayed_buffers(q, k, plan)
        decayed.extend(buffer.dtype for buffer in buffers)
        return buffers

    monkeypatch.setattr(module, "_decayed_buffers", record_decayed)
    o, ht, grads = run_and_differentiate(under_test, inputs, do, dht)
    # states (forward, backward) and dstates in bf16; final states, dh0 fp32 (the backward
    # recomputes the final state only for the V-side gate gradient)
    bf16, fp32 = torch.bfloat16, torch.float32
    backward_final = [fp32] if case.vgate else []
    states = [dtype for shape, dtype in stored if shape[-2:] == (case.K, case.V)]
    assert states == [bf16, fp32, bf16, *backward_final, bf16, fp32], stored
    # With a per-channel gate the forward's state and output passes read q and k with their
    # decays inside, which the scores kernel stores in the dots' dtype too: the final state
    # then has the one bf16 rounding of each update's keys that a GPU's dots give it (fp32
    # dots on exact keys before; measured 1.4e-3 here, o 1.7e-3); without one it stays exact
    # to fp32.
    channel = case.gate == "channel"
    assert decayed == ([bf16, bf16, fp32] if channel else []), decayed
    assert not torch.equal(o, fp32_states[0]), "the bf16 states were not used"
    assert rel_rms(o, ref_o) <= BF16_STATES_TOLERANCE, f"o: rel RMS {rel_rms(o, ref_o):.2e}"
    ht_tolerance = BF16_STATES_TOLERANCE if channel else FP32_TOLERANCE
    assert rel_rms(ht, ref_ht) <= ht_tolerance, f"ht: rel RMS {rel_rms(ht, ref_ht):.2e}"
    for label, grad, ref in zip(("q", "k", "v", "g", "gv", "h0"), grads, ref_grads):
        if ref is None:
            continue
        assert torch.isfinite(grad).all(), f"d{label} has NaN/inf"
        tolerance = BF16_STATES_GATE_TOLERANCE if label in ("g", "gv") else BF16_STATES_TOLERANCE
        assert rel_rms(grad, ref) <= tolerance, f"d{label}: rel RMS {rel_rms(grad, ref):.2e}"


def _triton_and_reference_grads(inputs, exclusive, **options):
    """(grads, reference grads) of q, k, v, g, gv, h0 from the Triton kernels and from the fp64
    naive recurrence, for one random cotangent on o and one on the final state."""
    def under_test(q, k, v, g, gv, h0, cu_seqlens):
        return chunk_diag(q, k, v, g, gv, h0, cu_seqlens, exclusive=exclusive, output_final_state=True,
                          backend="triton", poison=True, **options)

    def golden(q, k, v, g, gv, h0, cu_seqlens):
        return naive_recurrence(q, k, v, g, gv, h0, cu_seqlens, exclusive)

    ref_o, ref_ht = golden(*[None if x is None else x.double() for x in inputs[:6]], None)
    do, dht = torch.randn_like(ref_o), torch.randn_like(ref_ht)
    _, _, ref_grads = run_and_differentiate(golden, inputs, do, dht)
    _, _, grads = run_and_differentiate(under_test, inputs, do, dht)
    return grads, ref_grads


# With ATTNC_EMULATE_GPU_DOTS=1 the interpreter rounds bf16 dots' operands as a GPU's tensor
# cores do. Under that rounding the K-side gate gradient used to lose accuracy with the
# sequence (each chunk's carry summed the later tokens' nearly cancelling identity terms:
# on an H100, mamba2's dA_log was off by 0.14 at T = 1000); the carry is now <S, dS> of the
# state leaving the chunk, and dg is about as accurate as dq, dk, dv. Measured at T = 640:
# dg 6.6e-3 / 8.5e-3 (scalar / channel) against at most 6.5e-3 / 6.9e-3 for the others;
# the summed carries gave 9.8e-3 / 2.1e-2.
@pytest.mark.skipif(DEVICE == "cuda", reason="emulates a GPU's rounding in the interpreter")
@pytest.mark.parametrize("gate", ["scalar", "channel"])
def test_bf16_gate_gradient_under_gpu_rounding_keeps_up_with_the_others(gate, monkeypatch):
    monkeypatch.setenv("ATTNC_EMULATE_GPU_DOTS", "1")
    case = Case(gate, T=640, K=32, V=32, B=1, H=1, dtype=torch.bfloat16)
    torch.manual_seed(1)
    grads, ref_grads = _triton_and_reference_grads(make_inputs(case), exclusive=False)
    errors = {label: rel_rms(grad, ref) for label, grad, ref in zip("qkvg", grads, ref_grads)}
    assert max(errors.values()) < 3e-2, errors  # bf16 rounding happened, nothing broke
    assert errors["g"] <= 1.4 * max(errors["q"], errors["k"], errors["v"]), errors


# Decay weights shared by many tokens (mamba2's A_log, retnet's log_gamma, rwkv6's w through
# -exp(w)) take their gradient from dg times the log gate, summed, so dg's errors where decays
# are strong, and the true dg is near zero, count. Under emulated bf16 tensor cores two
# cancellations lost them: the carry <S_C, dS_C> from rounded states against the chunk's own
# k.dk terms (now exp(b_C)<S_0, dS_C> plus those very fp32 terms), and, with a per-channel
# gate, dq's and dk's off-diagonal sub-chunk dots rounding a decayed k / q to bf16 differently
# for the same pair (now ~16 bits). Measured here: scalar (per-head sum) 0.10 before, 5.1e-3
# with the new carry, 9.4e-4 in the straddling form (a scalar gate's now); channel
# (exclusive, per token) 3.5e-2 before, 1.9e-2 with the carry alone, 3.7e-3 after both;
# dq, dk, dv 6.6e-3 at most.
@pytest.mark.skipif(DEVICE == "cuda", reason="emulates a GPU's rounding in the interpreter")
@pytest.mark.parametrize("gate", ["scalar", "channel"])
def test_bf16_decay_weight_gradient_under_strong_decays(gate, monkeypatch):
    monkeypatch.setenv("ATTNC_EMULATE_GPU_DOTS", "1")
    exclusive = gate == "channel"
    case = Case(gate, exclusive=exclusive, T=300, K=32, V=32, B=1, H=2, dtype=torch.bfloat16)
    torch.manual_seed(1)
    q, k, v, _, gv, h0, cu_seqlens = make_inputs(case)
    if gate == "scalar":
        # mamba2-like: a head that decays by ~5 per token beside a mild one
        strength = torch.tensor([0.3, 5.0], device=DEVICE)
        g = -strength * F.softplus(torch.randn(1, case.T, 2, device=DEVICE))
    else:
        g = -torch.randn(1, case.T, 2, case.K, device=DEVICE).exp()  # rwkv6: -exp(w), w ~ N(0, 1)
    grads, ref_grads = _triton_and_reference_grads((q, k, v, g, gv, h0, cu_seqlens), exclusive)
    dg, ref_dg = grads[3].double(), ref_grads[3]
    if gate == "scalar":
        # d/dlog(strength) of the loss: per head, the sum over tokens of dg * g
        weight, ref_weight = (dg * g).sum(1), (ref_dg * g.double()).sum(1)
    else:
        weight, ref_weight = dg * g, ref_dg * g.double()  # dw per token and channel
    others = max(rel_rms(grad, ref) for grad, ref in zip(grads[:3], ref_grads[:3]))
    assert others < 1e-2, others  # bf16 rounding happened, nothing broke
    assert rel_rms(weight, ref_weight) <= 1e-2, rel_rms(weight, ref_weight)


# When every token decays strongly, the log-cumsum identity's q.dq - k.dk is the small
# difference of large terms. A scalar gate's gradient now comes in the straddling form (each
# token's sum of the products its decay scales: reads of the entering state, writes into the
# leaving one, intra-chunk pairs across it); a per-channel gate keeps the identity but leaves
# the diagonal pairs (decay 1) out of both sides. Measured here in fp32 at ~e^-7 per token,
# dg and a weight w scaling every log gate (d/dw = sum_t dg_t g_t, per head), before -> now:
#   scalar inclusive   dg 4.6e-4 -> 3.3e-5   weight 5.4e-3 -> 1.9e-5
#   scalar exclusive   dg 6.4e-4 -> 3.3e-5   weight 7.3e-3 -> 7.0e-5
#   channel inclusive  dg 4.7e-4 -> 7.1e-5   weight 2.2e-3 -> 4.1e-4
# (channel exclusive, rwkv6's form, stays at dg 5.7e-4, weight 4.9e-4: README, Known limits).
@pytest.mark.parametrize("gate, exclusive", [("scalar", False), ("scalar", True), ("channel", False)],
                         ids=["scalar-incl", "scalar-excl", "channel-incl"])
def test_gate_gradient_when_every_token_decays_strongly(gate, exclusive):
    case = Case(gate, exclusive=exclusive, T=200, K=32, V=32, B=1, H=2)
    torch.manual_seed(0)
    q, k, v, _, gv, h0, cu_seqlens = make_inputs(case)
    g = -7.0 - 0.3 * torch.rand(1, case.T, 2, *((case.K,) if gate == "channel" else ()), device=DEVICE)
    grads, ref_grads = _triton_and_reference_grads((q, k, v, g, gv, h0, cu_seqlens), exclusive,
                                                   input_precision="ieee")
    tokens = (1,) if gate == "scalar" else (1, 3)  # and channels
    weight, ref_weight = (grads[3].double() * g).sum(tokens), (ref_grads[3] * g.double()).sum(tokens)
    assert rel_rms(grads[3], ref_grads[3]) <= FP32_TOLERANCE, rel_rms(grads[3], ref_grads[3])
    assert rel_rms(weight, ref_weight) <= 1e-3, rel_rms(weight, ref_weight)


@pytest.mark.parametrize("case", [Case("channel", T=100, K=32, V=16),
                                  Case("channel", vgate=True, exclusive=True, T=104, seqlens=(23, 80, 1)),
                                  Case("scalar", T=100, K=16, V=32),
                                  Case("none", vgate=True, T=40, K=16, V=16)], ids=str)
def test_backward_reuses_the_forwards_cumulated_gates_and_scores(case, record_launches):
    """forward(keep=True) hands the backward its cumulated gates (not a per-channel K-side
    one, which the backward cumulates again) and (per-channel K-side or V-side gate) its
    intra-chunk scores: the gradients are those of a backward that computes them again, bit
    for bit (to fp32 rounding with a per-channel K-side gate: the forward's scores took the
    cumulated gate from registers, 16 channels at a time, the recomputed ones from the cumsum
    pass's store, 32 at a time), and the op's backward launches no cumsum or score kernel for
    what was kept."""
    from attnc.runtime.chunk_diag_op import ChunkDiagFunction

    torch.manual_seed(0)
    q, k, v, g, gv, h0, cu_seqlens = make_inputs(case)
    module = ChunkDiagFunction.module_for(kernel_spec(q, g, gv, case.exclusive))
    o, ht, saved = module.forward(q, k, v, g, gv, h0, cu_seqlens, True, poison=True, keep=True)
    # (a per-channel K-side gate is not kept: the backward cumulates g again)
    assert (saved.gate is None) == (g is None or case.gate == "channel") and (saved.vgate is None) == (gv is None)
    per_channel = case.gate == "channel" or case.vgate
    assert (saved.scores is not None) == per_channel
    for kept, raw in ((saved.gate, g), (saved.vgate, gv)):
        if kept is not None and cu_seqlens is None:
            chunks = [piece.cumsum(1) for piece in raw.split(case.chunk_size, dim=1)]
            assert torch.allclose(kept, torch.cat(chunks, 1), atol=1e-5), "not the chunk-local cumsum"
    do, dht = torch.randn_like(o), torch.randn_like(ht)
    # (fused_backward=0: with the saved chunk gates the dq / dk kernel would compute dA
    # itself for the chunks it takes whole, the same to rounding, see the test below)
    apart = {"fused_backward": 0}
    recomputed = module.backward(q, k, v, g, gv, h0, cu_seqlens, do, dht, o=o, poison=True, config=apart)
    reused = module.backward(q, k, v, g if saved.gate is None else saved.gate, saved.vgate, h0, cu_seqlens, do, dht,
                             o=o, poison=True, saved=saved, config=apart)
    for label, a, b in zip("dq dk dv dg dgv dh0".split(), recomputed, reused):
        assert (a is None) == (b is None), label
        if a is not None:
            assert torch.isfinite(b).all(), f"{label}: not finite with the saved tensors"
            if case.gate == "channel":
                assert rel_rms(a, b) <= 1e-6, f"{label}: {rel_rms(a, b):.2e} from the saved tensors"
            else:
                assert torch.equal(a, b), f"{label} differs with the saved tensors"

    # through the op: the kept tensors replace the backward's cumsum and score launches
    leaves = [None if x is None else x.detach().clone().requires_grad_() for x in (q, k, v, g, gv, h0)]
    with record_launches() as launched:
        out, _ = chunk_diag(*leaves, cu_seqlens, exclusive=case.exclusive, output_final_state=True)
        forward = list(launched)
        launched.clear()
        out.backward(torch.randn_like(out))
    assert forward and launched, "no kernel launch was recorded"
    # a per-channel K-side gate is cumulated again (the forward kept none of it)
    assert any(n.endswith("_gate_cumsum") and not n.endswith("_vgate_cumsum") for n in launched) == (
        case.gate == "channel"), launched
    assert not any(n.endswith("_vgate_cumsum") for n in launched), launched
    # kept with a per-channel gate; else the dq / dk and dv kernels compute the scores and
    # their gradient themselves
    assert not any(n.endswith("_intra_scores") for n in launched), launched
    assert any(n.endswith("_intra_scores_grad") for n in launched) == per_channel, launched
    assert any(n.endswith("_intra_scores") for n in forward) == per_channel, forward
    # the scores kernel cumulates a per-channel K-side gate first: no cumsum launch of its own
    assert any(n.endswith("_gate_cumsum") for n in forward) == (case.gate == "scalar"), forward


@pytest.mark.parametrize("case, key_scale", [
    (Case("none", T=100, K=32, V=16), False),
    (Case("none", exclusive=True, T=104, K=80, V=48, seqlens=(23, 80, 1)), False),
    (Case("scalar", T=100, K=80, V=16, chunk_size=32), True),
    (Case("scalar", exclusive=True, T=104, K=16, V=32, seqlens=(80, 23, 1), h0=False), False),
    (Case("scalar", T=130, K=48, V=96, B=2, H=1, strong=True), True)], ids=str)
def test_dq_dk_and_dv_kernels_compute_the_scores_themselves(case, key_scale, record_launches):
    """Without per-channel gates the backward launches no scores kernels: the dq / dk kernel
    makes dA = dO V^T (and, per K block, a scalar gate's straddle terms) and the dv kernel
    A = Q K^T from the tiles they load. The gradients are those of the scores kernels'
    path (fused_backward=0) to rounding, over several K blocks, varlen batches, a readout
    before the update, a key factor and strong decays."""
    from attnc.runtime.chunk_diag_op import ChunkDiagFunction

    torch.manual_seed(3)
    q, k, v, g, gv, h0, cu_seqlens = make_inputs(case)
    scale = torch.rand(q.shape[:3], device=q.device) + 0.5 if key_scale else None
    module = ChunkDiagFunction.module_for(kernel_spec(q, g, gv, case.exclusive))
    options = dict(chunk_size=case.chunk_size, input_precision="ieee", poison=True, key_scale=scale)
    o, ht = module.forward(q, k, v, g, gv, h0, cu_seqlens, True, **options)
    do, dht = torch.randn_like(o), torch.randn_like(ht)

    def backward(fused):
        with record_launches() as launched:
            grads = module.backward(q, k, v, g, gv, h0, cu_seqlens, do, dht, config={"fused_backward": fused},
                                    scale=0.7, **options)
        return grads, list(launched)

    (fused, launched), (apart, launched_apart) = backward(1), backward(0)
    assert not any("_intra_scores" in n for n in launched), launched
    extra = [n for n in launched_apart if n not in launched]
    assert [n.rsplit("_intra_", 1)[-1] for n in extra] == ["scores", "scores_grad"], launched_apart
    assert len(launched) == len(launched_apart) - 2
    labels = "dq dk dv dg dgv dh0 d_residual d_residual_scale d_key_scale".split()
    for label, a, b in zip(labels, fused, apart):
        assert (a is None) == (b is None), label
        if a is not None:
            assert torch.isfinite(a).all() and rel_rms(a, b) <= 1e-5, f"{label}: {rel_rms(a, b):.2e}"
    assert fused[3] is not None or case.gate == "none"
    with pytest.raises(ValueError, match="fused_backward=2: expected 0 or 1"):
        module.backward(q, k, v, g, gv, h0, cu_seqlens, do, dht, config={"fused_backward": 2})


@pytest.mark.parametrize("case, chunk_span", [
    (Case("channel", T=240, K=48, V=16, H=1), 19.2),
    (Case("channel", exclusive=True, T=208, K=16, V=32, H=1, seqlens=(9, 150, 49)), 19.2),
    (Case("channel", T=130, K=80, V=16, B=2, H=1), 20.8),
    (Case("channel", T=200, K=32, V=16, H=2, chunk_size=32), 19.2),
], ids=str)
def test_per_channel_dq_dk_kernel_computes_dA_for_the_chunks_it_takes_whole(case, chunk_span, monkeypatch):
    """With a per-channel K-side gate (no V-side one), the dq / dk kernel computes dA = dO V^T
    from the do and v tiles it loads for the chunks it takes whole (`whole_chunk`), and the
    scores-gradient kernel, told those chunks by the forward's chunk gates, writes dA only for
    the others. Gates with chunks on both sides of the limit (`span_gates`; K blocks deciding
    differently in one chunk where K > 32), a readout before the update, varlen: the
    gradients are those of the scores-gradient path (fused_backward=0) to rounding, the rows
    of the whole chunks stay poisoned (NaN) in the scores gradient, and the rest is written."""
    from triton.runtime.jit import KernelInterface

    from attnc.runtime.chunk_diag_op import ChunkDiagFunction

    torch.manual_seed(5)
    q, k, v, _, gv, h0, cu_seqlens = make_inputs(case)
    B = q.shape[0]
    g = span_gates(B, case.T, case.H, case.K, strong_channels_from=32 if case.K > 32 else None,
                   chunk_span=chunk_span)
    module = ChunkDiagFunction.module_for(kernel_spec(q, g, gv, case.exclusive))
    options = dict(chunk_size=case.chunk_size, input_precision="ieee", poison=True)
    o, ht, saved = module.forward(q, k, v, g, gv, h0, cu_seqlens, True, keep=True, **options)
    assert saved.chunk_gate is not None
    do, dht = torch.randn_like(o), torch.randn_like(ht)
    written = []
    launch_as_defined = KernelInterface.__getitem__

    def launch(kernel, grid):
        run = launch_as_defined(kernel, grid)
        if not (getattr(kernel, "fn", kernel).__name__.endswith("_intra_scores_grad")):
            return run

        def keep_output(*args, **kwargs):
            run(*args, **kwargs)
            written.append(args[4].clone())  # the scores gradient, [B, T, H, chunk size]
        return keep_output

    def backward(fused):
        written.clear()
        monkeypatch.setattr(KernelInterface, "__getitem__", launch)
        try:
            grads = module.backward(q, k, v, g, gv, h0, cu_seqlens, do, dht, scale=0.7, saved=saved,
                                    config={"fused_backward": fused}, **options)
        finally:
            monkeypatch.setattr(KernelInterface, "__getitem__", launch_as_defined)
        (d_scores,) = written
        return grads, d_scores

    (fused, d_fused), (apart, d_apart) = backward(1), backward(0)
    for label, a, b in zip("dq dk dv dg dgv dh0".split(), fused, apart):
        assert (a is None) == (b is None), label
        if a is not None:
            assert torch.isfinite(a).all() and rel_rms(a, b) <= 1e-5, f"{label}: {rel_rms(a, b):.2e}"
    assert torch.isfinite(d_apart).all()
    # the chunks the dq / dk kernel takes whole in every K block ([chunks, H]: their span,
    # -b_last, under the limit in every channel): no row of theirs written, every other row
    whole = (-saved.chunk_gate).clamp_min(0).amax(-1) < 20.0
    written_rows = d_fused.isfinite().all(-1)  # [B, T, H]
    bounds = cu_seqlens.tolist() if case.seqlens else [0, case.T]
    chunk = 0
    for b in range(B):
        for bos, eos in zip(bounds[:-1], bounds[1:]):
            for start in range(bos, eos, case.chunk_size):
                rows = written_rows[b, start:min(start + case.chunk_size, eos)]
                assert (rows == ~whole[chunk]).all(), f"chunk {chunk}: whole {whole[chunk].tolist()}"
                chunk += 1
    assert chunk == whole.shape[0]
    # (20.8: the full chunks over the limit, the short last one under it)
    assert whole.any() and not whole.all(), "the gates do not take both paths"


@pytest.mark.parametrize("case", [Case("scalar", T=100, K=80, V=16), Case("scalar", vgate=True, T=100, K=80, V=16),
                                  Case("channel", T=100, K=48, V=32), Case("channel", vgate=True, T=100, K=48, V=32)],
                         ids=str)
def test_gate_gradient_takes_its_carries_from_the_dq_dk_kernel(case, record_launches):
    """Each chunk's carry into the K-side gate gradient, <S_C, dS_C> (the state terms from
    the state entering the chunk, the write terms), comes in parts from the dq / dk kernel,
    which loads those state tiles anyway: after it the backward runs dv and the gate
    gradients only, no pass that reads the states again. (Values: the golden tests.)"""
    torch.manual_seed(0)
    q, k, v, g, gv, h0, cu_seqlens = make_inputs(case)
    leaves = [None if x is None else x.detach().clone().requires_grad_() for x in (q, k, v, g, gv, h0)]
    out, _ = chunk_diag(*leaves, cu_seqlens, exclusive=case.exclusive, output_final_state=False)
    with record_launches() as launched:
        out.backward(torch.randn_like(out))
    dqdk = next(i for i, n in enumerate(launched) if n.endswith("_chunk_dqdk"))
    expected = ["chunk_dv", "gate_grad"] + (["vgate_grad"] if case.vgate else [])
    assert launched[dqdk + 1:] == [launched[dqdk].replace("chunk_dqdk", e) for e in expected], launched


@pytest.mark.parametrize("case", [Case("none", T=150, K=16, V=32, chunk_size=16),
                                  Case("scalar", exclusive=True, T=150, K=16, V=16, H=1, chunk_size=16),
                                  Case("channel", vgate=True, T=150, K=32, V=16, H=1, chunk_size=16)], ids=str)
def test_backward_starts_from_the_forwards_group_states(case, record_launches):
    """In groups of chunks the forward keeps its phase 1 (each group's state and log decays
    from zero, `Saved.groups`), and the backward's recompute of the chunk states runs phase 2
    from it: the gradients of one that runs phase 1 again (with a per-channel gate from k and
    the cumulated gate instead of the decayed keys: to rounding), one chunk_state_fwd launch
    fewer, and the kept states are read (changed, the gradients change)."""
    from attnc.runtime.chunk_diag_op import ChunkDiagFunction

    q, k, v, g, gv, h0, cu_seqlens = make_inputs(case)
    module = ChunkDiagFunction.module_for(kernel_spec(q, g, gv, case.exclusive))
    options = dict(chunk_size=case.chunk_size, input_precision="ieee", poison=True, config={"state_group": 4})
    o, ht, saved = module.forward(q, k, v, g, gv, h0, cu_seqlens, True, keep=True, **options)
    groups = saved.groups
    assert groups is not None and groups.size == 4
    rows = case.B * case.H * 3  # 10 chunks: groups of 4, 4 and 2
    assert groups.states.shape == (rows, case.K, case.V) and torch.isfinite(groups.states).all()
    assert (groups.decays is None) == (g is None) and (groups.vdecays is None) == (gv is None)
    do, dht = torch.randn_like(o), torch.randn_like(ht)

    def backward(saved):
        with record_launches() as launched:
            grads = module.backward(q, k, v, g, saved.vgate, h0, cu_seqlens, do, dht, o=o, saved=saved,
                                    **options)
        return grads, sum(name.endswith("chunk_state_fwd") for name in launched)

    (reused, launches), (recomputed, launches_again) = backward(saved), backward(saved._replace(groups=None))
    assert (launches, launches_again) == (1, 2)
    for label, a, b in zip("dq dk dv dg dgv dh0".split(), reused, recomputed):
        assert (a is None) == (b is None), label
        if a is not None:
            assert torch.isfinite(a).all() and rel_rms(a, b) <= 1e-6, f"{label}: {rel_rms(a, b):.2e}"
    changed, _ = backward(saved._replace(groups=groups._replace(states=groups.states + 1)))
    assert rel_rms(changed[0], reused[0]) > 1e-2, "the backward did not read the kept group states"

    # kept for a backward in other groups, they are refused
    with pytest.raises(ValueError, match="groups of 4 chunks, this backward's in groups of 2; pass the forward's"):
        module.backward(q, k, v, g, saved.vgate, h0, cu_seqlens, do, dht, o=o, saved=saved,
                        **{**options, "config": {"state_group": 2}})
    with pytest.raises(ValueError, match="this backward's in one program per sequence"):
        module.backward(q, k, v, g, saved.vgate, h0, cu_seqlens, do, dht, o=o, saved=saved,
                        **{**options, "config": {"state_group": 0}})
    with pytest.raises(ValueError, match=rf"saved.groups.states: expected shape \({rows}, {case.K}, {case.V}\)"):
        module.backward(q, k, v, g, saved.vgate, h0, cu_seqlens, do, dht, o=o, **options,
                        saved=saved._replace(groups=groups._replace(states=groups.states[1:])))
    # without groups nothing is kept
    assert module.forward(q, k, v, g, gv, h0, cu_seqlens, True, keep=True,
                          **{**options, "config": {"state_group": 0}})[2].groups is None


def test_saved_tensors_must_fit_the_backward():
    from attnc.runtime.chunk_diag_op import ChunkDiagFunction

    case = Case("channel", T=64, K=16, V=16)
    q, k, v, g, gv, h0, _ = make_inputs(case)
    module = ChunkDiagFunction.module_for(kernel_spec(q, g, gv, False))
    o, _, saved = module.forward(q, k, v, g, gv, h0, None, False, keep=True, chunk_size=32)
    do = torch.randn_like(o)
    with pytest.raises(ValueError, match="chunk size 32, this backward runs with 64"):
        module.backward(q, k, v, g, gv, h0, None, do, None, saved=saved)
    # a per-channel K-side gate is not kept (the backward cumulates g again)
    with pytest.raises(ValueError, match=r"saved.gate: expected None \(a per-channel gate is not kept.*got a tensor "
                                         r"of shape \(1, 64, 2, 16\)"):
        module.backward(q, k, v, g, gv, h0, None, do, None, chunk_size=32, saved=saved._replace(gate=g))
    with pytest.raises(ValueError, match="saved.scores: expected the forward's intra-chunk scores"):
        module.backward(q, k, v, g, gv, h0, None, do, None, chunk_size=32, saved=saved._replace(scores=None))
    with pytest.raises(ValueError, match=r"saved.chunk_gate: expected None or the chunk gates .* of shape "
                                         r"\(2, 2, 16\), got shape \(1, 2, 16\)"):
        module.backward(q, k, v, g, gv, h0, None, do, None, chunk_size=32,
                        saved=saved._replace(chunk_gate=saved.chunk_gate[:1]))
    with pytest.raises(ValueError, match="expected the Saved that forward"):
        module.backward(q, k, v, g, gv, h0, None, do, None, chunk_size=32, saved=(saved.gate, None, None, 32))
    # a scalar gate's cumulated gate is kept, and must have g's shape
    case = Case("scalar", T=64, K=16, V=16)
    q, k, v, g, gv, h0, _ = make_inputs(case)
    module = ChunkDiagFunction.module_for(kernel_spec(q, g, gv, False))
    o, _, saved = module.forward(q, k, v, g, gv, h0, None, False, keep=True, chunk_size=32)
    with pytest.raises(ValueError, match=r"saved.gate: expected the cumulated g of shape \(1, 64, 2\), got \(1, 32, 2\)"):
        module.backward(q, k, v, g, gv, h0, None, torch.randn_like(o), None, chunk_size=32,
                        saved=saved._replace(gate=saved.gate[:, :32]))
