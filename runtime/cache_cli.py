"""`attnc cache list | show | clear | prune | export | import | tune`: manage the kernel cache."""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

from .cache import CacheError, Entry, KernelCache


def add_cache_commands(subparsers) -> argparse.ArgumentParser:
    """Register `cache` and its subcommands on the `attnc` parser's subparsers.

    Every subcommand sets `run(args) -> exit code`, like the other `attnc` commands.
    """
    cache = subparsers.add_parser("cache", help="manage the kernel and config cache "
                                  "(ATTNC_CACHE_DIR)")
    sub = cache.add_subparsers(dest="cache_command", required=True, metavar="ACTION")

    listing = sub.add_parser("list", help="one line per entry: spec, key, device, size, age")
    listing.set_defaults(run=_cmd_list)

    show = sub.add_parser("show", help="an entry's key parts, sources and tuned configs")
    show.add_argument("key", metavar="KEY", help="a key or a unique prefix of one")
    show.set_defaults(run=_cmd_show)

    clear = sub.add_parser("clear", help="remove every entry, or every entry of one spec")
    clear.add_argument("--spec", metavar="NAME", help="only entries of this spec")
    clear.set_defaults(run=_cmd_clear)

    prune = sub.add_parser("prune", help="remove entries not used for a while")
    prune.add_argument("--older-than", type=float, required=True, metavar="DAYS",
                       help="remove entries unused for more than DAYS days")
    prune.set_defaults(run=_cmd_prune)

    export = sub.add_parser("export", help="write every current entry to a .tar.gz")
    export.add_argument("file", type=Path, metavar="FILE")
    export.set_defaults(run=_cmd_export)

    imp = sub.add_parser("import", help="add the entries of an exported .tar.gz "
                         "(rejects archives that escape the cache or fail their hashes)")
    imp.add_argument("file", type=Path, metavar="FILE")
    imp.set_defaults(run=_cmd_import)

    tune = sub.add_parser("tune", help="tune a spec's kernels for one shape on this GPU now and "
                          "store the config (e.g. when building a deployment image)")
    tune.add_argument("spec", metavar="SPEC", help="a .attn file or the name of a shipped spec")
    tune.add_argument("--shape", required=True, metavar="B,T,H,DIMS",
                      help="batch, tokens per sequence, heads, then the spec's dims in the order "
                      "it declares them, e.g. 8,2048,16,128,128 for B,T,H,K,V")
    tune.add_argument("--dtype", default="bf16", metavar="DTYPE",
                      help=f"input dtype: {', '.join(DTYPES)} (default bf16)")
    tune.add_argument("--varlen", type=int, metavar="N",
                      help="tune varlen calls: T tokens packed into N sequences (then B = 1)")
    tune.add_argument("--mode", choices=("fast", "full"), default=None,
                      help="candidate set (default: ATTNC_AUTOTUNE, or fast when it is off)")
    tune.set_defaults(run=_cmd_tune)
    return cache


def _reporting_errors(command):
    """Bad input ends a command with one line on stderr and exit code 1, no traceback."""
    def run(args) -> int:
        try:
            return command(args, KernelCache())
        except (CacheError, OSError, ValueError) as err:
            print(f"attnc cache {args.cache_command}: error: {err}", file=sys.stderr)
            return 1
    run.__doc__ = command.__doc__
    return run


@_reporting_errors
def _cmd_list(args, cache: KernelCache) -> int:
    entries = cache.list_entries()
    if not entries:
        print(f"no cache entries in {cache.root}")
        return 0
    now = time.time()
    rows = [("SPEC", "KEY", "DEVICE", "SIZE", "AGE", "STATUS")]
    rows += [(e.spec, e.key[:12], e.device, _size(e.size), _age(now - e.created), _status(e))
             for e in entries]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print(f"{_entries(len(entries))}, {_size(sum(e.size for e in entries))}, in {cache.root}")
    return 0


@_reporting_errors
def _cmd_show(args, cache: KernelCache) -> int:
    entry = cache.show(args.key)
    print(f"key:      {entry.key}")
    print(f"spec:     {entry.spec}")
    print(f"status:   {_status(entry)}{f' ({entry.problem})' if entry.problem else ''}")
    print(f"attnc:    {entry.version}")
    print(f"created:  {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(entry.created))}")
    print(f"path:     {entry.path}")
    parts = entry.meta.get("parts", {})
    print("key parts:")
    for name, value in sorted(parts.items()):
        if name != "spec":  # the spec text is printed below, in full
            print(f"  {name}: {value}")
    if "spec" in parts:
        print("spec text:")
        print("".join(f"  {line}\n" for line in parts["spec"].splitlines()), end="")
    for name, path in entry.files.items():
        print(f"\n# ---- {name} " + "-" * max(0, 60 - len(name)))
        try:
            print(path.read_text(), end="")
        except OSError as err:
            print(f"# (unreadable: {err})")
    configs = cache.configs(entry.key)
    print("\ntuned configs:" + ("" if configs else " none"))
    if configs:
        print(json.dumps(configs, indent=2, sort_keys=True))
    return 0


