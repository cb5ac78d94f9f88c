"""The fused Triton prologue / epilogue (templates/elementwise.py.jinja) against the
plan's PyTorch ones, which print the same derivation (codegen/elementwise.py) op by op.

Both run on the same fp32 data with random cotangents; values and gradients must agree
to a relative RMS of 1e-6. Gradients summed over tokens (weights) may differ by more in
summation order alone (fp32 sums over B * T tokens with cancellation), so those are held
to a three-way bound instead: against the PyTorch program in fp64, within a small multiple
of the fp32 PyTorch program's own error (or of 1e-6, whichever is larger).
"""
import sys

import pytest
import torch

import attnc
from attnc.codegen.emit_torch import elementwise_parts, emit_elementwise
from attnc.codegen.plan import plan_chunks
from attnc.runtime.sampling import random_arguments
from attnc.runtime.verify import verify

from test_ops_diag import ZOO  # the spec that uses every function of the language

CHUNK_SPECS = ["linear_attn", "retnet", "mamba2", "gla", "hgrn2", "rwkv6",
               "deltanet", "gated_deltanet", "kda"]

# a gate from weights alone (an operand with no per-token input), a vector weight inside a
# feature map, integer, half-integer, constant and param powers
WEIGHTED = """
attention weighted
  dims    K, V
  inputs  q[K], k[K], v[V]
  weight  A_log, u[K]
  param   p = 1.5

  feature k = k * sigmoid(u)
  feature q = (q * q + 1) ** 0.75 / (sum(q * q) + 1) ** 3 + (q * q + 2) ** p
  gate    a = exp(-exp(A_log))
  state   S[K, V]
  decay   S = a * S
  update  S = S + outer(k, v)
  readout o = q @ S
end
"""

# KDA with feature maps its chunk kernels do not compute (l2norm of a function of an input,
# beside a per-channel gate): a prologue with a backward kernel, as no shipped chunk spec has
KDA_MAPPED = """
attention kda_mapped
  dims    K, V
  inputs  q[K], k[K], v[V], g[K], beta
  param   scale = K ** -0.5

  feature q = l2norm(q * sigmoid(q)) * scale
  feature k = l2norm(k * sigmoid(k))
  gate    a = exp(g)
  state   S[K, V]
  decay   S = diag(a) @ S
  update  S = S + beta * outer(k, v - k @ S)
  readout o = q @ S
end
"""

TOLERANCE = 1e-6
SUMMED = 4  # gradients summed over tokens: this many times PyTorch's own fp32 error (or 1e-6)


def _op(name):
    return {"zoo": lambda: attnc.compile(ZOO), "weighted": lambda: attnc.compile(WEIGHTED),
            "kda_mapped": lambda: attnc.compile(KDA_MAPPED)}.get(name, lambda: attnc.load(name))()


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def _programs(op):
    """(part, program input names, PyTorch Function, Triton Function) of both parts (the
    epilogue only where every kernel operand is an input as it is: no prologue)."""
    plan = op.plan_module()
    parts = elementwise_parts(plan_chunks(op.analysis))
    torch_fns = plan.elementwise("torch")
    triton_fns = plan.elementwise("triton")
    programs = [("prologue", parts.prologue.inputs, torch_fns[0], triton_fns[0]),
                ("epilogue", parts.epilogue.inputs, torch_fns[1], triton_fns[1])]
    return parts.dims, [p for p in programs if p[2] is not None]


def _arguments(op, names, dims, *, B, T, H, K, V, scale=1.0, gen):
    weights = {w.name for w in op.spec.weights}
    sizes = {"K": K, "V": V}
    args = []
    for name in names:
        D = sizes[dims[name]] if dims.get(name) else 1
        shape = (1, 1, H, D) if name in weights else (B, T, H, D)
        args.append((scale * torch.randn(*shape, generator=gen)).requires_grad_())
    return args


