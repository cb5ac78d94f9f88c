"""The fused recurrent kernels (codegen/recurrent.py, runtime/recurrent_op.py) against the
fp64 reference recurrence (codegen/reference.py), values and gradients.

Triton runs in its interpreter here (conftest.py), with outputs NaN-poisoned so that any
element no kernel wrote shows up. Errors are relative RMS, ||a - b|| / ||b||; the fp64
reference's gradients come from autograd through `op.reference`.
"""
from __future__ import annotations

import ast

import pytest
import torch

import attnc
from attnc.codegen.recurrent import _build, render_recurrent
from attnc.runtime.binding import bind
from attnc.runtime.recurrent_op import recurrent, step
from attnc.runtime.sampling import random_arguments
from attnc.runtime.verify import rel_rms

FP32_TOLERANCE = 1e-4
BF16_TOLERANCE = 2e-2
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SPECS = attnc.shipped_specs()

NONLINEAR = """\
attention tanh_state
  dims    K, V
  inputs  q[K], k[K], v[V]
  state   S[K, V]
  update  S = tanh(S) + outer(k, v)
  readout o = q @ S
end
"""

# two states, a readout before the updates, a split-free scalar output, weights of three
# shapes, a param, diag scalings on both sides of S and most elementwise functions
TWO_STATES = """\
attention two_states
  dims    K, V
  inputs  q[K], k[K], v[V], g
  weight  w[K], c
  param   p = 2
  state   S[K, V]
  state   z[K]
  readout s = sum(q * z) * c
  update  z = sigmoid(z) * silu(g) + l2norm(k) ** 2 + abs(w)
  update  S = diag(elu(z)) @ S @ diag(rsqrt(v * v + 1)) + outer(relu(k) - softplus(q), sqrt(v * v + p))
  readout o = (q @ S) / (sum(q * z * q) + 10) + logsigmoid(v) * tanh(g)
end
"""


def _tuple(x):
    return x if isinstance(x, tuple) else (x,)


def _dims(op, K, V):
    dims = {"K": K, "V": V}
    for d in op.spec.dims:
        dims.setdefault(d.name, 16)
    return dims


def _case(op, *, B=2, T=24, H=2, K=16, V=32, seqlens=None, heads=None, dtype=torch.float32,
          initial=True, seed=0, requires_grad=False):
    """Random arguments (sampling.random_arguments), initial states and cu_seqlens."""
    gen = torch.Generator().manual_seed(seed)
    cu_seqlens = None
    N = B
    if seqlens is not None:
        B, T, N = 1, sum(seqlens), len(seqlens)
        cu_seqlens = torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()], device=DEVICE)
    dims = _dims(op, K, V)
    args = random_arguments(op.analysis, B=B, T=T, H=H, dims=dims, dtype=dtype, device=DEVICE,
                            generator=gen, heads=heads)
    states = tuple(torch.randn(N, H, *(dims[d] for d in s.shape), generator=gen).to(DEVICE)
                   for s in op.spec.states) if initial else None
    if requires_grad:
        args = {n: t.requires_grad_() for n, t in args.items()}
        states = tuple(s.requires_grad_() for s in states) if states else None
    return args, states, cu_seqlens


def _reference(op, args, states, cu_seqlens, grad=False):
    ref_args = {n: t.detach().double().requires_grad_(grad) for n, t in args.items()}
    ref_states = tuple(s.detach().double().requires_grad_(grad) for s in states) if states else None
    outputs, finals = op.reference(**ref_args, initial_state=ref_states, output_final_state=True,
                                   cu_seqlens=cu_seqlens)
    return _tuple(outputs), _tuple(finals), ref_args, ref_states


def _errors(got, want):
    return [rel_rms(a, b) for a, b in zip(got, want)]


# ---------------------------------------------------------------------------------------
# forward, every shipped spec
# ---------------------------------------------------------------------------------------

def _layout(index):
    """Spread varlen, GQA and the split V axis over the specs."""
    return ("varlen", "gqa", "split")[index % 3]


