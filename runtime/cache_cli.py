"""`attnc cache list | show | clear | prune | export | import`: manage the kernel cache."""
from __future__ import annotations

import argparse
import json
import sys
import time
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