def _compare(label, names, fn_torch, fn_triton, params, args, weights, gen):
    """Forward values and every gradient, Triton vs PyTorch (fp32) and vs fp64."""
    args64 = [a.detach().double().requires_grad_() for a in args]
    out_torch = fn_torch.apply(params, torch.float32, *args)
    out_triton = fn_triton.apply(params, torch.float32, *args)
    out_64 = fn_torch.apply(params, torch.float64, *args64)
    assert len(out_torch) == len(out_triton)
    for i, (x, t) in enumerate(zip(out_triton, out_torch)):
        assert x.dtype == torch.float32 and torch.isfinite(x).all(), f"{label} output {i}"
        x, t = torch.broadcast_tensors(x, t)  # an operand of weights alone: [1, 1, H, D] in torch
        assert _rel(x, t) <= TOLERANCE, f"{label} output {i}: {_rel(x, t):.2e}"
    cotangents = [torch.randn(o.shape, generator=gen) for o in out_triton]
    grads_triton = torch.autograd.grad(out_triton, args, cotangents, allow_unused=True)
    cot_torch = [c.sum((0, 1), keepdim=True) if o.shape != c.shape else c
                 for o, c in zip(out_torch, cotangents)]
    grads_torch = torch.autograd.grad(out_torch, args, cot_torch, allow_unused=True)
    grads_64 = torch.autograd.grad(out_64, args64, [c.double() for c in cot_torch],
                                   allow_unused=True)
    for name, x, t, g64 in zip(names, grads_triton, grads_torch, grads_64):
        if t is None:
            assert x is None or not x.any(), f"{label} d{name}: PyTorch has none"
            continue
        assert x is not None and x.shape == t.shape, f"{label} d{name}"
        if name in weights:   # a sum over tokens: summation order counts
            bound = SUMMED * max(TOLERANCE, _rel(t, g64))
            assert _rel(x, g64) <= bound, f"{label} d{name}: {_rel(x, g64):.2e} > {bound:.2e}"
        else:
            assert _rel(x, t) <= TOLERANCE, f"{label} d{name}: {_rel(x, t):.2e}"


def _check_spec(name, *, B=2, T=37, H=3, K=16, V=24, scale=1.0, weights_per_token=False):
    op = _op(name)
    dims, programs = _programs(op)
    gen = torch.Generator().manual_seed(7)
    params = {p.name: 0.7 for p in op.spec.params}
    weights = {w.name for w in op.spec.weights}
    for part, names, fn_torch, fn_triton in programs:
        args = _arguments(op, names, dims, B=B, T=T, H=H, K=K, V=V, scale=scale, gen=gen)
        if weights_per_token:
            args = [a.detach().expand(B, T, *a.shape[2:]).contiguous().requires_grad_()
                    for a in args]
        _compare(f"{name} {part}", names, fn_torch, fn_triton, params, args,
                 set() if weights_per_token else weights, gen)


@pytest.mark.parametrize("name", CHUNK_SPECS + ["zoo", "weighted", "kda_mapped"])
def test_fused_matches_pytorch(name):
    _check_spec(name)


# the interpreter evaluates both branches of tl.where, and numpy warns about the one not taken
@pytest.mark.filterwarnings("ignore:divide by zero", "ignore:invalid value")
@pytest.mark.parametrize("name", ["zoo", "mamba2"])
def test_large_arguments_stay_finite(name):
    """Stable forms: softplus, logsigmoid, sigmoid, elu, tanh at |x| ~ 30, K not a power of two."""
    _check_spec(name, scale=10.0, K=20, V=8)


@pytest.mark.parametrize("name", ["zoo", "mamba2", "rwkv6", "weighted"])
def test_weights_per_token_and_single_token(name):
    """A weight given per token takes per-token gradients; with B * T = 1 nothing is
    summed over tokens."""
    _check_spec(name, weights_per_token=True, T=5)
    _check_spec(name, B=1, T=1, H=2)