@pytest.mark.parametrize("name", SPECS)
def test_forward_matches_reference(name):
    op = attnc.load(name)
    layout = _layout(SPECS.index(name))
    heads = None
    if layout == "gqa":  # the first two inputs shared by both heads
        heads = {i.name: 1 for i in op.spec.inputs[:2]}
    args, states, cu = _case(op, seqlens=[7, 13, 4] if layout == "varlen" else None, heads=heads)
    bound = bind(op.spec, args, initial_state=states, cu_seqlens=cu)
    outputs, finals = recurrent(op.spec, bound, output_final_state=True,
                                split_block=16 if layout == "split" else None)
    ref_outputs, ref_finals, _, _ = _reference(op, args, states, cu)
    for a, b in zip(outputs + finals, ref_outputs + ref_finals):
        assert a.shape == b.shape
    errors = _errors(outputs + finals, ref_outputs + ref_finals)
    assert max(errors) <= FP32_TOLERANCE, (layout, errors)


def test_forward_without_initial_or_final_state():
    op = attnc.load("rwkv7")
    args, _, _ = _case(op, initial=False)
    outputs, finals = recurrent(op.spec, bind(op.spec, args), output_final_state=False)
    assert finals is None
    ref_outputs, _, _, _ = _reference(op, args, None, None)
    assert max(_errors(outputs, ref_outputs)) <= FP32_TOLERANCE


# ---------------------------------------------------------------------------------------
# decode
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SPECS)
def test_step_matches_full_sequence(name):
    """Token by token and in blocks of 5 (5, 5, 1) from cached states = one full call."""
    op = attnc.load(name)
    T = 11
    args, states, _ = _case(op, T=T, V=16)
    full, full_states = recurrent(op.spec, bind(op.spec, args, initial_state=states), output_final_state=True)
    for block in (1, 5):
        cache = tuple(s.clone() for s in states)
        pieces = []
        for start in range(0, T, block):
            piece = {n: x[:, start:start + block] for n, x in args.items() if n in bound_inputs(op)}
            piece.update({n: x for n, x in args.items() if n not in bound_inputs(op)})
            outputs, cache = step(op.spec, bind(op.spec, piece), cache)
            pieces.append(outputs)
        stepped = tuple(torch.cat(parts, dim=1) for parts in zip(*pieces))
        errors = _errors(stepped + cache, full + full_states)
        assert max(errors) <= 1e-5, (block, errors)


def bound_inputs(op):
    return {i.name for i in op.spec.inputs}


def test_step_inplace_with_state_pool():
    """state_indices picks each sequence's row of a pool; inplace writes only those rows."""
    op = attnc.load("gated_deltanet")
    pool_size, rows = 5, [4, 0, 2]
    args, _, _ = _case(op, B=3, T=3)
    gen = torch.Generator().manual_seed(1)
    pool = torch.randn(pool_size, 2, 16, 32, generator=gen).to(DEVICE)
    before = pool.clone()
    indices = torch.tensor(rows, device=DEVICE, dtype=torch.int32)
    ref_outputs, ref_finals, _, _ = _reference(op, args, (before[rows],), None)

    copy_outputs, copy_states = step(op.spec, bind(op.spec, args), pool, state_indices=indices)
    assert torch.equal(pool, before)  # not in place: the given pool is untouched
    outputs, states = step(op.spec, bind(op.spec, args), pool, inplace=True, state_indices=indices)
    assert states[0] is pool
    for result_outputs, result_pool in ((copy_outputs, copy_states[0]), (outputs, pool)):
        assert max(_errors(result_outputs, ref_outputs)) <= FP32_TOLERANCE
        assert rel_rms(result_pool[rows], ref_finals[0]) <= FP32_TOLERANCE
        untouched = [r for r in range(pool_size) if r not in rows]
        assert torch.equal(result_pool[untouched], before[untouched])


def test_step_varlen_inplace():
    """Sequences at different positions decode 1, 3 and 2 tokens in one packed call."""
    op = attnc.load("mamba1")
    args, states, cu = _case(op, seqlens=[1, 3, 2])
    cache = tuple(s.clone() for s in states)
    outputs, new_states = step(op.spec, bind(op.spec, args, cu_seqlens=cu), cache, inplace=True)
    assert new_states[0] is cache[0]
    ref_outputs, ref_finals, _, _ = _reference(op, args, states, cu)
    assert max(_errors(outputs + cache, ref_outputs + ref_finals)) <= FP32_TOLERANCE


