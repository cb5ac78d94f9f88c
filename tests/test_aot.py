"""Launch traces and ahead-of-time GPU compiles, on a machine without a GPU.

runtime/launches.py records what a call launches as if on a GPU; runtime/aot.py hands
those launches to Triton's real compiler for an H100 (`cuda:90`). The compile tests run
`attnc aot` in a subprocess, since compiled kernels need Triton without its interpreter.
"""
import json
import subprocess
import sys

import pytest
import torch
import triton.language as tl
from triton.runtime.jit import KernelInterface

import attnc
from attnc.runtime import kernels
from attnc.runtime.aot import AotError, Target, distinct_launches, source_for
from attnc.runtime.launches import KernelLaunch, TensorArg, record


def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "attnc.runtime.cli", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_trace_records_the_gpu_launches_of_forward_backward_and_step():
    launch_as_defined = KernelInterface.__getitem__
    op = attnc.load("gla")
    trace = record(op, B=1, T=64, H=2, dims={"K": 32, "V": 32}, dtype=torch.bfloat16)
    assert KernelInterface.__getitem__ is launch_as_defined      # restored
    assert not kernels._AS_ON_GPU.get()                          # restored
    # the scores kernel cumulates logsigmoid(g) / 16 itself: no prologue, no cumsum pass;
    # o = scale * q S: no epilogue (too few sequences x heads to fill an H100 in one pass:
    # states through memory)
    assert [k.name for k in trace.launches("forward")] == [
        "gla_S_intra_scores", "gla_S_chunk_state_fwd", "gla_S_chunk_output_fwd"]
    assert trace.launches("forward")[0].arguments["CUMULATE"] is True
    backward = [k.name for k in trace.launches("backward")]
    assert {"gla_S_chunk_state_bwd", "gla_S_chunk_dqdk", "gla_S_chunk_dv", "gla_S_gate_grad"} <= set(backward)
    assert not [name for name in backward if "prologue" in name], backward
    assert [k.name for k in trace.launches("step")] == ["gla_recurrent_fwd"]
    # decided as on a GPU: bf16 tensor-core dots, not the interpreter's fp32 ones
    state = next(k for k in trace.launches("forward") if k.name == "gla_S_chunk_state_fwd")
    assert state.arguments["DOT_DTYPE"] == tl.bfloat16
    assert state.options["num_warps"] >= 1
    assert isinstance(state.arguments["k"], TensorArg)
    assert state.arguments["k"].dtype == torch.bfloat16
    # bytes: the floor is q, k, v, g and o in bf16; a forward moves at least that
    assert trace.floor_bytes["forward"] == 5 * 64 * 2 * 32 * 2
    assert trace.bytes("forward") >= trace.floor_bytes["forward"]


def test_trace_marks_the_tensors_the_gates_decide_whether_a_launch_touches():
    """A per-channel gate's chunk spans decide which chunks are taken whole: the forward's
    scores kernel stores the cumulated gate only for the others, the backward's
    scores-gradient kernel skips them and the dq / dk kernel reads their dA from nowhere.
    The trace lists those tensors as data-dependent and counts each phase without them too;
    a spec without per-channel gates has none."""
    trace = record(attnc.load("gla"), B=1, T=128, H=2, dims={"K": 32, "V": 32}, dtype=torch.bfloat16, step=False)
    dependent = {k.name: k.data_dependent for k in trace.launches() if k.data_dependent}
    assert dependent == {"gla_S_intra_scores": ("gate",), "gla_S_intra_scores_grad": ("do", "v", "scores"),
                         "gla_S_chunk_dqdk": ("dscores",)}, dependent
    scores = trace.launches("forward")[0]
    assert scores.least_bytes == scores.tensor_bytes - scores.arguments["gate"].nbytes
    for phase in ("forward", "backward"):
        skipped = sum(k.arguments[n].nbytes for k in trace.launches(phase) for n in k.data_dependent)
        assert trace.least_bytes(phase) == trace.bytes(phase) - skipped and skipped > 0, phase
    # only where the launch's constexpr says so: fused_backward=0 takes dA from the scores
    # gradient kernel for every chunk
    apart = record(attnc.load("gla"), B=1, T=128, H=2, dims={"K": 32, "V": 32}, dtype=torch.bfloat16,
                   step=False, config={"fused_backward": 0})
    assert [k.name for k in apart.launches("backward") if k.data_dependent] == []
    plain = record(attnc.load("mamba2"), B=1, T=128, H=2, dims={"K": 32, "V": 32}, step=False)
    assert all(not k.data_dependent for k in plain.launches())
    assert plain.least_bytes("backward") == plain.bytes("backward")
    # the command line marks them and gives the lower figure
    run = run_cli("trace", "gla", "--shape", "1,128,2,32,32")
    assert run.returncode == 0, run.stderr
    assert "where the gates make every chunk whole: less the tensors marked *" in run.stdout
    assert "* do, v, scores: at least" in run.stdout


