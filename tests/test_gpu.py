"""The same checks on a CUDA GPU at realistic sizes (compiled Triton, not the
interpreter). Skipped, saying so, on machines without CUDA."""
import pytest
import torch

import attnc
from attnc.runtime.verify import verify

from conftest import gpu  # noqa: E402

pytestmark = [gpu, pytest.mark.gpu]

DIAGONAL_SPECS = ["linear_attn", "retnet", "mamba2", "gla", "hgrn2", "rwkv6"]


@pytest.mark.parametrize("name", DIAGONAL_SPECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_diagonal_family_realistic(name, dtype):
    result = verify(attnc.load(name), B=2, T=1000, H=4, K=128, V=128, dtype=dtype, device="cuda")
    assert result.ok, result.errors


@pytest.mark.parametrize("name", ["gla", "mamba2"])
@pytest.mark.parametrize("kv", [(64, 128), (256, 256), (48, 96)], ids=str)
def test_head_dims(name, kv):
    K, V = kv
    result = verify(attnc.load(name), B=1, T=333, H=2, K=K, V=V, device="cuda")
    assert result.ok, result.errors


@pytest.mark.parametrize("name", ["gla", "rwkv6"])
def test_varlen_and_gqa(name):
    op = attnc.load(name)
    result = verify(op, H=4, K=128, V=128, seqlens=[700, 3, 1300], device="cuda",
                    dtype=torch.bfloat16,
                    heads={i.name: 2 for i in op.spec.inputs if i.shape == ("K",)})
    assert result.ok, result.errors


DELTA_SPECS = ["deltanet", "gated_deltanet", "kda"]


# At these sizes the launchers pick the forward through chunk states (too few sequences x
# heads to fill the GPU in one pass): each form forced, on every structure, with varlen
@pytest.mark.parametrize("fused", [0, 1])
@pytest.mark.parametrize("name", DIAGONAL_SPECS + DELTA_SPECS)
def test_both_forward_forms(name, fused):
    result = verify(attnc.load(name), H=4, K=128, V=128, seqlens=[700, 3, 1300], device="cuda",
                    dtype=torch.bfloat16, config={"fused_forward": fused})
    assert result.ok, result.errors


@pytest.mark.parametrize("name", DELTA_SPECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_delta_family_realistic(name, dtype):
    result = verify(attnc.load(name), B=2, T=1000, H=4, K=128, V=128, dtype=dtype, device="cuda")
    assert result.ok, result.errors


@pytest.mark.parametrize("name", ["gated_deltanet", "kda"])
def test_delta_varlen_gqa_and_wide_heads(name):
    op = attnc.load(name)
    result = verify(op, H=4, K=256, V=256, seqlens=[700, 3, 1300], device="cuda",
                    dtype=torch.bfloat16, heads={"q": 2, "k": 2})
    assert result.ok, result.errors


@pytest.mark.parametrize("name", ["mamba1", "rwkv7"])
def test_recurrent_training(name):
    with pytest.warns(Warning):
        op = attnc.load(name)
    result = verify(op, B=2, T=300, H=4, K=64, V=64, device="cuda")
    assert result.ok, result.errors


@pytest.mark.parametrize("name", ["gla", "gated_deltanet", "mamba1"])
def test_decode_step_continues_the_sequence(name):
    import warnings

    from attnc.runtime.sampling import random_arguments
    from attnc.runtime.verify import rel_rms

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        op = attnc.load(name)
    args = random_arguments(op.analysis, B=8, T=16, H=4, dims={"K": 128, "V": 128},
                            device="cuda")
    full, final = op(**args, output_final_state=True, precision="ieee")
    state = torch.zeros(8, 4, 128, 128, device="cuda")
    inputs = {i.name for i in op.spec.inputs}
    outs = []
    for t in range(16):
        step_args = {n: (x[:, t:t + 1] if n in inputs else x) for n, x in args.items()}
        o, state = op.step(**step_args, state=state)
        outs.append(o)
    assert rel_rms(torch.cat(outs, 1), full) < 1e-3
    assert rel_rms(state, final) < 1e-3


# A forward no backward can follow (here under no_grad) runs other kernels for per-channel
# gates: the scores kernel cumulates the gate in registers, 16 channels at a time, and stores
# it only for chunks it takes by sub-chunks. Against the reference and the forward that keeps
# the gate, both forms, with and without varlen.
@pytest.mark.parametrize("fused", [0, 1])
@pytest.mark.parametrize("name", ["gla", "hgrn2", "rwkv6"])
def test_forward_without_backward(name, fused):
    from attnc.runtime.sampling import random_arguments

    op = attnc.load(name)
    gen = torch.Generator().manual_seed(0)
    for seqlens in (None, [700, 3, 1300]):
        B, T = (2, 1000) if seqlens is None else (1, sum(seqlens))
        cu_seqlens = None if seqlens is None else torch.tensor(
            [0, *torch.tensor(seqlens).cumsum(0).tolist()], device="cuda")
        args = random_arguments(op.analysis, B=B, T=T, H=4, dims={"K": 128, "V": 128}, dtype=torch.bfloat16,
                                device="cuda", generator=gen)
        config = {"fused_forward": fused}
        with torch.no_grad():
            out, _ = op(**args, cu_seqlens=cu_seqlens, config=config)
        kept, _ = op(**{n: t.detach().requires_grad_() for n, t in args.items()}, cu_seqlens=cu_seqlens,
                     config=config)
        ref, _ = op.reference(**{n: t.double() for n, t in args.items()}, cu_seqlens=cu_seqlens)

        def rel(a, b):
            return ((a.double() - b.double()).norm() / b.double().norm()).item()

        assert rel(out, ref) <= 2e-2, (seqlens, rel(out, ref))
        assert rel(out, kept) <= 1e-2, (seqlens, rel(out, kept))


# Feature maps inside the per-channel kernels (compiled: the constexpr map branches, the
# rounded loads beside tensor-core dots): hgrn2's key and gate of one input, and q and k
# both mapped, on every path the chunks can take
@pytest.mark.parametrize("config", [{}, {"whole_chunk": 0}, {"exact_diag": 1, "diag_loop": 0},
                                    {"exact_diag": 1, "diag_loop": 1}, {"fused_forward": 0}],
                         ids=["whole", "factored", "exact-columns", "exact-loop", "two-pass"])
@pytest.mark.parametrize("name", ["hgrn2", "channel"])
def test_feature_maps_beside_per_channel_gates(name, config):
    from test_feature_maps import SPECS

    op = attnc.compile(SPECS[name]) if name in SPECS else attnc.load(name)
    result = verify(op, B=2, T=1000, H=4, K=128, V=128, dtype=torch.bfloat16, device="cuda", config=config)
    assert result.ok, result.errors


# Scalar gates computed by the chunk kernels from raw per-token scalars and per-head weights
# (compiled: the weights' gradients summed per program, then over programs), with varlen
# batches and heads broadcast: mamba2, and a spec with two per-token inputs and a readout of
# the previous state
@pytest.mark.parametrize("name", ["mamba2", "exclusive"])
def test_scalar_maps_with_varlen(name):
    from test_scalar_maps import SPECS

    op = attnc.compile(SPECS[name]) if name in SPECS else attnc.load(name)
    result = verify(op, H=4, K=128, V=128, seqlens=[700, 3, 1300], device="cuda", dtype=torch.bfloat16)
    assert result.ok, result.errors


# Gates computed in fp32 beside bf16 activations, compiled: bf16 dots with fp32 gates read
# where the gate is cumulated (and their gradients stored back in fp32)
@pytest.mark.parametrize("name,fp32", [("gated_deltanet", ("alpha",)), ("gla", ("g",)), ("mamba2", ("dt",)),
                                       ("kda", ("g", "beta"))], ids=["gated_deltanet", "gla", "mamba2", "kda"])
def test_fp32_gates_beside_bf16_activations(name, fp32):
    result = verify(attnc.load(name), B=2, T=1000, H=4, K=128, V=128, dtype=torch.bfloat16, device="cuda",
                    dtypes=dict.fromkeys(fp32, torch.float32))
    assert result.ok, result.errors


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (inputs on one that is not current)")
def test_inputs_on_a_gpu_that_is_not_the_current_one():
    """A model on cuda:1 in a process whose current device is cuda:0: forward, backward and
    decode step run on cuda:1 (Triton launches on the current device) and match the
    reference."""
    op = attnc.load("gated_deltanet")
    torch.cuda.set_device(0)
    result = verify(op, B=2, T=300, H=4, K=64, V=64, dtype=torch.bfloat16, device="cuda:1")
    assert result.ok, result.errors
    from attnc.runtime.sampling import random_arguments
    args = random_arguments(op.analysis, B=2, T=1, H=4, dims={"K": 64, "V": 64}, device="cuda:1")
    state = torch.randn(2, 4, 64, 64, device="cuda:1")
    out, new = op.step(**args, state=state)
    ref, ref_new = op.step(**args, state=state, backend="torch")
    assert torch.cuda.current_device() == 0
    assert (out - ref).norm() <= 1e-3 * ref.norm() and (new - ref_new).norm() <= 1e-3 * ref_new.norm()