def test_step_launch_values_follow_each_call_shape():
    """The launcher keeps its launch values per call shape: alternating batch sizes, token
    counts and GQA head layouts each match the reference, and inputs that require grad
    give outputs and states that do not (a step has no autograd)."""
    op = attnc.load("gated_deltanet")
    cases = [dict(B=2, T=1), dict(B=3, T=2), dict(B=2, T=1, heads={"q": 1, "k": 1}),
             dict(B=3, T=2), dict(B=2, T=1)]
    for seed, case in enumerate(cases):
        args, states, _ = _case(op, V=16, seed=seed, requires_grad=True, **case)
        outputs, finals = step(op.spec, bind(op.spec, args), tuple(s.detach() for s in states))
        ref_outputs, ref_finals, _, _ = _reference(op, args, states, None)
        assert max(_errors(outputs + finals, ref_outputs + ref_finals)) <= FP32_TOLERANCE, case
        assert not any(t.requires_grad for t in outputs + finals), case


def test_step_rejects_bad_states():
    op = attnc.load("gla")
    args, states, _ = _case(op, T=1)
    with pytest.raises(ValueError, match="expected shape"):
        step(op.spec, bind(op.spec, args), states[0][:1])
    with pytest.raises(ValueError, match="contiguous float32"):
        step(op.spec, bind(op.spec, args), states[0].double(), inplace=True)


# ---------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------

def _check_gradients(op, *, tolerance=FP32_TOLERANCE, checkpoint=64, split_block=None, seed=0, **case):
    args, states, cu = _case(op, requires_grad=True, seed=seed, **case)
    bound = bind(op.spec, args, initial_state=states, cu_seqlens=cu)
    outputs, finals = recurrent(op.spec, bound, output_final_state=True, checkpoint=checkpoint,
                                split_block=split_block)
    ref_outputs, ref_finals, ref_args, ref_states = _reference(op, args, states, cu, grad=True)
    errors = dict(zip([*op.spec.outputs, *(f"final {s.name}" for s in op.spec.states)],
                      _errors(outputs + finals, ref_outputs + ref_finals)))
    gen = torch.Generator().manual_seed(seed + 1)
    cotangents = [torch.randn(r.shape, generator=gen, dtype=torch.float64) for r in ref_outputs + ref_finals]
    leaves = [*args.values(), *states]
    ref_leaves = [*ref_args.values(), *ref_states]
    grads = torch.autograd.grad(outputs + finals, leaves, [c.to(DEVICE, torch.float32) for c in cotangents])
    ref_grads = torch.autograd.grad(ref_outputs + ref_finals, ref_leaves, [c.to(DEVICE) for c in cotangents],
                                    allow_unused=True)
    names = [*(f"d{n}" for n in args), *(f"d(initial {s.name})" for s in op.spec.states)]
    for name, grad, ref, leaf in zip(names, grads, ref_grads, leaves):
        assert grad.shape == leaf.shape and grad.dtype == leaf.dtype, name
        if ref is not None:
            errors[name] = rel_rms(grad, ref)
    assert max(errors.values()) <= tolerance, errors
    return errors


@pytest.mark.parametrize("T, checkpoint, split_block", [(1, 64, None), (33, 16, 16), (130, 64, None)])
def test_mamba1_gradients(T, checkpoint, split_block):
    """Values and every gradient (inputs, weights, initial state) of the `other` class."""
    op = attnc.load("mamba1")
    errors = _check_gradients(op, T=T, B=2 if T < 100 else 1, H=2, checkpoint=checkpoint,
                              split_block=split_block)
    assert {"dC", "dB", "dx", "ddt", "dA_log", "ddt_bias", "dD", "d(initial S)"} <= set(errors)


def test_mamba1_gradients_varlen_gqa():
    op = attnc.load("mamba1")
    _check_gradients(op, seqlens=[9, 20, 5], heads={"C": 1, "B": 1}, checkpoint=8, split_block=16)


def test_rwkv7_gradients():
    _check_gradients(attnc.load("rwkv7"), T=40, checkpoint=16, split_block=16)


def test_nonlinear_state_gradients():
    _check_gradients(attnc.compile(NONLINEAR), T=30, checkpoint=8)


def test_two_state_gradients():
    """Split-free values (z, the scalar output s, weights w and c) under a split V axis:
    per-program partial gradients summed by the launcher."""
    op = attnc.compile(TWO_STATES)
    assert _build(op.spec).split_dim == "V"
    _check_gradients(op, T=21, checkpoint=8, split_block=16)


