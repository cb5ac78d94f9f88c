"""`attnc trace` and `attnc aot`: what a call does on a GPU, found out without one.

    attnc trace gla --shape 1,2048,16,128,128      every kernel launch and PyTorch pass of a
                                                   forward, backward and decode step, with the
                                                   bytes each moves against the memory floor
    attnc aot gla gated_deltanet --target cuda:90  compile each of those launches for an H100
                                                   (registers, spills, shared memory)

Both record the launches with runtime/launches.py; `aot` compiles them with runtime/aot.py.
"""
from __future__ import annotations

import json
import sys
import warnings

DEFAULT_BTH = (1, 256, 16)
DEFAULT_DIM = 128


def add_gpu_commands(subparsers) -> None:
    for name, run, text in (
        ("trace", _cmd_trace, "list the kernel launches and PyTorch passes of one call as on a "
         "GPU (no GPU needed), with the bytes each moves"),
        ("aot", _cmd_aot, "compile every kernel a call launches for a GPU target on this "
         "machine (no GPU needed): errors, registers, spills, shared memory"),
    ):
        cmd = subparsers.add_parser(name, help=text)
        cmd.add_argument("specs", nargs="+", metavar="SPEC",
                         help="a .attn file or the name of a shipped spec")
        cmd.add_argument("--shape", metavar="B,T,H,DIMS",
                         help="batch, tokens, heads, then the spec's dims in declaration order "
                         f"(default {','.join(map(str, DEFAULT_BTH))} and {DEFAULT_DIM} for each dim)")
        cmd.add_argument("--dtype", default="bf16", help="input dtype: bf16, fp16 or fp32")
        cmd.add_argument("--config", metavar="KEY=VALUE,...",
                         help="launch config to record instead of the defaults, e.g. "
                         "chunk_size=64,num_warps=8,block_k=64")
        cmd.add_argument("--no-backward", dest="backward", action="store_false",
                         help="forward (and decode step) only")
        cmd.add_argument("--json", action="store_true", help="machine-readable report")
        if name == "trace":
            cmd.add_argument("--host-time", action="store_true",
                             help="also time attnc's host work per call on this CPU (kernels not "
                             "launched; small shapes, since the host work does not grow with them)")
        if name == "aot":
            cmd.add_argument("--target", default="cuda:90",
                             help="compute capability to compile for (default cuda:90, H100/H200)")
        cmd.set_defaults(run=run)


def _turn_interpreter_off() -> None:
    """Compiled kernels need Triton without its interpreter: switch it off before triton
    is first imported (it cannot be switched off after)."""
    from .settings import use_compiled_kernels

    use_compiled_kernels()


def parse_config(text: str | None) -> dict[str, int] | None:
    """--config text ("num_warps=8,block_k=64") as a dict of ints, or None when empty."""
    if not text:
        return None
    config = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--config {text!r}: expected KEY=VALUE pairs separated by commas")
        try:
            config[key.strip()] = int(value)
        except ValueError:
            raise ValueError(f"--config {text!r}: {key.strip()} needs an integer, got {value!r}") from None
    return config


def _traces(args):
    """(op, trace) for each spec of the command line."""
    import torch

    from .cache_cli import DTYPES, parse_shape
    from .compiler import NotChunkParallelWarning, compile
    from .launches import record

    dtype_name = DTYPES.get(args.dtype.strip().lower())
    if dtype_name is None:
        raise ValueError(f"--dtype {args.dtype!r}: expected one of {', '.join(DTYPES)}")
    config = parse_config(args.config)
    chunk_size = config.pop("chunk_size", None) if config else None
    for source in args.specs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotChunkParallelWarning)
            op = compile(source)
        if args.shape:
            B, T, H, dims = parse_shape(op, args.shape)
        else:
            B, T, H = DEFAULT_BTH
            dims = {d.name: DEFAULT_DIM for d in op.spec.dims}
        trace = record(op, B=B, T=T, H=H, dims=dims, dtype=getattr(torch, dtype_name),
                       backward=args.backward, config=config if config else None,
                       chunk_size=chunk_size)
        yield op, (B, T, H, dims), trace


def _run(args, body) -> int:
    from ..dsl.errors import SpecError
    from .aot import AotError

    _turn_interpreter_off()
    try:
        return body(args)
    except SpecError as err:
        print(err, file=sys.stderr)
    except (AotError, OSError, ValueError) as err:
        print(f"attnc {args.command}: error: {err}", file=sys.stderr)
    return 1


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:9.2f} MB"


def _cmd_trace(args) -> int:
    return _run(args, _trace)


