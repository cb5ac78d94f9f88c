"""Find the kernel that goes wrong on a GPU: run one call of a spec twice on the same
random inputs, in bf16 and in fp32 (IEEE dots), snapshot every tensor argument of every
Triton launch after it ran, and compare the two runs launch by launch.

    python bench/kernel_diff.py deltanet --shape 1,256,2,128 [--config num_warps=8]

Both runs launch the same kernels in the same order; their buffers differ by bf16
rounding (~1e-2 relative). A kernel whose outputs differ by O(1) while its inputs agree is
the one the GPU computes wrongly (a miscompile or a race), which the interpreter's runs on
the CPU cannot show. Also prints `verify`'s errors of each run. Needs a CUDA GPU.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch


def snapshot_launches(op, args, dtype, config):
    """[(kernel name, {argument: fp32 copy after the launch})] of one forward + backward."""
    from triton.runtime.jit import KernelInterface

    launches = []
    original = KernelInterface.__getitem__

    def replaced(kernel, grid):
        run = original(kernel, grid)

        def launch(*a, **k):
            result = run(*a, **k)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            import inspect

            names = list(inspect.signature(kernel.fn).parameters)
            values = dict(zip(names, a)) | {n: v for n, v in k.items() if n in names}
            launches.append((kernel.fn.__name__,
                             {n: v.detach().float().clone() for n, v in values.items()
                              if isinstance(v, torch.Tensor) and v.is_floating_point()}))
            return result
        return launch

    inputs = {n: t.detach().to(dtype).requires_grad_(t.is_floating_point()) for n, t in args.items()}
    KernelInterface.__getitem__ = replaced
    try:
        out, _ = op(**inputs, config=config, precision="ieee", output_final_state=True)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    finally:
        KernelInterface.__getitem__ = original
    return launches


def run_call(op, args, dtype, config):
    """{name: fp32 copy} of the outputs and input gradients of one forward + backward."""
    inputs = {n: t.detach().to(dtype).requires_grad_(t.is_floating_point()) for n, t in args.items()}
    out, final = op(**inputs, config=config, precision="ieee", output_final_state=True)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    result = {f"out{i}": o.detach().float() for i, o in enumerate(outs)}
    result |= {f"d{n}": t.grad.float() for n, t in inputs.items() if t.grad is not None}
    return result


def rel(a, b):
    a, b = a.double(), b.double()
    ok = torch.isfinite(a) & torch.isfinite(b)
    if not ok.any():
        return float("nan")
    scale = b[ok].norm().item() or 1.0
    bad = (~ok).sum().item()
    return float("inf") if bad else (a - b)[ok].norm().item() / scale


def main(argv=None) -> int:
    if "--cpu" in (argv if argv is not None else sys.argv):
        os.environ.setdefault("TRITON_INTERPRET", "1")
    parser = argparse.ArgumentParser()
    parser.add_argument("spec")
    parser.add_argument("--shape", default="1,256,2,128", help="B,T,H,D (K = V = D)")
    parser.add_argument("--config", default="", help="launch config, e.g. num_warps=8,chunk_size=32")
    parser.add_argument("--sweep", nargs="*", default=[],
                        help="configs to compare bf16 with fp32 at first (outputs and gradients)")
    parser.add_argument("--cpu", action="store_true", help="check the script in the interpreter")
    parser.add_argument("--no-verify", action="store_true", help="skip the verify runs")
    parser.add_argument("--no-launches", action="store_true", help="skip the launch-by-launch diff")
    args = parser.parse_args(argv)
    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("kernel_diff.py needs a CUDA GPU (or --cpu to check the script)", file=sys.stderr)
        return 2
    import attnc
    from attnc.runtime.sampling import random_arguments
    from attnc.runtime.verify import verify

    B, T, H, D = (int(x) for x in args.shape.split(","))
    config = {k: int(v) for k, v in (p.split("=") for p in args.config.split(",") if p)} or None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        op = attnc.load(args.spec)
    for dtype in () if args.no_verify else (torch.bfloat16, torch.float32):
        r = verify(op, B=B, T=T, H=H, K=D, V=D, dtype=dtype, device=device)
        print(f"verify {args.spec} {args.shape} {dtype}: ok={r.ok} "
              + " ".join(f"{k}={v:.1e}" for k, v in r.errors.items()), flush=True)
    torch.manual_seed(0)
    data = random_arguments(op.analysis, B=B, T=T, H=H, dims={d.name: D for d in op.spec.dims},
                            dtype=torch.float32, device=device)
    for text in args.sweep:
        swept = {k: int(v) for k, v in (p.split("=") for p in text.split(",") if p)} or None
        results = [run_call(op, data, dtype, swept) for dtype in (torch.bfloat16, torch.float32)]
        print(f"config {text or 'default':28s} bf16 vs fp32: " + " ".join(
            f"{n}={rel(results[0][n], results[1][n]):.1e}" for n in results[1]), flush=True)
    if args.no_launches:
        return 0
    half = snapshot_launches(op, data, torch.bfloat16, config)
    full = snapshot_launches(op, data, torch.float32, config)
    print(f"{len(half)} launches in bf16, {len(full)} in fp32")
    for i, ((name, a), (name_b, b)) in enumerate(zip(half, full)):
        if name != name_b:
            print(f"launch {i}: {name} (bf16) vs {name_b} (fp32): the runs launch differently")
            break
        diffs = sorted(((rel(a[n], b[n]), n) for n in a if n in b and a[n].shape == b[n].shape),
                       reverse=True)
        worst = ", ".join(f"{n} {d:.1e}" for d, n in diffs[:4])
        print(f"{i:3d} {name:40s} {worst}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