def test_checkpoints_keep_memory_linear_in_T_over_C():
    """Autograd keeps inputs, weights, initial states and ceil(T / C) states per sequence,
    nothing of size T * K * V."""
    op = attnc.load("mamba1")
    T, C, K, V, H, B = 130, 16, 16, 16, 2, 1
    args, states, _ = _case(op, B=B, T=T, H=H, K=K, V=V, requires_grad=True)
    saved = []

    def pack(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        outputs, finals = recurrent(op.spec, bind(op.spec, args, initial_state=states),
                                    output_final_state=True, checkpoint=C)
    sizes = [torch.Size(shape).numel() for shape in saved]
    assert max(sizes) < T * K * V
    checkpoint_shape = (B * -(-T // C), H, K, V)
    assert checkpoint_shape in saved
    inputs_and_weights = sum(x.numel() for x in args.values()) + states[0].numel()
    assert sum(sizes) == inputs_and_weights + torch.Size(checkpoint_shape).numel()
    (outputs[0].sum() + finals[0].sum()).backward()
    assert all(x.grad is not None for x in args.values())


def test_bf16_inputs():
    """Inputs stream as bf16, states and math stay fp32; outputs come back in bf16."""
    op = attnc.load("mamba1")
    args, states, _ = _case(op, dtype=torch.bfloat16, T=40, requires_grad=True)
    outputs, finals = recurrent(op.spec, bind(op.spec, args, initial_state=states),
                                output_final_state=True, checkpoint=16)
    assert outputs[0].dtype == torch.bfloat16 and finals[0].dtype == torch.float32
    ref_outputs, ref_finals, ref_args, ref_states = _reference(op, args, states, None, grad=True)
    assert max(_errors(outputs + finals, ref_outputs + ref_finals)) <= BF16_TOLERANCE
    cotangent = torch.randn(ref_outputs[0].shape, dtype=torch.float64)
    grads = torch.autograd.grad(outputs[0], list(args.values()), cotangent.to(torch.bfloat16))
    ref_grads = torch.autograd.grad(ref_outputs[0], list(ref_args.values()), cotangent)
    for grad, ref in zip(grads, ref_grads):
        assert grad.dtype == torch.bfloat16
        assert rel_rms(grad, ref) <= BF16_TOLERANCE


# ---------------------------------------------------------------------------------------
# the generated source
# ---------------------------------------------------------------------------------------

def test_generated_source_reads_like_the_spec():
    source = render_recurrent(attnc.load("mamba1").spec)
    ast.parse(source)
    assert "def mamba1_recurrent_fwd(" in source and "def mamba1_recurrent_bwd(" in source
    assert "# mamba1.attn:13  update S = S + outer(B, delta * x)" in source
    assert "# d(mamba1.attn:10  gate a = exp(-exp(A_log) @ diag(delta)))" in source
    assert "b_delta = _softplus(" in source


def test_split_dim_follows_the_reductions():
    """V is split unless something reduces over V; then no dim is split, and the kernels
    still match the reference."""
    assert _build(attnc.load("rwkv7").spec).split_dim == "V"
    op = attnc.compile("""\
attention v_norm
  dims    K, V
  inputs  q[K], k[K], v[V]
  state   S[K, V]
  update  S = S + outer(k, l2norm(v))
  readout o = q @ S
end
""")
    assert _build(op.spec).split_dim is None
    args, states, _ = _case(op, T=9)
    outputs, finals = recurrent(op.spec, bind(op.spec, args, initial_state=states), output_final_state=True,
                                split_block=16)
    ref_outputs, ref_finals, _, _ = _reference(op, args, states, None)
    assert max(_errors(outputs + finals, ref_outputs + ref_finals)) <= FP32_TOLERANCE


def test_spec_names_that_clash_with_kernel_names():
    """Spec names equal to the kernel's own identifiers are renamed in the generated code."""
    op = attnc.compile("""\
attention clash
  dims    K, V
  inputs  row[K], tl[K], seq_len[V]
  state   t[K, V]
  update  t = t + outer(tl, seq_len)
  readout bos = row @ t
end
""")
    args, states, _ = _case(op, T=5)
    outputs, finals = recurrent(op.spec, bind(op.spec, args, initial_state=states), output_final_state=True)
    ref_outputs, ref_finals, _, _ = _reference(op, args, states, None)
    assert max(_errors(outputs + finals, ref_outputs + ref_finals)) <= FP32_TOLERANCE
