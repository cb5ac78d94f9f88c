"""Inputs of different dtypes in one call: models compute their gates in fp32 beside bf16
activations (fla's Gated DeltaNet layer: g = -exp(A_log) * softplus(a_proj(x).float() +
dt_bias)). The call streams q/k/v in the activations' bf16, reads the fp32 gate as it is,
returns bf16 outputs and gives each input its gradient in its own dtype."""
import warnings

import pytest
import torch

import attnc
from attnc.runtime.binding import stream_dtype
from attnc.runtime.compiler import NotChunkParallelWarning
from attnc.runtime.launches import TensorArg, Trace, _recording, decay_check
from attnc.runtime.sampling import random_arguments
from attnc.runtime.verify import rel_rms, verify

FP32_GATES = [("gated_deltanet", ("alpha",)), ("gla", ("g",)), ("mamba2", ("dt",)), ("hgrn2", ("f",)),
              ("kda", ("g", "beta"))]


def _load(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotChunkParallelWarning)
        return attnc.load(name)


def test_stream_dtype_is_the_inputs_half_precision_dtype():
    bf16, fp16, fp32 = (torch.empty(1, dtype=d) for d in (torch.bfloat16, torch.float16, torch.float32))
    assert stream_dtype([bf16, bf16, fp32]) == torch.bfloat16
    assert stream_dtype([fp32, fp16]) == torch.float16
    assert stream_dtype([fp32, fp32]) == torch.float32
    assert stream_dtype([bf16, fp16, fp32]) == torch.float32  # two half dtypes: no choice made
    assert stream_dtype([torch.empty(1, dtype=torch.float64)]) == torch.float32


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("name,fp32", FP32_GATES, ids=[n for n, _ in FP32_GATES])
def test_fp32_gates_beside_bf16_activations(name, fp32, backend):
    """Against the fp64 reference (values, final state, every gradient; verify checks that
    the outputs come back in bf16), and each gradient in its input's dtype."""
    op = _load(name)
    dtypes = dict.fromkeys(fp32, torch.float32)
    result = verify(op, B=1, T=70, H=2, K=32, V=32, dtype=torch.bfloat16, dtypes=dtypes, backend=backend)
    assert result.ok, result.errors

    args = random_arguments(op.analysis, B=1, T=20, H=2, dims={"K": 16, "V": 16}, dtype=torch.float32)
    args = {n: t.to(dtypes.get(n, torch.bfloat16)).requires_grad_() for n, t in args.items()}
    out, _ = op(**args, backend=backend)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert {n: t.grad.dtype for n, t in args.items()} == {n: t.dtype for n, t in args.items()}


def _launches(op, args):
    """The GPU launches of a forward and backward on `args`: (phase, kernel, {argument:
    (shape, dtype)})."""
    trace = Trace()
    decay_check(next(iter(args.values())).device, "")
    with _recording(trace) as recorder:
        recorder.phase = "forward"
        out, _ = op(**args, backend="triton")
        recorder.phase = "backward"
        out.backward(torch.ones_like(out))
    return out.dtype, [(launch.phase, launch.name, {n: (a.shape, a.dtype) if isinstance(a, TensorArg) else a
                                                    for n, a in launch.arguments.items()})
                       for launch in trace.launches()]


@pytest.mark.parametrize("name,gate", [("gated_deltanet", "alpha"), ("mamba2", "dt")])
def test_an_fp32_scalar_gate_launches_what_an_all_bf16_call_does(name, gate):
    """With the per-token gate in fp32, the GPU launches are an all-bf16 call's, forward and
    backward, the same tensors in the same dtypes (bf16 dots, no fp32 copies of q/k/v)
    but for the gate and its gradient ([B, T, H]). Before, the call went fp32 throughout:
    gated_deltanet's forward moved 2.8x the bytes at 16 x 2048."""
    op = _load(name)
    B, T, H, D = 2, 128, 2, 32
    drawn = random_arguments(op.analysis, B=B, T=T, H=H, dims={"K": D, "V": D}, dtype=torch.float32)
    bf16 = {n: t.bfloat16().requires_grad_() for n, t in drawn.items()}
    mixed = {n: (t if n == gate else t.bfloat16()).requires_grad_() for n, t in drawn.items()}
    (bf16_dtype, expected), (mixed_dtype, got) = _launches(op, bf16), _launches(op, mixed)
    assert bf16_dtype == mixed_dtype == torch.bfloat16
    assert [(p, k) for p, k, _ in got] == [(p, k) for p, k, _ in expected]
    assert {p for p, _, _ in got} == {"forward", "backward"}
    for (_, kernel, arguments), (_, _, wanted) in zip(got, expected):
        assert arguments.keys() == wanted.keys(), kernel
        differing = {n: (arguments[n], wanted[n]) for n in arguments if arguments[n] != wanted[n]}
        assert all(value[0] == (B, T, H) and value[1] == torch.float32 for value, _ in differing.values()), \
            (kernel, differing)


@pytest.mark.parametrize("name,fp32", [("gated_deltanet", "alpha"), ("mamba1", "dt"), ("rwkv7", "a")])
def test_decode_steps_with_an_fp32_gate_continue_the_sequence(name, fp32):
    """op.step with the gate in fp32 and the rest in bf16 (also on the recurrent kernels of
    specs with no chunk form): bf16 outputs equal to the full-sequence call's."""
    op = _load(name)
    B, T, H = 2, 6, 2
    dims = {d.name: 16 for d in op.spec.dims}
    args = random_arguments(op.analysis, B=B, T=T, H=H, dims=dims, dtype=torch.float32,
                            generator=torch.Generator().manual_seed(2))
    args = {n: t.to(torch.float32 if n == fp32 else torch.bfloat16) for n, t in args.items()}
    full, _ = op(**args, backend="triton")
    full = full[0] if isinstance(full, tuple) else full
    inputs = {i.name for i in op.spec.inputs}
    state = tuple(torch.zeros(B, H, *(dims[d] for d in s.shape)) for s in op.spec.states)
    stepped = []
    for t in range(T):
        out, state = op.step(**{n: x[:, t:t + 1] if n in inputs else x for n, x in args.items()},
                             state=state[0] if len(state) == 1 else state, backend="triton")
        state = state if isinstance(state, tuple) else (state,)
        stepped.append(out[0] if isinstance(out, tuple) else out)
    stepped = torch.cat(stepped, dim=1)
    assert stepped.dtype == full.dtype == torch.bfloat16
    assert rel_rms(stepped, full) <= 1e-2


def test_bf16_beside_fp16_streams_in_fp32():
    """Two half-precision dtypes in one call: no choice between them is made, the call
    runs in fp32 and returns fp32."""
    op = _load("gla")
    args = random_arguments(op.analysis, B=1, T=20, H=2, dims={"K": 16, "V": 16}, dtype=torch.float32)
    args = {n: t.to(torch.float16 if n == "v" else torch.bfloat16) for n, t in args.items()}
    out, _ = op(**args, backend="triton")
    reference, _ = op.reference(**{n: t.double() for n, t in args.items()})
    assert out.dtype == torch.float32
    assert rel_rms(out, reference) <= 1e-4


def test_verify_rejects_a_dtype_for_an_unknown_argument():
    with pytest.raises(ValueError, match="dtypes: alpha is not an input or weight of gla"):
        verify(_load("gla"), dtypes={"alpha": torch.float32})
