"""What can be measured about the GPU kernels without a GPU, for every shipped spec.

    python bench/static_report.py [--out bench/results/static-cuda90.md]

For K = V in {64, 128, 256} (B=1, T=256, H=16, bf16) it runs `attnc aot` (each kernel
compiled for an H100, cuda:90, by Triton's compiler and ptxas: registers, spilled bytes
per thread, shared memory) and `attnc trace` (bytes each phase moves, the forward against
its memory floor), and writes one markdown file. These are compile-time and byte counts,
not timings: timings need a GPU (bench/bench.py).
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

WIDTHS = (64, 128, 256)


def _attnc(*args: str) -> list[dict]:
    run = subprocess.run([sys.executable, "-m", "attnc.runtime.cli", *args, "--json"],
                         capture_output=True, text=True, check=False)
    if not run.stdout.strip():
        raise SystemExit(f"attnc {' '.join(args)} failed:\n{run.stderr}")
    return json.loads(run.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/static-cuda90.md"))
    args = parser.parse_args()

    import triton

    import attnc

    specs = attnc.shipped_specs()
    lines = [
        "# Kernels compiled for an H100 without one, and the bytes each call moves",
        "",
        f"Made by `python bench/static_report.py` on {platform.machine()} without a GPU, "
        f"Triton {triton.__version__}, target cuda:90. B=1, T=256, H=16, bf16 inputs.",
        "Registers and spills come from `cuobjdump` on the cubin `ptxas` built; a GPU run",
        "(bench/bench.py) is what tells whether a spill costs time.",
        "",
    ]
    for width in WIDTHS:
        shape = f"1,256,16,{width},{width}"
        aot = _attnc("aot", *specs, "--shape", shape)
        trace = _attnc("trace", *specs, "--shape", shape) if width == 128 else []
        lines += [f"## K = V = {width}", "",
                  "| spec | kernel | phase | regs | spill B/thread | smem KiB | warps | stages |",
                  "|---|---|---|---|---|---|---|---|"]
        for report in aot:
            for k in report["kernels"]:
                if k["error"]:
                    lines.append(f"| {report['spec']} | {k['name']} | {k['phase']} | "
                                 f"FAILED: {k['error'].splitlines()[0][:80]} |||||")
                    continue
                lines.append(f"| {report['spec']} | {k['name']} | {k['phase']} | {k['registers']} | "
                             f"{k['spill_bytes'] or ''} | {k['shared_bytes'] / 1024:.1f} | "
                             f"{k['num_warps']} | {k['num_stages'] if k['num_stages'] is not None else '-'} |")
        lines.append("")
        if trace:
            lines += ["Bytes moved per call (kernels' tensor arguments plus PyTorch passes; "
                      "the floor is reading the inputs and writing the outputs once; in brackets, "
                      "where the gates make every chunk whole: less the tensors a kernel touches "
                      "only for the chunks the gates pick, `attnc trace`'s *):", "",
                      "| spec | forward MB | x floor | backward MB | decode step MB |",
                      "|---|---|---|---|---|"]

            def megabytes(phase):
                moved = phase.get("bytes", 0) / 1e6
                least = phase.get("least_bytes", phase.get("bytes", 0)) / 1e6
                return f"{moved:.1f}" + (f" ({least:.1f})" if f"{least:.1f}" != f"{moved:.1f}" else "")
            for report in trace:
                phases = report["phases"]
                fwd = phases["forward"]
                lines.append(f"| {report['spec']} | {megabytes(fwd)} | "
                             f"{fwd['bytes'] / fwd['floor_bytes']:.1f} | "
                             f"{megabytes(phases.get('backward', {}))} | "
                             f"{phases.get('step', {}).get('bytes', 0) / 1e6:.2f} |")
            lines.append("")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
