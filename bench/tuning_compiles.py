"""What tuning one spec compiles, and how long that takes on worker processes, without a GPU.

    python bench/tuning_compiles.py mamba2 [--shape 16,2048,16,128] [--workers 2] [--count-only]

Runs tuning's precompile capture (`autotune.precompile`'s first half) for the fast
candidates at the shape, with Triton's real compiler for an H100 (sm_90) and a stand-in
for the CUDA driver (the JIT only asks it for a device, a stream and the target), then
compiles the distinct kernels on `--workers` processes (runtime/compile_pool.py) into an
empty Triton cache. Prints the candidates, launches and distinct compiles, the wall time,
the compile times summed (one core's work) and the slowest compiles.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path


class NoGpuDriver:
    """What Triton's JIT asks a driver for before it compiles; no GPU is touched."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def is_active(self):
        return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec")
    parser.add_argument("--shape", default="16,2048,16,128", help="B,T,H,D (K = V = D)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--count-only", action="store_true", help="capture, do not compile")
    parser.add_argument("--json", type=Path, help="write each compile's kernel, options and "
                        "seconds to this file")
    args = parser.parse_args(argv)
    B, T, H, D = (int(x) for x in args.shape.split(","))
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="attnc-tuning-compiles-")
    if "triton" in sys.modules:
        raise SystemExit("tuning_compiles.py: run it as a script (Triton must start compiled)")
    import torch
    from triton.runtime.driver import driver

    driver.set_active(NoGpuDriver())
    import attnc
    from attnc.runtime import autotune, compile_pool
    from attnc.runtime.launches import launches_replaced

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        op = attnc.load(args.spec)
    dims = {d.name: D for d in op.spec.dims}
    pool = autotune.candidates(op, T=T, dims=dims, dtype=torch.bfloat16, mode="fast")
    arguments, cu, grads = autotune._trial_data(op, B, T, H, dims, torch.bfloat16, "cpu", None)
    jobs: list = []
    launches = 0

    def warmup(kernel, grid, kernel_args, kwargs):
        nonlocal launches
        launches += 1
        kernel.warmup(*kernel_args, grid=grid, **kwargs)

    with compile_pool.captured_compiles(jobs), launches_replaced(warmup):
        for config in pool:
            autotune.Trial(op, config, arguments, cu, grads)()
    kinds = collections.Counter(job.name.removeprefix(f"{op.name}_") for job in jobs)
    print(f"{args.spec} at B={B} T={T} H={H} D={D}: {len(pool)} candidates, {launches} launches, "
          f"{len(jobs)} distinct compiles")
    print("  per kernel: " + ", ".join(f"{name} {n}" for name, n in kinds.most_common()))
    if args.count_only:
        return 0
    start = time.perf_counter()
    results = compile_pool.compile_jobs(jobs, args.workers)
    wall = time.perf_counter() - start
    failed = [r for r in results if not r.ok]
    print(f"  compiled on {args.workers} processes in {wall:.1f} s (worker start included); "
          f"compile times summed {sum(r.seconds for r in results):.1f} s; "
          f"{len(failed)} failed, {len(jobs) - len(results)} not taken up")
    for result in sorted(results, key=lambda r: -r.seconds)[:5]:
        print(f"  {result.seconds:5.1f} s  {result.job.label}")
    for result in failed[:5]:
        print(f"  failed: {result.job.label}: {result.error}")
    if args.json:
        args.json.write_text(json.dumps([
            {"kernel": r.job.name, "options": r.job.options, "constexprs": {str(k): v for k, v in r.job.constexprs.items()},
             "seconds": r.seconds, "error": r.error} for r in results], indent=1, default=str))
    return 1 if failed or len(results) < len(jobs) else 0


if __name__ == "__main__":
    sys.exit(main())
