"""The benchmark harness runs end to end on the CPU (tiny shapes): every variant gets
numbers, nothing errors, and the results file is written. Real numbers need a GPU."""
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import attnc
from attnc.runtime.sampling import random_arguments
from attnc.runtime.verify import rel_rms

ROOT = Path(__file__).parent.parent


def test_bench_smoke(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "bench.py"), "--smoke",
                          "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    table = (tmp_path / "cpu-smoke.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    header, body = rows[0], rows[1:]
    assert "error" in header
    names = [r.split("|")[1].strip() for r in body]
    for variant in ("mamba2", "gla", "deltanet", "gated_deltanet", "kda",
                    "softmax attention (causal)", "gla decode step"):
        assert variant in names, names
    assert header.rstrip(" |").endswith("error")
    for r in body:
        cells = [c.strip() for c in r.split("|")[1:-1]]
        assert cells[-1] == "", f"row reports an error: {r}"


def _fla_semantics(name, kw, state):
    """fla's ops as their docs define them, naively in fp64 (no fla needed): simple GLA
    (scalar log gate g), GLA (per-channel g / gk), the delta rule and its gated form
    (beta, q and k l2-normalised in the kernel); o_t = scale * q_t^T S_t, scale K^-1/2
    unless given. Returns (o, final state)."""
    q, k, v = (kw[n].double() for n in ("q", "k", "v"))
    if kw.get("use_qk_l2norm_in_kernel"):
        q, k = (x / x.norm(dim=-1, keepdim=True) for x in (q, k))
    scale = kw.get("scale") or q.shape[-1] ** -0.5
    g = kw.get("g", kw.get("gk"))
    S = state.double().clone()
    outputs = []
    for t in range(q.shape[1]):
        if g is not None:
            decay = g[:, t].double().exp()
            S = S * (decay[..., None, None] if decay.dim() == 2 else decay[..., None])
        if "beta" in kw:
            error = v[:, t] - torch.einsum("bhk,bhkv->bhv", k[:, t], S)
            S = S + kw["beta"][:, t].double()[..., None, None] * torch.einsum("bhk,bhv->bhkv", k[:, t], error)
        else:
            S = S + torch.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        outputs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(outputs, 1), S


@pytest.mark.parametrize("spec_name", ["mamba2", "gla", "deltanet", "gated_deltanet"])
def test_fla_twins_get_the_same_recurrence(spec_name):
    """bench.py times fla beside attnc on the same data: its argument mapping (gates fla
    takes precomputed, scale, l2norm flags, gk for the fused GLA) must give fla's ops, as
    fla defines them, the spec's recurrence. (bench/check_fla_twins.py runs fla itself.)"""
    sys.path.insert(0, str(ROOT / "bench"))
    import bench

    op = attnc.load(spec_name)
    gen = torch.Generator().manual_seed(0)
    args = random_arguments(op.analysis, B=2, T=6, H=2, dims={"K": 8, "V": 8}, generator=gen)
    state = torch.randn(2, 2, 8, 8, generator=gen)
    want, want_final = op.reference(**{n: x.double() for n, x in args.items()},
                                    initial_state=state.double(), output_final_state=True)
    seen = {}
    for twins in (bench.FLA_TWINS, bench.FLA_DECODE_TWINS):
        fake = types.ModuleType("fla.ops")
        setattr(fake, twins[spec_name], lambda **kw: seen.update(kw) or _fla_semantics(twins[spec_name], kw, state))
        with pytest.MonkeyPatch.context() as patch:
            patch.setitem(sys.modules, "fla", types.ModuleType("fla"))
            patch.setitem(sys.modules, "fla.ops", fake)
            o, final = bench._fla_call(twins[spec_name], args, spec_name)()
        if spec_name == "mamba2":   # the readout's D * x, which fla leaves to its caller
            o = o + args["D"].double()[None, None, :, None] * args["x"].double()
        assert ("gk" in seen) == (twins[spec_name] == "fused_recurrent_gla"), sorted(seen)
        # (fp32 data, rounded once more where the mapping computes a gate: ~1e-7)
        assert rel_rms(o, want) < 1e-5 and rel_rms(final, want_final) < 1e-5, twins[spec_name]
        seen.clear()


def _kernel_times():
    sys.path.insert(0, str(ROOT / "bench"))
    import kernel_times
    return kernel_times


