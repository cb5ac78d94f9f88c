"""Where a call's GPU time goes: each generated kernel's time per call, its bytes and the
bandwidth that makes, for the forward and the backward of a shipped spec.

    python bench/kernel_times.py gla mamba2 --shape 16,2048,16,128 [--config num_warps=8]

Kernel times come from torch.profiler (CUDA activity, summed over `--calls` calls and
divided by them); the backward's are those of forward + backward minus the forward's. The
bytes are what the launch trace (runtime/launches.py) says each launch's distinct tensors
hold, so "GB/s" is the bandwidth a kernel would reach if it touched each byte once: far
below the copy bandwidth means the kernel is bound by something else (latency,
arithmetic, too few programs), not by memory. Writes `<out>/<device>-kernels.md`. Needs a
CUDA GPU; `summarize` and `kernel_bytes` run anywhere.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class KernelTime:
    name: str
    calls: float      # launches per call of the op
    ms: float         # time per call of the op, all launches together


def summarize(profile, device_type, calls: int) -> dict[str, KernelTime]:
    """Per kernel name: launches and milliseconds per call, from a finished
    torch.profiler.profile whose `calls` calls ran `device_type` work (a
    torch.autograd.DeviceType). Events of other devices are left out."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for event in profile.key_averages():
        if event.device_type != device_type:
            continue
        us = event.self_device_time_total if device_type != torch.autograd.DeviceType.CPU \
            else event.self_cpu_time_total
        totals[event.key][0] += event.count
        totals[event.key][1] += us
    return {name: KernelTime(name, count / calls, us / calls / 1e3)
            for name, (count, us) in totals.items()}


def difference(after: dict[str, KernelTime], before: dict[str, KernelTime]) -> dict[str, KernelTime]:
    """`after` less `before`, kernel by kernel (the backward's share of forward + backward);
    kernels left with no launches are dropped."""
    out = {}
    for name, t in after.items():
        b = before.get(name, KernelTime(name, 0.0, 0.0))
        calls = t.calls - b.calls
        if calls > 0.5:
            out[name] = KernelTime(name, calls, max(t.ms - b.ms, 0.0))
    return out


def kernel_bytes(op, B, T, H, dims, dtype, config=None) -> dict[str, dict[str, int]]:
    """{phase: {kernel name: bytes per call}} from the launch trace of one call."""
    from attnc.runtime.launches import record

    trace = record(op, B=B, T=T, H=H, dims=dims, dtype=dtype, step=False, config=config)
    out: dict[str, dict[str, int]] = {}
    for launch in trace.launches():
        phase = out.setdefault(launch.phase, {})
        phase[launch.name] = phase.get(launch.name, 0) + launch.tensor_bytes
    return out


def table(times: dict[str, KernelTime], nbytes: dict[str, int], heading: str) -> list[str]:
    """Markdown rows, slowest kernel first, with each one's share of the phase."""
    total = sum(t.ms for t in times.values()) or float("nan")
    lines = [f"#### {heading}: {total:.3f} ms in kernels", "",
             "| kernel | launches | ms | share | MB | GB/s |", "|---|---|---|---|---|---|"]
    for t in sorted(times.values(), key=lambda t: -t.ms):
        mb = nbytes.get(t.name)
        rate = f"{mb / (t.ms * 1e-3) / 1e9:.0f}" if mb and t.ms > 0 else ""
        lines.append(f"| {t.name} | {t.calls:g} | {t.ms:.3f} | {100 * t.ms / total:.0f} % | "
                     f"{'' if mb is None else f'{mb / 1e6:.1f}'} | {rate} |")
    return lines + [""]


def profile_calls(fn, calls: int) -> dict[str, KernelTime]:
    from torch.profiler import ProfilerActivity, profile

    fn()  # compiled and tuned before the profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return summarize(prof, torch.autograd.DeviceType.CUDA, calls)


def measure(spec, B, T, H, D, config, calls) -> list[str]:
    import attnc
    from attnc.runtime.sampling import random_arguments

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        op = attnc.load(spec)
    dims = {d.name: D for d in op.spec.dims}
    args = random_arguments(op.analysis, B=B, T=T, H=H, dims=dims, dtype=torch.bfloat16,
                            device="cuda")
    grads = {n: t.detach().clone().requires_grad_() for n, t in args.items()}
    out, _ = op(**args, config=config)
    do = torch.randn_like(out)

    def forward():
        op(**args, config=config)

    def forward_backward():
        for t in grads.values():  # as a training step's zero_grad: no adds into the last call's
            t.grad = None
        o, _ = op(**grads, config=config)
        o.backward(do)

    fwd = profile_calls(forward, calls)
    bwd = difference(profile_calls(forward_backward, calls), fwd)
    nbytes = kernel_bytes(op, B, T, H, dims, torch.bfloat16, config)
    shape = f"{spec}, B={B} T={T} H={H} D={D}" + (f", config {config}" if config else "")
    return ([f"### {shape}", ""] + table(fwd, nbytes.get("forward", {}), "forward")
            + table(bwd, nbytes.get("backward", {}), "backward"))


def _config(text):
    from attnc.runtime.gpu_cli import parse_config

    try:
        return parse_config(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("specs", nargs="+")
    parser.add_argument("--shape", default="16,2048,16,128", help="B,T,H,D (default %(default)s)")
    parser.add_argument("--config", type=_config, default=None,
                        help="launch config instead of the tuned or default one, e.g. num_warps=8")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    try:
        B, T, H, D = (int(n) for n in args.shape.split(","))
    except ValueError:
        parser.error(f"--shape {args.shape}: expected B,T,H,D, e.g. 16,2048,16,128")
    if not torch.cuda.is_available():
        print("kernel_times.py needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name().replace(" ", "_")
    lines = []
    for spec in args.specs:
        section = measure(spec, B, T, H, D, args.config, args.calls)
        print("\n".join(section), flush=True)
        lines += section
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python bench/kernel_times.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / f"{device}-kernels.md").write_text(
        f"# attnc kernel times on {device}\n\nCommand: `{command}`; torch.profiler CUDA time "
        f"per call (mean of {args.calls} calls), bytes from the launch trace.\n\n"
        + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
