"""The `attnc` command line."""
from __future__ import annotations

import argparse
import json
import sys
import time

from ..dsl.errors import SpecError


def _cmd_check(args) -> int:
    from .compiler import compile

    failed = 0
    reports = []
    t0 = time.perf_counter()
    for source in args.specs:
        try:
            op = compile(source)
        except SpecError as err:
            print(err, file=sys.stderr)
            failed += 1
            continue
        except (OSError, ValueError) as err:
            print(f"{source}: error: {err}", file=sys.stderr)
            failed += 1
            continue
        a = op.analysis
        if args.json:
            reports.append({
                "name": op.name,
                "class": a.cls,
                "states": [
                    {"name": s.name, "shape": list(s.shape), "class": s.cls,
                     "canonical": s.canonical, **({"reason": s.reason} if s.reason else {})}
                    for s in a.states
                ],
                "inputs": [{"name": i.name, "shape": list(i.shape)} for i in op.spec.inputs],
                "readouts": [r.canonical for r in a.readouts],
            })
            continue
        print(f"{op.name}: {a.cls}")
        for s in a.states:
            print(f"  {s.canonical}    [{s.cls}]")
            if s.cls in ("other", "dplr"):
                print(f"  note: {op.name} is not chunk-parallel: {s.reason}; it runs on the "
                      "fused recurrent kernel (sequential in T)")
        for r in a.readouts:
            print(f"  {r.canonical}")
    if args.json:
        print(json.dumps(reports, indent=2))
    if args.time:
        print(f"checked {len(args.specs)} spec(s) in {time.perf_counter() - t0:.2f} s",
              file=sys.stderr)
    return 1 if failed else 0


def _cmd_show(args) -> int:
    from .compiler import parse_spec
    from ..dsl.printer import pretty

    try:
        print(pretty(parse_spec(args.spec)), end="")
    except SpecError as err:
        print(err, file=sys.stderr)
        return 1
    except (OSError, ValueError) as err:
        print(f"{args.spec}: error: {err}", file=sys.stderr)
        return 1
    return 0


def _cmd_verify(args) -> int:
    import os

    # Without a GPU the Triton kernels run in Triton's interpreter, which must be
    # switched on before triton is first imported.
    if args.backend != "torch" and "triton" not in sys.modules and not _has_cuda_device():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    import warnings

    from .compiler import NotChunkParallelWarning, compile, shipped_specs
    from .verify import verify

    names = args.specs or shipped_specs()
    shape = dict(B=1, T=37, H=2, K=16, V=32) if args.quick else dict(B=2, T=100, H=2, K=32, V=64)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    failed = 0
    from .settings import settings

    backend = args.backend or "triton"
    where = device if device == "cuda" or backend == "torch" or not settings().interpret \
        else "cpu, Triton interpreter"
    if backend == "triton" and device == "cpu" and not settings().interpret:
        backend = "torch"  # triton was imported before the interpreter could be switched on
        where = "cpu, PyTorch chunk path"
    print(f"attnc verify: {backend} kernels vs the fp64 reference ({where}), shapes {shape}")
    for name in names:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotChunkParallelWarning)
                op = compile(name)
        except SpecError as err:
            print(err, file=sys.stderr)
            failed += 1
            continue
        result = verify(op, **shape, device=device, backend=backend)
        worst, err = result.worst
        status = "ok" if result.ok else "FAIL"
        kernel = "recurrent" if op.no_chunk_form else "chunk"
        print(f"  {op.name:16s} {op.cls:9s} {kernel:9s} {status:4s} worst rel. RMS {err:.2e} "
              f"({worst}); {len(result.errors)} quantities")
        failed += not result.ok
    return 1 if failed else 0


def _cmd_compile(args) -> int:
    from pathlib import Path

    from ..codegen.plan import NoChunkForm
    from .compiler import compile

    try:
        op = compile(args.spec)
        files = op.sources()
    except SpecError as err:
        print(err, file=sys.stderr)
        return 1
    except NoChunkForm as err:
        print(f"{args.spec}: {err}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as err:
        print(f"{args.spec}: error: {err}", file=sys.stderr)
        return 1
    if args.emit is None:
        print(f"{op.name}: {op.cls}; generated {', '.join(files)} (use --emit DIR to write them)")
        return 0
    out = Path(args.emit)
    out.mkdir(parents=True, exist_ok=True)
    for name, source in files.items():
        (out / name).write_text(source)
        print(out / name)
    return 0


def _has_cuda_device() -> bool:
    import os

    return os.path.exists("/dev/nvidia0") or bool(os.environ.get("CUDA_VISIBLE_DEVICES"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser("check", help="parse, check and classify specs")
    check.add_argument("specs", nargs="+", metavar="SPEC",
                       help="a .attn file or the name of a shipped spec")
    check.add_argument("--json", action="store_true", help="machine-readable report")
    check.add_argument("--time", action="store_true", help="report the time taken")
    check.set_defaults(run=_cmd_check)

    verify = sub.add_parser("verify", help="compile specs and check the kernels against "
                            "the fp64 reference (values, final states, all gradients)")
    verify.add_argument("specs", nargs="*", metavar="SPEC", help="default: every shipped spec")
    verify.add_argument("--quick", action="store_true", help="small shapes")
    verify.add_argument("--backend", choices=("triton", "torch"), default=None,
                        help="default: triton (in Triton's interpreter when there is no GPU)")
    verify.set_defaults(run=_cmd_verify)

    comp = sub.add_parser("compile", help="compile a spec; --emit DIR writes the generated sources")
    comp.add_argument("spec", metavar="SPEC")
    comp.add_argument("--emit", metavar="DIR", help="write the generated .py sources here")
    comp.set_defaults(run=_cmd_compile)

    show = sub.add_parser("show", help="print a spec's canonical text (pretty IR)")
    show.add_argument("spec", metavar="SPEC")
    show.set_defaults(run=_cmd_show)
    from .cache_cli import add_cache_commands
    from .gpu_cli import add_gpu_commands

    add_cache_commands(sub)
    add_gpu_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
