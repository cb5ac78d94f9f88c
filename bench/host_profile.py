"""Where a call's host time goes: attnc's own Python, Triton's launch path, PyTorch's ops.

    python bench/host_profile.py mamba2 gla --shape 16,2048,16,128 [--calls 50] [--backward]

For each spec: the median wall time until a call returns (no waiting for the device; the
"attnc host ms" of bench/bench.py), then `--calls` calls under cProfile, whose host time
per call is split into
    triton launch   inside Triton's `JITFunction.run` (binding and specialising the
                    arguments, the cache lookup, the C launcher), summed over launches
    pytorch ops     in PyTorch's C functions and tensor methods (allocation, views,
                    the ops between launches; on a GPU each also enqueues its kernel;
                    with --backward the autograd engine's own time too)
    autograd        in `torch.autograd.Function.apply` itself, less what its forward ran
    attnc           the rest: binding, the plan, the launchers' Python
(The PyTorch calls Triton's binder makes count in both of the first two.) cProfile's own cost inflates every part by about the same per function call, most the
parts made of many small Python calls (attnc's); the wall time above has none of it.
With no GPU the kernels are not launched (`runtime/launches.py`, the launchers deciding
as on a GPU): there is then no Triton part, and the rest is what `attnc trace
--host-time` measures. On a GPU, keep `--calls` x launches per call under CUDA's queue
(about 1000) or the host waits for the device inside the calls. Writes
`<out>/<device>-host.md` with `--out`.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import pstats
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

PARTS = ("triton launch", "pytorch ops", "autograd", "attnc")


def split(stats: pstats.Stats, calls: int) -> tuple[dict[str, float], list[tuple[str, float]]]:
    """(microseconds per call by part, the 15 functions with the most own time per call)
    from the stats of `calls` profiled calls."""
    raw = stats.stats  # (file, line, name) -> (primitive calls, calls, own time, cumulative, callers)
    total = sum(cumulative for (path, _, name), (_, _, _, cumulative, _) in raw.items()
                if name == "call" and path.endswith("host_profile.py"))
    triton = sum(cumulative for (path, _, name), (_, _, _, cumulative, _) in raw.items()
                 if name == "run" and path.replace("\\", "/").endswith("triton/runtime/jit.py"))
    torch_own = 0.0
    for (path, _, name), (_, _, own, _, _) in raw.items():
        if path == "~" and ("torch" in name or "TensorBase" in name):
            torch_own += own
    apply_own = sum(own for (path, _, name), (_, _, own, _, _) in raw.items()
                    if (path == "~" and name == "<built-in method apply>")
                    or (name == "apply" and path.replace("\\", "/").endswith("autograd/function.py")))
    parts = {"triton launch": triton, "pytorch ops": torch_own, "autograd": apply_own}
    parts["attnc"] = max(0.0, total - sum(parts.values()))
    per_call = {k: v / calls * 1e6 for k, v in parts.items()}
    per_call["total"] = total / calls * 1e6
    top = sorted(((f"{Path(path).name}:{line}({name})", own / calls * 1e6)
                  for (path, line, name), (_, _, own, _, _) in raw.items()), key=lambda x: -x[1])[:15]
    return per_call, top


def measure(spec: str, B: int, T: int, H: int, D: int, calls: int, backward: bool) -> list[str]:
    import attnc
    from attnc.runtime.launches import launches_replaced
    from attnc.runtime.sampling import random_arguments

    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        op = attnc.load(spec)
    dims = {d.name: D for d in op.spec.dims}
    args = random_arguments(op.analysis, B=B, T=T, H=H, dims=dims, dtype=torch.bfloat16, device=device,
                            requires_grad=backward)

    def call():
        for t in args.values():  # as a training step's zero_grad: no adds into the last call's grads
            t.grad = None
        out, _ = op(**args, backend="triton")
        if backward:
            outs = out if isinstance(out, tuple) else (out,)
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    def sync():
        if on_gpu:
            torch.cuda.synchronize()

    # no GPU: launchers decide as on one, nothing is launched
    context = contextlib.nullcontext() if on_gpu else launches_replaced(lambda *a: None)
    with context:
        for _ in range(3):  # first calls compile, tune, load
            call()
        sync()
        walls = []
        for _ in range(calls):
            start = time.perf_counter()
            call()
            walls.append((time.perf_counter() - start) * 1e6)
        sync()
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(calls):
            call()
        profile.disable()
        sync()
    parts, top = split(pstats.Stats(profile), calls)
    what = "forward + backward" if backward else "forward"
    lines = [f"## {spec}: {what}, B={B} T={T} H={H} D={D} bf16, {calls} calls"
             + ("" if on_gpu else " (no GPU: kernels not launched)"), "",
             f"wall time per call until it returns: {statistics.median(walls):.1f} us (median, not profiled)", "",
             "| part | us per call (profiled) |", "|---|---|"]
    lines += [f"| {name} | {parts[name]:.1f} |" for name in PARTS]
    lines += [f"| total | {parts['total']:.1f} |", "", "Most own time (profiled, us per call):", ""]
    lines += [f"- {name}: {us:.1f}" for name, us in top]
    return lines + [""]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("specs", nargs="+")
    parser.add_argument("--shape", default="16,2048,16,128", help="B,T,H,D (default %(default)s)")
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--backward", action="store_true", help="time forward + backward")
    parser.add_argument("--out", default=None, help="folder for <device>-host.md (default: print only)")
    args = parser.parse_args(argv)
    try:
        B, T, H, D = (int(n) for n in args.shape.split(","))
    except ValueError:
        parser.error(f"--shape {args.shape}: expected B,T,H,D, e.g. 16,2048,16,128")
    if args.calls < 1:
        parser.error(f"--calls {args.calls}: expected at least 1")
    lines = []
    for spec in args.specs:
        section = measure(spec, B, T, H, D, args.calls, args.backward)
        print("\n".join(section), flush=True)
        lines += section
    if args.out:
        device = torch.cuda.get_device_name().replace(" ", "_") if torch.cuda.is_available() else "cpu"
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        command = "python bench/host_profile.py " + " ".join(argv if argv is not None else sys.argv[1:])
        (out / f"{device}-host.md").write_text(f"# attnc host time per call on {device}\n\nCommand: "
                                               f"`{command}`\n\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
