"""Load generated Python source as a module.

@triton.jit reads a kernel's source with `inspect`, so generated code must live in a real
file: the source is written beside the cache entry (where it can also be read), then
imported under a module name of its own.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import sys
import tempfile
from pathlib import Path
from types import ModuleType


def _write_atomically(path: Path, source: str) -> None:
    """Write through a temporary file and os.replace, so a reader (another process
    importing the same entry) never sees a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(source)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_module(source: str, module_name: str, directory: Path) -> ModuleType:
    """Write `source` to `directory/module_name.py` (unless an identical file is there),
    import it and return the module.

    The entry in sys.modules is named after the file's path and content, so two different
    sources, or one source in two cache directories, never collide, and loading the same
    file twice returns the module already imported."""
    if not module_name.isidentifier():
        raise ValueError(f"module name {module_name!r} is not a Python identifier")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{module_name}.py"
    try:
        current = path.read_text(encoding="utf-8")
    except (FileNotFoundError, UnicodeDecodeError):
        current = None  # missing or corrupt: (re)write it
    if current != source:
        _write_atomically(path, source)

    digest = hashlib.sha256(f"{path.resolve()}\n{source}".encode()).hexdigest()[:16]
    unique_name = f"attnc_generated_{module_name}_{digest}"
    if unique_name in sys.modules:
        return sys.modules[unique_name]
    spec = importlib.util.spec_from_file_location(unique_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import generated module from {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[unique_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[unique_name]
        raise
    settle_kernel_keys(module)
    return module


def settle_kernel_keys(module: ModuleType) -> None:
    """Compute the Triton cache key of each compiled (not interpreted) @triton.jit
    function in `module`, its callees first.

    Triton keys a compiled kernel, on disk too, by a hash of its source, its callees' keys
    and the constexpr globals it and they read. Triton 3.6 merges a callee's globals into
    its caller's before it hashes the callee, so a kernel hashed before its helpers misses
    their globals (INTERPRETED, SUB_CHUNK, ...): its key depended on which kernels a
    process launched first, and a process launching in another order than the one that
    filled the cache (a tuned config's forward, or a decode step, first) compiled again.
    With callees hashed first every kernel has one key. Nothing is compiled here; hashing
    an op's 80 functions takes ~40 ms."""
    if "triton" not in sys.modules:
        return
    from triton.runtime.jit import JITFunction

    def callees(function):
        scope = function.__globals__
        for base, attribute in re.findall(r"\b([A-Za-z_]\w*)(?:\.([A-Za-z_]\w*))?", function.src):
            value = scope.get(base)
            if attribute and isinstance(value, ModuleType):
                value = getattr(value, attribute, None)
            if isinstance(value, JITFunction):
                yield value

    visiting: set[int] = set()

    def settle(function) -> None:
        if getattr(function, "hash", None) is not None or id(function) in visiting:
            return  # hashed already, or a recursive call (Triton breaks the cycle itself)
        visiting.add(id(function))
        for callee in callees(function):
            settle(callee)
        function.cache_key  # noqa: B018 - computed and memoised by Triton
        visiting.discard(id(function))

    for value in list(vars(module).values()):
        if isinstance(value, JITFunction) and value.__module__ == module.__name__:
            settle(value)


def load_sibling(anchor: str | Path, module_name: str) -> ModuleType:
    """Import the generated module `module_name` from the folder of the file `anchor` (a
    generated module's `__file__`): generated modules that use each other are written
    side by side, in one cache entry or one `attnc compile --emit` folder."""
    directory = Path(anchor).parent
    source = (directory / f"{module_name}.py").read_text(encoding="utf-8")
    return load_module(source, module_name, directory)