@pytest.mark.parametrize("name", ["gated_deltanet", "zoo"])
@pytest.mark.parametrize("layout", ["repeated", "expanded", "transposed"])
def test_gqa_heads_and_strided_tensors(name, layout):
    """Inputs shared by groups of heads, repeated as the op does (binding.expand_heads);
    one head seen by all through a stride-0 view (no copy); a [B, H, T, D] layout seen as
    [B, T, H, D]. Cotangents are strided views too. Gradients reach the shared tensors
    through autograd."""
    op = _op(name)
    dims, programs = _programs(op)
    B, T, H, K, V = 2, 19, 4, 16, 24
    gen = torch.Generator().manual_seed(3)
    params = {p.name: 0.7 for p in op.spec.params}
    weights = {w.name for w in op.spec.weights}
    heads = {"repeated": H // 2, "expanded": 1, "transposed": H}[layout]
    for part, names, fn_torch, fn_triton in programs:
        shared = _arguments(op, names, dims, B=B, T=T, H=heads, K=K, V=V, gen=gen)

        def per_head(name_, x):
            if name_ in weights:
                return x.repeat_interleave(H // x.shape[2], dim=2)
            if layout == "repeated":
                return x.repeat_interleave(H // heads, dim=2)
            if layout == "expanded":
                return x.expand(B, T, H, x.shape[-1])
            return x.transpose(1, 2).contiguous().transpose(1, 2)

        grads = []
        for fn in (fn_torch, fn_triton):
            outs = fn.apply(params, torch.float32, *(per_head(n, x) for n, x in zip(names, shared)))
            cot_gen = torch.Generator().manual_seed(5)
            cots = [torch.randn(*o.shape[:-1], 2 * o.shape[-1], generator=cot_gen)[..., ::2]
                    for o in outs]
            grads.append(torch.autograd.grad(outs, shared, cots, allow_unused=True))
        for name_, t, x in zip(names, *grads):
            if t is not None:
                # sums over tokens (weights) or heads (the expanded view): summation order
                summed = name_ in weights or layout == "expanded"
                bound = SUMMED * TOLERANCE if summed else TOLERANCE
                assert _rel(x, t) <= bound, f"{name} {part} d{name_}: {_rel(x, t):.2e}"


def test_plan_runs_the_fused_parts_on_triton():
    """The fused modules ride in the op's sources beside the plan, are named after the
    spec, and the plan picks them by backend. (kda_mapped: its prologue computes
    l2norm(q * sigmoid(q)) * scale and l2norm(k * sigmoid(k)), so it has a backward kernel too.)"""
    op = _op("kda_mapped")
    files = op.sources()
    assert {"kda_mapped_prologue.py", "kda_mapped_epilogue.py"} <= set(files)
    assert "def kda_mapped_prologue_fwd(" in files["kda_mapped_prologue.py"]
    assert "def kda_mapped_prologue_bwd(" in files["kda_mapped_prologue.py"]
    plan = op.plan_module()
    assert plan.elementwise("torch") == (plan.Prologue, plan.Epilogue)
    fused = plan.elementwise("triton")
    assert [f.__module__.rsplit("_", 1)[0] for f in fused] == ["attnc_generated_kda_mapped_prologue",
                                                                "attnc_generated_kda_mapped_epilogue"]
    assert emit_elementwise(plan_chunks(op.analysis)).keys() == {"kda_mapped_prologue", "kda_mapped_epilogue"}


@pytest.mark.parametrize("name, runs_epilogue", [("mamba2", False), ("gla", False), ("deltanet", False),
                                                  ("hgrn2", False), ("rwkv6", True)])
def test_plan_runs_no_epilogue_where_the_outputs_are_readouts(name, runs_epilogue, monkeypatch):
    """Where every output is a chunk call's readout as it is (mamba2's D * x is added by its
    chunk kernel), the plan hands the readouts back without an epilogue Function, which
    costs host time on every call; rwkv6's epilogue (its u-bonus term) still runs."""
    op = attnc.load(name)
    plan_source = op.sources()[f"{name}_plan.py"]
    assert ("outputs = epilogue.apply(" in plan_source) == runs_epilogue
    plan = op.plan_module()
    _, epilogue = plan.elementwise("triton")
    applied = []
    apply = epilogue.apply
    monkeypatch.setattr(epilogue, "apply", lambda *args: applied.append(1) or apply(*args))
    args = random_arguments(op.analysis, B=1, T=20, H=2, dims={"K": 16, "V": 16})
    out, _ = op(**args, backend="triton")
    assert len(applied) == int(runs_epilogue)
    ref, _ = op.reference(**args)
    assert _rel(out, ref) <= 1e-4


@pytest.mark.parametrize("name, computed", [
    ("deltanet", None), ("gla", None), ("retnet", None),   # q, k, v (beta, log_gamma) as given
    ("mamba2", None),          # C, B, x as given; the log gate and delta by the chunk kernels
    ("kda", None),             # q, k, v, g, beta as given: the chunk kernels normalise q and k
    ("kda_mapped", ["S_query", "S_key"]),     # l2norm(q * sigmoid(q)), ...; v, beta, g as given
])
def test_operands_that_are_inputs_skip_the_prologue(name, computed, monkeypatch):
    """A kernel operand that is an input as it is goes from the argument to the chunk call;
    the prologue computes only the others, and a plan with none to compute runs no
    prologue Function (one per call costs host time, forward and backward). Values and
    gradients against the recurrence."""
    op = _op(name)
    parts = elementwise_parts(plan_chunks(op.analysis))
    assert (parts.prologue.output_names or None) == computed
    sources = op.sources()
    assert (f"{name}_prologue.py" in sources) == bool(computed)
    assert ("prologue.apply(" in sources[f"{name}_plan.py"]) == bool(computed)
    plan = op.plan_module()
    prologue, _ = plan.elementwise("triton")
    assert (prologue is None) == (computed is None) and (plan.Prologue is None) == (computed is None)
    applied = []
    if prologue is not None:
        apply = prologue.apply
        monkeypatch.setattr(prologue, "apply", lambda *args: applied.append(1) or apply(*args))
    args = random_arguments(op.analysis, B=1, T=20, H=2, dims={"K": 16, "V": 16}, requires_grad=True)
    for backend in ("triton", "torch"):
        out, _ = op(**args, backend=backend)
        grads = torch.autograd.grad(out, list(args.values()), torch.ones_like(out))
        ref_args = {n: a.detach().double().requires_grad_() for n, a in args.items()}
        ref, _ = op.reference(**ref_args)
        ref_grads = torch.autograd.grad(ref, list(ref_args.values()), torch.ones_like(ref))
        assert _rel(out, ref) <= 1e-4, backend
        for n, g, r in zip(args, grads, ref_grads):
            assert _rel(g, r) <= 1e-4, f"{backend} d{n}: {_rel(g, r):.2e}"
    assert len(applied) == int(computed is not None)


@pytest.mark.parametrize("name, gate_input, forward, derivative", [
    ("gla", "g", "_logsigmoid(x) / 16.0", "_sigmoid(-x) / 16.0"),
    ("rwkv6", "w", "-tl.exp(x)", "-tl.exp(x)"),
    ("hgrn2", "f", "_logsigmoid(x)", "_sigmoid(-x)"),
    ("kda", None, None, None),      # the log gate is the input g itself: nothing to compute
    ("mamba2", None, None, None),   # a scalar gate of several inputs and weights
])
def test_a_per_channel_gate_of_one_input_is_computed_by_the_chunk_kernels(name, gate_input, forward,
                                                                         derivative):
    """A per-channel log gate f(u) of one input u: the chunk call takes u with an InputMap
    (f and f' in Triton, f' from sympy), so the prologue writes no log gate, and the
    kernel module computes f as it cumulates u and f' in the gate gradient."""
    op = attnc.load(name)
    (call,) = plan_chunks(op.analysis).calls
    assert call.gate_input == gate_input
    sources = op.sources()
    kernels = sources[f"{name}_S_kernels.py"]
    if gate_input is None:
        assert call.gate_map() is None and "gate_map=" not in sources[f"{name}_plan.py"]
        assert "def _log_gate(" not in kernels
        return
    assert call.gate_map()[:2] == (forward, derivative)
    assert f"gate_map={name.upper()}_S_GATE_MAP" in sources[f"{name}_plan.py"]
    assert f"return {forward}\n" in kernels and f"return {derivative}\n" in kernels
    assert "S_log_gate" not in sources.get(f"{name}_prologue.py", "")  # gla, rwkv6: no prologue


CLASHING_NAMES = """
attention clashing_names
  dims    K, V
  inputs  ops[K], t0[K], values[V], d_x
  weight  params[V]
  param   tensors = 0.5
  state   S[K, V]
  gate    a = exp(-softplus(d_x) * tensors)
  decay   S = a * S
  update  S = S + outer(t0, values)
  readout o = ops @ S + params * values
end
"""


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_spec_names_that_clash_with_the_plans_own(backend):
    """Spec names the generated plan uses itself (values, ops, params, tensors) or that look
    like its variables (t0, d_x) are renamed inside the programs, and the plan still finds
    each argument under its spec name (an input, a weight and a param; in the prologue,
    the epilogue and passed through as they are)."""
    result = verify(attnc.compile(CLASHING_NAMES), backend=backend, B=1, T=40, H=2, K=16, V=16)
    assert result.ok, result.errors


def test_delta_kernels_normalise_q_and_k_themselves():
    """deltanet's q = l2norm(q) * scale and k = l2norm(k): the chunk call takes the raw
    inputs with l2norm_q / l2norm_k and scale as its output factor, so there is nothing
    for a prologue to compute, and none is generated or run."""
    op = attnc.load("deltanet")
    (call,) = plan_chunks(op.analysis).calls
    assert (call.l2norm_query, call.l2norm_key) == (True, True)
    assert (call.query.name, call.key.name, str(call.scale)) == ("q", "k", "scale")
    plan_source = op.sources()["deltanet_plan.py"]
    assert "l2norm_q=True" in plan_source and "l2norm_k=True" in plan_source
    assert "deltanet_prologue.py" not in op.sources() and "prologue.apply(" not in plan_source


@pytest.mark.parametrize("name", ["mamba2", "rwkv6", "gated_deltanet", "weighted"])
def test_end_to_end_on_triton(name):
    """Whole op (fused prologue, chunk kernels, fused epilogue) against the fp64 reference."""
    result = verify(_op(name), backend="triton", B=1, T=40, H=2, K=16, V=16)
    assert result.ok, result.errors


def test_fused_parts_store_streamed_tensors_in_the_stream_dtype():
    """On bf16 inputs the fused prologue stores the q, k, v operands of the chunk kernels
    in bf16 (no conversion pass before them) and the log gate and beta in fp32; the
    epilogue stores the outputs in bf16. (kda_mapped: its kernels take the normalised
    feature maps of q and k, which its prologue computes.)"""
    op = _op("kda_mapped")
    dims, programs = _programs(op)
    gen = torch.Generator().manual_seed(11)
    params = {p.name: 0.7 for p in op.spec.params}
    (_, pro_names, pro_torch, pro_triton), (_, epi_names, _, epi_triton) = programs
    args = [a.detach().to(torch.bfloat16) for a in
            _arguments(op, pro_names, dims, B=1, T=20, H=2, K=16, V=16, gen=gen)]
    names = elementwise_parts(plan_chunks(op.analysis)).prologue.output_names
    outputs = dict(zip(names, pro_triton.apply(params, torch.bfloat16, *args)))
    reference = pro_torch.apply(params, torch.float32, *(a.float() for a in args))
    computed = []
    for (name, out), ref in zip(outputs.items(), reference):
        if any(out.data_ptr() == a.data_ptr() for a in args):
            continue   # an input unchanged is that input
        computed.append(name)
        streamed = name.endswith(("_query", "_key", "_value"))
        assert out.dtype == (torch.bfloat16 if streamed else torch.float32), name
        assert _rel(out.float(), ref) <= (1e-2 if streamed else TOLERANCE), name
    assert {"S_query", "S_key"} <= set(computed)   # l2norm(q), l2norm(k)
    epi_args = [a.detach().to(torch.bfloat16) for a in
                _arguments(op, epi_names, dims, B=1, T=20, H=2, K=16, V=16, gen=gen)]
    assert all(o.dtype == torch.bfloat16 for o in epi_triton.apply(params, torch.bfloat16, *epi_args))


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter check: a GPU may contract the fp32 math differently")
@pytest.mark.parametrize("name", ["kda_mapped", "weighted"])
def test_fused_backward_stores_gradients_in_the_inputs_dtypes(name):
    """Per-token bf16 inputs get their gradients from the fused backward in bf16, the fp32
    result rounded once (the values autograd's conversion would give, without its pass);
    weights (summed over tokens) and inputs that are also outputs keep the fp32 path."""
    op = _op(name)
    dims, programs = _programs(op)
    gen = torch.Generator().manual_seed(5)
    params = {p.name: 0.7 for p in op.spec.params}
    _, names, _, fused = programs[0]
    args = _arguments(op, names, dims, B=1, T=20, H=2, K=16, V=16, gen=gen)
    per_token = [a.dim() >= 3 and a.shape[1] == 20 for a in args]
    low = [a.detach().to(torch.bfloat16) if p else a.detach() for a, p in zip(args, per_token)]

    def grads(inputs, dtype):
        leaves = [a.clone().requires_grad_() for a in inputs]
        outputs = fused.apply(params, dtype, *leaves)
        cotangents = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)).to(torch.bfloat16)
                      for i, o in enumerate(outputs)]
        loss = sum((o.float() * c.float()).sum() for o, c in zip(outputs, cotangents))
        return torch.autograd.grad(loss, leaves)

    low_grads = grads(low, torch.bfloat16)
    fp32_grads = grads([a.float() for a in low], torch.float32)
    # the launcher itself, without autograd's conversions: which gradients come out in bf16
    outputs = fused.apply(params, torch.bfloat16, *low)
    direct = sys.modules[fused.__module__].prologue_backward(params, *low, *(torch.ones_like(o) for o in outputs))
    direct = dict(zip(names, direct))
    assert direct["q"].dtype == direct["k"].dtype == torch.bfloat16   # feature maps of q and k
    checked = 0
    for a, g, ref in zip(low, low_grads, fp32_grads):
        assert g.dtype == a.dtype
        if a.dtype == torch.bfloat16:
            assert torch.equal(g, ref.to(torch.bfloat16)), "not the fp32 gradient rounded once"
            checked += 1
    assert checked >= 2
