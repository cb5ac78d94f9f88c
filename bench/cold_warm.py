"""Cold vs warm start: the first `attnc.compile` + first call of a shipped spec in a fresh
process, with an empty kernel cache and then with the cache the first run left.

    python bench/cold_warm.py [SPEC] [--backend torch|triton]

Each run is a new Python process (imports included in neither number: the time is
measured inside the process from just before `attnc.load`). A warm run must skip code
generation entirely; this script checks that by making the emitters raise.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, os, sys, time
import torch
import attnc
spec, backend, forbid = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
if forbid:  # a warm start must not generate any code
    import attnc.codegen.emit_torch as emit_torch, attnc.codegen.chunk_diag as chunk_diag
    import attnc.codegen.chunk_delta as chunk_delta, attnc.codegen.recurrent as recurrent
    def refuse(*a, **k):
        raise RuntimeError("code generation on a warm start")
    emit_torch.emit_plan = refuse
    chunk_diag.render = chunk_delta.render = recurrent.render_recurrent = refuse
t0 = time.perf_counter()
op = attnc.load(spec)
t1 = time.perf_counter()
from attnc.runtime.sampling import random_arguments
args = random_arguments(op.analysis, B=1, T=64, H=2, dims={"K": 32, "V": 32})
out, _ = op(**args, backend=backend)
t2 = time.perf_counter()
print(json.dumps({"compile_s": t1 - t0, "first_call_s": t2 - t1, "total_s": t2 - t0}))
"""


def run(spec: str, backend: str, cache: str, forbid: bool) -> dict:
    env = dict(os.environ, ATTNC_CACHE_DIR=cache)
    if backend == "triton":
        env.setdefault("TRITON_INTERPRET", "1")
    proc = subprocess.run([sys.executable, "-c", CHILD, spec, backend, "1" if forbid else "0"],
                          env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("spec", nargs="?", default="gla")
    parser.add_argument("--backend", default="torch", choices=("torch", "triton"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as cache:
        cold = run(args.spec, args.backend, cache, forbid=False)
        warm = run(args.spec, args.backend, cache, forbid=True)
    print(f"{args.spec} ({args.backend}): cold {cold['total_s']:.3f} s "
          f"(compile {cold['compile_s']:.3f} + first call {cold['first_call_s']:.3f}); "
          f"warm {warm['total_s']:.3f} s (compile {warm['compile_s']:.3f} + first call "
          f"{warm['first_call_s']:.3f}); warm start generated no code")
    return 0


if __name__ == "__main__":
    sys.exit(main())