@_reporting_errors
def _cmd_clear(args, cache: KernelCache) -> int:
    removed = cache.clear(spec=args.spec)
    which = f" of spec {args.spec}" if args.spec else ""
    print(f"removed {_entries(removed)}{which}")
    return 0


@_reporting_errors
def _cmd_prune(args, cache: KernelCache) -> int:
    removed = cache.prune(args.older_than)
    print(f"removed {_entries(removed)} unused for more than {args.older_than:g} days")
    return 0


@_reporting_errors
def _cmd_export(args, cache: KernelCache) -> int:
    count = cache.export(args.file)
    print(f"exported {_entries(count)} to {args.file}")
    return 0


@_reporting_errors
def _cmd_import(args, cache: KernelCache) -> int:
    report = cache.import_(args.file)
    print(f"imported {_entries(len(report.added))} from {args.file}; "
          f"{len(report.present)} already present")
    return 0


DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32",
          "bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}


def _cmd_tune(args) -> int:
    """Bad arguments, specs without chunk kernels and machines without a GPU end with one
    line on stderr and exit code 1 (a bad spec with its located diagnostic)."""
    from ..dsl.errors import SpecError
    from .autotune import TuningError

    try:
        return _tune(args)
    except SpecError as err:
        print(err, file=sys.stderr)
    except (CacheError, TuningError, OSError, ValueError) as err:
        print(f"attnc cache tune: error: {err}", file=sys.stderr)
    return 1


def _tune(args) -> int:
    import torch

    from .autotune import TuningError, tune
    from .compiler import NotChunkParallelWarning, compile
    from .settings import settings

    dtype_name = DTYPES.get(args.dtype.strip().lower())
    if dtype_name is None:
        raise ValueError(f"--dtype {args.dtype!r}: expected one of {', '.join(DTYPES)}")
    with warnings.catch_warnings():  # the error below says it better
        warnings.simplefilter("ignore", NotChunkParallelWarning)
        op = compile(args.spec)
    B, T, H, dims = parse_shape(op, args.shape)
    if args.varlen is not None and B != 1:
        raise ValueError(f"--varlen packs sequences along T with B = 1, got B = {B}")
    if op.no_chunk_form is not None:
        raise TuningError(f"{op.name} has no chunk kernels to tune: {op.no_chunk_form}")
    if not torch.cuda.is_available():
        raise TuningError("tuning needs a CUDA GPU, and torch sees none here; run it on the "
                          "machine (or one like it) that will use the configs")
    if settings().interpret:
        raise TuningError("tuning needs compiled kernels, but Triton's interpreter is on "
                          "(unset TRITON_INTERPRET / ATTNC_INTERPRET)")
    result = tune(op, B=B, T=T, H=H, dims=dims,
                  dtype=getattr(torch, dtype_name), device="cuda", num_sequences=args.varlen,
                  mode=args.mode)
    defaults = [ms for config, ms in result.timings if config == {"chunk_size": 64}]
    versus = f"; defaults {defaults[0]:.3f} ms" if defaults else ""
    print(f"tuned {op.name} on {result.device}, {result.bucket}:")
    print(f"  {json.dumps(result.config, sort_keys=True)}")
    print(f"  {result.best_ms:.3f} ms per forward + backward{versus}; "
          f"{len(result.timings)} candidates timed")
    compiled = f"compiling {result.compile_s:.1f} s, then " if result.compile_s else ""
    print(f"  {compiled}running and timing {result.timing_s:.1f} s")
    for config, ms in sorted(result.timings, key=lambda item: item[1]):
        print(f"    {ms:8.3f} ms  {json.dumps(config, sort_keys=True)}")
    return 0


def _entries(count: int) -> str:
    return f"{count} cache entr{'y' if count == 1 else 'ies'}"


def _status(entry: Entry) -> str:
    if entry.problem:
        return "corrupt"
    return f"stale (attnc {entry.version})" if entry.stale else "ok"


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if nbytes < 1024:
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} GiB"


def _age(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    for unit, span in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= span:
            return f"{seconds / span:.1f} {unit}"
    return f"{seconds:.0f} s"


def parse_shape(op, text: str) -> tuple[int, int, int, dict[str, int]]:
    """(B, T, H, dims) from "B,T,H" followed by the spec's dims in the order it declares
    them (e.g. "8,2048,16,128,128" for B,T,H,K,V)."""
    try:
        shape = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--shape {text!r}: expected comma-separated integers "
                         "B,T,H followed by the spec's dims, e.g. 8,2048,16,128,128") from None
    if any(size < 1 for size in shape):
        raise ValueError(f"--shape {text!r}: sizes must be positive")
    names = [d.name for d in op.spec.dims]
    if len(shape) != 3 + len(names):
        raise ValueError(f"--shape {text!r}: {op.name} needs B,T,H,{','.join(names)} "
                         f"({3 + len(names)} numbers), got {len(shape)}")
    B, T, H, *sizes = shape
    return B, T, H, dict(zip(names, sizes))
