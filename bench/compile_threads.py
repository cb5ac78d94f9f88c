"""How well Triton compiles run in parallel: compile a spec's distinct kernels for a GPU
target (no GPU needed) one by one, then on N threads, then on N worker processes
(runtime/compile_pool.py, which tuning's `autotune.precompile` uses), each time into an
empty Triton cache, and print the wall times. The part of a compile that holds Python's
GIL bounds what threads gain; processes have a GIL each.

    python bench/compile_threads.py gla --threads 2 [--target cuda:90]

Each run is a fresh process (the kernels are traced at B=2, T=256, H=4, K=V=128, bf16,
forward and backward, at num_warps 4 and 8 so that there is more than one candidate).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time, warnings
from concurrent.futures import ThreadPoolExecutor
import torch
from attnc.runtime.aot import Target, compile_job, compile_launch, distinct_launches
from attnc.runtime.compile_pool import compile_jobs
from attnc.runtime.compiler import compile
from attnc.runtime.launches import record
warnings.simplefilter("ignore")
spec, target, threads, how = sys.argv[1], Target.parse(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
op = compile(spec)
dims = {d.name: 128 for d in op.spec.dims}
launches = []
for warps in (4, 8):
    trace = record(op, B=2, T=256, H=4, dims=dims, dtype=torch.bfloat16, backward=True,
                   config={"num_warps": warps})
    launches += distinct_launches(trace)
if how == "processes":
    jobs = [compile_job(launch, target) for launch in launches]
start = time.perf_counter()
if how == "processes":
    results = compile_jobs(jobs, threads)
    failed = [r.job.name for r in results if not r.ok] + ["(not taken up)"] * (len(jobs) - len(results))
elif threads == 1:
    reports = [compile_launch(launch, target) for launch in launches]
else:
    with ThreadPoolExecutor(threads) as pool:
        reports = list(pool.map(lambda launch: compile_launch(launch, target), launches))
if how != "processes":
    failed = [r.name for r in reports if not r.ok]
print(json.dumps({"kernels": len(launches), "seconds": time.perf_counter() - start, "failed": failed}))
"""


def compile_seconds(spec: str, target: str, threads: int, how: str = "threads") -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TRITON_CACHE_DIR=cache)
        run = subprocess.run([sys.executable, "-c", CHILD, spec, target, str(threads), how], env=env,
                             capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"compile_threads.py: the child failed: {run.stderr.strip()[-500:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--target", default="cuda:90")
    args = parser.parse_args(argv)
    if args.threads < 2:
        parser.error("--threads: at least 2 (one thread is the baseline it is compared with)")
    serial = compile_seconds(args.spec, args.target, 1)
    threaded = compile_seconds(args.spec, args.target, args.threads)
    processes = compile_seconds(args.spec, args.target, args.threads, "processes")
    speedup = serial["seconds"] / threaded["seconds"]
    # Amdahl: speedup = 1 / (f + (1 - f) / n)  =>  f = (n / speedup - 1) / (n - 1)
    serial_part = (args.threads / speedup - 1) / (args.threads - 1)
    print(f"{args.spec}: {serial['kernels']} kernels for {args.target}: one by one "
          f"{serial['seconds']:.1f} s, on {args.threads} threads {threaded['seconds']:.1f} s "
          f"({speedup:.2f}x); serial part ~{max(serial_part, 0):.0%}, so at most "
          f"{1 / (max(serial_part, 1e-9) + (1 - serial_part) / 16):.1f}x on 16 threads; "
          f"on {args.threads} processes {processes['seconds']:.1f} s "
          f"({serial['seconds'] / processes['seconds']:.2f}x, worker start-up included)")
    for result in (serial, threaded, processes):
        if result["failed"]:
            print(f"  failed to compile: {', '.join(result['failed'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