@pytest.mark.parametrize("name", ["gla", "mamba2", "rwkv6"])
def test_only_the_state_passes_run_sequentially_over_chunks(name):
    """At B = 1 and long T only the passes that carry a state from chunk to chunk may have a
    grid without a program per chunk (a gate gradient over the whole sequence would leave
    most of a GPU idle): the gate gradient and the dq / dk kernel, which computes its
    carries (each chunk's <S, dS>), are chunk-parallel."""
    op = attnc.load(name)
    T, chunk = 512, 64
    trace = record(op, B=1, T=T, H=2, dims={"K": 32, "V": 32}, dtype=torch.bfloat16, step=False)
    sequential = {k.name for k in trace.launches() if k.grid[0] * (k.grid[1] if len(k.grid) > 1 else 1)
                  * (k.grid[2] if len(k.grid) > 2 else 1) < T // chunk}
    assert sequential == {f"{name}_S_chunk_state_fwd", f"{name}_S_chunk_state_bwd"}, sequential
    for kernel in (f"{name}_S_gate_grad", f"{name}_S_chunk_dqdk"):
        launch = next(k for k in trace.launches("backward") if k.name == kernel)
        assert T // chunk in launch.grid, (kernel, launch.grid)


def test_trace_of_a_spec_without_chunk_form_is_the_recurrent_kernel():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        op = attnc.load("mamba1")
    trace = record(op, B=2, T=16, H=2, dims={"K": 16, "V": 16}, step=False)
    assert [k.name for k in trace.launches()] == ["mamba1_recurrent_fwd", "mamba1_recurrent_bwd"]
    assert trace.phases() == ["forward", "backward"]


def test_source_for_turns_arguments_into_a_signature():
    op = attnc.load("linear_attn")
    trace = record(op, B=1, T=32, H=2, dims={"K": 16, "V": 16}, backward=False, step=False)
    launch = next(k for k in trace.launches() if "chunk_state" in k.name)
    with pytest.raises(AotError, match="interpreter"):
        source_for(launch)   # this process runs Triton's interpreter
    assert len(distinct_launches(trace)) == len({k.name for k in trace.launches()})


def test_target_parsing():
    assert str(Target.parse("cuda:90")) == "cuda:90"
    assert Target.parse("sm_90a").arch == 90
    assert Target.parse("90").shared_memory_limit == 232448
    with pytest.raises(AotError, match="compute capability"):
        Target.parse("h100")


def test_trace_cli_prints_launches_and_bytes():
    run = run_cli("trace", "mamba2", "--shape", "1,64,2,32,32", "--no-backward")
    assert run.returncode == 0, run.stderr
    assert "mamba2_S_chunk_state_fwd" in run.stdout
    assert "x the floor" in run.stdout
    bad = run_cli("trace", "mamba2", "--shape", "1,64")
    assert bad.returncode == 1
    assert "needs B,T,H,K,V" in bad.stderr and "Traceback" not in bad.stderr


def test_host_times_run_the_host_path_without_launching_kernels(monkeypatch):
    from attnc.runtime.launches import host_times
    from attnc.runtime.recurrent_op import module_for

    op = attnc.load("gla")
    op.plan_module("cpu")
    kernel = module_for(op.spec).gla_recurrent_fwd
    launched = []
    monkeypatch.setattr(type(kernel), "run", lambda self, *args, **kwargs: launched.append(self))
    times = host_times(op, repeats=5)
    assert set(times) == {"forward", "forward+backward", "step"}
    assert all(t > 0 for t in times.values())
    assert times["forward+backward"] > times["forward"]
    assert not launched
    kernel[(1,)]()  # the patch above would have seen a launch
    assert launched == [kernel]


def test_trace_cli_reports_host_time_and_counts():
    run = run_cli("trace", "linear_attn", "--shape", "1,64,2,32,32", "--host-time", "--json")
    assert run.returncode == 0, run.stderr
    (report,) = json.loads(run.stdout)
    assert set(report["phases"]) == {"forward", "backward", "step"}
    assert all(phase["host_us"] > 0 for phase in report["phases"].values())
    text = run_cli("trace", "linear_attn", "--shape", "1,64,2,32,32", "--no-backward", "--host-time")
    assert "us per call on this CPU" in text.stdout and "kernel launches" in text.stdout
    assert "0 host syncs" in text.stdout


def test_aot_compiles_every_kernel_of_a_call_for_an_h100():
    run = run_cli("aot", "linear_attn", "--shape", "1,64,2,32,32", "--json")
    assert run.returncode == 0, run.stderr
    (report,) = json.loads(run.stdout)
    assert report["target"] == "cuda:90"
    names = {k["name"] for k in report["kernels"]}
    assert {"linear_attn_S_chunk_state_fwd", "linear_attn_S_chunk_output_fwd",
            "linear_attn_S_chunk_dqdk", "linear_attn_recurrent_fwd"} <= names
    for kernel in report["kernels"]:
        assert kernel["ok"] and kernel["error"] is None, kernel
        assert 0 < kernel["registers"] <= 255
        assert kernel["shared_bytes"] <= kernel["shared_limit"]


def test_delta_kernels_fit_in_registers_at_the_benchmark_width():
    """gated_deltanet at K = V = 128 in bf16, the benchmark's shape: the forward kernels
    spill no registers to local memory (the chunk's inverse used to spill 2.4 KB per
    thread), and the per-chunk backward no more than a little."""
    run = run_cli("aot", "gated_deltanet", "--json")
    assert run.returncode == 0, run.stderr
    (report,) = json.loads(run.stdout)
    kernels = {k["name"]: k for k in report["kernels"]}
    forward = [k for k in report["kernels"] if k["phase"] == "forward"]
    assert {"gated_deltanet_S_wy_solve", "gated_deltanet_S_chunk_state_fwd"} <= {k["name"] for k in forward}
    spilled = {k["name"]: k["spill_bytes"] for k in forward if k["spill_bytes"]}
    assert not spilled, f"forward kernels spilling registers (bytes per thread): {spilled}"
    assert kernels["gated_deltanet_S_chunk_state_bwd"]["spill_bytes"] == 0
    assert kernels["gated_deltanet_S_chunk_bwd_wy"]["spill_bytes"] <= 256


def test_wy_solve_computes_its_scores_without_losing_occupancy():
    """deltanet's wy_solve computes L = K K^T from its K tiles before the solve (no scores
    kernel): compiled for an H100 at K = V = 128 it holds no more registers than four
    programs of four warps per SM leave (the solve alone took 103; with the scores step
    inlined 141) and spills none."""
    run = run_cli("aot", "deltanet", "--shape", "1,256,16,128,128", "--no-backward", "--json")
    assert run.returncode == 0, run.stderr
    (report,) = json.loads(run.stdout)
    names = [k["name"] for k in report["kernels"]]
    assert "deltanet_S_intra_scores" not in names, names
    (solve,) = [k for k in report["kernels"] if k["name"] == "deltanet_S_wy_solve"]
    assert solve["num_warps"] == 4 and solve["spill_bytes"] == 0, solve
    assert solve["registers"] <= 65536 // (4 * 4 * 32), solve


CHUNK_SPECS = ["linear_attn", "retnet", "mamba2", "gla", "hgrn2", "rwkv6", "deltanet",
               "gated_deltanet", "kda"]


@pytest.mark.parametrize("name", CHUNK_SPECS)
def test_bf16_forward_makes_no_conversion_passes(name, monkeypatch):
    """On bf16 inputs the forward is the generated kernels and nothing else over per-token
    tensors: no upcast of inputs, no cast of operands between the prologue and the chunk
    kernels, and no cast of their outputs (which the chunk kernels store in the stream
    dtype)."""
    monkeypatch.setenv("ATTNC_POISON", "0")   # as in use: no NaN-filled buffers
    op = attnc.load(name)
    trace = record(op, B=1, T=64, H=2, dims={"K": 32, "V": 32}, dtype=torch.bfloat16,
                   backward=False, step=False)
    per_token = 64 * 2 * 32 * 2   # bytes of one [B, T, H, 32] bf16 tensor
    # (kda's per-channel g, whose decays the analysis cannot prove, is checked by the kernel
    # that cumulates it: no reduction over it either; tests/test_decay_checks.py)
    passes = [(t.name, t.shapes) for t in trace.torch_ops("forward") if t.bytes >= per_token]
    casts = [p for p in passes if p[0] == "aten._to_copy"]
    assert len(casts) == len(passes), f"{name}: PyTorch passes in the forward: {passes}"
    assert not casts, f"{name}: conversions in the forward: {casts}"
    assert trace.launches("forward"), name


@pytest.mark.parametrize("name", ["retnet", "mamba2", "gla", "hgrn2", "rwkv6"])
def test_diag_backward_runs_no_pytorch_pass_between_its_kernels(name, monkeypatch):
    """The diagonal family's backward is its kernels back to back: the gate gradients'
    carries and final-state terms are scanned in a kernel (they were a dozen PyTorch passes:
    flips, cumsums, a cat, an index, zeros)."""
    monkeypatch.setenv("ATTNC_POISON", "0")
    op = attnc.load(name)
    trace = record(op, B=1, T=64, H=2, dims={"K": 32, "V": 32}, dtype=torch.bfloat16, step=False)
    events = [e for e in trace.events if e.phase == "backward"]
    chunk = [i for i, e in enumerate(events) if isinstance(e, KernelLaunch) and "_S_" in e.name]
    assert len(chunk) >= 5, f"{name}: chunk kernels in the backward: {[events[i].name for i in chunk]}"
    between = [e.name for e in events[chunk[0]:chunk[-1]] if not isinstance(e, KernelLaunch)]
    assert not between, f"{name}: PyTorch passes inside the chunk backward: {between}"


def test_trace_records_host_syncs():
    """Reading a value on the host, or sizing an output by the data, is a host sync."""
    from attnc.runtime.launches import Trace, _recording

    trace = Trace()
    x = torch.tensor([0.0, 2.0, 3.0])
    with _recording(trace) as recorder:
        recorder.phase = "forward"
        float(x.sum())
        x.nonzero()
        torch.repeat_interleave(torch.tensor([1, 2]))
        torch.repeat_interleave(torch.tensor([1, 2]), output_size=3)  # sized by the caller
        x.repeat_interleave(2)
    assert [e.name for e in trace.host_syncs("forward")] == [
        "aten._local_scalar_dense", "aten.nonzero", "aten.repeat_interleave"]


@pytest.mark.parametrize("name", attnc.shipped_specs())
def test_calls_without_varlen_make_no_host_sync(name):
    """Forward, backward and decode step never wait for the device (no .item(), no output
    sized by the data): the host runs ahead of the GPU, and nothing in the call stops a
    CUDA graph from capturing it. (varlen calls read cu_seqlens on the host by design.)"""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # specs without a chunk form warn
        op = attnc.load(name)
    trace = record(op, B=2, T=64, H=2, dims={"K": 32, "V": 32}, dtype=torch.bfloat16)
    assert trace.launches("backward") and trace.launches("step")
    assert not trace.host_syncs(), [(e.phase, e.name) for e in trace.host_syncs()]


BAD_KERNEL = '''
import triton
import triton.language as tl


@triton.jit
def narrow_dot(x, out, N: tl.constexpr):
    # a tl.dot of 8-wide operands: the interpreter runs it, the GPU compiler rejects it
    offs = tl.arange(0, N)
    tile = tl.load(x + offs[:, None] * N + offs[None, :])
    tile = tile.to(tl.bfloat16)
    tl.store(out + offs[:, None] * N + offs[None, :], tl.dot(tile, tile))
'''

REPORT_BAD_KERNEL = '''
import os, sys
os.environ["TRITON_INTERPRET"] = "0"
sys.path.insert(0, sys.argv[1])
import torch
from attnc.runtime.aot import Target, compile_launch
from attnc.runtime.launches import KernelLaunch, TensorArg
from bad_kernel import narrow_dot

def tensor():
    return TensorArg(torch.float32, (64,), 256, True)

for n in (8, 16):
    launch = KernelLaunch("forward", narrow_dot, (1,), {"x": tensor(), "out": tensor(), "N": n},
                          {"num_warps": 4})
    report = compile_launch(launch, Target.parse("cuda:90"))
    print(n, report.ok, report.error_summary)
'''


def test_aot_reports_what_the_gpu_compiler_rejects(tmp_path):
    """A kernel the interpreter accepts but Triton's GPU compiler rejects comes back as a
    failed report with the compiler's message, and its legal twin compiles."""
    (tmp_path / "bad_kernel.py").write_text(BAD_KERNEL)
    (tmp_path / "report.py").write_text(REPORT_BAD_KERNEL)
    run = subprocess.run([sys.executable, str(tmp_path / "report.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    narrow, legal = run.stdout.strip().splitlines()
    assert narrow.startswith("8 False CompilationError at 6:") and "K >= 16" in narrow, narrow
    assert legal.startswith("16 True"), legal


def test_mamba2_forward_at_the_benchmark_shape_is_two_launches():
    """With many sequences x heads (16 x 16 at the benchmark shape: 1024 programs for an
    H100's 132 SMs) the forward runs in one pass, and D * x is added by that kernel: the
    gate's cumsum (which computes the log gate and delta from dt and the weights) and
    chunk_fused_fwd, with no prologue or epilogue pass."""
    op = attnc.load("mamba2")
    trace = record(op, B=16, T=128, H=16, dims={"K": 128, "V": 128}, dtype=torch.bfloat16, step=False)
    assert [k.name for k in trace.launches("forward")] == ["mamba2_S_gate_cumsum", "mamba2_S_chunk_fused_fwd"]
    (fused,) = [k for k in trace.launches("forward") if k.name == "mamba2_S_chunk_fused_fwd"]
    assert fused.arguments["HAS_RESIDUAL"] and fused.arguments["o"].dtype == torch.bfloat16
    assert fused.options["num_stages"] >= 1
    # k = B * delta: the kernel reads B and multiplies by delta, so no pass writes a
    # [B, T, H, K] tensor; the cumsum kernel writes per-token scalars (the cumulated log
    # gate and delta) from dt and the per-head weights
    assert fused.arguments["HAS_KEY_SCALE"] and fused.arguments["key_scale"].shape == (16, 128, 16)
    (cumsum,) = [k for k in trace.launches("forward") if k.name == "mamba2_S_gate_cumsum"]
    assert cumsum.arguments["raw_dt"].shape == (16, 128, 16) and cumsum.arguments["raw_A_log"].shape == (16,)
    assert cumsum.arguments["cumulated"].shape == cumsum.arguments["key_scale"].shape == (16, 128, 16)