def _trace(args) -> int:
    from .launches import HostSync, KernelLaunch

    reports = []
    for op, (B, T, H, dims), trace in _traces(args):
        host = _host_times(op, dims, args) if args.host_time else {}
        if args.json:
            reports.append({
                "spec": op.name, "shape": {"B": B, "T": T, "H": H, **dims},
                "phases": {phase: {"bytes": trace.bytes(phase),
                                   "least_bytes": trace.least_bytes(phase),
                                   "floor_bytes": trace.floor_bytes.get(phase),
                                   **({"host_us": host[phase]} if phase in host else {}),
                                   "events": [_event_json(e) for e in trace.events
                                              if e.phase == phase]}
                           for phase in trace.phases()}})
            continue
        print(f"{op.name}: B={B} T={T} H={H} {' '.join(f'{k}={v}' for k, v in dims.items())} "
              f"{args.dtype}, as on a GPU")
        for phase in trace.phases():
            floor = trace.floor_bytes.get(phase)
            ratio = f" = {trace.bytes(phase) / floor:.1f} x the floor ({_mb(floor).strip()})" \
                if floor else ""
            launches = len(trace.launches(phase))
            passes = len(trace.torch_ops(phase))
            syncs = len(trace.host_syncs(phase))
            least = trace.least_bytes(phase)
            least = f" ({_mb(least).strip()} where the gates make every chunk whole: less the tensors " \
                    "marked *)" if least != trace.bytes(phase) else ""
            print(f"  {phase}: {_mb(trace.bytes(phase)).strip()} moved{ratio}{least}; {launches} kernel "
                  f"launch{'es' if launches != 1 else ''}, {passes} PyTorch pass{'es' if passes != 1 else ''}"
                  f", {syncs} host sync{'s' if syncs != 1 else ''}")
            if phase in host:
                print(f"    host work {host[phase]:.0f} us per call on this CPU (attnc's own: "
                      "kernels not launched)")
            for event in trace.events:
                if event.phase != phase:
                    continue
                if isinstance(event, KernelLaunch):
                    grid = "x".join(map(str, event.grid))
                    some = f"  * {', '.join(event.data_dependent)}: at least {_mb(event.least_bytes).strip()}" \
                        if event.data_dependent else ""
                    print(f"    kernel {event.name:38s}{_mb(event.tensor_bytes)}  grid {grid}{some}")
                elif isinstance(event, HostSync):
                    print(f"    sync   {event.name:38s}(the host waits for the device)")
                else:
                    print(f"    torch  {event.name:38s}{_mb(event.bytes)}")
    if args.json:
        print(json.dumps(reports, indent=2))
    return 0


def _host_times(op, dims, args) -> dict[str, float]:
    """host_times by trace phase: the backward's is forward+backward less the forward."""
    import torch

    from .cache_cli import DTYPES
    from .launches import host_times

    times = host_times(op, dims=dims, dtype=getattr(torch, DTYPES[args.dtype.strip().lower()]))
    by_phase = {"forward": times["forward"], "step": times["step"]}
    if args.backward:
        by_phase["backward"] = times["forward+backward"] - times["forward"]
    return by_phase


def _event_json(event) -> dict:
    from .launches import HostSync, KernelLaunch

    if isinstance(event, KernelLaunch):
        return {"kernel": event.name, "bytes": event.tensor_bytes, "least_bytes": event.least_bytes,
                "data_dependent": list(event.data_dependent), "grid": list(event.grid), **event.options}
    if isinstance(event, HostSync):
        return {"host_sync": event.name}
    return {"torch": event.name, "bytes": event.bytes}


def _cmd_aot(args) -> int:
    return _run(args, _aot)


def _aot(args) -> int:
    from .aot import Target, compile_trace

    target = Target.parse(args.target)
    failed = spilled = 0
    reports = []
    for op, _, trace in _traces(args):
        results = compile_trace(trace, target)
        if args.json:
            reports.append({"spec": op.name, "target": str(target),
                            "kernels": [r.__dict__ | {"ok": r.ok, "error_summary": r.error_summary}
                                        for r in results]})
        else:
            print(f"{op.name} for {target}:")
        for r in results:
            failed += not r.ok
            spilled += bool(r.spill_bytes)
            if args.json:
                continue
            if r.error:
                print(f"  {r.name:38s} FAILED  {r.error_summary}")
                continue
            smem = f"{r.shared_bytes / 1024:6.1f} KiB smem"
            flags = (" OVER THE SHARED-MEMORY LIMIT" if r.over_shared_limit else "") + \
                (f" spills {r.spill_bytes} B/thread" if r.spill_bytes else "")
            regs = "?" if r.registers is None else r.registers
            print(f"  {r.name:38s} ok  {regs:>3} regs {smem}  warps {r.num_warps} "
                  f"stages {r.num_stages if r.num_stages is not None else '-'}  "
                  f"{r.seconds:4.1f} s{flags}")
    if args.json:
        print(json.dumps(reports, indent=2))
    elif failed or spilled:
        print(f"{failed} kernel(s) failed to compile or fit; {spilled} kernel(s) spill registers "
              "to local memory", file=sys.stderr)
    return 1 if failed else 0
