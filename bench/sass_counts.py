"""What a generated kernel's machine code does, without a GPU: compile a spec's kernels for
sm_90 (as `attnc aot` does), disassemble them with nvdisasm (shipped with Triton) and count
instructions by kind, in the whole kernel and in the body of each loop.

    python bench/sass_counts.py gla --kernels chunk_dqdk [--config diag_loop=1] [--loops]

Static counts: a loop's body counts once however often it runs. Barriers (BAR) and
shared-memory traffic (LDS / STS) inside a loop are mostly Triton's layout conversions.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

KINDS = {"EX2": "MUFU.EX2", "SHFL": "SHFL", "BAR": "BAR", "LDS": "LDS", "STS": "STS", "LDG": "LDG",
         "STG": "STG", "MMA": ("HMMA", "HGMMA"), "FFMA": "FFMA", "FMUL": "FMUL", "FADD": "FADD"}
LINE = re.compile(r"\s*/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*)")


def disassemble(cubin: bytes) -> str:
    from attnc.runtime.aot import _cuda_tool

    tool = _cuda_tool("nvdisasm")
    if tool is None:
        raise SystemExit("nvdisasm not found (Triton ships it under backends/nvidia/bin)")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([tool, "-c", path], capture_output=True, text=True, check=True).stdout


def instructions(sass: str) -> tuple[list[tuple[int, str, str]], dict[str, int]]:
    """(address, opcode, operands) per instruction, and each label's address."""
    out, labels, pending = [], {}, []
    for line in sass.splitlines():
        label = re.match(r"\s*\.(L_x_\d+):", line)
        if label:
            pending.append(label.group(1))
            continue
        m = LINE.match(line)
        if m:
            address = int(m.group(1), 16)
            labels.update((name, address) for name in pending)
            pending = []
            out.append((address, m.group(2), m.group(3)))
    return out, labels


def counts(opcodes) -> dict[str, int]:
    tally = collections.Counter()
    for op in opcodes:
        for kind, prefix in KINDS.items():
            tally[kind] += op.startswith(prefix)
    return {"total": len(opcodes), **tally}


def loops(code, labels) -> list[tuple[int, int, dict]]:
    """(start, end, counts) of each backward branch's body."""
    found = []
    for address, op, rest in code:
        target = re.search(r"\.(L_x_\d+)", rest) if op.startswith("BRA") else None
        if target and labels.get(target.group(1), address) < address:
            start = labels[target.group(1)]
            found.append((start, address, counts([o for a, o, _ in code if start <= a <= address])))
    return found


def main() -> int:
    os.environ.pop("TRITON_INTERPRET", None)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec")
    parser.add_argument("--kernels", default="", help="comma-separated parts of kernel names (default all)")
    parser.add_argument("--shape", default="16,2048,16,128,128", help="B,T,H,K,V")
    parser.add_argument("--config", default="", help="launch config, e.g. diag_loop=1,num_warps=8")
    parser.add_argument("--loops", action="store_true", help="also each loop body's counts")
    args = parser.parse_args()

    import torch
    import triton
    from triton.backends.compiler import GPUTarget

    import attnc
    from attnc.runtime.aot import distinct_launches, source_for
    from attnc.runtime.gpu_cli import parse_config
    from attnc.runtime.launches import record

    B, T, H, K, V = map(int, args.shape.split(","))
    op = attnc.load(args.spec)
    trace = record(op, B=B, T=T, H=H, dims={"K": K, "V": V}, dtype=torch.bfloat16, step=False,
                   config=parse_config(args.config or None))
    wanted = [k for k in args.kernels.split(",") if k]
    for launch in distinct_launches(trace):
        if wanted and not any(k in launch.name for k in wanted):
            continue
        options = {k: v for k, v in launch.options.items() if k in ("num_warps", "num_stages")}
        compiled = triton.compile(source_for(launch), target=GPUTarget("cuda", 90, 32), options=options)
        code, labels = instructions(disassemble(compiled.asm["cubin"]))
        tally = counts([op for _, op, _ in code])
        print(f"{launch.name:36s} warps {options.get('num_warps')}  " + "  ".join(f"{k} {v}" for k, v in tally.items()))
        if args.loops:
            for start, end, body in loops(code, labels):
                print(f"    loop {start:#07x}-{end:#07x}  " + "  ".join(f"{k} {v}" for k, v in body.items() if v))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