def test_kernel_times_summarize_a_real_profile_per_call():
    """summarize reads a torch.profiler run (CPU ranges stand in for GPU kernels here)."""
    kt = _kernel_times()
    from torch.profiler import ProfilerActivity, profile, record_function

    x = torch.randn(64, 64)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(4):
            with record_function("attnc_kernel_a"):
                x @ x
            for _ in range(2):
                with record_function("attnc_kernel_b"):
                    x + x
    times = kt.summarize(prof, torch.autograd.DeviceType.CPU, calls=4)
    assert times["attnc_kernel_a"].calls == 1 and times["attnc_kernel_b"].calls == 2
    assert times["attnc_kernel_a"].ms > 0
    # forward + backward less forward: the kernels that only the backward ran
    fwd = {"a": kt.KernelTime("a", 1, 0.5)}
    both = {"a": kt.KernelTime("a", 2, 1.2), "b": kt.KernelTime("b", 3, 0.9)}
    bwd = kt.difference(both, fwd)
    assert bwd["a"].calls == 1 and abs(bwd["a"].ms - 0.7) < 1e-9 and bwd["b"].calls == 3
    assert kt.difference(fwd, fwd) == {}


def test_kernel_times_bytes_come_from_the_launch_trace():
    kt = _kernel_times()
    op = attnc.load("mamba2")
    nbytes = kt.kernel_bytes(op, B=1, T=128, H=2, dims={"K": 32, "V": 32}, dtype=torch.bfloat16)
    assert set(nbytes) == {"forward", "backward"}
    assert "mamba2_S_chunk_output_fwd" in nbytes["forward"]
    assert "mamba2_S_chunk_dqdk" in nbytes["backward"]
    # the output kernel reads q (C), k (B), v (x) in bf16 and writes o at least
    assert nbytes["forward"]["mamba2_S_chunk_output_fwd"] >= 4 * 128 * 2 * 32 * 2
    rows = kt.table({"mamba2_S_chunk_output_fwd": kt.KernelTime("mamba2_S_chunk_output_fwd", 1, 0.01)},
                    nbytes["forward"], "forward")
    assert rows[0].startswith("#### forward: 0.010 ms")
    assert rows[-2].startswith("| mamba2_S_chunk_output_fwd | 1 | 0.010 | 100 % |")


def test_kernel_times_refuses_bad_arguments_and_a_machine_without_a_gpu(capsys):
    kt = _kernel_times()
    with pytest.raises(SystemExit):
        kt.main(["gla", "--config", "num_warps"])
    assert "expected KEY=VALUE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        kt.main(["gla", "--shape", "16,2048"])
    assert "expected B,T,H,D" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert kt.main(["gla"]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err


def test_plot_results_reads_and_merges_results_tables(tmp_path):
    """bench/plot_results.py reads the rows of every results table in a file (numbers as
    numbers, empty cells left out) and keeps the first row of a variant and shape."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from plot_results import merged, read_rows
    finally:
        sys.path.remove(str(ROOT / "bench"))
    text = "\n".join([
        "# newest run", "",
        "| variant | B | T | D | attnc fwd ms | fla fwd ms | notes |", "|---|---|---|---|---|---|---|",
        "| gla | 16 | 2048 | 128 | 3.289 | 1.621 | x |",
        "", "## older run", "",
        "| variant | B | T | D | attnc fwd ms | error |", "|---|---|---|---|---|---|",
        "| gla | 16 | 2048 | 128 | 9.999 |  |",
        "| gla | 1 | 32768 | 128 | 4.056 |  |",
        "", "| target | measured |", "|---|---|", "| gla fwd | 3.3 ms |"])
    rows = read_rows(text)
    assert rows == [
        {"variant": "gla", "B": 16, "T": 2048, "D": 128, "attnc fwd ms": 3.289, "fla fwd ms": 1.621, "notes": "x"},
        {"variant": "gla", "B": 16, "T": 2048, "D": 128, "attnc fwd ms": 9.999},
        {"variant": "gla", "B": 1, "T": 32768, "D": 128, "attnc fwd ms": 4.056}]
    assert [r["attnc fwd ms"] for r in merged(rows)] == [3.289, 4.056]


def test_tuning_compiles_counts_what_tuning_would_compile():
    """bench/tuning_compiles.py captures tuning's compiles with Triton's real compiler and
    a driver stand-in (no GPU): every candidate's forward and backward kernels."""
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "tuning_compiles.py"), "retnet",
                          "--shape", "1,64,2,32", "--count-only"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    head = run.stdout.splitlines()[0]
    candidates, launches, compiles = (int(head.split(": ")[1].split(", ")[i].split()[0])
                                      for i in range(3))
    assert candidates >= 2 and launches >= 8 * candidates and 8 <= compiles <= launches
    assert "chunk_dqdk" in run.stdout


