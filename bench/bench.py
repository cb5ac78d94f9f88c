"""Benchmark attnc's generated kernels beside flash-linear-attention and FlashAttention.

    python bench/bench.py                      # standard shapes, writes bench/results/<device>.md
    python bench/bench.py --quick              # one shape, fewer variants
    python bench/bench.py --smoke --out DIR    # CPU smoke test of the harness (tiny shapes)
    python bench/bench.py --shapes 1,32768,16,128 --variants gla --no-decode --no-cold-start

Timings are medians of triton.testing.do_bench on random bf16 inputs (never zeros), all
variants timed in the same process, side by side. Each forward's "floor" is the bytes
of its inputs and outputs read/written once, over the measured device copy bandwidth.
"attnc host ms" is how long a call takes to return without waiting for the GPU: where it
reaches the kernel time, the row measures the host, not the kernels. Decode steps are
also timed replayed from a CUDA graph ("graphed ms"), as serving stacks run them: the
GPU time alone.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

import attnc
from attnc.runtime.sampling import random_arguments

# attnc spec -> the fla op that computes the same recurrence: chunked (training) and
# fused recurrent (decode)
FLA_TWINS = {
    "mamba2": "chunk_simple_gla",
    "gla": "chunk_gla",
    "deltanet": "chunk_delta_rule",
    "gated_deltanet": "chunk_gated_delta_rule",
}
FLA_DECODE_TWINS = {
    "mamba2": "fused_recurrent_simple_gla",
    "gla": "fused_recurrent_gla",
    "deltanet": "fused_recurrent_delta_rule",
    "gated_deltanet": "fused_recurrent_gated_delta_rule",
}


_FLA_OFF = _FLEX_OFF = False  # --no-fla, --no-flex
_FLA_GUARD_BYPASSED = False    # --fla-time-gated-backward took effect
GUARD_NOTE = ("fla fwd+bwd timed with its Hopper guard bypassed (fla #640: Triton 3.4-3.7.0 "
              "computes its gated backward wrongly on sm_90): time only")


def bypass_fla_hopper_guard() -> bool:
    """Let fla 0.6.0 run its gated backward (chunk_bwd_dqkwg) on Triton 3.4-3.7.0 on
    Hopper, which it refuses because that Triton miscompiles it (its issue #640): for timing
    only, the results are not used. True if the guard was found and lifted."""
    global _FLA_GUARD_BYPASSED
    try:
        import fla.ops.common.chunk_o as chunk_o
    except Exception:
        return False
    if getattr(chunk_o, "TRITON_ABOVE_3_7_1", True):
        return False  # no guard, or a Triton it does not refuse
    chunk_o.TRITON_ABOVE_3_7_1 = True
    _FLA_GUARD_BYPASSED = True
    return True


def _median_ms(fn, warmup=25, rep=100) -> float:
    """Median milliseconds of fn: triton's do_bench on a GPU (L2 flushed between runs),
    one timed call on the CPU (smoke runs only: those numbers mean nothing, and each call
    runs the kernels in Triton's interpreter)."""
    if not torch.cuda.is_available():
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def _host_ms(fn) -> float:
    """Median milliseconds until fn returns, without waiting for the GPU: the host's share
    of a call (binding, launchers, autograd, launches). Where it reaches the kernels' time,
    the GPU waits for the host and do_bench times the host. (On the CPU smoke run the
    kernels run in the interpreter inside fn: one call after the first, meaning nothing.)"""
    calls = 50 if torch.cuda.is_available() else 1
    fn()
    _sync()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    _sync()
    return sorted(times)[len(times) // 2]


def _clear_grads(leaves: dict) -> None:
    """Drop the leaves' .grad before a timed forward + backward, as a training step's
    zero_grad(set_to_none=True) does: else every call after the first adds its gradients
    into the last call's, one elementwise add per leaf that neither attnc nor fla runs in
    training (8 adds, 0.53 ms of mamba2's 3.98 ms on 2026-11-23, which timed them)."""
    for t in leaves.values():
        t.grad = None


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def copy_bandwidth(device) -> float:
    """Bytes per second of a device-to-device copy (read + write counted)."""
    x = torch.empty((512 if device == "cuda" else 16) * 2**20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    ms = _median_ms(lambda: y.copy_(x))
    return 2 * x.numel() / (ms * 1e-3)


def _fla_arguments(spec_name, args):
    """fla's keyword arguments for attnc's random arguments of `spec_name`, or None. The
    gates fla takes precomputed (log decays, mamba2's dt-scaled keys) are computed here,
    once, as leaves: fla's timings cover its kernels, not that preparation (attnc's cover
    its prologue, which computes them)."""
    import torch.nn.functional as F

    def leaf(x, like):
        return x.detach().requires_grad_(like.requires_grad)

    if spec_name == "mamba2":
        dt = F.softplus(args["dt"] + args["dt_bias"][None, None])
        g = -torch.exp(args["A_log"].float())[None, None] * dt.float()
        k = (args["B"] * dt[..., None]).to(args["B"].dtype)
        return dict(q=args["C"], k=leaf(k, args["B"]), v=args["x"], g=leaf(g, args["dt"]), scale=1.0)
    if spec_name == "gla":
        g = F.logsigmoid(args["g"].float()) / 16
        return dict(q=args["q"], k=args["k"], v=args["v"], g=leaf(g, args["g"]))
    if spec_name == "deltanet":
        return dict(q=args["q"], k=args["k"], v=args["v"], beta=args["beta"],
                    use_qk_l2norm_in_kernel=True)
    if spec_name == "gated_deltanet":
        return dict(q=args["q"], k=args["k"], v=args["v"], g=leaf(args["alpha"].float(), args["alpha"]),
                    beta=args["beta"], use_qk_l2norm_in_kernel=True)
    return None


def _fla_call(name, args, spec_name, **extra):
    """fla's op `name` on the same data (its own argument conventions), or None without
    fla or a twin. `extra`: more keyword arguments (a decode's initial state)."""
    if _FLA_OFF:
        return None
    try:
        import fla.ops as fops
    except Exception:
        return None
    fn = getattr(fops, name, None)
    kwargs = _fla_arguments(spec_name, args)
    if fn is None or kwargs is None:
        return None
    if name == "fused_recurrent_gla":
        kwargs["gk"] = kwargs.pop("g")  # the fused recurrent op names the K-side gate gk
    return lambda: fn(**kwargs, **extra)


def _graphed_ms(fn) -> float:
    """Median ms of fn replayed from a CUDA graph: GPU time with no host work per call, as
    a serving stack that captures its decode step sees it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compiles) off the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    _sync()
    return _median_ms(graph.replay)


def bench_variant(spec_name, B, T, H, D, dtype, device, bandwidth):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        op = attnc.load(spec_name)
    args = random_arguments(op.analysis, B=B, T=T, H=H, dims={"K": D, "V": D}, dtype=dtype,
                            device=device)
    grads = {n: t.detach().clone().requires_grad_() for n, t in args.items()}
    row = {"variant": spec_name, "T": T, "B": B, "D": D}

    t0 = time.perf_counter()
    out, _ = op(**args)
    _sync()
    row["first call s"] = time.perf_counter() - t0
    row["attnc fwd ms"] = _median_ms(lambda: op(**args))
    row["attnc host ms"] = _host_ms(lambda: op(**args))
    do = torch.randn_like(out)

    def fwd_bwd():
        _clear_grads(grads)
        o, _ = op(**grads)
        o.backward(do)
    row["attnc fwd+bwd ms"] = _median_ms(fwd_bwd)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd()
        row["attnc peak GiB"] = torch.cuda.max_memory_allocated() / 2**30

    io_bytes = sum(t.numel() * t.element_size() for t in args.values()) + out.numel() * out.element_size()
    row["floor ms"] = io_bytes / bandwidth * 1e3
    row["fwd / floor"] = row["attnc fwd ms"] / row["floor ms"]

    fla = _fla_call(FLA_TWINS.get(spec_name, ""), args, spec_name) if device == "cuda" else None
    if fla is not None:
        try:
            fla()
            row["fla fwd ms"] = _median_ms(fla)
            fla_grads = {n: t.detach().clone().requires_grad_() for n, t in args.items()}
            fla_bwd = _fla_call(FLA_TWINS[spec_name], fla_grads, spec_name)

            def fla_fwd_bwd():
                _clear_grads(fla_grads)
                o = fla_bwd()[0]
                o.backward(do.to(o.dtype))
            row["fla fwd+bwd ms"] = _median_ms(fla_fwd_bwd)
            if _FLA_GUARD_BYPASSED and "g" in (_fla_arguments(spec_name, args) or {}):
                row["notes"] = GUARD_NOTE
        except Exception as err:  # fla's failure is reported; attnc's numbers stand
            row["error"] = f"fla: {type(err).__name__}: {err}"[:200]
    return row


def bench_decode(spec_name, B, H, D, dtype, device, bandwidth):
    """One decode step (T = 1) against a cached fp32 state, in place; beside fla's fused
    recurrent op from the same state (which writes a new final state: the same bytes).
    On a GPU both are also timed replayed from a CUDA graph (no host work per call)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        op = attnc.load(spec_name)
    args = random_arguments(op.analysis, B=B, T=1, H=H, dims={"K": D, "V": D}, dtype=dtype,
                            device=device)
    state = tuple(torch.randn(B, H, D, D, device=device) for _ in op.spec.states)
    state = state[0] if len(state) == 1 else state

    def step():
        op.step(**args, state=state, inplace=True)
    step()
    row = {"variant": f"{spec_name} decode step", "T": 1, "B": B, "D": D,
           "attnc fwd ms": _median_ms(step), "attnc host ms": _host_ms(step)}
    state_bytes = 2 * len(op.spec.states) * B * H * D * D * 4  # fp32 state read + written
    row["floor ms"] = state_bytes / bandwidth * 1e3
    if device != "cuda":
        return row
    errors = []
    fla = _fla_call(FLA_DECODE_TWINS.get(spec_name, ""), args, spec_name,
                    initial_state=torch.randn(B, H, D, D, device=device), output_final_state=True)
    timed = [("attnc", step)] + ([("fla", fla)] if fla is not None else [])
    if fla is not None:
        fla()
        row["fla fwd ms"] = _median_ms(fla)
    for who, fn in timed:
        try:
            row[f"{who} graphed ms"] = _graphed_ms(fn)
        except Exception as err:  # reported in the row, the plain timings stand
            errors.append(f"{who} graph capture: {type(err).__name__}: {err}"[:200])
    if errors:
        row["error"] = "; ".join(errors)
    return row


def cold_start(spec_name, device, B, T, H, D, profile_to=None):
    """First call in a fresh process with empty caches, attnc's and Triton's (codegen,
    compile, tuning), and with the caches that run left (warm). torch is imported and the device initialised
    before the clock starts (a training script has both before it calls attnc; the
    device's start-up is reported apart, as "init s"); the clock covers `import attnc`,
    `attnc.load` and the first call. `profile_to`: a file for the warm run's cProfile
    (the 40 costliest functions by cumulative time), to see where a warm start goes."""
    child = (
        "import sys, time, torch, warnings, json, cProfile, pstats, io; warnings.simplefilter('ignore')\n"
        "t_init = time.perf_counter()\n"
        f"torch.empty(1, device={device!r}); torch.cuda.synchronize() if torch.cuda.is_available() else None\n"
        "t0 = time.perf_counter()\n"
        "profiler = cProfile.Profile() if sys.argv[1] == '1' else None\n"
        "profiler and profiler.enable()\n"
        "import attnc\nfrom attnc.runtime.sampling import random_arguments\n"
        "t1 = time.perf_counter()\n"
        f"op = attnc.load({spec_name!r})\n"
        "t2 = time.perf_counter()\n"
        f"args = random_arguments(op.analysis, B={B}, T={T}, H={H}, dims={{'K': {D}, 'V': {D}}},"
        f" dtype=torch.{'bfloat16' if device == 'cuda' else 'float32'}, device={device!r})\n"
        "t3 = time.perf_counter()\n"
        "op(**args)\n"
        "torch.cuda.synchronize() if torch.cuda.is_available() else None\n"
        "t4 = time.perf_counter()\n"
        "if profiler:\n"
        "    profiler.disable(); text = io.StringIO()\n"
        "    pstats.Stats(profiler, stream=text).sort_stats('cumulative').print_stats(40)\n"
        "    sys.stderr.write(text.getvalue())\n"
        "print(json.dumps({'init': t0 - t_init, 'import': t1 - t0, 'load': t2 - t1,"
        " 'call': t4 - t3, 'total': t4 - t0 - (t3 - t2)}))\n")
    times = []
    with tempfile.TemporaryDirectory() as cache:
        # Triton's own cache too: compiled kernels left there by earlier runs would make the
        # cold start look warm
        env = dict(os.environ, ATTNC_CACHE_DIR=cache, TRITON_CACHE_DIR=os.path.join(cache, "triton"))
        for warm in (False, True):
            profile = "1" if warm and profile_to else "0"
            run = subprocess.run([sys.executable, "-c", child, profile], env=env,
                                 capture_output=True, text=True)
            if run.returncode != 0:
                raise RuntimeError(f"cold-start child failed: {run.stderr.strip()[-300:]}")
            times.append(json.loads(run.stdout.strip().splitlines()[-1]))
            if profile == "1":
                Path(profile_to).write_text(run.stderr)
    cold, warm = times
    parts = lambda t: f"init {t['init']:.2f} + import {t['import']:.2f} + load {t['load']:.2f} + call {t['call']:.2f}"
    return {"variant": f"{spec_name} first call (cold / warm cache), s", "T": T, "B": B, "D": D,
            "first call s": cold["total"], "warm first call s": warm["total"],
            "notes": f"cold: {parts(cold)}; warm: {parts(warm)}"}


def bench_softmax_attention(B, T, H, D, dtype, device):
    """Causal softmax attention beside them: torch SDPA (FlashAttention) and FlexAttention."""
    q, k, v = (torch.randn(B, H, T, D, dtype=dtype, device=device) for _ in range(3))
    f = torch.nn.functional.scaled_dot_product_attention
    row = {"variant": "softmax attention (causal)", "T": T, "B": B, "D": D,
           "sdpa fwd ms": _median_ms(lambda: f(q, k, v, is_causal=True))}
    if device == "cuda" and not _FLEX_OFF:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            mask = create_block_mask(lambda b, h, i, j: j <= i, None, None, T, T, device=device)
            flex = torch.compile(flex_attention)
            flex(q, k, v, block_mask=mask)
            row["flex fwd ms"] = _median_ms(lambda: flex(q, k, v, block_mask=mask))
        except Exception as err:  # reported, not hidden
            row["error"] = f"flex: {type(err).__name__}: {err}"[:120]
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="one shape")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on the CPU: checks the harness, measures nothing")
    parser.add_argument("--variants", nargs="*",
                        default=["mamba2", "gla", "retnet", "deltanet", "gated_deltanet", "kda"])
    parser.add_argument("--shapes", nargs="*", metavar="B,T,H,D",
                        help="shapes to time instead of the standard ones (the first also "
                             "sets the decode heads and head dim and the cold-start shape)")
    parser.add_argument("--no-decode", action="store_true", help="skip the decode-step rows")
    parser.add_argument("--no-cold-start", action="store_true", help="skip the cold-start row")
    parser.add_argument("--no-fla", action="store_true",
                        help="leave fla out (its autotuning takes minutes per op)")
    parser.add_argument("--no-flex", action="store_true", help="leave FlexAttention out")
    parser.add_argument("--fla-time-gated-backward", action="store_true",
                        help="time fla's gated backward where fla 0.6.0 refuses it (Triton "
                             "3.4-3.7.0 on Hopper, its issue #640); rows say so")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    global _FLA_OFF, _FLEX_OFF
    _FLA_OFF, _FLEX_OFF = args.no_fla, args.no_flex
    if args.fla_time_gated_backward and not args.no_fla and bypass_fla_hopper_guard():
        print(f"bench.py: {GUARD_NOTE}", flush=True)
    if args.smoke:
        device, dtype, name = "cpu", torch.float32, "cpu-smoke"
        shapes = [(1, 64, 2, 16)]
        decode_batch = 2
    elif torch.cuda.is_available():
        device, dtype = "cuda", torch.bfloat16
        name = torch.cuda.get_device_name().replace(" ", "_")
        shapes = [(16, 2048, 16, 128)] if args.quick else [
            (16, 2048, 16, 128), (4, 8192, 16, 128), (1, 32768, 16, 128), (16, 2048, 16, 64),
            (16, 2048, 16, 256)]
        decode_batch = 64
    else:
        print("bench.py needs a CUDA GPU (or --smoke to check the harness on the CPU)",
              file=sys.stderr)
        return 2
    if args.shapes:
        try:
            shapes = [tuple(int(n) for n in text.split(",")) for text in args.shapes]
        except ValueError:
            shapes = []
        if not shapes or any(len(shape) != 4 or min(shape) < 1 for shape in shapes):
            parser.error(f"--shapes {' '.join(args.shapes)}: expected positive B,T,H,D "
                         f"for each shape, e.g. 16,2048,16,128")
    bandwidth = copy_bandwidth(device)
    command = "python bench/bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rows = []
    start = time.perf_counter()

    def add(row):  # the table is rewritten after every row: a run cut short keeps its rows
        rows.append(row)
        print(f"[{time.perf_counter() - start:6.1f} s] {row}", flush=True)
        write_results(rows, name, bandwidth, args.out, dtype=dtype, heads=shapes[0][2],
                      command=command.strip())

    for B, T, H, D in shapes:
        for variant in args.variants:
            try:
                row = bench_variant(variant, B, T, H, D, dtype, device, bandwidth)
            except Exception as err:  # a miss is reported as a miss
                row = {"variant": variant, "T": T, "B": B, "D": D,
                       "error": f"{type(err).__name__}: {err}"[:200]}
            add(row)
        add(bench_softmax_attention(B, T, H, D, dtype, device))
    B, T, H, D = shapes[0]
    if not args.no_decode:
        for variant in ("mamba2", "gla", "deltanet", "gated_deltanet"):
            try:
                add(bench_decode(variant, decode_batch, H, D, dtype, device, bandwidth))
            except Exception as err:
                add({"variant": f"{variant} decode step", "T": 1, "B": decode_batch, "D": D,
                     "error": f"{type(err).__name__}: {err}"[:200]})
    if not args.no_cold_start:
        try:
            add(cold_start("gla", device, B, T, H, D,
                           profile_to=Path(args.out) / f"{name}-warm-start-profile.txt"))
        except RuntimeError as err:
            add({"variant": "gla first call (cold / warm cache), s", "error": str(err)})
    return 0


COLUMNS = ["variant", "B", "T", "D", "attnc fwd ms", "attnc host ms", "attnc graphed ms", "fla fwd ms",
           "fla graphed ms", "sdpa fwd ms", "flex fwd ms",
           "attnc fwd+bwd ms", "fla fwd+bwd ms", "floor ms", "fwd / floor", "attnc peak GiB",
           "first call s", "warm first call s", "notes", "error"]


def write_results(rows, device_name, bandwidth, out_dir, command, dtype, heads):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# attnc benchmark on {device_name}", "",
             f"torch {torch.__version__}, triton {__import__('triton').__version__}, "
             f"attnc {attnc.__version__}, python {platform.python_version()}; {dtype}, H = {heads}; "
             f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; "
             + ("medians of triton.testing.do_bench." if torch.cuda.is_available() else
                "CPU smoke run: checks the harness, the times mean nothing."),
             "", f"Command: `{command}`", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = []
        for c in COLUMNS:
            v = r.get(c)
            cells.append("" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    (out / f"{device_name}.md").write_text("\n".join(lines) + "\n")
    plot_rows(rows, out / f"{device_name}.png", f"attnc forward, {dtype}, H={heads}, {device_name}")


def plot_rows(rows, path, title) -> bool:
    """Forward ms against T, one line per variant at the first row's head dim (attnc solid,
    fla dashed, softmax attention from its SDPA time); False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    head_dim = rows[0]["D"]
    for variant in sorted({r["variant"] for r in rows}):
        if "decode" in variant or "first call" in variant:
            continue  # T = 1 and seconds: not on this plot
        pts = [(r["T"], r.get("attnc fwd ms") or r.get("sdpa fwd ms")) for r in rows
               if r["variant"] == variant and r.get("D") == head_dim
               and (r.get("attnc fwd ms") or r.get("sdpa fwd ms"))]
        if pts:
            line, = ax.plot(*zip(*sorted(pts)), marker="o", label=variant)
            fla = [(r["T"], r["fla fwd ms"]) for r in rows if r["variant"] == variant
                   and r.get("D") == head_dim and r.get("fla fwd ms")]
            if fla:
                ax.plot(*zip(*sorted(fla)), marker="x", linestyle="--", color=line.get_color(),
                        label=f"{variant} (fla)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("T (B*T = 32768)")
    ax.set_ylabel("forward ms (median)")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


if __name__ == "__main__":
    sys.exit(main())