def test_sass_counts_reads_loop_bodies_of_a_real_kernel():
    """bench/sass_counts.py compiles a kernel for sm_90 with Triton's compiler (no GPU) and
    counts its machine code, whole and per loop body (the scalar-gate dq / dk kernel's
    dots); its parser on a known listing."""
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "sass_counts.py"), "retnet",
                          "--shape", "1,64,2,32,256", "--kernels", "chunk_dqdk", "--loops"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    kernel, *loops = run.stdout.strip().splitlines()
    assert kernel.startswith("retnet_S_chunk_dqdk")
    fields = dict(zip(kernel.split()[3::2], map(int, kernel.split()[4::2])))
    assert fields["total"] > 100 and fields["MMA"] > 0 and fields["LDG"] > 0
    assert loops and all(line.lstrip().startswith("loop 0x") for line in loops)
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import sass_counts
    finally:
        sys.path.remove(str(ROOT / "bench"))
    code, labels = sass_counts.instructions(
        "        /*0000*/                   MOV R1, c[0x0][0x28] ;\n"
        ".L_x_0:\n"
        "        /*0010*/                   MUFU.EX2 R2, R3 ;\n"
        "        /*0020*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;\n"
        "        /*0030*/               @P0 BRA `(.L_x_0) ;\n"
        "        /*0040*/                   EXIT ;\n")
    assert labels == {"L_x_0": 0x10} and [op for _, op, _ in code][1] == "MUFU.EX2"
    (start, end, body), = sass_counts.loops(code, labels)
    assert (start, end, body["total"], body["EX2"], body["BAR"]) == (0x10, 0x30, 3, 1, 1)


def test_cold_start_children_start_with_empty_caches(monkeypatch, tmp_path):
    """The cold-start row's first child finds neither attnc's kernels nor Triton's compiled
    ones (left by earlier runs, they would make a cold start look warm); the second child
    finds what the first left in both."""
    sys.path.insert(0, str(ROOT / "bench"))
    import bench
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "warm-from-earlier-runs"))
    seen = []

    def child(argv, env, **kwargs):
        seen.append((env["ATTNC_CACHE_DIR"], env["TRITON_CACHE_DIR"],
                     Path(env["ATTNC_CACHE_DIR"]).exists() and any(Path(env["ATTNC_CACHE_DIR"]).iterdir())))
        times = '{"init": 0, "import": 0, "load": 0, "call": 1, "total": 1}'
        return subprocess.CompletedProcess(argv, 0, stdout=times + "\n", stderr="")

    monkeypatch.setattr(bench.subprocess, "run", child)
    row = bench.cold_start("gla", "cpu", 1, 64, 2, 16)
    assert row["first call s"] == 1 and row["warm first call s"] == 1
    (cold_attnc, cold_triton, cold_filled), (warm_attnc, warm_triton, _) = seen
    assert not cold_filled
    assert cold_triton.startswith(cold_attnc) and "warm-from-earlier-runs" not in cold_triton
    assert (warm_attnc, warm_triton) == (cold_attnc, cold_triton)


def test_host_profile_splits_a_calls_host_time(tmp_path, capsys):
    """bench/host_profile.py: the wall time of a call, its profiled split (no Triton part
    without a GPU, where nothing is launched) and the file it writes; bad arguments are
    refused."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("host_profile", ROOT / "bench" / "host_profile.py")
    hp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hp)
    assert hp.main(["mamba2", "--shape", "1,32,2,16", "--calls", "5", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    device = torch.cuda.get_device_name().replace(" ", "_") if torch.cuda.is_available() else "cpu"
    written = (tmp_path / f"{device}-host.md").read_text()
    for part in hp.PARTS + ("total",):
        assert f"| {part} |" in printed and f"| {part} |" in written
    rows = dict(line.strip("|").split(" | ") for line in printed.splitlines()
                if line.startswith("| ") and "---" not in line and "part" not in line)
    values = {k.strip(): float(v) for k, v in rows.items()}
    assert values["total"] > 0 and values["attnc"] > 0
    assert abs(sum(values[p] for p in hp.PARTS) - values["total"]) <= 0.2 + 1e-3 * values["total"]
    if not torch.cuda.is_available():
        assert values["triton launch"] == 0.0 and "kernels not launched" in printed
    assert "mamba2_plan.py" in printed or "op.py" in printed   # the costliest functions, by file
    with pytest.raises(SystemExit):
        hp.main(["gla", "--shape", "16,2048"])
    assert "expected B,T,H,D" in capsys.readouterr().err
